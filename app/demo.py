"""The demo assets the playground serves when started without --base: a tiny base model and
adapters that each learned one visible text task, described by `demo.json`.

They ship inside this package (`demo_assets/`, package data: 3.8 MB), so the playground runs with no
arguments wherever pip installs it. Layout (built by examples/build_demo_assets.py):

    <assets>/demo.json         {"base": "base", "prompt_format": "... {text} ...", "base_task": "...",
                                "adapters": {name: {"path": "adapters/<name>", "task": "...",
                                                    "examples": [{"text": "...", "expected": "..."}]}}}
    <assets>/base/             the base model and its tokenizer
    <assets>/adapters/<name>/  PEFT LoRA adapters
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

DEMO_ASSETS = Path(__file__).resolve().parent / "demo_assets"


@dataclass(frozen=True)
class Example:
    choice: str
    text: str
    expected: str


@dataclass(frozen=True)
class Demo:
    root: Path
    base: Path
    prompt_format: str  # "{text}" marks where the user's text goes
    base_task: str  # what the base model does with the prompt
    tasks: dict[str, str]  # adapter -> what it does
    adapters: dict[str, Path]
    examples: list[Example]


def read_demo(root: str | Path | None = None) -> Demo:
    """Read `<root>/demo.json` (default: the assets shipped with this package).

    Raises FileNotFoundError with what to do when the assets are missing, ValueError when
    demo.json does not have the layout above."""
    root = Path(root) if root is not None else DEMO_ASSETS
    spec_path = root / "demo.json"
    if not spec_path.is_file():
        raise FileNotFoundError(
            f"no demo assets at {root} (demo.json is missing). The package ships them in "
            f"{DEMO_ASSETS} (examples/build_demo_assets.py builds them): pass --assets DIR with such a "
            "folder, or serve a model of your own with --base PATH_OR_ID --adapter NAME=PATH"
        )
    try:
        spec = json.loads(spec_path.read_text())
        adapters = spec["adapters"]
        return Demo(
            root=root,
            base=root / spec["base"],
            prompt_format=spec["prompt_format"],
            base_task=spec["base_task"],
            tasks={name: a["task"] for name, a in adapters.items()},
            adapters={name: root / a["path"] for name, a in adapters.items()},
            examples=[
                Example(name, ex["text"], ex["expected"])
                for name, a in adapters.items()
                for ex in a["examples"]
            ],
        )
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"{spec_path} does not have the expected layout: {error!r}") from error
