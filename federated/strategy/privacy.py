"""Privacy: Flower's DP wrappers built from the spec, the site-side mod, and SecAgg+ rounds.

- DP: ``DifferentialPrivacy{Server,Client}Side{Fixed,Adaptive}Clipping`` wrap the strategy; with
  client-side clipping each site clips its own update (``fixedclipping_mod``/``adaptiveclipping_mod``)
  and the server only adds noise.
- SecAgg+: Flower ships it only through the legacy workflow API, so a SecAgg+ round runs
  ``SecAggPlusWorkflow`` with a legacy FedAvg over the adapter arrays (fixed key order); sites answer
  through ``secaggplus_mod``, which masks the adapter so the server only learns the weighted sum.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MessageType
from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)

from federated.sites import wait_for_sites
from federated.spec import DPSpec, SecAggSpec
from launcher.errors import FlotillaError

#: Key of the ConfigRecord holding the SecAgg+ protocol messages (``flwr``'s RECORD_KEY_CONFIGS).
SECAGG_RECORD = "secaggplus_configs"
#: Key Flower's DP wrappers use to send the clipping norm to the sites.
CLIPPING_NORM_KEY = "clipping_norm"
#: Train-config key telling a site which client-side clipping mod applies.
DP_CLIPPING_KEY = "dp-clipping"


def wrap_with_dp(strategy: Strategy, dp: DPSpec, sampled_sites: int) -> Strategy:
    """``strategy`` wrapped in the Flower DP wrapper the spec names."""
    try:
        if dp.clipping == "fixed":
            fixed = (
                DifferentialPrivacyServerSideFixedClipping
                if dp.side == "server"
                else DifferentialPrivacyClientSideFixedClipping
            )
            return fixed(strategy, dp.noise_multiplier, dp.clipping_norm, sampled_sites)
        adaptive = (
            DifferentialPrivacyServerSideAdaptiveClipping
            if dp.side == "server"
            else DifferentialPrivacyClientSideAdaptiveClipping
        )
        return adaptive(
            strategy,
            dp.noise_multiplier,
            sampled_sites,
            initial_clipping_norm=dp.clipping_norm,
            target_clipped_quantile=dp.target_clipped_quantile,
            clip_norm_lr=dp.clip_norm_lr,
            clipped_count_stddev=dp.clipped_count_stddev,
        )
    except ValueError as exc:
        raise FlotillaError(f"privacy.dp: {exc}") from None


def site_privacy_mod(
    msg: Message, ctxt: Context, call_next: Callable[[Message, Context], Message]
) -> Message:
    """Site-side mod: SecAgg+ masking or DP clipping, whichever the server's message asks for."""
    if msg.metadata.message_type != MessageType.TRAIN:
        return call_next(msg, ctxt)
    configs = msg.content.config_records
    if SECAGG_RECORD in configs:
        from flwr.client.mod import secaggplus_mod

        return secaggplus_mod(msg, ctxt, call_next)
    config = next(iter(configs.values()), None)
    if config is not None and CLIPPING_NORM_KEY in config:
        mod = adaptiveclipping_mod if config.get(DP_CLIPPING_KEY) == "adaptive" else fixedclipping_mod
        return mod(msg, ctxt, call_next)
    return call_next(msg, ctxt)


@dataclass
class RecordingGrid:
    """A Grid that keeps every reply it hands to the server: what the server actually saw."""

    grid: Grid
    replies: list[Message] = field(default_factory=list)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        received = list(self.grid.send_and_receive(messages, timeout=timeout))
        self.replies.extend(received)
        return received

    def __getattr__(self, name: str) -> Any:
        return getattr(self.grid, name)


@dataclass
class SecAggOutcome:
    """A SecAgg+ round's result: the unmasked weighted mean, and every reply the server received."""

    arrays: dict[str, np.ndarray] | None
    replies: list[Message]


def secagg_round(
    grid: Grid,
    context: Context,
    global_arrays: Mapping[str, np.ndarray],
    server_round: int,
    fit_config: dict[str, Any],
    settings: SecAggSpec,
    min_sites: int,
    timeout: float,
) -> SecAggOutcome:
    """One round of SecAgg+ FedAvg over the adapter arrays (legacy workflow API)."""
    from flwr.compat.common.parameter import ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.compat.common.recorddict_compat import arrayrecord_to_parameters, parameters_to_arrayrecord
    from flwr.server.compat.app_utils import start_update_client_manager_thread
    from flwr.server.compat.legacy_context import LegacyContext
    from flwr.server.server_config import ServerConfig
    from flwr.server.strategy import FedAvg as LegacyFedAvg
    from flwr.server.workflow import SecAggPlusWorkflow
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key

    keys = list(global_arrays)
    config = {**fit_config, "server-round": server_round, "array-keys": "\n".join(keys)}
    strategy = LegacyFedAvg(
        fraction_fit=1.0,
        fraction_evaluate=0.0,
        min_fit_clients=min_sites,
        min_available_clients=min_sites,
        on_fit_config_fn=lambda _round: dict(config),
    )
    legacy = LegacyContext(context, config=ServerConfig(num_rounds=1), strategy=strategy)
    parameters = ndarrays_to_parameters([np.asarray(global_arrays[k]) for k in keys])
    legacy.state.array_records[MAIN_PARAMS_RECORD] = parameters_to_arrayrecord(parameters, keep_input=True)
    legacy.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
        {Key.CURRENT_ROUND: server_round, Key.START_TIME: time.time()}
    )
    recording = RecordingGrid(grid)
    thread, stop, ready = start_update_client_manager_thread(grid, legacy.client_manager)
    try:
        ready.wait()
        wait_for_sites(legacy.client_manager.num_available, min_sites, timeout)
        before = legacy.state.array_records[MAIN_PARAMS_RECORD]
        workflow = SecAggPlusWorkflow(
            num_shares=_int_or_fraction(settings.num_shares),
            reconstruction_threshold=_int_or_fraction(settings.reconstruction_threshold),
            max_weight=settings.max_weight,
            clipping_range=settings.clipping_range,
            quantization_range=settings.quantization_range,
            timeout=timeout,
        )
        workflow(recording, legacy)  # type: ignore[arg-type]
    finally:
        stop.set()
        thread.join()
    after = legacy.state.array_records[MAIN_PARAMS_RECORD]
    if after is before:
        return SecAggOutcome(None, recording.replies)
    merged = parameters_to_ndarrays(arrayrecord_to_parameters(after, keep_input=True))
    return SecAggOutcome(dict(zip(keys, merged, strict=True)), recording.replies)


def _int_or_fraction(value: float) -> int | float:
    """SecAgg+ reads integers as counts and floats in (0, 1] as fractions of the sampled sites."""
    return int(value) if value > 1 and float(value).is_integer() else float(value)
