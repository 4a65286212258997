"""Continual-learning metrics over the accuracy matrix, exactly as METHOD.md defines them.

``A[i, j]`` is the accuracy on task ``j`` after training task ``i`` (0-based here; METHOD.md
writes tasks 1..n). Entries with ``j > i`` (tasks not seen yet) are ``NaN`` and never used.

* average accuracy after task t: ``mean_{j<=t} A[t, j]``; final ACC = that at ``t = n-1``;
* forgetting after task t (``variant="standard"``): ``mean_{j<t} (max_{j<=i<t} A[i, j] - A[t, j])``,
  the max over the *earlier* rows in which task j had been seen (METHOD.md; may be negative when a
  task improved); undefined (``NaN``) for ``t = 0``;
* ``variant="official"``: the Soft-TF / L2P code's formula, whose max also runs over the current
  row (``j <= i <= t``), so each task's forgetting is clamped at 0;
* BWT: ``mean_{j<n-1} (A[n-1, j] - A[j, j])``; undefined for a single task;
* BWT over the first ``n-1`` tasks (the last task has nothing to transfer back to);
* task-id accuracy: the percentage (0..100, the accuracy matrix's unit) of test samples whose
  inferred task equals their true task (per sample), or the mean over tasks of each task's
  percentage (per task, the official code's).

SAPT's names (Zhao et al. 2024; :func:`transfer_summary`): AP = final ACC; F.Ra = standard
forgetting; FWT = ``mean_j (A[j, j] - R[j])`` against the accuracy ``R[j]`` of a single-task run
of task j; BWT as above. Its score.py instead subtracts a hard-coded 50.94 for FWT (the single-task
scores it loads are unused) and averages BWT over all T tasks, the last one's 0 included
(``variant="official"``).

The functions over ``A`` take accuracies in whatever unit the matrix uses; the runner uses percent
(0..100) for every accuracy it records, task-id accuracies included (:data:`UNITS`).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

FORGETTING_VARIANTS = ("standard", "official")
TRANSFER_VARIANTS = ("paper", "official")
OFFICIAL_FWT_CONSTANT = 50.94  # what circle-hit/SAPT score.py subtracts from the mean diagonal

UNITS = "percent (0..100): acc, every accuracy matrix and curve, task_id_accuracy, task_id_accuracy_per_task, task_id_matrix"

# What each metric of a summary means (written into results.json beside the numbers).
DEFINITIONS = {
    "units": UNITS,
    "accuracy_matrix": "A[i][j]: accuracy (%) on task j's test set after training task i (None: task j not seen yet)",
    "acc": "mean_{j<=T-1} A[T-1, j]: average accuracy over all tasks after the last one (%)",
    "forgetting": "mean_{j<T-1} (max_{j<=i<T-1} A[i, j] - A[T-1, j]): max over earlier rows (METHOD.md; can be < 0)",
    "forgetting_official": "mean_{j<T-1} (max_{j<=i<=T-1} A[i, j] - A[T-1, j]): max includes the current row, "
                           "each task clamped at 0 (the Soft-TF / L2P code)",
    "bwt": "mean_{j<T-1} (A[T-1, j] - A[j, j]): backward transfer over the first T-1 tasks",
    "task_id_accuracy": "% of test samples (all tasks, after the last task) whose inferred task is right",
    "task_id_matrix": "T[i][j]: % of task j's test samples whose inferred task is right after training task i "
                      "(None: task j not seen yet)",
    "sapt.AP": "SAPT's average performance: the final ACC, mean_{j<=T-1} A[T-1, j]",
    "sapt.F.Ra": "SAPT's forgetting rate: mean_{j<T-1} (max_{j<=i<T-1} A[i, j] - A[T-1, j]) (= forgetting)",
    "sapt.FWT": "forward transfer: mean_{j<=T-1} (A[j, j] - R[j]), R[j] = accuracy of a single-task run of task j "
                "(RunConfig.reference_acc; None without it)",
    "sapt.BWT": "backward transfer: mean_{j<T-1} (A[T-1, j] - A[j, j]) (= bwt)",
    "sapt.FWT (official)": "circle-hit/SAPT score.py: mean_{j<=T-1} A[j, j] - 50.94 (a hard-coded constant)",
    "sapt.BWT (official)": "circle-hit/SAPT score.py: mean_{j<=T-1} (A[T-1, j] - A[j, j]), the last task's 0 included",
    "task_id_accuracy_per_task": "mean over tasks of each task's % of right task inferences, after the last "
                                 "task (the official code's average)",
}

__all__ = [
    "accuracy_matrix",
    "average_accuracy",
    "forgetting",
    "backward_transfer",
    "task_id_accuracy",
    "task_id_accuracy_per_task",
    "summarize",
    "forward_transfer",
    "backward_transfer_official",
    "transfer_summary",
    "OFFICIAL_FWT_CONSTANT",
    "TRANSFER_VARIANTS",
    "FORGETTING_VARIANTS",
    "DEFINITIONS",
    "UNITS",
]


def accuracy_matrix(A) -> np.ndarray:
    """Validate and return ``A`` as a float64 ``[n, n]`` array (NaN above the diagonal allowed)."""
    arr = np.asarray(A, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] != arr.shape[1] or arr.shape[0] == 0:
        raise ValueError(f"accuracy matrix must be square [n, n] with n >= 1, got shape {arr.shape}")
    low = np.tril(arr)
    if np.isnan(low).any():
        i, j = map(int, np.argwhere(np.isnan(low))[0])
        raise ValueError(f"accuracy matrix: A[{i}, {j}] (task {j} after training task {i}) is missing (NaN)")
    return arr


def _row(A: np.ndarray, t: int | None, fn: str) -> int:
    n = A.shape[0]
    if t is None:
        return n - 1
    if not isinstance(t, (int, np.integer)) or not -n <= t < n:
        raise ValueError(f"{fn}: t must be a task index in [{-n}, {n - 1}], got {t!r}")
    return int(t) % n


def average_accuracy(A, t: int | None = None) -> float:
    """``mean_{j<=t} A[t, j]`` (default ``t``: the last task, i.e. the final ACC)."""
    A = accuracy_matrix(A)
    t = _row(A, t, "average_accuracy")
    return float(np.mean(A[t, : t + 1]))


def forgetting(A, t: int | None = None, variant: str = "standard") -> float:
    """``mean_{j<t} (max_{j<=i<t} A[i, j] - A[t, j])`` (``"standard"``) or with the max over
    ``j <= i <= t`` (``"official"``); ``NaN`` after the first task."""
    if variant not in FORGETTING_VARIANTS:
        raise ValueError(f"forgetting: variant must be one of {FORGETTING_VARIANTS}, got {variant!r}")
    A = accuracy_matrix(A)
    t = _row(A, t, "forgetting")
    if t == 0:
        return math.nan
    last = t + 1 if variant == "official" else t
    return float(np.mean([np.max(A[j:last, j]) - A[t, j] for j in range(t)]))


def backward_transfer(A) -> float:
    """``mean_{j<n-1} (A[n-1, j] - A[j, j])``; ``NaN`` for a single task."""
    A = accuracy_matrix(A)
    n = A.shape[0]
    if n == 1:
        return math.nan
    return float(np.mean([A[n - 1, j] - A[j, j] for j in range(n - 1)]))


def forward_transfer(A, reference: Sequence[float] | None = None, variant: str = "paper") -> float | None:
    """``mean_j (A[j, j] - reference[j])`` (``"paper"``; None without a reference) or
    ``mean_j A[j, j] - 50.94`` (``"official"``, circle-hit/SAPT score.py)."""
    if variant not in TRANSFER_VARIANTS:
        raise ValueError(f"forward_transfer: variant must be one of {TRANSFER_VARIANTS}, got {variant!r}")
    A = accuracy_matrix(A)
    diag = np.diag(A)
    if variant == "official":
        return float(np.mean(diag) - OFFICIAL_FWT_CONSTANT)
    if reference is None:
        return None
    ref = np.asarray(reference, dtype=np.float64).reshape(-1)
    if ref.shape != diag.shape or not np.isfinite(ref).all():
        raise ValueError(f"forward_transfer: reference must hold {diag.size} finite accuracies (one per task), got {list(ref)}")
    return float(np.mean(diag - ref))


def backward_transfer_official(A) -> float:
    """``mean_{j<=n-1} (A[n-1, j] - A[j, j])``: circle-hit/SAPT score.py's BWT, averaged over all n
    tasks (the last term is 0), i.e. ``(n-1)/n`` times :func:`backward_transfer`."""
    A = accuracy_matrix(A)
    n = A.shape[0]
    return float(np.mean([A[n - 1, j] - A[j, j] for j in range(n)]))


def transfer_summary(A, reference: Sequence[float] | None = None, variant: str = "paper") -> dict:
    """SAPT's four metrics: ``{"AP", "F.Ra", "FWT", "BWT", "variant"}`` (None where undefined).
    ``"paper"``: FWT against the single-task ``reference``, BWT over the first T-1 tasks;
    ``"official"``: score.py's FWT (minus 50.94) and BWT (over all T)."""
    if variant not in TRANSFER_VARIANTS:
        raise ValueError(f"transfer_summary: variant must be one of {TRANSFER_VARIANTS}, got {variant!r}")
    A = accuracy_matrix(A)
    bwt = backward_transfer_official(A) if variant == "official" else _none_if_nan(backward_transfer(A))
    return {"AP": average_accuracy(A), "F.Ra": _none_if_nan(forgetting(A)), "FWT": forward_transfer(A, reference, variant),
            "BWT": bwt, "variant": variant}


def task_id_accuracy(predicted: Sequence[int], true: Sequence[int]) -> float:
    """Percentage (0..100) of samples whose inferred task equals the true task."""
    p, y = np.asarray(predicted).reshape(-1), np.asarray(true).reshape(-1)
    if p.shape != y.shape:
        raise ValueError(f"task_id_accuracy: predicted has {p.size} entries, true has {y.size}")
    if p.size == 0:
        raise ValueError("task_id_accuracy: no samples")
    return float(100.0 * np.count_nonzero(p == y) / p.size)


def task_id_accuracy_per_task(correct: Sequence[float], total: Sequence[float]) -> float:
    """Mean over tasks of ``100 * correct[j] / total[j]``, in percent (tasks with no samples are skipped)."""
    c, n = np.asarray(correct, dtype=np.float64).reshape(-1), np.asarray(total, dtype=np.float64).reshape(-1)
    if c.shape != n.shape:
        raise ValueError(f"task_id_accuracy_per_task: correct has {c.size} entries, total has {n.size}")
    if (c < 0).any() or (c > n).any():
        raise ValueError("task_id_accuracy_per_task: need 0 <= correct <= total for every task")
    has = n > 0
    if not has.any():
        raise ValueError("task_id_accuracy_per_task: no samples")
    return float(np.mean(100.0 * c[has] / n[has]))


def _none_if_nan(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x


def summarize(A) -> dict:
    """The JSON-ready summary: final ACC, both forgettings, BWT and their curves over tasks, and
    the matrix itself (NaN -> None)."""
    A = accuracy_matrix(A)
    n = A.shape[0]
    return {
        "acc": average_accuracy(A),
        "forgetting": _none_if_nan(forgetting(A)),
        "forgetting_official": _none_if_nan(forgetting(A, variant="official")),
        "bwt": _none_if_nan(backward_transfer(A)),
        "acc_curve": [average_accuracy(A, t) for t in range(n)],
        "forgetting_curve": [_none_if_nan(forgetting(A, t)) for t in range(n)],
        "forgetting_official_curve": [_none_if_nan(forgetting(A, t, "official")) for t in range(n)],
        "accuracy_matrix": [[None if math.isnan(v) else float(v) for v in row] for row in A.tolist()],
    }
