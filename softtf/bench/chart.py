"""The PNG: per case, bars of each candidate's time over the frozen floor, per task."""
from __future__ import annotations

from .config import TASKS

__all__ = ["plot"]

_COLORS = {"infer": "#4C72B0", "train": "#DD8452", "gid": "#55A868"}


def plot(result: dict, path: str) -> None:
    # matplotlib: optional heavy dependency (softtf[models]), only for the picture
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    cases = result["cases"]
    fig, axes = plt.subplots(len(cases), 1, figsize=(11, 3.2 * len(cases)), squeeze=False)
    for ax, case in zip(axes[:, 0], cases):
        rows = [r for r in case["rows"] if any(t.get("status") == "ok" for t in r["tasks"].values())]
        ys = range(len(rows))
        h = 0.27
        vmax = 1.0
        for j, task in enumerate(TASKS):
            vals = [(r["tasks"].get(task) or {}).get("ratio_floor") or 0.0 for r in rows]
            vmax = max([vmax] + vals)
            ax.barh([y + (j - 1) * h for y in ys], vals, height=h, color=_COLORS[task],
                    label=f"{task} (x floor{' fwd' if task == 'gid' else ''})")
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_yticks(list(ys))
        ax.set_yticklabels([r["label"] for r in rows], fontsize=8)
        ax.invert_yaxis()
        if vmax > 12:
            ax.set_xscale("log")
        ax.set_title(f"{case['case']}: {case['description']}", fontsize=9)
        ax.set_xlabel("time / frozen floor (same run; lower is better)", fontsize=8)
        ax.legend(fontsize=7, loc="lower right")
    meta = result["meta"]
    fig.suptitle(f"softtf bench on {meta['device_name']}, torch {meta['versions']['torch']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
