"""``flotilla report``: one run's report.html and the comparison of runs, rendered in headless
Chromium (curves with their points, legends, tables, a screenshot that is not blank), self-contained,
escaped, and bad input refused with a message naming the path."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import yaml

from launcher.cli import main
from launcher.report import write_comparison, write_report
from launcher.report.svg import PALETTE, Series, line_chart, nice_ticks, tick_label
from tests.browser import (
    charts,
    legend,
    parse,
    rendered_dom,
    rgb,
    screenshot_colours,
    series_points,
    table_rows,
)
from tests.conftest import flotilla, only_run_dir, tiny_classifier_job, tiny_job

RATES = (1e-3, 5e-3)


@pytest.fixture(scope="module")
def two_runs(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two tiny real trainings that differ only in their learning rate (in that order)."""
    root = tmp_path_factory.mktemp("report-runs")
    for index, rate in enumerate(RATES):
        spec = root / f"lr{index}.yaml"
        job = tiny_job(tiny_llama, root, eval={"steps": 4}, train={"learning_rate": rate})
        spec.write_text(yaml.safe_dump(job, sort_keys=False), encoding="utf-8")
        result = flotilla("run", str(spec))
        assert result.returncode == 0, result.stderr[-3000:]
    runs = sorted(p for p in (root / "runs" / "tiny").iterdir() if p.is_dir())
    assert len(runs) == 2
    return runs


@pytest.fixture(scope="module")
def classifier_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny real sentiment classifier (the bundled MiniLM), evaluated at steps 0, 2 and 4."""
    root = tmp_path_factory.mktemp("report-classifier")
    job = tiny_classifier_job(root / "runs", max_steps=4, eval={"steps": 2})
    spec = root / "cls.yaml"
    spec.write_text(yaml.safe_dump(job, sort_keys=False), encoding="utf-8")
    result = flotilla("run", str(spec))
    assert result.returncode == 0, result.stderr[-3000:]
    return only_run_dir(root / "runs", "cls")


def assert_not_blank(colours: Counter[tuple[int, int, int]], series: tuple[str, ...]) -> None:
    """Many colours, a fair share of non-white pixels, and each series colour drawn."""
    pixels = sum(colours.values())
    assert len(colours) > 100, len(colours)
    assert pixels - colours[(255, 255, 255)] > 0.03 * pixels
    for colour in series:
        assert colours[rgb(colour)] > 50, (colour, colours[rgb(colour)])


def test_the_run_report_has_curves_legends_and_tables_in_chromium(
    two_runs: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = two_runs[0]
    page = run / "report.html"
    page.unlink()  # training wrote one: the command writes it again
    assert main(["report", str(run)]) == 0
    assert f"report: {page}" in capsys.readouterr().out

    dom = rendered_dom(page, tmp_path / "profile")
    found = charts(dom)
    assert {"loss", "eval_perplexity", "learning rate", "gradient norm"} <= set(found)
    loss = series_points(found["loss"])
    assert loss["train loss"] == 8 and loss["eval loss"] >= 3  # every step; at 0, 4 and 8
    assert series_points(found["eval_perplexity"])["eval_perplexity"] >= 3
    assert series_points(found["learning rate"])["learning rate"] == 8
    assert legend(found["loss"]) == ["train loss", "eval loss"]
    for chart in found.values():
        assert "step" in [t.text() for t in chart.find("text", "x-label")]
        assert [t.text() for t in chart.find("text", "x-tick")][:3] == ["0", "2", "4"]
        assert len(chart.find("text", "y-tick")) >= 3

    settings = dict(table_rows(dom, "settings"))
    assert settings["learning rate"] == "0.001" and settings["adapter"].startswith("LoRA r=4 alpha=8")
    assert settings["length"] == "8 steps" and settings["backend"] == "local"
    assert settings["train data"].endswith("instructions.jsonl")
    metrics = {row[0]: row for row in table_rows(dom, "metrics")}
    assert {"eval_loss", "eval_perplexity", "train_loss"} <= set(metrics)
    totals = dict(table_rows(dom, "data-totals"))
    assert totals["train rows"] == "96" and totals["validation rows"] == "16"
    sources = table_rows(dom, "data-sources")
    assert [row[0] for row in sources] == ["train", "validation"]
    assert sources[0][1].endswith("instructions.jsonl") and sources[0][2] != "0"
    assert table_rows(dom, "data-lengths")[0][0] == "tokens"
    assert all(int(cell) > 0 for cell in table_rows(dom, "data-lengths")[0][1:])
    assert "torch" in dict(table_rows(dom, "packages"))
    assert not dom.find("pre")  # the data report is tables, not raw JSON

    colours = screenshot_colours(page, tmp_path / "profile", tmp_path / "report.png")
    assert_not_blank(colours, PALETTE[:2])


def test_a_classifier_report_charts_its_task_metrics_and_label_balance(
    classifier_run: Path, tmp_path: Path
) -> None:
    dom = rendered_dom(classifier_run / "report.html", tmp_path / "profile")
    found = charts(dom)
    for metric in ("eval_accuracy", "eval_precision", "eval_recall", "eval_f1", "eval_auc"):
        assert series_points(found[metric]) == {metric: 3}, metric  # at steps 0, 2 and 4
        assert legend(found[metric]) == [metric]
    assert dict(table_rows(dom, "settings"))["task"] == "sequence_classification"
    labels = {row[0]: row for row in table_rows(dom, "data-labels")}
    assert set(labels) == {"negative", "positive"} and all(int(row[1]) > 0 for row in labels.values())
    metrics = {row[0] for row in table_rows(dom, "metrics")}
    assert {"eval_accuracy", "eval_f1", "eval_auc", "train_accuracy"} <= metrics


def test_two_runs_compared_show_the_spec_diff_best_metrics_and_overlaid_curves(
    two_runs: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "ab.html"
    assert main(["report", *map(str, two_runs), "--out", str(out)]) == 0
    assert f"comparison of 2 runs: {out}" in capsys.readouterr().out

    dom = rendered_dom(out, tmp_path / "profile")
    names = [f"{letter} tiny/{run.name}" for letter, run in zip("AB", two_runs, strict=True)]
    diff = table_rows(dom, "spec-diff")
    assert diff == [["train.learning_rate", "0.001", "0.005"]]
    final = {row[0]: row[1:] for row in table_rows(dom, "final-metrics")}
    assert sum("★" in cell for cell in final["eval_loss"]) == 1
    found = charts(dom)
    assert {"train loss", "eval loss", "eval_perplexity", "learning rate"} <= set(found)
    for title in ("train loss", "eval loss", "learning rate"):
        points = series_points(found[title])
        assert len(points) == 2 and min(points.values()) >= 3, (title, points)
        entries = legend(found[title])
        assert len(entries) == 2
        for name, rate, entry in zip(names, ("0.001", "0.005"), entries, strict=True):
            assert entry == f"{name} (learning_rate={rate})"

    colours = screenshot_colours(out, tmp_path / "profile", tmp_path / "ab.png")
    assert_not_blank(colours, PALETTE[:2])


def test_the_comparison_goes_to_compare_html_in_the_working_directory_and_out_moves_either_page(
    two_runs: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["report", *map(str, two_runs)]) == 0
    assert f"comparison of 2 runs: {tmp_path / 'compare.html'}" in capsys.readouterr().out
    assert "train.learning_rate" in (tmp_path / "compare.html").read_text(encoding="utf-8")
    assert main(["report", str(two_runs[1]), "--out", "one.html"]) == 0
    assert "report: one.html" in capsys.readouterr().out
    assert "0.005" in (tmp_path / "one.html").read_text(encoding="utf-8")


HOSTILE = '<img src=x onerror="alert(1)">'


def fake_run(folder: Path, rate: float = 1e-3) -> Path:
    """A finished classification run's files, written by hand: no training, a hostile data path."""
    folder.mkdir(parents=True)
    spec = {
        "name": "cls",
        "seed": 1,
        "model": {"path": "minilm-l6", "task": "sequence_classification"},
        "data": {"train": [{"path": HOSTILE, "weight": 1.0}], "validation": [], "validation_ratio": 0.2},
        "peft": {"method": "none"},
        "train": {"learning_rate": rate, "scheduler": "linear", "epochs": 2.0, "max_steps": None},
        "resources": {"backend": "local", "precision": "bf16"},
    }
    plan = {"spec": spec, "micro_batch_size": 8, "world_size": 2, "gradient_accumulation_steps": 1}
    (folder / "plan.json").write_text(json.dumps({**plan, "global_batch_size": 16, "device": "cpu"}))
    after = {"eval_loss": 0.4 + rate, "eval_accuracy": 0.8 - rate, "eval_f1": 0.7}
    (folder / "summary.json").write_text(
        json.dumps({"steps": 4, "wall_seconds": 3.0, "before": after, "after": after, "artifact": "model"})
    )
    records = [{"step": s, "loss": 1.0 / s, "learning_rate": rate, "grad_norm": 1.0} for s in (1, 2, 3, 4)]
    records += [{"step": s, "eval_loss": 0.5, "eval_accuracy": 0.1 * s, "eval_f1": 0.2} for s in (2, 4)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    source = {"path": HOSTILE, "split": "train", "rows_read": 12, "rows_kept": 9, "bad_rows": 2}
    report = {
        "sources": [
            {**source, "empty_rows": 1, "duplicates_removed": 0, "bad_row_examples": ["line 3: no 'label'"]}
        ],
        "train_rows": 9,
        "validation_rows": 3,
        "leaked_rows": 1,
        "label_balance": {"negative": 1, "positive": 8},
        "token_length_percentiles": {"p50": 10, "p90": 20, "p99": 30, "max": 31},
    }
    (folder / "data_report.json").write_text(json.dumps(report))
    (folder / "manifest.json").write_text(json.dumps({"seed": 1, "packages": {"torch": "2.13.0"}}))
    return folder


def test_pages_are_self_contained_and_escape_what_the_spec_says(tmp_path: Path) -> None:
    runs = [fake_run(tmp_path / "cls" / "a"), fake_run(tmp_path / "cls" / "b", rate=2e-3)]
    pages = [write_report(runs[0]).read_text(), write_comparison(runs, tmp_path / "c.html").read_text()]
    for html in pages:
        assert "http://" not in html and "https://" not in html
        elements = parse(html).iter()
        assert not [e.tag for e in elements if e.tag in ("script", "img", "link", "iframe", "object")]
        assert not [e.attrs for e in elements if {"src", "href"} & set(e.attrs)]
    single, comparison = pages
    assert "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;" in single
    assert "eval_accuracy" in single and "eval_f1" in single and "positive" in single
    assert 'class="warn">1<' in single and "labels are imbalanced" in single and "line 3: no" in single
    assert "none (full fine-tune)" in single and "2.0 epochs" in single
    assert table_rows(parse(comparison), "spec-diff") == [["train.learning_rate", "0.001", "0.002"]]
    final = {row[0]: row[1:] for row in table_rows(parse(comparison), "final-metrics")}
    assert final == {
        "eval_accuracy": ["0.7990 ★", "0.7980"],  # higher is better
        "eval_f1": ["0.7000", "0.7000"],  # a tie marks none
        "eval_loss": ["0.4010 ★", "0.4020"],  # lower is better
    }


def test_bad_input_is_a_message_naming_the_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = fake_run(tmp_path / "cls" / "done")
    unfinished = fake_run(tmp_path / "cls" / "unfinished")
    (unfinished / "summary.json").unlink()
    federation = tmp_path / "fed"
    federation.mkdir()
    (federation / "rounds.jsonl").write_text("")
    broken = fake_run(tmp_path / "cls" / "broken")
    (broken / "plan.json").write_text("{not json")
    out = tmp_path / "no" / "such" / "c.html"
    cases = [
        ((str(tmp_path / "missing"),), "does not exist", tmp_path / "missing"),
        ((str(tmp_path),), "is not a Flotilla run directory (no plan.json)", tmp_path),
        ((str(run), str(unfinished)), "has no summary.json (the run has not finished)", unfinished),
        ((str(federation),), "is a federation work dir: use flotilla fed report", federation),
        ((str(run), str(broken)), "cannot be read as JSON", broken / "plan.json"),
        ((str(run), str(run), "--out", str(out)), "does not exist: cannot write", out),
    ]
    for args, message, named in cases:
        assert main(["report", *args]) == 2, args
        error = capsys.readouterr().err
        assert message in " ".join(error.split()) and "Traceback" not in error, (args, error)
        assert str(named) in "".join(error.split()), (named, error)


def test_chart_axes_have_round_ticks_that_cover_the_data() -> None:
    assert nice_ticks(0, 8) == [0, 2, 4, 6, 8]
    assert nice_ticks(10.61, 10.87) == pytest.approx([10.6, 10.7, 10.8, 10.9])
    flat = nice_ticks(0.4375, 0.4375)
    assert flat[0] < 0.4375 < flat[-1]  # a flat series sits inside its axis, not on its edge
    rates = nice_ticks(0.0, 2e-5)
    assert [tick_label(t, rates) for t in rates][:2] == ["0", "5.0e-06"]
    assert [tick_label(t, [0.0, 0.25]) for t in (0.0, 0.25)] == ["0", "0.25"]
    assert [tick_label(t, [10.6, 10.7]) for t in (10.6, 10.7)] == ["10.6", "10.7"]
    assert (
        line_chart("loss", [Series("train loss", [], PALETTE[0])], "loss")
        == '<p class="empty">no loss logged</p>'
    )
    one = parse(line_chart("eval <loss>", [Series("a & b", [(3.0, 1.5)], PALETTE[0])], "loss"))
    assert charts(one) == {"eval <loss>": charts(one)["eval <loss>"]} and legend(one) == ["a & b"]
