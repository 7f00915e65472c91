"""The model wrapper: load an image-text-to-text model, turn images into model inputs, batch
`generate`, and clean the text that comes back.

Works with any transformers `AutoModelForImageTextToText` model whose processor has a chat template
(LLaVA-1.5, LLaVA-NeXT, …). Preprocessing (`prepare`) and generation (`generate`) are separate
calls so that a worker can prepare the next batch on another thread while the model runs.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

from PIL import Image

from pipeline.errors import UserError

DEFAULT_PROMPT = "Describe this image and its style in a very detailed manner."
# PixArt-α's captioning script, with the image's original alt-text inserted.
ALT_PROMPT = 'Given the caption of this image "{}", describe this image in a very detailed manner'

DTYPES = ("auto", "float32", "float16", "bfloat16")
CACHES = ("dynamic", "static")
PROMPT_CACHE = 10_000  # distinct user prompts whose template and length are kept


@dataclass
class CaptionConfig:
    """How captions are generated. Greedy decoding; `min_new_tokens` > 0 forces longer outputs."""

    prompt: str = DEFAULT_PROMPT
    prompt_with_alt: bool = False  # use ALT_PROMPT with the image's alt_text when it has one
    max_new_tokens: int = 256
    min_new_tokens: int = 0
    max_side: int | None = 1024  # downsize larger images before the processor (it resizes anyway)
    batch_size: int = 8
    dtype: str = "auto"  # auto: bfloat16 (or float16) on GPU, float32 on CPU
    device: str = "auto"  # auto: cuda when available, else cpu
    cache: str = "dynamic"  # static: fixed-shape KV cache, compiled forward on GPU
    compile: bool = True  # let transformers compile the forward when the cache is static
    # Length bucketing: the worker reads this many batches ahead, orders them by prompt length
    # (text + image tokens) and batches neighbours, so a batch pads to a similar length (1: off).
    sort_window: int = 8

    def __post_init__(self) -> None:
        if not self.prompt or not self.prompt.strip():
            raise UserError("--prompt must not be empty")
        if self.max_new_tokens < 1:
            raise UserError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise UserError(
                f"min_new_tokens must be in 0..max_new_tokens ({self.max_new_tokens}), got {self.min_new_tokens}"
            )
        if self.max_side is not None and self.max_side < 16:
            raise UserError(f"--max-side must be >= 16 pixels, got {self.max_side}")
        if self.batch_size < 1:
            raise UserError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.sort_window < 1:
            raise UserError(f"--sort-window must be >= 1 batch, got {self.sort_window}")
        if self.dtype not in DTYPES:
            raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.cache not in CACHES:
            raise UserError(f"--cache must be one of {', '.join(CACHES)}, got {self.cache!r}")
        if self.device != "auto" and not re.fullmatch(
            r"cpu|cuda(:\d+)?|mps|xpu(:\d+)?", self.device
        ):
            raise UserError(f"--device must be auto, cpu, cuda or cuda:N, got {self.device!r}")

    def user_prompt(self, alt_text: str | None) -> str:
        """The text of the user turn for one image."""
        alt = " ".join(alt_text.split()) if alt_text else ""
        if self.prompt_with_alt and alt:
            return ALT_PROMPT.format(alt.replace('"', "'"))
        return self.prompt

    def settings(self) -> dict[str, Any]:
        """The settings that change the captions (recorded with the output; batch size does not)."""
        d = asdict(self)
        for k in ("batch_size", "device", "dtype", "cache", "compile", "sort_window"):
            d.pop(k)
        return d


@dataclass
class Caption:
    text: str
    n_tokens: int  # generated tokens up to (not counting) the end-of-sequence token
    truncated: bool  # generation stopped at max_new_tokens, not at end-of-sequence


@dataclass
class Prepared:
    """Model inputs for one batch, made off the model's thread."""

    prompts: list[str]  # user prompt per row
    # Processor outputs: CPU tensors, pinned when the model is on a GPU.
    inputs: dict[str, Any] = field(repr=False)


def resolve_device(device: str) -> str:
    import torch

    if device != "auto":
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(dtype: str, device: str):
    import torch

    if dtype != "auto":
        return getattr(torch, dtype)
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


class Captioner:
    """A loaded captioning model plus its processor and generation settings."""

    def __init__(self, model: Any, processor: Any, config: CaptionConfig):
        self.model = model
        self.processor = processor
        self.config = config
        self.device = model.device
        self.dtype = model.dtype
        tok = processor.tokenizer
        tok.padding_side = "left"  # decoder-only batch generation: pad on the left
        gen = model.generation_config
        eos = gen.eos_token_id if gen.eos_token_id is not None else tok.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        candidates = [gen.pad_token_id, tok.pad_token_id, *sorted(self.eos_ids)]
        self.pad_id = next((i for i in candidates if i is not None), 0)
        # per distinct user prompt: the templated text and its token count (bounded: with
        # --prompt-with-alt nearly every image has its own prompt)
        self._templates: dict[str, str] = {}
        self._prompt_tokens: dict[str, int] = {}
        self.shortest_edge = _shortest_edge(getattr(processor, "image_processor", None))
        if getattr(processor, "chat_template", None) is None:
            raise UserError("the model's processor has no chat template (chat_template.jinja)")

    @classmethod
    def load(cls, path: str, config: CaptionConfig) -> Captioner:
        """Load model and processor from a folder or hub id with ``from_pretrained``."""
        from transformers import AutoModelForImageTextToText, AutoProcessor
        from transformers.utils import logging as hf_logging

        device = resolve_device(config.device)
        dtype = resolve_dtype(config.dtype, device)
        processor = AutoProcessor.from_pretrained(path)
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # one "Loading weights" bar per actor is only noise in logs
        try:
            # On a GPU the weights load straight into its memory (device_map), not via the host.
            placement = {"device_map": device} if device != "cpu" else {}
            model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, **placement)
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        model.to(device).eval()
        return cls(model, processor, config)

    # ---- inputs --------------------------------------------------------------------------
    def chat_prompt(self, user_prompt: str) -> str:
        """The full model prompt (chat template, generation prompt appended) for a user prompt."""
        text = self._templates.get(user_prompt)
        if text is None:
            conv = [
                {
                    "role": "user",
                    "content": [{"type": "image"}, {"type": "text", "text": user_prompt}],
                }
            ]
            text = self.processor.apply_chat_template(
                conv, add_generation_prompt=True, tokenize=False
            )
            if len(self._templates) < PROMPT_CACHE:
                self._templates[user_prompt] = text
        return text

    def fit(self, img: Image.Image) -> Image.Image:
        """Downsize an image before the processor: to --max-side, and for processors that resize
        the shortest edge to a fixed size (CLIP, LLaVA-1.5) to that size already, with PIL.

        The processor's own float bicubic resize of a large photo costs ~10x PIL's; after this it
        has nothing left to shrink (pixel values differ by < 0.02 after normalisation).
        """
        from pipeline.images import fit_max_side

        img = fit_max_side(img, self.config.max_side)
        if self.shortest_edge and min(img.size) > self.shortest_edge:
            w, h = img.size
            scale = self.shortest_edge / min(w, h)
            size = (
                max(self.shortest_edge, round(w * scale)),
                max(self.shortest_edge, round(h * scale)),
            )
            img = img.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
        return img

    def prompt_length(self, img: Image.Image, alt_text: str | None) -> int:
        """Tokens of this sample's prompt: the templated text, plus the image's placeholder
        tokens where the processor can count them for this size (LLaVA-NeXT's vary with it)."""
        n = self._text_tokens(self.config.user_prompt(alt_text))
        count = getattr(self.processor, "_get_num_multimodal_tokens", None)
        if count is not None:
            try:
                n += int(count(image_sizes=[(img.height, img.width)]).num_image_tokens[0])
            except Exception:  # a processor that cannot say: text length alone
                pass
        return n

    def _text_tokens(self, user_prompt: str) -> int:
        """Tokens of the templated ``user_prompt``, counted once per distinct prompt (a fixed
        prompt is templated and tokenized once, not once per image)."""
        n = self._prompt_tokens.get(user_prompt)
        if n is None:
            text = self.chat_prompt(user_prompt)
            n = len(self.processor.tokenizer(text, add_special_tokens=False)["input_ids"])
            if len(self._prompt_tokens) < PROMPT_CACHE:
                self._prompt_tokens[user_prompt] = n
        return n

    def prepare(
        self, images: list[Image.Image], alt_texts: list[str | None] | None = None
    ) -> Prepared:
        """Resize, template and tokenize a batch (CPU work: call it off the model's thread)."""
        alts = alt_texts or [None] * len(images)
        prompts = [self.config.user_prompt(a) for a in alts]
        images = [self.fit(img) for img in images]
        texts = [self.chat_prompt(p) for p in prompts]
        kwargs: dict[str, Any] = {"padding": True, "return_tensors": "pt"}
        if self.config.cache == "static":
            # Fewer distinct shapes → fewer recompilations of the static-cache forward.
            kwargs["pad_to_multiple_of"] = 64
        inputs = dict(self.processor(images=images, text=texts, **kwargs))
        if self.device.type == "cuda":
            inputs = {
                k: v.pin_memory() if hasattr(v, "pin_memory") else v for k, v in inputs.items()
            }
        return Prepared(prompts=prompts, inputs=inputs)

    # ---- generation ----------------------------------------------------------------------
    def generate(self, batch: Prepared) -> list[Caption]:
        """Greedy-decode captions for a prepared batch."""
        import torch

        cfg = self.config
        inputs = {}
        for k, v in batch.inputs.items():
            if torch.is_tensor(v):
                v = v.to(self.device, non_blocking=True)
                if v.is_floating_point():
                    v = v.to(self.dtype)
            inputs[k] = v
        n = inputs["input_ids"].shape[0]
        if cfg.cache == "static" and n < cfg.batch_size:
            # Pad the batch to its full size: a new shape would recompile the static-cache forward.
            inputs = {k: _pad_rows(v, cfg.batch_size) for k, v in inputs.items()}
        gen_kwargs: dict[str, Any] = dict(
            max_new_tokens=cfg.max_new_tokens,
            do_sample=False,
            num_beams=1,
            pad_token_id=self.pad_id,
        )
        if cfg.min_new_tokens:
            gen_kwargs["min_new_tokens"] = cfg.min_new_tokens
        if cfg.cache == "static":
            gen_kwargs["cache_implementation"] = "static"
            gen_kwargs["disable_compile"] = not cfg.compile
        with torch.inference_mode():
            out = self.model.generate(**inputs, **gen_kwargs)  # (B, prompt + new)
        new = out[:n, inputs["input_ids"].shape[1] :].cpu().tolist()  # (n, <= max_new_tokens)
        return [self.finish(ids, prompt) for ids, prompt in zip(new, batch.prompts, strict=True)]

    def finish(self, ids: list[int], prompt: str) -> Caption:
        """Generated token ids (prompt removed) → cleaned caption, token count, truncation flag."""
        end = next((i for i, t in enumerate(ids) if t in self.eos_ids), None)
        kept = ids[:end] if end is not None else ids
        truncated = end is None and len(ids) >= self.config.max_new_tokens
        kept = [t for t in kept if t != self.pad_id]
        text = self.processor.tokenizer.decode(kept, skip_special_tokens=True)
        return Caption(text=clean_caption(text, prompt), n_tokens=len(kept), truncated=truncated)

    def caption(
        self, images: list[Image.Image], alt_texts: list[str | None] | None = None
    ) -> list[Caption]:
        """Caption images in batches of ``batch_size`` (convenience for notebooks)."""
        out: list[Caption] = []
        bs = self.config.batch_size
        alts = alt_texts or [None] * len(images)
        for i in range(0, len(images), bs):
            out.extend(self.generate(self.prepare(images[i : i + bs], alts[i : i + bs])))
        return out


def _shortest_edge(image_processor: Any) -> int | None:
    """The fixed shortest-edge size a processor resizes every image to, if it has one.

    Processors that tile images at several resolutions (LLaVA-NeXT's image_grid_pinpoints) need
    the full image and get None.
    """
    if image_processor is None or getattr(image_processor, "image_grid_pinpoints", None):
        return None
    size = getattr(image_processor, "size", None)
    edge = (
        size.get("shortest_edge")
        if isinstance(size, dict)
        else getattr(size, "shortest_edge", None)
    )
    return int(edge) if edge else None


_ROLE_PREFIX = re.compile(r"^\s*(?:assistant|gpt|answer)\s*:\s*", re.IGNORECASE)


def clean_caption(text: str, prompt: str) -> str:
    """Strip role prefixes, an echo of the prompt, and surplus whitespace."""
    text = " ".join(text.split())
    for _ in range(3):  # "ASSISTANT: <prompt> ASSISTANT: caption" echoes nest
        before = text
        text = _ROLE_PREFIX.sub("", text)
        head = " ".join(prompt.split())
        if head and text.lower().startswith(head.lower()):
            text = text[len(head) :].lstrip(" .:,\n")
        if text == before:
            break
    return text.strip()


def _pad_rows(v: Any, size: int) -> Any:
    """Repeat the last row of a batched tensor until it has ``size`` rows."""
    import torch

    if not torch.is_tensor(v) or v.dim() == 0 or v.shape[0] >= size:
        return v
    extra = v[-1:].expand(size - v.shape[0], *v.shape[1:])
    return torch.cat([v, extra], dim=0)
