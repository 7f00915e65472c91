"""Ray connection: attach to a running cluster (RAY_ADDRESS, as under `ray job submit`,
--ray-address, or the cluster `ray start` left on this machine) or start an embedded local Ray
for a laptop run (``--ray-address local`` forces that)."""

from __future__ import annotations

import logging
import os

from pipeline.cli import UserError

log = logging.getLogger(__name__)

_embedded = False  # this process started its own Ray (no node will ever join it)


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to Ray once per process. Without an address, start a local Ray sized to this machine."""
    import ray

    global _embedded
    if ray.is_initialized():
        return
    address, source = _resolve_address(address)
    if address is not None:
        log.info("attaching to Ray cluster at %s (%s)", address, source)
        try:
            ray.init(address=address, log_to_driver=True)
        except (ConnectionError, RuntimeError) as e:
            raise UserError(_attach_error(address, source, e)) from None
        return
    log.info("starting an embedded local Ray")
    ray.init(
        address="local",
        num_cpus=num_cpus,
        include_dashboard=False,
        log_to_driver=True,
        configure_logging=True,
        logging_level=logging.WARNING,
    )
    _embedded = True


def _resolve_address(address: str | None) -> tuple[str | None, str]:
    """(cluster address or None for an embedded Ray, where it came from): ``--ray-address``, else
    RAY_ADDRESS, else the address file that `ray start` writes on this machine (Ray's own rule)."""
    if address == "local":
        return None, "--ray-address local"
    if address:
        return address, "--ray-address"
    if os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"], "RAY_ADDRESS"
    from ray._private.utils import read_ray_address

    found = read_ray_address()
    return (found, "started on this machine with `ray start`") if found else (None, "")


def _attach_error(address: str, source: str, e: BaseException) -> str:
    full = f"{e} {e.__cause__ or ''}"
    if "InvalidAuthToken" in full or "Unauthenticated" in full:
        why = "it refused this client's auth token (none, or a wrong one)"
    else:
        text = str(e).strip().splitlines()
        why = text[-1] if text else type(e).__name__
    return (
        f"cannot attach to the Ray cluster at {address} ({source}): {why}. If it uses token "
        "auth, give this client its token (RAY_AUTH_MODE=token with RAY_AUTH_TOKEN=<token> or "
        "RAY_AUTH_TOKEN_PATH=<file>); or run on an embedded Ray here with --ray-address local"
    )


def is_embedded() -> bool:
    """Whether this process started the Ray it uses (so its nodes are all there will be)."""
    return _embedded


def cluster_address() -> str:
    """The connected Ray's GCS address, for messages."""
    import ray

    try:
        return ray.get_runtime_context().gcs_address
    except Exception:  # noqa: BLE001 - only for a message
        return "?"


def place_workers(gpus_per_worker: float | None, address: str | None, use_ray: bool) -> float:
    """GPUs per stage worker: as given, else 1 when the cluster (or, without Ray, this machine)
    has a GPU, else 0. With Ray it connects first (``address``, else RAY_ADDRESS, else local)."""
    if gpus_per_worker is not None and gpus_per_worker < 0:
        raise ValueError(f"--gpus-per-worker must be >= 0, got {gpus_per_worker:g}")
    if use_ray:
        init_ray(address)
    if gpus_per_worker is not None:
        return gpus_per_worker
    if use_ray:
        import ray

        return 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
    import torch

    return 1.0 if torch.cuda.is_available() else 0.0
