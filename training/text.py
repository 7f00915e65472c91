"""Caption cleaning and T5 encoding: text in, padded ``(L, D)`` fp16 embeddings + masks out.

Cleaning reproduces PixArt-α's ``clean_caption`` (``diffusion/model/t5.py``, the DeepFloyd IF rule
set), applied twice as its ``text_preprocessing`` does: PixArt's T5 features were made from captions
cleaned this way and diffusers' ``PixArtAlphaPipeline`` cleans prompts the same way, so a model
trained here sees the text PixArt's models saw. ``ftfy`` fixes mojibake and ``BeautifulSoup``
strips HTML, as in PixArt; the rest is an ordered table of regular expressions
(``tests/data/pixart_clean_caption.jsonl`` holds PixArt's own outputs for 236 web alt-texts).

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
import urllib.parse
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.errors import UserError

# The rules in PixArt's order; the order matters (e.g. URLs go before HTML is parsed, product
# codes only after ftfy). Each is (pattern, replacement).
_R = re.compile
_DOMAINS = r"(?:com|co|ru|net|org|edu|gov|it)"
_CJK_BLOCKS = (  # strokes, katakana ext., enclosed, compatibility, ext. A, hexagrams, unified
    "\u31c0-\u31ef",
    "\u31f0-\u31ff",
    "\u3200-\u32ff",
    "\u3300-\u33ff",
    "\u3400-\u4dbf",
    "\u4dc0-\u4dff",
    "\u4e00-\u9fff",
)
_BEFORE_HTML = [
    (_R("<person>"), "person"),  # anonymised names in LAION-style alt-texts
    # URLs: a scheme, or a dotted name with one of a few top-level domains (and its path)
    (
        _R(
            rf"\b((?:https?:(?:/{{1,3}}|[a-zA-Z0-9%])|[a-zA-Z0-9.\-]+[.]{_DOMAINS}[\w/-]*\b/?(?!@)))"
        ),
        "",
    ),
    (
        _R(rf"\b((?:www:(?:/{{1,3}}|[a-zA-Z0-9%])|[a-zA-Z0-9.\-]+[.]{_DOMAINS}[\w/-]*\b/?(?!@)))"),
        "",
    ),
]
_AFTER_HTML = [
    (_R(r"@[\w\d]+\b"), ""),  # @handles
    *((_R(f"[{block}]+"), "") for block in _CJK_BLOCKS),  # Chinese/Japanese kanji; not Hangul
    (
        _R(
            "[\u002d\u058a\u05be\u1400\u1806\u2010-\u2015\u2e17\u2e1a\u2e3a\u2e3b\u2e40"
            "\u301c\u3030\u30a0\ufe31\ufe32\ufe58\ufe63\uff0d]+"
        ),
        "-",
    ),  # every dash (and runs of them) → one "-"
    (_R("[`´«»“”¨]"), '"'),
    (_R("[‘’]"), "'"),
    (_R(r"&quot;?"), ""),  # left-over entities
    (_R(r"&amp"), ""),
    (_R(r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}"), " "),  # IP addresses
    (_R(r"\d:\d\d\s+$"), ""),  # trailing article ids like "1:23 "
    (_R(r"\\n"), " "),  # a literal backslash-n
    (_R(r"#\d{1,3}\b"), ""),  # "#123"
    (_R(r"#\d{5,}\b"), ""),  # "#12345…"
    (_R(r"\b\d{6,}\b"), ""),  # long numbers
    (_R(r"\S+\.(?:png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4)"), ""),  # file names
    (_R(r"[\"']{2,}"), '"'),  # """SOLD OUT"""
    (_R(r"\.{2,}"), " "),  # ellipses
    (_R(r"[#®•©™&@·º½¾¿¡§~)(\][}{|\\/*]+"), " "),  # symbol runs: ***SALE***, #tag
    (_R(r"\s+\.\s+"), " "),  # a lone " . "
]
_SEPARATOR = _R(r"[-_]")  # more than 3 of them: a slug like this-is-my-cat, read as spaces
_AFTER_FTFY = [
    (_R(r"\b[a-zA-Z]{1,3}\d{3,15}\b"), ""),  # product codes: jc6640
    (_R(r"\b[a-zA-Z]+\d+[a-zA-Z]+\b"), ""),  # jc6640vc
    (_R(r"\b\d+[a-zA-Z]+\d+\b"), ""),  # 6640vc231
    (_R(r"(worldwide\s+)?(free\s+)?shipping"), ""),  # shop boilerplate
    (_R(r"(free\s)?download(\sfree)?"), ""),
    (_R(r"\bclick\b\s(?:for|on)\s\w+"), ""),
    (_R(r"\b(?:png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4)(\simage[s]?)?"), ""),
    (_R(r"\bpage\s+\d+\b"), ""),
    (_R(r"\b\d*[a-zA-Z]+\d+[a-zA-Z]+\d+[a-zA-Z\d]*\b"), " "),  # j2d1a2a…
    (_R(r"\b\d+\.?\d*[xх×]\d+\.?\d*\b"), ""),  # sizes: 1920x1080, 60×90 (Latin, Cyrillic x, ×)
    (_R(r"\b\s+:\s+"), ": "),
    (_R(r"(\D[,./])\b"), r"\1 "),  # a space after punctuation glued to the next word
    (_R(r"\s+"), " "),
    (_R(r"^[\"']([\w\W]+)[\"']$"), r"\1"),  # one pair of enclosing quotes
    (_R(r"^['_,\-:;]"), ""),  # one stray leading / trailing mark
    (_R(r"['_,\-:+]$"), ""),
    (_R(r"^\.\S+$"), ""),  # a dot-file name alone
]


def _substitute(text: str, rules: list[tuple[re.Pattern[str], str]]) -> str:
    for pattern, replacement in rules:
        text = pattern.sub(replacement, text)
    return text


def _clean_once(text: str) -> str:
    import ftfy
    from bs4 import BeautifulSoup, MarkupResemblesLocatorWarning

    t = urllib.parse.unquote_plus(str(text)).strip().lower()
    t = _substitute(t, _BEFORE_HTML)
    with warnings.catch_warnings():  # a caption that looks like a file name is not a mistake here
        warnings.simplefilter("ignore", MarkupResemblesLocatorWarning)
        t = BeautifulSoup(t, features="html.parser").text
    t = _substitute(t, _AFTER_HTML)
    if len(_SEPARATOR.findall(t)) > 3:
        t = _SEPARATOR.sub(" ", t)
    t = html.unescape(html.unescape(ftfy.fix_text(t))).strip()
    return _substitute(t, _AFTER_FTFY).strip()


def clean_caption(text: str) -> str:
    """A caption as PixArt's T5 saw it in training: PixArt's cleaning applied twice, lower-cased."""
    return _clean_once(_clean_once(text))


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
            raise UserError(f"--max-length must be >= 2 tokens, got {max_length}")
        if batch_size < 1:
            raise UserError(f"text batch size must be >= 1, got {batch_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.batch_size = batch_size
        self.dim = int(model.config.d_model)

    @property
    def device(self) -> Any:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> Any:
        return next(self.model.parameters()).dtype

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
