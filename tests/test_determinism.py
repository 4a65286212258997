"""Runs depend on their seeds, not on display options (issue 17 #2).

tqdm's asyncio bar (what ``tqdm.auto`` gives outside notebooks) calls ``iter()`` on the loader in its
constructor. A loader seeded through a ``DataLoader`` generator then drew its base seed twice, so
every epoch of pre-training, training and evaluation saw another order with the bar than without:
the README's digits run gave ACC 66.26 with a bar and 73.15 with ``--no-progress``.
"""
import json

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from softtf.cl.loaders import SeededOrder, make_loader, progress_bar
from softtf.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def labels(loader):
    return torch.cat([y for _, y in loader])


@pytest.mark.parametrize("seed", [0, 3, 1001])
def test_order_is_the_seed_s_whatever_iterates_it(seed):
    ds = TensorDataset(torch.zeros(101, 2), torch.arange(101))
    loader = make_loader(ds, 16, True, seed)
    first = labels(loader)
    iter(loader), iter(loader)  # what a progress bar's constructor may do
    assert torch.equal(labels(loader), first)
    assert torch.equal(labels(progress_bar(make_loader(ds, 16, True, seed), True, disable=True)), first)
    # the same order as the DataLoader(generator=...) loaders that recorded earlier runs
    g = torch.Generator()
    g.manual_seed(seed)
    assert torch.equal(labels(DataLoader(ds, batch_size=16, shuffle=True, generator=g)), first)
    assert sorted(first.tolist()) == list(range(101)) and first.tolist() != list(range(101))
    assert list(SeededOrder(5, seed, shuffle=False)) == [0, 1, 2, 3, 4]


def test_a_loader_leaves_the_global_rng_alone():
    ds = TensorDataset(torch.zeros(10, 1), torch.arange(10))
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    labels(progress_bar(make_loader(ds, 4, True, 5), True, disable=True))
    assert torch.equal(torch.rand(3), expected)


def test_the_progress_bar_does_not_change_a_run(tmp_path, capsys):
    """The same command with and without ``--no-progress``: the same backbone, the same results."""
    def train(out, *display):
        argv = ["train", "--model", "vit", "--data", "digits", "--output", str(out), "--tasks", "2", "--epochs", "1",
                "--img-size", "16", "--patch-size", "4", "--depth", "2", "--embed-dim", "32", "--method", "softtf",
                "--task-id", "gradient-sample", "--lr", "0.01", "--threads", "1", "--pretrain-epochs", "1", *display]
        assert main(argv) == 0
        capsys.readouterr()
        res = json.loads((out / "results.json").read_text())
        return res, (out / "pretrained_backbone.safetensors").read_bytes()

    quiet, quiet_backbone = train(tmp_path / "quiet", "--no-progress")
    shown, shown_backbone = train(tmp_path / "shown")
    assert shown_backbone == quiet_backbone
    for key in ("accuracy_matrix", "task_id_matrix", "forgetting"):
        assert shown[key] == quiet[key], key
