"""The export's files on disk: ``model.safetensors`` written and read back with its size and sha256, and the
config digest that ties it to ``quant_config.json`` (each file records a checksum of the other)."""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from qat.deploy.codec import ExportFormatError
from qat.deploy.schema import CONFIG_FILE


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def config_digest(config: Mapping[str, Any]) -> str:
    """sha256 of the config without its ``files`` entry (canonical JSON). The exporter stores it in the
    weights file's metadata while the config stores the weights file's sha256, so a change to either file
    is detected: a damaged export always fails to load instead of loading as a different model."""
    body = {k: v for k, v in config.items() if k != "files"}
    return sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())


def write_safetensors(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]
) -> dict[str, Any]:
    """Write ``tensors`` with ``metadata``; returns the ``files`` entry ``{"path", "bytes", "sha256"}``."""
    from safetensors.torch import save

    data = save(tensors, metadata=metadata)
    path.write_bytes(data)  # a plain write: the file gets the umask's mode (save_file makes it 0600)
    return {"path": path.name, "bytes": len(data), "sha256": sha256(data)}


def read_safetensors(
    path: Path, expected: Mapping[str, Any] | None, config_sha256: str | None = None
) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and header ``{name: (dtype, shape)}`` of a safetensors file, checked against the size and
    sha256 recorded at export (``expected``) and ``config_sha256`` against the config digest the exporter
    stored in its metadata (when both exist)."""
    if not path.is_file():
        raise ExportFormatError(f"{path}: missing")
    data = path.read_bytes()
    if expected is not None:
        if "bytes" in expected and len(data) != expected["bytes"]:
            raise ExportFormatError(
                f"{path}: {len(data)} bytes but the export wrote {expected['bytes']} (truncated or replaced?)"
            )
        if "sha256" in expected and sha256(data) != expected["sha256"]:
            raise ExportFormatError(f"{path}: sha256 does not match {CONFIG_FILE} (the file is corrupt)")
    if len(data) < 8:
        raise ExportFormatError(f"{path}: truncated ({len(data)} bytes; no safetensors header)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise ExportFormatError(f"{path}: truncated (header says {n} bytes, file has {len(data) - 8})")
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ExportFormatError(f"{path}: corrupt safetensors header: {e}") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    stored = meta.get("config_sha256") if isinstance(meta, dict) else None
    if config_sha256 is not None and stored is not None and stored != config_sha256:
        raise ExportFormatError(  # qatkit exports record it; other producers may not
            f"{path}: does not belong to this {CONFIG_FILE} (config checksum mismatch: one of "
            "the two files was changed or replaced)"
        )
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        tensors = load(data)
    except SafetensorError as e:
        raise ExportFormatError(f"{path}: truncated or corrupt safetensors file: {e}") from None
    return tensors, {k: (v["dtype"], v["shape"]) for k, v in header.items() if k != "__metadata__"}
