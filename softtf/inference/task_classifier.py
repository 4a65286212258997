"""Task-identity inference (TII) by a classifier on the pretrained model's feature.

HiDe-Prompt's task-identity inference (thu-ml/HiDe-Prompt, ``engines/hide_tii_engine.py``), which
NoRGa's code keeps (Minhchuyentoancbn/MoE_PromptCL, ``engines/norga_tii_engine.py``, same
training): a small MLP on the frozen model's [CLS] feature predicts the *class* of a sample among
every class seen so far; the task of that class is the inferred task. After each task ``t``:

1. the MLP is trained on the features of task ``t``'s training data, logits of classes outside
   task ``t`` set to ``-inf`` (their ``train_one_epoch`` with ``train_mask``): Adam, lr
   ``0.0005 * batch / 256``, gradient norm clipped at 1.0, ``epochs`` epochs (20 in their scripts);
2. the mean and covariance of every class of task ``t`` are computed from those features
   (``_compute_mean``; here in float64);
3. from task 1 on, the MLP is aligned on Gaussian samples of *every* seen class, old and new
   (``train_task_adaptive_prediction``): per epoch ``samples_per_class`` draws per class from
   ``N(mean_c, cov_c + 1e-4 I)``, shuffled, logits outside the seen classes ``-inf``; SGD momentum
   0.9, lr ``0.005 * batch / 256``, cosine schedule over ``ca_epochs`` (30) epochs.

The MLP is their ``MlpMapping`` with ``original_model_mlp_structure [2]`` and the head:
``x -> Linear(d, 2d) -> GELU -> Linear(2d, d)``, plus ``x``, ``LayerNorm(d)``, ``Linear(d, C)``;
weights ``trunc_normal(std 0.02)``, biases 0 (timm's ViT init). Weight decay is 0 in both stages:
their config defines ``--weight-decay 0.0`` and ``--weight_decay 5e-4`` on one destination and
argparse keeps the first default; the CA optimizer's param group carries it.

Where this differs (simplifications, all deterministic given the seed):

* the features of a task are computed once, without augmentation, and reused every epoch (the
  official code re-runs the frozen ViT on augmented images each epoch of step 1);
* step 3 uses every sampled feature each epoch; the official loop takes only the first
  ``#old classes`` batches of ``batch`` samples (a fraction ``old / seen`` of them);
* Gaussian draws are float64 (``mean + z @ L^T``, ``L`` the Cholesky factor) from a seeded
  ``torch.Generator``; the official code samples float32 ``MultivariateNormal`` with the global RNG;
* a class with one training sample gets a zero covariance (``torch.cov`` would give NaN);
* the official default storage of HiDe's scripts is ``multi-centroid`` (k-means, 10 centroids,
  diagonal variances); NoRGa's Sup-21K scripts use ``covariance`` (full), this module's default;
  ``covariance="diagonal"`` is their ``variance`` option (``d`` numbers per class instead of ``d^2``;
  a full covariance of ViT-B's 768-dim feature is 4.7 MB per class in float64).

    >>> tii = TaskClassifier(dim=768, num_classes=100)
    >>> tii.add_task("task0", feats0, labels0, seed=0)   # feats [N, 768] of the pretrained model
    >>> tii.add_task("task1", feats1, labels1, seed=1)
    >>> tii.predict(query_feats)                         # [B] indices into tii.tasks
    >>> other.load_state_dict(tii.state_dict())          # statistics, MLP, class -> task map
"""
from __future__ import annotations

import json
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["TaskClassifier", "ResidualMLP", "COVARIANCES"]

COVARIANCES = ("full", "diagonal")


class ResidualMLP(nn.Module):
    """HiDe-Prompt's ``MlpMapping`` (one hidden layer of ``hidden_mult * dim``) followed by the head."""

    def __init__(self, dim: int, num_classes: int, hidden_mult: int, generator: torch.Generator):
        super().__init__()
        with torch.random.fork_rng(devices=[]):  # nn.Linear's own init draws from the global RNG: leave it as it was
            self.fc1 = nn.Linear(dim, dim * hidden_mult)
            self.fc2 = nn.Linear(dim * hidden_mult, dim)
            self.head = nn.Linear(dim, num_classes)
        self.norm = nn.LayerNorm(dim)
        with torch.no_grad():
            for lin in (self.fc1, self.fc2, self.head):
                nn.init.trunc_normal_(lin.weight, std=0.02, generator=generator)
                nn.init.zeros_(lin.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.norm(x + self.fc2(F.gelu(self.fc1(x)))))


class TaskClassifier(nn.Module):
    """Per-class feature statistics + an MLP over classes; a class's task is the prediction.

    Args:
        dim: feature dimension (the pretrained model's [CLS] feature).
        num_classes: size of the class space; labels are ints in ``[0, num_classes)``.
        hidden_mult: hidden width of the MLP in multiples of ``dim`` (official: 2).
        epochs: epochs of step 1 on the task's features (official scripts: 20).
        ca_epochs: epochs of step 3 on Gaussian samples (official ``crct_epochs``: 30).
        batch_size: batch of both steps, and the default ``samples_per_class`` (official: the run's 24).
        lr: Adam lr of step 1 (default ``0.0005 * batch_size / 256``).
        ca_lr: SGD lr of step 3 (default ``0.005 * batch_size / 256``).
        samples_per_class: Gaussian draws per class and epoch in step 3 (default ``batch_size``).
        covariance: ``"full"`` or ``"diagonal"`` class statistics.
        cov_ridge: added to the covariance's diagonal before sampling (official: 1e-4).
        grad_clip: gradient-norm clip of step 1 (None: none); step 3 does not clip (official).
        momentum: SGD momentum of step 3 (official 0.9).
        seed: seeds the MLP's initialisation (and ``add_task`` when it gets no seed).

    State (``state_dict``): ``class_ids`` [S] (classes with statistics, in the order learned),
    ``class_task`` [S] (their task index), ``count`` [S], ``mean`` [S, d] and ``cov`` [S, d, d]
    (``diagonal``: [S, d]) in float64, ``task_names`` (UTF-8 JSON list as uint8) and the MLP's
    parameters. ``load_state_dict`` validates every entry before changing anything.
    """

    def __init__(self, dim: int, num_classes: int, *, hidden_mult: int = 2, epochs: int = 20, ca_epochs: int = 30,
                 batch_size: int = 24, lr: float | None = None, ca_lr: float | None = None,
                 samples_per_class: int | None = None, covariance: str = "full", cov_ridge: float = 1e-4,
                 grad_clip: float | None = 1.0, momentum: float = 0.9, seed: int = 0):
        super().__init__()
        for name, v, low in (("dim", dim, 1), ("num_classes", num_classes, 1), ("hidden_mult", hidden_mult, 1),
                             ("epochs", epochs, 0), ("ca_epochs", ca_epochs, 0), ("batch_size", batch_size, 1),
                             ("seed", seed, 0)):
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                raise ValueError(f"TaskClassifier: {name} must be an int >= {low}, got {v!r}")
        lr = 0.0005 * batch_size / 256 if lr is None else lr
        ca_lr = 0.005 * batch_size / 256 if ca_lr is None else ca_lr
        samples_per_class = batch_size if samples_per_class is None else samples_per_class
        for name, v in (("lr", lr), ("ca_lr", ca_lr)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v > 0 and math.isfinite(v)):
                raise ValueError(f"TaskClassifier: {name} must be a positive finite number, got {v!r}")
        if not isinstance(samples_per_class, int) or isinstance(samples_per_class, bool) or samples_per_class < 1:
            raise ValueError(f"TaskClassifier: samples_per_class must be an int >= 1, got {samples_per_class!r}")
        if covariance not in COVARIANCES:
            raise ValueError(f"TaskClassifier: covariance must be one of {COVARIANCES}, got {covariance!r}")
        if isinstance(cov_ridge, bool) or not isinstance(cov_ridge, (int, float)) or not (cov_ridge >= 0 and math.isfinite(cov_ridge)):
            raise ValueError(f"TaskClassifier: cov_ridge must be a finite number >= 0, got {cov_ridge!r}")
        if grad_clip is not None and not (isinstance(grad_clip, (int, float)) and grad_clip > 0):
            raise ValueError(f"TaskClassifier: grad_clip must be > 0 or None, got {grad_clip!r}")
        if not (isinstance(momentum, (int, float)) and 0 <= momentum < 1):
            raise ValueError(f"TaskClassifier: momentum must be in [0, 1), got {momentum!r}")
        self.dim, self.num_classes, self.hidden_mult = dim, num_classes, hidden_mult
        self.epochs, self.ca_epochs, self.batch_size = epochs, ca_epochs, batch_size
        self.lr, self.ca_lr, self.samples_per_class = float(lr), float(ca_lr), samples_per_class
        self.covariance, self.cov_ridge, self.momentum, self.seed = covariance, float(cov_ridge), float(momentum), seed
        self.grad_clip = None if grad_clip is None else float(grad_clip)
        self.mlp = ResidualMLP(dim, num_classes, hidden_mult, torch.Generator().manual_seed(seed))
        self.task_list: list[str] = []
        cov_shape = (0, dim, dim) if covariance == "full" else (0, dim)
        self.register_buffer("class_ids", torch.zeros(0, dtype=torch.long))
        self.register_buffer("class_task", torch.zeros(0, dtype=torch.long))
        self.register_buffer("count", torch.zeros(0, dtype=torch.long))
        self.register_buffer("mean", torch.zeros(0, dim, dtype=torch.float64))
        self.register_buffer("cov", torch.zeros(cov_shape, dtype=torch.float64))
        self.register_buffer("task_names", _encode_names([]))

    @property
    def tasks(self) -> list[str]:
        """Learned task names in order; :meth:`predict` returns indices into this list."""
        return list(self.task_list)

    @property
    def device(self) -> torch.device:
        return self.mlp.head.weight.device

    # ---------------------------------------------------------------- learning
    def add_task(self, task: str, features: Tensor, labels: Tensor, seed: int | None = None) -> None:
        """Learn task ``task`` from its training ``features`` [N, dim] and ``labels`` [N].

        Computes the statistics of the task's classes (float64), trains the MLP on the features
        (step 1) and, from the second task on, aligns it on Gaussian samples of every seen class
        (step 3). ``seed`` (default ``seed * 1000 + task index``) makes it deterministic."""
        if not isinstance(task, str) or not task:
            raise ValueError(f"TaskClassifier.add_task: task must be a non-empty str, got {task!r}")
        if task in self.task_list:
            raise ValueError(f"TaskClassifier.add_task: task {task!r} is already learned (tasks: {self.task_list})")
        x, y = self._check_data(features, labels)
        new = torch.unique(y)
        old = set(self.class_ids.tolist())
        clash = [c for c in new.tolist() if c in old]
        if clash:
            raise ValueError(f"TaskClassifier.add_task: classes {clash} already belong to a learned task; every task brings new classes")
        t = len(self.task_list)
        g = torch.Generator().manual_seed(self.seed * 1000 + t if seed is None else int(seed))
        mean, cov, count = self._statistics(x, y, new)
        dev = self.device
        self.class_ids = torch.cat([self.class_ids, new.to(dev)])
        self.class_task = torch.cat([self.class_task, torch.full((len(new),), t, dtype=torch.long, device=dev)])
        self.count = torch.cat([self.count, count.to(dev)])
        self.mean = torch.cat([self.mean, mean.to(dev)])
        self.cov = torch.cat([self.cov, cov.to(dev)])
        self.task_list.append(task)
        self.task_names = _encode_names(self.task_list).to(dev)
        self._train_on_features(x.to(dev, torch.float32), y.to(dev), new.to(dev), g)
        if t > 0:
            self._align(g)
        self.mlp.eval()

    def _check_data(self, features: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        where = "TaskClassifier.add_task"
        if not isinstance(features, Tensor) or features.ndim != 2 or features.shape[1] != self.dim or not features.is_floating_point():
            raise ValueError(f"{where}: features must be a float tensor [N, {self.dim}], got "
                             f"{getattr(features, 'shape', type(features).__name__)} {getattr(features, 'dtype', '')}")
        if features.shape[0] == 0:
            raise ValueError(f"{where}: features hold no sample; a task needs training samples")
        _check_finite(features, where)
        if not isinstance(labels, Tensor) or labels.shape != (features.shape[0],) or labels.is_floating_point() or labels.dtype == torch.bool:
            raise ValueError(f"{where}: labels must be an integer tensor [{features.shape[0]}], got "
                             f"{getattr(labels, 'shape', type(labels).__name__)} {getattr(labels, 'dtype', '')}")
        y = labels.detach().to("cpu", torch.long)
        bad = y[(y < 0) | (y >= self.num_classes)]
        if bad.numel():
            raise ValueError(f"{where}: labels must be in [0, {self.num_classes}), got {bad[:5].tolist()}")
        return features.detach().cpu(), y

    def _statistics(self, x: Tensor, y: Tensor, classes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean [K, d], covariance [K, d, d] (or variances [K, d]) and count [K] of each class, in float64."""
        x = x.to(torch.float64)
        means, covs, counts = [], [], []
        for c in classes.tolist():
            xc = x[y == c]
            n = xc.shape[0]
            mu = xc.mean(0)
            centred = xc - mu
            if self.covariance == "full":
                cov = centred.T @ centred / (n - 1) if n > 1 else x.new_zeros(self.dim, self.dim)
            else:
                cov = (centred * centred).sum(0) / (n - 1) if n > 1 else x.new_zeros(self.dim)
            means.append(mu)
            covs.append(cov)
            counts.append(n)
        return torch.stack(means), torch.stack(covs), torch.tensor(counts, dtype=torch.long)

    def _step(self, opt: torch.optim.Optimizer, x: Tensor, y: Tensor, allowed: Tensor, clip: float | None) -> None:
        loss = F.cross_entropy(self.mlp(x).masked_fill(~allowed, float("-inf")), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(self.mlp.parameters(), clip)
        opt.step()

    def _train_on_features(self, x: Tensor, y: Tensor, classes: Tensor, g: torch.Generator) -> None:
        """Step 1: Adam on the task's features, logits outside the task's classes -inf."""
        allowed = torch.zeros(self.num_classes, dtype=torch.bool, device=x.device)
        allowed[classes] = True
        opt = torch.optim.Adam(self.mlp.parameters(), lr=self.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
        self.mlp.train()
        for _ in range(self.epochs):
            perm = torch.randperm(x.shape[0], generator=g).to(x.device)
            for i in range(0, x.shape[0], self.batch_size):
                idx = perm[i:i + self.batch_size]
                self._step(opt, x[idx], y[idx], allowed, self.grad_clip)

    def _sampler(self) -> Tensor:
        """Per-class factors ``L`` (float64, CPU) with ``L L^T = cov + ridge I`` (diagonal: sqrt of the variances)."""
        cov = self.cov.detach().cpu()
        if self.covariance == "diagonal":
            return (cov + self.cov_ridge).sqrt()
        eye = torch.eye(self.dim, dtype=torch.float64)
        factor, info = torch.linalg.cholesky_ex(cov + self.cov_ridge * eye)
        if bool((info != 0).any()):
            bad = self.class_ids[(info != 0).nonzero().flatten().to(self.class_ids.device)].tolist()
            raise ValueError(f"TaskClassifier: the covariance of classes {bad} plus {self.cov_ridge} I is not positive "
                             "definite; raise cov_ridge")
        return factor

    def sample(self, generator: torch.Generator, factor: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``samples_per_class`` Gaussian draws (float64, CPU) of every class with statistics, and their labels.
        ``factor``: the Cholesky factors (diagonal: standard deviations) when already computed."""
        factor = self._sampler() if factor is None else factor
        mean, n = self.mean.detach().cpu(), self.samples_per_class
        draws = []
        for s in range(mean.shape[0]):
            z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
            draws.append(mean[s] + (z * factor[s] if self.covariance == "diagonal" else z @ factor[s].T))
        labels = self.class_ids.detach().cpu().repeat_interleave(n)
        return torch.cat(draws), labels

    def _align(self, g: torch.Generator) -> None:
        """Step 3: SGD (cosine schedule) on Gaussian samples of every seen class, logits outside them -inf."""
        dev = self.device
        allowed = torch.zeros(self.num_classes, dtype=torch.bool, device=dev)
        allowed[self.class_ids] = True
        opt = torch.optim.SGD(self.mlp.parameters(), lr=self.ca_lr, momentum=self.momentum, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.ca_epochs)
        factor = self._sampler()
        self.mlp.train()
        for _ in range(self.ca_epochs):
            x, y = self.sample(g, factor)
            perm = torch.randperm(x.shape[0], generator=g)
            x, y = x[perm].to(dev, torch.float32), y[perm].to(dev)
            for i in range(0, x.shape[0], self.batch_size):
                self._step(opt, x[i:i + self.batch_size], y[i:i + self.batch_size], allowed, None)
            sched.step()

    # ---------------------------------------------------------------- inference
    def class_logits(self, features: Tensor) -> Tensor:
        """MLP logits [B, num_classes], classes without statistics ``-inf``."""
        if not self.task_list:
            raise ValueError("TaskClassifier: no task learned yet (add_task first)")
        if not isinstance(features, Tensor) or features.ndim != 2 or features.shape[1] != self.dim or not features.is_floating_point():
            raise ValueError(f"TaskClassifier.predict: features must be a float tensor [B, {self.dim}], got "
                             f"{getattr(features, 'shape', type(features).__name__)}")
        _check_finite(features, "TaskClassifier.predict")
        allowed = torch.zeros(self.num_classes, dtype=torch.bool, device=self.device)
        allowed[self.class_ids] = True
        with torch.no_grad():
            return self.mlp(features.detach().to(self.device, torch.float32)).masked_fill(~allowed, float("-inf"))

    def predict(self, features: Tensor) -> Tensor:
        """Task indices [B] (into :attr:`tasks`, on ``features``' device): the task of the argmax class.

        Samples with non-finite features are refused with ``ValueError`` naming them."""
        logits = self.class_logits(features)
        task_of = torch.full((self.num_classes,), -1, dtype=torch.long, device=self.device)
        task_of[self.class_ids] = self.class_task
        return task_of[logits.argmax(dim=-1)].to(features.device)

    def forward(self, features: Tensor) -> Tensor:
        return self.predict(features)

    # ---------------------------------------------------------------- checkpoints
    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load a :meth:`state_dict` (any number of learned tasks), validated first: a bad state
        raises ``ValueError`` naming the entry and leaves this classifier unchanged. Always strict."""
        where = "TaskClassifier.load_state_dict"
        state = dict(state_dict)
        expected = set(self.state_dict())
        if set(state) != expected:
            raise ValueError(f"{where}: missing {sorted(expected - set(state))}, unexpected {sorted(set(state) - expected)}")
        for k, v in state.items():
            if not isinstance(v, Tensor):
                raise ValueError(f"{where}: {k} must be a Tensor, got {type(v).__name__}")
        names = _decode_names(state["task_names"], where)
        ids, task, count = state["class_ids"], state["class_task"], state["count"]
        s = ids.shape[0] if ids.ndim == 1 else -1
        for k in ("class_ids", "class_task", "count"):
            if state[k].dtype != torch.long or state[k].shape != (s,):
                raise ValueError(f"{where}: {k} must be int64 [S] like class_ids, got {state[k].dtype} {tuple(state[k].shape)}")
        if s and (int(ids.min()) < 0 or int(ids.max()) >= self.num_classes or len(set(ids.tolist())) != s):
            raise ValueError(f"{where}: class_ids must be distinct classes in [0, {self.num_classes}), got {ids.tolist()[:8]}")
        if s and (int(task.min()) < 0 or int(task.max()) >= len(names)) or set(task.tolist()) != set(range(len(names))):
            raise ValueError(f"{where}: class_task must map the classes onto all {len(names)} tasks {names}, got {task.tolist()[:8]}")
        if s and int(count.min()) < 1:
            raise ValueError(f"{where}: count must be >= 1 for every class")
        cov_shape = (s, self.dim, self.dim) if self.covariance == "full" else (s, self.dim)
        for k, shape in (("mean", (s, self.dim)), ("cov", cov_shape)):
            if state[k].dtype != torch.float64 or tuple(state[k].shape) != shape:
                raise ValueError(f"{where}: {k} must be float64 {shape} (covariance {self.covariance!r}), "
                                 f"got {state[k].dtype} {tuple(state[k].shape)}")
        params = self.mlp.state_dict()
        for k, v in state.items():
            if k.startswith("mlp.") and (v.shape != params[k[4:]].shape or not v.is_floating_point()):
                raise ValueError(f"{where}: {k} must be a float tensor {tuple(params[k[4:]].shape)}, got {v.dtype} {tuple(v.shape)}")
            if v.is_floating_point() and not bool(torch.isfinite(v).all()):
                raise ValueError(f"{where}: {k} holds NaN or Inf")
        dev = self.device
        for k in ("class_ids", "class_task", "count", "mean", "cov", "task_names"):
            setattr(self, k, torch.empty_like(state[k], device=dev))
        result = super().load_state_dict(state, strict=True, assign=assign)
        self.task_list = names
        self.mlp.eval()
        return result


def _check_finite(features: Tensor, where: str) -> None:
    finite = torch.isfinite(features).all(dim=-1)
    if not bool(finite.all()):
        bad = (~finite).nonzero().flatten().tolist()
        raise ValueError(f"{where}: features of samples {bad[:10]} are not finite (NaN/Inf: the inputs or the model)")


def _encode_names(names: list[str]) -> Tensor:
    return torch.tensor(list(json.dumps(names).encode("utf-8")), dtype=torch.uint8)


def _decode_names(t: Tensor, where: str) -> list[str]:
    try:
        if t.dtype != torch.uint8 or t.ndim != 1:
            raise ValueError
        names = json.loads(bytes(t.cpu().tolist()).decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise ValueError(f"{where}: task_names must be a uint8 [n] UTF-8 JSON list of task names") from None
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names):
        raise ValueError(f"{where}: task_names must list distinct non-empty task names, got {names!r}")
    return names
