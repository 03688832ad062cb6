"""A run directory: the one place that says where ``qat-train`` puts each file, and how to reopen a run.

Layout (``paths.output_dir``)::

    config.yaml                   the resolved config          .hydra/config.yaml    Hydra's own record
    checkpoints/float/last.ckpt   float baseline (Lightning)   baseline.json         its test metrics
    checkpoints/qat/last.ckpt     QAT model with quantizer state
    logs/{float,qat}/             logger output (CSV by default)
    metrics.json                  before/after figures         export/               integer export
    eval.json                     qat-eval's table             ddp_consistency.json  the DDP check
    tokenizer/                    the data's Hugging Face tokenizer (when it has one: GGUF and
                                  compressed-tensors exports ship it)

``qat-export``, ``qat-eval`` and ``qat-report`` need nothing but the directory: the config comes from
``config.yaml`` (resolved, written by the job) and the weights with all quantizer state from the newest
checkpoint. Nothing here imports training code (:func:`load_run` imports what it builds when called).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

PHASES = ("float", "qat")  # in the order a run goes through them
CHECKPOINT_NAME = "last"
SPLITS = ("validation", "test")  # what Run.batches reads


class RunDirError(FileNotFoundError):
    """The directory is not a qat run (or misses the file that is needed)."""


def config_file(run_dir: str | Path) -> Path:
    return Path(run_dir) / "config.yaml"


def hydra_config_file(run_dir: str | Path) -> Path:
    return Path(run_dir) / ".hydra" / "config.yaml"


def metrics_file(run_dir: str | Path) -> Path:
    return Path(run_dir) / "metrics.json"


def baseline_file(run_dir: str | Path) -> Path:
    return Path(run_dir) / "baseline.json"


def eval_file(run_dir: str | Path) -> Path:
    return Path(run_dir) / "eval.json"


def export_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "export"


def consistency_file(run_dir: str | Path) -> Path:
    return Path(run_dir) / "ddp_consistency.json"


def tokenizer_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "tokenizer"


def log_dir(run_dir: str | Path, phase: str) -> Path:
    return Path(run_dir) / "logs" / phase


def checkpoint_file(run_dir: str | Path, phase: str) -> Path:
    """Where a phase's resumable checkpoint lives."""
    return Path(run_dir) / "checkpoints" / phase / f"{CHECKPOINT_NAME}.ckpt"


def phase_of(checkpoint: str | Path | None) -> str | None:
    """The phase of a checkpoint: its folder under ``<run>/checkpoints/``; "qat" for any other file."""
    if not checkpoint:
        return None
    parent = Path(checkpoint).parent.name
    return parent if parent in PHASES else "qat"


def run_of(checkpoint: str | Path) -> Path:
    """The run directory of ``<run>/checkpoints/<phase>/<file>``."""
    return Path(checkpoint).resolve().parent.parent.parent


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest checkpoint of a run: the QAT phase's if it has one, else the float phase's, else None.

    Phase order rather than file times decides, since the QAT phase only starts once the float phase ended.
    """
    for phase in reversed(PHASES):
        path = checkpoint_file(run_dir, phase)
        if path.exists():  # a file, or a directory of shards (trainer=fsdp)
            return path
    return None


@dataclass
class Run:
    path: Path
    cfg: Any  # the resolved DictConfig
    model: Any  # nn.Module, prepared when the run quantized, with its trained weights
    datamodule: Any
    task: str
    checkpoint: Path | None

    @property
    def tokenizer(self) -> Any:
        """The tokenizer the job saved (:func:`tokenizer_dir`), or None."""
        if not tokenizer_dir(self.path).is_dir():
            return None
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(tokenizer_dir(self.path), local_files_only=True)

    def batches(self, split: str, max_batches: int | None = None) -> list[Any]:
        """Up to ``max_batches`` batches (0 or None: all) of the ``validation`` or ``test`` split."""
        dm = self.datamodule
        dm.setup("fit" if split == "validation" else "test")
        loader = dm.val_dataloader() if split == "validation" else dm.test_dataloader()
        out = []
        for i, b in enumerate(loader):
            if max_batches and i >= max_batches:
                break
            out.append(b)
        return out


def load_run(run_dir: str | Path | None, checkpoint: str | Path | None = None) -> Run:
    """Rebuild the run's model (prepared when the run quantized) with its trained weights loaded.

    ``checkpoint``: one of the run's checkpoints (default: the newest); given alone, its run is the directory.
    """
    from hydra.utils import instantiate
    from omegaconf import DictConfig, OmegaConf

    from qat.calibrate import example_inputs
    from qat.config import quant_config_of
    from qat.quant.lora import LoRAConfig, add_lora, merge_lora
    from qat.rewrite import prepare
    from qat.train.resume import model_state

    if run_dir is None and checkpoint is None:
        raise RunDirError("run_dir: missing; pass run_dir=<a qat-train run directory> or ckpt=<checkpoint>")
    path = Path(run_dir) if run_dir is not None else run_of(str(checkpoint))
    if not config_file(path).exists():
        raise RunDirError(f"run_dir: {str(path)!r} has no config.yaml; pass a directory qat-train wrote")
    cfg = OmegaConf.load(config_file(path))
    assert isinstance(cfg, DictConfig)
    cfg.paths.output_dir = str(path)  # the run may have moved since
    model = instantiate(cfg.model)
    dm = instantiate(cfg.data)
    ckpt = Path(checkpoint) if checkpoint else latest_checkpoint(path)
    qcfg = quant_config_of(cfg.quant)
    if qcfg is not None and (ckpt is None or phase_of(ckpt) != "float"):
        # quant.fold_bn pairs convs with BatchNorms on a batch, as the job did
        prepare(model, qcfg, example_inputs=example_inputs(dm) if qcfg.fold_bn else None)
    lora = LoRAConfig.from_dict(cfg.get("lora"))
    if lora.trains(cfg.mode) and ckpt is not None and phase_of(ckpt) == "qat":
        add_lora(model, lora)  # the checkpoint holds the adapters, merged below
    if ckpt is not None:
        model.load_state_dict(model_state(ckpt))  # a file, or a sharded directory (trainer=fsdp)
    merge_lora(model)
    model.eval()
    return Run(path, cfg, model, dm, str(cfg.task), ckpt)
