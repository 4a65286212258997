"""The timed calls: an inference forward, a training step, a Gradient-ID task inference."""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from softtf_kernels import use_backend

from ..inference.gradient_id import entropy, gradient_id
from .cases import Case
from .memory import tensor_bytes
from .modules import EagerMaskedLinear

__all__ = ["TrainStep", "eager_gid_step", "infer_step", "soft_gid_step", "with_backend"]


class TrainStep:
    """One training step: zero_grad + forward + loss + backward + Adam step on ``params`` (train mode).
    The optimizer is created by the first call (the warm-up), so its state is not in the first
    timed call. With no ``params`` (the attention cases' frozen floor) it is forward + backward to
    the input."""

    def __init__(self, case: Case, params: Sequence[nn.Parameter]):
        self.case = case
        self.params = list(params)
        self.opt: torch.optim.Optimizer | None = None

    def __call__(self) -> Tensor:
        if self.opt is None and self.params:
            self.opt = torch.optim.Adam(self.params, lr=1e-4)
        self.zero_grad()
        case = self.case
        x = case.train_inputs
        if isinstance(x, Tensor) and x.requires_grad:
            x.grad = None
        case.model.train()
        loss = case.loss_fn(case.model, x, case.labels)
        loss.backward()
        if self.opt is not None:
            self.opt.step()
        return loss

    def zero_grad(self) -> None:
        """Drop the previous step's gradients (before, not inside, a measured call)."""
        if self.opt is not None:
            self.opt.zero_grad(set_to_none=True)

    def release(self) -> int:
        """Free the optimizer state; returns its bytes (the candidate's static memory grows by them)."""
        if self.opt is None:
            return 0
        n = tensor_bytes([t for st in self.opt.state.values() for t in st.values() if isinstance(t, Tensor)])
        self.opt = None
        return n


def infer_step(case: Case, backend: str | None = None) -> Callable[[], Any]:
    def infer():
        case.model.eval()
        ctx = use_backend(backend) if backend else contextlib.nullcontext()
        with ctx, torch.no_grad():
            return case.logits_fn(case.model, case.inputs)

    return infer


def with_backend(fn: Callable[[], Any], backend: str) -> Callable[[], Any]:
    def run():
        with use_backend(backend):
            return fn()

    return run


def soft_gid_step(case: Case, backend: str, tasks: list[str]) -> Callable[[], Any]:
    """``softtf.gradient_id(rule="sample")`` over the SoftLinear layers' frozen ``tasks``."""

    def gid():
        case.model.eval()
        with use_backend(backend):
            return gradient_id(case.model, case.inputs, forward_fn=lambda inp: case.logits_fn(case.model, inp),
                               tasks=tasks, rule="sample").task_index

    return gid


def eager_gid_step(case: Case, mods: list[EagerMaskedLinear], n_tasks: int) -> Callable[[], Any]:
    """The same Gradient ID by autograd through per-sample superposed weights (see EagerMaskedLinear)."""

    def gid():
        case.model.eval()
        dev = mods[0].base_layer.weight.device
        alpha = torch.full((case.batch, n_tasks), 1.0 / n_tasks, device=dev, requires_grad=True)
        for m in mods:
            m.alpha = alpha
        try:
            with torch.enable_grad():
                h = entropy(case.logits_fn(case.model, case.inputs)).sum()
                (g,) = torch.autograd.grad(h, alpha)
        finally:
            for m in mods:
                m.alpha = None
        return g.argmin(1)

    return gid
