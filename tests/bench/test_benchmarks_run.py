"""Every benchmark runs once at its ``--quick`` size and prints its figures, so that the
benchmarks cannot rot. How fast they are is not checked here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
BENCHES = [
    "overhead",
    "saturation",
    "upload",
    "polling",
    "engine_cpu",
    "scaling",
    "local_model",
    "serve_memory",
    "scale_out",
    "litellm_compare",
    "form_stall",
    "results_follow",
]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", BENCHES)
def test_bench_runs_quick(name: str) -> None:
    proc = subprocess.run(
        [sys.executable, str(BENCH / f"{name}.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=290,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| " in proc.stdout and "|---" in proc.stdout, proc.stdout
    assert " cores" in proc.stdout  # every report names the machine
