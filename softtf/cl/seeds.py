"""Repeated runs: one run directory per seed, and the mean and standard deviation of every metric.

``softtf train --seeds 0 1 2 --output DIR`` runs the experiment into ``DIR/seed-0``, ``DIR/seed-1``,
... (each resumable on its own) and writes ``DIR/summary.json`` from their ``results.json`` with
:func:`aggregate`: for every scalar metric, of the summary head and of each head, the per-seed
values, their mean and their sample standard deviation (ddof = 1; None for a single seed), in the
records' units (percent for every accuracy, task-id accuracies included: ``units``).
"""
from __future__ import annotations

import math
import os

import numpy as np

from ..core.files import write_json
from .metrics import UNITS

__all__ = ["SCALAR_METRICS", "LABELS", "seed_directory", "aggregate", "write_summary"]

SCALAR_METRICS = ("acc", "forgetting", "forgetting_official", "bwt", "task_id_accuracy", "task_id_accuracy_per_task")
HEAD_METRICS = ("acc", "forgetting", "forgetting_official", "bwt")
TRANSFER_METRICS = ("AP", "F.Ra", "FWT", "BWT")  # SAPT's names, under "sapt" in every summary
# what must agree between the runs of one summary
LABELS = ("method", "task_id_mode", "task_id_label", "protocol", "head", "n_tasks")


def seed_directory(output: str | os.PathLike, seed: int) -> str:
    """The run directory of ``seed`` inside a multi-seed ``output`` directory."""
    return os.path.join(os.fspath(output), f"seed-{seed}")


def _stats(values: list) -> dict:
    known = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if len(known) != len(values):  # undefined for some seed (e.g. forgetting of a single task)
        return {"values": values, "mean": None, "std": None}
    arr = np.asarray(known, dtype=np.float64)
    return {"values": known, "mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if arr.size > 1 else None}


def _transfer_stats(summaries: list[dict]) -> dict | None:
    """Mean and std of SAPT's AP / F.Ra / FWT / BWT over seeds (None if a record has none)."""
    blocks = [rec.get("sapt") for rec in summaries]
    if any(b is None for b in blocks):
        return None
    return {"variant": blocks[0].get("variant"), **{m: _stats([b.get(m) for b in blocks]) for m in TRANSFER_METRICS}}


def aggregate(records: list[dict], seeds: list[int]) -> dict:
    """Mean and standard deviation over the ``results.json`` records of one experiment's seeds."""
    if not records or len(records) != len(seeds):
        raise ValueError(f"aggregate: need one record per seed, got {len(records)} records for seeds {seeds}")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"aggregate: seeds must be distinct, got {seeds}")
    first = records[0]
    for seed, rec in zip(seeds, records):
        differ = [k for k in LABELS if rec.get(k) != first.get(k)]
        if differ:
            raise ValueError(f"aggregate: the run of seed {seed} differs from the first in {differ}; a summary is of one experiment")
    return {
        **{k: first.get(k) for k in LABELS},
        "seeds": list(seeds),
        "std_definition": "sample standard deviation over seeds (ddof=1); None with one seed",
        "units": UNITS,
        "metrics": {m: _stats([rec.get(m) for rec in records]) for m in SCALAR_METRICS},
        "sapt": _transfer_stats(records),
        "heads": {
            head: {**{m: _stats([rec["heads"][head].get(m) for rec in records]) for m in HEAD_METRICS},
                   "sapt": _transfer_stats([rec["heads"][head] for rec in records])}
            for head in first.get("heads", {})
        },
    }


def write_summary(output: str | os.PathLike, records: list[dict], seeds: list[int]) -> dict:
    """Aggregate and write ``output/summary.json`` atomically; returns the summary."""
    summary = aggregate(records, seeds)
    summary["runs"] = [seed_directory(output, s) for s in seeds]
    write_json(os.path.join(os.fspath(output), "summary.json"), summary)
    return summary
