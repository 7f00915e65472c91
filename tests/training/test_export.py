"""`alphaset export --to diffusers`: a folder PixArtAlphaPipeline loads and generates with."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pipeline.cli import UserError, main
from training.checkpoint import resolve_step as resolve_checkpoint
from training.export import export_diffusers, pipeline_transformer_config
from training.model import build_transformer, micro_conditions, transformer_config

pytest_plugins = ["conftest_train"]


def test_exported_pipeline_generates(trained_run, tmp_path, capsys):
    from diffusers import PixArtAlphaPipeline

    out = tmp_path / "pixart-tiny"
    assert main(["export", "--checkpoint", str(trained_run), "--to", "diffusers", str(out)]) == 0
    assert "exported ema weights" in capsys.readouterr().out
    assert {p.name for p in out.iterdir()} >= {
        "model_index.json",
        "transformer",
        "scheduler",
        "vae",
        "text_encoder",
        "tokenizer",
    }
    info = json.loads((out / "alphaset_export.json").read_text())
    assert info["stage"] == "align" and info["step"] == 4 and info["weights"] == "ema"

    pipe = PixArtAlphaPipeline.from_pretrained(str(out))
    # EMA weights by default, of the run's last stage
    ema = load_file(trained_run / "align" / "checkpoints" / "step-4" / "ema.safetensors")
    assert torch.equal(pipe.transformer.state_dict()["proj_out.weight"], ema["proj_out.weight"])
    image = pipe(
        "a photo of a cat",
        num_inference_steps=2,
        height=64,
        width=64,
        use_resolution_binning=False,
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    assert image.size == (64, 64)
    assert np.asarray(image).std() > 0

    # the exported folder also starts a new stage (init_from a diffusers pipeline folder)
    from training.checkpoint import load_state_dict

    assert torch.equal(load_state_dict(str(out))["proj_out.weight"], ema["proj_out.weight"])


def test_checkpoint_forms_and_errors(trained_run, tmp_path):
    final = str(trained_run / "align" / "checkpoints" / "step-4")
    assert resolve_checkpoint(str(trained_run)) == final
    assert resolve_checkpoint(str(trained_run / "pixel")) == str(
        trained_run / "pixel" / "checkpoints" / "step-4"
    )
    assert resolve_checkpoint(final) == final
    with pytest.raises(UserError, match=r"--checkpoint .*: no such folder"):
        resolve_checkpoint(str(tmp_path / "none"))
    with pytest.raises(UserError, match=r"not a checkpoint"):
        resolve_checkpoint(str(tmp_path))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    with pytest.raises(UserError, match=r"exists and is not empty"):
        export_diffusers(final, str(tmp_path / "busy"))


def test_multi_scale_export_keeps_the_positional_embedding():
    """sample_size 128 (so the pipeline passes micro-conditions), same outputs as trained."""
    from diffusers import PixArtTransformer2DModel

    cfg = transformer_config(
        "tiny", resolution=256, caption_channels=64, multi_scale=True, pe_scale="sigma"
    )
    trained = build_transformer(cfg).eval()
    for p in trained.parameters():  # non-zero everywhere, so the output depends on positions
        p.data.normal_(0, 0.05)
    exported_cfg = pipeline_transformer_config(cfg)
    assert exported_cfg["sample_size"] == 128 and exported_cfg["interpolation_scale"] == 2.0
    exported = PixArtTransformer2DModel(**exported_cfg).eval()
    exported.load_state_dict(trained.state_dict())
    x = torch.randn(1, 4, 22, 44)  # a 176 x 352 bucket
    kw = {
        "encoder_hidden_states": torch.randn(1, 120, 64),
        "encoder_attention_mask": torch.ones(1, 120),
        "timestep": torch.tensor([500]),
        "added_cond_kwargs": micro_conditions(torch.tensor([[176.0, 352.0]]), torch.float32),
    }
    with torch.no_grad():
        assert torch.allclose(trained(x, **kw).sample, exported(x, **kw).sample, atol=1e-5)
