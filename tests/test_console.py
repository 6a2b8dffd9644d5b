"""What a run shows on the terminal: one progress bar and aligned evaluation lines, no raw Trainer
log dicts, library warnings once each; ``--quiet`` and ``--json`` for scripts."""

from __future__ import annotations

import io
import json
import logging
import re
import uuid
import warnings
from pathlib import Path

from launcher.rundir import read_jsonl
from launcher.train.library_output import show_library_warnings_once
from tests.conftest import flotilla, only_run_dir, tiny_job


def test_a_run_shows_a_progress_bar_and_one_table_line_per_evaluation_and_no_log_dicts(
    tiny_llama: Path, tmp_path: Path, write_spec
) -> None:
    spec = write_spec(tiny_job(tiny_llama, tmp_path, train={"max_steps": 6}, eval={"steps": 3}))
    result = flotilla("run", str(spec))
    assert result.returncode == 0, result.stderr[-3000:]
    shown = result.stdout + result.stderr
    assert not re.search(r"\{'(loss|eval_loss|train_runtime)'", shown), shown[-3000:]
    bar = [line for line in result.stderr.splitlines() if line.startswith("train ")]
    assert bar and re.search(r"6/6 +loss \d+\.\d{4} +lr \S+ +[\d,]+ tok/s", bar[-1]), bar
    header = [
        line.split() for line in result.stderr.splitlines() if line.startswith("eval ") and "step" in line
    ]
    assert header and header[0][:3] == ["eval", "step", "loss"], header
    rows = [line.split() for line in result.stderr.splitlines() if re.match(r"eval +\d+ ", line)]
    run_dir = only_run_dir(tmp_path / "runs")
    evaluations = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "eval_loss" in r]
    # at the start, at steps 3 and 6, and the final evaluation: each one aligned line, in order
    assert [(int(r[1]), r[2]) for r in rows] == [(e["step"], f"{e['eval_loss']:.4f}") for e in evaluations]
    assert len({len(r) for r in rows}) == 1


def test_json_prints_the_outcome_for_scripts_and_shows_nothing_while_training(
    tiny_llama: Path, tmp_path: Path, write_spec
) -> None:
    spec = write_spec(tiny_job(tiny_llama, tmp_path, train={"max_steps": 2}))
    result = flotilla("run", str(spec), "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    outcome = json.loads(result.stdout)
    run_dir = only_run_dir(tmp_path / "runs")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert outcome["finished"] is True and outcome["run_dir"] == str(run_dir)
    assert outcome["after"] == summary["after"] and outcome["steps"] == 2
    assert not [line for line in result.stderr.splitlines() if line.startswith(("train ", "data:", "model:"))]


def test_a_library_warning_repeated_is_shown_once() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    library = logging.getLogger("transformers")
    library.addHandler(handler)
    try:
        show_library_warnings_once()
        logger = logging.getLogger("transformers.modeling_utils")
        text = f"weights not initialized {uuid.uuid4().hex}"
        for _ in range(3):
            logger.warning(text)
        logger.warning("another %s", text)
        logger.error(text)
        logger.error(text)  # errors are never held back
    finally:
        library.removeHandler(handler)
    lines = stream.getvalue().splitlines()
    assert lines == [text, f"another {text}", text, text]

    shown: list[str] = []
    previous = warnings.showwarning
    warnings.showwarning = lambda message, *args, **kwargs: shown.append(str(message))
    try:
        show_library_warnings_once()
        deprecated = f"argument {uuid.uuid4().hex} is deprecated"
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            for _ in range(3):
                warnings.warn(deprecated, FutureWarning, stacklevel=1)
    finally:
        warnings.showwarning = previous
    assert shown == [deprecated]
