"""The result as text: the terminal table (also ``bench.txt``), Markdown (``bench.md``), target lines.
Everything is read from the result dict (the JSON), so a saved ``bench.json`` formats the same. The
attention cases have their own columns: forward and forward+backward, each with its time to SDPA
without prefix and to the eager composite, and its peak memory to the eager composite's; the
routed-LoRA cases the same columns against the frozen nn.Linear and the PEFT loop."""
from __future__ import annotations

__all__ = ["format_markdown", "format_table", "targets_text"]

# level -> (floor's short name, eager row's short name, legend) of the paired fwd / fwd+bwd tables
_PAIRED = {
    "attention": ("SDPA", "eager",
                  "fwd: no_grad forward; fwd+bwd: forward + backward to qkv and the prompt (+ Adam on it); "
                  "x SDPA: time / SDPA without prefix (the frozen model); "
                  "x eager: time or peak / the eager composite's"),
    "lora": ("frozen", "loop",
             "fwd: no_grad forward; fwd+bwd: forward + backward to x, A, B and the routing weights "
             "(+ Adam on A, B, weights); x frozen: time / the frozen nn.Linear's; "
             "x loop: time or peak / the PEFT loop's"),
    "serve": ("floor", "grouped",
              "fwd: no_grad forward of the whole mixed batch; fwd+bwd: n/a (serving); x floor: time / the frozen "
              "model's (masks off); x grouped: time or peak / one call per task present"),
}


def _mib(b) -> str:
    return "-" if b is None else f"{b / 2**20:.1f}"


def _num(v, fmt="{:.2f}") -> str:
    return "-" if v is None else fmt.format(v)


def _ms(v: float) -> str:
    return f"{v:.3f}" if v < 1 else f"{v:.2f}" if v < 10 else f"{v:.1f}" if v < 1000 else f"{v:.0f}"


class _Cells:
    """Table cells of one result row's tasks; times are the run's statistic (``--stat``)."""

    def __init__(self, stat: str):
        self.stat = stat

    def __call__(self, r: dict | None, kind: str) -> str:
        if not r:
            return "-"
        if r.get("status") != "ok":
            return {"n/a": "n/a", "skipped": "skip", "failed": "FAIL"}.get(r.get("status"), "?")
        if kind == "ms":
            return _ms(r[self.stat + "_ms"])
        return _num(r.get(kind))

    @staticmethod
    def peak(r: dict | None) -> str:
        return _mib(r.get("peak_bytes")) if r and r.get("status") == "ok" else "-"


def _params_text(n: int) -> str:
    if n >= 1e6:
        return f"{n / 1e6:.2f}M"
    if n >= 1e3:
        return f"{n / 1e3:.1f}k"
    return str(n)


def _stat(result: dict) -> str:
    return result["meta"]["args"].get("stat", "median")


def format_table(result: dict) -> str:
    meta = result["meta"]
    stat = _stat(result)
    cell = _Cells(stat)
    lines = [f"softtf bench  device: {meta['device_name']}  torch {meta['versions']['torch']}  "
             f"threads {meta['threads']}  load avg {meta['loadavg_start']} -> {meta['loadavg_end']}",
             "versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()),
             f"times: {stat} of the timed calls (ms); x floor = time / frozen layer-model time (gid: / floor infer); "
             "x LoRA = time / LoRA(matched) time, same task, same run. peak = MiB allocated during one train step above "
             "the live level before it; static = candidate-owned tensors (trainable + stored task masks + Adam state)."]
    if meta.get("busy_warning"):
        lines.append(meta["busy_warning"])
    hdr = (f"{'candidate':<28} {'infer ms':>9} {'x floor':>7} {'x LoRA':>6} | {'train ms':>9} {'x floor':>7} "
           f"{'x LoRA':>6} {'peak MiB':>8} {'x eager':>7} | {'gid ms':>8} {'x fl.fwd':>8} | "
           f"{'trainable':>9} {'MiB/task':>8} {'static MiB':>10}")
    for case in result["cases"]:
        if case["level"] in _PAIRED:
            lines += _attention_text(case, cell)
            continue
        lines += ["", f"== {case['case']} ({case['level']}): {case['description']}; {case['tokens']} tokens/call; "
                      f"targets: {case['targets_text']}", hdr, "-" * len(hdr)]
        for row in case["rows"]:
            t = row["tasks"]
            i, tr, g = t.get("infer"), t.get("train"), t.get("gid")
            p = row["params"]
            lines.append(
                f"{row['label'][:28]:<28} {cell(i, 'ms'):>9} {cell(i, 'ratio_floor'):>7} {cell(i, 'ratio_lora'):>6} | "
                f"{cell(tr, 'ms'):>9} {cell(tr, 'ratio_floor'):>7} {cell(tr, 'ratio_lora'):>6} "
                f"{cell.peak(tr):>8} "
                f"{cell(tr, 'peak_ratio_eager'):>7} | {cell(g, 'ms'):>8} {cell(g, 'ratio_floor'):>8} | "
                f"{_params_text(p.get('trainable', 0)):>9} {p.get('bytes_per_task', 0) / 2**20:>8.2f} "
                f"{row['static_bytes'] / 2**20:>10.1f}")
        lines += _notes(case)
    if result.get("targets_text"):  # model cases only
        lines.append("")
        lines.append(f"targets (model level, softtf[{meta['default_backend']}], same run; reported, not asserted):")
        lines.extend("  " + t for t in result["targets_text"])
    return "\n".join(lines)


def _notes(case: dict) -> list[str]:
    notes = [f"  {row['key']}: {task}: {r['status']} ({r.get('reason', '')})" for row in case["rows"]
             for task, r in row["tasks"].items() if r.get("status") in ("failed", "skipped")]
    return ["notes:", *dict.fromkeys(notes)] if notes else []  # each once, in order


def _attention_text(case: dict, cell: _Cells) -> list[str]:
    """The paired fwd / fwd+bwd table of an attention or routed-LoRA case."""
    fl, eg, legend = _PAIRED[case["level"]]
    fl, eg = "x " + fl, "x " + eg
    hdr = (f"{'candidate':<28} {'fwd ms':>9} {fl:>8} {eg:>7} {'peak MiB':>8} {eg:>7} | "
           f"{'fwd+bwd ms':>10} {fl:>8} {eg:>7} {'peak MiB':>8} {eg:>7} | {'trainable':>9}")
    lines = ["", f"== {case['case']} ({case['level']}): {case['description']}; {case['tokens']} tokens/call",
             "   " + legend, hdr, "-" * len(hdr)]
    for row in case["rows"]:
        i, tr = row["tasks"].get("infer"), row["tasks"].get("train")
        lines.append(f"{row['label'][:28]:<28} {cell(i, 'ms'):>9} {cell(i, 'ratio_floor'):>8} "
                     f"{cell(i, 'ratio_eager'):>7} {cell.peak(i):>8} {cell(i, 'peak_ratio_eager'):>7} | "
                     f"{cell(tr, 'ms'):>10} {cell(tr, 'ratio_floor'):>8} {cell(tr, 'ratio_eager'):>7} "
                     f"{cell.peak(tr):>8} {cell(tr, 'peak_ratio_eager'):>7} | "
                     f"{_params_text(row['params'].get('trainable', 0)):>9}")
    return lines + _notes(case)


def _attention_markdown(case: dict, cell: _Cells) -> list[str]:
    fl, eg, _ = _PAIRED[case["level"]]
    out = [f"**{case['case']}** ({case['level']}): {case['description']}; {case['tokens']} tokens per call", "",
           f"| candidate | fwd ms | ×{fl} | ×{eg} | fwd peak MiB | ×{eg} | fwd+bwd ms | ×{fl} | ×{eg} "
           f"| fwd+bwd peak MiB | ×{eg} | trainable |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in case["rows"]:
        i, tr = row["tasks"].get("infer"), row["tasks"].get("train")
        if all(r.get("status") in ("skipped", "failed") for r in (i or {}, tr or {})):
            continue
        out.append(f"| {row['label']} | {cell(i, 'ms')} | {cell(i, 'ratio_floor')} | {cell(i, 'ratio_eager')} | "
                   f"{cell.peak(i)} | {cell(i, 'peak_ratio_eager')} | {cell(tr, 'ms')} | {cell(tr, 'ratio_floor')} | "
                   f"{cell(tr, 'ratio_eager')} | {cell.peak(tr)} | {cell(tr, 'peak_ratio_eager')} | "
                   f"{_params_text(row['params'].get('trainable', 0))} |")
    return out


def format_markdown(result: dict) -> str:
    """The table as Markdown (written to OUTPUT/bench.md; bench/README.md shows one)."""
    meta = result["meta"]
    cell = _Cells(_stat(result))
    out = [f"Device: {meta['device_name']}; torch {meta['versions']['torch']}, timm {meta['versions']['timm']}, "
           f"transformers {meta['versions']['transformers']}, peft {meta['versions']['peft']}; "
           f"load average {meta['loadavg_start']} -> {meta['loadavg_end']}; {meta['date']}.", ""]
    if meta.get("busy_warning"):
        out[-1:-1] = ["", f"**{meta['busy_warning']}**"]
    for case in result["cases"]:
        if case["level"] in _PAIRED:
            out += _attention_markdown(case, cell)
            out += _not_run(case)
            continue
        out.append(f"**{case['case']}** ({case['level']}): {case['description']}; {case['tokens']} tokens per call; "
                   f"Soft-TF on {case['targets_text']}")
        out.append("")
        out.append("| candidate | infer ms | ×floor | ×LoRA | train ms | ×floor | ×LoRA | train peak MiB | ×eager "
                   "| GID ms | ×floor fwd | trainable | MiB/task |")
        out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for row in case["rows"]:
            t = row["tasks"]
            if all(r.get("status") in ("skipped", "failed") for r in t.values()):
                continue
            i, tr, g = t.get("infer"), t.get("train"), t.get("gid")
            p = row["params"]
            out.append(f"| {row['label']} | {cell(i, 'ms')} | {cell(i, 'ratio_floor')} | {cell(i, 'ratio_lora')} | "
                       f"{cell(tr, 'ms')} | {cell(tr, 'ratio_floor')} | {cell(tr, 'ratio_lora')} | {cell.peak(tr)} | "
                       f"{cell(tr, 'peak_ratio_eager')} | {cell(g, 'ms')} | {cell(g, 'ratio_floor')} | "
                       f"{_params_text(p.get('trainable', 0))} | {p.get('bytes_per_task', 0) / 2**20:.2f} |")
        out += _not_run(case)
    if result.get("targets_text"):  # model cases only
        out.append(f"Targets (model level, softtf[{meta['default_backend']}], same run):")
        out.append("")
        out.extend(f"- {t}" for t in result["targets_text"])
    return "\n".join(out) + "\n"


def _not_run(case: dict) -> list[str]:
    skipped = sorted({f"{row['key']} ({r.get('reason')})" for row in case["rows"] for r in row["tasks"].values()
                      if r.get("status") in ("skipped", "failed")})
    return (["", "Not run: " + "; ".join(skipped) + "."] if skipped else []) + [""]


def targets_text(targets: list[dict]) -> list[str]:
    """One line per target of :func:`softtf.bench.ratios.targets`."""
    text = []
    for t in targets:
        extra = f" (min-based {t['value_min']:.2f})" if t["value_min"] is not None else ""
        met = t["met"]
        text.append(f"{t['case']} {t['target']}: {_num(t['value'])}{extra} -> "
                    f"{'met' if met else 'MISSED' if met is not None else 'n/a'}")
    return text
