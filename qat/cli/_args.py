"""``key=value`` command-line arguments for the run-directory tools (``qat-export``, ``qat-eval``).

The same override syntax as ``qat-train`` (Hydra), without a config tree: each tool declares its keys
with defaults, and an unknown key or a bad value ends the command with a one-line message and exit code 1;
``--help`` prints the tool's usage and every key with its default.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import Any


class ArgError(ValueError):
    """A command-line argument is invalid; the message names the key and what is allowed."""


def _convert(key: str, raw: str, default: Any) -> Any:
    low = raw.strip().lower()
    if low in ("null", "none", "~"):
        return None
    if isinstance(default, bool):
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        raise ArgError(f"{key}: {raw!r} is not valid; allowed: true, false")
    if isinstance(default, int):
        try:
            return int(raw)
        except ValueError:
            raise ArgError(f"{key}: {raw!r} is not valid; allowed: an integer") from None
    if isinstance(default, tuple):
        try:
            return tuple(int(v) for v in raw.strip("[]() ").split(",") if v.strip())
        except ValueError:
            raise ArgError(f"{key}: {raw!r} is not valid; allowed: integers separated by commas") from None
    return raw


def parse(
    argv: Sequence[str], defaults: Mapping[str, Any], choices: Mapping[str, Sequence[str]] = {}
) -> dict:
    """``["run_dir=out/x", "format=onnx"]`` -> dict over ``defaults`` (``+key=`` / ``++key=`` accepted)."""
    out = dict(defaults)
    for arg in argv:
        if "=" not in arg:
            raise ArgError(f"{arg!r}: expected key=value; allowed keys: {', '.join(defaults)}")
        key, raw = arg.split("=", 1)
        key = key.lstrip("+")
        if key not in defaults:
            raise ArgError(f"{key}: unknown key; allowed: {', '.join(defaults)}")
        value = _convert(key, raw, defaults[key])
        if key in choices and value not in choices[key]:
            raise ArgError(f"{key}: {raw!r} is not valid; allowed: {', '.join(choices[key])}")
        out[key] = value
    return out


HELP_FLAGS = ("-h", "--help")


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def usage(prog: str, doc: str, defaults: Mapping[str, Any], choices: Mapping[str, Sequence[str]]) -> str:
    keys = [
        f"  {key}={_show(value)}" + (f"  (allowed: {', '.join(choices[key])})" if key in choices else "")
        for key, value in defaults.items()
    ]
    return f"usage: {prog} key=value ...\n\n{doc.strip()}\n\nkeys and their defaults:\n" + "\n".join(keys)


def parse_command_line(
    argv: Sequence[str],
    defaults: Mapping[str, Any],
    choices: Mapping[str, Sequence[str]],
    prog: str,
    doc: str,
) -> dict:
    """:func:`parse` for a tool's ``main``: ``--help`` prints the usage and exits 0; a bad argument ends the
    command with one line and exit code 1."""
    from qat.cli._errors import fail

    if any(arg in HELP_FLAGS for arg in argv):
        print(usage(prog, doc, defaults, choices))
        sys.exit(0)
    try:
        return parse(argv, defaults, choices)
    except ArgError as e:
        fail(str(e))
