"""Task lifecycle on a SoftModel, save/load of masks (safetensors, atomic), Prompt ID."""
import json
import os

import pytest
import torch
from torch import nn

from softtf.core.config import SoftConfig
from softtf.core.mask_file import read_extras, read_mask_file
from softtf.core.model import load_masks, save_masks, wrap
from softtf.core.model import load_soft_model as load
from softtf.inference.prompt_id import PromptID, cls_feature

from timm.models.vision_transformer import VisionTransformer


def tiny_vit(embed_dim=32, depth=3, seed=0):
    torch.manual_seed(seed)
    return VisionTransformer(img_size=16, patch_size=4, num_classes=4, embed_dim=embed_dim, depth=depth, num_heads=4).eval()


def train_steps(soft, steps=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(soft.mask_parameters(), lr=0.05)
    for _ in range(steps):
        x = torch.randn(4, 3, 16, 16, generator=g)
        loss = nn.functional.cross_entropy(soft(x), torch.randint(0, 4, (4,), generator=g))
        opt.zero_grad()
        loss.backward()
        opt.step()


# ---------------------------------------------------------------------------------------- lifecycle
def test_freezing_preserves_old_task_outputs_bit_for_bit():
    soft = wrap(tiny_vit(), SoftConfig(modules_to_save=[]))
    x = torch.randn(3, 3, 16, 16)
    soft.add_task("a")
    train_steps(soft, seed=1)
    soft.freeze_task("a")
    soft.set_task("a")
    with torch.no_grad():
        out_a = soft(x)
    soft.add_task("b")
    assert soft.active_task == "b"
    train_steps(soft, seed=2)  # trains b's masks only
    with torch.no_grad():
        out_b = soft(x)
        soft.set_task("a")
        again = soft(x)
    assert torch.equal(again, out_a)
    assert not torch.equal(out_b, out_a)
    assert soft.tasks == ["a", "b"] and soft.frozen_tasks == ["a"]
    assert all(not p.requires_grad for l in soft.soft_layers.values() for p in [l.mask("a")])


def test_lifecycle_delete_and_errors():
    soft = wrap(tiny_vit())
    soft.add_task("a")
    soft.add_task("b")
    with pytest.raises(ValueError, match="task 'a' already exists"):
        soft.add_task("a")
    with pytest.raises(KeyError, match="SoftModel.set_task: unknown task 'zzz'"):
        soft.set_task("zzz")
    with pytest.raises(KeyError, match="SoftModel.delete_task: unknown task 'zzz'"):
        soft.delete_task("zzz")
    soft.freeze_task("a")
    with pytest.raises(ValueError, match="task 'a' is already frozen"):
        soft.freeze_task("a")
    with pytest.raises(ValueError, match="frozen"):
        soft.set_task("a", train=True)
    with pytest.raises(ValueError, match="mask_init must be 'ones'"):
        soft.add_task("c", init="zeros")
    soft.delete_task("a")
    assert soft.tasks == ["b"] and soft.frozen_tasks == []
    assert all(l.tasks == ["b"] for l in soft.soft_layers.values())
    assert [p.shape for p in soft.mask_parameters()] == [l.weight.shape for l in soft.soft_layers.values()]


# ---------------------------------------------------------------------------------------- save / load
@pytest.mark.parametrize("mask_dtype", [torch.float32, torch.bfloat16])
def test_save_load_round_trip(tmp_path, mask_dtype):
    soft = wrap(tiny_vit(), SoftConfig(mask_dtype=mask_dtype, mask_init=("uniform", 0.9, 1.1)))
    for i, name in enumerate(["t0", "t1", "t2"]):
        soft.add_task(name, seed=i)
        train_steps(soft, steps=1, seed=i)
        if name != "t2":
            soft.freeze_task(name)
    soft.set_task("t1")
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref = {t: (soft.set_task(t), soft(x))[1] for t in soft.tasks}
    soft.set_task("t1")
    path = tmp_path / "masks.safetensors"
    soft.save_masks(path, extra={"key": torch.arange(3.0)}, metadata={"note": "hi"})
    assert [p.name for p in tmp_path.iterdir()] == ["masks.safetensors"]  # no temp files left

    tensors, info = read_mask_file(path)
    assert info["tasks"] == ["t0", "t1", "t2"] and info["frozen"] == ["t0", "t1"] and info["active_task"] == "t1"
    assert info["config"] == soft.soft_config and info["user"] == {"note": "hi"}
    assert tensors["blocks.2.attn.qkv::t0"].dtype == mask_dtype
    assert tensors["blocks.2.attn.qkv::t2"].dtype == torch.float32  # trainable task: fp32

    soft2 = load(tiny_vit(), path)
    extras = read_extras(path)
    assert torch.equal(extras["key"], torch.arange(3.0))
    assert soft2.tasks == soft.tasks and soft2.frozen_tasks == soft.frozen_tasks and soft2.active_task == "t1"
    for n in soft.layer_names:
        for t in soft.tasks:
            a, b = soft.soft_layers[n].mask(t), soft2.soft_layers[n].mask(t)
            assert a.dtype == b.dtype and torch.equal(a, b), (n, t)
    with torch.no_grad():
        for t in soft.tasks:
            soft2.set_task(t)
            assert torch.equal(soft2(x), ref[t]), t
    assert soft2.soft_layers[soft.layer_names[0]].mask("t2").requires_grad  # still trainable


def test_save_is_atomic_and_keeps_old_file_on_failure(tmp_path, monkeypatch):
    soft = wrap(tiny_vit())
    soft.add_task("a")
    path = tmp_path / "m.safetensors"
    soft.save_masks(path)
    before = path.read_bytes()
    soft.add_task("b")

    import softtf.core.mask_file as io

    def boom(tensors, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(io, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        soft.save_masks(path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]
    with pytest.raises(FileNotFoundError, match="directory .* does not exist"):
        save_masks(soft, tmp_path / "nope" / "m.safetensors")


def test_load_errors_name_layer_task_and_expectation(tmp_path):
    soft = wrap(tiny_vit(), SoftConfig(mask_dtype=torch.bfloat16))
    soft.add_task("a")
    soft.freeze_task("a")
    path = tmp_path / "m.safetensors"
    soft.save_masks(path)

    # task already present
    with pytest.raises(ValueError, match=r"tasks \['a'\] .* already exist"):
        load_masks(soft, path)
    # different layers
    other = wrap(tiny_vit(), SoftConfig(layers=[0]))
    with pytest.raises(ValueError, match=r"does not match the model's masked layers: missing in file \[\], not in model \['blocks.1.attn.qkv'"):
        load_masks(other, path)
    # different shapes
    wide = wrap(tiny_vit(embed_dim=64), SoftConfig(mask_dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=r"layer 'blocks.0.attn.qkv' task 'a': expected mask shape \(192, 64\), got \(96, 32\)"):
        load_masks(wide, path)
    assert wide.tasks == []  # nothing was added before the checks passed
    # different mask dtype
    fp32 = wrap(tiny_vit())
    with pytest.raises(ValueError, match=r"layer 'blocks.0.attn.qkv' task 'a': expected mask dtype torch.float32 \(frozen\), got torch.bfloat16"):
        load_masks(fp32, path)
    # not a mask file / missing / garbage
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="is not a softtf mask file"):
        load_masks(fp32, tmp_path / "plain.safetensors")
    with pytest.raises(FileNotFoundError, match="no mask file at"):
        load_masks(fp32, tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors at all")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_masks(fp32, tmp_path / "junk.safetensors")
    with pytest.raises(ValueError, match="has no SoftLinear layers"):
        load_masks(nn.Linear(2, 2), path)


def test_load_rejects_missing_mask_and_bad_metadata(tmp_path):
    from safetensors.torch import save_file

    soft = wrap(tiny_vit())
    soft.add_task("a")
    path = tmp_path / "m.safetensors"
    soft.save_masks(path)
    tensors, _ = read_mask_file(path)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
    del tensors["blocks.1.attn.proj::a"]
    save_file(tensors, str(tmp_path / "missing.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match=r"no mask for layer 'blocks.1.attn.proj' task 'a'"):
        load_masks(wrap(tiny_vit()), tmp_path / "missing.safetensors")
    bad = dict(meta, version="99")
    save_file(read_mask_file(path)[0], str(tmp_path / "v99.safetensors"), metadata=bad)
    with pytest.raises(ValueError, match="format version '99'"):
        load_masks(wrap(tiny_vit()), tmp_path / "v99.safetensors")
    bad = dict(meta, tasks="[not json")
    save_file(read_mask_file(path)[0], str(tmp_path / "corrupt.safetensors"), metadata=bad)
    with pytest.raises(ValueError, match="corrupt metadata"):
        load_masks(wrap(tiny_vit()), tmp_path / "corrupt.safetensors")
    with pytest.raises(TypeError, match=r"extra\['k'\] must be a Tensor"):
        soft.save_masks(tmp_path / "x.safetensors", extra={"k": [1, 2]})
    with pytest.raises(TypeError, match="metadata must map str to str"):
        soft.save_masks(tmp_path / "x.safetensors", metadata={"k": 3})
    bad = dict(meta, frozen='["zzz"]')
    save_file(read_mask_file(path)[0], str(tmp_path / "frozen.safetensors"), metadata=bad)
    with pytest.raises(ValueError, match=r"lists frozen tasks \['zzz'\] that are not among its tasks \['a'\]"):
        load_masks(wrap(tiny_vit()), tmp_path / "frozen.safetensors")
    stray = dict(read_mask_file(path)[0], junk=torch.zeros(1))
    save_file(stray, str(tmp_path / "stray.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match=r"tensors that are neither masks nor extras: \['junk'\]"):
        load_masks(wrap(tiny_vit()), tmp_path / "stray.safetensors")


def test_save_masks_from_bare_module_and_load_needs_config(tmp_path):
    from softtf.core.layer import SoftLinear

    net = nn.Sequential(SoftLinear(nn.Linear(4, 3)))
    net[0].add_task("a")
    path = tmp_path / "bare.safetensors"
    save_masks(net, path)
    net2 = nn.Sequential(SoftLinear(nn.Linear(4, 3)))
    load_masks(net2, path)
    assert net2[0].tasks == ["a"]
    with pytest.raises(ValueError, match="stores no SoftConfig"):
        load(nn.Sequential(nn.Linear(4, 3)), path)


# ---------------------------------------------------------------------------------------- Prompt ID
def test_prompt_id_query_uses_unmasked_model_and_restores_mode():
    soft = wrap(tiny_vit())
    soft.add_task("a")
    with torch.no_grad():
        for p in soft.mask_parameters():
            p.mul_(0.3)
    x = torch.randn(2, 3, 16, 16)
    base_feat = None
    with soft.disable_masks(), torch.no_grad():
        base_feat = soft.forward_features(x)[:, 0]
    pid = PromptID(32)
    q = pid.query(soft, x)
    assert torch.equal(q, base_feat) and not q.requires_grad
    assert all(l.mode == "single" for l in soft.soft_layers.values())
    with torch.no_grad():
        assert not torch.equal(soft.forward_features(x)[:, 0], base_feat)


def test_prompt_id_pull_trains_only_current_key_and_predicts():
    torch.manual_seed(0)
    pid = PromptID(8)
    centers = torch.eye(8)[:3] * 5
    for t in range(3):
        key = pid.add_key(f"t{t}")
        opt = torch.optim.Adam([key], lr=0.05)
        for _ in range(100):
            q = centers[t] + 0.3 * torch.randn(16, 8)
            loss = pid.pull_loss(q, f"t{t}")
            opt.zero_grad()
            loss.backward()
            opt.step()
        pid.freeze_key(f"t{t}")
        assert [k.requires_grad for k in pid.keys.values()] == [False] * (t + 1)
    q = torch.cat([centers[t] + 0.3 * torch.randn(10, 8) for t in range(3)])
    pred = pid.predict(q)
    assert torch.equal(pred, torch.arange(3).repeat_interleave(10))
    assert torch.equal(pid.predict(q, ["t2", "t0"])[20:], torch.zeros(10, dtype=torch.long))
    assert float(pid.pull_loss(centers[0][None], "t0")) < -0.99  # -λ·cos ≈ -1 at a trained key


def test_prompt_id_errors():
    with pytest.raises(ValueError, match="dim must be a positive int"):
        PromptID(0)
    with pytest.raises(ValueError, match="lam must be > 0"):
        PromptID(4, lam=0)
    pid = PromptID(4)
    with pytest.raises(ValueError, match="no keys"):
        pid.predict(torch.randn(2, 4))
    pid.add_key("a")
    with pytest.raises(ValueError, match="task 'a' already has a key"):
        pid.add_key("a")
    with pytest.raises(KeyError, match="no key for task 'b'"):
        pid.pull_loss(torch.randn(2, 4), "b")
    with pytest.raises(ValueError, match=r"q must be \[B, 4\], got torch.Size\(\[2, 5\]\)"):
        pid.predict(torch.randn(2, 5))
    with pytest.raises(ValueError, match=r"feature_fn must return \[B, 4\]"):
        pid.query(nn.Identity(), torch.randn(2, 3), feature_fn=lambda m, x: m(x))
    with pytest.raises(TypeError, match="has no forward_features"):
        cls_feature(nn.Identity(), torch.randn(2, 4))


# ---------------------------------------------------------------------------------------- load is all-or-nothing
def _snapshot(soft):
    state = {k: v.clone() for k, v in soft.state_dict().items() if isinstance(v, torch.Tensor)}
    layers = {n: (l.tasks, l.frozen_tasks, l.mode_state(), {t: p.requires_grad for t, p in l.masks.items()})
              for n, l in soft.soft_layers.items()}
    return state, layers


def _assert_unchanged(soft, before):
    state, layers = _snapshot(soft)
    assert layers == before[1]
    assert state.keys() == before[0].keys()
    assert all(torch.equal(state[k], before[0][k]) for k in state)


def _saved_with(tmp_path, name, tensors_and_meta, **meta_changes):
    from safetensors.torch import save_file

    tensors, meta = tensors_and_meta
    path = tmp_path / f"{name}.safetensors"
    save_file(tensors, str(path), metadata=dict(meta, **meta_changes))
    return path


def _saved_file(tmp_path):
    from safetensors import safe_open

    soft = wrap(tiny_vit(), SoftConfig(mask_dtype=torch.bfloat16))
    soft.add_task("a")
    soft.freeze_task("a")
    soft.add_task("b")
    path = tmp_path / "good.safetensors"
    soft.save_masks(path)
    with safe_open(str(path), framework="pt") as fh:
        return read_mask_file(path)[0], fh.metadata()


@pytest.mark.parametrize("field, value, match", [
    ("tasks", "5", r"metadata 'tasks' must be a list of task names, got 5"),
    ("tasks", '["a", "b", "a"]', r"metadata 'tasks' lists 'a' twice"),
    ("tasks", '["a", "b", "c d"]', r"metadata 'tasks': task name 'c d' must match \[A-Za-z0-9_-\]\+"),
    ("frozen", '["a", "a"]', r"metadata 'frozen' lists 'a' twice"),
    ("frozen", '"a"', r"metadata 'frozen' must be a list of task names, got 'a'"),
    ("active_task", '"zzz"', r"metadata 'active_task' must be null or one of its tasks \['a', 'b'\], got 'zzz'"),
    ("active_task", "3", r"metadata 'active_task' must be null or one of its tasks \['a', 'b'\], got 3"),
    ("layers", '"blocks.0.attn.qkv"', r"metadata 'layers' must be a list of layer names"),
    ("layers", "[1, 2]", r"metadata 'layers' must be a list of layer names"),
    ("mask_dtype", "[1]", r"metadata 'mask_dtype' must be a dict mapping each layer to a dtype name"),
    ("mask_dtype", '{"blocks.0.attn.qkv": "int8"}', r"metadata 'mask_dtype' must be a dict mapping each layer to a dtype name"),
    ("config", '{"layers": "x"}', r"metadata 'config' is not a SoftConfig"),
])
def test_load_validates_every_metadata_field_before_touching_the_model(tmp_path, field, value, match):
    saved = _saved_file(tmp_path)
    tensors, meta = saved
    if field == "tasks" and "c d" in value:  # give the bad name its masks so only the name is wrong
        tensors = dict(tensors, **{k.replace("::b", "::c d"): v.clone() for k, v in tensors.items() if k.endswith("::b")})
    path = _saved_with(tmp_path, "bad", (tensors, meta), **{field: value})
    soft = wrap(tiny_vit(), SoftConfig(mask_dtype=torch.bfloat16))
    soft.add_task("x")
    soft.freeze_task("x")
    soft.add_task("y")
    before = _snapshot(soft)
    with pytest.raises(ValueError, match=match) as exc:
        load_masks(soft, path)
    assert "bad.safetensors" in str(exc.value)
    _assert_unchanged(soft, before)
    soft.save_masks(tmp_path / "after.safetensors")  # the layers still agree
    load_masks(soft, tmp_path / "good.safetensors")  # and the good file still loads
    assert soft.tasks == ["x", "y", "a", "b"] and soft.frozen_tasks == ["x", "a"] and soft.active_task == "b"


def test_load_failing_in_a_later_layer_leaves_every_layer_as_it_was(tmp_path, monkeypatch):
    from softtf.core.layer import SoftLinear

    _saved_file(tmp_path)
    soft = wrap(tiny_vit(), SoftConfig(mask_dtype=torch.bfloat16))
    soft.add_task("x")
    before = _snapshot(soft)
    real, calls = SoftLinear.stage_tasks, []

    def flaky(self, *args, **kwargs):
        calls.append(self)
        if len(calls) == 3:
            raise RuntimeError("out of memory")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(SoftLinear, "stage_tasks", flaky)
    with pytest.raises(RuntimeError, match="out of memory"):
        load_masks(soft, tmp_path / "good.safetensors")
    _assert_unchanged(soft, before)
    monkeypatch.undo()
    load_masks(soft, tmp_path / "good.safetensors")
    assert soft.tasks == ["x", "a", "b"] and soft.active_task == "b"


def test_atomic_write_fsyncs_the_file_and_then_its_directory(tmp_path, monkeypatch):
    import stat

    from softtf.core.files import atomic_write

    synced, real_fsync = [], os.fsync

    def recording_fsync(fd):
        st = os.fstat(fd)
        synced.append(("dir" if stat.S_ISDIR(st.st_mode) else "file", st.st_ino))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    path = tmp_path / "out.bin"
    atomic_write(path, lambda tmp: open(tmp, "wb").close())
    assert synced == [("file", path.stat().st_ino), ("dir", tmp_path.stat().st_ino)]

    def refusing_fsync(fd):  # some platforms / file systems cannot fsync a directory
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(22, "Invalid argument")
        real_fsync(fd)

    def write_new(tmp):
        with open(tmp, "wb") as fh:
            fh.write(b"new")

    monkeypatch.setattr(os, "fsync", refusing_fsync)
    atomic_write(path, write_new)
    assert path.read_bytes() == b"new"
