"""Which replica takes a request on Ray Serve: one that holds its adapter while that keeps the load
balanced, else the least loaded one.

Why not Ray's multiplexed routing alone: it sends an adapter's requests only to the replicas that
hold it until they are full (their `max_ongoing_requests`, now max_running + max_waiting), so a
popular adapter keeps one replica's queue long while another idles. With the demo's 4 adapters
drawn Zipf (48 / 24 / 16 / 12%), the first assignment can split requests 64% / 36%, which caps 2
replicas at ~1.56x one. Loading an adapter into another replica's pool costs milliseconds; an idle
replica costs its throughput. So the adapter's holders are preferred only while their queue is
within `slack` requests of the least loaded replica's (Ray LLM's PrefixCacheAffinityRouter treats
prefixes the same way, with its `imbalanced_threshold`).

A replica's load is the larger of two counts. Ray's queue-length cache holds what replicas last
reported (it sees every router's requests) but lags a burst: Ray's routing task decides request
after request from one snapshot before any of them is sent, and each acceptance resets the count to
the replica's own, which misses requests still on their way (CI, 2 cores: a burst of 24 split
3 / 21). So the router also counts the requests it assigned itself, from the decision until Ray
reports the request done: each decision names one replica (one rank), so the count is exact.
"""

from __future__ import annotations

import collections

from ray.serve.request_router import (
    FIFOMixin,
    MultiplexMixin,
    PendingRequest,
    ReplicaID,
    RequestRouter,
    RunningReplica,
)


class AdapterAffinityRouter(FIFOMixin, MultiplexMixin, RequestRouter):
    def initialize_state(self, slack: int = 8) -> None:
        self.slack = slack
        self.assigned: dict[str, tuple[ReplicaID, PendingRequest]] = {}  # internal request id -> both

    def load(self, replicas: list[RunningReplica]) -> dict[ReplicaID, int]:
        """Requests at each replica: what it last reported (Ray's cache) or what this router
        assigned it and has not heard back about, whichever is more."""
        # a request abandoned before it was sent (client gone) never reports back
        self.assigned = {key: sent for key, sent in self.assigned.items() if not sent[1].future.cancelled()}
        mine = collections.Counter(replica for replica, _ in self.assigned.values())
        cache = self._replica_queue_len_cache
        return {r.replica_id: max(cache.get(r.replica_id) or 0, mine[r.replica_id]) for r in replicas}

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        """One rank of one replica with room (any, when none has): the least loaded of the adapter's
        holders within `slack` of the least load, else the least loaded replica. A replica Ray then
        finds full sends the request back here, after a backoff."""
        load = self.load(candidate_replicas)
        lightest = sorted(candidate_replicas, key=lambda r: load[r.replica_id])
        lightest = [r for r in lightest if load[r.replica_id] < r.max_ongoing_requests] or lightest
        if not lightest:
            return []
        chosen = lightest[0]
        if pending_request is not None:
            adapter = pending_request.metadata.multiplexed_model_id
            holders = [r for r in lightest if adapter and adapter in r.multiplexed_model_ids]
            if holders and load[holders[0].replica_id] <= load[chosen.replica_id] + self.slack:
                chosen = holders[0]
            self.assigned[pending_request.metadata.internal_request_id] = (chosen.replica_id, pending_request)
            pending_request.routing_context.should_backoff = True
        return [[chosen]]

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        """Ray calls this once a request sent to `replica_id` is done (answered, failed, refused as
        full, or cancelled)."""
        if self.assigned.get(internal_request_id, (None,))[0] == replica_id:
            del self.assigned[internal_request_id]
