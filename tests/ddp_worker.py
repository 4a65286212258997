"""One rank of the every-method DDP test (tests/test_distributed.py starts two, torchrun-style).

Each rank runs every registered method (2 digits tasks, 1 epoch, a tiny 5-block ViT) twice, under
DDP alone and with the frozen blocks sharded by FSDP2 (``fsdp=True``), and writes per method and
mode the accuracy matrices, a fingerprint of the whole classifier (DDP alone: every rank must hold
the same parameters after training) and how many parameters were sharded to ``OUT/rank{R}.json``.
"""
import json
import os
import sys

import torch
from timm.models.vision_transformer import VisionTransformer

from torch.distributed.tensor import DTensor

from softtf.cl import RunConfig, load_digits, run_continual
from softtf.cl.distributed import init_from_env
from softtf.cl.runner import fingerprint
from softtf.methods import method_class, method_names


def main(out: str) -> None:
    torch.set_num_threads(1)
    ranks = init_from_env("cpu")
    data = load_digits(img_size=16, seed=0)
    record = {}
    for method in method_names():
        for fsdp in (False, True):
            torch.manual_seed(0)
            vit = VisionTransformer(img_size=16, patch_size=4, num_classes=0, embed_dim=32, depth=5, num_heads=4, global_pool="avg")
            modes = method_class(method).task_id_modes
            task_id = "gradient-sample" if "gradient-sample" in modes else ("oracle" if "oracle" in modes else modes[0])
            cfg = RunConfig(method=method, n_tasks=2, epochs=1, lr=0.01, batch_size=25, progress=False, task_id=task_id, fsdp=fsdp)
            res = run_continual(vit, data, cfg)
            sharded = [p for p in res.classifier.parameters() if isinstance(p, DTensor)]
            record[f"{method}/{'fsdp' if fsdp else 'ddp'}"] = {
                "acc": res["acc"], "accuracy_matrix": res["accuracy_matrix"], "task_id_matrix": res.record.get("task_id_matrix"),
                "fingerprint": None if fsdp else fingerprint(res.classifier), "world": ranks.world,
                "sharded": len(sharded), "local_share": sum(p.to_local().numel() for p in sharded) / max(1, sum(p.numel() for p in sharded)),
                "frozen_sharded": all(not p.requires_grad for p in sharded),
            }
    with open(os.path.join(out, f"rank{ranks.rank}.json"), "w") as fh:
        json.dump(record, fh)


if __name__ == "__main__":
    main(sys.argv[1])
