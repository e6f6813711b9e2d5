"""Choosing the blob store from the settings, and keeping the local data directory private."""

from __future__ import annotations

from pathlib import Path

from batchd.blobs.base import Blobs
from batchd.blobs.local import LocalBlobs
from batchd.config import Settings
from batchd.errors import ConfigError
from batchd.filemodes import FileModes, apply, make_dirs


def protect_data_dir(settings: Settings) -> None:
    """Make ``data_dir`` (if missing) and give it and the SQLite database there the configured
    modes, so that an older, world-readable data directory is closed at start-up too."""
    data_dir = Path(settings.data_dir)
    make_dirs(data_dir, settings.data_dir_mode)
    apply(data_dir, settings.data_dir_mode)
    if settings.database_url is None:
        db = data_dir / "batchd.db"
        for path in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
            apply(path, settings.data_file_mode)


def open_blobs(settings: Settings) -> Blobs:
    """The blob store of ``files_url`` (a local folder by default). Run by every process
    that serves or executes batches, before any file is stored: it also makes the data
    directory private (:func:`protect_data_dir`)."""
    protect_data_dir(settings)
    modes = FileModes(settings.data_dir_mode, settings.data_file_mode)
    url = settings.files_url
    if not url:
        return LocalBlobs(Path(settings.data_dir) / "files", modes)
    if url.startswith("file://"):
        return LocalBlobs(Path(url[len("file://") :]), modes)
    if url.startswith("s3://"):
        from batchd.blobs.s3 import S3Blobs

        return S3Blobs.from_settings(url, settings.s3)
    raise ConfigError(f"files_url: unsupported scheme in {url!r} (use s3://bucket/prefix)")
