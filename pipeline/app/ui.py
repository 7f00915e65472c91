"""The Gradio layout: a Generate tab over `generate.Studio` and an Explore tab over
`explore.Explorer`. Each handler turns a user error into ``gr.Error`` (one line in the page);
an unexpected exception is logged with its traceback and shown as one line too, and the server
keeps serving.

Either side may be missing (no ``--checkpoint``, or a store that cannot be opened): its tab then
says why and what to pass, and its buttons are disabled.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import gradio as gr

from pipeline.app.explore import PAGE_SIZE, Explorer, Selection
from pipeline.app.generate import Studio, sampler_defaults, settings_from_form
from training.sample import SAMPLERS

log = logging.getLogger(__name__)

ALL_ROWS = "(every row)"
EDGE_MAP, PHOTO = "edge map", "photo → HED edges"


def _user_errors() -> tuple[type[BaseException], ...]:
    from pipeline.cli import user_error_types

    return user_error_types()


def shown(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run a handler; any error becomes a one-line ``gr.Error`` (tracebacks go to the log)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except _user_errors() as e:
            raise gr.Error(_first_line(e), print_exception=False) from None
        except Exception as e:  # a bug: log it whole, show one line, keep serving
            log.exception("handler %s failed", fn.__name__)
            raise gr.Error(
                f"internal error ({type(e).__name__}: {_first_line(e)}); see the server log",
                print_exception=False,
            ) from None

    return wrapper


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


# ---- Generate ---------------------------------------------------------------------------------
def generate_tab(studio: Studio | None, problem: str | None) -> None:
    ready = studio is not None
    head = studio.describe() if ready else f"**Generate is off:** {problem}"
    gr.Markdown(head, elem_id="gen-status")
    with gr.Row():
        with gr.Column(scale=2):
            prompt = gr.Textbox(label="Prompt", elem_id="gen-prompt", lines=1)
            prompts = gr.Textbox(
                label="More prompts (one per line)", elem_id="gen-prompts", lines=3
            )
            with gr.Row():
                sampler = gr.Dropdown(
                    list(SAMPLERS), value="dpm", label="Sampler", elem_id="gen-sampler"
                )
                steps = gr.Number(
                    SAMPLERS["dpm"].steps, label="Steps", precision=0, elem_id="gen-steps"
                )
                cfg = gr.Number(SAMPLERS["dpm"].cfg, label="CFG scale", elem_id="gen-cfg")
            with gr.Row():
                seed = gr.Number(0, label="Seed", precision=0, elem_id="gen-seed")
                sizes = studio.sizes() if ready else []
                size = gr.Dropdown(
                    sizes, value=sizes[0] if sizes else None, label="Size (bucket)",
                    elem_id="gen-size",
                )  # fmt: skip
                per_prompt = gr.Number(
                    1, label="Images per prompt", precision=0, minimum=1, elem_id="gen-n"
                )
            with gr.Accordion("LoRA and ControlNet", open=False):
                with gr.Row():
                    lora = gr.File(label="LoRA adapter (.safetensors)", elem_id="gen-lora")
                    lora_scale = gr.Slider(0, 2, value=1.0, step=0.05, label="LoRA scale")
                with gr.Row():
                    control = gr.File(label="ControlNet image", elem_id="gen-control")
                    control_kind = gr.Radio([EDGE_MAP, PHOTO], value=EDGE_MAP, label="The image is")
            run = gr.Button("Generate", variant="primary", interactive=ready, elem_id="gen-run")
        with gr.Column(scale=3):
            gallery = gr.Gallery(
                label="Results", columns=2, format="png", elem_id="gen-gallery", height=520
            )
            edges = gr.Image(label="Edge map used", visible=True, height=160, elem_id="gen-edges")
            record = gr.JSON(label="Settings (reproduce with the same seed)", elem_id="gen-record")

    sampler.change(sampler_defaults, sampler, [steps, cfg], api_name="sampler_defaults")

    @shown
    def do_generate(
        prompt_text, more, sampler_name, n_steps, scale, seed_value, size_value, n, lora_file,
        lora_weight, control_file, kind,
    ):  # fmt: skip
        if studio is None:
            raise gr.Error(problem or "no model")
        texts = [p.strip() for p in [prompt_text or "", *(more or "").splitlines()] if p.strip()]
        settings = settings_from_form(
            sampler_name, n_steps, scale, seed_value, size_value, n, studio.low_vram
        )
        result = studio.run(
            texts,
            settings,
            lora=lora_file or None,
            lora_scale=float(lora_weight),
            control=control_file or None,
            control_is_photo=kind == PHOTO,
        )
        return (
            list(zip(result.images, result.captions, strict=True)),
            result.control,
            result.record,
        )

    run.click(
        do_generate,
        [prompt, prompts, sampler, steps, cfg, seed, size, per_prompt, lora, lora_scale, control,
         control_kind],
        [gallery, edges, record],
        api_name="generate",
        concurrency_limit=1,
        concurrency_id="model",
    )  # fmt: skip


# ---- Explore ----------------------------------------------------------------------------------
def explore_tab(explorer: Explorer | None, problem: str | None) -> None:
    ready = explorer is not None
    emb_tags = explorer.embedding_tags if ready else []
    head = (
        f"**{explorer.store.root}** — {explorer.summary()}"
        if ready
        else f"**Explore is off:** {problem}"
    )
    gr.Markdown(head, elem_id="ex-status")
    search_note = (
        ""
        if not ready or emb_tags
        else "Semantic search is off: the store has no embeddings/<tag> (run `alphaset score`)."
    )
    selection = gr.State(None)  # the current Selection
    shown_items = gr.State([])  # (key, shard) of the grid's cells
    current = gr.State(None)  # (key, shard) of the opened image

    with gr.Tab("Grid"):
        with gr.Row():
            view = gr.Dropdown(
                [ALL_ROWS, *(explorer.view_names() if ready else [])],
                value=ALL_ROWS, label="View", elem_id="ex-view", scale=1,
            )  # fmt: skip
            where = gr.Textbox(
                label="--where (SQL over meta, scores and captions)",
                placeholder="clip_aesthetic > 5 and min(width, height) >= 256 and dup_of is null",
                elem_id="ex-where",
                scale=3,
            )
            apply = gr.Button("Apply", interactive=ready, elem_id="ex-apply", scale=0)
        with gr.Row():
            query = gr.Textbox(
                label="Semantic search (text)",
                elem_id="ex-query",
                interactive=bool(emb_tags),
                placeholder=search_note or "a cat on a sofa",
                scale=3,
            )
            emb_tag = gr.Dropdown(
                emb_tags, value=emb_tags[0] if emb_tags else None, label="Embeddings", scale=1
            )
            search = gr.Button("Search", interactive=bool(emb_tags), elem_id="ex-search", scale=0)
        if search_note:
            gr.Markdown(search_note, elem_id="ex-search-note")
        with gr.Row():
            prev = gr.Button("◀ Previous", interactive=ready, elem_id="ex-prev", scale=0)
            page = gr.Number(1, label="Page", precision=0, minimum=1, elem_id="ex-page", scale=0)
            nxt = gr.Button("Next ▶", interactive=ready, elem_id="ex-next", scale=0)
            info = gr.Markdown("", elem_id="ex-info")
        grid = gr.Gallery(
            label="Images (click one for every row the store holds for it)",
            columns=6,
            height=560,
            format="jpeg",
            allow_preview=False,
            elem_id="ex-grid",
        )
        with gr.Row():
            with gr.Column(scale=1):
                detail_image = gr.Image(label="Image", elem_id="ex-detail-image", height=320)
                like = gr.Button("More like this", interactive=bool(emb_tags), elem_id="ex-like")
            detail = gr.Dataframe(
                headers=["table", "column", "value"],
                label="Every row the store holds for this key",
                elem_id="ex-detail",
                wrap=True,
                max_height=480,
            )
        with gr.Row():
            view_name = gr.Textbox(label="Save the --where filter as view", elem_id="ex-view-name")
            replace = gr.Checkbox(False, label="replace an existing view")
            save = gr.Button("Save view", interactive=ready, elem_id="ex-save")
        saved = gr.Markdown("", elem_id="ex-saved")

    with gr.Tab("Duplicates"):
        gr.Markdown(
            "Each dedup group side by side: the kept image framed green, its duplicates red."
        )
        with gr.Row():
            show = gr.Button("Show duplicate groups", interactive=ready, elem_id="ex-dups-show")
            dup_page = gr.Number(1, label="Page", precision=0, minimum=1, elem_id="ex-dups-page")
            dup_info = gr.Markdown("", elem_id="ex-dups-info")
        dups = gr.Gallery(
            columns=2, height=600, format="jpeg", object_fit="contain", elem_id="ex-dups"
        )

    def need() -> Explorer:
        if explorer is None:
            raise gr.Error(problem or "no store")
        return explorer

    def render(sel: Selection, number: int):
        ex = need()
        n_pages = ex.pages(sel)
        number = min(max(1, int(number or 1)), n_pages)
        items = ex.page(sel, number)
        lo = (number - 1) * PAGE_SIZE
        text = f"{sel.label}: {sel.total} rows · page {number} of {n_pages}" + (
            f" · showing {lo + 1}–{lo + len(items)}" if items else " · nothing matches"
        )
        cells = [(i.thumb, i.label()) for i in items]
        return sel, [(i.key, i.shard) for i in items], cells, number, text

    grid_outputs = [selection, shown_items, grid, page, info]

    @shown
    def do_apply(view_value, where_value):
        ex = need()
        sel = ex.select(where_value, None if view_value == ALL_ROWS else view_value)
        return render(sel, 1)

    @shown
    def do_page(sel, number, step):
        ex = need()
        sel = sel if isinstance(sel, Selection) else ex.select()
        return render(sel, int(number or 1) + step)

    @shown
    def do_search(text, tag):
        return render(need().search_text(text, tag), 1)

    @shown
    def do_like(cur, tag):
        if not cur:
            raise gr.Error("open an image first (click it in the grid)")
        return render(need().search_like(cur[0], tag), 1)

    @shown
    def do_detail(items, evt: gr.SelectData):
        key, shard = items[evt.index]
        image, rows = need().detail(key, shard)
        return image, _flat(rows), (key, shard)

    @shown
    def do_open(key):
        """A key sent by a client (the HTTP API): its detail, its shard looked up in meta."""
        ex = need()
        key = str(key or "").strip()
        shard = ex.find(key)
        image, rows = ex.detail(key, shard)
        return image, _flat(rows), (key, shard)

    @shown
    def do_save(name, where_value, replace_value):
        info_ = need().save_view(name, where_value, replace=bool(replace_value))
        names = [ALL_ROWS, *need().view_names()]
        msg = (
            f"saved views/{info_['name']}.parquet: {info_['selected']} of "
            f"{info_['candidates']} rows where {info_['where']}"
        )
        return msg, gr.update(choices=names)

    @shown
    def do_dups(number):
        ex = need()
        strips, n_pages, n_groups = ex.dup_page(int(number or 1))
        if n_groups == 0:
            text = "no duplicate groups" + (
                "" if f"scores/{'dedup'}" in ex.store.stages() else " (run `alphaset dedup`)"
            )
        else:
            text = f"{n_groups} groups · page {min(max(1, int(number or 1)), n_pages)} of {n_pages}"
        return strips, text

    apply.click(do_apply, [view, where], grid_outputs, api_name="explore")
    hidden = {"api_visibility": "undocumented"}
    where.submit(do_apply, [view, where], grid_outputs, **hidden)
    view.change(do_apply, [view, where], grid_outputs, **hidden)
    prev.click(lambda s, n: do_page(s, n, -1), [selection, page], grid_outputs, api_name="prev")
    nxt.click(lambda s, n: do_page(s, n, +1), [selection, page], grid_outputs, api_name="next")
    page.submit(lambda s, n: do_page(s, n, 0), [selection, page], grid_outputs, **hidden)
    search.click(do_search, [query, emb_tag], grid_outputs, api_name="search")
    query.submit(do_search, [query, emb_tag], grid_outputs, **hidden)
    like.click(do_like, [current, emb_tag], grid_outputs, api_name="more_like_this")
    grid.select(do_detail, [shown_items], [detail_image, detail, current], **hidden)
    key_box = gr.Textbox(visible=False)
    key_box.submit(do_open, key_box, [detail_image, detail, current], api_name="detail")
    save.click(do_save, [view_name, where, replace], [saved, view], api_name="save_view")
    show.click(do_dups, dup_page, [dups, dup_info], api_name="duplicates")
    dup_page.submit(do_dups, dup_page, [dups, dup_info], **hidden)


# ---- the app ----------------------------------------------------------------------------------
def build_app(
    store: str | None,
    checkpoint: str | None,
    *,
    low_vram: bool = False,
    device: str | None = None,
    dtype: str = "auto",
    controlnet: str | None = None,
    hed: str | None = None,
) -> gr.Blocks:
    """The Blocks app. A store or checkpoint that cannot be opened disables its tab with the
    reason instead of failing: the other tab still works."""
    explorer, ex_problem = None, None
    if store is None:
        ex_problem = "no store: start the app with --store STORE"
    else:
        try:
            explorer = Explorer(store)
        except Exception as e:  # any store that cannot be read: the tab says why
            ex_problem = _load_problem(e, f"--store {store}")
    studio, gen_problem = None, None
    if checkpoint is None:
        gen_problem = (
            "no model: start the app with --checkpoint DIR (a diffusers export, or a training "
            "run / stage / step-N folder)"
        )
    else:
        try:
            studio = Studio(
                checkpoint,
                device=device,
                dtype=dtype,
                low_vram=low_vram,
                controlnet=controlnet,
                hed=hed or (store_hed(explorer) if explorer else None),
            )
        except Exception as e:  # not a checkpoint, unreadable weights …: the tab says why
            gen_problem = _load_problem(e, f"--checkpoint {checkpoint}")
    with gr.Blocks(title="alphaset", analytics_enabled=False) as app:
        gr.Markdown("## alphaset — generate and explore")
        # Open on the tab that has something to show: Explore when only a store was given.
        first = "explore" if studio is None and explorer is not None else "generate"
        with gr.Tabs(selected=first):
            with gr.Tab("Generate", id="generate", elem_id="tab-generate"):
                generate_tab(studio, gen_problem)
            with gr.Tab("Explore", id="explore", elem_id="tab-explore"):
                explore_tab(explorer, ex_problem)
    app.queue(default_concurrency_limit=4)
    app.studio, app.explorer = studio, explorer  # type: ignore[attr-defined]
    return app


def _flat(rows: dict[str, dict[str, Any]]) -> list[list[str]]:
    """{table: {column: value}} → [table, column, value] rows for a table view."""
    return [
        [table, column, "" if value is None else str(value)]
        for table, row in rows.items()
        for column, value in row.items()
    ]


def _load_problem(e: Exception, what: str) -> str:
    if isinstance(e, _user_errors()):
        return _first_line(e)
    log.warning("cannot open %s", what, exc_info=True)
    return f"cannot open {what} ({type(e).__name__}: {_first_line(e)})"


def store_hed(explorer: Explorer) -> str | None:
    """The HED the store's edge maps were made with (its first ``edges/<tag>``), if any."""
    for stage in explorer.store.stages():
        if stage.startswith("edges/"):
            value = ((explorer.store.stage_config(stage) or {}).get("settings") or {}).get("hed")
            if value:
                return str(value)
    return None
