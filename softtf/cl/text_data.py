"""Text classification data from CSV files: one dataset (``csv:PATH``) or a folder of datasets,
one per task (``textdir:PATH``, the Soft-TF paper's five text datasets protocol).

Every CSV file holds rows ``label,text`` (an optional header row ``label,text`` is skipped; blank
rows are skipped; a text may itself hold commas). Labels may be integers (classes sorted
numerically) or strings (classes sorted). Texts are tokenized once with the model's tokenizer
(padding to ``max_length``).

``csv:PATH`` (:func:`load_csv_text`)
    ``PATH`` is a file (split into train/test per class, seeded) or a directory with
    ``train.csv`` and ``test.csv``.
``textdir:PATH`` (:func:`load_text_tasks`)
    ``PATH`` is a folder with one entry per task: ``<task>.csv`` (split per class, seeded, like a
    ``csv:`` file) or a folder ``<task>/`` holding ``train.csv`` and ``test.csv`` (used as given);
    both kinds may be mixed. The entry's name is the task's name, so it must be a valid Soft-TF
    task name (letters, digits, ``_`` and ``-``); other files and folders without CSVs are
    ignored. Each task's labels become its own classes, named ``"<task>:<label>"``; class ids are
    concatenated in task order (task 0's classes first), so equal labels of two datasets (Yelp's
    and Amazon's stars) are different classes. Task order: the ``order`` argument (``--task-order``),
    else the lines of ``PATH/order.txt`` (one task a line; blank lines and ``#`` comments
    skipped), else the sorted task names. An order may name a subset of the tasks; the others are
    left out. The result carries ``tasks = [(name, class ids), ...]``, from which the runner
    builds a :class:`~softtf.cl.scenario.TaskPerDatasetScenario`.
"""
from __future__ import annotations

import csv
import os
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from ..core.tasks import TASK_NAME
from .labelled import LabelledData, TensorDataset, stratified_split

__all__ = ["ORDER_FILE", "encode_texts", "label_classes", "load_csv_text", "load_text_tasks", "read_label_text_csv", "text_task_files"]

ORDER_FILE = "order.txt"
_LAYOUT = "<task>.csv files or <task>/ folders holding train.csv and test.csv"


def read_label_text_csv(path: str, who: str = "load_csv_text") -> tuple[list[str], list[str]]:
    """``(labels, texts)`` of a ``label,text`` CSV file; errors start with ``who`` and name the file."""
    labels, texts = [], []
    with open(path, newline="", encoding="utf-8") as fh:
        for lineno, row in enumerate(csv.reader(fh), 1):
            if not row or all(not c.strip() for c in row):
                continue
            if lineno == 1 and [c.strip().lower() for c in row[:2]] == ["label", "text"]:
                continue
            if len(row) < 2:
                raise ValueError(f"{who}: {path!r} line {lineno}: expected 'label,text', got {row!r}")
            labels.append(row[0].strip())
            texts.append(",".join(row[1:]))
    if not labels:
        raise ValueError(f"{who}: {path!r} has no rows")
    return labels, texts


def label_classes(labels: Sequence[str]) -> tuple[list[str], Callable[[str], str]]:
    """The sorted classes of ``labels`` (numerically if all are integers) and the label -> class map."""
    if all(l.lstrip("-").isdigit() for l in labels):
        return [str(v) for v in sorted({int(l) for l in labels})], lambda l: str(int(l))
    return sorted(set(labels)), lambda l: l


def encode_texts(tokenizer, texts: list[str], max_length: int) -> dict[str, Tensor]:
    """``tokenizer``'s tensors for ``texts`` padded to ``max_length`` (ids, attention mask, token types)."""
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    return {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}


def _need_tokenizer(tokenizer, who: str) -> None:
    if tokenizer is None:
        raise ValueError(f"{who}: a tokenizer is required for text data (use --model bert)")


def _one_dataset(path: str, tokenizer, max_length: int, test_fraction: float, seed: int, who: str):
    """One ``csv:``-style dataset: ``(classes, (train inputs, train y), (test inputs, test y))``."""
    if os.path.isdir(path):
        files = {s: os.path.join(path, f"{s}.csv") for s in ("train", "test")}
        for s, f in files.items():
            if not os.path.isfile(f):
                raise FileNotFoundError(f"{who}: directory {path!r} has no {s}.csv")
        (tr_l, tr_t), (te_l, te_t) = read_label_text_csv(files["train"], who), read_label_text_csv(files["test"], who)
    elif os.path.isfile(path):
        (tr_l, tr_t), te_l, te_t = read_label_text_csv(path, who), None, None
    else:
        raise FileNotFoundError(f"{who}: no file or directory at {path!r}")
    classes, key = label_classes(tr_l + (te_l or []))
    index = {c: i for i, c in enumerate(classes)}
    if te_l is not None:
        unseen = sorted({key(l) for l in te_l} - {key(l) for l in tr_l})
        if unseen:
            raise ValueError(f"{who}: {path!r}: test.csv has labels absent from train.csv: {unseen[:5]}")
    y_tr = np.asarray([index[key(l)] for l in tr_l], dtype=np.int64)
    if te_l is None:
        tr, te = stratified_split(y_tr, test_fraction, seed)
        enc = encode_texts(tokenizer, tr_t, max_length)
        return classes, ({k: v[tr] for k, v in enc.items()}, y_tr[tr]), ({k: v[te] for k, v in enc.items()}, y_tr[te])
    y_te = np.asarray([index[key(l)] for l in te_l], dtype=np.int64)
    return classes, (encode_texts(tokenizer, tr_t, max_length), y_tr), (encode_texts(tokenizer, te_t, max_length), y_te)


def load_csv_text(path: str, tokenizer, max_length: int = 128, test_fraction: float = 0.2, seed: int = 0) -> LabelledData:
    """``label,text`` CSV data tokenized with ``tokenizer`` (see the module docstring)."""
    path = os.fspath(path)
    _need_tokenizer(tokenizer, "load_csv_text")
    classes, (x_tr, y_tr), (x_te, y_te) = _one_dataset(path, tokenizer, max_length, test_fraction, seed, "load_csv_text")
    return LabelledData(TensorDataset(x_tr, y_tr), TensorDataset(x_te, y_te), len(classes), classes, "text",
                        {"source": f"csv:{path}", "max_length": max_length})


def _read_order_file(path: str) -> list[str]:
    with open(path, encoding="utf-8") as fh:
        names = [line.strip() for line in fh]
    return [n for n in names if n and not n.startswith("#")]


def _task_entries(root: str) -> dict[str, str]:
    """Every task entry of ``root``: name -> ``<name>.csv`` file or ``<name>/`` folder."""
    found: dict[str, str] = {}
    for e in sorted(os.scandir(root), key=lambda e: e.name):
        if e.name.startswith("."):
            continue
        if e.is_file() and e.name.lower().endswith(".csv"):
            name = e.name[: -len(".csv")]
        elif e.is_dir():
            present = [f for f in ("train.csv", "test.csv") if os.path.isfile(os.path.join(e.path, f))]
            if not present:
                continue  # not a task folder
            if len(present) == 1:
                missing = "test.csv" if present == ["train.csv"] else "train.csv"
                raise FileNotFoundError(f"load_text_tasks: task folder {e.path!r} has {present[0]} but no {missing}")
            name = e.name
        else:
            continue
        if name in found:
            raise ValueError(f"load_text_tasks: task {name!r} is given twice in {root!r}: {found[name]!r} and {e.path!r}; keep one")
        found[name] = e.path
    if {"train", "test"} <= set(found) and all(os.path.isfile(found[s]) for s in ("train", "test")):
        raise ValueError(
            f"load_text_tasks: {root!r} holds train.csv and test.csv: that is one dataset (use csv:{root}); "
            f"a folder of tasks holds {_LAYOUT}"
        )
    return found


def text_task_files(root: str, order: Sequence[str] | None = None) -> list[tuple[str, str]]:
    """The tasks of a ``textdir:`` folder in order, as ``[(name, path), ...]`` (nothing is read but
    the listing and ``order.txt``); raises naming the folder, file or task for every misuse."""
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"load_text_tasks: {root!r} is not a directory (expected a folder of {_LAYOUT})")
    found = _task_entries(root)
    if not found:
        raise ValueError(f"load_text_tasks: no task files in {root!r} (expected {_LAYOUT})")
    order_path = os.path.join(root, ORDER_FILE)
    if order is not None:
        if isinstance(order, str) or not all(isinstance(n, str) for n in order):
            raise TypeError(f"load_text_tasks: the task order must be a list of task names, got {order!r}")
        order, where = list(order), "the task order"
    elif os.path.isfile(order_path):
        order, where = _read_order_file(order_path), repr(order_path)
    else:
        order, where = sorted(found), None
    if not order:
        raise ValueError(f"load_text_tasks: {where} names no task (tasks in {root!r}: {', '.join(sorted(found))})")
    twice = sorted({name for name in order if order.count(name) > 1})
    if twice:
        raise ValueError(f"load_text_tasks: {where} names task {twice[0]!r} twice: {order}")
    for name in order:
        if name not in found:
            raise ValueError(
                f"load_text_tasks: {where} names task {name!r}, but {root!r} has no {name}.csv or {name}/ folder "
                f"(tasks there: {', '.join(sorted(found))})"
            )
        if not TASK_NAME.match(name):
            raise ValueError(
                f"load_text_tasks: {found[name]!r} gives the task name {name!r}, which is not a valid task name "
                "(letters, digits, '_' and '-' only); rename it"
            )
    return [(name, found[name]) for name in order]


def load_text_tasks(root: str, tokenizer, max_length: int = 128, test_fraction: float = 0.2, seed: int = 0,
                    order: Sequence[str] | None = None) -> LabelledData:
    """A folder of ``label,text`` CSV datasets, one per task, with concatenated class ids and the
    task structure in ``LabelledData.tasks`` (see the module docstring for layout and order)."""
    root = os.fspath(root)
    _need_tokenizer(tokenizer, "load_text_tasks")
    entries = text_task_files(root, order)
    class_names: list[str] = []
    tasks: list[tuple[str, list[int]]] = []
    parts: dict[str, list] = {"x_tr": [], "y_tr": [], "x_te": [], "y_te": []}
    for name, path in entries:
        classes, (x_tr, y_tr), (x_te, y_te) = _one_dataset(path, tokenizer, max_length, test_fraction, seed, "load_text_tasks")
        offset = len(class_names)
        tasks.append((name, list(range(offset, offset + len(classes)))))
        class_names.extend(f"{name}:{c}" for c in classes)
        for k, v in (("x_tr", x_tr), ("y_tr", y_tr + offset), ("x_te", x_te), ("y_te", y_te + offset)):
            parts[k].append(v)

    def joined(xs: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        return {k: torch.cat([x[k] for x in xs]) for k in xs[0]}

    train = TensorDataset(joined(parts["x_tr"]), np.concatenate(parts["y_tr"]))
    test = TensorDataset(joined(parts["x_te"]), np.concatenate(parts["y_te"]))
    info = {"source": f"textdir:{root}", "max_length": max_length, "task_order": [n for n, _ in entries]}
    return LabelledData(train, test, len(class_names), class_names, "text", info, tasks)
