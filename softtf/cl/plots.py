"""Plots of a continual-learning run (matplotlib, Agg backend; files only, no display)."""
from __future__ import annotations

import os

import numpy as np

from ..core.files import atomic_write
from .metrics import accuracy_matrix, average_accuracy

__all__ = ["plot_accuracy_matrix", "plot_accuracy_curve"]


def _pyplot():
    import matplotlib  # optional heavy dependency: loaded only when a plot is drawn

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))


def plot_accuracy_matrix(A, path: str | os.PathLike, title: str = "") -> None:
    """Heat map of ``A[i, j]`` (accuracy on task j after training task i), values annotated."""
    A = accuracy_matrix(A)
    plt = _pyplot()
    n = A.shape[0]
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * n, 0.8 + 0.6 * n))
    im = ax.imshow(np.ma.masked_invalid(A), vmin=0, vmax=100, cmap="viridis")
    for i in range(n):
        for j in range(i + 1):
            ax.text(j, i, f"{A[i, j]:.0f}", ha="center", va="center", color="w" if A[i, j] < 60 else "k", fontsize=8)
    ax.set_xlabel("evaluated task j")
    ax.set_ylabel("after training task i")
    ax.set_xticks(range(n), [str(j + 1) for j in range(n)])
    ax.set_yticks(range(n), [str(i + 1) for i in range(n)])
    final = average_accuracy(A, n - 1)  # ACC: the last row's mean, what the summary reports
    ax.set_title(f"{title}\nfinal ACC {final:.2f} %" if title else f"accuracy matrix A[i, j], final ACC {final:.2f} %",
                 fontsize=9)
    cbar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    cbar.set_label("accuracy on task j (%)", fontsize=8)
    _save(fig, os.fspath(path))
    plt.close(fig)


def plot_accuracy_curve(A, path: str | os.PathLike, title: str = "", main: str | None = None) -> None:
    """Average accuracy over seen tasks and accuracy on each task, as tasks are learned.

    ``A``: one matrix, or ``{head: matrix}`` (the per-task lines of ``main``, an average line per head)."""
    mats = {main or "": A} if not isinstance(A, dict) else A
    main = main if main in mats else next(iter(mats))
    mats = {k: accuracy_matrix(v) for k, v in mats.items()}
    plt = _pyplot()
    n = mats[main].shape[0]
    x = np.arange(1, n + 1)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for j in range(n):
        ax.plot(x[j:], mats[main][j:, j], color="0.7", lw=1, marker=".", label="per task" + (f" (head {main})" if main else "") if j == 0 else None)
    for i, (head, a) in enumerate(mats.items()):
        label = "average over seen tasks" + (f", head {head}" if head else "")
        ax.plot(x, [average_accuracy(a, t) for t in range(n)], color=f"C{i}", lw=2 if head == main else 1.2,
                ls="-" if head == main else "--", marker="o", label=label)
    ax.set_xlabel("tasks learned")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 101)
    ax.set_xticks(x)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    ax.set_title(title or "accuracy over tasks", fontsize=9)
    _save(fig, os.fspath(path))
    plt.close(fig)
