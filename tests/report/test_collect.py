"""Finding runs, reading them into records (finished, failed, running) and recording a failure."""

from __future__ import annotations

import json

import pytest

from qat.report.collect import ReportError, collect, find_runs, method_of, record_failure


def test_finds_every_run_in_natural_order_with_its_status(sweep):
    records = collect([sweep])
    assert [r.path.name.split("_")[0] for r in records] == ["0", "1", "2", "10"]
    assert [r.status for r in records] == ["ok", "ok", "failed", "running"]
    # The override every member shares (debug=fast) is dropped from the names.
    assert [r.name for r in records] == ["0_quant=w8a8", "1_quant=w4a4", "2_quant=w4g7", "10_quant=w2a2"]


def test_finished_run_figures(sweep):
    r8, r4, failed, running = collect([sweep])
    assert r8.metric == "acc" and r8.quantized == 0.94 and r8.baseline == 0.95
    assert r8.delta == pytest.approx(-0.01)
    assert (r8.w_bits, r8.a_bits, r8.method) == (8.0, 8.0, "qat lsq")
    assert r8.size_bytes == 2500 and r8.size_source == "metrics" and r8.ratio == pytest.approx(3.2)
    assert r8.bits_per_param == pytest.approx(10.0)
    assert r8.latency_ms is None
    # The export report (same definition as metrics.json, written later) wins; eval.json gives the latency.
    assert r4.size_bytes == 1400 and r4.size_source == "export" and r4.latency_ms == 2.5
    assert r4.file_bytes == 1500 and r8.file_bytes is None
    assert failed.error == "ValueError: boom" and failed.quantized is None and failed.ratio is None
    assert running.quantized is None and running.w_bits == 2.0 and running.label == "qat lsq W2A2"


def test_a_single_run_directory_is_a_run(tmp_path, make_run):
    run = make_run(tmp_path / "outputs" / "digits", value=0.5)
    records = collect([run])
    assert len(records) == 1 and records[0].name == "digits" and records[0].quantized == 0.5


def test_several_paths_prefix_names_with_their_folder(tmp_path, make_run):
    make_run(tmp_path / "a" / "0_quant=w8a8")
    make_run(tmp_path / "b" / "0_quant=w8a8")
    names = [r.name for r in collect([tmp_path / "a", tmp_path / "b"])]
    assert names == ["a/0_quant=w8a8", "b/0_quant=w8a8"]


def test_missing_and_empty_directories_are_clear_errors(tmp_path):
    with pytest.raises(ReportError, match="does not exist"):
        find_runs([tmp_path / "nope"])
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(ReportError, match="no runs under"):
        find_runs([tmp_path / "empty"])
    with pytest.raises(ReportError, match="none given"):
        find_runs([])


def test_half_written_metrics_json_reads_as_running(tmp_path, make_run):
    run = make_run(tmp_path / "r", status="running")
    (run / "metrics.json").write_text('{"primary_metric": "ac')  # a writer that is not atomic, mid-write
    (rec,) = collect([run])
    assert rec.status == "running"


@pytest.mark.parametrize(
    ("config", "mode", "expected"),
    [
        ({"quant": {"weight": None, "activation": None}}, None, "float"),
        ({"mode": "qat", "quant": {"weight": {"format": "int4", "scale": "lsq"}}}, None, "qat lsq"),
        ({"mode": "ptq", "quant": {"weight": {"format": "int4"}}}, None, "ptq minmax"),  # the default scale
        ({"quant": {"weight": {"format": "int4", "scale": "mse"}}}, "ptq", "ptq mse"),
        ({"quant": {"weight": {"format": "int8"}}, "distill": {"weight": 0.5}}, "qat", "qat minmax+kd"),
        ({"quant": {"weight": {"format": "int8"}}, "distill": {"weight": 0.5}}, "ptq", "ptq minmax"),
        (
            {"quant": {"weight": None, "activation": {"format": "int8", "dynamic": True}}},
            "qat",
            "qat dynamic",
        ),
    ],
)
def test_method_names(config, mode, expected):
    assert method_of(config, mode) == expected


def test_record_failure_keeps_figures_and_marks_failed(tmp_path, make_run):
    run = make_run(tmp_path / "r", value=0.7)
    try:
        raise RuntimeError("export failed\nsecond line")
    except RuntimeError as e:
        record_failure(run, e)
    data = json.loads((run / "metrics.json").read_text())
    assert data["status"] == "failed" and data["error"] == "RuntimeError: export failed"
    assert data["quantized"]["acc"] == 0.7 and "RuntimeError" in data["traceback"]
    (rec,) = collect([run])
    assert rec.status == "failed" and rec.quantized == 0.7


def test_record_failure_before_any_metrics_saves_config_and_metric(tmp_path):
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(
        {"task": "lm", "quant": {"name": "w4g7", "weight": {"format": "int4"}}, "x": "${task}"}
    )
    record_failure(tmp_path, ValueError("bad group size"), cfg)
    data = json.loads((tmp_path / "metrics.json").read_text())
    assert data["primary_metric"] == "ppl" and data["higher_is_better"] is False
    assert data["config"]["x"] == "lm" and data["quant"] == "w4g7"
    (rec,) = collect([tmp_path])
    assert rec.status == "failed" and rec.metric == "ppl" and rec.quantized is None
    assert rec.delta is None and rec.higher_is_better is False
