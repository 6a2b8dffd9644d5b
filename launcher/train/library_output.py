"""Library output kept off the run's terminal: the same warning from transformers, peft, datasets,
accelerate, torch or DeepSpeed (through ``logging`` or ``warnings``), repeated by every step,
evaluation or process start, appears the first time only; the libraries' own progress bars (loading
weights, writing shards, mapping rows) are off, as the run has its own."""

from __future__ import annotations

import logging
import warnings

#: Loggers whose handlers get the filter (libraries that attach their own handler, and the root).
LIBRARY_LOGGERS = ("", "transformers", "peft", "datasets", "accelerate", "torch", "DeepSpeed", "ray", "flwr")


class OncePerMessage(logging.Filter):
    """Passes a record of WARNING or above only the first time its logger and text are seen."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[tuple[str, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING or record.levelno >= logging.ERROR:
            return True
        key = (record.name, record.getMessage())
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


_SHOWN: set[tuple[type[Warning], str]] = set()


def show_library_warnings_once() -> None:
    """Install the once-per-message filter on the library loggers' handlers, and show each
    ``warnings`` text once (the filters that libraries set still decide what is shown). Idempotent."""
    show = warnings.showwarning
    if not getattr(show, "flotilla_once", False):

        def show_once(
            message: Warning | str, category: type[Warning], *args: object, **kwargs: object
        ) -> None:
            key = (category, str(message))
            if key not in _SHOWN:
                _SHOWN.add(key)
                show(message, category, *args, **kwargs)  # type: ignore[arg-type]

        show_once.flotilla_once = True  # type: ignore[attr-defined]
        warnings.showwarning = show_once
    for name in LIBRARY_LOGGERS:
        for handler in logging.getLogger(name).handlers:
            # one filter per handler: a record reaches several handlers (its logger's, the root's)
            if not any(isinstance(f, OncePerMessage) for f in handler.filters):
                handler.addFilter(OncePerMessage())


def hide_library_progress_bars() -> None:
    """Turn off transformers' and datasets' tqdm bars (their work is reported by the train core)."""
    from datasets import disable_progress_bars
    from transformers.utils.logging import disable_progress_bar

    disable_progress_bar()
    disable_progress_bars()
