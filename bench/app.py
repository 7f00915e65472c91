"""Benchmark: the Explore tab of `alphaset app` on a store of 1M rows — the first grid page must
show in < 2 s.

Store (synthetic, written once into --dir and reused): --n rows in shards of --shard-size, meta
(the full `META_SCHEMA`, 1% error rows), one caption tag, one score tag (`clip_aesthetic`,
`clip_text_sim`, technical columns), `scores/dedup` (1% duplicates) and `embeddings/<tag>`
(--dim-d fp16 unit vectors), each shard with its status record as the stages write them. Image
tars: real photos (scikit-image's, re-encoded as 256 px JPEGs) for the first --tar-shards shards
only; the other shards' thumbnails are placeholders, which is what the grid shows for a store
whose tar is missing.

Timed, each in this process, with the store's files in the page cache as on a server that has run
a while (the first open after a reboot reads from disk):
  open       `Explorer(store)`: status records of every stage, row counts per shard
  page 1     the first page (24 rows: meta, captions, scores of shard 0, thumbnails from its tar)
  page 2 / deep page   the next page, and a page in the middle of the store
  where      `--where` over the joined table of every shard (read once per process), first page
  where 2    a second `--where` (the joined table cached)
  search     "more like this": faiss index over embeddings/<tag> (built once), then one query
  http       the same first page through the running app (gradio_client → handler → thumbnails
             encoded and served), what a browser waits for before drawing the grid

    .venv/bin/python bench/app.py --n 1000000
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline import fs  # noqa: E402
from pipeline.store import META_SCHEMA, Store, shard_name, write_tar  # noqa: E402

CAPTION_TAG, SCORE_TAG = "synthetic-captioner", "synthetic-clip"
WORDS = "a photo of cat dog red blue car street sky sea mountain tree house person at night".split()


def photo_jpegs(n: int = 6) -> list[bytes]:
    from PIL import Image
    from skimage import data

    out = []
    for name in ("astronaut", "chelsea", "coffee", "rocket", "camera", "coins")[:n]:
        img = Image.fromarray(np.asarray(getattr(data, name)())).convert("RGB")
        img.thumbnail((256, 256))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=85)
        out.append(buf.getvalue())
    return out


def build_store(root: str, n: int, shard_size: int, dim: int, tar_shards: int) -> Store:
    """Write the synthetic store (skipped when ``root`` already holds one of this size)."""
    store = Store(root)
    marker = Path(root) / "bench.json"
    spec = {"n": n, "shard_size": shard_size, "dim": dim, "tar_shards": tar_shards}
    if marker.exists() and json.loads(marker.read_text()) == spec:
        return store
    store.create()
    rng = np.random.default_rng(0)
    jpegs = photo_jpegs()
    t0 = time.perf_counter()
    for s, lo in enumerate(range(0, n, shard_size)):
        shard = shard_name(s)
        m = min(shard_size, n - lo)
        keys = [f"img{lo + i:08d}" for i in range(m)]
        error = rng.random(m) < 0.01
        w = rng.integers(256, 2048, m).astype(np.int32)
        h = rng.integers(256, 2048, m).astype(np.int32)
        cols = {name: pa.nulls(m, f.type) for name, f in zip(META_SCHEMA.names, META_SCHEMA, strict=True)}  # fmt: skip
        cols.update(
            key=pa.array(keys),
            shard=pa.array([shard] * m),
            status=pa.array(np.where(error, "error", "ok")),
            error=pa.array([("truncated image" if e else None) for e in error], pa.string()),
            source=pa.array(["folder"] * m),
            path=pa.array([f"photos/{k}.jpg" for k in keys]),
            format=pa.array(["jpg"] * m),
            width=pa.array(np.where(error, 0, w), pa.int32()),
            height=pa.array(np.where(error, 0, h), pa.int32()),
            bytes=pa.array(rng.integers(20_000, 900_000, m)),
            sha256=pa.array([f"{lo + i:064x}" for i in range(m)]),
            alt_text=pa.array([" ".join(rng.choice(WORDS, 6)) for _ in range(m)]),
        )
        fs.write_parquet(store.meta_url(shard), pa.table(cols, schema=META_SCHEMA))
        ok = [k for k, e in zip(keys, error, strict=True) if not e]
        k_ok = len(ok)
        caps = pa.table(
            {
                "key": pa.array(ok),
                "caption": pa.array([" ".join(rng.choice(WORDS, 12)) for _ in ok]),
                "model": pa.array(["synthetic"] * k_ok),
                "error": pa.nulls(k_ok, pa.string()),
            }
        )
        scores = pa.table(
            {
                "key": pa.array(ok),
                "error": pa.nulls(k_ok, pa.string()),
                "clip_aesthetic": pa.array(rng.normal(5.5, 0.8, k_ok).astype(np.float32)),
                "clip_text_sim": pa.array(rng.normal(0.28, 0.05, k_ok).astype(np.float32)),
                "sharpness": pa.array(rng.gamma(2, 80, k_ok).astype(np.float32)),
                "phash": pa.array([f"{x:016x}" for x in rng.integers(0, 2**62, k_ok)]),
            }
        )
        dup = rng.random(k_ok) < 0.01
        dedup = pa.table(
            {
                "key": pa.array(ok),
                "dup_of": pa.array(
                    [ok[0] if d and i else None for i, d in enumerate(dup)], pa.string()
                ),  # fmt: skip
                "dup_kind": pa.array(
                    ["phash" if d and i else None for i, d in enumerate(dup)], pa.string()
                ),  # fmt: skip
                "dup_score": pa.array(
                    [0.95 if d and i else None for i, d in enumerate(dup)], pa.float32()
                ),  # fmt: skip
                "error": pa.nulls(k_ok, pa.string()),
            }
        )
        vec = rng.standard_normal((k_ok, dim)).astype(np.float32)
        vec /= np.linalg.norm(vec, axis=1, keepdims=True)
        values = pa.array(vec.astype(np.float16).reshape(-1), type=pa.float16())
        emb = pa.table(
            {
                "key": pa.array(ok),
                "embedding": pa.FixedSizeListArray.from_arrays(values, dim),
                "error": pa.nulls(k_ok, pa.string()),
            }
        )
        for stage, table in (
            (f"captions/{CAPTION_TAG}", caps),
            (f"scores/{SCORE_TAG}", scores),
            ("scores/dedup", dedup),
            (f"embeddings/{SCORE_TAG}", emb),
        ):
            checksum = fs.write_parquet(fs.join(store.stage_dir(stage), f"{shard}.parquet"), table)
            store.write_status(stage, shard, {"rows": k_ok, "ok": k_ok, "errors": 0,
                                              "checksum": checksum, "output": f"{shard}.parquet"})  # fmt: skip
        if s < tar_shards:
            samples = [(k, {"jpg": jpegs[i % len(jpegs)]}) for i, k in enumerate(ok)]
            write_tar(store.image_url(shard), samples)
        store.write_status("ingest", shard, {"rows": m, "ok": k_ok, "errors": m - k_ok})
        if s % 10 == 0:
            print(f"  shard {shard}: {lo + m} rows written ({time.perf_counter() - t0:.0f}s)", flush=True)  # fmt: skip
    for stage, settings in (
        (f"embeddings/{SCORE_TAG}", {"clip": "synthetic (no model: text search unavailable)"}),
    ):
        store.claim_stage(stage, settings)
    store.refresh_manifest()
    marker.write_text(json.dumps(spec))
    return store


def timed(label: str, fn, results: dict):
    start = time.perf_counter()
    out = fn()
    results[label] = time.perf_counter() - start
    print(f"{label:>12}: {results[label]:.3f} s", flush=True)
    return out


def browser_page(url: str, results: dict, label: str) -> None:
    """In a fresh headless chromium: open the Explore tab, click Apply, and time until the 24
    thumbnails of the first page are decoded (``img.complete`` with a width)."""
    import shutil

    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait

    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver_path):
        print(f"{label:>12}: skipped (no chromium/chromedriver)")
        return
    options = Options()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):  # fmt: skip
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        driver.get(url)
        wait = WebDriverWait(driver, 60, poll_frequency=0.02)
        wait.until(lambda d: d.find_elements("css selector", "#ex-apply"))
        [t for t in driver.find_elements("css selector", "[role=tab]") if t.text == "Explore"][
            0
        ].click()
        script = (
            "const imgs = document.querySelectorAll('#ex-grid img');"
            "return imgs.length === 24 && [...imgs].every(i => i.complete && i.naturalWidth > 0);"
        )
        start = time.perf_counter()
        driver.find_element("css selector", "#ex-apply").click()
        wait.until(lambda d: d.execute_script(script))
        results[label] = time.perf_counter() - start
        print(f"{label:>12}: {results[label]:.3f} s", flush=True)
    finally:
        driver.quit()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--shard-size", type=int, default=10_000)
    ap.add_argument("--dim", type=int, default=64, help="embedding width (CLIP ViT-L/14: 768)")
    ap.add_argument("--tar-shards", type=int, default=2, help="shards given a real image tar")
    ap.add_argument("--dir", default="/tmp/alphaset-bench-app")
    ap.add_argument("--skip-search", action="store_true")
    ap.add_argument("--skip-browser", action="store_true", help="no headless chromium timing")
    args = ap.parse_args()

    root = os.path.join(args.dir, f"store-{args.n}")
    print(f"store {root}: {args.n} rows, shards of {args.shard_size}", flush=True)
    t = time.perf_counter()
    store = build_store(root, args.n, args.shard_size, args.dim, args.tar_shards)
    print(f"  ready in {time.perf_counter() - t:.0f}s", flush=True)

    from pipeline.app.explore import PAGE_SIZE, Explorer

    r: dict[str, float] = {}
    ex = timed("open", lambda: Explorer(store.root), r)
    sel = ex.select()
    first = timed("page 1", lambda: ex.page(sel, 1), r)
    assert len(first) == PAGE_SIZE and all(i.thumb is not None for i in first)
    real = sum(1 for i in first if i.status == "ok")  # shard 0 has its tar: real thumbnails
    timed("page 2", lambda: ex.page(sel, 2), r)
    timed("deep page", lambda: ex.page(sel, ex.pages(sel) // 2), r)
    where = "clip_aesthetic > 6.5 and min(width, height) >= 1024 and dup_of is null"
    wsel = timed("where", lambda: ex.select(where), r)
    timed("where page", lambda: ex.page(wsel, 1), r)
    w2 = timed("where 2", lambda: ex.select("clip_text_sim > 0.35"), r)
    print(f"  where: {wsel.total} rows; where 2: {w2.total} rows", flush=True)
    if not args.skip_search:
        idx = timed("index", lambda: ex.search_index(None), r)
        hit = timed("search", lambda: ex.search_like(first[1].key), r)
        print(f"  {hit.label}", flush=True)
        del idx

    # Through the running app: the handler's response, then what a client waits for.
    from gradio_client import Client

    from pipeline.app.ui import ALL_ROWS, build_app

    t = time.perf_counter()
    app = build_app(store.root, None)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/"
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    print(f"  app started in {time.perf_counter() - t:.1f}s", flush=True)
    rounds = range(1, 4)
    bare = Client(url, verbose=False, download_files=False)
    for i in rounds:
        grid, _, info = timed(f"http #{i}", lambda: bare.predict(ALL_ROWS, "", api_name="/explore"), r)  # fmt: skip
    assert len(grid) == PAGE_SIZE, info
    client = Client(url, verbose=False)
    for i in rounds:
        timed(f"http+files #{i}", lambda: client.predict(ALL_ROWS, "", api_name="/explore"), r)
    if not args.skip_browser:
        for i in rounds:
            browser_page(url, r, f"browser #{i}")
    app.close()
    load = os.getloadavg()[0]
    best = {k: min(r[f"{k} #{i}"] for i in rounds) for k in ("http", "http+files")}
    line = (
        f"\n{args.n} rows: first page {r['page 1']:.3f} s (open {r['open']:.3f} s, {real} real "
        f"thumbnails); over HTTP {best['http']:.3f} s, with the 24 files {best['http+files']:.3f} s"
    )
    if not args.skip_browser and "browser #1" in r:
        line += f"; in chromium {min(r[f'browser #{i}'] for i in rounds):.3f} s"
    print(f"{line} (best of 3); load {load:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
