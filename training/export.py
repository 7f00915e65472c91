"""Checkpoint → diffusers: a ``PixArtAlphaPipeline`` folder with the trained transformer.

The folder holds the transformer (EMA weights by default), the DPM-Solver++ scheduler PixArt
ships, and the VAE, T5 encoder and tokenizer the checkpoint's features were made with (recorded
in the checkpoint), so ``PixArtAlphaPipeline.from_pretrained(OUT)`` generates with no other input.

diffusers' pipeline passes the resolution/aspect micro-conditions only to transformers whose
``sample_size`` is 128 (PixArt's 1024-MS model). A multi-scale model trained at another
resolution is therefore written with ``sample_size = 128`` and its ``interpolation_scale`` scaled
by ``128 / sample_size``, which leaves its sin-cos positional embedding unchanged; the pipeline's
default size then is 1024 px, so pass ``height``/``width`` for such a model.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from typing import Any

import torch

from pipeline.cli import UserError
from training import checkpoint as ck
from training.checkpoint import EXPORT_INFO, load_transformer, pipeline_transformer_config

__all__ = ["EXPORT_INFO", "build_pipeline", "export_diffusers", "pipeline_transformer_config"]


def build_pipeline(
    checkpoint: str,
    weights: str = "ema",
    t5: str | None = None,
    vae: str | None = None,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Any:
    """A ``PixArtAlphaPipeline`` in memory from a training checkpoint (T5/VAE: the features')."""
    from diffusers import PixArtAlphaPipeline

    from training.diffusion import inference_scheduler
    from training.feature_models import load_t5, load_vae

    ckpt = ck.resolve(checkpoint)
    if ckpt.kind != "step":
        raise UserError(
            f"--checkpoint {checkpoint}: a diffusers folder; load it with from_pretrained"
        )
    settings = ck.base_settings(ckpt.path, "--checkpoint")[1]
    transformer = load_transformer(ckpt, weights).to(device)
    if dtype != torch.float32:
        transformer = transformer.to(dtype)
    text_encoder, tokenizer = load_t5(t5 or str(settings["t5"]), dtype, device)
    return PixArtAlphaPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=load_vae(vae or str(settings["vae"]), dtype, device),
        transformer=transformer,
        scheduler=inference_scheduler(),
    )


def check_new_output(out: str, flag: str = "") -> None:
    """``out`` must not exist yet, or be empty: outputs are never written over."""
    if os.path.exists(out) and os.listdir(out):
        raise UserError(f"{flag}{out} exists and is not empty; choose a new output folder")


def export_diffusers(
    checkpoint: str, out: str, weights: str = "ema", t5: str | None = None, vae: str | None = None
) -> str:
    """Write a diffusers PixArtAlphaPipeline folder at ``out`` (atomically); return ``out``."""
    check_new_output(out)
    ckpt = ck.resolve_step(checkpoint)
    pipe = build_pipeline(ckpt, weights, t5=t5, vae=vae)
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(
        parent, f".{os.path.basename(os.path.abspath(out))}.tmp-{uuid.uuid4().hex[:8]}"
    )
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        state = ck.read_state(ckpt)
        info = {
            "checkpoint": os.path.abspath(ckpt),
            "stage": state["stage"],
            "step": state["step"],
            "weights": weights,
            "features": state["features"],
        }
        with open(os.path.join(tmp, EXPORT_INFO), "w") as f:
            json.dump(info, f, indent=1, sort_keys=True)
        if os.path.isdir(out):
            os.rmdir(out)  # empty (checked above)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return out
