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

Queue lengths are the router's cache, which Ray keeps as it sends requests and hears back from
replicas (the same numbers its own power-of-two choice reads); Ray then probes the chosen rank and
takes its shortest queue that accepts.
"""

from __future__ import annotations

from ray.serve.request_router import FIFOMixin, MultiplexMixin, PendingRequest, RequestRouter, RunningReplica


class AdapterAffinityRouter(FIFOMixin, MultiplexMixin, RequestRouter):
    def initialize_state(self, slack: int = 8) -> None:
        self.slack = slack

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        """Ranks to try in turn: the adapter's holders within `slack` of the least load (if any),
        then every replica, the least loaded first."""
        load = {r.replica_id: self._replica_queue_len_cache.get(r.replica_id) or 0 for r in candidate_replicas}
        lightest = sorted(candidate_replicas, key=lambda r: load[r.replica_id])
        if not lightest:
            return []
        ranks = []
        adapter = pending_request.metadata.multiplexed_model_id if pending_request is not None else ""
        if adapter:
            bound = load[lightest[0].replica_id] + self.slack
            holders = [r for r in lightest if adapter in r.multiplexed_model_ids and load[r.replica_id] <= bound]
            if holders:
                ranks.append(holders)
        ranks.append(lightest)
        if pending_request is not None:  # every replica was offered: wait before the next try
            pending_request.routing_context.should_backoff = True
        return ranks
