"""DreamBooth as an objective of the one loop: photos, prompts and prior images encoded once and
cached in the run folder (a resume reuses them), the loss falls with prior preservation, --resume
is exact, full and LoRA checkpoints sample, and bad input is a one-line error."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.cli import main
from training.checkpoint import LORA_FILE, load_transformer
from training.dreambooth import INPUTS_FILE, DreamBoothObjective
from training.recipes import dreambooth_config, losses, run_recipe
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


def _config(trained_run: Path, instance_dir: Path, out: str, **kw):
    args = {
        "class_prompt": "a photo of a dog", "prior_images": 2, "prior_steps": 2,
        "prior_weight": 0.5, "steps": 6, "batch_size": 2, "lr": 2e-3, "num_workers": 0,
        "log_every": 1,
    } | kw  # fmt: skip
    return dreambooth_config(str(trained_run / "align"), str(instance_dir), PROMPT, out, **args)


@pytest.fixture(scope="module")
def full_run(trained_run: Path, instance_dir: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("db") / "sks"
    run_recipe(_config(trained_run, instance_dir, str(out), sample_every=6), progress=False)
    return out


def test_full_dreambooth_loss_falls_with_prior(full_run: Path, trained_run: Path):
    ls = losses(str(full_run))
    assert len(ls) == 6 and all(np.isfinite(ls))
    assert np.mean(ls[-3:]) < np.mean(ls[:3]), ls
    ckpt = full_run / "dreambooth" / "checkpoints" / "step-6"
    state = json.loads((ckpt / "state.json").read_text())
    assert state["objective"] == "dreambooth" and state["step"] == 6
    db = state["config"]["stages"][0]["dreambooth"]
    assert db["prior_images"] == 2 and db["instance_prompt"] == PROMPT
    assert state["config"]["stages"][0]["init_from"].startswith(str(trained_run / "align"))
    assert (ckpt / "model.safetensors").is_file() and (ckpt / "ema.safetensors").is_file()
    assert state["config"]["stages"][0]["validation_prompts"] == [PROMPT]
    assert (full_run / "dreambooth" / "samples" / "step-6.png").is_file()  # the instance prompt
    from safetensors.torch import load_file

    inputs = load_file(full_run / "dreambooth" / INPUTS_FILE)
    assert inputs["instance"].shape == (3, 4, 32, 32) and inputs["prior"].shape == (2, 4, 32, 32)
    assert inputs["instance_t5"].shape == inputs["class_t5"].shape == inputs["null_t5"].shape


def test_finetuned_model_samples(full_run: Path, trained_run: Path):
    tuned = load_transformer(str(full_run)).state_dict()
    base = load_transformer(str(trained_run / "align")).state_dict()
    assert any(not torch.equal(tuned[k], base[k]) for k in base)
    img = sample(str(full_run), [PROMPT], sampler="dpm", steps=2, device="cpu").images[0]
    assert img.size == (256, 256)


def test_dreambooth_resume_is_exact_and_reuses_the_cached_inputs(
    trained_run, instance_dir, tmp_path, kit, monkeypatch
):
    made = []
    encode = DreamBoothObjective._encode_inputs

    def counted(self, *a, **k):
        made.append(1)
        return encode(self, *a, **k)

    monkeypatch.setattr(DreamBoothObjective, "_encode_inputs", counted)

    def make(out):
        return _config(trained_run, instance_dir, out, steps=3, bf16=True)

    kit.assert_exact_resume(make, tmp_path, stop=2)
    assert len(made) == 2  # once per run folder: the resumed run read its cache back


def test_lora_dreambooth_cli(trained_run: Path, instance_dir: Path, tmp_path: Path):
    out = tmp_path / "sks-lora"
    code = main([
        "finetune", "dreambooth", "--base", str(trained_run / "align"), "--instance-dir",
        str(instance_dir), "--instance-prompt", PROMPT, "--lora", "4", "--steps", "2",
        "--lr", "1e-3", "--out", str(out), "--device", "cpu", "--quiet",
    ])  # fmt: skip
    assert code == 0
    ckpt = out / "dreambooth" / "checkpoints" / "step-2"
    assert (ckpt / LORA_FILE).is_file() and not (ckpt / "model.safetensors").exists()
    assert json.loads((ckpt / "state.json").read_text())["lora_base"]
    img = sample(str(out), [PROMPT], sampler="dpm", steps=2, device="cpu").images[0]
    assert img.size == (256, 256)


def test_dreambooth_errors(trained_run: Path, instance_dir: Path, tmp_path: Path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    base = str(trained_run / "align")
    cases = [
        (["--instance-dir", str(tmp_path / "missing"), "--instance-prompt", PROMPT], "no such folder"),
        (["--instance-dir", str(empty), "--instance-prompt", PROMPT], "no images"),
        (["--instance-dir", str(instance_dir), "--instance-prompt", "  "], "instance_prompt"),
        (["--instance-dir", str(instance_dir), "--instance-prompt", PROMPT, "--prior-images", "2"],
         "class_prompt and prior_images"),
        (["--instance-dir", str(instance_dir), "--instance-prompt", PROMPT, "--base", str(tmp_path)],
         "not a training checkpoint"),
    ]  # fmt: skip
    for extra, msg in cases:
        args = ["finetune", "dreambooth", "--base", base, "--out", str(tmp_path / "o"), *extra]
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and msg in err, err
        assert not (tmp_path / "o").exists()
