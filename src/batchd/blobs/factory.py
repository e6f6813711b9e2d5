"""Choosing the blob store from the settings."""

from __future__ import annotations

from pathlib import Path

from batchd.blobs.base import Blobs
from batchd.blobs.local import LocalBlobs
from batchd.config import Settings
from batchd.errors import ConfigError


def open_blobs(settings: Settings) -> Blobs:
    url = settings.files_url
    if not url:
        return LocalBlobs(Path(settings.data_dir) / "files")
    if url.startswith("file://"):
        return LocalBlobs(Path(url[len("file://") :]))
    if url.startswith("s3://"):
        from batchd.blobs.s3 import S3Blobs

        return S3Blobs.from_settings(url, settings.s3)
    raise ConfigError(f"files_url: unsupported scheme in {url!r} (use s3://bucket/prefix)")
