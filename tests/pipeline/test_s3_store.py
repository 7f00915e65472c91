"""A store on a real S3 endpoint (moto server mode on loopback, s3fs), through the CLI.

Every command runs as its own process, as a user would run it, so the endpoint reaches it (and
its Ray workers) only through the AWS_* variables the ``s3_env`` fixture sets.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import s3fs
from ports import free_port

from pipeline.demo import write_demo_photos

REPO = Path(__file__).parent.parent.parent


def alphaset(*args: str, env: dict[str, str] | None = None, timeout: float = 300):
    """``alphaset ARGS`` in a subprocess; returns the CompletedProcess (text output)."""
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def alphaset_here(capsys, *args: str) -> tuple[int, str, str]:
    """``alphaset ARGS`` in this process (no start-up cost): (exit status, stdout, stderr)."""
    from pipeline.cli import main

    capsys.readouterr()
    rc = main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), **extra}
    env.pop("RAY_ADDRESS", None)
    return env


def _s3() -> s3fs.S3FileSystem:
    return s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)


# ---- one-line errors ----------------------------------------------------------------------------
def test_missing_bucket_is_an_error_not_a_new_bucket(s3_env, tmp_path):
    write_demo_photos(tmp_path / "photos")
    proc = alphaset(
        "ingest", "folder", str(tmp_path / "photos"), "--store", "s3://no-such-bucket-13/store",
        env=_env(),
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "alphaset ingest: error: bucket 'no-such-bucket-13' of s3://no-such-bucket-13/store does "
        "not exist: create it first (e.g. 'aws s3 mb s3://no-such-bucket-13'); alphaset never "
        "creates buckets"
    ]
    assert not _s3().exists("no-such-bucket-13")


def test_storage_failures_are_one_line(s3_bucket, tmp_path, capsys, monkeypatch):
    store = f"{s3_bucket}/store"
    # No s3fs installed (an import that fails, as on a machine without the extra).
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; sys.modules['s3fs'] = None; from pipeline.cli import main; "
            f"sys.exit(main(['manifest', 'show', '--store', '{store}']))",
        ],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "pip install 'alphaset[s3]'" in proc.stderr

    # No credentials anywhere (variables, files, instance metadata).
    env = _env(
        AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
        AWS_CONFIG_FILE=str(tmp_path / "none"),
        AWS_EC2_METADATA_DISABLED="true",
    )
    env.pop("AWS_ACCESS_KEY_ID")
    env.pop("AWS_SECRET_ACCESS_KEY")
    proc = alphaset("manifest", "show", "--store", store, env=env)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("alphaset manifest: error: no credentials for the object store")
    assert len(proc.stderr.strip().splitlines()) == 1

    # An endpoint nobody listens on, given with --storage-options (fail fast: no retries); not
    # JSON; an option s3fs does not take. In this process (main exports the option: restored).
    monkeypatch.setenv("ALPHASET_STORAGE_OPTIONS", "")
    opts = {
        "endpoint_url": f"http://127.0.0.1:{free_port()}",
        "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 2},
    }
    for bad, message in (
        (json.dumps(opts), "cannot reach the object store endpoint"),
        ("{endpoint", "--storage-options / ALPHASET_STORAGE_OPTIONS is not JSON"),
        ('{"retries": 1}', "--storage-options / ALPHASET_STORAGE_OPTIONS: not accepted by"),
    ):
        rc, _, err = alphaset_here(
            capsys, "manifest", "show", "--store", store, "--storage-options", bad
        )
        assert rc == 2 and message in err, err
        assert len(err.strip().splitlines()) == 1, err


def test_access_denied_is_one_line(s3_env, tmp_path):
    """A second moto endpoint that checks credentials: the test keys are unknown to it."""
    port = free_port()
    log = open(tmp_path / "moto.log", "wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        endpoint = f"http://127.0.0.1:{port}"
        proc = None
        for _ in range(50):  # until the server answers
            proc = alphaset(
                "manifest", "show", "--store", "s3://locked/store",
                "--storage-options", json.dumps({"endpoint_url": endpoint}), env=_env(),
            )  # fmt: skip
            if "cannot reach" not in proc.stderr:
                break
            time.sleep(0.3)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith(
            "alphaset manifest: error: access denied to bucket 'locked' of s3://locked/store"
        ), proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
    finally:
        server.terminate()
        server.wait(timeout=10)
        log.close()


# ---- resume, SIGKILL, verify ------------------------------------------------------------------
CAPTION = ["--model", "tiny", "--max-new-tokens", "6", "--batch-size", "4", "--no-progress"]


def test_kill_resume_and_verify_on_s3(s3_bucket, tmp_path, capsys):
    store = f"{s3_bucket}/store"
    s3 = _s3()
    env = _env()
    write_demo_photos(tmp_path / "photos")
    proc = alphaset(
        "ingest", "folder", str(tmp_path / "photos"), "--store", store, "--shard-size", "2",
        "--no-progress", env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    shards = [f"{i:06d}" for i in range(7)]  # 13 files, 2 per shard

    # SIGKILL in the middle of the stage, as soon as one more shard is done.
    spool = tmp_path / "tmp"
    spool.mkdir()
    run = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "caption", "--store", store, *CAPTION, "--no-ray"],
        cwd=REPO, env={**env, "TMPDIR": str(spool)},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    status = f"{store[5:]}/_status/captions/tiny"
    deadline = time.monotonic() + 240
    records = tuple(f"{s}.json" for s in shards)
    while len([p for p in s3.find(status) if p.endswith(records)]) < 2:
        assert run.poll() is None, "the caption run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.1)
    run.send_signal(signal.SIGKILL)
    run.wait(timeout=30)
    done_at_kill = [s for s in shards if s3.exists(f"{status}/{s}.json")]
    assert 2 <= len(done_at_kill) < len(shards), done_at_kill
    assert [
        p.name for p in spool.iterdir() if "alphaset" in p.name or p.name.startswith("tmp")
    ] == []

    # Re-run: the done shards are skipped, the rest are captioned, the manifest lists them all.
    proc = alphaset("caption", "--store", store, *CAPTION, "--no-ray", env=env)
    assert proc.returncode == 0, proc.stderr
    assert f"{len(shards) - len(done_at_kill)} shard(s) done" in proc.stdout
    manifest = json.loads(s3.cat(f"{store[5:]}/manifest.json"))
    assert sorted(manifest["stages"]["captions/tiny"]["shards"]) == shards
    rc, out, err = alphaset_here(capsys, "manifest", "verify", "--store", store)
    assert rc == 0 and "verify: OK, 0 problem(s)" in out, out + err

    # A deleted status record and a truncated image shard: verify finds both.
    s3.rm(f"{status}/000001.json")
    tar = f"{store[5:]}/images/000002.tar"
    s3.pipe(tar, s3.cat(tar)[:5000])
    rc, out, err = alphaset_here(capsys, "manifest", "verify", "--store", store)
    assert rc == 1, out + err
    assert "PROBLEM images/000002.tar" in out
    assert "warning captions/tiny/000001.parquet: no status record" in out
    assert "lists captions/tiny shard(s) 000001 as done but their status records are missing" in out

    # show agrees.
    rc, out, _ = alphaset_here(capsys, "manifest", "show", "--store", store)
    assert rc == 0 and "captions/tiny  6/7 shards" in out and "missing 000001" in out, out


def test_failed_upload_leaves_nothing(s3_bucket, tmp_path, monkeypatch):
    """An error while writing (here after a first multipart part went up) aborts the upload: no
    object, no incomplete multipart upload, no local spool file."""
    from pipeline import fs

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    url = f"{s3_bucket}/store/features/t/000000.tar"
    with pytest.raises(RuntimeError, match="killed"):
        with fs.atomic_open(url) as f:
            f.write(b"\0" * (51 << 20))  # over s3fs's 50 MB block: a multipart upload starts
            f.flush()
            raise RuntimeError("killed")
    s3 = _s3()
    assert not s3.exists(url[5:])
    assert s3.list_multipart_uploads(s3_bucket[5:]) == []
    assert list(tmp_path.iterdir()) == []
    with fs.atomic_open(url) as f:
        f.write(b"tar")
    assert s3.cat(url[5:]) == b"tar"
