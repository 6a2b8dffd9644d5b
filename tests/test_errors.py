"""Input mistakes end in a message naming the key, file or folder, with exit code 2, never a traceback."""

from __future__ import annotations

import json
from pathlib import Path

from launcher.errors import BAD_INPUT_EXIT_CODE
from tests.conftest import REPO, flotilla, tiny_job


def assert_clear_input_error(result, *expected: str) -> None:  # type: ignore[no-untyped-def]
    output = result.stdout + result.stderr
    assert result.returncode == BAD_INPUT_EXIT_CODE, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    for text in expected:
        assert text in " ".join(output.split()), (text, output[-3000:])


def test_an_unfreeze_pattern_that_matches_nothing_names_the_key(
    tiny_llama: Path, tmp_path: Path, write_spec
) -> None:
    spec = tiny_job(
        tiny_llama, tmp_path, model={"unfreeze_schedule": [{"step": 2, "patterns": ["no_such_layer"]}]}
    )
    result = flotilla("run", str(write_spec(spec)))
    assert_clear_input_error(result, "model.unfreeze_schedule", "no_such_layer")


def test_an_init_from_adapter_of_another_shape_names_the_key(
    tiny_llama: Path, tmp_path: Path, write_spec
) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    other = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_llama), LoraConfig(r=2, target_modules="all-linear")
    )
    other.save_pretrained(tmp_path / "rank-2")
    spec = tiny_job(tiny_llama, tmp_path, peft={"r": 4, "init_from": str(tmp_path / "rank-2")})
    result = flotilla("run", str(write_spec(spec)))
    assert_clear_input_error(result, "peft.init_from", "does not fit")


def test_report_on_a_federation_work_dir_points_to_fed_report(tmp_path: Path) -> None:
    (tmp_path / "rounds.jsonl").write_text(json.dumps({"round": 0}) + "\n")
    (tmp_path / "plan.json").write_text("{}")
    assert_clear_input_error(flotilla("report", str(tmp_path)), "federation work dir", "flotilla fed report")


def test_a_path_longer_than_the_filesystem_allows_is_no_traceback() -> None:
    result = flotilla("validate", str(REPO / "configs" / "quickstart.yaml"), "data.train=" + "x" * 5000)
    output = result.stdout + result.stderr
    assert "Traceback" not in output and result.returncode in (0, BAD_INPUT_EXIT_CODE), output[-2000:]


def test_a_resume_of_another_jobs_run_dir_names_both_jobs(
    tiny_llama: Path, tmp_path: Path, write_spec
) -> None:
    from launcher.plan import prepare_run

    other = prepare_run(write_spec(tiny_job(tiny_llama, tmp_path, name="other"), "other.yaml"), [])
    mine = write_spec(tiny_job(tiny_llama, tmp_path), "mine.yaml")
    result = flotilla("run", str(mine), "--resume", str(other.run_dir))
    assert_clear_input_error(result, "is a run of job 'other'", "is job 'tiny'")


def test_a_chat_template_that_does_not_render_prefix_by_prefix_names_the_format(
    tiny_llama: Path, tmp_path: Path, write_spec
) -> None:
    import shutil

    model = tmp_path / "odd-template"
    shutil.copytree(tiny_llama, model)
    (model / "chat_template.jinja").write_text(  # marks the last turn: a prefix renders differently
        "{% for m in messages %}{% if loop.last %}LAST {% endif %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    )
    chat = str(REPO / "configs" / "data" / "chat.jsonl")
    data = {"train": chat, "validation": chat, "format": "chat"}
    result = flotilla("run", str(write_spec(tiny_job(model, tmp_path, data=data))))
    assert_clear_input_error(result, "format 'chat'", "does not render a conversation prefix by prefix")
