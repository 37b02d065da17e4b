"""Decode-sized linear layers: hf_multilora's one-launch kernel against cuBLAS, side by side.

Llama-2-7B's projections of one layer (q/k/v, gate/up, o, down) at `--rows` rows: cuBLAS as
transformers runs them (one F.linear per weight), cuBLAS on the weights concatenated (what one
allocation would allow), and `kernels/decode_linear.py` with the tiles `decode_linear_tiles` picks
(`--sweep` adds others). Weights of 8 layers are cycled so that L2 (50 MB on an H200) holds none;
each variant is one CUDA graph of the 8 layers' calls, replayed in interleaved rounds whose order
rotates, the median after a warm-up round. Reports us per layer, TB/s of weight bytes, and the
speed-up over cuBLAS as transformers runs it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

import common
import torch
import torch.nn.functional as F

from hf_multilora.kernels.decode_linear import DecodeLinearTiles, decode_linear, decode_linear_tiles

HIDDEN, INTERMEDIATE, LAYERS = 4096, 11008, 8
GROUPS = {"q, k, v": ([HIDDEN] * 3, HIDDEN), "gate, up": ([INTERMEDIATE] * 2, HIDDEN), "o": ([HIDDEN], HIDDEN),
          "down": ([HIDDEN], INTERMEDIATE)}  # fmt: skip
SWEEP = [DecodeLinearTiles(n, k, 4, s) for n, k, s in ((16, 256, 4), (32, 128, 4), (32, 256, 4), (64, 128, 4), (64, 256, 3))]


def variants(sizes: list[int], in_features: int, rows: int, sweep: bool) -> dict[str, Callable[[], Any]]:
    """The calls of one group over LAYERS layers' weights, per variant."""
    weights = [[torch.randn(n, in_features, device="cuda", dtype=torch.bfloat16) * 0.02 for n in sizes]
               for _ in range(LAYERS)]  # fmt: skip
    joined = [torch.cat(layer) for layer in weights]
    x = torch.randn(rows, in_features, device="cuda", dtype=torch.bfloat16)
    calls: dict[str, Callable[[], Any]] = {
        "cuBLAS, a call per weight": lambda: [F.linear(x, w) for layer in weights for w in layer],
        "cuBLAS, weights joined": lambda: [F.linear(x, w) for w in joined],
    }
    rule = decode_linear_tiles(sizes, in_features, rows)
    tiles = {f"decode_linear {t.block_n}x{t.block_k} s{t.num_stages}": t for t in (SWEEP if sweep else [])}
    if rule is not None:
        tiles[f"decode_linear (rule: {rule.block_n}x{rule.block_k} s{rule.num_stages})"] = rule
    expected = [F.linear(x.float(), w.float()) for w in weights[0]]
    for name, t in tiles.items():
        if in_features % t.block_k or any(n % t.block_n for n in sizes):
            continue
        got = decode_linear(x, weights[0], [None] * len(sizes), t)
        error = max((g.float() - e).abs().max().item() for g, e in zip(got, expected, strict=True))
        if error > 0.05:
            raise AssertionError(f"{name}: max |difference| to fp32 {error}")
        calls[name] = lambda t=t: [decode_linear(x, layer, [None] * len(sizes), t) for layer in weights]
    return calls


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=common.parse_int_list, default=(1, 16, 32, 64))
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--sweep", action="store_true", help="also other tiles than the rule's")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_decode_linear.py times GPU kernels; no GPU here.", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    results = []
    for rows in args.rows:
        for group, (sizes, in_features) in GROUPS.items():
            calls = variants(sizes, in_features, rows, args.sweep)
            graphs = {name: common.graph_of(call) for name, call in calls.items()}
            times = common.replay_rounds(graphs, args.rounds + 1, LAYERS)  # the first round warms up
            names = list(graphs)
            base = common.median(times[names[0]][1:])
            print(f"== {rows} rows, {group}", flush=True)
            for name in names:
                us = common.median(times[name][1:])
                row = {"rows": rows, "group": group, "variant": name, "us_per_layer": us,
                       "tb_s": sum(sizes) * in_features * 2 / us / 1e6, "speedup": base / us}  # fmt: skip
                results.append(row)
                print(f"  {name:42s} {us:7.1f} us  {row['tb_s']:5.2f} TB/s  x{row['speedup']:.2f}", flush=True)
            del graphs, calls
            common.free_memory()
    if args.json:
        common.write_json(args.json, {"environment": common.environment(device), "args": vars(args), "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
