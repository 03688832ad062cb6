"""Pareto front maths, and both figures written as real PNGs (and skipped when there is nothing to draw)."""

from __future__ import annotations

import pytest

from qat.report.collect import collect
from qat.report.plots import curves_plot, pareto_front, pareto_plot, read_curve

PNG = b"\x89PNG\r\n\x1a\n"


def test_pareto_front_higher_is_better():
    pts = [(1.0, 0.5), (2.0, 0.9), (3.0, 0.8), (4.0, 0.95), (2.0, 0.7), (5.0, 0.95)]
    # (3, .8) is beaten by (2, .9); (2, .7) by (2, .9); (5, .95) by the smaller (4, .95).
    assert pareto_front(pts, higher_is_better=True) == [0, 1, 3]


def test_pareto_front_lower_is_better():
    pts = [(1.0, 30.0), (2.0, 12.0), (3.0, 15.0), (4.0, 11.0)]
    assert pareto_front(pts, higher_is_better=False) == [0, 1, 3]


def test_pareto_front_single_and_empty():
    assert pareto_front([(1.0, 1.0)], True) == [0]
    assert pareto_front([], True) == []


def test_pareto_png_written_from_finished_runs(sweep, tmp_path):
    out = pareto_plot(collect([sweep]), tmp_path / "pareto.png")
    assert out == tmp_path / "pareto.png"
    data = out.read_bytes()
    assert data.startswith(PNG) and len(data) > 10_000
    bits = pareto_plot(collect([sweep]), tmp_path / "bits.png", x="bits")
    assert bits is not None and bits.read_bytes().startswith(PNG)


def test_pareto_skipped_without_finished_runs(tmp_path, make_run):
    make_run(tmp_path / "r", status="running")
    assert pareto_plot(collect([tmp_path / "r"]), tmp_path / "p.png") is None
    assert not (tmp_path / "p.png").exists()


def test_pareto_rejects_unknown_axis(sweep, tmp_path):
    with pytest.raises(ValueError, match="x: 'latency' is not valid; allowed: size, bits"):
        pareto_plot(collect([sweep]), tmp_path / "p.png", x="latency")


def test_read_curve_skips_rows_being_written(tmp_path):
    f = tmp_path / "metrics.csv"
    f.write_text(
        "epoch,step,train/loss,val/loss,val/acc\n0,9,0.5,,\n0,9,,0.3,0.8\n0,19,,0.2,0.9\n0,29,,0.1,0."
    )
    col, steps, values = read_curve(f, "acc")
    assert col == "val/acc" and steps == [9, 19] and values == [0.8, 0.9]  # "0." is half a number
    f.write_text("epoch,step,train/loss,val/loss,val/acc\n0,9,,0.3,0.8\n0,19,,oops,nan\n0,29,,0.2,0.9\n")
    assert read_curve(f)[1:] == ([9, 29], [0.8, 0.9])
    assert read_curve(tmp_path / "missing.csv") is None


def test_curves_png_and_skipped_without_logs(sweep, tmp_path, make_run):
    out = curves_plot(collect([sweep]), tmp_path / "curves.png")
    assert out is not None and out.read_bytes().startswith(PNG)
    make_run(tmp_path / "nolog")
    assert curves_plot(collect([tmp_path / "nolog"]), tmp_path / "c.png") is None


def test_every_curve_has_its_own_colour_line_style_and_legend_entry(tmp_path, make_run, monkeypatch):
    """Runs of one method (here three W4A8 LSQ runs, e.g. three learning rates) must not share a colour."""
    from matplotlib.colors import to_hex

    from qat.report import plots

    for name, curve in (("lr1", [(9, 0.5), (19, 0.6)]), ("lr2", [(9, 0.6), (19, 0.7)]), ("lr3", [(9, 0.7)])):
        make_run(tmp_path / "sweep" / name, curve=curve)
    make_run(tmp_path / "sweep" / "w8", w_fmt="int8", curve=[(9, 0.8)])
    figures = []
    monkeypatch.setattr(plots, "_png", lambda fig: figures.append(fig) or PNG)
    records = collect([tmp_path / "sweep"])
    assert len({r.method for r in records}) == 1  # all "qat lsq": the old colour-by-method drew them alike
    assert curves_plot(records, tmp_path / "curves.png") is not None
    (ax,) = figures[0].axes
    looks = [(to_hex(line.get_color()), line.get_linestyle()) for line in ax.get_lines()]
    assert len(looks) == 4 and len(set(looks)) == 4
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert len(set(labels)) == 4 and all(any(n in lab for lab in labels) for n in ("lr1", "lr2", "lr3"))


def test_forty_curves_still_look_different():
    from qat.report.plots import _line_style

    assert len({_line_style(i) for i in range(40)}) == 40
