"""Spec validation: every problem at once, with file, line, key path, value and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from launcher.errors import SpecError
from launcher.spec.load import load_spec, parse_yaml, validate_spec
from launcher.spec.rules import guardrail_warnings

REPO = Path(__file__).resolve().parent.parent
MINIMAL = {"name": "job", "model": {"path": "smollm2-135m-instruct"}, "data": {"train": "x.jsonl"}}


def problems_of(data: dict, overrides: list[str] | None = None) -> list[str]:
    with pytest.raises(SpecError) as caught:
        validate_spec(data, "job.yaml", overrides or [])
    return caught.value.problems


SHIPPED = sorted(str(p.relative_to(REPO / "configs")) for p in (REPO / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_validate(name: str) -> None:
    """Job specs, the federation spec and the sites' deployment specs, each by its own schema."""
    from federated.spec import load_federation, load_site

    path = REPO / "configs" / name
    if name == "federated.yaml":
        assert load_federation(path).sites
    elif name.endswith(".deploy.yaml"):
        assert load_site(path).site
    else:
        assert load_spec(path).name


def test_all_problems_reported_at_once_with_lines_and_did_you_mean(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(
        "name: job\nmodel:\n  path: m\n  tsk: causal_lm\ndata:\n  train: x.jsonl\n"
        "train:\n  learning_rate: -1\n  scheduler: cosnie\n"
    )
    with pytest.raises(SpecError) as caught:
        load_spec(path)
    text = str(caught.value)
    assert str(path) in text and "3 problems" in text
    assert "line 4: model.tsk: unknown key; did you mean 'task'?" in text
    assert "line 8: train.learning_rate: -1 is not allowed" in text
    assert "line 9: train.scheduler: 'cosnie' is not allowed" in text and "'cosine'" in text


def test_missing_sections_and_wrong_top_level() -> None:
    assert any(
        "model: required key is missing" in p for p in problems_of({"name": "x", "data": {"train": "a"}})
    )
    with pytest.raises(SpecError, match="top level must be a mapping"):
        parse_yaml("- a\n- b\n", "job.yaml")
    with pytest.raises(SpecError, match="line 2, column"):
        parse_yaml("a: [1,\nb: }\n", "job.yaml")


def test_overrides_apply_and_are_validated() -> None:
    spec = validate_spec(MINIMAL, "job.yaml", ["train.max_steps=5", "peft.r=4"])
    assert spec.train.max_steps == 5 and spec.peft.r == 4
    assert any("train.max_steps" in p for p in problems_of(MINIMAL, ["train.max_steps=-2"]))
    assert any("expected key.path=value" in p for p in problems_of(MINIMAL, ["nonsense"]))


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"model": {"path": "m", "task": "sequence_classification"}}, "sequence_classification needs format"),
        ({"data": {"train": "x", "format": "classification"}}, "causal_lm takes"),
        ({"resources": {"precision": "fp16", "device": "cpu"}}, "fp16 needs a GPU"),
        ({"train": {"micro_batch_size": 3, "global_batch_size": 8}}, "not divisible"),
        ({"resources": {"zero": {"stage": 2}}}, "ZeRO needs DeepSpeed"),
        ({"eval": {"metrics": ["accuracy"]}}, "do not apply"),
        ({"data": {"train": "x", "validation_ratio": 0.0}, "eval": {"steps": 5}}, "needs validation data"),
        (
            {"train": {"early_stopping": {"metric": "eval_f1"}}, "eval": {"steps": 5}},
            "did you mean 'eval_loss'",
        ),
        (
            {"train": {"early_stopping": {"metric": "eval_loss", "mode": "max"}}, "eval": {"steps": 5}},
            "eval_loss is better when lower: use mode: min",
        ),
        ({"data": {"train": "x", "labels": ["a", "a"]}}, "data.labels"),
        ({"train": {"logit_adjustment": 1.0}}, "train.logit_adjustment"),
        ({"data": {"train": "x", "shuffle": False, "group_by_length": True}}, "choose one"),
        (
            {"model": {"path": "m", "task": "sequence_classification", "attention": "per_document"}},
            "per_document applies to model.task='causal_lm'",
        ),
    ],
)
def test_cross_field_rules(change: dict, needle: str) -> None:
    assert any(needle in p for p in problems_of({**MINIMAL, **change})), problems_of({**MINIMAL, **change})


def test_learning_rate_guardrail_warns_for_full_fine_tune() -> None:
    spec = validate_spec({**MINIMAL, "peft": {"method": "none"}, "train": {"learning_rate": 5e-4}}, "j", [])
    assert any("full fine-tune" in w for w in guardrail_warnings(spec))
    assert not guardrail_warnings(validate_spec(MINIMAL, "j", []))


yaml_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=12),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)
spec_keys = st.sampled_from(
    ["name", "model", "data", "peft", "train", "eval", "resources", "seed", "slurm", "ray"]
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(spec_keys | st.text(max_size=8), yaml_values, max_size=6))
def test_fuzzed_specs_never_raise_anything_but_spec_error(data: dict) -> None:
    text = yaml.safe_dump(data)
    try:
        parsed, lines = parse_yaml(text, "fuzz.yaml")
        validate_spec(parsed, "fuzz.yaml", [], lines)
    except SpecError as exc:
        assert "fuzz.yaml" in str(exc)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_fuzzed_yaml_text_never_raises_anything_but_spec_error(text: str) -> None:
    try:
        parsed, lines = parse_yaml(text, "fuzz.yaml")
        validate_spec(parsed, "fuzz.yaml", [], lines)
    except SpecError:
        pass
