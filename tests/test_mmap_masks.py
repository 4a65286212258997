"""Frozen masks kept in a memory-mapped mask file (issue 15, many tasks): ``load_masks(...,
mmap=True)`` gives the outputs of a normal load bit for bit, its masks are views of the file's
mapping (not copies: resident memory barely grows), the lifecycle keeps working on top, and a bad
file is refused, naming what is wrong, before anything changes."""
import copy
import json
import os
import struct

import pytest
import torch
from torch import nn

import softtf
from softtf import SoftLinear
from softtf.core.mapped_file import map_safetensors

from timm.models.vision_transformer import VisionTransformer


def _vit(seed=0):
    torch.manual_seed(seed)
    return VisionTransformer(img_size=16, patch_size=4, num_classes=3, embed_dim=32, depth=2, num_heads=4).eval()


def _saved(tmp_path, mask_dtype=torch.float32, tasks=4, trainable_last=True):
    model = softtf.wrap(_vit(), mask_dtype=mask_dtype)
    for i in range(tasks):
        model.add_task(f"t{i}", init=("uniform", 0.5, 1.5), seed=i)
        if i < tasks - 1 or not trainable_last:
            model.freeze_task(f"t{i}")
    path = tmp_path / f"masks_{str(mask_dtype)[6:]}.safetensors"
    model.save_masks(path)
    return path


def _mappings_of(path):
    """(start, end) address ranges of the process's mappings of ``path`` (from /proc/self/maps)."""
    real, out = os.path.realpath(path), []
    with open("/proc/self/maps") as fh:
        for line in fh:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and parts[5].strip() == real:
                start, end = (int(v, 16) for v in parts[0].split("-"))
                out.append((start, end))
    return out


@pytest.mark.parametrize("mask_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_mmap_load_gives_the_outputs_of_a_normal_load_bit_for_bit(tmp_path, mask_dtype):
    path = _saved(tmp_path, mask_dtype)
    plain = softtf.load_soft_model(_vit(), path)
    mapped = softtf.load_soft_model(_vit(), path, mmap=True)
    layers = list(mapped.soft_layers.values())
    assert all(l.mapped_tasks == ["t0", "t1", "t2"] and l.frozen_tasks == ["t0", "t1", "t2"] for l in layers)
    assert all(not p.requires_grad or n == "t3" for l in layers for n, p in l.masks.items())  # t3 trains, resident
    x = torch.randn(5, 3, 16, 16)
    with torch.no_grad():
        for names in (["t0", "t1", "t2", "t3", "t1"], "t2", "t3", ["t2", "t0", "t2", "t0", "t0"]):
            assert torch.equal(mapped(x, task_names=names), plain(x, task_names=names))
        mapped.set_task("t1"), plain.set_task("t1")
        assert torch.equal(mapped(x), plain(x))
    for rule in ("sample", "batch"):
        assert torch.equal(softtf.gradient_id(mapped, x, rule=rule).scores, softtf.gradient_id(plain, x, rule=rule).scores)
    state_p, state_m = plain.state_dict(), mapped.state_dict()  # frozen_masks stacked, as from a normal load
    assert state_p.keys() == state_m.keys()
    assert all(torch.equal(v, state_m[k]) for k, v in state_p.items() if isinstance(v, torch.Tensor))
    fresh = softtf.wrap(_vit())
    for t in plain.tasks:
        fresh.add_task(t)
    fresh.load_state_dict(state_m)


def test_mapped_masks_are_views_of_the_file_mapping_not_copies(tmp_path):
    path = _saved(tmp_path)
    model = softtf.load_soft_model(_vit(), path, mmap=True)
    ranges = _mappings_of(path)
    assert ranges, "the mask file is not mapped"
    for layer in model.soft_layers.values():
        for t in layer.frozen_tasks:
            m = layer.mask(t)
            start, end = m.data_ptr(), m.data_ptr() + m.numel() * m.element_size()
            assert any(lo <= start and end <= hi for lo, hi in ranges), (t, hex(start), ranges)
            assert not m.untyped_storage().resizable()  # torch.frombuffer's storage
        trainable = layer.mask("t3")
        assert not any(lo <= trainable.data_ptr() < hi for lo, hi in ranges)
    model.unwrap()
    del model, layer, m
    import gc

    gc.collect()
    assert _mappings_of(path) == []  # the mapping lives exactly as long as its tensors


def _status(field):
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise AssertionError(field)


def test_resident_memory_grows_far_less_than_the_masks_bytes(tmp_path):
    torch.manual_seed(0)
    big = nn.Sequential(SoftLinear(nn.Linear(2048, 2048)), SoftLinear(nn.Linear(2048, 2048)))
    for layer in big:  # 6 frozen tasks x 2 layers x 16 MiB = 192 MiB of masks
        layer.stage_tasks({f"t{i}": torch.full((2048, 2048), 1.0 + i / 8) for i in range(6)}, frozen=[f"t{i}" for i in range(6)])()
    path = tmp_path / "big.safetensors"
    softtf.save_masks(big, path)
    mask_bytes = 6 * 2 * 2048 * 2048 * 4
    x = torch.randn(3, 2048)
    with torch.no_grad(), softtf.use_task("t4"):
        expected = big(x)
    del big, layer
    torch.manual_seed(0)
    model = nn.Sequential(SoftLinear(nn.Linear(2048, 2048)), SoftLinear(nn.Linear(2048, 2048)))
    anon, file = _status("RssAnon"), _status("RssFile")
    softtf.load_masks(model, path, mmap=True)
    assert _status("RssAnon") - anon < mask_bytes / 20, "the masks were copied into anonymous memory"
    assert _status("RssFile") - file < mask_bytes / 20, "the load read the masks' pages"
    with torch.no_grad(), softtf.use_task("t4"):
        assert torch.equal(model(x), expected)
    touched = _status("RssFile") - file  # t4's pages of both layers, read on use: 32 MiB, not 192
    assert touched < mask_bytes / 3, touched


def test_lifecycle_on_a_mapped_model(tmp_path):
    path = _saved(tmp_path)
    plain = softtf.load_soft_model(_vit(), path)
    model = softtf.load_soft_model(_vit(), path, mmap=True)
    x = torch.randn(3, 3, 16, 16)
    for m in (plain, model):  # freeze the trainable task, delete a mapped one, add a new one
        m.freeze_task("t3")
        m.delete_task("t1")
        m.add_task("t4", init=("uniform", 0.5, 1.5), seed=9)
        m.freeze_task("t4")
    layer = next(iter(model.soft_layers.values()))
    assert layer.mapped_tasks == ["t0", "t2"] and layer.frozen_tasks == ["t0", "t2", "t3", "t4"]
    assert torch.equal(layer.frozen_masks, next(iter(plain.soft_layers.values())).frozen_masks)
    with torch.no_grad():
        expected = {t: plain(x, task_names=t) for t in plain.tasks}
        assert all(torch.equal(model(x, task_names=t), e) for t, e in expected.items())
    assert model.get_nb_trainable_parameters() == plain.get_nb_trainable_parameters()
    model.save_masks(path)  # replaces the file the model maps (a rename: the mapping keeps the old one)
    again = softtf.load_soft_model(_vit(), path, mmap=True)
    twin = copy.deepcopy(model)  # a copy holds its masks itself
    assert next(iter(twin.soft_layers.values())).mapped_tasks == []
    with torch.no_grad():
        for t, e in expected.items():
            assert torch.equal(model(x, task_names=t), e) and torch.equal(again(x, task_names=t), e)
            assert torch.equal(twin(x, task_names=t), e)
    model.double()  # a dtype change keeps the frozen masks as stored, mapped
    assert layer.mapped_tasks == ["t0", "t2"] and layer.frozen_masks.dtype == torch.float32
    model.to("meta")  # a device move stacks them on the new device
    assert layer.mapped_tasks == [] and layer.frozen_masks.shape[0] == 4 and layer.frozen_masks.device.type == "meta"


def test_writes_into_a_mapped_mask_stay_private(tmp_path):
    path = _saved(tmp_path)
    model = softtf.load_soft_model(_vit(), path, mmap=True)
    before = path.read_bytes()
    with torch.no_grad():
        next(iter(model.soft_layers.values())).mask("t0").mul_(0)  # copy on write: the file never changes
    assert path.read_bytes() == before


# ---------------------------------------------------------------- bad files
def _parts(path):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _write(path, header, data, pad_to=8):
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(len(text)) % pad_to)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def _first_tensor(header):
    return next(k for k in header if k != "__metadata__")


def _bad_files(tmp_path, good):
    header, data = _parts(good)
    k = _first_tensor(header)
    begin, end = header[k]["data_offsets"]
    out = {}

    def variant(name, h=None, d=None, raw=None):
        p = tmp_path / f"{name}.safetensors"
        if raw is not None:
            p.write_bytes(raw)
        else:
            _write(p, h if h is not None else header, d if d is not None else data)
        out[name] = p

    variant("truncated", d=data[:-12])
    variant("trailing", d=data + b"\0" * 8)
    variant("bad_dtype", h={**header, k: {**header[k], "dtype": "F33"}})
    variant("wrong_size", h={**header, k: {**header[k], "shape": [*header[k]["shape"][:-1], header[k]["shape"][-1] + 1]}})
    variant("overlap", h={**header, k: {**header[k], "data_offsets": [begin + 4, end + 4]}})
    variant("bad_entry", h={**header, k: {"dtype": "F32", "shape": header[k]["shape"]}})
    variant("not_json", raw=struct.pack("<Q", 6) + b"{oops}" + data)
    variant("long_header", raw=struct.pack("<Q", 10 ** 12) + b"{}")
    variant("bad_metadata", h={**header, "__metadata__": {**header["__metadata__"], "format": 3}})
    misaligned = tmp_path / "misaligned.safetensors"
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * ((-(len(text)) % 8) + 2)  # data starts at 8k + 2: fp32 tensors unaligned
    misaligned.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return out, misaligned


@pytest.mark.parametrize("case, match", [
    ("truncated", r"cover \d+ data bytes, the file holds \d+"),
    ("trailing", r"cover \d+ data bytes, the file holds \d+"),
    ("bad_dtype", r"has dtype 'F33', not one of"),
    ("wrong_size", r"needs \d+ bytes, its data_offsets \[\d+, \d+\] hold \d+"),
    ("overlap", r"(gap or overlap|cover \d+ data bytes)"),
    ("bad_entry", r"needs dtype, shape, data_offsets"),
    ("not_json", r"header that is not JSON"),
    ("long_header", r"declares a 1000000000000-byte header"),
    ("bad_metadata", r"__metadata__ must map strings to strings"),
])
def test_bad_files_are_refused_before_anything_changes(tmp_path, case, match):
    good = _saved(tmp_path, tasks=2)
    bad, _ = _bad_files(tmp_path, good)
    model = softtf.wrap(_vit())
    model.add_task("own")
    before = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    with pytest.raises(ValueError, match=r"load_masks: .* is not a readable safetensors file .*" + match):
        model.load_masks(bad[case], mmap=True)
    assert model.tasks == ["own"] and all(l.mapped_tasks == [] for l in model.soft_layers.values())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items() if isinstance(v, torch.Tensor))
    with pytest.raises(ValueError):
        map_safetensors(bad[case])


def test_an_unaligned_file_is_refused_for_mapping_and_loads_without(tmp_path):
    good = _saved(tmp_path, tasks=2)
    _, misaligned = _bad_files(tmp_path, good)
    model = softtf.wrap(_vit())
    with pytest.raises(ValueError, match=r"not aligned to its 4-byte dtype, so it cannot be memory-mapped \(load it with mmap=False\)"):
        model.load_masks(misaligned, mmap=True)
    assert model.tasks == []
    model.load_masks(misaligned)  # safetensors' own reader copies, so alignment does not matter there
    assert model.tasks == ["t0", "t1"]


def test_mmap_argument_and_device_are_checked(tmp_path):
    path = _saved(tmp_path, tasks=2)
    model = softtf.wrap(_vit())
    with pytest.raises(TypeError, match="load_masks: mmap must be True or False, got 'yes'"):
        model.load_masks(path, mmap="yes")
    meta = softtf.wrap(_vit()).to("meta")
    with pytest.raises(ValueError, match=r"mmap=True keeps masks in host memory and serves CPU layers only; the masked layers are on \['meta'\]"):
        meta.load_masks(path, mmap=True)
    assert model.tasks == [] and meta.tasks == []
    layer = SoftLinear(nn.Linear(4, 3, device="meta"))
    with pytest.raises(ValueError, match="mapped masks serve CPU layers only; this layer is on meta"):
        layer.stage_tasks({"a": torch.ones(3, 4, device="meta")}, frozen=["a"], mapped=True)
