"""The PNG: per case, each candidate's time over the frozen floor per task (left) and its peak memory
per train step (right). Cases of one level share one time scale, so bars compare across cases;
candidates that did not run stay in the chart, labelled with why."""
from __future__ import annotations

from .config import TASKS

__all__ = ["plot"]

_COLORS = {"infer": "#4C72B0", "train": "#DD8452", "gid": "#55A868"}
_H = 0.27  # bar height of one task; three tasks side by side per candidate


def _status(row: dict) -> str | None:
    """None when some task ran, else the reason none did (shown in place of the bars)."""
    tasks = row["tasks"].values()
    if any(t.get("status") == "ok" for t in tasks):
        return None
    reasons = {t.get("reason") or t.get("status", "missing") for t in tasks if t.get("status") != "n/a"}
    return "skipped: " + "; ".join(sorted(r for r in reasons if r)) if reasons else "not applicable"


def _level_limits(cases: list[dict]) -> dict[str, tuple[float, bool]]:
    """Per case level: (largest time ratio of any candidate and task, whether to use a log scale)."""
    out: dict[str, tuple[float, bool]] = {}
    for case in cases:
        vals = [(t or {}).get("ratio_floor") or 0.0 for r in case["rows"] for t in r["tasks"].values()]
        top = max([1.0, *vals])
        prev = out.get(case["level"], (1.0, False))[0]
        top = max(top, prev)
        out[case["level"]] = (top, top > 12)
    return out


def plot(result: dict, path: str) -> None:
    # matplotlib: optional heavy dependency (softtf[models]), only for the picture
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    cases = result["cases"]
    limits = _level_limits(cases)
    heights = [max(2.4, 0.42 * len(c["rows"]) + 1.2) for c in cases]
    fig, axes = plt.subplots(len(cases), 2, figsize=(14, sum(heights)), squeeze=False,
                             gridspec_kw={"width_ratios": [3, 1.3], "height_ratios": heights})
    for (ax, mem_ax), case in zip(axes, cases):
        rows = case["rows"]
        ys = list(range(len(rows)))
        top, log = limits[case["level"]]
        for j, task in enumerate(TASKS):
            vals = [(r["tasks"].get(task) or {}).get("ratio_floor") or 0.0 for r in rows]
            if not any(vals):
                continue
            ax.barh([y + (j - 1) * _H for y in ys], vals, height=_H, color=_COLORS[task],
                    label=f"{task} (x floor{' fwd' if task == 'gid' else ''})")
        ax.axvline(1.0, color="k", lw=0.8)
        if log:
            ax.set_xscale("log")
            ax.set_xlim(0.5, top * 1.3)
        else:
            ax.set_xlim(0, top * 1.08)
        for y, r in zip(ys, rows):
            why = _status(r)
            if why:
                ax.text(0.55 if log else 0.02 * top, y, why[:90],
                        va="center", fontsize=7, color="0.35", style="italic")
        ax.set_yticks(ys)
        ax.set_yticklabels([r["label"] for r in rows], fontsize=8)
        ax.invert_yaxis()
        ax.set_title(f"{case['case']}: {case['description']}", fontsize=8, loc="left")
        ax.set_xlabel(f"time / frozen floor (same run; lower is better; one {'log ' if log else ''}scale for every "
                      f"{case['level']} case)", fontsize=7)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)

        mib = [((r["tasks"].get("train") or {}).get("peak_bytes") or 0) / 2**20 for r in rows]
        mem_ax.barh(ys, mib, height=0.6, color="#8172B2")
        mem_ax.set_yticks(ys)
        mem_ax.set_yticklabels([])
        mem_ax.invert_yaxis()
        mem_ax.set_xlabel("train step peak memory (MiB)", fontsize=7)
        mem_ax.tick_params(labelsize=7)
    meta = result["meta"]
    fig.suptitle(f"softtf bench on {meta['device_name']}, torch {meta['versions']['torch']}", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / sum(heights)))  # room for the suptitle
    fig.savefig(path, dpi=110)
    plt.close(fig)
