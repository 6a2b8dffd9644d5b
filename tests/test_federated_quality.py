"""Federated quality on real label-skewed text (Debian package sections, bench/apt_sections.py).

A CI-sized cut of the benchmark: 3 sites, Dirichlet(0.3) skew over 4 sections, real MiniLM LoRA,
the federation's defaults (FedAvg, each site's logits adjusted by its label mix) in Flower's
simulation engine. Each site alone, trained for the steps it spends in the federation, learns mostly
its home sections; the federated model must beat every one of them, plain or logit-adjusted, on the
shared, balanced test split. (An aggregation that keeps one site's update
instead of averaging fails this test: checked once by hand, see the closing notes of issue 16.)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import unavailable

ROUNDS, LOCAL_STEPS, SITES = 4, 8, 3
SECTIONS = ("libs", "python", "doc", "games")


@pytest.fixture(scope="module")
def benchmark(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    if shutil.which("apt-cache") is None:
        unavailable("apt-cache is not installed (the benchmark reads Debian's package index)")
    from bench.apt_sections import build

    try:
        return build(
            tmp_path_factory.mktemp("apt"),
            sites=SITES,
            alpha=0.3,
            rows_per_section=150,
            test_per_section=60,
            rounds=ROUNDS,
            local_steps=LOCAL_STEPS,
            sections=SECTIONS,
        )
    except SystemExit as exc:
        unavailable(str(exc))


def test_the_federated_model_beats_every_site_alone_on_label_skewed_sections(
    benchmark, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    from rich.console import Console

    from federated.ops.simulation import simulate
    from federated.rounds import RoundStore
    from federated.spec import load_federation
    from launcher.plan.jobs import prepare_run
    from launcher.train.core import run_training
    from launcher.train.evaluate import evaluate_target

    partition = json.loads((benchmark.root / "partition.json").read_text())["partition"]
    for counts in partition.values():  # label skew: every site lacks (nearly) one section or more
        assert min(counts.get(s, 0) for s in SECTIONS) < 0.05 * sum(counts.values()), partition
    fed = load_federation(benchmark.fed_spec, [f"output={tmp_path / 'fed'}"])
    simulate(fed, tmp_path / "fed" / fed.name)
    federated = RoundStore(tmp_path / "fed" / fed.name).rows()[-1]["server_eval"]

    local: dict[str, dict[str, float]] = {}
    for site in benchmark.sites:  # each alone, plain and with the logit adjustment its sites train with
        for name, extra in ((site, []), (f"{site}+logit-adjust", ["train.logit_adjustment=1.0"])):
            overrides = [
                *extra,
                f"train.max_steps={ROUNDS * LOCAL_STEPS}",
                f"output.dir={tmp_path / 'local'}",
                "eval.at_start=false",
            ]
            prepared = prepare_run(benchmark.site_spec(site), overrides)
            run_training(prepared.run_dir, Console(stderr=True, quiet=True))
            local[name] = evaluate_target(prepared.run_dir, str(benchmark.test_file))
    print(json.dumps({"partition": partition, "federated": federated, "local_only": local}, indent=1))
    for site, metrics in local.items():
        assert federated["eval_accuracy"] > metrics["eval_accuracy"], (site, federated, metrics)
        assert federated["eval_f1"] > metrics["eval_f1"], (site, federated, metrics)
