"""Throughput of the Ray Serve deployment with 1 and with N replicas, over HTTP, in one Ray session.

The model (`--shapes`): the demo assets (default; its 4 adapters), or a randomly initialised Llama
of the TINY (CPU check) or Llama-2-7B shape (GPUs) written to a temporary folder with a word-level
tokenizer ("t0" ... one word per id) and `--adapters` synthetic adapters (q/k/v/o, ranks 8/16, as
bench_serve.py writes them). The trace is bench_serve.py's at saturation: `--requests` prompts of
random token ids, output lengths uniform in `--output-lens` (EOS ignored), adapters drawn Zipf.

Each round deploys `application(spec, replicas=r)`, sends the trace's first 2 x `--clients` requests
untimed (a fresh replica compiles and captures its decode graphs on first use; with the load rising
and falling every batch size comes up), then the whole trace timed: `--clients` threads
send the completions through the OpenAI routes and wait for them; throughput is the output tokens
over the wall time. Rounds alternate 1 and N replicas (`--rounds` each; the host drifts), and the
ratio is taken per pair. Each timed run also records the cores each part of the stack used (Ray's
proxy, the Router, the Replicas, the controller, the clients; `--client-processes` spreads the
client threads over processes), to find the part that caps a run. On a machine with GPUs each
replica takes one; on CPU the replicas share the cores (say which in the results).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing
import socket
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import bench_adapter_scale as scale
import common
import httpx
import psutil
import ray
import torch
from bench_generate import FULL, TINY, build_base
from bench_serve import TraceRequest, make_trace
from hf_multilora.app.demo import read_demo
from ray import serve
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from hf_multilora.serving.ray import ModelSpec, application


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def synthetic_spec(root: Path, args: argparse.Namespace) -> tuple[ModelSpec, list[str], int]:
    """A random base model and adapters written under `root`: (spec, adapter names, vocabulary size)."""
    on_gpu = args.shapes == "llama-7b"
    profile = FULL if on_gpu else TINY
    base = build_base(profile, torch.device("cuda" if on_gpu else "cpu"), torch.bfloat16 if on_gpu else torch.float32)
    base.save_pretrained(root / "base")
    del base
    common.free_memory()
    vocab = profile.config["vocab_size"]
    words = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="t0", bos_token="t1", eos_token="t2")
    tokenizer.save_pretrained(root / "base")
    ranks = (8, 16) if on_gpu else (4, 8)
    weights = scale.write_weight_files(root / "weights", profile.config, ranks, per_rank=4)
    names = scale.adapter_names(args.adapters)
    folders = scale.make_folders(root / "adapters", scale.draw_ranks(args.adapters, ranks, args.seed), weights, names)
    pool_bytes = int(args.pool_gib * 2**30) if on_gpu else 2**24
    spec = ModelSpec(base=str(root / "base"), adapters={n: str(f) for n, f in folders.items()}, model_name="base",
                     pool_bytes=pool_bytes, max_running=args.max_running)  # fmt: skip
    return spec, names, vocab


def demo_spec(args: argparse.Namespace) -> tuple[ModelSpec, list[str], int]:
    demo = read_demo()
    spec = ModelSpec(base=str(demo.base), adapters={n: str(p) for n, p in demo.adapters.items()},
                     model_name="demo-base", max_running=args.max_running)  # fmt: skip
    vocab = int(json.loads((demo.base / "config.json").read_text())["vocab_size"])
    return spec, list(demo.adapters), vocab


class Clients:
    """Where the client threads run: in this process, or spread over `processes` spawned ones (so
    that the clients' own CPU, ~10 ms per request, is not one GIL's)."""

    def __init__(self, processes: int) -> None:
        self.processes = processes
        self.pool = ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) \
            if processes > 1 else None  # fmt: skip

    def round_trip(self, url: str, trace: list[TraceRequest], threads: int) -> tuple[float, dict[str, int], float]:
        """Output tokens per second of the trace sent by `threads` client threads in all, the requests
        each replica answered (by the responses' system_fingerprint), and the clients' CPU seconds."""
        started = time.perf_counter()
        if self.pool is None:
            results = [send(url, trace, threads)]
        else:
            parts = self.processes
            shares = [self.pool.submit(send, url, trace[i::parts], -(-threads // parts)) for i in range(parts)]
            results = [share.result() for share in shares]
        seconds = time.perf_counter() - started
        answered: Counter[str] = Counter()
        for _, part, _ in results:
            answered.update(part)
        return sum(r[0] for r in results) / seconds, dict(answered), sum(r[2] for r in results)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()


def send(url: str, trace: list[TraceRequest], clients: int) -> tuple[int, Counter[str], float]:
    """The trace's completions through `clients` threads, each taking the next request: the output
    tokens, the requests each replica answered, and this process's CPU seconds meanwhile."""
    began = time.process_time()
    todo = list(reversed(trace))
    lock = threading.Lock()
    tokens = [0]
    answered: Counter[str] = Counter()

    def client() -> None:
        with httpx.Client(timeout=600) as http:
            while True:
                with lock:
                    if not todo:
                        return
                    request = todo.pop()
                body = {"model": request.adapter, "prompt": request.prompt_ids, "max_tokens": request.output_len,
                        "temperature": 0, "ignore_eos": True}  # fmt: skip
                reply = http.post(f"{url}/v1/completions", json=body)
                reply.raise_for_status()
                answer = reply.json()
                with lock:
                    tokens[0] += answer["usage"]["completion_tokens"]
                    answered[answer["system_fingerprint"]] += 1

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return tokens[0], answered, time.process_time() - began


def stack_processes() -> dict[str, list[psutil.Process]]:
    """This machine's processes of the Serve stack by role (Ray names its actors' processes)."""
    roles = {"proxy": "ProxyActor", "router": ":Router", "replica": ":Replica", "controller": "ServeController"}
    found: dict[str, list[psutil.Process]] = {role: [] for role in roles}
    for proc in psutil.process_iter(["cmdline"]):
        command = " ".join(proc.info["cmdline"] or [])
        for role, marker in roles.items():
            if command.startswith("ray::") and marker in command:
                found[role].append(proc)
    return found


def cpu_seconds(processes: list[psutil.Process]) -> float:
    total = 0.0
    for proc in processes:
        with contextlib.suppress(psutil.Error):
            times = proc.cpu_times()
            total += times.user + times.system
    return total


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", choices=("demo", "tiny", "llama-7b"), default="demo")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=96)
    parser.add_argument("--clients", type=int, help="client threads (default: one per request, i.e. saturation)")
    parser.add_argument("--routers", type=int, default=1, help="Router replicas (the HTTP ingress) in every deployment")
    parser.add_argument("--client-processes", type=int, default=1,
                        help="processes the client threads are spread over (1: the driver's own)")  # fmt: skip
    parser.add_argument("--adapters", type=int, default=100, help="synthetic adapters (tiny, llama-7b)")
    parser.add_argument("--popularity", choices=("zipf", "uniform"), default="zipf")
    parser.add_argument("--zipf", type=float, default=1.0)
    parser.add_argument("--prompt-lens", type=common.parse_int_list, help="min,max prompt tokens")
    parser.add_argument("--output-lens", type=common.parse_int_list, help="min,max output tokens")
    parser.add_argument("--max-running", type=int, default=64, help="each replica's engine")
    parser.add_argument("--pool-gib", type=float, default=40.0, help="each replica's pool (llama-7b)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    large = args.shapes == "llama-7b"
    args.prompt_lens = args.prompt_lens or ((64, 512) if large else (4, 24))
    args.output_lens = args.output_lens or ((32, 256) if large else (16, 48))
    ray.init(include_dashboard=False, log_to_driver=False)
    resources = ray.cluster_resources()
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    pairs, splits = [], []
    clients_in = Clients(args.client_processes)
    with tempfile.TemporaryDirectory() as tmp:
        spec, names, vocab = demo_spec(args) if args.shapes == "demo" else synthetic_spec(Path(tmp), args)
        trace = make_trace(args, math.inf, names, vocab)
        clients = args.clients or len(trace)
        for r in range(args.rounds):
            speeds = {}
            for replicas in ((1, args.replicas) if r % 2 == 0 else (args.replicas, 1)):
                serve.run(application(spec, replicas, routers=args.routers))
                clients_in.round_trip(url, trace[: 2 * clients], clients)  # warm-up
                stack = stack_processes()
                before, began = {role: cpu_seconds(procs) for role, procs in stack.items()}, time.perf_counter()
                speeds[replicas], answered, client_seconds = clients_in.round_trip(url, trace, clients)
                wall = time.perf_counter() - began
                cores = {role: round((cpu_seconds(procs) - before[role]) / wall, 2) for role, procs in stack.items()}
                cores["clients"] = round(client_seconds / wall, 2)  # cores used, by role, over the timed run
                splits.append({"round": r, "replicas": replicas, "requests_per_replica": sorted(answered.values()),
                               "cores_used": cores})  # fmt: skip
                print(f"round {r}: {replicas} replica(s): {speeds[replicas]:.1f} tok/s; requests per replica "
                      f"{sorted(answered.values())}; cores used {cores}", flush=True)  # fmt: skip
            pairs.append(speeds)
        serve.shutdown()
    clients_in.close()
    ratios = [p[args.replicas] / p[1] for p in pairs]
    where = f"{int(resources.get('GPU', 0))} GPU(s)" if resources.get("GPU") else f"CPU only, {int(resources['CPU'])} cores"
    print(f"{args.replicas} replicas / 1 replica: median {common.median(ratios):.2f}x (rounds {[round(x, 2) for x in ratios]}); {where}")
    if args.json:
        common.write_json(args.json, {"args": vars(args), "resources": resources, "pairs": pairs, "ratios": ratios,
                                      "splits": splits,
                                      "ray": ray.__version__,
                                      "environment": common.environment(torch.device("cuda" if large else "cpu"))})  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
