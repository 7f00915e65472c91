"""Ray connection: attach to a running cluster (--ray-address, RAY_ADDRESS as under `ray job
submit`, or the cluster `ray start` left on this machine) or start an embedded local Ray for a
laptop run (``--ray-address local`` forces that)."""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading

from pipeline.errors import UserError

log = logging.getLogger(__name__)

_embedded = False  # this process started its own Ray (no node will ever join it)
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


def connect_ray(address: str, timeout: float | None = None, source: str = "RAY_ADDRESS") -> None:
    """``ray.init(address=…)`` that fails with one line instead of hanging or printing pages.

    Ray retries an unreachable address for minutes (with C++ warnings) and rejects an
    ``http://`` address with a multi-line message. So the address is checked first (an HTTP URL
    is the dashboard / job-submission address, not the cluster's), the host:port is probed with
    a TCP connect, and ``ray.init`` itself must return within ``timeout`` seconds. ``source``
    (--ray-address, RAY_ADDRESS, `ray start`'s address file) is named in every message, and a
    refused token says how to pass one.
    """
    import ray

    timeout = _timeout if timeout is None else timeout
    where = source
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
                f"cannot reach the Ray cluster at {address} ({why}), given by {source}; start "
                "it with 'ray start --head', fix the address, or use an embedded local Ray with "
                "--ray-address local"
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
            f"the Ray cluster at {address} (given by {source}) did not answer within {timeout:g} s "
            "(--ray-timeout); is it a Ray GCS address (port 6379 by default), and does this "
            f"client hold its token? {_HOW}"
        )
    if failure:
        raise UserError(_attach_error(address, source, failure[0])) from None


_HOW = (
    "If it uses token auth, give this client its token (RAY_AUTH_MODE=token with "
    "RAY_AUTH_TOKEN=<token> or RAY_AUTH_TOKEN_PATH=<file>); or run on an embedded Ray here with "
    "--ray-address local"
)


def _attach_error(address: str, source: str, e: BaseException) -> str:
    full = f"{e} {e.__cause__ or ''}"
    if "InvalidAuthToken" in full or "Unauthenticated" in full:
        why = "it refused this client's auth token (none, or a wrong one)"
    else:
        why = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return f"cannot attach to the Ray cluster at {address} (given by {source}): {why}. {_HOW}"


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
    return (found, "the address file `ray start` wrote on this machine") if found else (None, "")


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to Ray once per process. Without an address, start a local Ray sized to this machine."""
    import ray

    global _embedded
    if ray.is_initialized():
        return
    address, source = _resolve_address(address)
    if address is not None:
        log.info("attaching to Ray cluster at %s (%s)", address, source)
        connect_ray(address, source=source)
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


# The settings a stage's workers need to read the store as the driver does. Workers of an
# embedded Ray inherit them; on a cluster they travel in the workers' runtime_env.
FORWARDED_ENV = ("ALPHASET_STORAGE_OPTIONS", "ALPHASET_STATUS_READS")


def worker_runtime_env() -> dict | None:
    """The runtime_env for stage workers on a cluster: this process's ALPHASET_* store settings
    (``--storage-options`` included), so nodes started elsewhere open the store the same way.
    None on the embedded local Ray (its workers inherit this environment) or with none set.
    Credentials are not forwarded: nodes use their own (instance roles, ``~/.aws``), or the
    job's runtime_env."""
    env = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
    return {"env_vars": env} if env and not _embedded else None


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
