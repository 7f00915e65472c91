"""One-stage configs for the fine-tuning front ends: LoRA, LCM distillation, ControlNet, DreamBooth.

Each function builds the ``RunConfig`` that ``alphaset distill lcm`` / ``finetune controlnet|
dreambooth`` (and the demo's LoRA step) train: one stage of the matching objective, starting
from the base checkpoint, with the base's model preset, learned-sigma setting, resolution and
multi-scale flag. ``training.launch.launch`` then runs it like any ``alphaset train`` config:
the run folder (``--out``) gets ``config.json`` and ``stages.toml``, so
``alphaset train --config OUT/stages.toml --resume`` continues or re-runs it.
"""

from __future__ import annotations

import json
import os
from typing import Any

from pipeline.cli import UserError
from training import checkpoint as ck
from training.config import RunConfig, check_run_dir, config_from_dict


def base_run(base: str, flag: str) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(step folder, its resolved config, its features settings) of a training checkpoint."""
    ckpt, settings = ck.base_settings(base, flag)
    if not settings:
        raise UserError(f"{flag} {base}: its checkpoint records no features settings")
    return ckpt.path, (ckpt.state or {}).get("config") or {}, settings


def check_out(out: str, resume: bool) -> None:
    """``--out`` is a new (or empty) folder, or this command's own run folder when resuming."""
    if (
        os.path.isdir(out)
        and os.listdir(out)
        and not os.path.isfile(os.path.join(out, ck.CONFIG_FILE))
    ):
        raise UserError(f"--out {out} exists and is not a run folder; choose a new output folder")
    if os.path.isfile(os.path.join(out, ck.CONFIG_FILE)) and not resume:
        raise UserError(f"--out {out} already holds a run; pass --resume to continue it")


def one_stage(
    out: str,
    store: str,
    base_config: dict[str, Any],
    stage: dict[str, Any],
    *,
    seed: int = 0,
    bf16: bool = False,
    num_workers: int = 2,
    log_every: int = 10,
    strategy: str = "ddp",
) -> RunConfig:
    """The run ``out`` (its parent = ``[run] dir``, its name = ``[run] name``) of one stage."""
    check_run_dir(out)  # before abspath turns s3://b/x into a local ./s3:/b/x
    out = os.path.abspath(out)
    run = {
        "name": os.path.basename(out.rstrip("/")),
        "dir": os.path.dirname(out.rstrip("/")),
        "store": store,
        "model": base_config.get("model", "pixart-xl-2"),
        "learned_sigma": bool(base_config.get("learned_sigma", True)),
        "seed": seed,
        "mixed_precision": "bf16" if bf16 else "no",
        "num_workers": num_workers,
        "log_every": log_every,
        "strategy": strategy,
    }
    return config_from_dict(
        {"run": run, "stage": [{k: v for k, v in stage.items() if v is not None}]}
    )


def _loop(
    steps: int, batch_size: int, lr: float, save_every: int | None, ema: float
) -> dict[str, Any]:
    """Loop settings shared by the front ends: constant LR after no warm-up, no weight decay,
    clipping at 1.0 (what diffusers' fine-tuning scripts use)."""
    return {
        "steps": steps, "batch_size": batch_size, "lr": float(lr), "warmup": 0,
        "weight_decay": 0.0, "grad_clip": 1.0, "ema": ema, "save_every": save_every or steps,
        "caption_dropout": 0.0,
    }  # fmt: skip


def _lora(rank: int | None) -> dict[str, Any] | None:
    return None if rank is None else {"rank": rank, "alpha": float(rank)}


def _validation(sample_every: int, prompts: list[str] | None) -> dict[str, Any]:
    return {"sample_every": sample_every, "validation_prompts": prompts or []}


def lcm_config(
    teacher: str, store: str, features: str, out: str, *, view: str | None = None,
    steps: int = 1000, batch_size: int = 2, lr: float = 2e-5, lora: int | None = None,
    guidance: float = 4.5, ema: float = 0.95, save_every: int | None = None,
    sample_every: int = 0, validation_prompts: list[str] | None = None,
    guidance_embedding: bool = False, teacher_guidance: float = 4.5, grad_clip: float = 0.01,
    **run: Any,
) -> RunConfig:  # fmt: skip
    """``alphaset distill lcm``: an ``objective = "lcm"`` stage on ``teacher`` (``ema``: the
    target network's decay). PixArt-δ's recipe by default: fixed teacher guidance, no
    w-embedding, grad clip 0.01; ``guidance_embedding``: the LCM paper's w ~ U[3, 15] embedded."""
    path, cfg, settings = base_run(teacher, "--teacher")
    stage = {
        "name": "lcm", "objective": "lcm", "features": features, "view": view,
        "resolution": int(settings["resolution"]), "multi_scale": bool(settings.get("multi_scale")),
        "init_from": path, "lora": _lora(lora),
        "lcm": {"guidance": float(guidance), "target_ema": float(ema),
                "guidance_embedding": guidance_embedding, "teacher_guidance": float(teacher_guidance)},
        **_loop(steps, batch_size, lr, save_every, ema), **_validation(sample_every, validation_prompts),
        "grad_clip": grad_clip,  # PixArt-δ's LCM config: gradient_clip = 0.01
    }  # fmt: skip
    return one_stage(out, store, cfg, stage, **run)


def controlnet_config(
    store: str, base: str, features: str, edges: str, out: str, *, view: str | None = None,
    blocks: int = 13, steps: int = 1000, batch_size: int = 4, lr: float = 2e-5, ema: float = 0.0,
    save_every: int | None = None, sample_every: int = 0,
    validation_prompts: list[str] | None = None, caption_dropout: float = 0.5,
    grad_clip: float = 0.01, weight_decay: float = 0.03, **run: Any,
) -> RunConfig:  # fmt: skip
    """``alphaset finetune controlnet``: an ``objective = "controlnet"`` stage on ``base``, with
    PixArt-δ's loop settings by default."""
    path, cfg, settings = base_run(base, "--base")
    stage = {
        "name": "controlnet", "objective": "controlnet", "features": features, "view": view,
        "resolution": int(settings["resolution"]), "multi_scale": bool(settings.get("multi_scale")),
        "init_from": path, "controlnet": {"edges": edges, "blocks": blocks},
        **_loop(steps, batch_size, lr, save_every, ema), **_validation(sample_every, validation_prompts),
        # PixArt-δ's ControlNet config (PixArt_xl2_img1024_controlHed.py): class_dropout_prob 0.5,
        # gradient_clip 0.01, AdamW weight decay 0.03.
        "caption_dropout": caption_dropout, "grad_clip": grad_clip, "weight_decay": weight_decay,
    }  # fmt: skip
    return one_stage(out, store, cfg, stage, **run)


def dreambooth_config(
    base: str, instance_dir: str, instance_prompt: str, out: str, *,
    class_prompt: str | None = None, prior_images: int = 0, prior_weight: float = 1.0,
    prior_steps: int = 20, lora: int | None = None, steps: int = 400, batch_size: int = 2,
    lr: float = 5e-6, ema: float = 0.99, save_every: int | None = None, sample_every: int = 0,
    **run: Any,
) -> RunConfig:  # fmt: skip
    """``alphaset finetune dreambooth``: an ``objective = "dreambooth"`` stage on ``base``
    (validation grids, when asked for, sample the instance prompt)."""
    path, cfg, settings = base_run(base, "--base")
    db = {
        "instance_dir": os.path.abspath(instance_dir), "instance_prompt": instance_prompt,
        "class_prompt": class_prompt, "prior_images": prior_images,
        "prior_weight": float(prior_weight), "prior_steps": prior_steps,
    }  # fmt: skip
    stage = {
        "name": "dreambooth", "objective": "dreambooth",
        "resolution": int(settings["resolution"]), "multi_scale": bool(settings.get("multi_scale")),
        "init_from": path, "lora": _lora(lora), "dreambooth": {k: v for k, v in db.items() if v is not None},
        **_loop(steps, batch_size, lr, save_every, ema), **_validation(sample_every, [instance_prompt]),
    }  # fmt: skip
    store = str(settings.get("store") or (cfg.get("store") or os.path.abspath(out)))
    return one_stage(out, store, cfg, stage, **run)


def lora_config(
    store: str, base: str, features: str, out: str, *, view: str | None = None, steps: int = 4,
    rank: int = 4, lr: float = 1e-3, batch_size: int = 2, **run: Any,
) -> RunConfig:  # fmt: skip
    """A diffusion stage with LoRA adapters on ``base`` (what the demo's LoRA step trains)."""
    path, cfg, settings = base_run(base, "--base")
    stage = {
        "name": "lora", "features": features, "view": view,
        "resolution": int(settings["resolution"]), "multi_scale": bool(settings.get("multi_scale")),
        "init_from": path, "lora": _lora(rank), "shuffle_buffer": 4,
        **_loop(steps, batch_size, lr, None, 0.5), "warmup": 1,
    }  # fmt: skip
    return one_stage(out, store, cfg, stage, **run)


def run_recipe(
    cfg: RunConfig,
    *,
    resume: bool = False,
    workers: int = 1,
    gpus_per_worker: float = 0.0,
    device: str | None = None,
    progress: bool = True,
) -> str | None:
    """Train a one-stage config (``--out`` checked first); its final checkpoint (None: stopped)."""
    from training.launch import launch

    check_out(cfg.run_dir, resume)
    finals = launch(
        cfg, workers=workers, gpus_per_worker=gpus_per_worker, resume=resume, progress=progress,
        device=device,
    )  # fmt: skip
    return finals.get(cfg.stages[0].name)


def losses(run_dir: str, stage: str | None = None) -> list[float]:
    """The logged losses of a run's (first) stage, in step order (``metrics.jsonl``)."""
    if stage is None:
        with open(os.path.join(run_dir, ck.CONFIG_FILE)) as f:
            stage = json.load(f)["stages"][0]["name"]
    path = os.path.join(run_dir, stage, ck.METRICS_FILE)
    with open(path) as f:
        return [json.loads(line)["loss"] for line in f if line.strip()]


def train_lora(
    store: str, base: str, features: str, out_dir: str, *, steps: int = 4, rank: int = 4,
    view: str | None = None, progress: bool = False, resume: bool = False, name: str = "lora",
    **kw: Any,
) -> str:  # fmt: skip
    """A few LoRA steps on ``base`` over ``features/<tag>`` into ``out_dir/<name>``; returns the
    final checkpoint folder (its ``lora.safetensors`` is the adapter for ``sample --lora``)."""
    from training.launch import launch

    cfg = lora_config(store, base, features, os.path.join(out_dir, name), view=view, steps=steps,
                      rank=rank, **kw)  # fmt: skip
    return launch(cfg, resume=resume, progress=progress)[cfg.stages[0].name]
