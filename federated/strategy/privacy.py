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
from flwr.supercore.privacy_accounting import (
    GaussianPrivacyEvent,
    NeighboringRelation,
    PrivacyConfig,
    SamplingMethod,
)
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

from federated.sites import wait_for_sites
from federated.spec import DPSpec, SecAggSpec
from launcher.errors import FlotillaError

#: Key of the ConfigRecord holding the SecAgg+ protocol messages (``flwr``'s RECORD_KEY_CONFIGS).
SECAGG_RECORD = "secaggplus_configs"
#: Key Flower's DP wrappers use to send the clipping norm to the sites.
CLIPPING_NORM_KEY = "clipping_norm"
#: Train-config key telling a site which client-side clipping mod applies.
DP_CLIPPING_KEY = "dp-clipping"


#: Noise multipliers searched when deriving one from ``target_epsilon``.
NOISE_SEARCH = (1e-3, 1e3)


def wrap_with_dp(strategy: Strategy, dp: DPSpec, sampled_sites: int, rounds: int) -> Strategy:
    """``strategy`` wrapped in the Flower DP wrapper the spec names.

    Fixed clipping is accounted: Flower's RDP accountant (over Google's dp-accounting) composes one
    Gaussian release per round, every site of the ``sampled_sites`` taking part (no amplification by
    sampling claimed), neighbouring federations differing by one site's data present or absent
    (add-or-remove-one; the mean's denominator is fixed, so one site moves the sum by at most the
    clipping norm). A round
    with fewer updates than the noise is sized for is refused, and the run stops before a round that
    would spend more than ``max_epsilon`` (or ``target_epsilon``).
    """
    noise = noise_multiplier(dp, sampled_sites, rounds)
    try:
        if dp.clipping == "fixed":
            fixed = (
                DifferentialPrivacyServerSideFixedClipping
                if dp.side == "server"
                else DifferentialPrivacyClientSideFixedClipping
            )
            accountant = RdpAccountant(privacy_config(dp, sampled_sites))
            return fixed(strategy, noise, dp.clipping_norm, sampled_sites, accountant=accountant)
        adaptive = (
            DifferentialPrivacyServerSideAdaptiveClipping
            if dp.side == "server"
            else DifferentialPrivacyClientSideAdaptiveClipping
        )
        return adaptive(
            strategy,
            noise,
            sampled_sites,
            initial_clipping_norm=dp.clipping_norm,
            target_clipped_quantile=dp.target_clipped_quantile,
            clip_norm_lr=dp.clip_norm_lr,
            clipped_count_stddev=dp.clipped_count_stddev,
        )
    except ValueError as exc:
        raise FlotillaError(f"privacy.dp: {exc}") from None


#: The noise multiplier when the spec gives neither it nor a target epsilon.
DEFAULT_NOISE = 1.0


def privacy_config(dp: DPSpec, sites: int) -> PrivacyConfig:
    """Flower's accounting model for a federation where all ``sites`` take part in every round."""
    return PrivacyConfig(
        target_delta=dp.delta,
        population_size=sites,
        neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
        sampling_method=SamplingMethod.NO_AMPLIFICATION,
        max_epsilon=dp.max_epsilon or dp.target_epsilon,
    )


def epsilon_after(noise: float, dp: DPSpec, sites: int, releases: int) -> float:
    """Epsilon at ``dp.delta`` after ``releases`` rounds with ``noise`` (Flower's RDP accountant)."""
    accountant = RdpAccountant(privacy_config(dp, sites))
    accountant.compose(GaussianPrivacyEvent(noise, sites, sites), count=releases)
    return accountant.get_epsilon(dp.delta)


def noise_multiplier(dp: DPSpec, sites: int, rounds: int) -> float:
    """The spec's noise multiplier, or the smallest that keeps ``rounds`` rounds within
    ``target_epsilon``. A bisection, since epsilon falls monotonically as the noise grows; neither
    Flower nor dp-accounting calibrates a noise multiplier against Flower's accounting model."""
    if dp.target_epsilon is None:
        return DEFAULT_NOISE if dp.noise_multiplier is None else dp.noise_multiplier
    low, high = NOISE_SEARCH
    if epsilon_after(high, dp, sites, rounds) > dp.target_epsilon:
        raise FlotillaError(
            f"privacy.dp.target_epsilon={dp.target_epsilon} cannot be met over {rounds} rounds even with "
            f"noise multiplier {high:g}: raise it, or lower rounds"
        )
    for _ in range(60):
        middle = (low * high) ** 0.5
        low, high = (
            (low, middle) if epsilon_after(middle, dp, sites, rounds) <= dp.target_epsilon else (middle, high)
        )
    return high


def restore_privacy(strategy: Strategy, releases: int) -> None:
    """After a server restart, account the ``releases`` rounds already aggregated under DP."""
    accountant = getattr(strategy, "accountant", None)
    if accountant is not None and releases:
        sites = strategy.num_sampled_clients
        accountant.compose(GaussianPrivacyEvent(strategy.noise_multiplier, sites, sites), count=releases)


def privacy_spent(strategy: Strategy) -> dict[str, float] | None:
    """The (epsilon, delta) spent so far and the noise used, for the round's metrics row."""
    spent = strategy.privacy_spent() if hasattr(strategy, "privacy_spent") else None
    if spent is None:
        return None
    return {
        "epsilon": float(spent.epsilon),
        "delta": float(spent.delta),
        "rounds": int(spent.num_releases),
        "noise_multiplier": float(strategy.noise_multiplier),
    }


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
    fit_config: Callable[[int], dict[str, Any]],
    settings: SecAggSpec,
    min_sites: int,
    timeout: float,
) -> SecAggOutcome:
    """One round of SecAgg+ FedAvg over the adapter arrays (legacy workflow API); ``fit_config``
    gives the sites' train config for the number of sites taking part."""
    from flwr.compat.common.parameter import ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.compat.common.recorddict_compat import arrayrecord_to_parameters, parameters_to_arrayrecord
    from flwr.server.compat.app_utils import start_update_client_manager_thread
    from flwr.server.compat.legacy_context import LegacyContext
    from flwr.server.server_config import ServerConfig
    from flwr.server.strategy import FedAvg as LegacyFedAvg
    from flwr.server.workflow import SecAggPlusWorkflow
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key

    keys = list(global_arrays)
    config = {"server-round": server_round, "array-keys": "\n".join(keys)}
    strategy = LegacyFedAvg(
        fraction_fit=1.0,  # every available site takes part
        fraction_evaluate=0.0,
        min_fit_clients=min_sites,
        min_available_clients=min_sites,
        on_fit_config_fn=lambda _round: {**fit_config(legacy.client_manager.num_available()), **config},
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
