"""``flotilla``: validate | preprocess | plan | run | submit | sweep | status | logs | cancel | eval | export | report.

Thin: parses arguments, calls the layers below, prints. Bad input ends with a message, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from launcher.backends import find_job, get_backend, write_job_record
from launcher.errors import FlotillaError
from launcher.plan import (
    build_plan,
    cheapest_fit,
    estimate,
    format_bytes,
    load_job,
    parse_size,
    prepare_run,
    reopen_run,
    setup_for_spec,
    shape_for_spec,
    usable_bytes,
    with_backend,
)
from launcher.processes import QUIET_ENV
from launcher.redact import redact_text
from launcher.report import load_run, write_comparison, write_report
from launcher.rundir import hang_diagnosis
from launcher.spec import JobSpec, guardrail_warnings
from launcher.sweep import (
    is_sweep_dir,
    parse_grid_options,
    parse_space_options,
    run_sweep,
    sweep_cancel,
    sweep_logs,
    sweep_status,
)

console = Console(stderr=True, highlight=False)
out = Console(highlight=False)

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}
#: Entry-point group of sub-commands contributed by other packages: ``add_commands(sub, COMMANDS)``.
PLUGIN_GROUP = "flotilla.commands"


def command(
    name: str,
) -> Callable[[Callable[[argparse.Namespace], int]], Callable[[argparse.Namespace], int]]:
    """Register a sub-command handler."""

    def register(handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        COMMANDS[name] = handler
        return handler

    return register


@command("validate")
def cmd_validate(args: argparse.Namespace) -> int:

    spec = load_job(Path(args.spec), args.overrides)
    for warning in guardrail_warnings(spec):
        console.print("[yellow]warning:[/]", escape(warning))
    out.print(f"[green]ok[/] {args.spec}: job {spec.name!r}, backend {spec.resources.backend}")
    return 0


@command("preprocess")
def cmd_preprocess(args: argparse.Namespace) -> int:
    """Prepare (tokenize and cache) a job's data and print its report, without training."""
    from launcher.data import cache_root, prepare_data  # datasets: only for this command
    from launcher.model import load_tokenizer  # transformers: only for this command

    spec = load_job(Path(args.spec), args.overrides)
    root = cache_root(spec.data, Path(spec.output.dir).resolve())
    data = prepare_data(spec.data, load_tokenizer(spec.model), spec.seed, root, console=console.print)
    for line in data.report.summary_lines():
        out.print(f"data: {escape(line)}", soft_wrap=True)
    for warning in data.report.warnings():
        console.print("[yellow]data warning:[/]", escape(warning))
    out.print(f"prepared data: {data.cache_folder}", soft_wrap=True)
    return 0


@command("plan")
def cmd_plan(args: argparse.Namespace) -> int:

    spec = load_job(Path(args.spec), args.overrides)
    plan = build_plan(spec, Path(spec.output.dir) / spec.name / "<timestamp>")
    plan.warnings = guardrail_warnings(spec)
    out.print_json(plan.to_json())
    if args.fit and not args.gpu_memory:
        raise FlotillaError("--fit needs --gpu-memory (e.g. --gpu-memory 80GiB)")
    _print_memory(spec, args)
    return 0


def _print_memory(spec: JobSpec, args: argparse.Namespace) -> None:
    """The per-GPU memory estimate of ``spec`` and, with ``--fit``, the cheapest setup that fits."""

    try:
        gpu_memory = parse_size(args.gpu_memory) if args.gpu_memory else None
    except ValueError as exc:
        raise FlotillaError(f"--gpu-memory: {exc}") from None
    shape = shape_for_spec(spec)
    setup = setup_for_spec(spec, args.gpus)
    mine = estimate(shape, setup)
    table = Table(
        title=f"memory per GPU: {setup.nodes} node(s) × {setup.gpus_per_node} GPU(s), ZeRO-{setup.stage}"
    )
    table.add_column("component")
    table.add_column("estimate", justify="right")
    for name, value in mine.rows():
        table.add_row(name, format_bytes(value))
    out.print(table)
    out.print(
        f"model: {shape.total_params:,} parameters, {shape.trainable_params:,} trainable; micro batch "
        f"{setup.micro_batch_size} × {setup.seq_len} tokens, gradient checkpointing "
        f"{'on' if setup.gradient_checkpointing else 'off'}, {setup.precision}"
    )
    if gpu_memory is None:
        return
    budget = usable_bytes(gpu_memory)
    verdict = "fits" if mine.total <= budget else "does NOT fit"
    out.print(f"this setup {verdict} in {format_bytes(budget)} usable of {args.gpu_memory} per GPU")
    if not args.fit:
        return
    global_batch = spec.train.global_batch_size or spec.train.micro_batch_size * spec.world_size()
    found = cheapest_fit(shape, setup, gpu_memory, global_batch)
    if found is None:
        raise FlotillaError(
            f"nothing fits in {args.gpu_memory} per GPU on {setup.world} GPU(s), even ZeRO-3 with "
            "parameter and optimizer offload and micro batch 1: add GPUs or shorten data.max_length"
        )
    overrides = [*args.overrides, *found.overrides]
    if args.gpus:
        overrides.append(f"resources.gpus_per_node={args.gpus}")
    if spec.resources.backend != "deepspeed":
        overrides.insert(0, "resources.backend=deepspeed")
    out.print(
        f"cheapest fit: ZeRO-{found.setup.stage}, offload "
        f"{_offload_text(found.setup.offload_optimizer, found.setup.offload_params)}, gradient checkpointing "
        f"{'on' if found.setup.gradient_checkpointing else 'off'}, micro batch {found.setup.micro_batch_size}: "
        f"{format_bytes(found.estimate.total)} per GPU"
    )
    out.print(f"run it with: flotilla run {args.spec} {' '.join(overrides)}", markup=False)


def _offload_text(optimizer: bool, params: bool) -> str:
    return "optimizer + parameters" if params else ("optimizer" if optimizer else "none")


@command("run")
def cmd_run(args: argparse.Namespace) -> int:
    quiet = args.quiet or args.json
    say = Console(stderr=True, highlight=False, quiet=quiet)  # what a run shows while it trains
    json_out = _stdout_for_json() if args.json else None
    if quiet:
        os.environ[QUIET_ENV] = "1"  # inherited by every process of the job
    if args.resume:
        prepared = reopen_run(Path(args.resume))
        if args.spec:  # a spec beside --resume must be the run's own: the run dir's plan is what runs
            given = load_job(Path(args.spec), with_backend(args.overrides, args.backend))
            if given.name != prepared.spec.name:
                raise FlotillaError(
                    f"--resume {args.resume} is a run of job {prepared.spec.name!r}, but {args.spec} is job "
                    f"{given.name!r}; resume a run of this job, or run {args.spec} without --resume"
                )
        say.print(f"resuming run {prepared.run_dir}")
    elif args.spec:
        prepared = prepare_run(Path(args.spec), args.overrides, args.backend)
    else:
        raise FlotillaError("flotilla run needs a spec file (or --resume <run dir>)")
    for warning in prepared.plan.warnings:
        console.print("[yellow]warning:[/]", escape(warning))
    say.print(f"run directory: {prepared.run_dir}")
    handle = get_backend(prepared.plan.backend).launch(prepared.plan, say, wait=True)
    code = handle.exit_code or 0
    if code != 0:
        diagnosis = hang_diagnosis(prepared.run_dir)
        if diagnosis:
            console.print(escape(diagnosis.rstrip()), style="red")
        console.print(
            f"run ended with exit code {code}; resume with: flotilla run --resume {prepared.run_dir}"
        )
    if json_out is not None:
        json_out.write(json.dumps(run_result(prepared.run_dir, code), indent=2) + "\n")
        json_out.flush()
    elif code == 0:
        print_summary(prepared.run_dir)
    return code


def _stdout_for_json() -> TextIO:
    """A handle on the real stdout for the JSON alone; file descriptor 1 then goes to stderr, so what
    a library or a job's process prints (DeepSpeed logs to stdout at import) cannot mix into it."""
    sys.stdout.flush()
    real = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    return real


def run_result(run_dir: Path, exit_code: int) -> dict[str, Any]:
    """``flotilla run --json``: the run's outcome for scripts (summary.json's fields once finished)."""
    result: dict[str, Any] = {"run_dir": str(run_dir), "exit_code": exit_code, "finished": False}
    summary = run_dir / "summary.json"
    if exit_code == 0 and summary.is_file():
        result.update(json.loads(summary.read_text()), finished=True)
    else:
        result["resume"] = f"flotilla run --resume {run_dir}"
    return result


@command("submit")
def cmd_submit(args: argparse.Namespace) -> int:

    if args.dry_run:
        return _dry_run(args)
    prepared = prepare_run(Path(args.spec), args.overrides, args.backend)
    handle = get_backend(prepared.plan.backend).launch(prepared.plan, console, wait=False)
    write_job_record(handle)
    out.print(handle.job_id or str(prepared.run_dir))
    console.print(f"run directory: {prepared.run_dir}")
    return 0


def _dry_run(args: argparse.Namespace) -> int:

    spec = load_job(Path(args.spec), with_backend(args.overrides, args.backend))
    backend = get_backend(spec.resources.backend)
    render = getattr(backend, "render", None)
    if render is None:
        raise FlotillaError(f"--dry-run is not supported by the {spec.resources.backend} backend")
    out.print(
        redact_text(render(build_plan(spec, Path(spec.output.dir) / spec.name / "<timestamp>"))),
        markup=False,
        emoji=False,
        soft_wrap=True,
    )
    return 0


@command("sweep")
def cmd_sweep(args: argparse.Namespace) -> int:
    """Search over spec keys: every trial an ordinary run directory; the table and the best run."""
    options: dict[str, object] = {}
    if args.grid:
        options["grid"] = parse_grid_options(args.grid)
    if args.space:
        options["space"] = parse_space_options(args.space)
    for key in ("random", "metric", "mode", "backend", "max_concurrent", "scheduler", "seed"):
        if getattr(args, key) is not None:
            options[key] = getattr(args, key)
    outcome = run_sweep(Path(args.spec), args.overrides, options, console, wait=not args.detach)
    results = outcome.results
    metric = results["metric"]
    table = Table(title=f"sweep {outcome.directory.name}: {metric} ({results['mode']})")
    rows = results["trials"]
    columns = [c for c in dict.fromkeys(k for r in rows for k in r) if c not in ("run_dir", "wall_seconds")]
    for column in columns:
        table.add_column(column)
    best = (results["best"] or {}).get("trial")
    for row in rows:
        table.add_row(
            *(_cell(row.get(c)) for c in columns), style="bold green" if row["trial"] == best else None
        )
    out.print(table)
    out.print(
        f"results: {outcome.directory / 'results.csv'} (and results.json, comparison.html)", soft_wrap=True
    )
    if results["best"]:
        out.print(
            f"best: {best} {metric}={results['best'][metric]:.4f}: {results['best']['run_dir']}",
            soft_wrap=True,
        )
    return outcome.exit_code


def _cell(value: object) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


@command("status")
def cmd_status(args: argparse.Namespace) -> int:

    if is_sweep_dir(Path(args.job)):
        out.print(sweep_status(Path(args.job)), markup=False, soft_wrap=True)
        return 0
    backend, job_id, run_dir = find_job(args.job, args.backend)
    out.print(backend.status(job_id, run_dir))
    return 0


@command("logs")
def cmd_logs(args: argparse.Namespace) -> int:

    if is_sweep_dir(Path(args.job)):
        out.print(sweep_logs(Path(args.job), args.follow), markup=False, emoji=False, soft_wrap=True, end="")
        return 0
    backend, job_id, run_dir = find_job(args.job, args.backend)
    out.print(
        backend.logs(job_id, run_dir, follow=args.follow), markup=False, emoji=False, soft_wrap=True, end=""
    )
    return 0


@command("cancel")
def cmd_cancel(args: argparse.Namespace) -> int:

    if is_sweep_dir(Path(args.job)):
        cancelled = sweep_cancel(Path(args.job))
        out.print(f"cancelled {', '.join(cancelled) or 'nothing (every trial had ended)'}")
        return 0
    backend, job_id, run_dir = find_job(args.job, args.backend)
    backend.cancel(job_id, run_dir)
    out.print(f"cancelled {job_id}")
    return 0


@command("eval")
def cmd_eval(args: argparse.Namespace) -> int:
    from launcher.train import evaluate_target  # torch and transformers: only for this command

    metrics = evaluate_target(Path(args.target), args.data, args.format, args.batch_size, args.generate)
    table = Table(title=f"{args.target} on {args.data}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in metrics.items():
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    out.print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(metrics, indent=2))
    return 0


@command("export")
def cmd_export(args: argparse.Namespace) -> int:
    """Merge a run's LoRA adapter into its base model (and write a GGUF file), verified."""
    if not args.merge:
        raise FlotillaError(
            "flotilla export needs --merge (merging the LoRA adapter is the only export so far)"
        )
    if args.quant and not args.gguf:
        raise FlotillaError("--quant applies to --gguf only")
    from launcher.train import export_run  # torch and transformers: only for this command

    result = export_run(
        Path(args.target),
        Path(args.out) if args.out else None,
        (args.quant or "f16") if args.gguf else None,
        force=args.force,
    )
    out.print(
        f"merged model: {result.out} (logits within {result.merge_max_abs_diff:.2g} of base + adapter on "
        f"{result.probes} probes; allowed {result.merge_tolerance:g})",
        soft_wrap=True,
    )
    if result.labels:
        out.print(f"labels: {', '.join(result.labels)}", soft_wrap=True)
    if result.gguf_file:
        out.print(
            f"GGUF ({result.gguf_quant}): {result.gguf_file} (logits within {result.gguf_max_abs_diff:.2g} of "
            f"the merged model; allowed {result.gguf_tolerance:.2g})",
            soft_wrap=True,
        )
    return 0


@command("report")
def cmd_report(args: argparse.Namespace) -> int:
    runs = [Path(path) for path in args.run_dirs]
    if len(runs) == 1:
        load_run(runs[0])  # a clear error naming the path for anything that is not a finished run
        print_summary(runs[0])
        out.print(f"report: {write_report(runs[0], args.out and Path(args.out))}", soft_wrap=True)
        return 0
    page = write_comparison(runs, Path(args.out or "compare.html"))  # every run is read first
    out.print(f"comparison of {len(runs)} runs: {page.resolve()}", soft_wrap=True)
    return 0


def print_summary(run_dir: Path) -> None:
    """The end-of-run summary: where things are, and metrics before and after."""
    summary_file = run_dir / "summary.json"
    if not summary_file.is_file():
        raise FlotillaError(f"{run_dir} has no summary.json (the run has not finished)")
    summary = json.loads(summary_file.read_text())
    table = Table(title=f"run {run_dir.name}")
    table.add_column("metric")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    before, after = summary["before"], summary["after"]
    for key in sorted(set(before) | set(after)):
        if key.endswith(("_samples", "_steps", "epoch")) or key.startswith("epoch"):
            continue
        table.add_row(key, _fmt(before.get(key)), _fmt(after.get(key)))
    out.print(table)
    out.print(f"steps: {summary['steps']}   wall time: {summary['wall_seconds']:.1f} s")
    out.print(f"run directory: {run_dir}", soft_wrap=True)
    out.print(f"trained weights: {summary['artifact']}", soft_wrap=True)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every sub-command."""
    parser = argparse.ArgumentParser(prog="flotilla", description="Fine-tuning jobs from one YAML spec.")
    sub = parser.add_subparsers(dest="command", required=True)

    for name, text in (
        ("validate", "check a job spec"),
        ("preprocess", "tokenize and cache a job's data, print its report"),
        ("plan", "print the resolved plan"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("spec")
        p.add_argument("overrides", nargs="*", help="key.path=value")
    p.add_argument("--gpu-memory", help="memory of one GPU, e.g. 80GiB: says whether the job fits")
    p.add_argument("--gpus", type=int, help="GPUs per node (default: the spec's processes per node)")
    p.add_argument("--fit", action="store_true", help="find the cheapest setup that fits --gpu-memory")

    p = sub.add_parser("run", help="run a job and wait for it")
    p.add_argument("spec", nargs="?")
    p.add_argument("overrides", nargs="*", help="key.path=value")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last verified checkpoint")
    p.add_argument("--backend", choices=["local", "deepspeed", "ray", "slurm"])
    p.add_argument(
        "--quiet", action="store_true", help="no progress bar or data lines; warnings and errors only"
    )
    p.add_argument(
        "--json", action="store_true", help="print the outcome as JSON on stdout (implies --quiet)"
    )

    p = sub.add_parser("submit", help="submit a job to a scheduler and return its id")
    p.add_argument("spec")
    p.add_argument("overrides", nargs="*", help="key.path=value")
    p.add_argument("--backend", choices=["local", "deepspeed", "ray", "slurm"])
    p.add_argument("--dry-run", action="store_true", help="print what would be submitted")

    p = sub.add_parser("sweep", help="search over spec keys: a trial per point, the best run")
    p.add_argument("spec")
    p.add_argument("overrides", nargs="*", help="key.path=value (every trial)")
    p.add_argument("--grid", action="append", metavar="KEY=V1,V2", help="values of a key (repeatable)")
    p.add_argument(
        "--space",
        action="append",
        metavar="KEY=DIST",
        help="e.g. 'train.learning_rate=loguniform(1e-5,1e-3)'",
    )
    p.add_argument("--random", type=int, metavar="N", help="random samples of the space")
    p.add_argument("--metric", help="what the best trial is chosen by (default eval_loss)")
    p.add_argument("--mode", choices=["min", "max"])
    p.add_argument("--backend", choices=["local", "ray", "slurm"], help="where trials run (default local)")
    p.add_argument("--max-concurrent", type=int, metavar="K", help="trials at once (ray, slurm)")
    p.add_argument("--scheduler", choices=["none", "asha", "median"], help="early stopping of trials (ray)")
    p.add_argument("--seed", type=int, help="seed of the random samples (default the job's)")
    p.add_argument("--detach", action="store_true", help="slurm: submit the job array and return")

    for name, text in (("status", "state of a job"), ("logs", "output of a job"), ("cancel", "stop a job")):
        p = sub.add_parser(name, help=text)
        p.add_argument("job", help="run directory, sweep directory or the backend's job id")
        p.add_argument("--backend", choices=["local", "deepspeed", "ray", "slurm"])
        if name == "logs":
            p.add_argument("-f", "--follow", action="store_true")

    _add_plugin_commands(sub)

    p = sub.add_parser("eval", help="task metrics of a run or adapter on a dataset")
    p.add_argument("target", help="run directory or adapter folder")
    p.add_argument("--data", required=True)
    p.add_argument("--format", choices=["chat", "instruction", "text", "classification"])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--json", help="also write the metrics to this file")
    p.add_argument(
        "--generate", type=int, default=0, metavar="N", help="causal LM: ROUGE-L/BLEU on N generated answers"
    )

    p = sub.add_parser("export", help="merge a run's LoRA adapter into its base model, verified")
    p.add_argument("target", help="run directory or adapter folder")
    p.add_argument("--merge", action="store_true", help="merge the adapter into the base weights")
    p.add_argument("--out", help="output folder (default: <run dir>/export)")
    p.add_argument("--gguf", action="store_true", help="also write a GGUF file (Llama architecture)")
    p.add_argument("--quant", choices=["f16", "q8_0"], help="GGUF weight type (default f16)")
    p.add_argument("--force", action="store_true", help="replace an existing --out folder")

    p = sub.add_parser("report", help="a finished run's report.html, or several runs compared")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="one run, or two or more to compare")
    p.add_argument(
        "--out", help="where the page goes (default: <run dir>/report.html; compare.html for several)"
    )
    return parser


def _add_plugin_commands(sub: argparse._SubParsersAction) -> None:
    """Commands other installed packages register under the ``flotilla.commands`` entry-point group
    (``flotilla fed`` from the federated package): the launcher never imports them by name."""
    for entry in importlib.metadata.entry_points(group=PLUGIN_GROUP):
        try:
            add_commands = entry.load()
        except ImportError as exc:
            console.print(
                f"[yellow]warning:[/] the {entry.name!r} commands are unavailable: {escape(str(exc))}"
            )
            continue
        add_commands(sub, COMMANDS)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``flotilla`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except FlotillaError as exc:
        console.print("[red]error:[/]", escape(str(exc)))
        return exc.exit_code
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        return 130


if __name__ == "__main__":
    sys.exit(main())
