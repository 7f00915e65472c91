"""Issue 12's cases, each as a test: concurrent ingests, error rows retried, deleted status
records, one-line errors, verify on view-restricted stages, no side effects of rejected commands,
repair of derived and damaged files, and the small ones (temp leftovers, -v, --where, tar members)."""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import polars as pl
import pyarrow as pa
import pytest
from PIL import Image

from pipeline import fs
from pipeline.cli import main
from pipeline.ingest.folder import ingest_folder
from pipeline.lease import LeaseHeld
from pipeline.manifest import verify
from pipeline.repair import repair
from pipeline.stage import RunOptions, StageSpec, run_stage, set_run_options
from pipeline.store import Store

STAGE = "scores/keys"


def tiny_folder(path: Path, n: int, tag: str, size: int = 24) -> Path:
    """``n`` small distinct PNGs (fast to decode)."""
    path.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (size, size + i), (i * 20 % 256, len(tag) * 30 % 256, 7)).save(
            path / f"{tag}{i}.png"
        )
    return path


def meta_keys(store: Store) -> list[str]:
    """Every key a reader of the meta folder sees (what `pl.read_parquet("STORE/meta")` sees)."""
    folder = store.url("meta")
    return [
        k
        for name in fs.ls(folder, ".parquet")
        for k in fs.read_parquet(fs.join(folder, name), ["key"])["key"].to_pylist()
    ]


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


class KeysWorker:
    """A trivial stage: one row per ok key (or per view key), ``error`` set on ``bad`` keys."""

    def __init__(
        self, store: str, view: str | None = None, bad: tuple[str, ...] = (), pad: int = 0
    ):
        self.store, self.view, self.bad, self.pad = Store(store), view, set(bad), pad

    def __call__(self, shard: str) -> dict:
        keys = self.store.ok_keys(shard)
        if self.view:
            from pipeline.views import view_keys

            keep = set(view_keys(self.store, self.view).get(shard, []))
            keys = [k for k in keys if k in keep]
        errors = ["bad" if k in self.bad else None for k in keys]
        table = pa.table({"key": keys, "error": pa.array(errors, pa.string())})
        if self.pad:  # incompressible bytes: a big output file
            table = table.append_column("pad", pa.array([os.urandom(self.pad) for _ in keys]))
        checksum = fs.write_parquet(self.store.url(STAGE, f"{shard}.parquet"), table)
        n_err = sum(e is not None for e in errors)
        return self.store.write_status(
            STAGE,
            shard,
            {
                "rows": len(keys),
                "ok": len(keys) - n_err,
                "errors": n_err,
                "errors_by_reason": {"bad": n_err} if n_err else {},
                "checksum": checksum,
            },
        )


def keys_stage(
    store: Store, view: str | None = None, bad: tuple[str, ...] = (), pad: int = 0
) -> StageSpec:
    return StageSpec(
        stage=STAGE,
        worker_cls=KeysWorker,
        worker_kwargs={"store": store.root, "view": view, "bad": bad, "pad": pad},
        settings={"view": view},
    )


# ---- 1. two ingests from different sources at once ----------------------------------------------
def test_two_concurrent_ingests_never_lose_samples(tmp_path):
    """20 trials of the race, in two long-lived processes: each ingest either adds all its
    samples or is refused with one line naming the other; after re-running the refused one,
    every sample is there exactly once."""
    from concurrent.futures import ProcessPoolExecutor

    a, b = tiny_folder(tmp_path / "a", 3, "a"), tiny_folder(tmp_path / "b", 3, "b")
    ctx = mp.get_context("spawn")  # fork would copy this process's thread pools mid-use
    pools = [ProcessPoolExecutor(1, mp_context=ctx) for _ in range(2)]
    refused = 0
    try:
        for pool in pools:  # start both processes (and their imports) before the trials
            pool.submit(os.getpid).result()
        for trial in range(20):
            root = str(tmp_path / f"store{trial}")
            futures = [
                pool.submit(ingest_folder, root, str(src), progress=False, shard_size=1)
                for pool, src in zip(pools, (a, b), strict=True)
            ]
            outcomes = []
            for fut in futures:
                try:
                    outcomes.append(fut.result(60).added)
                except LeaseHeld as e:  # refused: nothing written for it
                    assert "is being written (ingest) by" in str(e)
                    outcomes.append(None)
            for src, added in zip((a, b), outcomes, strict=True):
                if added is None:  # the re-run of the refused one adds it
                    refused += 1
                    assert ingest_folder(root, str(src), progress=False, shard_size=1).added == 3
                else:
                    assert added == 3
            keys = meta_keys(Store(root))
            assert len(keys) == 6 and len(set(keys)) == 6, trial
            assert verify(Store(root))["ok"]
    finally:
        for pool in pools:
            pool.shutdown()
    print(f"refused {refused} of 40 ingests")


def test_second_ingest_is_refused_with_one_line_naming_the_holder(tmp_path, capsys):
    root = str(tmp_path / "s")
    src = tiny_folder(tmp_path / "a", 2, "a")
    with Store(root).lease("ingest", owner="alphaset ingest folder other"):
        assert main(["ingest", "folder", str(src), "--store", root, "--no-progress"]) == 2
    line = one_line(capsys.readouterr().err)
    assert "'alphaset ingest folder other' (pid" in line and "expires" in line


def test_same_stage_refused_other_stage_runs(tmp_path):
    root = str(tmp_path / "s")
    ingest_folder(root, str(tiny_folder(tmp_path / "a", 2, "a")), progress=False)
    store = Store(root)
    with store.lease(STAGE, owner="other run"):
        with pytest.raises(LeaseHeld, match="other run"):
            run_stage(store, keys_stage(store), progress=False, use_ray=False)
        other = keys_stage(store)
        other.stage = "scores/other"  # a different tag runs beside it
        assert run_stage(store, other, progress=False, use_ray=False).ok


# ---- 2. error rows are not final -------------------------------------------------------------
def test_bad_max_pixels_rejected_and_error_rows_retried(tmp_path, capsys):
    root = str(tmp_path / "s")
    src = tiny_folder(tmp_path / "a", 3, "a")
    base = ["ingest", "folder", str(src), "--store", root, "--no-progress"]
    for bad in ("-1", "0"):
        assert main([*base, "--max-pixels", bad]) == 2
        assert "--max-pixels: must be > 0" in one_line(capsys.readouterr().err)
    assert not os.path.exists(root)  # rejected before anything was written
    assert main([*base, "--max-pixels", "100"]) == 0  # 24x24 = 576 pixels: all "bombs"
    assert "3 errors" in capsys.readouterr().out
    assert main(base) == 0
    assert "nothing new" in capsys.readouterr().out
    assert main([*base, "--retry-errors"]) == 0
    out = capsys.readouterr().out
    assert "retried 3 earlier error row(s)" in out and "(3 ok, 0 errors)" in out
    keys = meta_keys(Store(root))
    assert len(keys) == 3 == len(set(keys))
    assert verify(Store(root))["ok"]


def test_truncated_jpeg_replaced_later_is_reingested(tmp_path):
    root = str(tmp_path / "s")
    src = tiny_folder(tmp_path / "a", 2, "a")
    good = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 10, 10)).save(good, "JPEG")
    (src / "cut.jpg").write_bytes(good.getvalue()[:200])
    s1 = ingest_folder(root, str(src), progress=False)
    assert sum(s1.errors.values()) == 1
    (src / "cut.jpg").write_bytes(good.getvalue())
    s2 = ingest_folder(root, str(src), progress=False, shard_size=1000)
    assert s2.added == 0
    from pipeline.ingest.folder import folder_samples
    from pipeline.ingest.writer import IngestConfig, ingest

    s3 = ingest(
        Store(root),
        folder_samples(str(src)),
        "folder",
        IngestConfig(),
        progress=False,
        retry_errors=True,
    )
    assert s3.retried == 1 and s3.ok == 1
    t = pl.read_parquet(Store(root).url("meta"))
    assert t.height == 3 and t["key"].n_unique() == 3 and (t["status"] == "ok").all()
    assert verify(Store(root))["ok"]


def test_stage_retry_errors_redoes_shards_with_error_rows(tmp_path):
    root = str(tmp_path / "s")
    ingest_folder(root, str(tiny_folder(tmp_path / "a", 4, "a")), progress=False, shard_size=2)
    store = Store(root)
    bad = tuple(store.ok_keys("000001")[:1])
    first = run_stage(store, keys_stage(store, bad=bad), progress=False, use_ray=False)
    assert sum(first.errors.values()) == 1
    spec = keys_stage(store, bad=bad)
    spec.worker_kwargs["bad"] = ()  # the cause is fixed
    assert run_stage(store, spec, progress=False, use_ray=False).done == []  # plain re-run skips
    try:
        set_run_options(RunOptions(retry_errors=True))
        s = run_stage(store, spec, progress=False, use_ray=False)
    finally:
        set_run_options(RunOptions())
    assert s.done == ["000001"] and s.redo == {"000001": "it has error rows (--retry-errors)"}
    assert store.status(STAGE, "000001")["errors"] == 0


# ---- 3. a deleted ingest status record ---------------------------------------------------------
def test_deleted_ingest_record_does_not_duplicate_keys(tmp_path):
    root = str(tmp_path / "s")
    src = tiny_folder(tmp_path / "a", 4, "a")
    ingest_folder(root, str(src), progress=False, shard_size=2)
    store = Store(root)
    run_stage(store, keys_stage(store), progress=False, use_ray=False)
    os.remove(store.status_url("ingest", "000000"))
    again = ingest_folder(root, str(src), progress=False, shard_size=2)
    assert again.added == 2 and again.shards == ["000002"]
    keys = meta_keys(store)
    assert len(keys) == 4 == len(set(keys))
    assert list(Path(root, "_quarantine").rglob("000000.*"))  # moved aside, not deleted
    s = run_stage(store, keys_stage(store), progress=False, use_ray=False)
    assert s.done == ["000002"]  # its stale stage shard 000000 went to quarantine too
    stage_keys = pl.read_parquet(store.url(STAGE))["key"].to_list()
    assert sorted(stage_keys) == sorted(keys)
    assert verify(store)["ok"]


# ---- 5. one-line errors ------------------------------------------------------------------------
def test_store_path_that_is_a_file_is_one_line(tmp_path, capsys):
    src = tiny_folder(tmp_path / "a", 1, "a")
    (tmp_path / "file").write_text("x")
    for store in (tmp_path / "file", tmp_path / "file" / "sub"):
        assert main(["ingest", "folder", str(src), "--store", str(store), "--no-progress"]) == 2
        assert str(tmp_path / "file") in one_line(capsys.readouterr().err)
    assert main(["manifest", "repair", "--store", str(tmp_path / "file")]) == 2
    assert "is a file" in one_line(capsys.readouterr().err)


def _flip(path: Path, at: int = 40) -> None:
    data = bytearray(path.read_bytes())
    for i in range(at, min(at + 64, len(data) - 8)):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_corrupt_parquet_in_stats_and_view_create_is_one_line(tmp_path, capsys):
    root = str(tmp_path / "s")
    ingest_folder(root, str(tiny_folder(tmp_path / "a", 2, "a")), progress=False)
    _flip(Path(root, "meta", "000000.parquet"))
    assert main(["manifest", "stats", "--store", root]) == 2
    assert "meta/000000.parquet is not a readable Parquet file" in one_line(capsys.readouterr().err)
    assert main(["manifest", "view", "create", "v", "--store", root, "--where", "width > 0"]) == 2
    assert "meta/000000.parquet" in one_line(capsys.readouterr().err)


def test_manifest_show_into_a_closed_pipe_is_silent(tmp_path):
    root = str(tmp_path / "s")
    ingest_folder(root, str(tiny_folder(tmp_path / "a", 1, "a")), progress=False)
    cmd = [sys.executable, "-m", "pipeline.cli", "manifest", "show", "--store", root]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # `| head -0`: the reader is gone before the first write
    err = proc.stderr.read().decode()
    proc.wait(60)
    assert "Traceback" not in err and "BrokenPipe" not in err, err


needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("mount") is None, reason="needs root for a tmpfs"
)


@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)]).returncode:
        pytest.skip("cannot mount a tmpfs here")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)])


@needs_root
def test_disk_full_stops_cleanly_with_summary_and_exit_1(small_disk, tmp_path, capsys):
    """Ingest fills a 1 MB disk: the summary of what was written, one line, exit 1; a stage on the
    full disk stops too (no crash writing manifest.json); after freeing space both resume."""
    src = tmp_path / "big"
    src.mkdir()
    rng = __import__("numpy").random.default_rng(0)
    for i in range(16):  # noise, stored as ~100 KB JPEGs each
        Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype="uint8")).save(src / f"n{i}.png")
    root = str(small_disk / "store")
    argv = ["ingest", "folder", str(src), "--store", root, "--no-progress", "--shard-size", "2"]
    assert main(argv) == 1
    cap = capsys.readouterr()
    line = one_line(cap.err)
    assert "No space left on device" in line and "re-run the same command" in line
    assert "ingest folder:" in cap.out  # the summary of the shards written
    store = Store(root)
    written = store.shards()
    assert written and len(meta_keys(store)) == 2 * len(written)
    # a stage whose outputs do not fit: stopped at the first failed write, summarised
    filler = small_disk / "filler"
    free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
    filler.write_bytes(b"\0" * max(free - (48 << 10), 0))  # room for lease, config, records
    summary = run_stage(store, keys_stage(store, pad=100_000), progress=False, use_ray=False)
    assert summary.stopped and "No space left on device" in summary.stopped, summary.lines()
    assert len(summary.failed) == 1 and not summary.ok  # stopped at once, not shard after shard
    assert any("STOPPED" in ln for ln in summary.lines())
    # room again: both resume and finish
    filler.unlink()
    for p in sorted(Path(src).glob("*.png"))[len(written) * 2 + 1 :]:
        p.unlink()  # the stored ones and one more: small enough for the disk
    assert main(argv) == 0
    assert run_stage(store, keys_stage(store), progress=False, use_ray=False).ok
    assert verify(store)["ok"]


# ---- 6. Ray addresses --------------------------------------------------------------------------
def test_unreachable_and_http_ray_addresses_are_one_line(tmp_path):
    from pipeline.cluster import connect_ray
    from pipeline.errors import UserError

    with pytest.raises(
        UserError, match=r"cannot reach the Ray cluster at 127.0.0.1:1 \(connection refused\)"
    ):
        connect_ray("127.0.0.1:1", timeout=5)
    with pytest.raises(UserError, match="is an HTTP .* address; .*6379"):
        connect_ray("http://127.0.0.1:8265")
    with pytest.raises(UserError, match="expected HOST:PORT"):
        connect_ray("nonsense")


def test_ray_address_that_never_answers_times_out(tmp_path):
    """A port that accepts but never speaks Ray: the command ends after --ray-timeout, one line."""
    import socket

    root = str(tmp_path / "s")
    ingest_folder(root, str(tiny_folder(tmp_path / "a", 1, "a")), progress=False)
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    env = {**os.environ, "RAY_ADDRESS": f"127.0.0.1:{srv.getsockname()[1]}"}
    cmd = [sys.executable, "-m", "pipeline.cli", "caption", "--store", root, "--no-progress"]
    try:
        proc = subprocess.run(
            cmd + ["--ray-timeout", "3"], env=env, capture_output=True, timeout=120
        )
    finally:
        srv.close()
    assert proc.returncode == 2, proc.stderr.decode()[-2000:]
    # Ray's own "Connecting to existing Ray cluster" line announces the attempt (and a tiny
    # model's first build shows a bar); after it, one line from alphaset and nothing else.
    err = proc.stderr.decode().replace("\r", "\n")
    noise = ("Writing model shards", "Connecting to existing Ray cluster")
    line = one_line("\n".join(x for x in err.splitlines() if not any(n in x for n in noise)))
    assert err.rstrip().splitlines()[-1] == line
    assert "did not answer within 3 s (--ray-timeout)" in line and "127.0.0.1:" in line
    assert not Path(root, "_status", "captions").exists()


# ---- 7. verify and view-restricted stages ------------------------------------------------------
def test_verify_compares_a_view_stage_with_the_view(tmp_path):
    root = str(tmp_path / "s")
    ingest_folder(root, str(tiny_folder(tmp_path / "a", 4, "a")), progress=False, shard_size=2)
    store = Store(root)
    from pipeline.views import create_view

    create_view(store, "best", "height >= 25")  # 3 of the 4 images
    run_stage(store, keys_stage(store, view="best"), progress=False, use_ray=False)
    report = verify(store)
    assert report["ok"], report["problems"]
    # and a stage shard that lacks a view key is still caught
    t = pl.read_parquet(store.url(STAGE, "000001.parquet")).head(0)
    fs.write_parquet(store.url(STAGE, "000001.parquet"), t.to_arrow())
    problems = verify(store)["problems"]
    assert any(
        p["path"] == f"{STAGE}/000001.parquet" and "view best" in p["message"] for p in problems
    )


# ---- 8. rejected commands leave nothing behind -------------------------------------------------
def test_rejected_stage_commands_have_no_side_effects(tmp_path, capsys):
    root = str(tmp_path / "s")
    ingest_folder(root, str(tiny_folder(tmp_path / "a", 1, "a")), progress=False)
    assert main(["caption", "--store", root, "--shards", "999999"]) == 2
    assert "999999" in one_line(capsys.readouterr().err)
    assert main(["caption", "--store", root, "--workers", "0"]) == 2
    assert "--workers: must be > 0" in one_line(capsys.readouterr().err)
    assert not Path(root, "_status", "captions").exists()
    # and through the library: the shard list is checked before the stage config is written
    store = Store(root)
    spec = keys_stage(store)
    spec.shards = ["999999"]
    with pytest.raises(Exception, match="not ingested"):
        run_stage(store, spec, progress=False, use_ray=False)
    assert store.stage_config(STAGE) is None


# ---- 9. repair ---------------------------------------------------------------------------------
@pytest.fixture
def staged(tmp_path):
    root = str(tmp_path / "s")
    src = tiny_folder(tmp_path / "src", 4, "a")
    ingest_folder(root, str(src), progress=False, shard_size=2)
    store = Store(root)
    run_stage(store, keys_stage(store), progress=False, use_ray=False)
    return store, src


def test_garbage_manifest_and_record_are_problem_rows_then_repaired(staged, capsys):
    store, _ = staged
    Path(store.manifest_url).write_text("{not json")
    Path(store.status_url(STAGE, "000001")).write_text("garbage")
    assert main(["manifest", "verify", "--store", store.root]) == 1
    out = capsys.readouterr().out
    assert "PROBLEM manifest.json: is not valid JSON" in out
    assert f"PROBLEM _status/{STAGE}/000001.json: is not valid JSON" in out
    assert main(["manifest", "show", "--store", store.root]) == 2
    assert "manifest repair" in one_line(capsys.readouterr().err)
    assert main(["manifest", "repair", "--store", store.root]) == 0
    out = capsys.readouterr().out
    assert "unreadable status record moved to quarantine" in out and "rebuilt manifest.json" in out
    s = run_stage(store, keys_stage(store), progress=False, use_ray=False)
    assert s.done == ["000001"]
    assert verify(store)["ok"]


@pytest.mark.parametrize("damage", ["truncate tar", "delete meta"])
def test_damaged_ingest_shard_is_redone_from_the_source(staged, damage):
    store, src = staged
    if damage == "truncate tar":
        p = Path(store.image_url("000000"))
        p.write_bytes(p.read_bytes()[:1000])
    else:
        os.remove(store.meta_url("000000"))
    assert not verify(store)["ok"]
    info = repair(store)
    assert any("ingest shard 000000: removed its status record" in a for a in info["actions"])
    again = ingest_folder(store.root, str(src), progress=False, shard_size=2)
    assert again.added == 2
    run_stage(store, keys_stage(store), progress=False, use_ray=False)
    keys = meta_keys(store)
    assert len(keys) == 4 == len(set(keys))
    report = verify(store)
    assert report["ok"], report["problems"]


def test_flipped_byte_in_a_stage_output(staged):
    store, _ = staged
    p = Path(store.url(STAGE, "000000.parquet"))
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x01  # same size: the cheap check passes
    p.write_bytes(bytes(data))
    assert run_stage(store, keys_stage(store), progress=False, use_ray=False).done == []
    try:
        set_run_options(RunOptions(verify_done=True))
        s = run_stage(store, keys_stage(store), progress=False, use_ray=False)
    finally:
        set_run_options(RunOptions())
    assert s.done == ["000000"] and "checksum" in s.redo["000000"]
    assert verify(store)["ok"]
    # a deleted or truncated output is redone without --verify-done
    p.write_bytes(p.read_bytes()[:-10])
    s = run_stage(store, keys_stage(store), progress=False, use_ray=False)
    assert s.done == ["000000"] and "size" in s.redo["000000"]
    # and repair finds a checksum failure too
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x01
    p.write_bytes(bytes(data))
    assert any("fails its checksum" in a for a in repair(store)["actions"])
    assert run_stage(store, keys_stage(store), progress=False, use_ray=False).done == ["000000"]


def test_repair_help_has_reads_writes_example(capsys):
    assert main(["manifest", "repair", "--help"]) == 0
    out = capsys.readouterr().out
    assert "Reads:" in out and "Writes:" in out and "Example: alphaset manifest repair" in out


# ---- 10. smaller ones --------------------------------------------------------------------------
def test_temp_leftovers_are_removed_by_the_next_run(staged):
    store, src = staged
    leftovers = [
        Path(store.root, "images", ".000004.tar.tmp-deadbeef"),
        Path(store.root, "meta", ".000004.parquet.tmp-deadbeef"),
        Path(store.root, STAGE, ".000001.parquet.tmp-deadbeef"),
    ]
    for p in leftovers:
        p.write_bytes(b"partial")
    assert any("temporary file" in w["message"] for w in verify(store)["warnings"])
    ingest_folder(store.root, str(src), progress=False)
    run_stage(store, keys_stage(store), progress=False, use_ray=False)
    assert not any(p.exists() for p in leftovers)
    assert verify(store)["warnings"] == []
    # repair deletes nothing: it moves a leftover aside
    leftovers[0].write_bytes(b"partial")
    info = repair(store)
    assert not leftovers[0].exists()
    assert (
        Path(store.root, info["quarantine"], "images", leftovers[0].name).read_bytes() == b"partial"
    )


def test_verbose_after_the_subcommand(staged, capsys):
    store, _ = staged
    assert main(["manifest", "show", "--store", store.root, "-v"]) == 0
    assert "store " in capsys.readouterr().out


def test_where_too_long_or_aggregate_is_refused_fast(staged, capsys):
    import time

    store, _ = staged
    t0 = time.perf_counter()
    long = " or ".join(f"width > {i}" for i in range(12_000))
    base = ["manifest", "view", "create", "v", "--store", store.root, "--where"]
    assert main([*base, long]) == 2
    assert "characters long" in one_line(capsys.readouterr().err)
    assert time.perf_counter() - t0 < 5
    for expr in ("width > min(width)", "sum(width) > 3", "width > avg(height)"):
        assert main([*base, expr]) == 2
        assert "aggregates a whole column" in one_line(capsys.readouterr().err)
    assert (
        main([*base, "min(width, height) >= 24 and name <> 'sum(x)'".replace("name", "path")]) == 0
    )


def test_special_tar_members_are_error_rows_and_duplicates_named(tmp_path):
    from pipeline.ingest.wds import wds_samples
    from pipeline.ingest.writer import IngestConfig, ingest

    img = io.BytesIO()
    Image.new("RGB", (20, 20), (1, 2, 3)).save(img, "PNG")
    tar = tmp_path / "x.tar"
    with tarfile.open(tar, "w") as tf:
        for name, kind in (("a.png", tarfile.REGTYPE), ("fifo.png", tarfile.FIFOTYPE),
                           ("dev.jpg", tarfile.CHRTYPE), ("dir.jpg", tarfile.DIRTYPE),
                           ("folder", tarfile.DIRTYPE), ("b.png", tarfile.REGTYPE),
                           ("a.png", tarfile.REGTYPE)):  # fmt: skip
            info = tarfile.TarInfo(name)
            info.type = kind
            data = img.getvalue() if kind == tarfile.REGTYPE else b""
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    s = ingest(
        Store(str(tmp_path / "s")), wds_samples(str(tar)), "wds", IngestConfig(), progress=False
    )
    assert s.ok == 2 and s.duplicates == 1 and s.skipped_existing == 0
    assert sum(s.errors.values()) == 3, s.errors
    assert any("duplicate key(s) within the source" in ln for ln in s.lines())
    rows = pl.read_parquet(str(tmp_path / "s" / "meta"))
    errs = rows.filter(pl.col("status") == "error")["error"].to_list()
    assert all("not a regular file" in e for e in errs), errs


# ---- the same on an object store ---------------------------------------------------------------
def test_leases_cleanup_and_repair_on_s3(s3_bucket, tmp_path):
    """On S3 (moto server): ingest and a stage under their leases, a refused second writer, a
    deleted status record set aside by the next ingest, then repair of a damaged stage shard."""
    import s3fs

    root = f"{s3_bucket}/store"
    src = tiny_folder(tmp_path / "a", 4, "a")
    ingest_folder(root, str(src), progress=False, shard_size=2)
    store = Store(root)
    with store.lease("ingest", owner="someone else"):
        with pytest.raises(LeaseHeld, match="someone else"):
            ingest_folder(root, str(src), progress=False, shard_size=2)
    assert run_stage(store, keys_stage(store), progress=False, use_ray=False).ok
    s3 = s3fs.S3FileSystem(skip_instance_cache=True)
    s3.rm(store.status_url("ingest", "000000")[5:])
    assert ingest_folder(root, str(src), progress=False, shard_size=2).added == 2
    assert len(meta_keys(store)) == 4 == len(set(meta_keys(store)))
    s3.pipe(store.url(STAGE, "000001.parquet")[5:], b"not parquet")
    actions = repair(store)["actions"]
    assert any(f"{STAGE} shard 000001" in a for a in actions), actions
    assert sorted(run_stage(store, keys_stage(store), progress=False, use_ray=False).done) == [
        "000001",
        "000002",
    ]
    report = verify(store)
    assert report["ok"], report["problems"]


@pytest.mark.parametrize("where", ["local", "s3", "gcs"])
def test_record_deleted_by_hand_after_a_seal(where, tmp_path, monkeypatch, request):
    """With sealed-index reads (the object-store default; forced locally here), a status record
    deleted by hand is invisible to readers that trust the sealed index: verify lists the records,
    names the index as out of date, repair re-seals it, and the next run redoes the shard."""
    import pipeline.store

    monkeypatch.setattr(pipeline.store, "INDEX_MIN_RECORDS", 1)  # every stage keeps an index
    monkeypatch.setenv("ALPHASET_STATUS_READS", "index")
    if where == "local":
        root = str(tmp_path / "s")
    else:
        root = f"{request.getfixturevalue(f'{where}_bucket')}/s"
    ingest_folder(root, str(tiny_folder(tmp_path / "a", 4, "a")), progress=False, shard_size=1)
    store = Store(root)
    assert len(run_stage(store, keys_stage(store), progress=False, use_ray=False).done) == 4
    assert verify(Store(root))["ok"]
    fs.remove(store.status_url(STAGE, "000002"))
    assert "000002" in Store(root).completed(STAGE)  # what the sealed index says
    report = verify(Store(root))
    assert not report["ok"]
    assert any(
        p["path"] == f"_status/{STAGE}/_index.json.gz" and "000002" in p["message"]
        for p in report["problems"]
    ), report["problems"]
    repair(Store(root))
    assert "000002" not in Store(root).completed(STAGE)
    assert run_stage(Store(root), keys_stage(store), progress=False, use_ray=False).done == [
        "000002"
    ]
    assert verify(Store(root))["ok"], verify(Store(root))["problems"]
