"""Unit tests for federated.strategy.aggregation (numpy only, no Flower)."""

from __future__ import annotations

import time

import numpy as np
import pytest

from federated.strategy import aggregation
from federated.strategy.aggregation import (
    Update,
    fedavg,
    lora_pairs,
    lora_product_average,
    payload_bytes,
    validate_updates,
)

PREFIX = "base_model.model.model.layers.{}.self_attn.q_proj"
HEAD = "base_model.model.score.modules_to_save.weight"


def _a(i: int) -> str:
    return f"{PREFIX.format(i)}.lora_A.weight"


def _b(i: int) -> str:
    return f"{PREFIX.format(i)}.lora_B.weight"


def make_adapter(
    rng: np.random.Generator,
    modules: int = 2,
    out_dim: int = 12,
    in_dim: int = 10,
    rank: int = 4,
    scale: float = 1.0,
    head: bool = True,
) -> dict[str, np.ndarray]:
    """A random PEFT-style adapter state dict (float32)."""
    arrays: dict[str, np.ndarray] = {}
    for i in range(modules):
        a = rng.normal(scale=scale, size=(rank, in_dim))
        b = rng.normal(scale=scale, size=(out_dim, rank))
        arrays[_a(i)] = a.astype(np.float32)
        arrays[_b(i)] = b.astype(np.float32)
    if head:
        arrays[HEAD] = rng.normal(scale=scale, size=(3, out_dim)).astype(np.float32)
    return arrays


def perturbed(
    rng: np.random.Generator, reference: dict[str, np.ndarray], scale: float
) -> dict[str, np.ndarray]:
    """Reference plus Gaussian noise of the given scale."""
    return {k: (v + rng.normal(scale=scale, size=v.shape)).astype(np.float32) for k, v in reference.items()}


def mean_product(updates: list[Update], a_key: str, b_key: str) -> np.ndarray:
    """Exact num_examples-weighted mean of B_i @ A_i in float64."""
    total = sum(u.num_examples for u in updates)
    return sum(
        u.num_examples / total * (u.arrays[b_key].astype(np.float64) @ u.arrays[a_key].astype(np.float64))
        for u in updates
    )


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


# ------------------------------------------------------------------------ fedavg


def test_fedavg_weights_by_num_examples() -> None:
    ones = {"w": np.ones((2, 3), np.float32), "b": np.zeros(3, np.float32)}
    fours = {"w": np.full((2, 3), 4.0, np.float32), "b": np.ones(3, np.float32)}
    out = fedavg([Update("s1", ones, 1), Update("s2", fours, 3)])
    np.testing.assert_allclose(out["w"], 3.25)  # (1*1 + 3*4) / 4
    np.testing.assert_allclose(out["b"], 0.75)
    assert out["w"].dtype == np.float32
    assert list(out) == ["w", "b"]


def test_fedavg_rejects_empty_and_mismatched_keys() -> None:
    with pytest.raises(ValueError, match="no updates"):
        fedavg([])
    with pytest.raises(ValueError, match="different key set"):
        fedavg(
            [
                Update("s1", {"w": np.ones(2, np.float32)}, 1),
                Update("s2", {"v": np.ones(2, np.float32)}, 1),
            ]
        )


def test_payload_bytes(rng: np.random.Generator) -> None:
    arrays = make_adapter(rng, modules=2, out_dim=12, in_dim=10, rank=4)
    expected = 4 * (2 * (4 * 10 + 12 * 4) + 3 * 12)
    assert payload_bytes(arrays) == expected


# -------------------------------------------------------------------- validation


@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf])
def test_validation_rejects_non_finite(rng: np.random.Generator, bad_value: float) -> None:
    reference = make_adapter(rng)
    good = [Update(f"ok{i}", perturbed(rng, reference, 0.01), 10) for i in range(3)]
    broken = perturbed(rng, reference, 0.01)
    broken[_b(1)][0, 0] = bad_value
    accepted, rejected = validate_updates([*good, Update("bad", broken, 10)], reference)
    assert [u.site_id for u in accepted] == ["ok0", "ok1", "ok2"]
    assert [r.site_id for r in rejected] == ["bad"]
    assert "'bad'" in rejected[0].reason
    assert _b(1) in rejected[0].reason
    assert "NaN or Inf" in rejected[0].reason


def test_validation_rejects_wrong_shape(rng: np.random.Generator) -> None:
    reference = make_adapter(rng)
    broken = perturbed(rng, reference, 0.01)
    broken[HEAD] = np.zeros((4, 12), np.float32)
    accepted, rejected = validate_updates([Update("s", broken, 1)], reference)
    assert not accepted
    assert "'s'" in rejected[0].reason
    assert HEAD in rejected[0].reason
    assert "shape" in rejected[0].reason


def test_validation_rejects_missing_and_extra_keys(rng: np.random.Generator) -> None:
    reference = make_adapter(rng)
    missing = perturbed(rng, reference, 0.01)
    del missing[_a(0)]
    extra = perturbed(rng, reference, 0.01)
    extra["base_model.model.lm_head.weight"] = np.zeros((2, 2), np.float32)
    ok = perturbed(rng, reference, 0.01)
    accepted, rejected = validate_updates(
        [Update("miss", missing, 1), Update("extra", extra, 1), Update("ok", ok, 1)],
        reference,
    )
    assert [u.site_id for u in accepted] == ["ok"]
    reasons = {r.site_id: r.reason for r in rejected}
    assert "missing key" in reasons["miss"]
    assert _a(0) in reasons["miss"]
    assert "unexpected key" in reasons["extra"]
    assert "base_model.model.lm_head.weight" in reasons["extra"]


def test_validation_rejects_bad_counts_dtype_and_duplicates(
    rng: np.random.Generator,
) -> None:
    reference = make_adapter(rng)
    ints = {k: v.astype(np.int32) for k, v in reference.items()}
    updates = [
        Update("zero", perturbed(rng, reference, 0.01), 0),
        Update("ints", ints, 1),
        Update("dup", perturbed(rng, reference, 0.01), 1),
        Update("dup", perturbed(rng, reference, 0.01), 1),
    ]
    accepted, rejected = validate_updates(updates, reference)
    assert [u.site_id for u in accepted] == ["dup"]
    reasons = [r.reason for r in rejected]
    assert "num_examples" in reasons[0]
    assert "non-float dtype" in reasons[1]
    assert "duplicate" in reasons[2]


def test_validation_rejects_huge_norm_outlier(rng: np.random.Generator) -> None:
    reference = make_adapter(rng)
    normal = [Update(f"site{i}", perturbed(rng, reference, 0.01), 50) for i in range(4)]
    attacker = Update("evil-site", perturbed(rng, reference, 5.0), 50)
    accepted, rejected = validate_updates([*normal, attacker], reference)
    assert [u.site_id for u in accepted] == [u.site_id for u in normal]
    assert len(rejected) == 1
    assert rejected[0].site_id == "evil-site"
    assert "evil-site" in rejected[0].reason
    assert "median" in rejected[0].reason
    assert "key" in rejected[0].reason


def test_validation_uses_max_norm_with_few_updates(rng: np.random.Generator) -> None:
    reference = make_adapter(rng)
    small = Update("small", perturbed(rng, reference, 0.01), 1)
    big = Update("big", perturbed(rng, reference, 5.0), 1)
    accepted, rejected = validate_updates([small, big], reference)
    assert len(accepted) == 2
    assert not rejected
    accepted, rejected = validate_updates([small, big], reference, max_norm=1.0)
    assert [u.site_id for u in accepted] == ["small"]
    assert rejected[0].site_id == "big"
    assert "max_norm" in rejected[0].reason


def test_validation_rank_mismatch_mode(rng: np.random.Generator) -> None:
    reference = make_adapter(rng, rank=4)
    low_rank = make_adapter(rng, rank=2)
    low_rank[HEAD] = reference[HEAD].copy()
    _, rejected = validate_updates([Update("r2", low_rank, 1)], reference)
    assert rejected
    assert "shape" in rejected[0].reason
    accepted, rejected = validate_updates([Update("r2", low_rank, 1)], reference, allow_rank_mismatch=True)
    assert [u.site_id for u in accepted] == ["r2"]
    assert not rejected

    wrong_in = dict(low_rank)
    wrong_in[_a(0)] = np.zeros((2, 11), np.float32)  # in-dim differs, not rank
    _, rejected = validate_updates([Update("bad-in", wrong_in, 1)], reference, allow_rank_mismatch=True)
    assert rejected
    assert _a(0) in rejected[0].reason

    split = dict(low_rank)
    split[_b(1)] = np.zeros((12, 3), np.float32)  # A rank 2, B rank 3
    _, rejected = validate_updates([Update("split", split, 1)], reference, allow_rank_mismatch=True)
    assert rejected
    assert "LoRA rank" in rejected[0].reason


def test_rank_mismatch_outlier_uses_product_norm(rng: np.random.Generator) -> None:
    reference = make_adapter(rng, rank=4, scale=0.1)
    updates = [Update(f"s{i}", make_adapter(rng, rank=2 + i % 3, scale=0.1), 1) for i in range(4)]
    updates.append(Update("huge", make_adapter(rng, rank=2, scale=10.0), 1))
    accepted, rejected = validate_updates(updates, reference, allow_rank_mismatch=True)
    assert len(accepted) == 4
    assert [r.site_id for r in rejected] == ["huge"]


# ------------------------------------------------------------------------- pairs


def test_lora_pairs_maps_modules_and_skips_plain_keys(
    rng: np.random.Generator,
) -> None:
    keys = list(make_adapter(rng, modules=3))
    keys.append("base_model.model.model.layers.0.mlp.up_proj.lora_A.default.weight")
    keys.append("base_model.model.model.layers.0.mlp.up_proj.lora_B.default.weight")
    pairs = lora_pairs(keys)
    assert pairs[PREFIX.format(1)] == (_a(1), _b(1))
    assert pairs["base_model.model.model.layers.0.mlp.up_proj"][0].endswith("lora_A.default.weight")
    assert len(pairs) == 4
    assert all(HEAD not in pair for pair in pairs.values())
    with pytest.raises(ValueError, match="unpaired"):
        lora_pairs([_a(0)])


# -------------------------------------------------------------- product average


def test_product_average_exact_when_rank_covers_sum(rng: np.random.Generator) -> None:
    ranks = [2, 3, 4]
    updates = [
        Update(f"s{i}", make_adapter(rng, rank=r), n)
        for i, (r, n) in enumerate(zip(ranks, [10, 30, 60], strict=True))
    ]
    out = lora_product_average(updates, rank=sum(ranks))
    for i in range(2):
        assert out[_a(i)].shape == (9, 10)
        assert out[_b(i)].shape == (12, 9)
        assert out[_a(i)].dtype == np.float32
        product = out[_b(i)].astype(np.float64) @ out[_a(i)].astype(np.float64)
        np.testing.assert_allclose(product, mean_product(updates, _a(i), _b(i)), atol=1e-5)
    head = sum(n * u.arrays[HEAD] for u, n in zip(updates, [0.1, 0.3, 0.6], strict=True))
    np.testing.assert_allclose(out[HEAD], head, atol=1e-6)
    assert list(out) == list(updates[0].arrays)


def test_product_average_pads_when_rank_exceeds_product_rank(
    rng: np.random.Generator,
) -> None:
    updates = [Update("s", make_adapter(rng, rank=2, head=False), 1)]
    out = lora_product_average(updates, rank=6)
    assert out[_a(0)].shape == (6, 10)
    np.testing.assert_allclose(out[_b(0)] @ out[_a(0)], mean_product(updates, _a(0), _b(0)), atol=1e-5)


def test_product_average_heterogeneous_ranks_is_svd_optimum(
    rng: np.random.Generator,
) -> None:
    updates = [
        Update("r2", make_adapter(rng, out_dim=16, in_dim=20, rank=2), 40),
        Update("r4", make_adapter(rng, out_dim=16, in_dim=20, rank=4), 60),
    ]
    out = lora_product_average(updates, rank=4)
    for i in range(2):
        target = mean_product(updates, _a(i), _b(i))
        u, s, vt = np.linalg.svd(target)
        optimum = (u[:, :4] * s[:4]) @ vt[:4]
        got = out[_b(i)].astype(np.float64) @ out[_a(i)].astype(np.float64)
        assert out[_b(i)].shape == (16, 4)
        assert out[_a(i)].shape == (4, 20)
        np.testing.assert_allclose(got, optimum, atol=1e-4)
        # Eckart-Young: the residual is exactly the discarded singular values.
        residual = np.linalg.norm(target - got)
        assert residual == pytest.approx(np.sqrt(np.sum(s[4:] ** 2)), rel=1e-4)


def _best_rank_k(target: np.ndarray, k: int) -> tuple[np.ndarray, float]:
    """Dense-SVD best rank-k approximation of ``target`` and its Eckart-Young error."""
    u, s, vt = np.linalg.svd(target, full_matrices=False)
    return (u[:, :k] * s[:k]) @ vt[:k], float(np.sqrt(np.sum(s[k:] ** 2)))


@pytest.mark.parametrize(
    ("ranks", "rank", "out_dim", "in_dim"),
    [
        ([8] * 12, 4, 64, 48),  # R = 96 >= min(out, in) = 48: no QR core, top triplets only
        ([8] * 12, 8, 64, 48),
        ([2, 4, 8, 16] * 3, 4, 64, 48),  # heterogeneous ranks, R = 90
        ([1, 3, 16, 4, 8] * 3, 6, 48, 64),  # wide module, R = 96
    ],
)
def test_product_average_many_terms_is_dense_svd_optimum(
    rng: np.random.Generator,
    monkeypatch: pytest.MonkeyPatch,
    ranks: list[int],
    rank: int,
    out_dim: int,
    in_dim: int,
) -> None:
    """Stacked rank R >= min(out, in): B @ A is the dense SVD's best rank-k ΔW (Eckart-Young)."""
    solved = []  # what the iterative top-triplet solver returned (None: fell back to an exact SVD)
    top_triplets = aggregation._top_triplets

    def spy(*args: object) -> object:
        found = top_triplets(*args)
        solved.append(found)
        return found

    monkeypatch.setattr(aggregation, "_top_triplets", spy)
    updates = [
        Update(f"s{i}", make_adapter(rng, out_dim=out_dim, in_dim=in_dim, rank=r, head=False), int(n))
        for i, (r, n) in enumerate(zip(ranks, rng.integers(10, 200, len(ranks)), strict=True))
    ]
    assert sum(ranks) >= min(out_dim, in_dim)
    out = lora_product_average(updates, rank=rank)
    again = lora_product_average(updates, rank=rank)
    for i in range(2):
        target = mean_product(updates, _a(i), _b(i))
        optimum, optimal_error = _best_rank_k(target, rank)
        assert out[_b(i)].shape == (out_dim, rank)
        assert out[_a(i)].shape == (rank, in_dim)
        got = out[_b(i)].astype(np.float64) @ out[_a(i)].astype(np.float64)
        assert np.linalg.norm(got - optimum) <= 1e-6 * np.linalg.norm(optimum)
        assert np.linalg.norm(target - got) == pytest.approx(optimal_error, rel=1e-6)
        np.testing.assert_array_equal(again[_a(i)], out[_a(i)])  # deterministic
        np.testing.assert_array_equal(again[_b(i)], out[_b(i)])
    assert len(solved) == 4
    assert all(found is not None for found in solved)


def _near_degenerate_sites(rng: np.random.Generator, rank: int, out_dim: int, in_dim: int) -> list[Update]:
    """Sites whose mean product has a flat spectrum with σ_rank / σ_rank+1 = 1.0007.

    Six sites carry ΔW = U diag(σ) Vᵀ in rank-8 slices; six more come in pairs (B, A), (-B, A) of
    equal weight that cancel, so the stacked rank (96) exceeds min(out, in) = 48.
    """
    size = min(out_dim, in_dim)
    sigma = np.linspace(1.0, 0.8, size)
    sigma[rank:] = sigma[rank - 1] / 1.0007 * np.linspace(1.0, 0.8, size - rank)
    u, _ = np.linalg.qr(rng.normal(size=(out_dim, size)))
    v, _ = np.linalg.qr(rng.normal(size=(in_dim, size)))
    left, right = u * sigma, v.T  # ΔW = left @ right
    sites = 12
    updates = []
    for i in range(6):  # weight 1/12 each: B scaled by 12 so that the weighted sum is ΔW
        block = slice(8 * i, 8 * i + 8)
        arrays = {_a(0): right[block].astype(np.float32), _b(0): (12 * left[:, block]).astype(np.float32)}
        updates.append(Update(f"s{i}", arrays, 1))
    for i in range(6, sites, 2):
        a = rng.normal(size=(8, in_dim)).astype(np.float32)
        b = rng.normal(size=(out_dim, 8)).astype(np.float32)
        updates.append(Update(f"s{i}", {_a(0): a, _b(0): b}, 1))
        updates.append(Update(f"s{i + 1}", {_a(0): a, _b(0): -b}, 1))
    return updates


@pytest.fixture
def solved(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """What each call of the iterative solver returned (``None``: unconverged), in call order."""
    results: list[object] = []
    top_triplets = aggregation._top_triplets

    def spy(*args: object) -> object:
        found = top_triplets(*args)
        results.append(found)
        return found

    monkeypatch.setattr(aggregation, "_top_triplets", spy)
    return results


@pytest.mark.parametrize(("rank", "seed"), [(4, 0), (8, 1), (8, 2), (6, 3)])
def test_product_average_near_degenerate_spectrum_is_dense_svd_optimum(
    solved: list[object], rank: int, seed: int
) -> None:
    """σ_rank / σ_rank+1 = 1.0007 on a flat spectrum: the iterative solver still lands on the dense
    SVD's best rank-k product (within 1e-6) with the Eckart-Young error."""
    updates = _near_degenerate_sites(np.random.default_rng(seed), rank, 64, 48)
    target = mean_product(updates, _a(0), _b(0))
    dense = np.linalg.svd(target, compute_uv=False)
    assert dense[rank - 1] / dense[rank] == pytest.approx(1.0007, rel=1e-5)
    out = lora_product_average(updates, rank=rank)
    optimum, optimal_error = _best_rank_k(target, rank)
    got = out[_b(0)].astype(np.float64) @ out[_a(0)].astype(np.float64)
    assert np.linalg.norm(got - optimum) <= 1e-6 * np.linalg.norm(optimum)
    assert np.linalg.norm(target - got) == pytest.approx(optimal_error, rel=1e-6)
    assert len(solved) == 1
    assert solved[0] is not None


def _integers_summing_to(generator: np.random.Generator, total: np.ndarray, count: int) -> list[np.ndarray]:
    """``count`` random integer matrices that sum to the integer matrix ``total`` (exact in float32)."""
    parts = [generator.integers(-3, 4, size=total.shape).astype(np.float64) for _ in range(count - 1)]
    return [*parts, total - sum(parts)]


def _exact_sites(sides: list[tuple[np.ndarray, np.ndarray]]) -> list[Update]:
    """One equally weighted site per ``(B, A)``, as float32 (every value here is exact in it)."""
    return [
        Update(f"s{i}", {_a(0): a.astype(np.float32), _b(0): b.astype(np.float32)}, 1)
        for i, (b, a) in enumerate(sides)
    ]


def _assert_dense_svd_optimum(updates: list[Update], rank: int) -> None:
    """The LoRA-product average's B A is the dense SVD's best rank-``rank`` product."""
    target = mean_product(updates, _a(0), _b(0))
    out = lora_product_average(updates, rank=rank)
    optimum, optimal_error = _best_rank_k(target, rank)
    got = out[_b(0)].astype(np.float64) @ out[_a(0)].astype(np.float64)
    assert np.linalg.norm(got - optimum) <= 1e-6 * np.linalg.norm(optimum)
    assert np.linalg.norm(target - got) == pytest.approx(optimal_error, rel=1e-6)


def test_product_average_with_singular_values_repeated_exactly_is_dense_svd_optimum(
    solved: list[object],
) -> None:
    """ΔW = 0.3 (4 times) and 0.0125 (4 times): a Krylov space from one start vector holds one
    direction per distinct singular value, so it turns invariant after 2 steps, where every
    residual is zero but only one 0.3 was found. The solver hands over to the exact SVD."""
    generator = np.random.default_rng(7)
    rank, out_dim, in_dim, half = 4, 64, 48, 5
    a_top, a_rest = np.eye(in_dim)[:rank], np.eye(in_dim)[rank : 2 * rank]
    b_top, b_rest = 3.0 * np.eye(out_dim)[:, :rank], np.eye(out_dim)[:, rank : 2 * rank]
    # half the sites carry A_top, half -A_top + A_rest / 8, with Σ_first B_i = B_top + B_rest and
    # Σ_second B_i = B_rest: ΔW = (B_top A_top + B_rest A_rest / 8) / 10
    first = _integers_summing_to(generator, b_top + b_rest, half)
    second = _integers_summing_to(generator, b_rest, half)
    _assert_dense_svd_optimum(
        _exact_sites([(b, a_top) for b in first] + [(b, -a_top + a_rest / 8) for b in second]), rank
    )
    assert solved == [None]


def test_product_average_finds_top_directions_orthogonal_to_the_mean_a(solved: list[object]) -> None:
    """The solver starts in the row space of the sites' mean A. Here ΔW's top directions (input
    coordinates 0-3) are orthogonal to it, exactly: the two sites that carry them have A and -A
    there, and every value is exact, so no rounding leaks into them. A start in the mean A's rows
    alone converges to the top of the other 44 directions; its random share finds the top ones."""
    rank, out_dim, in_dim = 4, 64, 48
    eye_in, eye_out = np.eye(in_dim), np.eye(out_dim)
    top = [
        (eye_out[:, :rank] * [6.0, 5.0, 4.0, 3.0], eye_in[:rank]),
        (np.zeros((out_dim, rank)), -eye_in[:rank]),
    ]
    rest_sigma = np.concatenate([[2.0, 1.875, 1.75, 1.625], (1 + np.arange(40) / 64) / 64])  # exact
    rest = [
        (eye_out[:, columns] * rest_sigma[columns.start - rank : columns.stop - rank], eye_in[columns])
        for columns in (slice(start, start + rank) for start in range(rank, in_dim, rank))
    ]
    _assert_dense_svd_optimum(_exact_sites(top + rest), rank)
    assert solved[0] is not None  # the iterative solver, not the exact fallback


def test_product_average_of_sites_near_one_adapter_is_the_optimum_to_float32_rounding(
    solved: list[object],
) -> None:
    """Sites that moved apart from one shared adapter (the federated case): the top singular
    values stand ~90x above the rest, and the solver, which stops early on such a gap, still lands
    within 1e-7 of the dense SVD's best product (the float32 result's own rounding is 3.5e-8)."""
    generator = np.random.default_rng(3)
    rank, out_dim, in_dim = 4, 96, 64
    shared_a, shared_b = generator.normal(size=(rank, in_dim)), generator.normal(size=(out_dim, rank))
    updates = [
        Update(
            f"s{i}",
            {
                _a(0): (shared_a + 0.3 * generator.normal(size=shared_a.shape)).astype(np.float32),
                _b(0): (shared_b + 0.3 * generator.normal(size=shared_b.shape)).astype(np.float32),
            },
            int(generator.integers(10, 100)),
        )
        for i in range(30)
    ]
    target = mean_product(updates, _a(0), _b(0))
    spectrum = np.linalg.svd(target, compute_uv=False)
    assert spectrum[rank - 1] / spectrum[rank] > 50
    out = lora_product_average(updates, rank=rank)
    optimum, _ = _best_rank_k(target, rank)
    got = out[_b(0)].astype(np.float64) @ out[_a(0)].astype(np.float64)
    assert solved[0] is not None
    assert np.linalg.norm(got - optimum) <= 1e-7 * np.linalg.norm(optimum)


def test_product_average_falls_back_to_exact_svd_when_unconverged(
    rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch, solved: list[object]
) -> None:
    """A solver that never meets its tolerance returns None, and the exact SVD takes over."""
    monkeypatch.setattr(aggregation, "_RESIDUAL_TOL", -1.0)  # no residual is below it
    updates = [
        Update(f"s{i}", make_adapter(rng, modules=1, out_dim=64, in_dim=48, rank=8, head=False), 1 + i)
        for i in range(12)
    ]
    out = lora_product_average(updates, rank=8)
    target = mean_product(updates, _a(0), _b(0))
    optimum, _ = _best_rank_k(target, 8)
    got = out[_b(0)].astype(np.float64) @ out[_a(0)].astype(np.float64)
    assert solved == [None]
    assert np.linalg.norm(got - optimum) <= 1e-6 * np.linalg.norm(optimum)


def test_product_average_many_terms_pads_and_keeps_low_rank_exact(rng: np.random.Generator) -> None:
    """Identical sites: ΔW has rank 3 although R = 60 > 40; the result is exact, the rest zeros."""
    site = make_adapter(rng, out_dim=40, in_dim=50, rank=3, head=False)
    updates = [Update(f"s{i}", site, 1) for i in range(20)]
    out = lora_product_average(updates, rank=5)
    got = out[_b(0)].astype(np.float64) @ out[_a(0)].astype(np.float64)
    target = mean_product(updates, _a(0), _b(0))
    assert np.linalg.norm(got - target) <= 1e-6 * np.linalg.norm(target)
    assert np.abs(out[_b(0)][:, 3:]).max() <= 1e-6 * np.abs(out[_b(0)]).max()


def test_product_average_applies_scales(rng: np.random.Generator) -> None:
    updates = [
        Update("a", make_adapter(rng, rank=2, head=False), 1),
        Update("b", make_adapter(rng, rank=4, head=False), 3),
    ]
    scales = {"a": 16 / 2, "b": 16 / 4}  # alpha=16 at both sites
    out = lora_product_average(updates, rank=6, scales=scales, out_scale=16 / 6)
    target = (
        0.25 * 8.0 * (updates[0].arrays[_b(0)] @ updates[0].arrays[_a(0)])
        + 0.75 * 4.0 * (updates[1].arrays[_b(0)] @ updates[1].arrays[_a(0)])
    ) / (16 / 6)
    np.testing.assert_allclose(out[_b(0)] @ out[_a(0)], target, atol=1e-5)
    with pytest.raises(ValueError, match="scales"):
        lora_product_average(updates, rank=6, scales={"a": 1.0})


def test_separate_factor_average_is_not_mean_product(
    rng: np.random.Generator,
) -> None:
    """Documents why FedAvg of A and B is wrong: mean(B) mean(A) != mean(B A)."""
    updates = [Update(f"s{i}", make_adapter(rng, rank=4), 1) for i in range(3)]
    true_mean = mean_product(updates, _a(0), _b(0))
    naive = fedavg(updates)
    naive_product = naive[_b(0)].astype(np.float64) @ naive[_a(0)]
    relative_error = np.linalg.norm(naive_product - true_mean) / np.linalg.norm(true_mean)
    assert not np.allclose(naive_product, true_mean, atol=1e-3)
    assert relative_error > 0.1
    aware = lora_product_average(updates, rank=12)
    np.testing.assert_allclose(aware[_b(0)] @ aware[_a(0)], true_mean, atol=1e-5)


# --------------------------------------------------------------------- scale run


def test_hundred_site_aggregation_runs(rng: np.random.Generator, capsys: pytest.CaptureFixture[str]) -> None:
    reference = make_adapter(rng, modules=30, out_dim=576, in_dim=576, rank=8, scale=0.02, head=False)
    updates = [Update(f"site{i:03d}", perturbed(rng, reference, 0.001), 100 + i) for i in range(100)]
    t0 = time.perf_counter()
    accepted, rejected = validate_updates(updates, reference)
    t1 = time.perf_counter()
    averaged = fedavg(accepted)
    t2 = time.perf_counter()
    aware = lora_product_average(accepted, rank=8)
    t3 = time.perf_counter()
    assert len(accepted) == 100
    assert not rejected
    assert {k: v.shape for k, v in aware.items()} == {k: v.shape for k, v in reference.items()}
    assert all(np.isfinite(v).all() for v in aware.values())
    assert payload_bytes(averaged) == payload_bytes(reference) == 30 * 2 * 576 * 8 * 4
    with capsys.disabled():
        print(
            f"\n100 sites x 30 modules (576x8 + 8x576, "
            f"{payload_bytes(reference) / 1e6:.2f} MB/site): "
            f"validate {t1 - t0:.3f}s, fedavg {t2 - t1:.3f}s, "
            f"lora_product_average(rank=8) {t3 - t2:.3f}s"
        )
