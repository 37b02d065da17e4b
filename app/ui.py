"""The Gradio Blocks of the playground: wiring only; the work is done by `service.Playground`.

API names (for gradio_client): `/generate` (streams the rows), `/diff`, `/load_adapter` (folder,
name; returns the name registered), `/memory`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import gradio as gr
import pandas as pd

from hf_multilora import PoolExhaustedError

from .diff import ADDED, REMOVED, word_diff
from .service import BASE_CHOICE, Playground, Progress, Settings

MAX_ROWS = 8  # output boxes on the page; a request may use at most this many rows
MAX_NEW_TOKENS = 32  # the slider's start when the model's generation config sets none
ENGINE_USERS = 16  # requests of the page streamed at once through a continuous-batching engine
STATS_HEADERS = ["row", "new tokens", "seconds", "tokens/s", "status"]
# Errors caused by the request (bad input, an adapter that cannot be loaded, a full page pool):
# shown to the user as they are. AdapterLoadError and PlaygroundError are ValueErrors.
USER_ERRORS = (ValueError, KeyError, PoolExhaustedError)
# The default theme's fonts ship with Gradio: the page loads without any network access.
THEME = gr.themes.Default()
CSS = ".row-output textarea { font-family: var(--font-mono); }"
# The memory plots show the last MEMORY_STEPS steps, numbered from the latest (0) back (-1, -2, ...).
# A fixed step axis, because Vega-Lite puts about one tick per 40 px: an axis spanning fewer steps
# would get fractional ticks. (Limits that followed the data would not do: Gradio redraws a plot
# whose limits change without the data that came with them.)
MEMORY_STEPS = 20
STEP_AXIS = {"x": "step", "x_title": "step (0: the latest)", "x_lim": [-MEMORY_STEPS, 0]}


def build(playground: Playground) -> gr.Blocks:
    """The page for `playground`; serve it with `launch`."""
    demo = playground.demo
    defaults = playground.model.adapter_names[:MAX_ROWS] or [BASE_CHOICE]
    with gr.Blocks(title="hf_multilora playground", analytics_enabled=False) as blocks:
        gr.Markdown(
            "# hf_multilora playground\nOne prompt, several LoRA adapters and/or the base model, "
            "in **one batched `generate()`** call: each row of the batch uses its own adapter."
        )
        if demo is not None:
            gr.Markdown(_tasks_table(playground))
        with gr.Row():
            with gr.Column(scale=3):
                prompt = gr.Textbox(label="Prompt", lines=2, elem_id="prompt")
                choices = gr.CheckboxGroup(
                    playground.choices,
                    value=defaults,
                    label=f"Rows: adapters and/or the base (up to {MAX_ROWS})",
                    elem_id="choices",
                )
                run = gr.Button("Generate", variant="primary", elem_id="run")
            with gr.Column(scale=1):
                start = playground.model.generation_config.max_new_tokens or MAX_NEW_TOKENS
                max_new_tokens = gr.Slider(1, 512, value=start, step=1, label="max new tokens")
                temperature = gr.Slider(0, 2, value=0, step=0.05, label="temperature (0: greedy)")
                top_p = gr.Slider(0.05, 1, value=1, step=0.05, label="top-p")
                seed = gr.Number(0, precision=0, label="seed")
        if demo is not None:
            gr.Examples(_examples(playground), inputs=[prompt, choices], label="Examples (text, rows)")
        with gr.Row():
            boxes = [
                gr.Textbox(
                    label=defaults[i] if i < len(defaults) else None,
                    visible=i < len(defaults),
                    lines=3,
                    interactive=False,
                    elem_classes="row-output",
                    min_width=200,
                )
                for i in range(MAX_ROWS)
            ]
        latency = gr.Markdown(elem_id="latency")
        stats = gr.Dataframe(headers=STATS_HEADERS, label="Per row", interactive=False, elem_id="stats")
        texts = gr.State({})  # the last request's outputs, by row, for the diff
        with gr.Accordion("Diff of two outputs", open=True):
            with gr.Row():
                # Custom values: an API client calls /diff without the dropdowns having been filled.
                left = gr.Dropdown(label="from", allow_custom_value=True, elem_id="diff-from")
                right = gr.Dropdown(label="to", allow_custom_value=True, elem_id="diff-to")
            diff = gr.HighlightedText(
                label="Diff",
                combine_adjacent=True,
                show_legend=True,
                color_map={REMOVED: "red", ADDED: "green"},
            )
        with gr.Accordion("Load an adapter", open=False):
            where = playground.adapter_dir or "nowhere (start with --adapter-dir DIR)"
            with gr.Row():
                folder = gr.Dropdown(
                    playground.adapter_folders(),
                    allow_custom_value=True,
                    label=f"Folder under {where}",
                    elem_id="load-folder",
                )
                name = gr.Textbox(label="Name (default: the folder's name)", elem_id="load-name")
            load = gr.Button("Load adapter", elem_id="load")
            # The load's own output: an error marks this box, not the rows or the form (see below).
            loaded = gr.Textbox(label="Last loaded adapter", interactive=False, elem_id="loaded")
        with gr.Accordion("Memory: the page pool", open=True), gr.Row():
            memory_table = gr.Dataframe(
                headers=["page pool", "now"],
                interactive=False,
                column_widths=["55%", "45%"],
                min_width=420,
                wrap=True,
                elem_id="memory",
            )
            pages_plot = gr.LinePlot(
                y="pages", color="series", title="Pool pages, per step", elem_id="pages-plot", **STEP_AXIS
            )
            swaps_plot = gr.LinePlot(
                y="count",
                color="series",
                title="Adapter swaps (cumulative)",
                elem_id="swaps-plot",
                **STEP_AXIS,
            )
        memory_outputs = [memory_table, pages_plot, swaps_plot]

        def generate(
            text: str, selected: list[str], tokens: float, temp: float, p: float, seed_value: float
        ) -> Iterator[list[Any]]:
            rows = list(selected or [])  # not preprocessed (see the event below): an API call may send None
            if len(rows) > MAX_ROWS:
                raise gr.Error(f"select at most {MAX_ROWS} rows")
            try:
                settings = Settings(int(tokens), float(temp), float(p), int(seed_value or 0))
                for progress in playground.generate_stream(text or "", rows, settings):
                    yield _render(progress)
            except USER_ERRORS as error:
                raise _user_error(error) from error

        def load_adapter(folder_value: str | None, name_value: str) -> str:
            try:
                added = playground.load_adapter_from(folder_value or "", name_value or "")
            except USER_ERRORS as error:
                raise _user_error(error) from error
            gr.Info(f"Loaded adapter {added!r}")
            return added

        def show_loaded(added: str, selected: list[str]) -> tuple:
            """After a successful load only: the new adapter becomes a row (selected while there is
            room) and the form is cleared."""
            selection = [*selected, added] if len(selected) < MAX_ROWS else selected
            return (
                gr.update(choices=playground.choices, value=selection),
                gr.update(choices=playground.adapter_folders(), value=None),
                "",
            )

        def memory() -> tuple:
            return _memory_panel(playground)

        def refresh() -> tuple:
            """A page opened after others loaded adapters sees them too."""
            return (
                gr.update(choices=playground.choices),
                gr.update(choices=playground.adapter_folders()),
                *memory(),
            )

        # The boxes follow the selection; /generate then streams plain texts into them, in its order.
        choices.change(
            _boxes, choices, boxes, queue=False, show_progress="hidden", api_visibility="undocumented"
        )
        run_event = run.click(
            generate,
            [prompt, choices, max_new_tokens, temperature, top_p, seed],
            [*boxes, stats, latency, texts],
            api_name="generate",
            # One batched generate() at a time: other users wait in the queue; with an engine their
            # rows join its running batch instead.
            concurrency_limit=1 if playground.engine is None else ENGINE_USERS,
            # The inputs as sent: Gradio would check the rows against the choices this session last
            # saw, refusing an adapter loaded since (by an API client, by another user);
            # Playground checks them against the adapters registered now.
            preprocess=False,
        )
        run_event.then(_diff_rows, texts, [left, right, diff], api_visibility="undocumented")
        run_event.then(memory, None, memory_outputs, api_name="memory")
        gr.on([left.input, right.input], _diff, [texts, left, right], diff, api_name="diff")
        # An error raised by an event marks its outputs with an "Error" badge that blocks them until
        # they are next updated: the load therefore writes only `loaded`, and the rows and the form
        # are updated in a second step that runs after a success.
        load_event = load.click(load_adapter, [folder, name], loaded, api_name="load_adapter")
        load_event.success(
            show_loaded, [loaded, choices], [choices, folder, name], api_visibility="undocumented"
        )
        load_event.then(memory, None, memory_outputs, api_visibility="undocumented")
        blocks.load(refresh, None, [choices, folder, *memory_outputs], api_visibility="undocumented")
    return blocks


def launch(blocks: gr.Blocks, host: str = "127.0.0.1", port: int | None = None, *, block: bool = True) -> str:
    """Serve `blocks` on host:port (port None: the first free one from 7860) through Gradio's
    queue, and return the local URL. With `block=False` the server runs in a background thread
    (tests). No share link, no analytics, no server-side rendering (it needs Node).

    Gradio itself runs quiet: unquiet, it suggests `share=True`, which this app never sets; with
    `block` the URL is printed here instead."""
    blocks.queue()
    _, url, _ = blocks.launch(
        server_name=host,
        server_port=port,
        prevent_thread_lock=True,
        show_error=True,
        share=False,
        ssr_mode=False,
        quiet=True,
        theme=THEME,
        css=CSS,
    )
    if block:
        print(f"* hf_multilora playground on {url} (listening on {host}; no public share link)", flush=True)
        blocks.block_thread()
    return url


def _boxes(selected: list[str]) -> list[Any]:
    """One visible, empty box per selected row, labelled with its adapter; the rest hidden."""
    shown = [gr.update(value="", label=choice, visible=True) for choice in selected[:MAX_ROWS]]
    return shown + [gr.update(value="", visible=False)] * (MAX_ROWS - len(shown))


def _render(progress: Progress) -> list[Any]:
    rows = progress.rows
    boxes = [row.text for row in rows] + [""] * (MAX_ROWS - len(rows))
    table = [
        [
            row.choice,
            row.tokens,
            round(row.seconds, 3),
            round(row.tokens_per_s, 1),
            ("EOS" if row.eos else "max tokens") if row.finished else "generating",
        ]
        for row in rows
    ]
    total = sum(row.tokens for row in rows)
    rate = total / progress.seconds if progress.seconds > 0 else 0.0
    state = "Done" if progress.done else "Generating"
    latency = (
        f"**{state}**: {progress.seconds:.2f} s total latency, {_count(total, 'new token')} in "
        f"{_count(len(rows), 'row')} of one batched generate() ({rate:.1f} tokens/s)"
    )
    return [*boxes, table, latency, {row.choice: row.text for row in rows}]


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _diff_rows(texts: dict[str, str]) -> tuple:
    """After a request: offer its rows for the diff and compare the first two."""
    rows = list(texts)
    first, second = (rows + rows)[:2] if rows else (None, None)
    return (
        gr.update(choices=rows, value=first),
        gr.update(choices=rows, value=second),
        _diff(texts, first, second),
    )


def _diff(texts: dict[str, str], left: str | None, right: str | None) -> list[tuple[str, str | None]]:
    if left is None or right is None:
        return []
    missing = [row for row in (left, right) if row not in texts]
    if missing:
        raise gr.Error(
            f"no output for {missing} in the last request (rows: {list(texts)})", print_exception=False
        )
    return word_diff(texts[left], texts[right])


def _memory_panel(playground: Playground) -> tuple[list[list[Any]], pd.DataFrame, pd.DataFrame]:
    samples = playground.memory()
    now = samples[-1]
    table = [
        ["adapters registered", now["adapters_registered"]],
        ["adapters in host memory", now["adapters_in_host_memory"]],
    ]
    if "pages_total" not in now:
        table.append(["page pool", "not created yet: the first request creates it"])
    else:
        table += [
            ["pool pages", f"{_count(now['pages_total'], 'page')} of {now['page_bytes']} bytes each"],
            ["free pages", now["pages_free"]],
            ["KV pages (peak of the last request)", now["pages_kv_peak"]],
            ["adapter pages", now["pages_adapter"]],
            ["resident adapters (LRU first)", ", ".join(now["adapters_resident"]) or "none"],
            ["hits / copies in / evictions", f"{now['hits']} / {now['misses']} / {now['evictions']}"],
            ["bytes copied to the device", now["bytes_copied_to_device"]],
        ]
    pages = _long(
        samples, "pages", {"KV (peak of the request)": "pages_kv_peak", "adapters": "pages_adapter"}
    )
    swaps = _long(samples, "count", {"copies into the pool": "misses", "evictions": "evictions"})
    return table, pages, swaps


def _long(samples: list[dict[str, Any]], y: str, series: dict[str, str]) -> pd.DataFrame:
    """One row per (sample, series): the layout gr.LinePlot draws one line per series from; steps
    counted from the latest sample (0) back. Before the pool exists nothing is in it: 0."""
    latest = samples[-1]["step"]
    rows = [
        {"step": s["step"] - latest, y: s.get(key, 0), "series": label}
        for s in samples
        for label, key in series.items()
    ]
    return pd.DataFrame(rows, columns=["step", y, "series"])


def _examples(playground: Playground) -> list[list[Any]]:
    """demo.json's example texts, each with the adapters it is an example of."""
    rows: dict[str, list[str]] = {}
    for example in playground.demo.examples:
        rows.setdefault(example.text, []).append(example.choice)
    return [[text, choices] for text, choices in rows.items()]


def _tasks_table(playground: Playground) -> str:
    demo = playground.demo
    lines = ["| row | what it does |", "| --- | --- |", f"| `{BASE_CHOICE}` | {demo.base_task} |"]
    lines += [f"| `{name}` | {task} |" for name, task in demo.tasks.items()]
    return "**Demo tasks.** The tiny base model and its adapters were trained for these:\n\n" + "\n".join(
        lines
    )


def _user_error(error: BaseException) -> gr.Error:
    """The error as the page shows it (no traceback on the console: it is the request's fault)."""
    # str(KeyError("x")) is "'x'": use the message itself.
    message = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
    return gr.Error(message, title=type(error).__name__, print_exception=False)
