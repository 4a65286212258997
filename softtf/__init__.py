"""softtf: Soft-TransFormers for continual learning on fused masked-linear kernels.

The house, bottom up (each layer imports only the ones below it):

* :mod:`softtf.core`       SoftLinear, SoftConfig, wrap / SoftModel, mask files
* :mod:`softtf.inference`  task inference: Gradient ID, Prompt ID
* :mod:`softtf.methods`    continual-learning methods behind one protocol (softtf, finetune, lora, adapter)
* :mod:`softtf.cl`         data, scenarios, the runner, metrics, plots
* :mod:`softtf.bench`      ``softtf bench``
* :mod:`softtf.cli`        the ``softtf`` command

The names most users need are re-exported here.
"""
from softtf_kernels import get_backend, set_backend, use_backend

from .cl import (
    ClassIncrementalScenario,
    ContinualClassifier,
    LabelledData,
    RunConfig,
    RunResult,
    TASK_ID_MODES,
    load_cifar100,
    load_csv_text,
    load_data,
    load_digits,
    load_image_folder,
    metrics,
    plot_accuracy_curve,
    plot_accuracy_matrix,
    pretrain,
    run_continual,
)
from .core import (
    MissedMaskWarning,
    SoftConfig,
    SoftLinear,
    SoftModel,
    load_masks,
    load_soft_model,
    read_extras,
    read_mask_file,
    save_masks,
    soft_layers,
    superposed_linear,
    use_task,
    use_tasks,
    wrap,
)
from .inference import GradientIDResult, PromptID, cls_feature, entropy, gradient_id, predict_with_tasks
from .methods import ContinualMethod, method_names

METHODS = method_names()

from .version import VERSION as __version__  # noqa: E402
__all__ = [
    "ClassIncrementalScenario", "ContinualClassifier", "ContinualMethod", "GradientIDResult", "LabelledData",
    "METHODS", "MissedMaskWarning", "PromptID", "RunConfig", "RunResult", "SoftConfig", "SoftLinear", "SoftModel", "TASK_ID_MODES",
    "__version__", "cls_feature", "entropy", "get_backend", "gradient_id", "load_cifar100", "load_csv_text",
    "load_data", "load_digits", "load_image_folder", "load_masks", "load_soft_model", "metrics", "read_extras",
    "plot_accuracy_curve", "plot_accuracy_matrix", "predict_with_tasks", "pretrain", "read_mask_file",
    "run_continual", "save_masks", "set_backend", "soft_layers", "superposed_linear", "use_backend", "use_task", "use_tasks", "wrap",
]
