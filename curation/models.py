"""CLIP models for curation: the preset registry, offline loading of open_clip models, and the
CLIP input recipe (resize + crop to uint8 on the CPU, normalisation on the device).

``--clip`` accepts:

- a preset: ``clip-vit-l-14`` (open_clip ``ViT-L-14`` with the ``openai`` weights, from the
  open_clip/HF cache) or ``tiny`` (a random-weight CLIP built once into the alphaset cache);
- ``NAME:PRETRAINED``: an open_clip architecture and a pretrained tag or a local weights file,
  e.g. ``ViT-L-14:openai`` or ``ViT-L-14:/models/ViT-L-14.pt``;
- ``hf-hub:ORG/REPO``, served from the HF cache when offline;
- a local folder in the HF-hub layout open_clip reads with ``local-dir:``:
  ``open_clip_config.json`` (``model_cfg`` + ``preprocess_cfg``) and ``open_clip_model.safetensors``
  (or ``open_clip_pytorch_model.bin``). The tiny preset is such a folder, loaded through this path.

A folder may also hold ``aesthetic.pth`` (a LAION-format aesthetic head sized for that CLIP): it is
the default ``--aesthetic`` for that CLIP (see `curation.score.default_aesthetic`).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Any

import torch

from curation.aesthetic import save_random_head
from curation.decode import ClipInput
from pipeline.errors import UserError
from pipeline.models import ModelNotFoundError, Preset, resolve

CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"
FOLDER_HEAD = "aesthetic.pth"

# A CLIP small enough to build and run in a second on a CPU: 64 px input, 2+2 layers, 32-d embedding.
TINY_CONFIG: dict[str, Any] = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def build_tiny_clip(folder: str) -> None:
    """Write a random-weight CLIP (+ a matching random aesthetic head) as an open_clip folder."""
    import open_clip
    from safetensors.torch import save_file

    preprocess = {
        "size": 64,
        "mean": list(open_clip.OPENAI_DATASET_MEAN),
        "std": list(open_clip.OPENAI_DATASET_STD),
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    }
    with open(os.path.join(folder, CONFIG_FILE), "w") as f:
        json.dump({"model_cfg": TINY_CONFIG, "preprocess_cfg": preprocess}, f, indent=1)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = open_clip.CLIP(**TINY_CONFIG)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(folder, WEIGHTS_FILE))
    save_random_head(os.path.join(folder, FOLDER_HEAD), TINY_CONFIG["embed_dim"])


PRESETS: dict[str, Preset] = {
    "clip-vit-l-14": Preset("clip-vit-l-14", hub_id="ViT-L-14:openai"),
    "tiny": Preset("tiny", build_tiny=build_tiny_clip),
}


@dataclass(frozen=True)
class ClipSource:
    """Where a ``--clip`` value points: an open_clip model name (maybe ``local-dir:``) + pretrained."""

    value: str  # what the user passed
    model_name: str  # open_clip name: 'ViT-L-14', 'hf-hub:…', 'local-dir:/path'
    pretrained: str | None  # tag or weights file; None with a schema
    folder: str | None  # local folder, when there is one

    def describe(self) -> str:
        return self.model_name + (f" pretrained={self.pretrained}" if self.pretrained else "")


def resolve_clip(value: str) -> ClipSource:
    """Map ``--clip PRESET|NAME:PRETRAINED|hf-hub:ID|DIR`` to an open_clip source (builds `tiny`)."""
    if os.path.isdir(value) or value in PRESETS:
        target, _preset = resolve(value, PRESETS, "clip", flag="--clip")
        if os.path.isdir(target):
            if not os.path.isfile(os.path.join(target, CONFIG_FILE)):
                raise ModelNotFoundError(
                    f"--clip {value}: no {CONFIG_FILE} in the folder (expected an open_clip folder: "
                    f"{CONFIG_FILE} + {WEIGHTS_FILE} or open_clip_pytorch_model.bin)"
                )
            return ClipSource(
                value, "local-dir:" + os.path.abspath(target), None, os.path.abspath(target)
            )
        value_name, _, pretrained = target.partition(":")
        return ClipSource(value, value_name, pretrained or None, None)
    if value.startswith("hf-hub:"):
        return ClipSource(value, value, None, None)
    if ":" in value:
        name, _, pretrained = value.partition(":")
        if not name or not pretrained:
            raise UserError(f"--clip {value}: expected NAME:PRETRAINED, e.g. ViT-L-14:openai")
        return ClipSource(value, name, pretrained, None)
    resolve(value, PRESETS, "clip", flag="--clip")  # raises the one-line 'unknown preset' error
    raise AssertionError("unreachable")


def default_tag(value: str) -> str:
    """The output tag for a ``--clip`` value: the preset name, else a slug of the name/folder."""
    if value in PRESETS:
        return value
    if os.path.isdir(value):
        base = os.path.basename(os.path.abspath(value))
    else:
        name, _, pretrained = value.removeprefix("hf-hub:").partition(":")
        pre = os.path.splitext(os.path.basename(pretrained))[0]
        base = f"{name.replace('/', '-')}-{pre}" if pre else name.replace("/", "-")
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", base).strip("-.") or "clip"


@dataclass
class LoadedClip:
    model: torch.nn.Module
    tokenizer: Any
    input: ClipInput
    embed_dim: int
    device: torch.device
    dtype: torch.dtype
    source: ClipSource


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available on this machine")
    return torch.device(device)


def load_clip(value: str, device: str = "auto") -> LoadedClip:
    """Load a ``--clip`` value in eval mode: fp16 on a GPU, fp32 on the CPU."""
    import open_clip

    src = resolve_clip(value)
    dev = pick_device(device)
    precision = "fp16" if dev.type == "cuda" else "fp32"
    try:
        model = open_clip.create_model(
            src.model_name,
            pretrained=src.pretrained,
            precision=precision,
            device=dev,
            require_pretrained=True,
        )
        tokenizer = open_clip.get_tokenizer(src.model_name)
    except Exception as e:  # open_clip raises RuntimeError/FileNotFoundError/ValueError/HF errors
        raise ModelNotFoundError(
            f"cannot load CLIP --clip {value} ({src.describe()}): {type(e).__name__}: {_first_line(e)}; "
            "run once online to fill the open_clip cache, or pass --clip NAME:/path/to/weights or an "
            "open_clip folder (open_clip_config.json + weights), or --clip tiny for a random test model"
        ) from e
    model.eval()
    with torch.inference_mode():  # the width of the joint space, whatever the text tower
        embed_dim = int(model.encode_text(tokenizer(["x"]).to(dev)).shape[-1])
    return LoadedClip(
        model=model,
        tokenizer=tokenizer,
        input=clip_input(model),
        embed_dim=embed_dim,
        device=dev,
        dtype=torch.float16 if precision == "fp16" else torch.float32,
        source=src,
    )


def clip_input(model: torch.nn.Module) -> ClipInput:
    """The model's eval preprocessing (open_clip sets ``visual.preprocess_cfg``) as a `ClipInput`."""
    cfg = getattr(model.visual, "preprocess_cfg", {})
    size = cfg.get("size", model.visual.image_size)
    if isinstance(size, (tuple, list)):
        if size[0] != size[1]:
            raise UserError(f"non-square CLIP input {tuple(size)} is not supported")
        size = size[0]
    return ClipInput(
        size=int(size),
        mean=tuple(cfg.get("mean", (0.48145466, 0.4578275, 0.40821073))),
        std=tuple(cfg.get("std", (0.26862954, 0.26130258, 0.27577711))),
        interpolation=cfg.get("interpolation", "bicubic"),
        resize_mode=cfg.get("resize_mode", "shortest"),
    )


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else ""
