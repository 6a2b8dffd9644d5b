"""One rule for relative paths in every spec kind (README, "Relative paths"): written in a spec file,
relative to that file's folder wherever the command runs; given on the command line, relative to the
current directory. Each test runs from a folder holding decoys of the same names, so a path resolved
against the current directory instead is caught.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from federated.spec import load_federation, load_site
from launcher.plan import load_job


@pytest.fixture
def elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The current directory: a folder with decoy files named like the spec's."""
    cwd = tmp_path / "cwd" / "deep"
    cwd.mkdir(parents=True)
    for name in ("rows.jsonl", "site.yaml", "ca.crt", "site.key"):
        (cwd / name).write_text("decoy")
    monkeypatch.chdir(cwd)
    return cwd


def write(path: Path, spec: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(spec))
    return path


def test_a_job_specs_paths_are_relative_to_its_folder_and_overrides_to_the_cwd(
    tmp_path: Path, elsewhere: Path
) -> None:
    folder = tmp_path / "project"
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "rows.jsonl").write_text("{}")
    spec = write(
        folder / "job.yaml",
        {
            "name": "job",
            "model": {"path": "smollm2-135m-instruct"},
            "data": {"train": "data/rows.jsonl", "validation": "data/not-yet.jsonl", "cache_dir": "cache"},
            "output": {"dir": "runs"},
        },
    )
    job = load_job(spec, [])
    assert job.data.train[0].path == str(folder / "data" / "rows.jsonl")
    assert job.data.validation[0].path == str(folder / "data" / "not-yet.jsonl")  # a file, even missing
    assert job.data.cache_dir == str(folder / "cache")
    assert job.output.dir == str(folder / "runs")
    assert job.model.path == "smollm2-135m-instruct"  # an alias names nothing here: kept as written

    overridden = load_job(spec, ["data.train=rows.jsonl", "output.dir=mine"])
    assert overridden.data.train[0].path == str(elsewhere / "rows.jsonl")  # typed in a shell: the cwd
    assert overridden.output.dir == str(elsewhere / "mine")
    assert overridden.data.validation[0].path == str(folder / "data" / "not-yet.jsonl")


def test_a_federation_specs_output_lands_beside_it_not_at_the_filesystem_root(
    tmp_path: Path, elsewhere: Path
) -> None:
    folder = tmp_path / "consortium" / "specs"
    write(folder / "site.yaml", {"name": "s", "model": {"path": "minilm-l6"}, "data": {"train": "x.jsonl"}})
    spec = write(
        folder / "fed.yaml",
        {
            "name": "fed",
            "model": {"path": "minilm-l6", "task": "sequence_classification"},
            "labels": ["a", "b"],
            "sites": {"site_a": "site.yaml"},
            "min_sites": 1,
            "server": {"keys": "../keys"},
            "output": "../../runs",
        },
    )
    fed = load_federation(spec)
    assert fed.output == str(tmp_path / "runs")
    assert fed.sites["site_a"] == str(folder / "site.yaml")
    assert fed.server.keys == str(tmp_path / "consortium" / "keys")
    assert load_federation(spec, ["output=here"]).output == str(elsewhere / "here")


def test_a_site_specs_job_keys_and_work_dir_are_relative_to_its_folder(
    tmp_path: Path, elsewhere: Path
) -> None:
    folder = tmp_path / "site_a"
    spec = write(
        folder / "site_a.deploy.yaml",
        {
            "site": "site_a",
            "job": "site.yaml",
            "superlink": "127.0.0.1:9092",
            "ca_cert": "../keys/ca.crt",
            "private_key": "../keys/site.key",
            "work_dir": "work",
        },
    )
    site = load_site(spec)
    assert site.job == str(folder / "site.yaml")
    assert site.ca_cert == str(tmp_path / "keys" / "ca.crt")
    assert site.private_key == str(tmp_path / "keys" / "site.key")
    assert site.work_dir == str(folder / "work")
