"""Per-GPU memory estimate of a training job: model states per ZeRO stage and offload, LoRA or full
fine-tune, activations with and without gradient checkpointing.

Model states follow DeepSpeed's own accounting (``estimate_zero2/3_model_states_mem_needs``): with
bf16/fp16, every parameter has a 16-bit working copy; every *trainable* one also a 16-bit gradient and 16
bytes of optimizer state (fp32 master weight, fp32 gradient, Adam's two moments). ZeRO-1
partitions those 16 bytes, ZeRO-2 also the 16-bit gradients, ZeRO-3 everything (plus a gathered
working set of the largest layer). Offload moves the optimizer part (and with ``offload_params``,
the 16-bit parameters) to CPU memory. Activations count the tensors autograd keeps for the backward
pass of a Llama-style decoder (measured against autograd's saved tensors in tests/test_memory.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

GIB = 1024**3
#: Bytes of every parameter's working copy, by precision mode.
WORKING_COPY = {"mixed": 2, "fp32": 4}
#: (gradient, optimizer) bytes per trainable parameter: mixed precision keeps a 16-bit gradient and
#: fp32 master weight (4), fp32 gradient (4) and Adam's moments (8); fp32 a gradient and the moments.
PER_TRAINABLE = {"mixed": (2, 16), "fp32": (4, 8)}
#: Memory a GPU loses to the CUDA context, kernels and allocator fragmentation (kept free by --fit).
RESERVED_BYTES = int(1.5 * GIB)
#: DeepSpeed's default gradient reduce bucket (elements).
REDUCE_BUCKET = 500_000_000


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs to know about a model (see :func:`model_shape`)."""

    total_params: int
    trainable_params: int
    largest_layer_params: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    kv_size: int
    vocab_size: int
    #: Summed input width of one layer's LoRA modules with dropout (each keeps a dropped copy).
    lora_dropout_width: int = 0


@dataclass(frozen=True)
class Setup:
    """How the job runs: ZeRO, offload, precision, layout, batch and checkpointing."""

    stage: int = 0
    offload_optimizer: bool = False
    offload_params: bool = False
    precision: str = "bf16"
    gpus_per_node: int = 1
    nodes: int = 1
    micro_batch_size: int = 1
    seq_len: int = 512
    gradient_checkpointing: bool = False

    @property
    def world(self) -> int:
        return self.gpus_per_node * self.nodes


@dataclass(frozen=True)
class Estimate:
    """Bytes per GPU (``cpu_per_node``: offloaded states per node)."""

    params: int
    gradients: int
    optimizer: int
    activations: int
    buffers: int
    cpu_per_node: int

    @property
    def model_states(self) -> int:
        return self.params + self.gradients + self.optimizer

    @property
    def total(self) -> int:
        return self.model_states + self.activations + self.buffers

    def rows(self) -> list[tuple[str, int]]:
        """(component, bytes) for printing."""
        return [
            ("parameters", self.params),
            ("gradients", self.gradients),
            ("optimizer states", self.optimizer),
            ("activations", self.activations),
            ("communication buffers", self.buffers),
            ("total per GPU", self.total),
            ("offloaded to CPU, per node", self.cpu_per_node),
        ]


def estimate(shape: ModelShape, setup: Setup) -> Estimate:
    """Per-GPU memory of ``shape`` trained as ``setup``."""
    states = model_states(shape, setup)
    grad_bytes = PER_TRAINABLE[_mode(setup.precision)][0]
    trainable = shape.trainable_params
    buffers = min(REDUCE_BUCKET, trainable) * grad_bytes if setup.stage >= 1 and setup.world > 1 else 0
    return Estimate(
        params=states["params"],
        gradients=states["gradients"],
        optimizer=states["optimizer"],
        activations=activation_bytes(shape, setup),
        buffers=buffers,
        cpu_per_node=states["cpu"] * setup.gpus_per_node,
    )


def model_states(shape: ModelShape, setup: Setup) -> dict[str, int]:
    """Bytes of parameters, gradients and optimizer states on one GPU, and offloaded per rank."""
    world, stage = setup.world, setup.stage
    mode = _mode(setup.precision)
    grad_bytes, optimizer_bytes = PER_TRAINABLE[mode]
    gathered = 4 * shape.largest_layer_params if stage == 3 else 0
    params = WORKING_COPY[mode] * shape.total_params
    grads = grad_bytes * shape.trainable_params
    optimizer = optimizer_bytes * shape.trainable_params
    if stage >= 1:
        optimizer //= world
    if stage >= 2:
        grads //= world
    if stage == 3:
        params //= world
    cpu = 0
    if setup.offload_optimizer and stage >= 1:
        cpu += optimizer + (grads if stage >= 2 else 0)
        optimizer, grads = 0, (grads if stage == 1 else 0)
    if setup.offload_params and stage == 3:
        cpu, params = cpu + params, 0
    return {"params": params + gathered, "gradients": grads, "optimizer": optimizer, "cpu": cpu}


def activation_bytes(shape: ModelShape, setup: Setup) -> int:
    """Peak activation memory of one micro batch: what autograd keeps, plus the layer recomputed
    under gradient checkpointing, plus the logits and their gradient while the loss is computed."""
    tokens = setup.micro_batch_size * setup.seq_len
    size = _activation_size(setup)
    recomputed = _per_layer(shape, setup) if setup.gradient_checkpointing else 0
    return saved_activation_bytes(shape, setup) + recomputed + tokens * shape.vocab_size * (size + 4)


def saved_activation_bytes(shape: ModelShape, setup: Setup) -> int:
    """Bytes of the tensors autograd keeps for the backward pass after the forward pass."""
    tokens = setup.micro_batch_size * setup.seq_len
    size = _activation_size(setup)
    if setup.gradient_checkpointing:
        layers = shape.num_layers * tokens * size * shape.hidden_size  # only each layer's input
    else:
        layers = shape.num_layers * _per_layer(shape, setup)
    log_softmax = tokens * shape.vocab_size * 4  # the loss is computed in fp32
    return layers + log_softmax + 2 * tokens * size * shape.hidden_size


#: Tensors (in units of the hidden, key/value and MLP widths) one decoder layer keeps per token.
LAYER_HIDDEN, LAYER_KV, LAYER_MLP = 8, 4, 4


def _per_layer(shape: ModelShape, setup: Setup) -> int:
    """Bytes one decoder layer keeps for its backward pass (LoRA dropout copies and masks included)."""
    tokens = setup.micro_batch_size * setup.seq_len
    size = _activation_size(setup)
    h, i, kv = shape.hidden_size, shape.intermediate_size, shape.kv_size
    width = LAYER_HIDDEN * h + LAYER_KV * kv + LAYER_MLP * i
    return tokens * (size * width + (size + 1) * shape.lora_dropout_width)


def _activation_size(setup: Setup) -> int:
    return 2 if _mode(setup.precision) == "mixed" else 4


def _mode(precision: str) -> str:
    return "fp32" if precision == "fp32" else "mixed"


def model_shape(
    config: Any, trainable_params: int, total_params: int, largest_layer: int, lora_dropout_width: int = 0
) -> ModelShape:
    """A :class:`ModelShape` from a transformers config and parameter counts."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return ModelShape(
        total_params=total_params,
        trainable_params=trainable_params,
        largest_layer_params=largest_layer,
        hidden_size=config.hidden_size,
        intermediate_size=getattr(config, "intermediate_size", 4 * config.hidden_size),
        num_layers=config.num_hidden_layers,
        kv_size=kv_heads * head_dim,
        vocab_size=config.vocab_size,
        lora_dropout_width=lora_dropout_width,
    )


def parameter_counts(model: Any) -> tuple[int, int, int]:
    """(trainable, total, largest layer) parameter counts, tied weights counted once."""
    unique = {id(p): p for p in model.parameters()}
    total = sum(p.numel() for p in unique.values())
    trainable = sum(p.numel() for p in unique.values() if p.requires_grad)
    largest = max((sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()), default=0)
    return trainable, total, largest


def format_bytes(value: int) -> str:
    """``12.30 GiB`` / ``456 MiB`` / ``32 KiB``."""
    if value >= GIB:
        return f"{value / GIB:.2f} GiB"
    if value >= 1024**2:
        return f"{value / 1024**2:.0f} MiB"
    return f"{value / 1024:.0f} KiB"


def parse_size(text: str) -> int:
    """``80GiB``, ``80GB``, ``81920MiB``, ``80`` (GiB) → bytes."""
    units = {"": GIB, "gib": GIB, "gb": 10**9, "mib": 1024**2, "mb": 10**6, "tib": 1024**4, "g": GIB}
    cleaned = text.strip().lower().replace(" ", "")
    number = cleaned.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = cleaned[len(number) :]
    if unit not in units or not number:
        raise ValueError(f"cannot read a memory size from {text!r} (e.g. 80GiB, 40GB, 24576MiB)")
    return int(float(number) * units[unit])
