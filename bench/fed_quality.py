"""Federated vs local-only vs centralized, on the real MiniLM and the shipped non-IID sentiment sites.

1. federated: ``configs/federated.yaml`` in Flower's simulation engine (3 sites, ``rounds`` rounds of
   ``local.steps`` steps each);
2. local-only: each site's own job spec trained alone for rounds × local steps;
3. centralized: the three sites' data pooled (what federation avoids), for 3 × rounds × local steps,
   the same number of optimizer steps as all sites together.

All are evaluated on the shared validation set (configs/data/sites/shared_val.jsonl), and the time
per federated round is printed.

    python bench/fed_quality.py [--rounds 4] [--local-steps 8]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SITES = ("site_a", "site_b", "site_c")
SHARED_VAL = REPO / "configs" / "data" / "sites" / "shared_val.jsonl"


def train_and_evaluate(job: Path, overrides: list[str], *tests: str) -> tuple[dict[str, float], ...]:
    """Train a job spec through the train core and evaluate it on each of ``tests``."""
    from rich.console import Console

    from launcher.plan.jobs import prepare_run
    from launcher.train.core import run_training
    from launcher.train.evaluate import evaluate_target

    prepared = prepare_run(job, overrides)
    run_training(prepared.run_dir, Console(stderr=True, quiet=True))
    return tuple(evaluate_target(prepared.run_dir, test) for test in tests)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="federated vs local-only vs centralized")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--local-steps", type=int, default=8)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    from federated.ops.simulation import simulate
    from federated.rounds import RoundStore
    from federated.spec import load_federation

    out = Path(tempfile.mkdtemp(prefix="flotilla-fed-quality-"))
    overrides = [f"rounds={args.rounds}", f"local.steps={args.local_steps}", f"output={out}"]
    fed = load_federation(REPO / "configs" / "federated.yaml", overrides)
    simulate(fed, out / fed.name)
    rows = RoundStore(out / fed.name).rows()
    results: dict[str, Any] = {
        "federated": rows[-1]["server_eval"],
        "round_seconds": [row["seconds"] for row in rows[1:]],
    }
    steps = args.rounds * args.local_steps
    common = [f"output.dir={out}", "eval.at_start=false"]
    for site in SITES:
        job = REPO / "configs" / "federated" / f"{site}.yaml"
        (results[f"local-only {site}"],) = train_and_evaluate(
            job, [*common, f"train.max_steps={steps}"], str(SHARED_VAL)
        )
    pooled = json.dumps([{"path": str(REPO / "configs" / "data" / "sites" / f"{s}.jsonl")} for s in SITES])
    (results["centralized"],) = train_and_evaluate(
        REPO / "configs" / "federated" / "site_a.yaml",
        [*common, f"train.max_steps={len(SITES) * steps}", f"data.train={pooled}", "name=centralized"],
        str(SHARED_VAL),
    )
    print(f"\n{'model':<22} {'eval loss':>10} {'accuracy':>9} {'F1':>7} {'AUC':>7}   (shared validation set)")
    for name, metrics in results.items():
        if name == "round_seconds":
            continue
        print(
            f"{name:<22} {metrics['eval_loss']:>10.4f} {metrics['eval_accuracy']:>9.4f} "
            f"{metrics['eval_f1']:>7.4f} {metrics['eval_auc']:>7.4f}"
        )
    print(f"seconds per federated round: {', '.join(f'{s:.1f}' for s in results['round_seconds'])}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
