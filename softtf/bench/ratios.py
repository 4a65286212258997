"""Ratios measured in one run (the result that matters): time to the frozen floor, to LoRA(matched)
and to the eager reference, and peak memory to the eager reference; then the issue's targets on them
(reported, never asserted)."""
from __future__ import annotations

from .candidates import Candidate
from .config import EAGER, FLOOR, LORA_REF, STATS, TASKS

__all__ = ["TARGET_CHECKS", "add_ratios", "targets"]

# (name, task, ratio key, limit): Soft-TF under the default backend at model level
TARGET_CHECKS = (("train <= 1.2x LoRA(matched)", "train", "ratio_lora", 1.2),
                 ("infer <= 1.15x floor", "infer", "ratio_floor", 1.15),
                 ("train peak memory < eager", "train", "peak_ratio_eager", 1.0))


def _ok(cand: Candidate | None, task: str) -> dict | None:
    r = cand.results.get(task) if cand is not None else None
    return r if r and r.get("status") == "ok" else None


def add_ratios(cands: list[Candidate], stat: str = "median") -> None:
    """``ratio_floor_<s>`` / ``ratio_lora_<s>`` / ``ratio_eager_<s>`` from statistic s ("median", "min")
    of each candidate's times (gid's floor is the floor's infer; LoRA and eager: the same task),
    ``ratio_floor`` / ``ratio_lora`` / ``ratio_eager`` those of ``stat``, and ``peak_ratio_eager``, on
    every row that ran (a ratio is None where its reference did not run)."""
    by = {c.key: c for c in cands}

    def ms(key: str, task: str, s: str):
        r = _ok(by.get(key), task)
        return r[f"{s}_ms"] if r else None

    for c in cands:
        for task in TASKS:
            r = _ok(c, task)
            if not r:
                continue
            for s in STATS:
                refs = {"floor": ms(FLOOR, "infer" if task == "gid" else task, s), "lora": ms(LORA_REF, task, s),
                        "eager": ms(EAGER, task, s)}
                for name, ref in refs.items():
                    r[f"ratio_{name}_{s}"] = r[f"{s}_ms"] / ref if ref else None
            for name in ("floor", "lora", "eager"):
                r[f"ratio_{name}"] = r[f"ratio_{name}_{stat}"]
            eager = _ok(by.get(EAGER), task)
            pe, pm = (eager or {}).get("peak_bytes"), r.get("peak_bytes")
            r["peak_ratio_eager"] = pm / pe if (pe and pm is not None) else None


def targets(result: dict) -> list[dict]:
    """The issue's CPU targets for the default backend at model level, from the ratios of ``stat``
    and (time targets) of the minimum of the timed calls, the less noisy on a loaded machine."""
    out = []
    soft_key = f"softtf[{result['meta']['default_backend']}]"
    for case in result["cases"]:
        if case["level"] != "model":
            continue
        rows = {r["key"]: r for r in case["rows"]}
        s = rows.get(soft_key, {}).get("tasks", {})
        for name, task, key, lim in TARGET_CHECKS:
            r = s.get(task, {})
            v = r.get(key)
            vmin = r.get(key + "_min") if key != "peak_ratio_eager" else None
            met = None if v is None else (v <= lim if "<=" in name else v < lim)
            out.append({"case": case["case"], "candidate": soft_key, "target": name, "value": v, "value_min": vmin,
                        "limit": lim, "met": met})
    return out
