"""Library entry point of the caption stage: `caption_store(...)` resolves the model and settings,
then runs `CaptionWorker` over the store's shards with `pipeline.stage.run_stage` (Ray actors)."""

from __future__ import annotations

import os
from dataclasses import asdict
from typing import Any

from pipeline.cluster import place_workers
from pipeline.models import Preset, not_found, resolve
from pipeline.stage import StageSpec, StageSummary, run_stage
from pipeline.store import Store

from .captioner import DEFAULT_PROMPT, CaptionConfig
from .models import PRESETS
from .worker import CaptionWorker, check_tag, stage_name


def locate_model(value: str) -> tuple[str, str, Preset | None]:
    """``--model PRESET|DIR`` → (what workers get: a preset name or an absolute folder, the
    model's short name, its preset).

    Checks the model before any actor starts: a tiny preset is built once into the model cache; a
    folder must hold a loadable config; a hub model must be in the local Hugging Face cache or be
    downloadable. Anything else is a one-line `ModelNotFoundError`.
    """
    path, preset = resolve(value, PRESETS, "caption")
    if preset is not None and preset.build_tiny is not None:
        return preset.name, preset.name, preset  # each worker finds (or builds) it in its cache
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as e:
        raise not_found("caption", value, preset.hub_id if preset else None, "--model", e) from None
    if preset is not None:
        return preset.name, preset.name, preset
    path = os.path.abspath(path)  # actors do not share the driver's working directory
    return path, os.path.basename(path.rstrip("/")), None


def caption_store(
    store: str,
    model: str = "tiny",
    *,
    tag: str | None = None,
    prompt: str = DEFAULT_PROMPT,
    prompt_with_alt: bool = False,
    max_new_tokens: int = 256,
    max_side: int | None = 1024,
    batch_size: int = 8,
    workers: int = 1,
    gpus_per_worker: float | None = None,
    cpus_per_worker: float = 1.0,
    max_retries: int = 2,
    shards: list[str] | None = None,
    dtype: str = "auto",
    cache: str = "dynamic",
    ray_address: str | None = None,
    use_ray: bool = True,
    progress: bool = True,
    **generation: Any,
) -> StageSummary:
    """Caption every ingested shard of ``store`` not captioned yet → ``captions/<tag>/``.

    ``tag`` defaults to the preset's name or the model folder's name. ``gpus_per_worker=None``
    gives each actor one GPU when the Ray cluster has GPUs, else none. Extra keyword arguments
    are `CaptionConfig` fields (``min_new_tokens``, ``device``, ``compile``).
    """
    # 1. Check the settings and the store before anything heavy starts.
    config = CaptionConfig(
        prompt=prompt,
        prompt_with_alt=prompt_with_alt,
        max_new_tokens=max_new_tokens,
        max_side=max_side,
        batch_size=batch_size,
        dtype=dtype,
        cache=cache,
        **generation,
    )
    if "://" not in store:
        store = os.path.abspath(store)  # actors do not share the driver's working directory
    st = Store(store)
    st.require()
    # 2. Find the model and name the output.
    load_from, model_name, preset = locate_model(model)
    tag = check_tag(tag or model_name)
    # 3. Place workers: one GPU each when the cluster has GPUs.
    gpus_per_worker = place_workers(gpus_per_worker, ray_address, use_ray)
    settings = {"model": load_from, **config.settings()}
    spec = StageSpec(
        stage=stage_name(tag),
        worker_cls=CaptionWorker,
        worker_kwargs={
            "store": store,
            "model": load_from,
            "tag": tag,
            "model_name": model_name,
            **asdict(config),
        },
        settings=settings,
        shards=shards,
        workers=workers,
        cpus_per_worker=cpus_per_worker,
        gpus_per_worker=gpus_per_worker,
        max_retries=max_retries,
    )
    # 4. Run (skips done shards, retries failed ones, refreshes the manifest).
    return run_stage(st, spec, progress=progress, use_ray=use_ray)


__all__ = ["caption_store", "locate_model"]
