"""The demo's data chain on ``s3://`` (moto server mode on loopback), command by command, then
the README's read-it-without-alphaset snippet exactly as printed (only ``STORE`` set to the
bucket), in a process of its own, with leftover files planted that it must not
read."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import s3fs

from pipeline.demo import DEMO_VIEW, write_demo_photos

REPO = Path(__file__).parent.parent.parent
FEATURES_TAG = "tiny_tiny_256_alt"


def readme_snippet() -> str:
    text = (REPO / "README.md").read_text()
    start = text.index("Everything reads without alphaset")
    block = re.search(r"```python\n(.*?)```", text[start:], re.S)
    assert block is not None, "README lost its read-it-without-alphaset snippet"
    return block.group(1)


def _alphaset(*args: str, env: dict[str, str]) -> str:
    t = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, f"alphaset {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
    print(f"alphaset {args[0]}: {time.perf_counter() - t:.1f}s")
    return proc.stdout


@pytest.mark.slow
def test_demo_chain_on_s3_and_readme_snippet(s3_bucket, tmp_path):
    store = f"{s3_bucket}/store"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    write_demo_photos(tmp_path / "photos")
    run = lambda *a: _alphaset(*a, "--store", store, env=env)  # noqa: E731

    run("ingest", "folder", str(tmp_path / "photos"), "--label-from-dir", "--max-side", "512",
        "--shard-size", "4", "--no-progress")  # fmt: skip
    # Caption on Ray: the actors reach the endpoint through the inherited AWS_* variables.
    out = run("caption", "--model", "tiny", "--max-new-tokens", "8", "--no-progress")
    assert "captions/tiny: 4 shard(s) done" in out
    run("score", "--clip", "tiny", "--no-ray", "--no-progress")
    run("dedup", "--no-semantic")
    run("manifest", "view", "create", "best", "--where", DEMO_VIEW)
    out = run("features", "--resolution", "256", "--captions", "alt", "--t5", "tiny",
              "--vae", "tiny", "--no-ray", "--no-progress")  # fmt: skip
    assert f"features/{FEATURES_TAG}: 4 shard(s) done" in out

    s3 = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)
    manifest = json.loads(s3.cat(f"{store[5:]}/manifest.json"))
    assert len(manifest["shards"]) == 4
    for stage in ("captions/tiny", "scores/tiny", "scores/dedup", f"features/{FEATURES_TAG}"):
        assert len(manifest["stages"][stage]["shards"]) == 4, stage
    out = run("manifest", "verify")
    assert "verify: OK, 0 problem(s), 0 warning(s)" in out

    # Leftovers of a killed run: complete files without status records, in every data folder.
    for folder, ext in (("meta", "parquet"), ("images", "tar"), ("captions/tiny", "parquet"),
                        (f"features/{FEATURES_TAG}", "tar")):  # fmt: skip
        s3.copy(f"{store[5:]}/{folder}/000000.{ext}", f"{store[5:]}/{folder}/000004.{ext}")

    # The README snippet, as printed, in a process where alphaset cannot be imported.
    code = readme_snippet().replace('STORE = "store"', f'STORE = "{store}"', 1)
    assert f'STORE = "{store}"' in code
    code += (
        "\nimport json as _j, sys\n"
        "assert 'pipeline' not in sys.modules  # the snippet never imported alphaset\n"
        "n_img = sum(1 for _ in wds.WebDataset([f'{STORE}/images/{n}.tar' for n in shards], "
        "shardshuffle=False))\n"
        "n_feat = sum(1 for _ in wds.WebDataset(feats, shardshuffle=False))\n"
        "print(_j.dumps({'meta': meta.num_rows, 'caps': caps.height, 'pairs': pairs.height,"
        " 'images': n_img, 'features': n_feat, 'last_t5': list(s['t5.npy'].shape)}))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env,
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    # 13 files (one truncated → an error row), 12 ok images; the leftovers add nothing.
    assert got["meta"] == 13 and got["caps"] == 12 and got["pairs"] == 12
    assert got["images"] == 12
    assert got["features"] == 12 and got["last_t5"][0] > 0

    # verify keeps reporting the leftovers (the meta copy repeats ingested keys: a problem).
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "manifest", "verify", "--store", store],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    out = proc.stdout
    for rel in ("meta/000004.parquet", "images/000004.tar", "captions/tiny/000004.parquet",
                f"features/{FEATURES_TAG}/000004.tar"):  # fmt: skip
        assert f"{rel}: no status record" in out, out
