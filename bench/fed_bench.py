"""Federated costs: bytes per round per site on the wire, and the time to aggregate many sites.

Bytes: the real SmolLM2-135M-Instruct with Flotilla's default LoRA (r 8, all linear layers); the
adapter goes into a Flower (flwr 1.41) ``ArrayRecord`` inside a ``Message``, the server's train
instruction one way and the site's reply the other. Flower 1.41 sends a message as a tree of objects
(message, record dict, records, arrays, 5 MB array chunks), each pushed with a ``PushObjectRequest``;
the bytes counted here are those requests' protobuf sizes plus the message's object tree, i.e. all
of Flower's own framing, without gRPC/HTTP-2/TLS headers.

Aggregation: ``federated/aggregation.py`` on 100 sites' adapters of that shape (the real adapter plus
a different random perturbation per site): update validation, FedAvg, and the LoRA-aware product
average.

SmolLM2 q/v aggregation (no model needed): 100 sites' independent random LoRA factors of
SmolLM2-135M's shapes (r 8 on q_proj 576->576 and v_proj 576->192, 30 layers; a flat spectrum, the
slow case for a truncated SVD): FedAvg, the LoRA-product average (top-rank triplets on the factors),
and the previous implementation of it (dense SVD of every ΔW) for the ratio and an accuracy check.

With ``--compare-to REV`` the LoRA-product average of ``federated/strategy/aggregation.py`` as it
was at git revision REV is timed too, alternating call by call with the current one in the same
process (so both see the same machine load), and the largest difference between their products is
reported.

    python bench/fed_bench.py [--sites 100] [--repeats 3] [--json out.json] [--qv-only] [--compare-to REV]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

MODEL_ALIAS = "smollm2-135m-instruct"
BYTES_GOAL = 1.05
AGGREGATION_GOAL_S = 1.0


def adapter_and_full_size(seed: int) -> tuple[dict[str, Any], int, int]:
    """A trained-looking adapter (torch tensors), its safetensors file size, and the full weights' bytes."""
    import torch
    from peft import get_peft_model_state_dict

    from launcher.model.load import apply_peft, load_model
    from launcher.spec.models import ModelSpec, PeftSpec

    torch.manual_seed(seed)
    base = load_model(ModelSpec(path=MODEL_ALIAS))
    unique = {t.data_ptr(): t for t in base.state_dict().values()}
    full_bytes = sum(t.numel() * t.element_size() for t in unique.values())
    model = apply_peft(base, PeftSpec(), "causal_lm")
    with torch.no_grad():  # lora_B starts at zero; a trained adapter does not (and zeros would dedupe)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 1e-3)
    state = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()}
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder, safe_serialization=True)
        file_bytes = (Path(folder) / "adapter_model.safetensors").stat().st_size
    return state, file_bytes, full_bytes


def wire_bytes(message: Any) -> dict[str, int]:
    """What Flower 1.41 pushes for ``message``: one PushObjectRequest per object, plus the object tree."""
    from flwr.proto.message_pb2 import PushObjectRequest
    from flwr.proto.node_pb2 import Node
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree

    objects = get_all_nested_objects(message)
    node = Node(node_id=2**62)
    requests = sum(
        PushObjectRequest(
            node=node, run_id=2**62, object_id=object_id, object_content=obj.deflate()
        ).ByteSize()
        for object_id, obj in objects.items()
    )
    tree = get_object_tree(message).ByteSize()
    return {"objects": len(objects), "bytes": requests + tree}


def round_messages(state: dict[str, Any]) -> tuple[Any, Any]:
    """The server's train instruction to one site, and that site's reply, as a ServerApp/ClientApp build them."""
    from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    # What a running ServerApp process has set (64-bit ids, as Flower draws them).
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 2**62 + 1, 1, 2**62 + 3
    instruction = Message(
        RecordDict(
            {
                "arrays": ArrayRecord(state),
                "config": ConfigRecord({"server-round": 1, "local-steps": 20, "learning-rate": 2e-4}),
            }
        ),
        dst_node_id=2**62,
        message_type="train",
        group_id="1",
    )
    instruction.metadata.__dict__["_message_id"] = instruction.object_id
    reply = Message(
        RecordDict(
            {
                "arrays": ArrayRecord(state),
                "metrics": MetricRecord({"num-examples": 150, "train_loss": 0.61, "eval_loss": 0.72}),
                "site": ConfigRecord({"name": "site_a"}),
            }
        ),
        reply_to=instruction,
    )
    return instruction, reply


def timed(function: Callable[[], Any], repeats: int) -> dict[str, list[float]]:
    """Wall and CPU seconds of each of ``repeats`` calls (CPU time is robust to a busy machine)."""
    return timed_alternating({"": function}, repeats)[""]


def timed_alternating(
    functions: dict[str, Callable[[], Any]], repeats: int
) -> dict[str, dict[str, list[float]]]:
    """``timed`` for several functions, called in turn ``repeats`` times (old vs new under one load)."""
    clocks: dict[str, dict[str, list[float]]] = {name: {"wall": [], "cpu": []} for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            function()
            clocks[name]["wall"].append(time.perf_counter() - start)
            clocks[name]["cpu"].append(time.process_time() - start_cpu)
    return clocks


def aggregation_at(revision: str) -> ModuleType:
    """``federated/strategy/aggregation.py`` as committed at git ``revision``, loaded as a module."""
    root = Path(__file__).resolve().parents[1]
    path = "federated/strategy/aggregation.py"
    source = subprocess.run(
        ["git", "show", f"{revision}:{path}"], cwd=root, capture_output=True, text=True, check=True
    ).stdout
    module = ModuleType(f"aggregation_at_{revision}")
    sys.modules[module.__name__] = module  # dataclasses look their module up there
    exec(compile(source, f"{revision}:{path}", "exec"), module.__dict__)
    return module


def max_product_difference(got: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> float:
    """Largest relative Frobenius distance between the two adapters' B A, over LoRA modules."""
    from federated.strategy.aggregation import lora_pairs

    worst = 0.0
    for a_key, b_key in lora_pairs(got).values():
        mine = got[b_key].astype(np.float64) @ got[a_key].astype(np.float64)
        theirs = ref[b_key].astype(np.float64) @ ref[a_key].astype(np.float64)
        worst = max(worst, float(np.linalg.norm(mine - theirs) / np.linalg.norm(theirs)))
    return worst


def aggregation_times(
    reference: dict[str, np.ndarray], sites: int, repeats: int, seed: int, previous: ModuleType | None = None
) -> tuple[dict[str, dict[str, list[float]]], float | None]:
    """Seconds to validate and aggregate ``sites`` updates of the reference adapter's shape; with
    ``previous`` (an older aggregation module) its LoRA-product average too, alternating with the
    current one, and the largest relative difference between their products (else ``None``)."""
    from federated.strategy.aggregation import Update, fedavg, lora_product_average, validate_updates

    rng = np.random.default_rng(seed)
    updates = [
        Update(
            f"site-{i}",
            {k: v + rng.standard_normal(v.shape, dtype=np.float32) * 1e-3 for k, v in reference.items()},
            int(rng.integers(50, 500)),
        )
        for i in range(sites)
    ]
    rank = next(v.shape[0] for k, v in reference.items() if ".lora_A." in k)
    times = {
        "validate_updates": timed(lambda: validate_updates(updates, reference), repeats),
        "fedavg": timed(lambda: fedavg(updates), repeats),
    }
    new: dict[str, np.ndarray] = {}
    old: dict[str, np.ndarray] = {}
    products = {"lora_product_average": lambda: new.update(lora_product_average(updates, rank))}
    if previous is not None:
        products["lora_product_average (previous)"] = lambda: old.update(
            previous.lora_product_average(updates, rank)
        )
    times.update(timed_alternating(products, repeats))
    return times, (max_product_difference(new, old) if previous is not None else None)


#: SmolLM2-135M: hidden size 576, 3 key/value heads of 64, 30 layers.
QV_SHAPES = {"q_proj": (576, 576), "v_proj": (192, 576)}
QV_LAYERS = 30


def qv_updates(sites: int, seed: int, rank: int = 8) -> list[Any]:
    """``sites`` updates with independent random LoRA factors on SmolLM2-135M's q_proj and v_proj."""
    from federated.strategy.aggregation import Update

    rng = np.random.default_rng(seed)
    updates = []
    for i in range(sites):
        arrays = {}
        for layer in range(QV_LAYERS):
            for name, (out_dim, in_dim) in QV_SHAPES.items():
                prefix = f"base_model.model.model.layers.{layer}.self_attn.{name}"
                a = rng.standard_normal((rank, in_dim), dtype=np.float32) / np.float32(np.sqrt(in_dim))
                arrays[f"{prefix}.lora_A.weight"] = a
                arrays[f"{prefix}.lora_B.weight"] = (
                    rng.standard_normal((out_dim, rank), dtype=np.float32) * 1e-3
                )
        updates.append(Update(f"site-{i}", arrays, int(rng.integers(50, 500))))
    return updates


def dense_product_average(updates: list[Any], rank: int) -> dict[str, np.ndarray]:
    """The LoRA-product average as implemented before the truncated solver: ΔW formed per module
    (stacked by concatenation) and a full dense SVD of it (QR core when the stacked rank is small)."""
    from federated.strategy import aggregation as agg

    weights = agg._weights(updates)
    keys = agg._check_same_keys(updates)
    factors = agg._site_factors(updates, weights, None, 1.0)
    pairs = agg.lora_pairs(keys)
    result = {key: agg._weighted_mean(updates, key, weights) for key in agg._plain_keys(keys, pairs)}
    for a_key, b_key in pairs.values():
        b_cat = np.concatenate(
            [f * np.asarray(u.arrays[b_key], np.float64) for u, f in zip(updates, factors, strict=True)], 1
        )
        a_cat = np.concatenate([np.asarray(u.arrays[a_key], np.float64) for u in updates], 0)
        u, s, vt = agg.exact_triplets(b_cat, a_cat)
        root = np.sqrt(s[:rank])
        result[b_key] = (u[:, :rank] * root).astype(np.float32)
        result[a_key] = (root[:, None] * vt[:rank]).astype(np.float32)
    return {key: result[key] for key in keys}


def qv_aggregation(sites: int, repeats: int, seed: int, previous: ModuleType | None = None) -> dict[str, Any]:
    """Seconds of FedAvg, the LoRA-product average and its dense predecessor on SmolLM2 q/v updates,
    how far the two products are apart (relative Frobenius, worst module), and how far the ratio of
    their errors ||ΔW - B A||_F is from 1 (worst module; the dense one is the Eckart-Young optimum)."""
    from federated.strategy.aggregation import fedavg, lora_pairs, lora_product_average

    rank = 8
    updates = qv_updates(sites, seed, rank)
    new: dict[str, np.ndarray] = {}
    old: dict[str, np.ndarray] = {}
    before: dict[str, np.ndarray] = {}
    functions = {
        "fedavg": lambda: fedavg(updates),
        "lora_product_average": lambda: new.update(lora_product_average(updates, rank)),
        "dense_product_average": lambda: old.update(dense_product_average(updates, rank)),
    }
    if previous is not None:
        functions["lora_product_average (previous)"] = lambda: before.update(
            previous.lora_product_average(updates, rank)
        )
    times = timed_alternating(functions, repeats)
    total = sum(u.num_examples for u in updates)
    worst_gap, worst_error_deviation = 0.0, 0.0
    for a_key, b_key in lora_pairs(new).values():
        got = new[b_key].astype(np.float64) @ new[a_key].astype(np.float64)
        ref = old[b_key].astype(np.float64) @ old[a_key].astype(np.float64)
        worst_gap = max(worst_gap, float(np.linalg.norm(got - ref) / np.linalg.norm(ref)))
        delta = sum(
            u.num_examples / total * (u.arrays[b_key].astype(np.float64) @ u.arrays[a_key].astype(np.float64))
            for u in updates
        )
        ratio = float(np.linalg.norm(delta - got) / np.linalg.norm(delta - ref))
        worst_error_deviation = max(worst_error_deviation, abs(ratio - 1))
    return {
        "modules": len(lora_pairs(new)),
        "rank": rank,
        "seconds": times,
        "vs_dense_product_max_relative_difference": worst_gap,
        "error_over_dense_error_max_deviation": worst_error_deviation,
        "vs_previous_max_relative_difference": max_product_difference(new, before) if before else None,
    }


def wait_until_idle(pattern: str, poll_s: float, max_wait_s: float) -> bool:
    """Poll ``pgrep -f pattern`` until it finds nothing but this process and its parents (whose
    command lines hold the pattern); False if still busy after ``max_wait_s``."""
    import subprocess

    import psutil

    me = psutil.Process()
    own = {me.pid, *(parent.pid for parent in me.parents())}
    deadline = time.monotonic() + max_wait_s
    while True:
        found = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()
        if not {int(pid) for pid in found} - own:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll_s)


def print_times(label: str, clocks: dict[str, list[float]]) -> None:
    """One line: wall min/median/max against the 1 s goal, and median CPU seconds."""
    wall, cpu = clocks["wall"], clocks["cpu"]
    met = "yes" if statistics.median(wall) < AGGREGATION_GOAL_S else "NO"
    print(
        f"{label}: wall {min(wall):.3f} / {statistics.median(wall):.3f} / "
        f"{max(wall):.3f} s (min/median/max; goal < {AGGREGATION_GOAL_S:g} s: {met}), "
        f"CPU median {statistics.median(cpu):.3f} s"
    )


def main(argv: list[str] | None = None) -> int:
    """Measure and print; ``--json`` also writes every number."""
    parser = argparse.ArgumentParser(description="bytes per round per site, and aggregation time")
    parser.add_argument("--sites", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--blas-threads",
        type=int,
        default=1,
        help="BLAS threads while aggregating (default 1: on a busy machine more threads spin-wait)",
    )
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--qv-only", action="store_true", help="only the SmolLM2 q/v aggregation (no model, no Flower)"
    )
    parser.add_argument(
        "--compare-to",
        metavar="REV",
        help="also time the LoRA-product average of federated/strategy/aggregation.py at git REV, "
        "alternating with the current one",
    )
    parser.add_argument(
        "--wait-idle",
        metavar="PATTERN",
        help="before timing, wait (poll 20 s, at most 15 min) until `pgrep -f PATTERN` finds nothing",
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

    idle = None
    if args.wait_idle:
        idle = wait_until_idle(args.wait_idle, 20.0, 900.0)
        if not idle:
            print(f"still busy after 15 min (pgrep -f {args.wait_idle!r} matches): measuring anyway")
    previous = aggregation_at(args.compare_to) if args.compare_to else None
    load_at_start = os.getloadavg()
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in load_at_start)}")
    with threadpool_limits(args.blas_threads):
        qv = qv_aggregation(args.sites, args.repeats, args.seed, previous)
    qv_seconds = qv["seconds"]
    ratio = statistics.median(qv_seconds["dense_product_average"]["wall"]) / statistics.median(
        qv_seconds["lora_product_average"]["wall"]
    )
    qv["dense_over_lora_product_average"] = ratio
    label = f"of {args.sites} sites, SmolLM2-135M q/v (r 8, {qv['modules']} modules, random factors)"
    print_times(f"FedAvg {label}", qv_seconds["fedavg"])
    print_times(f"LoRA-product average {label}", qv_seconds["lora_product_average"])
    print_times(
        f"dense LoRA-product average (before the truncated solver) {label}",
        qv_seconds["dense_product_average"],
    )
    if previous is not None:
        print_times(
            f"LoRA-product average at {args.compare_to} {label}",
            qv_seconds["lora_product_average (previous)"],
        )
        print(
            f"products differ from {args.compare_to}'s by at most {qv['vs_previous_max_relative_difference']:.1e}"
        )
    print(
        f"dense / truncated: {ratio:.1f}x; products differ by at most "
        f"{qv['vs_dense_product_max_relative_difference']:.1e} (relative Frobenius, worst module), "
        f"|error / dense (optimal) error - 1| <= {qv['error_over_dense_error_max_deviation']:.1e}"
    )
    qv_results = {
        "sites": args.sites,
        "blas_threads": args.blas_threads,
        "compare_to": args.compare_to,
        "qv_aggregation": qv,
        "waited_until_idle": idle,
        "load_average_at_start": load_at_start,
        "load_average": os.getloadavg(),
    }
    if args.qv_only:
        if args.json:
            args.json.write_text(json.dumps(qv_results, indent=2))
        return 0

    state, file_bytes, full_bytes = adapter_and_full_size(args.seed)
    arrays = {k: v.numpy() for k, v in state.items()}
    adapter_bytes = int(sum(a.nbytes for a in arrays.values()))
    instruction, reply = round_messages(state)
    down, up = wire_bytes(instruction), wire_bytes(reply)
    with threadpool_limits(args.blas_threads):
        times, vs_previous = aggregation_times(arrays, args.sites, args.repeats, args.seed, previous)
    results = {
        "adapter_tensors": len(arrays),
        "adapter_parameters": int(sum(a.size for a in arrays.values())),
        "adapter_bytes": adapter_bytes,
        "adapter_safetensors_bytes": file_bytes,
        "full_weight_bytes": full_bytes,
        "down": {**down, "vs_adapter": down["bytes"] / adapter_bytes, "vs_full": down["bytes"] / full_bytes},
        "up": {**up, "vs_adapter": up["bytes"] / adapter_bytes, "vs_full": up["bytes"] / full_bytes},
        "sites": args.sites,
        "blas_threads": args.blas_threads,
        "aggregation_seconds": times,
        "compare_to": args.compare_to,
        "lora_product_vs_previous_max_relative_difference": vs_previous,
        "qv_aggregation": qv,
        "waited_until_idle": idle,
        "load_average_at_start": load_at_start,
        "load_average": os.getloadavg(),
    }
    mib = 2**20
    print(
        f"adapter: {len(arrays)} tensors, {results['adapter_parameters']:,} parameters, "
        f"{adapter_bytes / mib:.2f} MiB float32 (safetensors file {file_bytes / mib:.2f} MiB); "
        f"full weights {full_bytes / mib:.1f} MiB"
    )
    for name in ("down", "up"):
        row = results[name]
        met = "yes" if row["vs_adapter"] <= BYTES_GOAL else "NO"
        print(
            f"bytes per round per site, {name:>4}: {row['bytes']:,} B in {row['objects']} objects = "
            f"{row['vs_adapter']:.4f}x the adapter (goal <= {BYTES_GOAL}x: {met}), "
            f"{row['vs_full']:.4f}x full weights"
        )
    for name, clocks in times.items():
        print_times(
            f"{name.replace('previous', args.compare_to or 'previous')} of {args.sites} sites", clocks
        )
    if vs_previous is not None:
        print(f"products differ from {args.compare_to}'s by at most {vs_previous:.1e} (relative Frobenius)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
