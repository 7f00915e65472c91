"""LCM distillation as an objective of the one loop: the consistency loss falls on the toy store,
the checkpoint is a plain transformer `alphaset sample --sampler lcm` loads (2 and 4 steps),
--resume is exact (bf16 autocast on), LCM-LoRA saves adapters only and exports merged, and the
front end's errors are one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from pipeline.cli import main
from training.checkpoint import GUIDANCE_FILE, LORA_FILE, load_transformer
from training.distill import GuidedStudent, boundary_scalings, ddim_timesteps
from training.export import export_diffusers
from training.recipes import lcm_config, losses, run_recipe
from training.sample import sample

pytest_plugins = ["conftest_train"]


@pytest.fixture(scope="module")
def lcm_run(train_store, trained_run, tmp_path_factory, kit) -> Path:
    """A 6-step LCM distillation with a validation grid (the run folder)."""
    out = tmp_path_factory.mktemp("lcm") / "student"
    cfg = lcm_config(
        str(trained_run / "align"), train_store, kit.TAG, str(out), steps=6, batch_size=2,
        lr=1e-3, num_workers=0, log_every=1, sample_every=6,
        validation_prompts=["a photo of a cat"], guidance_embedding=True, grad_clip=1.0,
    )  # fmt: skip
    run_recipe(cfg, progress=False, device="cpu")
    return out


@pytest.fixture(scope="module")
def lcm_lora(train_store, trained_run, tmp_path_factory, kit) -> Path:
    out = tmp_path_factory.mktemp("lcm-lora") / "student"
    cfg = lcm_config(
        str(trained_run / "align"), train_store, kit.TAG, str(out), steps=3, batch_size=2,
        lr=5e-3, lora=4, num_workers=0,
    )  # fmt: skip
    return Path(run_recipe(cfg, progress=False))


def test_schedule_and_boundary_conditions():
    t = ddim_timesteps(50)
    assert len(t) == 50 and t[0] == 19 and t[-1] == 999 and set(torch.diff(t).tolist()) == {20}
    c_skip, c_out = boundary_scalings(torch.tensor([0, 999]))
    assert c_skip.flatten().tolist()[0] == 1.0 and c_out.flatten().tolist()[0] == 0.0
    assert c_skip.flatten()[1] < 1e-6 and abs(float(c_out.flatten()[1]) - 1.0) < 1e-6


def test_distill_run_and_checkpoint_layout(lcm_run: Path, trained_run: Path):
    ls = losses(str(lcm_run))
    assert len(ls) == 6 and all(np.isfinite(ls)) and max(ls) > 0
    assert np.mean(ls[-2:]) < np.mean(ls[:2]), ls
    ckpt = lcm_run / "lcm" / "checkpoints" / "step-6"
    state = json.loads((ckpt / "state.json").read_text())
    assert state["objective"] == "lcm" and state["step"] == 6 and state["lora_base"] is None
    assert state["lcm_teacher"].startswith(str(trained_run / "align"))
    stage = state["config"]["stages"][0]
    assert stage["lcm"]["w_min"] == 3.0 and stage["lcm"]["target_ema"] == 0.95
    for name in ("model.safetensors", "ema.safetensors", GUIDANCE_FILE, "optimizer.pt"):
        assert (ckpt / name).is_file(), name
    assert (lcm_run / "stages.toml").is_file() and (
        lcm_run / "lcm" / "samples" / "step-6.png"
    ).is_file()
    # The saved model is a plain PixArt transformer; the guidance embedding moved its bias.
    student = load_transformer(str(lcm_run))
    teacher = load_transformer(str(trained_run / "align"))
    key = "adaln_single.emb.timestep_embedder.linear_2.bias"
    assert not torch.equal(student.state_dict()[key], teacher.state_dict()[key])


def test_the_written_config_trains_again(lcm_run: Path, tmp_path: Path):
    """OUT/stages.toml is a config `alphaset train --config` reads back unchanged."""
    from training.config import load_config

    cfg = load_config(str(lcm_run / "stages.toml"))
    assert json.loads(cfg.to_json()) == json.loads((lcm_run / "config.json").read_text())


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


def test_lcm_resume_is_exact_with_bf16(train_store, trained_run, tmp_path, kit):
    def make(out):
        return lcm_config(
            str(trained_run / "align"), train_store, kit.TAG, out, steps=3, batch_size=2,
            lr=1e-3, num_workers=0, log_every=1, bf16=True,
        )  # fmt: skip

    kit.assert_exact_resume(make, tmp_path, stop=2)


@pytest.mark.parametrize("steps", [2, 4])
def test_student_samples_with_lcm(lcm_run: Path, steps: int, tmp_path: Path):
    code = main([
        "sample", "--checkpoint", str(lcm_run), "--sampler", "lcm", "--steps", str(steps),
        "--prompt", "a photo of a cat", "--out", str(tmp_path), "--device", "cpu",
    ])  # fmt: skip
    assert code == 0
    record = json.loads((tmp_path / "samples.json").read_text())
    assert record["scheduler"]["class"] == "LCMScheduler" and record["steps"] == steps
    from PIL import Image

    img = Image.open(tmp_path / record["images"][0]["file"])
    assert img.size == (256, 256)


def test_lcm_lora_saves_adapters_samples_and_exports_merged(lcm_lora: Path, tmp_path: Path):
    assert not (lcm_lora / "model.safetensors").exists()
    with safe_open(str(lcm_lora / LORA_FILE), "pt") as f:
        assert all(".lora_" in k for k in f.keys())
    state = json.loads((lcm_lora / "state.json").read_text())
    assert state["lora_base"] and state["config"]["stages"][0]["lora"]["rank"] == 4
    # the base with the adapters merged into plain weights = the base + live adapters.
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


def test_distill_errors(
    tmp_path: Path, train_store: str, trained_run: Path, kit, capsys, monkeypatch
):
    teacher = str(trained_run / "align")
    cases = [
        (["--teacher", str(tmp_path / "nope"), "--features", kit.TAG], "--teacher"),
        (["--teacher", teacher, "--features", "nosuchtag"], "no features/nosuchtag"),
        (["--teacher", teacher, "--features", kit.TAG, "--steps", "0"], "steps must be a positive"),
        (
            ["--teacher", teacher, "--features", kit.TAG, "--lora", "0"],
            "rank must be an integer >= 1",
        ),
        (["--teacher", teacher, "--features", kit.TAG, "--seed", "-1"], "seed must be an integer"),
        (["--teacher", teacher, "--features", kit.TAG, "--device", "tpu9"], "--device"),
        (["--teacher", teacher, "--features", kit.TAG, "--out", "s3://bucket/runs/x"], "POSIX"),
    ]
    monkeypatch.chdir(tmp_path)
    for extra, msg in cases:
        out = tmp_path / "o"
        args = ["distill", "lcm", "--store", train_store, "--out", str(out), "--quiet", *extra]
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and msg in err, err
        assert not out.exists(), extra  # nothing written before the check
    assert not (tmp_path / "s3:").exists()
