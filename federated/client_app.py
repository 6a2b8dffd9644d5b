"""The ClientApp: a site trains the received global adapter on its own data with the train core.

Only the trained LoRA adapter arrays and scalar metrics go back (plus the site's name). Which site
this is comes from the SuperNode's node config (``flotilla fed site`` sets ``site``, ``job`` and
``work-dir``) or, in simulation, from the partition id and the federation's site table.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from logging import WARNING
from pathlib import Path

from flwr.app import ConfigRecord, Context, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod
from flwr.supercore import log

from federated.adapters import from_record, to_record
from federated.fingerprints import base_model_sha256, code_sha256
from federated.policy import POLICY_REFUSED, LocalFingerprints, RoundRequest, policy_problems
from federated.spec import SitePolicy
from federated.strategy import site_privacy_mod
from federated.task import RoundOrder, train_local_round
from launcher.plan import load_job

#: Node-config keys a deployed SuperNode carries.
NODE_SITE, NODE_JOB, NODE_WORK_DIR, NODE_POLICY = "site", "job", "work-dir", "policy"
#: The site's record of the rounds it refused, in its work dir.
REFUSALS_FILE = "refused-rounds.jsonl"


@dataclass(frozen=True)
class Site:
    """One site's identity and where its local job spec and round run dirs are."""

    name: str
    job: Path
    work_dir: Path
    policy: Path | None = None  # the site's policy (JSON, written by ``flotilla fed site``)


def build_client_app(simulated_sites: list[Site] | None = None, mods: Sequence[Mod] = ()) -> ClientApp:
    """The ClientApp; with ``simulated_sites`` the partition id picks the site.

    ``mods`` wrap the site's handler outside the privacy mod (tests use one to tamper with a reply).
    """

    def which_site(context: Context) -> Site:
        config = context.node_config
        if simulated_sites is not None:
            return simulated_sites[int(config["partition-id"])]
        policy = Path(str(config[NODE_POLICY])) if NODE_POLICY in config else None
        return Site(
            str(config[NODE_SITE]), Path(str(config[NODE_JOB])), Path(str(config[NODE_WORK_DIR])), policy
        )

    def site_policy_mod(
        msg: Message, context: Context, call_next: Callable[[Message, Context], Message]
    ) -> Message:
        """Refuse a round whose request falls short of the site's policy, before anything is trained."""
        site = which_site(context)
        request = RoundRequest.from_message(msg) if msg.metadata.message_type == MessageType.TRAIN else None
        if site.policy is None or request is None:
            return call_next(msg, context)
        policy = SitePolicy.model_validate_json(site.policy.read_text(encoding="utf-8"))
        problems = policy_problems(policy, request, local_fingerprints(site, policy))
        if not problems:
            return call_next(msg, context)
        reason = f"site {site.name} refuses the round: " + "; ".join(problems)
        log(WARNING, "%s", reason)
        with (site.work_dir / REFUSALS_FILE).open("a", encoding="utf-8") as record:
            record.write(
                json.dumps({"time": time.time(), "run": msg.metadata.run_id, "reason": reason}) + "\n"
            )
        return Message(error=Error(POLICY_REFUSED, reason), reply_to=msg)

    client = ClientApp(mods=[*mods, site_policy_mod, site_privacy_mod])

    @client.train()
    def train(msg: Message, context: Context) -> Message:
        site = which_site(context)
        if "fitins.parameters" in msg.content.array_records:
            return _legacy_train(msg, site)
        order = RoundOrder.from_config(msg.content["config"])
        result = train_local_round(site.job, site.work_dir, order, from_record(msg.content["arrays"]))
        arrays = result.arrays
        arrays = {k: v for k, v in arrays.items() if not order.withheld(k)}  # FFA's A, personalised
        content = RecordDict(
            {
                "arrays": to_record(arrays),
                "metrics": MetricRecord(result.metrics),
                "site": ConfigRecord({"name": site.name}),
            }
        )
        return Message(content, reply_to=msg)

    return client


def local_fingerprints(site: Site, policy: SitePolicy) -> LocalFingerprints:
    """What the policy pins, hashed now: the base model the site's job trains, the code this runs."""
    pins = policy.fingerprints
    return LocalFingerprints(
        base_model_sha256(load_job(site.job, []).model) if pins.base_model else None,
        code_sha256() if pins.code else None,
    )


def _legacy_train(msg: Message, site: Site) -> Message:
    """The SecAgg+ path (legacy FitIns/FitRes records, arrays in the order the server names)."""
    from flwr.common import Code, FitRes, Status
    from flwr.compat.common.parameter import ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.compat.common.recorddict_compat import arrayrecord_to_parameters, fitres_to_recorddict

    config = msg.content.config_records["fitins.config"]
    keys = str(config["array-keys"]).split("\n")
    tensors = parameters_to_ndarrays(
        arrayrecord_to_parameters(msg.content["fitins.parameters"], keep_input=True)
    )
    order = RoundOrder.from_config(config)
    result = train_local_round(site.job, site.work_dir, order, dict(zip(keys, tensors, strict=True)))
    metrics = {**result.metrics, "site": site.name}
    fitres = FitRes(
        Status(Code.OK, "ok"),
        ndarrays_to_parameters([result.arrays[k] for k in keys]),
        int(result.metrics["num-examples"]),
        metrics,
    )
    return Message(fitres_to_recorddict(fitres, keep_input=True), reply_to=msg)


app = build_client_app()
