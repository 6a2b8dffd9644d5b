"""The job spec: pydantic models (``extra="forbid"`` everywhere) and their cross-field rules."""

from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from launcher.spec.search import Dimension, parse_dimension

PositiveInt = Annotated[int, Field(gt=0)]
NonNegativeInt = Annotated[int, Field(ge=0)]
NonNegativeFloat = Annotated[float, Field(ge=0)]
Fraction = Annotated[float, Field(ge=0.0, lt=1.0)]


class Section(BaseModel):
    """Base of every spec section: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class UnfreezeStage(Section):
    """At ``step``, parameters whose names match any of ``patterns`` become trainable."""

    step: NonNegativeInt
    patterns: list[str] = Field(min_length=1)


class ModelSpec(Section):
    """Which model to fine-tune and how."""

    path: str = Field(min_length=1, description="bundled alias, local directory, .gguf file or hub id")
    gguf_file: str | None = None
    task: Literal["causal_lm", "sequence_classification"] = "causal_lm"
    num_labels: PositiveInt | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    gradient_checkpointing: bool = False
    freeze: list[str] = Field(default_factory=list, description="regexes of parameter names to freeze")
    unfreeze_schedule: list[UnfreezeStage] = Field(default_factory=list)
    trust_remote_code: bool = False
    revision: str | None = None
    #: ``auto``: per-document attention for packed causal-LM batches (each document attends only to
    #: itself, at a cost that follows document lengths), the model's default (SDPA) otherwise.
    attention: Literal["auto", "sdpa", "eager", "per_document"] = "auto"


class FieldMap(Section):
    """Names of the columns each data format reads."""

    prompt: str = "prompt"
    response: str = "response"
    text: str = "text"
    label: str = "label"
    messages: str = "messages"


DataFormat = Literal["chat", "instruction", "text", "classification"]


class DataSource(Section):
    """One data file (JSONL, CSV or Parquet) or a hub dataset name."""

    path: str = Field(min_length=1)
    format: DataFormat | None = None
    fields: FieldMap | None = None
    weight: Annotated[float, Field(gt=0.0)] = 1.0
    split: str = "train"


class DataSpec(Section):
    """Training and validation data, checks and batching."""

    train: list[DataSource] = Field(min_length=1)
    validation: list[DataSource] = Field(default_factory=list)
    validation_ratio: Fraction = 0.1
    format: DataFormat = "instruction"
    fields: FieldMap = Field(default_factory=FieldMap)
    max_length: PositiveInt = 512
    on_bad_rows: Literal["error", "skip"] = "error"
    dedup: bool = True
    drop_overlong: bool = False
    packing: bool = False
    group_by_length: bool = False
    #: false: training reads rows in file order (no shuffle before the split, a sequential sampler).
    shuffle: bool = True
    max_train_rows: PositiveInt | None = None
    max_validation_rows: PositiveInt | None = None
    #: Classification: every label name, in the order the model's outputs use (default: the names
    #: found in the data, sorted). Declared, a split may lack a label (a site of a label-skewed federation).
    labels: list[str] | None = None
    #: Where prepared (tokenized) data is cached; default ``$FLOTILLA_CACHE/data`` or
    #: ``<output.dir>/.flotilla-cache/data``. Shared storage lets one process prepare for every node.
    cache_dir: str | None = None
    #: Tokenizing processes (default: one per core, at most 8, from 20,000 rows).
    num_proc: PositiveInt | None = None

    @model_validator(mode="before")
    @classmethod
    def _sources_from_shorthand(cls, data: Any) -> Any:
        """Accept ``train: file.jsonl`` or a single mapping as shorthand for a one-item list."""
        if isinstance(data, dict):
            data = dict(data)
            for key in ("train", "validation"):
                value = data.get(key)
                if isinstance(value, str):
                    data[key] = [{"path": value}]
                elif isinstance(value, dict):
                    data[key] = [value]
        return data


class PeftSpec(Section):
    """LoRA settings, or ``method: none`` for a full fine-tune."""

    method: Literal["lora", "none"] = "lora"
    r: PositiveInt = 8
    alpha: Annotated[float, Field(gt=0.0)] = 16.0
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.05
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    modules_to_save: list[str] = Field(default_factory=list)
    init_from: str | None = Field(
        default=None, description="a PEFT adapter folder whose weights start this run"
    )
    #: FFA-LoRA (Sun et al. 2024): A stays as initialized and only B trains. Federated, every site
    #: shares the server's A, so averaging B averages the updates B·A exactly, and only B travels up.
    freeze_lora_a: bool = False


class EarlyStopping(Section):
    """Stop when ``metric`` has not improved for ``patience`` evaluations."""

    metric: str = "eval_loss"
    patience: PositiveInt = 3
    threshold: Annotated[float, Field(ge=0.0)] = 0.0
    mode: Literal["min", "max"] = "min"


class TrainSpec(Section):
    """Optimisation hyper-parameters."""

    learning_rate: Annotated[float, Field(gt=0.0, le=1.0)] = 2e-4
    scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "cosine"
    warmup_ratio: Fraction = 0.05
    warmup_steps: NonNegativeInt | None = None
    weight_decay: Annotated[float, Field(ge=0.0)] = 0.0
    max_grad_norm: Annotated[float, Field(gt=0.0)] = 1.0
    micro_batch_size: PositiveInt = 4
    global_batch_size: PositiveInt | None = None
    epochs: Annotated[float, Field(gt=0.0)] = 1.0
    max_steps: PositiveInt | None = None
    logging_steps: PositiveInt = 1
    save_steps: PositiveInt | None = None
    save_total_limit: PositiveInt = 3
    early_stopping: EarlyStopping | None = None
    optimizer: Literal["adamw_torch"] = "adamw_torch"
    #: Classification under label imbalance: training adds tau * log(label share of the training rows)
    #: to the logits (logit-adjusted loss); evaluation and the saved model use plain logits. 0 is off.
    logit_adjustment: NonNegativeFloat = 0.0
    #: Causal LM: the LM head and the cross-entropy run only on positions whose next token is a
    #: target (prompt and padding positions, whose loss is masked out, get no logits). Same loss.
    target_only_logits: bool = True


class EvalSpec(Section):
    """When and what to evaluate."""

    steps: PositiveInt | None = None
    at_start: bool = True
    metrics: list[
        Literal["loss", "perplexity", "accuracy", "precision", "recall", "f1", "auc", "rouge", "bleu"]
    ] = Field(default_factory=list)
    batch_size: PositiveInt | None = None
    generate_max_new_tokens: PositiveInt = 32


class ZeroSpec(Section):
    """DeepSpeed ZeRO settings."""

    stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: Literal["none", "cpu"] = "none"
    offload_params: Literal["none", "cpu"] = "none"


class ResourcesSpec(Section):
    """Where the job runs and with how many processes."""

    backend: Literal["local", "deepspeed", "ray", "slurm"] = "local"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    nodes: PositiveInt = 1
    processes_per_node: PositiveInt | None = None
    gpus_per_node: NonNegativeInt = 0
    workers: PositiveInt | None = None
    cpus_per_worker: PositiveInt = 1
    gpus_per_worker: NonNegativeInt = 0
    zero: ZeroSpec | None = None
    deepspeed_overrides: dict[str, Any] = Field(default_factory=dict)
    launcher: Literal["auto", "torchrun", "deepspeed"] = "auto"
    master_port: Annotated[int, Field(ge=1024, le=65535)] | None = None
    hang_timeout: NonNegativeFloat = Field(
        default=1800.0,
        description="seconds without training progress before every rank writes its stacks to "
        "<run dir>/hang/ and the job fails naming the stuck rank(s); 0 turns the watchdog off",
    )


class SlurmSpec(Section):
    """Slurm batch settings (``resources.backend: slurm`` or ``flotilla submit --backend slurm``)."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str = Field(default="01:00:00", description="time limit: MM, HH:MM:SS or D-HH:MM:SS")
    cpus_per_task: PositiveInt = 1
    mem: str | None = Field(default=None, description="memory per node: 4000 (MB), 16G, 1T")
    constraint: str | None = None
    extra_sbatch: list[str] = Field(default_factory=list, description="more sbatch options, one a line")
    setup: list[str] = Field(
        default_factory=list,
        description="shell lines run before training (module load, activate a venv); "
        "default: put the submitting interpreter first on PATH",
    )
    signal_grace_seconds: Annotated[int, Field(gt=0, le=65535)] = 120
    max_restarts: NonNegativeInt = 3
    requeue: bool = True

    #: Options Flotilla writes itself, with the spec key to use instead (None: derived, not settable).
    MANAGED_OPTIONS: ClassVar[dict[str, str | None]] = {
        "--nodes": "resources.nodes",
        "-N": "resources.nodes",
        "--ntasks": None,
        "-n": None,
        "--ntasks-per-node": None,
        "--output": None,
        "-o": None,
        "--error": None,
        "-e": None,
        "--chdir": None,
        "-D": None,
        "--signal": "slurm.signal_grace_seconds",
        "--requeue": "slurm.requeue",
        "--no-requeue": "slurm.requeue",
        "--open-mode": None,
        "--job-name": "name",
        "-J": "name",
        "--cpus-per-task": "slurm.cpus_per_task",
        "-c": "slurm.cpus_per_task",
        "--time": "slurm.time",
        "-t": "slurm.time",
        "--partition": "slurm.partition",
        "-p": "slurm.partition",
        "--account": "slurm.account",
        "-A": "slurm.account",
        "--qos": "slurm.qos",
        "-q": "slurm.qos",
        "--mem": "slurm.mem",
        "--constraint": "slurm.constraint",
        "-C": "slurm.constraint",
        "--gpus-per-node": "resources.gpus_per_node",
    }
    _TIME: ClassVar[re.Pattern[str]] = re.compile(
        r"^(?:(?P<days>\d+)-(?P<dh>\d+)(?::(?P<dm>\d+)(?::(?P<ds>\d+))?)?"
        r"|(?P<a>\d+)(?::(?P<b>\d+)(?::(?P<c>\d+))?)?)$"
    )

    @field_validator("time", mode="before")
    @classmethod
    def _time_is_slurm_time(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            raise PydanticCustomError(
                "slurm_time",
                "write the time limit as a quoted string ('30' minutes, '02:00:00', '1-00:00:00'); "
                "YAML reads an unquoted 1:30 as the number 90",
            )
        unlimited = isinstance(value, str) and value.upper() in ("UNLIMITED", "INFINITE")
        if isinstance(value, str) and not unlimited and cls.time_limit_seconds(value) is None:
            raise PydanticCustomError(
                "slurm_time",
                "not a Slurm time limit; use MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS or UNLIMITED",
            )
        return value

    @field_validator("mem", mode="before")
    @classmethod
    def _mem_is_slurm_size(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return str(value)
        if isinstance(value, str) and not re.fullmatch(r"[1-9]\d*[KMGT]?", value):
            raise PydanticCustomError(
                "slurm_mem", "not a Slurm memory size; use megabytes (4000) or a K/M/G/T suffix (16G)"
            )
        return value

    @field_validator("partition", "account", "qos", "constraint")
    @classmethod
    def _single_word(cls, value: str | None) -> str | None:
        if value is not None and (not value or re.search(r"\s", value)):
            raise PydanticCustomError("slurm_word", "must be one non-empty word (no spaces or line breaks)")
        return value

    @field_validator("extra_sbatch")
    @classmethod
    def _extra_options(cls, lines: list[str]) -> list[str]:
        cleaned = []
        for line in lines:
            option = line.removeprefix("#SBATCH").strip()
            short = re.match(r"-[A-Za-z]", option) and not option.startswith("--")
            name = option[:2] if short else re.split(r"[=\s]", option, maxsplit=1)[0]
            if "\n" in line or not option.startswith("-"):
                raise PydanticCustomError(
                    "slurm_option", "each line is one sbatch option such as '--exclusive' or '--gres=gpu:2'"
                )
            if name in cls.MANAGED_OPTIONS:
                key = cls.MANAGED_OPTIONS[name]
                raise PydanticCustomError(
                    "slurm_option",
                    "{name} is written by Flotilla; " + (f"set {key} instead" if key else "it is derived"),
                    {"name": name},
                )
            cleaned.append(option)
        return cleaned

    @classmethod
    def time_limit_seconds(cls, text: str) -> int | None:
        """Seconds in a Slurm time limit such as ``90``, ``02:00:00`` or ``1-12``; None if unlimited/invalid."""
        match = cls._TIME.match(text.strip())
        if not match:
            return None
        part = {k: int(v) for k, v in match.groupdict().items() if v is not None}
        if "days" in part:
            return part["days"] * 86400 + part["dh"] * 3600 + part.get("dm", 0) * 60 + part.get("ds", 0)
        if "c" in part:
            return part["a"] * 3600 + part["b"] * 60 + part["c"]
        return part["a"] * 60 + part.get("b", 0)


class RaySpec(Section):
    """Ray cluster settings (``resources.backend: ray``)."""

    address: str = "local"
    max_failures: NonNegativeInt = 3
    runtime_env: dict[str, Any] = Field(default_factory=dict)
    num_cpus: PositiveInt | None = None


class OutputSpec(Section):
    """Where run directories go."""

    dir: str = "runs"


class TrackingSpec(Section):
    """Experiment trackers to report to, besides metrics.jsonl (written by global rank 0 only)."""

    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(default_factory=list)
    #: The MLflow tracking server or store (default: MLflow's own, e.g. ``$MLFLOW_TRACKING_URI``).
    mlflow_uri: str | None = None
    #: The MLflow experiment (default: the job's name).
    experiment: str | None = Field(default=None, min_length=1)
    #: The tracker run's name (default: the run directory's name, its timestamp).
    run_name: str | None = Field(default=None, min_length=1)


class SweepSpec(Section):
    """What a sweep searches, what it optimises and where its trials run."""

    #: key path -> values; every combination is a trial (crossed with the random samples).
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    #: key path -> distribution; ``random`` samples of them are drawn.
    space: dict[str, str] = Field(default_factory=dict)
    random: NonNegativeInt = 0
    metric: str = "eval_loss"
    mode: Literal["min", "max"] = "min"
    backend: Literal["local", "ray", "slurm"] = "local"
    #: Trials running at once (ray: Tune's limit, default what the cluster holds; slurm: ``%K``).
    max_concurrent: PositiveInt | None = None
    scheduler: Literal["none", "asha", "median"] = "none"
    #: Seed of the random samples (default: the job's seed).
    seed: NonNegativeInt | None = None

    @field_validator("grid")
    @classmethod
    def _grid_not_empty(cls, grid: dict[str, list[Any]]) -> dict[str, list[Any]]:
        empty = [key for key, values in grid.items() if not values]
        if empty:
            raise ValueError(f"the grid of {', '.join(empty)} is empty: give at least one value")
        return grid

    @field_validator("space")
    @classmethod
    def _space_parses(cls, space: dict[str, str]) -> dict[str, str]:
        for key, text in space.items():
            try:
                parse_dimension(str(text))
            except ValueError as exc:
                raise ValueError(f"{key}: {exc}") from None
        return space

    @model_validator(mode="after")
    def _something_to_search(self) -> SweepSpec:
        if self.space and not self.random:
            raise ValueError("a space needs random: N (how many samples to draw)")
        if self.random and not self.space:
            raise ValueError("random: N needs a space to sample (key: loguniform(a,b), ...)")
        if not self.grid and not self.space:
            raise ValueError("nothing to search: give a grid or a space with random: N")
        both = set(self.grid) & set(self.space)
        if both:
            raise ValueError(f"{', '.join(sorted(both))} is in both the grid and the space")
        return self

    def dimensions(self) -> dict[str, Dimension]:
        """The parsed random dimensions."""
        return {key: parse_dimension(str(text)) for key, text in self.space.items()}


class JobSpec(Section):
    """A whole fine-tuning job."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    seed: NonNegativeInt = 42
    model: ModelSpec
    data: DataSpec
    peft: PeftSpec = Field(default_factory=PeftSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    eval: EvalSpec = Field(default_factory=EvalSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    output: OutputSpec = Field(default_factory=OutputSpec)
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    slurm: SlurmSpec | None = None
    ray: RaySpec | None = None
    #: A search over this spec's keys (``flotilla sweep``); ``flotilla run`` ignores it.
    sweep: SweepSpec | None = None

    def world_size(self) -> int:
        """Number of training processes this spec asks for."""
        res = self.resources
        if res.backend == "ray":
            return res.workers or 1
        per_node = res.processes_per_node or max(res.gpus_per_node, 1)
        return res.nodes * per_node
