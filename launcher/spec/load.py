"""Read a job spec from YAML, apply ``key.path=value`` overrides, validate, report every problem."""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from launcher.errors import SpecError
from launcher.spec.models import JobSpec
from launcher.spec.rules import spec_problems

Location = tuple[str | int, ...]
M = TypeVar("M", bound=BaseModel)


#: A cross-field rule: ``(key path, message)`` for every problem of a validated spec.
Rule = Callable[[Any], list[tuple[str, str]]]


def load_spec(path: str | Path, overrides: list[str] | None = None, rules: Sequence[Rule] = ()) -> JobSpec:
    """Load, override and validate ``path``; raise one :class:`SpecError` listing every problem.

    ``rules`` run after the spec's own cross-field rules (the plan adds its DeepSpeed check)."""
    return load_yaml_model(JobSpec, path, overrides or [], [spec_problems, *rules])


def validate_spec(
    data: dict[str, Any],
    source: str,
    overrides: list[str],
    lines: dict[Location, int] | None = None,
    rules: Sequence[Rule] = (),
) -> JobSpec:
    """Validate a mapping (after overrides) into a :class:`JobSpec`."""
    return validate_model(JobSpec, data, source, overrides, lines or {}, [spec_problems, *rules])


def load_yaml_model(model: type[M], path: str | Path, overrides: list[str], rules: Sequence[Rule]) -> M:
    """Read a YAML file of any spec kind (job, federation, site) into ``model``, every problem at once."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(str(path), [f"cannot read the file: {exc}"]) from None
    data, lines = parse_yaml(text, str(path))
    return validate_model(model, data, str(path), overrides, lines, rules)


def parse_yaml(text: str, source: str) -> tuple[dict[str, Any], dict[Location, int]]:
    """Parse YAML text into a mapping plus the line number of every key path."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        reason = getattr(exc, "problem", None) or str(exc)
        raise SpecError(source, [f"{where}invalid YAML: {reason}"]) from None
    if not isinstance(data, dict):
        kind = "empty" if data is None else f"a {type(data).__name__}"
        raise SpecError(source, [f"the top level must be a mapping of sections, got {kind}"])
    lines: dict[Location, int] = {}
    if node is not None:
        _collect_lines(node, (), lines)
    return data, lines


def validate_model(
    model: type[M],
    data: dict[str, Any],
    source: str,
    overrides: list[str],
    lines: dict[Location, int],
    rules: Sequence[Rule],
) -> M:
    """Apply ``overrides`` to ``data``, validate it into ``model``, then run the cross-field ``rules``."""
    data = dict(data)
    problems = [problem for problem in (apply_override(data, o) for o in overrides) if problem]
    if problems:
        raise SpecError(source, problems)
    try:
        spec = model.model_validate(data)
    except ValidationError as exc:
        raise SpecError(source, [_describe(err, lines, data, model) for err in exc.errors()]) from None
    cross = [problem for rule in rules for problem in rule(spec)]
    if cross:
        raise SpecError(source, [_with_line(key, message, lines) for key, message in cross])
    return spec


def apply_override(data: dict[str, Any], override: str) -> str | None:
    """Set ``a.b.c=value`` (value parsed as YAML) in ``data``; return a problem or None."""
    key, sep, raw = override.partition("=")
    if not sep or not key.strip():
        return f"override {override!r}: expected key.path=value"
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    parts = key.strip().split(".")
    target: Any = data
    for depth, part in enumerate(parts[:-1]):
        child = target.get(part) if isinstance(target, dict) else None
        if child is None:
            child = {}
            target[part] = child
        elif not isinstance(child, dict):
            where = ".".join(parts[: depth + 1])
            return f"override {override!r}: {where} is not a section"
        target = child
    target[parts[-1]] = value
    return None


def _with_line(key: str, message: str, lines: dict[Location, int]) -> str:
    location: Location = tuple(
        int(part) if part.isdigit() else part for part in re.split(r"[.\[\]]+", key) if part
    )
    line = _nearest_line(location, lines)
    return f"{'line ' + str(line) + ': ' if line else ''}{key}: {message}"


def _collect_lines(node: yaml.Node, location: Location, lines: dict[Location, int]) -> None:
    lines[location] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = ((*location, key_node.value)) if isinstance(key_node, yaml.ScalarNode) else location
            lines[key] = key_node.start_mark.line + 1
            _collect_lines(value_node, key, lines)
            lines[key] = key_node.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _collect_lines(item, (*location, index), lines)


def _describe(error: Any, lines: dict[Location, int], data: Any, model: type[BaseModel]) -> str:
    location = _user_location(tuple(error["loc"]), data)
    key_path = _format_location(location) or "(top level)"
    line = _nearest_line(location, lines)
    where = f"line {line}: " if line else ""
    if error["type"] == "extra_forbidden" and location:
        allowed = _allowed_keys(model, location[:-1])
        hint = difflib.get_close_matches(str(location[-1]), allowed, n=1)
        suggestion = f"; did you mean {hint[0]!r}?" if hint else ""
        return f"{where}{key_path}: unknown key{suggestion} (allowed: {', '.join(allowed)})"
    if error["type"] == "missing":
        return f"{where}{key_path}: required key is missing"
    value = _short(error.get("input"))
    return f"{where}{key_path}: {value} is not allowed: {error['msg']}"


def _user_location(location: Location, data: Any) -> Location:
    """Keep the parts of pydantic's error location that are real keys or indexes of the input.

    The rest are pydantic's union and validator markers (``str``, ``list[DataSource]``...); a key
    that is missing from the input (a required key) is kept when it is the last part.
    """
    kept: list[str | int] = []
    current = data
    for position, part in enumerate(location):
        in_dict = isinstance(current, dict) and part in current
        in_list = isinstance(current, list) and isinstance(part, int) and 0 <= part < len(current)
        if in_dict or in_list:
            current = current[part]
        elif position == len(location) - 1 and isinstance(part, str) and isinstance(current, dict):
            current = None
        else:
            continue
        kept.append(part)
    return tuple(kept)


def _format_location(location: Location) -> str:
    text = ""
    for part in location:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _nearest_line(location: Location, lines: dict[Location, int]) -> int | None:
    for end in range(len(location), -1, -1):
        if location[:end] in lines and (end or location == ()):
            return lines[location[:end]]
    return None


def _allowed_keys(root: type[BaseModel], location: Location) -> list[str]:
    model: type[BaseModel] | None = root
    for part in location:
        if model is None:
            return []
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        model = _model_of(field.annotation) if field else None
    return sorted(model.model_fields) if model else []


def _model_of(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _model_of(arg)
        if found:
            return found
    return None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def resolve_relative_paths(spec: JobSpec, spec_file: Path, overrides: Sequence[str] = ()) -> JobSpec:
    """Make the job's local paths absolute by :class:`RelativePaths`.

    Workers may start in another directory (Slurm, Ray), so the plan only holds absolute paths.
    """
    resolve = RelativePaths(spec_file, overrides)
    for key, sources in (("data.train", spec.data.train), ("data.validation", spec.data.validation)):
        for source in sources:
            source.path = resolve(
                source.path, key, named=Path(source.path).suffix.lower() not in DATA_SUFFIXES
            )
    spec.data.cache_dir = resolve(spec.data.cache_dir, "data.cache_dir")
    spec.model.path = resolve(spec.model.path, "model.path", named=True)
    spec.peft.init_from = resolve(spec.peft.init_from, "peft.init_from", named=True)
    spec.output.dir = resolve(spec.output.dir, "output.dir") or spec.output.dir
    return spec


#: Suffixes of local data files: such a path is a file even before it exists (never a hub name).
DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".pq")


class RelativePaths:
    """The one rule for relative paths in every spec kind (job, federation, site).

    A relative path written in a spec file is relative to that file's folder, wherever the command
    runs; one given on the command line (``key=value``) is relative to the current directory. A value
    that may also be a name (a model alias, a hub id, a hub dataset: ``named``) is taken as a path
    only when it names something there, else it stays as written.
    """

    def __init__(self, spec_file: Path, overrides: Sequence[str] = ()) -> None:
        self.folder = Path(os.path.abspath(spec_file)).parent
        self.overridden = [item.split("=", 1)[0].strip() for item in overrides if "=" in item]

    def __call__(self, value: str | None, key: str, *, named: bool = False) -> str | None:
        """``value`` (the value of ``key``, a dotted key path) made absolute."""
        if value is None or Path(value).is_absolute():
            return value
        base = Path.cwd() if self.from_command_line(key) else self.folder
        candidate = os.path.normpath(base / value)
        if named and not _exists(candidate):
            return value
        return candidate

    def from_command_line(self, key: str) -> bool:
        """Whether ``key`` (or a section holding it, or a part of it) was set by an override."""
        return any(
            key == item or key.startswith(item + ".") or item.startswith(key + ".")
            for item in self.overridden
        )


def _exists(path: str) -> bool:
    try:
        return Path(path).exists()
    except OSError:  # a name the filesystem refuses (too long): it names nothing here
        return False
