"""What quantized KV pages cost in quality, on a language model trained here (no pretrained LM is
reachable offline).

The model: a small Llama (`--layers`, `--hidden`, heads of 128 dims; one model per `--kv-heads`
value: MHA and GQA) trained for `--steps` on Python source: the standard library's, then the
installed packages' (site-packages), up to `--corpus-mb`, every 20th file held out. (The standard
library alone, 11 MB, was memorised in the first GPU run: 23 passes, train loss 0.08 against a
held-out perplexity of 193.) Windows of `--context` tokens, a byte-level BPE of `--vocab` tokens
trained on the first 32 MB, plus 10% synthetic passkey documents (filler with "The pass key is
NNNNN." at some depth, then the question and its answer). Seeded.

For each KV dtype (the model's own, fp8, int4), on held-out windows:
  decode NLL     prefill `--prefill` tokens, then teacher-forced decode steps over the next
                 `--score` tokens through a PagedCache of that dtype (the prefill attends its own
                 tokens exactly, so decode steps carry the quantization); perplexity and its change
                 against the model's dtype, with a bootstrap 95% interval over the windows
  top-1          agreement of each decode step's argmax with the model's dtype's
  greedy         positions where greedy outputs (`generate`, `--greedy` tokens) equal the paged
                 model-dtype run's, next to the floor: the paged model-dtype run against
                 transformers' DynamicCache (kernels that sum in another order already diverge)
  passkey        accuracy of the 5 digits over context lengths x depths (`--passkey-trials` each)
The same for heavy-hitter eviction (`kv_budget` 0.5 and 0.2, `--kv-recent` 64, alone and with int4;
the teacher-forced decode evicts as generate() does), and for transformers' QuantizedCache (`QUANTIZED_CACHES`:
its fp8 backend, and int4 through optimum-quanto or hqq where installed; a backend that does not
build is reported with the reason). QuantizedCache keeps the newest 128 tokens unquantized (its
residual_length), so its rows quantize less of each context than ours do.

Full size needs a CUDA GPU (bf16; training takes ~2.5 minutes per model on an H200: one model per
device call of 10 minutes); `--tiny` checks the script end to end on a CPU in a minute.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import random
import sys
import sysconfig
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import common
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, QuantizedCache

from hf_multilora import MultiLoraModel
from hf_multilora.cache import PagedCache, paged_attention_in
from hf_multilora.model import _cache_keyword

# name -> the cache's settings: kv_cache_dtype (None: the model's own), and heavy-hitter eviction's kv_budget
VARIANTS = {
    "model dtype": dict(kv_cache_dtype=None, kv_budget=None),
    "fp8": dict(kv_cache_dtype="fp8", kv_budget=None),
    "int4": dict(kv_cache_dtype="int4", kv_budget=None),
    "budget 0.5": dict(kv_cache_dtype=None, kv_budget=0.5),
    "budget 0.2": dict(kv_cache_dtype=None, kv_budget=0.2),
    "int4 + budget 0.5": dict(kv_cache_dtype="int4", kv_budget=0.5),
    "int4 + budget 0.2": dict(kv_cache_dtype="int4", kv_budget=0.2),
}
OWN = "model dtype"
# transformers' QuantizedCache, its defaults otherwise (int4: groups of 64 channels; every backend
# keeps the newest 128 tokens in the model's dtype, which ours does not): a row per backend that loads.
QUANTIZED_CACHES = {
    "QuantizedCache fp8": {"backend": "fp8"},
    "QuantizedCache quanto int4": {"backend": "quanto", "nbits": 4},
    "QuantizedCache hqq int4": {"backend": "hqq", "nbits": 4},
}


def corpus_files(megabytes: float) -> list[str]:
    """The .py files of the standard library, then of site-packages, in path order, up to `megabytes`."""
    paths = sysconfig.get_paths()
    roots = dict.fromkeys(Path(paths[name]) for name in ("stdlib", "purelib", "platlib"))
    texts, size = [], 0
    for root in roots:
        for path in sorted(root.rglob("*.py")):
            if root.name not in ("site-packages", "dist-packages") and {"site-packages", "dist-packages"} & set(path.parts):
                continue  # a virtual environment inside the standard library's folder: read as site-packages
            try:
                text = path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            texts.append(text)
            size += len(text)
            if size >= megabytes * 1e6:
                return texts
    return texts


def train_tokenizer(text: str, vocab: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)  # fmt: skip
    tokenizer.train_from_iterator((text[i : i + 100_000] for i in range(0, len(text), 100_000)), trainer=trainer)
    return tokenizer


def passkey_document(tokenizer: Tokenizer, filler: list[int], length: int, depth: float, rng: random.Random,
                     answered: bool = False) -> tuple[list[int], str]:  # fmt: skip
    """`length` tokens: filler with the key sentence at `depth` (0: start, 1: end), then the question
    (and, `answered`, for training, its answer: without it the model never learns to reply);
    returns (ids, the 5 digits)."""
    key = f"{rng.randrange(10_000, 100_000)}"
    needle = tokenizer.encode(f"\n# The pass key is {key}. Remember it. {key} is the pass key.\n").ids
    question = tokenizer.encode("\n# What is the pass key? The pass key is" + (f" {key}." if answered else "")).ids
    room = length - len(needle) - len(question)
    start = rng.randrange(0, len(filler) - room)
    text = filler[start : start + room]
    at = int(depth * room)
    return text[:at] + needle + text[at:] + question, key


def train(config: LlamaConfig, stream: torch.Tensor, tokenizer: Tokenizer, args: argparse.Namespace,
          device: torch.device) -> LlamaForCausalLM:  # fmt: skip
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    rng = random.Random(args.seed)
    filler = stream.tolist()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    started = time.perf_counter()
    for step in range(args.steps):
        lr = args.lr * min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for group in optimizer.param_groups:
            group["lr"] = lr
        rows = []
        for _ in range(args.train_batch):
            if rng.random() < 0.1:
                ids, _ = passkey_document(tokenizer, filler, args.context + 1, rng.random(), rng, answered=True)
                rows.append(torch.tensor(ids))
            else:
                start = rng.randrange(0, len(stream) - args.context - 1)
                rows.append(stream[start : start + args.context + 1])
        batch = torch.stack(rows).to(device)
        with autocast:
            logits = model(input_ids=batch[:, :-1]).logits
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % max(1, args.steps // 10) == 0 or step == args.steps - 1:
            print(f"  step {step}: loss {loss.item():.3f} ({time.perf_counter() - started:.0f} s)", flush=True)
    return model.eval()


def variant_cache(multi: MultiLoraModel, variant: dict[str, Any]) -> tuple[Any, Any]:
    """The cache a variant's teacher-forced decode runs on, and the attention context it needs."""
    base = multi.base_model
    if variant.get("cache_implementation") == "quantized":
        return QuantizedCache(config=base.config, **variant["cache_config"]), contextlib.nullcontext()
    cache = PagedCache(multi.page_pool(), base.config, kv_dtype=variant["kv_cache_dtype"],
                       kv_budget=variant["kv_budget"], kv_recent=variant["kv_recent"])  # fmt: skip
    return cache, paged_attention_in(base)


def quantized_cache_variants(multi: MultiLoraModel) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """The QuantizedCache rows whose backend runs here (generate() keywords), and why the others do not:
    each is tried on a short teacher-forced decode first (a backend may import but fail on this
    device, e.g. an extension it compiles on first use), so one cannot end the run after the others."""
    variants, missing = {}, {}
    window = torch.zeros(1, 160, dtype=torch.long, device=multi.base_model.device)  # past the 128-token residual
    for name, cache_config in QUANTIZED_CACHES.items():
        variant = dict(paged_cache=False, cache_implementation="quantized", cache_config=cache_config)
        try:
            decode_scores(multi, window, window.shape[1] - 1, variant)
        except Exception as error:  # reported per backend: the row is missing, the run goes on
            missing[name] = f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"
            continue
        variants[name] = variant
    return variants, missing


def decode_scores(multi: MultiLoraModel, windows: torch.Tensor, prefill: int,
                  variant: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Teacher-forced: per window and scored token, the NLL and the argmax [windows, score]."""
    base = multi.base_model
    cache, attention = variant_cache(multi, variant)
    keyword = _cache_keyword(base)
    nll, top = [], []
    try:
        with torch.no_grad(), attention:
            logits = base(input_ids=windows[:, :prefill], use_cache=True, **{keyword: cache}).logits[:, -1]
            for t in range(prefill, windows.shape[1]):
                logp = torch.log_softmax(logits.float(), -1)
                nll.append(-logp.gather(1, windows[:, t : t + 1])[:, 0])
                top.append(logits.argmax(-1))
                if t + 1 < windows.shape[1]:
                    logits = base(input_ids=windows[:, t : t + 1], use_cache=True, **{keyword: cache}).logits[:, -1]
    finally:
        if isinstance(cache, PagedCache):
            cache.release()
    return torch.stack(nll, 1).cpu(), torch.stack(top, 1).cpu()


def bootstrap_ppl_change(nll: torch.Tensor, reference: torch.Tensor, rounds: int = 1000) -> tuple[float, float, float]:
    """Perplexity change in % (per-window means resampled): point estimate and a 95% interval."""
    gen = torch.Generator().manual_seed(0)
    per_window, per_window_ref = nll.mean(1), reference.mean(1)

    def change(index: torch.Tensor) -> float:
        return 100 * (math.exp(per_window[index].mean()) / math.exp(per_window_ref[index].mean()) - 1)

    n = per_window.shape[0]
    samples = sorted(change(torch.randint(0, n, (n,), generator=gen)) for _ in range(rounds))
    return change(torch.arange(n)), samples[int(0.025 * rounds)], samples[int(0.975 * rounds)]


def greedy(multi: MultiLoraModel, prompts: torch.Tensor, tokens: int, **kwargs: Any) -> torch.Tensor:
    out = multi.generate(prompts, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, eos_token_id=None,
                         pad_token_id=0, **kwargs)  # fmt: skip
    return out[:, prompts.shape[1] :].cpu()


def passkey_accuracy(multi: MultiLoraModel, tokenizer: Tokenizer, filler: list[int], args: argparse.Namespace,
                     variant: dict[str, Any], device: torch.device) -> dict[str, float]:  # fmt: skip
    accuracy = {}
    for length in args.passkey_lengths:
        for depth in (0.1, 0.5, 0.9):
            rng = random.Random(f"{length}-{depth}")  # the same documents for every dtype
            docs = [passkey_document(tokenizer, filler, length, depth, rng) for _ in range(args.passkey_trials)]
            ids = torch.tensor([d for d, _ in docs], device=device)
            out = greedy(multi, ids, 6, **variant)
            hits = [key in tokenizer.decode(row.tolist()) for row, (_, key) in zip(out, docs, strict=True)]
            accuracy[f"{length}@{depth}"] = sum(hits) / len(hits)
    return accuracy


def evaluate(model: LlamaForCausalLM, held_out: torch.Tensor, tokenizer: Tokenizer, args: argparse.Namespace,
             device: torch.device, dtype: torch.dtype) -> dict[str, Any]:  # fmt: skip
    multi = MultiLoraModel(model.to(dtype), pool_bytes=args.pool_mib * 2**20)
    rng = random.Random(args.seed + 1)
    length = args.prefill + args.score
    starts = [rng.randrange(0, len(held_out) - length) for _ in range(args.windows)]
    windows = torch.stack([held_out[s : s + length] for s in starts]).to(device)
    variants = {name: {**variant, "kv_recent": args.kv_recent} for name, variant in VARIANTS.items()}
    quantized, missing = quantized_cache_variants(multi)
    variants.update(quantized)
    scores = {name: decode_scores(multi, windows, args.prefill, variant) for name, variant in variants.items()}
    prompts = windows[: args.greedy_rows, : args.prefill]
    own = greedy(multi, prompts, args.greedy)
    floor = greedy(multi, prompts, args.greedy, paged_cache=False)
    filler = held_out.tolist()
    result: dict[str, Any] = {"kv": {}, "greedy_floor": (own == floor).float().mean().item()}
    for name, variant in variants.items():
        nll, top = scores[name]
        ppl_change = bootstrap_ppl_change(nll, scores[OWN][0])
        outputs = own if name == OWN else greedy(multi, prompts, args.greedy, **variant)
        result["kv"][name] = {
            "ppl": math.exp(nll.mean()),
            "ppl_change_pct": ppl_change,
            "top1_agreement": (top == scores[OWN][1]).float().mean().item(),
            "greedy_agreement": (outputs == own).float().mean().item(),
            "passkey": passkey_accuracy(multi, tokenizer, filler, args, variant, device),
        }
    result["not_run"] = missing
    return result


def print_result(kv_heads: int, result: dict[str, Any]) -> None:
    print(f"\n== {kv_heads} KV heads; greedy agreement floor (paged vs DynamicCache, model dtype): "
          f"{result['greedy_floor']:.3f}")  # fmt: skip
    rows = []
    for name, r in result["kv"].items():
        point, low, high = r["ppl_change_pct"]
        passkey = sum(r["passkey"].values()) / len(r["passkey"])
        rows.append([name, round(r["ppl"], 3), f"{point:+.2f}% [{low:+.2f}, {high:+.2f}]", round(r["top1_agreement"], 4),
                     round(r["greedy_agreement"], 3), round(passkey, 3)])  # fmt: skip
    print(common.format_table(["KV", "decode ppl", "ppl change (95% CI)", "top-1 vs model dtype", "greedy vs model dtype",
                               "passkey accuracy"], rows))  # fmt: skip
    for name, why in result["not_run"].items():
        print(f"{name}: not run: {why}")


def attention_heads(hidden: int) -> int:
    """Heads of 128 dims, as Llama-2-7B's."""
    return max(1, hidden // 128)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--kv-heads", type=common.parse_int_list, help="one model per value (default: MHA and 2)")
    parser.add_argument("--layers", type=int)
    parser.add_argument("--hidden", type=int)
    parser.add_argument("--context", type=int, help="training window")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--train-batch", type=int)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--vocab", type=int)
    parser.add_argument("--corpus-mb", type=float)
    parser.add_argument("--prefill", type=int)
    parser.add_argument("--score", type=int)
    parser.add_argument("--windows", type=int)
    parser.add_argument("--greedy", type=int, help="greedy tokens per prompt")
    parser.add_argument("--greedy-rows", type=int)
    parser.add_argument("--passkey-lengths", type=common.parse_int_list)
    parser.add_argument("--passkey-trials", type=int)
    parser.add_argument("--pool-mib", type=int)
    parser.add_argument("--kv-recent", type=int, help="newest tokens eviction always keeps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    full = dict(layers=8, hidden=768, context=2048, steps=2000, train_batch=16, vocab=8192, corpus_mb=160.0,
                prefill=1536, score=512, windows=32, greedy=64, greedy_rows=16, passkey_lengths=(1024, 2048),
                passkey_trials=20, pool_mib=16384, kv_recent=64)  # fmt: skip
    tiny = dict(layers=2, hidden=128, context=128, steps=30, train_batch=8, vocab=512, corpus_mb=0.5, prefill=48,
                score=16, windows=4, greedy=8, greedy_rows=2, passkey_lengths=(96,), passkey_trials=2, pool_mib=64,
                kv_recent=4)  # fmt: skip
    for key, value in (tiny if args.tiny else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.kv_heads is None:  # MHA, and GQA with 2 KV heads where there are more heads than that
        heads = attention_heads(args.hidden)
        args.kv_heads = (heads, 2) if heads > 2 else (heads,)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = common.start(args.tiny)
    if started is None:
        return 1
    device, env = started
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    files = corpus_files(args.corpus_mb)
    tokenizer = train_tokenizer("\n".join(files)[: 32 * 10**6], args.vocab)

    def stream(texts: Iterable[str]) -> torch.Tensor:
        return torch.tensor([t for encoding in tokenizer.encode_batch(list(texts)) for t in encoding.ids])

    train_ids, held_out = stream(files[i] for i in range(len(files)) if i % 20), stream(files[::20])
    print(f"corpus: {len(files)} files, {sum(map(len, files)) / 1e6:.1f} MB of Python, "
          f"{len(train_ids) / 1e6:.2f}M tokens to train on, {len(held_out) / 1e6:.2f}M held out", flush=True)  # fmt: skip
    heads = attention_heads(args.hidden)
    results = {}
    for kv_heads in args.kv_heads:
        config = LlamaConfig(vocab_size=tokenizer.get_vocab_size(), hidden_size=args.hidden,
                             intermediate_size=int(args.hidden * 8 / 3) // 64 * 64, num_hidden_layers=args.layers,
                             num_attention_heads=heads, num_key_value_heads=kv_heads,
                             max_position_embeddings=max(args.context, *args.passkey_lengths, args.prefill + args.score),
                             rope_theta=10_000.0)  # fmt: skip
        print(f"training: {args.layers} layers, {heads} heads / {kv_heads} KV heads, {args.steps} steps", flush=True)
        model = train(config, train_ids, tokenizer, args, device)
        results[kv_heads] = evaluate(model, held_out, tokenizer, args, device, dtype)
        print_result(kv_heads, results[kv_heads])
        if args.json:  # after each model: a run cut short keeps the models it finished
            common.write_json(args.json, {"environment": env, "args": vars(args), "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
