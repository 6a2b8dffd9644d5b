"""What a training run shows on the terminal (rank 0): one progress bar (step, loss, learning rate,
tokens/s, time left) and one aligned table line per evaluation, in place of the Trainer's tqdm bar
and its raw log dicts."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

#: Evaluation metrics shown first, in this order; any other eval_* metric follows, sorted.
FIRST_EVAL_COLUMNS = ("eval_loss", "eval_perplexity", "eval_accuracy", "eval_f1", "eval_auc")
#: Evaluation keys that are bookkeeping, not metrics.
EVAL_BOOKKEEPING = (
    "_runtime",
    "_samples_per_second",
    "_steps_per_second",
    "_model_preparation_time",
    "epoch",
)


class RichProgress(TrainerCallback):
    """The progress bar and the evaluation table of a training run, on the world's process zero."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.progress: Progress | None = None
        self.task: Any = None
        self.fields = {"loss": "-", "lr": "-", "speed": "-"}
        self.started = (0.0, 0)  # (time, tokens seen) when this process began training
        self.eval_columns: list[str] | None = None

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if not state.is_world_process_zero:
            return
        self.progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(bar_width=30),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}  {task.fields[speed]} tok/s"),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        self.progress.start()
        self.task = self.progress.add_task(
            "train", total=state.max_steps, completed=state.global_step, **self.fields
        )
        self.started = (time.monotonic(), state.num_input_tokens_seen)

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.progress is None:
            return
        since, tokens = self.started
        elapsed = time.monotonic() - since
        if elapsed > 0 and state.num_input_tokens_seen > tokens:
            self.fields["speed"] = f"{(state.num_input_tokens_seen - tokens) / elapsed:,.0f}"
        self.progress.update(self.task, completed=state.global_step, **self.fields)

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if self.progress is None or not logs:
            return
        if isinstance(logs.get("loss"), int | float):
            self.fields["loss"] = f"{logs['loss']:.4f}"
        if isinstance(logs.get("learning_rate"), int | float):
            self.fields["lr"] = f"{logs['learning_rate']:.2e}"

    def on_evaluate(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        metrics: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if not state.is_world_process_zero or not metrics or not eval_columns(metrics):
            return  # not an evaluation on the validation set (the train probe's is in the summary)
        if self.eval_columns is None:
            self.eval_columns = eval_columns(metrics)
            self._print(eval_header(self.eval_columns))
        self._print(eval_line(state.global_step, self.eval_columns, metrics))

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step, **self.fields)
            self.progress.stop()
            self.progress = None

    def _print(self, line: str) -> None:
        target = self.progress.console if self.progress is not None else self.console
        target.print(escape(line), highlight=False, soft_wrap=True)


def eval_columns(metrics: dict[str, Any]) -> list[str]:
    """The evaluation metrics to show as columns: the usual ones first, then the rest, sorted."""
    shown = [
        k
        for k, v in metrics.items()
        if k.startswith("eval_") and isinstance(v, int | float) and not k.endswith(EVAL_BOOKKEEPING)
    ]
    return [k for k in FIRST_EVAL_COLUMNS if k in shown] + sorted(set(shown) - set(FIRST_EVAL_COLUMNS))


def eval_header(columns: list[str]) -> str:
    """``eval    step  loss      accuracy ...``: the evaluation table's header."""
    return "eval  " + "  ".join(["step".rjust(6)] + [_name(c).rjust(_width(c)) for c in columns])


def eval_line(step: int, columns: list[str], metrics: dict[str, Any]) -> str:
    """One evaluation as a row under :func:`eval_header` (``-`` for a metric this one lacks)."""
    cells = [f"{step:>6}"]
    for column in columns:
        value = metrics.get(column)
        text = f"{value:.4f}" if isinstance(value, int | float) else "-"
        cells.append(text.rjust(_width(column)))
    return "eval  " + "  ".join(cells)


def _name(column: str) -> str:
    return column.removeprefix("eval_")


def _width(column: str) -> int:
    return max(len(_name(column)), 9)
