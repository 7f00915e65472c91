"""One writer at a time: a lease (a lock object naming its owner, host, pid and expiry) that a
writer takes before it changes a part of the store, renews while it runs, and hands back.

Ingest takes the store-level lease ``ingest`` (it picks shard numbers, so two ingests at once
would write the same shard); a stage run takes the lease of its own ``<kind>/<tag>``, so
different stages and tags run side by side; ``manifest repair`` takes all of them. A second
writer of the same part is refused with one line naming the holder. A holder that died is taken
over once its lease expires (``ttl``, renewed every ``ttl / 4`` by a background thread), or at
once when it ran on this host and its process is gone.

How it stays correct without a lock server: a lease is a sequence of generation files
``STORE/_locks/<name>/<gen>.json``; the highest generation is the current one. Taking the lease
(free, released or expired) means *creating* generation ``top + 1``, and creating is exclusive
(`pipeline.fs.create_exclusive`: a hard link on local disks, ``If-None-Match: *`` on S3), so of
two writers racing for the same generation exactly one wins — the compare-and-swap every backend
needs. The holder renews by rewriting its own generation file and, each time, checks that no
higher generation appeared (which would mean its lease had expired and was taken over: it then
stops at the next shard boundary with an error).

Limits: on a backend without a conditional create (neither local, S3 nor in-memory; see
`pipeline.fs.has_conditional_create`) two writers starting in the same instant can both win, a
warning says so. Expiry is wall-clock time of the holder's host: hosts sharing a store need
clocks within a few seconds of each other (NTP), far below the default 60 s ``ttl``.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from typing import Any

from pipeline import fs
from pipeline.store import StoreError

log = logging.getLogger(__name__)

LOCKS_DIR = "_locks"
DEFAULT_TTL = 60.0
INGEST = "ingest"


class LeaseHeld(StoreError):
    """Another writer holds the lease: a one-line CLI error naming the holder."""


class LeaseLost(StoreError):
    """This writer's lease expired and another writer took it over."""


def _clock(t: float) -> str:
    return _dt.datetime.fromtimestamp(t, _dt.timezone.utc).strftime("%H:%M:%S UTC")


def default_owner() -> str:
    """What the holder is running, for the refusal message: ``alphaset caption --store …``."""
    words = [os.path.basename(sys.argv[0]) or "python", *sys.argv[1:]]
    text = " ".join(words)
    return text if len(text) <= 120 else text[:117] + "..."


def _dead_here(rec: dict[str, Any]) -> bool:
    """The holder ran on this host and its process is gone (killed, crashed): its lease is taken
    over at once instead of after the expiry, so re-running a killed command just works."""
    if rec.get("host") != socket.gethostname() or not isinstance(rec.get("pid"), int):
        return False
    if rec["pid"] == os.getpid():
        return False
    try:
        os.kill(rec["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


class Lease:
    """The lease ``name`` (``ingest`` or ``<kind>/<tag>``) of the store at ``root``.

    Use as a context manager: ``with Lease(root, "ingest"): …`` takes it (or raises `LeaseHeld`),
    renews it in a background thread and releases it on exit. `check` raises `LeaseLost` when the
    lease was taken over; writers call it between shards.
    """

    def __init__(self, root: str, name: str, owner: str | None = None, ttl: float = DEFAULT_TTL):
        if ttl <= 0:
            raise ValueError(f"lease ttl must be > 0 seconds, got {ttl}")
        self.root = root.rstrip("/")
        self.name = name
        self.folder = fs.join(self.root, LOCKS_DIR, name)
        self.ttl = float(ttl)
        self.record: dict[str, Any] = {
            "name": name,
            "owner": owner or default_owner(),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "token": uuid.uuid4().hex,
        }
        self.gen: int | None = None
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- files -------------------------------------------------------------------------------
    def _url(self, gen: int) -> str:
        return fs.join(self.folder, f"{gen:012d}.json")

    def _gens(self) -> list[int]:
        return sorted(
            int(n[:-5])
            for n in fs.ls_fresh(self.folder)
            if n.endswith(".json") and n[:-5].isdigit()
        )

    def _read(self, gen: int) -> dict[str, Any] | None:
        """The record of generation ``gen``; None when it is unreadable (taken over as expired)."""
        try:
            rec = json.loads(fs.read_text(self._url(gen)))
            return rec if isinstance(rec, dict) else None
        except (OSError, ValueError):
            return None

    def _payload(self, released: bool = False) -> str:
        now = time.time()
        rec = {**self.record, "renewed": now, "expires": now if released else now + self.ttl}
        if released:
            rec["released"] = True
        return json.dumps(rec, sort_keys=True)

    # ---- taking, renewing, releasing ---------------------------------------------------------
    def holder(self) -> dict[str, Any] | None:
        """The live holder's record (None when the lease is free, released or expired)."""
        gens = self._gens()
        if not gens:
            return None
        rec = self._read(gens[-1])
        if rec is None or rec.get("released") or float(rec.get("expires", 0)) <= time.time():
            return None
        return None if _dead_here(rec) else rec

    def acquire(self) -> Lease:
        if not fs.has_conditional_create(self.folder):
            log.warning(
                "%s has no conditional create: the %s lease is advisory (two writers starting in "
                "the same instant can both take it)",
                self.root,
                self.name,
            )
        for _ in range(50):
            gens = self._gens()
            gen = 0
            if gens:
                top = gens[-1]
                rec = self._read(top)
                live = (
                    rec is not None
                    and not rec.get("released")
                    and float(rec.get("expires", 0)) > time.time()
                    and not _dead_here(rec)
                )
                if live:
                    raise LeaseHeld(self._refusal(rec))  # type: ignore[arg-type]
                if rec is not None and not rec.get("released"):
                    log.warning(
                        "taking over the %s lease of %s (pid %s on %s): %s",
                        self.name,
                        rec.get("owner"),
                        rec.get("pid"),
                        rec.get("host"),
                        "its process is gone" if _dead_here(rec) else "it expired",
                    )
                gen = top + 1
            if fs.create_exclusive(self._url(gen), self._payload()):
                self.gen = gen
                self._cleanup()
                return self
            time.sleep(0.01)  # another writer created that generation first: look again
        raise LeaseHeld(f"{self.root}: could not take the {self.name} lease (heavy contention)")

    def _refusal(self, rec: dict[str, Any]) -> str:
        left = float(rec["expires"]) - time.time()
        since = _clock(float(rec.get("renewed", 0)))
        return (
            f"{self.root} is being written ({self.name}) by {rec.get('owner', '?')!r} "
            f"(pid {rec.get('pid', '?')} on host {rec.get('host', '?')}, renewed {since}, "
            f"expires {_clock(float(rec['expires']))} in {left:.0f} s unless renewed); wait for it "
            "to finish, or if that process is gone, retry after the expiry"
        )

    def _cleanup(self) -> None:
        """Delete generations older than ours (best effort; a leftover is harmless)."""
        for g in self._gens():
            if g < (self.gen or 0):
                try:
                    fs.remove(self._url(g))
                except OSError:
                    pass

    def renew(self) -> None:
        """Push the expiry ``ttl`` ahead; mark the lease lost if a newer generation exists."""
        if self.gen is None or self.lost:
            return
        if any(g > self.gen for g in self._gens()):
            self.lost = True
            return
        fs.atomic_write(self._url(self.gen), self._payload())
        if any(g > self.gen for g in self._gens()):
            self.lost = True

    def check(self, fresh: bool = False) -> None:
        """Raise `LeaseLost` when another writer took this lease over: as last seen by the
        renewal thread, or with ``fresh`` as the generation files say now (one listing; for a
        last step that must not follow a takeover, like sealing a status index)."""
        if fresh and self.gen is not None and any(g > self.gen for g in self._gens()):
            self.lost = True
        if self.lost:
            raise LeaseLost(
                f"{self.root}: the {self.name} lease expired and another writer took it over "
                "(was this process suspended?); stopped; re-run the same command to resume"
            )

    def release(self) -> None:
        if self.gen is None:
            return
        try:
            if not self.lost and not any(g > self.gen for g in self._gens()):
                fs.atomic_write(self._url(self.gen), self._payload(released=True))
        finally:
            self.gen = None

    # ---- context manager with a renewing thread ----------------------------------------------
    def _renew_loop(self) -> None:
        last_ok = time.monotonic()
        while not self._stop.wait(self.ttl / 4):
            try:
                self.renew()
                last_ok = time.monotonic()
            except OSError as e:  # a flaky store: keep trying until the lease would expire
                log.warning("renewing the %s lease failed: %s", self.name, e)
                if time.monotonic() - last_ok > self.ttl:
                    self.lost = True

    def __enter__(self) -> Lease:
        self.acquire()
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._renew_loop, name=f"lease-{self.name}", daemon=True
        )
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.release()


class Leases:
    """Several leases taken together (all or none), e.g. by ``manifest repair``."""

    def __init__(
        self, root: str, names: list[str], owner: str | None = None, ttl: float = DEFAULT_TTL
    ):
        self.leases = [Lease(root, n, owner=owner, ttl=ttl) for n in names]
        self._taken: list[Lease] = []

    def check(self, fresh: bool = False) -> None:
        for lease in self._taken:
            lease.check(fresh)

    def __enter__(self) -> Leases:
        try:
            for lease in self.leases:
                lease.__enter__()
                self._taken.append(lease)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        while self._taken:
            self._taken.pop().__exit__()
