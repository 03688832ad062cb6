"""The shell commands that the README and docs/ show, exactly as a user would copy them.

A command is a line of a fenced ``bash``/``sh`` block (backslash continuations joined, comments kept: the
shell ignores them) or an inline code span that runs a Python script (``python scripts/...``).
"""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
_FENCE = re.compile(r"^```(\w*)\s*$")
_INLINE = re.compile(r"`((?:OMP_NUM_THREADS=\d+ )?python (?:scripts|tests)/[^`]+)`")


def doc_commands() -> list[tuple[str, str]]:
    """``(file relative to the repo, command)`` for every command in the README and docs, in order."""
    out: list[tuple[str, str]] = []
    for path in DOCS:
        rel = str(path.relative_to(REPO))
        lang: str | None = None
        pending = ""
        for line in path.read_text().splitlines():
            fence = _FENCE.match(line.strip())
            if fence:
                lang = None if lang is not None else fence.group(1)
                continue
            if lang in ("bash", "sh"):
                text = pending + line.strip()
                if text.endswith("\\"):
                    pending = text[:-1].rstrip() + " "
                    continue
                pending = ""
                if text and not text.startswith("#"):
                    out.append((rel, text))
            elif lang is None:
                out += [(rel, m.group(1)) for m in _INLINE.finditer(line)]
    return out


def strip_comment(command: str) -> str:
    """The command without its trailing ``# comment`` (none of the documented commands quote a '#')."""
    return command.split(" #", 1)[0].strip()
