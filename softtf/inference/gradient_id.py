"""Task inference by gradient (Gradient ID, from SupSup), batch-level and per sample.

Every masked layer runs with the superposed mask Σ_t α_t M_t at α_t = 1/T. The entropy H of the
softmax output is differentiated with respect to α; the task whose coefficient most decreases the
entropy (argmin_t ∂H/∂α_t) is inferred. One backward pass gives every layer's contribution through
the fused ``mask_mixture_grad`` op. Per sample, α is [B, T] with equal rows: the forward is the
same batch, and ∂H_b/∂α_b only sees sample b because samples do not interact.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from ..core.batch import batch_size, call_model, device_of, take_rows
from ..core.layer import SoftLinear, preserve_modes, soft_layers, use_tasks

__all__ = ["GradientIDResult", "gradient_id", "predict_with_tasks", "entropy"]

RULES = ("sample", "batch", "binary", "binary-sample")


@dataclass
class GradientIDResult:
    scores: Tensor  # [B, T] ∂H/∂α (lower = more likely); the k-shot scores repeated for "batch"
    task_index: Tensor  # [B] long, index into tasks
    tasks: list[str]

    @property
    def task_names(self) -> list[str]:
        return [self.tasks[i] for i in self.task_index.tolist()]


def _layers(model: nn.Module) -> list[SoftLinear]:
    layers = list(soft_layers(model).values())
    if not layers:
        raise ValueError("model has no SoftLinear layers: wrap it first (softtf.wrap)")
    return layers


def _candidate_tasks(layers: list[SoftLinear], tasks: Sequence[str] | None) -> list[str]:
    learned = layers[0].frozen_tasks
    for layer in layers[1:]:
        if layer.frozen_tasks != learned:
            raise ValueError("SoftLinear layers disagree on their frozen tasks; freeze tasks on the whole model")
    if tasks is None:
        tasks = learned
    tasks = list(tasks)
    if not tasks:
        raise ValueError("Gradient ID needs at least one learned (frozen) task; freeze trained tasks first")
    for t in tasks:
        if t not in learned:
            raise ValueError(f"task {t!r} is not a learned (frozen) task; candidates are {learned}")
    return tasks


def _logits(out: Any) -> Tensor:
    logits = getattr(out, "logits", out)
    if not isinstance(logits, Tensor) or logits.dim() != 2:
        got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"forward_fn must return logits [B, C] (or an object with .logits), got {got}")
    return logits


def entropy(logits: Tensor, topk: int | None = None) -> Tensor:
    """Per-sample entropy of softmax(logits) [B], over the top-k logits if ``topk`` is given."""
    if topk is not None:
        if not 1 <= topk <= logits.shape[-1]:
            raise ValueError(f"topk must lie in [1, {logits.shape[-1]}], got {topk}")
        logits = logits.topk(topk, dim=-1).values
    logp = logits.float().log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


def _scores(model, layers, forward_fn, inputs, tasks, alpha, topk, rows: Sequence[int]) -> Tensor:
    """∂H/∂α for ``inputs`` (samples ``rows`` of the caller's batch); refuses non-finite ones."""
    for layer in layers:
        layer.set_superposed(tasks, alpha)
    with torch.enable_grad():
        h = entropy(_logits(forward_fn(inputs)), topk)
        (g,) = torch.autograd.grad(h.sum(), alpha)
    finite = torch.isfinite(h.detach())
    if g.dim() == 2 or bool(finite.all()):  # one α for the batch: a NaN sample spoils every score
        finite = finite & torch.isfinite(g).all(-1).expand_as(finite)
    if not bool(finite.all()):
        bad = [int(rows[i]) for i in (~finite).nonzero().flatten().tolist()]
        raise ValueError(
            f"gradient_id: scores of samples {bad} are not finite (NaN/Inf in the inputs or the model); "
            "task inference needs finite inputs"
        )
    return g.detach()


def gradient_id(
    model: nn.Module,
    inputs: Any,
    *,
    forward_fn: Callable[[Any], Any] | None = None,
    tasks: Sequence[str] | None = None,
    rule: str = "sample",
    k_shot: int = 7,
    topk: int | None = None,
) -> GradientIDResult:
    """Infer the task of each sample of ``inputs`` by Gradient ID.

    rule:
      ``"sample"``  each sample its own argmin_t ∂H_b/∂α_t (one forward + backward for the batch);
      ``"batch"``   the paper's rule: scores from the first ``k_shot`` samples, applied to the batch;
      ``"binary"``  SupSup's binary search on the k-shot scores (keep tasks with g ≤ median,
                    recompute over survivors) applied to the batch;
      ``"binary-sample"`` the binary search per sample (samples grouped by surviving task set).
    topk: entropy over the top-k logits (the paper uses C/T); None = all logits.
    Only learned (frozen) tasks are candidates. The model's modes are restored afterwards.

    Non-finite input is refused, not guessed: if the entropy or the scores of a sample are NaN/Inf
    (NaN/Inf in the inputs or the model), ``ValueError`` names the samples (for ``"batch"`` and
    ``"binary"`` only the k-shot samples are scored, so only those can be named). An empty batch
    gives an empty result (scores [0, T], task_index [0]).

    ``model`` may be ``torch.compile(model, fullgraph=True)``: the superposed forward and its
    backward trace without graph breaks (α is one row expanded, so no layer compares α's values).
    This function itself stays eager: it creates α with ``requires_grad``, checks the scores and
    switches the layers' modes (tests/test_compile_gradient_id.py).
    """
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    if not isinstance(k_shot, int) or k_shot < 1:
        raise ValueError(f"k_shot must be a positive int, got {k_shot!r}")
    layers = _layers(model)
    tasks = _candidate_tasks(layers, tasks)
    forward_fn = functools.partial(call_model, model) if forward_fn is None else forward_fn
    n, t = batch_size(inputs), len(tasks)
    dev = layers[0].weight.device
    if n == 0:
        return GradientIDResult(torch.zeros(0, t, device=dev), torch.zeros(0, dtype=torch.long, device=dev), tasks)
    with preserve_modes(layers):
        if rule == "sample":
            alpha = _equal_rows(torch.full((t,), 1.0 / t, device=dev), n)
            scores = _scores(model, layers, forward_fn, inputs, tasks, alpha, topk, range(n))
            return GradientIDResult(scores, scores.argmin(1), tasks)
        if rule == "batch":
            shot = take_rows(inputs, torch.arange(min(k_shot, n), device=device_of(inputs)))
            alpha = torch.full((t,), 1.0 / t, device=dev, requires_grad=True)
            g = _scores(model, layers, forward_fn, shot, tasks, alpha, topk, range(min(k_shot, n)))
            return GradientIDResult(g.expand(n, t).clone(), g.argmin().expand(n).clone(), tasks)
        if rule == "binary":
            shot = take_rows(inputs, torch.arange(min(k_shot, n), device=device_of(inputs)))
            idx, g = _binary(model, layers, forward_fn, shot, tasks, topk, per_sample=False)
            return GradientIDResult(g[:1].expand(n, t).clone(), idx[:1].expand(n).clone(), tasks)
        idx, g = _binary(model, layers, forward_fn, inputs, tasks, topk, per_sample=True)
        return GradientIDResult(g, idx, tasks)


def _equal_rows(row: Tensor, n: int) -> Tensor:
    """α [n, T]: ``row`` [T] expanded to n rows (stride 0, differentiable). The ∂/∂α autograd returns
    for it is still per sample ([n, T]); its stride says that the rows are equal, so the superposed
    layers form one W ⊙ M̄ without comparing values, which torch.compile could not trace
    (``softtf_kernels.ops.superposed_linear``)."""
    return row.detach().clone().view(1, -1).requires_grad_(True).expand(n, row.shape[-1])


def _binary(model, layers, forward_fn, inputs, tasks, topk, per_sample: bool):
    """SupSup's binary variant. Returns (task index [B], last-round scores [B, T] with +inf for
    eliminated tasks). Samples that share a surviving set are scored together."""
    n, t = batch_size(inputs), len(tasks)
    dev = layers[0].weight.device
    alive = torch.ones(n, t, dtype=torch.bool)
    scores = torch.zeros(n, t)
    while bool((alive.sum(1) > 1).any()):
        groups: dict[tuple[bool, ...], list[int]] = {}
        rows = range(n) if per_sample else [0]
        for b in rows:
            groups.setdefault(tuple(alive[b].tolist()), []).append(b)
        for key, members in groups.items():
            keep = torch.tensor(key)
            if keep.sum() <= 1:
                continue
            alpha_row = keep.float() / keep.sum()
            sel = torch.tensor(members) if per_sample else torch.arange(n)
            sub = take_rows(inputs, sel.to(device_of(inputs)))
            alpha = _equal_rows(alpha_row.to(dev), len(sel))
            g = _scores(model, layers, forward_fn, sub, tasks, alpha, topk, sel.tolist()).cpu()
            g = g.masked_fill(~keep, float("inf"))
            if not per_sample:
                g = g.sum(0, keepdim=True).expand(len(sel), t)
            med = g[:, keep].median(dim=1, keepdim=True).values
            survivors = (g <= med) & keep
            # keep at least one, and always shrink the set (ties at the median)
            stuck = survivors.sum(1) == keep.sum()
            if stuck.any():
                survivors[stuck] = torch.nn.functional.one_hot(g[stuck].argmin(1), t).bool()
            alive[sel] = survivors
            scores[sel] = g
    return alive.float().argmax(1).to(dev), scores.to(dev)


def predict_with_tasks(
    model: nn.Module,
    inputs: Any,
    task_index: Tensor,
    tasks: Sequence[str],
    forward_fn: Callable[[Any], Any] | None = None,
) -> Tensor:
    """Logits of ``inputs`` with sample b run under task ``tasks[task_index[b]]`` (mixed-task
    forward), chosen for this call only (:func:`softtf.use_tasks`: the layers' own selection is
    untouched, so concurrent calls do not see each other's tasks)."""
    layers = _layers(model)
    tasks = list(tasks)
    n = batch_size(inputs)
    if not isinstance(task_index, Tensor) or task_index.dim() != 1 or task_index.shape[0] != n:
        raise ValueError(f"task_index must be a 1-D tensor with {n} entries (one per sample)")
    ids = task_index.detach().to(device="cpu", dtype=torch.long)
    if n and (int(ids.min()) < 0 or int(ids.max()) >= len(tasks)):
        raise ValueError(f"task_index must hold indices into tasks (0..{len(tasks) - 1}), got {ids.tolist()}")
    for name in dict.fromkeys(tasks[i] for i in ids.tolist()):
        layers[0].mask(name)  # KeyError naming an unknown task, before the forward
    forward_fn = functools.partial(call_model, model) if forward_fn is None else forward_fn
    if n == 0:
        return _logits(forward_fn(inputs))
    with use_tasks([tasks[i] for i in ids.tolist()]):
        return _logits(forward_fn(inputs))
