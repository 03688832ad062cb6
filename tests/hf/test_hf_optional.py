"""transformers is an optional extra: the core package must import and work without it."""

from __future__ import annotations

import subprocess
import sys

CODE = """
import sys


class HideTransformers:  # as if the package were not installed (find_spec sees nothing either)
    def find_spec(self, name, path=None, target=None):
        if name == "transformers" or name.startswith("transformers."):
            raise ModuleNotFoundError(f"No module named {name!r}")


sys.meta_path.insert(0, HideTransformers())
import importlib.metadata as md  # version checks (torchmetrics, lightning) read the installed metadata

for fn in ("distribution", "version"):
    def hidden(name, _orig=getattr(md, fn)):
        if name == "transformers":
            raise md.PackageNotFoundError(name)
        return _orig(name)
    setattr(md, fn, hidden)

import torch
import qat

qat.prepare(torch.nn.Sequential(torch.nn.Linear(4, 4)), {})
try:
    import qat.hf
except ImportError as e:
    print("IMPORT-ERROR:", e)
"""


def test_core_imports_without_transformers_and_qat_hf_says_what_to_install():
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "IMPORT-ERROR: qat.hf needs the optional dependency 'transformers'" in out.stdout
    assert "pip install 'qatkit[transformers]'" in out.stdout
