"""A pipeline module's device and dtype, read from its first parameter.

diffusers' `ModelMixin.device` and `.dtype` look for offloading and casting
hooks in every submodule first: 0.3-1 ms each on the tiny models, on the
device thread, and a cohort asked three of them (its start, its decode).
The worker adds neither hook, so the first parameter answers the same.
"""

from __future__ import annotations

import torch


def device_of(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def dtype_of(module: torch.nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype
