"""Feature shards → batches: start-up checks, rank/worker split, buckets, resumable position,
posterior sampling and caption dropout (on features extracted by the tiny T5 and VAE)."""

from __future__ import annotations

import io
import json
import os
import shutil

import numpy as np
import pytest
import torch

from pipeline.cli import UserError
from pipeline.store import Store, StoreError
from pipeline.views import view_keys
from training.data import DataPosition, FeatureBatches, open_features, read_shard

pytest_plugins = ["conftest_train"]
TAG, TAG_MS, VIEW = "tiny256", "tiny256ms", "cats_and_rockets"  # conftest_train's store


def _fset(store, tag=TAG, multi_scale=False, view=None):
    return open_features(store, tag, resolution=256, multi_scale=multi_scale, view=view, stage="s")


def _keys(ds, n):
    it = iter(ds)
    return [next(it) for _ in range(n)]


def test_open_features_describes_the_tag(train_store):
    fset = _fset(train_store)
    assert fset.n_samples == 16 and len(fset.shards) == 4
    assert fset.t5_dim == 64 and fset.max_length == 120  # tiny T5 width, PixArt's 120 tokens
    assert fset.latent_channels == 4 and fset.vae_downsample == 8
    assert fset.scale_factor == pytest.approx(0.18215)
    viewed = _fset(train_store, view=VIEW)
    assert (
        viewed.n_samples == sum(len(k) for k in view_keys(Store(train_store), VIEW).values()) == 8
    )


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (
            {"tag": "nope"},
            StoreError,
            r"stage 's': no features/nope in .* \(features tags: tiny256, tiny256ms\)",
        ),
        (
            {"resolution": 512},
            UserError,
            r"trains at 512 px but features/tiny256 was extracted at 256 px",
        ),
        (
            {"multi_scale": True},
            UserError,
            r"multi_scale = true but features/tiny256 is single-scale",
        ),
        (
            {"view": "missing"},
            StoreError,
            r"stage 's': no view 'missing' in .* \(views: cats_and_rockets\)",
        ),
    ],
)
def test_open_features_one_line_errors(train_store, kwargs, error, match):
    args = {"tag": TAG, "resolution": 256, "multi_scale": False, "view": None} | kwargs
    with pytest.raises(error, match=match) as info:
        open_features(train_store, args.pop("tag"), stage="s", **args)
    assert "\n" not in str(info.value)


def test_view_shards_without_features_are_an_error(train_store, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(train_store, store)
    s = Store(str(store))
    os.remove(s.status_url(f"features/{TAG}", "000003"))  # shard 3 not featurized (yet)
    with pytest.raises(
        StoreError, match=r"features/tiny256 lacks shard\(s\) 000003 of view 'cats_and_rockets'"
    ):
        open_features(str(store), TAG, resolution=256, multi_scale=False, view=VIEW)


def test_ranks_and_workers_read_disjoint_samples_covering_an_epoch(train_store):
    fset = _fset(train_store)
    seen = []
    for rank in range(2):
        ds = FeatureBatches(
            fset, 2, seed=3, rank=rank, world_size=2, num_workers=2, shuffle_buffer=3
        )
        assert ds.streams == 2
        for worker in range(2):
            keys = [
                k
                for batch in ds.raw_batches(worker, epoch=0)
                for k in (s["__key__"] for s in batch)
            ]
            assert len(keys) == 4  # one shard of 4 per (rank, worker) in an epoch
            seen.append(set(keys))
    assert len(set().union(*seen)) == 16  # disjoint and complete
    # Another epoch reshuffles which shards each rank reads, the same way on every rank.
    a = FeatureBatches(fset, 2, seed=3, rank=0, world_size=2)._shards(0, 1)
    b = FeatureBatches(fset, 2, seed=3, rank=1, world_size=2)._shards(0, 1)
    assert not set(a) & set(b)


def test_view_restricts_keys(train_store):
    fset = _fset(train_store, view=VIEW)
    wanted = {k for keys in view_keys(Store(train_store), VIEW).values() for k in keys}
    ds = FeatureBatches(fset, 2, seed=0)
    keys = {k for b in _keys(ds, 8) for k in b["keys"]}
    assert keys == wanted


def test_batches_stay_in_one_bucket_and_carry_micro_condition_sizes(train_store):
    fset = _fset(train_store, TAG_MS, multi_scale=True)
    ds = FeatureBatches(fset, 2, seed=0, shuffle_buffer=16)
    buckets = set()
    for batch in _keys(ds, 8):
        hw = batch["hw"]  # (B, 2)
        assert (hw == hw[0]).all()
        h, w = (int(x) for x in hw[0])
        assert batch["latents"].shape == (2, 4, h // 8, w // 8)
        buckets.add((h, w))
    assert (256, 256) in buckets and len(buckets) >= 2  # square and wide crops


def test_posterior_sample_and_caption_dropout(train_store):
    fset = _fset(train_store)
    stored = {}
    for shard in fset.shards:
        for s in read_shard(fset.shard_url(shard)):
            if not json.loads(s["json"])["error"]:
                stored[s["__key__"]] = {
                    k: np.load(io.BytesIO(s[k])) for k in ("vae.npy", "t5.npy", "mask.npy")
                }
    # No dropout: text as stored; latents = (mean + std * eps) * 0.18215 with eps ~ N(0, 1).
    batch = next(iter(FeatureBatches(fset, 8, seed=0, caption_dropout=0.0)))
    eps = []
    for i, key in enumerate(batch["keys"]):
        mean, std = stored[key]["vae.npy"].astype(np.float32)
        assert np.array_equal(batch["t5"][i].numpy(), stored[key]["t5.npy"])
        assert np.array_equal(batch["mask"][i].numpy(), stored[key]["mask.npy"])
        eps.append((batch["latents"][i].numpy() / 0.18215 - mean) / std)
    eps = np.concatenate([e.ravel() for e in eps])
    assert abs(eps.mean()) < 0.05 and abs(eps.std() - 1) < 0.05
    # Dropout replaces text and mask with the stored null embedding; ~10% at the default rate.
    dropped = next(iter(FeatureBatches(fset, 8, seed=0, caption_dropout=0.999)))
    assert all(np.array_equal(t.numpy(), fset.null_t5) for t in dropped["t5"])
    assert all(np.array_equal(m.numpy(), fset.null_mask) for m in dropped["mask"])
    ds = FeatureBatches(fset, 2, seed=0, caption_dropout=0.1)
    flags = [np.array_equal(t.numpy(), fset.null_t5) for b in _keys(ds, 100) for t in b["t5"]]
    assert 0.04 < np.mean(flags) < 0.18


def test_stream_resumes_exactly_from_a_position(train_store):
    fset = _fset(train_store)
    full = FeatureBatches(fset, 2, seed=1, num_workers=0, shuffle_buffer=5)
    batches = _keys(full, 13)  # past the end of the first epoch (8 batches)
    pos = DataPosition(1, 0, 1, 1)
    for b in batches[:11]:
        pos.consumed(b["pos"].tolist())
    assert pos.workers == {0: [1, 3]}
    again = FeatureBatches(
        fset,
        2,
        seed=1,
        num_workers=0,
        shuffle_buffer=5,
        position=DataPosition.from_dict(pos.to_dict()),
    )
    for want, got in zip(batches[11:], _keys(again, 2), strict=True):
        assert want["keys"] == got["keys"]
        assert torch.equal(want["latents"], got["latents"]) and torch.equal(want["t5"], got["t5"])


def test_too_few_samples_for_the_layout(train_store):
    fset = _fset(train_store, view=VIEW)
    with pytest.raises(
        UserError, match=r"fewer than one batch of 8 per worker; lower batch_size or num_workers"
    ):
        FeatureBatches(fset, 8, seed=0, world_size=2)
    with pytest.raises(UserError, match=r"has 4 shard\(s\), fewer than the 5 workers"):
        FeatureBatches(_fset(train_store), 1, seed=0, world_size=5, rank=4)
