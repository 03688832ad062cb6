"""Every command in the README and docs/ runs as typed.

Each documented command is listed in CHECKS with how it is checked, and a test fails when the docs show a
command that is not listed (or the list names one the docs no longer show):

* ``run``: executed exactly as written (through ``bash -c``) in a scratch directory, after placeholders
  such as ``<time>`` or ``outputs/...`` are replaced by the run directories that earlier commands made;
* ``dry``: executed exactly as written with ``QAT_DRY_RUN=1`` in the environment: the real CLI composes
  the config (multirun sweeps expand every member), validates it, loads the data and runs one batch
  through the model, then stops before training (for commands that train for minutes or need a GPU);
* ``compose``: cluster launches (SLURM) cannot start here; the command's overrides are composed with
  Hydra, every member validated and the launcher built (it submits nothing);
* ``args``: benchmark scripts: their command line is parsed by the script's own argparse parser;
* ``covered``: checked elsewhere (named in the entry).
Commands that train for more than a few seconds run under ``-m slow``.
"""

from __future__ import annotations

import argparse
import itertools
import os
import runpy
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.docs import REPO, doc_commands, strip_comment
from helpers.extras import require

BIN = Path(sys.executable).parent
SLOW = pytest.mark.slow

OWN_DATA = "covered:tests/data/test_hf_readme.py"
# command (as in the docs, comment stripped) -> (kind, marks)
CHECKS: dict[str, tuple[str, tuple]] = {
    # README.md: the quick start is what .ci/run runs (the test command) and what the fresh-clone test runs
    "bash scripts/setup.sh && .venv/bin/qat-train": ("covered:test_quick_start_on_a_fresh_copy", ()),
    "bash scripts/setup.sh && .venv/bin/python -m pytest": ("covered:.ci/run", ()),
    "qat-train": ("dry", (SLOW,)),
    "qat-train quant=w2a2 trainer.max_epochs=3": ("dry", (SLOW,)),
    "qat-train recipe=pytext_w4g32a8dyn": ("dry", (SLOW,)),
    "qat-train -m quant=w8a8,w4a4,w2a2": ("covered:test_readme_sweep_runs_as_typed", ()),
    "qat-train mode=ptq": ("dry", (SLOW,)),
    "qat-train trainer=ddp": ("dry", (SLOW,)),
    "qat-train ckpt_path=outputs/.../checkpoints/qat/last.ckpt": ("dry", (SLOW,)),
    "qat-train debug=fast": ("covered:debug_run (the fixture runs it as typed)", ()),
    # README.md, "Your own data": its blocks run as typed, each in an empty directory (OWN_DATA)
    'python -c "from sklearn.datasets import load_iris; '
    "load_iris(as_frame=True).frame.to_csv('iris.csv', index=False)\"": (OWN_DATA, ()),
    "qat-train recipe=generic_w8a8 model=mlp data=hf data.data_files=iris.csv data.label_column=target "
    "data.batch_size=16": (OWN_DATA, ()),
    'python -c "import json, pydoc; '
    "open('json.txt', 'w').write(pydoc.render_doc(json, renderer=pydoc.plaintext))\"": (OWN_DATA, ()),
    "qat-train recipe=generic_w4a8 task=lm model=tiny_gpt data=hf data.path=text data.data_files=json.txt "
    "data.seq_len=64 baseline.max_epochs=3 trainer.max_epochs=2": (OWN_DATA, ()),
    "python -c \"import csv, pydoc; w = csv.writer(open('lines.csv', 'w')); w.writerow(['text', 'label']); "
    "w.writerows((line, m) for m in ('csv', 'json', 'random') for line in "
    'pydoc.render_doc(m, renderer=pydoc.plaintext).splitlines() if line.strip())"': (OWN_DATA, ()),
    "qat-train recipe=generic_w8a8 model=text_classifier data=hf data.data_files=lines.csv "
    "data.tokenizer=minilm data.seq_len=32 baseline.max_epochs=5 trainer.max_epochs=3": (OWN_DATA, ()),
    "qat-export run_dir=outputs/digits_w4a4/<time>": ("run", (SLOW,)),
    "qat-export ckpt=outputs/.../checkpoints/qat/last.ckpt target=onnx out=/tmp/exp": ("run", ()),
    "qat-eval run_dir=outputs/digits_w4a4/<time> batch_sizes=[1,64] repeats=30": ("run", ()),
    "python scripts/bench_core.py --only pytext": ("args", ()),
    "python scripts/bench_export.py --onnx": ("args", ()),
    # docs/deploy.md
    "qat-export run_dir=outputs/digits_w8a8/<time> target=onnx": (
        "covered:tests/deploy/test_cli.py::test_qat_export_and_qat_eval[onnx] (slow)",
        (),
    ),
    "python scripts/bench_deploy.py --llm": ("args", ()),
    "OMP_NUM_THREADS=2 python scripts/bench_deploy.py --llm --threads 1 2": ("args", ()),
    "OMP_NUM_THREADS=2 python scripts/bench_deploy.py --llm --skip-ffn --rounds 5 --repeats 10": ("args", ()),
    # docs/distributed.md
    "qat-train trainer=fsdp trainer.devices=8 recipe=pytext_w4g32a8dyn": ("dry", (SLOW,)),
    "qat-train -m hydra/launcher=slurm trainer=fsdp trainer.num_nodes=2 trainer.devices=8 "
    "hydra.launcher.partition=gpu recipe=pytext_w4g32a8dyn": ("compose", ()),
    "qat-train trainer=fsdp_cpu debug=fast hydra.run.dir=outputs/fsdp_cpu": ("run", (SLOW,)),
    "MALLOC_MMAP_THRESHOLD_=131072 OMP_NUM_THREADS=1 python scripts/bench_fsdp.py --ranks 2 4": ("args", ()),
    # docs/errors.md
    "python tests/test_errors.py": ("covered:tests/test_errors.py::test_doc_table_is_up_to_date", ()),
    # docs/methods.md
    "qat-mixed recipe=pytext_w4g32a8dyn budget.bits_per_weight=3 "
    "baseline.ckpt=<float run>/checkpoints/float/last.ckpt baseline.max_epochs=0": ("run", (SLOW,)),
    "qat-train recipe=pytext_w4g32a8dyn hydra.searchpath=[file://<qat-mixed run dir>] quant=mixed_w3": (
        "dry",
        (SLOW,),
    ),
    "OMP_NUM_THREADS=1 python scripts/bench_methods.py --out outputs/bench_methods --pytext-steps 200 "
    "--pytext-baseline-epochs 3 --pytext-test-batches 12": ("args", ()),
    # docs/reliability.md
    "qat-train recipe=digits_w4a4 hydra.run.dir=outputs/my_run": ("run", (SLOW,)),
    "qat-train recipe=digits_w4a4 hydra.run.dir=outputs/my_run resume=true": ("run", (SLOW,)),
    # docs/sweeps.md
    "qat-train -m recipe=sweep_digits_bits_methods": ("dry", (SLOW,)),
    "qat-report multirun/sweep_digits_bits_methods/<time>": ("run", ()),
    "qat-train -m quant=fp32,w8a8,w4a4,w2a2": ("dry", (SLOW,)),
    "qat-train -m recipe=pytext_w4g32a8dyn quant.weight.format=int8,int4,int3,int2": ("dry", (SLOW,)),
    "qat-train -m quant=w4a4 mode=qat,ptq optim.scale_lr_mult=0.1,1,10": ("dry", (SLOW,)),
    "qat-train recipe=digits_w4a4 hydra.run.dir=outputs/digits_float": ("run", (SLOW,)),
    "qat-train -m recipe=sweep_digits_bits_methods "
    "baseline.ckpt=outputs/digits_float/checkpoints/float/last.ckpt baseline.max_epochs=0": ("dry", (SLOW,)),
    "qat-report multirun/sweep_digits_bits_methods/2026-01-01_12-00-00": ("run", (SLOW,)),
    "qat-report multirun/a multirun/b outputs/my_run --out reports/ab --x bits": ("run", (SLOW,)),
    "qat-train -m hparams_search=digits_w4a4_lr": ("dry", (SLOW,)),
    "qat-train -m hparams_search=digits_w4a4_lr hydra.sweeper.n_trials=8 quant=w2a2": ("dry", (SLOW,)),
    "qat-train -m hydra/launcher=slurm trainer=gpu hydra.launcher.partition=gpu recipe=sweep_pytext_bits": (
        "compose",
        (),
    ),
    "qat-train -m hydra/launcher=slurm trainer=ddp trainer.num_nodes=2 trainer.devices=4 "
    "hydra.launcher.partition=gpu hydra.launcher.account=my_account hydra.launcher.timeout_min=720 "
    "'hydra.launcher.setup=[\"source ~/venvs/qat/bin/activate\"]' recipe=pytext_w4g32a8dyn "
    "quant.weight.format=int4,int2": ("compose", ()),
    "qat-report multirun/pytext_w4g32a8dyn/<time>": ("run", (SLOW,)),
    "qat-train -m hydra/launcher=submitit_local quant=fp32,w4a4 debug=fast": ("run", (SLOW,)),
    # docs/transformers.md
    "python scripts/bench_minilm.py --scale-init": ("args", ()),
    "qat-train recipe=minilm_w8a8": ("dry", (SLOW,)),
    "qat-train recipe=minilm_w8a8 mode=ptq": ("dry", (SLOW,)),
    "OMP_NUM_THREADS=1 python scripts/bench_minilm.py": ("args", ()),
    "OMP_NUM_THREADS=1 python scripts/bench_minilm.py --ablation": ("args", ()),
    "qat-train recipe=minilm_w8a8 trainer=gpu trainer.precision=32-true trainer.limit_train_batches=null "
    "trainer.max_epochs=3 trainer.limit_val_batches=null data.seq_len=128 data.batch_size=128 "
    "calibration.batches=32 distill.kind=mse distill.hidden_weight=1.0 optim.warmup_steps=100": (
        "dry",
        (SLOW,),
    ),
    "OMP_NUM_THREADS=1 python scripts/bench_minilm.py --out outputs/bench_minilm": ("args", ()),
    "OMP_NUM_THREADS=1 python scripts/bench_minilm.py --recipes minilm_w8a8 "
    "--out outputs/bench_minilm_w8a8": ("args", ()),
    "python scripts/bench_minilm.py --ablation": ("args", ()),
    # docs/llm.md
    "qat-train recipe=smollm2_q4_0": ("dry", (SLOW,)),
    "qat-train recipe=smollm2_q4_0 mode=ptq": ("dry", (SLOW,)),
    "qat-train recipe=smollm2_q4_0 lora.rank=16 optim.optimizer.lr=2e-4 trainer.limit_train_batches=150": (
        "dry",
        (SLOW,),
    ),
    "qat-export run_dir=outputs/smollm2_q4_0/<time> target=gguf": (
        "covered:tests/train/test_lm_distill.py::test_qat_export_target_gguf_needs_only_the_run_directory",
        (),
    ),
    "python scripts/bench_llm.py outputs/smollm2_q4_0/<time> --json llm.json": ("args", ()),
    "python scripts/bench_llm.py --memory --steps 2 --batch 4 --bf16": ("args", ()),
    "qat-train recipe=smollm2_q8_0 trainer.limit_train_batches=40 hydra.run.dir=outputs/smollm2_q8_0/qat": (
        "dry",
        (SLOW,),
    ),
    "qat-train recipe=smollm2_q4_0 mode=ptq hydra.run.dir=outputs/smollm2_q4_0/ptq": ("dry", (SLOW,)),
    "qat-train recipe=smollm2_q4_0 trainer.limit_train_batches=120 hydra.run.dir=outputs/smollm2_q4_0/qat": (
        "dry",
        (SLOW,),
    ),
    "qat-train recipe=smollm2_q4_0 lora.rank=16 optim.optimizer.lr=2e-4 trainer.limit_train_batches=150 "
    "hydra.run.dir=outputs/smollm2_q4_0/lora": ("dry", (SLOW,)),
    "qat-train recipe=smollm2_q8_0 mode=ptq hydra.run.dir=outputs/smollm2_q8_0/ptq": ("dry", (SLOW,)),
    "qat-train recipe=smollm2_w4a8 mode=ptq hydra.run.dir=outputs/smollm2_w4a8/ptq": ("dry", (SLOW,)),
    "qat-train recipe=smollm2_w4a8 trainer.limit_train_batches=120 hydra.run.dir=outputs/smollm2_w4a8/qat": (
        "dry",
        (SLOW,),
    ),
    "python scripts/bench_llm.py outputs/smollm2_q4_0/ptq outputs/smollm2_q4_0/qat outputs/smollm2_q4_0/lora "
    "outputs/smollm2_q8_0/ptq outputs/smollm2_q8_0/qat outputs/smollm2_w4a8/ptq outputs/smollm2_w4a8/qat "
    "--threads 1 --repeats 3": ("args", ()),
    "qat-report outputs/smollm2_q4_0 outputs/smollm2_q8_0 outputs/smollm2_w4a8": (
        "covered:tests/report/test_recovery.py::test_recovery_of_a_lower_is_better_metric (QAT and PTQ runs "
        "of one grid, perplexity; the SmolLM2 runs take hours)",
        (),
    ),
    "qat-train recipe=smollm2_q4_0 model.path=/models/my-llama": (
        "covered:tests/hf/test_causal_lm.py::test_a_saved_folder_loads_back (a folder for model.path)",
        (),
    ),
    # docs/training-speed.md
    "qat-train compile=true": ("dry", (SLOW,)),
    "OMP_NUM_THREADS=1 python scripts/bench_overhead.py --threads 1": ("args", ()),
    "python scripts/bench_overhead.py --workloads cnn --modes eager --profile ours": ("args", ()),
    "OMP_NUM_THREADS=1 python scripts/bench_overhead.py --threads 1 --workloads gpt --modes eager --variants "
    "float floor ours ours-torch-ops torchao --no-memory --rounds 21 --round-seconds 0.5": ("args", ()),
    "python scripts/bench_overhead.py --workloads gpt --modes eager --profile ours": ("args", ()),
    # docs/testing.md (the whole mutation check runs in tests/test_mutants.py, marked slow)
    "python scripts/mutants.py": ("args", ()),
    "python scripts/mutants.py --only resume-ignores-checkpoint ddp-scale-from-rank-zero-removed": (
        "args",
        (),
    ),
    "python scripts/mutants.py --list": ("args", ()),
    "python scripts/mutants.py --all": ("args", ()),
}

DOCUMENTED = sorted({strip_comment(c) for _, c in doc_commands()})


def _chained(command: str) -> bool:
    """Commands that use what an earlier command of their page made: test_docs_chains_run_as_typed runs
    them in the page's order."""
    return any(key in command for key in ("<float run>", "<qat-mixed run dir>", "my_run", "digits_float"))


def _params(kind: str) -> list:
    return [
        pytest.param(c, marks=m, id=c[:60]) for c, (k, m) in CHECKS.items() if k == kind and not _chained(c)
    ]


def test_every_documented_command_is_checked():
    assert sorted(set(DOCUMENTED) - set(CHECKS)) == [], "add each new docs command to CHECKS"
    assert sorted(set(CHECKS) - set(DOCUMENTED)) == [], "CHECKS lists commands the docs no longer show"


def test_ci_runs_the_readme_test_command():
    ci = (REPO / ".ci" / "run").read_text()
    assert "bash scripts/setup.sh && .venv/bin/python -m pytest" in ci


def _shell(command: str, cwd: Path, env: dict[str, str] | None = None, timeout: int = 600):
    """``command`` through bash in ``cwd`` with the project's executables first on PATH."""
    full = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", **(env or {})}
    return subprocess.run(
        ["bash", "-c", command], cwd=cwd, env=full, capture_output=True, text=True, timeout=timeout
    )


def _only_child(path: Path) -> Path:
    children = [p for p in path.iterdir() if p.is_dir()]
    assert len(children) == 1, children
    return children[0]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """An empty directory in which ``qat-train debug=fast`` has run exactly as the README shows it."""
    ws = tmp_path_factory.mktemp("docs")
    proc = _shell("qat-train debug=fast", ws)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return ws


@pytest.fixture(scope="module")
def readme_sweep(workspace) -> Path:
    """The README's sweep, exactly as written: no hydra.sweep.dir, the shipped defaults only."""
    command = next(c for c in CHECKS if c.startswith("qat-train -m quant=w8a8"))
    proc = _shell(command, workspace, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return _only_child(workspace / "multirun" / "digits_w4a4")


def test_readme_sweep_runs_as_typed(readme_sweep):
    members = sorted(p.name for p in readme_sweep.iterdir() if p.is_dir())
    assert members == ["0_quant=w8a8", "1_quant=w4a4", "2_quant=w2a2"]
    for m in members:
        assert '"status": "failed"' not in (readme_sweep / m / "metrics.json").read_text()


def _substitute(command: str, ws: Path, sweep: Path) -> str:
    """Placeholders of the docs -> the directories the earlier commands made in ``ws``."""
    run = _only_child(ws / "outputs" / "digits_w4a4")
    pairs = {
        "outputs/digits_w4a4/<time>": str(run),
        "outputs/...": str(run),
        "/tmp/exp": str(ws / "exp"),
        "multirun/sweep_digits_bits_methods/<time>": str(sweep),
        "multirun/sweep_digits_bits_methods/2026-01-01_12-00-00": str(sweep),
        "multirun/pytext_w4g32a8dyn/<time>": str(sweep),
        "multirun/a multirun/b": f"{sweep} {run}",
    }
    for old, new in pairs.items():
        command = command.replace(old, new)
    return command


@pytest.mark.parametrize("command", _params("run"))
def test_command_runs_as_typed(command, workspace, readme_sweep):
    if "submitit_local" in command:
        proc = _shell(command, workspace)
    else:
        proc = _shell(_substitute(command, workspace, readme_sweep), workspace)
    assert proc.returncode == 0, proc.stderr[-3000:]


@SLOW
def test_docs_chains_run_as_typed(tmp_path):
    """Commands that use what an earlier command of the same page made, run in the page's order."""
    float_run = "qat-train recipe=pytext_w4g32a8dyn debug=fast hydra.run.dir=outputs/pytext_float"
    steps = [
        (float_run, {}),
        (next(c for c in CHECKS if c.startswith("qat-mixed")), {"<float run>": "outputs/pytext_float"}),
        (next(c for c in CHECKS if "quant=mixed_w3" in c), {"<qat-mixed run dir>": "MIXED"}),
        ("qat-train recipe=digits_w4a4 hydra.run.dir=outputs/my_run", {}),
        ("qat-train recipe=digits_w4a4 hydra.run.dir=outputs/my_run resume=true", {}),
        ("qat-train recipe=digits_w4a4 hydra.run.dir=outputs/digits_float", {}),
        (next(c for c in CHECKS if "baseline.ckpt=outputs/digits_float" in c), {}),
        (
            "qat-report multirun/a multirun/b outputs/my_run --out reports/ab --x bits",
            {"multirun/a multirun/b": "outputs/digits_float outputs/pytext_float"},
        ),
    ]
    assert {c for c in CHECKS if _chained(c)} <= {c for c, _ in steps}, "a chained command is not run"
    for command, subs in steps:
        dry = {"QAT_DRY_RUN": "1"} if CHECKS.get(command, ("",))[0] == "dry" else {}
        for old, new in subs.items():
            if new == "MIXED":  # qat-mixed wrote quant/mixed_w3.yaml into its own run directory
                new = str(next((tmp_path / "outputs").glob("pytext_w4g32a8dyn/*/quant")).parent)
            command = command.replace(old, new)
        proc = _shell(command, tmp_path, env=dry)
        assert proc.returncode == 0, (command, proc.stderr[-3000:])
    assert (tmp_path / "reports" / "ab" / "report.csv").exists()


@pytest.mark.parametrize("command", _params("dry"))
def test_command_validates_as_typed(command, workspace, readme_sweep, tmp_path):
    proc = _shell(_substitute(command, workspace, readme_sweep), tmp_path, env={"QAT_DRY_RUN": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "dry run" in proc.stdout


@pytest.mark.parametrize("command", _params("compose"))
def test_cluster_command_composes(command):
    require("hydra_plugins.hydra_submitit_launcher", extra="sweeps")
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.utils import instantiate

    from qat.cli.train import CONFIG_DIR
    from qat.train.job import validate

    args = [a for a in shlex.split(command)[1:] if a != "-m"]
    parsed = OverridesParser.create().parse_overrides(args)
    choices = [
        [f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()] if o.is_sweep_override() else [a]
        for o, a in zip(parsed, args, strict=True)
    ]
    for overrides in itertools.product(*choices):
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = compose("train", overrides=[*overrides, "hydra.sweep.dir=/tmp/x"], return_hydra_config=True)
        validate(cfg)
        assert instantiate(cfg.hydra.launcher).params  # builds without a cluster; submits nothing


class _Parsed(Exception):
    pass


@pytest.mark.parametrize("command", _params("args"))
def test_script_command_line_parses(command, monkeypatch):
    words = [w for w in shlex.split(command) if "=" not in w or w.startswith("--")]
    assert words[0] == "python"
    script, argv = REPO / words[1], words[2:]
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise _Parsed(original(self, args, namespace))  # SystemExit(2) on an argument the script lacks

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    monkeypatch.setattr(sys, "argv", [str(script), *argv])
    monkeypatch.chdir(REPO)
    with pytest.raises(_Parsed):
        runpy.run_path(str(script), run_name="__main__")


@SLOW
def test_quick_start_on_a_fresh_copy(tmp_path):
    """The README's first command, as typed, in a copy of the repository's files (fresh set-up)."""
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    for f in files:
        src, dst = REPO / f, tmp_path / f
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_file():
            dst.write_bytes(src.read_bytes())
    command = next(c for c in CHECKS if c.endswith(".venv/bin/qat-train"))
    proc = subprocess.run(["bash", "-c", command], cwd=tmp_path, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list((tmp_path / "outputs" / "digits_w4a4").glob("*/metrics.json"))
