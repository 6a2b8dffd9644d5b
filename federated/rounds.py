"""The server's work directory: the global adapter of every round, round checkpoints, the metrics table.

Layout (``<output>/<federation name>/``)::

    federation.json            the resolved federation spec this work dir belongs to
    plan.json  summary.json    make the folder a run dir: ``flotilla eval <work>/round-003 --data ...``
    round-000/ round-001/ ...  the global adapter after each round (PEFT folders; 000 = initial)
    checkpoints/round-NNN.json the committed round: metrics row + strategy scalars (written last)
    checkpoints/round-NNN.npz  strategy arrays (e.g. FedAdam moments)
    payload/round-NNN.json     what each site sent: record names, array keys, shapes, bytes
    rounds.jsonl               one metrics row per committed round

A round counts as completed once its checkpoint JSON exists; a restarted server resumes after it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file

from launcher.atomic import write_json_atomic
from launcher.errors import FlotillaError


class RoundStore:
    """Reads and commits rounds in a federation work directory."""

    def __init__(self, work_dir: Path) -> None:
        self.work_dir = work_dir
        self.checkpoints = work_dir / "checkpoints"

    def adapter_dir(self, server_round: int) -> Path:
        """The PEFT folder of the global adapter after ``server_round``."""
        return self.work_dir / f"round-{server_round:03d}"

    def bind(self, fingerprint: dict[str, Any]) -> None:
        """Tie the work dir to one federation; refuse to resume a different one."""
        path = self.work_dir / "federation.json"
        if path.is_file():
            previous = json.loads(path.read_text())
            changed = sorted(k for k in fingerprint if k != "rounds" and previous.get(k) != fingerprint[k])
            if changed and self.last_completed() is not None:
                raise FlotillaError(
                    f"{self.work_dir} holds rounds of a different federation (changed: {', '.join(changed)}); "
                    "choose another --work-dir or remove it"
                )
        write_json_atomic(path, fingerprint)

    def last_completed(self) -> int | None:
        """The newest committed round (0 = the initial adapter), or None for a fresh work dir."""
        rounds = [int(p.stem.split("-")[1]) for p in self.checkpoints.glob("round-*.json")]
        return max(rounds) if rounds else None

    def load(
        self, server_round: int
    ) -> tuple[dict[str, np.ndarray], dict[str, float], dict[str, np.ndarray]]:
        """The global adapter arrays and the strategy state saved with ``server_round``."""
        arrays = load_file(str(self.adapter_dir(server_round) / "adapter_model.safetensors"))
        record = json.loads((self.checkpoints / f"round-{server_round:03d}.json").read_text())
        npz = self.checkpoints / f"round-{server_round:03d}.npz"
        state_arrays = dict(np.load(npz)) if npz.is_file() else {}
        return arrays, record["strategy"], state_arrays

    def commit(
        self,
        server_round: int,
        row: dict[str, Any],
        scalars: dict[str, float],
        state_arrays: dict[str, np.ndarray],
    ) -> None:
        """Record a completed round (the adapter folder must already be published)."""
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        if state_arrays:
            np.savez(self.checkpoints / f"round-{server_round:03d}.npz", **state_arrays)
        write_json_atomic(
            self.checkpoints / f"round-{server_round:03d}.json", {"row": row, "strategy": scalars}
        )
        rows = self.rows()
        text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)
        (self.work_dir / "rounds.jsonl").write_text(text, encoding="utf-8")

    def rows(self) -> list[dict[str, Any]]:
        """Metrics rows of every committed round, in order."""
        files = sorted(self.checkpoints.glob("round-*.json"))
        return [json.loads(f.read_text())["row"] for f in files]

    def write_payload(self, server_round: int, payload: dict[str, Any]) -> None:
        """What the server received from each site this round (no values, only names and sizes)."""
        write_json_atomic(self.work_dir / "payload" / f"round-{server_round:03d}.json", payload)


def tracked_metrics(row: dict[str, Any]) -> dict[str, float]:
    """A round's metrics row as tracker scalars: ``server/<metric>`` (the global adapter on the server's
    held-out data), ``site/<name>/<metric>`` (each accepted site's own), and the round's totals."""
    metrics = {f"server/{k}": v for k, v in row.get("server_eval", {}).items()}
    sites = row.get("sites", [])
    for site in sites:
        if site.get("status") == "accepted":
            metrics.update({f"site/{site['site']}/{k}": v for k, v in site.get("metrics", {}).items()})
    if sites:
        metrics["round/accepted_sites"] = sum(s.get("status") == "accepted" for s in sites)
        metrics["round/bytes_up"] = sum(s.get("bytes_up", 0) for s in sites)
    if "seconds" in row:
        metrics["round/seconds"] = row["seconds"]
    epsilon = (row.get("privacy") or {}).get("epsilon")
    if epsilon is not None:
        metrics["round/epsilon"] = epsilon
    return metrics
