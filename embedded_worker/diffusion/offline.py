"""No hub, no progress bars: what the worker sets before diffusers and transformers do anything."""

from __future__ import annotations

import os


def set_offline_environment() -> None:
    """Make any stray hub access fail at once instead of hanging on a closed network, and keep the
    libraries' progress bars out of the host's console. Their warnings stay at the libraries' own
    level (warning): we call private diffusers helpers, so a deprecation notice is one we must see."""
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ[name] = "1"
    for name in ("HF_HUB_DISABLE_TELEMETRY", "DISABLE_TELEMETRY", "HF_HUB_DISABLE_PROGRESS_BARS"):
        os.environ.setdefault(name, "1")
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
