"""Federated learning levers on a real label-skewed benchmark (Debian package sections, bench/apt_sections.py).

One run builds the benchmark (``--sites`` sites, Dirichlet(``--alpha``) label skew, a balanced shared
test split), then trains, all through Flotilla's own train core:

1. pooled: every site's rows in one job for sites x rounds x local steps optimizer steps, the same
   total steps the federation spends (what federation exists to avoid);
2. local-only: each site alone for rounds x local steps (the steps it spends in the federation),
   evaluated on the shared test split and on its own held-out rows;
3. each variant: the federation in Flower's simulation engine with that variant's spec overrides.

A variant's accuracy per round is the server's evaluation of the global adapter on the shared test
split (``rounds.jsonl``); "rounds to 90%" is the first round whose accuracy reaches 90% of pooled.

``--task causal_lm`` runs the same cut as SmolLM2 LoRA learning the descriptions (see
bench/apt_sections.py) and measures perplexity instead, lower better: "of pooled" is pooled perplexity
/ the variant's (1.0 is as good as pooled), "rounds to 90%" the first round within 1/0.9 of pooled.
Variants and baselines that adjust logits or keep a classifier head are classification only.

    python bench/fed_noniid.py [--sites 8] [--alpha 0.3] [--rounds 10] [--local-steps 10] \
        [--task classification] [--variants fedavg,fedavgm] [--json bench/results/fed_noniid.json]
    python bench/fed_noniid.py --print bench/results/fed_noniid*.json     # the tables of saved runs
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent

#: variant -> federation spec overrides. Variants measured before logit adjustment and the kept
#: optimizer state became the defaults turn them off, so that they stay what was measured.
VARIANTS: dict[str, list[str]] = {
    "fedavg": ["strategy.name=fedavg", "local.logit_adjustment=0", "local.optimizer_state=reset"],
    "fedavgm": [
        "strategy.name=fedavgm",
        "strategy.server_learning_rate=1.0",
        "strategy.server_momentum=0.9",
        "local.logit_adjustment=0",
        "local.optimizer_state=reset",
    ],
    "fedadam": [
        "strategy.name=fedadam",
        "strategy.server_learning_rate=0.01",
        "local.logit_adjustment=0",
        "local.optimizer_state=reset",
    ],
    "fedyogi": [
        "strategy.name=fedyogi",
        "strategy.server_learning_rate=0.01",
        "local.logit_adjustment=0",
        "local.optimizer_state=reset",
    ],
    "fedprox": [
        "strategy.name=fedprox",
        "strategy.proximal_mu=0.1",
        "local.logit_adjustment=0",
        "local.optimizer_state=reset",
    ],
    "lora_product": ["strategy.name=lora_product", "local.logit_adjustment=0", "local.optimizer_state=reset"],
    "fedavg+cosine": [
        "strategy.name=fedavg",
        "local.lr_schedule=cosine",
        "local.logit_adjustment=0",
        "local.optimizer_state=reset",
    ],
    "fedavgm+cosine": [
        "strategy.name=fedavgm",
        "strategy.server_learning_rate=1.0",
        "strategy.server_momentum=0.9",
        "local.lr_schedule=cosine",
        "local.logit_adjustment=0",
        "local.optimizer_state=reset",
    ],
    "fedavg-server-lr-2": [
        "strategy.name=fedavgm",
        "strategy.server_momentum=0.0",
        "strategy.server_learning_rate=2.0",
        "local.logit_adjustment=0",
        "local.optimizer_state=reset",
    ],
    "fedavg-server-lr-2+cosine": [
        "strategy.name=fedavgm",
        "strategy.server_momentum=0.0",
        "strategy.server_learning_rate=2.0",
        "local.lr_schedule=cosine",
        "local.logit_adjustment=0",
        "local.optimizer_state=reset",
    ],
    "fedavg-server-lr-1.5+cosine": [
        "strategy.name=fedavgm",
        "strategy.server_momentum=0.0",
        "strategy.server_learning_rate=1.5",
        "local.lr_schedule=cosine",
        "local.logit_adjustment=0",
        "local.optimizer_state=reset",
    ],
    "fedavg-server-lr-3+cosine": [
        "strategy.name=fedavgm",
        "strategy.server_momentum=0.0",
        "strategy.server_learning_rate=3.0",
        "local.lr_schedule=cosine",
        "local.logit_adjustment=0",
        "local.optimizer_state=reset",
    ],
    "fedavg-server-lr-4+cosine": [
        "strategy.name=fedavgm",
        "strategy.server_momentum=0.0",
        "strategy.server_learning_rate=4.0",
        "local.lr_schedule=cosine",
        "local.logit_adjustment=0",
        "local.optimizer_state=reset",
    ],
    "fedavg+logit-adjust": [
        "strategy.name=fedavg",
        "local.logit_adjustment=1.0",
        "local.optimizer_state=reset",
    ],
    "fedavg+cosine+logit-adjust": [
        "strategy.name=fedavg",
        "local.lr_schedule=cosine",
        "local.logit_adjustment=1.0",
        "local.optimizer_state=reset",
    ],
    "fedavg-server-lr-3+cosine+logit-adjust": [
        "strategy.name=fedavgm",
        "strategy.server_momentum=0.0",
        "strategy.server_learning_rate=3.0",
        "local.lr_schedule=cosine",
        "local.logit_adjustment=1.0",
        "local.optimizer_state=reset",
    ],
    "fedavg-server-lr-2+cosine+logit-adjust": [
        "strategy.name=fedavgm",
        "strategy.server_momentum=0.0",
        "strategy.server_learning_rate=2.0",
        "local.lr_schedule=cosine",
        "local.logit_adjustment=1.0",
        "local.optimizer_state=reset",
    ],
    "fedavg-server-lr-4+cosine+logit-adjust": [
        "strategy.name=fedavgm",
        "strategy.server_momentum=0.0",
        "strategy.server_learning_rate=4.0",
        "local.lr_schedule=cosine",
        "local.logit_adjustment=1.0",
        "local.optimizer_state=reset",
    ],
    "fedavg-server-lr-3+cosine+logit-adjust+keep-optimizer": [
        "strategy.name=fedavgm",
        "strategy.server_momentum=0.0",
        "strategy.server_learning_rate=3.0",
        "local.lr_schedule=cosine",
        "local.logit_adjustment=1.0",
        "local.optimizer_state=keep",
    ],
    "fedavg+keep-optimizer": [
        "strategy.name=fedavg",
        "local.logit_adjustment=0",
        "local.optimizer_state=keep",
    ],
    "fedavg+logit-adjust+keep-optimizer": [
        "strategy.name=fedavg",
        "local.logit_adjustment=1.0",
        "local.optimizer_state=keep",
    ],
    "fedavg-server-lr-3+cosine+logit-adjust+sample-4": [
        "strategy.name=fedavgm",
        "strategy.server_momentum=0.0",
        "strategy.server_learning_rate=3.0",
        "local.lr_schedule=cosine",
        "local.logit_adjustment=1.0",
        "sites_per_round=4",
        "min_sites=4",
        "local.optimizer_state=reset",
    ],
    "ffa-lora": ["peft.freeze_lora_a=true", "local.logit_adjustment=0", "local.optimizer_state=reset"],
    "fedsa-lora": ["local.keep_local=[lora_B]", "local.logit_adjustment=0", "local.optimizer_state=reset"],
    "per-site-head": [
        "local.keep_local=[classifier]",
        "local.logit_adjustment=0",
        "local.optimizer_state=reset",
    ],
}
#: SCAFFOLD's drift correction on top of the best configuration measured.
VARIANTS["fedavg-server-lr-3+cosine+logit-adjust+keep-optimizer+scaffold"] = [
    *VARIANTS["fedavg-server-lr-3+cosine+logit-adjust+keep-optimizer"],
    "local.scaffold=true",
]
#: Variants whose sites keep tensors of their own: the global model is not what a site uses, its own is.
PERSONALISED = ("fedsa-lora", "per-site-head")
#: Baseline -> train overrides of each site alone.
BASELINES: dict[str, list[str]] = {"local": [], "local+logit-adjust": ["train.logit_adjustment=1.0"]}


@dataclass(frozen=True)
class Metric:
    """The quality a task's models are compared by."""

    key: str
    label: str
    higher_is_better: bool
    digits: int
    #: Print each site's own held-out rows (alone, the global model) even without personalised models.
    per_site_table: bool

    def of(self, metrics: dict[str, Any]) -> float:
        return float(metrics[self.key])

    def best(self, values: Iterable[float]) -> float | None:
        return (max if self.higher_is_better else min)(values, default=None)

    def better(self, value: float, than: float) -> bool:
        return value > than if self.higher_is_better else value < than

    def of_pooled(self, value: float, pooled: float) -> float:
        """How close to pooled, 1.0 as good: the accuracy ratio, or pooled / the perplexity."""
        return value / pooled if self.higher_is_better else pooled / value

    def reaches(self, value: float, pooled: float) -> bool:
        """Within 90% of pooled: 0.9 x its accuracy, or its perplexity / 0.9."""
        return value >= 0.9 * pooled if self.higher_is_better else value <= pooled / 0.9


METRICS = {
    "classification": Metric(
        "eval_accuracy", "accuracy", higher_is_better=True, digits=4, per_site_table=False
    ),
    "causal_lm": Metric(
        "eval_perplexity", "perplexity", higher_is_better=False, digits=2, per_site_table=True
    ),
}


def metric_of(results: dict[str, Any]) -> Metric:
    """The metric of a run's task (runs saved before ``--task`` existed are classification)."""
    return METRICS[results["setup"].get("task", "classification")]


def classification_only(overrides: list[str]) -> bool:
    """Whether overrides adjust logits or keep a classifier head (nothing a causal LM has)."""
    return any(
        (key.endswith("logit_adjustment") and float(value))
        or (key == "local.keep_local" and "classifier" in value)
        for key, _, value in (override.partition("=") for override in overrides)
    )


def run_variant(bench: Any, name: str, overrides: list[str], out: Path, metric: Metric) -> dict[str, Any]:
    """One federation run: the metric per round on the shared test split, bytes, seconds."""
    from federated.ops.simulation import simulate
    from federated.rounds import RoundStore
    from federated.spec import load_federation

    fed = load_federation(bench.fed_spec, [*overrides, f"output={out}", f"name={name.replace('+', '-')}"])
    started = time.time()
    simulate(fed, out / fed.name)
    store = RoundStore(out / fed.name)
    rows = store.rows()
    up = [site["bytes_up"] for row in rows[1:] for site in row.get("sites", []) if site.get("bytes_up")]
    last = {site["site"]: site.get("metrics", {}) for site in rows[-1].get("sites", [])}
    return {
        "overrides": overrides,
        # each site's own held-out rows: the model it received this round (before its local steps)
        # and its model after them (a personalised variant's per-site model)
        "own_test_received": {s: m.get(f"global-{metric.key}") for s, m in last.items()},
        "own_test_after_local": {s: m.get(metric.key) for s, m in last.items()},
        f"{metric.label}_per_round": [metric.of(row["server_eval"]) for row in rows],
        "final": rows[-1]["server_eval"],
        "bytes_up_per_site_round": max(up) if up else 0,
        "seconds": time.time() - started,
        "global_adapter": str(store.adapter_dir(fed.rounds)),
    }


def fine_tune_locally(
    bench: Any, adapter: str, steps: int, out: Path, metric: Metric, select: bool = True
) -> dict[str, dict[str, float]]:
    """Each site fine-tunes the final global adapter on its own rows (plain loss, up to ``steps``
    steps): the personalised model of "federate, then fine-tune", on its own held-out rows.

    With validation rows per site (``--site-validation-ratio``), the site evaluates every
    ``max(5, steps // 10)`` steps, stops early (patience 2) and keeps its best checkpoint by the
    validation metric, or the global model itself when no checkpoint beats it there; the test rows
    play no part in that choice. With ``select=False`` every site trains all ``steps`` (the site
    alone's budget) and keeps the last weights.
    """
    import shutil

    from rich.console import Console

    from launcher.plan.jobs import prepare_run
    from launcher.train.core import run_training
    from launcher.train.evaluate import evaluate_target

    tuned: dict[str, dict[str, float]] = {}
    for site in bench.sites:
        validation = bench.site_validation(site)
        chooses = select and validation.is_file()
        selection = (
            [
                f"data.validation={validation}",
                "eval.at_start=true",
                f"eval.steps={max(5, steps // 10)}",
                f"train.early_stopping.metric={metric.key}",
                f"train.early_stopping.mode={'max' if metric.higher_is_better else 'min'}",
                "train.early_stopping.patience=2",
            ]
            if chooses
            else ["eval.at_start=false"]
        )
        prepared = prepare_run(
            bench.site_spec(site),
            [
                f"output.dir={out}",
                f"train.max_steps={steps}",
                f"peft.init_from={adapter}",
                "train.logit_adjustment=0",
                *selection,
            ],
        )
        run_training(prepared.run_dir, Console(stderr=True, quiet=True))
        tests = {"": str(bench.site_test(site)), "mix_": str(bench.site_mix_test(site))}
        shutil.copytree(adapter, prepared.run_dir / "global")  # an artifact inside the run dir
        result: dict[str, float] = {}
        for t, f in tests.items():
            result[f"{t}fine_tuned"] = metric.of(evaluate_target(prepared.run_dir, f))
            result[f"{t}global"] = metric.of(evaluate_target(prepared.run_dir / "global", f))
        if chooses:
            summary = json.loads((prepared.run_dir / "summary.json").read_text())
            result["validation_global"] = metric.of(summary["before"])
            result["validation_fine_tuned"] = metric.of(summary["after"])
            result["steps"] = summary["steps"]
            keep = metric.better(result["validation_fine_tuned"], result["validation_global"])
            for t in tests:
                result[f"{t}chosen"] = result[f"{t}fine_tuned"] if keep else result[f"{t}global"]
        tuned[site] = result
    return tuned


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="federated levers on label-skewed Debian package sections")
    parser.add_argument("--sites", type=int, default=8)
    parser.add_argument(
        "--train-seed",
        type=int,
        help="the training seed of every model (the specs' 42 when not given); the cut stays seed 0's",
    )
    parser.add_argument("--alpha", type=float, default=0.3)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--local-steps", type=int, default=10)
    parser.add_argument("--rows-per-section", type=int, default=400)
    parser.add_argument(
        "--test-per-section", type=int, default=100, help="rows per section of the shared test split"
    )
    parser.add_argument(
        "--task",
        choices=list(METRICS),
        default="classification",
        help="classify the section (MiniLM, accuracy) or learn the descriptions (SmolLM2, perplexity)",
    )
    parser.add_argument("--variants", default="fedavg,fedavgm")
    parser.add_argument(
        "--baselines",
        default="pooled,local",
        help="which of pooled, local (each site alone), local+logit-adjust (each site alone with "
        "train.logit_adjustment=1) to train; '' for none",
    )
    parser.add_argument(
        "--fine-tune-steps",
        type=int,
        default=0,
        help="then each site fine-tunes the final global adapter for this many steps on its own rows",
    )
    parser.add_argument(
        "--fine-tune-from",
        type=Path,
        metavar="JSON",
        help="only fine-tune (--fine-tune-steps) the global adapters of a saved run, on the same "
        "benchmark rebuilt from its setup, and write that run's results with them to --json",
    )
    parser.add_argument(
        "--fine-tune-select",
        choices=("validation", "last"),
        default="validation",
        help="keep the fine-tune's best checkpoint on the site's validation rows (or the global "
        "model), or train every step and keep the last weights",
    )
    parser.add_argument(
        "--site-validation-ratio",
        type=float,
        default=0.0,
        help="hold out this share of each site's rows as its validation rows (the fine-tune then "
        "keeps its best checkpoint by them, or the global model)",
    )
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--print", type=Path, nargs="+", metavar="JSON", help="print the tables of saved runs"
    )
    args = parser.parse_args(argv)
    if args.print:
        merged: dict[str, Any] = {"variants": {}}
        for saved in args.print:  # later files add variants (and their baselines) to earlier ones
            results = json.loads(saved.read_text())
            merged["variants"].update(results.pop("variants"))
            merged.update(results)
        print_table(merged)
        return 0
    saved_run = json.loads(args.fine_tune_from.read_text()) if args.fine_tune_from else None
    if saved_run is not None:  # the same benchmark as the saved run's, nothing trained but the fine-tunes
        for key in (
            "sites",
            "alpha",
            "rows_per_section",
            "test_per_section",
            "site_validation_ratio",
            "task",
        ):
            setattr(args, key, saved_run["setup"].get(key, getattr(args, key)))
        args.variants, args.baselines = "", ""
    variants = [name for name in args.variants.split(",") if name]
    baselines = {name for name in args.baselines.split(",") if name}
    if args.task != "classification":
        refused = [n for n in variants if classification_only(VARIANTS[n])]
        refused += [b for b in sorted(baselines & set(BASELINES)) if classification_only(BASELINES[b])]
        if refused:
            parser.error(
                f"{', '.join(refused)}: logit adjustment and per-site classifier heads apply to "
                f"--task classification only, not {args.task}"
            )
    metric = METRICS[args.task]
    sys.path.insert(0, str(REPO))
    from bench.apt_sections import build
    from bench.fed_quality import train_and_evaluate

    out = Path(tempfile.mkdtemp(prefix="flotilla-fed-noniid-"))
    bench = build(
        out / "data",
        args.sites,
        args.alpha,
        args.rows_per_section,
        args.test_per_section,
        rounds=args.rounds,
        local_steps=args.local_steps,
        site_validation_ratio=args.site_validation_ratio,
        task=args.task,
    )
    steps = args.rounds * args.local_steps
    test = str(bench.test_file)
    results: dict[str, Any] = {"setup": vars(args) | {"json": str(args.json)}, "variants": {}}
    results["partition"] = json.loads((bench.root / "partition.json").read_text())["partition"]
    reseeded = [] if args.train_seed is None else [f"seed={args.train_seed}"]
    common = [f"output.dir={out / 'baselines'}", "eval.at_start=false", *reseeded]
    if "pooled" in baselines:
        pooled_files = json.dumps([{"path": str(bench.site_data(site))} for site in bench.sites])
        (pooled,) = train_and_evaluate(
            bench.site_spec(bench.sites[0]),
            [
                *common,
                f"train.max_steps={len(bench.sites) * steps}",
                f"data.train={pooled_files}",
                "name=pooled",
            ],
            test,
        )
        results["pooled"] = pooled
        print(f"pooled {metric.label} {metric.of(pooled):.{metric.digits}f}")
    for baseline, extra in BASELINES.items():
        if baseline not in baselines:
            continue
        local: dict[str, Any] = {}
        for site in bench.sites:
            shared, own, mix = train_and_evaluate(
                bench.site_spec(site),
                [*common, *extra, f"train.max_steps={steps}"],
                test,
                str(bench.site_test(site)),
                str(bench.site_mix_test(site)),
            )
            local[site] = {"shared_test": shared, "own_test": own, "mix_test": mix}
        results["local_only" if baseline == "local" else "local_only_logit_adjust"] = local
        print(
            f"{baseline}: "
            + ", ".join(f"{s} {metric.of(v['shared_test']):.{metric.digits}f}" for s, v in local.items())
        )

    def fine_tune(variant: dict[str, Any]) -> dict[str, dict[str, float]]:
        """The sites' fine-tunes of ``variant``'s final global adapter, as the options ask."""
        select = args.fine_tune_select == "validation"
        return fine_tune_locally(
            bench, variant["global_adapter"], args.fine_tune_steps, out / "fine-tuned", metric, select
        )

    for name in variants:
        results["variants"][name] = run_variant(
            bench, name, [*VARIANTS[name], *reseeded], out / "federations", metric
        )
        if args.fine_tune_steps and name not in PERSONALISED:
            variant = results["variants"][name]
            variant["own_test_fine_tuned"] = fine_tune(variant)
        if args.json:  # kept after every variant: a long run that is stopped keeps what it measured
            args.json.write_text(json.dumps(results, indent=2))
    if saved_run is not None:
        options = {"fine_tune_steps": args.fine_tune_steps, "fine_tune_select": args.fine_tune_select}
        results = saved_run | {"setup": saved_run["setup"] | options}
        for name, variant in results["variants"].items():
            if name not in PERSONALISED:
                variant["own_test_fine_tuned"] = fine_tune(variant)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    print_table(results)
    return 0


def print_table(results: dict[str, Any]) -> None:
    """The metric on the shared test split, against pooled and the best site alone."""
    metric = metric_of(results)
    width = max(9, len(metric.label))
    pooled = metric.of(results["pooled"]) if "pooled" in results else None
    best_local = metric.best(metric.of(v["shared_test"]) for v in results.get("local_only", {}).values())
    print(
        f"\n{'model':<18} {metric.label:>{width}} {'of pooled':>10} {'rounds to 90%':>14} {'bytes up':>10} "
        f"{'seconds':>8}"
    )
    if pooled is not None:
        print(f"{'pooled':<18} {pooled:>{width}.{metric.digits}f}")
    if best_local is not None:
        print(f"{'best site alone':<18} {best_local:>{width}.{metric.digits}f}")
    adjusted = results.get("local_only_logit_adjust", {})
    if adjusted:
        best = metric.best(metric.of(v["shared_test"]) for v in adjusted.values())
        print(f"{'best alone, adj.':<18} {best:>{width}.{metric.digits}f}")
    for name, variant in results["variants"].items():
        if name in PERSONALISED:
            continue
        value = metric.of(variant["final"])
        share = f"{metric.of_pooled(value, pooled):.3f}" if pooled else "-"
        reached = (
            next(
                (i for i, v in enumerate(variant[f"{metric.label}_per_round"]) if metric.reaches(v, pooled)),
                None,
            )
            if pooled
            else None
        )
        print(
            f"{name:<18} {value:>{width}.{metric.digits}f} {share:>10} {reached if reached is not None else '-'!s:>14} "
            f"{variant['bytes_up_per_site_round']:>10} {variant['seconds']:>8.0f}"
        )
    print_personalised(results, metric)
    print_section_mix(results, metric)


def print_personalised(results: dict[str, Any], metric: Metric) -> None:
    """Each site on its own held-out rows: alone, the global model, each personalised variant."""
    variants = results["variants"]
    tuned = {n: v["own_test_fine_tuned"] for n, v in variants.items() if "own_test_fine_tuned" in v}
    personal = [name for name in PERSONALISED if name in variants]
    shared = [
        name
        for name, variant in variants.items()
        if name not in PERSONALISED
        and all(v is not None for v in variant.get("own_test_received", {None: None}).values())
    ]
    if not (personal or tuned or metric.per_site_table) or "local_only" not in results or not shared:
        return
    reference = shared[0]
    print(
        f"\nEach site on its own held-out rows; global = the {reference} model a site received in the last round"
    )
    columns = [*personal, *(f"{n} + fine-tune" for n in tuned)]
    chosen = [n for n, sites in tuned.items() if "chosen" in _as_dict(next(iter(sites.values())))]
    columns += [f"{n}: final global" for n in chosen] + [f"{n}: chosen on validation" for n in chosen]
    print(f"{'site':<10} {'alone':>7} {'global':>7} " + " ".join(f"{n:>14}" for n in columns))
    digits = metric.digits
    for site, local in results["local_only"].items():
        cells = [variants[n]["own_test_after_local"].get(site) for n in personal]
        cells += [_fine_tuned(sites[site]) for sites in tuned.values()]
        cells += [tuned[n][site]["global"] for n in chosen] + [tuned[n][site]["chosen"] for n in chosen]
        received = variants[reference]["own_test_received"][site]
        print(
            f"{site:<10} {metric.of(local['own_test']):>7.{digits}f} {received:>7.{digits}f} "
            + " ".join(f"{c:>14.{digits}f}" for c in cells)
        )


def print_section_mix(results: dict[str, Any], metric: Metric) -> None:
    """Each site on the shared test rows drawn with its section mix: alone, the final global model,
    the fine-tuned one and the one chosen on validation, and how many sites are at or above both."""
    local = results.get("local_only", {})
    for name, sites in results["variants"].items():
        tuned = sites.get("own_test_fine_tuned", {})
        if not tuned or not all(
            "mix_global" in t and "mix_test" in local.get(s, {}) for s, t in tuned.items()
        ):
            continue
        keys = ["mix_fine_tuned"] + (["mix_chosen"] if all("mix_chosen" in t for t in tuned.values()) else [])
        print(f"\nEach site on shared test rows with its section mix; {name}, then fine-tuned")
        columns = ["alone", "global", *(key[4:].replace("_", "-") for key in keys)]
        print(f"{'site':<10} {'rows':>5} " + " ".join(f"{c:>11}" for c in columns))
        wins = dict.fromkeys(keys, 0)
        for site, result in tuned.items():
            alone, glob = metric.of(local[site]["mix_test"]), result["mix_global"]
            for key in keys:
                wins[key] += not (metric.better(alone, result[key]) or metric.better(glob, result[key]))
            cells = (alone, glob, *(result[key] for key in keys))
            rows = local[site]["mix_test"].get("rows", "")
            print(f"{site:<10} {rows!s:>5} " + " ".join(f"{c:>11.{metric.digits}f}" for c in cells))
        print(
            "at or above both alone and global: "
            + ", ".join(f"{key[4:].replace('_', '-')} {n} of {len(tuned)}" for key, n in wins.items())
        )


def _as_dict(result: float | dict[str, float]) -> dict[str, float]:
    """A site's fine-tune results (runs before validation choice saved the bare fine-tuned number)."""
    return result if isinstance(result, dict) else {"fine_tuned": result}


def _fine_tuned(result: float | dict[str, float]) -> float:
    """A site's fine-tuned metric."""
    return _as_dict(result)["fine_tuned"]


if __name__ == "__main__":
    sys.exit(main())
