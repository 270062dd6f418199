"""Logging set-up for `livesale serve`: uvicorn's, minus tracebacks any client can trigger."""

from __future__ import annotations

import copy
import logging
from typing import Any

from uvicorn.config import LOGGING_CONFIG

# uvicorn logs these with a full traceback at ERROR level: a client sending bad frames
# could fill the log. The line stays; the traceback goes.
_CLIENT_FAULTS = ("Invalid UTF-8 sequence received from client",)


class DropClientTracebacks(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and any(m in record.getMessage() for m in _CLIENT_FAULTS):
            record.exc_info = None
            record.exc_text = None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


def log_config() -> dict[str, Any]:
    config = copy.deepcopy(LOGGING_CONFIG)
    config.setdefault("filters", {})["client_faults"] = {"()": DropClientTracebacks}
    config["handlers"]["default"]["filters"] = ["client_faults"]
    return config
