"""The serving case (``serve_t10``): one wrapped ViT holding T = 10 frozen tasks answers a batch whose
samples belong to tasks drawn at random, the way a deployed model receives requests.

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

from ..core.model import wrap
from ..core.tasks import use_task
from .candidate import Candidate
from .cases import Case, build_case
from .config import EAGER, FLOOR, SERVE_CASES, BenchConfig

__all__ = ["SERVE_TASKS", "serve_candidates", "serve_case"]

SERVE_TASKS = 10


def serve_case(name: str, config: BenchConfig, device: torch.device) -> Case:
    """The ``vit`` case's model wrapped with T frozen tasks (masks drawn around 1, one seed each) and a
    batch of 4 x --vit-batch images with task ids drawn at random (seeded)."""
    if name not in SERVE_CASES:
        raise ValueError(f"not a serving case: {name!r}; choose from {SERVE_CASES}")
    vit = build_case("vit", config, device)
    model = wrap(vit.model)
    for t in range(SERVE_TASKS):
        model.add_task(f"t{t}", init=("uniform", 0.9, 1.1), seed=config.seed + t)
        model.freeze_task(f"t{t}")
    model.eval().requires_grad_(False)
    gen = torch.Generator().manual_seed(config.seed)
    b = 4 * config.vit_batch
    img = vit.inputs.shape[-2:]
    x = torch.randn(b, 3, *img, generator=gen).to(device)
    ids = torch.randint(0, SERVE_TASKS, (b,), generator=gen)
    ntok = vit.tokens // vit.batch
    present = len(ids.unique())
    desc = (f"{vit.description.split(', batch')[0]} wrapped with T = {SERVE_TASKS} frozen tasks; batch {b} x {ntok} "
            f"tokens, task ids drawn at random ({present} tasks present)")
    case = Case(name, "serve", desc, model, list(vit.names), {}, x, x, ids, b * ntok, b,
                logits_fn=lambda m, inp: m(inp), loss_fn=lambda m, inp, lab: m(inp).sum(), wrap_used="softtf.wrap")
    case.originals = {n: vit.originals[n] for n in vit.names}
    return case


def _grouped(model: nn.Module, x: Tensor, ids: Tensor) -> Tensor:
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
        EAGER: ("grouped: one call per task", lambda: _grouped(model, x, ids)),
        "per_sample": ("one call per sample", lambda: torch.cat([model(x[i:i + 1], task_names=names[i])
                                                                 for i in range(x.shape[0])])),
    }
    frozen_bytes = sum(int(getattr(m, "frozen_masks").nbytes) for m in model.modules()
                       if isinstance(getattr(m, "frozen_masks", None), Tensor))
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
