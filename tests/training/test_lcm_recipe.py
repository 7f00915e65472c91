"""`distill lcm` defaults to PixArt-δ's recipe: fixed teacher guidance (w = 4.5 in PixArt's form =
5.5 in diffusers'), no w-embedding, grad clip 0.01; --guidance-embedding keeps the LCM paper's."""

from __future__ import annotations

from pathlib import Path

import torch

from training.checkpoint import GUIDANCE_FILE
from training.distill import GuidedStudent, LcmObjective
from training.recipes import lcm_config, run_recipe

pytest_plugins = ["conftest_train"]


def test_default_is_pixart_delta_and_the_paper_variant_is_a_flag(
    train_store, trained_run, tmp_path, kit
):
    teacher = str(trained_run / "align")
    cfg = lcm_config(
        teacher, train_store, kit.TAG, str(tmp_path / "a"), steps=2, lr=1e-3, num_workers=0
    )
    stage = cfg.stages[0]
    assert stage.grad_clip == 0.01 and stage.weight_decay == 0.0
    assert stage.lcm["guidance_embedding"] is False and stage.lcm["teacher_guidance"] == 4.5
    obj = LcmObjective(cfg, stage, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(obj.guidance_scales(3, gen), torch.full((3,), 5.5))  # 1 + 4.5
    from training.checkpoint import load_transformer

    assert not isinstance(obj.build(load_transformer(teacher)), GuidedStudent)
    final = Path(run_recipe(cfg, progress=False, device="cpu"))
    assert (final / "model.safetensors").is_file() and not (final / GUIDANCE_FILE).exists()

    paper = lcm_config(teacher, train_store, kit.TAG, str(tmp_path / "b"), steps=1,
                       num_workers=0, guidance_embedding=True)  # fmt: skip
    obj = LcmObjective(paper, paper.stages[0], torch.device("cpu"))
    w = obj.guidance_scales(256, gen)
    assert 3.0 <= w.min() and w.max() <= 15.0 and w.std() > 1
    assert isinstance(obj.build(load_transformer(teacher)), GuidedStudent)


def test_cli_flags(train_store, trained_run, tmp_path, kit, capsys):
    from pipeline.cli import main

    out = tmp_path / "cli"
    args = ["distill", "lcm", "--teacher", str(trained_run / "align"), "--store", train_store,
            "--features", kit.TAG, "--steps", "1", "--out", str(out), "--teacher-guidance", "3.0"]  # fmt: skip
    assert main(args) == 0, capsys.readouterr().err
    toml = (out / "stages.toml").read_text()
    assert "teacher_guidance = 3.0" in toml and "guidance_embedding = false" in toml
    assert "grad_clip = 0.01" in toml
