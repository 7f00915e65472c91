"""Running a training config: in this process, or on N workers through Ray Train's ``TorchTrainer``.

``launch`` is what every training command calls (``alphaset train``, ``distill lcm``,
``finetune dreambooth|controlnet``): one worker runs ``training.train.train`` here on
``--device``; several run it as Ray Train workers, one CPU each (gloo) or ``gpus_per_worker``
GPUs each (NCCL). Ray's controller holds no CPU, so N workers fit on N CPUs. The run folder must
be visible to every worker (one machine, or a shared POSIX filesystem): rank 0 writes
checkpoints, every rank reads them on resume.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from pipeline.cli import UserError
from training import checkpoint as ck
from training.config import RunConfig, config_from_json
from training.distributed import DistContext
from training.train import stage_dir, train


def launch(
    cfg: RunConfig,
    *,
    workers: int = 1,
    gpus_per_worker: float = 0.0,
    cpus_per_worker: float = 1.0,
    resume: bool = False,
    stop_after: int | None = None,
    progress: bool = True,
    device: str | None = None,
) -> dict[str, str]:
    """Train ``cfg`` on ``workers`` workers; returns {stage: final checkpoint}."""
    if workers < 1:
        raise UserError(f"--workers must be >= 1, got {workers}")
    if workers == 1 and not gpus_per_worker:
        return train(cfg, resume=resume, stop_after=stop_after, progress=progress, device=device)
    return train_distributed(
        cfg, workers=workers, gpus_per_worker=gpus_per_worker, cpus_per_worker=cpus_per_worker,
        resume=resume, stop_after=stop_after, progress=progress,
    )  # fmt: skip


def _worker_loop(loop_config: dict[str, Any]) -> None:
    """Body of each Ray Train worker: the same ``train`` as a single-process run."""
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    dist = DistContext(
        rank=ctx.get_world_rank(),
        world_size=ctx.get_world_size(),
        device=ray.train.torch.get_device(),
    )
    if dist.device.type == "cpu":
        torch.set_num_threads(max(1, int(loop_config["cpus_per_worker"])))
    cfg = config_from_json(loop_config["config"])
    train(
        cfg,
        resume=loop_config["resume"],
        stop_after=loop_config["stop_after"],
        progress=loop_config["progress"],
        dist=dist,
    )


def train_distributed(
    cfg: RunConfig,
    *,
    workers: int,
    gpus_per_worker: float = 0.0,
    cpus_per_worker: float = 1.0,
    resume: bool = False,
    stop_after: int | None = None,
    progress: bool = True,
) -> dict[str, str]:
    """Run ``training.train.train`` on ``workers`` Ray Train workers; returns {stage: final checkpoint}."""
    from ray.train import RunConfig as RayRunConfig
    from ray.train import ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipeline.cluster import init_ray

    if workers < 1:
        raise UserError(f"--workers must be >= 1, got {workers}")
    if gpus_per_worker < 0:
        raise UserError(f"--gpus-per-worker must be >= 0, got {gpus_per_worker}")
    if cpus_per_worker <= 0:
        raise UserError(f"--cpus-per-worker must be > 0, got {cpus_per_worker}")
    init_ray()
    use_gpu = gpus_per_worker > 0
    resources = {"CPU": cpus_per_worker}
    if use_gpu:
        resources["GPU"] = gpus_per_worker
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={
            "config": cfg.to_json(),
            "resume": resume,
            "stop_after": stop_after,
            "progress": progress,
            "cpus_per_worker": cpus_per_worker,
        },
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=workers, use_gpu=use_gpu, resources_per_worker=resources
        ),
        run_config=RayRunConfig(
            name=cfg.name, storage_path=os.path.join(os.path.abspath(cfg.run_dir), "_ray")
        ),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    finals = {}
    for stage in cfg.stages:  # rank 0 recorded each finished stage in the shared run folder
        done = ck.read_done(stage_dir(cfg, stage))
        if done is not None:
            finals[stage.name] = done["final"]
    return finals
