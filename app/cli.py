"""`hf-multilora playground` and `hf-multilora serve`: the command line.

hf-multilora playground                                   # the demo assets shipped with the package
hf-multilora playground --base PATH_OR_ID --adapter NAME=PATH [--adapter ...] [--adapter-dir DIR]
hf-multilora playground --continuous-batching             # concurrent users share the engine's batches
hf-multilora serve                                        # an OpenAI-compatible server of the demo
hf-multilora serve --base PATH_OR_ID --adapter NAME=PATH [--adapter-dir DIR] [--api-key KEY]
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer

from hf_multilora import AdapterLoadError, MultiLoraModel
from hf_multilora.serving import Engine

from .demo import read_demo
from .service import Playground


def main(argv: Sequence[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        _serve(args, parser)
        return
    try:
        from . import ui  # only here: `--help` and argument errors need no Gradio
    except ImportError as error:
        parser.exit(1, f"the playground needs Gradio ({error}): pip install 'hf_multilora[app]'\n")
    try:
        playground = _playground(args)
    except (OSError, AdapterLoadError, ValueError) as error:
        parser.error(str(error))
    ui.launch(ui.build(playground), args.host, args.port)


def _serve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    try:  # only here: `--help` and argument errors need neither
        import uvicorn

        from hf_multilora.serving.server import OpenAIService, build_app
    except ImportError as error:
        parser.exit(1, f"the server needs FastAPI and uvicorn ({error}): pip install 'hf_multilora[serve]'\n")
    if args.ray_replicas:
        _serve_on_ray(args, parser)
        return
    queue = {} if args.max_waiting is None else {"max_waiting": args.max_waiting}
    try:
        served = _served_model(args)
        engine = Engine(served.model, served.tokenizer, max_running=args.max_running,
                        kv_cache_dtype=args.kv_cache_dtype, capture_graphs=args.capture_graphs, freeze_gc=True,
                        **queue)  # fmt: skip
    except (OSError, AdapterLoadError, ValueError) as error:
        parser.error(str(error))
    try:
        service = OpenAIService(engine, model_name=served.name, adapter_dir=served.adapter_dir,
                                chat_template=served.chat_template)  # fmt: skip
        app = build_app(service, api_key=args.api_key or os.environ.get("HF_MULTILORA_API_KEY"))
        print(f"hf_multilora: serving {served.name} and adapters {served.model.adapter_names} "
              f"at http://{args.host}:{args.port}/v1", flush=True)  # fmt: skip
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        engine.close()


def _serve_on_ray(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    try:
        import ray
        from ray import serve

        from hf_multilora.serving.ray import ModelSpec, application
    except ImportError as error:
        parser.exit(1, f"--ray-replicas needs Ray Serve ({error}): pip install 'hf_multilora[ray]'\n")
    source = _source(args)
    if args.adapter_dir is not None:
        parser.error("--adapter-dir: a Ray Serve deployment's adapters are fixed at start (use --adapter)")
    if args.ray_routers < 1:
        parser.error(f"--ray-routers must be >= 1, got {args.ray_routers}")
    try:
        spec = ModelSpec(base=str(source.base), adapters={n: str(p) for n, p in source.adapters.items()},
                         model_name=source.name, chat_template=source.chat_template, pool_bytes=args.pool_bytes,
                         max_running=args.max_running, kv_cache_dtype=args.kv_cache_dtype, max_waiting=args.max_waiting,
                         max_routing=args.max_routing, capture_graphs=args.capture_graphs)  # fmt: skip
    except ValueError as error:
        parser.error(str(error))
    ray.init(address=args.ray_address)
    serve.start(http_options={"host": args.host, "port": args.port})
    api_key = args.api_key or os.environ.get("HF_MULTILORA_API_KEY")
    print(f"hf_multilora: {args.ray_replicas} Ray Serve replicas of {source.name} at http://{args.host}:{args.port}/v1",
          flush=True)  # fmt: skip
    serve.run(application(spec, args.ray_replicas, routers=args.ray_routers, api_key=api_key), blocking=True)


@dataclass
class _Source:
    base: str | Path
    adapters: dict[str, Any]
    name: str
    adapter_dir: Path | None
    chat_template: str | None


def _source(args: argparse.Namespace) -> _Source:
    """What to serve: the demo (its adapters folder is the adapter dir, a template from its prompt
    format) or --base, plus --adapter."""
    adapters = _adapters(args)
    template = Path(args.chat_template).read_text() if args.chat_template else None
    if args.base is not None:
        return _Source(args.base, adapters, args.served_model_name or str(args.base), args.adapter_dir, template)
    demo = read_demo(args.assets)
    # the demo's tokenizer has no chat template: a chat's last message goes where the text does
    template = template or demo.prompt_format.replace("{text}", "{{ messages[-1]['content'] }}")
    return _Source(demo.base, {**demo.adapters, **adapters}, args.served_model_name or "demo-base",
                   args.adapter_dir or demo.root / "adapters", template)  # fmt: skip


@dataclass
class _Served:
    model: MultiLoraModel
    tokenizer: Any
    name: str
    adapter_dir: Path | None
    chat_template: str | None


def _served_model(args: argparse.Namespace) -> _Served:
    source = _source(args)
    model = MultiLoraModel.from_pretrained(source.base, source.adapters, pool_bytes=args.pool_bytes)
    model.to(args.device)
    tokenizer = AutoTokenizer.from_pretrained(source.base)
    return _Served(model, tokenizer, source.name, source.adapter_dir, source.chat_template)


def _adapters(args: argparse.Namespace) -> dict[str, str]:
    adapters = dict(args.adapter)
    if len(adapters) < len(args.adapter):
        raise ValueError("--adapter: a name is given twice")
    return adapters


def _playground(args: argparse.Namespace) -> Playground:
    adapters = _adapters(args)
    kwargs = {"device": args.device, "pool_bytes": args.pool_bytes, "continuous_batching": args.continuous_batching}
    if args.adapter_dir is not None:
        kwargs["adapter_dir"] = args.adapter_dir
    if args.base is None:
        return Playground.from_demo(read_demo(args.assets), adapters, **kwargs)
    return Playground.load(args.base, adapters, **kwargs)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-multilora", description="hf_multilora tools")
    commands = parser.add_subparsers(dest="command", required=True)
    play = commands.add_parser(
        "playground",
        help="a web page to run several adapters and the base in one batched generate()",
        description="Serve a Gradio playground: one prompt, several LoRA adapters and/or the base model "
        "in one batched generate(), streamed side by side. Without --base it serves the demo assets.",
    )
    _model_arguments(play)
    play.add_argument("--port", type=int, help="port (default: the first free one from 7860)")
    play.add_argument(
        "--continuous-batching",
        action="store_true",
        help="each row is a request of a continuous-batching engine: the rows of concurrent users share batches",
    )
    serve = commands.add_parser(
        "serve",
        help="an OpenAI-compatible server: continuous batching, the adapter named in `model`",
        description="Serve /v1/completions, /v1/chat/completions and /v1/models (the adapter is the "
        "request's `model`; the base model's own name is no adapter), /v1/load_lora_adapter, "
        "/health and /metrics. Without --base it serves the demo assets.",
    )
    _model_arguments(serve)
    serve.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")
    serve.add_argument("--api-key", help="require `Authorization: Bearer KEY` (default: $HF_MULTILORA_API_KEY, else open)")
    serve.add_argument("--served-model-name", help="the base model's name in `model` (default: --base, or demo-base)")
    serve.add_argument("--chat-template", type=Path, help="a Jinja chat template file (default: the tokenizer's)")
    serve.add_argument("--max-running", type=int, default=64, help="requests decoded together at most (default: %(default)s)")
    serve.add_argument("--max-waiting", type=int, help="requests an engine queues beyond --max-running; more: 503 "
                       "(default: 1024; with --ray-replicas, 4 x --max-running per replica)")  # fmt: skip
    serve.add_argument("--max-routing", type=int, default=1024, help="with --ray-replicas: requests waiting for a "
                       "full replica at most; more: 503 (default: %(default)s)")  # fmt: skip
    serve.add_argument("--capture-graphs", type=int, metavar="TOKENS",
                       help="on CUDA, capture the decode graphs of requests up to TOKENS tokens (prompt + "
                            "output) at start, so that no request waits on a capture (default: as they come)")  # fmt: skip
    serve.add_argument("--kv-cache-dtype", choices=("fp8", "int4"), help="keep the requests' KV quantized (default: the model's dtype)")
    serve.add_argument("--ray-replicas", type=int, help="serve N replicas on Ray Serve (one GPU each where there are GPUs)")
    serve.add_argument("--ray-routers", type=int, default=1, help="with --ray-replicas: HTTP ingress replicas "
                       "(Routers) in front of them; one takes ~90 requests/s (default: %(default)s)")  # fmt: skip
    serve.add_argument("--ray-address", help="the Ray cluster to join (default: start one here; `auto`: the running one)")
    return parser


def _model_arguments(command: argparse.ArgumentParser) -> None:
    source = command.add_mutually_exclusive_group()
    source.add_argument(
        "--assets", type=Path, help="demo assets folder (default: the ones shipped with the package)"
    )
    source.add_argument(
        "--base", metavar="PATH_OR_ID", help="serve this base model (folder or Hub id) instead"
    )
    command.add_argument(
        "--adapter",
        action="append",
        default=[],
        type=_named_path,
        metavar="NAME=PATH",
        help="register a PEFT LoRA adapter (folder or Hub id) under NAME; repeatable",
    )
    command.add_argument(
        "--adapter-dir",
        type=Path,
        help="the only folder clients may load more adapters from "
        "(default: none; with the demo, the demo's adapters)",
    )
    command.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    command.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="device of the model (default: %(default)s)",
    )
    command.add_argument("--pool-bytes", type=int, help="size of the page pool (default: MultiLoraModel's)")


def _named_path(value: str) -> tuple[str, str]:
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {value!r}")
    return name, path
