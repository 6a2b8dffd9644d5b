"""The federation spec (``fed.yaml``) and the site spec (``site.yaml``): pydantic models, loading, rules.

A federation spec names the base model and LoRA settings every site trains, the rounds, the strategy,
the minimum sites per round, privacy options, and (for simulation) each site's local job spec.
A site spec is what one organization keeps: its SuperLink address, CA certificate, node key and local
job spec (whose data never leaves the site).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field

from launcher.errors import SpecError
from launcher.spec import (
    DataFormat,
    Fraction,
    ModelSpec,
    NonNegativeInt,
    PeftSpec,
    PositiveInt,
    RelativePaths,
    Section,
    TrackingSpec,
    load_yaml_model,
    tracking_problems,
)

PositiveFloat = Annotated[float, Field(gt=0.0)]
NonNegativeFloat = Annotated[float, Field(ge=0.0)]
#: Strategies that only need the (weighted) sum of the updates: the ones SecAgg+ can serve.
SUM_STRATEGIES = ("fedavg", "fedprox")


def withheld(key: str, frozen_lora_a: bool, keep_local: Sequence[str]) -> bool:
    """Whether adapter tensor ``key`` stays at the site: LoRA's A under FFA-LoRA (the server's A is
    the only one), or a tensor the federation personalises (``local.keep_local`` regexes)."""
    return (frozen_lora_a and ".lora_A." in key) or any(re.search(pattern, key) for pattern in keep_local)


class LocalTraining(Section):
    """What each site trains per round: ``steps`` optimizer steps (10 when neither is given), or
    ``epochs`` over its data."""

    steps: PositiveInt | None = None
    epochs: PositiveFloat | None = None
    #: Each site's own learning rate, scaled per round: ``constant``, or ``cosine`` from 1 at the first
    #: round to ``min_lr_ratio`` at the last (as FlowerTune's LLM baselines do).
    lr_schedule: Literal["constant", "cosine"] = "constant"
    min_lr_ratio: Fraction = 0.1
    #: Personalisation: regexes of adapter tensor names that stay at each site, never sent and never
    #: replaced by the global ones: ``[lora_B]`` is FedSA-LoRA (A shared, B per site), ``[classifier]``
    #: a head per site. Each site's own model is then its personalised one, evaluated on its own rows.
    keep_local: list[str] = Field(default_factory=list)
    #: Classification under label skew: each site trains with its logits adjusted by tau * log(its own
    #: label shares) (``train.logit_adjustment``, FedLC-style calibration). Default 1 for
    #: sequence_classification (+0.036 accuracy in both 8-site variants measured at alpha 0.3, less on
    #: the 3-site CI cut: bench/RESULTS.md); 0 turns it off.
    logit_adjustment: NonNegativeFloat | None = None
    #: ``keep``: each site's optimizer state (AdamW's moments) carries over from its previous round
    #: and never leaves the site; a multi-process site starts fresh each round. ``reset``: every
    #: round starts a fresh optimizer. Default: keep for sequence_classification (+0.018 to +0.033
    #: accuracy in all 4 configurations measured on the 8-site Debian-sections benchmark), reset
    #: otherwise (the one causal-LM run measured, 5 short rounds, ended at perplexity 325.5 kept
    #: against 303.6 fresh): bench/RESULTS.md.
    optimizer_state: Literal["reset", "keep"] | None = None
    #: SCAFFOLD's drift correction: every local step is corrected by the federation's update
    #: direction minus the site's own, both derived at the site from the global adapters it
    #: received (no extra bytes; federated/control_variates.py). Needs every site in every round and
    #: a weighted-mean server step: fedavg, fedprox, or fedavgm with server_momentum 0.
    scaffold: bool = False

    def logit_adjustment_for(self, task: str) -> float:
        """The tau every site trains with for ``task``: the spec's, else 1 for classification."""
        if self.logit_adjustment is not None:
            return self.logit_adjustment
        return 1.0 if task == "sequence_classification" else 0.0

    def keeps_optimizer_state(self, task: str) -> bool:
        """Whether sites carry their optimizer state between rounds for ``task`` (the spec's choice,
        else keep for classification)."""
        if self.optimizer_state is not None:
            return self.optimizer_state == "keep"
        return task == "sequence_classification"

    def lr_scale(self, server_round: int, rounds: int) -> float:
        """The factor on the sites' learning rate in ``server_round`` (1-based) of ``rounds``."""
        if self.lr_schedule == "constant" or rounds < 2:
            return 1.0
        progress = (server_round - 1) / (rounds - 1)
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class StrategySpec(Section):
    """How the server combines the sites' adapters."""

    def server_step(self) -> float:
        """``server_learning_rate``, or the strategy's default."""
        if self.server_learning_rate is not None:
            return self.server_learning_rate
        return 1.0 if self.name == "fedavgm" else 0.01

    name: Literal[
        "fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "median", "trimmed_mean", "krum", "lora_product"
    ] = "fedavg"
    proximal_mu: NonNegativeFloat = 0.01
    #: The server optimizer's step on the averaged update: default 1.0 for fedavgm, 0.01 for
    #: fedadam / fedyogi (whose steps are normalized, as in Reddi et al. 2021).
    server_learning_rate: PositiveFloat | None = None
    #: fedavgm's momentum on the averaged update (Hsu et al. 2019).
    server_momentum: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.9
    beta_1: Fraction = 0.9
    beta_2: Fraction = 0.99
    tau: PositiveFloat = 1e-3
    trim_fraction: Annotated[float, Field(gt=0.0, lt=0.5)] = 0.2
    krum_malicious_sites: NonNegativeInt = 0


class ValidationSpec(Section):
    """Server-side checks of every update before aggregation."""

    norm_factor: Annotated[float, Field(gt=1.0)] = 10.0
    max_norm: PositiveFloat | None = None


class DPSpec(Section):
    """Differential privacy: clipping + Gaussian noise (Flower's wrappers)."""

    side: Literal["server", "client"] = "server"
    clipping: Literal["fixed", "adaptive"] = "fixed"
    #: Noise std over the clipping norm; default 1.0, or derived from ``target_epsilon``.
    noise_multiplier: NonNegativeFloat | None = None
    #: Fixed clipping is accounted (Flower's RDP accountant): the (epsilon, delta) reached after
    #: ``rounds`` rounds; the noise multiplier is derived to meet it, and the run stops at it.
    target_epsilon: PositiveFloat | None = None
    #: Stop the federation before a round would spend more than this epsilon.
    max_epsilon: PositiveFloat | None = None
    delta: Annotated[float, Field(gt=0.0, lt=1.0)] = 1e-5
    clipping_norm: PositiveFloat = 1.0
    target_clipped_quantile: Annotated[float, Field(ge=0.0, le=1.0)] = 0.5
    clip_norm_lr: PositiveFloat = 0.2
    clipped_count_stddev: NonNegativeFloat | None = None


class SecAggSpec(Section):
    """SecAgg+ secure aggregation: the server learns only the weighted sum of the adapters."""

    num_shares: Annotated[float, Field(gt=0.0)] = 1.0
    reconstruction_threshold: Annotated[float, Field(gt=0.0)] = 0.67
    max_weight: PositiveFloat = 1000.0
    clipping_range: PositiveFloat = 8.0
    quantization_range: Annotated[int, Field(gt=0)] = 2**22


class PrivacySpec(Section):
    """Optional DP and SecAgg+."""

    dp: DPSpec | None = None
    secagg: SecAggSpec | None = None


class EvaluationSpec(Section):
    """Server-side evaluation of every round's global adapter on a held-out file on the server."""

    data: str | None = None
    format: DataFormat | None = None
    max_length: PositiveInt = 256
    batch_size: PositiveInt = 16


class ServerSpec(Section):
    """Where the SuperLink listens and which keys secure it (``flotilla fed server``)."""

    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=1024, le=65535)] = 9092
    keys: str = "fed-keys"
    enroll: list[str] = Field(default_factory=list, description="site public keys; default keys/sites/*.pub")
    insecure: bool = False


class FederationSpec(Section):
    """A whole federated fine-tuning run."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    seed: NonNegativeInt = 42
    model: ModelSpec
    peft: PeftSpec = Field(default_factory=PeftSpec)
    labels: list[str] | None = None
    rounds: PositiveInt = 3
    min_sites: PositiveInt = 2
    #: Sites that must be connected before the first round of a new federation (default min_sites):
    #: the consortium joins first, later rounds go on with whoever answers (at least min_sites).
    start_sites: PositiveInt | None = None
    #: Client sampling: each round trains this many of the connected sites, drawn at random
    #: (seeded by ``seed`` and the round); default every connected site.
    sites_per_round: PositiveInt | None = None
    round_timeout: PositiveFloat = 3600.0
    local: LocalTraining = Field(default_factory=LocalTraining)
    strategy: StrategySpec = Field(default_factory=StrategySpec)
    validation: ValidationSpec = Field(default_factory=ValidationSpec)
    privacy: PrivacySpec = Field(default_factory=PrivacySpec)
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    #: How much each accepted update counts in the average: ``examples`` (as each site claims),
    #: ``uniform``, or ``capped`` (claims capped at ``max_examples``; without it at the round's median
    #: claim). Default: capped, uniform under DP.
    weighting: Literal["examples", "uniform", "capped"] | None = None
    max_examples: PositiveInt | dict[str, PositiveInt] | None = None
    #: A claim over its cap is weighted as the cap (``clip``) or the update is left out (``reject``).
    over_cap: Literal["clip", "reject"] = "clip"
    sites: dict[str, str] = Field(default_factory=dict, description="site name -> local job spec")
    server: ServerSpec = Field(default_factory=ServerSpec)
    output: str = "runs"
    #: Trackers for the server's run: global metrics per round, and each site's (``site/<name>/...``).
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)

    def effective_weighting(self) -> str:
        """The weighting rounds use: as set, else uniform under DP, examples under SecAgg+ (where
        each site caps its own weight at ``privacy.secagg.max_weight``), else capped."""
        if self.weighting is not None:
            return self.weighting
        if self.privacy.dp is not None:
            return "uniform"
        return "examples" if self.privacy.secagg is not None else "capped"

    @property
    def withholds(self) -> bool:
        """Whether sites keep any adapter tensors to themselves (FFA-LoRA, ``local.keep_local``)."""
        return self.peft.freeze_lora_a or bool(self.local.keep_local)

    def withheld(self, key: str) -> bool:
        """Whether sites keep adapter tensor ``key`` (FFA-LoRA's A, ``local.keep_local``)."""
        return withheld(key, self.peft.freeze_lora_a, self.local.keep_local)

    def expected_sites(self) -> int:
        """Sites expected per round: ``sites_per_round``, else all listed sites, else ``min_sites``."""
        if self.sites_per_round is not None:
            return self.sites_per_round
        return max(len(self.sites), self.min_sites)


Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class Fingerprints(Section):
    """sha256 pins (``flotilla fed fingerprint site.yaml`` prints this site's)."""

    #: The base model: the site's own copy and the one the server announces must both match.
    base_model: Sha256 | None = None
    #: The code: Flotilla's sources and the versions of the libraries that train and aggregate, as
    #: installed at this site and as the server announces them.
    code: Sha256 | None = None


class SitePolicy(Section):
    """What a site requires of the server's request before it trains a round."""

    require_secagg: bool = False
    #: Require client-side DP clipping (the site clips its own update) at most this norm.
    max_clipping_norm: PositiveFloat | None = None
    #: Require accounted DP whose epsilon over the federation's rounds, recomputed here, is at most this.
    max_epsilon: PositiveFloat | None = None
    #: Train only in rounds with at least this many sites.
    min_sites: PositiveInt | None = None
    fingerprints: Fingerprints = Field(default_factory=Fingerprints)


class SiteSpec(Section):
    """One organization's side of a deployment (``flotilla fed site``)."""

    site: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    job: str = Field(min_length=1, description="the site's local job spec (its data stays here)")
    superlink: str = "127.0.0.1:9092"
    ca_cert: str | None = None
    private_key: str | None = None
    insecure: bool = False
    work_dir: str = "fed-site"
    policy: SitePolicy = Field(default_factory=SitePolicy)


def federation_problems(spec: FederationSpec) -> list[tuple[str, str]]:
    """Cross-field problems as ``(key path, message)``."""
    problems: list[tuple[str, str]] = []
    local = spec.local
    if local.steps is not None and local.epochs is not None:
        problems.append(("local", "give one of local.steps and local.epochs, not both"))
    if spec.start_sites is not None and spec.start_sites < spec.min_sites:
        problems.append(("start_sites", f"{spec.start_sites} is fewer than min_sites={spec.min_sites}"))
    sampled = spec.sites_per_round
    if sampled is not None and sampled < spec.min_sites:
        problems.append(("sites_per_round", f"{sampled} is fewer than min_sites={spec.min_sites}"))
    if sampled is not None and spec.sites and sampled > len(spec.sites):
        problems.append(("sites_per_round", f"{sampled} is more than the {len(spec.sites)} listed sites"))
    if sampled is not None and spec.privacy.secagg is not None:
        problems.append(("sites_per_round", "SecAgg+ rounds include every connected site: leave it unset"))
    if spec.sites and spec.min_sites > len(spec.sites):
        problems.append(("min_sites", f"{spec.min_sites} is more than the {len(spec.sites)} listed sites"))
    if spec.model.task == "sequence_classification" and not spec.labels:
        problems.append(
            ("labels", "sequence_classification needs the label names (same order at every site)")
        )
    if local.logit_adjustment and spec.model.task != "sequence_classification":
        problems.append(("local.logit_adjustment", "only applies to model.task='sequence_classification'"))
    if spec.peft.method != "lora":
        problems.append(("peft.method", "federated fine-tuning exchanges LoRA adapters only: use 'lora'"))
    secagg, dp = spec.privacy.secagg, spec.privacy.dp
    if secagg is not None:
        if spec.strategy.name not in SUM_STRATEGIES:
            problems.append(
                (
                    "privacy.secagg",
                    f"the server only sees the sum under SecAgg+: strategy.name must be one of "
                    f"{list(SUM_STRATEGIES)}, got {spec.strategy.name!r}",
                )
            )
        if dp is not None:
            problems.append(("privacy", "use either privacy.dp or privacy.secagg, not both"))
        if spec.min_sites < 2:
            problems.append(("min_sites", "SecAgg+ needs at least 2 sites per round"))
    if local.keep_local and (secagg is not None or spec.strategy.name == "lora_product"):
        problems.append(
            (
                "local.keep_local",
                "personalised tensors cannot be combined with privacy.secagg (every tensor is summed) "
                "or lora_product (it needs every site's A and B)",
            )
        )
    problems += _scaffold_problems(spec)
    problems += _weighting_problems(spec)
    problems += _dp_problems(spec)
    problems += tracking_problems(spec.tracking)
    if spec.strategy.name == "krum" and spec.min_sites < 2 * spec.strategy.krum_malicious_sites + 3:
        problems.append(
            ("strategy.krum_malicious_sites", "Krum needs min_sites >= 2 x krum_malicious_sites + 3")
        )
    return problems


def site_problems(site: SiteSpec) -> list[tuple[str, str]]:
    """Cross-field problems of a site spec as ``(key path, message)``."""
    policy = site.policy
    if policy.require_secagg and (policy.max_epsilon or policy.max_clipping_norm):
        return [
            (
                "policy",
                "require_secagg cannot be met together with max_epsilon or max_clipping_norm: a "
                "federation uses either privacy.secagg or privacy.dp",
            )
        ]
    return []


def load_federation(path: Path, overrides: list[str] | None = None) -> FederationSpec:
    """Load, override, validate a federation spec and make its local paths absolute
    (:class:`launcher.spec.RelativePaths`: relative to the spec's folder, overrides to the cwd)."""
    spec = load_yaml_model(FederationSpec, path, overrides or [], [federation_problems])
    resolve = RelativePaths(path, overrides or [])
    spec.model.path = resolve(spec.model.path, "model.path", named=True) or spec.model.path
    spec.sites = {name: resolve(job, f"sites.{name}") or job for name, job in spec.sites.items()}
    spec.evaluation.data = resolve(spec.evaluation.data, "evaluation.data")
    spec.server.keys = resolve(spec.server.keys, "server.keys") or spec.server.keys
    spec.server.enroll = [resolve(key, "server.enroll") or key for key in spec.server.enroll]
    spec.output = resolve(spec.output, "output") or spec.output
    return spec


def load_site(path: Path, overrides: list[str] | None = None) -> SiteSpec:
    """Load and validate a site spec, with its local paths made absolute (as a federation's)."""
    site = load_yaml_model(SiteSpec, path, overrides or [], [site_problems])
    resolve = RelativePaths(path, overrides or [])
    site.job = resolve(site.job, "job") or site.job
    site.work_dir = resolve(site.work_dir, "work_dir") or site.work_dir
    site.ca_cert = resolve(site.ca_cert, "ca_cert")
    site.private_key = resolve(site.private_key, "private_key")
    if not site.insecure and not (site.ca_cert and site.private_key):
        raise SpecError(str(path), ["ca_cert and private_key are required unless insecure: true"])
    return site


def _scaffold_problems(spec: FederationSpec) -> list[tuple[str, str]]:
    """``local.scaffold`` derives the federation's update from consecutive global adapters: that
    needs every site each round and a server step that is a scaled weighted mean."""
    if not spec.local.scaffold:
        return []
    strategy = spec.strategy
    mean_step = strategy.name in ("fedavg", "fedprox") or (
        strategy.name == "fedavgm" and strategy.server_momentum == 0
    )
    problems = []
    if not mean_step:
        problems.append(
            (
                "local.scaffold",
                "needs a weighted-mean server step: strategy.name fedavg, fedprox, or fedavgm with "
                f"strategy.server_momentum 0 (got {strategy.name!r})",
            )
        )
    if spec.sites_per_round is not None:
        problems.append(("local.scaffold", "needs every site in every round: leave sites_per_round unset"))
    return problems


def _weighting_problems(spec: FederationSpec) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    weighting = spec.effective_weighting()
    if spec.privacy.dp is not None and weighting != "uniform":
        problems.append(
            (
                "weighting",
                f"DP noise is sized for a uniform mean of clipped updates: use 'uniform', not {weighting!r}",
            )
        )
    if spec.privacy.secagg is not None and spec.weighting is not None:
        problems.append(
            (
                "weighting",
                "under SecAgg+ the server sees only the weighted sum: each site's weight is capped at "
                "privacy.secagg.max_weight instead; remove weighting",
            )
        )
    if spec.max_examples is not None and weighting != "capped":
        problems.append(("max_examples", f"only applies to weighting: capped (weighting is {weighting!r})"))
    if isinstance(spec.max_examples, dict) and spec.sites:
        unknown = sorted(set(spec.max_examples) - set(spec.sites))
        if unknown:
            problems.append(
                (
                    f"max_examples.{unknown[0]}",
                    f"not a site of this federation (sites: {', '.join(spec.sites)})",
                )
            )
    return problems


#: Strategies whose aggregate is the mean of the (clipped) updates: the only ones DP noise is sized for.
DP_STRATEGIES = ("fedavg", "fedprox")


def _dp_problems(spec: FederationSpec) -> list[tuple[str, str]]:
    dp = spec.privacy.dp
    if dp is None:
        return []
    problems: list[tuple[str, str]] = []
    if spec.strategy.name not in DP_STRATEGIES:
        problems.append(
            (
                "strategy.name",
                f"DP noise is sized for the mean of clipped updates: with privacy.dp use one of "
                f"{list(DP_STRATEGIES)}, not {spec.strategy.name!r}",
            )
        )
    accounted = ("target_epsilon", "max_epsilon")
    if dp.clipping == "adaptive":
        problems += [
            (
                f"privacy.dp.{key}",
                "needs clipping: fixed (only fixed clipping has an (epsilon, delta) account)",
            )
            for key in accounted
            if getattr(dp, key) is not None
        ]
    if dp.target_epsilon is not None and dp.noise_multiplier is not None:
        problems.append(
            (
                "privacy.dp.noise_multiplier",
                "give noise_multiplier or target_epsilon (which derives it), not both",
            )
        )
    if dp.clipping == "fixed" and dp.noise_multiplier == 0:
        problems.append(
            ("privacy.dp.noise_multiplier", "must be above 0: without noise there is no guarantee")
        )
    if dp.target_epsilon is not None and dp.max_epsilon is not None and dp.max_epsilon < dp.target_epsilon:
        problems.append(("privacy.dp.max_epsilon", f"is below target_epsilon={dp.target_epsilon}"))
    return problems
