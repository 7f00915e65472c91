"""The training checkpoint format, in one place: file names, the single writer and every reader.

A run folder (``[run] dir``/``name``)::

    config.json  run.json  stages.toml   resolved config, data sources, the config as TOML
    <stage>/checkpoints/step-N/          one checkpoint (appears only when complete)
    <stage>/done.json                    the stage is finished: {"final": step-N folder}
    <stage>/metrics.jsonl                one line per log step, exactly (truncated on resume)

A ``step-N`` folder always has ``state.json`` (step, resolved config, transformer config,
features, LR schedule, data positions, RNG states, objective, and what the weights build on)
and ``optimizer.pt``, plus the weights the stage's objective trains:

- full weights: ``model.safetensors`` (raw) and ``ema.safetensors`` (EMA; LCM: the target
  network), plain ``PixArtTransformer2DModel`` state dicts (LCM folds its guidance in and keeps
  ``guidance_embedding.safetensors`` beside them);
- LoRA (any objective): ``lora.safetensors`` (EMA) / ``lora_model.safetensors`` (raw) adapters in
  diffusers' format, ``state["lora_base"]`` = the frozen base they adapt;
- ControlNet: ``controlnet.safetensors`` (EMA) / ``controlnet_model.safetensors`` (raw), the block
  copies and zero linears only, ``state["controlnet_base"]`` = the frozen base.

Readers: ``latest`` (a stage's newest step), ``read_state``, ``resolve`` (a run / stage / step-N
folder, or a diffusers pipeline / transformer folder → ``Checkpoint``), ``load_state_dict`` (a
full transformer state dict from any of them, a LoRA step merged onto its base) and
``load_transformer`` (the same as a diffusers model configured for the pipeline). train, export,
sample and every objective read checkpoints only through these.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from typing import Any

import torch

from pipeline.cli import UserError

MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "state.json"
DONE_FILE = "done.json"
METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"
RUN_FILE = "run.json"
TOML_FILE = "stages.toml"
LORA_FILE = "lora.safetensors"  # EMA adapter weights of a LoRA checkpoint
LORA_MODEL_FILE = "lora_model.safetensors"  # raw (non-EMA) adapter weights
CONTROLNET_FILE = "controlnet.safetensors"  # EMA ControlNet weights (copies + zero linears)
CONTROLNET_MODEL_FILE = "controlnet_model.safetensors"
GUIDANCE_FILE = "guidance_embedding.safetensors"  # LCM's w-embedding (+ unfolded biases)
EXPORT_INFO = "alphaset_export.json"  # written into a diffusers export by training.export
WEIGHTS = ("ema", "model")

# A file's tensors and its safetensors header.
Files = dict[str, tuple[dict[str, torch.Tensor], dict[str, str]]]


# ---- layout -----------------------------------------------------------------------------------
def checkpoint_dir(sdir: str, step: int) -> str:
    return os.path.join(sdir, "checkpoints", f"step-{step}")


def latest(sdir: str) -> str | None:
    """The highest complete ``step-N`` of a stage folder (a checkpoint appears only when complete)."""
    folder = os.path.join(sdir, "checkpoints")
    if not os.path.isdir(folder):
        return None
    steps = [int(n[5:]) for n in os.listdir(folder) if n.startswith("step-") and n[5:].isdigit()]
    return checkpoint_dir(sdir, max(steps)) if steps else None


def read_state(ckpt: str) -> dict[str, Any]:
    path = os.path.join(ckpt, STATE_FILE)
    if not os.path.exists(path):
        raise UserError(f"{ckpt} is not a training checkpoint (no {STATE_FILE})")
    with open(path) as f:
        return json.load(f)


def read_done(sdir: str) -> dict[str, Any] | None:
    path = os.path.join(sdir, DONE_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


# ---- the writer -------------------------------------------------------------------------------
def write_checkpoint(
    final: str, files: Files, state: dict[str, Any], optimizer: dict[str, Any] | None
) -> str:
    """Write the ``step-N`` folder ``final`` atomically: a temp folder beside it, then a rename.

    ``files``: weight files (name → (tensors, safetensors header)); ``state`` → ``state.json``;
    ``optimizer`` → ``optimizer.pt`` (tensors and plain containers: ``weights_only`` loadable)."""
    from safetensors.torch import save_file

    parent = os.path.dirname(final)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(final)}.tmp-{uuid.uuid4().hex[:8]}")
    os.makedirs(tmp)
    try:
        for name, (tensors, header) in files.items():
            save_file(tensors, os.path.join(tmp, name), metadata={"format": "pt", **header})
        if optimizer is not None:
            torch.save(optimizer, os.path.join(tmp, OPTIMIZER_FILE))
        write_json(os.path.join(tmp, STATE_FILE), state)
        if os.path.exists(final):  # a re-run of the same step (resumed from an older one)
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def write_done(sdir: str, final: str, steps: int) -> None:
    write_json(os.path.join(sdir, DONE_FILE), {"final": final, "steps": steps, "time": now()})


def write_json(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True, default=str)
    os.replace(tmp, path)


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# ---- readers ----------------------------------------------------------------------------------
@dataclass
class Checkpoint:
    """What a path given as a checkpoint is. ``kind``: "step" (a training ``step-N`` folder,
    ``state`` read) or "diffusers" (``path`` = the transformer folder of a diffusers export or a
    bare transformer folder). ``base``: the frozen checkpoint a LoRA or ControlNet step builds on."""

    path: str
    kind: str
    state: dict[str, Any] | None = None

    @property
    def lora_base(self) -> str | None:
        return (self.state or {}).get("lora_base")

    @property
    def controlnet_base(self) -> str | None:
        return (self.state or {}).get("controlnet_base")

    @property
    def objective(self) -> str:
        return (self.state or {}).get("objective", "diffusion")

    @property
    def base(self) -> Checkpoint | None:
        path = self.lora_base or self.controlnet_base
        return resolve(path, "base") if path and path != "scratch" else None

    @property
    def features(self) -> dict[str, Any]:
        return (self.state or {}).get("features") or {}


def resolve_step(path: str, flag: str = "--checkpoint") -> str:
    """A ``step-N`` folder as given; a stage folder → its final (else latest) checkpoint; a run
    folder → its last stage's."""
    if os.path.isfile(os.path.join(path, STATE_FILE)):
        return path
    if not os.path.isdir(path):
        raise UserError(f"{flag} {path}: no such folder")
    done = read_done(path)
    if done is not None:
        return done["final"]
    step = latest(path)
    if step is not None:
        return step
    cfg_path = os.path.join(path, CONFIG_FILE)
    if os.path.isfile(cfg_path):  # a run folder: the last stage that has a checkpoint
        with open(cfg_path) as f:
            stages = [s["name"] for s in json.load(f).get("stages", [])]
        for name in reversed(stages):
            sdir = os.path.join(path, name)
            if os.path.isdir(sdir) and (read_done(sdir) is not None or latest(sdir)):
                return resolve_step(sdir, flag)
    raise UserError(
        f"{flag} {path}: not a checkpoint (step-N with {STATE_FILE}), a stage folder or a run folder"
    )


def diffusers_transformer(path: str) -> str | None:
    """The transformer folder of a diffusers pipeline / transformer folder, else None."""
    for folder in (path, os.path.join(path, "transformer")):
        if (
            os.path.isdir(folder)
            and os.path.isfile(os.path.join(folder, "config.json"))
            and any(
                n.startswith("diffusion_pytorch_model") and n.endswith(".safetensors")
                for n in os.listdir(folder)
            )
        ):
            return folder
    return None


def resolve(path: str, flag: str = "--checkpoint") -> Checkpoint:
    """Any checkpoint form → ``Checkpoint``: a training run / stage / step-N folder or a diffusers
    pipeline (its ``transformer/``) or transformer folder."""
    if not os.path.isdir(path):
        raise UserError(f"{flag} {path}: no such folder")
    if not os.path.isfile(os.path.join(path, STATE_FILE)):
        folder = diffusers_transformer(path)
        if folder is not None:
            return Checkpoint(folder, "diffusers")
    try:
        step = resolve_step(path, flag)
    except UserError:
        raise UserError(
            f"{flag} {path}: not a training checkpoint (a run, stage or step-N folder with "
            f"{STATE_FILE}), a diffusers pipeline folder or a diffusers transformer folder"
        ) from None
    return Checkpoint(step, "step", read_state(step))


def check_weights(weights: str) -> None:
    if weights not in WEIGHTS:
        raise UserError(f"--weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")


def load_safetensors(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise UserError(f"{path}: missing (an incomplete or foreign checkpoint)")
    return load_file(path)


def pipeline_transformer_config(tconfig: dict[str, Any]) -> dict[str, Any]:
    """The transformer config as diffusers' pipeline needs it: it passes the resolution/aspect
    micro-conditions only to transformers whose ``sample_size`` is 128, so a multi-scale model
    trained at another resolution gets ``sample_size = 128`` and its ``interpolation_scale``
    scaled by ``128 / sample_size`` (its sin-cos positional embedding is unchanged)."""
    cfg = dict(tconfig)
    if cfg.get("use_additional_conditions") and cfg["sample_size"] != 128:
        scale = cfg["interpolation_scale"] or max(cfg["sample_size"] // 64, 1)
        cfg["interpolation_scale"] = scale * 128 / cfg["sample_size"]
        cfg["sample_size"] = 128
    return cfg


def load_transformer(path: str | Checkpoint, weights: str = "ema") -> Any:
    """The transformer of any checkpoint form with its EMA (or raw) weights, configured for the
    pipeline; a LoRA step is its base with the adapters merged in (a plain model)."""
    from diffusers import PixArtTransformer2DModel

    check_weights(weights)
    ckpt = path if isinstance(path, Checkpoint) else resolve(path)
    if ckpt.kind == "diffusers":
        return PixArtTransformer2DModel.from_pretrained(ckpt.path).eval()
    if ckpt.controlnet_base:
        raise UserError(
            f"{ckpt.path} is a ControlNet checkpoint: use its base ({ckpt.controlnet_base}) "
            "with --controlnet"
        )
    if ckpt.lora_base:
        return merge_lora(ckpt, weights)
    assert ckpt.state is not None
    model = PixArtTransformer2DModel(
        **pipeline_transformer_config(ckpt.state["transformer_config"])
    )
    name = EMA_FILE if weights == "ema" else MODEL_FILE
    model.load_state_dict(load_safetensors(os.path.join(ckpt.path, name)))
    return model.eval()


def merge_lora(ckpt: Checkpoint, weights: str = "ema") -> Any:
    """A LoRA step's base with its adapters merged into the weights (peft's ``merge`` per layer,
    then each layer replaced by its merged base layer)."""
    from peft.tuners.lora import LoraLayer

    from training.lora import load_lora

    base = ckpt.base
    if base is None:
        raise UserError(f"{ckpt.path}: LoRA adapters trained from scratch have no base to merge")
    model = load_transformer(base, weights)
    load_lora(model, os.path.join(ckpt.path, LORA_FILE if weights == "ema" else LORA_MODEL_FILE))
    for name, layer in [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]:
        layer.merge()
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.get_base_layer())
    return model.requires_grad_(True).eval()


def load_state_dict(path: str, weights: str = "model") -> dict[str, torch.Tensor]:
    """Full transformer weights to start a stage from: a training step (its ``weights``), a LoRA
    step merged onto its base, or a diffusers pipeline / transformer folder."""
    ckpt = resolve(path, "init_from")
    if ckpt.kind == "step" and not ckpt.lora_base and not ckpt.controlnet_base:
        name = EMA_FILE if weights == "ema" else MODEL_FILE
        return load_safetensors(os.path.join(ckpt.path, name))
    return {k: v.detach() for k, v in load_transformer(ckpt, weights).state_dict().items()}


def transformer_config(path: str) -> dict[str, Any]:
    """The architecture of the transformer a checkpoint holds (a LoRA step: its base's), as
    ``PixArtTransformer2DModel`` arguments."""
    ckpt = resolve(path, "init_from")
    while ckpt.kind == "step" and ckpt.lora_base:
        base = ckpt.base
        if base is None:
            break
        ckpt = base
    if ckpt.kind == "diffusers":
        with open(os.path.join(ckpt.path, "config.json")) as f:
            return {k: v for k, v in json.load(f).items() if not k.startswith("_")}
    assert ckpt.state is not None
    return dict(ckpt.state["transformer_config"])


def base_settings(path: str, flag: str) -> tuple[Checkpoint, dict[str, Any]]:
    """A checkpoint a fine-tuning objective builds on, and the feature settings it was trained on
    (its T5, VAE, resolution, multi-scale); a ControlNet checkpoint is refused (use its base)."""
    ckpt = resolve(path, flag)
    if ckpt.controlnet_base:
        raise UserError(f"{flag} {path}: a ControlNet checkpoint; give its base model")
    if ckpt.kind == "diffusers":
        raise UserError(
            f"{flag} {path}: a diffusers folder records no features settings (T5, VAE, "
            "resolution); give a training checkpoint, or write the stage config yourself"
        )
    settings = ckpt.features.get("settings") or {}
    if ckpt.lora_base and not settings:
        base = ckpt.base
        settings = base.features.get("settings") or {} if base else {}
    return ckpt, settings


def lora_file(path: str) -> str:
    """``--lora PATH``: an adapter file as given; a LoRA checkpoint (run / stage / step-N
    folder) → its EMA adapter file."""
    if os.path.isdir(path):
        step = resolve_step(path, "--lora")
        return os.path.join(step, LORA_FILE)
    return path
