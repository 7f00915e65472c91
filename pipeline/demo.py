"""`alphaset demo`: the whole pipeline end to end on real photos bundled with scikit-image, with
tiny random-weight models, on a laptop CPU in a few minutes."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

# (skimage name, class label, alt text): the demo's source folder is an ImageNet-style tree.
DEMO_PHOTOS = [
    ("astronaut", "person", "portrait of astronaut Eileen Collins in her orange flight suit"),
    ("chelsea", "cat", "a tabby cat named Chelsea looking at the camera"),
    ("coffee", "cup", "a cup of coffee on a saucer, seen from above"),
    ("rocket", "rocket", "a rocket on the launch pad against a blue sky"),
    ("camera", "person", "black and white photo of a cameraman with a tripod"),
    ("hubble_deep_field", "space", "the Hubble deep field full of distant galaxies"),
    ("retina", "medical", "a fundus photograph of a human retina"),
    ("colorwheel", "pattern", "a colour wheel"),
    ("logo", "pattern", "the scikit-image logo on a transparent background"),
    ("coins", "object", "greek coins on a dark background"),
    ("moon", "space", "the surface of the moon"),
    ("motorcycle", "vehicle", "a motorcycle parked in a garage"),
]


def write_demo_photos(folder: Path) -> int:
    """Write the skimage photos (jpg/png, with .txt alt-text sidecars) plus one truncated JPEG."""
    import numpy as np
    from PIL import Image
    from skimage import data

    n = 0
    for name, label, alt in DEMO_PHOTOS:
        arr = data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(data, name)()
        img = Image.fromarray(np.asarray(arr))
        out = folder / label
        out.mkdir(parents=True, exist_ok=True)
        path = out / (f"{name}.png" if img.mode in ("RGBA", "LA") else f"{name}.jpg")
        img.save(path)
        (out / f"{name}.txt").write_text(alt + "\n")
        n += 1
    # A real-world failure: a download cut short. It must become an error row, not a crash.
    good = (folder / "cat" / "chelsea.jpg").read_bytes()
    broken = folder / "broken"
    broken.mkdir(exist_ok=True)
    (broken / "truncated.jpg").write_bytes(good[: len(good) // 2])
    return n + 1


def _step(title: str) -> float:
    print(f"\n== {title}", flush=True)
    return time.perf_counter()


def run_demo(out: str, config: str | None = None) -> int:
    """Every stage, in order, on ~12 photos with tiny models. Re-running resumes: done work is skipped."""
    from pipeline.ingest.folder import ingest_folder
    from pipeline.store import Store

    started = time.perf_counter()
    out_dir = Path(out).resolve()
    photos = out_dir / "photos"
    store = Store(str(out_dir / "store"))

    t = _step(f"1. demo photos (scikit-image) → {photos}")
    print(f"{write_demo_photos(photos)} files, one of them a truncated JPEG")

    t = _step("2. ingest folder (--label-from-dir, --max-side 512)")
    s = ingest_folder(
        store, str(photos), label_from_dir=True, progress=False, shard_size=4, max_side=512
    )
    _done(s.lines(), t)

    t = _step("3. caption with the tiny LLaVA (Ray actors)")
    from captioning.run import caption_store

    _done(
        caption_store(store.root, "tiny", max_new_tokens=24, batch_size=4, progress=False).lines(),
        t,
    )

    t = _step("4. score: tiny CLIP embeddings, aesthetic head, text-image and technical scores")
    from curation.score import ScoreConfig, score_store

    _done(score_store(store, ScoreConfig(clip="tiny", batch_size=8), progress=False).lines(), t)

    t = _step("5. dedup: exact and perceptual-hash duplicates")
    from curation.dedup import DedupConfig, dedup_store

    # A random-weight CLIP maps every photo to nearly the same direction, so semantic dedup
    # would group them all; with a real CLIP leave it on (the default).
    _done(dedup_store(store, DedupConfig(semantic=False)).lines(), t)

    t = _step("6. view 'best': the images a last, aesthetic stage would see")
    from pipeline.views import create_view

    info = create_view(store, "best", DEMO_VIEW, replace=True)
    _done(
        [
            f"views/best.parquet: {info['selected']} of {info['candidates']} samples where {DEMO_VIEW}"
        ],
        t,
    )

    t = _step(
        "7. features: tiny T5 + tiny VAE, 256 px (labels, alt text, multi-scale for the view)"
    )
    from training.features import extract_features

    for kw in (
        {"captions": "label"},
        {"captions": "alt"},
        {"captions": "alt", "multi_scale": True, "view": "best"},
    ):
        _done(extract_features(store, 256, t5="tiny", vae="tiny", progress=False, **kw).lines(), t)

    t = _step("8. train the tiny DiT: pixel → align → aesthetic stages (configs/tiny.toml)")
    from training.config import load_config
    from training.train import train

    cfg = load_config(config or str(CONFIG), store=store.root, dir=str(out_dir / "runs"))
    finals = train(cfg, resume=True, progress=False)
    _done([f"{stage}: {ckpt}" for stage, ckpt in finals.items()], t)

    t = _step("9. export to diffusers")
    from training.export import export_diffusers

    export = str(out_dir / "export")
    if (out_dir / "export" / "model_index.json").exists():
        note = "already exported"
    else:
        export = export_diffusers(str(out_dir / "runs" / cfg.name), export)
        note = "diffusers.PixArtAlphaPipeline.from_pretrained loads it"
    _done([f"{export}  ({note})"], t)

    t = _step("10. sample with every sampler")
    from training.sample import SAMPLERS, sample

    for name in SAMPLERS:
        r = sample(
            export,
            ["a photo of a cat"],
            sampler=name,
            size="256x256",
            out=str(out_dir / "samples" / name),
            device="cpu",
        )
        print(f"{name:>6}: {r.files[0]}")
    _done([], t)

    t = _step("11. LoRA: a few adapter steps on the aligned model, then sample with the adapter")
    from training.recipes import train_lora

    align = str(out_dir / "runs" / cfg.name / "align")
    ckpt = train_lora(
        store.root, align, "tiny_tiny_256_alt", str(out_dir / "runs"), steps=4, rank=4,
        resume=True, num_workers=0,
    )  # fmt: skip
    r = sample(
        export,
        ["a photo of a cat"],
        sampler="dpm",
        steps=4,
        lora=f"{ckpt}/lora.safetensors:0.8",
        out=str(out_dir / "samples" / "lora"),
        device="cpu",
    )
    _done([f"adapter: {ckpt}/lora.safetensors", f"sample: {r.files[0]}"], t)

    t = _step("12. LCM, ControlNet (HED edges) and DreamBooth: objectives of the same trainer")
    _done(_fine_tune(store.root, align, out_dir), t)

    _step("13. manifest stats and verify")
    from pipeline import manifest

    print("\n".join(manifest.stats_lines(manifest.stats(store))))
    report = manifest.verify(store)
    print("\n".join(manifest.verify_lines(report)))
    print(f"\ndemo finished in {time.perf_counter() - started:.0f}s; store: {store.root}")
    return 0 if report["ok"] else 1


def _fine_tune(store: str, base: str, out_dir: Path) -> list[str]:
    """A few steps of each fine-tuning objective through the one trainer (resumable: a second
    demo run finds them done), each sampled once."""
    from training.hed import extract_edges
    from training.launch import launch
    from training.recipes import controlnet_config, dreambooth_config, lcm_config
    from training.sample import sample

    runs, tag = out_dir / "runs", "tiny_tiny_256_alt"
    loop = {"steps": 4, "batch_size": 2, "num_workers": 0, "log_every": 2}
    lines = []
    lcm = lcm_config(base, store, tag, str(runs / "lcm"), lr=1e-4, **loop)
    launch(lcm, resume=True, progress=False)
    r = sample(str(runs / "lcm"), ["a photo of a cat"], sampler="lcm", steps=4,
               out=str(out_dir / "samples" / "lcm"), device="cpu")  # fmt: skip
    lines.append(f"LCM student: {runs / 'lcm'} (4-step sample {r.files[0]})")

    extract_edges(store, "tiny", 256, use_ray=False, progress=False)
    cn = controlnet_config(store, base, tag, "hed-256", str(runs / "controlnet"), blocks=1,
                           lr=1e-3, **loop)  # fmt: skip
    launch(cn, resume=True, progress=False)
    from training.hed import read_edges

    edge = out_dir / "samples" / "edge.png"
    edge.parent.mkdir(parents=True, exist_ok=True)
    edge.write_bytes(next(iter(read_edges(store, "hed-256").values())))
    r = sample(base, ["a photo of a cat"], steps=4, controlnet=str(runs / "controlnet"),
               control_image=str(edge), out=str(out_dir / "samples" / "controlnet"), device="cpu")  # fmt: skip
    lines.append(f"ControlNet: {runs / 'controlnet'} (controlled sample {r.files[0]})")

    instance = out_dir / "photos" / "cat"
    db = dreambooth_config(base, str(instance), "a photo of sks cat", str(runs / "dreambooth"),
                           class_prompt="a photo of a cat", prior_images=2, prior_steps=2,
                           lora=4, lr=1e-3, **loop)  # fmt: skip
    launch(db, resume=True, progress=False)
    r = sample(str(runs / "dreambooth"), ["a photo of sks cat"], steps=4,
               out=str(out_dir / "samples" / "dreambooth"), device="cpu")  # fmt: skip
    lines.append(f"DreamBooth-LoRA: {runs / 'dreambooth'} (sample {r.files[0]})")
    return lines


CONFIG = Path(__file__).resolve().parent.parent / "configs" / "tiny.toml"
DEMO_VIEW = "dup_of is null and min(width, height) >= 256"


def _done(lines: list[str], t: float) -> None:
    for line in lines:
        print(line)
    print(f"   ({time.perf_counter() - t:.1f}s)", flush=True)


def _cmd(args: argparse.Namespace) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()
    return run_demo(args.out, args.config)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="run the whole pipeline on bundled photos with tiny models",
        description="Run ingest → caption → score → dedup → view → features → train → export → "
        "sample on real photos shipped with scikit-image, using tiny random-weight models.",
        epilog="Writes: OUT/photos, OUT/store, OUT/runs, OUT/export, OUT/samples.\n"
        "Example: alphaset demo --out demo-out",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", default="demo-out", help="output folder (default demo-out)")
    p.add_argument(
        "--config", default=None, help="stages.toml to train (default configs/tiny.toml)"
    )
    p.set_defaults(func=_cmd)
