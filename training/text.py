"""Caption cleaning and T5 encoding: text in, padded ``(L, D)`` fp16 embeddings + masks out.

Cleaning follows the spirit of DeepFloyd IF's / PixArt-α's ``clean_caption`` (PixArt's training
features were made from lower-cased, cleaned captions, and its pipelines clean prompts the same
way at inference): URLs, HTML tags and entities, @handles, file names, long digit runs and
repeated punctuation/whitespace go; dashes and quotes are normalised. It is a smaller, dependency-free
rule set (no BeautifulSoup, no ftfy), so it is not byte-identical to theirs.

Encoding: each distinct text is encoded once; texts are sorted by token count and batched so a
batch is padded only to its own longest text, then every embedding is zero-padded to ``L``
(``max_length``, 120 for PixArt). Positions past ``n_tokens`` are zeros and the mask is 0 there:
consumers must pass the mask as the cross-attention mask, as PixArt does. A text longer than
``L`` tokens keeps its first ``L - 1`` tokens plus ``</s>`` (the tokenizer's own truncation)
and is flagged ``truncated``.
"""

from __future__ import annotations

import html
import re
import unicodedata
import urllib.parse
from dataclasses import dataclass
from typing import Any

import numpy as np

_URL = re.compile(
    r"\b(?:https?://|ftp://|www\.)\S+"
    r"|\b[\w.-]+\.(?:com|net|org|edu|gov|io|ru|info)(?:/\S*)?\b",
    re.IGNORECASE,
)
_HTML_TAG = re.compile(r"</?[A-Za-z][^<>]{0,200}>")
_HANDLE = re.compile(r"(?<!\w)@[\w.]+")
_FILENAME = re.compile(r"\S+\.(?:png|jpe?g|bmp|webp|gif|eps|pdf|apk|mp4)\b", re.IGNORECASE)
_IP = re.compile(r"\b\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}\b")
_LONG_NUMBER = re.compile(r"\b\d{6,}\b|#\d+\b")
_DASHES = re.compile(
    r"[\u058A\u05BE\u1400\u1806\u2010-\u2015\u2E17\u2E1A\u2E3A\u2E3B\u2E40\u301C\u3030\u30A0\uFE31\uFE32\uFE58\uFE63\uFF0D]+"
)
_DQUOTES = re.compile(r"[`´«»“”„¨]")
_SQUOTES = re.compile(r"[‘’‚]")
_BAD_PUNCT = re.compile(r"[#®•©™&@·º½¾¿¡§~()\[\]{}|\\/*]+")
_REPEATED_PUNCT = re.compile(r"([!?,;:'\"-])\1+")
_DOTS = re.compile(r"\.{2,}")
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([,.;:!?])")
_WHITESPACE = re.compile(r"\s+")


def clean_caption(text: str, lowercase: bool = True) -> str:
    """A caption as PixArt's T5 saw it in training: cleaned and (by default) lower-cased."""
    t = str(text)
    if "%" in t or "+" in t:
        t = urllib.parse.unquote_plus(t)
    t = html.unescape(html.unescape(t))
    t = unicodedata.normalize("NFKC", t)
    t = t.replace("\\n", " ")
    t = _URL.sub(" ", t)
    t = _HTML_TAG.sub(" ", t)
    t = _HANDLE.sub(" ", t)
    t = _FILENAME.sub(" ", t)
    t = _IP.sub(" ", t)
    t = _LONG_NUMBER.sub(" ", t)
    t = _DASHES.sub("-", t)
    t = _DQUOTES.sub('"', t)
    t = _SQUOTES.sub("'", t)
    t = _BAD_PUNCT.sub(" ", t)
    t = _DOTS.sub(" ", t)
    t = _REPEATED_PUNCT.sub(r"\1", t)
    t = _WHITESPACE.sub(" ", t)
    t = _SPACE_BEFORE_PUNCT.sub(r"\1", t)
    t = t.strip(" \"'-_,:;")
    return t.lower() if lowercase else t


@dataclass
class TextFeature:
    """One encoded text. ``t5`` (L, D) fp16, zero past ``n_tokens``; ``mask`` (L,) uint8;
    ``finite`` is False when the model produced inf/NaN (checked on the device)."""

    t5: np.ndarray
    mask: np.ndarray
    n_tokens: int
    truncated: bool
    finite: bool = True


class TextEncoder:
    """A T5 encoder + tokenizer that turns texts into fixed-length padded embeddings."""

    def __init__(self, model: Any, tokenizer: Any, max_length: int = 120, batch_size: int = 128):
        if max_length < 2:
            raise ValueError(f"--max-length must be >= 2 tokens, got {max_length}")
        if batch_size < 1:
            raise ValueError(f"text batch size must be >= 1, got {batch_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.batch_size = batch_size
        self.dim = int(model.config.d_model)

    @property
    def device(self) -> Any:
        return next(self.model.parameters()).device

    def token_counts(self, texts: list[str]) -> list[int]:
        """Untruncated token counts (``</s>`` included)."""
        ids = self.tokenizer(texts, add_special_tokens=True, truncation=False, verbose=False)[
            "input_ids"
        ]
        return [len(x) for x in ids]

    def encode(self, texts: list[str]) -> list[TextFeature]:
        """One `TextFeature` per input; equal texts share one encoding (and one array)."""
        import torch

        distinct = list(dict.fromkeys(texts))
        if not distinct:
            return []
        counts = dict(zip(distinct, self.token_counts(distinct), strict=True))
        # Longest first: a batch pads only to its own longest text, and an OOM shows at once.
        order = sorted(distinct, key=lambda t: -counts[t])
        L = self.max_length
        out: dict[str, TextFeature] = {}
        with torch.inference_mode():
            for i in range(0, len(order), self.batch_size):
                batch = order[i : i + self.batch_size]
                tok = self.tokenizer(
                    batch, max_length=L, truncation=True, padding="longest", return_tensors="pt"
                )
                ids = tok["input_ids"].to(self.device, non_blocking=True)  # (B, Lb)
                mask = tok["attention_mask"].to(self.device, non_blocking=True)  # (B, Lb)
                hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
                hidden = hidden.to(torch.float16) * mask[..., None]  # (B, Lb, D), 0 at padding
                ok = (torch.isfinite(hidden) | ~mask.bool()[..., None]).flatten(1).all(1)  # (B,)
                pad = L - hidden.shape[1]
                hidden = torch.nn.functional.pad(hidden, (0, 0, 0, pad))  # (B, L, D)
                hidden_np, ok_list = hidden.cpu().numpy(), ok.cpu().tolist()
                mask_np = np.pad(tok["attention_mask"].numpy().astype(np.uint8), ((0, 0), (0, pad)))
                for j, text in enumerate(batch):  # rows are views of the batch arrays: no copies
                    n = int(mask_np[j].sum())
                    out[text] = TextFeature(
                        hidden_np[j], mask_np[j], n, counts[text] > L, bool(ok_list[j])
                    )
        return [out[t] for t in texts]

    def null(self) -> TextFeature:
        """The empty caption's embedding (``</s>`` alone): the unconditional input for CFG."""
        return self.encode([""])[0]
