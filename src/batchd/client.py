"""Client commands of the ``batchd`` CLI: talk to a running server over its HTTP API.

``submit FILE [--endpoint E] [--wait]``, ``ls``, ``show ID``, ``cancel ID``,
``results ID [--out DIR]``, ``retry ID``. The server comes from ``--url`` / ``BATCHD_URL``
(default ``http://127.0.0.1:8000``), the key from ``--key`` / ``BATCHD_API_KEY``. Uses only
the standard library; uploads are streamed from disk.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

TERMINAL = ("completed", "failed", "expired", "cancelled")


class ClientError(Exception):
    pass


class Client:
    def __init__(self, url: str, key: str | None) -> None:
        self.base = url.rstrip("/") + "/v1"
        self.key = key

    def _request(
        self,
        method: str,
        path: str,
        data: Any = None,
        headers: dict[str, str] | None = None,
    ) -> urllib.request.Request:
        req = urllib.request.Request(self.base + path, data=data, method=method)
        if self.key:
            req.add_header("Authorization", f"Bearer {self.key}")
        for k, v in (headers or {}).items():
            req.add_header(k, v)
        return req

    def _send(self, req: urllib.request.Request) -> bytes:
        try:
            with urllib.request.urlopen(req, timeout=300) as resp:
                body: bytes = resp.read()
                return body
        except urllib.error.HTTPError as exc:
            with exc:
                detail = exc.read().decode("utf-8", "replace")
            try:
                detail = json.loads(detail)["error"]["message"]
            except (ValueError, KeyError, TypeError):
                pass
            raise ClientError(f"HTTP {exc.code}: {detail}") from None
        except urllib.error.URLError as exc:
            raise ClientError(f"cannot reach {self.base}: {exc.reason}") from None

    def json(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if data is not None else {}
        return json.loads(self._send(self._request(method, path, data, headers)))

    def content(self, file_id: str) -> bytes:
        return self._send(self._request("GET", f"/files/{file_id}/content"))

    def upload(self, path: Path, purpose: str = "batch") -> Any:
        boundary = uuid.uuid4().hex
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\n'
            f'{purpose}\r\n--{boundary}\r\nContent-Disposition: form-data; name="file"; '
            f'filename="{path.name}"\r\nContent-Type: application/jsonl\r\n\r\n'
        ).encode()
        tail = f"\r\n--{boundary}--\r\n".encode()
        size = len(head) + path.stat().st_size + len(tail)

        def body(f: IO[bytes]) -> Iterator[bytes]:
            yield head
            while chunk := f.read(1024 * 1024):
                yield chunk
            yield tail

        with path.open("rb") as f:
            req = self._request(
                "POST",
                "/files",
                body(f),
                {
                    "Content-Type": f"multipart/form-data; boundary={boundary}",
                    "Content-Length": str(size),
                },
            )
            return json.loads(self._send(req))


def _endpoint_of(path: Path) -> str:
    with path.open("rb") as f:
        for raw in f:
            if raw.strip():
                url = json.loads(raw).get("url")
                if isinstance(url, str):
                    return url
                break
    raise ClientError("cannot tell the endpoint from the first line; pass --endpoint")


def _wait(client: Client, batch: Any) -> Any:
    last = None
    while batch["status"] not in TERMINAL:
        counts = batch["request_counts"]
        line = (
            f"{batch['status']}: {counts['completed']}/{counts['total']} done, "
            f"{counts['failed']} failed"
        )
        if line != last:
            print(line, file=sys.stderr)
            last = line
        time.sleep(1)
        batch = client.json("GET", f"/batches/{batch['id']}")
    return batch


def _summary(batch: Any) -> str:
    c = batch["request_counts"]
    created = datetime.fromtimestamp(batch["created_at"], UTC).strftime("%Y-%m-%d %H:%M:%S")
    return (
        f"{batch['id']}  {batch['status']:<11} {batch['endpoint']:<22} "
        f"{c['completed']:>6}/{c['total']:<6} failed {c['failed']:<6} {created}"
    )


def submit(client: Client, args: argparse.Namespace) -> int:
    path = Path(args.file)
    endpoint = args.endpoint or _endpoint_of(path)
    file = client.upload(path)
    batch = client.json(
        "POST",
        "/batches",
        {"input_file_id": file["id"], "endpoint": endpoint, "completion_window": args.window},
    )
    print(batch["id"])
    if args.wait:
        batch = _wait(client, batch)
        print(_summary(batch))
        return 0 if batch["status"] == "completed" else 1
    return 0


def ls(client: Client, args: argparse.Namespace) -> int:
    for batch in client.json("GET", f"/batches?limit={args.limit}")["data"]:
        print(_summary(batch))
    return 0


def show(client: Client, args: argparse.Namespace) -> int:
    print(json.dumps(client.json("GET", f"/batches/{args.id}"), indent=2))
    return 0


def cancel(client: Client, args: argparse.Namespace) -> int:
    print(_summary(client.json("POST", f"/batches/{args.id}/cancel")))
    return 0


def results(client: Client, args: argparse.Namespace) -> int:
    batch = client.json("GET", f"/batches/{args.id}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for key, name in (("output_file_id", "output"), ("error_file_id", "errors")):
        if batch.get(key):
            target = out / f"{batch['id']}_{name}.jsonl"
            target.write_bytes(client.content(batch[key]))
            print(target)
    return 0


def retry(client: Client, args: argparse.Namespace) -> int:
    """A new batch of the requests that failed (or never ran) in batch ID."""
    batch = client.json("GET", f"/batches/{args.id}")
    if batch["status"] not in TERMINAL:
        raise ClientError(f"batch {args.id} is still {batch['status']}")
    if not batch.get("error_file_id"):
        print(f"batch {args.id} has no failed requests", file=sys.stderr)
        return 0
    failed = {
        json.loads(line)["custom_id"]
        for line in client.content(batch["error_file_id"]).splitlines()
        if line.strip()
    }
    lines = [
        line
        for line in client.content(batch["input_file_id"]).splitlines()
        if line.strip() and json.loads(line).get("custom_id") in failed
    ]
    path = Path(args.out or ".") / f"{args.id}_retry.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    file = client.upload(path)
    new = client.json(
        "POST",
        "/batches",
        {
            "input_file_id": file["id"],
            "endpoint": batch["endpoint"],
            "completion_window": batch["completion_window"],
            "metadata": {"retry_of": args.id},
        },
    )
    print(new["id"])
    return 0


COMMANDS = {
    "submit": submit,
    "ls": ls,
    "show": show,
    "cancel": cancel,
    "results": results,
    "retry": retry,
}


def add_parsers(sub: Any) -> None:
    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--url", default=os.environ.get("BATCHD_URL", "http://127.0.0.1:8000"))
        p.add_argument("--key", default=os.environ.get("BATCHD_API_KEY"))

    p = sub.add_parser("submit", help="upload a JSONL file and create a batch")
    p.add_argument("file")
    p.add_argument("--endpoint", help="default: the url of the first line")
    p.add_argument("--window", default="24h", help="completion window")
    p.add_argument("--wait", action="store_true", help="wait until the batch ends")
    common(p)
    p = sub.add_parser("ls", help="list batches, newest first")
    p.add_argument("--limit", type=int, default=20)
    common(p)
    for name, text in (("show", "show a batch"), ("cancel", "cancel a batch")):
        p = sub.add_parser(name, help=text)
        p.add_argument("id")
        common(p)
    p = sub.add_parser("results", help="download a batch's output and error files")
    p.add_argument("id")
    p.add_argument("--out", default=".")
    common(p)
    p = sub.add_parser("retry", help="a new batch of the requests that failed in a batch")
    p.add_argument("id")
    p.add_argument("--out", help="where to keep the retry's input file (default .)")
    common(p)


def run(args: argparse.Namespace) -> int:
    try:
        return COMMANDS[args.command](Client(args.url, args.key), args)
    except ClientError as exc:
        print(f"batchd: {exc}", file=sys.stderr)
        return 1
