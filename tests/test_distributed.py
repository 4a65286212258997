"""Data-parallel training (issue 15): two gloo processes on this CPU against one.

* the shares of each global batch are that batch, with weights that make DDP's average gradient
  the batch's mean-loss gradient;
* ``softtf train --nproc 2`` gives the one-process run's accuracy and task-id matrices and its masks
  (within float tolerance: the gradient sums run in another order);
* killing one worker mid-task stops the other; the same command then resumes after the last
  finished task and ends with the uninterrupted run's results;
* every registered method trains under DDP, and both ranks end with the same parameters; with the
  frozen blocks sharded by FSDP2 (half of each frozen weight per rank) every method gives the DDP
  run's matrices.
"""
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest
import torch

from softtf.cl.distributed import Ranks, batch_shares, whole_batches
from softtf.cli import main
from softtf.cli.launch import free_port
from softtf.core import load_tensors
from softtf.cl.loaders import SeededOrder

pytestmark = pytest.mark.usefixtures("one_thread")
HERE = pathlib.Path(__file__).parent

TRAIN = ["train", "--model", "vit", "--data", "digits", "--tasks", "2", "--epochs", "3", "--img-size", "16",
         "--patch-size", "4", "--depth", "2", "--embed-dim", "32", "--method", "softtf", "--task-id", "gradient-sample",
         "--lr", "0.01", "--batch-size", "25", "--pretrain-epochs", "1", "--no-progress", "--threads", "1"]


@pytest.mark.parametrize("n, batch, world", [(100, 25, 2), (101, 25, 2), (51, 25, 2), (26, 25, 3), (7, 4, 4), (9, 10, 2)])
def test_shares_make_up_each_global_batch(n, batch, world):
    order = SeededOrder(n, 5).indices()
    shares = [batch_shares(n, batch, 5, Ranks(r, world)) for r in range(world)]
    assert all(len(s) == len(shares[0]) for s in shares)  # every rank takes part in every step
    for b, start in enumerate(range(0, n, batch)):
        glob = order[start:start + batch]
        real = [(idx, w) for idx, w in (s[b] for s in shares) if w > 0]
        assert sorted(i for idx, _ in real for i in idx) == sorted(glob)
        # DDP averages the ranks' gradients: (1/W) sum_r w_r * mean over share_r = the mean over the batch,
        # for any per-sample losses (and so for their gradients)
        loss = torch.rand(n, dtype=torch.float64)
        ddp = sum(w * loss[idx].mean() for idx, w in (s[b] for s in shares)) / world
        assert float(ddp) == pytest.approx(float(loss[glob].mean()), rel=1e-12)
        for idx, w in real:
            assert w == pytest.approx(len(idx) * world / len(glob))


@pytest.mark.parametrize("n, batch, world", [(10, 3, 2), (9, 3, 3), (5, 8, 2), (0, 4, 2)])
def test_evaluation_batches_stay_whole(n, batch, world):
    got = [whole_batches(n, batch, Ranks(r, world)) for r in range(world)]
    flat = sorted((b[0], tuple(b)) for rank in got for b in rank)
    assert [b for _, b in flat] == [tuple(range(s, min(s + batch, n))) for s in range(0, n, batch)]


def masks_of(run: pathlib.Path) -> dict:
    return {k: v for k, v in load_tensors(str(run / "checkpoints" / "task_001.safetensors")).items() if "extra::" not in k}


@pytest.fixture(scope="module")
def one_and_two(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    assert main([*TRAIN, "--output", str(root / "one")]) == 0
    two = subprocess.run([sys.executable, "-m", "softtf.cli", *TRAIN, "--output", str(root / "two"), "--nproc", "2"],
                         capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    return root, two.stdout


def results(run: pathlib.Path) -> dict:
    return json.loads((run / "results.json").read_text())


def test_two_processes_give_the_one_process_run(one_and_two):
    root, stdout = one_and_two
    one, two = results(root / "one"), results(root / "two")
    for key in ("accuracy_matrix", "task_id_matrix"):
        assert two[key] == one[key], key
    m1, m2 = masks_of(root / "one"), masks_of(root / "two")
    assert m1.keys() == m2.keys() and m1
    for k in m1:
        torch.testing.assert_close(m2[k].float(), m1[k].float(), atol=1e-4, rtol=0, msg=k)
    assert stdout.count('"method": "softtf"') == 1  # rank 0 alone prints the summary


def worker_pids(launcher: int) -> list[int]:
    path = pathlib.Path(f"/proc/{launcher}/task/{launcher}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the workers through /proc")
def test_a_killed_worker_stops_the_run_and_the_command_resumes(one_and_two, tmp_path):
    root, _ = one_and_two
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "softtf.cli", *TRAIN, "--output", str(out), "--nproc", "2"]
    launcher = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    progress = out / "progress.json"
    deadline = time.monotonic() + 300
    while not (progress.exists() and json.loads(progress.read_text())["finished_tasks"] == 1):
        assert launcher.poll() is None and time.monotonic() < deadline, "the run ended before task 1 was checkpointed"
        time.sleep(0.02)
    workers = worker_pids(launcher.pid)
    assert len(workers) == 2
    os.kill(workers[1], signal.SIGKILL)  # rank 1, in the middle of task 2
    _, err = launcher.communicate(timeout=120)
    assert launcher.returncode == 128 + signal.SIGKILL, err[-2000:]
    assert not (out / "results.json").exists()
    assert all(pathlib.Path(f"/proc/{p}").exists() is False for p in workers)  # rank 0 was stopped too
    resumed = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for key in ("accuracy_matrix", "task_id_matrix"):
        assert results(out)[key] == results(root / "two")[key], key


def test_every_method_trains_under_ddp_and_fsdp(tmp_path):
    port = free_port()
    procs = [subprocess.Popen([sys.executable, str(HERE / "ddp_worker.py"), str(tmp_path)],
                              env={**os.environ, "RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r),
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for r in range(2)]
    errs = [p.communicate(timeout=900)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(e[-3000:] for e in errs)
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    from softtf.methods import method_names

    assert sorted(rank0) == sorted(f"{m}/{mode}" for m in method_names() for mode in ("ddp", "fsdp"))
    for key, rec in rank0.items():
        method, mode = key.split("/")
        assert rec["world"] == 2
        assert rec["accuracy_matrix"] == rank1[key]["accuracy_matrix"], key
        assert 0 <= rec["acc"] <= 100
        if mode == "ddp":
            assert rec["fingerprint"] == rank1[key]["fingerprint"], f"{key}: the ranks' parameters differ"
            assert rec["sharded"] == 0
        else:
            # the blocks' frozen weights are split in two; the run is the DDP run's
            assert rec["sharded"] > 0 and rec["frozen_sharded"] and rec["local_share"] == pytest.approx(0.5, abs=0.01), key
            ddp = rank0[f"{method}/ddp"]
            assert rec["accuracy_matrix"] == ddp["accuracy_matrix"] and rec["task_id_matrix"] == ddp["task_id_matrix"], key


def test_nproc_errors(tmp_path, capsys, monkeypatch):
    base = ["train", "--model", "vit", "--data", "digits", "--output", str(tmp_path / "r"), "--no-progress", "--epochs", "0"]
    with pytest.raises(SystemExit):
        main([*base, "--fsdp", "--depth", "2", "--img-size", "16", "--patch-size", "4"])
    assert "fsdp: sharding needs several processes" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*base, "--nproc", "2", "--device", "cuda:0"])
    assert "pass --device cuda, each process takes cuda:LOCAL_RANK" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(SystemExit):
        main([*base, "--nproc", "2"])
    assert "this process is one of WORLD_SIZE=3" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(SystemExit):
        main(base)
    assert "MASTER_PORT" in capsys.readouterr().err
