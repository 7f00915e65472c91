"""`alphaset score`: per shard, CLIP image embeddings and every per-image score.

One worker call turns image shard N into

- ``embeddings/<tag>/N.parquet``: key, embedding (fixed-size list<float16>, L2-normalised), error;
- ``scores/<tag>/N.parquet``: key, error, clip_aesthetic (LAION 1–10 scale, null without a head),
  clip_text_sim (cosine with the meta alt_text), clip_text_sim_<caption tag> (one per caption tag,
  '-' and '.' become '_'), width, height, aspect, megapixels, sharpness (variance of the Laplacian
  on a greyscale copy whose shorter side is 224 px), phash (imagehash.phash of that copy
  box-reduced 4x; 16 hex digits),

written in that order, each followed by its status record, the scores record last (it marks the
shard done for `run_stage`). Decoding runs ahead of the model in a process pool
(`curation.decode`) and the model sees batches of ready-sized uint8 crops; on a GPU the model runs
in fp16 and the next batch is uploaded while the current one computes.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from curation.aesthetic import load_head
from curation.decode import SHARPNESS_SIDE, Decoded, DecodePool
from curation.models import FOLDER_HEAD, default_tag, load_clip, resolve_clip
from pipeline import fs
from pipeline.cluster import place_workers
from pipeline.errors import UserError
from pipeline.ingest.writer import error_category
from pipeline.stage import StageSpec, StageSummary, run_stage
from pipeline.store import Store

log = logging.getLogger(__name__)

AESTHETIC_ENV = "ALPHASET_AESTHETIC"  # default --aesthetic for every CLIP (a LAION-format .pth)
_TAG = re.compile(r"^[A-Za-z0-9_.-]+$")
RESERVED_TAGS = ("dedup",)  # scores/dedup is written by `alphaset dedup`


def text_sim_column(caption_tag: str) -> str:
    return "clip_text_sim_" + caption_tag.replace("-", "_").replace(".", "_")


# ---- the worker -----------------------------------------------------------------------------
class ScoreWorker:
    """Stage worker: ``ScoreWorker(store, clip=…)(shard)`` → status record (see module docstring)."""

    def __init__(
        self,
        store: str,
        clip: str,
        tag: str,
        aesthetic: str | None = None,
        caption_tags: tuple[str, ...] | list[str] = (),
        batch_size: int = 64,
        device: str = "auto",
        decode_workers: int = 0,
        settings: dict[str, Any] | None = None,
    ):
        self.store = Store(store)
        self.tag = tag
        self.caption_tags = list(caption_tags)
        self.batch_size = batch_size
        self.settings = settings or {}
        self.clip = load_clip(clip, device)
        self.head = None
        if aesthetic:
            self.head = load_head(aesthetic, self.clip.device)
            if self.head.input_size != self.clip.embed_dim:
                raise UserError(
                    f"--aesthetic {aesthetic} takes {self.head.input_size}-d embeddings but CLIP "
                    f"{clip} makes {self.clip.embed_dim}-d ones (the LAION head is for ViT-L/14)"
                )
        # one core stays with this process (tar reads, batching, the model's launches)
        self.decode_workers = decode_workers or max(1, min(16, (os.cpu_count() or 2) - 1))
        self._pool: DecodePool | None = None  # started on the first shard
        self._buffers: list[torch.Tensor] = []  # pinned upload buffers (CUDA only)
        self._next_buffer = 0

    # -- the model side ------------------------------------------------------------------------
    def _upload(self, crops: list[np.ndarray]) -> torch.Tensor:
        """Stack crops into a (B, S, S, 3) uint8 tensor on the device (pinned double buffer on CUDA)."""
        if self.clip.device.type != "cuda":
            return torch.from_numpy(np.stack(crops))
        if not self._buffers:
            s = self.clip.input.size
            self._buffers = [
                torch.empty((self.batch_size, s, s, 3), dtype=torch.uint8).pin_memory()
                for _ in range(2)
            ]
        buf = self._buffers[self._next_buffer]
        self._next_buffer ^= 1
        np.stack(crops, out=buf.numpy()[: len(crops)])
        return buf[: len(crops)].to(self.clip.device, non_blocking=True)

    def _launch(self, crops: list[np.ndarray]) -> _InFlight:
        """Queue one batch on the device and the copy of its results back to pinned host memory."""
        with torch.inference_mode():
            x = self.clip.input.normalize(self._upload(crops).to(self.clip.device), self.clip.dtype)
            emb = self.clip.model.encode_image(x, normalize=True).float()  # (B, D)
            score = self.head(emb) if self.head is not None else None  # (B,)
            if self.clip.device.type != "cuda":
                return _InFlight(emb, score, None)
            # Non-blocking copies + an event: waiting for this batch does not wait for the next one.
            emb = emb.to("cpu", non_blocking=True)
            score = score.to("cpu", non_blocking=True) if score is not None else None
            done = torch.cuda.Event()
            done.record()
            return _InFlight(emb, score, done)

    def _embed(
        self, batches: Iterator[tuple[list[int], list[np.ndarray]]]
    ) -> Iterator[tuple[list[int], np.ndarray, np.ndarray | None]]:
        """Run batches with one in flight: batch i+1 is gathered, uploaded and queued before batch
        i's results are awaited, so the device computes while the CPU side prepares the next batch.

        Buffer reuse is safe: batch i+2 is uploaded only after batch i completed (its event).
        """
        prev: tuple[list[int], _InFlight] | None = None
        for idx, crops in batches:
            cur = (idx, self._launch(crops))
            if prev is not None:
                yield prev[0], *prev[1].result()
            prev = cur
        if prev is not None:
            yield prev[0], *prev[1].result()

    def _text_sims(self, emb: np.ndarray, texts: list[str | None]) -> np.ndarray:
        """Cosine between each row's image embedding and its text (NaN where there is no text)."""
        out = np.full(len(texts), np.nan, dtype=np.float32)
        rows = [i for i, t in enumerate(texts) if t and t.strip()]
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start : start + self.batch_size]
            tokens = self.clip.tokenizer([texts[i] for i in chunk]).to(self.clip.device)
            with torch.inference_mode():
                t = (
                    self.clip.model.encode_text(tokens, normalize=True).float().cpu().numpy()
                )  # (B, D)
            out[chunk] = (emb[chunk] * t).sum(axis=1)
        return out

    # -- one shard -----------------------------------------------------------------------------
    def __call__(self, shard: str) -> dict[str, Any]:
        start = time.perf_counter()
        # 1. The rows to produce: the shard's ok keys, in order, with their texts.
        meta = self.store.read_meta(shard, ["key", "status", "alt_text"]).to_pydict()
        keys = [k for k, s in zip(meta["key"], meta["status"], strict=True) if s == "ok"]
        alt = dict(zip(meta["key"], meta["alt_text"], strict=True))
        index = {k: i for i, k in enumerate(keys)}
        n, dim = len(keys), self.clip.embed_dim
        errors: list[str | None] = [None] * n
        decoded: list[Decoded | None] = [None] * n
        emb = np.zeros((n, dim), dtype=np.float32)
        aesthetic = np.full(n, np.nan, dtype=np.float32)

        # 2. Decode ahead in threads; embed in batches.
        def batches() -> Iterator[tuple[list[int], list[np.ndarray]]]:
            idx: list[int] = []
            crops: list[np.ndarray] = []
            items = ((k, d) for k, _ext, d in self.store.iter_images(shard) if k in index)
            if self._pool is None:
                self._pool = DecodePool(self.clip.input, self.decode_workers)
            for d in self._pool.imap(items, depth=2 * self.batch_size):
                i = index[d.key]
                if d.error is not None:
                    errors[i] = d.error
                    continue
                decoded[i] = d
                idx.append(i)
                crops.append(d.pixels)
                d.pixels = None
                if len(idx) == self.batch_size:
                    yield idx, crops
                    idx, crops = [], []
            if idx:
                yield idx, crops

        try:
            for idx, e, a in self._embed(batches()):
                emb[idx] = e
                if a is not None:
                    aesthetic[idx] = a
        except (
            BrokenProcessPool
        ) as e:  # a decoder crashed (e.g. killed for memory): fresh pool on retry
            self._pool = None
            raise RuntimeError(f"a decode process died while decoding shard {shard}: {e}") from e
        for i in range(n):
            if decoded[i] is None and errors[i] is None:
                errors[i] = "missing from image shard"
        ok = np.array([e is None for e in errors], dtype=bool)

        # 3. Text-image similarity: alt text and each caption tag.
        sims = {
            "clip_text_sim": self._text_sims(
                emb, [alt.get(k) if ok[i] else None for i, k in enumerate(keys)]
            )
        }
        missing_captions = []
        for ctag in self.caption_tags:
            caps = self._captions(ctag, shard)
            if caps is None:
                missing_captions.append(ctag)
                caps = {}
            sims[text_sim_column(ctag)] = self._text_sims(
                emb, [caps.get(k) if ok[i] else None for i, k in enumerate(keys)]
            )

        # 4. Write embeddings, then scores; each status record after its file.
        by_reason = Counter(error_category(e) for e in errors if e is not None)
        common = {
            "rows": n,
            "ok": int(ok.sum()),
            "errors": int(n - ok.sum()),
            "errors_by_reason": dict(by_reason),
            "model": self.clip.source.describe(),
            "settings": self.settings,
        }
        emb_stage, score_stage = f"embeddings/{self.tag}", f"scores/{self.tag}"
        emb_checksum = fs.write_parquet(
            fs.join(self.store.stage_dir(emb_stage), f"{shard}.parquet"),
            embeddings_table(keys, emb, ok, errors),
        )
        self.store.write_status(
            emb_stage,
            shard,
            {
                **common,
                "checksum": emb_checksum,
                "output": f"{shard}.parquet",
                "seconds": round(time.perf_counter() - start, 3),
            },
        )
        table = scores_table(
            keys, errors, decoded, aesthetic if self.head is not None else None, sims, ok
        )
        checksum = fs.write_parquet(
            fs.join(self.store.stage_dir(score_stage), f"{shard}.parquet"), table
        )
        extra = {"captions_missing": missing_captions} if missing_captions else {}
        return self.store.write_status(
            score_stage,
            shard,
            {
                **common,
                **extra,
                "checksum": checksum,
                "output": f"{shard}.parquet",
                "seconds": round(time.perf_counter() - start, 3),
            },
        )

    def close(self) -> None:
        """Stop the decode processes (they also stop when the worker is garbage-collected)."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def _captions(self, ctag: str, shard: str) -> dict[str, str | None] | None:
        stage = f"captions/{ctag}"
        if self.store.status(stage, shard) is None:
            return None
        t = fs.read_parquet(
            fs.join(self.store.stage_dir(stage), f"{shard}.parquet"), columns=["key", "caption"]
        )
        return dict(zip(t["key"].to_pylist(), t["caption"].to_pylist(), strict=True))


@dataclass
class _InFlight:
    """A batch queued on the device: its results on the host once ``done`` has fired."""

    emb: torch.Tensor  # (B, D)
    score: torch.Tensor | None  # (B,)
    done: Any  # torch.cuda.Event, or None on the CPU

    def result(self) -> tuple[np.ndarray, np.ndarray | None]:
        if self.done is not None:
            self.done.synchronize()
        return self.emb.numpy(), (self.score.numpy() if self.score is not None else None)


def embeddings_table(
    keys: list[str], emb: np.ndarray, ok: np.ndarray, errors: list[str | None]
) -> pa.Table:
    dim = emb.shape[1]
    values = pa.array(emb.astype(np.float16).reshape(-1), type=pa.float16())
    column = pa.FixedSizeListArray.from_arrays(values, dim, mask=pa.array(~ok))
    return pa.table(
        {
            "key": pa.array(keys, pa.string()),
            "embedding": column,
            "error": pa.array(errors, pa.string()),
        }
    )


def scores_table(
    keys: list[str],
    errors: list[str | None],
    decoded: list[Decoded | None],
    aesthetic: np.ndarray | None,
    sims: dict[str, np.ndarray],
    ok: np.ndarray,
) -> pa.Table:
    def floats(values: np.ndarray) -> pa.Array:
        return pa.array(values, pa.float32(), mask=~ok | np.isnan(values))

    def tech(name: str, typ: pa.DataType) -> pa.Array:
        return pa.array([getattr(d, name) if d is not None else None for d in decoded], typ)

    width = np.array([d.width if d else 0 for d in decoded], dtype=np.float64)
    height = np.array([d.height if d else 1 for d in decoded], dtype=np.float64)
    nan = np.full(len(keys), np.nan, dtype=np.float32)
    cols: dict[str, pa.Array] = {
        "key": pa.array(keys, pa.string()),
        "error": pa.array(errors, pa.string()),
        "clip_aesthetic": floats(aesthetic if aesthetic is not None else nan),
    }
    cols.update({name: floats(v) for name, v in sims.items()})
    cols.update(
        {
            "width": tech("width", pa.int32()),
            "height": tech("height", pa.int32()),
            "aspect": floats((width / height).astype(np.float32)),
            "megapixels": floats((width * height / 1e6).astype(np.float32)),
            "sharpness": tech("sharpness", pa.float32()),
            "phash": tech("phash", pa.string()),
        }
    )
    return pa.table(cols)


# ---- the library entry ----------------------------------------------------------------------
@dataclass
class ScoreConfig:
    """Settings of `alphaset score`; see `score_store`."""

    clip: str = "clip-vit-l-14"
    aesthetic: str | None = None  # a .pth path, "none", or None: see default_aesthetic
    tag: str | None = None  # default: the preset name or a slug of --clip
    captions: list[str] | None = None  # caption tags to compare with; None: as recorded, else all
    batch_size: int = 64
    device: str = "auto"
    decode_workers: int = 0  # decode processes per worker; 0: cores - 1, at most 16
    workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float | None = None  # None: 1 when the cluster has GPUs, else 0
    max_retries: int = 2
    shards: list[str] | None = None

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise UserError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.decode_workers < 0:
            raise UserError(
                f"--decode-workers must be >= 0 (0 = CPU cores - 1, at most 16), got {self.decode_workers}"
            )
        if self.device != "auto" and not re.match(r"^(cpu|cuda(:\d+)?)$", self.device):
            raise UserError(f"--device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.tag is not None and (not _TAG.match(self.tag) or self.tag in RESERVED_TAGS):
            raise UserError(
                f"--tag {self.tag!r}: use letters, digits, '_', '-', '.' (and not {', '.join(RESERVED_TAGS)})"
            )


def default_aesthetic(clip_folder: str | None) -> str | None:
    """The head used without --aesthetic: $ALPHASET_AESTHETIC, else ``aesthetic.pth`` in the CLIP folder."""
    env = os.environ.get(AESTHETIC_ENV)
    if env:
        return env
    if clip_folder and os.path.isfile(os.path.join(clip_folder, FOLDER_HEAD)):
        return os.path.join(clip_folder, FOLDER_HEAD)
    return None


def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def score_store(
    store: Store | str,
    cfg: ScoreConfig,
    progress: bool = True,
    use_ray: bool = True,
    ray_address: str | None = None,
) -> StageSummary:
    """Embed and score every (not yet scored) shard of ``store``; returns the stage summary.

    Writes STORE/embeddings/<tag>/ and STORE/scores/<tag>/ (see the module docstring). Re-running
    resumes; settings that change the output (CLIP, aesthetic head, caption tags) must match the
    first run of that tag.
    """
    store = Store(store) if isinstance(store, str) else store
    store.require()
    # 1. Resolve the model once here (a tiny model is built here, not in every worker).
    src = resolve_clip(cfg.clip)
    tag = cfg.tag or default_tag(cfg.clip)
    if tag in RESERVED_TAGS:
        raise UserError(f"--tag {tag!r} is reserved; pass another --tag")
    if cfg.aesthetic is None:
        head = default_aesthetic(src.folder)
    elif cfg.aesthetic.lower() == "none":
        head = None
    else:
        head = cfg.aesthetic
    if head is not None and not os.path.isfile(head):
        raise FileNotFoundError(f"--aesthetic {head}: no such file")
    # 2. Caption tags: as given, else as recorded by an earlier run of this tag, else all present.
    present = sorted(s.split("/", 1)[1] for s in store.stages() if s.startswith("captions/"))
    recorded = (store.stage_config(f"scores/{tag}") or {}).get("settings", {}).get("caption_tags")
    caption_tags = (
        cfg.captions
        if cfg.captions is not None
        else (recorded if recorded is not None else present)
    )
    unknown = sorted(set(caption_tags) - set(present))
    if unknown:
        raise UserError(
            f"--captions {','.join(unknown)}: no such caption tag (present: {', '.join(present) or 'none'})"
        )
    # 3. Settings that define the output; recorded beside it and checked on resume.
    settings = {
        "clip": cfg.clip,
        "aesthetic": {"file": os.path.basename(head), "sha256": _file_sha256(head)}
        if head
        else None,
        "caption_tags": list(caption_tags),
        "sharpness_side": SHARPNESS_SIDE,
    }
    spec = StageSpec(
        stage=f"scores/{tag}",
        worker_cls=ScoreWorker,
        worker_kwargs={
            "store": store.root,
            "clip": src.folder or cfg.clip,  # workers load the folder the driver resolved
            "tag": tag,
            "aesthetic": os.path.abspath(head) if head else None,
            "caption_tags": list(caption_tags),
            "batch_size": cfg.batch_size,
            "device": cfg.device,
            "decode_workers": cfg.decode_workers,
            "settings": settings,
        },
        settings=settings,
        shards=cfg.shards,
        workers=cfg.workers,
        cpus_per_worker=cfg.cpus_per_worker,
        gpus_per_worker=place_workers(cfg.gpus_per_worker, ray_address, use_ray),
        max_retries=cfg.max_retries,
        also_writes=(f"embeddings/{tag}",),
    )
    return run_stage(store, spec, progress=progress, use_ray=use_ray)
