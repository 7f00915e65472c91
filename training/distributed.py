"""Scale-out: the same training loop on N workers through Ray Train's ``TorchTrainer``.

``DistContext`` is what the loop knows about its process group (rank, world size, device) and
the few collectives it uses; a single-process run has a trivial one. ``wrap_model`` applies the
strategy: DDP (every rank holds the whole model; gradients all-reduced) or FSDP (PyTorch's
``fully_shard``, per transformer block, for models whose optimizer state does not fit one GPU).
training.launch starts the workers through Ray Train.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from pipeline.cli import UserError

log = logging.getLogger(__name__)


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")  # device-ok: the dataclass default, set per rank

    @classmethod
    def single(cls, device: str | torch.device | None = None) -> DistContext:
        """One process on ``device`` (default: the first CUDA device when there is one)."""
        return cls(device=resolve_device(device))

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


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``--device``: "cuda", "cuda:1", "cpu" … (None/"auto": CUDA when available, else CPU)."""
    if device is None or device == "auto":  # device-ok: --device's default
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise UserError(f"--device {device!r}: not a torch device (cuda, cuda:N, cpu)") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available on this machine")
    if dev.type == "cuda" and dev.index is None:  # device-ok: "cuda" → the current CUDA device
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


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
    raise UserError(f"strategy must be 'ddp' or 'fsdp', got {strategy!r}")


def shard(model: torch.nn.Module) -> None:
    """FSDP2: one unit per transformer block (the base's, and an objective's copies) plus the
    root (in place)."""
    from diffusers.models.attention import BasicTransformerBlock
    from torch.distributed.fsdp import fully_shard

    for block in [m for m in model.modules() if isinstance(m, BasicTransformerBlock)]:
        fully_shard(block)
    fully_shard(model)


def local(t: torch.Tensor) -> torch.Tensor:
    """The rank-local part of a (possibly FSDP-sharded) tensor."""
    return t.to_local() if hasattr(t, "to_local") else t
