"""The rows of the serving case (``serve_t10``, built by :mod:`softtf.bench.cases`): one wrapped ViT
holding T = 10 frozen tasks answers a batch whose samples belong to tasks drawn at random, the way a
deployed model receives requests.

Rows, each giving the same logits (checked before timing):
  floor       the frozen model on the whole batch, masks off (``SoftModel.disable_masks``)
  task_names  one call, ``model(x, task_names=names)``: every masked layer runs ``mixed_task_linear``
  eager       (label "grouped") one call per task present, on that task's samples, scattered back
  per_sample  one call per sample
Inference only: the train and gid columns are n/a. The model is the ``vit`` case's (ViT-B/16; --quick:
the tiny ViT), masks on its default targets; batch 4 x --vit-batch.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..core.tasks import use_task
from .candidate import Candidate
from .cases import Case
from .config import EAGER, FLOOR, SERVE_TASKS, BenchConfig
from .memory import tensor_bytes

__all__ = ["grouped_forward", "serve_candidates"]


def grouped_forward(model: nn.Module, x: Tensor, ids: Tensor) -> Tensor:
    """The logits of a mixed batch by one call per task present (task ``t{i}`` for id i, under
    :func:`use_task`), each on that task's samples, scattered back into batch order."""
    out = None
    for t in ids.unique().tolist():
        rows = (ids == t).nonzero().squeeze(1).to(x.device)
        with use_task(f"t{t}"):
            y = model(x[rows])
        out = y.new_empty(x.shape[0], *y.shape[1:]) if out is None else out
        out[rows] = y
    return out


def serve_candidates(case: Case, config: BenchConfig, device: torch.device) -> list[Candidate]:
    """SERVE_CANDIDATES, each an infer call under no_grad; they are checked to agree first."""
    model, x, ids = case.model, case.inputs, case.labels
    names = [f"t{i}" for i in ids.tolist()]

    def floor():
        with model.disable_masks():
            return model(x)

    calls = {
        FLOOR: ("frozen, masks off (floor)", floor),
        "task_names": ("model(x, task_names=...)", lambda: model(x, task_names=names)),
        EAGER: ("grouped: one call per task", lambda: grouped_forward(model, x, ids)),
        "per_sample": ("one call per sample", lambda: torch.cat([model(x[i:i + 1], task_names=names[i])
                                                                 for i in range(x.shape[0])])),
    }
    frozen_bytes = tensor_bytes(layer.frozen_masks for layer in model.soft_layers.values())
    params = {"trainable": 0, "stored_per_task": 0, "bytes_per_task": frozen_bytes // SERVE_TASKS,
              "store_dtype": "frozen masks", "per_layer": [],
              "note": f"{SERVE_TASKS} frozen tasks' masks, {frozen_bytes / 2**20:.1f} MiB in all"}
    cands = []
    for key, (label, fn) in calls.items():
        c = Candidate(key, label, "serve", params=params, config={"tasks": SERVE_TASKS})

        def infer(fn=fn):
            with torch.no_grad():
                return fn()

        c.fns = {"infer": infer}
        c.mark("n/a", "serving is inference only", ("train", "gid"))
        cands.append(c)
    with torch.no_grad():  # the rows must answer the same before any is timed
        ref = cands[2].fns["infer"]()
        for c in (cands[1], cands[3]):
            err = (c.fns["infer"]() - ref).abs().max().item()
            if not err <= 1e-3 * max(1.0, ref.abs().max().item()):
                c.mark("failed", f"logits differ from the grouped calls' by {err:.3g}", ("infer",))
    return cands
