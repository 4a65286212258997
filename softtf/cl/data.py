"""Labelled datasets and class-incremental scenarios for the continual-learning runner.

Sources (``load_data(spec, ...)`` parses the CLI's ``--data`` string):

``digits``
    scikit-learn's bundled 8x8 digits (1,797 images, 10 classes; no download), upsampled
    bilinearly to ``img_size`` and repeated to 3 channels; stratified seeded train/test split.
``cifar100:PATH``
    the python-pickle CIFAR-100 release (the ``cifar-100-python/{train,test}`` files that
    ``torchvision.datasets.CIFAR100`` also reads). ``PATH`` is the directory holding
    ``cifar-100-python`` or that directory itself. The pickles are read directly (no torchvision
    needed, and no md5 check, so a subset of the files in the same format also loads) by a
    restricted unpickler: numpy arrays, dicts, lists, strings and numbers only, so a crafted file
    cannot run code (anything else is refused with a ValueError naming the file and the global).
``folder:PATH``
    an ImageFolder-style tree: one sub-directory per class holding images at any depth
    (ImageNet-R, CUB ``images/``, Tiny-ImageNet ``train/<wnid>/images``). If ``PATH`` has
    ``train/`` and ``test/`` (or ``val/``) sub-directories they are the splits; a Tiny-ImageNet
    ``val/`` with ``val_annotations.txt`` + ``images/`` is understood. Otherwise a stratified
    seeded split is made. Images are read lazily with PIL, converted to RGB and resized.
``csv:PATH``
    text classification rows ``label,text`` (an optional header row ``label,text`` is skipped).
    ``PATH`` is a file (split stratified by seed) or a directory with ``train.csv`` and
    ``test.csv``. Labels may be integers or strings (classes = sorted distinct labels). Texts are
    tokenized once with the model's tokenizer (padding to ``max_length``).

Every dataset yields ``(inputs, label)`` with ``inputs`` a float image tensor [3, S, S] or a dict
of token tensors, and exposes ``targets`` (an int64 numpy array) for splitting into tasks.
"""
from __future__ import annotations

import csv
import os
import pickle
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset, Subset

__all__ = [
    "LabelledData",
    "TensorDataset",
    "ImageFileDataset",
    "ArrayImageDataset",
    "targets_of",
    "load_digits",
    "load_cifar100",
    "load_image_folder",
    "load_csv_text",
    "load_data",
    "stratified_split",
    "IMAGE_EXTENSIONS",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
DEFAULT_MEAN = (0.5, 0.5, 0.5)
DEFAULT_STD = (0.5, 0.5, 0.5)


@dataclass
class LabelledData:
    """A train/test pair of datasets over ``num_classes`` classes (``kind``: "image" or "text")."""

    train: Dataset
    test: Dataset
    num_classes: int
    class_names: list[str]
    kind: str
    info: dict = field(default_factory=dict)


def targets_of(ds: Dataset) -> np.ndarray:
    if isinstance(ds, Subset):
        return targets_of(ds.dataset)[np.asarray(ds.indices)]
    t = getattr(ds, "targets", None)
    if t is None:
        raise TypeError(f"dataset {type(ds).__name__} has no `targets` attribute (needed to split classes into tasks)")
    return np.asarray(t, dtype=np.int64)


def _normalize(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    m = torch.tensor(mean, dtype=x.dtype).view(-1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(-1, 1, 1)
    return (x - m) / s


class TensorDataset(Dataset):
    """In-memory dataset: ``inputs`` a tensor [N, ...] or a dict of tensors [N, ...]; ``targets`` [N]."""

    def __init__(self, inputs: Tensor | dict[str, Tensor], targets):
        self.targets = np.asarray(targets, dtype=np.int64)
        n = len(self.targets)
        items = inputs.values() if isinstance(inputs, dict) else [inputs]
        for v in items:
            if not isinstance(v, Tensor) or v.shape[0] != n:
                raise ValueError(f"TensorDataset: every input must be a tensor with {n} rows (one per target), got {getattr(v, 'shape', type(v))}")
        self.inputs = inputs

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i):
        x = {k: v[i] for k, v in self.inputs.items()} if isinstance(self.inputs, dict) else self.inputs[i]
        return x, int(self.targets[i])


class ArrayImageDataset(Dataset):
    """uint8 images [N, H, W, 3] converted per item to normalized float [3, S, S]."""

    def __init__(self, images: np.ndarray, targets, img_size: int, mean=DEFAULT_MEAN, std=DEFAULT_STD):
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"ArrayImageDataset: images must be uint8 [N, H, W, 3], got {images.dtype} {images.shape}")
        self.images, self.targets = images, np.asarray(targets, dtype=np.int64)
        self.img_size, self.mean, self.std = int(img_size), mean, std

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i):
        x = torch.from_numpy(self.images[i]).permute(2, 0, 1).float().div_(255.0)
        if x.shape[-1] != self.img_size or x.shape[-2] != self.img_size:
            x = F.interpolate(x[None], size=(self.img_size, self.img_size), mode="bilinear", align_corners=False)[0]
        return _normalize(x, self.mean, self.std), int(self.targets[i])


class ImageFileDataset(Dataset):
    """Images read lazily from ``paths`` with PIL (RGB, resized to ``img_size``), normalized."""

    def __init__(self, paths: Sequence[str], targets, img_size: int, mean=DEFAULT_MEAN, std=DEFAULT_STD):
        self.paths, self.targets = list(paths), np.asarray(targets, dtype=np.int64)
        if len(self.paths) != len(self.targets):
            raise ValueError(f"ImageFileDataset: {len(self.paths)} paths but {len(self.targets)} targets")
        self.img_size, self.mean, self.std = int(img_size), mean, std

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i):
        from PIL import Image

        with Image.open(self.paths[i]) as im:
            im = im.convert("RGB").resize((self.img_size, self.img_size), Image.BILINEAR)
            x = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)
        return _normalize(x, self.mean, self.std), int(self.targets[i])


def stratified_split(targets, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded per-class split: ``(train_idx, test_idx)``; every class keeps >= 1 train sample."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    targets = np.asarray(targets)
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(targets):
        idx = rng.permutation(np.flatnonzero(targets == c))
        k = min(int(round(len(idx) * test_fraction)), len(idx) - 1)
        test.extend(idx[:k].tolist())
        train.extend(idx[k:].tolist())
    return np.sort(np.asarray(train, dtype=np.int64)), np.sort(np.asarray(test, dtype=np.int64))


# ---------------------------------------------------------------------- sources
def load_digits(img_size: int = 32, test_fraction: float = 0.25, seed: int = 0, mean=DEFAULT_MEAN, std=DEFAULT_STD) -> LabelledData:
    """scikit-learn's bundled digits (10 classes), as 3-channel ``img_size`` images."""
    from sklearn.datasets import load_digits as _sk_digits

    if not isinstance(img_size, int) or img_size < 8:
        raise ValueError(f"load_digits: img_size must be an int >= 8, got {img_size!r}")
    d = _sk_digits()
    x = torch.tensor(d.images, dtype=torch.float32).div_(16.0).unsqueeze(1)  # [N, 1, 8, 8] in [0, 1]
    x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False).clamp_(0, 1)
    x = _normalize(x.expand(-1, 3, -1, -1).contiguous(), mean, std)
    y = np.asarray(d.target, dtype=np.int64)
    tr, te = stratified_split(y, test_fraction, seed)
    return LabelledData(
        TensorDataset(x[tr], y[tr]), TensorDataset(x[te], y[te]), 10, [str(i) for i in range(10)], "image",
        {"source": "sklearn digits", "img_size": img_size},
    )


# The globals a CIFAR python pickle may name: numpy array / dtype / scalar reconstruction (numpy 1
# and 2 spell the module differently), bytes under protocol 2, sets; nothing that runs code.
_CIFAR_GLOBALS = {
    *((f"numpy.{core}.multiarray", n) for core in ("core", "_core") for n in ("_reconstruct", "scalar")),
    *((f"numpy.{core}.numeric", "_frombuffer") for core in ("core", "_core")),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    *((b, n) for b in ("builtins", "__builtin__") for n in ("bytearray", "set", "frozenset")),
}


class _CifarUnpickler(pickle.Unpickler):
    def __init__(self, fh, path: str):
        super().__init__(fh, encoding="latin1")
        self.path = path

    def find_class(self, module: str, name: str):
        if (module, name) not in _CIFAR_GLOBALS:
            raise ValueError(
                f"load_cifar100: {self.path!r} refers to {module}.{name}, which a CIFAR pickle never holds; "
                "refusing to unpickle it (allowed: numpy arrays, dicts, lists, strings, numbers)"
            )
        if module.startswith(("numpy.core.", "numpy._core.")):  # the spelling this numpy has
            module = ("numpy._core." if hasattr(np, "_core") else "numpy.core.") + module.split(".", 2)[2]
        return super().find_class(module, name)


def _unpickle(path: str) -> dict:
    with open(path, "rb") as fh:
        try:
            d = _CifarUnpickler(fh, path).load()
        except (pickle.UnpicklingError, EOFError) as exc:
            raise ValueError(f"load_cifar100: {path!r} is not a readable CIFAR pickle ({exc})") from exc
    if not isinstance(d, dict):
        raise ValueError(f"load_cifar100: {path!r} holds a {type(d).__name__}, expected a dict (a CIFAR pickle)")
    return d


def load_cifar100(root: str, img_size: int = 32, mean=DEFAULT_MEAN, std=DEFAULT_STD) -> LabelledData:
    """CIFAR-100 from the python-pickle release under ``root`` (see the module docstring)."""
    root = os.fspath(root)
    base = root if os.path.isfile(os.path.join(root, "train")) else os.path.join(root, "cifar-100-python")
    for split in ("train", "test"):
        if not os.path.isfile(os.path.join(base, split)):
            raise FileNotFoundError(
                f"load_cifar100: no {split!r} pickle under {root!r} (expected {os.path.join(base, split)!r}; "
                "pass the directory that holds cifar-100-python/ or cifar-100-python/ itself)"
            )
    parts = {}
    for split in ("train", "test"):
        d = _unpickle(os.path.join(base, split))
        if "data" not in d or "fine_labels" not in d:
            raise ValueError(f"load_cifar100: {os.path.join(base, split)!r} lacks 'data'/'fine_labels' entries")
        data = np.asarray(d["data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise ValueError(f"load_cifar100: {split} data must be [N, 3072] uint8, got {data.shape}")
        parts[split] = (data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy(), np.asarray(d["fine_labels"], dtype=np.int64))
    names = [str(i) for i in range(100)]
    meta = os.path.join(base, "meta")
    if os.path.isfile(meta):
        names = list(_unpickle(meta).get("fine_label_names", names))
    return LabelledData(
        ArrayImageDataset(*parts["train"], img_size, mean, std),
        ArrayImageDataset(*parts["test"], img_size, mean, std),
        100, names, "image", {"source": f"cifar100:{root}", "img_size": img_size},
    )


def _class_tree(directory: str) -> dict[str, list[str]]:
    classes = sorted(e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith("."))
    out = {}
    for c in classes:
        files = []
        for dirpath, _, names in os.walk(os.path.join(directory, c)):
            files.extend(os.path.join(dirpath, n) for n in names if n.lower().endswith(IMAGE_EXTENSIONS))
        out[c] = sorted(files)
    return out


def load_image_folder(root: str, img_size: int = 224, test_fraction: float = 0.2, seed: int = 0, mean=DEFAULT_MEAN, std=DEFAULT_STD) -> LabelledData:
    """An ImageFolder-style tree (see the module docstring for the layouts understood)."""
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"load_image_folder: {root!r} is not a directory")
    test_dir = next((os.path.join(root, d) for d in ("test", "val") if os.path.isdir(os.path.join(root, d))), None)
    if os.path.isdir(os.path.join(root, "train")) and test_dir is not None:
        train_tree = _class_tree(os.path.join(root, "train"))
        classes = sorted(train_tree)
        index = {c: i for i, c in enumerate(classes)}
        ann = os.path.join(test_dir, "val_annotations.txt")
        if os.path.isfile(ann):  # Tiny-ImageNet validation layout
            test_paths, test_y = [], []
            with open(ann) as fh:
                for line in fh:
                    parts = line.strip().split("\t")
                    if len(parts) < 2:
                        continue
                    if parts[1] not in index:
                        raise ValueError(f"load_image_folder: {ann!r} names class {parts[1]!r} absent from train/")
                    test_paths.append(os.path.join(test_dir, "images", parts[0]))
                    test_y.append(index[parts[1]])
        else:
            test_tree = _class_tree(test_dir)
            extra = sorted(set(test_tree) - set(classes))
            if extra:
                raise ValueError(f"load_image_folder: {test_dir!r} has classes absent from train/: {extra[:5]}")
            test_paths = [p for c in classes for p in test_tree.get(c, [])]
            test_y = [index[c] for c in classes for _ in test_tree.get(c, [])]
        train_paths = [p for c in classes for p in train_tree[c]]
        train_y = [index[c] for c in classes for _ in train_tree[c]]
    else:
        tree = _class_tree(root)
        classes = sorted(tree)
        paths = [p for c in classes for p in tree[c]]
        ys = np.asarray([i for i, c in enumerate(classes) for _ in tree[c]], dtype=np.int64)
        tr, te = stratified_split(ys, test_fraction, seed) if len(ys) else (np.zeros(0, int), np.zeros(0, int))
        train_paths, train_y = [paths[i] for i in tr], ys[tr]
        test_paths, test_y = [paths[i] for i in te], ys[te]
    if not classes or len(train_paths) == 0:
        raise ValueError(f"load_image_folder: no class folders with images ({', '.join(IMAGE_EXTENSIONS)}) under {root!r}")
    empty = [c for c, i in zip(classes, range(len(classes))) if not np.any(np.asarray(train_y) == i)]
    if empty:
        raise ValueError(f"load_image_folder: class folders without training images under {root!r}: {empty[:5]}")
    return LabelledData(
        ImageFileDataset(train_paths, train_y, img_size, mean, std),
        ImageFileDataset(test_paths, test_y, img_size, mean, std),
        len(classes), classes, "image", {"source": f"folder:{root}", "img_size": img_size},
    )


def _read_csv(path: str) -> tuple[list[str], list[str]]:
    labels, texts = [], []
    with open(path, newline="", encoding="utf-8") as fh:
        for lineno, row in enumerate(csv.reader(fh), 1):
            if not row or all(not c.strip() for c in row):
                continue
            if lineno == 1 and [c.strip().lower() for c in row[:2]] == ["label", "text"]:
                continue
            if len(row) < 2:
                raise ValueError(f"load_csv_text: {path!r} line {lineno}: expected 'label,text', got {row!r}")
            labels.append(row[0].strip())
            texts.append(",".join(row[1:]))
    if not labels:
        raise ValueError(f"load_csv_text: {path!r} has no rows")
    return labels, texts


def load_csv_text(path: str, tokenizer, max_length: int = 128, test_fraction: float = 0.2, seed: int = 0) -> LabelledData:
    """``label,text`` CSV data tokenized with ``tokenizer`` (see the module docstring)."""
    path = os.fspath(path)
    if tokenizer is None:
        raise ValueError("load_csv_text: a tokenizer is required for text data (use --model bert)")
    if os.path.isdir(path):
        files = {s: os.path.join(path, f"{s}.csv") for s in ("train", "test")}
        for s, f in files.items():
            if not os.path.isfile(f):
                raise FileNotFoundError(f"load_csv_text: directory {path!r} has no {s}.csv")
        (tr_l, tr_t), (te_l, te_t) = _read_csv(files["train"]), _read_csv(files["test"])
    elif os.path.isfile(path):
        labels, texts = _read_csv(path)
        tr_l, tr_t, te_l, te_t = labels, texts, None, None
    else:
        raise FileNotFoundError(f"load_csv_text: no file or directory at {path!r}")
    all_labels = tr_l + (te_l or [])
    if all(l.lstrip("-").isdigit() for l in all_labels):
        classes = [str(v) for v in sorted({int(l) for l in all_labels})]
        key = lambda l: str(int(l))  # noqa: E731
    else:
        classes = sorted(set(all_labels))
        key = lambda l: l  # noqa: E731
    index = {c: i for i, c in enumerate(classes)}
    if te_l is not None:
        unseen = sorted({key(l) for l in te_l} - {key(l) for l in tr_l})
        if unseen:
            raise ValueError(f"load_csv_text: test.csv has labels absent from train.csv: {unseen[:5]}")

    def encode(texts: list[str]) -> dict[str, Tensor]:
        enc = tokenizer(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
        return {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}

    y_tr = np.asarray([index[key(l)] for l in tr_l], dtype=np.int64)
    if te_l is None:
        tr, te = stratified_split(y_tr, test_fraction, seed)
        enc = encode(tr_t)
        train = TensorDataset({k: v[tr] for k, v in enc.items()}, y_tr[tr])
        test = TensorDataset({k: v[te] for k, v in enc.items()}, y_tr[te])
    else:
        train = TensorDataset(encode(tr_t), y_tr)
        test = TensorDataset(encode(te_t), np.asarray([index[key(l)] for l in te_l], dtype=np.int64))
    return LabelledData(train, test, len(classes), classes, "text", {"source": f"csv:{path}", "max_length": max_length})


def load_data(spec: str, *, img_size: int = 32, tokenizer=None, seed: int = 0, max_length: int = 128) -> LabelledData:
    """Parse ``digits`` | ``cifar100:PATH`` | ``folder:PATH`` | ``csv:PATH`` and load it."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"data: expected 'digits', 'cifar100:PATH', 'folder:PATH' or 'csv:PATH', got {spec!r}")
    kind, _, path = spec.partition(":")
    if kind == "digits" and not path:
        return load_digits(img_size=img_size, seed=seed)
    if kind in ("cifar100", "folder", "csv"):
        if not path:
            raise ValueError(f"data: {kind!r} needs a path, as in '{kind}:/data/dir'")
        if kind == "cifar100":
            return load_cifar100(path, img_size=img_size)
        if kind == "folder":
            return load_image_folder(path, img_size=img_size, seed=seed)
        return load_csv_text(path, tokenizer, max_length=max_length, seed=seed)
    raise ValueError(f"data: unknown source {spec!r}; expected 'digits', 'cifar100:PATH', 'folder:PATH' or 'csv:PATH'")
