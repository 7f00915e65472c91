"""Ray connection: attach to a running cluster (RAY_ADDRESS, as under `ray job submit`, or
--ray-address) or start an embedded local Ray for a laptop run."""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading

from pipeline.errors import UserError

log = logging.getLogger(__name__)

DEFAULT_RAY_TIMEOUT = 30.0
_timeout = DEFAULT_RAY_TIMEOUT
# Set when a ray.init timed out and still runs in its thread: the CLI then exits at once rather
# than wait for it (and print Ray's own connection warnings after its one-line error).
connect_hung = threading.Event()


def set_ray_timeout(seconds: float) -> None:
    """Seconds `init_ray` waits for a cluster to answer (``--ray-timeout``)."""
    global _timeout
    if not seconds > 0:
        raise UserError(f"--ray-timeout must be > 0 seconds, got {seconds:g}")
    _timeout = float(seconds)


class _DropSigtermWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("SIGTERM handler is not set")


def connect_ray(address: str, timeout: float | None = None) -> None:
    """``ray.init(address=…)`` that fails with one line instead of hanging or printing pages.

    Ray retries an unreachable address for minutes (with C++ warnings) and rejects an
    ``http://`` address with a multi-line message. So the address is checked first (an HTTP URL
    is the dashboard / job-submission address, not the cluster's), the host:port is probed with
    a TCP connect, and ``ray.init`` itself must return within ``timeout`` seconds.
    """
    import ray

    timeout = _timeout if timeout is None else timeout
    where = "--ray-address/RAY_ADDRESS"
    if address.startswith(("http://", "https://")):
        raise UserError(
            f"{where} {address} is an HTTP (dashboard/job submission) address; stage commands "
            "attach to the cluster's GCS address, e.g. <head-node-ip>:6379 (or use "
            "'ray job submit', which sets RAY_ADDRESS for the job)"
        )
    if address != "auto":
        hostport = address.split("://", 1)[-1].rstrip("/")
        host, _, port = hostport.rpartition(":")
        if not host or not port.isdigit():
            raise UserError(
                f"{where} {address!r}: expected HOST:PORT (e.g. 10.0.0.1:6379) or 'auto'"
            )
        try:
            socket.create_connection((host, int(port)), timeout=timeout).close()
        except OSError as e:
            why = (
                f"no answer within {timeout:g} s, --ray-timeout"
                if isinstance(e, TimeoutError)
                else (e.strerror or str(e)).lower()
            )
            raise UserError(
                f"cannot reach the Ray cluster at {address} ({why}); start it with 'ray start --head', fix the address, or unset "
                "RAY_ADDRESS to use an embedded local Ray"
            ) from None
    failure: list[BaseException] = []

    def init() -> None:
        try:
            ray.init(address=address, log_to_driver=True)
        except BaseException as e:  # handed to the caller below
            failure.append(e)

    # ray.init runs in a thread so that it can time out. Ray sets its SIGTERM handler (exit, so
    # clean-up runs) only from the main thread and warns otherwise: set the same one here.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))
    quiet = _DropSigtermWarning()
    ray_log = logging.getLogger("ray._private.worker")
    ray_log.addFilter(quiet)

    # Ray's C++ client logs every failed connection attempt; our one line says it instead.
    saved = os.environ.get("RAY_BACKEND_LOG_LEVEL")
    os.environ["RAY_BACKEND_LOG_LEVEL"] = "fatal"
    try:
        thread = threading.Thread(target=init, name="ray-connect", daemon=True)
        thread.start()
        thread.join(timeout)
    finally:
        ray_log.removeFilter(quiet)
        if saved is None:
            os.environ.pop("RAY_BACKEND_LOG_LEVEL", None)
        else:
            os.environ["RAY_BACKEND_LOG_LEVEL"] = saved
    if thread.is_alive():
        connect_hung.set()
        raise UserError(
            f"the Ray cluster at {address} did not answer within {timeout:g} s (--ray-timeout); "
            "is it a Ray GCS address (port 6379 by default)?"
        )
    if failure:
        e = failure[0]
        text = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"cannot attach to the Ray cluster at {address}: {text}") from None


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to Ray once per process. Without an address, start a local Ray sized to this machine."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        log.info("attaching to Ray cluster at %s", address)
        connect_ray(address)
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
