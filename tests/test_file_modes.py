"""Files the library writes get the mode a plain open() gives them, 0o666 & ~umask (issue 17):
results, progress, run config, checkpoints, mask files and plots are written atomically through a
temp file, which tempfile.mkstemp creates 0o600."""
import os
import stat
import threading

import pytest
import torch

from softtf.cl import RunConfig, load_digits, run_continual
from softtf.core.config import SoftConfig
from softtf.core.files import atomic_write, current_umask, new_file_mode, save_tensors, write_json
from softtf.core.model import save_masks, wrap

from timm.models.vision_transformer import VisionTransformer

UMASKS = [0o022, 0o077, 0o002]


@pytest.fixture(params=UMASKS, ids=[f"umask{u:03o}" for u in UMASKS])
def umask(request):
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def plain_open_mode(directory, umask) -> int:
    """What ``open(path, "w")`` gives a new file under the current umask (the reference)."""
    ref = os.path.join(directory, "plain-open-reference")
    with open(ref, "w") as fh:
        fh.write("x")
    got = mode(ref)
    os.unlink(ref)
    assert got == 0o666 & ~umask
    return got


def test_current_umask_reads_without_changing_it(umask):
    assert current_umask() == umask
    assert new_file_mode() == 0o666 & ~umask
    assert os.umask(umask) == umask  # unchanged by the read


def test_current_umask_falls_back_without_proc(umask, monkeypatch):
    import builtins

    real_open = builtins.open

    def no_proc(path, *a, **kw):
        if str(path).startswith("/proc/"):
            raise FileNotFoundError(path)
        return real_open(path, *a, **kw)

    monkeypatch.setattr(builtins, "open", no_proc)
    assert current_umask() == umask
    assert os.umask(umask) == umask


def test_atomic_writers_give_the_plain_open_mode(tmp_path, umask):
    want = plain_open_mode(tmp_path, umask)
    atomic_write(tmp_path / "raw.bin", lambda tmp: open(tmp, "wb").close())
    write_json(tmp_path / "a.json", {"x": 1})
    save_tensors(tmp_path / "t.safetensors", {"w": torch.ones(2)})
    soft = wrap(VisionTransformer(img_size=16, patch_size=4, num_classes=4, embed_dim=32, depth=2, num_heads=4),
                SoftConfig(modules_to_save=[]))
    soft.add_task("a")
    save_masks(soft, tmp_path / "masks.safetensors")
    for name in ("raw.bin", "a.json", "t.safetensors", "masks.safetensors"):
        assert mode(tmp_path / name) == want, f"{name}: {oct(mode(tmp_path / name))} != {oct(want)}"
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_a_rewrite_takes_the_current_umask(tmp_path):
    old = os.umask(0o077)
    try:
        write_json(tmp_path / "a.json", {"x": 1})
        assert mode(tmp_path / "a.json") == 0o600
        os.umask(0o022)
        write_json(tmp_path / "a.json", {"x": 2})
        assert mode(tmp_path / "a.json") == 0o644
    finally:
        os.umask(old)


def test_concurrent_atomic_writes_get_the_umask_mode(tmp_path, umask):
    want = 0o666 & ~umask
    errors = []

    def writer(i):
        try:
            for k in range(20):
                write_json(tmp_path / f"f{i}-{k}.json", {"k": k})
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    assert {mode(p) for p in tmp_path.iterdir()} == {want}
    assert os.umask(umask) == umask


def test_a_run_directory_gets_the_umask_mode(tmp_path, umask):
    pytest.importorskip("matplotlib")
    torch.manual_seed(0)
    data = load_digits(img_size=16, seed=0)
    vit = VisionTransformer(img_size=16, patch_size=4, num_classes=0, embed_dim=16, depth=1, num_heads=2, global_pool="avg")
    out = tmp_path / "run"
    cfg = RunConfig(method="softtf", n_tasks=2, epochs=1, lr=0.01, task_id="prompt", progress=False)
    run_continual(vit, data, cfg, output_dir=out)
    want = plain_open_mode(tmp_path, umask)
    files = sorted(p for p in out.rglob("*") if p.is_file())
    names = {p.relative_to(out).as_posix() for p in files}
    assert {"results.json", "progress.json", "run_config.json", "accuracy_matrix.png", "accuracy_curve.png",
            "checkpoints/task_000.safetensors", "checkpoints/task_001.safetensors"} <= names
    assert {p.relative_to(out).as_posix(): oct(mode(p)) for p in files} == {n: oct(want) for n in names}
    for d in (out, out / "checkpoints"):  # directories: os.makedirs, 0o777 & ~umask
        assert mode(d) == 0o777 & ~umask
