"""Task inference at test time: Gradient ID (SupSup's one-shot rule, per batch and per sample),
Prompt ID (one key per task matched against the pretrained model's feature) and the task-identity
classifier (HiDe-Prompt / NoRGa: an MLP on that feature over every seen class)."""
from .gradient_id import RULES, GradientIDResult, entropy, gradient_id, predict_with_tasks
from .prompt_id import PromptID, cls_feature
from .task_classifier import TaskClassifier

__all__ = ["RULES", "GradientIDResult", "PromptID", "TaskClassifier", "cls_feature", "entropy", "gradient_id",
           "predict_with_tasks"]
