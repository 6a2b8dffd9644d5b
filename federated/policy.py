"""A site's policy against the server's round request: the server announces what it will do, the
site checks it against what it requires (and against the model and code it runs itself), and
refuses the round, saying why, when the request falls short.

What the site verifies itself: whether the request is SecAgg+ (its own ``secaggplus_mod`` masks the
update), the clipping norm (its own mod clips), its own base model and code. What it takes from the
server's announcement: the number of sites in the round, the DP noise and rounds behind the epsilon
it recomputes, and the server's model and code fingerprints. A server that lies in its announcement
is not caught here; the trust model in the README says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flwr.app import Message

from federated.spec import DPSpec, SitePolicy
from federated.strategy import CLIPPING_NORM_KEY, SECAGG_RECORD, epsilon_after

#: Train-config keys the server announces with every round.
ROUND_SITES_KEY = "round-sites"
MODEL_SHA_KEY = "base-model-sha256"
CODE_SHA_KEY = "code-sha256"
DP_NOISE_KEY = "dp-noise-multiplier"
DP_DELTA_KEY = "dp-delta"
DP_ROUNDS_KEY = "dp-rounds"
#: Error code of the reply of a site that refused a round under its policy.
POLICY_REFUSED = 4030


@dataclass(frozen=True)
class RoundRequest:
    """What a round's train message asks of a site, and what the server announces with it."""

    secagg: bool
    sites: int | None
    clipping_norm: float | None
    noise_multiplier: float | None
    delta: float | None
    rounds: int | None
    base_model: str | None
    code: str | None

    @classmethod
    def from_message(cls, msg: Message) -> RoundRequest | None:
        """The request in a train message; None for a SecAgg+ stage that carries no round settings."""
        configs = msg.content.config_records
        config = configs.get("config") or configs.get("fitins.config")
        if config is None:
            return None

        def number(key: str) -> float | None:
            return float(config[key]) if key in config else None  # type: ignore[arg-type]

        rounds, sites = number(DP_ROUNDS_KEY), number(ROUND_SITES_KEY)
        return cls(
            secagg=SECAGG_RECORD in configs,
            sites=int(sites) if sites is not None else None,
            clipping_norm=number(CLIPPING_NORM_KEY),
            noise_multiplier=number(DP_NOISE_KEY),
            delta=number(DP_DELTA_KEY),
            rounds=int(rounds) if rounds is not None else None,
            base_model=str(config[MODEL_SHA_KEY]) if MODEL_SHA_KEY in config else None,
            code=str(config[CODE_SHA_KEY]) if CODE_SHA_KEY in config else None,
        )

    def epsilon(self) -> float | None:
        """Epsilon over the federation's rounds for the announced noise (Flower's RDP accountant)."""
        if self.noise_multiplier is None or self.delta is None or self.rounds is None:
            return None
        dp = DPSpec(delta=self.delta)
        return epsilon_after(self.noise_multiplier, dp, self.sites or 1, self.rounds)


@dataclass(frozen=True)
class LocalFingerprints:
    """The site's own base model and code, hashed where it runs (only what the policy pins)."""

    base_model: str | None = None
    code: str | None = None


def policy_problems(policy: SitePolicy, request: RoundRequest, local: LocalFingerprints) -> list[str]:
    """Every way ``request`` falls short of ``policy`` (empty: the site trains)."""
    problems: list[str] = []
    if policy.require_secagg and not request.secagg:
        problems.append("the policy requires SecAgg+ but the round is not secure-aggregated")
    if policy.max_clipping_norm is not None:
        if request.clipping_norm is None:
            problems.append(
                f"the policy requires client-side clipping at most {policy.max_clipping_norm:g} "
                "but the round asks for no client-side clipping"
            )
        elif request.clipping_norm > policy.max_clipping_norm:
            problems.append(
                f"the round's clipping norm {request.clipping_norm:g} is looser than the policy's "
                f"max_clipping_norm {policy.max_clipping_norm:g}"
            )
    if policy.max_epsilon is not None:
        epsilon = request.epsilon()
        if epsilon is None:
            problems.append(
                f"the policy requires DP with epsilon at most {policy.max_epsilon:g} but the round "
                "announces no accounted DP (noise multiplier, delta, rounds)"
            )
        elif epsilon > policy.max_epsilon:
            problems.append(
                f"epsilon over the federation's {request.rounds} rounds is {epsilon:.3g} "
                f"(noise multiplier {request.noise_multiplier:g}, delta {request.delta:g}), "
                f"above the policy's max_epsilon {policy.max_epsilon:g}"
            )
    if policy.min_sites is not None and (request.sites or 0) < policy.min_sites:
        problems.append(
            f"the round has {request.sites or 'an unannounced number of'} site(s), fewer than the "
            f"policy's min_sites {policy.min_sites}"
        )
    pins = policy.fingerprints
    problems += _fingerprint_problems("base model", pins.base_model, local.base_model, request.base_model)
    problems += _fingerprint_problems("code", pins.code, local.code, request.code)
    return problems


def _fingerprint_problems(
    what: str, pinned: str | None, local: str | None, announced: str | None
) -> list[str]:
    if pinned is None:
        return []
    problems = []
    if local != pinned:
        problems.append(
            f"this site's {what} has sha256 {(local or '?')[:12]}..., the policy pins {pinned[:12]}..."
        )
    if announced != pinned:
        said = f"sha256 {announced[:12]}..." if announced else "no fingerprint"
        problems.append(f"the server announces {said} for its {what}, the policy pins {pinned[:12]}...")
    return problems


def announcement(
    sites: int, base_model: str | None, code: str, dp: DPSpec | None, noise: float | None, rounds: int
) -> dict[str, Any]:
    """What the server announces with a round: its sites, fingerprints and accounted DP."""
    announced: dict[str, Any] = {ROUND_SITES_KEY: sites, CODE_SHA_KEY: code}
    if base_model is not None:
        announced[MODEL_SHA_KEY] = base_model
    if dp is not None and noise is not None:
        announced.update({DP_NOISE_KEY: noise, DP_DELTA_KEY: dp.delta, DP_ROUNDS_KEY: rounds})
    return announced
