"""`hf-multilora playground`: the command line of the playground.

hf-multilora playground                                   # the demo assets shipped with the package
hf-multilora playground --base PATH_OR_ID --adapter NAME=PATH [--adapter ...] [--adapter-dir DIR]
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch

from hf_multilora import AdapterLoadError

from .demo import read_demo
from .service import Playground


def main(argv: Sequence[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        from . import ui  # only here: `--help` and argument errors need no Gradio
    except ImportError as error:
        parser.exit(1, f"the playground needs Gradio ({error}): pip install 'hf_multilora[app]'\n")
    try:
        playground = _playground(args)
    except (OSError, AdapterLoadError, ValueError) as error:
        parser.error(str(error))
    ui.launch(ui.build(playground), args.host, args.port)


def _playground(args: argparse.Namespace) -> Playground:
    adapters = dict(args.adapter)
    if len(adapters) < len(args.adapter):
        raise ValueError("--adapter: a name is given twice")
    kwargs = {"device": args.device, "pool_bytes": args.pool_bytes}
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
    source = play.add_mutually_exclusive_group()
    source.add_argument(
        "--assets", type=Path, help="demo assets folder (default: the ones shipped with the package)"
    )
    source.add_argument(
        "--base", metavar="PATH_OR_ID", help="serve this base model (folder or Hub id) instead"
    )
    play.add_argument(
        "--adapter",
        action="append",
        default=[],
        type=_named_path,
        metavar="NAME=PATH",
        help="register a PEFT LoRA adapter (folder or Hub id) under NAME; repeatable",
    )
    play.add_argument(
        "--adapter-dir",
        type=Path,
        help="the only folder the page may load more adapters from "
        "(default: none; with the demo, the demo's adapters)",
    )
    play.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    play.add_argument("--port", type=int, help="port (default: the first free one from 7860)")
    play.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="device of the model (default: %(default)s)",
    )
    play.add_argument("--pool-bytes", type=int, help="size of the page pool (default: MultiLoraModel's)")
    return parser


def _named_path(value: str) -> tuple[str, str]:
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {value!r}")
    return name, path
