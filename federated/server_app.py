"""The ServerApp: drives a strategy over LoRA adapter arrays, round by round, resumably.

Per round: send the global adapter to the sampled sites, collect their adapters, validate every update
(keys, shapes, NaN/Inf, norm outliers; rejected sites are logged and never averaged in), aggregate with
the configured strategy (or SecAgg+), save the new global adapter as a PEFT folder and commit a round
checkpoint with the strategy state and a metrics row (per-site metrics, bytes sent/received, timing).
A restarted server resumes after the last committed round. Flower itself has no ServerApp resume.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.exception import PrivacyBudgetExhausted
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log  # Flower's logger: shown in simulation and by `flwr log`

from federated.adapters import GlobalModel, complete_from, from_record, record_bytes, to_record
from federated.fingerprints import base_model_sha256, code_sha256
from federated.policy import POLICY_REFUSED, announcement
from federated.rounds import RoundStore, tracked_metrics
from federated.sites import site_names, wait_for_sites
from federated.spec import FederationSpec
from federated.strategy import (
    DP_CLIPPING_KEY,
    SECAGG_RECORD,
    Rejection,
    Update,
    build_strategy,
    privacy_spent,
    restore_privacy,
    restore_state,
    secagg_round,
    strategy_state,
    validate_updates,
    weigh_updates,
)
from launcher.atomic import write_json_atomic
from launcher.errors import RUNTIME_FAILURE_EXIT_CODE, FlotillaError
from launcher.plan import build_plan
from launcher.spec import JobSpec
from launcher.train import Trackers, evaluate_target, open_trackers

#: Run-config keys the deployed ServerApp reads (``flotilla fed server`` sets them).
RUN_CONFIG_SPEC = "federation"
RUN_CONFIG_WORK_DIR = "work-dir"


class FederationError(FlotillaError):
    """A round could not complete (too few valid updates, aggregation failed): a runtime failure."""

    exit_code = RUNTIME_FAILURE_EXIT_CODE
    retryable = True


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Deployment entry point: the federation spec and work dir come from the run config."""
    spec_file = Path(str(context.run_config[RUN_CONFIG_SPEC]))
    fed = FederationSpec.model_validate_json(spec_file.read_text(encoding="utf-8"))
    run_federation(grid, context, fed, Path(str(context.run_config[RUN_CONFIG_WORK_DIR])))


def build_server_app(fed: FederationSpec, work_dir: Path) -> ServerApp:
    """A ServerApp bound to ``fed`` and ``work_dir`` (for the in-process simulation)."""
    server = ServerApp()

    @server.main()
    def _main(grid: Grid, context: Context) -> None:
        run_federation(grid, context, fed, work_dir)

    return server


def run_federation(grid: Grid, context: Context, fed: FederationSpec, work_dir: Path) -> None:
    """Run (or resume) every round of ``fed`` with its outputs in ``work_dir``."""
    store = RoundStore(work_dir)
    store.bind(
        json.loads(fed.model_dump_json(include={"name", "model", "peft", "labels", "strategy", "privacy"}))
    )
    model = GlobalModel.build(fed.model, fed.peft, fed.labels, fed.seed)
    _write_run_files(work_dir, fed)
    enrolled = site_names(work_dir)  # node id -> the name enrolled with its key (empty in simulation)
    per_round = fed.sites_per_round or max(fed.expected_sites(), len(enrolled))
    strategy = build_strategy(fed, sampled_sites=per_round)
    done = store.last_completed()
    params = fed.model_dump(mode="json", exclude={"tracking"})
    resume_after = None if done is None else done + 1
    trackers = open_trackers(fed.tracking, work_dir, params, fed.name, resume_step=resume_after)
    with trackers:  # a federation that fails closes its tracker run as FAILED
        _run_rounds(grid, context, fed, work_dir, store, model, strategy, trackers, done, enrolled)
    last = store.adapter_dir(store.last_completed() or 0)
    artifacts = [work_dir / n for n in ("federation.json", "summary.json", "rounds.jsonl")] + [last]
    trackers.finish(artifacts)


def _run_rounds(
    grid: Grid,
    context: Context,
    fed: FederationSpec,
    work_dir: Path,
    store: RoundStore,
    model: GlobalModel,
    strategy: Strategy,
    trackers: Trackers,
    done: int | None,
    enrolled: dict[int, str],
) -> None:
    """Every round after ``done`` (None: a fresh work dir, round 0 first), each logged to ``trackers``."""
    announce = _announcer(fed, strategy)
    if done is None:
        arrays = model.arrays()
        model.save(arrays, store.adapter_dir(0))
        row = {
            "round": 0,
            "server_eval": _server_eval(fed, store, 0),
            "full_weight_bytes": model.full_weight_bytes,
        }
        store.commit(0, row, {}, {})
        trackers.log_metrics(tracked_metrics(row), 0)
        done = 0
        _wait_for_start_sites(grid, fed)
    else:
        saved, scalars, state_arrays = store.load(done)
        arrays = {k: saved[k] for k in model.arrays()}
        restore_state(strategy, scalars, state_arrays)
        restore_privacy(strategy, releases=done)
        log(INFO, "resuming %s after round %d (checkpoint %s)", fed.name, done, store.checkpoints)
    names = {s["node"]: s["site"] for r in store.rows() for s in r.get("sites", []) if "metrics" in s}
    names.update(enrolled)  # enrolled sites, named even before they first answer
    for server_round in range(done + 1, fed.rounds + 1):
        started = time.time()
        try:
            arrays, row, payload = _run_round(
                grid, context, fed, strategy, announce, arrays, server_round, names, enrolled
            )
        except PrivacyBudgetExhausted as exc:
            log(WARNING, "privacy budget spent, stopping before round %d: %s", server_round, exc)
            _write_summary(work_dir, fed, store, stopped=f"privacy budget spent before round {server_round}")
            return
        spent = privacy_spent(strategy)
        if spent is not None:
            row["privacy"] = spent
        model.save(arrays, store.adapter_dir(server_round))
        row.update(
            round=server_round,
            seconds=time.time() - started,
            full_weight_bytes=model.full_weight_bytes,
            server_eval=_server_eval(fed, store, server_round),
        )
        store.write_payload(server_round, payload)
        scalars, state_arrays = strategy_state(strategy)
        store.commit(server_round, row, scalars, state_arrays)
        trackers.log_metrics(tracked_metrics(row), server_round)
        _write_summary(work_dir, fed, store)
        log(INFO, "round %d done in %.1f s: %s", server_round, row["seconds"], _short(row))


Announce = Callable[[int], dict[str, Any]]


def _announcer(fed: FederationSpec, strategy: Strategy) -> Announce:
    """What the server tells the sites with every round, given the round's number of sites: its
    model and code fingerprints (hashed once) and its accounted DP, for the sites' policies."""
    try:
        model: str | None = base_model_sha256(fed.model)
    except FlotillaError:
        model = None  # a hub model: nothing local to fingerprint, and a site pinning one refuses
    code = code_sha256()
    accounted = getattr(strategy, "accountant", None) is not None  # fixed clipping only
    noise = float(strategy.noise_multiplier) if accounted else None  # type: ignore[attr-defined]
    return lambda sites: announcement(sites, model, code, fed.privacy.dp, noise, fed.rounds)


def _wait_for_start_sites(grid: Grid, fed: FederationSpec) -> None:
    """Before the first round, wait up to ``round_timeout`` for ``start_sites`` connected sites."""
    wanted = fed.start_sites or fed.min_sites
    connected = wait_for_sites(lambda: len(list(grid.get_node_ids())), wanted, fed.round_timeout)
    if connected < wanted:
        log(
            WARNING,
            "only %d of start_sites=%d connected after %.0f s: starting",
            connected,
            wanted,
            fed.round_timeout,
        )


def _run_round(
    grid: Grid,
    context: Context,
    fed: FederationSpec,
    strategy: Strategy,
    announce: Announce,
    arrays: dict[str, np.ndarray],
    rnd: int,
    names: dict[int, str],
    enrolled: dict[int, str],
) -> tuple[dict[str, np.ndarray], dict[str, Any], dict[str, Any]]:
    """One round: returns the new global arrays, the metrics row and the payload description.

    ``names`` maps node ids to site names (kept across rounds, to name dropouts); ``enrolled`` holds
    the names fixed at enrollment, which replies are credited to.
    """
    if fed.privacy.secagg is not None:
        return _secagg_round(grid, context, fed, announce, arrays, rnd, names, enrolled)
    record = to_record(arrays)
    if fed.sites_per_round is not None:  # Flower samples with the random module: seeded per round
        random.seed(f"{fed.seed}-{rnd}")
    messages = list(strategy.configure_train(rnd, record, ConfigRecord(round_config(fed, rnd)), grid))
    for message in messages:
        message.content["config"].update(announce(len(messages)))
    replies = list(grid.send_and_receive(messages, timeout=fed.round_timeout))
    sent = [r for r in replies if not r.has_error()]
    received = {r.metadata.message_id: describe_payload(r) for r in sent}  # as sent, before screening
    bytes_up = {
        r.metadata.message_id: sum(record_bytes(a) for a in r.content.array_records.values()) for r in sent
    }
    accepted, rejections = screen(replies, arrays, fed, enrolled)
    sites = _site_rows(
        messages, replies, rejections, record_bytes(record), names, enrolled, received, bytes_up
    )
    if len(accepted) < fed.min_sites:
        raise FederationError(
            f"round {rnd}: {len(accepted)} valid update(s), fewer than min_sites={fed.min_sites} "
            f"({_problems(sites)}); the last completed round stays the global adapter"
        )
    sized_for = getattr(strategy, "num_sampled_clients", None)  # set by Flower's DP wrappers
    if sized_for is not None and len(accepted) != sized_for:
        raise FederationError(
            f"round {rnd}: {len(accepted)} valid update(s), but the DP noise is sized for {sized_for}: "
            f"an under-noised aggregate is not released ({_problems(sites)})"
        )
    _common_metrics(accepted)
    merged, aggregated = strategy.aggregate_train(rnd, accepted)
    if merged is None:
        raise FederationError(f"round {rnd}: the {fed.strategy.name} strategy returned no aggregate")
    row = {"sites": sites, "aggregated": dict(aggregated or MetricRecord())}
    new_arrays = from_record(merged)
    if fed.withholds:  # bit-exact: a mean of equal tensors is
        new_arrays = complete_from(new_arrays, arrays, fed.withheld)  # equal only up to rounding
    return new_arrays, row, {s["site"]: s.pop("payload") for s in sites if "payload" in s}


#: Optimizer steps per site and round when the spec gives neither steps nor epochs.
DEFAULT_LOCAL_STEPS = 10


def round_config(fed: FederationSpec, server_round: int) -> dict[str, Any]:
    """The ConfigRecord every site receives with the global adapter in ``server_round``."""
    config: dict[str, Any] = {
        "lr-scale": fed.local.lr_scale(server_round, fed.rounds),
        "lora-rank": fed.peft.r,
        "lora-alpha": fed.peft.alpha,
        "seed": fed.seed,
        "labels": list(fed.labels or []),
    }
    if fed.local.epochs:
        config["local-epochs"] = float(fed.local.epochs)
    else:
        config["local-steps"] = fed.local.steps or DEFAULT_LOCAL_STEPS
    if fed.peft.freeze_lora_a:
        config["frozen-lora-a"] = True
    if fed.local.keep_local:
        config["keep-local"] = list(fed.local.keep_local)
    if fed.local.keeps_optimizer_state(fed.model.task):
        config["keep-optimizer-state"] = True
    if tau := fed.local.logit_adjustment_for(fed.model.task):
        config["logit-adjustment"] = tau
    if fed.local.scaffold:
        config["scaffold"] = True
        config["server-step"] = fed.strategy.server_step() if fed.strategy.name == "fedavgm" else 1.0
    if fed.strategy.name == "fedprox":  # also on the SecAgg+ path, where no FedProx strategy sends it
        config["proximal-mu"] = fed.strategy.proximal_mu
    if fed.privacy.dp is not None and fed.privacy.dp.side == "client":
        config[DP_CLIPPING_KEY] = fed.privacy.dp.clipping
    return config


def declared_site(reply: Message) -> str | None:
    """The site name a reply declares (its ``site`` record), if any."""
    site = reply.content.config_records.get("site") if reply.has_content() else None
    return str(site["name"]) if site and "name" in site else None


def site_identity(reply: Message, enrolled: dict[int, str]) -> tuple[str, str | None]:
    """Who a reply comes from, and why it is refused (or None).

    With node authentication the identity is the name enrolled with the SuperNode's public key
    (``enrolled``: node id -> site, fixed at enrollment); a reply declaring another name is refused.
    Without it (simulation, ``insecure``) the identity is the declared name, else the node id.
    """
    node = reply.metadata.src_node_id
    declared = declared_site(reply)
    if node in enrolled:
        name = enrolled[node]
        if declared is not None and declared != name:
            return name, f"node {node} is enrolled as {name!r} but its reply claims to be {declared!r}"
        return name, None
    return declared or f"node-{node}", None


def screen(
    replies: list[Message],
    reference: dict[str, np.ndarray],
    fed: FederationSpec,
    enrolled: dict[int, str] | None = None,
) -> tuple[list[Message], list[Rejection]]:
    """Validate every update against the current global adapter and weigh it (``weighting``);
    only accepted replies are returned, their ``num-examples`` set to the weight they count with."""
    updates: list[Update] = []
    by_site: dict[str, Message] = {}
    rejections: list[Rejection] = []
    for reply in replies:
        if reply.has_error():
            continue
        site, refused = site_identity(reply, enrolled or {})
        if refused:
            rejections.append(Rejection(site, refused))
            continue
        try:
            arrays = from_record(reply.content["arrays"])
            examples = int(reply.content["metrics"]["num-examples"])
        except (KeyError, TypeError, ValueError) as exc:
            rejections.append(Rejection(site, f"site {site!r}: malformed reply ({exc})"))
            continue
        if fed.withholds:  # tensors sites keep: the server's stand
            arrays = complete_from(arrays, reference, fed.withheld)
            reply.content["arrays"] = to_record(arrays)
        updates.append(Update(site, arrays, examples))
        by_site.setdefault(site, reply)
    accepted, rejected = validate_updates(
        updates,
        reference,
        norm_factor=fed.validation.norm_factor,
        max_norm=fed.validation.max_norm,
        allow_rank_mismatch=fed.strategy.name == "lora_product",
    )
    weighted, over_cap, notes = weigh_updates(
        accepted, fed.effective_weighting(), fed.max_examples, fed.over_cap
    )
    for rejection in [*rejections, *rejected, *over_cap]:
        log(WARNING, "rejected update: %s", rejection.reason)
    for note in notes.values():
        log(WARNING, "capped weight: %s", note)
    for update in weighted:
        metrics = by_site[update.site_id].content["metrics"]
        metrics["claimed-examples"] = metrics["num-examples"]  # what the site said, for the reports
        metrics["num-examples"] = update.num_examples
    return [by_site[u.site_id] for u in weighted], [*rejections, *rejected, *over_cap]


def _common_metrics(replies: list[Message]) -> None:
    """Keep only the scalar metric keys every reply has (Flower's strategies require equal keys)."""
    records = [reply.content["metrics"] for reply in replies]
    shared = set.intersection(*(set(r.keys()) for r in records))
    for reply, record in zip(replies, records, strict=True):
        reply.content["metrics"] = MetricRecord({k: v for k, v in record.items() if k in shared})


def _site_rows(
    messages: list[Message],
    replies: list[Message],
    rejections: list[Rejection],
    bytes_down: int,
    names: dict[int, str],
    enrolled: dict[int, str],
    received: dict[str, dict[str, Any]],
    bytes_up: dict[str, int],
) -> list[dict[str, Any]]:
    """Per-site outcome of a round: status, metrics, bytes each way and the payload description
    (``received`` and ``bytes_up``: what each reply held before screening, by message id)."""
    rejected = {r.site_id: r.reason for r in rejections}
    destination = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
    rows: dict[int, dict[str, Any]] = {}
    for reply in replies:
        node = destination.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
        if reply.has_error():
            rows[node] = {"node": node, "status": error_status(reply), "reason": reply.error.reason}
            continue
        site = names[node] = site_identity(reply, enrolled)[0]
        metrics = reply.content.metric_records.get("metrics")
        rows[node] = {
            "site": site,
            "node": node,
            "status": "rejected" if site in rejected else "accepted",
            "metrics": dict(metrics) if metrics else {},
            "bytes_up": bytes_up[reply.metadata.message_id],
            "payload": received[reply.metadata.message_id],
        }
        if site in rejected:
            rows[node]["reason"] = rejected[site]
    for node in destination.values():
        rows.setdefault(node, {"node": node, "status": "dropped", "reason": "no reply before round_timeout"})
    for node, row in rows.items():
        row.setdefault("site", names.get(node, f"node-{node}"))
        row["bytes_down"] = bytes_down
    return list(rows.values())


def error_status(reply: Message) -> str:
    """``refused`` for a site that declined the round under its policy, else ``error``; logged."""
    if reply.error.code == POLICY_REFUSED:
        log(WARNING, "node %d refused the round: %s", reply.metadata.src_node_id, reply.error.reason)
        return "refused"
    return "error"


def describe_payload(reply: Message) -> dict[str, Any]:
    """Names and sizes of everything in a reply (never the values)."""
    content = reply.content
    arrays = {
        name: {k: {"shape": list(v.shape), "dtype": v.dtype, "bytes": len(v.data)} for k, v in record.items()}
        for name, record in content.array_records.items()
    }
    configs = {
        name: {k: _value_size(v) for k, v in record.items()}
        for name, record in content.config_records.items()
    }
    return {
        "arrays": arrays,
        "metrics": {name: sorted(record) for name, record in content.metric_records.items()},
        "configs": configs,
    }


def _value_size(value: Any) -> dict[str, Any]:
    if isinstance(value, bytes):
        return {"type": "bytes", "bytes": len(value)}
    if isinstance(value, list):
        return {
            "type": "list",
            "items": len(value),
            "bytes": sum(len(v) for v in value if isinstance(v, bytes)),
        }
    return {"type": type(value).__name__}


def _secagg_round(
    grid: Grid,
    context: Context,
    fed: FederationSpec,
    announce: Announce,
    arrays: dict[str, np.ndarray],
    rnd: int,
    names: dict[int, str],
    enrolled: dict[int, str],
) -> tuple[dict[str, np.ndarray], dict[str, Any], dict[str, Any]]:
    """A SecAgg+ round: only the weighted mean is ever unmasked on the server."""
    assert fed.privacy.secagg is not None
    outcome = secagg_round(
        grid,
        context,
        arrays,
        rnd,
        lambda sites: {**round_config(fed, rnd), **announce(sites)},
        fed.privacy.secagg,
        fed.min_sites,
        fed.round_timeout,
    )
    bytes_down = record_bytes(to_record(arrays))
    rows: dict[int, dict[str, Any]] = {}
    stages: dict[int, list[dict[str, Any]]] = {}
    for reply in outcome.replies:
        node = reply.metadata.src_node_id
        row = rows.setdefault(
            node, {"node": node, "status": "dropped", "bytes_down": bytes_down, "bytes_up": 0}
        )
        if reply.has_error():
            row.update(status=error_status(reply), reason=reply.error.reason)
            continue
        secagg = reply.content.config_records.get(SECAGG_RECORD, {})
        row["bytes_up"] += sum(_value_size(v).get("bytes", 0) for v in secagg.values())
        row["bytes_up"] += sum(record_bytes(r) for r in reply.content.array_records.values())
        fit_metrics = reply.content.config_records.get("fitres.metrics")
        if fit_metrics is not None:
            names[node] = enrolled.get(node) or str(fit_metrics.get("site", f"node-{node}"))
            row.update(status="accepted", metrics=dict(fit_metrics))
        stages.setdefault(node, []).append(describe_payload(reply))
    for node, row in rows.items():
        row["site"] = names.get(node, f"node-{node}")
    if outcome.arrays is None:
        raise FederationError(f"round {rnd}: SecAgg+ did not complete ({_problems(list(rows.values()))})")
    payload = {rows[node]["site"]: {"secagg_stages": described} for node, described in stages.items()}
    return outcome.arrays, {"sites": list(rows.values()), "secagg": True}, payload


def _problems(sites: list[dict[str, Any]]) -> str:
    bad = [
        f"{s['site']}: {s['status']}" + (f" ({s['reason']})" if s.get("reason") else "")
        for s in sites
        if s.get("status") != "accepted"
    ]
    return "; ".join(bad) or "no site answered"


def _server_eval(fed: FederationSpec, store: RoundStore, server_round: int) -> dict[str, float]:
    """Metrics of the round's global adapter on the server's held-out file (if the spec names one)."""
    if not fed.evaluation.data:
        return {}
    metrics = evaluate_target(
        store.adapter_dir(server_round), fed.evaluation.data, _eval_format(fed), fed.evaluation.batch_size
    )
    return {k: float(v) for k, v in metrics.items()}


def _eval_format(fed: FederationSpec) -> str:
    if fed.evaluation.format:
        return fed.evaluation.format
    return "classification" if fed.model.task == "sequence_classification" else "instruction"


def _write_run_files(work_dir: Path, fed: FederationSpec) -> None:
    """plan.json + summary.json so the work dir reads as a run dir (``flotilla eval``, ``report``)."""
    job = JobSpec.model_validate(
        {
            "name": fed.name,
            "seed": fed.seed,
            "model": fed.model.model_dump(),
            "peft": fed.peft.model_dump(),
            "data": {
                "train": fed.evaluation.data or "(none)",
                "format": _eval_format(fed),
                "max_length": fed.evaluation.max_length,
            },
        }
    )
    (work_dir / "plan.json").write_text(build_plan(job, work_dir).to_json(), encoding="utf-8")
    if not (work_dir / "summary.json").is_file():
        write_json_atomic(work_dir / "summary.json", {"labels": fed.labels})


def _write_summary(
    work_dir: Path, fed: FederationSpec, store: RoundStore, stopped: str | None = None
) -> None:
    rows = store.rows()
    last = rows[-1]
    steps = sum(s.get("metrics", {}).get("steps", 0) for r in rows for s in r.get("sites", []))
    summary = {
        "labels": fed.labels,
        "steps": int(steps),
        "wall_seconds": sum(r.get("seconds", 0.0) for r in rows),
        "before": rows[0].get("server_eval", {}),
        "after": last.get("server_eval", {}),
        "artifact": str(store.adapter_dir(last["round"])),
        "rounds": last["round"],
        "privacy": last.get("privacy"),
    }
    if stopped:
        summary["stopped"] = stopped
    write_json_atomic(work_dir / "summary.json", summary)


def _short(row: dict[str, Any]) -> str:
    status = ", ".join(f"{s['site']} {s['status']}" for s in row.get("sites", []))
    loss = row.get("server_eval", {}).get("eval_loss")
    return status + (f"; server eval_loss {loss:.4f}" if loss is not None else "")
