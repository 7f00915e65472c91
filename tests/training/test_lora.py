"""LoRA: a stage trains only adapters, saves them in diffusers' LoRA format, and `sample --lora`
loads them back (scale 0 = the base model's output)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

from pipeline.cli import UserError, main
from training.checkpoint import LORA_FILE
from training.lora import METADATA_KEY, LoraOptions, parse_lora_arg
from training.recipes import train_lora
from training.sample import sample

pytest_plugins = ["conftest_train"]


@pytest.fixture(scope="module")
def lora_ckpt(train_store, trained_run, tmp_path_factory, kit) -> Path:
    out = tmp_path_factory.mktemp("lora-run")
    base = str(trained_run / "align")
    return Path(train_lora(train_store, base, kit.TAG, str(out), steps=3, lr=5e-3))


def _pixels(result) -> np.ndarray:
    return np.stack([np.asarray(i, dtype=np.int16) for i in result.images])


def test_lora_stage_saves_only_adapters_in_diffusers_format(lora_ckpt: Path, trained_run: Path):
    assert not (lora_ckpt / "model.safetensors").exists()
    state = json.loads((lora_ckpt / "state.json").read_text())
    assert state["lora_base"].startswith(str(trained_run / "align" / "checkpoints"))
    with safe_open(str(lora_ckpt / LORA_FILE), "pt") as f:
        keys = list(f.keys())
        meta = json.loads(f.metadata()[METADATA_KEY])
    assert keys and all(k.startswith("transformer.") and ".lora_" in k for k in keys)
    for target in (
        "attn1.to_q",
        "attn2.to_out.0",
        "ff.net.0.proj",
        "ff.net.2",
        "adaln_single.linear",
    ):
        assert any(f".{target}.lora_A.weight" in k for k in keys), target
    assert meta == {"r": 4, "lora_alpha": 4.0, "target_modules": list(LoraOptions().targets)}


def test_adapter_loads_back_and_changes_the_output(lora_ckpt: Path, trained_run: Path):
    base = str(trained_run / "align")
    kw = {"sampler": "dpm", "steps": 2, "seed": 3, "device": "cpu"}
    plain = _pixels(sample(base, ["a photo of a cat"], **kw))
    zero = _pixels(sample(base, ["a photo of a cat"], lora=f"{lora_ckpt / LORA_FILE}:0", **kw))
    full = _pixels(sample(base, ["a photo of a cat"], lora=str(lora_ckpt / LORA_FILE), **kw))
    stage = _pixels(sample(str(lora_ckpt), ["a photo of a cat"], **kw))  # the LoRA checkpoint
    assert np.array_equal(plain, zero)
    assert np.abs(full - plain).max() > 0
    assert np.array_equal(full, stage)


def test_lora_errors(tmp_path: Path, trained_run: Path, capsys):
    with pytest.raises(UserError, match="rank must be an integer >= 1"):
        LoraOptions.from_dict({"rank": 0})
    with pytest.raises(UserError, match="unknown key"):
        LoraOptions.from_dict({"rnk": 4})
    with pytest.raises(UserError, match="expected PATH"):
        parse_lora_arg("nothere.safetensors:big")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    for arg in (str(tmp_path / "missing.safetensors"), str(bad)):
        code = main(["sample", "--checkpoint", str(trained_run), "--prompt", "x", "--lora", arg])
        assert code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "--lora" in err
