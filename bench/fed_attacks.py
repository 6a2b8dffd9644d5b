"""Attacks an enrolled site can mount x Flotilla's defences: outcome and the global model's change.

The shipped federation (``configs/federated.yaml``: real MiniLM, non-IID sentiment sites) runs in
Flower's simulation engine with a fourth site (``site_d``, site_c's job spec) that trains honestly and
then tampers with its reply. Each row runs the federation once; the global adapter's accuracy and
loss on the server's held-out file are compared with the run where site_d stays honest.

Attacks that a deployment refuses at connection or by identity (an unenrolled key, a revoked key,
a reply under another site's name) are covered by tests on a real SuperLink
(tests/test_federated_deploy.py) and listed with those tests.

    python bench/fed_attacks.py [--rounds 2] [--local-steps 6] [--json bench/results/fed_attacks.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
Arrays = dict[str, np.ndarray]


def with_nan(arrays: Arrays) -> Arrays:
    """``arrays`` with one NaN in the first of them."""
    out = {k: v.copy() for k, v in arrays.items()}
    next(iter(out.values())).flat[0] = np.nan
    return out


#: attack -> how site_d changes (global adapter, its trained adapter) into what it sends.
TAMPER: dict[str, Callable[[Arrays, Arrays], Arrays]] = {
    "none": lambda sent, trained: trained,
    "nan": lambda sent, trained: with_nan(trained),
    "wrong shape": lambda sent, trained: {
        k: v[..., :-1] if ".lora_B." in k else v for k, v in trained.items()
    },
    "huge norm": lambda sent, trained: {k: v + 50.0 for k, v in trained.items()},
    "scaled -3x (in bounds)": lambda sent, trained: {
        k: sent[k] - 3.0 * (trained[k] - sent[k]) for k in trained
    },
    "sign flip": lambda sent, trained: {k: sent[k] - (trained[k] - sent[k]) for k in trained},
    "inflated examples (1e6)": lambda sent, trained: trained,
}
#: (attack, the spec overrides of the defence, its name).
RUNS = [
    ("none", [], "fedavg, capped (default)"),
    ("nan", [], "update validation"),
    ("wrong shape", [], "update validation"),
    ("huge norm", [], "update validation (10x median norm)"),
    ("scaled -3x (in bounds)", [], "fedavg (no defence)"),
    ("scaled -3x (in bounds)", ["strategy.name=median"], "median"),
    ("sign flip", [], "fedavg (no defence)"),
    ("sign flip", ["strategy.name=median"], "median"),
    ("inflated examples (1e6)", ["weighting=examples"], "weighting: examples (no defence)"),
    ("inflated examples (1e6)", [], "weighting: capped (default)"),
]
DEPLOYMENT_ONLY = [
    (
        "reply under another site's name",
        "identity from the node key",
        "refused",
        "test_an_enrolled_site_cannot_answer_under_another_sites_name",
    ),
    (
        "unenrolled key",
        "node authentication",
        "refused at connection",
        "test_tls_node_auth_dropout_and_server_restart",
    ),
    (
        "revoked key",
        "flotilla fed revoke",
        "refused at reconnection",
        "test_a_revoked_site_is_refused_when_it_reconnects",
    ),
]


def attacker(attack: str) -> Callable[..., Any]:
    """A client mod: site_d (partition 3) trains, then sends the tampered adapter."""
    from flwr.app import Message, MetricRecord

    from federated.adapters import from_record, to_record

    def mod(msg: Message, context: Any, call_next: Callable[..., Message]) -> Message:
        reply = call_next(msg, context)
        if int(context.node_config["partition-id"]) != 3 or not reply.has_content():
            return reply
        sent = from_record(msg.content["arrays"])
        trained = from_record(reply.content["arrays"])
        reply.content["arrays"] = to_record(
            {k: np.asarray(v, np.float32) for k, v in TAMPER[attack](sent, trained).items()}
        )
        if attack.startswith("inflated"):
            metrics = dict(reply.content["metrics"])
            reply.content["metrics"] = MetricRecord({**metrics, "num-examples": 1_000_000})
        return reply

    return mod


def run(attack: str, overrides: list[str], rounds: int, local_steps: int) -> dict[str, Any]:
    from federated.ops.simulation import simulate
    from federated.rounds import RoundStore
    from federated.spec import load_federation

    out = Path(tempfile.mkdtemp(prefix="flotilla-fed-attacks-"))
    fed = load_federation(
        REPO / "configs" / "federated.yaml",
        [
            f"rounds={rounds}",
            f"local.steps={local_steps}",
            "min_sites=3",
            f"sites.site_d={REPO / 'configs' / 'federated' / 'site_c.yaml'}",
            f"output={out}",
            *overrides,
        ],
    )
    started = time.time()
    simulate(fed, out / fed.name, num_cpus=2, extra_mods=[attacker(attack)])
    rows = RoundStore(out / fed.name).rows()
    statuses = [next(s for s in r["sites"] if s["site"] == "site_d") for r in rows[1:]]
    return {
        "attack": attack,
        "overrides": overrides,
        "site_d": [s["status"] for s in statuses],
        "weight": [s.get("metrics", {}).get("num-examples") for s in statuses],
        "eval": rows[-1]["server_eval"],
        "seconds": time.time() - started,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="attacks x defences on the shipped federation")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--local-steps", type=int, default=6)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    results = []
    for attack, overrides, defence in RUNS:
        result = run(attack, overrides, args.rounds, args.local_steps)
        result["defence"] = defence
        results.append(result)
        print(json.dumps(result), file=sys.stderr, flush=True)
    base = results[0]["eval"]
    print("| attack (site_d of 4) | defence | site_d's update | accuracy (Δ vs honest) | eval loss (Δ) |")
    print("|---|---|---|---|---|")
    for r in results:
        accuracy, loss = r["eval"].get("eval_accuracy", float("nan")), r["eval"]["eval_loss"]
        outcome = "rejected" if all(s == "rejected" for s in r["site_d"]) else "aggregated"
        if r["attack"].startswith("inflated") and outcome == "aggregated":
            outcome += f" (weight {r['weight'][-1]})"
        print(
            f"| {r['attack']} | {r['defence']} | {outcome} | {accuracy:.3f} ({accuracy - base.get('eval_accuracy', 0):+.3f}) "
            f"| {loss:.3f} ({loss - base['eval_loss']:+.3f}) |"
        )
    for attack, defence, outcome, test in DEPLOYMENT_ONLY:
        print(f"| {attack} | {defence} | {outcome} (`{test}`) | unchanged | unchanged |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps({"args": vars(args) | {"json": str(args.json)}, "runs": results}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
