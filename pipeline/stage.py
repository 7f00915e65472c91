"""The shard-stage runner: one input shard is one unit of work, run by a pool of Ray actors.

A stage worker is a plain picklable class: ``__init__`` loads the model, ``__call__(shard)``
reads image shard N, writes output shard N of the stage atomically, then its status record, and
returns that record. This module only schedules: it skips shards already done, retries a shard
whose actor died or raised (a bounded number of times), shows progress and keeps the manifest
current. The same worker runs without Ray (``use_ray=False``) for debugging and unit tests.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from pipeline.errors import UserError
from pipeline.store import Store, StoreError

log = logging.getLogger(__name__)


def add_stage_flags(p: argparse.ArgumentParser, worker: str = "model actors") -> None:
    """The placement flags every shard stage takes (caption, score, features); read them back
    with `stage_args`."""
    p.add_argument(
        "--workers", type=int, default=1, help=f"{worker}, one model copy each (default 1)"
    )
    p.add_argument(
        "--gpus-per-worker",
        type=float,
        default=None,
        help="GPUs per worker (default: 1 when the cluster has GPUs, else 0)",
    )
    p.add_argument(
        "--cpus-per-worker",
        type=float,
        default=1.0,
        help="CPUs Ray reserves per worker (default 1)",
    )
    p.add_argument(
        "--max-retries",
        type=int,
        default=2,
        help="retries of a shard whose worker died or failed (default 2)",
    )
    p.add_argument("--shards", default=None, help="comma-separated shard names (default: all)")
    p.add_argument(
        "--ray-address",
        default=None,
        help="Ray cluster to attach to (default: RAY_ADDRESS, else an embedded local Ray)",
    )
    p.add_argument(
        "--no-ray", action="store_true", help="run in this process, without Ray (debugging)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def stage_args(args: argparse.Namespace) -> dict[str, Any]:
    """`add_stage_flags`' values as the keyword arguments of the stage functions."""
    return {
        "workers": args.workers,
        "gpus_per_worker": args.gpus_per_worker,
        "cpus_per_worker": args.cpus_per_worker,
        "max_retries": args.max_retries,
        "shards": _shard_list(args.shards),
        "ray_address": args.ray_address,
        "use_ray": not args.no_ray,
        "progress": not args.no_progress,
    }


@dataclass
class StageSpec:
    stage: str  # "<kind>/<tag>", e.g. "captions/llava-1.5-7b"
    worker_cls: type  # worker_cls(**worker_kwargs)(shard) -> status record
    worker_kwargs: dict[str, Any]
    settings: dict[str, Any]  # resolved settings, recorded in STORE/_status/<stage>/config.json
    shards: list[str] | None = None  # default: every ingested shard
    workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    max_retries: int = 2

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise UserError(f"--workers must be >= 1, got {self.workers}")
        if self.max_retries < 0:
            raise UserError(f"--max-retries must be >= 0, got {self.max_retries}")
        if self.gpus_per_worker < 0:
            raise UserError(f"--gpus-per-worker must be >= 0, got {self.gpus_per_worker}")


@dataclass
class StageSummary:
    stage: str
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # shard -> last error
    rows: int = 0
    errors: Counter = field(default_factory=Counter)
    retries: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed

    def lines(self) -> list[str]:
        rate = self.rows / self.seconds if self.seconds else 0.0
        out = [
            f"{self.stage}: {len(self.done)} shard(s) done, {len(self.skipped)} skipped as already done, "
            f"{len(self.failed)} failed; {self.rows} rows at {rate:.2f} rows/s; {self.retries} retries",
        ]
        for reason, n in self.errors.most_common():
            out.append(f"  error  {n:>7}  {reason}")
        for shard, err in sorted(self.failed.items()):
            out.append(f"  FAILED shard {shard}: {err}")
        if self.failed:
            out.append("  re-run the same command to retry the failed shards")
        return out


class _Host:
    """Ray actor body: owns one worker instance (and so one model copy)."""

    def __init__(self, worker_cls: type, kwargs: dict[str, Any]):
        self.worker = worker_cls(**kwargs)

    def run(self, shard: str) -> dict[str, Any]:
        return self.worker(shard)

    def pid(self) -> int:
        return os.getpid()


def pending_shards(
    store: Store, spec: StageSpec, ingested: list[str] | None = None
) -> tuple[list[str], list[str]]:
    """(to do, already done) for a stage (``ingested``: the store's shards, if already read)."""
    ingested = store.shards() if ingested is None else ingested
    wanted = spec.shards if spec.shards is not None else ingested
    missing = sorted(set(wanted) - set(ingested))
    if missing:
        raise StoreError(f"shard(s) not ingested: {', '.join(missing[:5])}")
    done = set(store.completed(spec.stage))
    return [s for s in wanted if s not in done], [s for s in wanted if s in done]


def run_stage(
    store: Store, spec: StageSpec, progress: bool = True, use_ray: bool = True
) -> StageSummary:
    """Run ``spec`` over the store's shards; completed shards are skipped, so re-running resumes."""
    start = time.perf_counter()
    store.require()
    store.claim_stage(spec.stage, spec.settings)
    ingest = store.completed("ingest")
    todo, done = pending_shards(store, spec, sorted(ingest))
    summary = StageSummary(stage=spec.stage, skipped=done)
    total_rows = sum(ingest[s].get("ok", 0) for s in todo)
    bar = tqdm(total=total_rows, desc=spec.stage, unit="row", disable=not progress, smoothing=0.1)

    def finished(shard: str, rec: dict[str, Any]) -> None:
        summary.done.append(shard)
        summary.rows += int(rec.get("rows", 0))
        summary.errors.update(rec.get("errors_by_reason", {}))
        bar.update(ingest[shard].get("ok", 0))

    try:
        if todo:
            if use_ray:
                _run_ray(spec, todo, summary, finished, store)
            else:
                _run_local(spec, todo, summary, finished)
    finally:
        bar.close()
        # Only this stage's records can have changed: list it again (it was listed just above
        # if nothing ran); the other stages keep their manifest entries.
        store.refresh_manifest(stages=[spec.stage] if todo else [])
    summary.seconds = time.perf_counter() - start
    return summary


def _run_local(spec: StageSpec, todo: list[str], summary: StageSummary, finished) -> None:
    worker = spec.worker_cls(**spec.worker_kwargs)
    for shard in todo:
        for attempt in range(spec.max_retries + 1):
            try:
                finished(shard, worker(shard))
                break
            except Exception as e:  # a shard-level failure: retry, then report
                log.warning("shard %s attempt %d failed: %s", shard, attempt + 1, e)
                if attempt == spec.max_retries:
                    summary.failed[shard] = f"{type(e).__name__}: {e}"
                else:
                    summary.retries += 1


def _run_ray(
    spec: StageSpec, todo: list[str], summary: StageSummary, finished, store: Store
) -> None:
    import ray

    from pipeline.cluster import init_ray

    init_ray()
    Actor = ray.remote(
        num_cpus=spec.cpus_per_worker, num_gpus=spec.gpus_per_worker, max_restarts=0
    )(_Host)

    def spawn():
        return Actor.remote(spec.worker_cls, spec.worker_kwargs)

    n = min(fitting_workers(spec.workers, spec.cpus_per_worker, spec.gpus_per_worker), len(todo))
    actors = [spawn() for _ in range(n)]
    idle = deque(range(n))
    pending = deque(todo)
    attempts: Counter = Counter()
    inflight: dict[Any, tuple[int, str]] = {}
    last_refresh = time.monotonic()
    try:
        while pending or inflight:
            while idle and pending:
                i = idle.popleft()
                shard = pending.popleft()
                inflight[actors[i].run.remote(shard)] = (i, shard)
            ready, _ = ray.wait(list(inflight), num_returns=1, timeout=5.0)
            for ref in ready:
                i, shard = inflight.pop(ref)
                try:
                    finished(shard, ray.get(ref))
                except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as e:
                    dead = isinstance(e, ray.exceptions.RayActorError)
                    attempts[shard] += 1
                    cause = "worker died" if dead else _one_line(e)
                    log.warning("shard %s attempt %d failed: %s", shard, attempts[shard], cause)
                    if attempts[shard] > spec.max_retries:
                        summary.failed[shard] = cause
                    else:
                        summary.retries += 1
                        pending.appendleft(shard)  # next free actor takes it first
                    if dead:  # replace the actor (a fresh process, model loaded again)
                        ray.kill(actors[i], no_restart=True)
                        actors[i] = spawn()
                idle.append(i)
            if time.monotonic() - last_refresh > 30:
                store.refresh_manifest()
                last_refresh = time.monotonic()
    finally:
        for a in actors:
            ray.kill(a, no_restart=True)


def _shard_list(text: str | None) -> list[str] | None:
    """``--shards 000001,000007`` → each name once, in order; None without the flag."""
    if text is None:
        return None
    names = list(dict.fromkeys(s.strip() for s in text.split(",") if s.strip()))
    if not names:
        raise UserError(f"--shards {text!r}: no shard names (e.g. --shards 000001,000007)")
    return names


def fitting_workers(wanted: int, cpus: float, gpus: float) -> int:
    """How many of ``wanted`` workers the Ray cluster holds at once. An actor the cluster cannot
    place waits forever, and so would the shards handed to it: ask for more than fit and the
    stage runs fewer (with a warning); if not even one fits, that is an error. On an autoscaling
    cluster, start the nodes first."""
    import ray

    total = ray.cluster_resources()
    have_cpus, have_gpus = total.get("CPU", 0.0), total.get("GPU", 0.0)
    fit = wanted
    if gpus > 0:
        fit = min(fit, int(have_gpus // gpus + 1e-9))
    if cpus > 0:
        fit = min(fit, int(have_cpus // cpus + 1e-9))
    if fit < 1:
        raise UserError(
            f"the Ray cluster has {have_cpus:g} CPU(s) and {have_gpus:g} GPU(s): not enough for one "
            f"worker with --cpus-per-worker {cpus:g} --gpus-per-worker {gpus:g}"
        )
    if fit < wanted:
        log.warning(
            "--workers %d: the Ray cluster (%g CPUs, %g GPUs) holds %d worker(s) of %g CPU(s) and "
            "%g GPU(s) at once; running %d",
            wanted, have_cpus, have_gpus, fit, cpus, gpus, fit,
        )  # fmt: skip
    return fit


def _one_line(e: BaseException) -> str:
    cause = getattr(e, "cause", None) or e
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[-1] if text else ''}"
