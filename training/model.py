"""DiT presets and construction: diffusers' ``PixArtTransformer2DModel`` sized by a registry.

A preset fixes the transformer's shape (layers, heads × head dim, patch size, caption channels).
A stage fixes what depends on the data: ``sample_size`` (latent side at the stage's resolution),
``interpolation_scale`` (PixArt's positional-embedding scale, ``lewei_scale`` in PixArt-α's configs
and ``pe_interpolation`` in PixArt-Σ's: the sin-cos grid is ``arange(side) / scale``; see
`PE_INTERPOLATION`), micro-conditions (``use_additional_conditions``: the resolution and aspect
ratio embedders of PixArt's multi-scale model) and the caption width of the stored T5 features.
The positional embedding is a fixed sin-cos buffer, not a weight, so weights move between stages
of different resolutions unchanged.

Weights start as PixArt's ``initialize_weights`` does (xavier-uniform linears, N(0, 0.02) for the
timestep/caption MLPs, zero cross-attention output and zero final layer), which is what lets a DiT
trained from scratch start as an identity-free, zero-output denoiser.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pipeline.errors import UserError
from pipeline.models import Preset

# Constructor arguments of PixArtTransformer2DModel for PixArt-XL-2-1024-MS (diffusers config).
_PIXART_XL_2 = {
    "num_layers": 28,
    "num_attention_heads": 16,
    "attention_head_dim": 72,  # hidden 1152
    "patch_size": 2,
    "caption_channels": 4096,  # T5 v1.1 XXL d_model
    "in_channels": 4,
    "activation_fn": "gelu-approximate",
    "attention_bias": True,
    "norm_type": "ada_norm_single",
    "norm_elementwise_affine": False,
    "norm_eps": 1e-6,
    "num_embeds_ada_norm": 1000,
    "dropout": 0.0,
}

PRESETS: dict[str, Preset] = {
    "pixart-xl-2": Preset(
        "pixart-xl-2", hub_id="PixArt-alpha/PixArt-XL-2-1024-MS", settings=_PIXART_XL_2
    ),
    # CPU sizes. caption_channels None: taken from the features' T5 width (tiny T5: 64).
    # hidden sizes are multiples of 3 so multi-scale micro-conditions fit (2/3 size, 1/3 ratio).
    "tiny": Preset(
        "tiny",
        settings={
            **_PIXART_XL_2,
            "num_layers": 2,
            "num_attention_heads": 2,
            "attention_head_dim": 24,
            "caption_channels": None,
        },
    ),
    "small": Preset(
        "small",
        settings={
            **_PIXART_XL_2,
            "num_layers": 6,
            "num_attention_heads": 4,
            "attention_head_dim": 48,
            "caption_channels": None,
        },
    ),
}


# The positional-embedding scale by resolution. PixArt-α: configs/PixArt_xl2_internal.py sets
# lewei_scale = 1.0 (its 256 and 512 configs inherit it; at 256 px the grid is 0..15) and the 1024
# configs set 2.0. PixArt-Σ: configs/pixart_sigma_config/*: 0.5 at 256, 1.0 at 512, 2.0 at 1024.
PE_INTERPOLATION: dict[str, dict[int, float]] = {
    "alpha": {256: 1.0, 512: 1.0, 1024: 2.0},
    "sigma": {256: 0.5, 512: 1.0, 1024: 2.0},
}


def pe_interpolation(resolution: int, value: float | str | None = "alpha") -> float:
    """``value``: a number, or the name of a family in `PE_INTERPOLATION` (None: "alpha")."""
    if value is None:
        value = "alpha"
    if isinstance(value, str):
        if value not in PE_INTERPOLATION:
            raise UserError(
                f"pe_interpolation must be a number or one of {', '.join(PE_INTERPOLATION)}, "
                f"got {value!r}"
            )
        if resolution not in PE_INTERPOLATION[value]:
            raise UserError(f"no {value} pe_interpolation for resolution {resolution}")
        return PE_INTERPOLATION[value][resolution]
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise UserError(f"pe_interpolation must be a positive number, got {value!r}")
    return float(value)


def transformer_config(
    preset: str,
    *,
    resolution: int,
    caption_channels: int,
    latent_channels: int = 4,
    vae_downsample: int = 8,
    multi_scale: bool = False,
    learned_sigma: bool = True,
    pe_scale: float | str | None = "alpha",
) -> dict[str, Any]:
    """The full ``PixArtTransformer2DModel`` config of ``preset`` for one stage's data.
    ``pe_scale``: the positional-embedding scale, a number or "alpha"/"sigma" (`pe_interpolation`)."""
    if preset not in PRESETS:
        raise UserError(f"unknown model preset {preset!r} (presets: {', '.join(PRESETS)})")
    cfg = dict(PRESETS[preset].settings)
    want = cfg["caption_channels"]
    if want is not None and want != caption_channels:
        raise UserError(
            f"model preset {preset} takes {want}-wide T5 features but the features are "
            f"{caption_channels}-wide; extract features with the matching T5 or pick another preset"
        )
    inner = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    if multi_scale and inner % 3:
        raise UserError(
            f"model preset {preset}: multi-scale micro-conditions need a hidden size divisible by 3, got {inner}"
        )
    latent = resolution // vae_downsample
    if latent % cfg["patch_size"]:
        raise UserError(f"latent side {latent} is not a multiple of patch size {cfg['patch_size']}")
    cfg.update(
        caption_channels=caption_channels,
        in_channels=latent_channels,
        out_channels=latent_channels * 2 if learned_sigma else latent_channels,
        cross_attention_dim=inner,
        sample_size=latent,
        interpolation_scale=pe_interpolation(resolution, pe_scale),
        use_additional_conditions=multi_scale,
    )
    return cfg


def build_transformer(config: dict[str, Any], seed: int | None = 0) -> Any:
    """A freshly initialised transformer (PixArt's init) from a full config."""
    from diffusers import PixArtTransformer2DModel

    if seed is not None:
        torch.manual_seed(seed)
    model = PixArtTransformer2DModel(**config)
    initialize_weights(model)
    return model


def transformer_from_config(config: dict[str, Any]) -> Any:
    """An uninitialised-weights transformer of this config (weights are loaded next)."""
    from diffusers import PixArtTransformer2DModel

    keep = {k: v for k, v in config.items() if not k.startswith("_")}
    return PixArtTransformer2DModel(**keep)


def initialize_weights(model: nn.Module) -> None:
    """PixArt-α's ``initialize_weights`` mapped onto diffusers' module names."""

    def basic(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    model.apply(basic)
    w = model.pos_embed.proj.weight.data
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    emb = model.adaln_single.emb
    for mlp in [emb.timestep_embedder] + (
        [emb.resolution_embedder, emb.aspect_ratio_embedder]
        if emb.use_additional_conditions
        else []
    ):
        nn.init.normal_(mlp.linear_1.weight, std=0.02)
        nn.init.normal_(mlp.linear_2.weight, std=0.02)
    nn.init.normal_(model.adaln_single.linear.weight, std=0.02)
    if model.caption_projection is not None:
        nn.init.normal_(model.caption_projection.linear_1.weight, std=0.02)
        nn.init.normal_(model.caption_projection.linear_2.weight, std=0.02)
    for block in model.transformer_blocks:
        nn.init.zeros_(block.attn2.to_out[0].weight)
        nn.init.zeros_(block.attn2.to_out[0].bias)
    nn.init.zeros_(model.proj_out.weight)
    nn.init.zeros_(model.proj_out.bias)


# Parameters a multi-scale stage adds when it starts from a single-scale one (fresh init).
MICRO_CONDITION_PREFIXES = (
    "adaln_single.emb.resolution_embedder.",
    "adaln_single.emb.aspect_ratio_embedder.",
)


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> list[str]:
    """Load ``state`` into ``model``; only micro-condition embedders may be missing (returned).

    Anything else that does not match (missing, unexpected or differently shaped) is a
    ValueError naming the first offending tensors, never a silent partial load.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shape = [k for k in own if k in state and own[k].shape != state[k].shape]
    bad_missing = [k for k in missing if not k.startswith(MICRO_CONDITION_PREFIXES)]
    if bad_missing or unexpected or shape:
        parts = []
        if bad_missing:
            parts.append(f"missing {', '.join(bad_missing[:3])}")
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:3])}")
        if shape:
            k = shape[0]
            parts.append(f"shape of {k}: {tuple(state[k].shape)} vs model {tuple(own[k].shape)}")
        raise ValueError(f"weights in {source} do not fit the model ({'; '.join(parts)})")
    model.load_state_dict(state, strict=False)
    return missing


def micro_conditions(
    hw: torch.Tensor, dtype: torch.dtype, aspect: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """``added_cond_kwargs`` for a batch of (height, width) pixel sizes (N, 2) and aspect ratios
    (N, 1); ``aspect`` None: h / w of ``hw``."""
    hw = hw.to(dtype)
    if aspect is None:
        aspect = (hw[:, 0] / hw[:, 1]).unsqueeze(1)
    return {"resolution": hw, "aspect_ratio": aspect.to(dtype)}


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
