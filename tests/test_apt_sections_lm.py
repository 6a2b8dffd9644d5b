"""The causal-LM variant of the Debian package sections benchmark (bench/apt_sections.py): built
data and specs only, no training."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

from tests.conftest import unavailable

SECTIONS = ("libs", "python", "doc", "games")


def test_causal_lm_sites_hold_text_rows_cut_by_section_and_their_specs_load(tmp_path: Path) -> None:
    if shutil.which("apt-cache") is None:
        unavailable("apt-cache is not installed (the benchmark reads Debian's package index)")
    from bench.apt_sections import build
    from federated.spec import load_federation
    from launcher.data.prepare import reader
    from launcher.plan import load_job

    try:
        bench = build(
            tmp_path,
            sites=3,
            alpha=0.3,
            rows_per_section=60,
            test_per_section=20,
            sections=SECTIONS,
            task="causal_lm",
        )
    except SystemExit as exc:
        unavailable(str(exc))

    def rows(path: Path) -> list[dict[str, str]]:
        return [json.loads(line) for line in path.read_text().splitlines()]

    assert Counter(row["section"] for row in rows(bench.test_file)) == dict.fromkeys(SECTIONS, 20)
    partition = json.loads((bench.root / "partition.json").read_text())["partition"]
    for site in bench.sites:
        assert Counter(row["section"] for row in rows(bench.site_data(site))) == partition[site]
        job = load_job(bench.site_spec(site), [])
        assert (job.model.task, job.data.format, job.data.labels) == ("causal_lm", "text", None)
        read = list(reader(job.data, job.data.train[0]))
        assert read == [{"text": row["text"]} for row in rows(bench.site_data(site))]
    # label skew: every site lacks (nearly) one section or more
    for counts in partition.values():
        assert min(counts.get(s, 0) for s in SECTIONS) < 0.05 * sum(counts.values()), partition
    fed = load_federation(bench.fed_spec)
    assert (fed.model.task, fed.labels, fed.evaluation.format) == ("causal_lm", None, "text")
    assert fed.local.logit_adjustment_for(fed.model.task) == 0.0
    assert sorted(fed.sites) == bench.sites
    for site in bench.sites:  # the shared rows drawn with the site's mix: only sections it holds
        held = Counter(row["section"] for row in rows(bench.site_data(site)) + rows(bench.site_test(site)))
        assert set(Counter(row["section"] for row in rows(bench.site_mix_test(site)))) <= set(held)


def test_section_mix_sample_follows_the_site_mix_and_takes_all_home_rows() -> None:
    from bench.apt_sections import section_mix_sample

    test = [{"text": f"{s} {i}", "label": s} for i in range(20) for s in ("libs", "doc", "games")]
    mix = Counter({"doc": 30, "libs": 15, "games": 3})  # doc home: all 20 rows, libs 10, games 2
    sample = section_mix_sample(test, mix, "label")
    assert Counter(row["label"] for row in sample) == {"doc": 20, "libs": 10, "games": 2}
    assert [row for row in sample if row["label"] == "libs"] == [r for r in test if r["label"] == "libs"][:10]
    assert section_mix_sample(test, Counter({"games": 7}), "label") == [
        r for r in test if r["label"] == "games"
    ]
