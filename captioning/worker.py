"""The caption shard worker: image shard N → STORE/captions/<tag>/N.parquet + its status record.

A plain picklable class (``__init__`` loads the model, ``__call__(shard)`` does one shard) that
`pipeline.stage.run_stage` runs on Ray actors, or that a test or notebook calls directly.
A background thread reads the next batches (JPEG decode and resize on a small thread pool, then
the processor) while the model generates the current one, so the accelerator never waits on
decoding. A sample that cannot be used becomes an error row; the output holds exactly the ok
keys of the image shard, in order.
"""

from __future__ import annotations

import os
import queue
import re
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from typing import Any

import pyarrow as pa

from pipeline import fs, images
from pipeline.errors import UserError
from pipeline.ingest.writer import error_category
from pipeline.models import resolve
from pipeline.store import Store

from .captioner import Caption, CaptionConfig, Captioner, Prepared
from .models import PRESETS

KIND = "captions"
PREFETCH_BATCHES = 2  # batches prepared ahead of the model
DECODE_THREADS = min(8, os.cpu_count() or 1)  # JPEG decode + resize release the GIL

CAPTION_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("caption", pa.string()),
        ("model", pa.string()),
        ("prompt", pa.string()),  # the user prompt (alt-text inserted), not the chat template
        ("n_tokens", pa.int32()),
        ("truncated", pa.bool_()),  # cut by --max-new-tokens
        ("error", pa.string()),
    ]
)

_TAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def check_tag(tag: str) -> str:
    if not _TAG.fullmatch(tag):
        raise UserError(
            f"--tag {tag!r}: use letters, digits, '.', '_' and '-' (not starting with '.' or '_')"
        )
    return tag


def stage_name(tag: str) -> str:
    return f"{KIND}/{check_tag(tag)}"


@dataclass
class _Batch:
    keys: list[str]
    prepared: Prepared | None  # None when every image of the batch failed
    errors: dict[str, tuple[str, str | None]]  # key -> (reason, prompt)


class CaptionWorker:
    """Captions whole shards of a store with one model copy.

    ``model`` is a preset name (`captioning.models.PRESETS`) or a model folder; ``model_name``
    is what the output's ``model`` column says; the other keyword arguments are `CaptionConfig`
    fields.
    """

    def __init__(
        self, store: str, model: str, tag: str, model_name: str | None = None, **config: Any
    ):
        known = {f.name for f in fields(CaptionConfig)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise UserError(
                f"unknown caption setting(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})"
            )
        path, _preset = resolve(model, PRESETS, "caption")
        captioner = Captioner.load(path, CaptionConfig(**config))
        self._setup(store, captioner, tag, model_name or os.path.basename(model.rstrip("/")))

    @classmethod
    def from_captioner(
        cls, store: str, captioner: Captioner, tag: str, model_name: str
    ) -> CaptionWorker:
        """A worker around a model already in memory (notebooks, benchmarks)."""
        self = cls.__new__(cls)
        self._setup(store, captioner, tag, model_name)
        return self

    def _setup(self, store: str, captioner: Captioner, tag: str, model_name: str) -> None:
        self.store = Store(store)
        self.captioner = captioner
        self.config = captioner.config
        self.tag = check_tag(tag)
        self.stage = stage_name(tag)
        self.model_name = model_name

    # ---- one shard -----------------------------------------------------------------------
    def __call__(self, shard: str) -> dict[str, Any]:
        t0 = time.perf_counter()
        keys = self.store.ok_keys(shard)
        alts: dict[str, str | None] = {}
        if self.config.prompt_with_alt:
            meta = self.store.read_meta(shard, ["key", "alt_text"])
            alts = dict(zip(meta["key"].to_pylist(), meta["alt_text"].to_pylist(), strict=True))
        rows: dict[str, dict[str, Any]] = {}
        real = padded = 0  # prompt tokens, without and with the batch padding
        for batch in self._prefetch(shard, set(keys), alts):
            for key, (reason, prompt) in batch.errors.items():
                rows[key] = self._row(key, prompt=prompt, error=reason)
            if batch.prepared is not None:
                mask = batch.prepared.inputs.get("attention_mask")
                if mask is not None:
                    real, padded = real + int(mask.sum()), padded + mask.numel()
                captions = self.captioner.generate(batch.prepared)
                for key, prompt, cap in zip(
                    batch.keys, batch.prepared.prompts, captions, strict=True
                ):
                    rows[key] = self._row(key, prompt=prompt, caption=cap)
        for key in keys:  # in the meta table but not in the tar: a damaged image shard
            rows.setdefault(key, self._row(key, error="missing from image shard"))
        table = pa.Table.from_pylist([rows[k] for k in keys], schema=CAPTION_SCHEMA)
        output = f"{shard}.parquet"
        checksum = fs.write_parquet(self.store.url(self.stage, output), table)
        reasons = Counter(error_category(r["error"]) for r in rows.values() if r["error"])
        ok = [rows[k] for k in keys if rows[k]["error"] is None]
        return self.store.write_status(
            self.stage,
            shard,
            {
                "rows": len(keys),
                "ok": len(ok),
                "errors": sum(reasons.values()),
                "errors_by_reason": dict(reasons),
                "truncated": sum(bool(r["truncated"]) for r in ok),
                "tokens": sum(r["n_tokens"] for r in ok),
                "prompt_tokens": real,
                "prompt_padding": round(1 - real / padded, 4) if padded else 0.0,
                "checksum": checksum,
                "output": output,
                "model": self.model_name,
                "settings": self.config.settings(),
                "seconds": round(time.perf_counter() - t0, 3),
            },
        )

    def _row(
        self,
        key: str,
        prompt: str | None = None,
        caption: Caption | None = None,
        error: str | None = None,
    ) -> dict[str, Any]:
        return {
            "key": key,
            "caption": caption.text if caption else None,
            "model": self.model_name,
            "prompt": prompt,
            "n_tokens": caption.n_tokens if caption else None,
            "truncated": caption.truncated if caption else None,
            "error": error,
        }

    # ---- input pipeline (background thread) ----------------------------------------------
    def _batches(
        self, shard: str, wanted: set[str], alts: dict[str, str | None]
    ) -> Iterator[_Batch]:
        """Decode the shard's images (a thread pool) and prepare model inputs, batch by batch:
        a window of ``sort_window`` batches at a time, ordered by prompt length. The first
        window is one batch, so the model starts as soon as that batch is decoded; later windows
        are decoded while the model works through the batches queued before them."""
        window, limit = self.config.batch_size * self.config.sort_window, self.config.batch_size
        raw: list[tuple[str, bytes]] = []
        with ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="caption-decode") as pool:
            for key, _ext, data in self.store.iter_images(shard):
                if key in wanted:
                    raw.append((key, data))
                if len(raw) == limit:
                    yield from self._window(pool, raw, alts)
                    raw, limit = [], window
            if raw:
                yield from self._window(pool, raw, alts)

    def _window(
        self, pool: ThreadPoolExecutor, raw: list[tuple[str, bytes]], alts: dict[str, str | None]
    ) -> Iterator[_Batch]:
        """Decode ``raw``; undecodable images become errors (reported with the first batch); the
        rest, sorted by prompt length when the window holds several batches, are prepared batch
        by batch (rows are written in shard order whatever the batch order)."""
        items: list[tuple[str, Any, str | None]] = []
        errors: dict[str, tuple[str, str | None]] = {}
        for (key, _data), img in zip(
            raw, pool.map(self._decode, [d for _k, d in raw]), strict=True
        ):
            alt = alts.get(key)
            if isinstance(img, images.ImageError):
                errors[key] = (str(img), self.config.user_prompt(alt))
            else:
                items.append((key, img, alt))
        size = self.config.batch_size
        if len(items) > size:
            lengths = [self.captioner.prompt_length(img, alt) for _k, img, alt in items]
            items = [items[i] for i in sorted(range(len(items)), key=lengths.__getitem__)]
        yield self._prepare(items[:size], errors)
        for a in range(size, len(items), size):
            yield self._prepare(items[a : a + size], {})

    def _decode(self, data: bytes) -> Any:
        """Bytes → an image fitted for the processor, or the `ImageError` that says why not."""
        try:
            img, _info = images.decode(data, max_side=self.config.max_side)
        except images.ImageError as e:
            return e
        return self.captioner.fit(img)

    def _prepare(self, items: list[tuple[str, Any, str | None]], errors: dict) -> _Batch:
        if not items:
            return _Batch([], None, errors)
        try:
            prepared = self.captioner.prepare([i[1] for i in items], [i[2] for i in items])
            return _Batch([i[0] for i in items], prepared, errors)
        except Exception:  # the processor rejects the batch: find the sample(s) at fault
            good = []
            for key, img, alt in items:
                try:
                    self.captioner.prepare([img], [alt])
                    good.append((key, img, alt))
                except Exception as e:
                    errors[key] = (
                        f"preprocess error: {type(e).__name__}: {e}",
                        self.config.user_prompt(alt),
                    )
            if len(good) == len(items):
                raise
            return self._prepare(good, errors)

    def _prefetch(
        self, shard: str, wanted: set[str], alts: dict[str, str | None]
    ) -> Iterator[_Batch]:
        """Run `_batches` on a thread, up to PREFETCH_BATCHES ahead; re-raise its errors here."""
        q: queue.Queue = queue.Queue(maxsize=PREFETCH_BATCHES)
        stop = threading.Event()
        done = object()

        def put(item: Any) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def produce() -> None:
            try:
                for batch in self._batches(shard, wanted, alts):
                    if not put(batch):
                        return
                put(done)
            except BaseException as e:  # handed to the consumer, which re-raises it
                put(e)

        thread = threading.Thread(target=produce, name=f"caption-prefetch-{shard}", daemon=True)
        thread.start()
        try:
            while True:
                item = q.get()
                if item is done:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            thread.join(timeout=10)
