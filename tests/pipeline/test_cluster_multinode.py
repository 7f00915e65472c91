"""Elastic stages on a real multi-node Ray cluster: a head and two worker nodes started with
`ray start` on loopback, each with its own --temp-dir, token auth on. A node lost mid-stage (its
raylet killed) and a node joining mid-stage; and the one-line error of a client without the token.

The stage driver runs in a subprocess (this file run as a script), attached through RAY_ADDRESS,
so the test session's own embedded Ray is never disturbed. Its worker sleeps per shard and
records the node that ran it (each node's ``ray start`` has its own ALPHASET_TEST_NODE, which its
worker processes inherit).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")
STAGE = "scores/nodes"
SHARDS = 16
SECONDS_PER_SHARD = 1.5


class NodeTagWorker:
    """Per shard: wait ``seconds`` (the model's work), write key + node rows, record the node.
    While the file ``gate`` exists, workers of the first nodes hold their next shard, so shards
    are still pending when a joining node's worker gets ready, however slowly the node starts."""

    def __init__(self, store: str, seconds: float, gate: str):
        from pipeline.store import Store

        self.store, self.seconds, self.gate = Store(store), seconds, gate
        self.node = os.environ.get("ALPHASET_TEST_NODE", "?")

    def __call__(self, shard: str) -> dict:
        from pipeline import fs

        deadline = time.monotonic() + 90
        while self.node != "c" and os.path.exists(self.gate) and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(self.seconds)
        keys = self.store.ok_keys(shard)
        table = pa.table(
            {"key": keys, "node": [self.node] * len(keys), "error": [None] * len(keys)}
        )
        checksum = fs.write_parquet(self.store.url(STAGE, f"{shard}.parquet"), table)
        rec = {"rows": len(keys), "ok": len(keys), "errors": 0, "checksum": checksum}
        # what the worker's environment says of the store (forwarded by the driver)
        rec["reads_env"] = os.environ.get("ALPHASET_STATUS_READS")
        return self.store.write_status(STAGE, shard, {**rec, "node": self.node})


def gate_path(store: str) -> str:
    return os.path.join(os.path.dirname(store), "gate")


def drive(store: str, workers: int) -> None:
    """The stage driver (a separate process): prints its summary as one JSON line."""
    import logging

    from pipeline.stage import StageSpec, run_stage
    from pipeline.store import Store

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    spec = StageSpec(
        stage=STAGE,
        worker_cls=NodeTagWorker,
        worker_kwargs={"store": store, "seconds": SECONDS_PER_SHARD, "gate": gate_path(store)},
        settings={"seconds": SECONDS_PER_SHARD},
        workers=workers,
        max_retries=0,  # a shard lost with its node is requeued, not a failed attempt
    )
    s = run_stage(Store(store), spec, progress=False)
    summary = {"done": len(s.done), "failed": s.failed, "retries": s.retries, "lost": s.lost}
    print("SUMMARY", json.dumps(summary))


# ---- the cluster ------------------------------------------------------------------------------
@dataclass
class Cluster:
    root: Path
    address: str  # GCS host:port
    env: dict  # holds the token (HOME/.ray/auth_token, RAY_AUTH_MODE=token)
    nodes: dict[str, subprocess.Popen] = field(default_factory=dict)

    def start_node(self, name: str, head: bool = False) -> subprocess.Popen:
        """`ray start --block` in its own process session; one CPU, a small object store."""
        cmd = [RAY, "start", "--block", "--node-ip-address", "127.0.0.1", "--num-cpus", "1"]
        cmd += ["--temp-dir", str(self.root / f"ray-{name}"), "--disable-usage-stats"]
        cmd += ["--object-store-memory", str(80 * 2**20)]
        if head:
            from ports import free_ports  # here: this file also runs as the stage's driver script

            port, dash, client = free_ports(3)
            self.address = f"127.0.0.1:{port}"
            cmd += ["--head", "--port", str(port), "--dashboard-port", str(dash)]
            cmd += ["--ray-client-server-port", str(client), "--include-dashboard", "false"]
        else:
            cmd += ["--address", self.address]
        log = open(self.root / f"{name}.log", "wb")
        env = {**self.env, "ALPHASET_TEST_NODE": name}
        proc = subprocess.Popen(
            cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.nodes[name] = proc
        return proc

    def wait_started(self, *names: str, timeout: float = 60) -> None:
        """Until each node's `ray start` says its runtime started (its raylet registered)."""
        deadline = time.monotonic() + timeout
        for name in names:
            log = self.root / f"{name}.log"
            while "Ray runtime started" not in log.read_text(errors="replace"):
                if self.nodes[name].poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"ray start {name}: {log.read_text()[-2000:]}")
                time.sleep(0.3)

    def kill_raylet(self, name: str) -> None:
        """SIGKILL the node's raylet: the node and every worker on it are lost at once."""
        import psutil

        kids = psutil.Process(self.nodes[name].pid).children(recursive=True)
        raylets = [p for p in kids if p.name() == "raylet"]
        assert raylets, [p.name() for p in kids]
        for p in raylets:
            p.kill()

    def stop(self) -> None:
        for proc in self.nodes.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)  # `ray start --block` stops what it started
        for proc in self.nodes.values():
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # whatever of its session is left
            except ProcessLookupError:
                pass
            proc.wait()


def _base_env(home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH"))}
    env["HOME"] = str(home)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(REPO)
    return env


@pytest.fixture(scope="module")
def cluster():
    """Head + two worker nodes, one CPU each, token auth; failure detection in ~3 s, not ~15."""
    root = Path(tempfile.mkdtemp(prefix="mn-", dir="/tmp"))  # Ray's socket paths are limited
    (root / "home").mkdir()
    env = {**_base_env(root / "home"), "RAY_AUTH_MODE": "token"}
    env.update(RAY_health_check_period_ms="500", RAY_health_check_failure_threshold="4")
    subprocess.run(
        [RAY, "get-auth-token", "--generate"], env=env, check=True, capture_output=True, timeout=60
    )
    c = Cluster(root=root, address="", env=env)
    try:
        c.start_node("head", head=True)
        c.wait_started("head")
        c.start_node("a")
        c.start_node("b")
        c.wait_started("a", "b")
        yield c
    finally:
        c.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture()
def small_store(tmp_path):
    """SHARDS one-image shards of tiny PNGs."""
    from PIL import Image

    from pipeline.ingest.folder import ingest_folder
    from pipeline.store import Store

    src = tmp_path / "src"
    src.mkdir()
    for i in range(SHARDS):
        Image.new("RGB", (16, 16), (i * 10, 255 - i * 10, 7)).save(src / f"img{i:02d}.png")
    store = Store(str(tmp_path / "store"))
    ingest_folder(store, str(src), progress=False, shard_size=1)
    return store


@pytest.mark.slow
def test_a_node_lost_and_a_node_joining_mid_stage(cluster, small_store, tmp_path):
    """4 workers asked of a 3-CPU cluster (one waits); node b's raylet killed after 3 shards;
    node c started: the stage finishes on the rest, c takes shards, every key exactly once, and
    b's shard in flight is requeued without counting against --max-retries (0 here)."""
    # A store setting set for the driver only: the nodes were started without it.
    env = {**cluster.env, "RAY_ADDRESS": cluster.address, "ALPHASET_STATUS_READS": "list"}
    with open(tmp_path / "driver.log", "w") as log:
        driver = subprocess.Popen(
            [sys.executable, __file__, "drive", small_store.root, "4"],
            env=env, stdout=subprocess.PIPE, stderr=log, text=True,
        )  # fmt: skip
    status = Path(small_store.status_dir(STAGE))
    deadline = time.monotonic() + 60
    while len(list(status.glob("0*.json"))) < 3:
        assert driver.poll() is None and time.monotonic() < deadline, (
            tmp_path / "driver.log"
        ).read_text()[-3000:]
        time.sleep(0.2)
    gate = Path(gate_path(small_store.root))
    gate.touch()  # the first nodes hold their next shard until c has done one
    cluster.kill_raylet("b")
    cluster.start_node("c")
    deadline = time.monotonic() + 90
    while not any(json.loads(p.read_text()).get("node") == "c" for p in status.glob("0*.json")):
        assert driver.poll() is None and time.monotonic() < deadline, (
            tmp_path / "driver.log"
        ).read_text()[-3000:]
        time.sleep(0.3)
    gate.unlink()
    out, _ = driver.communicate(timeout=120)
    errors = (tmp_path / "driver.log").read_text()
    assert driver.returncode == 0, errors[-3000:]
    summary = json.loads(next(ln for ln in out.splitlines() if ln.startswith("SUMMARY "))[8:])
    assert summary["done"] == SHARDS and not summary["failed"], summary
    # b's worker held a shard when its raylet died: requeued, though --max-retries is 0
    assert summary["lost"] >= 1 and summary["retries"] == 0, summary
    # the driver's ALPHASET_* store settings reached every worker, on every node
    assert {small_store.status(STAGE, s)["reads_env"] for s in small_store.shards()} == {"list"}
    # every key exactly once, in its shard, and every node but the lost one did work
    rows = pq.read_table(small_store.stage_dir(STAGE)).to_pylist()
    keys = [r["key"] for r in rows]
    everything = [k for s in small_store.shards() for k in small_store.ok_keys(s)]
    assert sorted(keys) == sorted(everything) and len(set(keys)) == SHARDS
    by_node = {}
    for shard in small_store.shards():
        node = small_store.status(STAGE, shard)["node"]
        by_node[node] = by_node.get(node, 0) + 1
    assert by_node.get("c", 0) >= 1, by_node  # the node that joined got shards
    assert by_node.get("head", 0) >= 1 and by_node.get("a", 0) >= 1, by_node
    assert (
        "holds 3 worker(s) at once; the other 1 wait for nodes to join" in errors
    )  # 4 asked, 3 fit: a warning
    assert "Traceback" not in errors


def test_a_client_without_the_token_gets_one_line(cluster, small_store, tmp_path):
    """A `ray start` cluster on this machine (Ray attaches to it by default) and no token: the
    error names the cluster and where its address came from, how to pass the token and
    --ray-address local; exit 2, no traceback, nothing written."""
    home = tmp_path / "stranger"
    home.mkdir()
    env = _base_env(home)
    # Ray finds the address file `ray start` wrote in its temp dir under RAY_TMPDIR/ray
    os.symlink(cluster.root / "ray-head", home / "ray")
    env["RAY_TMPDIR"] = str(home)
    env["RAY_gcs_server_port_wait_time_s"] = "2"  # Ray retries a refused connection for ~20 s
    argv = ["alphaset", "caption", "--store", small_store.root, "--model", "tiny", "--no-progress"]
    p = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
    line = p.stderr.strip().splitlines()[-1]
    assert line.startswith("alphaset caption: error: cannot attach to the Ray cluster at "), line
    assert (
        "(given by the address file `ray start` wrote on this machine): it refused this client's auth token"
        in line
    )
    assert "RAY_AUTH_TOKEN=<token>" in line and "--ray-address local" in line
    assert not os.path.exists(small_store.url("captions"))


def test_the_cluster_address_comes_from_the_flag_then_the_environment(monkeypatch, tmp_path):
    from pipeline.cluster import _resolve_address

    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))  # no `ray start` address file here
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert _resolve_address(None) == (None, "")
    assert _resolve_address("local") == (None, "--ray-address local")
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "ray_current_cluster").write_text("10.0.0.9:6379")
    assert _resolve_address(None) == (
        "10.0.0.9:6379",
        "the address file `ray start` wrote on this machine",
    )
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert _resolve_address(None) == ("10.0.0.1:6379", "RAY_ADDRESS")
    assert _resolve_address("10.0.0.2:6379") == ("10.0.0.2:6379", "--ray-address")
    assert _resolve_address("local") == (None, "--ray-address local")


if __name__ == "__main__" and sys.argv[1:2] == ["drive"]:
    drive(sys.argv[2], int(sys.argv[3]))
