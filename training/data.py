"""Feature shards → training batches: checked at start-up, streamed with webdataset, resumable.

``open_features`` checks everything a stage needs from the store (features tag, its resolution
and multi-scale setting, the view, features for every shard of the view, the null embedding)
and raises a one-line error before any model is built.

``FeatureBatches`` streams the shards of one rank. Each epoch the shard list is permuted (the same
permutation on every rank, from the seed), rank r takes every world_size-th shard and each
data-loader worker every num_workers-th of those, so ranks and workers read disjoint samples.
Inside a worker, samples pass a shuffle buffer and are grouped by aspect bucket; a batch is
``batch_size`` samples of one bucket (an incomplete bucket at the end of a worker's epoch is
dropped, as drop_last). Batches are decoded only when emitted: the VAE posterior is sampled from
the stored mean and std (times the VAE scale factor) and 10% of captions are replaced by the
stored null embedding.

Every random choice is a function of (seed, rank, worker, epoch, batch index), so the stream is
reproducible. A batch carries its position (worker, epoch, index); the trainer records the last
position it consumed per worker, and a resumed stream replays that worker's epoch reading only
the JSON of the samples it skips — the batches after resume are exactly those of an
uninterrupted run.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline import fs
from pipeline.cli import UserError
from pipeline.store import Store, StoreError
from training.buckets import bucket_ratio

log = logging.getLogger(__name__)

FEATURES = "features"
NULL_NAME = "_null.npz"


@dataclass
class FeatureSet:
    """The validated features of one stage: which shards and keys, and their shapes."""

    store: str
    tag: str
    view: str | None
    shards: dict[str, list[str] | None]  # shard → keys to use (None: every sample)
    n_samples: int  # samples listed (view keys, or ok samples of the features)
    settings: dict[str, Any]  # features/<tag>/_config.json settings
    null_t5: np.ndarray  # (L, D) float16
    null_mask: np.ndarray  # (L,) uint8
    latent_channels: int
    vae_downsample: int
    scale_factor: float
    multi_scale: bool
    null_keeps_mask: bool = False  # a dropped caption keeps its mask (PixArt's y_embedding null)

    @property
    def t5_dim(self) -> int:
        return int(self.null_t5.shape[1])

    @property
    def max_length(self) -> int:
        return int(self.null_t5.shape[0])

    def shard_url(self, shard: str) -> str:
        return fs.join(self.store, FEATURES, self.tag, f"{shard}.tar")


def features_tags(store: Store) -> list[str]:
    return [s.split("/", 1)[1] for s in store.stages() if s.startswith(FEATURES + "/")]


def open_features(
    store_url: str,
    tag: str,
    *,
    resolution: int,
    multi_scale: bool,
    view: str | None = None,
    stage: str = "",
) -> FeatureSet:
    """Check that ``features/<tag>`` can feed a stage at ``resolution``; describe it."""
    store = Store(store_url)
    store.require()
    where = f"stage {stage!r}: " if stage else ""
    name = f"{FEATURES}/{tag}"
    cfg = store.stage_config(name)
    if cfg is None:
        have = ", ".join(features_tags(store)) or "none"
        raise StoreError(
            f"{where}no {name} in {store.root} (features tags: {have}); "
            f"extract them with 'alphaset features --store {store.root} --resolution {resolution}'"
        )
    settings = cfg.get("settings") or {}
    if settings.get("resolution") != resolution:
        raise UserError(
            f"{where}trains at {resolution} px but {name} was extracted at {settings.get('resolution')} px; "
            "use features of the stage's resolution or change the stage's resolution"
        )
    if bool(settings.get("multi_scale")) != multi_scale:
        have = "multi-scale" if settings.get("multi_scale") else "single-scale"
        raise UserError(f"{where}multi_scale = {str(multi_scale).lower()} but {name} is {have}")
    done = store.completed(name)
    if view is not None:
        from pipeline.views import view_keys

        try:
            wanted: dict[str, list[str] | None] = dict(view_keys(store, view))
        except StoreError as e:
            raise StoreError(f"{where}{e}") from e
        missing = [s for s in wanted if s not in done]
        if missing:
            raise StoreError(
                f"{where}{name} lacks shard(s) {', '.join(missing[:5])} of view {view!r}; "
                f"run 'alphaset features --store {store.root} --view {view} …' to extract them"
            )
        n = sum(len(k or []) for k in wanted.values())
    else:
        wanted = {s: None for s in sorted(done)}
        n = sum(int(done[s].get("ok", 0)) for s in wanted)
    if not wanted or n == 0:
        what = f"view {view!r}" if view else name
        raise StoreError(f"{where}{what} has no samples to train on")
    null_url = fs.join(store.stage_dir(name), NULL_NAME)
    if not fs.exists(null_url):
        raise StoreError(
            f"{where}{name} has no {NULL_NAME} (the empty caption's embedding); re-run the features stage"
        )
    with np.load(io.BytesIO(fs.read_bytes(null_url))) as z:
        null_t5, null_mask = z["t5"].astype(np.float16), z["mask"].astype(np.uint8)
    fset = FeatureSet(
        store=store.root,
        tag=tag,
        view=view,
        shards=wanted,
        n_samples=n,
        settings=settings,
        null_t5=null_t5,
        null_mask=null_mask,
        latent_channels=0,
        vae_downsample=0,
        scale_factor=float(settings.get("vae_scale_factor", 0.18215)),
        multi_scale=multi_scale,
    )
    _probe_shapes(fset, where)
    return fset


def _probe_shapes(fset: FeatureSet, where: str) -> None:
    """Read the first ok sample to learn latent channels and the VAE's downsampling."""
    for shard, keys in fset.shards.items():
        allowed = None if keys is None else set(keys)
        for sample in read_shard(fset.shard_url(shard)):
            meta = json.loads(sample["json"])
            if (
                meta.get("error")
                or "vae.npy" not in sample
                or (allowed and sample["__key__"] not in allowed)
            ):
                continue
            vae = np.load(io.BytesIO(sample["vae.npy"]))  # (2, C, h, w)
            t5 = np.load(io.BytesIO(sample["t5.npy"]))  # (L, D)
            if t5.shape != fset.null_t5.shape:
                raise StoreError(
                    f"{where}T5 features {t5.shape} do not match the null embedding {fset.null_t5.shape}"
                )
            fset.latent_channels = int(vae.shape[1])
            fset.vae_downsample = int(meta["bucket"][0]) // int(vae.shape[2])
            return
    raise StoreError(f"{where}features/{fset.tag} has no ok sample in the selected shards")


def read_shard(url: str) -> Iterator[dict[str, Any]]:
    """The samples of one feature tar (webdataset grouping): {"__key__", "json", "t5.npy", …}."""
    import webdataset as wds

    with fs.open_read(url) as stream:
        files = wds.tariterators.tar_file_expander([{"url": url, "stream": stream}])
        yield from wds.tariterators.group_by_keys(files)


def buffer_shuffle(samples: Iterator[Any], size: int, rng: np.random.Generator) -> Iterator[Any]:
    """Shuffle a stream through a buffer of ``size`` items (webdataset's rule, seeded)."""
    buf: list[Any] = []
    for s in samples:
        if len(buf) < size:
            buf.append(s)
            continue
        j = int(rng.integers(len(buf)))
        yield buf[j]
        buf[j] = s
    while buf:
        j = int(rng.integers(len(buf)))
        buf[j], buf[-1] = buf[-1], buf[j]
        yield buf.pop()


@dataclass
class DataPosition:
    """Where a rank's stream is: per loader worker, (epoch, batches already consumed in it)."""

    world_size: int
    rank: int
    num_workers: int
    seed: int
    workers: dict[int, list[int]] = field(default_factory=dict)

    def consumed(self, pos: list[int]) -> None:
        worker, epoch, index = pos
        self.workers[worker] = [epoch, index + 1]

    def to_dict(self) -> dict[str, Any]:
        return {
            "world_size": self.world_size,
            "rank": self.rank,
            "num_workers": self.num_workers,
            "seed": self.seed,
            "workers": {str(k): v for k, v in sorted(self.workers.items())},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataPosition:
        return cls(
            world_size=d["world_size"],
            rank=d["rank"],
            num_workers=d["num_workers"],
            seed=d["seed"],
            workers={int(k): list(v) for k, v in d["workers"].items()},
        )


class FeatureBatches(IterableDataset):
    """An endless, reproducible stream of one-bucket batches for one rank."""

    def __init__(
        self,
        fset: FeatureSet,
        batch_size: int,
        *,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        shuffle_buffer: int = 512,
        caption_dropout: float = 0.1,
        position: DataPosition | None = None,
    ):
        self.fset = fset
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle_buffer = shuffle_buffer
        self.caption_dropout = caption_dropout
        self.shard_names = list(fset.shards)
        per_rank = len(self.shard_names[rank::world_size])
        if per_rank == 0:
            raise UserError(
                f"the data has {len(self.shard_names)} shard(s), fewer than the {world_size} workers; "
                "use fewer workers or more, smaller shards"
            )
        # One logical stream per loader process (0: one stream read in the training process);
        # never more streams than this rank has shards.
        self.num_workers = num_workers
        self.streams = max(1, min(num_workers, per_rank))
        per_stream = fset.n_samples / (world_size * self.streams)
        if per_stream < batch_size:
            raise UserError(
                f"{fset.n_samples} samples over {world_size} rank(s) × {self.streams} loader worker(s) "
                f"is fewer than one batch of {batch_size} per worker; lower batch_size or num_workers"
            )
        fresh = DataPosition(world_size, rank, self.streams, seed)
        if position is not None and (
            (position.world_size, position.rank, position.num_workers, position.seed)
            != (world_size, rank, self.streams, seed)
        ):
            epoch = max((e for e, _ in position.workers.values()), default=-1) + 1
            log.warning(
                "data position was recorded for %d rank(s) × %d loader worker(s), seed %d; now %d × %d, seed %d: "
                "the data stream restarts at epoch %d (resume is exact only with the same layout)",
                position.world_size, position.num_workers, position.seed, world_size, self.streams, seed, epoch,
            )  # fmt: skip
            fresh.workers = {w: [epoch, 0] for w in range(self.streams)}
            position = fresh
        self.position = position or fresh

    @property
    def loader_workers(self) -> int:
        """Processes the DataLoader should start (0: read in the training process)."""
        return self.streams if self.num_workers > 0 else 0

    def _shards(self, worker: int, epoch: int) -> list[str]:
        order = np.random.default_rng([self.seed, 0, epoch]).permutation(len(self.shard_names))
        mine = [self.shard_names[i] for i in order][self.rank :: self.world_size]
        return mine[worker :: self.streams]

    def _samples(self, shards: list[str]) -> Iterator[dict[str, Any]]:
        for shard in shards:
            keys = self.fset.shards[shard]
            allowed = None if keys is None else set(keys)
            for sample in read_shard(self.fset.shard_url(shard)):
                meta = json.loads(sample["json"])
                if meta.get("error") or (allowed is not None and sample["__key__"] not in allowed):
                    continue
                sample["meta"] = meta
                yield sample

    def raw_batches(self, worker: int, epoch: int) -> Iterator[list[dict[str, Any]]]:
        """Undecoded batches of one worker's epoch, in order."""
        rng = np.random.default_rng([self.seed, 1, self.rank, worker, epoch])
        buckets: dict[tuple[int, int], list[dict[str, Any]]] = {}
        for sample in buffer_shuffle(
            self._samples(self._shards(worker, epoch)), self.shuffle_buffer, rng
        ):
            b = buckets.setdefault(tuple(sample["meta"]["bucket"]), [])
            b.append(sample)
            if len(b) == self.batch_size:
                yield b
                buckets[tuple(sample["meta"]["bucket"])] = []

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        if info is not None and info.num_workers != self.streams:
            raise RuntimeError(
                f"FeatureBatches needs DataLoader(num_workers={self.loader_workers})"
            )
        workers = range(self.streams) if info is None else [worker]
        iters = [self._worker_stream(w) for w in workers]
        while True:
            for it in iters:
                yield next(it)

    def _worker_stream(self, worker: int) -> Iterator[dict[str, Any]]:
        epoch, skip = self.position.workers.get(worker, [0, 0])
        while True:
            n = 0
            for raw in self.raw_batches(worker, epoch):
                if n >= skip:
                    yield self.collate(raw, worker, epoch, n)
                n += 1
            if n == 0:
                raise RuntimeError(
                    f"loader worker {worker} of rank {self.rank} got no full batch in epoch {epoch}: its shards "
                    f"hold fewer than batch_size={self.batch_size} samples in every bucket; lower batch_size"
                )
            epoch, skip = epoch + 1, 0

    def collate(
        self, raw: list[dict[str, Any]], worker: int, epoch: int, index: int
    ) -> dict[str, Any]:
        """Decode one batch: posterior sample × scale, caption dropout, micro-condition sizes."""
        rng = np.random.default_rng([self.seed, 2, self.rank, worker, epoch, index])
        vae = np.stack([np.load(io.BytesIO(s["vae.npy"])) for s in raw])  # (B, 2, C, h, w) fp16
        t5 = np.stack([np.load(io.BytesIO(s["t5.npy"])) for s in raw])  # (B, L, D) fp16
        mask = np.stack([np.load(io.BytesIO(s["mask.npy"])) for s in raw]).astype(
            np.uint8
        )  # (B, L)
        mean, std = vae[:, 0].astype(np.float32), vae[:, 1].astype(np.float32)  # (B, C, h, w)
        latents = (
            mean + std * rng.standard_normal(mean.shape, dtype=np.float32)
        ) * self.fset.scale_factor
        drop = rng.random(len(raw)) < self.caption_dropout  # (B,)
        t5[drop] = self.fset.null_t5
        if not self.fset.null_keeps_mask:
            mask[drop] = self.fset.null_mask
        hw = np.array([s["meta"]["bucket"] for s in raw], dtype=np.float32)  # (B, 2) pixels
        # The source image's size (PixArt's data_info height/width), the bucket's where unknown.
        orig = [(s["meta"].get("orig_height"), s["meta"].get("orig_width")) for s in raw]
        orig_hw = np.array(
            [o if None not in o else b for o, b in zip(orig, hw.tolist(), strict=True)],
            dtype=np.float32,
        )  # (B, 2) pixels
        ratio = np.array(
            [[bucket_ratio(int(h), int(w), int(self.fset.settings["resolution"]))] for h, w in hw],
            np.float32,
        )  # (B, 1): the bucket's ratio key, as PixArt's closest_ratio
        return {
            "latents": torch.from_numpy(latents),
            "t5": torch.from_numpy(t5),
            "mask": torch.from_numpy(mask),
            "hw": torch.from_numpy(hw),
            "orig_hw": torch.from_numpy(orig_hw),
            "ratio": torch.from_numpy(ratio),
            "keys": [s["__key__"] for s in raw],
            "pos": torch.tensor([worker, epoch, index]),
        }


def make_loader(dataset: FeatureBatches, pin_memory: bool = False) -> DataLoader:
    """A DataLoader with one process per stream (batches are already formed by the dataset)."""
    n = dataset.loader_workers
    return DataLoader(
        dataset,
        batch_size=None,
        num_workers=n,
        pin_memory=pin_memory,
        prefetch_factor=4 if n else None,
        persistent_workers=False,
    )
