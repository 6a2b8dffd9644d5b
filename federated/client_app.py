"""The ClientApp: a site trains the received global adapter on its own data with the train core.

Only the trained LoRA adapter arrays and scalar metrics go back (plus the site's name). Which site
this is comes from the SuperNode's node config (``flotilla fed site`` sets ``site``, ``job`` and
``work-dir``) or, in simulation, from the partition id and the federation's site table.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod

from federated.adapters import from_record, to_record
from federated.strategy import site_privacy_mod
from federated.task import RoundOrder, train_local_round

#: Node-config keys a deployed SuperNode carries.
NODE_SITE, NODE_JOB, NODE_WORK_DIR = "site", "job", "work-dir"


@dataclass(frozen=True)
class Site:
    """One site's identity and where its local job spec and round run dirs are."""

    name: str
    job: Path
    work_dir: Path


def build_client_app(simulated_sites: list[Site] | None = None, mods: Sequence[Mod] = ()) -> ClientApp:
    """The ClientApp; with ``simulated_sites`` the partition id picks the site.

    ``mods`` wrap the site's handler outside the privacy mod (tests use one to tamper with a reply).
    """
    client = ClientApp(mods=[*mods, site_privacy_mod])

    def which_site(context: Context) -> Site:
        config = context.node_config
        if simulated_sites is not None:
            return simulated_sites[int(config["partition-id"])]
        return Site(str(config[NODE_SITE]), Path(str(config[NODE_JOB])), Path(str(config[NODE_WORK_DIR])))

    @client.train()
    def train(msg: Message, context: Context) -> Message:
        site = which_site(context)
        if "fitins.parameters" in msg.content.array_records:
            return _legacy_train(msg, site)
        order = RoundOrder.from_config(msg.content["config"])
        result = train_local_round(site.job, site.work_dir, order, from_record(msg.content["arrays"]))
        content = RecordDict(
            {
                "arrays": to_record(result.arrays),
                "metrics": MetricRecord(result.metrics),
                "site": ConfigRecord({"name": site.name}),
            }
        )
        return Message(content, reply_to=msg)

    return client


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
