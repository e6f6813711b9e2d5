"""Shared, cached model loads for the embedded-model tests (one load per test process).

The tests skip, saying which package to install, only when the weights are not installed."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import pytest

from batchd.backends.base import BackendUnavailable
from batchd.localmodel.minilm import MiniLM
from batchd.localmodel.packages import MINILM, SMOLLM2, WeightsPackage, package_dir
from batchd.localmodel.scheduler import LoadedLlm, load_llm

DATA = Path(__file__).resolve().parent.parent / "data"


def weights_dir(package: WeightsPackage) -> Path:
    try:
        return package_dir(package)
    except BackendUnavailable as exc:
        pytest.skip(f"weights not installed: {exc}")


def reference(name: str) -> Any:
    return json.loads((DATA / name).read_text(encoding="utf-8"))


@functools.cache
def _llm(path: Path) -> LoadedLlm:
    return load_llm(path)


def smollm2() -> LoadedLlm:
    return _llm(weights_dir(SMOLLM2) / SMOLLM2.files[0])


@functools.cache
def _minilm(path: Path) -> MiniLM:
    return MiniLM(path)


def minilm() -> MiniLM:
    return _minilm(weights_dir(MINILM) / "model")
