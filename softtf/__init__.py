"""softtf: Soft-TransFormers for continual learning on fused masked-linear kernels.

Layers and wrapping: SoftLinear, SoftConfig, wrap, SoftModel. Task inference: gradient_id,
predict_with_tasks, PromptID. Continual learning: RunConfig, run_continual, metrics, data.
"""
from softtf_kernels import get_backend, set_backend, use_backend

from . import metrics
from .config import SoftConfig
from .data import (
    ClassIncrementalScenario,
    LabelledData,
    load_cifar100,
    load_csv_text,
    load_data,
    load_digits,
    load_image_folder,
)
from .gradient_id import GradientIDResult, entropy, gradient_id, predict_with_tasks
from .io import load as load_soft_model
from .io import load_masks, read_mask_file, save_masks
from .layer import SoftLinear, superposed_linear
from .model import SoftModel, soft_layers, wrap
from .plots import plot_accuracy_curve, plot_accuracy_matrix
from .prompt_id import PromptID, cls_feature
from .runner import METHODS, TASK_ID_MODES, ContinualClassifier, RunConfig, SoftTFLearner, pretrain, run_continual
from .baselines import FinetuneLearner, LoRALearner

__version__ = "0.1.0"
__all__ = [
    "ClassIncrementalScenario", "ContinualClassifier", "FinetuneLearner", "GradientIDResult", "LabelledData",
    "LoRALearner", "METHODS", "PromptID", "RunConfig", "SoftConfig", "SoftLinear", "SoftModel", "SoftTFLearner",
    "TASK_ID_MODES", "__version__", "cls_feature", "entropy", "get_backend", "gradient_id", "load_cifar100",
    "load_csv_text", "load_data", "load_digits", "load_image_folder", "load_masks", "load_soft_model", "metrics",
    "plot_accuracy_curve", "plot_accuracy_matrix", "predict_with_tasks", "pretrain", "read_mask_file",
    "run_continual", "save_masks", "set_backend", "soft_layers", "superposed_linear", "use_backend", "wrap",
]
