"""The state of a SoftModel's ``modules_to_save`` (the classifier head) in a mask file: extras
under :data:`SAVED_PREFIX`, checked against the model's before a load changes anything, and copied
into the model with the load's commit."""
from __future__ import annotations

import os
import warnings

import torch
from torch import Tensor

__all__ = ["SAVED_PREFIX", "SavedModulesLoad"]

# Extras under this prefix hold the state of the modules ``wrap`` keeps trainable besides the masks
# (``SoftConfig.modules_to_save``: the classifier head by default), so a reload reproduces the model.
SAVED_PREFIX = "modules_to_save/"


class SavedModulesLoad:
    """One load's ``check_extras`` / ``commit_extras`` hooks (:func:`~softtf.core.mask_file.add_tasks_from_file`)
    for the model state ``own`` (``"<module>.<name>"`` -> tensor) of the modules ``modules``."""

    def __init__(self, own: dict[str, Tensor], modules: list[str], path: str | os.PathLike):
        self.own, self.modules, self.path = own, modules, os.fspath(path)
        self.saved: dict[str, Tensor] = {}

    def check(self, extras: dict[str, Tensor]) -> None:
        own, path = self.own, self.path
        saved = self.saved
        saved.update({k[len(SAVED_PREFIX):]: v for k, v in extras.items() if k.startswith(SAVED_PREFIX)})
        if saved:
            missing, unknown = sorted(set(own) - set(saved)), sorted(set(saved) - set(own))
            if missing or unknown:
                raise ValueError(f"load_masks: {path!r} saved modules_to_save state that does not match "
                                 f"this model's (missing {missing[:4]}, unknown {unknown[:4]})")
            for k, v in saved.items():
                if v.shape != own[k].shape or v.dtype != own[k].dtype:
                    raise ValueError(f"load_masks: {k} in {path!r} is {v.dtype} {tuple(v.shape)}, the "
                                     f"model's is {own[k].dtype} {tuple(own[k].shape)}")
        elif own:
            warnings.warn(f"load_masks: {path!r} stores no modules_to_save state (saved by an older "
                          f"softtf); {self.modules} keep their current weights", stacklevel=4)

    def commit(self) -> None:
        with torch.no_grad():
            for k, v in self.saved.items():
                self.own[k].copy_(v)

    @staticmethod
    def callers_extras(extras: dict[str, Tensor]) -> dict[str, Tensor]:
        """The extras the caller stored (those not under :data:`SAVED_PREFIX`)."""
        return {k: v for k, v in extras.items() if not k.startswith(SAVED_PREFIX)}
