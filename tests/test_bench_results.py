"""bench/RESULTS.md's training-speed tables are the ones bench/results_tables.py makes from the raw JSON."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench"


def test_results_md_tables_are_generated_from_the_committed_raw_results(tmp_path: Path) -> None:
    check = [sys.executable, str(BENCH / "results_tables.py"), "--check"]
    assert subprocess.run(check, capture_output=True).returncode == 0, "run python bench/results_tables.py"
    edited = tmp_path / "RESULTS.md"
    end = "<!-- end: generated tables -->"
    edited.write_text((BENCH / "RESULTS.md").read_text().replace(end, f"| a hand-typed row |\n{end}"))
    assert subprocess.run([*check, "--markdown", str(edited)], capture_output=True).returncode == 1
