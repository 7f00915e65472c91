"""Sampling: images from a trained PixArt DiT (a training run or a diffusers export) with the
samplers PixArt ships, at any aspect-ratio bucket, optionally in a low-memory mode.

The model is always a diffusers ``PixArtAlphaPipeline``: an export folder is loaded with
``from_pretrained``; a run, stage or ``step-N`` folder is assembled in memory by
``training.export.build_pipeline`` (the checkpoint's transformer, the T5 and VAE its features were
made with). Only the scheduler changes between samplers: ``SAMPLERS`` maps each CLI name to a
diffusers scheduler class, built ``from_config`` on the model's own scheduler config (its noise
schedule) with PixArt's sampler settings on top, plus PixArt's default steps and guidance.

Sizes snap to PixArt's aspect-ratio buckets (``training.buckets``) of the resolution the model was
trained at: the requested width/height pick the bucket of nearest aspect ratio, and the image is
generated at that bucket's size (no resampling afterwards). Models whose resolution has no table
snap each side to the latent patch grid (VAE factor × patch size).

Seeds: image ``i`` of a run (prompts in order, ``per_prompt`` images each) starts from its own CPU
generator seeded ``seed + i``, for the initial noise and every stochastic sampler step, so an image
depends on its seed and settings only, not on the batch it ran in or on the device's RNG.

IDDPM on a learned-sigma DiT samples with the learned variance (`learned_variance`): the
pipeline passes the scheduler only the noise half of the output, a forward hook keeps the rest.

``low_vram`` runs the three models one after the other: T5 encodes every prompt with its weights
streamed to the device layer by layer (diffusers group offloading), is freed, then the DiT runs on
the stored embeddings and the VAE decodes one image at a time in tiles.
"""

from __future__ import annotations

import gc
import inspect
import json
import math
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import cache
from typing import Any

import torch
from PIL import Image

from pipeline.cli import UserError
from training.buckets import TABLES, nearest_bucket

NEGATIVE_PROMPT = ""  # PixArt's null caption: CFG's unconditional branch
MAX_SEQUENCE_LENGTH = 120  # PixArt's T5 token budget
RESULT_FILE = "samples.json"
GRID_FILE = "grid.png"


@dataclass(frozen=True)
class Sampler:
    """A sampler the CLI names: a diffusers scheduler class, PixArt's settings for it (applied over
    the model's scheduler config, which keeps the model's noise schedule) and PixArt's defaults."""

    name: str
    scheduler: str  # diffusers class name
    steps: int
    cfg: float
    settings: dict[str, Any] = field(default_factory=dict)
    min_steps: int = 1
    max_steps: int = 1000
    about: str = ""


SAMPLERS: dict[str, Sampler] = {
    "dpm": Sampler(
        "dpm",
        "DPMSolverMultistepScheduler",
        steps=20,
        cfg=4.5,
        settings={
            "algorithm_type": "dpmsolver++",
            "solver_order": 2,
            "solver_type": "midpoint",
            "lower_order_final": True,
            "timestep_spacing": "linspace",
            "use_karras_sigmas": False,
            "thresholding": False,
            "variance_type": None,
        },
        min_steps=2,  # the pipeline reads a 1-step run's x0 from step()[1], which this lacks
        about="DPM-Solver++ (2M), PixArt's default",
    ),
    "sa": Sampler(
        "sa",
        "SASolverScheduler",
        steps=25,
        cfg=3.0,
        settings={
            "predictor_order": 2,
            "corrector_order": 2,
            "algorithm_type": "data_prediction",
            "lower_order_final": True,
            "timestep_spacing": "linspace",
            "use_karras_sigmas": False,
            "thresholding": False,
            "variance_type": None,
        },  # tau: diffusers' default, PixArt's (stochastic for 200 <= t <= 800)
        min_steps=2,
        about="SA-Solver, stochastic predictor-corrector",
    ),
    "iddpm": Sampler(
        "iddpm",
        "DDPMScheduler",
        steps=100,
        cfg=4.5,
        settings={
            # IDDPM's respacing of the 1000 training steps ("100"): evenly spaced, t = 999 … 0.
            "timestep_spacing": "linspace",
            # A model without learned sigma samples with the posterior variance of the respaced
            # chain (IDDPM's fixed-small); a learned-sigma one with its own ("learned_range",
            # see `learned_variance`).
            "variance_type": "fixed_small",
            "clip_sample": False,
            "thresholding": False,
        },
        about="ancestral DDPM sampling on IDDPM's respaced schedule",
    ),
    "lcm": Sampler(
        "lcm",
        "LCMScheduler",
        steps=4,
        cfg=1.0,
        settings={
            "original_inference_steps": 50,
            "timestep_spacing": "leading",
            "timestep_scaling": 10.0,
            "clip_sample": False,
            "set_alpha_to_one": True,
            "thresholding": False,
        },
        max_steps=50,
        about="latent consistency, for LCM-distilled models (PixArt-LCM)",
    ),
}


def learned_sigma(transformer: Any) -> bool:
    """Whether the DiT predicts its variance: twice the latent channels out (PixArt's 8 of 4)."""
    c = transformer.config
    return c.out_channels == 2 * c.in_channels


@contextmanager
def learned_variance(pipe: Any) -> Iterator[bool]:
    """IDDPM sampling with the variance the DiT learned, inside diffusers' PixArt pipeline.

    The pipeline passes the scheduler only the noise half of a learned-sigma output. Within this
    context, for a ``DDPMScheduler`` and a learned-sigma transformer, a forward hook keeps the
    other half (of the text-conditioned branch under guidance, as PixArt's IDDPM does) and the
    scheduler — switched to ``variance_type="learned_range"`` — gets it back with the noise at
    each step. Yields whether it applies; on exit the hook is removed and the pipeline's own
    scheduler is back.
    """
    import diffusers

    transformer = pipe.transformer
    if type(pipe.scheduler) is not diffusers.DDPMScheduler or not learned_sigma(transformer):
        yield False
        return
    base = pipe.scheduler
    scheduler = _learned_range_ddpm().from_config(base.config, variance_type="learned_range")

    def keep(module: Any, args: Any, output: Any) -> None:
        out = output[0] if isinstance(output, tuple) else output.sample
        scheduler.variance = out[:, out.shape[1] // 2 :]

    handle = transformer.register_forward_hook(keep)
    pipe.scheduler = scheduler
    try:
        yield True
    finally:
        handle.remove()
        scheduler.variance = None
        pipe.scheduler = base  # the pipeline works on its own again


@cache
def _learned_range_ddpm() -> type:
    from diffusers import DDPMScheduler

    class LearnedRangeDDPMScheduler(DDPMScheduler):
        """``DDPMScheduler`` whose ``step`` re-joins the noise the pipeline passes with the
        variance half kept by `learned_variance`'s hook."""

        variance: torch.Tensor | None = None

        def step(self, model_output, timestep, sample, generator=None, return_dict=True):  # type: ignore[no-untyped-def]
            v = self.variance
            if v is not None and model_output.shape[1] == sample.shape[1]:
                if v.shape[0] == 2 * sample.shape[0]:  # guidance: [uncond, text] → the text half
                    v = v.chunk(2)[1]
                model_output = torch.cat([model_output, v.to(model_output.dtype)], dim=1)
            return super().step(model_output, timestep, sample, generator, return_dict)

    return LearnedRangeDDPMScheduler


def get_sampler(name: str) -> Sampler:
    if name not in SAMPLERS:
        raise UserError(f"unknown sampler {name!r} (samplers: {', '.join(SAMPLERS)})")
    return SAMPLERS[name]


def make_scheduler(name: str, base_config: dict[str, Any]) -> Any:
    """The sampler's scheduler: the model's scheduler config (noise schedule) + the sampler's."""
    import diffusers

    spec = get_sampler(name)
    cls = getattr(diffusers, spec.scheduler)
    accepted = inspect.signature(cls.__init__).parameters
    config = {k: v for k, v in base_config.items() if k in accepted}  # no "ignored keys" warnings
    return cls.from_config(config, **spec.settings)


# ---- settings -------------------------------------------------------------------------------------
def parse_size(size: str | Sequence[int]) -> tuple[int, int]:
    """``"WxH"`` (or ``(W, H)``) → (width, height), both positive."""
    if isinstance(size, str):
        parts = size.lower().split("x")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise UserError(f"--size {size}: expected WxH in pixels, e.g. 1024x768")
        width, height = (int(p) for p in parts)
    else:
        width, height = (int(v) for v in size)
    if width <= 0 or height <= 0:
        raise UserError(f"--size {width}x{height}: width and height must be positive")
    return width, height


def snap_size(width: int, height: int, resolution: int, unit: int) -> tuple[int, int]:
    """(width, height) of the bucket a request lands in: PixArt's table for ``resolution``
    (nearest aspect ratio), else each side rounded to a multiple of ``unit`` (at least one)."""
    if resolution in TABLES:
        h, w = nearest_bucket(height, width, resolution)
        return w, h
    return (max(unit, round(width / unit) * unit), max(unit, round(height / unit) * unit))


@dataclass
class SampleSettings:
    """What to generate; ``steps``/``cfg`` None take the sampler's defaults."""

    sampler: str = "dpm"
    steps: int | None = None
    cfg: float | None = None
    seed: int = 0
    size: tuple[int, int] | None = None  # requested (width, height); None: the model's square
    batch: int = 1  # images per DiT call
    per_prompt: int = 1
    low_vram: bool = False

    def __post_init__(self) -> None:
        spec = get_sampler(self.sampler)
        if self.steps is None:
            self.steps = spec.steps
        if self.cfg is None:
            self.cfg = spec.cfg
        if not spec.min_steps <= self.steps <= spec.max_steps:
            raise UserError(
                f"--steps must be {spec.min_steps}-{spec.max_steps} for {self.sampler}, got {self.steps}"
            )
        if not (math.isfinite(self.cfg) and self.cfg >= 0):
            raise UserError(f"--cfg must be >= 0 (1 or less: no guidance), got {self.cfg}")
        if self.seed < 0:
            raise UserError(f"--seed must be >= 0, got {self.seed}")
        if self.batch < 1:
            raise UserError(f"--batch must be >= 1, got {self.batch}")
        if self.per_prompt < 1:
            raise UserError(f"--per-prompt must be >= 1, got {self.per_prompt}")
        if self.size is not None:
            self.size = parse_size(self.size)


def read_prompts(path: str) -> list[str]:
    """One prompt per line; blank lines are skipped."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--prompts {path}: no such file")
    with open(path, encoding="utf-8") as f:
        prompts = [line.strip() for line in f if line.strip()]
    if not prompts:
        raise UserError(f"--prompts {path}: no prompts in the file (one per line)")
    return prompts


# ---- the model ------------------------------------------------------------------------------------
@dataclass
class Model:
    """A loaded pipeline and what is known of its training: the resolution its sizes snap to."""

    pipe: Any  # diffusers.PixArtAlphaPipeline
    source: str  # the folder given
    kind: str  # "export" or "checkpoint"
    checkpoint: str | None  # the step-N folder sampled (an export: the one it came from)
    resolution: int  # pixels of the trained square side (bucket table key)
    multi_scale: bool
    max_length: int
    scheduler_config: dict[str, Any]  # the model's own scheduler config (noise schedule)

    @property
    def unit(self) -> int:
        """Pixel granularity of a side: VAE downsampling × patch size."""
        return self.pipe.vae_scale_factor * self.pipe.transformer.config.patch_size


def _pipeline_dtype_kwarg(dtype: torch.dtype) -> dict[str, Any]:
    """diffusers renamed ``torch_dtype`` to ``dtype`` (the old name warns); older ones only take it."""
    from diffusers.utils import deprecation_utils

    return (
        {"dtype": dtype} if hasattr(deprecation_utils, "_resolve_dtype") else {"torch_dtype": dtype}
    )


def load_model(checkpoint: str, dtype: torch.dtype = torch.float32, weights: str = "ema") -> Model:
    """An export folder (``model_index.json``) or a run / stage / ``step-N`` folder → Model on CPU.

    Components stay on the CPU: ``generate`` places them (all at once, or one after the other
    with ``low_vram``)."""
    from diffusers import PixArtAlphaPipeline

    from training import checkpoint as ck
    from training.checkpoint import EXPORT_INFO
    from training.export import build_pipeline

    if not os.path.isdir(checkpoint):
        raise FileNotFoundError(f"--checkpoint {checkpoint}: no such folder")
    if os.path.isfile(os.path.join(checkpoint, "model_index.json")):
        try:
            pipe = PixArtAlphaPipeline.from_pretrained(checkpoint, **_pipeline_dtype_kwarg(dtype))
        except (OSError, ValueError, KeyError, TypeError) as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise UserError(
                f"--checkpoint {checkpoint}: not a loadable PixArtAlphaPipeline folder "
                f"({type(e).__name__}: {msg})"
            ) from e
        info: dict[str, Any] = {}
        info_path = os.path.join(checkpoint, EXPORT_INFO)
        if os.path.isfile(info_path):
            with open(info_path) as f:
                info = json.load(f)
        kind, ckpt, features = "export", info.get("checkpoint"), info.get("features") or {}
    else:
        resolved = ck.resolve(checkpoint)
        if resolved.kind != "step":
            raise UserError(
                f"--checkpoint {checkpoint}: a diffusers transformer folder, not a pipeline; "
                "give the pipeline folder (with model_index.json) or a training checkpoint"
            )
        ckpt = resolved.path
        if resolved.lora_base:  # a LoRA checkpoint: its base model + the adapters
            model = load_model(resolved.lora_base, dtype=dtype, weights=weights)
            adapter = ck.LORA_FILE if weights == "ema" else ck.LORA_MODEL_FILE
            apply_lora(model, os.path.join(ckpt, adapter))
            model.source, model.checkpoint = os.path.abspath(checkpoint), ckpt
            return model
        # device-ok: components are assembled on the CPU; generate() places them
        pipe = build_pipeline(ckpt, weights=weights, device="cpu", dtype=dtype)
        kind, features = "checkpoint", resolved.features
    tconfig = pipe.transformer.config
    settings = features.get("settings") or {}
    return Model(
        pipe=pipe,
        source=os.path.abspath(checkpoint),
        kind=kind,
        checkpoint=ckpt,
        resolution=int(settings.get("resolution") or tconfig.sample_size * pipe.vae_scale_factor),
        multi_scale=bool(settings.get("multi_scale", tconfig.use_additional_conditions)),
        max_length=int(settings.get("max_length") or MAX_SEQUENCE_LENGTH),
        scheduler_config=dict(pipe.scheduler.config),
    )


def apply_lora(model: Model, spec: str) -> float:
    """Load the LoRA adapter ``PATH[:SCALE]`` into the model's transformer; return the scale."""
    from training.checkpoint import lora_file
    from training.lora import load_lora, parse_lora_arg

    path, scale = parse_lora_arg(spec)
    path = lora_file(path)
    transformer = model.pipe.transformer
    dtype = transformer.dtype
    load_lora(transformer, path, scale)
    transformer.to(dtype).eval()
    return scale


# ---- generation ---------------------------------------------------------------------------------
@dataclass
class Generation:
    """Images of one ``generate`` call with everything needed to reproduce them."""

    images: list[Image.Image]
    prompts: list[str]  # one per image, as given
    seeds: list[int]  # one per image
    size: tuple[int, int]  # (width, height) generated
    scheduler: dict[str, Any]  # class name + full config
    seconds: float  # generation only (model loading excluded)
    peak_memory_bytes: int | None  # CUDA peak over the call; None on CPU


def _free(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


@torch.no_grad()
def _encode_low_vram(
    model: Model, prompts: list[str], cfg: float, device: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """T5 embeddings of every prompt with T5's weights streamed to ``device`` one layer at a
    time (they stay in CPU memory); the encoder is freed afterwards."""
    try:
        from diffusers.hooks import apply_group_offloading
    except ImportError as e:
        raise UserError("--low-vram needs diffusers >= 0.33 (group offloading)") from e

    pipe = model.pipe
    on_cuda = device.startswith("cuda")
    apply_group_offloading(
        pipe.text_encoder,
        onload_device=torch.device(device),
        offload_device=torch.device("cpu"),  # device-ok: T5 weights stay in CPU memory
        offload_type="leaf_level",
        use_stream=on_cuda,  # overlap each layer's copy with the previous layer's compute
    )
    embeds = pipe.encode_prompt(
        prompts,
        do_classifier_free_guidance=cfg > 1.0,
        negative_prompt=NEGATIVE_PROMPT,
        device=torch.device(device),
        clean_caption=False,
        max_sequence_length=model.max_length,
    )
    pipe.text_encoder = None  # the pipeline held the only reference: T5 is gone
    _free(device)
    return embeds


def generate(
    model: Model,
    prompts: Sequence[str],
    settings: SampleSettings,
    device: str = "cpu",
    progress: bool = False,
    null_embedding: torch.Tensor | None = None,
) -> Generation:
    """Generate ``per_prompt`` images per prompt. With ``settings.low_vram`` the pipeline's text
    encoder is freed (load the model again for another call). ``null_embedding`` (L, D): PixArt's
    learned null caption (``y_embedding``) as CFG's unconditional input instead of T5(""), with
    each prompt's attention mask as PixArt's inference scripts do."""
    from training.text import clean_caption

    # 1. Inputs: one (prompt, seed) per image, the bucket size, the sampler.
    if isinstance(prompts, str):
        prompts = [prompts]
    if not prompts:
        raise UserError("no prompts: pass --prompt TEXT or --prompts FILE")
    given = [p for p in prompts for _ in range(settings.per_prompt)]
    texts = [clean_caption(p) for p in given]  # as the training captions were cleaned
    seeds = [settings.seed + i for i in range(len(given))]
    w, h = settings.size or (model.resolution, model.resolution)
    width, height = snap_size(w, h, model.resolution, model.unit)
    pipe = model.pipe
    if pipe.text_encoder is None:
        raise UserError("this model's text encoder was freed by a --low-vram run; load it again")
    pipe.scheduler = make_scheduler(settings.sampler, model.scheduler_config)
    pipe.set_progress_bar_config(disable=not progress)
    on_cuda = device.startswith("cuda")
    if on_cuda:
        torch.cuda.reset_peak_memory_stats(device)

    # 2. Text: with the other models (normal), or all prompts first and T5 freed (low-vram, where
    #    streaming T5 and moving the DiT and VAE afterwards are part of the measured time).
    if settings.low_vram:
        start = time.perf_counter()
        embeds = _encode_low_vram(model, texts, settings.cfg, device)
        pipe.vae.enable_tiling()
        pipe.to(device)  # the DiT and VAE; T5 is gone
    else:
        pipe.to(device)
        start = time.perf_counter()
    if null_embedding is not None:
        if not settings.low_vram:
            with torch.no_grad():
                embeds = pipe.encode_prompt(
                    texts, do_classifier_free_guidance=False, device=torch.device(device),
                    clean_caption=False, max_sequence_length=model.max_length,
                )  # fmt: skip
        pe, pm = embeds[0], embeds[1]  # (N, L, D), (N, L)
        if tuple(null_embedding.shape) != tuple(pe.shape[1:]):
            raise UserError(
                f"the y_embedding is {tuple(null_embedding.shape)}, the model's T5 embeddings "
                f"{tuple(pe.shape[1:])}"
            )
        y = null_embedding.to(pe.device, pe.dtype)[None].expand(pe.shape[0], -1, -1)
        embeds = (pe, pm, y, pm)

    # 3. Denoise (and decode, normal path) batch by batch; IDDPM uses a learned variance.
    images: list[Image.Image] = []
    with learned_variance(pipe) as learned:
        scheduler = {
            "class": get_sampler(settings.sampler).scheduler,
            **dict(pipe.scheduler.config),
            "learned_variance": learned,
        }
        for lo in range(0, len(texts), settings.batch):
            hi = min(lo + settings.batch, len(texts))
            kw: dict[str, Any] = {
                "num_inference_steps": settings.steps,
                "guidance_scale": settings.cfg,
                "height": height,
                "width": width,
                # device-ok: one CPU generator per image, so an image depends on its seed only
                "generator": [torch.Generator("cpu").manual_seed(s) for s in seeds[lo:hi]],
                "clean_caption": False,
                "use_resolution_binning": False,  # snapped above, to our (training) buckets
                "max_sequence_length": model.max_length,
            }
            if not settings.low_vram and null_embedding is None:
                images += pipe(texts[lo:hi], negative_prompt=NEGATIVE_PROMPT, **kw).images
                continue
            pe, pm, ne, nm = (None if t is None else t[lo:hi] for t in embeds)
            latents = pipe(
                prompt_embeds=pe,
                prompt_attention_mask=pm,
                negative_prompt_embeds=ne,
                negative_prompt_attention_mask=nm,
                negative_prompt=None,
                output_type="latent",
                **kw,
            ).images  # (B, 4, H/8, W/8)
            with torch.no_grad():
                for z in latents.split(1):  # one image at a time through the tiled VAE
                    x = pipe.vae.decode(z / pipe.vae.config.scaling_factor, return_dict=False)[0]
                    images += pipe.image_processor.postprocess(x, output_type="pil")
    if on_cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    return Generation(
        images=images,
        prompts=given,
        seeds=seeds,
        size=(width, height),
        scheduler=scheduler,
        seconds=seconds,
        peak_memory_bytes=torch.cuda.max_memory_allocated(device) if on_cuda else None,
    )


# ---- outputs --------------------------------------------------------------------------------------
def image_name(index: int, seed: int) -> str:
    return f"{index:03d}_seed{seed}.png"


def make_grid(images: Sequence[Image.Image], pad: int = 2) -> Image.Image:
    """Images (one size) in rows of ceil(sqrt(n)), on white, ``pad`` px apart."""
    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w + (cols + 1) * pad, rows * h + (rows + 1) * pad), "white")
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        grid.paste(img, (pad + c * (w + pad), pad + r * (h + pad)))
    return grid


def versions() -> dict[str, str]:
    import diffusers
    import transformers

    from pipeline import __version__

    return {
        "alphaset": __version__,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
    }


def _save_png(img: Image.Image, path: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    img.save(tmp, format="PNG")
    os.replace(tmp, path)


def write_outputs(
    gen: Generation, settings: SampleSettings, model: Model, out: str, extra: dict[str, Any]
) -> dict[str, Any]:
    """PNGs ``NNN_seedS.png``, ``grid.png`` and ``samples.json`` (every setting) in ``out``."""
    os.makedirs(out, exist_ok=True)
    files = [image_name(i, s) for i, s in enumerate(gen.seeds)]
    for img, name in zip(gen.images, files, strict=True):
        _save_png(img, os.path.join(out, name))
    _save_png(make_grid(gen.images), os.path.join(out, GRID_FILE))
    record = {
        "checkpoint": model.source,
        "checkpoint_kind": model.kind,
        "resolved_checkpoint": model.checkpoint,
        "model_resolution": model.resolution,
        "multi_scale": model.multi_scale,
        **asdict(settings),
        "size_requested": list(settings.size) if settings.size else None,
        "size": list(gen.size),
        "negative_prompt": NEGATIVE_PROMPT,
        "max_sequence_length": model.max_length,
        "scheduler": gen.scheduler,
        "images": [
            {"file": f, "prompt": p, "seed": s}
            for f, p, s in zip(files, gen.prompts, gen.seeds, strict=True)
        ],
        "grid": GRID_FILE,
        "seconds": round(gen.seconds, 3),
        "seconds_per_image": round(gen.seconds / len(gen.images), 3),
        "peak_memory_bytes": gen.peak_memory_bytes,
        "versions": versions(),
        **extra,
    }
    tmp = os.path.join(out, f".{RESULT_FILE}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1, default=str)
    os.replace(tmp, os.path.join(out, RESULT_FILE))
    return record


@dataclass
class SampleResult:
    images: list[Image.Image]
    settings: SampleSettings
    generation: Generation
    record: dict[str, Any] | None  # what samples.json holds (None without ``out``)
    files: list[str]  # written PNG paths (images, then the grid), empty without ``out``


def sample(
    checkpoint: str,
    prompts: Sequence[str],
    *,
    sampler: str = "dpm",
    steps: int | None = None,
    cfg: float | None = None,
    seed: int = 0,
    size: str | tuple[int, int] | None = None,
    batch: int = 1,
    per_prompt: int = 1,
    out: str | None = None,
    low_vram: bool = False,
    device: str | None = None,
    dtype: str = "auto",
    weights: str = "ema",
    progress: bool = False,
    lora: str | None = None,
    controlnet: str | None = None,
    control_image: str | None = None,
    y_embedding: str | None = None,
) -> SampleResult:
    """Load ``checkpoint`` (export or run/stage/step folder), generate, and write to ``out``.

    ``lora``: ``PATH[:SCALE]`` of a LoRA adapter file (or a LoRA stage's checkpoint folder).
    ``controlnet`` + ``control_image``: a ControlNet (training.controlnet) and its edge map.
    ``y_embedding``: a PixArt ``.pth`` or an ``alphaset import pixart`` folder whose learned null
    caption is the unconditional input (``null = "y_embedding"``)."""
    from training.feature_models import default_device, torch_dtype

    settings = SampleSettings(
        sampler=sampler,
        steps=steps,
        cfg=cfg,
        seed=seed,
        size=size,  # type: ignore[arg-type]  # parsed in __post_init__
        batch=batch,
        per_prompt=per_prompt,
        low_vram=low_vram,
    )
    if isinstance(prompts, str):
        prompts = [prompts]
    if not prompts:
        raise UserError("no prompts: pass --prompt TEXT or --prompts FILE")
    if lora:  # a bad adapter fails before any model is loaded
        from training.checkpoint import lora_file
        from training.lora import parse_lora_arg, read_lora

        read_lora(lora_file(parse_lora_arg(lora)[0]))
    if (controlnet is None) != (control_image is None):
        raise UserError("--controlnet and --control-image go together")
    if control_image is not None and not os.path.isfile(control_image):
        raise FileNotFoundError(f"--control-image {control_image}: no such file")
    null = None
    if y_embedding is not None:
        from training.pixart_import import load_y_embedding

        null = load_y_embedding(y_embedding)
        if null is None:
            raise UserError(f"--y-embedding {y_embedding}: no y_embedding in it")
    device = device or default_device()
    dt = torch_dtype(dtype, device)
    model = load_model(checkpoint, dtype=dt, weights=weights)
    if lora:
        apply_lora(model, lora)
    if controlnet is not None and control_image is not None:
        from training.controlnet import controlled_pipeline

        w, h = settings.size or (model.resolution, model.resolution)
        width, height = snap_size(w, h, model.resolution, model.unit)
        controlled_pipeline(model.pipe, controlnet, control_image, width, height)
    gen = generate(model, prompts, settings, device=device, progress=progress, null_embedding=null)
    record, files = None, []
    if out is not None:
        extra = {
            "device": device,
            "dtype": str(dt).replace("torch.", ""),
            "weights": weights,
            "lora": lora,
            "controlnet": controlnet,
            "control_image": control_image,
            "y_embedding": y_embedding,
        }
        record = write_outputs(gen, settings, model, out, extra)
        files = [os.path.join(out, i["file"]) for i in record["images"]]
        files.append(os.path.join(out, GRID_FILE))
    return SampleResult(
        images=gen.images, settings=settings, generation=gen, record=record, files=files
    )
