"""No hub, no progress bars: what the worker sets before diffusers and transformers do anything."""

from __future__ import annotations

import logging
import os


class _DeprecationsAndErrors(logging.Filter):
    """Of the libraries' own log records, errors and deprecation notices: we call private diffusers
    helpers, so a deprecation is our warning; their install advice (accelerate, torchvision) is noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or "deprecat" in record.getMessage().lower()


def set_offline_environment() -> None:
    """Make any stray hub access fail at once instead of hanging on a closed network, keep the
    libraries' progress bars out of the host's console, and let their deprecations through."""
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ[name] = "1"
    for name in ("HF_HUB_DISABLE_TELEMETRY", "DISABLE_TELEMETRY", "HF_HUB_DISABLE_PROGRESS_BARS"):
        os.environ.setdefault(name, "1")
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for library in (diffusers_logging, transformers_logging):
        library.set_verbosity_warning()
        library.disable_progress_bar()
        for handler in library.get_logger().handlers:  # the library's root logger: every module's records
            if not any(isinstance(f, _DeprecationsAndErrors) for f in handler.filters):
                handler.addFilter(_DeprecationsAndErrors())
