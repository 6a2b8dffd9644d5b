"""Server strategies over adapter arrays: Flower's built-ins, a LoRA-aware average, DP, saved state.

Which to use (README strategy guide):
- ``fedavg``: the default; adapters averaged, each with the weight ``weighting`` gives it.
- ``fedprox``: non-IID sites that drift apart; sites add mu/2 ||w - w_global||^2 to their training.
- ``fedavgm``: the average taken as a step of server SGD with momentum (Hsu et al. 2019): under label
  skew the sites' updates partly cancel and momentum carries the part they agree on.
- ``fedadam`` / ``fedyogi``: server-side Adam / Yogi on the averaged update (Reddi et al. 2021).
- ``median`` / ``trimmed_mean`` / ``krum``: robust to a minority of bad or malicious sites.
- ``lora_product``: averages the updates B·A themselves (FedAvg averages A and B separately, which is
  not the average of the updates) and accepts sites with different LoRA ranks.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    Strategy,
)

from federated.adapters import from_record, to_record
from federated.spec import FederationSpec
from federated.strategy.aggregation import Update, lora_product_average
from federated.strategy.privacy import wrap_with_dp

#: Strategy attributes that carry state from round to round (FedAdam/FedYogi moments, FedAvgM's
#: momentum, the adaptive clip norm).
STATE_ATTRIBUTES = ("m_t", "v_t", "momentum_vector", "clipping_norm")
#: Key prefix of a list-valued state attribute's items in the saved arrays.
LIST_MARK = "#"


class FedAvgMomentum(FedAvgM):
    """Flower's FedAvgM, stepping from the global model each round was sent (as FedOpt does), not
    from the one it last returned itself: after a resume or a DP wrapper's noise they differ."""

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.current_arrays = arrays
        return super().configure_train(server_round, arrays, config, grid)


class LoraProductAverage(FedAvg):
    """FedAvg's sampling, with the LoRA-aware average of :func:`lora_product_average`."""

    def __init__(self, rank: int, alpha: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.rank = rank
        self.alpha = alpha

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Average B_i·A_i weighted by examples (per site alpha_i/r_i), re-factorized at the global rank."""
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        if not valid:
            return None, None
        updates, scales = [], {}
        for index, reply in enumerate(valid):
            metrics = reply.content["metrics"]
            site = f"{index}:{reply.metadata.src_node_id}"
            updates.append(Update(site, from_record(reply.content["arrays"]), int(metrics["num-examples"])))
            scales[site] = float(metrics["lora-alpha"]) / float(metrics["lora-rank"])
        merged = lora_product_average(updates, self.rank, scales, self.alpha / self.rank)
        contents = [reply.content for reply in valid]
        return to_record(merged), self.train_metrics_aggr_fn(contents, self.weighted_by_key)


def build_strategy(fed: FederationSpec, sampled_sites: int | None = None) -> Strategy:
    """The strategy the federation spec asks for, DP-wrapped when ``privacy.dp`` is set.

    ``sampled_sites``: how many updates every round aggregates, which DP noise is sized for
    (default: the listed sites, at least ``min_sites``; the server passes the enrolled sites too)."""
    choice = fed.strategy
    sampled = fed.sites_per_round
    common: dict[str, Any] = {
        # Flower trains max(int(connected x fraction_train), min_train_nodes) sites a round: with
        # sites_per_round, a fraction that rounds to 0 makes min_train_nodes the exact count.
        "fraction_train": 1.0 if sampled is None else 1e-9,
        "fraction_evaluate": 0.0,
        "min_train_nodes": fed.min_sites if sampled is None else sampled,
        "min_evaluate_nodes": 0,
        "min_available_nodes": fed.min_sites,
    }
    strategies: dict[str, Any] = {
        "fedavg": lambda: FedAvg(**common),
        "fedprox": lambda: FedProx(**common, proximal_mu=choice.proximal_mu),
        "fedavgm": lambda: FedAvgMomentum(
            **common, server_learning_rate=choice.server_step(), server_momentum=choice.server_momentum
        ),
        "fedadam": lambda: FedAdam(
            **common, eta=choice.server_step(), beta_1=choice.beta_1, beta_2=choice.beta_2, tau=choice.tau
        ),
        "fedyogi": lambda: FedYogi(
            **common, eta=choice.server_step(), beta_1=choice.beta_1, beta_2=choice.beta_2, tau=choice.tau
        ),
        "median": lambda: FedMedian(**common),
        "trimmed_mean": lambda: FedTrimmedAvg(**common, beta=choice.trim_fraction),
        "krum": lambda: Krum(**common, num_malicious_nodes=choice.krum_malicious_sites),
        "lora_product": lambda: LoraProductAverage(fed.peft.r, fed.peft.alpha, **common),
    }
    strategy: Strategy = strategies[choice.name]()
    if fed.privacy.dp is not None:
        strategy = wrap_with_dp(strategy, fed.privacy.dp, sampled_sites or fed.expected_sites(), fed.rounds)
    return strategy


def _chain(strategy: Strategy) -> list[Any]:
    """The strategy and the ones it wraps (DP wrappers keep theirs in ``.strategy``)."""
    chain: list[Any] = [strategy]
    while hasattr(chain[-1], "strategy"):
        chain.append(chain[-1].strategy)
    return chain


def strategy_state(strategy: Strategy) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Round-to-round state: scalars (JSON) and arrays (npz), keyed ``<depth>.<attribute>[.<key>]``."""
    scalars: dict[str, float] = {}
    arrays: dict[str, np.ndarray] = {}
    for depth, part in enumerate(_chain(strategy)):
        for name in STATE_ATTRIBUTES:
            value = getattr(part, name, None)
            if isinstance(value, dict):
                arrays.update({f"{depth}.{name}.{k}": np.asarray(v) for k, v in value.items()})
            elif isinstance(value, list):  # FedAvgM keeps its momentum as a list in array order
                arrays.update({f"{depth}.{name}.{LIST_MARK}{i}": np.asarray(v) for i, v in enumerate(value)})
            elif isinstance(value, int | float) and not isinstance(value, bool):
                scalars[f"{depth}.{name}"] = float(value)
    return scalars, arrays


def restore_state(strategy: Strategy, scalars: dict[str, float], arrays: dict[str, np.ndarray]) -> None:
    """Put back what :func:`strategy_state` saved."""
    chain = _chain(strategy)
    for key, value in scalars.items():
        depth, name = key.split(".", 1)
        setattr(chain[int(depth)], name, value)
    grouped: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    for key, value in arrays.items():
        depth, name, array_key = key.split(".", 2)
        grouped.setdefault((int(depth), name), {})[array_key] = value
    for (depth, name), value in grouped.items():
        if all(key.startswith(LIST_MARK) for key in value):
            value = [value[f"{LIST_MARK}{i}"] for i in range(len(value))]  # type: ignore[assignment]
        setattr(chain[depth], name, value)
