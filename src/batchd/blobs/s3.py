"""Blobs in an S3-compatible bucket (AWS S3, MinIO, SeaweedFS, Ceph): ``files_url =
"s3://bucket/prefix"``.

Writes are multipart uploads fed from the stream as it arrives: at most one part
(:data:`PART_SIZE`) is held in memory, and nothing is visible under the key until the upload
is completed on commit; abort drops the upload. A blob smaller than one part is sent with a
single PUT. Reads are ranged GETs streamed in chunks. ``concat`` copies sources of at least
:data:`MIN_PART` server-side (UploadPartCopy) and streams the small ones through.

Credentials and endpoint come from ``[s3]`` or, where unset, from the usual ``AWS_*``
variables (botocore's default chain). The bucket is created on first use if it is missing.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Any

from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError

from batchd.blobs.base import CHUNK, Blobs, BlobWriter
from batchd.config import S3Settings
from batchd.errors import BlobError, BlobNotFound, ConfigError

MIN_PART = 5 * 1024 * 1024  # S3's smallest part (all but the last)
PART_SIZE = 8 * 1024 * 1024
MAX_COPY = 5 * 1024 * 1024 * 1024  # S3's largest UploadPartCopy range
_MISSING = {"404", "NoSuchKey", "NotFound", "NoSuchBucket"}


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


@contextlib.contextmanager
def _translated(key: str) -> Iterator[None]:
    """S3 client errors become BlobNotFound / BlobError here and nowhere else."""
    try:
        yield
    except ClientError as exc:
        if _code(exc) in _MISSING:
            raise BlobNotFound(key) from None
        raise BlobError(f"S3 request for {key!r} failed: {exc}") from exc
    except BotoCoreError as exc:
        raise BlobError(f"S3 request for {key!r} failed: {exc}") from exc


class S3BlobWriter(BlobWriter):
    def __init__(self, blobs: S3Blobs, key: str) -> None:
        self._blobs = blobs
        self._key = key
        self._buf: list[bytes] = []
        self._buffered = 0
        self._upload_id: str | None = None
        self._parts: list[dict[str, Any]] = []
        self._committed = False
        self.written = 0

    async def _start(self) -> str:
        if self._upload_id is None:
            client = await self._blobs.client()
            with _translated(self._key):
                resp = await client.create_multipart_upload(
                    Bucket=self._blobs.bucket, Key=self._blobs.object_key(self._key)
                )
            self._upload_id = str(resp["UploadId"])
        return self._upload_id

    async def _send_part(self) -> None:
        upload_id = await self._start()
        body = self._take()
        number = len(self._parts) + 1
        client = await self._blobs.client()
        with _translated(self._key):
            resp = await client.upload_part(
                Bucket=self._blobs.bucket,
                Key=self._blobs.object_key(self._key),
                UploadId=upload_id,
                PartNumber=number,
                Body=body,
            )
        self._parts.append({"PartNumber": number, "ETag": resp["ETag"]})

    def _take(self) -> bytes:
        """The buffered bytes, joined, and the buffer emptied (one copy, no more)."""
        body = b"".join(self._buf)
        self._buf.clear()
        self._buffered = 0
        return body

    @property
    def has_buffered(self) -> bool:
        return self._buffered > 0

    async def write(self, data: bytes) -> None:
        self._buf.append(bytes(data))
        self._buffered += len(data)
        self.written += len(data)
        if self._buffered >= self._blobs.part_size:
            await self._send_part()

    async def copy(self, src: str, size: int) -> None:
        """Append the whole of ``src`` (``size`` bytes) server-side. Only at a part boundary
        (nothing buffered) and for sources of at least :data:`MIN_PART`."""
        if self._buffered or size < MIN_PART:
            raise ValueError("copy needs an empty buffer and a source of at least MIN_PART")
        upload_id = await self._start()
        client = await self._blobs.client()
        source = f"{self._blobs.bucket}/{self._blobs.object_key(src)}"
        for start in range(0, size, MAX_COPY):
            number = len(self._parts) + 1
            end = min(size, start + MAX_COPY) - 1
            with _translated(src):
                resp = await client.upload_part_copy(
                    Bucket=self._blobs.bucket,
                    Key=self._blobs.object_key(self._key),
                    UploadId=upload_id,
                    PartNumber=number,
                    CopySource=source,
                    CopySourceRange=f"bytes={start}-{end}",
                )
            self._parts.append({"PartNumber": number, "ETag": resp["CopyPartResult"]["ETag"]})
        self.written += size

    async def commit(self) -> int:
        client = await self._blobs.client()
        key = self._blobs.object_key(self._key)
        if self._upload_id is None:
            with _translated(self._key):
                await client.put_object(Bucket=self._blobs.bucket, Key=key, Body=self._take())
        else:
            if self._buffered:
                await self._send_part()
            with _translated(self._key):
                await client.complete_multipart_upload(
                    Bucket=self._blobs.bucket,
                    Key=key,
                    UploadId=self._upload_id,
                    MultipartUpload={"Parts": self._parts},
                )
        self._committed = True
        return self.written

    async def abort(self) -> None:
        self._take()
        if self._committed or self._upload_id is None:
            return
        upload_id, self._upload_id = self._upload_id, None
        client = await self._blobs.client()
        with contextlib.suppress(BlobNotFound), _translated(self._key):
            await client.abort_multipart_upload(
                Bucket=self._blobs.bucket, Key=self._blobs.object_key(self._key), UploadId=upload_id
            )


class S3Blobs(Blobs):
    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        settings: S3Settings | None = None,
        *,
        part_size: int = PART_SIZE,
    ) -> None:
        if part_size < MIN_PART:
            raise ValueError(f"part_size must be at least {MIN_PART}")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.part_size = part_size
        self._settings = settings or S3Settings()
        self._client: Any = None
        self._stack = contextlib.AsyncExitStack()
        self._lock = asyncio.Lock()

    @classmethod
    def from_settings(cls, url: str, s3: S3Settings) -> S3Blobs:
        rest = url[len("s3://") :]
        bucket, _, prefix = rest.partition("/")
        if not bucket:
            raise ConfigError(f"files_url: no bucket in {url!r} (use s3://bucket/prefix)")
        return cls(bucket, prefix, s3)

    def object_key(self, key: str) -> str:
        if not key or key.startswith("/") or ".." in key.split("/"):
            raise BlobError(f"blob key {key!r} is not a relative path")
        return f"{self.prefix}/{key}" if self.prefix else key

    async def client(self) -> Any:
        """The S3 client, made on first use (with the bucket, if it is missing)."""
        if self._client is not None:
            return self._client
        async with self._lock:
            if self._client is None:
                s = self._settings
                config = AioConfig(
                    # Plain checksums only: several S3-compatible servers refuse the newer ones.
                    request_checksum_calculation="when_required",
                    response_checksum_validation="when_required",
                    retries={"max_attempts": 5, "mode": "standard"},
                )
                client = await self._stack.enter_async_context(
                    get_session().create_client(
                        "s3",
                        endpoint_url=s.endpoint_url,
                        aws_access_key_id=s.access_key_id,
                        aws_secret_access_key=s.secret_access_key,
                        region_name=s.region,
                        config=config,
                    )
                )
                await self._ensure_bucket(client)
                self._client = client
        return self._client

    async def _ensure_bucket(self, client: Any) -> None:
        try:
            await client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            if _code(exc) not in _MISSING:
                raise BlobError(f"S3 bucket {self.bucket!r}: {exc}") from exc
            with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
                with _translated(self.bucket):
                    await client.create_bucket(Bucket=self.bucket)
        except BotoCoreError as exc:
            raise BlobError(f"S3 bucket {self.bucket!r}: {exc}") from exc

    def writer(self, key: str) -> S3BlobWriter:
        self.object_key(key)
        return S3BlobWriter(self, key)

    async def read(self, key: str, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        if end is not None and end <= start:
            return
        client = await self.client()
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": self.object_key(key)}
        if start or end is not None:
            args["Range"] = f"bytes={start}-{'' if end is None else end - 1}"
        try:
            with _translated(key):
                resp = await client.get_object(**args)
        except BlobError as exc:
            # A range that starts at or past the end of an existing blob: nothing to read.
            if isinstance(exc.__cause__, ClientError) and _code(exc.__cause__) == "InvalidRange":
                return
            raise
        body = resp["Body"]
        try:
            with _translated(key):
                async for chunk in body.iter_chunks(CHUNK):
                    yield chunk
        finally:
            body.close()

    async def size(self, key: str) -> int:
        client = await self.client()
        with _translated(key):
            resp = await client.head_object(Bucket=self.bucket, Key=self.object_key(key))
        return int(resp["ContentLength"])

    async def delete(self, key: str) -> None:
        client = await self.client()
        with _translated(key):
            await client.delete_object(Bucket=self.bucket, Key=self.object_key(key))

    async def delete_many(self, keys: Iterable[str]) -> None:
        client = await self.client()
        names = [self.object_key(k) for k in keys]
        for i in range(0, len(names), 1000):
            batch = [{"Key": k} for k in names[i : i + 1000]]
            with _translated(names[i]):
                await client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True}
                )

    async def concat(self, key: str, sources: Iterable[str]) -> int:
        """Large sources are copied inside S3; small ones are streamed through this process."""
        w = self.writer(key)
        async with w:
            for src in sources:
                size = await self.size(src)
                if size >= MIN_PART and not w.has_buffered:
                    await w.copy(src, size)
                    continue
                async for chunk in self.read(src):
                    await w.write(chunk)
            return await w.commit()

    async def close(self) -> None:
        self._client = None
        await self._stack.aclose()
