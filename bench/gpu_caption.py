"""Benchmark (GPU): the llava-1.5-7b architecture at random weights — bare HF `generate` against the
caption stage worker, on the same images, in the same run.

No download and no Ray: the model (CLIP ViT-L/14-336 + Llama-2-7B text, vocabulary 32064) is built
from its config directly on the GPU in bfloat16, with the locally built tokenizer. Every caption is
exactly --tokens new tokens (min_new_tokens = max_new_tokens), greedy.

  bare    `model.generate` on batches decoded, resized, tokenized and copied to the GPU beforehand.
  worker  `captioning.worker.CaptionWorker` over every shard of a store, as one Ray actor runs it
          (tar read, JPEG decode + preprocessing on the prefetch thread, host→GPU copy, generate,
          post-processing, Parquet + status record), called directly.

For each --cache mode and --batch-sizes value both are timed after a warm-up batch (with
--cache static the warm-up includes torch.compile; its time is printed). A configuration that runs
out of GPU memory is reported as such and the run goes on. Results go to stdout and, as JSON, to
--out (default: $OUT/gpu_caption.json when $OUT is set).

    python3 bench/gpu_caption.py --n 256 --batch-sizes 64 --cache dynamic,static
    python3 bench/gpu_caption.py --tiny        # CPU smoke test of this script: seconds

Needs torch, transformers (>= 5), tokenizers, pillow, numpy, pyarrow, fsspec (scikit-image for
more photos, optional); imports nothing of Ray.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from captioning.captioner import CaptionConfig, Captioner  # noqa: E402
from captioning.models import arch as get_arch  # noqa: E402
from captioning.models import build_llava  # noqa: E402
from captioning.worker import CaptionWorker  # noqa: E402
from pipeline import images  # noqa: E402
from pipeline.ingest.folder import ingest_folder  # noqa: E402
from pipeline.store import Store  # noqa: E402

SIZES = (1024, 768, 512)


def log(msg: str) -> None:
    print(msg, flush=True)


def source_photos() -> list[Image.Image]:
    out = [Image.open(p).convert("RGB") for p in sorted((ROOT / "tests/data/photos").glob("*.jpg"))]
    try:
        from skimage import data

        for name in ("astronaut", "chelsea", "coffee", "rocket", "camera", "hubble_deep_field"):
            out.append(Image.fromarray(getattr(data, name)()).convert("RGB"))
    except ImportError:  # scikit-image is optional here: the repository's photos suffice
        pass
    if not out:
        raise SystemExit("no source photos found under tests/data/photos")
    return out


def make_store(work: Path, n: int, shard_size: int) -> Store:
    """``n`` real photos (long side cycling through SIZES, JPEG q90) ingested into a fresh store."""
    src = work / "photos"
    src.mkdir(parents=True)
    sources = source_photos()
    for i in range(n):
        img = sources[i % len(sources)]
        scale = SIZES[(i // len(sources)) % len(SIZES)] / max(img.size)
        img.resize((round(img.width * scale), round(img.height * scale))).save(
            src / f"{i:05d}.jpg", quality=90
        )
    store = Store(str(work / "store"))
    ingest_folder(store, str(src), progress=False, shard_size=shard_size)
    return store


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def gen_kwargs(c: Captioner) -> dict:
    cfg = c.config
    kw = dict(
        max_new_tokens=cfg.max_new_tokens,
        min_new_tokens=cfg.min_new_tokens,
        do_sample=False,
        num_beams=1,
        pad_token_id=c.pad_id,
    )
    if cfg.cache == "static":
        kw.update(cache_implementation="static", disable_compile=not cfg.compile)
    return kw


def to_device(inputs: dict, c: Captioner) -> dict:
    out = {}
    for k, v in inputs.items():
        if torch.is_tensor(v):
            v = v.to(c.device)
            v = v.to(c.dtype) if v.is_floating_point() else v
        out[k] = v
    return out


def bench_one(model, processor, store: Store, decoded: list, args, cache: str, bs: int) -> dict:
    cfg = CaptionConfig(
        max_new_tokens=args.tokens,
        min_new_tokens=args.tokens,
        batch_size=bs,
        cache=cache,
        compile=not args.no_compile,
        device=str(model.device),
    )
    c = Captioner(model, processor, cfg)
    n = len(decoded) - len(decoded) % bs  # whole batches only on the bare side (no recompiles)
    batches = [to_device(c.prepare(decoded[i : i + bs]).inputs, c) for i in range(0, n, bs)]
    kw = gen_kwargs(c)
    res: dict = {"cache": cache, "batch_size": bs}
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    # Warm-up (static cache: compiles here).
    t0 = time.perf_counter()
    with torch.inference_mode():
        model.generate(**batches[0], **kw)
    sync()
    res["warmup_s"] = round(time.perf_counter() - t0, 1)
    # Bare generate.
    t0 = time.perf_counter()
    with torch.inference_mode():
        for b in batches:
            model.generate(**b, **kw)
    sync()
    res["bare_img_s"] = round(n / (time.perf_counter() - t0), 2)
    del batches
    # The stage worker, shard by shard.
    if "worker" in args.modes:
        worker = CaptionWorker.from_captioner(
            store.root, c, f"bench-{cache}-{bs}", "llava-1.5-7b-random"
        )
        shards = store.shards()
        rows = sum(len(store.ok_keys(s)) for s in shards)
        t0 = time.perf_counter()
        for s in shards:
            rec = worker(s)
            assert rec["ok"] == rec["rows"], rec
        sync()
        res["worker_img_s"] = round(rows / (time.perf_counter() - t0), 2)
        res["ratio"] = round(res["worker_img_s"] / res["bare_img_s"], 3)
    if torch.cuda.is_available():
        res["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--arch", default="llava-1.5-7b", help="captioning.models.ARCHS name")
    ap.add_argument("--n", type=int, default=256, help="images (default 256)")
    ap.add_argument(
        "--shard-size", type=int, default=256, help="images per store shard (default 256)"
    )
    ap.add_argument("--batch-sizes", default="64", help="comma-separated (default 64)")
    ap.add_argument(
        "--tokens", type=int, default=128, help="new tokens per caption, fixed (default 128)"
    )
    ap.add_argument(
        "--cache", default="dynamic", help="comma-separated: dynamic,static (default dynamic)"
    )
    ap.add_argument("--no-compile", action="store_true", help="static cache without torch.compile")
    ap.add_argument(
        "--attn", default="sdpa", help="attention implementation (sdpa, eager, flash_attention_2)"
    )
    ap.add_argument("--modes", default="bare,worker", help="bare,worker (bare always runs)")
    ap.add_argument(
        "--tiny", action="store_true", help="CPU smoke test: tiny arch, 8 images, 8 tokens"
    )
    ap.add_argument("--out", default=None, help="JSON results file (default $OUT/gpu_caption.json)")
    args = ap.parse_args()
    if args.tiny:
        args.arch, args.n, args.shard_size, args.tokens, args.batch_sizes = "tiny", 8, 4, 8, "4"
    cuda = torch.cuda.is_available()
    if not cuda and not args.tiny:
        raise SystemExit("no CUDA device: run with --tiny for a CPU smoke test")
    device = "cuda" if cuda else "cpu"
    if not cuda:
        torch.set_num_threads(1)  # a smoke test on a shared CPU: one thread is the fastest
    dtype = torch.bfloat16 if cuda else torch.float32
    out_path = args.out or (
        os.path.join(os.environ["OUT"], "gpu_caption.json") if os.environ.get("OUT") else None
    )
    import transformers

    info = {
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "arch": args.arch,
        "dtype": str(dtype).replace("torch.", ""),
        "new_tokens": args.tokens,
        "images": args.n,
        "attn": args.attn,
    }
    log(json.dumps(info))
    results = []
    work = Path(tempfile.mkdtemp(prefix="gpu-caption-"))
    try:
        t0 = time.perf_counter()
        store = make_store(work, args.n, args.shard_size)
        decoded = [
            images.decode(d, max_side=1024)[0]
            for s in store.shards()
            for _k, _e, d in store.iter_images(s)
        ]
        log(
            f"store: {args.n} photos in {len(store.shards())} shard(s), {time.perf_counter() - t0:.1f}s"
        )
        t0 = time.perf_counter()
        model, processor = build_llava(
            get_arch(args.arch), dtype=dtype, device=device, attn_implementation=args.attn
        )
        sync()
        params = sum(p.numel() for p in model.parameters())
        info["params_b"] = round(params / 1e9, 2)
        log(
            f"model: {params / 1e9:.2f}B parameters built on {device} in {time.perf_counter() - t0:.1f}s"
        )
        for cache in args.cache.split(","):
            for bs in (int(b) for b in args.batch_sizes.split(",")):
                try:
                    res = bench_one(model, processor, store, decoded, args, cache, bs)
                except torch.cuda.OutOfMemoryError as e:
                    res = {
                        "cache": cache,
                        "batch_size": bs,
                        "error": f"out of memory: {str(e).splitlines()[0]}",
                    }
                except Exception as e:  # report it and go on to the next configuration
                    traceback.print_exc()
                    res = {
                        "cache": cache,
                        "batch_size": bs,
                        "error": f"{type(e).__name__}: {e}"[:300],
                    }
                if "error" in res and cuda:
                    torch.cuda.empty_cache()
                results.append(res)
                log(json.dumps(res))
                if out_path:
                    Path(out_path).write_text(json.dumps({**info, "results": results}, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log("")
    log(
        f"{'cache':8} {'batch':>5} {'warmup s':>9} {'bare img/s':>11} {'worker img/s':>13} {'ratio':>6}"
    )
    for r in results:
        if "error" in r:
            log(f"{r['cache']:8} {r['batch_size']:>5} {r['error']}")
            continue
        log(
            f"{r['cache']:8} {r['batch_size']:>5} {r['warmup_s']:>9} {r['bare_img_s']:>11} "
            f"{r.get('worker_img_s', '-'):>13} {r.get('ratio', '-'):>6}"
        )


if __name__ == "__main__":
    main()
