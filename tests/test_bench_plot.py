"""bench/report.py's speedup PNGs: readable log axes and one legend (CPU, no benchmark run)."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from bench import report  # noqa: E402
from bench.shapes import SHAPES  # noqa: E402


def fake_result(layers: int = 5) -> dict:
    rows = []
    for shape in SHAPES[:layers]:
        for block in (16, 32, 64):
            for density in (0.02, 0.05, 0.1, 0.2, 0.5, 1.0):
                rows.append({"layer": shape.id, "dtype": "bf16", "pass": "fwdbwd", "impl": "block", "block": block,
                             "density": density, "speedup": 0.7 / density ** 0.8, "status": "ok"})
        rows.append({"layer": shape.id, "dtype": "bf16", "pass": "fwdbwd", "impl": "masked", "block": None,
                     "density": 0.1, "speedup": 0.9, "status": "ok"})
    return {"layers": rows, "smoke": False, "provenance": {"device": {"gpu_name": "test GPU"}}}


def test_speedup_figure_has_one_readable_legend_and_uncrowded_log_labels(tmp_path, monkeypatch):
    figures = []
    monkeypatch.setattr(plt, "close", lambda fig: figures.append(fig))
    paths = report.plot(fake_result(), tmp_path / "throughput")
    assert [p.name for p in paths] == ["throughput-bf16.png"] and paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (fig,) = figures
    assert len(fig.legends) == 1 and fig.legends[0].get_texts()[0].get_fontsize() >= 9
    labels = {t.get_text() for t in fig.legends[0].get_texts()}
    assert labels == {"block 16", "block 32", "block 64", "ideal 1/density", "masked dense"}
    panels = [ax for ax in fig.axes if ax.get_visible() and ax.axison]
    assert len(panels) == 5 and all(ax.get_legend() is None for ax in panels)
    fig.canvas.draw()
    for ax in panels:
        shown = [t for t in ax.yaxis.get_ticklabels(which="both") if t.get_visible() and t.get_text()]
        lo, hi = ax.get_ylim()
        inside = [t for t in shown if lo <= t.get_position()[1] <= hi]
        assert len(inside) <= 8, [t.get_text() for t in inside]
