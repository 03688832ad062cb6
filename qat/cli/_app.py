"""How every Hydra command starts: its config from the package (``pkg://qat.conf``), Hydra's override syntax,
``group=null``, and a config that does not compose ending the command with one line and exit code 1."""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import OverrideType
from hydra.errors import ConfigCompositionException, HydraException, OverrideParseException
from omegaconf import OmegaConf

from qat.conf import CONFIG_DIR

# `--help` of qat-export and qat-eval (hydra/help/tool.yaml) shows the command's docstring.
OmegaConf.register_new_resolver(
    "qat_doc", lambda name: (importlib.import_module(f"qat.cli.{name}").__doc__ or "").strip(), replace=True
)


def hydra_argv(argv: Sequence[str]) -> list[str]:
    """The command line as Hydra takes it. ``group=null`` (no recipe, no logger) deletes that group's
    default: Hydra spells it ``~group`` and stops with a traceback on ``group=null``. ``a.b={...}`` is
    passed as ``a={b: {...}}``: the same merge, which OmegaConf can also do when ``a.b`` is a typed node
    that is null (``quant=w4g32 quant.activation={format: int8}`` turns a float side on)."""
    groups = {p.name for p in Path(CONFIG_DIR).iterdir() if p.is_dir()}
    out = [f"~{a[: -len('=null')]}" if a.endswith("=null") and a[:-5] in groups else a for a in argv]
    return [_merge_into_parent(a) for a in out]


def _merge_into_parent(arg: str) -> str:
    try:
        o = OverridesParser.create().parse_override(arg)
    except HydraException:
        return arg  # Hydra reports it
    key = o.key_or_group
    if o.type != OverrideType.CHANGE or o.is_sweep_override() or "." not in key or "/" in key or o.package:
        return arg
    if not isinstance(o.value(), dict):
        return arg
    parent, last = key.rsplit(".", 1)
    return f"{parent}={{{last}:{o.get_value_element_as_str()}}}"


def run_app(hydra_main: Callable[[], Any], argv: Sequence[str] | None = None) -> None:
    """Run a ``@hydra.main`` function on ``argv`` (default: the command line). An unknown key or config
    file, a value of the wrong type or an override Hydra cannot parse ends the command with one line
    (:func:`qat.cli._errors.one_line`) instead of Hydra's few-line report; ``HYDRA_FULL_ERROR=1`` in the
    environment still gives Hydra's full one."""
    from qat.cli._errors import fail, one_line

    saved, asked = sys.argv, os.environ.get("HYDRA_FULL_ERROR")
    sys.argv = [sys.argv[0], *hydra_argv(sys.argv[1:] if argv is None else argv)]
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises the error instead of printing it
    try:
        hydra_main()
    except (ConfigCompositionException, OverrideParseException) as e:
        if asked:
            raise
        fail(one_line(e))
    except AssertionError as e:  # OmegaConf, on a field set inside a null node: quant=fp32 quant.weight.x=..
        if asked or "Unexpected type for root: NoneType" not in str(e):
            raise
        keys = [a.split("=", 1)[0] for a in sys.argv[1:] if "=" in a and not a.startswith("hydra.")]
        nested = [k for k in keys if k.count(".") >= 2]
        fail(
            f"{', '.join(nested)}: sets a field inside a config node that is null (a side kept in float); "
            "allowed: the whole node, e.g. quant.weight={format: int4}"
        )
    finally:
        sys.argv = saved
        if asked is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
