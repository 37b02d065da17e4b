"""Time to the next tokens of one engine step: the batched sampler against a loop over rows.

For each batch size in `--rows` (logits [rows, `--vocab`], random), each row with temperature 0.8,
top-k 50, top-p 0.9: `serving.sampling.next_tokens` then `.tolist()` (what an engine step does),
against the loop the engine ran before (HF's TemperatureLogitsWarper, TopKLogitsWarper and
TopPLogitsWarper on each row, `torch.multinomial`, `int()`), with requests unseeded (one shared
generator) and seeded (a generator each). Wall time per step to the host's list of tokens
(the device synchronised by that list), median over `--calls`, in interleaved rounds (the host drifts).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from types import SimpleNamespace

import common
import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from hf_multilora.serving import SamplingParams
from hf_multilora.serving.sampling import next_tokens

PARAMS = dict(temperature=0.8, top_k=50, top_p=0.9)


def row_loop(logits: torch.Tensor, requests: Sequence[SimpleNamespace], shared: torch.Generator) -> list[int]:
    """Each row through HF's warpers and a multinomial draw, one row at a time."""
    warpers = [TemperatureLogitsWarper(PARAMS["temperature"]), TopKLogitsWarper(PARAMS["top_k"]),
               TopPLogitsWarper(PARAMS["top_p"])]  # fmt: skip
    tokens = []
    for row, request in enumerate(requests):
        scores = logits[row : row + 1].float()
        for warper in warpers:
            scores = warper(None, scores)
        draw = torch.multinomial(scores.softmax(dim=-1), 1, generator=request.generator or shared)
        tokens.append(int(draw))
    return tokens


def compare(logits: torch.Tensor, requests: list[SimpleNamespace], shared: torch.Generator, args: argparse.Namespace) -> dict:
    """Milliseconds per step of each variant (median), in rounds of alternating order after a warm-up."""
    variants = {"batched": lambda: next_tokens(logits, requests, shared).tolist(),
                "row loop": lambda: row_loop(logits, requests, shared)}  # fmt: skip
    times: dict[str, list[float]] = {name: [] for name in variants}
    for fn in variants.values():
        common.host_seconds(fn, 2)
    for r in range(args.rounds):
        for name in list(variants)[:: 1 if r % 2 == 0 else -1]:
            times[name] += common.host_seconds(variants[name], args.calls)
    return {name: 1e3 * common.median(t) for name, t in times.items()}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=common.parse_int_list, default=(16, 64))
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env = common.environment(device)
    print(f"device {env['device']}; torch {env['torch']}", flush=True)
    shared = torch.Generator(device=device).manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    results = []
    for rows in args.rows:
        logits = torch.randn(rows, args.vocab, device=device, dtype=dtype)
        for seeded in (False, True):
            requests = [SimpleNamespace(params=SamplingParams(**PARAMS, seed=i if seeded else None),
                                        generator=torch.Generator(device=device).manual_seed(i) if seeded else None)
                        for i in range(rows)]  # fmt: skip
            ms = compare(logits, requests, shared, args)
            results.append({"rows": rows, "seeded": seeded, "ms": ms, "speedup": ms["row loop"] / ms["batched"]})
            print(f"{rows} rows, {'seeded' if seeded else 'unseeded'}: batched {ms['batched']:.3f} ms, "
                  f"row loop {ms['row loop']:.3f} ms ({results[-1]['speedup']:.1f}x)", flush=True)  # fmt: skip
    if args.json:
        common.write_json(args.json, {"args": vars(args), "environment": env, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
