"""The training loop: a run's stages in order, each a PixArt DiT trained with its objective.

One loop serves every objective (training.objective: diffusion, LCM distillation, ControlNet,
DreamBooth; LoRA an option of each). The loop supplies device placement, bf16 autocast,
``compile``, gradient checkpointing, DDP/FSDP, AdamW/CAME with warm-up + LR schedule, gradient
clipping, the EMA, ``metrics.jsonl``, TensorBoard, validation grids and checkpoints; the
objective supplies the model around the base, the loss, the sampler and its checkpoint files.

Run folder (``[run] dir``/``name``; file names and the checkpoint format: training.checkpoint)::

    config.json  run.json  stages.toml   resolved config, data sources, the config as TOML
    <stage>/checkpoints/step-N/          weights, optimizer.pt, state.json
    <stage>/done.json                    the stage is finished (its final checkpoint)
    <stage>/metrics.jsonl                one line per log step (rank 0), exactly: a resumed stage
                                         first drops the lines after its checkpoint's step
    <stage>/tb/                          TensorBoard scalars and validation image grids
    <stage>/samples/step-N.png           validation grids
    <stage>/keys/rank-R.jsonl            sample keys of every batch (``record_keys``)

``state.json`` holds the step, the resolved config, the transformer config, the LR schedule,
every rank's data position and RNG states, so ``--resume`` continues a stage exactly where its
latest checkpoint left it: the loss of every later step equals the uninterrupted run's. Every
draw of a step comes from a generator seeded by (seed, rank, step), so it needs no saved state.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from pipeline import __version__
from pipeline.cli import UserError
from training import checkpoint as ck
from training.config import RunConfig, StageConfig, config_from_json, differences
from training.data import DataPosition, FeatureSet
from training.distributed import DistContext, local, wrap_model
from training.model import build_transformer, load_weights, micro_conditions, transformer_config
from training.objective import Objective, step_generator
from training.objectives import OBJECTIVES

log = logging.getLogger(__name__)

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
    device: str | None = None,
) -> dict[str, str]:
    """Train every stage of ``cfg`` in order; return {stage: final checkpoint folder}.

    Finished stages are skipped on ``resume``; ``stop_after`` ends the invocation (with a
    checkpoint) after that many steps, e.g. to fit a job's time limit. ``device``: "cuda",
    "cuda:1", "cpu" … (default: CUDA when available; Ray Train workers get theirs from Ray).
    """
    dist = dist or DistContext.single(device)
    if stop_after is not None and stop_after < 1:
        raise UserError(f"--stop-after must be >= 1 step, got {stop_after}")
    # 1. Check every stage's data and init source before building any model.
    fsets = {s.name: OBJECTIVES[s.objective].open_data(cfg, s) for s in cfg.stages}
    for s in cfg.stages:
        if s.init_from not in ("previous", "scratch") and not is_pixart_pth(s.init_from):
            ck.resolve(s.init_from, f"stage {s.name!r}: init_from")
        if s.optimizer == "came":
            _came()
    # 2. Record the run.
    prepare_run_dir(cfg, fsets, resume, dist)
    finals: dict[str, str] = {}
    budget = stop_after
    for i, stage in enumerate(cfg.stages):
        done = ck.read_done(stage_dir(cfg, stage))
        if done is not None:
            finals[stage.name] = done["final"]
            continue
        if budget == 0:
            break
        init = stage.init_from
        if init == "previous":
            init = finals[cfg.stages[i - 1].name]
        final, steps = train_stage(
            cfg, stage, fsets[stage.name], init=init, resume=resume, budget=budget,
            progress=progress, dist=dist,
        )  # fmt: skip
        if budget is not None:
            budget -= steps
        if final is None:  # stopped by --stop-after
            break
        finals[stage.name] = final
    return finals


def stage_dir(cfg: RunConfig, stage: StageConfig) -> str:
    return os.path.join(cfg.run_dir, stage.name)


def prepare_run_dir(
    cfg: RunConfig, fsets: dict[str, FeatureSet], resume: bool, dist: DistContext
) -> None:
    """Refuse to overwrite a run unless resuming; write the resolved config and data sources."""
    started = [
        s.name for s in cfg.stages if os.path.isdir(os.path.join(stage_dir(cfg, s), "checkpoints"))
    ]
    if started and not resume:
        raise UserError(
            f"run {cfg.run_dir} already has stage(s) {', '.join(started)}; pass --resume to continue it "
            "or choose another [run] name"
        )
    dist.barrier()
    if dist.is_main:
        os.makedirs(cfg.run_dir, exist_ok=True)
        ck.write_json(os.path.join(cfg.run_dir, ck.CONFIG_FILE), cfg.to_dict())
        write_toml(cfg, os.path.join(cfg.run_dir, ck.TOML_FILE))
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
        ck.write_json(os.path.join(cfg.run_dir, ck.RUN_FILE), sources)
    dist.barrier()


def write_toml(cfg: RunConfig, path: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(cfg.to_toml())
    os.replace(tmp, path)


@dataclass
class Models:
    """What ``build_models`` hands the loop."""

    model: torch.nn.Module  # the trainable module (objective.build around the base)
    ema: torch.nn.Module  # its EMA (LCM: the target network)
    forward: torch.nn.Module  # the model as the loss calls it (DDP / FSDP / compiled)
    tconfig: dict[str, Any]  # the base transformer's config (saved in every checkpoint)
    params: list[torch.nn.Parameter]  # what the optimizer trains
    ema_pairs: tuple[list[torch.Tensor], list[torch.Tensor]]  # (EMA, model) trained tensors


def train_stage(
    cfg: RunConfig,
    stage: StageConfig,
    fset: FeatureSet,
    *,
    init: str,
    resume: bool,
    budget: int | None,
    progress: bool,
    dist: DistContext,
) -> tuple[str | None, int]:
    """Train one stage to its last step (or ``budget`` steps); return (its final checkpoint,
    None if stopped early; steps trained in this call)."""
    sdir = stage_dir(cfg, stage)
    device = dist.device
    torch.manual_seed(cfg.seed + dist.rank)
    objective = OBJECTIVES[stage.objective](cfg, stage, device)
    fset = objective.prepare(fset, sdir, init, dist)
    if stage.null == "y_embedding":
        fset = with_y_embedding_null(fset, cfg, stage)
    latest = ck.latest(sdir) if resume else None
    state = ck.read_state(latest) if latest is not None else None
    if state is not None:
        check_resumable(state, cfg, stage)
    start_step = int(state["step"]) if state is not None else 0
    m = build_models(cfg, stage, fset, objective, init, latest, dist)
    lr = effective_lr(stage, dist.world_size)
    optimizer = make_optimizer(stage, m.params, device, lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(stage))
    position = None
    if state is not None:
        load_optimizer(optimizer, m.model, os.path.join(latest, ck.OPTIMIZER_FILE), cfg, dist)  # type: ignore[arg-type]
        scheduler.load_state_dict(state["lr_scheduler"])
        set_rng_state(state["rng"][dist.rank] if dist.rank < len(state["rng"]) else None)
        saved = state["data"][dist.rank] if dist.rank < len(state["data"]) else None
        position = DataPosition.from_dict(saved) if saved else None
    batches, position = objective.batches(fset, position, start_step, dist)
    logs = Logs.open(cfg, stage, fset, sdir, start_step, dist)
    autocast = torch.autocast(
        device.type, dtype=torch.bfloat16, enabled=cfg.mixed_precision == "bf16"
    )
    if dist.is_main and progress:
        print(banner(cfg, stage, fset, m, start_step, dist), flush=True)

    # Train.
    step, last_saved = start_step, start_step
    window = Window(device)
    while step < stage.steps:
        t0 = time.perf_counter()
        batch = next(batches)
        window.data_wait += time.perf_counter() - t0
        gen = step_generator(cfg.seed, dist.rank, step, device)
        with autocast:
            loss = objective.loss(m.forward, m.ema, batch, gen)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(m.params, stage.grad_clip)
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            torch._foreach_lerp_(*m.ema_pairs, 1.0 - objective.ema_decay)
        if position is not None:
            position.consumed(batch["pos"].tolist())
        step += 1
        window.add(loss, grad_norm, batch["latents"].shape[0])
        logs.keys(step, batch)

        if step % cfg.log_every == 0 or step == stage.steps:
            logs.metrics(window.flush(dist, step, lr), progress)
        t_extra = time.perf_counter()  # validation and checkpoints do not count as training time
        if stage.sample_every and step % stage.sample_every == 0:
            logs.validate(objective, m.ema, step)
        stopping = budget is not None and step - start_step >= budget
        if step % stage.save_every == 0 or step == stage.steps or stopping:
            save_checkpoint(sdir, step, objective, m, optimizer, scheduler, position, cfg, stage,
                            fset, dist, init)  # fmt: skip
            last_saved = step
        window.start += time.perf_counter() - t_extra
        if stopping:
            break
    logs.close()
    if last_saved != step or step < stage.steps:
        if dist.is_main and progress:
            print(f"[{stage.name}] stopped at step {step}/{stage.steps}; resume with --resume", flush=True)  # fmt: skip
        return None, step - start_step
    final = ck.checkpoint_dir(sdir, step)
    if dist.is_main:
        ck.write_done(sdir, final, step)
        if progress:
            print(f"[{stage.name}] done: {final}", flush=True)
    dist.barrier()
    return final, step - start_step


# ---- pieces of the loop ---------------------------------------------------------------------
def banner(
    cfg: RunConfig, stage: StageConfig, fset: FeatureSet, m: Models, start: int, dist: DistContext
) -> str:
    """The stage's first progress line: objective, trained parameters, data, steps, device."""
    n_params = sum(p.numel() for p in m.params)
    data = f"{fset.n_samples} samples" + (f" of features/{fset.tag}" if fset.tag else "")
    return (
        f"[{stage.name}] {stage.objective}{' + LoRA' if stage.lora else ''}, "
        f"{n_params / 1e6:.2f}M trained params, {data}"
        f"{f' (view {fset.view})' if fset.view else ''}, steps {start}->{stage.steps}, "
        f"batch {stage.batch_size}x{dist.world_size}, lr {effective_lr(stage, dist.world_size):.3g}"
        f"{f' ({stage.lr:g} x {stage.lr_scale} scaling)' if stage.lr_scale != 'none' else ''}, "
        f"{dist.device.type}{' bf16' if cfg.mixed_precision == 'bf16' else ''}"
    )


def build_models(
    cfg: RunConfig,
    stage: StageConfig,
    fset: FeatureSet,
    objective: Objective,
    init: str,
    latest: str | None,
    dist: DistContext,
) -> Models:
    """The base transformer with its init weights, the objective's trainable module around it,
    its EMA, the checkpoint's weights on resume, then device, checkpointing, DDP/FSDP, compile."""
    # 1. The base: PixArt's DiT sized by the preset and this stage's data, or the base's own.
    if stage.objective == "diffusion":
        tconfig = transformer_config(
            cfg.model, resolution=stage.resolution, caption_channels=fset.t5_dim,
            latent_channels=fset.latent_channels, vae_downsample=fset.vae_downsample,
            multi_scale=stage.multi_scale, learned_sigma=cfg.learned_sigma,
            pe_scale=stage_pe_interpolation(stage, init),
        )  # fmt: skip
    else:  # a fine-tuning objective keeps the architecture of the model it starts from
        tconfig = init_transformer_config(init)
        if bool(tconfig.get("use_additional_conditions")) != stage.multi_scale:
            raise UserError(
                f"stage {stage.name!r}: multi_scale = {str(stage.multi_scale).lower()} but its "
                f"base {init} is {'' if stage.multi_scale else 'multi-scale'}"
                f"{'single-scale' if stage.multi_scale else ''}; set multi_scale to match"
            )
    base = build_transformer(tconfig, seed=cfg.seed)
    fresh_full = latest is not None and objective.resume_replaces_base
    if init != "scratch" and not fresh_full:
        try:
            missing = load_weights(base, init_state_dict(init, objective.init_weights), init)
        except ValueError as e:  # load_weights' "do not fit": an incompatible base
            raise UserError(f"stage {stage.name!r}: {e}") from e
        if missing and dist.is_main:
            log.warning(
                "stage %s: %d micro-condition tensor(s) (resolution/aspect embedders) are not in %s; "
                "they start from PixArt's init", stage.name, len(missing), init,
            )  # fmt: skip
    if cfg.gradient_checkpointing:
        base.enable_gradient_checkpointing()
    # 2. The objective's trainable module, its EMA, the checkpoint's weights.
    model = objective.build(base)
    sharded = cfg.strategy == "fsdp" and dist.distributed
    ema = objective.make_ema(model, share_frozen=not sharded)
    if latest is not None:
        objective.load(model, ema, latest)
    # 3. Device, DDP/FSDP, compile.
    model.to(dist.device).train()
    ema.to(dist.device)
    for extra in objective.frozen():
        extra.to(dist.device)
    net = wrap_model(model, cfg.strategy, dist)
    if sharded:
        wrap_model(ema, "fsdp", dist)
    trained = [(e, p) for e, p in zip(ema.parameters(), model.parameters(), strict=True) if p.requires_grad]  # fmt: skip
    return Models(
        model=model,
        ema=ema,
        forward=torch.compile(net) if cfg.compile else net,
        tconfig=tconfig,
        params=[p for p in model.parameters() if p.requires_grad],
        ema_pairs=([local(e) for e, _ in trained], [local(p) for _, p in trained]),
    )


def effective_lr(stage: StageConfig, world_size: int) -> float:
    """The stage's lr after PixArt's ``auto_scale_lr`` rule: × sqrt (or ×) global batch / 256,
    the global batch counting every worker (this loop takes one optimizer step per batch, so
    there is no accumulation factor). At PixArt's 176 per GPU × 64 GPUs, sqrt gives 6.63×."""
    from training.config import LR_BASE_BATCH

    ratio = stage.batch_size * world_size / LR_BASE_BATCH
    factor = {"none": 1.0, "sqrt": math.sqrt(ratio), "linear": ratio}[stage.lr_scale]
    return stage.lr * factor


def with_y_embedding_null(fset: FeatureSet, cfg: RunConfig, stage: StageConfig) -> FeatureSet:
    """``null = "y_embedding"``: PixArt's learned null caption, from the run's imported PixArt
    checkpoint (the nearest explicit ``init_from`` at or before this stage), replaces T5("") in
    caption dropout and validation. As in PixArt's training, a dropped caption keeps its own
    attention mask; validation attends to all of it."""
    import dataclasses

    from training.pixart_import import load_y_embedding

    i = cfg.stages.index(stage)
    source = next(
        (s.init_from for s in reversed(cfg.stages[: i + 1]) if s.init_from != "previous"), None
    )
    y = load_y_embedding(source) if source not in (None, "scratch") else None
    if y is None:
        raise UserError(
            f"stage {stage.name!r}: null = 'y_embedding' needs an init_from PixArt .pth or a folder "
            f"written by 'alphaset import pixart' (this run starts from {source})"
        )
    if tuple(y.shape) != fset.null_t5.shape:
        raise UserError(
            f"stage {stage.name!r}: the y_embedding of {source} is {tuple(y.shape)}, the features' "
            f"T5 embeddings {fset.null_t5.shape}"
        )
    return dataclasses.replace(
        fset,
        null_t5=y.numpy().astype(np.float16),
        null_mask=np.ones_like(fset.null_mask),
        null_keeps_mask=True,
    )


def is_pixart_pth(init: str) -> bool:
    """``init_from`` names an official PixArt ``.pth`` file (converted on load)."""
    return init.endswith(".pth") and os.path.isfile(init)


def init_state_dict(init: str, weights: str) -> dict[str, torch.Tensor]:
    """The init weights of a stage: an alphaset/diffusers checkpoint, or a PixArt ``.pth``."""
    if is_pixart_pth(init):
        from training.pixart_import import import_pixart, read_pth

        return import_pixart(read_pth(init)).state_dict
    return ck.load_state_dict(init, weights)


def init_transformer_config(init: str) -> dict[str, Any]:
    """The transformer config of an init source (a PixArt ``.pth``: inferred from its tensors)."""
    if is_pixart_pth(init):
        from training.pixart_import import import_pixart, read_pth

        return import_pixart(read_pth(init)).config
    return ck.transformer_config(init)


def stage_pe_interpolation(stage: StageConfig, init: str) -> float | str:
    """The stage's ``pe_interpolation``; unset, an explicit ``init_from`` checkpoint's own scale
    (per latent side, so the same grid extent at the stage's resolution), else PixArt-α's."""
    if stage.pe_interpolation is not None:
        return stage.pe_interpolation
    if stage.init_from in ("previous", "scratch"):
        return "alpha"
    base = init_transformer_config(init)
    scale = base.get("interpolation_scale") or max(base["sample_size"] // 64, 1)
    return float(scale) * (stage.resolution // 8) / base["sample_size"]


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
        raise UserError(
            "optimizer = 'came' needs the came-pytorch package (pip install came-pytorch)"
        ) from e
    return CAME


def make_optimizer(
    stage: StageConfig,
    params: list[torch.nn.Parameter],
    device: torch.device,
    lr: float | None = None,
) -> torch.optim.Optimizer:
    """AdamW with PixArt's settings (eps 1e-10, weight decay 0.03), or CAME (PixArt-Σ's);
    ``lr``: the effective lr (`effective_lr`), default the stage's."""
    lr = stage.lr if lr is None else lr
    if stage.optimizer == "came":
        return _came()(
            params,
            lr=lr,
            weight_decay=stage.weight_decay,
            betas=(0.9, 0.999, 0.9999),
            eps=(1e-30, 1e-16),
        )
    return torch.optim.AdamW(
        params,
        lr=lr,
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


class Logs:
    """A stage's outputs besides checkpoints: metrics.jsonl and TensorBoard (rank 0), validation
    grids, and the per-rank key logs."""

    def __init__(self, cfg: RunConfig, stage: StageConfig, sdir: str, dist: DistContext):
        self.cfg, self.stage, self.sdir, self.dist = cfg, stage, sdir, dist
        self.writer: Any = None
        self.validation: Validation | None = None
        self.keys_log: Any = None

    @classmethod
    def open(
        cls,
        cfg: RunConfig,
        stage: StageConfig,
        fset: FeatureSet,
        sdir: str,
        start_step: int,
        dist: DistContext,
    ) -> Logs:
        """Open the logs of a stage starting at ``start_step``: lines a killed run wrote after
        that step's checkpoint are dropped first, so every step has exactly one line."""
        logs = cls(cfg, stage, sdir, dist)
        os.makedirs(sdir, exist_ok=True)
        if dist.is_main:
            truncate_jsonl(os.path.join(sdir, ck.METRICS_FILE), start_step)
            from torch.utils.tensorboard import SummaryWriter

            logs.writer = SummaryWriter(os.path.join(sdir, "tb"), purge_step=start_step + 1)
        if stage.sample_every and (dist.is_main or cfg.strategy == "fsdp"):
            logs.validation = Validation(fset, stage, dist.device, cfg.mixed_precision == "bf16")
        if cfg.record_keys:
            path = os.path.join(sdir, "keys", f"rank-{dist.rank}.jsonl")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            truncate_jsonl(path, start_step)
            logs.keys_log = open(path, "a")  # noqa: SIM115
        return logs

    def keys(self, step: int, batch: dict[str, Any]) -> None:
        if self.keys_log is not None and "keys" in batch:
            self.keys_log.write(json.dumps({"step": step, "keys": batch["keys"]}) + "\n")
            self.keys_log.flush()

    def metrics(self, rec: dict[str, float], progress: bool) -> None:
        if not self.dist.is_main:
            return
        step = int(rec["step"])
        with open(os.path.join(self.sdir, ck.METRICS_FILE), "a") as f:
            f.write(json.dumps(rec) + "\n")
        w = self.writer
        w.add_scalar("train/loss", rec["loss"], step)
        w.add_scalar("train/grad_norm", rec["grad_norm"], step)
        w.add_scalar("train/lr", rec["lr"], step)
        w.add_scalar("perf/img_per_s", rec["img_per_s"], step)
        w.add_scalar("perf/data_wait_fraction", rec["data_wait"], step)
        if progress:
            print(
                f"[{self.stage.name}] step {step}/{self.stage.steps} loss {rec['loss']:.4f} "
                f"grad {rec['grad_norm']:.3g} lr {rec['lr']:.2e} {rec['img_per_s']:.1f} img/s "
                f"data-wait {rec['data_wait']:.0%}",
                flush=True,
            )

    def validate(self, objective: Objective, ema: torch.nn.Module, step: int) -> None:
        if self.validation is None:
            return
        grid = self.validation.run(objective, ema, self.cfg.seed)
        if self.dist.is_main:
            save_grid(self.sdir, self.writer, grid, step)

    def close(self) -> None:
        if self.keys_log is not None:
            self.keys_log.close()
        if self.writer is not None:
            self.writer.close()


def truncate_jsonl(path: str, step: int) -> None:
    """Keep only the lines of ``path`` whose ``step`` is <= ``step`` (atomically)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.read().splitlines()
    keep = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
    if len(keep) == len(lines):
        return
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


class Validation:
    """Fixed prompts → image grid with the EMA weights and the objective's sampler (T5 runs
    once, at the stage's start)."""

    def __init__(self, fset: FeatureSet, stage: StageConfig, device: torch.device, bf16: bool):
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
        res, f = stage.resolution, fset.vae_downsample
        self.latent_hw = (res // f, res // f)
        self.latent_channels = fset.latent_channels
        n = self.embeds.shape[0]
        self.micro = None
        if stage.multi_scale:
            hw = torch.tensor([[res, res]] * n, device=device)
            self.micro = micro_conditions(hw, torch.float32)
        self.fset, self.stage, self.device, self.bf16 = fset, stage, device, bf16

    @torch.no_grad()
    def run(self, objective: Objective, ema: torch.nn.Module, seed: int) -> np.ndarray:
        """A (H, W, 3) uint8 grid, one image per prompt, same noise every time."""
        gen = torch.Generator(device=self.device).manual_seed(seed)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            latents = objective.sample(ema, self, gen)  # (P, C, h, w)
        images = self.vae.decode(latents.float() / self.fset.scale_factor).sample  # (P, 3, H, W)
        images = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return make_grid(images.permute(0, 2, 3, 1).cpu().numpy())


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
        raise UserError(
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
    objective: Objective,
    m: Models,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    position: DataPosition | None,
    cfg: RunConfig,
    stage: StageConfig,
    fset: FeatureSet,
    dist: DistContext,
    init: str,
) -> str:
    """Write ``step-N`` (training.checkpoint.write_checkpoint, from rank 0) with every rank's
    data position and RNG state; the objective says which weight files it holds."""
    positions = dist.all_gather_object(position.to_dict() if position is not None else None)
    rngs = dist.all_gather_object(get_rng_state())
    checksums = dist.all_gather_object(_param_checksum(m.model))
    if cfg.strategy == "ddp" and any(c != checksums[0] for c in checksums):
        raise RuntimeError(f"ranks hold different weights at step {step} (checksums {checksums})")
    info = {"base": init, "stage": stage.name, "step": step}
    files = objective.files(m.model, m.ema, lambda mod: _state_dict(mod, cfg, dist), info)
    opt_sd = optimizer_state(optimizer, m.model, cfg, dist)
    final = ck.checkpoint_dir(sdir, step)
    if dist.is_main:
        state = {
            "step": step,
            "stage": stage.name,
            "config": cfg.to_dict(),
            "transformer_config": m.tconfig,
            "features": {
                "store": fset.store,
                "tag": fset.tag,
                "view": fset.view,
                "settings": fset.settings,
            },
            "lr_scheduler": scheduler.state_dict(),
            "effective_lr": effective_lr(stage, dist.world_size),
            "global_batch": stage.batch_size * dist.world_size,
            "data": positions,
            "rng": rngs,
            "param_checksums": checksums,
            "world_size": dist.world_size,
            **objective.state(init),
            "tool_version": __version__,
            "time": ck.now(),
        }
        ck.write_checkpoint(final, files, state, opt_sd)
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
