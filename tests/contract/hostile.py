"""Raw HTTP for the hostile-request tests: forms built by hand, bodies cut short or stalled,
headers the SDK would never send."""

from __future__ import annotations

import http.client
import json
import socket
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from tests.conftest import API_KEY

BOUNDARY = "b0undary"
FORM_TYPE = f"multipart/form-data; boundary={BOUNDARY}"


def form(fields: dict[str, str], file: tuple[str, bytes] | None = None) -> bytes:
    """A multipart/form-data body with ``fields`` and a ``file`` part, closing boundary included."""
    parts = [
        (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'
        ).encode()
        for name, value in fields.items()
    ]
    if file is not None:
        parts.append(
            (
                f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; '
                f'filename="{file[0]}"\r\nContent-Type: application/jsonl\r\n\r\n'
            ).encode()
            + file[1]
            + b"\r\n"
        )
    parts.append(f"--{BOUNDARY}--\r\n".encode())
    return b"".join(parts)


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def error(self) -> dict[str, Any]:
        err: dict[str, Any] = self.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}
        return err


def connect(url: str, timeout: float = 10) -> socket.socket:
    parts = urlsplit(url)
    return socket.create_connection((parts.hostname, parts.port), timeout=timeout)


def head_bytes(method: str, path: str, headers: dict[str, str], key: str | None = API_KEY) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: batchd"]
    if key is not None:
        lines.append(f"Authorization: Bearer {key}")
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def read_answer(sock: socket.socket, method: str = "GET") -> Answer:
    resp = http.client.HTTPResponse(sock, method=method)
    resp.begin()
    body = resp.read()
    return Answer(resp.status, {k.lower(): v for k, v in resp.getheaders()}, body)


def send_raw(url: str, data: bytes, method: str = "POST", timeout: float = 10) -> Answer:
    """Send ``data`` (a whole request, head included) on a new connection; the answer."""
    with connect(url, timeout) as sock:
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed before taking the whole body
        return read_answer(sock, method)


def request(
    url: str,
    method: str,
    path: str,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
    key: str | None = API_KEY,
) -> Answer:
    h = {"Content-Length": str(len(body)), **(headers or {})} if body or method != "GET" else {}
    h.update(headers or {})
    return send_raw(url, head_bytes(method, path, h, key) + body, method)


def post_form(url: str, body: bytes, path: str = "/v1/files", **headers: str) -> Answer:
    return request(url, "POST", path, body, {"Content-Type": FORM_TYPE, **headers})
