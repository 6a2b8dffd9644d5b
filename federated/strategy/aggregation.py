"""Pure aggregation and validation of LoRA adapter updates (no Flower imports).

Every function works on adapter state dicts ``dict[str, np.ndarray]`` keyed the way
PEFT names them, e.g. ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``
(``[r, in]``) and ``...q_proj.lora_B.weight`` (``[out, r]``). Keys that are not part
of a ``lora_A``/``lora_B`` pair (``modules_to_save`` heads, biases, ...) are treated as
plain arrays. Arithmetic is done in float64; results are returned as float32.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from scipy.sparse.linalg import LinearOperator, svds
from threadpoolctl import threadpool_limits

Arrays = dict[str, np.ndarray]

_LORA_KEY = re.compile(r"^(?P<prefix>.+)\.lora_(?P<side>[AB])(?P<suffix>(?:\.[^.]+)?\.weight)$")


@dataclass
class Update:
    """One site's adapter state after local training in a round."""

    site_id: str
    arrays: dict[str, np.ndarray]
    num_examples: int


@dataclass(frozen=True)
class Rejection:
    """Why an update was left out of aggregation."""

    site_id: str
    reason: str


# --------------------------------------------------------------------------- keys


def lora_pairs(keys: Iterable[str]) -> dict[str, tuple[str, str]]:
    """Map each LoRA module prefix to its ``(lora_A key, lora_B key)``.

    Keys that are not ``<prefix>.lora_A[.<adapter>].weight`` /
    ``<prefix>.lora_B[.<adapter>].weight`` are ignored (the caller averages them
    plainly). Raises ``ValueError`` for a half pair or a prefix seen twice.
    """
    halves: dict[tuple[str, str], dict[str, str]] = {}
    for key in keys:
        match = _LORA_KEY.match(key)
        if match:
            slot = halves.setdefault((match["prefix"], match["suffix"]), {})
            slot[match["side"]] = key
    pairs: dict[str, tuple[str, str]] = {}
    for (prefix, _suffix), slot in halves.items():
        if set(slot) != {"A", "B"}:
            raise ValueError(f"unpaired LoRA key(s) for module {prefix!r}: {sorted(slot.values())}")
        if prefix in pairs:
            raise ValueError(f"module {prefix!r} has LoRA weights for several adapters")
        pairs[prefix] = (slot["A"], slot["B"])
    return pairs


def _plain_keys(keys: Iterable[str], pairs: Mapping[str, tuple[str, str]]) -> list[str]:
    """Keys that are not part of any LoRA pair, in their original order."""
    paired = {key for pair in pairs.values() for key in pair}
    return [key for key in keys if key not in paired]


def _rank_axes(pairs: Mapping[str, tuple[str, str]]) -> dict[str, int]:
    """Axis holding the LoRA rank for each paired key: 0 for A, 1 for B."""
    axes = {a_key: 0 for a_key, _ in pairs.values()}
    axes.update({b_key: 1 for _, b_key in pairs.values()})
    return axes


# --------------------------------------------------------------------- validation


def _shape_ok(got: tuple[int, ...], want: tuple[int, ...], rank_axis: int | None) -> bool:
    """True when shapes match, except on ``rank_axis`` (if given)."""
    if len(got) != len(want):
        return False
    return all(g == w or i == rank_axis for i, (g, w) in enumerate(zip(got, want, strict=True)))


def _structural_problem(
    update: Update,
    reference: Mapping[str, np.ndarray],
    pairs: Mapping[str, tuple[str, str]],
    allow_rank_mismatch: bool,
) -> str | None:
    """First problem found with keys, counts, dtypes, shapes or values, or ``None``."""
    site, arrays = update.site_id, update.arrays
    rank_axes = _rank_axes(pairs) if allow_rank_mismatch else {}
    if update.num_examples <= 0:
        return f"site {site!r}: num_examples must be positive, got {update.num_examples}"
    missing = [key for key in reference if key not in arrays]
    if missing:
        return f"site {site!r}: missing key {missing[0]!r} ({len(missing)} missing)"
    extra = [key for key in arrays if key not in reference]
    if extra:
        return f"site {site!r}: unexpected key {extra[0]!r} ({len(extra)} extra)"
    for key, ref in reference.items():
        arr = np.asarray(arrays[key])
        if not _shape_ok(arr.shape, ref.shape, rank_axes.get(key)):
            shapes = f"shape {arr.shape}, expected {ref.shape}"
            return f"site {site!r}: key {key!r} has {shapes}"
        if arr.dtype.kind != "f":
            return f"site {site!r}: key {key!r} has non-float dtype {arr.dtype}"
        if not np.isfinite(arr).all():
            return f"site {site!r}: key {key!r} contains NaN or Inf"
    for a_key, b_key in pairs.values():
        if np.shape(arrays[a_key])[0] != np.shape(arrays[b_key])[1]:
            return f"site {site!r}: key {a_key!r} and {b_key!r} disagree on the LoRA rank"
    return None


#: How much each accepted update counts in a weighted average (``weighting`` in the federation spec).
WEIGHTINGS = ("examples", "uniform", "capped")


def weigh_updates(
    updates: Sequence[Update],
    weighting: str,
    max_examples: int | Mapping[str, int] | None = None,
    over_cap: str = "clip",
) -> tuple[list[Update], list[Rejection], dict[str, str]]:
    """The weight every update counts with: its claimed ``num_examples`` (``examples``), 1
    (``uniform``), or the claim capped (``capped``) at the site's ``max_examples`` (one number for
    every site, or per site), else at the median claim of the round.

    A claim over its cap is clipped to it, or with ``over_cap="reject"`` the update is rejected.
    Returns the updates with their weights as ``num_examples``, the rejections, and a note per
    site whose claim was changed.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    if weighting == "examples":
        return list(updates), [], {}
    if weighting == "uniform":
        return [Update(u.site_id, u.arrays, 1) for u in updates], [], {}
    median = int(np.median([u.num_examples for u in updates])) if updates else 0
    kept: list[Update] = []
    rejected: list[Rejection] = []
    notes: dict[str, str] = {}
    for update in updates:
        cap = _cap_of(update.site_id, max_examples, median)
        if update.num_examples <= cap:
            kept.append(update)
            continue
        claim = f"site {update.site_id!r} claimed {update.num_examples} examples, over its cap of {cap}"
        if over_cap == "reject":
            rejected.append(Rejection(update.site_id, f"{claim} (over_cap: reject)"))
            continue
        notes[update.site_id] = f"{claim}: weighted as {cap}"
        kept.append(Update(update.site_id, update.arrays, cap))
    return kept, rejected, notes


def _cap_of(site: str, max_examples: int | Mapping[str, int] | None, median: int) -> int:
    if isinstance(max_examples, int):
        return max_examples
    if max_examples is not None and site in max_examples:
        return int(max_examples[site])
    return max(median, 1)


def _squared_norms(
    arrays: Mapping[str, np.ndarray],
    reference: Mapping[str, np.ndarray],
    pairs: Mapping[str, tuple[str, str]],
    product_space: bool,
) -> dict[str, float]:
    """Squared L2 norm of ``arrays - reference`` per key (or per module, products)."""
    out: dict[str, float] = {}
    plain = _plain_keys(reference, pairs) if product_space else list(reference)
    for key in plain:
        diff = np.asarray(arrays[key], np.float64) - np.asarray(reference[key], np.float64)
        out[key] = float(np.vdot(diff, diff))
    if product_space:
        for prefix, (a_key, b_key) in pairs.items():
            delta = _product(arrays[b_key], arrays[a_key]) - _product(reference[b_key], reference[a_key])
            out[prefix] = float(np.vdot(delta, delta))
    return out


def validate_updates(
    updates: Sequence[Update],
    reference: Mapping[str, np.ndarray],
    norm_factor: float = 10.0,
    max_norm: float | None = None,
    allow_rank_mismatch: bool = False,
) -> tuple[list[Update], list[Rejection]]:
    """Split a round's updates into accepted ones and rejections.

    Rejected: non-positive ``num_examples``, a repeated ``site_id``, missing or extra
    keys vs ``reference``, wrong shapes, non-float dtypes, NaN/Inf values, and
    outliers. The update norm is the L2 norm of ``arrays - reference`` over all keys.
    With at least 3 structurally valid updates, one whose norm exceeds
    ``norm_factor`` x their median norm is rejected (skipped when the median is 0);
    ``max_norm``, when given, is an absolute cap applied to every update (it is the
    only norm check with fewer than 3 updates).

    With ``allow_rank_mismatch=True`` (heterogeneous LoRA ranks) only the rank axis of
    ``lora_A``/``lora_B`` may differ from the reference, and the norm of each LoRA
    module is taken on the unscaled product, ``||B A - B_ref A_ref||_F``, since
    factors of different ranks cannot be subtracted.
    """
    pairs = lora_pairs(reference)
    candidates: list[Update] = []
    rejections: list[Rejection] = []
    seen: set[str] = set()
    for update in updates:
        if update.site_id in seen:
            rejections.append(Rejection(update.site_id, f"site {update.site_id!r}: duplicate update"))
            continue
        seen.add(update.site_id)
        problem = _structural_problem(update, reference, pairs, allow_rank_mismatch)
        if problem:
            rejections.append(Rejection(update.site_id, problem))
        else:
            candidates.append(update)

    parts = [_squared_norms(u.arrays, reference, pairs, allow_rank_mismatch) for u in candidates]
    norms = [float(np.sqrt(sum(p.values()))) for p in parts]
    limit, rule = _norm_limit(norms, norm_factor, max_norm)
    accepted: list[Update] = []
    for update, norm, part in zip(candidates, norms, parts, strict=True):
        if limit is not None and norm > limit:
            worst = max(part, key=part.__getitem__)
            reason = (
                f"site {update.site_id!r}: update norm {norm:.4g} exceeds {rule}"
                f" = {limit:.4g} (largest contribution from key {worst!r})"
            )
            rejections.append(Rejection(update.site_id, reason))
        else:
            accepted.append(update)
    return accepted, rejections


def _norm_limit(
    norms: Sequence[float], norm_factor: float, max_norm: float | None
) -> tuple[float | None, str]:
    """Norm threshold for this round and a description of the rule that set it."""
    limit: float | None = None
    rule = ""
    if len(norms) >= 3:
        median = float(np.median(norms))
        if median > 0:
            limit, rule = (
                norm_factor * median,
                f"{norm_factor:g} x median norm {median:.4g}",
            )
    if max_norm is not None and (limit is None or max_norm < limit):
        limit, rule = max_norm, "max_norm"
    return limit, rule


# -------------------------------------------------------------------- aggregation


def _weights(updates: Sequence[Update]) -> np.ndarray:
    """Normalized ``num_examples`` weights (float64)."""
    if not updates:
        raise ValueError("no updates to aggregate")
    counts = np.array([u.num_examples for u in updates], dtype=np.float64)
    if (counts < 0).any() or counts.sum() <= 0:
        raise ValueError(f"num_examples must be non-negative with a positive sum, got {counts}")
    return counts / counts.sum()


def _weighted_mean(updates: Sequence[Update], key: str, weights: np.ndarray) -> np.ndarray:
    """Weighted mean of one key across updates, as float32."""
    shapes = {np.shape(u.arrays[key]) for u in updates}
    if len(shapes) != 1:
        raise ValueError(f"key {key!r} has differing shapes across updates: {sorted(shapes)}")
    acc = np.zeros(shapes.pop(), dtype=np.float64)
    for update, weight in zip(updates, weights, strict=True):
        acc += weight * np.asarray(update.arrays[key], dtype=np.float64)
    return acc.astype(np.float32)


def _check_same_keys(updates: Sequence[Update]) -> list[str]:
    """The common key list (first update's order); ``ValueError`` if sites differ."""
    keys = list(updates[0].arrays)
    for update in updates[1:]:
        if set(update.arrays) != set(keys):
            raise ValueError(f"site {update.site_id!r} has a different key set")
    return keys


def fedavg(updates: Sequence[Update]) -> Arrays:
    """Average every array, weighted by ``num_examples`` (FedAvg); returns float32."""
    weights = _weights(updates)
    return {key: _weighted_mean(updates, key, weights) for key in _check_same_keys(updates)}


def _product(b: np.ndarray, a: np.ndarray) -> np.ndarray:
    """``B @ A`` in float64."""
    return np.asarray(b, dtype=np.float64) @ np.asarray(a, dtype=np.float64)


#: Stacked rank-1 terms per wanted direction above which the top triplets are found iteratively.
#: Below it an exact decomposition costs about as much as the Krylov space a solver would build
#: (576 x 576, rank 8: QR core 2.1 ms vs PROPACK 2.1 ms at 64 terms, 25 vs 5 ms at 256).
_ITERATIVE_TERMS_PER_RANK = 8


def _truncated_factors(b_cat: np.ndarray, a_cat: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Best rank-``rank`` factors ``(B, A)`` of ``b_cat @ a_cat``, split as U√S, √S Vᵀ.

    Many stacked terms (``R = b_cat.shape[1]`` well above ``rank``, e.g. 100 sites x r 8 = 800 on
    576-dim modules, where the QR shortcut no longer applies): only the top ``rank`` triplets are
    computed, by Lanczos bidiagonalization on the factors (:func:`_top_triplets`), never forming
    the dense product. Otherwise, when ``R`` is below ``min(out, in)`` the SVD is taken of the small
    core ``R_B R_Aᵀ`` from thin QRs of the factors; else (``rank`` a large share of a small module)
    of the dense product. Missing directions (rank above the product's rank) are zero-padded.
    """
    out_dim, in_dim = b_cat.shape[0], a_cat.shape[1]
    stacked, smallest = b_cat.shape[1], min(out_dim, in_dim)
    found = None
    if stacked > _ITERATIVE_TERMS_PER_RANK * rank and 4 * rank <= smallest:
        found = _top_triplets(b_cat, a_cat, rank)
    u, s, vt = found if found is not None else exact_triplets(b_cat, a_cat)
    keep = min(rank, s.size)
    root = np.sqrt(s[:keep])
    b = np.zeros((out_dim, rank))
    a = np.zeros((rank, in_dim))
    b[:, :keep] = u[:, :keep] * root
    a[:keep] = root[:, None] * vt[:keep]
    return b, a


def exact_triplets(b_cat: np.ndarray, a_cat: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every singular triplet of ``b_cat @ a_cat``: from the small core ``R_B R_Aᵀ`` of thin QRs when
    the stacked rank is below ``min(out, in)``, else from the dense product."""
    if b_cat.shape[1] < min(b_cat.shape[0], a_cat.shape[1]):
        q_b, r_b = np.linalg.qr(b_cat)
        q_a, r_a = np.linalg.qr(a_cat.T)
        u_core, s, vt_core = np.linalg.svd(r_b @ r_a.T)
        return q_b @ u_core, s, vt_core @ q_a.T
    return np.linalg.svd(b_cat @ a_cat, full_matrices=False)


def _top_triplets(
    b_cat: np.ndarray, a_cat: np.ndarray, rank: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Top ``rank`` singular triplets of ``b_cat @ a_cat`` (descending), or ``None`` if unconverged.

    Why not dense: a full SVD of ΔW computes all min(out, in) triplets where ``rank`` are kept, and
    forming ΔW costs out·R·in. ``scipy.sparse.linalg.svds(solver="propack")`` (Lanczos
    bidiagonalization) only applies ΔW and ΔWᵀ through the factors, ``b_cat @ (a_cat @ x)``.
    100 sites x r 8 on SmolLM2-135M's 30 q_proj + 30 v_proj (random factors, 1 core): 0.8 s vs
    2.8 s dense; ARPACK (eigsh on ΔWᵀΔW) took 1.6 s, and a randomized range finder (block 16)
    needed 80-120 power iterations to match to 1.4e-6, as σ_rank ≈ σ_rank+1 there. Measured against
    the dense SVD, also with σ_rank / σ_rank+1 = 1.0007: B A within 2e-8 (relative Frobenius) of
    the best rank-``rank`` approximation, its error equal to Eckart-Young's to 1e-15. Seeded start
    vector and generator: deterministic. PROPACK not converging within the capped Krylov
    dimension raises, and the caller then takes an exact SVD.
    """

    out_dim, in_dim = b_cat.shape[0], a_cat.shape[1]
    operator = LinearOperator(
        (out_dim, in_dim),
        matvec=lambda x: b_cat @ (a_cat @ x),
        rmatvec=lambda y: a_cat.T @ (b_cat.T @ y),
        dtype=np.float64,
    )
    generator = np.random.default_rng(0)
    start = generator.standard_normal(out_dim)
    krylov_cap = min(min(out_dim, in_dim), max(20 * rank, 160))
    try:
        u, s, vt = svds(operator, k=rank, solver="propack", v0=start, maxiter=krylov_cap, rng=generator)
    except np.linalg.LinAlgError:
        return None
    order = np.argsort(s)[::-1]
    return u[:, order], np.maximum(s[order], 0.0), vt[order]


def lora_product_average(
    updates: Sequence[Update],
    rank: int,
    scales: Mapping[str, float] | None = None,
    out_scale: float = 1.0,
) -> Arrays:
    """LoRA-aware aggregation: average the products ΔW_i = B_i A_i, then re-factorize.

    Why: FedAvg averages A and B separately, but mean(B) @ mean(A) != mean(B @ A);
    the cross terms B_i A_j (i != j) are noise that no site trained, and factors of
    different ranks r_i cannot be averaged at all. Here, per module,

        ΔW = Σ_i w_i · scale_i · B_i A_i / out_scale,   w_i = n_i / Σ n,

    with B_i: [out, r_i], A_i: [r_i, in]. A truncated SVD ΔW ≈ U_r S_r V_rᵀ gives
    B = U_r √S_r ([out, rank]) and A = √S_r V_rᵀ ([rank, in]), so B @ A is the best
    rank-``rank`` approximation of ΔW (Eckart-Young), exact when ``rank`` ≥ Σ r_i.

    Scaling: PEFT applies ``alpha / r`` to B A. If that factor differs between sites
    (e.g. equal alpha, different r), pass ``scales`` {site_id: alpha_i / r_i} (every
    site must be present; ``None`` means 1 for all) and ``out_scale`` = the server
    adapter's alpha / rank, so that the server adapter reproduces the mean update.

    Non-LoRA keys get the plain ``num_examples``-weighted mean (shapes must agree).
    Float64 inside, float32 out. Caveat: zero-padded or zero-singular-value
    directions have both factors zero and get no gradient in the next round.
    """
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    weights = _weights(updates)
    keys = _check_same_keys(updates)
    factors = _site_factors(updates, weights, scales, out_scale)
    pairs = lora_pairs(keys)
    result: Arrays = {}
    for key in _plain_keys(keys, pairs):
        result[key] = _weighted_mean(updates, key, weights)

    def refit(pair: tuple[str, str]) -> tuple[np.ndarray, np.ndarray]:
        b_cat, a_cat = _stack_pair(updates, factors, *pair)
        return _truncated_factors(b_cat, a_cat, rank)

    # Modules are independent: up to _MAX_WORKERS threads refit them concurrently (BLAS releases
    # the GIL), each with one BLAS thread, as the solver's matrix-vector products are memory-bound
    # and a multi-threaded BLAS only contends (100 sites x 60 SmolLM2 q/v modules on 2 cores: serial
    # 0.9 s, 2 threads 0.6-0.8 s, serial with 2 BLAS threads 1.3-1.7 s). A module's result depends
    # only on its inputs, so scheduling does not change the output.
    work = list(pairs.values())
    workers = min(len(work), _MAX_WORKERS)
    with threadpool_limits(limits=1, user_api="blas"):
        if workers > 1:
            with ThreadPoolExecutor(workers) as pool:
                refitted = list(pool.map(refit, work))
        else:
            refitted = [refit(pair) for pair in work]
    for (a_key, b_key), (b, a) in zip(work, refitted, strict=True):
        result[a_key], result[b_key] = a.astype(np.float32), b.astype(np.float32)
    return {key: result[key] for key in keys}


def _cpu_count() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


#: Threads that refit LoRA modules concurrently in :func:`lora_product_average`.
_MAX_WORKERS = max(1, min(4, _cpu_count()))


def _site_factors(
    updates: Sequence[Update],
    weights: np.ndarray,
    scales: Mapping[str, float] | None,
    out_scale: float,
) -> np.ndarray:
    """Per-site multiplier w_i · scale_i / out_scale applied to B_i A_i."""
    if out_scale == 0:
        raise ValueError("out_scale must be non-zero")
    if scales is None:
        per_site = np.ones(len(updates))
    else:
        missing = [u.site_id for u in updates if u.site_id not in scales]
        if missing:
            raise ValueError(f"scales has no entry for site(s) {missing}")
        per_site = np.array([scales[u.site_id] for u in updates], dtype=np.float64)
    return weights * per_site / out_scale


def _stack_pair(
    updates: Sequence[Update], factors: np.ndarray, a_key: str, b_key: str
) -> tuple[np.ndarray, np.ndarray]:
    """Stack [f_1 B_1 | f_2 B_2 | ...] and [A_1; A_2; ...] so their product is ΔW (float64).

    Filled in place (one float64 cast-and-scale per site and side; ``b_cat`` is the transpose of a
    row-major ``[R, out]`` array), not concatenated from per-site float64 copies: with 100 sites
    that took 0.5 s of a 60-module aggregation, this 0.05-0.1 s.
    """
    ranks = []
    for update in updates:
        a_shape, b_shape = np.shape(update.arrays[a_key]), np.shape(update.arrays[b_key])
        if len(a_shape) != 2 or len(b_shape) != 2 or b_shape[1] != a_shape[0]:
            raise ValueError(
                f"site {update.site_id!r}: {b_key!r} {b_shape} @ {a_key!r} {a_shape} "
                "is not a valid LoRA product"
            )
        ranks.append(a_shape[0])
    out_dims = {np.shape(u.arrays[b_key])[0] for u in updates}
    in_dims = {np.shape(u.arrays[a_key])[1] for u in updates}
    if len(out_dims) != 1 or len(in_dims) != 1:
        raise ValueError(f"module {a_key!r}: out/in dimensions differ across sites")
    # B is stacked transposed, [R, out], so that every site's block is contiguous rows.
    b_rows = np.empty((sum(ranks), out_dims.pop()))
    a_cat = np.empty((sum(ranks), in_dims.pop()))
    start = 0
    for update, factor, r in zip(updates, factors, ranks, strict=True):
        np.multiply(
            np.transpose(update.arrays[b_key]), factor, out=b_rows[start : start + r], dtype=np.float64
        )
        a_cat[start : start + r] = update.arrays[a_key]
        start += r
    b_cat = b_rows.T
    return b_cat, a_cat


def payload_bytes(arrays: Mapping[str, np.ndarray]) -> int:
    """Bytes on the wire for these arrays (sum of ``nbytes``)."""
    return int(sum(np.asarray(a).nbytes for a in arrays.values()))
