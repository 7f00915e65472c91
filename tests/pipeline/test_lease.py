"""The store lease: one writer per part, refusal naming the holder, renewal, takeover after expiry,
on a local disk and on a real S3 endpoint (moto server) through conditional creates."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from pipeline import fs
from pipeline.lease import Lease, LeaseHeld, Leases


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("s3_bucket") + "/store"


def test_create_exclusive_is_exclusive(root):
    url = fs.join(root, "x.json")
    assert fs.create_exclusive(url, b"first")
    assert not fs.create_exclusive(url, b"second")
    assert fs.read_bytes(url) == b"first"
    assert fs.has_conditional_create(url)


def test_create_exclusive_race_has_one_winner(root):
    """Ten threads create the same object at once: exactly one wins."""
    url = fs.join(root, "race.json")
    wins: list[int] = []
    barrier = threading.Barrier(10)

    def go(i: int) -> None:
        barrier.wait()
        if fs.create_exclusive(url, str(i)):
            wins.append(i)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1
    assert fs.read_text(url) == str(wins[0])


def test_second_writer_is_refused_with_the_holder(root):
    with Lease(root, "captions/tiny", owner="alphaset caption --store S"):
        with pytest.raises(
            LeaseHeld, match=r"by 'alphaset caption --store S' \(pid \d+ on host .*expires"
        ):
            Lease(root, "captions/tiny").acquire()
        # another stage/tag is free
        with Lease(root, "captions/other"), Lease(root, "scores/tiny"):
            pass
    # released: the next writer takes it at once
    with Lease(root, "captions/tiny") as again:
        assert again.gen is not None and again.gen >= 1


def test_expired_lease_is_taken_over_and_the_old_holder_learns_it(root):
    old = Lease(root, "ingest", ttl=0.5).acquire()  # a holder that stops renewing (hung)
    with pytest.raises(LeaseHeld):
        Lease(root, "ingest", ttl=0.5).acquire()
    time.sleep(0.7)
    new = Lease(root, "ingest", ttl=30).acquire()
    assert new.gen == old.gen + 1
    old.renew()
    with pytest.raises(Exception, match="took it over"):
        old.check()
    old.release()  # must not clobber the new holder
    assert Lease(root, "ingest").holder()["token"] == new.record["token"]
    new.release()
    assert Lease(root, "ingest").holder() is None


def test_renewal_keeps_a_running_holder(tmp_path):
    root = str(tmp_path / "store")
    with Lease(root, "ingest", ttl=0.4) as lease:
        time.sleep(1.0)  # more than 2 ttl: renewed in the background
        with pytest.raises(LeaseHeld):
            Lease(root, "ingest").acquire()
        lease.check()


def test_killed_holder_on_this_host_is_taken_over_at_once(tmp_path):
    """A writer SIGKILLed while holding the lease does not block the re-run of its command."""
    root = str(tmp_path / "store")
    code = (
        "import sys, time; from pipeline.lease import Lease; "
        f"Lease({root!r}, 'ingest', owner='victim', ttl=600).__enter__(); "
        "print('held', flush=True); time.sleep(60)"
    )
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, env=env)
    assert proc.stdout.readline().strip() == b"held"
    with pytest.raises(LeaseHeld, match=rf"'victim' \(pid {proc.pid} "):
        Lease(root, "ingest").acquire()  # alive: refused
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with Lease(root, "ingest"):  # dead: taken over without waiting for the expiry
        pass


def test_holder_on_another_host_is_taken_over_only_after_expiry(tmp_path):
    """Another host's process cannot be checked: its lease counts until it expires."""
    root = str(tmp_path / "store")
    rec = {"owner": "far", "host": "elsewhere", "pid": 1, "token": "t", "renewed": time.time()}
    rec["expires"] = time.time() + 1.0
    fs.create_exclusive(fs.join(root, "_locks", "ingest", f"{7:012d}.json"), json.dumps(rec))
    with pytest.raises(LeaseHeld, match="'far' \\(pid 1 on host elsewhere"):
        Lease(root, "ingest").acquire()
    time.sleep(1.2)
    with Lease(root, "ingest") as lease:
        assert lease.gen == 8


def test_leases_all_or_none(tmp_path):
    root = str(tmp_path / "store")
    with Lease(root, "scores/tiny"):
        with pytest.raises(LeaseHeld, match="scores/tiny"):
            with Leases(root, ["ingest", "captions/tiny", "scores/tiny"]):
                pass
        # the two taken before the refusal were handed back
        assert Lease(root, "ingest").holder() is None
        assert Lease(root, "captions/tiny").holder() is None
