"""The main job behind ``qat-train``: float baseline -> prepare/calibrate -> QAT or PTQ -> metrics -> export.

Run directory layout (``paths.output_dir``)::

    config.yaml                 the resolved config             .hydra/  Hydra's own record
    checkpoints/float/last.ckpt float baseline (Lightning)     baseline.json   its test metrics
    checkpoints/qat/last.ckpt   QAT model with quantizer state
    logs/{float,qat}/           logger output (CSV by default)
    metrics.json                before/after figures           export/         integer export
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from qat.calibrate import batch_inputs, calibrate
from qat.config import QuantConfig
from qat.io import write_json_atomic, write_text_atomic
from qat.rewrite import prepare
from qat.size import float_size_bytes, quantized_size_bytes
from qat.train.checks import JobConfigError, validate_data
from qat.train.consistency import DDPConsistencyCheck
from qat.train.guards import NonFiniteLossGuard, SigtermCheckpoint
from qat.train.module import PRIMARY_METRIC, QATModule
from qat.train.monitor import ConfigInCheckpoint, ProgressBar
from qat.train.resume import ExactResume, checkpoint_file, find_resume_checkpoint, phase_checkpoints
from qat.train.schedule import QATSchedule

log = logging.getLogger(__name__)

MODES = ("qat", "ptq")
# Logger classes and the keyword that separates the float and QAT phases inside one run directory.
_PHASE_KWARG = {"CSVLogger": "version", "TensorBoardLogger": "version", "MLFlowLogger": "run_name"}


def validate(cfg: DictConfig) -> None:
    """Fail fast on top-level values Hydra cannot check by itself."""
    if cfg.mode not in MODES:
        raise JobConfigError(f"mode: {cfg.mode!r} is not valid; allowed: {', '.join(MODES)}")
    if cfg.task not in PRIMARY_METRIC:
        raise JobConfigError(f"task: {cfg.task!r} is not valid; allowed: {', '.join(PRIMARY_METRIC)}")
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
    q = OmegaConf.to_container(cfg.quant, resolve=True)
    assert isinstance(q, dict)
    if q.get("weight") is None and q.get("activation") is None:
        return None
    return QuantConfig.from_dict(q)


def example_inputs(dm: Any) -> Any:
    """The inputs of the first calibration batch: ``quant.fold_bn`` pairs convs with BatchNorms on them."""
    dm.setup("fit")
    with torch.random.fork_rng(devices=[]):  # a loader draws a seed: keep the run's random stream as it was
        batch = next(iter(dm.calibration_dataloader()))
    return batch_inputs(batch)


def build_trainer(cfg: DictConfig, phase: str, out: Path, callbacks: list[L.Callback], **overrides: Any):
    """A Lightning Trainer from ``cfg.trainer`` with this phase's checkpoints and logger version."""
    loggers = []
    for lconf in (cfg.logger or {}).values():
        cls_name = str(lconf["_target_"]).rsplit(".", 1)[-1]
        kw = {_PHASE_KWARG[cls_name]: phase} if cls_name in _PHASE_KWARG else {}
        loggers.append(instantiate(lconf, **kw))
    # Resumability and safety (qat.train.resume / guards): last.ckpt at each epoch end and every N steps, the
    # data order and RNG state in it, a stop on a non-finite loss, a checkpoint on SIGTERM.
    ckpt_file = checkpoint_file(out, phase)
    cbs = [
        *phase_checkpoints(ckpt_file.parent, int(cfg.checkpoint.every_n_train_steps)),
        ExactResume(int(cfg.seed)),
        NonFiniteLossGuard(ckpt_file, int(cfg.checkpoint.nonfinite_check_every_n_steps)),
        SigtermCheckpoint(ckpt_file),
        *callbacks,
        ConfigInCheckpoint(OmegaConf.to_container(cfg, resolve=True)),
    ]
    cbs += [instantiate(c) for c in (cfg.get("callbacks") or {}).values()]  # configs/callbacks/
    try:
        import rich  # noqa: F401

        cbs.append(ProgressBar(leave=True))
    except ImportError:
        pass
    return instantiate(
        cfg.trainer, callbacks=cbs, logger=loggers or False, default_root_dir=str(out), **overrides
    )


def evaluate(trainer: L.Trainer, module: QATModule, datamodule: L.LightningDataModule) -> dict[str, float]:
    """Test-set metrics as ``{"acc": ..., "loss": ...}`` (or ``ppl``)."""
    results = trainer.test(module, datamodule=datamodule, verbose=False)
    return {k.split("/", 1)[1]: float(v) for k, v in results[0].items()}


def _module(
    cfg: DictConfig, model: nn.Module, dm: Any, lr: float | None = None, **kw: Any
) -> L.LightningModule:
    factory = instantiate(cfg.optim.optimizer)
    if lr is not None:
        factory = functools.partial(factory, lr=float(lr))
    if cfg.task == "embed_distill":
        from qat.train.embed import EmbedDistillModule

        return EmbedDistillModule(
            model,
            teacher=kw["teacher"],
            optimizer=factory,
            scale_lr_mult=float(cfg.optim.scale_lr_mult),
            scheduler=str(cfg.optim.scheduler),
            warmup_steps=int(cfg.optim.warmup_steps),
            distill=kw.get("distill"),
        )
    return QATModule(
        model,
        task=cfg.task,
        optimizer=factory,
        scale_lr_mult=float(cfg.optim.scale_lr_mult),
        scheduler=str(cfg.optim.scheduler),
        warmup_steps=int(cfg.optim.warmup_steps),
        num_classes=getattr(dm, "num_classes", None),
        vocab_size=getattr(dm, "vocab_size", None),
        **kw,
    )


def _load_weights(model: nn.Module, path: str) -> None:
    """Float weights from a Lightning checkpoint (``model.`` prefix) or a safetensors state dict."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        sd = load_file(path)
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
        sd = {k[len("model.") :]: v for k, v in sd.items() if k.startswith("model.")}
    model.load_state_dict(sd)


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def _phase_of(ckpt_path: str | None) -> str | None:
    """'float' or 'qat' for a checkpoint under <run>/checkpoints/<phase>/, else None."""
    if not ckpt_path:
        return None
    parent = Path(ckpt_path).parent.name
    return parent if parent in ("float", "qat") else "qat"


def resume_checkpoint(cfg: DictConfig) -> str | None:
    """The checkpoint this run continues from: ``ckpt_path``, or with ``resume=true`` the newest one in
    ``paths.output_dir`` (None: nothing to resume, the run starts from scratch, so one command serves both
    the first start and every restart of a pre-empted job)."""
    if cfg.ckpt_path:
        if not Path(cfg.ckpt_path).is_file():
            raise JobConfigError(
                f"ckpt_path: {str(cfg.ckpt_path)!r} does not exist; allowed: a checkpoint file "
                "<run>/checkpoints/{float,qat}/last.ckpt, or null (use resume=true to pick the newest)"
            )
        return str(cfg.ckpt_path)
    if not cfg.get("resume", False):
        return None
    found = find_resume_checkpoint(cfg.paths.output_dir)
    if found is None:
        log.warning(
            "resume=true: no checkpoint under %s/checkpoints, starting from scratch "
            "(to continue a run, pass hydra.run.dir=<that run's directory>)",
            cfg.paths.output_dir,
        )
        return None
    log.info("resume=true: continuing from %s", found)
    return str(found)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Execute the whole job and return the metrics dict that is also written to ``metrics.json``."""
    validate(cfg)
    t0 = time.time()
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    L.seed_everything(int(cfg.seed), workers=True)
    qcfg = quant_config(cfg)
    metric, higher = PRIMARY_METRIC[cfg.task]

    # Splits load, model sizes left null come from the data and one batch runs through the model, so data,
    # shape and dtype errors come now, in one line, before any training.
    dm, model = validate_data(cfg)
    # The resolved config (with those sizes) travels with the run: export/eval/report need only the directory.
    write_text_atomic(out / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    if qcfg is not None:
        # A config that only fails against this model's layers (a group size that does not divide one, a
        # glob matching nothing) fails now on a throwaway copy, not after the float phase.
        sample = example_inputs(dm) if qcfg.fold_bn else None
        prepare(copy.deepcopy(model), qcfg, example_inputs=sample)
    if cfg.get("dry_run"):
        resume_checkpoint(cfg)  # a ckpt_path that does not exist fails here too
        print(f"dry run: config, data and one batch through {type(model).__name__} checked; nothing trained")
        return {"dry_run": True}
    # embed_distill: the student learns to match its own float version, which is both the teacher and the
    # baseline (cosine 1.0 by definition), so there is no float training.
    embed = cfg.task == "embed_distill"
    teacher = copy.deepcopy(model) if embed else None
    ckpt_path = resume_checkpoint(cfg)
    resume_phase = _phase_of(ckpt_path)
    resume_run = Path(ckpt_path).parent.parent.parent if ckpt_path else None

    # 1. Float baseline: trained here, loaded from baseline.ckpt, or taken from the run being resumed.
    baseline_json = out / "baseline.json"
    if resume_phase == "qat" and resume_run is not None and (resume_run / "baseline.json").exists():
        _load_weights(model, str(resume_run / "checkpoints" / "float" / "last.ckpt"))
        baseline = json.loads((resume_run / "baseline.json").read_text())
        write_json_atomic(baseline_json, baseline)
        float_trainer = build_trainer(cfg, "float", out, [], max_epochs=0)
    else:
        if cfg.baseline.ckpt:
            _load_weights(model, str(cfg.baseline.ckpt))
        float_module = _module(cfg, model, dm, lr=cfg.baseline.lr, teacher=teacher)
        float_epochs = 0 if embed else int(cfg.baseline.max_epochs)
        float_trainer = build_trainer(cfg, "float", out, [], max_epochs=float_epochs)
        if float_epochs > 0:
            resume = ckpt_path if resume_phase == "float" else None
            float_trainer.fit(float_module, datamodule=dm, ckpt_path=resume, weights_only=True)
        baseline = evaluate(float_trainer, float_module, dm)
        write_json_atomic(baseline_json, baseline)
    size_float = float_size_bytes(model)

    # 2. Quantize: prepare, calibrate, then QAT or PTQ. Reseeding makes this phase independent of how the
    # float phase went (trained in this process, resumed half-way, or skipped), so resumes are exact.
    L.seed_everything(int(cfg.seed), workers=True)
    if not embed:
        teacher = copy.deepcopy(model) if cfg.distill and qcfg is not None and cfg.mode == "qat" else None
    if qcfg is None:
        quantized, size_q, report = dict(baseline), size_float, None
    else:
        prepare(model, qcfg, example_inputs=sample)
        report = str(model.qat_report)
        dm.setup("fit")
        if resume_phase != "qat":
            calibrate(model, dm.calibration_dataloader(), int(cfg.calibration.batches))
        qmodule = _module(cfg, model, dm, teacher=teacher, distill=_plain(cfg.distill))
        schedule: QATSchedule = instantiate(cfg.schedule)
        if cfg.mode == "ptq":
            schedule.apply(model, step=10**9)  # the end state: fake quant on, observers frozen
            qat_trainer = build_trainer(cfg, "qat", out, [], max_epochs=0)
        else:
            check = DDPConsistencyCheck(out / "ddp_consistency.json")
            qat_trainer = build_trainer(cfg, "qat", out, [schedule, check])
            qat_trainer.fit(
                qmodule,
                datamodule=dm,
                ckpt_path=ckpt_path if resume_phase == "qat" else None,
                weights_only=True,
            )
        quantized = evaluate(qat_trainer, qmodule, dm)
        size_q = quantized_size_bytes(model)

    # 3. Export to integer weights, verified against the fake-quant model (raises if they disagree).
    exported = None
    if (
        qcfg is not None
        and cfg.export.enabled
        and float_trainer.is_global_zero
        and cfg.task in ("classification", "lm")
    ):
        from qat.deploy import export

        rep = export(
            model,
            out / "export",
            batches=dm.val_dataloader(),
            task=cfg.task,
            max_batches=cfg.export.get("max_batches"),
            formats=list(cfg.export.get("formats", ["safetensors"])),
        )
        print(rep.summary())
        exported = {
            "bytes": rep.exported_bytes,  # the tensor payload: equal to size_bytes.quantized (qat.size)
            "file_bytes": rep.file_bytes,
            "ratio": rep.ratio,
            "verification": rep.verification,
        }

    metrics: dict[str, Any] = {
        "primary_metric": metric,
        "higher_is_better": higher,
        "baseline": baseline,
        "quantized": quantized,
        "size_bytes": {"baseline": int(size_float), "quantized": int(size_q)},
        "export": exported,
        "mode": cfg.mode if qcfg is not None else "float",
        "quant": str(cfg.quant.get("name", "custom")),
        "wall_time_s": round(time.time() - t0, 2),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    if float_trainer.is_global_zero:
        write_json_atomic(out / "metrics.json", metrics)
        print_summary(metrics, report)
    return metrics


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
