"""`alphaset caption` under `ray job submit` on a token-authenticated local cluster (README commands)."""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from ports import free_ports

from pipeline.manifest import verify

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")


@dataclass
class Cluster:
    dashboard: str  # http://127.0.0.1:PORT, the job submission address
    env: dict  # environment of a client holding the token (HOME has .ray/auth_token)
    token: str
    root: Path


def _base_env(home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH"))}
    env["HOME"] = str(home)  # ~/.ray/auth_token of this test only
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


@pytest.fixture(scope="module")
def token_cluster():
    """A Ray head on 127.0.0.1 with token auth, started exactly as the README says; stopped after."""
    root = Path(
        tempfile.mkdtemp(prefix="capray-", dir="/tmp")
    )  # short: Ray's socket paths are limited
    (root / "home").mkdir()
    env = {**_base_env(root / "home"), "RAY_AUTH_MODE": "token"}
    subprocess.run(
        [RAY, "get-auth-token", "--generate"], env=env, check=True, capture_output=True, timeout=60
    )
    token = (root / "home" / ".ray" / "auth_token").read_text().strip()
    gcs, dash, client, agent = free_ports(4)
    cmd = [RAY, "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(gcs)]
    cmd += ["--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--num-cpus", "2"]
    cmd += ["--ray-client-server-port", str(client), "--dashboard-agent-listen-port", str(agent)]
    cmd += ["--temp-dir", str(root / "ray"), "--disable-usage-stats"]
    log = open(root / "ray-start.log", "wb")
    # Its own process session, so that stopping it can never touch anyone else's Ray.
    head = subprocess.Popen(
        cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    url = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 90
        while True:
            req = urllib.request.Request(
                f"{url}/api/version", headers={"Authorization": f"Bearer {token}"}
            )
            try:
                with urllib.request.urlopen(req, timeout=2):
                    break
            except (urllib.error.URLError, OSError):
                if head.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(
                        "ray start failed: " + (root / "ray-start.log").read_text()[-3000:]
                    ) from None
                time.sleep(0.5)
        yield Cluster(url, env, token, root)
    finally:
        head.send_signal(signal.SIGTERM)  # `ray start --block` stops what it started
        try:
            head.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(head.pid, signal.SIGKILL)  # and whatever of its session is left
        except ProcessLookupError:
            pass
        head.wait()
        log.close()
        shutil.rmtree(root, ignore_errors=True)


def _submit(
    cluster: Cluster, env: dict, *args: str, timeout: float = 170
) -> subprocess.CompletedProcess:
    cmd = [
        RAY,
        "job",
        "submit",
        "--address",
        cluster.dashboard,
        "--working-dir",
        str(REPO),
        "--",
        *args,
    ]
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_ray_job_submit_with_the_token_captions_the_store(token_cluster, photo_store, tiny_dir):
    p = _submit(
        token_cluster, token_cluster.env,
        "alphaset", "caption", "--store", photo_store.root, "--model", tiny_dir, "--tag", "job",
        "--max-new-tokens", "4", "--no-progress",
    )  # fmt: skip
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-3000:]
    assert "succeeded" in out and "captions/job: 2 shard(s) done" in out
    assert (
        "Connecting to existing Ray cluster" in out
    )  # attached through RAY_ADDRESS, no embedded Ray
    for shard in photo_store.shards():
        table = pq.read_table(photo_store.url("captions", "job", f"{shard}.parquet"))
        assert table["key"].to_pylist() == photo_store.ok_keys(shard)
        assert all(table["caption"].to_pylist()) and set(table["model"].to_pylist()) == {"tiny"}
    assert verify(photo_store)["ok"]


@pytest.mark.parametrize("token", [None, "0" * 64], ids=["no-token", "wrong-token"])
def test_ray_job_submit_without_the_token_is_refused(token_cluster, photo_store, tmp_path, token):
    home = tmp_path / "stranger"
    home.mkdir()
    env = _base_env(home)
    if token is not None:
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    p = _submit(
        token_cluster,
        env,
        "alphaset",
        "caption",
        "--store",
        photo_store.root,
        "--tag",
        "denied",
        timeout=90,
    )
    out = p.stdout + p.stderr
    assert p.returncode != 0
    assert "401" in out or "403" in out or "Unauthorized" in out or "Forbidden" in out, out[-2000:]
    assert "submitted successfully" not in out
    assert not os.path.exists(photo_store.url("captions", "denied"))
