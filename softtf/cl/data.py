"""Data sources for the continual-learning runner, and ``load_data``, which parses ``--data``.

Image sources (this module) and text sources (:mod:`softtf.cl.text_data`); every source returns a
:class:`~softtf.cl.labelled.LabelledData` (re-exported here with ``TensorDataset``,
``targets_of`` and ``stratified_split``).

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
``textdir:PATH``
    a folder of such CSV datasets, one per task (``<task>.csv`` or ``<task>/{train,test}.csv``):
    each dataset's labels are its task's classes, concatenated in task order (``task_order``,
    else ``PATH/order.txt``, else sorted names); see :func:`~softtf.cl.text_data.load_text_tasks`.

Every dataset yields ``(inputs, label)`` with ``inputs`` a float image tensor [3, S, S] or a dict
of token tensors, and exposes ``targets`` (an int64 numpy array) for splitting into tasks.
"""
from __future__ import annotations

import os
import pickle
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from .labelled import LabelledData, TensorDataset, stratified_split, targets_of
from .text_data import load_csv_text, load_text_tasks

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
    "load_text_tasks",
    "load_data",
    "stratified_split",
    "IMAGE_EXTENSIONS",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
DEFAULT_MEAN = (0.5, 0.5, 0.5)
DEFAULT_STD = (0.5, 0.5, 0.5)


def _normalize(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    m = torch.tensor(mean, dtype=x.dtype).view(-1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(-1, 1, 1)
    return (x - m) / s


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


def load_data(spec: str, *, img_size: int = 32, tokenizer=None, seed: int = 0, max_length: int = 128,
              task_order: Sequence[str] | None = None) -> LabelledData:
    """Parse ``digits`` | ``cifar100:PATH`` | ``folder:PATH`` | ``csv:PATH`` | ``textdir:PATH`` and
    load it; ``task_order`` (task names) applies to ``textdir:`` only."""
    expected = "'digits', 'cifar100:PATH', 'folder:PATH', 'csv:PATH' or 'textdir:PATH'"
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"data: expected {expected}, got {spec!r}")
    kind, _, path = spec.partition(":")
    if task_order is not None and kind != "textdir":
        raise ValueError(f"data: a task order applies to 'textdir:PATH' data only, got {spec!r}")
    if kind == "digits" and not path:
        return load_digits(img_size=img_size, seed=seed)
    if kind in ("cifar100", "folder", "csv", "textdir"):
        if not path:
            raise ValueError(f"data: {kind!r} needs a path, as in '{kind}:/data/dir'")
        if kind == "cifar100":
            return load_cifar100(path, img_size=img_size)
        if kind == "folder":
            return load_image_folder(path, img_size=img_size, seed=seed)
        if kind == "textdir":
            return load_text_tasks(path, tokenizer, max_length=max_length, seed=seed, order=task_order)
        return load_csv_text(path, tokenizer, max_length=max_length, seed=seed)
    raise ValueError(f"data: unknown source {spec!r}; expected {expected}")
