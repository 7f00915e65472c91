"""`alphaset score` and `alphaset dedup`: thin command-line layers over `curation.score.score_store`
and `curation.dedup.dedup_store`."""

from __future__ import annotations

import argparse

from pipeline.cli import nonnegative_int, positive_int
from pipeline.stage import add_stage_flags, stage_args

SCORE_EPILOG = """\
Reads:  STORE/images, STORE/meta (alt_text), STORE/captions/<tag> (every caption tag, or --captions).
Writes: STORE/embeddings/<tag>/NNNNNN.parquet  key, embedding (fixed-size list<float16>, L2-normalised), error
        STORE/scores/<tag>/NNNNNN.parquet      key, error, clip_aesthetic, clip_text_sim,
            clip_text_sim_<caption tag>, width, height, aspect, megapixels, sharpness, phash
        (+ status records under STORE/_status/). Re-running skips scored shards.
--clip: a preset (clip-vit-l-14, tiny), NAME:PRETRAINED (ViT-L-14:openai, ViT-L-14:/w/vit-l-14.pt),
        hf-hub:ORG/REPO, or an open_clip folder (open_clip_config.json + open_clip_model.safetensors).
--aesthetic: the LAION head sac+logos+ava1-l14-linearMSE.pth (ViT-L/14 only). Default:
        $ALPHASET_AESTHETIC, else aesthetic.pth inside the --clip folder; 'none' disables it
        (clip_aesthetic is then null).
GPU nodes: one worker per GPU with CPU cores for decoding, e.g. --gpus-per-worker 1
        --cpus-per-worker 16 --decode-workers 15 --batch-size 256; large shards (ingest
        --shard-size 5000+) keep the GPU busy (it idles while a shard's first batch decodes).
Example: alphaset score --store ./store --clip clip-vit-l-14 \\
             --aesthetic ~/models/sac+logos+ava1-l14-linearMSE.pth --workers 4 --gpus-per-worker 1"""

DEDUP_EPILOG = """\
Reads:  STORE/meta (sha256), STORE/scores/<tag> (phash, clip_aesthetic), STORE/embeddings/<tag>.
Writes: STORE/scores/dedup/NNNNNN.parquet  key, dup_of, dup_kind (exact|phash|semantic), dup_score, error
        (+ status records). Each duplicate group keeps its highest-aesthetic image (then the largest,
        then the smallest key); the others get dup_of = the kept key. Global: reruns completely when
        an input shard or a setting changed, does nothing otherwise. Filter with 'dup_of is null'.
Thresholds: phash distance 8 of 64 bits (resized/re-compressed copies measure 0, crops of 2-3 %
        per side 4-8, distinct photos >= 24); cosine 0.95 for ViT-L/14-class embeddings.
Search: a range search (neighbours within the threshold, the 64 strongest per image; identical
        hashes and byte copies searched once). Exhaustive below 20k embeddings / 200k hashes; above, a faiss inverted file (k-means cells, 4*sqrt(n) of them) probing
        --nprobe (semantic, default 16) / --phash-nprobe (default 256) cells per query: more
        probes, higher recall, proportionally slower.
Example: alphaset dedup --store ./store --phash-threshold 8 --semantic-threshold 0.95"""


def _score(args: argparse.Namespace) -> int:
    from curation.score import ScoreConfig, score_store

    placement = stage_args(args)
    run = {k: placement.pop(k) for k in ("progress", "use_ray", "ray_address")}
    cfg = ScoreConfig(
        clip=args.clip,
        aesthetic=args.aesthetic,
        tag=args.tag,
        captions=[t for t in args.captions.split(",") if t] if args.captions is not None else None,
        batch_size=args.batch_size,
        device=args.device,
        decode_workers=args.decode_workers,
        **placement,
    )
    summary = score_store(args.store, cfg, **run)
    print("\n".join(summary.lines()))
    return 0 if summary.ok else 1


def _dedup(args: argparse.Namespace) -> int:
    from curation.dedup import DedupConfig, dedup_store

    cfg = DedupConfig(
        embeddings=args.embeddings,
        phash_threshold=args.phash_threshold,
        semantic_threshold=args.semantic_threshold,
        semantic=not args.no_semantic,
        nprobe=args.nprobe,
        phash_nprobe=args.phash_nprobe,
    )
    print("\n".join(dedup_store(args.store, cfg).lines()))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser(
        "score",
        help="CLIP embeddings, aesthetic, text-image and technical scores per image (Ray stage)",
        description="Embed every image with CLIP and write per-image scores, shard by shard.",
        epilog=SCORE_EPILOG,
        formatter_class=fmt,
    )
    p.add_argument("--store", required=True, help="store directory or fsspec URL")
    p.add_argument(
        "--clip",
        default="clip-vit-l-14",
        help="PRESET|NAME:PRETRAINED|hf-hub:ID|DIR (default clip-vit-l-14)",
    )
    p.add_argument(
        "--aesthetic",
        default=None,
        help="LAION aesthetic head .pth, or 'none' (default: see below)",
    )
    p.add_argument(
        "--tag", default=None, help="output tag (default: the preset name or a slug of --clip)"
    )
    p.add_argument(
        "--captions",
        default=None,
        help="comma-separated caption tags to compare with (default: those of the first run, else all present)",
    )
    p.add_argument(
        "--batch-size", type=positive_int, default=64, help="images per forward pass (default 64)"
    )
    p.add_argument(
        "--device", default="auto", help="auto|cpu|cuda|cuda:N (default auto: cuda when available)"
    )
    p.add_argument(
        "--decode-workers",
        type=nonnegative_int,
        default=0,
        help="decode processes per worker (default: CPU cores - 1, at most 16; lower it when several workers share a node)",
    )
    add_stage_flags(p, "stage workers")
    p.set_defaults(func=_score)

    d = sub.add_parser(
        "dedup",
        help="exact, perceptual-hash and CLIP-semantic duplicates → scores/dedup (dup_of)",
        description="Find duplicate groups across the store; mark all but the best image of each.",
        epilog=DEDUP_EPILOG,
        formatter_class=fmt,
    )
    d.add_argument("--store", required=True, help="store directory or fsspec URL")
    d.add_argument(
        "--embeddings", default=None, help="score tag to use (default: the only one in the store)"
    )
    d.add_argument(
        "--phash-threshold",
        type=int,
        default=8,
        help="max Hamming distance of 64-bit phashes (default 8)",
    )
    d.add_argument(
        "--semantic-threshold",
        type=float,
        default=0.95,
        help="min CLIP cosine for semantic duplicates (default 0.95)",
    )
    d.add_argument("--no-semantic", action="store_true", help="skip the CLIP-embedding search")
    d.add_argument(
        "--nprobe",
        type=positive_int,
        default=16,
        help="IVF cells probed per embedding (default 16)",
    )
    d.add_argument(
        "--phash-nprobe",
        type=positive_int,
        default=256,
        help="IVF cells probed per phash (default 256)",
    )
    d.set_defaults(func=_dedup)
