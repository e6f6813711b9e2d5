"""Event-loop stalls while ``POST /files`` reads hostile forms: the longest time the loop
could not run another task while the form reader (``api/upload.py``) took the body, fed in
256 KiB pieces as the server hands them over, with a 1 ms ticker task measuring the gaps.

Bodies: 300,000 small fields and no file (~19 MB), one 45 MiB field, and a well-formed
50 MB upload. Baseline in the same run: python-multipart's parser on the same pieces with
no bounds, the fields kept in memory (how a generic form reader takes them), yielding
between pieces as any async server does.

Run: ``python bench/form_stall.py [--quick]``. Target: worst stall <= 10 ms.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from python_multipart.multipart import MultipartParser

from batchd.api.upload import FormParser
from batchd.blobs.local import LocalBlobs
from batchd.config import load_settings
from batchd.errors import ApiError
from batchd.service.files import FileService
from batchd.store.connect import migrate, open_store
from common import parser, print_table

BOUNDARY = "benchb0undary"
CTYPE = f"multipart/form-data; boundary={BOUNDARY}"
PIECE = 256 * 1024
TARGET_MS = 10.0


def fields_form(n: int) -> bytes:
    part = f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="f"\r\n\r\nv\r\n'.encode()
    return part * n + f"--{BOUNDARY}--\r\n".encode()


def one_field_form(size: int) -> bytes:
    head = f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\n'.encode()
    return head + b"x" * size + f"\r\n--{BOUNDARY}--\r\n".encode()


def upload_form(size: int) -> bytes:
    line = b'{"custom_id": "r", "method": "POST", "url": "/v1/chat/completions", "body": {}}\n'
    head = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="in.jsonl"'
        "\r\n\r\n"
    ).encode()
    return head + line * (size // len(line)) + f"\r\n--{BOUNDARY}--\r\n".encode()


async def worst_stall(work: Callable[[], Awaitable[str]]) -> tuple[float, float, str]:
    """(worst gap of a 1 ms ticker in ms, seconds taken, outcome) while ``work`` runs."""
    worst = 0.0
    done = False

    async def ticker() -> None:
        nonlocal worst
        while not done:
            t = time.perf_counter()
            await asyncio.sleep(0.001)
            worst = max(worst, time.perf_counter() - t - 0.001)

    tick = asyncio.create_task(ticker())
    await asyncio.sleep(0.01)
    t0 = time.perf_counter()
    outcome = await work()
    took = time.perf_counter() - t0
    done = True
    await tick
    return worst * 1000, took, outcome


async def batchd_reads(files: FileService, body: bytes) -> str:
    form = FormParser(CTYPE, files, 210 * 1024 * 1024)
    try:
        for i in range(0, len(body), PIECE):
            await form.feed(body[i : i + PIECE])
            await asyncio.sleep(0)
        result = await form.finish()
    except ApiError as exc:
        await form.abort()
        return f"{exc.status_code} {exc.code}"
    if result.upload is not None:
        await result.upload.writer.abort()
    return "200 read"


async def unbounded_reads(body: bytes) -> str:
    kept: list[bytes] = []
    p = MultipartParser(BOUNDARY, {"on_part_data": lambda d, s, e: kept.append(d[s:e])})
    for i in range(0, len(body), PIECE):
        p.write(body[i : i + PIECE])
        await asyncio.sleep(0)
    return f"read, {sum(map(len, kept)) / 2**20:.0f} MiB kept"


async def main() -> None:
    args = parser(__doc__ or "").parse_args()
    scale = 0.05 if args.quick else 1.0
    bodies = [
        ("300,000 small fields, no file", fields_form(int(300_000 * scale))),
        ("one 45 MiB field", one_field_form(int(45 * 2**20 * scale))),
        ("a 50 MB upload (well-formed)", upload_form(int(50_000_000 * scale))),
    ]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        settings = load_settings(None, data_dir=tmp)
        await migrate(settings.resolved_database_url)
        store = open_store(settings.resolved_database_url)
        files = FileService(settings, store.files, LocalBlobs(Path(tmp) / "files"))
        for name, body in bodies:
            base = await worst_stall(lambda b=body: unbounded_reads(b))
            ours = await worst_stall(lambda b=body: batchd_reads(files, b))
            rows.append(
                [
                    f"{name} ({len(body) / 2**20:.0f} MiB)",
                    f"{base[0]:.1f} ms / {base[1]:.2f} s ({base[2]})",
                    f"{ours[0]:.1f} ms / {ours[1]:.2f} s ({ours[2]})",
                    "yes" if ours[0] <= TARGET_MS else "no",
                ]
            )
        await store.close()
    print_table(
        "Event-loop stalls while reading hostile forms (worst ticker gap / time taken)",
        ["body", "unbounded python-multipart", "batchd form reader", f"<= {TARGET_MS:g} ms"],
        rows,
    )


if __name__ == "__main__":
    asyncio.run(main())
