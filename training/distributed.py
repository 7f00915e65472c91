"""Scale-out: the same training loop on N workers through Ray Train's ``TorchTrainer``.

``DistContext`` is what the loop knows about its process group (rank, world size, device) and
the few collectives it uses; a single-process run has a trivial one. ``wrap_model`` applies the
strategy: DDP (every rank holds the whole model; gradients all-reduced) or FSDP (PyTorch's
``fully_shard``, per transformer block, for models whose optimizer state does not fit one GPU).
``train_distributed`` starts the workers: one CPU each (gloo) or ``gpus_per_worker`` GPUs each
(NCCL); Ray's controller holds no CPU, so N workers fit on N CPUs. The run folder must be visible
to every worker (one machine, or a shared filesystem): rank 0 writes checkpoints, every rank reads
them on resume.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger(__name__)


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @classmethod
    def single(cls) -> DistContext:
        return cls(
            device=torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        )

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    def all_gather_object(self, obj: Any) -> list[Any]:
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        """Mean of a tensor over ranks (in place on a copy)."""
        t = t.detach().clone()
        if self.distributed:
            torch.distributed.all_reduce(t)
            t /= self.world_size
        return t

    def broadcast_object(self, obj: Any) -> Any:
        if not self.distributed:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]


def wrap_model(model: torch.nn.Module, strategy: str, ctx: DistContext) -> torch.nn.Module:
    """DDP/FSDP for several ranks, the model itself for one."""
    if not ctx.distributed:
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        return DDP(model, device_ids=ids)
    if strategy == "fsdp":
        shard(model)
        return model
    raise ValueError(f"strategy must be 'ddp' or 'fsdp', got {strategy!r}")


def shard(model: torch.nn.Module) -> None:
    """FSDP2: one unit per transformer block plus the root (in place)."""
    from torch.distributed.fsdp import fully_shard

    for block in model.transformer_blocks:
        fully_shard(block)
    fully_shard(model)


def local(t: torch.Tensor) -> torch.Tensor:
    """The rank-local part of a (possibly FSDP-sharded) tensor."""
    return t.to_local() if hasattr(t, "to_local") else t


# ---- Ray Train ------------------------------------------------------------------------------
def _worker_loop(loop_config: dict[str, Any]) -> None:
    """Body of each Ray Train worker: the same ``train`` as a single-process run."""
    import ray.train
    import ray.train.torch

    from training.config import config_from_json
    from training.train import train

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
    cfg: Any,
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
        raise ValueError(f"--workers must be >= 1, got {workers}")
    if gpus_per_worker < 0:
        raise ValueError(f"--gpus-per-worker must be >= 0, got {gpus_per_worker}")
    if cpus_per_worker <= 0:
        raise ValueError(f"cpus per worker must be > 0, got {cpus_per_worker}")
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
    from training.train import read_done, stage_dir

    finals = {}
    for stage in cfg.stages:  # rank 0 recorded each finished stage in the shared run folder
        done = read_done(stage_dir(cfg, stage))
        if done is not None:
            finals[stage.name] = done["final"]
    return finals
