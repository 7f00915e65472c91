"""LoRA on the PixArt transformer: the stage option, injecting adapters, saving and loading them.

Adapters are ``peft`` LoRA layers on diffusers' ``PixArtTransformer2DModel`` module names: the
attention projections (``attn1``/``attn2`` ``to_q``, ``to_k``, ``to_v``, ``to_out.0``), the
feed-forward (``ff.net.0.proj``, ``ff.net.2``) and the adaLN-single linear (``adaln_single.linear``,
PixArt's t_block; add ``linear_1``/``linear_2`` to reach the timestep and caption MLPs).

Files hold only adapter weights, in diffusers' LoRA format: safetensors keys
``transformer.<module>.lora_A.weight`` / ``lora_B.weight`` and the ``LoraConfig`` as JSON in the
``lora_adapter_metadata`` header entry (what ``PeftAdapterMixin.load_lora_adapter`` reads).
diffusers 0.42.1's ``PixArtTransformer2DModel`` does not inherit ``PeftAdapterMixin`` (and
``PixArtAlphaPipeline`` has no ``load_lora_weights``), so ``load_lora`` loads them with peft
directly: ``inject_adapter_in_model(LoraConfig(**metadata), transformer)`` then
``set_peft_model_state_dict(transformer, state_without_prefix)``; the scale is peft's
``LoraLayer.set_scale`` (0 = base model).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from pipeline.cli import UserError

DEFAULT_TARGETS = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "ff.net.0.proj",
    "ff.net.2",
    "adaln_single.linear",
)
ADAPTER_NAME = "default"
PREFIX = "transformer."
METADATA_KEY = "lora_adapter_metadata"  # diffusers.utils.constants.LORA_ADAPTER_METADATA_KEY


@dataclass
class LoraOptions:
    """``lora = { rank = 16, alpha = 16, targets = [...] }`` of a stage."""

    rank: int = 16
    alpha: float = 16.0
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))

    def validate(self, where: str = "lora") -> LoraOptions:
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise UserError(f"{where}: rank must be an integer >= 1, got {self.rank!r}")
        if not isinstance(self.alpha, int | float) or not self.alpha > 0:
            raise UserError(f"{where}: alpha must be > 0, got {self.alpha!r}")
        if not self.targets or not all(isinstance(t, str) and t for t in self.targets):
            raise UserError(
                f"{where}: targets must be a non-empty list of module names, e.g. "
                f"{list(DEFAULT_TARGETS)}, got {self.targets!r}"
            )
        return self

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "lora") -> LoraOptions:
        if not isinstance(d, dict):
            raise UserError(f"{where} must be a table {{ rank, alpha, targets }}, got {d!r}")
        unknown = sorted(set(d) - {"rank", "alpha", "targets"})
        if unknown:
            raise UserError(
                f"{where}: unknown key(s) {', '.join(unknown)} (allowed: rank, alpha, targets)"
            )
        return cls(**d).validate(where)

    def peft_config(self) -> Any:
        from peft import LoraConfig

        return LoraConfig(
            r=self.rank,
            lora_alpha=float(self.alpha),
            target_modules=list(self.targets),
            init_lora_weights=True,  # B = 0: the adapted model starts equal to the base
        )


def add_lora(model: nn.Module, opts: LoraOptions) -> nn.Module:
    """Inject LoRA layers into ``model`` (in place); only the adapter weights stay trainable."""
    from peft import inject_adapter_in_model

    try:
        inject_adapter_in_model(opts.peft_config(), model, adapter_name=ADAPTER_NAME)
    except ValueError as e:
        raise UserError(f"lora targets {opts.targets} do not fit the transformer: {e}") from e
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter weights only, diffusers names (``transformer.<module>.lora_A.weight``)."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME)
    return {PREFIX + k: v.detach().cpu().contiguous() for k, v in state.items()}


def lora_header(opts: LoraOptions, **info: Any) -> dict[str, str]:
    """The safetensors header of an adapter file: the LoraConfig (what diffusers reads) and the
    alphaset provenance (base, stage, step). training.checkpoint writes the file."""
    meta = {
        "r": opts.rank,
        "lora_alpha": float(opts.alpha),
        "target_modules": list(opts.targets),
    }
    return {METADATA_KEY: json.dumps(meta), "alphaset": json.dumps(info)}


def save_lora(path: str, state: dict[str, torch.Tensor], opts: LoraOptions, **info: Any) -> str:
    """A standalone adapter file (atomically): the format ``sample --lora`` and diffusers read.
    (Training checkpoints write theirs through training.checkpoint.)"""
    from safetensors.torch import save_file

    tmp = f"{path}.tmp-{os.getpid()}"
    save_file(state, tmp, metadata={"format": "pt", **lora_header(opts, **info)})
    os.replace(tmp, path)
    return path


def read_lora(path: str) -> tuple[dict[str, torch.Tensor], LoraOptions, dict[str, Any]]:
    """(weights, options, alphaset info) of an adapter file."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise FileNotFoundError(f"--lora {path}: no such file")
    try:
        with safe_open(path, "pt") as f:
            header = f.metadata() or {}
        state = load_file(path)
    except Exception as e:  # safetensors raises its own SafetensorError for bad files
        raise UserError(f"--lora {path}: not a safetensors file ({type(e).__name__})") from e
    if METADATA_KEY not in header:
        raise UserError(f"--lora {path}: no {METADATA_KEY} in the header (not a LoRA file)")
    meta = json.loads(header[METADATA_KEY])
    opts = LoraOptions(
        rank=int(meta["r"]), alpha=float(meta["lora_alpha"]), targets=list(meta["target_modules"])
    ).validate(f"--lora {path}")
    info = json.loads(header.get("alphaset", "{}"))
    return state, opts, info


def set_lora_scale(model: nn.Module, scale: float) -> None:
    """Multiply every adapter's contribution by ``scale`` (1: as trained, 0: the base model)."""
    from peft.tuners.lora import LoraLayer

    for m in model.modules():
        if isinstance(m, LoraLayer) and ADAPTER_NAME in m.scaling:
            m.set_scale(ADAPTER_NAME, scale)


def load_lora_state(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Put adapter weights (diffusers names) into a model that already has the adapters."""
    from peft import set_peft_model_state_dict

    stripped = {k[len(PREFIX) :] if k.startswith(PREFIX) else k: v for k, v in state.items()}
    result = set_peft_model_state_dict(model, stripped, adapter_name=ADAPTER_NAME)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    if unexpected:
        raise UserError(f"{source}: adapter weights do not fit the model ({unexpected[0]} …)")


def load_lora(model: nn.Module, path: str, scale: float = 1.0) -> LoraOptions:
    """Inject and load the adapter at ``path`` into ``model`` (in place) at ``scale``."""
    state, opts, _ = read_lora(path)
    add_lora(model, opts)
    load_lora_state(model, state, path)
    set_lora_scale(model, scale)
    return opts


def parse_lora_arg(value: str) -> tuple[str, float]:
    """``PATH[:SCALE]`` → (path, scale); a path containing ':' works when it exists as given."""
    if os.path.exists(value) or ":" not in value:
        return value, 1.0
    path, _, scale = value.rpartition(":")
    try:
        s = float(scale)
    except ValueError:
        raise UserError(f"--lora {value}: expected PATH[:SCALE] with a number SCALE") from None
    return path, s


def options_dict(opts: LoraOptions) -> dict[str, Any]:
    return asdict(opts)
