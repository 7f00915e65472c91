"""The feature stage: image shard N + its captions in, ``features/<tag>/N.tar`` out.

Output shard N (WebDataset, readable with ``webdataset`` or ``tarfile`` + numpy alone) holds, for
each ok key of image shard N — only the view's keys when a view is given — in image-shard order:

    <key>.t5.npy    float16 (L, D)   T5 last hidden state, zero past n_tokens (L = max_length = 120)
    <key>.mask.npy  uint8   (L,)     1 for real tokens (``</s>`` included)
    <key>.vae.npy   float16 (2, 4, h/8, w/8)  [mean, std] of the unscaled VAE posterior
    <key>.json      {"key", "bucket": [h, w], "resolution", "caption", "text_truncated",
                     "n_tokens", "orig_width", "orig_height", "error": null}

A sample that cannot be used (no caption, undecodable image, non-finite output) has only its
``.json``, with ``"error": "<reason>"``. ``features/<tag>/_null.npz`` (arrays ``t5``, ``mask``)
is the empty caption's embedding, for classifier-free-guidance dropout. The stage's config
(``STORE/_status/features/<tag>/config.json``, via ``Store.claim_stage``) records the models,
resolution, buckets, caption source, view, ``max_length``, ``t5_dim`` and ``vae_scale_factor``.

`FeatureWorker` is the stage worker (one model copy; ``__call__(shard)``), `extract_features`
the library entry that runs it over a store with `pipeline.stage.run_stage`.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import queue
import re
import tarfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image

from pipeline import fs, images
from pipeline.cluster import place_workers
from pipeline.errors import UserError
from pipeline.stage import StageSpec, StageSummary, run_stage
from pipeline.store import Store, StoreError
from training.buckets import buckets, check_resolution, resize_cover_crop, target_size
from training.feature_models import VAE_DTYPES
from training.text import TextEncoder, TextFeature, clean_caption
from training.vae import VaeEncoder

log = logging.getLogger(__name__)

KIND = "features"
NULL_NAME = "_null.npz"
ALT, LABEL = "alt", "label"
LABEL_TEMPLATE = "a photo of a {label}"
_TAG_SAFE = re.compile(r"[^A-Za-z0-9_-]+")


@dataclass
class FeatureSettings:
    """What a feature worker does besides which models it runs (those are ``t5``/``vae``)."""

    resolution: int
    multi_scale: bool = False
    captions: str = ALT  # a captions/<tag>, "alt" (meta alt_text) or "label" ("a photo of a …")
    view: str | None = None
    max_length: int = 120
    batch_size: int = 16  # images per VAE batch (one bucket per batch)
    text_batch_size: int = 128
    dtype: str = "auto"  # T5: auto | bf16 | fp16 | fp32 (auto: bf16 on CUDA, fp32 on CPU)
    # The VAE encodes in fp32 by default, as PixArt-α's single-scale extraction does: a bf16 VAE
    # rounds the latent mean to 8 bits of mantissa before it is stored (bench/RESULTS.md).
    vae_dtype: str = "fp32"  # fp32 | fp16 | bf16
    device: str | None = None  # default: cuda when available
    threads: int = 0  # image decode/resize threads; 0 = min(8, CPUs)

    def __post_init__(self) -> None:
        check_resolution(self.resolution)
        if self.max_length < 2:
            raise UserError(f"--max-length must be >= 2 tokens, got {self.max_length}")
        if self.batch_size < 1:
            raise UserError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.text_batch_size < 1:
            raise UserError(f"--text-batch-size must be >= 1, got {self.text_batch_size}")
        if self.threads < 0:
            raise UserError(f"--threads must be >= 0, got {self.threads}")
        if not self.captions:
            raise UserError("--captions must name a caption tag, 'alt' or 'label'")
        if self.vae_dtype not in VAE_DTYPES:
            raise UserError(
                f"--vae-dtype must be one of {', '.join(VAE_DTYPES)}, got {self.vae_dtype!r}"
            )

    @property
    def n_threads(self) -> int:
        return self.threads or max(1, min(8, os.cpu_count() or 1))


def model_name(value: str) -> str:
    """A preset name as given; a folder by its base name."""
    return (
        os.path.basename(value.rstrip("/\\")) if os.sep in value or value.startswith(".") else value
    )


def default_tag(t5: str, vae: str, resolution: int, multi_scale: bool, captions: str) -> str:
    """``{t5}_{vae}_{resolution}[ms]_{captions}``, with '/' and '.' (and other odd characters)
    turned into '-', e.g. ``t5-v1_1-xxl_sd-vae-ft-ema_512ms_llava-1-5-7b``."""
    raw = f"{model_name(t5)}_{model_name(vae)}_{resolution}{'ms' if multi_scale else ''}_{model_name(captions)}"
    return _TAG_SAFE.sub("-", raw).strip("-")


def check_tag(tag: str) -> str:
    if not tag or tag.startswith(("_", ".")) or _TAG_SAFE.search(tag):
        raise UserError(
            f"bad --tag {tag!r}: use letters, digits, '_' and '-', not starting with '_'"
        )
    return tag


def stage_settings(
    t5: str, vae: str, s: FeatureSettings, t5_dim: int, vae_scale_factor: float
) -> dict[str, Any]:
    """The settings recorded in the stage config (``Store.stage_config``) and every status record."""
    return {
        "t5": t5,
        "vae": vae,
        "t5_dim": t5_dim,
        "resolution": s.resolution,
        "multi_scale": s.multi_scale,
        "captions": s.captions,
        "view": s.view,
        "max_length": s.max_length,
        "vae_scale_factor": vae_scale_factor,
        "vae_dtype": s.vae_dtype,
        "buckets": [list(b) for b in buckets(s.resolution, s.multi_scale)],
        "caption_cleaning": "pixart-clean_caption-x2",
        "latent": "unscaled posterior [mean, std]",
    }


# ---- image preparation (runs in threads: PIL releases the GIL while decoding and resizing) ------
def prepare_image(
    data: bytes, resolution: int, multi_scale: bool
) -> tuple[np.ndarray, tuple[int, int]]:
    """Stored image bytes → (H, W, 3) uint8 crop of its bucket, and the bucket (h, w).

    JPEGs are decoded at the smallest DCT scale that still covers the crop (libjpeg draft mode).
    Raises `pipeline.images.ImageError` for an unusable image.
    """
    max_side = None
    try:
        with Image.open(io.BytesIO(data)) as probe:
            w0, h0 = probe.size
        th, tw = target_size(h0, w0, resolution, multi_scale)
        max_side = math.ceil(max(w0, h0) * max(th / h0, tw / w0))
    except (OSError, ValueError, SyntaxError):
        pass  # not a readable header: images.decode below names the reason
    img, _ = images.decode(data, max_side=max_side)
    w, h = img.size
    bucket = target_size(h, w, resolution, multi_scale)
    crop = resize_cover_crop(img, *bucket)
    return np.asarray(crop, dtype=np.uint8), bucket


class _Prefetch:
    """Run ``fn`` over ``items`` in a thread pool, at most ``depth`` ahead, yielding in order.

    A feeder thread submits work while the caller is busy elsewhere (encoding text on the GPU),
    so decoding overlaps model time; ``close`` stops it early.
    """

    _END = object()

    def __init__(self, items: Iterable[Any], fn: Callable[[Any], Any], threads: int, depth: int):
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="features-decode")
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._feeder = threading.Thread(target=self._feed, args=(items, fn), daemon=True)
        self._feeder.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _feed(self, items: Iterable[Any], fn: Callable[[Any], Any]) -> None:
        try:
            for item in items:
                if not self._put(self._pool.submit(fn, item)):
                    return
        except BaseException as e:  # a read error of the shard itself: hand it to the consumer
            failed: Future = Future()
            failed.set_exception(e)
            self._put(failed)
        self._put(self._END)

    def __iter__(self) -> Iterator[Any]:
        while True:
            fut = self._queue.get()
            if fut is self._END:
                return
            yield fut.result()

    def close(self) -> None:
        self._stop.set()
        self._feeder.join()
        self._pool.shutdown(wait=True, cancel_futures=True)


class _Arrivals:
    """Prepared images by key from the in-order prefetch stream; ``take`` waits for one."""

    def __init__(self, stream: Iterator[tuple[str, Any, Any]]):
        self._stream = stream
        self._early: dict[str, tuple[Any, Any]] = {}
        self._done = False

    def take(self, key: str) -> tuple[Any, Any] | None:
        """(crop, bucket) or (None, reason); None when the shard has no image for ``key``."""
        while key not in self._early and not self._done:
            try:
                k, arr, info = next(self._stream)
            except StopIteration:
                self._done = True
                break
            self._early[k] = (arr, info)
        return self._early.pop(key, None)


class _HashingWriter:
    """A write-only file wrapper that hashes and counts what passes through (for tarfile).

    Every ``sync_every`` bytes it flushes the file to disk, on the writer thread: the final
    fsync of the atomic write then has little left to do, instead of a whole shard (~1 GB of
    T5 features per 1000 samples) while the device waits.
    """

    def __init__(self, raw: Any, sync_every: int = 64 << 20):
        self._raw = raw
        self._sha = hashlib.sha256()
        self._pos = 0
        self._sync_every = sync_every
        self._unsynced = 0

    def write(self, data: bytes) -> int:
        self._raw.write(data)
        self._sha.update(data)
        self._pos += len(data)
        self._unsynced += len(data)
        if self._unsynced >= self._sync_every and hasattr(self._raw, "fileno"):
            self._raw.flush()
            getattr(os, "fdatasync", os.fsync)(self._raw.fileno())
            self._unsynced = 0
        return len(data)

    def tell(self) -> int:
        return self._pos

    def hexdigest(self) -> str:
        return self._sha.hexdigest()


class _TarStream:
    """The shard's tar, written in key order by a background thread as samples complete.

    Serialising ~1 MB of T5 features per sample and writing it costs about as much as encoding
    on a fast GPU; streaming it while the models run hides that. Same bytes as
    `pipeline.store.write_tar` (PAX, mtime 0, mode 644); the file appears atomically on
    `finish` and never when the shard fails (`abort`).
    """

    def __init__(self, url: str, keys: list[str]):
        self._keys = keys
        self._ready: dict[str, dict[str, Any]] = {}
        self._cv = threading.Condition()
        self._aborted = False
        self._error: BaseException | None = None
        self._checksum: str | None = None
        self._thread = threading.Thread(target=self._run, args=(url,), daemon=True)
        self._thread.start()

    def put(self, key: str, files: dict[str, Any]) -> None:
        """``files``: ext → ndarray (saved as .npy) or dict (saved as JSON)."""
        with self._cv:
            if key in self._ready:
                raise RuntimeError(f"sample {key} emitted twice")
            self._ready[key] = files
            self._cv.notify()

    def _next(self, key: str) -> dict[str, Any]:
        with self._cv:
            while key not in self._ready and not self._aborted:
                self._cv.wait()
            if self._aborted:
                raise _Aborted
            return self._ready.pop(key)

    def _run(self, url: str) -> None:
        try:
            with fs.atomic_open(url) as raw:
                sink = _HashingWriter(raw)
                with tarfile.open(fileobj=sink, mode="w", format=tarfile.PAX_FORMAT) as tar:
                    for key in self._keys:
                        for ext, value in self._next(key).items():
                            data = _serialise(value)
                            info = tarfile.TarInfo(f"{key}.{ext}")
                            info.size = len(data)
                            info.mode = 0o644
                            info.mtime = 0
                            tar.addfile(info, io.BytesIO(data))
            self._checksum = sink.hexdigest()
        except _Aborted:
            return
        except BaseException as e:  # handed to the worker thread by finish()
            self._error = e

    def finish(self) -> str:
        """Wait for the last sample to be written; return the file's sha256."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._checksum is not None
        return self._checksum

    def abort(self) -> None:
        with self._cv:
            self._aborted = True
            self._cv.notify()
        self._thread.join()


class _Aborted(Exception):
    pass


def _serialise(value: Any) -> bytes:
    if isinstance(value, np.ndarray):
        buf = io.BytesIO()
        np.save(buf, value, allow_pickle=False)
        return buf.getvalue()
    return json.dumps(value).encode()


class _ShardStats:
    def __init__(self) -> None:
        self.ok = 0
        self.truncated = 0
        self.reasons: Counter = Counter()
        self.buckets: Counter = Counter()

    def add(self, record: dict[str, Any]) -> None:
        if record["error"] is not None:
            self.reasons[record["error"]] += 1
            return
        self.ok += 1
        self.truncated += bool(record["text_truncated"])
        h, w = record["bucket"]
        self.buckets[f"{h}x{w}"] += 1


# ---- the worker ---------------------------------------------------------------------------------
class FeatureWorker:
    """Stage worker: ``__init__`` loads T5 and the VAE, ``__call__(shard)`` writes one feature shard."""

    def __init__(self, store: str, stage: str, t5: str, vae: str, **settings: Any):
        from training.feature_models import default_device, load_t5, load_vae, torch_dtype

        s = FeatureSettings(**settings)
        device = s.device or default_device()
        dtype = torch_dtype(s.dtype, device)
        model, tokenizer = load_t5(t5, dtype, device)
        text = TextEncoder(model, tokenizer, s.max_length, s.text_batch_size)
        vae_model = load_vae(vae, torch_dtype(s.vae_dtype, device), device)
        self._setup(store, stage, text, VaeEncoder(vae_model), s, t5, vae)

    @classmethod
    def from_models(
        cls,
        store: str,
        stage: str,
        text: TextEncoder,
        vae: VaeEncoder,
        settings: FeatureSettings,
        t5_name: str = "in-memory",
        vae_name: str = "in-memory",
    ) -> FeatureWorker:
        """A worker around models already in memory (notebooks, benchmarks)."""
        self = cls.__new__(cls)
        self._setup(store, stage, text, vae, settings, t5_name, vae_name)
        return self

    def _setup(
        self,
        store: str,
        stage: str,
        text: TextEncoder,
        vae: VaeEncoder,
        s: FeatureSettings,
        t5_name: str,
        vae_name: str,
    ) -> None:
        self.store = Store(store)
        self.stage = stage
        self.text = text
        self.vae = vae
        self.s = s
        self.settings = stage_settings(t5_name, vae_name, s, text.dim, vae.scale_factor)
        self.model_info = {
            "t5": t5_name,
            "vae": vae_name,
            "device": str(vae.device),
            "dtype": str(text.dtype).replace("torch.", ""),
            "vae_dtype": str(vae.dtype).replace("torch.", ""),
        }
        self.view: dict[str, set[str]] | None = None
        if s.view is not None:
            from pipeline.views import view_keys

            self.view = {shard: set(keys) for shard, keys in view_keys(self.store, s.view).items()}

    # -- texts ------------------------------------------------------------------------------------
    def _raw_texts(self, shard: str, keys: list[str], meta: dict[str, dict]) -> tuple[dict, dict]:
        """(key → raw text, key → error reason) from the chosen caption source."""
        texts: dict[str, str] = {}
        errors: dict[str, str] = {}
        src = self.s.captions
        if not keys:  # e.g. a shard with no key in the view: no caption shard needed
            return texts, errors
        if src in (ALT, LABEL):
            column, reason = ("alt_text", "no alt text") if src == ALT else ("label", "no label")
            for k in keys:
                value = meta[k].get(column)
                if value is None or not str(value).strip():
                    errors[k] = reason
                else:
                    texts[k] = LABEL_TEMPLATE.format(label=value) if src == LABEL else str(value)
            return texts, errors
        url = self.store.url("captions", src, f"{shard}.parquet")
        if not fs.exists(url):
            raise StoreError(
                f"captions/{src} has no shard {shard}; run 'alphaset caption' for it first"
            )
        table = fs.read_parquet(url, ["key", "caption", "error"]).to_pylist()
        rows = {r["key"]: r for r in table}
        for k in keys:
            r = rows.get(k)
            if (
                r is None
                or r["error"] is not None
                or r["caption"] is None
                or not r["caption"].strip()
            ):
                errors[k] = "no caption"
            else:
                texts[k] = r["caption"]
        return texts, errors

    def _write_null(self) -> None:
        url = fs.join(self.store.stage_dir(self.stage), NULL_NAME)
        if fs.exists(url):
            return
        null = self.text.null()
        buf = io.BytesIO()
        np.savez(buf, t5=null.t5, mask=null.mask)
        fs.atomic_write(url, buf.getvalue())

    # -- one shard --------------------------------------------------------------------------------
    def __call__(self, shard: str) -> dict[str, Any]:
        start = time.perf_counter()
        s = self.s
        self._write_null()
        keys = self.store.ok_keys(shard)
        if self.view is not None:
            wanted = self.view.get(shard, set())
            keys = [k for k in keys if k in wanted]
        meta_cols = ["key", "orig_width", "orig_height", "alt_text", "label"]
        meta = {r["key"]: r for r in self.store.read_meta(shard, meta_cols).to_pylist()}
        out = _TarStream(fs.join(self.store.stage_dir(self.stage), f"{shard}.tar"), keys)
        prefetch: _Prefetch | None = None
        stats = _ShardStats()
        cleaned: dict[str, str] = {}

        def emit(key: str, error: str | None, feat=None, latent=None, bucket=None) -> None:
            m = meta.get(key, {})
            record = {
                "key": key,
                "bucket": list(bucket) if error is None else None,
                "resolution": s.resolution,
                "caption": cleaned.get(key),
                "text_truncated": feat.truncated if error is None else None,
                "n_tokens": feat.n_tokens if error is None else None,
                "orig_width": m.get("orig_width"),
                "orig_height": m.get("orig_height"),
                "error": error,
            }
            stats.add(record)
            files: dict[str, Any] = {"json": record}
            if error is None:
                files = {"t5.npy": feat.t5, "mask.npy": feat.mask, "vae.npy": latent, **files}
            out.put(key, files)

        try:
            # 1. Texts: source → cleaned; unusable ones become error rows at once.
            raw, text_errors = self._raw_texts(shard, keys, meta)
            for k, t in raw.items():
                c = clean_caption(t)
                if any(ch.isalnum() for ch in c):  # PixArt's cleaning leaves "." of a bare URL
                    cleaned[k] = c
                else:
                    text_errors[k] = "empty caption after cleaning"
            for k, reason in text_errors.items():
                emit(k, reason)

            # 2. Images decode in threads, in shard order, ahead of the models.
            need = [k for k in keys if k in cleaned]
            need_set = set(need)
            items = ((k, d) for k, _ext, d in self.store.iter_images(shard) if k in need_set)
            depth = max(4 * s.batch_size, 4 * s.n_threads)
            prefetch = _Prefetch(items, self._prepare, s.n_threads, depth)
            images_in = _Arrivals(iter(prefetch))

            # 3. Chunk by chunk in shard order: T5 (each distinct text once, sorted by length),
            #    then the VAE (one bucket per batch; part-full buckets wait for the next chunk).
            #    Finished samples stream to the tar while the next chunk runs on the device.
            encoded: dict[str, TextFeature] = {}
            groups: dict[tuple[int, int], list[tuple[str, np.ndarray]]] = {}

            def flush(bucket: tuple[int, int]) -> None:
                group, groups[bucket] = groups[bucket], []
                moments = self.vae.encode(np.stack([a for _, a in group]))  # (B, 2, C, h, w)
                for (key, _), m in zip(group, moments, strict=True):
                    if np.isfinite(m).all():
                        emit(key, None, encoded[cleaned[key]], m, bucket)
                    else:
                        emit(key, "non-finite latent")

            chunk_size = 2 * s.text_batch_size
            for i in range(0, len(need), chunk_size):
                chunk = need[i : i + chunk_size]
                new = list(dict.fromkeys(cleaned[k] for k in chunk if cleaned[k] not in encoded))
                encoded.update(zip(new, self.text.encode(new), strict=True))
                for k in chunk:
                    got = images_in.take(k)
                    feat = encoded[cleaned[k]]
                    if not feat.finite:
                        emit(k, "non-finite text embedding")
                    elif got is None:
                        emit(k, "image missing from shard")
                    elif got[0] is None:
                        emit(k, got[1])  # the image's reason
                    else:
                        groups.setdefault(got[1], []).append((k, got[0]))
                        if len(groups[got[1]]) == s.batch_size:
                            flush(got[1])
            for bucket in list(groups):
                if groups[bucket]:
                    flush(bucket)
            checksum = out.finish()
        except BaseException:
            out.abort()
            raise
        finally:
            if prefetch is not None:
                prefetch.close()

        return self.store.write_status(
            self.stage,
            shard,
            {
                "rows": len(keys),
                "ok": stats.ok,
                "errors": len(keys) - stats.ok,
                "errors_by_reason": dict(stats.reasons),
                "checksum": checksum,
                "output": f"{shard}.tar",
                "model": self.model_info,
                "settings": self.settings,
                "buckets": dict(sorted(stats.buckets.items())),
                "distinct_texts": len(encoded),
                "truncated": stats.truncated,
                "seconds": round(time.perf_counter() - start, 3),
            },
        )

    def _prepare(self, item: tuple[str, bytes]) -> tuple[str, Any, Any]:
        """(key, crop, bucket), or (key, None, reason) for an unusable image. Runs in threads."""
        key, data = item
        try:
            arr, bucket = prepare_image(data, self.s.resolution, self.s.multi_scale)
        except images.ImageError as e:
            return key, None, str(e)
        return key, arr, bucket


# ---- the library entry --------------------------------------------------------------------------
def caption_source(store: Store, captions: str | None) -> str:
    """``--captions``: a caption tag, 'alt' or 'label'; unset means the store's only caption tag,
    or 'alt' when there is none."""
    tags = [s.split("/", 1)[1] for s in store.stages() if s.startswith("captions/")]
    if captions is None:
        if len(tags) > 1:
            raise UserError(
                f"the store has several caption tags ({', '.join(tags)}); choose one with --captions"
            )
        return tags[0] if tags else ALT
    if captions in (ALT, LABEL):
        return captions
    if captions not in tags:
        have = ", ".join(tags) or "none"
        raise StoreError(
            f"no captions/{captions} in {store.root} (caption tags: {have}; or 'alt', 'label')"
        )
    return captions


def extract_features(
    store: str | Store,
    resolution: int,
    t5: str = "t5-v1_1-xxl",
    vae: str = "sd-vae-ft-ema",
    multi_scale: bool = False,
    view: str | None = None,
    captions: str | None = None,
    tag: str | None = None,
    workers: int = 1,
    gpus_per_worker: float | None = None,
    cpus_per_worker: float = 1.0,
    batch_size: int = 16,
    text_batch_size: int = 128,
    max_length: int = 120,
    dtype: str = "auto",
    vae_dtype: str = "fp32",
    threads: int = 0,
    shards: list[str] | None = None,
    max_retries: int = 2,
    ray_address: str | None = None,
    use_ray: bool = True,
    progress: bool = True,
) -> StageSummary:
    """Write ``features/<tag>/`` for every ingested shard (or ``shards``); done shards are skipped.
    ``gpus_per_worker=None``: one GPU per actor when the Ray cluster has GPUs, else none.

    Start-up checks (bad settings, missing view, captions or models) raise before any work.
    """
    from training.feature_models import t5_config, vae_config

    store = store if isinstance(store, Store) else Store(store)
    store.require()
    # A model folder is recorded by its absolute path, so the trainer can load it from anywhere.
    t5 = os.path.abspath(t5) if os.path.isdir(t5) else t5
    vae = os.path.abspath(vae) if os.path.isdir(vae) else vae
    # 1. Settings and inputs.
    source = caption_source(store, captions)
    s = FeatureSettings(
        resolution=resolution, multi_scale=multi_scale, captions=source, view=view,
        max_length=max_length, batch_size=batch_size, text_batch_size=text_batch_size,
        dtype=dtype, vae_dtype=vae_dtype, threads=threads,
    )  # fmt: skip
    wanted = shards if shards is not None else store.shards()
    if view is not None:
        from pipeline.views import view_keys

        in_view = view_keys(store, view)  # StoreError when there is no such view
        wanted = [sh for sh in wanted if in_view.get(sh)]  # the others need no captions
    if source not in (ALT, LABEL):
        done = store.completed(f"captions/{source}")
        missing = [sh for sh in wanted if sh not in done]
        if missing:
            raise StoreError(
                f"captions/{source} is missing {len(missing)} shard(s) ({', '.join(missing[:3])}…); "
                "finish 'alphaset caption' first"
            )
    # 2. Models: read their configs now so a missing model fails before Ray starts.
    t5_dim = int(t5_config(t5)["d_model"])
    scale = float(vae_config(vae).get("scaling_factor", 0.18215))
    tag = check_tag(tag or default_tag(t5, vae, resolution, multi_scale, source))
    stage = f"{KIND}/{tag}"
    # 3. Run.
    spec = StageSpec(
        stage=stage,
        worker_cls=FeatureWorker,
        worker_kwargs={"store": store.root, "stage": stage, "t5": t5, "vae": vae, **asdict(s)},
        settings=stage_settings(t5, vae, s, t5_dim, scale),
        shards=shards,
        workers=workers,
        cpus_per_worker=cpus_per_worker,
        gpus_per_worker=place_workers(gpus_per_worker, ray_address, use_ray),
        max_retries=max_retries,
    )
    return run_stage(store, spec, progress=progress, use_ray=use_ray)
