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


LAZY = """
import sys

import torch
import qat

assert "transformers" not in sys.modules, "import qat imported transformers"
from transformers.pytorch_utils import Conv1D

model = torch.nn.Sequential(Conv1D(8, 4), torch.nn.Linear(8, 2))
qat.prepare(model, {"weight": {"format": "int8", "granularity": "per_channel"}})
print("QUANTIZED:", [r.type for r in model.qat_report.quantized])
"""


def test_import_qat_alone_quantizes_gpt2_conv1d_without_importing_transformers_itself():
    """The registry entry for GPT-2's Conv1D resolves lazily: no `import qat.hf`, no transformers import."""
    out = subprocess.run([sys.executable, "-c", LAZY], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "QUANTIZED: ['Conv1D', 'Linear']" in out.stdout
