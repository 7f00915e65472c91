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

from training.train import (
    DONE_FILE,
    EMA_FILE,
    MODEL_FILE,
    STATE_FILE,
    latest_checkpoint,
    read_state,
)

WEIGHTS = ("ema", "model")
EXPORT_INFO = "alphaset_export.json"


def resolve_checkpoint(path: str) -> str:
    """A ``step-N`` folder as given; a stage folder → its final (else latest) checkpoint; a run
    folder → its last stage's."""
    if os.path.isfile(os.path.join(path, STATE_FILE)):
        return path
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--checkpoint {path}: no such folder")
    done = os.path.join(path, DONE_FILE)
    if os.path.isfile(done):
        with open(done) as f:
            return json.load(f)["final"]
    latest = latest_checkpoint(path)
    if latest is not None:
        return latest
    cfg_path = os.path.join(path, "config.json")
    if os.path.isfile(cfg_path):  # a run folder: the last stage that has a checkpoint
        with open(cfg_path) as f:
            stages = [s["name"] for s in json.load(f)["stages"]]
        for name in reversed(stages):
            sdir = os.path.join(path, name)
            if os.path.isdir(sdir) and (
                os.path.isfile(os.path.join(sdir, DONE_FILE)) or latest_checkpoint(sdir)
            ):
                return resolve_checkpoint(sdir)
    raise FileNotFoundError(
        f"--checkpoint {path}: not a checkpoint (step-N with {STATE_FILE}), a stage folder or a run folder"
    )


def pipeline_transformer_config(tconfig: dict[str, Any]) -> dict[str, Any]:
    """The transformer config as diffusers' pipeline needs it (see the module docstring)."""
    cfg = dict(tconfig)
    if cfg.get("use_additional_conditions") and cfg["sample_size"] != 128:
        scale = cfg["interpolation_scale"] or max(cfg["sample_size"] // 64, 1)
        cfg["interpolation_scale"] = scale * 128 / cfg["sample_size"]
        cfg["sample_size"] = 128
    return cfg


def load_transformer(checkpoint: str, weights: str = "ema") -> Any:
    """The checkpoint's transformer with its EMA (or raw) weights, configured for the pipeline."""
    from diffusers import PixArtTransformer2DModel
    from safetensors.torch import load_file

    if weights not in WEIGHTS:
        raise ValueError(f"--weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
    ckpt = resolve_checkpoint(checkpoint)
    state = read_state(ckpt)
    if state.get("lora_base"):  # a LoRA stage: its base + the stage's adapters, merged
        return merge_lora_checkpoint(ckpt, state["lora_base"], weights)
    model = PixArtTransformer2DModel(**pipeline_transformer_config(state["transformer_config"]))
    model.load_state_dict(
        load_file(os.path.join(ckpt, EMA_FILE if weights == "ema" else MODEL_FILE))
    )
    return model.eval()


def merge_lora_checkpoint(ckpt: str, base: str, weights: str = "ema") -> Any:
    """The base's transformer with a LoRA checkpoint's adapters merged into its weights (a plain
    ``PixArtTransformer2DModel``: peft's ``merge`` per layer, then each layer replaced by its
    merged base layer)."""
    from peft.tuners.lora import LoraLayer

    from training.lora import LORA_FILE, LORA_MODEL_FILE, load_lora

    model = load_transformer(base, weights)
    load_lora(model, os.path.join(ckpt, LORA_FILE if weights == "ema" else LORA_MODEL_FILE))
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]
    for name, layer in layers:
        layer.merge()
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.get_base_layer())
    return model.requires_grad_(True).eval()


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

    ckpt = resolve_checkpoint(checkpoint)
    settings = read_state(ckpt)["features"]["settings"]
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


def open_base(path: str, flag: str, out: str) -> tuple[str, dict[str, Any]]:
    """The full-weights checkpoint a fine-tuning command builds on — ``path`` (a run, stage or
    step-N folder; ``flag`` names it in errors) → (step folder, training state) — after checking
    that the output folder ``out`` is new. A LoRA stage is refused: it holds adapters only."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{flag} {path}: no such folder")
    check_new_output(out, "--out ")
    ckpt = resolve_checkpoint(path)
    state = read_state(ckpt)
    if state.get("lora_base"):
        raise ValueError(f"{flag} {path}: a LoRA stage; export it first or use its base")
    return ckpt, state


def check_new_output(out: str, flag: str = "") -> None:
    """``out`` must not exist yet, or be empty: outputs are never written over."""
    if os.path.exists(out) and os.listdir(out):
        raise ValueError(f"{flag}{out} exists and is not empty; choose a new output folder")


def export_diffusers(
    checkpoint: str, out: str, weights: str = "ema", t5: str | None = None, vae: str | None = None
) -> str:
    """Write a diffusers PixArtAlphaPipeline folder at ``out`` (atomically); return ``out``."""
    check_new_output(out)
    ckpt = resolve_checkpoint(checkpoint)
    pipe = build_pipeline(ckpt, weights, t5=t5, vae=vae)
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(
        parent, f".{os.path.basename(os.path.abspath(out))}.tmp-{uuid.uuid4().hex[:8]}"
    )
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        state = read_state(ckpt)
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
