"""Which torch device and dtype the worker runs on.

`auto` picks cuda, then mps, then cpu; the dtype follows the device (float16
on GPUs, float32 on the CPU, where half precision is slow or unsupported)
unless the configuration names one.
"""

from __future__ import annotations

import torch

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_devices(setting: str) -> list[torch.device]:
    """Every device the worker drives: all GPUs for `cuda`/`auto`, else the one named."""
    if setting == "auto":
        if torch.cuda.is_available():
            return [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return [torch.device("mps")]
        return [torch.device("cpu")]
    if setting == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' was configured but torch sees no CUDA device")
        return [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    device = torch.device(setting)
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise RuntimeError(f"device '{setting}' was configured but torch does not see it")
    return [device]


def resolve_dtype(setting: str, device: torch.device) -> torch.dtype:
    if setting != "auto":
        return _DTYPES[setting]
    return torch.float16 if device.type in ("cuda", "mps") else torch.float32
