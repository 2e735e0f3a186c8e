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
    """Make any stray hub access fail at once instead of hanging on a closed network; set before the
    libraries are imported (they read it then), and cheap: the worker's start sets it."""
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ[name] = "1"
    for name in ("HF_HUB_DISABLE_TELEMETRY", "DISABLE_TELEMETRY", "HF_HUB_DISABLE_PROGRESS_BARS"):
        os.environ.setdefault(name, "1")


def quiet_libraries() -> None:
    """Offline, and the libraries' progress bars kept out of the host's console with their deprecations
    let through. Imports diffusers and transformers (seconds), so it is called where they are about to
    work: a model load or build, and the device side's start thread."""
    set_offline_environment()
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for library in (diffusers_logging, transformers_logging):
        library.set_verbosity_warning()
        library.disable_progress_bar()
        for handler in library.get_logger().handlers:  # the library's root logger: every module's records
            if not any(isinstance(f, _DeprecationsAndErrors) for f in handler.filters):
                handler.addFilter(_DeprecationsAndErrors())
