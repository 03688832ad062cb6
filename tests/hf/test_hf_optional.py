"""transformers is an optional extra: the core package must import and work without it."""

from __future__ import annotations

import subprocess
import sys

CODE = """
import sys
sys.modules["transformers"] = None  # any "import transformers" now raises ImportError
import qat, qat.train.job, qat.train.embed, qat.data.sentences
qat.prepare(__import__("torch").nn.Sequential(__import__("torch").nn.Linear(4, 4)), {})
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
