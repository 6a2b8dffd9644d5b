"""A real non-IID text benchmark from the Debian package index: which Section a package belongs to.

Every Debian machine has the index offline after ``apt-get update``; ``apt-cache dumpavail`` prints
one paragraph per package. The text is the package's one-line description (never its name, which
gives the section away: ``python3-*``, ``lib*-perl``); the label is its ``Section``. Descriptions
that occur in more than one section are dropped, duplicates kept once.

Sites are cut by Dirichlet(alpha) label skew (Hsu et al., 2019): for each section, the shares of
its rows per site are drawn from Dir(alpha, ..., alpha), so small alpha gives each site a few home
sections and uneven sizes (label and quantity skew together). A balanced test split is held out
before the cut and shared by every model; each site also keeps a held-out file of its own rows
(its own distribution) for personalised evaluation, and gets a larger sample of the shared split
drawn with its section mix, which estimates the same thing with less noise.

Two tasks over the same rows and the same cut (same seed, same sites):

- ``classification`` (the default): MiniLM LoRA predicts the section of a description; rows are
  ``{"text", "label"}``.
- ``causal_lm``: SmolLM2-135M-Instruct LoRA (q_proj, v_proj) learns the descriptions themselves
  (data format ``text``: the loss is on the whole description); rows are ``{"text", "section"}``, the
  section kept only to document the skew (the ``text`` format reads ``text`` alone). Models are
  compared by perplexity on the held-out rows. The text is the one-line description only: the index
  carries no long descriptions (just their ``Description-md5``; they live in the ``Translation-*``
  files, which ``apt-get update`` does not fetch by default).

    python bench/apt_sections.py OUT_DIR [--sites 8] [--alpha 0.3] [--rows-per-section 400] \
        [--task causal_lm]

writes ``OUT_DIR/test.jsonl``, ``OUT_DIR/site_<i>.jsonl``, ``OUT_DIR/site_<i>.test.jsonl``,
``OUT_DIR/site_<i>.mix-test.jsonl`` (shared test rows with the site's section mix), a local job spec
per site, ``OUT_DIR/fed.yaml`` and ``OUT_DIR/partition.json`` (rows per site and
section).
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml

SECTIONS = ("libs", "python", "perl", "devel", "utils", "net", "doc", "games")
#: A site whose cut holds fewer rows than this is redrawn (a site with nothing to train on is no site).
MIN_SITE_ROWS = 20

Task = Literal["classification", "causal_lm"]


@dataclass(frozen=True)
class TaskSetup:
    """What the sites of one task train: the model, its data format, LoRA targets and batches."""

    model: dict[str, str]
    data_format: str
    #: The row key that holds the section: the label, or a note beside a text row.
    section_key: str
    target_modules: list[str]
    max_length: int
    micro_batch_size: int
    learning_rate: float

    @property
    def classifies(self) -> bool:
        return self.data_format == "classification"


TASKS: dict[str, TaskSetup] = {
    "classification": TaskSetup(
        model={"path": "minilm-l6", "task": "sequence_classification"},
        data_format="classification",
        section_key="label",
        target_modules=["query", "value"],
        max_length=48,
        micro_batch_size=16,
        learning_rate=2e-3,
    ),
    "causal_lm": TaskSetup(
        model={"path": "smollm2-135m-instruct", "task": "causal_lm"},
        data_format="text",
        section_key="section",
        target_modules=["q_proj", "v_proj"],
        max_length=64,
        micro_batch_size=8,
        learning_rate=1e-3,
    ),
}


@dataclass(frozen=True)
class Benchmark:
    """Where one built benchmark lies."""

    root: Path
    sites: list[str]

    @property
    def fed_spec(self) -> Path:
        return self.root / "fed.yaml"

    @property
    def test_file(self) -> Path:
        return self.root / "test.jsonl"

    def site_spec(self, site: str) -> Path:
        return self.root / f"{site}.yaml"

    def site_data(self, site: str) -> Path:
        return self.root / f"{site}.jsonl"

    def site_test(self, site: str) -> Path:
        return self.root / f"{site}.test.jsonl"

    def site_validation(self, site: str) -> Path:
        """The site's validation rows (only with ``site_validation_ratio`` > 0)."""
        return self.root / f"{site}.validation.jsonl"

    def site_mix_test(self, site: str) -> Path:
        """Shared test rows drawn with the site's section mix (see :func:`section_mix_sample`)."""
        return self.root / f"{site}.mix-test.jsonl"


def read_index() -> str:
    """``apt-cache dumpavail``; a clear error when the index is empty or apt is missing."""
    try:
        text = subprocess.run(["apt-cache", "dumpavail"], check=True, capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError) as error:
        raise SystemExit(f"apt_sections: `apt-cache dumpavail` failed ({error}); is this Debian?") from error
    if text.count("\nPackage: ") < 1000:
        raise SystemExit("apt_sections: the package index is (nearly) empty: run `apt-get update` first")
    return text


def labelled_descriptions(index: str, sections: tuple[str, ...] = SECTIONS) -> dict[str, list[str]]:
    """Section -> unique one-line descriptions, ambiguous ones (seen in several sections) dropped."""
    seen: dict[str, set[str]] = {}
    for paragraph in index.split("\n\n"):
        fields: dict[str, str] = {}
        for line in paragraph.splitlines():
            key, _, value = line.partition(": ")
            if key in ("Section", "Description") and key not in fields:
                fields[key] = value.strip()
        section = fields.get("Section", "").rsplit("/", 1)[-1]
        description = fields.get("Description", "")
        if section in sections and description:
            seen.setdefault(description, set()).add(section)
    by_section: dict[str, list[str]] = {s: [] for s in sections}
    for description, found in seen.items():
        if len(found) == 1:
            by_section[next(iter(found))].append(description)
    return {s: sorted(rows) for s, rows in by_section.items()}


def dirichlet_cut(
    counts: dict[str, int], sites: int, alpha: float, rng: np.random.Generator
) -> dict[str, list[int]]:
    """Section -> rows per site, each section's shares drawn from Dir(alpha); redrawn until every
    site holds at least ``MIN_SITE_ROWS`` rows."""
    for _ in range(1000):
        cut = {}
        for section, n in counts.items():
            shares = rng.dirichlet(np.full(sites, alpha))
            edges = np.round(np.cumsum(shares) * n).astype(int)
            cut[section] = np.diff(np.concatenate([[0], edges])).tolist()
        per_site = np.sum(list(cut.values()), axis=0)
        if per_site.min() >= MIN_SITE_ROWS:
            return cut
    raise SystemExit(f"apt_sections: no Dirichlet({alpha}) cut gives every site {MIN_SITE_ROWS} rows")


def _write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def _peft(setup: TaskSetup) -> dict[str, Any]:
    return {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.0, "target_modules": setup.target_modules}


def site_job(
    site: str,
    root: Path,
    learning_rate: float,
    sections: tuple[str, ...],
    task: Task = "classification",
) -> dict[str, Any]:
    """The local job spec of one site (LoRA, its own rows; the federation sets the budget)."""
    setup = TASKS[task]
    data: dict[str, Any] = {
        "train": str(root / f"{site}.jsonl"),
        "format": setup.data_format,
        "validation": str(root / f"{site}.test.jsonl"),
        "max_length": setup.max_length,
    }
    if setup.classifies:
        data["labels"] = list(sections)
    return {
        "name": site,
        "seed": 42,
        "model": dict(setup.model),
        "data": data,
        "peft": _peft(setup),
        "train": {
            "learning_rate": learning_rate,
            "scheduler": "constant",
            "warmup_ratio": 0.0,
            "micro_batch_size": setup.micro_batch_size,
            "logging_steps": 10,
        },
        "eval": {"batch_size": 64},
    }


def federation(
    sites: list[str],
    root: Path,
    rounds: int,
    local_steps: int,
    sections: tuple[str, ...],
    task: Task = "classification",
) -> dict[str, Any]:
    """The federation spec over the sites (FedAvg, evaluated on the shared test split)."""
    setup = TASKS[task]
    spec: dict[str, Any] = {"name": "apt-sections", "seed": 42, "model": dict(setup.model)}
    if setup.classifies:
        spec["labels"] = list(sections)
    return spec | {
        "peft": _peft(setup),
        "rounds": rounds,
        "min_sites": len(sites),
        "local": {"steps": local_steps},
        "strategy": {"name": "fedavg"},
        "evaluation": {
            "data": str(root / "test.jsonl"),
            "format": setup.data_format,
            "max_length": setup.max_length,
            "batch_size": 64,
        },
        "sites": {site: str(root / f"{site}.yaml") for site in sites},
        "output": str(root / "runs"),
    }


def section_mix_sample(
    test: list[dict[str, str]], mix: Counter[str], section_key: str
) -> list[dict[str, str]]:
    """The largest sample of the shared ``test`` rows whose sections follow ``mix`` (a site's rows
    per section): the site's own distribution, estimated on 2-7x more rows than its held-out
    file (a site of 200 rows holds out 40; a 3-row difference there is 7.5 points).

    The section that dominates ``mix`` contributes all its shared rows, every other one its
    share of them (rounded), in the order of ``test``; no row of a site's training file is in it.
    """
    by_section: dict[str, list[dict[str, str]]] = {}
    for row in test:
        by_section.setdefault(row[section_key], []).append(row)
    total, home = sum(mix.values()), max(mix, key=mix.__getitem__)
    size = len(by_section[home]) * total / mix[home]
    return [
        row for section, count in mix.items() for row in by_section[section][: round(size * count / total)]
    ]


def build(
    root: Path,
    sites: int = 8,
    alpha: float = 0.3,
    rows_per_section: int = 400,
    test_per_section: int = 100,
    site_test_ratio: float = 0.2,
    site_validation_ratio: float = 0.0,
    rounds: int = 10,
    local_steps: int = 10,
    learning_rate: float | None = None,
    seed: int = 0,
    sections: tuple[str, ...] = SECTIONS,
    task: Task = "classification",
) -> Benchmark:
    """Build the benchmark for ``task`` under ``root`` from this machine's package index (the
    learning rate defaults to the task's)."""
    setup = TASKS[task]
    rate = setup.learning_rate if learning_rate is None else learning_rate
    by_section = labelled_descriptions(read_index(), sections)
    short = {
        s: len(rows) for s, rows in by_section.items() if len(rows) < rows_per_section + test_per_section
    }
    if short:
        raise SystemExit(
            f"apt_sections: too few descriptions for {short} (rows_per_section + test_per_section)"
        )
    rng = np.random.default_rng(seed)
    shuffler = random.Random(seed)
    test, pools = [], {}
    for section, rows in by_section.items():
        rows = list(rows)
        shuffler.shuffle(rows)
        test += [{"text": text, setup.section_key: section} for text in rows[:test_per_section]]
        pools[section] = rows[test_per_section : test_per_section + rows_per_section]
    root.mkdir(parents=True, exist_ok=True)
    shuffler.shuffle(test)
    _write_jsonl(root / "test.jsonl", test)
    cut = dirichlet_cut({s: len(rows) for s, rows in pools.items()}, sites, alpha, rng)
    names = [f"site_{i}" for i in range(sites)]
    partition: dict[str, dict[str, int]] = {}
    for index, site in enumerate(names):
        rows = []
        for section, pool in pools.items():
            start = sum(cut[section][:index])
            rows += [
                {"text": text, setup.section_key: section}
                for text in pool[start : start + cut[section][index]]
            ]
        shuffler.shuffle(rows)
        held = max(1, round(len(rows) * site_test_ratio))
        validation = held + round(len(rows) * site_validation_ratio)
        _write_jsonl(root / f"{site}.test.jsonl", rows[:held])
        mix = Counter(row[setup.section_key] for row in rows)
        _write_jsonl(root / f"{site}.mix-test.jsonl", section_mix_sample(test, mix, setup.section_key))
        if validation > held:  # for choosing a personalised model without looking at the test rows
            _write_jsonl(root / f"{site}.validation.jsonl", rows[held:validation])
        _write_jsonl(root / f"{site}.jsonl", rows[validation:])
        partition[site] = dict(Counter(row[setup.section_key] for row in rows[validation:]))
        (root / f"{site}.yaml").write_text(
            yaml.safe_dump(site_job(site, root, rate, sections, task), sort_keys=False)
        )
    (root / "fed.yaml").write_text(
        yaml.safe_dump(federation(names, root, rounds, local_steps, sections, task), sort_keys=False)
    )
    summary = {"sites": sites, "alpha": alpha, "seed": seed, "test_rows": len(test), "partition": partition}
    (root / "partition.json").write_text(json.dumps(summary, indent=2))
    return Benchmark(root, names)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Debian package sections as a non-IID federated benchmark")
    parser.add_argument("out", type=Path)
    parser.add_argument("--sites", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=0.3)
    parser.add_argument("--rows-per-section", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--task", choices=list(TASKS), default="classification")
    args = parser.parse_args(argv)
    bench = build(args.out, args.sites, args.alpha, args.rows_per_section, seed=args.seed, task=args.task)
    print(json.dumps(json.loads((bench.root / "partition.json").read_text())["partition"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
