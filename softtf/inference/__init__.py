"""Task inference at test time: Gradient ID (SupSup's one-shot rule, per batch and per sample)
and Prompt ID (one key per task matched against the pretrained model's feature)."""
from .gradient_id import RULES, GradientIDResult, entropy, gradient_id, predict_with_tasks
from .prompt_id import PromptID, cls_feature

__all__ = ["RULES", "GradientIDResult", "PromptID", "cls_feature", "entropy", "gradient_id", "predict_with_tasks"]
