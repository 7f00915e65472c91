"""Model presets shared by every stage: a short name → hub id and settings, or a `tiny` model built
from a config with random weights, saved once to a cache folder and then loaded through the same
``from_pretrained`` path as a real model.

Each stage package owns its own registry (``captioning.models.PRESETS`` …) of `Preset` objects;
this module resolves a ``--model PRESET|DIR`` value against such a registry.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ModelNotFoundError(Exception):
    """A model that cannot be loaded offline; the message names the preset, hub id and --model DIR."""


@dataclass(frozen=True)
class Preset:
    name: str
    hub_id: str | None = None  # e.g. llava-hf/llava-1.5-7b-hf (or open_clip "ViT-L-14:openai")
    build_tiny: Callable[[str], None] | None = None  # writes a tiny model into the given folder
    settings: dict[str, Any] = field(default_factory=dict)


def cache_dir() -> Path:
    """Where tiny models are built: $ALPHASET_CACHE, else ~/.cache/alphaset."""
    return Path(os.environ.get("ALPHASET_CACHE", Path.home() / ".cache" / "alphaset"))


def tiny_model_dir(kind: str, preset: Preset) -> str:
    """Build the tiny model once (atomically: temp folder + rename) and return its folder."""
    assert preset.build_tiny is not None
    final = cache_dir() / "tiny" / kind / preset.name
    if (final / ".complete").exists():
        return str(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{preset.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        preset.build_tiny(str(tmp))
        (tmp / ".complete").write_text("ok\n")
        try:
            os.rename(tmp, final)
        except OSError:  # another process won the race; its copy is identical in kind
            if not (final / ".complete").exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return str(final)


def resolve(
    value: str, presets: dict[str, Preset], kind: str, flag: str = "--model"
) -> tuple[str, Preset | None]:
    """Map ``--model PRESET|DIR`` to something ``from_pretrained`` takes: a local folder or hub id.

    A local folder always wins. A preset with a tiny builder resolves to its cache folder; a real
    preset to its hub id (the hub cache, HF_HOME, serves it offline when it was downloaded).
    """
    if os.path.isdir(value):
        return value, None
    if value in presets:
        p = presets[value]
        if p.build_tiny is not None:
            return tiny_model_dir(kind, p), p
        return p.hub_id or value, p
    if os.path.sep in value or value.startswith("."):
        raise ModelNotFoundError(f"{flag} {value}: no such folder")
    names = ", ".join(sorted(presets))
    raise ModelNotFoundError(
        f"{flag} {value}: unknown {kind} preset (presets: {names}; or pass a local folder)"
    )


def not_found(
    kind: str, value: str, hub_id: str | None, flag: str, cause: BaseException
) -> ModelNotFoundError:
    """The one-line error for a model that could not be loaded."""
    where = f"hub id {hub_id}" if hub_id else "a local folder"
    return ModelNotFoundError(
        f"cannot load {kind} model {value!r} ({where}): {type(cause).__name__}; "
        f"download it (huggingface-cli download {hub_id or '…'}) and pass {flag} DIR, "
        f"or use {flag} tiny for a random-weight test model"
    )
