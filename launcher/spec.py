"""The job spec: pydantic models (``extra="forbid"`` everywhere) and their cross-field rules."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

PositiveInt = Annotated[int, Field(gt=0)]
NonNegativeInt = Annotated[int, Field(ge=0)]
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
    max_train_rows: PositiveInt | None = None
    max_validation_rows: PositiveInt | None = None

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


class SlurmSpec(Section):
    """Slurm batch settings (``resources.backend: slurm`` or ``flotilla submit --backend slurm``)."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str = "01:00:00"
    cpus_per_task: PositiveInt = 1
    mem: str | None = None
    constraint: str | None = None
    extra_sbatch: list[str] = Field(default_factory=list)
    setup: list[str] = Field(default_factory=list)
    signal_grace_seconds: PositiveInt = 120
    max_restarts: NonNegativeInt = 3
    requeue: bool = True


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
    """Experiment trackers to report to, besides metrics.jsonl."""

    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(default_factory=list)


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

    def world_size(self) -> int:
        """Number of training processes this spec asks for."""
        res = self.resources
        if res.backend == "ray":
            return res.workers or 1
        per_node = res.processes_per_node or max(res.gpus_per_node, 1)
        return res.nodes * per_node
