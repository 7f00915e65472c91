"""Reading the SA-1B links file (`file_name<TAB>cdn_link`) and md5 checklists (md5sum format).

The links file Meta hands out has one header line, rows in no particular order, rows that are not
image tars (`sa_images_ids.txt`, `sa_co_gold.tar`) and no final newline. Only `sa_NNNNNN.tar`
rows are downloadable image tars; the others are reported as ignored, never fetched.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from pipeline.errors import UserError

TAR_NAME = re.compile(r"^sa_\d{6}\.tar$")
HEADER = ("file_name", "cdn_link")
_MD5_LINE = re.compile(r"^([0-9a-fA-F]{32}) [ *](.+)$")


@dataclass
class Links:
    """The image tars of a links file, sorted by name, and the names of rows that were ignored."""

    tars: dict[str, str]  # sa_NNNNNN.tar -> url, sorted by name
    ignored: list[str] = field(default_factory=list)

    def select(self, only: list[str] | None) -> dict[str, str]:
        """The tars named in ``only`` (``sa_000001`` or ``sa_000001.tar``), or all of them."""
        if not only:
            return dict(self.tars)
        out = {}
        for raw in only:
            name = raw.strip()
            if not name:
                continue
            if not name.endswith(".tar"):
                name += ".tar"
            if name not in self.tars:
                raise UserError(
                    f"--only {raw!r} is not an image tar of the links file "
                    f"(it lists {len(self.tars)} tars such as {next(iter(self.tars), 'none')})"
                )
            out[name] = self.tars[name]
        if not out:
            raise UserError("--only selects nothing; give names like sa_000000,sa_000001")
        return dict(sorted(out.items()))


def _read_lines(path: str, what: str) -> list[str]:
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such {what}: {path}")
    if os.path.isdir(path):
        raise UserError(f"{what} {path} is a folder, expected a text file")
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().splitlines()
    except UnicodeDecodeError:
        raise UserError(f"{what} {path} is not UTF-8 text") from None


def parse_links(path: str) -> Links:
    """Parse an SA-1B links file. A malformed file raises ValueError naming the line."""
    lines = _read_lines(path, "links file")
    if not lines or tuple(c.strip() for c in lines[0].split("\t")) != HEADER:
        first = lines[0][:60] if lines else ""
        raise UserError(
            f"{path} is not an SA-1B links file: its first line should be "
            f"'file_name<TAB>cdn_link', got {first!r}"
        )
    tars: dict[str, str] = {}
    ignored: list[str] = []
    for n, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        parts = line.strip().split("\t")
        if len(parts) != 2 or not parts[0] or not parts[1].startswith(("http://", "https://")):
            raise UserError(
                f"{path} line {n}: expected 'file_name<TAB>http(s) link', got {line[:60]!r}"
            )
        name, url = parts
        if not TAR_NAME.match(name):
            ignored.append(name)
            continue
        if name in tars and tars[name] != url:
            raise UserError(f"{path} line {n}: {name} is listed twice with different links")
        tars[name] = url
    if not tars:
        raise UserError(f"{path} lists no image tars (rows named sa_NNNNNN.tar)")
    return Links(tars=dict(sorted(tars.items())), ignored=ignored)


def parse_md5(path: str) -> dict[str, str]:
    """Parse an md5sum-format checklist (``<md5>  sa_NNNNNN.tar``) into name -> lowercase md5."""
    out: dict[str, str] = {}
    for n, line in enumerate(_read_lines(path, "md5 file"), start=1):
        if not line.strip():
            continue
        m = _MD5_LINE.match(line.strip())
        if not m:
            raise UserError(f"{path} line {n}: expected '<md5>  <file name>', got {line[:60]!r}")
        name = os.path.basename(m.group(2).strip())
        md5 = m.group(1).lower()
        if out.get(name, md5) != md5:
            raise UserError(f"{path} line {n}: {name} is listed twice with different md5s")
        out[name] = md5
    if not out:
        raise UserError(f"md5 file {path} is empty")
    return out
