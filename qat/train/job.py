"""The main job behind ``qat-train``, in three phases: float baseline -> quantize (prepare, calibrate, QAT or
PTQ) -> export; then ``metrics.json``. What goes where in the run directory (``paths.output_dir``):
:mod:`qat.runs`.
"""

from __future__ import annotations

import copy
import functools
import itertools
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from qat import runs
from qat.calibrate import calibrate, example_inputs
from qat.config import QuantConfig, quant_config_of
from qat.io import write_json_atomic, write_text_atomic
from qat.quant.lora import LoRAConfig, add_lora, merge_lora
from qat.rewrite import prepare
from qat.size import float_size_bytes, quantized_size_bytes
from qat.tasks import TASKS, Task
from qat.train.checks import JobConfigError, validate_data
from qat.train.consistency import DDPConsistencyCheck
from qat.train.distill import DistillConfig
from qat.train.guards import NonFiniteLossGuard, SigtermCheckpoint
from qat.train.module import TaskModule
from qat.train.monitor import ConfigInCheckpoint, ProgressBar
from qat.train.resume import ExactResume, model_state, phase_checkpoints, resume_checkpoint
from qat.train.schedule import QATSchedule

log = logging.getLogger(__name__)

MODES = ("qat", "ptq")
# Logger classes and the keyword that separates the float and QAT phases inside one run directory.
_PHASE_KWARG = {"CSVLogger": "version", "TensorBoardLogger": "version", "MLFlowLogger": "run_name"}


def validate(cfg: DictConfig) -> None:
    """Fail fast on top-level values Hydra cannot check by itself."""
    if cfg.mode not in MODES:
        raise JobConfigError(f"mode: {cfg.mode!r} is not valid; allowed: {', '.join(MODES)}")
    if cfg.task not in TASKS:
        raise JobConfigError(f"task: {cfg.task!r} is not valid; allowed: {', '.join(TASKS)}")
    if int(cfg.baseline.max_epochs) < 0:
        raise JobConfigError(f"baseline.max_epochs: {cfg.baseline.max_epochs!r} is not valid; allowed: >= 0")
    if int(cfg.calibration.batches) < 0:
        raise JobConfigError(f"calibration.batches: {cfg.calibration.batches!r} is not valid; allowed: >= 0")
    if not isinstance(cfg.get("resume", False), bool):
        raise JobConfigError(f"resume: {cfg.resume!r} is not valid; allowed: true, false")
    for key in ("every_n_train_steps", "nonfinite_check_every_n_steps"):
        value, low = cfg.checkpoint[key], 0 if key == "every_n_train_steps" else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise JobConfigError(f"checkpoint.{key}: {value!r} is not valid; allowed: an integer >= {low}")
    quant_config(cfg)  # raises QuantConfigError naming the key
    lora_config(cfg)  # raises JobConfigError naming the key
    DistillConfig.from_dict(_plain(cfg.distill), cfg.task)
    if cfg.baseline.ckpt and not Path(str(cfg.baseline.ckpt)).is_file():
        raise JobConfigError(
            f"baseline.ckpt: {str(cfg.baseline.ckpt)!r} does not exist; allowed: a float checkpoint "
            "(<run>/checkpoints/float/last.ckpt or a .safetensors state dict), or null"
        )
    # Objects built only after the float phase (the schedule) or per phase (callbacks) are built once here,
    # so their one-line errors come before any training, without Hydra's wrapping.
    nodes = [("schedule", cfg.schedule), *((f"callbacks.{k}", v) for k, v in (cfg.callbacks or {}).items())]
    for key, node in nodes:
        try:
            instantiate(node)
        except InstantiationException as e:
            cause = e.__cause__
            if isinstance(cause, (ValueError, TypeError)) and ": " in str(cause):
                raise JobConfigError(str(cause)) from None
            raise JobConfigError(f"{key}: {e}".replace("\n", " ")) from None


def quant_config(cfg: DictConfig) -> QuantConfig | None:
    """The run's QuantConfig, or None for a float-only run (``quant=fp32``)."""
    return quant_config_of(cfg.quant)


def lora_config(cfg: DictConfig) -> LoRAConfig:
    """The run's ``lora`` node (rank 0: off); a bad value is a JobConfigError naming the key."""
    try:
        return LoRAConfig.from_dict(_plain(cfg.get("lora")))
    except ValueError as e:
        raise JobConfigError(str(e)) from None


def build_trainer(cfg: DictConfig, phase: str, out: Path, callbacks: list[L.Callback], **overrides: Any):
    """A Lightning Trainer from ``cfg.trainer`` with this phase's checkpoints and logger version."""
    loggers = []
    for lconf in (cfg.logger or {}).values():
        cls_name = str(lconf["_target_"]).rsplit(".", 1)[-1]
        kw = {_PHASE_KWARG[cls_name]: phase} if cls_name in _PHASE_KWARG else {}
        loggers.append(instantiate(lconf, **kw))
    # Resumability and safety (qat.train.resume / guards): last.ckpt at each epoch end and every N steps, the
    # data order and RNG state in it, a stop on a non-finite loss, a checkpoint on SIGTERM.
    ckpt_file = runs.checkpoint_file(out, phase)
    cbs = [
        *phase_checkpoints(ckpt_file.parent, int(cfg.checkpoint.every_n_train_steps)),
        ExactResume(int(cfg.seed)),
        NonFiniteLossGuard(ckpt_file, int(cfg.checkpoint.nonfinite_check_every_n_steps)),
        SigtermCheckpoint(ckpt_file),
        *callbacks,
        ConfigInCheckpoint(OmegaConf.to_container(cfg, resolve=True)),
    ]
    cbs += [instantiate(c) for c in (cfg.get("callbacks") or {}).values()]  # qat/conf/callbacks/
    try:
        import rich  # noqa: F401

        cbs.append(ProgressBar(leave=True))
    except ImportError:
        pass
    return instantiate(
        cfg.trainer, callbacks=cbs, logger=loggers or False, default_root_dir=str(out), **overrides
    )


def evaluate(trainer: L.Trainer, module: TaskModule, datamodule: L.LightningDataModule) -> dict[str, float]:
    """Test-set metrics as ``{"loss": ..., <task metrics>}``, e.g. ``{"loss": ..., "acc": ...}``, and the same
    on the validation split as ``val_<name>``: what ``qat-train`` returns to a sweeper (Optuna), so a search
    never selects on the test split."""
    results = trainer.test(module, datamodule=datamodule, verbose=False)[0]
    results.update(trainer.validate(module, datamodule=datamodule, verbose=False)[0])
    return {
        k.split("/", 1)[1] if k.startswith("test/") else k.replace("/", "_", 1): float(v)
        for k, v in results.items()
    }


def _module(cfg: DictConfig, model: nn.Module, dm: Any, lr: float | None = None, **kw: Any) -> TaskModule:
    """The task's LightningModule with the run's optimizer settings; ``kw``: ``teacher``, ``distill``."""
    factory = instantiate(cfg.optim.optimizer)
    if lr is not None:
        factory = functools.partial(factory, lr=float(lr))
    cls = get_class(TASKS[cfg.task].module)
    return cls(
        model,
        task=cfg.task,
        optimizer=factory,
        scale_lr_mult=float(cfg.optim.scale_lr_mult),
        scheduler=str(cfg.optim.scheduler),
        warmup_steps=int(cfg.optim.warmup_steps),
        compile=bool(cfg.compile),
        **cls.data_kwargs(dm),
        **kw,
    )


def _load_weights(model: nn.Module, path: str) -> None:
    """Float weights from a Lightning checkpoint (``model.`` prefix) or a safetensors state dict."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        sd = load_file(path)
    else:
        sd = model_state(path)  # a file, or a sharded directory (trainer=fsdp)
    model.load_state_dict(sd)


@dataclass
class Job:
    """What the phases of one run share."""

    cfg: DictConfig
    out: Path
    task: Task
    qcfg: QuantConfig | None
    distill: DistillConfig
    lora: LoRAConfig
    dm: Any
    model: nn.Module
    sample: Any  # example inputs for quant.fold_bn (pairs convs with BatchNorms), else None
    ckpt_path: str | None = None  # the checkpoint this run continues from

    @property
    def resume_phase(self) -> str | None:
        return runs.phase_of(self.ckpt_path)


def setup(cfg: DictConfig) -> Job:
    """Every check that can fail before training: the config, the data (splits load, model sizes left null
    come from the data, one batch runs through the model) and the quant config against this model's layers
    (on a throwaway copy: a group size that does not divide one, a glob matching nothing). Writes the
    resolved config (with those sizes): export/eval/report need only the run directory."""
    validate(cfg)
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    L.seed_everything(int(cfg.seed), workers=True)
    qcfg = quant_config(cfg)
    dm, model = validate_data(cfg)
    write_text_atomic(runs.config_file(out), OmegaConf.to_yaml(cfg, resolve=True))
    if hasattr(getattr(dm, "tokenizer", None), "save_pretrained"):  # for exports that ship the tokenizer
        dm.tokenizer.save_pretrained(runs.tokenizer_dir(out))
    sample = example_inputs(dm) if qcfg is not None and qcfg.fold_bn else None
    if qcfg is not None:
        prepare(copy.deepcopy(model), qcfg, example_inputs=sample)
    distill = DistillConfig.from_dict(_plain(cfg.distill), cfg.task)
    return Job(cfg, out, TASKS[cfg.task], qcfg, distill, lora_config(cfg), dm, model, sample)


def float_phase(job: Job, teacher: nn.Module | None) -> tuple[dict[str, float], L.Trainer]:
    """The float baseline and its test metrics (``baseline.json``): taken from the run being resumed, or
    loaded from ``baseline.ckpt`` and/or trained here (a self-distilling task's baseline is its teacher:
    no training)."""
    cfg, out, dm = job.cfg, job.out, job.dm
    resume_run = runs.run_of(job.ckpt_path) if job.ckpt_path else None
    if job.resume_phase == "qat" and resume_run is not None and runs.baseline_file(resume_run).exists():
        if not job.task.self_distill:  # a self-distilling run trains no float model (no float checkpoint)
            _load_weights(job.model, str(runs.checkpoint_file(resume_run, "float")))
        elif cfg.baseline.ckpt:
            _load_weights(job.model, str(cfg.baseline.ckpt))
        baseline = json.loads(runs.baseline_file(resume_run).read_text())
        write_json_atomic(runs.baseline_file(out), baseline)
        return baseline, build_trainer(cfg, "float", out, [], max_epochs=0)
    if cfg.baseline.ckpt:
        _load_weights(job.model, str(cfg.baseline.ckpt))
    module = _module(cfg, job.model, dm, lr=cfg.baseline.lr, teacher=teacher)
    epochs = 0 if job.task.self_distill else int(cfg.baseline.max_epochs)
    trainer = build_trainer(cfg, "float", out, [], max_epochs=epochs)
    if epochs > 0:
        resume = job.ckpt_path if job.resume_phase == "float" else None
        trainer.fit(module, datamodule=dm, ckpt_path=resume, weights_only=True)
    baseline = evaluate(trainer, module, dm)
    write_json_atomic(runs.baseline_file(out), baseline)
    return baseline, trainer


def quantize_phase(job: Job, teacher: nn.Module | None) -> tuple[dict[str, float], str]:
    """Prepare, calibrate (unless resuming QAT), then QAT or PTQ: the test metrics and the layer report."""
    cfg, model, dm = job.cfg, job.model, job.dm
    assert job.qcfg is not None
    prepare(model, job.qcfg, example_inputs=job.sample)
    report = str(model.qat_report)
    dm.setup("fit")
    if job.resume_phase != "qat":
        calibrate(model, dm.calibration_dataloader(), int(cfg.calibration.batches))
    if job.lora.trains(cfg.mode):
        log.info("QAT-LoRA rank %d on %d layers", job.lora.rank, len(add_lora(model, job.lora)))
    module = _module(cfg, model, dm, teacher=teacher, distill=job.distill)
    schedule: QATSchedule = instantiate(cfg.schedule)
    if cfg.mode == "ptq":
        schedule.apply(model, step=10**9)  # the end state: fake quant on, observers frozen
        trainer = build_trainer(cfg, "qat", job.out, [], max_epochs=0)
    else:
        check = DDPConsistencyCheck(runs.consistency_file(job.out))
        trainer = build_trainer(cfg, "qat", job.out, [schedule, check])
        resume = job.ckpt_path if job.resume_phase == "qat" else None
        trainer.fit(module, datamodule=dm, ckpt_path=resume, weights_only=True)
        merge_lora(model)  # the adapters into the weights: what is evaluated and exported
    return evaluate(trainer, module, dm), report


def export_phase(job: Job, float_model: nn.Module) -> dict[str, Any]:
    """Integer weights under ``export/``, verified against the fake-quant model (raises if they disagree),
    then the before/after table of ``float_model``, the fake-quant model and every target written."""
    from qat.deploy import export
    from qat.deploy.evaluate import compare, format_table

    cfg, out = job.cfg, runs.export_dir(job.out)
    batches = list(itertools.islice(job.dm.val_dataloader(), cfg.export.max_batches or None))
    rep = export(
        job.model,
        out,
        batches=batches,
        task=cfg.task,
        targets=list(cfg.export.targets),
        tokenizer=getattr(job.dm, "tokenizer", None),
    )
    print(rep.summary())
    rows = []
    if cfg.export.latency and cfg.export.repeats > 0:
        rows = compare(float_model, job.model, out, batches, cfg.task, tuple(cfg.export.latency),
                       warmup=2, repeats=int(cfg.export.repeats))  # fmt: skip
        print(format_table(rows, cfg.task))
    return {
        "bytes": rep.exported_bytes,  # the tensor payload: equal to size_bytes.quantized (qat.size)
        "file_bytes": rep.file_bytes,
        "ratio": rep.ratio,
        "verification": rep.verification,
        "table": [r.to_dict() for r in rows],
    }


def run(cfg: DictConfig) -> dict[str, Any]:
    """Execute the whole job and return the metrics dict that is also written to ``metrics.json``."""
    t0 = time.time()
    job = setup(cfg)
    if cfg.get("dry_run"):
        resume_checkpoint(cfg)  # a ckpt_path that does not exist fails here too
        print(
            f"dry run: config, data and one batch through {type(job.model).__name__} checked; nothing trained"
        )
        return {"dry_run": True}
    job.ckpt_path = resume_checkpoint(cfg)
    # A self-distilling task learns to match its own float version, which is both teacher and baseline.
    teacher = copy.deepcopy(job.model) if job.task.self_distill else None
    baseline, float_trainer = float_phase(job, teacher)
    size_float = float_size_bytes(job.model)
    # Reseeding makes the quantize phase independent of how the float phase went (trained in this process,
    # resumed half-way, or skipped), so resumes are exact.
    L.seed_everything(int(cfg.seed), workers=True)
    quantized, size_q, report = dict(baseline), size_float, None
    exporting = (
        job.qcfg is not None and cfg.export.enabled and float_trainer.is_global_zero and job.task.verify
    )
    float_model = copy.deepcopy(job.model) if exporting else None  # the "before" of the export's table
    if job.qcfg is not None:
        if not job.task.self_distill and job.distill.weight > 0 and cfg.mode == "qat":
            teacher = copy.deepcopy(job.model)  # the float baseline
        quantized, report = quantize_phase(job, teacher)
        size_q = quantized_size_bytes(job.model)
    exported = export_phase(job, float_model) if float_model is not None else None
    metrics: dict[str, Any] = {
        "primary_metric": job.task.metric,
        "higher_is_better": job.task.higher_is_better,
        "baseline": baseline,
        "quantized": quantized,
        "size_bytes": {"baseline": int(size_float), "quantized": int(size_q)},
        "export": exported,
        "mode": cfg.mode if job.qcfg is not None else "float",
        "lora_rank": job.lora.rank,
        "quant": str(cfg.quant.get("name", "custom")),
        "wall_time_s": round(time.time() - t0, 2),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    if float_trainer.is_global_zero:
        write_json_atomic(runs.metrics_file(job.out), metrics)
        print_summary(metrics, report)
    return metrics


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def print_summary(metrics: dict[str, Any], report: str | None) -> None:
    """The before/after table users look for at the end of a run."""
    m = metrics["primary_metric"]
    b, q = metrics["baseline"], metrics["quantized"]
    sb, sq = metrics["size_bytes"]["baseline"], metrics["size_bytes"]["quantized"]
    if report:
        print("\nQuantized layers:\n" + report)
    label = f"quantized ({metrics['quant']}, {metrics['mode']})"
    print(f"\n{'':28s} {m:>10s} {'loss':>10s} {'size (bytes)':>14s}")
    print(
        f"{'float baseline':28s} {b.get(m, float('nan')):10.4f} {b.get('loss', float('nan')):10.4f} {sb:14,d}"
    )
    print(f"{label:28s} {q.get(m, float('nan')):10.4f} {q.get('loss', float('nan')):10.4f} {sq:14,d}")
    print(f"size ratio {sb / max(sq, 1):.2f}x, wall time {metrics['wall_time_s']:.1f}s")
    exp = metrics.get("export")
    if exp:
        v = exp.get("verification") or {}
        agree = f", top-1 agreement with fake quant {100 * v['top1_agreement']:.2f}%" if v else ""
        print(
            f"exported integer model: {exp['bytes']:,} bytes of tensors, file {exp['file_bytes']:,} bytes "
            f"({exp['ratio']:.2f}x smaller){agree}"
        )
    print()
