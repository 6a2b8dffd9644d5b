"""The accuracy cost of differential privacy on the shipped federation, at epsilon ~ 8 and ~ 1.

The shipped federation (``configs/federated.yaml``: real MiniLM, LoRA, 3 non-IID sentiment sites,
its rounds and local steps) runs in Flower's simulation engine without DP, with the default noise
multiplier (1.0), and with the noise derived for ``target_epsilon`` 8 and 1 over its rounds
(server-side fixed clipping at ``--clipping-norm``, delta 1e-5, Flower's RDP accountant). The
server's held-out accuracy and loss after the last round, and the epsilon actually spent, are
printed as a table and kept as JSON.

    python bench/fed_dp.py [--clipping-norm 1.0] [--json bench/results/fed_dp.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def runs(clipping_norm: float) -> list[tuple[str, list[str]]]:
    """(label, federation overrides) per row: no DP, then DP at each noise setting."""
    dp = f"privacy.dp={{side: server, clipping: fixed, clipping_norm: {clipping_norm}, delta: 1.0e-5"
    return [
        ("no DP", []),
        ("noise multiplier 1.0 (default)", [dp + ", noise_multiplier: 1.0}"]),
        ("target epsilon 8", [dp + ", target_epsilon: 8.0}"]),
        ("target epsilon 1", [dp + ", target_epsilon: 1.0}"]),
    ]


def run(overrides: list[str]) -> dict[str, Any]:
    """One simulated federation; its last round's server evaluation and privacy account."""
    from federated.ops.simulation import simulate
    from federated.rounds import RoundStore
    from federated.spec import load_federation

    out = Path(tempfile.mkdtemp(prefix="flotilla-fed-dp-"))
    fed = load_federation(REPO / "configs" / "federated.yaml", [f"output={out}", *overrides])
    started = time.time()
    simulate(fed, out / fed.name, num_cpus=2)
    rows = RoundStore(out / fed.name).rows()
    return {
        "overrides": overrides,
        "rounds": rows[-1]["round"],
        "eval": rows[-1]["server_eval"],
        "privacy": rows[-1].get("privacy"),
        "seconds": time.time() - started,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="DP's accuracy cost on the shipped federation")
    parser.add_argument("--clipping-norm", type=float, default=1.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    results = []
    for label, overrides in runs(args.clipping_norm):
        result = {"label": label, **run(overrides)}
        results.append(result)
        print(json.dumps(result), file=sys.stderr, flush=True)
    base = results[0]["eval"]
    print(
        "| setting | noise multiplier | epsilon spent (delta 1e-5) | accuracy (Δ vs no DP) | eval loss (Δ) |"
    )
    print("|---|---|---|---|---|")
    for r in results:
        privacy = r["privacy"] or {}
        noise = f"{privacy['noise_multiplier']:.3g}" if privacy else "-"
        epsilon = f"{privacy['epsilon']:.2f} after {privacy['rounds']} rounds" if privacy else "-"
        accuracy, loss = r["eval"].get("eval_accuracy", float("nan")), r["eval"]["eval_loss"]
        print(
            f"| {r['label']} | {noise} | {epsilon} | {accuracy:.3f} ({accuracy - base['eval_accuracy']:+.3f}) "
            f"| {loss:.3f} ({loss - base['eval_loss']:+.3f}) |"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"args": {"clipping_norm": args.clipping_norm}, "runs": results}
        args.json.write_text(json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
