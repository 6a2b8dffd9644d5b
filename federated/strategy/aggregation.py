"""Pure aggregation and validation of LoRA adapter updates (no Flower imports).

Every function works on adapter state dicts ``dict[str, np.ndarray]`` keyed the way
PEFT names them, e.g. ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``
(``[r, in]``) and ``...q_proj.lora_B.weight`` (``[out, r]``). Keys that are not part
of a ``lora_A``/``lora_B`` pair (``modules_to_save`` heads, biases, ...) are treated as
plain arrays. Arithmetic is done in float64; results are returned as float32.
"""

from __future__ import annotations

import math
import os
import re
import threading
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from scipy.linalg import eigh_tridiagonal
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
#: (576 x 576, rank 8, random factors: QR core 2.1 ms vs Lanczos 4.4 ms at 64 terms, 7.8 vs 6.3 ms
#: at 128, 31 vs 10 ms at 256).
_ITERATIVE_TERMS_PER_RANK = 8


def _truncated_factors(
    b_cat: np.ndarray,
    a_cat: np.ndarray,
    rank: int,
    weights: np.ndarray,
    term_rows: np.ndarray,
    workspace: _Workspace,
) -> tuple[np.ndarray, np.ndarray]:
    """Best rank-``rank`` factors ``(B, A)`` of ``b_cat @ diag(weights) @ a_cat``, split as U√S, √S Vᵀ.

    Many stacked terms (``R = b_cat.shape[1]`` well above ``rank``, e.g. 100 sites x r 8 = 800 on
    576-dim modules, where the QR shortcut no longer applies): only the top ``rank`` triplets are
    computed, by Lanczos bidiagonalization on the factors (:func:`_top_triplets`), never forming
    the dense product. Otherwise, when ``R`` is below ``min(out, in)`` the SVD is taken of the small
    core ``R_B R_Aᵀ`` from thin QRs of the factors; else (``rank`` a large share of a small module)
    of the dense product. Missing directions (rank above the product's rank) are zero-padded.
    ``weights`` (per stacked term) scale the terms without a pass over the stacks; ``term_rows``
    (per stacked term) is its row in its site's A; ``workspace`` holds the Krylov basis.
    """
    out_dim, in_dim = b_cat.shape[0], a_cat.shape[1]
    stacked, smallest = b_cat.shape[1], min(out_dim, in_dim)
    found = None
    if stacked > _ITERATIVE_TERMS_PER_RANK * rank and 4 * rank <= smallest:
        found = _top_triplets(b_cat, a_cat, rank, weights, term_rows, workspace)
    u, s, vt = found if found is not None else exact_triplets(b_cat * weights, a_cat)
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


#: Ritz residual ||ΔWᵀu_j - σ_j v_j|| (relative to σ_1) below which a triplet counts as converged.
#: A near-degenerate pair σ_k ≈ σ_k+1 mixes u_k and u_k+1 by at most residual / (σ_k - σ_k+1), so
#: at σ_k / σ_k+1 = 1.0007 this keeps B A within ~2e-8 of the dense optimum (tests ask 1e-6); the
#: float64 floor of the factored matrix-vector products is ~1e-14.
_RESIDUAL_TOL = 1e-11


def _top_triplets(
    b_cat: np.ndarray,
    a_cat: np.ndarray,
    rank: int,
    weights: np.ndarray,
    term_rows: np.ndarray,
    workspace: _Workspace,
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Top ``rank`` singular triplets of ``ΔW = b_cat @ diag(weights) @ a_cat`` (descending), or
    ``None`` if unconverged.

    Golub-Kahan-Lanczos bidiagonalization on the factors (ΔW v = b_cat (w * (a_cat v)), never
    forming ΔW), float64, full reorthogonalization, stopped as soon as the top ``rank`` Ritz
    residuals are below ``_RESIDUAL_TOL``. Measured on 100 sites x SmolLM2-135M (1 BLAS thread):

    * scipy's PROPACK (``svds(solver="propack")``, used before) always builds a Krylov space of at
      least 17 for rank 8, where real LoRA updates (a few directions dominate: σ_8 / σ_9 ≈ 600
      on the bench's adapter) converge at 11-12: 35 products per module against 22-24 here;
      with the stacking below, all 210 modules of the adapter in 1.5-1.6 s of CPU against
      2.0-2.1 s. On flat spectra (independent random factors) both need 60-90 steps, and this
      Python loop is 10-25% slower there than PROPACK's Fortran (q/v bench: 1.3-1.6 s CPU vs 1.2-1.3).
    * Block Krylov (BLAS-3): an 8-column product costs 0.85x eight single ones here (16 columns
      0.6x), and a block method needs more columns than that saves.
    * float32 products with a float64 refinement: bringing a float32 subspace to float64
      accuracy takes 2 float64 block passes of ``rank`` columns (~16 products), more than the
      float32 pass saves; float32 alone drifts 1e-4 from the optimum on flat spectra.

    The first right vector lies in the row space of the sites' mean A (:func:`_start_vector`).
    Seeded: deterministic. ``None`` when the Krylov dimension reaches its cap unconverged, or when
    a new direction vanishes (the Krylov space is invariant: its Ritz pairs are exact, but need not
    be the top ones, e.g. a singular value repeated exactly or a ΔW of low rank leaves directions
    the start never reaches, and no residual tells); the caller then takes an exact SVD. The
    basis lives in ``workspace``.
    """
    out_dim, in_dim = b_cat.shape[0], a_cat.shape[1]
    smallest = min(out_dim, in_dim)
    cap = min(smallest, max(20 * rank, 160))
    left = workspace.take("left", (cap, out_dim))  # rows: orthonormal u_1..u_j
    right = workspace.take("right", (cap + 1, in_dim))  # rows: orthonormal v_1..v_j+1
    alpha, beta = np.zeros(cap), np.zeros(cap + 1)  # bidiagonal: diagonal, superdiagonal beta[1:]
    generator = np.random.default_rng(0)
    right[0] = _start_vector(a_cat, weights, term_rows, generator)
    norm_estimate = 0.0
    next_check, last_check = rank + 1, None  # last_check: (steps, excess) at the previous check
    for j in range(cap):
        u = b_cat @ (weights * (a_cat @ right[j]))
        if j:
            u -= beta[j] * left[j - 1]
        alpha[j] = _orthonormalize(u, left, j, norm_estimate)
        if alpha[j] == 0.0:
            return None
        v = a_cat.T @ (weights * (b_cat.T @ left[j]))
        v -= alpha[j] * right[j]
        norm_estimate = max(norm_estimate, alpha[j])
        beta[j + 1] = _orthonormalize(v, right, j + 1, norm_estimate)
        # at step min(out, in) the basis spans the whole space: there a vanished direction is exact
        if beta[j + 1] == 0.0 and j + 1 < smallest:
            return None
        norm_estimate = max(norm_estimate, beta[j + 1])
        steps = j + 1
        if steps < next_check and steps < cap:
            continue
        keep = min(rank, steps)
        excess = _residual_excess(alpha[:steps], beta[: steps + 1], keep) if steps > 3 * rank else 0.0
        if excess <= 1.0:
            # Ritz triplets from the SVD of the steps x steps bidiagonal; ΔWᵀ u_i - σ_i v_i is
            # beta_steps+1 times the last entry of the bidiagonal's i-th left singular vector.
            bidiagonal = np.diag(alpha[:steps]) + np.diag(beta[1:steps], 1)
            p, s, qt = np.linalg.svd(bidiagonal)
            residuals = beta[steps] * np.abs(p[-1, : keep + 1])
            excess = _excess(float(np.max(residuals[:keep])), float(s[0]))
            if excess <= 1.0 or _separated(residuals, s, keep):
                return left[:steps].T @ p[:, :keep], s[:keep], qt[:keep] @ right[:steps]
        next_check = steps + _steps_to_next_check(steps, excess, last_check)
        last_check = (steps, excess)
    return None


#: Share of a random unit vector in :func:`_start_vector`'s start.
_RANDOM_SHARE = 1e-3


def _start_vector(
    a_cat: np.ndarray, weights: np.ndarray, term_rows: np.ndarray, generator: np.random.Generator
) -> np.ndarray:
    """Lanczos's first right vector: a random combination of the rows of the sites' weighted mean
    A, plus ``_RANDOM_SHARE`` of a random unit vector.

    Every site starts a round from the same global A, so ΔW's top right-singular space lies close
    to the row space of the mean A. Started there, the bench's 100 SmolLM2 updates converge in 11
    steps in every module, against 11-12 (11.7 on average) from a random vector; the mean costs one
    pass over A's stack (a quarter of a step). The random share keeps every direction in the Krylov
    space: a start confined to the mean A's rows would never find a top direction orthogonal to
    them (sites whose A's cancel), and at 1e-3 it costs no step on the bench (at 0.1, 0.1 step).
    """
    random_part = _unit(generator.standard_normal(a_cat.shape[1]))
    coefficients = generator.standard_normal(int(term_rows.max()) + 1)[term_rows]
    mean_rows = a_cat.T @ (weights * coefficients)
    norm = float(np.linalg.norm(mean_rows))
    if not (norm > 0.0 and math.isfinite(norm)):
        return random_part
    return _unit(mean_rows / norm + _RANDOM_SHARE * random_part)


#: Largest mixing of the top-``rank`` singular directions with the others that the solver accepts
#: where a gap separates them: B A is then within ~2e-8 of the optimum, as at _RESIDUAL_TOL on the
#: near-degenerate σ_k / σ_k+1 = 1.0007.
_MIXING_TOL = 1e-8


def _separated(residuals: np.ndarray, values: np.ndarray, keep: int) -> bool:
    """Whether the top ``keep`` Ritz triplets are final by their gap to the next one.

    ``residuals[i]`` is the Ritz residual of ``values[i]``. The top subspace mixes with the rest by
    at most residual / gap (Wedin), the gap taken as σ̃_keep - σ̃_keep+1 less the next Ritz value's
    own residual (Lanczos's Ritz values approach the singular values from below). Where the top
    triplets stand far above the rest (the bench's 100 SmolLM2 updates: σ_8 / σ_9 ≈ 600) this ends
    the solve a step before _RESIDUAL_TOL does in half the modules (10.5 steps against 11 on
    average); on a flat spectrum the gap is small and _RESIDUAL_TOL decides.
    """
    if values.size <= keep:
        return False
    gap = float(values[keep - 1] - values[keep] - residuals[keep])
    return gap > 0.0 and float(np.max(residuals[:keep])) <= _MIXING_TOL * gap


def _residual_excess(alpha: np.ndarray, beta: np.ndarray, keep: int) -> float:
    """Worst top-``keep`` Ritz residual over its tolerance, for deciding when to check for real.

    From the top eigenpairs of the tridiagonal B Bᵀ (bisection and inverse iteration, O(steps x
    keep)): 0.23 ms at 80 steps where the bidiagonal's full SVD takes 0.48 ms (and 21 us vs
    39 us at 12 steps, hence only past 3 x rank). An estimate: converging is confirmed by
    the SVD.
    """
    steps = alpha.size
    diagonal = alpha * alpha
    diagonal[:-1] += beta[1:steps] ** 2
    values, vectors = eigh_tridiagonal(
        diagonal, alpha[1:] * beta[1:steps], select="i", select_range=(steps - keep, steps - 1)
    )
    largest = math.sqrt(max(float(values[-1]), 0.0))
    return _excess(float(np.max(beta[steps] * np.abs(vectors[-1]))), largest)


def _excess(residual: float, largest: float) -> float:
    """``residual`` over its tolerance ``_RESIDUAL_TOL`` x σ_1: converged when at most 1."""
    threshold = _RESIDUAL_TOL * largest
    if residual <= threshold:
        return min(residual / threshold, 1.0) if threshold > 0 else 1.0
    return residual / threshold if threshold > 0 else math.inf


def _steps_to_next_check(steps: int, excess: float, last_check: tuple[int, float] | None) -> int:
    """Lanczos steps before the next convergence check (``excess``: worst residual / tolerance).

    Real updates converge at ~1.5 x rank and are checked every step; flat spectra take ~80
    steps, and checking each one cost 22% of the solve there (36 SVDs of the bidiagonal per
    module, 0.5 ms each at 80). So the next check is where the residual's geometric decrease
    since the last check reaches the tolerance, but at most steps/6 ahead (overshoot <= 1/6).
    """
    if last_check is None:
        return 1
    limit = max(1, steps // 6)
    if excess >= last_check[1]:
        return limit
    per_step = math.log(last_check[1] / excess) / (steps - last_check[0])
    return max(1, min(math.ceil(math.log(excess) / per_step), limit))


def _unit(x: np.ndarray) -> np.ndarray:
    """``x`` scaled to unit norm."""
    return x / np.linalg.norm(x)


def _orthonormalize(x: np.ndarray, basis: np.ndarray, count: int, scale: float) -> float:
    """Orthogonalize ``x`` against ``basis[:count]``, store it normalized as ``basis[count]``,
    return its norm (0, storing nothing, if it vanished: below 1e-12 x ``scale``).

    Classical Gram-Schmidt, repeated when the first pass removed most of ``x`` (Kahan's twice is
    enough criterion), which Lanczos vectors rarely need: one pass instead of two always.
    """
    done = basis[:count]
    before = math.sqrt(x @ x)
    x -= (done @ x) @ done
    norm = math.sqrt(x @ x)
    if norm < 0.7 * before:
        x -= (done @ x) @ done
        norm = math.sqrt(x @ x)
    if norm > 1e-12 * scale:
        basis[count] = x / norm
        return float(norm)
    return 0.0


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

    local = threading.local()

    def refit(pair: tuple[str, str]) -> tuple[np.ndarray, np.ndarray]:
        # One workspace per thread: its stacks and Krylov basis are reused module after module,
        # which avoids fresh allocations (page faults: stacking with a new array per module took
        # 0.55 s for the 210 SmolLM2 modules, into reused buffers 0.25 s).
        workspace = getattr(local, "workspace", None)
        if workspace is None:
            workspace = local.workspace = _Workspace()
        b_cat, a_cat, weights, term_rows = _stack_pair(updates, factors, *pair, workspace)
        return _truncated_factors(b_cat, a_cat, rank, weights, term_rows, workspace)

    # Modules are independent: up to _MAX_WORKERS threads refit them concurrently (BLAS releases
    # the GIL), each with one BLAS thread, as the solver's matrix-vector products are memory-bound
    # and a multi-threaded BLAS only contends (100 sites x 60 SmolLM2 q/v modules on 2 cores: serial
    # 0.9 s, 2 threads 0.6-0.8 s, serial with 2 BLAS threads 1.3-1.7 s). A module's result depends
    # only on its inputs, so scheduling does not change the output.
    work = _large_beside_small(list(pairs.values()), updates[0].arrays)
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


def _large_beside_small(
    work: list[tuple[str, str]], arrays: Mapping[str, np.ndarray]
) -> list[tuple[str, str]]:
    """The modules in the order largest, smallest, second largest, second smallest, ...

    The threads take modules in this order, so a module with large stacks (SmolLM2's MLP: 13.5 MB
    of float64 per thread) mostly runs beside a small one rather than beside another large one,
    whose stacks together would overflow the shared 32 MB L3 cache and send the matrix-vector
    products to memory (100 sites x the 210-module SmolLM2 adapter on 2 cores, alternating with the
    previous order in one run: median 1.03 s against 1.09 s).
    """
    by_size = sorted(work, key=lambda pair: sum(np.size(arrays[key]) for key in pair), reverse=True)
    order: list[tuple[str, str]] = []
    while by_size:
        order.append(by_size.pop(0))
        if by_size:
            order.append(by_size.pop())
    return order


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


class _Workspace:
    """Scratch arrays of one thread, reused (grown when too small) from one module to the next."""

    def __init__(self) -> None:
        self._buffers: dict[str, np.ndarray] = {}

    def take(self, name: str, shape: tuple[int, ...], dtype: type = np.float64) -> np.ndarray:
        """An uninitialized array of ``shape`` in buffer ``name`` (valid until the next ``take``)."""
        size = math.prod(shape)
        buffer = self._buffers.get(name)
        if buffer is None or buffer.size < size or buffer.dtype != dtype:
            buffer = self._buffers[name] = np.empty(size, dtype)
        return buffer[:size].reshape(shape)


def _stack_pair(
    updates: Sequence[Update],
    factors: np.ndarray,
    a_key: str,
    b_key: str,
    workspace: _Workspace,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Stacks ``b_cat`` [out, R], ``a_cat`` [R, in] (float64, in ``workspace``), the weight of
    each stacked term, so that ``b_cat @ diag(weights) @ a_cat`` is ΔW = Σ_i f_i B_i A_i, and
    each term's row in its site's A.

    The weights stay a vector (applied to the R-long intermediate of each product) rather than
    a pass over a stack (0.06 s of the 210-module aggregation). With one rank r for all sites
    the terms are ordered rank-major (term j of site i at row j·n + i): then B's stack is one
    float32 copy of the sites' contiguous B_i plus one transposing cast of that [n·out, r] block,
    and A's one stacking cast, 0.25 s for 100 sites x 210 SmolLM2 modules where one cast per
    site and side into site-major rows (the general path, kept for mixed ranks) took 0.32 s,
    most of it transposing each small B_i.
    """
    ranks, dims = [], set()
    for update in updates:
        a_shape, b_shape = update.arrays[a_key].shape, update.arrays[b_key].shape
        if len(a_shape) != 2 or len(b_shape) != 2 or b_shape[1] != a_shape[0]:
            raise ValueError(
                f"site {update.site_id!r}: {b_key!r} {b_shape} @ {a_key!r} {a_shape} "
                "is not a valid LoRA product"
            )
        ranks.append(a_shape[0])
        dims.add((b_shape[0], a_shape[1]))
    if len(dims) != 1:
        raise ValueError(f"module {a_key!r}: out/in dimensions differ across sites")
    (out_dim, in_dim), sites, total = dims.pop(), len(updates), sum(ranks)
    # B is stacked transposed, [R, out], so that each stacked term is one contiguous row.
    b_rows = workspace.take("b_rows", (total, out_dim))
    a_cat = workspace.take("a_cat", (total, in_dim))
    if len(set(ranks)) == 1:
        r = ranks[0]
        b_sides = [update.arrays[b_key] for update in updates]
        # float32 sites (the usual case) are transposed from a float32 copy, not a float64 one
        staging = np.result_type(np.float32, *{side.dtype for side in b_sides})
        stacked = workspace.take("b_sites", (sites, out_dim, r), staging.type)
        np.stack(b_sides, out=stacked)
        np.copyto(b_rows.reshape(r, sites * out_dim), stacked.reshape(sites * out_dim, r).T)
        np.stack([update.arrays[a_key] for update in updates], axis=1, out=a_cat.reshape(r, sites, in_dim))
        return b_rows.T, a_cat, np.tile(factors, r), np.repeat(np.arange(r), sites)
    start = 0
    for update in updates:
        r = np.shape(update.arrays[a_key])[0]
        b_rows[start : start + r] = np.transpose(update.arrays[b_key])
        a_cat[start : start + r] = update.arrays[a_key]
        start += r
    return b_rows.T, a_cat, np.repeat(factors, ranks), np.concatenate([np.arange(r) for r in ranks])


def payload_bytes(arrays: Mapping[str, np.ndarray]) -> int:
    """Bytes on the wire for these arrays (sum of ``nbytes``)."""
    return int(sum(np.asarray(a).nbytes for a in arrays.values()))
