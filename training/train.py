"""The training loop: a run's stages in order, each a PixArt DiT trained on feature shards.

Run folder (``[run] dir``/``name``)::

    config.json                      resolved config of the latest invocation
    run.json                         store, per stage: view, features tag and its settings
    <stage>/checkpoints/step-N/      model.safetensors, ema.safetensors, optimizer.pt, state.json
    <stage>/done.json                the stage is finished (its final checkpoint)
    <stage>/metrics.jsonl            one line per log step (rank 0)
    <stage>/tb/                      TensorBoard scalars and validation image grids
    <stage>/samples/step-N.png       validation grids
    <stage>/keys/rank-R.jsonl        sample keys of every batch (``record_keys``)

``state.json`` holds the step, the resolved config, the transformer config, the LR schedule,
every rank's data position and RNG states, so ``--resume`` continues a stage exactly where its
latest checkpoint left it: the loss of every later step equals the uninterrupted run's. Noise
and timesteps come from a generator seeded by (seed, rank, step), so they need no saved state.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as _dt
import json
import logging
import math
import os
import random
import shutil
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from pipeline import __version__
from training.config import RunConfig, StageConfig, config_from_json, differences
from training.data import DataPosition, FeatureBatches, FeatureSet, make_loader, open_features
from training.diffusion import Diffusion, sample_latents
from training.distributed import DistContext, local, wrap_model
from training.lora import (
    LORA_FILE,
    LORA_MODEL_FILE,
    LoraOptions,
    add_lora,
    load_lora_state,
    lora_state_dict,
    save_lora,
)
from training.model import build_transformer, load_weights, micro_conditions, transformer_config

log = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "state.json"
DONE_FILE = "done.json"
# Stage settings a resumed stage may change (everything else must match its checkpoint).
RESUMABLE_CHANGES = {
    "steps",
    "save_every",
    "sample_every",
    "validation_prompts",
    "sample_steps",
    "guidance_scale",
}


def train(
    cfg: RunConfig,
    *,
    resume: bool = False,
    stop_after: int | None = None,
    progress: bool = True,
    dist: DistContext | None = None,
) -> dict[str, str]:
    """Train every stage of ``cfg`` in order; return {stage: final checkpoint folder}.

    Finished stages are skipped on ``resume``; ``stop_after`` ends the invocation (with a
    checkpoint) after that many steps, e.g. to fit a job's time limit.
    """
    dist = dist or DistContext.single()
    if stop_after is not None and stop_after < 1:
        raise ValueError(f"--stop-after must be >= 1 step, got {stop_after}")
    # 1. Check every stage's data and init source before building any model.
    fsets = {
        s.name: open_features(
            cfg.store,
            s.features,
            resolution=s.resolution,
            multi_scale=s.multi_scale,
            view=s.view,
            stage=s.name,
        )
        for s in cfg.stages
    }
    for s in cfg.stages:
        if s.init_from not in ("previous", "scratch"):
            init_kind(s.init_from)
        if s.optimizer == "came":
            _came()
    # 2. Record the run.
    prepare_run_dir(cfg, fsets, resume, dist)
    finals: dict[str, str] = {}
    budget = [stop_after]
    for i, stage in enumerate(cfg.stages):
        done = read_done(stage_dir(cfg, stage))
        if done is not None:
            finals[stage.name] = done["final"]
            continue
        if budget[0] == 0:
            break
        init = stage.init_from
        if init == "previous":
            init = finals[cfg.stages[i - 1].name]
        final = train_stage(
            cfg,
            stage,
            fsets[stage.name],
            init=init,
            resume=resume,
            budget=budget,
            progress=progress,
            dist=dist,
        )
        if final is None:  # stopped by --stop-after
            break
        finals[stage.name] = final
    return finals


def stage_dir(cfg: RunConfig, stage: StageConfig) -> str:
    return os.path.join(cfg.run_dir, stage.name)


def read_done(sdir: str) -> dict[str, Any] | None:
    path = os.path.join(sdir, DONE_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def prepare_run_dir(
    cfg: RunConfig, fsets: dict[str, FeatureSet], resume: bool, dist: DistContext
) -> None:
    """Refuse to overwrite a run unless resuming; write the resolved config and data sources."""
    started = [
        s.name for s in cfg.stages if os.path.isdir(os.path.join(stage_dir(cfg, s), "checkpoints"))
    ]
    if started and not resume:
        raise ValueError(
            f"run {cfg.run_dir} already has stage(s) {', '.join(started)}; pass --resume to continue it "
            "or choose another [run] name"
        )
    dist.barrier()
    if dist.is_main:
        os.makedirs(cfg.run_dir, exist_ok=True)
        _write_json(os.path.join(cfg.run_dir, "config.json"), cfg.to_dict())
        sources = {
            "store": cfg.store,
            "stages": {
                name: {
                    "view": f.view,
                    "features": f.tag,
                    "features_settings": f.settings,
                    "samples": f.n_samples,
                }
                for name, f in fsets.items()
            },
        }
        _write_json(os.path.join(cfg.run_dir, "run.json"), sources)
    dist.barrier()


def train_stage(
    cfg: RunConfig,
    stage: StageConfig,
    fset: FeatureSet,
    *,
    init: str,
    resume: bool,
    budget: list[int | None],
    progress: bool,
    dist: DistContext,
) -> str | None:
    """Train one stage to its last step; return its final checkpoint (None if stopped early)."""
    sdir = stage_dir(cfg, stage)
    device = dist.device
    torch.manual_seed(cfg.seed + dist.rank)

    # Create model: PixArt's DiT sized by the preset, shaped by this stage's data.
    tconfig = transformer_config(
        cfg.model,
        resolution=stage.resolution,
        caption_channels=fset.t5_dim,
        latent_channels=fset.latent_channels,
        vae_downsample=fset.vae_downsample,
        multi_scale=stage.multi_scale,
        learned_sigma=cfg.learned_sigma,
    )
    model = build_transformer(tconfig, seed=cfg.seed)
    latest = latest_checkpoint(sdir) if resume else None
    state: dict[str, Any] | None = None
    lora = LoraOptions.from_dict(stage.lora) if stage.lora else None
    if latest is not None and lora is not None:  # LoRA: frozen base + the saved adapters
        state = read_state(latest)
        check_resumable(state, cfg, stage)
        if state["lora_base"] != "scratch":
            load_weights(model, init_source(state["lora_base"]), state["lora_base"])
        add_lora(model, lora)
        ema = copy.deepcopy(model)
        load_lora_state(model, _load_safetensors(os.path.join(latest, LORA_MODEL_FILE)), latest)
        load_lora_state(ema, _load_safetensors(os.path.join(latest, LORA_FILE)), latest)
        start_step = int(state["step"])
    elif latest is not None:
        state = read_state(latest)
        check_resumable(state, cfg, stage)
        load_weights(model, _load_safetensors(os.path.join(latest, MODEL_FILE)), latest)
        ema = copy.deepcopy(model)
        load_weights(ema, _load_safetensors(os.path.join(latest, EMA_FILE)), latest)
        start_step = int(state["step"])
    else:
        if init != "scratch":
            fresh = load_weights(model, init_source(init), init)
            if fresh and dist.is_main:
                log.warning(
                    "stage %s: %d micro-condition tensor(s) (resolution/aspect embedders) are not in %s; "
                    "they start from PixArt's init", stage.name, len(fresh), init,
                )  # fmt: skip
        if lora is not None:
            add_lora(model, lora)  # base frozen, adapters start at zero (B = 0)
        ema = copy.deepcopy(model)  # EMA starts at the initial weights
        start_step = 0
    ema.requires_grad_(False).eval()
    model.to(device).train()
    ema.to(device)
    if cfg.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    net = wrap_model(model, cfg.strategy, dist)
    if cfg.strategy == "fsdp" and dist.distributed:
        wrap_model(ema, "fsdp", dist)
    forward = torch.compile(net) if cfg.compile else net
    diffusion = Diffusion(cfg.learned_sigma, device)

    # Optimizer and LR schedule (linear warm-up, then constant or cosine).
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(stage, params, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(stage))
    if state is not None:
        load_optimizer(optimizer, model, os.path.join(latest, OPTIMIZER_FILE), cfg, dist)  # type: ignore[arg-type]
        scheduler.load_state_dict(state["lr_scheduler"])
        set_rng_state(state["rng"][dist.rank] if dist.rank < len(state["rng"]) else None)
    ema_params = [local(p) for p in ema.parameters()]
    model_params = [local(p) for p in model.parameters()]

    # Setup data: this rank's shards, from the recorded position on resume.
    position = None
    if state is not None and dist.rank < len(state["data"]):
        position = DataPosition.from_dict(state["data"][dist.rank])
    dataset = FeatureBatches(
        fset,
        stage.batch_size,
        seed=cfg.seed,
        rank=dist.rank,
        world_size=dist.world_size,
        num_workers=cfg.num_workers,
        shuffle_buffer=stage.shuffle_buffer,
        caption_dropout=stage.caption_dropout,
        position=position,
    )
    position = dataset.position
    batches = iter(make_loader(dataset, pin_memory=device.type == "cuda"))

    # Logging (rank 0): TensorBoard, metrics.jsonl, validation inputs.
    writer = None
    validation = None
    if dist.is_main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(os.path.join(sdir, "tb"))
    if stage.sample_every and (dist.is_main or cfg.strategy == "fsdp"):
        validation = Validation(fset, stage, device)
    keys_log = None
    if cfg.record_keys:
        os.makedirs(os.path.join(sdir, "keys"), exist_ok=True)
        keys_log = open(os.path.join(sdir, "keys", f"rank-{dist.rank}.jsonl"), "a")  # noqa: SIM115
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device.type == "cuda" and cfg.mixed_precision == "bf16"
        else contextlib.nullcontext()
    )
    if dist.is_main and progress:
        n_params = sum(p.numel() for p in model.parameters())
        print(
            f"[{stage.name}] {n_params / 1e6:.1f}M params, {fset.n_samples} samples of features/{fset.tag}"
            f"{f' (view {fset.view})' if fset.view else ''}, steps {start_step}->{stage.steps}, "
            f"batch {stage.batch_size}x{dist.world_size}, {device.type}",
            flush=True,
        )

    # Train.
    step = start_step
    window = Window(device)
    last_saved = start_step
    while step < stage.steps:
        t0 = time.perf_counter()
        batch = next(batches)
        window.data_wait += time.perf_counter() - t0
        x0 = batch["latents"].to(device, non_blocking=True)  # (N, C, h, w) scaled posterior sample
        text = batch["t5"].to(device, non_blocking=True).float()  # (N, L, D)
        mask = batch["mask"].to(device, non_blocking=True)  # (N, L)
        added = (
            micro_conditions(batch["hw"].to(device), torch.float32) if stage.multi_scale else None
        )
        gen = step_generator(cfg.seed, dist.rank, step, device)
        t = diffusion.sample_timesteps(x0.shape[0], gen, device)  # (N,)
        noise = torch.randn(x0.shape, generator=gen, device=device)  # (N, C, h, w)
        x_t = diffusion.add_noise(x0, noise, t)
        with autocast:
            out = forward(
                x_t,
                encoder_hidden_states=text,
                encoder_attention_mask=mask,
                timestep=t,
                added_cond_kwargs=added,
            ).sample  # (N, C or 2C, h, w)
        loss = diffusion.loss(out, x0, x_t, t, noise).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, stage.grad_clip)
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, model_params, 1.0 - stage.ema)
        position.consumed(batch["pos"].tolist())
        step += 1
        window.add(loss, grad_norm, x0.shape[0])
        if keys_log is not None:
            keys_log.write(json.dumps({"step": step, "keys": batch["keys"]}) + "\n")
            keys_log.flush()

        if step % cfg.log_every == 0 or step == stage.steps:
            record = window.flush(dist, step, lr)
            if dist.is_main:
                log_metrics(sdir, writer, stage, record, progress)
        t_extra = time.perf_counter()  # validation and checkpoints do not count as training time
        if stage.sample_every and step % stage.sample_every == 0 and validation is not None:
            grid = validation.run(ema, cfg.seed)
            if dist.is_main:
                save_grid(sdir, writer, grid, step)
        stopping = budget[0] is not None and step - start_step >= budget[0]
        if step % stage.save_every == 0 or step == stage.steps or stopping:
            save_checkpoint(
                sdir,
                step,
                model,
                ema,
                optimizer,
                scheduler,
                position,
                cfg,
                stage,
                tconfig,
                fset,
                dist,
                lora_base=init if lora is not None else None,
            )
            last_saved = step
        window.start += time.perf_counter() - t_extra
        if stopping:
            break
    if keys_log is not None:
        keys_log.close()
    if writer is not None:
        writer.close()
    if budget[0] is not None:
        budget[0] -= step - start_step
    if last_saved != step or step < stage.steps:
        if dist.is_main and progress:
            print(
                f"[{stage.name}] stopped at step {step}/{stage.steps}; resume with --resume",
                flush=True,
            )
        return None
    final = checkpoint_dir(sdir, step)
    if dist.is_main:
        _write_json(os.path.join(sdir, DONE_FILE), {"final": final, "steps": step, "time": _now()})
        if progress:
            print(f"[{stage.name}] done: {final}", flush=True)
    dist.barrier()
    return final


# ---- pieces of the loop ---------------------------------------------------------------------
def step_generator(seed: int, rank: int, step: int, device: torch.device) -> torch.Generator:
    """The noise/timestep generator of one step on one rank: no state to save for resume."""
    state = np.random.SeedSequence([seed, rank, step]).generate_state(2, dtype=np.uint32)
    return torch.Generator(device=device).manual_seed(int(state[0]) << 32 | int(state[1]))


def lr_lambda(stage: StageConfig):
    warmup, steps, schedule = stage.warmup, stage.steps, stage.lr_schedule

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "cosine":
            progress = (step - warmup) / max(1, steps - warmup)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return factor


def _came():
    try:
        from came_pytorch import CAME
    except ImportError as e:
        raise ValueError(
            "optimizer = 'came' needs the came-pytorch package (pip install came-pytorch)"
        ) from e
    return CAME


def make_optimizer(
    stage: StageConfig, params: list[torch.nn.Parameter], device: torch.device
) -> torch.optim.Optimizer:
    """AdamW with PixArt's settings (eps 1e-10, weight decay 0.03), or CAME (PixArt-Σ's)."""
    if stage.optimizer == "came":
        return _came()(
            params,
            lr=stage.lr,
            weight_decay=stage.weight_decay,
            betas=(0.9, 0.999, 0.9999),
            eps=(1e-30, 1e-16),
        )
    return torch.optim.AdamW(
        params,
        lr=stage.lr,
        weight_decay=stage.weight_decay,
        eps=stage.adam_eps,
        fused=device.type == "cuda",
    )


@dataclass
class Window:
    """Accumulates loss, grad norm and throughput between two log lines (on device: no syncs)."""

    device: torch.device
    data_wait: float = 0.0

    def __post_init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self.loss = torch.zeros((), device=self.device)
        self.grad = torch.zeros((), device=self.device)
        self.steps = 0
        self.images = 0
        self.data_wait = 0.0
        self.start = time.perf_counter()

    def add(self, loss: torch.Tensor, grad_norm: torch.Tensor, n: int) -> None:
        self.loss += loss.detach().float()
        self.grad += local(grad_norm).detach().float()
        self.steps += 1
        self.images += n

    def flush(self, dist: DistContext, step: int, lr: float) -> dict[str, float]:
        loss = dist.mean(self.loss / self.steps).item()
        grad = (self.grad / self.steps).item()
        seconds = time.perf_counter() - self.start
        record = {
            "step": step,
            "loss": loss,
            "grad_norm": grad,
            "lr": lr,
            "img_per_s": self.images * dist.world_size / seconds,
            "data_wait": self.data_wait / seconds,
        }
        self._reset()
        return record


def log_metrics(
    sdir: str, writer: Any, stage: StageConfig, rec: dict[str, float], progress: bool
) -> None:
    step = int(rec["step"])
    with open(os.path.join(sdir, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(rec) + "\n")
    writer.add_scalar("train/loss", rec["loss"], step)
    writer.add_scalar("train/grad_norm", rec["grad_norm"], step)
    writer.add_scalar("train/lr", rec["lr"], step)
    writer.add_scalar("perf/img_per_s", rec["img_per_s"], step)
    writer.add_scalar("perf/data_wait_fraction", rec["data_wait"], step)
    if progress:
        print(
            f"[{stage.name}] step {step}/{stage.steps} loss {rec['loss']:.4f} grad {rec['grad_norm']:.3g} "
            f"lr {rec['lr']:.2e} {rec['img_per_s']:.1f} img/s data-wait {rec['data_wait']:.0%}",
            flush=True,
        )


class Validation:
    """Fixed prompts → image grid with the EMA weights (T5 runs once, at the stage's start)."""

    def __init__(self, fset: FeatureSet, stage: StageConfig, device: torch.device):
        from training.feature_models import load_t5, load_vae
        from training.text import TextEncoder, clean_caption

        settings = fset.settings
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        t5, tokenizer = load_t5(str(settings["t5"]), dtype, str(device))
        encoder = TextEncoder(t5, tokenizer, max_length=fset.max_length)
        feats = encoder.encode([clean_caption(p) for p in stage.validation_prompts])
        del t5, encoder
        self.embeds = (
            torch.from_numpy(np.stack([f.t5 for f in feats])).to(device).float()
        )  # (P, L, D)
        self.mask = torch.from_numpy(np.stack([f.mask for f in feats])).to(device)  # (P, L)
        self.null = torch.from_numpy(fset.null_t5).to(device).float()[None]  # (1, L, D)
        self.null_mask = torch.from_numpy(fset.null_mask).to(device)[None]  # (1, L)
        self.vae = load_vae(str(settings["vae"]), torch.float32, str(device))
        self.fset, self.stage, self.device = fset, stage, device

    @torch.no_grad()
    def run(self, ema: torch.nn.Module, seed: int) -> np.ndarray:
        """A (H, W, 3) uint8 grid, one image per prompt, same noise every time."""
        res, f = self.stage.resolution, self.fset.vae_downsample
        n = self.embeds.shape[0]
        micro = None
        if self.stage.multi_scale:
            micro = micro_conditions(
                torch.tensor([[res, res]] * n, device=self.device), torch.float32
            )
        gen = torch.Generator(device=self.device).manual_seed(seed)
        autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16)
            if self.device.type == "cuda"
            else contextlib.nullcontext()
        )
        with autocast:
            latents = sample_latents(
                ema, self.embeds, self.mask, self.null, self.null_mask, (res // f, res // f),
                self.stage.sample_steps, self.stage.guidance_scale, gen, micro, self.fset.latent_channels,
            )  # fmt: skip
        images = self.vae.decode(
            latents.float() / self.fset.scale_factor
        ).sample  # (P, 3, H, W) in [-1, 1]
        images = (
            ((images.clamp(-1, 1) + 1) * 127.5)
            .round()
            .to(torch.uint8)
            .permute(0, 2, 3, 1)
            .cpu()
            .numpy()
        )
        return make_grid(images)


def make_grid(images: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) → one (rows·H, cols·W, 3) grid, as square as possible."""
    n, h, w, c = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.zeros((rows * h, cols * w, c), dtype=images.dtype)
    for i, img in enumerate(images):
        r, q = divmod(i, cols)
        grid[r * h : (r + 1) * h, q * w : (q + 1) * w] = img
    return grid


def save_grid(sdir: str, writer: Any, grid: np.ndarray, step: int) -> None:
    from PIL import Image

    os.makedirs(os.path.join(sdir, "samples"), exist_ok=True)
    Image.fromarray(grid).save(os.path.join(sdir, "samples", f"step-{step}.png"))
    writer.add_image("validation", grid, step, dataformats="HWC")


# ---- checkpoints ----------------------------------------------------------------------------
def checkpoint_dir(sdir: str, step: int) -> str:
    return os.path.join(sdir, "checkpoints", f"step-{step}")


def latest_checkpoint(sdir: str) -> str | None:
    """The highest complete ``step-N`` (a checkpoint folder appears only when complete)."""
    folder = os.path.join(sdir, "checkpoints")
    if not os.path.isdir(folder):
        return None
    steps = [int(n[5:]) for n in os.listdir(folder) if n.startswith("step-") and n[5:].isdigit()]
    return checkpoint_dir(sdir, max(steps)) if steps else None


def read_state(ckpt: str) -> dict[str, Any]:
    path = os.path.join(ckpt, STATE_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{ckpt} is not a training checkpoint (no {STATE_FILE})")
    with open(path) as f:
        return json.load(f)


def check_resumable(state: dict[str, Any], cfg: RunConfig, stage: StageConfig) -> None:
    old = config_from_json(state["config"])
    old_stage = asdict(old.stage(stage.name))
    changed = [k for k in differences(old_stage, asdict(stage)) if k not in RESUMABLE_CHANGES]
    changed += [
        f"[run] {k}"
        for k in ("model", "learned_sigma", "seed")
        if getattr(old, k) != getattr(cfg, k)
    ]
    if changed:
        raise ValueError(
            f"stage {stage.name!r} was started with other settings ({', '.join(changed)} differ); "
            "resume with the same config or choose another [run] name"
        )


def _state_dict(
    module: torch.nn.Module, cfg: RunConfig, dist: DistContext
) -> dict[str, torch.Tensor]:
    """The full state dict on CPU (gathered from FSDP shards when sharded; rank 0 gets it)."""
    if cfg.strategy == "fsdp" and dist.distributed:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(
            module, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def _param_checksum(model: torch.nn.Module) -> list[float]:
    """Float64 sum and sum of squares over every parameter: equal on ranks holding equal weights."""
    with torch.no_grad():
        s = sum(local(p).double().sum() for p in model.parameters())
        q = sum(local(p).double().square().sum() for p in model.parameters())
    return [float(s), float(q)]


def save_checkpoint(
    sdir: str,
    step: int,
    model: torch.nn.Module,
    ema: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    position: DataPosition,
    cfg: RunConfig,
    stage: StageConfig,
    tconfig: dict[str, Any],
    fset: FeatureSet,
    dist: DistContext,
    lora_base: str | None = None,
) -> str:
    """Write ``step-N`` atomically (temp folder + rename) from rank 0 with every rank's state.

    A LoRA stage (``lora_base``: the frozen base it adapts) writes only the adapter weights
    (``lora.safetensors`` EMA, ``lora_model.safetensors`` raw), not the full model."""
    from safetensors.torch import save_file

    positions = dist.all_gather_object(position.to_dict())
    rngs = dist.all_gather_object(get_rng_state())
    checksums = dist.all_gather_object(_param_checksum(model))
    if cfg.strategy == "ddp" and any(c != checksums[0] for c in checksums):
        raise RuntimeError(f"ranks hold different weights at step {step} (checksums {checksums})")
    if lora_base is None:
        model_sd = _state_dict(model, cfg, dist)
        ema_sd = _state_dict(ema, cfg, dist)
    opt_sd = optimizer_state(optimizer, model, cfg, dist)
    final = checkpoint_dir(sdir, step)
    if dist.is_main:
        tmp = os.path.join(sdir, "checkpoints", f".step-{step}.tmp-{uuid.uuid4().hex[:8]}")
        os.makedirs(tmp)
        if lora_base is None:
            save_file(model_sd, os.path.join(tmp, MODEL_FILE), metadata={"format": "pt"})
            save_file(ema_sd, os.path.join(tmp, EMA_FILE), metadata={"format": "pt"})
        else:
            opts = LoraOptions.from_dict(stage.lora or {})
            info = {"base": lora_base, "stage": stage.name, "step": step}
            save_lora(os.path.join(tmp, LORA_MODEL_FILE), lora_state_dict(model), opts, **info)
            save_lora(os.path.join(tmp, LORA_FILE), lora_state_dict(ema), opts, **info)
        torch.save(opt_sd, os.path.join(tmp, OPTIMIZER_FILE))
        state = {
            "step": step,
            "stage": stage.name,
            "config": cfg.to_dict(),
            "transformer_config": tconfig,
            "features": {
                "store": fset.store,
                "tag": fset.tag,
                "view": fset.view,
                "settings": fset.settings,
            },
            "lr_scheduler": scheduler.state_dict(),
            "data": positions,
            "rng": rngs,
            "param_checksums": checksums,
            "world_size": dist.world_size,
            "lora_base": lora_base,
            "tool_version": __version__,
            "time": _now(),
        }
        _write_json(os.path.join(tmp, STATE_FILE), state)
        if os.path.exists(final):  # a re-run of the same step (resumed from an older one)
            shutil.rmtree(final)
        os.replace(tmp, final)
    dist.barrier()
    return final


def optimizer_state(
    optimizer: torch.optim.Optimizer, model: torch.nn.Module, cfg: RunConfig, dist: DistContext
) -> dict:
    if cfg.strategy == "fsdp" and dist.distributed:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
        )

        return get_optimizer_state_dict(
            model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
    return optimizer.state_dict()


def load_optimizer(
    optimizer: torch.optim.Optimizer,
    model: torch.nn.Module,
    path: str,
    cfg: RunConfig,
    dist: DistContext,
) -> None:
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if cfg.strategy == "fsdp" and dist.distributed:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_optimizer_state_dict,
        )

        set_optimizer_state_dict(
            model, optimizer, sd, options=StateDictOptions(full_state_dict=True)
        )
        return
    optimizer.load_state_dict(sd)


def get_rng_state() -> dict[str, Any]:
    """Every RNG a step could touch, as JSON-able lists."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state().tolist(),
        "cuda": [s.tolist() for s in torch.cuda.get_rng_state_all()]
        if torch.cuda.is_available()
        else [],
        "numpy": [
            np_state[0],
            np_state[1].tolist(),
            int(np_state[2]),
            int(np_state[3]),
            float(np_state[4]),
        ],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }


def set_rng_state(state: dict[str, Any] | None) -> None:
    if state is None:
        return
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    p = state["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))


def _load_safetensors(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path)


def init_kind(path: str) -> tuple[str, str]:
    """What ``init_from`` points at: ("checkpoint", folder) or ("diffusers", transformer folder)."""
    if os.path.isfile(os.path.join(path, MODEL_FILE)):
        return "checkpoint", path
    for folder in (path, os.path.join(path, "transformer")):
        if os.path.isfile(os.path.join(folder, "config.json")) and any(
            n.startswith("diffusion_pytorch_model") and n.endswith(".safetensors")
            for n in os.listdir(folder)
        ):
            return "diffusers", folder
    raise FileNotFoundError(
        f"init_from {path}: not a training checkpoint (step-N/{MODEL_FILE}), a diffusers transformer "
        "folder or a diffusers pipeline folder"
    )


def init_source(path: str) -> dict[str, torch.Tensor]:
    """Weights to start a stage from: a training checkpoint (``step-N``, its model weights), a
    diffusers transformer folder, or a diffusers pipeline folder (its ``transformer/``)."""
    kind, folder = init_kind(path)
    if kind == "checkpoint":
        return _load_safetensors(os.path.join(folder, MODEL_FILE))
    from diffusers import PixArtTransformer2DModel

    return PixArtTransformer2DModel.from_pretrained(folder).state_dict()


def _write_json(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
