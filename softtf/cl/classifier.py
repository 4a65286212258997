"""The model a continual-learning run trains: a backbone's feature + one shared linear head,
and a supervised warm-up standing in for pretrained weights in offline demos."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from ..core.batch import to_device
from ..core.config import detect_architecture
from .loaders import make_loader, progress_bar

__all__ = ["ContinualClassifier", "pretrain"]


class ContinualClassifier(nn.Module):
    """A backbone producing a feature vector per input + one shared linear head over all classes.

    ``backbone``: a timm ``VisionTransformer`` (its own head is removed; features are the pooled
    pre-logits, the [CLS] token for ``global_pool="token"``) or an HF ``BertModel`` (features: the
    [CLS] token of the last hidden state; a ``Bert*`` task model is reduced to its ``.bert``).
    Inputs: an image tensor for ViT, a dict of token tensors for BERT.
    """

    def __init__(self, backbone: nn.Module, num_classes: int):
        super().__init__()
        arch = detect_architecture(backbone)
        if arch is None:
            raise TypeError(
                f"ContinualClassifier: backbone must be a timm VisionTransformer or an HF BERT model, got {type(backbone).__name__}"
            )
        if arch == "vit":
            backbone.reset_classifier(0)
            dim = backbone.num_features
        else:
            if hasattr(backbone, "bert") and not type(backbone).__name__ == "BertModel":
                backbone = backbone.bert
            dim = backbone.config.hidden_size
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"ContinualClassifier: num_classes must be a positive int, got {num_classes!r}")
        self.arch, self.feature_dim, self.num_classes = arch, int(dim), num_classes
        self.backbone = backbone
        self.head = nn.Linear(self.feature_dim, num_classes)

    def features(self, inputs) -> Tensor:
        if self.arch == "vit":
            if isinstance(inputs, dict):
                raise TypeError("ContinualClassifier: a ViT backbone takes an image tensor, got a dict (text data?)")
            return self.backbone(inputs)
        if not isinstance(inputs, dict):
            raise TypeError("ContinualClassifier: a BERT backbone takes a dict of token tensors, got a tensor (image data?)")
        return self.backbone(**inputs).last_hidden_state[:, 0]

    def forward(self, inputs) -> Tensor:
        return self.head(self.features(inputs))


def pretrain(
    model: nn.Module,
    dataset: Dataset,
    num_classes: int,
    *,
    epochs: int = 5,
    lr: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = False,
    warmup_steps: int = 20,
) -> nn.Module:
    """Supervised warm-up of a random-init backbone on ``dataset`` (a stand-in for pretrained
    weights in offline demos and tests; it sees every class, so it is not part of a CL protocol).
    The backbone's own classifier is removed (``reset_classifier(0)`` for a ViT); a temporary
    head is trained with it and discarded; AdamW with linear warm-up. Returns ``model``
    (trained in place, left in eval mode)."""
    torch.manual_seed(seed)
    clf = ContinualClassifier(model, num_classes).to(device)
    opt = torch.optim.AdamW(clf.parameters(), lr=lr, weight_decay=0.01)
    clf.train()
    step = 0
    for ep in range(epochs):
        for x, y in progress_bar(make_loader(dataset, batch_size, True, seed + ep), progress, desc=f"pretrain {ep}"):
            for group in opt.param_groups:  # linear warm-up: ViTs trained from scratch diverge without it
                group["lr"] = lr * min(1.0, (step + 1) / max(warmup_steps, 1))
            step += 1
            loss = F.cross_entropy(clf(to_device(x, device)), y.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    clf.eval()
    return clf.backbone
