"""Ray connection: attach to a running cluster (RAY_ADDRESS, as under `ray job submit`, or
--ray-address) or start an embedded local Ray for a laptop run."""

from __future__ import annotations

import logging
import os

from pipeline.errors import UserError

log = logging.getLogger(__name__)


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to Ray once per process. Without an address, start a local Ray sized to this machine."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        log.info("attaching to Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=True)
        return
    log.info("starting an embedded local Ray")
    ray.init(
        num_cpus=num_cpus,
        include_dashboard=False,
        log_to_driver=True,
        configure_logging=True,
        logging_level=logging.WARNING,
    )


def place_workers(gpus_per_worker: float | None, address: str | None, use_ray: bool) -> float:
    """GPUs per stage worker: as given, else 1 when the cluster (or, without Ray, this machine)
    has a GPU, else 0. With Ray it connects first (``address``, else RAY_ADDRESS, else local)."""
    if gpus_per_worker is not None and gpus_per_worker < 0:
        raise UserError(f"--gpus-per-worker must be >= 0, got {gpus_per_worker:g}")
    if use_ray:
        init_ray(address)
    if gpus_per_worker is not None:
        return gpus_per_worker
    if use_ray:
        import ray

        return 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
    import torch

    return 1.0 if torch.cuda.is_available() else 0.0
