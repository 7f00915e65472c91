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
import contextlib
import errno
import logging
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from pipeline import fs
from pipeline.cluster import DEFAULT_RAY_TIMEOUT, set_ray_timeout
from pipeline.errors import UserError
from pipeline.store import Store, StoreError

log = logging.getLogger(__name__)

# Seconds a stage on a Ray cluster waits while no node can hold one of its workers (an autoscaler
# may be starting one: cloud GPU nodes take minutes) before it fails.
PLACEMENT_TIMEOUT = 600.0


def add_stage_flags(p: argparse.ArgumentParser, worker: str = "model actors") -> None:
    """The placement and re-run flags every shard stage takes (caption, score, features); read
    them back with `stage_args`. Bad values are rejected at parse time, before anything runs."""
    from pipeline.cli import nonnegative_float, nonnegative_int, positive_float, positive_int

    p.add_argument(
        "--workers", type=positive_int, default=1, help=f"{worker}, one model copy each (default 1)"
    )
    p.add_argument(
        "--gpus-per-worker",
        type=nonnegative_float,
        default=None,
        help="GPUs per worker (default: 1 when the cluster has GPUs, else 0)",
    )
    p.add_argument(
        "--cpus-per-worker",
        type=nonnegative_float,
        default=1.0,
        help="CPUs Ray reserves per worker (default 1)",
    )
    p.add_argument(
        "--max-retries",
        type=nonnegative_int,
        default=2,
        help="retries of a shard whose worker died or failed (default 2)",
    )
    p.add_argument(
        "--shards", type=_shard_arg, default=None, help="comma-separated shard names (default: all)"
    )
    p.add_argument(
        "--retry-errors",
        action="store_true",
        help="redo done shards that have error rows (e.g. after fixing the cause)",
    )
    p.add_argument(
        "--verify-done",
        action="store_true",
        help="recheck the checksum of every done shard before skipping it (reads every output)",
    )
    p.add_argument(
        "--ray-address",
        default=None,
        help="Ray cluster to attach to (default: RAY_ADDRESS, else one `ray start` runs on this "
        "machine, else an embedded local Ray; 'local' always embeds)",
    )
    p.add_argument(
        "--ray-timeout",
        type=positive_float,
        default=None,
        help=f"seconds to wait for the Ray cluster to answer (default {DEFAULT_RAY_TIMEOUT:g})",
    )
    p.add_argument(
        "--no-ray", action="store_true", help="run in this process, without Ray (debugging)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


@dataclass
class RunOptions:
    """How `run_stage` treats shards already done; set once per command by `stage_args`."""

    retry_errors: bool = False  # redo done shards with error rows
    verify_done: bool = False  # recheck checksums (not just sizes) before skipping


_options = RunOptions()


def set_run_options(options: RunOptions) -> None:
    """Set how every following `run_stage` of this process treats done shards (the CLI's
    ``--retry-errors`` / ``--verify-done``; a notebook may call it too)."""
    global _options
    _options = options


def stage_args(args: argparse.Namespace) -> dict[str, Any]:
    """`add_stage_flags`' values as the keyword arguments of the stage functions.

    Also checks ``--shards`` against the store (before any file is written or Ray starts) and
    sets the process-wide `RunOptions` and Ray timeout, which the stage functions do not take.
    """
    shards = args.shards
    if isinstance(shards, str):
        shards = _shard_list(shards)
    if shards is not None and getattr(args, "store", None):
        check_shards(Store(args.store), shards)
    set_run_options(
        RunOptions(
            retry_errors=getattr(args, "retry_errors", False),
            verify_done=getattr(args, "verify_done", False),
        )
    )
    if getattr(args, "ray_timeout", None) is not None:
        set_ray_timeout(args.ray_timeout)
    return {
        "workers": args.workers,
        "gpus_per_worker": args.gpus_per_worker,
        "cpus_per_worker": args.cpus_per_worker,
        "max_retries": args.max_retries,
        "shards": shards,
        "ray_address": args.ray_address,
        "use_ray": not args.no_ray,
        "progress": not args.no_progress,
    }


def check_shards(store: Store, shards: list[str]) -> None:
    """A `StoreError` unless every name in ``shards`` is an ingested shard of ``store``."""
    store.require()
    ingested = set(store.shards())
    missing = [s for s in shards if s not in ingested]
    if missing:
        have = ranges(sorted(ingested)) or "none"
        raise StoreError(
            f"--shards: shard(s) not ingested in {store.root}: {', '.join(missing[:5])} "
            f"(ingested: {have})"
        )


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
    # Other stages whose records the workers write too (score writes embeddings/<tag>): their
    # leases are taken and their indexes sealed with this stage's.
    also_writes: tuple[str, ...] = ()

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
    lost: int = 0  # shards requeued because their worker's node was lost (not retries)
    seconds: float = 0.0
    redo: dict[str, str] = field(default_factory=dict)  # done shard -> why it is redone
    stopped: str | None = None  # why the run stopped early (disk full …)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed and self.stopped is None

    def lines(self) -> list[str]:
        rate = self.rows / self.seconds if self.seconds else 0.0
        out = [
            f"{self.stage}: {len(self.done)} shard(s) done, {len(self.skipped)} skipped as already done, "
            f"{len(self.failed)} failed; {self.rows} rows at {rate:.2f} rows/s; {self.retries} retries",
        ]
        if self.lost:
            out.append(
                f"  requeued {self.lost} shard(s) whose worker was lost with its node "
                "(not counted against --max-retries)"
            )
        for why, n in Counter(self.redo.values()).most_common():
            out.append(f"  redone {n:>7}  done before, but {why}")
        for reason, n in self.errors.most_common():
            out.append(f"  error  {n:>7}  {reason}")
        for shard, err in sorted(self.failed.items()):
            out.append(f"  FAILED shard {shard}: {err}")
        for note in self.notes:
            out.append(f"  note: {note}")
        if self.stopped:
            out.append(f"  STOPPED: {self.stopped}")
        if self.failed or self.stopped:
            out.append("  re-run the same command to retry the failed shards")
        return out


class _Host:
    """Ray actor body: owns one worker instance (and so one model copy)."""

    def __init__(self, worker_cls: type, kwargs: dict[str, Any]):
        self.worker = worker_cls(**kwargs)

    def run(self, shard: str) -> dict[str, Any]:
        return self.worker(shard)

    def ready(self) -> str:
        """Returns once ``__init__`` (the model load) has: the pool hands shards only after it.
        Its node's id: a shard lost with that node is requeued, not counted as an attempt."""
        import ray

        return ray.get_runtime_context().get_node_id()


def pending_shards(
    store: Store,
    spec: StageSpec,
    redo: dict[str, str] | None = None,
    options: RunOptions | None = None,
    ingested: list[str] | None = None,
) -> tuple[list[str], list[str]]:
    """(to do, already done) for a stage.

    A shard counts as done only when its status record is there *and* its output file exists
    with the recorded size (one listing of the output folder, no reads); with
    ``options.verify_done`` its checksum is recomputed too, with ``options.retry_errors`` a
    shard with error rows is redone. Shards redone for such a reason are added to ``redo``.
    ``ingested``: the store's shards, when the caller has read them already.
    """
    options = options or _options
    ingested = store.shards() if ingested is None else ingested
    wanted = spec.shards if spec.shards is not None else ingested
    missing = sorted(set(wanted) - set(ingested))
    if missing:
        raise StoreError(f"shard(s) not ingested: {', '.join(missing[:5])}")
    records = store.completed(spec.stage)
    sizes = fs.sizes(store.stage_dir(spec.stage))
    todo, done = [], []
    for shard in wanted:
        rec = records.get(shard)
        why = None if rec is None else _redo_reason(store, spec.stage, shard, rec, sizes, options)
        if rec is None or why is not None:
            todo.append(shard)
            if why is not None and redo is not None:
                redo[shard] = why
        else:
            done.append(shard)
    return todo, done


def _redo_reason(
    store: Store,
    stage: str,
    shard: str,
    rec: dict[str, Any],
    sizes: dict[str, int],
    options: RunOptions,
) -> str | None:
    """Why a shard with a status record must be redone, or None to skip it."""
    from pipeline.store import sha256_url

    for size_field, rel in store.output_names(stage, shard, rec).items():
        name = rel.rsplit("/", 1)[-1]
        if name not in sizes:
            return "its output file is missing"
        if rec.get(size_field) is not None and int(rec[size_field]) != sizes[name]:
            return "its output file has another size than recorded"
        if (
            options.verify_done
            and rec.get("checksum")
            and sha256_url(store.url(rel)) != rec["checksum"]
        ):
            return "its output file fails its checksum"
    if options.retry_errors and int(rec.get("errors") or 0) > 0:
        return "it has error rows (--retry-errors)"
    return None


def run_stage(
    store: Store, spec: StageSpec, progress: bool = True, use_ray: bool = True
) -> StageSummary:
    """Run ``spec`` over the store's shards; completed shards are skipped, so re-running resumes.

    Holds the lease of ``spec.stage`` while it runs: a second run of the same stage and tag is
    refused with one line naming this one; other stages and tags run side by side. Nothing is
    written before the shard list is checked. A failed write (disk full) stops the run after the
    shards in flight; the summary says so.
    """
    from pipeline.repair import clean_stage

    start = time.perf_counter()
    store.require()
    # Start-up reads each folder once (on S3 a listing is a request per 1,000 files): its
    # listings are shared until this run writes into the folder. Workers then list afresh.
    # (With sealed status indexes only the output folder is listed: see `pipeline.store`.)
    snapshot = fs.ListingSnapshot()
    folders = [store.stage_dir(spec.stage)]
    if store.reads == "list":
        folders[:0] = [store.status_dir("ingest"), store.status_dir(spec.stage)]
    snapshot.prefetch(folders)
    with snapshot:
        ingest = store.completed("ingest")
        ingested = sorted(ingest)
        # 1. check the shard list, write nothing (no checksums read: default options)
        pending_shards(store, spec, options=RunOptions(), ingested=ingested)
    stages = [spec.stage, *spec.also_writes]
    with store.leases(stages) as lease, contextlib.ExitStack() as stack:
        writers = [
            stack.enter_context(store.writing(s, lease=one))
            for s, one in zip(stages, lease.leases, strict=True)
        ]
        with snapshot:
            # 2. under the lease: clear what crashed runs of this stage left, record the settings
            for stage in stages:  # the stage, and any other it writes (score: embeddings)
                for line in clean_stage(store, stage):
                    log.warning("%s", line)
                store.claim_stage(stage, spec.settings)
            summary = StageSummary(stage=spec.stage)
            todo, summary.skipped = pending_shards(store, spec, summary.redo, ingested=ingested)
            for shard in summary.redo:  # not done any more until redone
                store.remove_status(spec.stage, shard)
        total_rows = sum(ingest[s].get("ok", 0) for s in todo)
        bar = tqdm(
            total=total_rows, desc=spec.stage, unit="row", disable=not progress, smoothing=0.1
        )

        def finished(shard: str, rec: dict[str, Any]) -> None:
            summary.done.append(shard)
            summary.rows += int(rec.get("rows", 0))
            summary.errors.update(rec.get("errors_by_reason", {}))
            bar.update(ingest[shard].get("ok", 0))
            lease.check()

        try:
            if todo:
                for w in writers:
                    w.dispatch()  # workers write records from now on
                if use_ray:
                    _run_ray(spec, todo, summary, finished, store)
                else:
                    _run_local(spec, todo, summary, finished)
                for w in writers:
                    w.finish()  # and are all done: the listing below is final
        finally:
            bar.close()
            try:
                # Only this stage's records can have changed: list it again (if anything ran);
                # the other stages keep their manifest entries.
                store.refresh_manifest(stages=stages if todo else [])
            except OSError as e:  # disk full: the records are safe, the manifest is derived
                summary.notes.append(
                    f"manifest.json not updated ({e.strerror or e}); any later run rebuilds it"
                )
    summary.seconds = time.perf_counter() - start
    return summary


# errnos after which more writes are pointless: stop cleanly instead of failing every shard
STOP_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}


def stop_reason(e: BaseException) -> str | None:
    """A one-line reason to stop the whole run when ``e`` (or its cause) is a disk-full error."""
    cause = getattr(e, "cause", None) or e
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, OSError) and cause.errno in STOP_ERRNOS:
        where = f" writing {cause.filename}" if cause.filename else ""
        return f"{cause.strerror or cause}{where}; free space, then re-run the same command"
    return None


def _run_local(spec: StageSpec, todo: list[str], summary: StageSummary, finished) -> None:
    worker = spec.worker_cls(**spec.worker_kwargs)
    for shard in todo:
        for attempt in range(spec.max_retries + 1):
            try:
                finished(shard, worker(shard))
                break
            except Exception as e:  # a shard-level failure: retry, then report
                log.warning("shard %s attempt %d failed: %s", shard, attempt + 1, e)
                if (why := stop_reason(e)) is not None:
                    summary.failed[shard] = f"{type(e).__name__}: {e}"
                    summary.stopped = why
                    return
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

    from pipeline.cluster import init_ray, is_embedded, worker_runtime_env

    init_ray()
    options: dict[str, Any] = {"num_cpus": spec.cpus_per_worker, "num_gpus": spec.gpus_per_worker}
    if (runtime_env := worker_runtime_env()) is not None:
        options["runtime_env"] = runtime_env
    Actor = ray.remote(max_restarts=0, **options)(_Host)
    wanted = min(spec.workers, len(todo))
    actors: list[Any] = [None] * wanted
    loading: dict[Any, int] = {}  # ready ref -> slot
    inflight: dict[Any, tuple[int, str]] = {}  # run ref -> (slot, shard)
    idle: deque[int] = deque()
    pending = deque(todo)
    attempts: Counter = Counter()
    losses: Counter = Counter()  # times a shard's worker was lost with its node
    node_of: dict[int, str] = {}  # slot -> node id of its ready actor
    placement = _Placement(spec, wanted)
    init_failures = 0

    def spawn(slot: int) -> None:
        actors[slot] = Actor.remote(spec.worker_cls, spec.worker_kwargs)
        loading[actors[slot].ready.remote()] = slot

    def drop(slot: int) -> None:
        ray.kill(actors[slot], no_restart=True)
        actors[slot] = None

    def requeue_lost(shard: str) -> None:
        """Lost with its node: not the shard's fault, requeued without counting an attempt (up
        to NODE_LOSSES times: a shard under which nodes keep dying fails)."""
        losses[shard] += 1
        log.warning("shard %s: its worker was lost with its node; requeued", shard)
        if losses[shard] > NODE_LOSSES:
            summary.failed[shard] = f"lost with its node {losses[shard]} times"
        else:
            summary.lost += 1
            pending.appendleft(shard)

    def failed_attempt(shard: str, e: BaseException, cause: str) -> None:
        attempts[shard] += 1
        log.warning("shard %s attempt %d failed: %s", shard, attempts[shard], cause)
        if (why := stop_reason(e)) is not None:  # disk full: finish in-flight only
            summary.stopped = why
            summary.failed[shard] = cause
            pending.clear()
        elif attempts[shard] > spec.max_retries:
            summary.failed[shard] = cause
        else:
            summary.retries += 1
            pending.appendleft(shard)  # next ready actor takes it first

    # Workers that died while their node still read as alive: the cluster may not have noticed
    # the node's death yet (its health checks take seconds). A death that leaves retries is
    # counted and retried at once, and refunded if the node turns out dead (`recheck`); one that
    # would fail the shard waits for the verdict (`suspects`). shard -> (deadline, node, error).
    suspects: dict[str, tuple[float, str | None, BaseException]] = {}
    recheck: dict[str, tuple[float, str | None, BaseException]] = {}

    def worker_died(shard: str, node: str | None, e: BaseException) -> None:
        if _lost_with_node(e, node):
            requeue_lost(shard)
        elif is_embedded():  # one node, this machine's: it outlives the driver
            failed_attempt(shard, e, "worker died")
        elif attempts[shard] < spec.max_retries:
            failed_attempt(shard, e, "worker died")
            recheck[shard] = (time.monotonic() + NODE_DEATH_GRACE, node, e)
        else:
            suspects[shard] = (time.monotonic() + NODE_DEATH_GRACE, node, e)

    def judge_deaths() -> None:
        now = time.monotonic()
        for shard, (deadline, node, e) in list(recheck.items()):
            if _lost_with_node(e, node):  # it was the node after all: not an attempt
                del recheck[shard]
                attempts[shard] -= 1
                summary.retries -= 1
                summary.lost += 1
                log.warning("shard %s: its worker was lost with its node (not counted)", shard)
            elif now > deadline:
                del recheck[shard]
        for shard, (deadline, node, e) in list(suspects.items()):
            if _lost_with_node(e, node):
                del suspects[shard]
                requeue_lost(shard)
            elif now > deadline:  # the node lives: the worker itself crashed
                del suspects[shard]
                failed_attempt(shard, e, "worker died")

    for slot in range(wanted):
        spawn(slot)
    last_refresh = time.monotonic()
    try:
        while pending or inflight or suspects:
            if suspects or recheck:
                judge_deaths()
            while idle and pending:
                slot = idle.popleft()
                shard = pending.popleft()
                inflight[actors[slot].run.remote(shard)] = (slot, shard)
            placement.check(running=len(idle) + len(inflight))
            if not loading and not inflight and not idle and not suspects:
                for shard in pending:  # every worker failed to start, none left to try
                    summary.failed[shard] = placement.start_error
                return
            refs = [*inflight, *loading]
            if not refs:  # only suspects left to judge
                time.sleep(0.5)
                continue
            done, _ = ray.wait(refs, num_returns=1, timeout=5.0 if not suspects else 0.5)
            for ref in done:
                if ref in loading:
                    slot = loading.pop(ref)
                    try:
                        node_of[slot] = ray.get(ref)
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
                    if not isinstance(e, ray.exceptions.RayActorError):
                        failed_attempt(shard, e, _one_line(e))
                    else:
                        worker_died(shard, node_of.get(slot), e)
                        drop(slot)  # a fresh process, placed wherever the cluster has room
                        spawn(slot)
                        continue
                idle.append(slot)
            if time.monotonic() - last_refresh > 30:  # off the loop: never waits on the store
                store.refresh_manifest(stages=[spec.stage, *spec.also_writes], background=True)
                last_refresh = time.monotonic()
    finally:
        for a in actors:
            if a is not None:
                ray.kill(a, no_restart=True)


NODE_LOSSES = 5  # a shard whose worker is lost with its node more often than this fails
# How long a dead worker's node may still read as alive before the death counts as the worker's
# own crash: Ray's default health checks declare a node dead within about 15-25 s.
NODE_DEATH_GRACE = 30.0


def _lost_with_node(e: BaseException, node_id: str | None) -> bool:
    """Whether an actor died because its node did (raylet gone, node preempted or drained),
    rather than by its own crash: Ray's death cause says so, or the node is no longer alive."""
    import ray

    if getattr(e, "preempted", False) or "its node has died" in str(e):
        return True
    if node_id is None:
        return False
    try:
        return not any(n.get("NodeID") == node_id and n.get("Alive") for n in ray.nodes())
    except Exception:  # the GCS unreachable: count the attempt, as before
        return False


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
            if is_embedded():
                raise UserError(
                    f"the embedded local Ray ({nodes}) is not enough for {need}; attach to a "
                    "cluster with --ray-address or RAY_ADDRESS"
                )
            where = f"the Ray cluster at {cluster_address()} ({nodes})"
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
        raise UserError(f"--shards {text!r}: no shard names (e.g. --shards 000001,000007)")
    bad = [n for n in names if not (n.isdigit() and len(n) == 6)]
    if bad:
        raise UserError(f"--shards: {bad[0]!r} is not a shard name (six digits, e.g. 000001)")
    return names


def _shard_arg(text: str) -> list[str]:
    """argparse type of ``--shards``: the parsed list, or the parse error."""
    try:
        return _shard_list(text)  # type: ignore[return-value]
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e).split(": ", 1)[-1]) from None


def ranges(shards: list[str]) -> str:
    from pipeline.manifest import ranges as _ranges

    return _ranges(shards)


def _last_line(e: BaseException) -> str:
    """An actor's creation error ends with the worker's own exception, e.g. 'OSError: …'."""
    text = str(e).strip().splitlines()
    return text[-1].strip() if text else type(e).__name__


def _one_line(e: BaseException) -> str:
    cause = getattr(e, "cause", None) or e
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[-1] if text else ''}"
