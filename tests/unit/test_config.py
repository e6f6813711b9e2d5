"""Settings: every key documented, bad configs refused with the key named."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel

from batchd.config import Settings, load_settings
from batchd.errors import ConfigError

DOCS = Path(__file__).parents[2] / "docs" / "configuration.md"


def _keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        keys.append(prefix + name)
        ann = field.annotation
        for candidate in (*getattr(ann, "__args__", ()), ann):
            inner = getattr(candidate, "__args__", None)
            target = inner[0] if inner else candidate
            if isinstance(target, type) and issubclass(target, BaseModel):
                keys.extend(_keys(target, prefix + name + "."))
                break
    return keys


def test_every_setting_is_documented() -> None:
    documented = set(re.findall(r"^\| `([a-z0-9_.]+)` \|", DOCS.read_text(), re.M))
    missing = [
        k
        for k in _keys(Settings)
        if k not in documented
        and not k.endswith(("s3", "auth", "deployments", "limits", "engine", "webhooks"))
    ]
    assert missing == []


def test_defaults_serve_the_embedded_models(tmp_path: Path) -> None:
    s = load_settings(None, data_dir=str(tmp_path))
    models = {d.model: d.backend for d in s.effective_deployments()}
    assert models == {
        "smollm2-135m-instruct": "local",
        "all-minilm-l6-v2": "local",
        "omni-moderation-latest": "local",
    }
    assert s.deployment_for("omni-moderation-latest").local_model == "minilm-moderation"  # type: ignore[union-attr]
    assert s.engine.embedded is True
    assert s.resolved_database_url.endswith("batchd.db")


@pytest.mark.parametrize(
    ("toml", "named"),
    [
        ("colour = 'blue'\n", "colour: unknown key"),
        ("[limits]\nmax_file_bytes = 'big'\n", "limits.max_file_bytes"),
        ("[[deployments]]\nmodel = 'm'\nbackend = 'openai'\n", "needs base_url"),
        ("[engine]\nembeded = true\n", "engine.embeded: unknown key"),
        ("[limits]\ncompletion_windows = ['1 week']\n", "completion window"),
        (
            "[[deployments]]\nmodel = 'm'\nbase_url = 'http://x/v1'\n"
            "[[deployments]]\nmodel = 'm'\nbase_url = 'http://y/v1'\n",
            "configured twice",
        ),
        (
            "[[deployments]]\nmodel = 'm'\nbackend = 'local'\nlocal_model = 'llama-70b'\n",
            "unknown local_model 'llama-70b'; known: smollm2-135m-instruct, all-minilm-l6-v2, "
            "minilm-moderation",
        ),
        ("[[deployments]]\nmodel = 'm'\nbackend = 'local'\n", "unknown local_model 'm'"),
        ("[[deployments]]\nmodel = 'm'\nbase_url = 'ftp://x/v1'\n", "is not an http(s) URL"),
        (
            "[[deployments]]\nmodel = 'm'\nbase_url = 'http://x/v1'\napi_style = 'soap'\n",
            "deployments.0.api_style",
        ),
        (
            "[[deployments]]\nmodel = 'm'\nbase_url = 'http://x/v1'\n"
            "headers = { 'bad name' = 'v' }\n",
            "invalid header 'bad name'",
        ),
        (
            "[[deployments]]\nmodel = 'm'\nbase_url = 'http://x/v1'\n"
            "headers = { 'x-team' = '日本' }\n",
            "invalid header 'x-team'",
        ),
        (
            "[[deployments]]\nmodel = 'm'\nbase_url = 'http://x/v1'\napi_key = 'k'\n"
            "headers = { 'Authorization' = 'Bearer other' }\n",
            "headers.Authorization and api_key both send a key",
        ),
        ("[[deployments]]\nmodel = 'm'\nbase_url = 'http://x/v1'\napi_key = 'ключ'\n",
         "api_key must be printable ASCII"),
        ("[[deployments]]\nmodel = 'm'\nbase_url = 'http://x/v1'\nmax_attempts = 0\n",
         "deployments.0.max_attempts"),
        (
            "[[deployments]]\nmodel = 'm'\nbase_url = 'http://x'\napi_style = 'anthropic'\n"
            "api_key = 'k'\nheaders = { 'X-Api-Key' = 'other' }\n",
            "headers.X-Api-Key and api_key both send a key",
        ),
        (
            "[[deployments]]\nmodel = 'm'\nbackend = 'local'\n"
            "local_model = 'smollm2-135m-instruct'\napi_style = 'anthropic'\n",
            "api_style 'anthropic' needs backend 'openai'",
        ),
        (
            "[content_filter]\nenabled = true\nclassifier = 'c'\n"
            "[[deployments]]\nmodel = 'c'\nbase_url = 'http://x'\napi_style = 'anthropic'\n",
            "content_filter.classifier: 'c' has api_style 'anthropic'",
        ),
    ],
)
def test_bad_config_names_the_key(tmp_path: Path, toml: str, named: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as exc:
        load_settings(path)
    assert named in str(exc.value)


def test_env_overrides_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[engine]\nembedded = true\nshard_lines = 10\n")
    monkeypatch.setenv("BATCHD_ENGINE__EMBEDDED", "false")
    s = load_settings(path)
    assert s.engine.embedded is False and s.engine.shard_lines == 10
    monkeypatch.setenv(
        "BATCHD_DEPLOYMENTS", '[{"model": "m", "base_url": "http://127.0.0.1:1/v1"}]'
    )
    assert [d.model for d in load_settings(path).effective_deployments()] == ["m"]


def serve_with(path: Path) -> subprocess.CompletedProcess[str]:
    """``batchd serve --config PATH`` run until it exits (it must refuse to start)."""
    return subprocess.run(
        [sys.executable, "-m", "batchd.cli", "serve", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_serve_refuses_bad_config(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[[deployments]]\nmodel = 'm'\n")
    proc = serve_with(path)
    assert proc.returncode == 2
    assert "deployments.0" in proc.stderr and "base_url" in proc.stderr


def test_serve_with_an_unreachable_database_says_so_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('database_url = "postgresql://u:secret-pw@127.0.0.1:1/db"\n')
    proc = serve_with(path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "secret-pw" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("batchd: cannot start: ")


def test_a_proxy_that_would_apply_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """batchd connects to upstreams directly: a proxy variable that applies to the host
    stops the start, one whose NO_PROXY covers the host does not."""
    path = tmp_path / "c.toml"
    path.write_text("[[deployments]]\nmodel = 'm'\nbase_url = 'https://api.example/v1'\n")
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.internal:3128")
    with pytest.raises(ConfigError) as exc:
        load_settings(path)
    assert "HTTPS_PROXY (or ALL_PROXY) is set and applies to api.example" in str(exc.value)
    monkeypatch.setenv("NO_PROXY", "api.example")
    assert load_settings(path).deployments[0].base_url == "https://api.example/v1"
