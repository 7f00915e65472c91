"""DreamBooth: instance images encoded by the base's VAE, the diffusion loss falls in a few steps,
prior-preservation class images come from the base model, full and LoRA outputs are checkpoints
that `alphaset sample` loads, and bad input is a one-line error."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.cli import main
from training.dreambooth import DreamBoothConfig, finetune_dreambooth
from training.lora import LORA_FILE
from training.sample import sample

pytest_plugins = ["conftest_train"]

PHOTOS = Path(__file__).parents[1] / "data" / "photos"
PROMPT = "a photo of sks dog"


@pytest.fixture(scope="module")
def instance_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("instance")
    for name in ("sam_dog.jpg", "sam_dogs.jpg", "rembg_animal-2.out.png"):
        shutil.copy(PHOTOS / name, d / name)
    return d


@pytest.fixture(scope="module")
def full_run(trained_run: Path, instance_dir: Path, tmp_path_factory) -> tuple[Path, list[float]]:
    out = tmp_path_factory.mktemp("db") / "sks"
    cfg = DreamBoothConfig(
        steps=6, batch_size=2, lr=2e-3, class_prompt="a photo of a dog", prior_images=2,
        prior_steps=2, prior_weight=0.5,
    )  # fmt: skip
    path, losses = finetune_dreambooth(
        str(trained_run / "align"), str(instance_dir), PROMPT, str(out), config=cfg
    )
    return Path(path), losses


def test_full_dreambooth_loss_falls_with_prior(full_run, trained_run: Path):
    path, losses = full_run
    assert len(losses) == 6 and all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < np.mean(losses[:3]), losses
    state = json.loads((path / "state.json").read_text())
    info = state["dreambooth"]
    assert info["instance_images"] == 3 and info["prior_images"] == 2
    assert info["base"].startswith(str(trained_run / "align"))
    assert (path / "model.safetensors").is_file() and (path / "ema.safetensors").is_file()


def test_finetuned_model_samples(full_run, trained_run: Path):
    path, _ = full_run
    from training.export import load_transformer

    tuned = load_transformer(str(path)).state_dict()
    base = load_transformer(str(trained_run / "align")).state_dict()
    assert any(not torch.equal(tuned[k], base[k]) for k in base)
    img = sample(str(path), [PROMPT], sampler="dpm", steps=2, device="cpu").images[0]
    assert img.size == (256, 256)


def test_lora_dreambooth_cli(trained_run: Path, instance_dir: Path, tmp_path: Path):
    out = tmp_path / "sks-lora"
    code = main([
        "finetune", "dreambooth", "--base", str(trained_run / "align"), "--instance-dir",
        str(instance_dir), "--instance-prompt", PROMPT, "--lora", "4", "--steps", "2",
        "--lr", "1e-3", "--out", str(out), "--quiet",
    ])  # fmt: skip
    assert code == 0
    assert (out / LORA_FILE).is_file() and not (out / "model.safetensors").exists()
    assert json.loads((out / "state.json").read_text())["lora_base"]
    img = sample(str(out), [PROMPT], sampler="dpm", steps=2, device="cpu").images[0]
    assert img.size == (256, 256)


def test_dreambooth_errors(trained_run: Path, instance_dir: Path, tmp_path: Path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    base = str(trained_run / "align")
    cases = [
        (["--instance-dir", str(tmp_path / "missing"), "--instance-prompt", PROMPT], "no such folder"),
        (["--instance-dir", str(empty), "--instance-prompt", PROMPT], "no images"),
        (["--instance-dir", str(instance_dir), "--instance-prompt", "  "], "prompt is empty"),
        (["--instance-dir", str(instance_dir), "--instance-prompt", PROMPT, "--prior-images", "2"],
         "--class-prompt and --prior-images"),
    ]  # fmt: skip
    for extra, msg in cases:
        args = ["finetune", "dreambooth", "--base", base, "--out", str(tmp_path / "o"), *extra]
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and msg in err, err
