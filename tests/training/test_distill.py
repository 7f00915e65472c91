"""LCM distillation: the consistency loss falls on the toy store, the student is a checkpoint that
`alphaset sample --sampler lcm` loads (2 and 4 steps), LCM-LoRA saves adapters only and a LoRA
checkpoint exports to diffusers with its adapters merged (training.export.load_transformer)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from pipeline.cli import main
from training.distill import (
    GUIDANCE_FILE,
    GuidedStudent,
    LcmConfig,
    LcmObjective,
    boundary_scalings,
    ddim_timesteps,
    distill_lcm,
    ema_update,
    make_student,
)
from training.export import export_diffusers, load_transformer
from training.lora import LORA_FILE
from training.sample import sample

pytest_plugins = ["conftest_train"]


@pytest.fixture(scope="module")
def lcm_run(train_store, trained_run, tmp_path_factory, kit) -> tuple[Path, list[float]]:
    out = tmp_path_factory.mktemp("lcm") / "student"
    cfg = LcmConfig(steps=4, batch_size=2, lr=1e-4)
    path, losses = distill_lcm(
        str(trained_run / "align"), train_store, kit.TAG, str(out), config=cfg
    )
    return Path(path), losses


@pytest.fixture(scope="module")
def lcm_lora(train_store, trained_run, tmp_path_factory, kit) -> Path:
    out = tmp_path_factory.mktemp("lcm-lora") / "student"
    cfg = LcmConfig(steps=3, batch_size=2, lr=5e-3, lora=4)
    return Path(
        distill_lcm(str(trained_run / "align"), train_store, kit.TAG, str(out), config=cfg)[0]
    )


def test_schedule_and_boundary_conditions():
    t = ddim_timesteps(50)
    assert len(t) == 50 and t[0] == 19 and t[-1] == 999 and set(torch.diff(t).tolist()) == {20}
    c_skip, c_out = boundary_scalings(torch.tensor([0, 999]))
    assert c_skip.flatten().tolist()[0] == 1.0 and c_out.flatten().tolist()[0] == 0.0
    assert c_skip.flatten()[1] < 1e-6 and abs(float(c_out.flatten()[1]) - 1.0) < 1e-6


def test_consistency_loss_falls_on_a_toy_batch(train_store: str, trained_run: Path, kit):
    """A few optimiser steps on one batch of the toy store (same n, w and noise each step)."""
    from training.data import FeatureBatches, make_loader, open_features

    fset = open_features(train_store, kit.TAG, resolution=256, multi_scale=False)
    batch = next(iter(make_loader(FeatureBatches(fset, 2, seed=0, caption_dropout=0.0))))
    cfg = LcmConfig(lr=1e-4)
    teacher = load_transformer(str(trained_run / "align"))
    student, target, _ = make_student(load_transformer(str(trained_run / "align")), None)
    objective = LcmObjective(teacher, cfg, fset.null_t5, fset.null_mask, 4, False)
    optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.lr)
    losses = []
    for _ in range(5):
        loss = objective.loss(student, target, batch, torch.Generator().manual_seed(3))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ema_update(target, student, cfg.ema)
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0] and losses == sorted(losses, reverse=True), losses


def test_distill_run_and_checkpoint_layout(lcm_run, trained_run: Path):
    path, losses = lcm_run
    assert len(losses) == 4 and all(np.isfinite(losses)) and max(losses) > 0
    state = json.loads((path / "state.json").read_text())
    assert state["stage"] == "lcm" and state["step"] == 4 and state["lora_base"] is None
    assert state["lcm"]["teacher"].startswith(str(trained_run / "align"))
    assert state["lcm"]["w_min"] == 3.0 and state["lcm"]["w_max"] == 15.0
    for name in ("model.safetensors", "ema.safetensors", GUIDANCE_FILE, "metrics.jsonl"):
        assert (path / name).is_file(), name
    # The saved model is a plain PixArt transformer; the guidance embedding moved its bias.
    student = load_transformer(str(path))
    teacher = load_transformer(str(trained_run / "align"))
    key = "adaln_single.emb.timestep_embedder.linear_2.bias"
    assert not torch.equal(student.state_dict()[key], teacher.state_dict()[key])


def test_guidance_embedding_starts_at_zero_and_folds_exactly(trained_run: Path):
    student = GuidedStudent(load_transformer(str(trained_run / "align")))
    torch.nn.init.normal_(student.guidance.linear_2.weight, std=0.1)
    x = torch.randn(1, 4, 32, 32)
    kw = {
        "encoder_hidden_states": torch.randn(1, 120, student.transformer.config.caption_channels),
        "timestep": torch.tensor([500]),
    }
    with torch.no_grad():
        guided = student(x, w=torch.tensor([7.0]), **kw).sample
        folded = load_transformer(str(trained_run / "align"))
        folded.load_state_dict(student.folded_state_dict(7.0))
        plain = folded(x, **kw).sample
    assert torch.allclose(guided, plain, atol=1e-5)


@pytest.mark.parametrize("steps", [2, 4])
def test_student_samples_with_lcm(lcm_run, steps: int, tmp_path: Path):
    path, _ = lcm_run
    code = main([
        "sample", "--checkpoint", str(path), "--sampler", "lcm", "--steps", str(steps),
        "--prompt", "a photo of a cat", "--out", str(tmp_path), "--device", "cpu",
    ])  # fmt: skip
    assert code == 0
    record = json.loads((tmp_path / "samples.json").read_text())
    assert record["scheduler"]["class"] == "LCMScheduler" and record["steps"] == steps
    from PIL import Image

    img = Image.open(tmp_path / record["images"][0]["file"])
    assert img.size == (256, 256)


def test_lcm_lora_saves_adapters_samples_and_exports_merged(lcm_lora, tmp_path: Path):
    assert not (lcm_lora / "model.safetensors").exists()
    with safe_open(str(lcm_lora / LORA_FILE), "pt") as f:
        assert all(".lora_" in k for k in f.keys())
    state = json.loads((lcm_lora / "state.json").read_text())
    assert state["lora_base"] and state["lcm"]["lora"] == 4
    # (C) the base with the adapters merged into plain weights = the base + live adapters.
    from training.sample import load_model

    live = load_model(str(lcm_lora)).pipe.transformer
    merged = load_transformer(str(lcm_lora))
    assert not any("lora_" in k for k in merged.state_dict())
    x = torch.randn(1, 4, 32, 32)
    kw = {
        "encoder_hidden_states": torch.randn(1, 120, merged.config.caption_channels),
        "timestep": torch.tensor([999]),
    }
    with torch.no_grad():
        assert torch.allclose(live(x, **kw).sample, merged(x, **kw).sample, atol=1e-5)
    out = export_diffusers(str(lcm_lora), str(tmp_path / "export"))
    img = sample(out, ["a photo of a rocket"], sampler="lcm", steps=2, device="cpu").images[0]
    assert img.size == (256, 256)


def test_distill_errors(tmp_path: Path, train_store: str, trained_run: Path, kit, capsys):
    teacher = str(trained_run / "align")
    cases = [
        (["--teacher", str(tmp_path / "nope"), "--features", kit.TAG], "--teacher"),
        (["--teacher", teacher, "--features", "nosuchtag"], "no features/nosuchtag"),
        (["--teacher", teacher, "--features", kit.TAG, "--steps", "0"], "--steps must be >= 1"),
        (["--teacher", teacher, "--features", kit.TAG, "--lora", "0"], "--lora rank must be >= 1"),
    ]
    for extra, msg in cases:
        args = ["distill", "lcm", "--store", train_store, "--out", str(tmp_path / "o"), *extra]
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and msg in err, err
