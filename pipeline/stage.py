"""The shard-stage runner: one input shard is one unit of work, run by an elastic pool of Ray
actors (see `_run_ray`).

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

from pipeline.cli import UserError
from pipeline.store import Store, StoreError

log = logging.getLogger(__name__)

# Seconds a stage on a Ray cluster waits while no node can hold one of its workers (an autoscaler
# may be starting one: cloud GPU nodes take minutes) before it fails.
PLACEMENT_TIMEOUT = 600.0


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
        help="Ray cluster to attach to (default: RAY_ADDRESS, else one `ray start` runs on this "
        "machine, else an embedded local Ray; 'local' always embeds)",
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
    placement_timeout: float = PLACEMENT_TIMEOUT  # see _Placement

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {self.workers}")
        if self.max_retries < 0:
            raise ValueError(f"--max-retries must be >= 0, got {self.max_retries}")
        if self.gpus_per_worker < 0:
            raise ValueError(f"--gpus-per-worker must be >= 0, got {self.gpus_per_worker}")


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

    def ready(self) -> int:
        """Returns once ``__init__`` (the model load) has: the pool hands shards only after it."""
        return os.getpid()


def pending_shards(store: Store, spec: StageSpec) -> tuple[list[str], list[str]]:
    """(to do, already done) for a stage."""
    ingested = store.shards()
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
    todo, done = pending_shards(store, spec)
    summary = StageSummary(stage=spec.stage, skipped=done)
    ingest = store.completed("ingest")
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
        store.refresh_manifest()
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
    """The elastic actor pool. All ``--workers`` actors are asked for at once, whether or not the
    cluster holds them yet: Ray places what fits, and the rest wait as resource demand that an
    autoscaler sees (and that a node joining later takes). A shard goes only to an actor whose
    ``ready`` call has returned — its model is loaded — so a replacement still waiting for a node
    never sits on one. An actor lost with its node is replaced; its shard is retried."""
    import ray

    from pipeline.cluster import init_ray

    init_ray()
    Actor = ray.remote(
        num_cpus=spec.cpus_per_worker, num_gpus=spec.gpus_per_worker, max_restarts=0
    )(_Host)
    wanted = min(spec.workers, len(todo))
    actors: list[Any] = [None] * wanted
    loading: dict[Any, int] = {}  # ready ref -> slot
    inflight: dict[Any, tuple[int, str]] = {}  # run ref -> (slot, shard)
    idle: deque[int] = deque()
    pending = deque(todo)
    attempts: Counter = Counter()
    placement = _Placement(spec, wanted)
    init_failures = 0

    def spawn(slot: int) -> None:
        actors[slot] = Actor.remote(spec.worker_cls, spec.worker_kwargs)
        loading[actors[slot].ready.remote()] = slot

    def drop(slot: int) -> None:
        ray.kill(actors[slot], no_restart=True)
        actors[slot] = None

    for slot in range(wanted):
        spawn(slot)
    last_refresh = time.monotonic()
    try:
        while pending or inflight:
            while idle and pending:
                slot = idle.popleft()
                shard = pending.popleft()
                inflight[actors[slot].run.remote(shard)] = (slot, shard)
            placement.check(running=len(idle) + len(inflight))
            if not loading and not inflight and not idle:
                for shard in pending:  # every worker failed to start, none left to try
                    summary.failed[shard] = placement.start_error
                return
            done, _ = ray.wait([*inflight, *loading], num_returns=1, timeout=5.0)
            for ref in done:
                if ref in loading:
                    slot = loading.pop(ref)
                    try:
                        ray.get(ref)
                        idle.append(slot)
                    except ray.exceptions.RayActorError as e:
                        drop(slot)
                        if not e.actor_init_failed:  # lost with its node before it was ready
                            log.warning("a worker was lost while loading; starting another")
                            spawn(slot)
                            continue
                        init_failures += 1
                        placement.start_error = f"worker failed to start: {_last_line(e)}"
                        log.warning("%s", placement.start_error)
                        if init_failures <= spec.max_retries:
                            spawn(slot)
                    continue
                slot, shard = inflight.pop(ref)
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
                        pending.appendleft(shard)  # next ready actor takes it first
                    if dead:  # a fresh process, placed wherever the cluster has room
                        drop(slot)
                        spawn(slot)
                        continue
                idle.append(slot)
            if time.monotonic() - last_refresh > 30:
                store.refresh_manifest()
                last_refresh = time.monotonic()
    finally:
        for a in actors:
            if a is not None:
                ray.kill(a, no_restart=True)


class _Placement:
    """Watches whether the cluster can hold the stage's workers (every few seconds, from the
    nodes' total resources): warns while it holds fewer than asked, and fails the stage when no
    node can hold even one — at once on the embedded local Ray (no node will ever join), after
    ``spec.placement_timeout`` seconds on a cluster (an autoscaler may be starting nodes)."""

    def __init__(self, spec: StageSpec, wanted: int):
        self.spec, self.wanted = spec, wanted
        self.reported: int | None = None  # capacity last warned about
        self.none_since: float | None = None
        self.next_check = 0.0
        self.start_error = "worker failed to start"

    def check(self, running: int) -> None:
        from pipeline.cluster import cluster_address, is_embedded

        now = time.monotonic()
        if now < self.next_check:
            return
        self.next_check = now + 5.0
        fit, nodes = workers_that_fit(self.spec.cpus_per_worker, self.spec.gpus_per_worker)
        need = (
            f"one worker with --cpus-per-worker {self.spec.cpus_per_worker:g} "
            f"--gpus-per-worker {self.spec.gpus_per_worker:g}"
        )
        if fit == 0 and running == 0:
            where = f"the Ray cluster at {cluster_address()} ({nodes})"
            if is_embedded():
                raise UserError(f"{where} is not enough for {need}")
            self.none_since = self.none_since or now
            if now - self.none_since > self.spec.placement_timeout:
                raise UserError(
                    f"no node of {where} could hold {need} for "
                    f"{self.spec.placement_timeout:g} s; add nodes or ask for less per worker"
                )
            if self.reported != 0:
                log.warning(
                    "no node of %s can hold %s yet; waiting up to %g s for nodes to join",
                    where, need, self.spec.placement_timeout,
                )  # fmt: skip
        else:
            self.none_since = None
            if fit < self.wanted and fit != self.reported:
                log.warning(
                    "--workers %d: the Ray cluster (%s) holds %d worker(s) at once; the other %d "
                    "wait for nodes to join (an autoscaler sees them as demand)",
                    self.wanted, nodes, fit, self.wanted - fit,
                )  # fmt: skip
        self.reported = fit


def workers_that_fit(cpus: float, gpus: float) -> tuple[int, str]:
    """How many workers of ``cpus``/``gpus`` the live nodes hold at once (node by node: an actor
    never spans nodes), and the nodes in words: "3 node(s), 6 CPU(s), 0 GPU(s)"."""
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    fit = 0
    for res in nodes:
        per = [
            int((res.get(k, 0.0) + 1e-9) // need)
            for k, need in (("CPU", cpus), ("GPU", gpus))
            if need > 0
        ]
        fit += min(per) if per else 1 << 30  # a worker that needs nothing always fits
    total = {k: sum(r.get(k, 0.0) for r in nodes) for k in ("CPU", "GPU")}
    words = f"{len(nodes)} node(s), {total['CPU']:g} CPU(s), {total['GPU']:g} GPU(s)"
    return fit, words


def _shard_list(text: str | None) -> list[str] | None:
    """``--shards 000001,000007`` → each name once, in order; None without the flag."""
    if text is None:
        return None
    names = list(dict.fromkeys(s.strip() for s in text.split(",") if s.strip()))
    if not names:
        raise ValueError(f"--shards {text!r}: no shard names (e.g. --shards 000001,000007)")
    return names


def _last_line(e: BaseException) -> str:
    """An actor's creation error ends with the worker's own exception, e.g. 'OSError: …'."""
    text = str(e).strip().splitlines()
    return text[-1].strip() if text else type(e).__name__


def _one_line(e: BaseException) -> str:
    cause = getattr(e, "cause", None) or e
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[-1] if text else ''}"
