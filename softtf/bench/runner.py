"""A whole benchmark run: every case of the configuration, built, measured and turned into the result dict."""
from __future__ import annotations

import contextlib
import sys
from typing import Any

import torch
from tqdm.auto import tqdm

from .candidates import Candidate, build_candidates
from .cases import Case, build_case
from .config import TASKS, BenchConfig, case_candidates, case_level
from .harness import measure_case
from .meta import loadavg, run_metadata
from .ratios import add_ratios, targets
from .report import targets_text

__all__ = ["measure"]


def _targets_text(case: Case) -> str:
    names = case.names
    if case.level in ("layer", "lora"):  # one stand-alone nn.Linear, held as "lin": say which
        lin = case.originals[names[0]]
        return f"the layer itself ({lin.in_features}->{lin.out_features})"
    if len(names) <= 2:
        return ", ".join(names)
    return f"{len(names)} layers ({names[0]} ... {names[-1]})"


def _case_result(case: Case, cands: list[Candidate]) -> dict:
    return {
        "case": case.name, "level": case.level, "description": case.description, "tokens": case.tokens,
        "batch": case.batch, "targets": case.names, "wrapped_with": case.wrap_used,
        "targets_text": _targets_text(case),
        "rows": [{"key": c.key, "label": c.label, "kind": c.kind, "config": c.config, "params": c.params,
                  "static_bytes": c.static_bytes, "tasks": {t: c.results.get(t, {"status": "missing"}) for t in TASKS}}
                 for c in cands],
    }


def _dynamo():
    """torch._dynamo, or None where this torch cannot import it. Imported here, on first use,
    because it takes over a second to import and only a run (not ``import softtf.bench``) needs it."""
    try:
        import torch._dynamo as dynamo
    except Exception:  # pragma: no cover - a torch without dynamo: the compiled rows report it
        return None
    return dynamo


def measure(config: BenchConfig) -> dict:
    """Run the benchmark described by ``config``; returns the result dict (also the JSON).
    ``config.threads`` applies to the run only: torch's thread count is restored afterwards."""
    device = config.torch_device
    threads_before = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        return _measure(config, device)
    finally:
        torch.set_num_threads(threads_before)


def _measure(config: BenchConfig, device: torch.device) -> dict:
    dynamo = _dynamo()
    if dynamo is not None:  # a compiled function per shape and grad mode
        for attr in ("recompile_limit", "cache_size_limit"):
            if hasattr(dynamo.config, attr):
                setattr(dynamo.config, attr, 64)
    result: dict[str, Any] = {"meta": run_metadata(config, device), "cases": []}
    if result["meta"]["busy_warning"]:  # said now, not only in the report minutes later
        print(result["meta"]["busy_warning"], file=sys.stderr)
    # + 1: the memory call
    calls = {level: sum(config.timing(level)) + 1 for level in ("layer", "model", "attention", "lora", "serve")}
    total = len(TASKS) * sum(len(case_candidates(c)) * calls[case_level(c)] for c in config.cases)
    pbar = tqdm(total=total, file=sys.stderr, disable=config.no_progress, dynamic_ncols=True, leave=False)
    try:
        for name in config.cases:
            pbar.set_description(f"{name}: building")
            case = build_case(name, config, device)
            cands = build_candidates(case, config, device)
            # progress accounts every candidate x task; rows that never run are ticked off now
            pbar.update(calls[case.level] * sum(1 for c in cands for t in TASKS if t not in c.fns or t in c.results))
            measure_case(case, cands, config, device, pbar)
            add_ratios(cands, config.stat)
            result["cases"].append(_case_result(case, cands))
            del case, cands  # one case alive at a time: a full-size model holds GBs
            if dynamo is not None:  # the next case compiles afresh
                with contextlib.suppress(Exception):
                    dynamo.reset()
    finally:
        pbar.close()
    result["meta"]["loadavg_end"] = loadavg()
    result["targets"] = targets(result)
    result["targets_text"] = targets_text(result["targets"])
    return result
