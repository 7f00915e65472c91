"""Fixtures for the trainer tests (imported by tests/training/test_train*.py, test_export.py,
test_distributed.py): a store of real photos with features extracted by the tiny T5 and VAE, and
a tiny stages config writer.

The store is built once per session and only read by the tests (training writes its run folder
elsewhere). 16 images in 4 shards of 4: crops of the skimage photos, half square, half 2:1 wide,
labelled by folder so the captions are "a photo of a {label}", as PixArt's first stage.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from PIL import Image

TAG = "tiny256"  # single-scale 256 px features
TAG_MS = "tiny256ms"  # multi-scale 256 px features
VIEW = "cats_and_rockets"
LABELS = ("cat", "rocket", "cup", "person")


@pytest.fixture(scope="session")
def train_photos(photos_dir: Path, tmp_path_factory) -> Path:
    """16 photos in label folders: 8 square-ish crops, 8 wide (2:1) crops."""
    out = tmp_path_factory.mktemp("train-photos")
    sources = sorted(photos_dir.iterdir())
    n = 0
    for i in range(16):
        img = Image.open(sources[i % len(sources)]).convert("RGB")
        w, h = img.size
        s = min(w, h)
        if i < 8:
            box = ((w - s) // 2 + i, (h - s) // 2, (w - s) // 2 + s - i, (h + s) // 2 - i)
        else:
            box = (0, h // 2 - w // 4 + i, w, h // 2 + w // 4 + i) if w >= h else (0, 0, w, w // 2)
        label = LABELS[i % len(LABELS)]
        folder = out / label
        folder.mkdir(exist_ok=True)
        img.crop(box).resize((256 if i < 8 else 384, 256 if i < 8 else 192)).save(
            folder / f"img{i:02d}.jpg", quality=90
        )
        n += 1
    return out


@pytest.fixture(scope="session")
def train_store(train_photos: Path, tmp_path_factory) -> str:
    """Ingested store (4 shards of 4) with tiny-model features: TAG (single-scale), TAG_MS
    (multi-scale) and a view VIEW of the cat and rocket images."""
    from pipeline.ingest.folder import ingest_folder
    from pipeline.store import Store
    from pipeline.views import create_view
    from training.features import extract_features

    root = str(tmp_path_factory.mktemp("train-store") / "store")
    store = Store(root)
    ingest_folder(store, str(train_photos), label_from_dir=True, progress=False, shard_size=4)
    for tag, ms in ((TAG, False), (TAG_MS, True)):
        summary = extract_features(
            store,
            256,
            t5="tiny",
            vae="tiny",
            multi_scale=ms,
            captions="label",
            tag=tag,
            use_ray=False,
            progress=False,
        )
        assert summary.ok, summary.lines()
    create_view(store, VIEW, "label in ('cat', 'rocket')")
    return root


def write_config(
    path: Path,
    run: dict[str, Any],
    stages: list[dict[str, Any]],
    defaults: dict[str, Any] | None = None,
) -> Path:
    """Write a stages.toml from dicts (strings, numbers, booleans and lists of strings)."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return repr(v)

    lines = ["[run]"] + [f"{k} = {value(v)}" for k, v in run.items()]
    if defaults:
        lines += ["", "[defaults]"] + [f"{k} = {value(v)}" for k, v in defaults.items()]
    for s in stages:
        lines += ["", "[[stage]]"] + [f"{k} = {value(v)}" for k, v in s.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def tiny_stage(name: str, **kw: Any) -> dict[str, Any]:
    """A few-step tiny stage on TAG (overridable)."""
    stage = {
        "name": name,
        "features": TAG,
        "resolution": 256,
        "steps": 4,
        "batch_size": 2,
        "lr": 1e-3,
        "warmup": 2,
        "grad_clip": 1.0,
        "ema": 0.9,
        "save_every": 2,
        "shuffle_buffer": 4,
        "init_from": "scratch",
    }
    stage.update(kw)
    return stage


def tiny_run(store: str, out: Path, **kw: Any) -> dict[str, Any]:
    run = {
        "name": "t",
        "store": store,
        "model": "tiny",
        "dir": str(out),
        "num_workers": 0,
        "log_every": 1,
        "seed": 0,
    }
    run.update(kw)
    return run


@pytest.fixture(scope="session")
def trained_run(train_store: str, tmp_path_factory) -> Path:
    """A finished two-stage tiny run (built once): 'pixel' from scratch with validation images,
    then 'align' from it on the view. Tests only read it."""
    from training.config import load_config
    from training.train import train

    out = tmp_path_factory.mktemp("trained-run")
    stages = [
        tiny_stage(
            "pixel", sample_every=4, validation_prompts=["a photo of a cat", "a photo of a rocket"]
        ),
        tiny_stage("align", init_from="previous", view=VIEW),
    ]
    path = write_config(out / "stages.toml", tiny_run(train_store, out / "runs"), stages)
    train(load_config(str(path)), progress=False)
    return out / "runs" / "t"


@pytest.fixture(scope="session")
def kit():
    """This module (its constants and config helpers) for the tests that load it as a plugin
    (``pytest_plugins = ["conftest_train"]``: importing it directly would skip assert rewriting)."""
    import sys

    return sys.modules[__name__]


def run_metrics(stage_dir: Path) -> dict[int, dict[str, Any]]:
    """step → its metrics.jsonl record; every step must have exactly one line."""
    import json

    recs = [json.loads(x) for x in (Path(stage_dir) / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in recs]
    assert len(steps) == len(set(steps)), f"duplicate metrics lines: {steps}"
    return {r["step"]: r for r in recs}


def assert_exact_resume(make, tmp: Path, stop: int = 2) -> tuple[str, str]:
    """Train ``make(out)`` (a one-stage RunConfig) whole and again stopped after ``stop`` steps
    then resumed: every logged loss and every final weight file must be identical.
    Returns both final checkpoints."""
    from safetensors.torch import load_file

    from training.train import train

    whole_cfg = make(str(tmp / "whole"))
    stage = whole_cfg.stages[0].name
    whole = train(whole_cfg, progress=False)[stage]
    part_cfg = make(str(tmp / "part"))
    assert train(part_cfg, stop_after=stop, progress=False) == {}
    part = train(make(str(tmp / "part")), resume=True, progress=False)[stage]
    a, b = run_metrics(tmp / "whole" / stage), run_metrics(tmp / "part" / stage)
    assert sorted(a) == sorted(b) == list(range(1, whole_cfg.stages[0].steps + 1))
    assert [a[s]["loss"] for s in sorted(a)] == [b[s]["loss"] for s in sorted(b)]
    files = sorted(p.name for p in Path(whole).glob("*.safetensors"))
    assert files == sorted(p.name for p in Path(part).glob("*.safetensors")) and files
    for name in files:
        wa, wb = load_file(Path(whole) / name), load_file(Path(part) / name)
        assert wa.keys() == wb.keys() and all(torch_equal(wa[k], wb[k]) for k in wa), name
    return whole, part


def torch_equal(a, b) -> bool:
    import torch

    return torch.equal(a, b)
