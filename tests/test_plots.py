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


def test_a_runs_plots_name_the_dataset(monkeypatch, tmp_path):
    """The accuracy-matrix and curve titles say which data the run is on (issue 17)."""
    import torch
    from timm.models.vision_transformer import VisionTransformer

    from softtf.cl import RunConfig, load_digits, run_continual

    figs = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figs.append(fig))
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=16, patch_size=4, num_classes=0, embed_dim=16, depth=1, num_heads=2, global_pool="avg")
    cfg = RunConfig(method="softtf", n_tasks=2, epochs=1, lr=0.01, task_id="prompt", progress=False)
    res = run_continual(vit, load_digits(img_size=16, seed=0), cfg, output_dir=tmp_path / "run")
    heat, curve = figs[0].axes[0].get_title(), figs[1].axes[0].get_title()
    assert heat.startswith("sklearn digits (2 tasks) / softtf / task-id prompt (per sample) / protocol default\nhead full\n"), heat
    assert heat.endswith(f"final ACC {res['acc']:.2f} %")
    assert curve.startswith("sklearn digits (2 tasks) / softtf"), curve


@pytest.mark.parametrize("info, kind, name", [
    ({"source": "sklearn digits"}, "image", "sklearn digits"),
    ({"source": "cifar100:/data/sets/cifar-100-python/"}, "image", "cifar100:cifar-100-python"),
    ({"source": "folder:imagenet-r"}, "image", "folder:imagenet-r"),
    ({"source": "textdir:/corpora/text5", "max_length": 16}, "text", "textdir:text5"),
    ({}, "image", "image data, 10 classes"),
    ({"source": ""}, "text", "text data, 10 classes"),
])
def test_the_data_names_itself_for_titles(info, kind, name):
    from softtf.cl.labelled import LabelledData

    assert LabelledData(None, None, 10, [str(c) for c in range(10)], kind, info).display_name == name
