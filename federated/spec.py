"""The federation spec (``fed.yaml``) and the site spec (``site.yaml``): pydantic models, loading, rules.

A federation spec names the base model and LoRA settings every site trains, the rounds, the strategy,
the minimum sites per round, privacy options, and (for simulation) each site's local job spec.
A site spec is what one organization keeps: its SuperLink address, CA certificate, node key and local
job spec (whose data never leaves the site).
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, ValidationError

from launcher.errors import SpecError
from launcher.spec import DataFormat, Fraction, ModelSpec, NonNegativeInt, PeftSpec, PositiveInt, Section
from launcher.spec_load import apply_override, parse_yaml

PositiveFloat = Annotated[float, Field(gt=0.0)]
NonNegativeFloat = Annotated[float, Field(ge=0.0)]
STRATEGIES = ("fedavg", "fedprox", "fedadam", "median", "trimmed_mean", "krum", "lora_product")
#: Strategies that only need the (weighted) sum of the updates: the ones SecAgg+ can serve.
SUM_STRATEGIES = ("fedavg", "fedprox")


class LocalTraining(Section):
    """What each site trains per round: ``steps`` optimizer steps (10 when neither is given), or
    ``epochs`` over its data."""

    steps: PositiveInt | None = None
    epochs: PositiveFloat | None = None


class StrategySpec(Section):
    """How the server combines the sites' adapters."""

    name: Literal["fedavg", "fedprox", "fedadam", "median", "trimmed_mean", "krum", "lora_product"] = "fedavg"
    proximal_mu: NonNegativeFloat = 0.01
    server_learning_rate: PositiveFloat = 0.01
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
    noise_multiplier: NonNegativeFloat = 1.0
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
    round_timeout: PositiveFloat = 3600.0
    local: LocalTraining = Field(default_factory=LocalTraining)
    strategy: StrategySpec = Field(default_factory=StrategySpec)
    validation: ValidationSpec = Field(default_factory=ValidationSpec)
    privacy: PrivacySpec = Field(default_factory=PrivacySpec)
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    sites: dict[str, str] = Field(default_factory=dict, description="site name -> local job spec")
    server: ServerSpec = Field(default_factory=ServerSpec)
    output: str = "runs"

    def expected_sites(self) -> int:
        """Sites expected per round: all listed sites, else ``min_sites``."""
        return max(len(self.sites), self.min_sites)


class SiteSpec(Section):
    """One organization's side of a deployment (``flotilla fed site``)."""

    site: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    job: str = Field(min_length=1, description="the site's local job spec (its data stays here)")
    superlink: str = "127.0.0.1:9092"
    ca_cert: str | None = None
    private_key: str | None = None
    insecure: bool = False
    work_dir: str = "fed-site"


def federation_problems(spec: FederationSpec) -> list[tuple[str, str]]:
    """Cross-field problems as ``(key path, message)``."""
    problems: list[tuple[str, str]] = []
    local = spec.local
    if local.steps is not None and local.epochs is not None:
        problems.append(("local", "give one of local.steps and local.epochs, not both"))
    if spec.start_sites is not None and spec.start_sites < spec.min_sites:
        problems.append(("start_sites", f"{spec.start_sites} is fewer than min_sites={spec.min_sites}"))
    if spec.sites and spec.min_sites > len(spec.sites):
        problems.append(("min_sites", f"{spec.min_sites} is more than the {len(spec.sites)} listed sites"))
    if spec.model.task == "sequence_classification" and not spec.labels:
        problems.append(
            ("labels", "sequence_classification needs the label names (same order at every site)")
        )
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
    if spec.strategy.name == "krum" and spec.min_sites < 2 * spec.strategy.krum_malicious_sites + 3:
        problems.append(
            ("strategy.krum_malicious_sites", "Krum needs min_sites >= 2 x krum_malicious_sites + 3")
        )
    return problems


def load_federation(path: Path, overrides: list[str] | None = None) -> FederationSpec:
    """Load, override, validate a federation spec and make its local paths absolute."""
    spec = _load(path, overrides or [], FederationSpec, federation_problems)
    spec.model.path = _model_path(spec.model.path, path)
    spec.sites = {name: _absolute(job, path) for name, job in spec.sites.items()}
    if spec.evaluation.data:
        spec.evaluation.data = _absolute(spec.evaluation.data, path)
    spec.server.keys = _absolute(spec.server.keys, path)
    spec.server.enroll = [_absolute(key, path) for key in spec.server.enroll]
    spec.output = _absolute(spec.output, path)
    return spec


def load_site(path: Path, overrides: list[str] | None = None) -> SiteSpec:
    """Load and validate a site spec, with its local paths made absolute."""
    site = _load(path, overrides or [], SiteSpec, lambda _: [])
    site.job = _absolute(site.job, path)
    site.work_dir = _absolute(site.work_dir, path)
    if site.ca_cert:
        site.ca_cert = _absolute(site.ca_cert, path)
    if site.private_key:
        site.private_key = _absolute(site.private_key, path)
    if not site.insecure and not (site.ca_cert and site.private_key):
        raise SpecError(str(path), ["ca_cert and private_key are required unless insecure: true"])
    return site


def _load(path: Path, overrides: list[str], model: type[BaseModel], rules: Any) -> Any:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(str(path), [f"cannot read the file: {exc}"]) from None
    data, lines = parse_yaml(text, str(path))
    problems = [p for p in (apply_override(data, o) for o in overrides) if p]
    if problems:
        raise SpecError(str(path), problems)
    try:
        spec = model.model_validate(data)
    except ValidationError as exc:
        raise SpecError(str(path), [_describe(err, lines, model) for err in exc.errors()]) from None
    cross = rules(spec)
    if cross:
        raise SpecError(str(path), [_where(tuple(k.split(".")), lines) + f"{k}: {m}" for k, m in cross])
    return spec


def _describe(error: Any, lines: dict[tuple[Any, ...], int], model: type[BaseModel]) -> str:
    location = tuple(part for part in error["loc"] if not str(part).startswith(("function-", "literal[")))
    key = ".".join(str(part) for part in location) or "(top level)"
    if error["type"] == "extra_forbidden":
        allowed = _allowed(model, location[:-1])
        hint = difflib.get_close_matches(str(location[-1]), allowed, n=1)
        suggestion = f"; did you mean {hint[0]!r}?" if hint else ""
        return f"{_where(location, lines)}{key}: unknown key{suggestion} (allowed: {', '.join(allowed)})"
    if error["type"] == "missing":
        return f"{_where(location, lines)}{key}: required key is missing"
    return f"{_where(location, lines)}{key}: {error.get('input')!r} is not allowed: {error['msg']}"


def _where(location: tuple[Any, ...], lines: dict[tuple[Any, ...], int]) -> str:
    for end in range(len(location), 0, -1):
        if location[:end] in lines:
            return f"line {lines[location[:end]]}: "
    return ""


def _allowed(model: type[BaseModel], location: tuple[Any, ...]) -> list[str]:
    current: Any = model
    for part in location:
        field = current.model_fields.get(part) if isinstance(current, type) else None
        annotation = field.annotation if field else None
        current = next((a for a in (annotation, *getattr(annotation, "__args__", ())) if _is_model(a)), None)
        if current is None:
            return []
    return sorted(current.model_fields)


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _absolute(value: str, spec_file: Path) -> str:
    """A local path made absolute: found under the CWD, else under the spec's folder, else CWD-relative."""
    if Path(value).is_absolute():
        return value
    for base in (Path.cwd(), Path(spec_file).resolve().parent):
        if (base / value).exists():
            return str((base / value).resolve())
    return str((Path.cwd() / value).resolve())


def _model_path(value: str, spec_file: Path) -> str:
    """The model path made absolute when it names a local folder or file; aliases and hub ids unchanged."""
    for base in (Path.cwd(), Path(spec_file).resolve().parent):
        if not Path(value).is_absolute() and (base / value).exists():
            return str((base / value).resolve())
    return value
