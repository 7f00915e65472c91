"""Looking at the data: PNG histograms of the scores and contact sheets of the best and worst images.

Reads the same joined table as views (`pipeline.views.joined_table`), so a plot shows exactly
the columns a ``--where`` filter can use. A plot whose column is absent (no ``alphaset score``
yet, no captions) is skipped with the reason, never drawn empty. Matplotlib is used through its
object API with the Agg canvas, so nothing touches a display or pyplot's global state.
"""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np
import polars as pl
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont

from pipeline import fs, images
from pipeline.errors import UserError
from pipeline.store import Store
from pipeline.views import caption_tag, joined_table

AESTHETIC = "clip_aesthetic"
THUMB = 208  # thumbnail box, pixels
CELL_PAD = 8
TEXT_LINES = 5
FONT_SIZE = 13


def _save(fig: Figure, out: str, name: str) -> str:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    url = fs.join(out, name)
    fs.atomic_write(url, buf.getvalue())
    return url


def histogram(
    out: str, name: str, series: dict[str, pl.Series], title: str, xlabel: str, bins: int = 40
) -> str:
    """One histogram (several overlaid series share the bins) with count and median in the legend."""
    fig = Figure(figsize=(7, 4.2))
    ax = fig.add_subplot()
    values = {k: s.drop_nulls().cast(pl.Float64).to_numpy() for k, s in series.items()}
    lo = min(v.min() for v in values.values())
    hi = max(v.max() for v in values.values())
    edges = bins if lo == hi else [lo + (hi - lo) * i / bins for i in range(bins + 1)]
    for label, v in values.items():
        med = float(np.median(v))
        ax.hist(v, bins=edges, alpha=0.6, label=f"{label} (n={len(v)}, median {med:.3g})")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("images")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, out, name)


def _font(size: int = FONT_SIZE) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int, lines: int) -> list[str]:
    """Greedy word wrap to ``width`` pixels, at most ``lines`` lines (a cut last line ends in '…')."""

    def fits(t: str) -> bool:
        return draw.textlength(t, font=font) <= width

    out: list[str] = []
    for word in text.split():
        pieces = []
        while not fits(word) and len(word) > 1:  # a word longer than a line: hard-split it
            cut = len(word) - 1
            while cut > 1 and not fits(word[:cut]):
                cut -= 1
            pieces.append(word[:cut])
            word = word[cut:]
        pieces.append(word)
        for p in pieces:
            if out and fits(f"{out[-1]} {p}"):
                out[-1] = f"{out[-1]} {p}"
            else:
                out.append(p)
    if len(out) > lines:
        out, last = out[:lines], out[lines - 1]
        while last and not fits(last + " …"):
            last = last[:-1]
        out[-1] = last + " …"
    return out


def contact_sheet(
    store: Store, rows: pl.DataFrame, title: str, text_col: str | None, out: str, name: str
) -> str:
    """A grid of thumbnails of ``rows`` (key, shard, clip_aesthetic, text) with wrapped captions."""
    font, title_font = _font(), _font(FONT_SIZE + 5)
    n = rows.height
    cols = min(n, 4) if n <= 8 else math.ceil(math.sqrt(n))
    grid_rows = math.ceil(n / cols)
    line_h = FONT_SIZE + 3
    cell_w, cell_h = THUMB + 2 * CELL_PAD, THUMB + 2 * CELL_PAD + line_h * (TEXT_LINES + 1)
    header = 36
    sheet = Image.new("RGB", (cols * cell_w, header + grid_rows * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((CELL_PAD, 8), title, fill="black", font=title_font)
    thumbs = _thumbnails(store, rows)
    for i, row in enumerate(rows.iter_rows(named=True)):
        x, y = (i % cols) * cell_w + CELL_PAD, header + (i // cols) * cell_h + CELL_PAD
        thumb = thumbs.get(row["key"])
        if thumb is None:
            draw.rectangle([x, y, x + THUMB, y + THUMB], outline="red")
            draw.text((x + 6, y + 6), "image unreadable", fill="red", font=font)
        else:
            sheet.paste(thumb, (x + (THUMB - thumb.width) // 2, y + (THUMB - thumb.height) // 2))
        ty = y + THUMB + 4
        score = row.get(AESTHETIC)
        label = f"{score:.2f}  {row['key']}" if score is not None else row["key"]
        draw.text((x, ty), _wrap(draw, label, font, THUMB, 1)[0], fill="#444444", font=font)
        text = (row.get(text_col) if text_col else None) or "(no caption)"
        for j, line in enumerate(_wrap(draw, text, font, THUMB, TEXT_LINES)):
            draw.text((x, ty + line_h * (j + 1)), line, fill="black", font=font)
    buf = io.BytesIO()
    sheet.save(buf, format="PNG", optimize=True)
    url = fs.join(out, name)
    fs.atomic_write(url, buf.getvalue())
    return url


def _thumbnails(store: Store, rows: pl.DataFrame) -> dict[str, Image.Image]:
    """Thumbnails of the rows' images, reading only the shards they are in."""
    wanted: dict[str, set[str]] = {}
    for key, shard in rows.select("key", "shard").iter_rows():
        wanted.setdefault(shard, set()).add(key)
    out = {}
    for shard, keys in sorted(wanted.items()):
        for key, _ext, data in store.iter_images(shard):
            if key not in keys:
                continue
            try:
                img, _ = images.decode(data, max_side=THUMB)
            except images.ImageError:
                continue  # drawn as "image unreadable"; `manifest verify --decode` names it
            img.thumbnail((THUMB, THUMB))
            out[key] = img
    return out


def plot_store(
    store: Store,
    out: str,
    captions: str | None = None,
    n: int = 16,
    scores: list[str] | None = None,
) -> dict[str, Any]:
    """Write histograms and top/bottom contact sheets to ``out``; return written paths and skips."""
    if n < 1:
        raise UserError(f"--n must be >= 1, got {n}")
    store.require()
    df = joined_table(store, captions=captions, scores=scores)
    fs.makedirs(out)
    written: list[str] = []
    skipped: dict[str, str] = {}

    # 1. Histograms
    if AESTHETIC in df.columns and df[AESTHETIC].drop_nulls().len():
        written.append(
            histogram(
                out,
                "aesthetic.png",
                {AESTHETIC: df[AESTHETIC]},
                "Aesthetic score",
                "LAION aesthetic (1-10)",
            )
        )
    else:
        skipped["aesthetic.png"] = (
            f"no {AESTHETIC} values (run 'alphaset score' with an aesthetic head)"
        )
    sims = {
        c: df[c] for c in df.columns if c.startswith("clip_text_sim") and df[c].drop_nulls().len()
    }
    if sims:
        written.append(
            histogram(
                out, "clip_similarity.png", sims, "CLIP image-text similarity", "cosine similarity"
            )
        )
    else:
        skipped["clip_similarity.png"] = (
            "no clip_text_sim* values (run 'alphaset score' on a store with captions or alt text)"
        )
    w, h = df["width"].cast(pl.Float64), df["height"].cast(pl.Float64)
    short, long = (
        pl.Series("short side", [min(a, b) for a, b in zip(w, h, strict=True)]),
        pl.Series("long side", [max(a, b) for a, b in zip(w, h, strict=True)]),
    )
    written.append(
        histogram(
            out, "resolution.png", {"short side": short, "long side": long}, "Resolution", "pixels"
        )
    )
    written.append(
        histogram(out, "aspect.png", {"width / height": w / h}, "Aspect ratio", "width / height")
    )
    if "caption" in df.columns and df["caption"].drop_nulls().len():
        words = df["caption"].drop_nulls().str.count_matches(r"\S+")
        written.append(
            histogram(out, "caption_length.png", {"caption": words}, "Caption length", "words")
        )
    else:
        skipped["caption_length.png"] = (
            "no caption column (no captions/<tag>, or several: pass --captions TAG)"
        )

    # 2. Contact sheets of the best and worst images
    if AESTHETIC not in df.columns or not df[AESTHETIC].drop_nulls().len():
        skipped["top/bottom contact sheets"] = (
            f"no {AESTHETIC} values (run 'alphaset score' with an aesthetic head)"
        )
    else:
        scored = df.filter(pl.col(AESTHETIC).is_not_null())
        text_col = "caption" if "caption" in df.columns else "alt_text"
        for name, desc in (("top_aesthetic.png", True), ("bottom_aesthetic.png", False)):
            rows = scored.sort(AESTHETIC, descending=desc).head(n)
            which = "Top" if desc else "Bottom"
            tag = caption_tag(store, captions) if text_col == "caption" else None
            title = f"{which} {rows.height} of {scored.height} by {AESTHETIC}, " + (
                f"captions/{tag}" if tag else "alt text"
            )
            written.append(contact_sheet(store, rows, title, text_col, out, name))
    return {"written": written, "skipped": skipped}
