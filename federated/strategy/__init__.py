"""How the server combines the sites' adapters: aggregation math (numpy only), Flower strategies,
validation of updates, and privacy (DP, SecAgg+).

This module is the package's face: other packages import only what it lists.
"""

from __future__ import annotations

from federated.strategy.aggregation import (
    Rejection,
    Update,
    lora_pairs,
    lora_product_average,
    validate_updates,
    weigh_updates,
)
from federated.strategy.privacy import (
    CLIPPING_NORM_KEY,
    DP_CLIPPING_KEY,
    SECAGG_RECORD,
    epsilon_after,
    privacy_spent,
    restore_privacy,
    secagg_round,
    site_privacy_mod,
)
from federated.strategy.strategies import build_strategy, restore_state, strategy_state

__all__ = [
    "CLIPPING_NORM_KEY",
    "DP_CLIPPING_KEY",
    "SECAGG_RECORD",
    "Rejection",
    "Update",
    "build_strategy",
    "epsilon_after",
    "lora_pairs",
    "lora_product_average",
    "privacy_spent",
    "restore_privacy",
    "restore_state",
    "secagg_round",
    "site_privacy_mod",
    "strategy_state",
    "validate_updates",
    "weigh_updates",
]
