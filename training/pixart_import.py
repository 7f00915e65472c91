"""PixArt-α/δ ``.pth`` checkpoints → diffusers ``PixArtTransformer2DModel`` weights + config.

PixArt's own code (``diffusion/model/nets/PixArt.py``, ``PixArtMS.py``) names its modules
differently from diffusers; the tensors are the same except that the self-attention's fused
``qkv`` and the cross-attention's fused ``kv`` projections are split. What a ``.pth`` does not
say is recovered as follows:

- shape (layers, hidden size, patch, caption width, learned sigma) from the tensors;
- heads from the preset with that depth and width (PixArt-XL-2: 16 × 72);
- multi-scale from the presence of the size/aspect embedders (``csize_embedder``, ``ar_embedder``);
- resolution from the stored ``pos_embed`` buffer (patches per side × patch × 8), else given;
- ``pe_interpolation`` from PixArt-α's table for that resolution (`training.model.PE_INTERPOLATION`:
  1.0 at 256/512, 2.0 at 1024), unless given.

``y_embedding`` — PixArt's learned classifier-free "null caption" (token_num × caption width),
a buffer with no place in diffusers' model — is returned beside the weights, so training and
sampling can use it as the unconditional input (``null = "y_embedding"``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import torch

from pipeline.cli import UserError
from training.model import PRESETS, pe_interpolation

# PixArt name → diffusers name, for the tensors that only move (prefix rewrites, in order).
_RENAMES = (
    ("x_embedder.proj.", "pos_embed.proj."),
    ("t_embedder.mlp.0.", "adaln_single.emb.timestep_embedder.linear_1."),
    ("t_embedder.mlp.2.", "adaln_single.emb.timestep_embedder.linear_2."),
    ("csize_embedder.mlp.0.", "adaln_single.emb.resolution_embedder.linear_1."),
    ("csize_embedder.mlp.2.", "adaln_single.emb.resolution_embedder.linear_2."),
    ("ar_embedder.mlp.0.", "adaln_single.emb.aspect_ratio_embedder.linear_1."),
    ("ar_embedder.mlp.2.", "adaln_single.emb.aspect_ratio_embedder.linear_2."),
    ("t_block.1.", "adaln_single.linear."),
    ("y_embedder.y_proj.fc1.", "caption_projection.linear_1."),
    ("y_embedder.y_proj.fc2.", "caption_projection.linear_2."),
    ("final_layer.linear.", "proj_out."),
    ("final_layer.scale_shift_table", "scale_shift_table"),
)
_BLOCK_RENAMES = (
    ("scale_shift_table", "scale_shift_table"),
    ("attn.proj.", "attn1.to_out.0."),
    ("cross_attn.q_linear.", "attn2.to_q."),
    ("cross_attn.proj.", "attn2.to_out.0."),
    ("mlp.fc1.", "ff.net.0.proj."),
    ("mlp.fc2.", "ff.net.2."),
)
_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")
_DROPPED = ("pos_embed",)  # a fixed sin-cos buffer diffusers recomputes from the config
Y_EMBEDDING = "y_embedder.y_embedding"


class PixArtCheckpointError(UserError, ValueError):
    """A file that is not a PixArt-α/δ transformer checkpoint (the message says why)."""


@dataclass
class PixArtImport:
    """The converted checkpoint: diffusers state dict, full transformer config, extras."""

    state_dict: dict[str, torch.Tensor]
    config: dict[str, Any]
    resolution: int
    multi_scale: bool
    y_embedding: torch.Tensor | None  # (token_num, caption_channels)


def read_pth(path: str, weights: str = "state_dict") -> dict[str, torch.Tensor]:
    """The transformer tensors of a PixArt ``.pth``: released files hold ``{"state_dict": …}``,
    training checkpoints also ``"ema"``; a bare tensor dict is accepted too. Loaded with
    ``weights_only=True`` (no code runs from the file)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise PixArtCheckpointError(f"no such checkpoint file: {path}") from None
    except Exception as e:  # garbage makes torch.load raise almost anything (struct.error …)
        text = str(e).strip()  # torch's "invalid load key", "Weights only load failed. …"
        first = text.splitlines()[0].split(". ")[0] if text else type(e).__name__
        raise PixArtCheckpointError(f"{path}: not a loadable .pth ({first})") from None
    if not isinstance(obj, dict):
        raise PixArtCheckpointError(f"{path}: expected a dict of tensors, got {type(obj).__name__}")
    if weights not in ("state_dict", "ema"):
        raise PixArtCheckpointError(f"weights must be 'state_dict' or 'ema', got {weights!r}")
    if weights in obj and isinstance(obj[weights], dict):
        obj = obj[weights]
    elif weights == "ema":
        raise PixArtCheckpointError(
            f"{path}: has no 'ema' weights (keys: {', '.join(list(obj)[:5])})"
        )
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    prefix = "base_model." if is_controlnet(tensors) else ""  # PixArt-δ's ControlPixArtHalf
    if (
        f"{prefix}x_embedder.proj.weight" not in tensors
        or f"{prefix}final_layer.linear.weight" not in tensors
    ):
        raise PixArtCheckpointError(
            f"{path}: not a PixArt transformer checkpoint (no x_embedder/final_layer weights)"
        )
    return tensors


def is_controlnet(sd: dict[str, torch.Tensor]) -> bool:
    """A PixArt-δ ControlNet checkpoint: ``base_model.*`` + ``controlnet.i.*`` tensors."""
    return any(k.startswith("controlnet.") for k in sd)


def _heads(num_layers: int, hidden: int, num_heads: int | None) -> int:
    if num_heads is not None:
        if hidden % num_heads:
            raise PixArtCheckpointError(
                f"hidden size {hidden} is not divisible by {num_heads} heads"
            )
        return num_heads
    for preset in PRESETS.values():
        s = preset.settings
        if (s["num_layers"], s["num_attention_heads"] * s["attention_head_dim"]) == (
            num_layers,
            hidden,
        ):
            return s["num_attention_heads"]
    raise PixArtCheckpointError(
        f"no preset has {num_layers} layers of width {hidden}: give the number of heads"
    )


def convert_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """PixArt's tensor names → diffusers'; fused projections split; ``pos_embed`` and
    ``y_embedding`` left out. An unknown tensor is an error, not silently dropped."""
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in sd.items():
        if key in _DROPPED or key == Y_EMBEDDING:
            continue
        m = _BLOCK.match(key)
        if m:
            i, rest = m.groups()
            base = f"transformer_blocks.{i}."
            if rest.startswith("attn.qkv."):
                q, k, v = value.chunk(3, dim=0)  # (3·D, …): rows laid out [q | k | v]
                kind = rest.removeprefix("attn.qkv.")
                out.update(
                    {f"{base}attn1.to_{n}.{kind}": t for n, t in zip("qkv", (q, k, v), strict=True)}
                )
                continue
            if rest.startswith("cross_attn.kv_linear."):
                k, v = value.chunk(2, dim=0)  # (2·D, …): [k | v], as PixArt's kv.unbind(2)
                kind = rest.removeprefix("cross_attn.kv_linear.")
                out[f"{base}attn2.to_k.{kind}"], out[f"{base}attn2.to_v.{kind}"] = k, v
                continue
            for old, new in _BLOCK_RENAMES:
                if rest.startswith(old):
                    out[base + new + rest[len(old) :]] = value
                    break
            else:
                unknown.append(key)
            continue
        for old, new in _RENAMES:
            if key.startswith(old):
                out[new + key[len(old) :]] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise PixArtCheckpointError(
            f"unknown PixArt tensor(s) {', '.join(unknown[:3])}: not a PixArt-α/δ transformer"
        )
    return out


def import_pixart(
    sd: dict[str, torch.Tensor],
    resolution: int | None = None,
    pe_scale: float | str | None = None,
    num_heads: int | None = None,
) -> PixArtImport:
    """Convert PixArt-α/δ transformer tensors (see the module docstring for what is inferred)."""
    proj = sd["x_embedder.proj.weight"]  # (D, C_in, p, p)
    hidden, in_channels, patch = proj.shape[0], proj.shape[1], proj.shape[-1]
    layers = 1 + max((int(m.group(1)) for k in sd if (m := _BLOCK.match(k))), default=-1)
    if layers < 1:
        raise PixArtCheckpointError("no transformer blocks (blocks.N.*) in the checkpoint")
    out_channels = sd["final_layer.linear.weight"].shape[0] // (patch * patch)
    caption_channels = sd["y_embedder.y_proj.fc1.weight"].shape[1]
    multi_scale = "csize_embedder.mlp.0.weight" in sd
    if "pos_embed" in sd:
        side = math.isqrt(sd["pos_embed"].shape[1])  # (1, side², D)
        from_pos = side * patch * 8
        if resolution is not None and resolution != from_pos:
            raise PixArtCheckpointError(
                f"--resolution {resolution} but the checkpoint's positional embedding is for "
                f"{from_pos} px"
            )
        resolution = from_pos
    if resolution is None:
        raise PixArtCheckpointError(
            "the checkpoint holds no pos_embed: give its resolution (256|512|1024)"
        )
    heads = _heads(layers, hidden, num_heads)
    scale = pe_interpolation(resolution, pe_scale)
    config = {
        **PRESETS["pixart-xl-2"].settings,
        "num_layers": layers,
        "num_attention_heads": heads,
        "attention_head_dim": hidden // heads,
        "patch_size": patch,
        "caption_channels": caption_channels,
        "in_channels": in_channels,
        "out_channels": out_channels,
        "cross_attention_dim": hidden,
        "sample_size": resolution // 8,
        "interpolation_scale": scale,
        "use_additional_conditions": multi_scale,
    }
    y = sd.get(Y_EMBEDDING)
    return PixArtImport(
        state_dict=convert_state_dict(sd),
        config=config,
        resolution=resolution,
        multi_scale=multi_scale,
        y_embedding=None if y is None else y.detach().clone(),
    )


# ---- PixArt-δ's ControlNet -------------------------------------------------------------------
# PixArt-δ's ControlPixArtHalf names → ControlNetTransformer's (the copies' block tensors are
# renamed like the base's: training.pixart_import).
_CONTROL_KEY = re.compile(r"^controlnet\.(\d+)\.(copied_block|before_proj|after_proj)\.(.+)$")


def pixart_controlnet_state_dict(sd: dict[str, torch.Tensor]) -> tuple[
    dict[str, torch.Tensor], dict[str, torch.Tensor], int
]:  # fmt: skip
    """PixArt-δ's released ControlNet ``.pth`` tensors (``base_model.*`` + ``controlnet.i.*``)
    → (the base transformer's diffusers state dict, the ControlNet's copies/projections state
    dict for `ControlNetTransformer`, the number of copies)."""
    base = {k.removeprefix("base_model."): v for k, v in sd.items() if k.startswith("base_model.")}
    copies: dict[int, dict[str, torch.Tensor]] = {}
    control: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key.startswith("base_model."):
            continue
        m = _CONTROL_KEY.match(key)
        if m is None:
            raise PixArtCheckpointError(f"unknown PixArt-δ ControlNet tensor {key}")
        i, part, rest = int(m.group(1)), m.group(2), m.group(3)
        if part == "copied_block":
            copies.setdefault(i, {})[f"blocks.{i}.{rest}"] = value
        elif part == "before_proj":
            if i != 0:
                raise PixArtCheckpointError(f"before_proj on copy {i}: only copy 0 has one")
            control[f"before_proj.{rest}"] = value
        else:
            control[f"after_proj.{i}.{rest}"] = value
    n = len(copies)
    if sorted(copies) != list(range(n)) or n == 0:
        raise PixArtCheckpointError(f"ControlNet copies {sorted(copies)} are not 0..N-1")
    for i, tensors in copies.items():
        for k, v in convert_state_dict(tensors).items():
            control[k.replace(f"transformer_blocks.{i}.", f"copies.{i}.", 1)] = v
    return convert_state_dict(base) if base else {}, control, n


# ---- the imported checkpoint folder ---------------------------------------------------------
Y_EMBEDDING_FILE = "y_embedding.safetensors"
IMPORT_INFO = "alphaset_import.json"


def write_import(
    pth: str,
    out: str,
    *,
    weights: str = "state_dict",
    resolution: int | None = None,
    pe_scale: float | str | None = None,
    num_heads: int | None = None,
) -> PixArtImport:
    """``alphaset import pixart``: a diffusers transformer folder (``config.json`` +
    ``diffusion_pytorch_model.safetensors``, what ``init_from``, ``export`` and diffusers load)
    plus ``y_embedding.safetensors`` and ``alphaset_import.json`` (source, inferred settings).
    A PixArt-δ ControlNet checkpoint also gives ``controlnet.safetensors`` (alphaset's ControlNet
    file, for ``sample --controlnet``) beside its base. Written to a temporary folder and renamed,
    so ``out`` appears only complete."""
    import json
    import os
    import shutil

    from diffusers import PixArtTransformer2DModel
    from safetensors.torch import save_file

    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise PixArtCheckpointError(f"--out {out} exists and is not empty; choose a new folder")
    sd = read_pth(pth, weights)
    control = None
    if is_controlnet(sd):
        _, control, blocks = pixart_controlnet_state_dict(sd)
        sd = {k[len("base_model.") :]: v for k, v in sd.items() if k.startswith("base_model.")}
    got = import_pixart(sd, resolution, pe_scale, num_heads)
    model = PixArtTransformer2DModel(**got.config)
    model.load_state_dict(got.state_dict, strict=True)
    tmp = f"{out.rstrip('/')}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if got.y_embedding is not None:
            save_file({"y_embedding": got.y_embedding.contiguous()}, f"{tmp}/{Y_EMBEDDING_FILE}")
        if control is not None:
            from training.checkpoint import CONTROLNET_FILE

            meta = {"format": "pt", "alphaset": json.dumps({"blocks": blocks, "source": pth})}
            tensors = {k: v.contiguous() for k, v in control.items()}
            save_file(tensors, f"{tmp}/{CONTROLNET_FILE}", metadata=meta)
        info = {
            "source": os.path.abspath(pth),
            "weights": weights,
            "resolution": got.resolution,
            "multi_scale": got.multi_scale,
            "pe_interpolation": got.config["interpolation_scale"],
            "y_embedding": got.y_embedding is not None,
            "controlnet_blocks": blocks if control is not None else None,
        }
        with open(f"{tmp}/{IMPORT_INFO}", "w") as f:
            json.dump(info, f, indent=1)
        if os.path.isdir(out):
            os.rmdir(out)  # empty (checked above)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return got


def load_y_embedding(source: str) -> torch.Tensor | None:
    """PixArt's learned null caption from a ``.pth`` or a folder written by `write_import`
    (None when the source has none)."""
    import os

    if source.endswith(".pth") and os.path.isfile(source):
        y = read_pth(source).get(Y_EMBEDDING)
        return None if y is None else y.float()
    path = os.path.join(source, Y_EMBEDDING_FILE)
    if os.path.isfile(path):
        from safetensors.torch import load_file

        return load_file(path)["y_embedding"].float()
    return None
