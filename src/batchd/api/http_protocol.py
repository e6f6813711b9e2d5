"""uvicorn's HTTP/1.1 protocol (httptools) with the request head bounded and its own
refusals in OpenAI's error shape.

httptools sets no limit on the request line and headers: a 200 MiB header was accepted,
parsed in quadratic time (52 s) with the event loop blocked. Here a request head larger than
:data:`MAX_HEAD_BYTES` (64 KiB, as the common proxies' defaults: nginx 4 x 8 KiB buffers,
Apache 8 KiB a line) is refused with 431 and the connection closed as soon as the bytes
arrive. Malformed requests that the parser rejects get 400 in OpenAI's error shape
(``{"error": {...}}``) rather than plain text.
"""

from __future__ import annotations

from typing import Any

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from batchd.envelopes import openai_error

MAX_HEAD_BYTES = 64 * 1024


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = True  # reading a request line and headers
        self._head_bytes = 0
        self._tail = b""  # the last bytes seen, for a head's end split across chunks

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True
        self._head_bytes = 0
        self._tail = b""

    def on_headers_complete(self) -> None:
        self._in_head = False
        super().on_headers_complete()

    def data_received(self, data: bytes) -> None:
        if self._in_head:
            # Only the head's bytes count: a chunk may hold the head's end and a body.
            tail = self._tail
            end = (tail + data).find(b"\r\n\r\n")
            self._head_bytes += len(data) if end < 0 else max(0, end + 4 - len(tail))
            self._tail = (tail + data)[-3:]
            if self._head_bytes > MAX_HEAD_BYTES:
                self._refuse(
                    431,
                    b"Request Header Fields Too Large",
                    f"The request line and headers are larger than {MAX_HEAD_BYTES} bytes.",
                    "headers_too_large",
                )
                return
        super().data_received(data)

    def send_400_response(self, msg: str) -> None:
        self._refuse(400, b"Bad Request", msg, "invalid_http_request")

    def _refuse(self, status: int, reason: bytes, message: str, code: str) -> None:
        body = orjson.dumps(openai_error(message, "invalid_request_error", code=code))
        head = b"HTTP/1.1 %d %s\r\n" % (status, reason)
        for name, value in self.server_state.default_headers:
            head += name + b": " + value + b"\r\n"
        head += (
            b"content-type: application/json\r\ncontent-length: %d\r\n"
            b"x-should-retry: false\r\nconnection: close\r\n\r\n" % len(body)
        )
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(head + body)
            self.transport.close()
