"""Throughput of the Ray Serve deployment with 1 and with N replicas, over HTTP, in one Ray session.

Each round deploys `application(spec, replicas=r)` of the demo assets (or `--base` / `--adapter`),
then `--clients` threads send `--requests` completions in all (adapters drawn round-robin, greedy,
`--max-tokens` each with EOS ignored) through the OpenAI routes and wait for them; throughput is the
output tokens over the wall time of the round. Rounds alternate 1 and N replicas (`--rounds` each;
the host drifts), and the ratio is taken per pair. On a machine with GPUs each replica takes one; on
CPU the replicas share the cores (say which in the results).
"""

from __future__ import annotations

import argparse
import socket
import sys
import threading
import time
from collections.abc import Sequence

import common
import httpx
import ray
from hf_multilora.app.demo import read_demo
from ray import serve

from hf_multilora.serving.ray import ModelSpec, application


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def round_trip(url: str, names: list[str], args: argparse.Namespace) -> float:
    """Output tokens per second of one round of requests."""
    todo = list(range(args.requests))
    lock = threading.Lock()
    tokens = [0]

    def client() -> None:
        with httpx.Client(timeout=600) as http:
            while True:
                with lock:
                    if not todo:
                        return
                    i = todo.pop()
                body = {"model": names[i % len(names)], "prompt": f"{i} van {i % 10} => ", "max_tokens": args.max_tokens,
                        "temperature": 0, "ignore_eos": True}  # fmt: skip
                reply = http.post(f"{url}/v1/completions", json=body)
                reply.raise_for_status()
                with lock:
                    tokens[0] += reply.json()["usage"]["completion_tokens"]

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return tokens[0] / (time.perf_counter() - started)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    demo = read_demo()
    spec = ModelSpec(base=str(demo.base), adapters={n: str(p) for n, p in demo.adapters.items()}, model_name="demo-base")
    names = ["demo-base", *demo.adapters]
    ray.init(include_dashboard=False, log_to_driver=False)
    resources = ray.cluster_resources()
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    pairs = []
    for r in range(args.rounds):
        speeds = {}
        for replicas in ((1, args.replicas) if r % 2 == 0 else (args.replicas, 1)):
            serve.run(application(spec, replicas))
            round_trip(url, names, argparse.Namespace(**{**vars(args), "requests": 8}))  # warm-up
            speeds[replicas] = round_trip(url, names, args)
            print(f"round {r}: {replicas} replica(s): {speeds[replicas]:.1f} tok/s", flush=True)
        pairs.append(speeds)
    serve.shutdown()
    ratios = [p[args.replicas] / p[1] for p in pairs]
    where = f"{int(resources.get('GPU', 0))} GPU(s)" if resources.get("GPU") else f"CPU only, {int(resources['CPU'])} cores"
    print(f"{args.replicas} replicas / 1 replica: median {common.median(ratios):.2f}x (rounds {[round(x, 2) for x in ratios]}); {where}")
    if args.json:
        common.write_json(args.json, {"args": vars(args), "resources": resources, "pairs": pairs, "ratios": ratios})
    return 0


if __name__ == "__main__":
    sys.exit(main())
