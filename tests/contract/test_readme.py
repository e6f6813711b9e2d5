"""The README's quick start runs as written: its `requests.jsonl`, its Python example and its
`batchd submit --wait`, against `batchd serve` with no configuration (the embedded models)."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from batchd.localmodel.packages import SMOLLM2
from tests.support import Server, read_jsonl, start_server, write_config
from tests.unit.localmodel_support import weights_dir

README = Path(__file__).resolve().parents[2] / "README.md"
ADDRESS = "http://127.0.0.1:8000"  # where the README's server listens


def blocks(language: str) -> list[str]:
    """The README's fenced code blocks in ``language``, in order."""
    return re.findall(rf"^```{language}\n(.*?)^```", README.read_text(), re.M | re.S)


@pytest.fixture(scope="module")
def bare_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    weights_dir(SMOLLM2)
    tmp = tmp_path_factory.mktemp("readme")
    server = start_server(write_config(tmp, {}), tmp)  # as `batchd serve` with no config
    yield server
    server.proc.stop()


def test_quick_start_python_runs_as_written(bare_server: Server, tmp_path: Path) -> None:
    [requests] = blocks("jsonl")
    python = blocks("python")[0]
    assert ADDRESS + "/v1" in python
    (tmp_path / "requests.jsonl").write_text(requests)
    (tmp_path / "quick_start.py").write_text(python.replace(ADDRESS, bare_server.url))
    run = subprocess.run(
        [sys.executable, "quick_start.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0].startswith("completed BatchRequestCounts("), run.stdout
    assert "completed=2" in lines[0] and "failed=0" in lines[0]
    for custom_id in ("q1", "q2"):  # each answer printed after its id
        [answer] = [x[3:] for x in lines if x.startswith(custom_id + " ")]
        assert answer.strip(), run.stdout


def test_quick_start_shell_runs_as_written(bare_server: Server, tmp_path: Path) -> None:
    [requests] = blocks("jsonl")
    [command] = [
        line.strip()
        for block in blocks("sh")
        for line in block.splitlines()
        if "batchd submit requests.jsonl --wait" in line
    ]
    assert command == ".venv/bin/batchd submit requests.jsonl --wait"
    (tmp_path / "requests.jsonl").write_text(requests)
    run = subprocess.run(
        [sys.executable, "-m", "batchd.cli", *command.split()[1:], "--url", bare_server.url],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert f"output: {tmp_path / 'requests.output.jsonl'}" in run.stdout.splitlines()
    results = read_jsonl((tmp_path / "requests.output.jsonl").read_text())
    assert sorted(r["custom_id"] for r in results) == ["q1", "q2"]
    assert all(r["response"]["status_code"] == 200 for r in results)
    assert not (tmp_path / "requests.errors.jsonl").exists()
