"""The Soft-TF core: SoftLinear, SoftConfig, wrapping a model, mask files. Knows no training."""
from .config import SoftConfig, detect_architecture, layer_index, resolve_config
from .files import atomic_write, load_tensors, save_tensors, write_json
from .layer import MaskSwitch, ModeState, SoftLinear, init_mask, preserve_modes, soft_layers, superposed_linear
from .tasks import current_task, use_task, use_tasks
from .mask_file import read_extras, read_mask_file
from .merge import merge_layer, merged_weight
from .optimizer_check import MissedMaskWarning
from .model import SoftModel, layers_of, load_masks, load_soft_model, save_masks, set_submodule, wrap

__all__ = [
    "MaskSwitch", "MissedMaskWarning", "ModeState", "SoftConfig", "SoftLinear", "SoftModel", "atomic_write", "detect_architecture",
    "init_mask", "layer_index", "layers_of", "load_masks", "merge_layer", "merged_weight", "load_soft_model", "load_tensors", "preserve_modes",
    "read_extras", "read_mask_file", "resolve_config", "save_masks", "save_tensors", "set_submodule", "soft_layers",
    "superposed_linear", "wrap", "write_json", "current_task", "use_task", "use_tasks",
]
