"""Fuzzing the export loader: damaged or doctored export directories must end in ``ExportFormatError``.

One small export (int4 per-channel, int4 per-group, ternary and int8-LSQ weights; static asymmetric and
dynamic per-token activations) is damaged in the ways files get damaged or tampered with: truncation,
flipped bytes in the safetensors header and data, JSON with fields removed, added, re-typed or changed,
and tensors whose shapes contradict the JSON. The oracle for every case: ``load_quantized`` raises
``ExportFormatError``, or (for changes that do not alter the model, e.g. an extra JSON field) the loaded
model computes exactly what the undamaged export computes. Anything else fails the test: another
exception (a crash), a case running over ``HANG_S`` seconds (a hang), or different outputs (a silently
wrong model). Each test prints how many cases it ran (``pytest -s``); ``FUZZ_EXAMPLES`` scales them.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
import signal
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qat
from qat.deploy import ExportFormatError, export, load_quantized
from qat.deploy.schema import CONFIG_FILE, WEIGHTS_FILE
from qat.models import DigitsCNN

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "40"))
HANG_S = 10
CHANNELS = (8, 16)
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
CASES_RUN: dict[str, dict[str, int]] = {}  # the running test's cases: kind of damage -> outcome -> count


class Hang(Exception):
    pass


@contextmanager
def hang_guard(seconds: int = HANG_S) -> Iterator[None]:
    def on_alarm(signum: int, frame: Any) -> None:
        raise Hang(f"load_quantized ran over {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


class Export:
    """The undamaged export: its two files' contents, its input and its reference output."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.weights = (path / WEIGHTS_FILE).read_bytes()
        self.config = json.loads((path / CONFIG_FILE).read_text())
        (n,) = struct.unpack("<Q", self.weights[:8])
        self.header_end = 8 + n
        self.x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            self.reference = load_quantized(path, DigitsCNN(channels=CHANNELS))(self.x)


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Export:
    torch.manual_seed(0)
    model = DigitsCNN(channels=CHANNELS)
    cfg = {
        "weight": {"format": "int4", "granularity": "per_channel", "scale": "minmax"},
        "activation": {"format": "int8", "granularity": "per_tensor", "scale": "ema", "symmetric": False},
        "overrides": {
            "conv2": {"weight": {"granularity": "per_group", "group_size": 8}},
            "conv3": {"weight": {"format": "ternary", "scale": "twn"}},
            "fc": {
                "weight": {"format": "int8", "scale": "lsq"},
                "activation": {"dynamic": True, "granularity": "per_token", "scale": "minmax"},
            },
        },
    }
    qat.prepare(model, cfg)
    x = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    qat.calibrate(model, [(x, torch.zeros(16, dtype=torch.long))])
    out = tmp_path_factory.mktemp("fuzz") / "export"
    export(model.eval(), out, batches=[(x, torch.zeros(16, dtype=torch.long))], task="classification")
    return Export(out)


def write(dirpath: Path, weights: bytes, config: Any, *, config_text: str | None = None) -> Path:
    dirpath.mkdir(parents=True, exist_ok=True)
    (dirpath / WEIGHTS_FILE).write_bytes(weights)
    text = config_text if config_text is not None else json.dumps(config)
    (dirpath / CONFIG_FILE).write_text(text, encoding="utf-8", errors="surrogatepass")
    return dirpath


def with_integrity(config: dict[str, Any], weights: bytes) -> dict[str, Any]:
    """The config with files.weights.bytes / sha256 matching ``weights`` (a doctored, not a damaged file)."""
    config = copy.deepcopy(config)
    files = config.get("files")
    entry = files.get("weights") if isinstance(files, dict) else None
    if isinstance(entry, dict):  # (a doctored "files" itself has no checksums to recompute)
        entry.update(bytes=len(weights), sha256=hashlib.sha256(weights).hexdigest())
    return config


def outcome(good: Export, dirpath: Path, name: str) -> str:
    """'error' (ExportFormatError), 'same' or 'different' (outputs vs the undamaged export)."""
    try:
        with hang_guard():
            model = load_quantized(dirpath, DigitsCNN(channels=CHANNELS))
    except ExportFormatError as e:
        assert str(e) and "\n" not in str(e)
        end = "error"
    else:
        with hang_guard(), torch.no_grad():
            y = model(good.x)
        end = "same" if torch.equal(y, good.reference) else "different"
    ends = CASES_RUN.setdefault(name, {})
    ends[end] = ends.get(end, 0) + 1
    return end


def counted(test: Any) -> Any:
    """Runs a fuzz test and then checks it ran at least ``EXAMPLES`` cases (Hypothesis stops early when it
    cannot draw that many distinct ones); prints how the cases ended (``pytest -s``)."""

    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        CASES_RUN.clear()
        test(*args, **kwargs)
        total = sum(sum(ends.values()) for ends in CASES_RUN.values())
        print(f"\n{test.__name__}: {total} cases")
        for name, ends in sorted(CASES_RUN.items()):
            print(f"  {name}: " + ", ".join(f"{k}={v}" for k, v in sorted(ends.items())))
        assert total >= EXAMPLES, f"{test.__name__} ran {total} cases, expected at least {EXAMPLES}"

    return run


@pytest.fixture
def case_dir(tmp_path) -> Iterator[Path]:
    counter = iter(range(10**9))
    yield tmp_path, counter  # type: ignore[misc]


def fresh(case_dir: Any) -> Path:
    root, counter = case_dir
    return root / f"case{next(counter)}"


# ------------------------------------------------------------------------------------------- truncation
@counted
@FUZZ
@given(data=st.data())
def test_truncated_weights_file(good, case_dir, data):
    cut = data.draw(st.integers(0, len(good.weights) - 1))
    assert (
        outcome(good, write(fresh(case_dir), good.weights[:cut], good.config), "truncated weights") == "error"
    )


@counted
@FUZZ
@given(data=st.data())
def test_truncated_config_file(good, case_dir, data):
    text = json.dumps(good.config, indent=2)
    cut = data.draw(st.integers(0, len(text) - 1))
    d = write(fresh(case_dir), good.weights, None, config_text=text[:cut])
    assert outcome(good, d, "truncated config") == "error"


# ------------------------------------------------------------------------------------------- flipped bytes
def flip(blob: bytes, pos: int, xor: int) -> bytes:
    b = bytearray(blob)
    b[pos] ^= xor
    return bytes(b)


@counted
@FUZZ
@given(data=st.data())
def test_flipped_bytes_in_the_safetensors_header(good, case_dir, data):
    """Damage: the recorded size and sha256 no longer match."""
    pos, xor = data.draw(st.integers(0, good.header_end - 1)), data.draw(st.integers(1, 255))
    d = write(fresh(case_dir), flip(good.weights, pos, xor), good.config)
    assert outcome(good, d, "header flip") == "error"


@counted
@FUZZ
@given(data=st.data())
def test_flipped_bytes_in_the_safetensors_header_with_matching_checksum(good, case_dir, data):
    """Tampering: the JSON's size and sha256 are recomputed, so the header parser itself is exercised."""
    pos, xor = data.draw(st.integers(0, good.header_end - 1)), data.draw(st.integers(1, 255))
    weights = flip(good.weights, pos, xor)
    d = write(fresh(case_dir), weights, with_integrity(good.config, weights))
    assert outcome(good, d, "header flip, checksum recomputed") in ("error", "same")


@counted
@FUZZ
@given(data=st.data())
def test_flipped_bytes_in_the_tensor_data(good, case_dir, data):
    pos = data.draw(st.integers(good.header_end, len(good.weights) - 1))
    d = write(fresh(case_dir), flip(good.weights, pos, data.draw(st.integers(1, 255))), good.config)
    assert outcome(good, d, "data flip") == "error"


@counted
@FUZZ
@given(data=st.data())
def test_flipped_bytes_in_the_config_file(good, case_dir, data):
    text = json.dumps(good.config, indent=2).encode()
    pos, xor = data.draw(st.integers(0, len(text) - 1)), data.draw(st.integers(1, 255))
    d = write(
        fresh(case_dir), good.weights, None, config_text=flip(text, pos, xor).decode("utf-8", "replace")
    )
    assert outcome(good, d, "config flip") in ("error", "same")


# ------------------------------------------------------------------------------------------- JSON fields
def paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key path in a JSON tree (dict keys and list indices), the root's children first."""
    out = []
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
    for k, v in items:
        out.append((*prefix, k))
        out += paths(v, (*prefix, k))
    return out


def get_parent(tree: Any, path: tuple) -> Any:
    for k in path[:-1]:
        tree = tree[k]
    return tree


JSON_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.lists(st.integers(-3, 3), max_size=4),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)


def tweak(value: Any, draw: Any) -> Any:
    """A value of the same type that differs (an int off by a little, another string, a flipped bool)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + draw(st.sampled_from([-2, -1, 1, 2, 7, 1 << 20]))
    if isinstance(value, float):
        return value * draw(st.sampled_from([0.5, 2.0, -1.0])) + 1e-3
    if isinstance(value, str):
        options = ["", value + "x", value[:-1], "int8", "per_channel", "linear", "F32"]
        return draw(st.sampled_from([o for o in options if o != value]))
    if isinstance(value, list):
        return value[:-1] if value and draw(st.booleans()) else [*value, draw(st.integers(0, 9))]
    return draw(JSON_VALUES.filter(lambda v: v != value))  # e.g. null -> anything but null


def mutate_config(good: Export, data: Any) -> tuple[dict[str, Any], str]:
    """quant_config.json with one field (outside the weights file's checksum entry) removed, added, given
    another type or another value of the same type."""
    cfg = copy.deepcopy(good.config)
    all_paths = [p for p in paths(cfg) if p[:2] != ("files", "weights")]
    path = data.draw(st.sampled_from(all_paths))
    parent, key = get_parent(cfg, path), path[-1]
    op = data.draw(st.sampled_from(["delete", "extra", "retype", "tweak"]))
    if op == "delete":
        del parent[key]
    elif op == "extra":
        target = parent[key] if isinstance(parent[key], dict) else parent
        if isinstance(target, dict):
            target[data.draw(st.text(min_size=1, max_size=8))] = data.draw(JSON_VALUES)
        else:
            target.append(data.draw(JSON_VALUES))
    elif op == "retype":
        parent[key] = data.draw(JSON_VALUES.filter(lambda v: type(v) is not type(parent[key])))
    else:
        parent[key] = tweak(parent[key], data.draw)
    return cfg, op


@counted
@FUZZ
@given(data=st.data())
def test_config_fields_missing_extra_retyped_or_changed(good, case_dir, data):
    """Damage: the config no longer matches the digest stored in the weights file."""
    cfg, op = mutate_config(good, data)
    assert outcome(good, write(fresh(case_dir), good.weights, cfg), f"json {op}") == "error"


@counted
@FUZZ
@given(data=st.data())
def test_doctored_config_fields_never_crash(good, case_dir, data):
    """Tampering: the same changes with both checksums recomputed, so only the loader's own validation
    stands between a bad field and a crash. It must raise ExportFormatError or load a model that runs."""
    from safetensors.torch import load, save

    from qat.deploy.storage import config_digest

    cfg, op = mutate_config(good, data)
    try:
        digest = config_digest(cfg)
    except (TypeError, ValueError):
        digest = "unencodable"
    weights = save(load(good.weights), metadata={**_metadata(good.weights), "config_sha256": digest})
    d = write(fresh(case_dir), weights, with_integrity(cfg, weights))
    assert outcome(good, d, f"doctored json {op}") in ("error", "same", "different")


@pytest.mark.slow
def test_every_single_field_deleted_or_changed(good, tmp_path):
    """Exhaustive companion of the two tests above: each field of the JSON deleted, and each scalar changed
    (an int + 1, a string + "x", a bool flipped), as damage (must fail) and doctored (must not crash)."""
    from safetensors.torch import load, save

    from qat.deploy.storage import config_digest

    n = 0
    for path in [p for p in paths(good.config) if p[0] != "files"]:
        for op in ("delete", "change"):
            cfg = copy.deepcopy(good.config)
            parent, key = get_parent(cfg, path), path[-1]
            value = parent[key]
            if op == "delete":
                del parent[key]
            elif isinstance(value, (bool, int, str)):
                parent[key] = (
                    (not value) if isinstance(value, bool) else value + (1 if isinstance(value, int) else "x")
                )
            else:
                continue
            n += 1
            assert (
                outcome(good, write(tmp_path / f"d{n}", good.weights, cfg), f"each field {op}") == "error"
            ), path
            weights = save(
                load(good.weights), metadata={**_metadata(good.weights), "config_sha256": config_digest(cfg)}
            )
            d = write(tmp_path / f"t{n}", weights, with_integrity(cfg, weights))
            outcome(good, d, f"doctored each field {op}")  # raises on a crash or a hang
    assert n > 300


# ------------------------------------------------------------------------------------------- shapes
@counted
@FUZZ
@given(data=st.data())
def test_tensors_whose_shapes_contradict_the_config(good, case_dir, data):
    """A tensor re-saved with another shape (fewer, more, or the same values rearranged); the checksum in
    the JSON is recomputed, as a tool rewriting the file would."""
    from safetensors.torch import load, save

    tensors = load(good.weights)
    name = data.draw(st.sampled_from(sorted(tensors)))
    t = tensors[name].flatten()
    how = data.draw(st.sampled_from(["fewer", "more", "transposed", "flat", "unsqueezed"]))
    if how == "fewer" and t.numel() > 1:
        new = t[:-1]
    elif how == "more" or how == "fewer":
        new = torch.cat([t, t[:1]])
    elif how == "transposed" and tensors[name].dim() >= 2:
        new = tensors[name].transpose(0, 1).contiguous().reshape(tensors[name].shape[::-1])
        if list(new.shape) == list(tensors[name].shape):
            new = new.unsqueeze(0)
    elif how == "flat" and tensors[name].dim() != 1:
        new = t
    else:
        new = tensors[name].unsqueeze(0)
    tensors[name] = new.contiguous()
    weights = save(tensors, metadata=_metadata(good.weights))
    d = write(fresh(case_dir), weights, with_integrity(good.config, weights))
    assert outcome(good, d, f"shape {how}") == "error"


def _metadata(weights: bytes) -> dict[str, str]:
    (n,) = struct.unpack("<Q", weights[:8])
    return json.loads(weights[8 : 8 + n]).get("__metadata__", {})


# ------------------------------------------------------------------------------------------- crafted files
def crafted_cases(good: Export) -> dict[str, tuple[bytes, Any, str | None]]:
    cfg = good.config

    def files(path: Any) -> dict[str, Any]:
        c = copy.deepcopy(cfg)
        c["files"]["weights"]["path"] = path
        return c

    huge_header = struct.pack("<Q", 2**63) + good.weights[8:]
    deep = "[" * 100_000 + "]" * 100_000
    return {
        "weights path is a device": (good.weights, files("/dev/zero"), None),
        "weights path escapes the directory": (good.weights, files("../export/" + WEIGHTS_FILE), None),
        "weights path is not a string": (good.weights, files(7), None),
        "weights path is absolute": (good.weights, files(str(good.path / WEIGHTS_FILE)), None),
        "header length beyond the file": (huge_header, cfg, None),
        "header length beyond the file, checksum recomputed": (
            huge_header,
            with_integrity(cfg, huge_header),
            None,
        ),
        "empty files": (b"", None, ""),
        "config is deeply nested": (good.weights, None, deep),
        "config is a list": (good.weights, [cfg], None),
        "config is not utf-8": (good.weights, None, '{"schema": "\udcff"}'),
        "schema version from the future": (good.weights, {**cfg, "schema_version": 99}, None),
    }


def _drop_integrity(cfg: dict[str, Any]) -> dict[str, Any]:
    c = copy.deepcopy(cfg)
    c["files"]["weights"] = {"path": WEIGHTS_FILE}
    return c


def test_export_without_checksums_still_loads(good, tmp_path):
    """Size and sha256 are optional (other producers may not write them): qatkit's digest still holds."""
    assert outcome(good, write(tmp_path, good.weights, _drop_integrity(good.config)), "crafted") == "same"


def test_crafted_files_fail_cleanly(good, tmp_path):
    results = {}
    for i, (name, (weights, cfg, text)) in enumerate(crafted_cases(good).items()):
        results[name] = outcome(good, write(tmp_path / f"c{i}", weights, cfg, config_text=text), "crafted")
    assert results == {name: "error" for name in results}
