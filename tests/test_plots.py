"""The run's accuracy-matrix picture says what it shows: final ACC in the title, a labelled colour bar."""
import numpy as np
import pytest

pytest.importorskip("matplotlib")

from softtf.cl import plots  # noqa: E402


def test_accuracy_matrix_title_and_colour_bar(monkeypatch, tmp_path):
    figs = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figs.append(fig))
    A = np.array([[90.0, np.nan, np.nan], [80.0, 70.0, np.nan], [60.0, 65.0, 85.5]])
    plots.plot_accuracy_matrix(A, tmp_path / "m.png", title="softtf on digits")
    (fig,) = figs
    heat, bar = fig.axes
    assert heat.get_title() == "softtf on digits\nfinal ACC 70.17 %"
    assert bar.get_ylabel() == "accuracy on task j (%)"
