"""Continual learning: data (images, CSV text, a folder of text tasks), class-incremental and
task-per-dataset scenarios, the runner, metrics and plots."""
from . import metrics
from .classifier import ContinualClassifier, pretrain
from .config import GRADIENT_RULES, TASK_ID_MODES, RunConfig
from .data import (
    ArrayImageDataset,
    ImageFileDataset,
    LabelledData,
    TensorDataset,
    load_cifar100,
    load_csv_text,
    load_data,
    load_digits,
    load_image_folder,
    load_text_tasks,
)
from .plots import plot_accuracy_curve, plot_accuracy_matrix
from .results import RunResult
from .reevaluate import evaluate_saved
from .runner import ContinualRun, run_continual
from .scenario import ClassIncrementalScenario, TaskPerDatasetScenario
from .text_data import text_task_files

__all__ = [
    "ArrayImageDataset", "ClassIncrementalScenario", "ContinualClassifier", "ContinualRun", "GRADIENT_RULES",
    "ImageFileDataset", "LabelledData", "RunConfig", "RunResult", "TASK_ID_MODES", "TaskPerDatasetScenario",
    "TensorDataset", "load_cifar100", "load_csv_text", "load_data", "load_digits", "load_image_folder",
    "evaluate_saved", "load_text_tasks", "metrics", "plot_accuracy_curve", "plot_accuracy_matrix", "pretrain", "run_continual",
    "text_task_files",
]
