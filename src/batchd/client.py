"""Client commands of the ``batchd`` CLI: talk to a running server over its HTTP API.

``submit FILE [--endpoint E] [--wait] [--out DIR]``, ``ls``, ``show ID``, ``cancel ID``,
``results ID [--follow] [--after LINE_ID] [--outcome succeeded|failed]`` (the results
committed so far, as JSONL on stdout; ``--follow``: then each as it is committed until the
batch ends, resuming after the last line printed when the connection drops),
``results ID --out DIR`` (the ended batch's files), ``retry ID``. The server comes from
``--url`` / ``BATCHD_URL`` (default ``http://127.0.0.1:8000``): the server's root, the
OpenAI base URL (``…/v1``) and Azure's v1 base URL (``…/openai/v1``) all work. The key
comes from ``--key`` / ``BATCHD_API_KEY``. Uploads and downloads are streamed from and to disk.

A mistake the user can fix (a missing or non-JSONL file, a folder that cannot be made, a
server that cannot be reached, a refused key, an unknown id, a request the server refuses, a
batch that failed validation) is one line on stderr saying what and what to do, and exit
status :data:`EXIT_MISTAKE`; never a traceback. Exit statuses: :data:`EXIT_OK`,
:data:`EXIT_NOT_DONE` (the batch ended expired or cancelled, is not finished yet, or the
server failed), :data:`EXIT_MISTAKE`, 130 (interrupted).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from batchd.progress import Display, RateMeter, display_for

TERMINAL = ("completed", "failed", "expired", "cancelled")
EXIT_OK = 0
EXIT_NOT_DONE = 1
EXIT_MISTAKE = 2
EXIT_INTERRUPTED = 130
DEFAULT_URL = "http://127.0.0.1:8000"
TIMEOUT_SECONDS = 300.0
FIRST_LINE_LIMIT = 16 * 1024 * 1024  # bytes of the first line checked here; the server checks all
SHOWN_ERRORS = 20  # validation errors printed; `batchd show ID` has them all
EXAMPLE_LINE = (
    '{"custom_id": "1", "method": "POST", "url": "/v1/chat/completions", '
    '"body": {"model": "...", "messages": [...]}}'
)


class ClientError(Exception):
    """A one-line message for the user, and the exit status that goes with it."""

    def __init__(self, message: str, exit_code: int = EXIT_MISTAKE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class Dropped(ClientError):
    """The server could not be reached, did not answer in time, or the connection broke:
    worth trying again (``results --follow`` does)."""


def api_base(url: str) -> str:
    """The ``/v1`` base URL of the API from what a user passes: the server's root
    (``http://host:8000``), the OpenAI SDK's base URL (``http://host:8000/v1``), or Azure's
    (``http://host:8000/openai`` or ``…/openai/v1``), with or without a trailing slash; a
    missing scheme means ``http://``. Raises :class:`ClientError` for anything else."""
    text = url.strip()
    if "://" not in text:
        text = "http://" + text
    parts = urllib.parse.urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ClientError(
            f"--url {url!r} is not an http(s) address: give the server's, e.g. {DEFAULT_URL}"
        )
    path = parts.path.rstrip("/")
    if not path.endswith("/v1"):
        path += "/v1"
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def _error_detail(exc: urllib.error.HTTPError) -> tuple[str, bool]:
    """The server's error message, and whether it came in batchd's (OpenAI's) envelope."""
    raw = ""
    with exc, contextlib.suppress(OSError, http.client.HTTPException):
        raw = exc.read(64 * 1024).decode("utf-8", "replace")
    with contextlib.suppress(ValueError, KeyError, TypeError):
        return str(json.loads(raw)["error"]["message"]), True
    return (raw.strip().splitlines() or [str(exc.reason)])[0][:200], False


class Client:
    def __init__(self, url: str, key: str | None, timeout: float = TIMEOUT_SECONDS) -> None:
        self.base = api_base(url)
        self.key = key
        self.timeout = timeout

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

    def _refused(self, req: urllib.request.Request, exc: urllib.error.HTTPError) -> ClientError:
        detail, ours = _error_detail(exc)
        if exc.code == 401:
            return ClientError(
                f"the server refused the key ({detail}): pass your project's key with --key "
                "or BATCHD_API_KEY"
            )
        if exc.code == 404 and not ours:
            return ClientError(
                f"{req.get_method()} {req.full_url} is not found (HTTP 404): "
                "is --url the address of a batchd server?"
            )
        if exc.code == 404:
            hint = "`batchd ls` lists the batches of your key"
            return ClientError(f"{detail} (HTTP 404): {hint}")
        if exc.code >= 500:
            return ClientError(
                f"the server failed (HTTP {exc.code}: {detail}); try again, or see its log",
                EXIT_NOT_DONE,
            )
        return ClientError(f"{detail} (HTTP {exc.code})")

    @contextlib.contextmanager
    def _open(self, req: urllib.request.Request) -> Iterator[http.client.HTTPResponse]:
        """The response to ``req``, every failure turned into a :class:`ClientError`."""
        try:
            resp = urllib.request.urlopen(req, timeout=self.timeout)
        except urllib.error.HTTPError as exc:
            raise self._refused(req, exc) from None
        except TimeoutError:
            raise Dropped(
                f"{self.base} did not answer within {self.timeout:.0f} s; try again",
                EXIT_NOT_DONE,
            ) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            reason = getattr(exc, "reason", None) or exc
            raise Dropped(
                f"cannot reach {self.base} ({reason}): is `batchd serve` running there? "
                "Point --url or BATCHD_URL at it"
            ) from None
        with resp:
            yield resp

    def _read(self, resp: http.client.HTTPResponse, size: int = -1) -> bytes:
        try:
            data: bytes = resp.read(size)
        except (OSError, http.client.HTTPException) as exc:
            raise Dropped(f"the connection to {self.base} broke ({exc}); try again") from None
        return data

    def result_lines(
        self, batch_id: str, *, after: str | None, outcome: str | None, follow: bool
    ) -> Iterator[bytes]:
        """The lines of ``GET /batches/ID/results`` as they arrive, each without the
        keep-alive spaces before it and without its newline. Raises :class:`Dropped` when
        the connection breaks."""
        query = {"follow": "true" if follow else "false"}
        if after:
            query["after"] = after
        if outcome:
            query["outcome"] = outcome
        path = f"/batches/{_id(batch_id)}/results?{urllib.parse.urlencode(query)}"
        with self._open(self._request("GET", path)) as resp:
            while True:
                try:
                    line = resp.readline()
                except (OSError, http.client.HTTPException) as exc:
                    raise Dropped(f"the connection to {self.base} broke ({exc})") from None
                if not line:
                    return
                line = line.strip()
                if line:
                    yield line

    def _send(self, req: urllib.request.Request) -> Any:
        """The JSON answer to ``req``."""
        with self._open(req) as resp:
            raw = self._read(resp)
        try:
            return json.loads(raw)
        except ValueError:
            raise ClientError(
                f"{self.base} did not answer {req.get_method()} {req.selector} with JSON: "
                "is --url the address of a batchd server?"
            ) from None

    def json(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if data is not None else {}
        return self._send(self._request(method, path, data, headers))

    def content(self, file_id: str) -> bytes:
        with self._open(self._request("GET", f"/files/{file_id}/content")) as resp:
            return self._read(resp)

    def download(self, file_id: str, target: Path) -> None:
        """Stream a file's content to ``target`` (written whole or not at all)."""
        partial = target.with_name(f".{target.name}.partial")
        req = self._request("GET", f"/files/{file_id}/content")
        try:
            with self._open(req) as resp, partial.open("wb") as out:
                while chunk := self._read(resp, 1024 * 1024):
                    out.write(chunk)
            partial.replace(target)
        except OSError as exc:
            raise ClientError(f"cannot write {target}: {exc.strerror or exc}") from None
        finally:
            with contextlib.suppress(OSError):
                partial.unlink()

    def upload(self, path: Path, purpose: str = "batch") -> Any:
        boundary = uuid.uuid4().hex
        name = path.name.replace('"', "%22")
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\n'
            f'{purpose}\r\n--{boundary}\r\nContent-Disposition: form-data; name="file"; '
            f'filename="{name}"\r\nContent-Type: application/jsonl\r\n\r\n'
        ).encode()
        tail = f"\r\n--{boundary}--\r\n".encode()

        def body(f: IO[bytes]) -> Iterator[bytes]:
            yield head
            while chunk := f.read(1024 * 1024):
                yield chunk
            yield tail

        try:
            f = path.open("rb")
            size = len(head) + os.fstat(f.fileno()).st_size + len(tail)
        except OSError as exc:
            raise ClientError(f"cannot read {path}: {exc.strerror or exc}") from None
        with f:
            headers = {
                "Content-Type": f"multipart/form-data; boundary={boundary}",
                "Content-Length": str(size),
            }
            return self._send(self._request("POST", "/files", body(f), headers))


# -- local checks ----------------------------------------------------------------------------
def first_request(path: Path) -> dict[str, Any]:
    """The first request line of an input file, after checking that the file is there and
    looks like JSONL; the server checks every line. Raises :class:`ClientError`."""
    where = "give the path of a JSONL file of requests"
    if not path.exists():
        raise ClientError(f"no such file: {path}; {where}")
    if path.is_dir():
        raise ClientError(f"{path} is a folder; {where}")
    number, first = 0, b""
    try:
        with path.open("rb") as f:
            while line := f.readline(FIRST_LINE_LIMIT):
                number += 1
                if number == 1:
                    line = line.removeprefix(b"\xef\xbb\xbf")  # a BOM is not content
                if line.strip():
                    first = line
                    break
    except OSError as exc:
        raise ClientError(f"cannot read {path}: {exc.strerror or exc}") from None
    if not first:
        raise ClientError(f"{path} is empty; write one JSON request a line: {EXAMPLE_LINE}")
    row: Any = None
    if len(first) < FIRST_LINE_LIMIT or first.endswith(b"\n"):
        with contextlib.suppress(ValueError):
            row = json.loads(first)
    else:
        row = {}  # a first line this long is left to the server
    if not isinstance(row, dict):
        raise ClientError(
            f"{path} is not JSONL: line {number} is not a JSON object. Each line is one "
            f"request: {EXAMPLE_LINE}"
        )
    if not path.name.lower().endswith(".jsonl"):
        raise ClientError(
            f"{path}: batch input files are .jsonl files; rename it to {path.stem}.jsonl"
        )
    return row


def out_dir(path: str | Path) -> Path:
    """``--out``: a folder, made (with its parents) when missing. Raises
    :class:`ClientError` when it cannot be."""
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ClientError(f"--out {folder} is a file, not a folder; give a folder") from None
    except OSError as exc:
        raise ClientError(
            f"cannot make the folder {folder} ({exc.strerror or exc}); give another --out"
        ) from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ClientError(f"cannot write into {folder}: permission denied; give another --out")
    return folder


# -- output ----------------------------------------------------------------------------------
def _summary(batch: Any) -> str:
    c = batch["request_counts"]
    created = datetime.fromtimestamp(batch["created_at"], UTC).strftime("%Y-%m-%d %H:%M:%S")
    return (
        f"{batch['id']}  {batch['status']:<11} {batch['endpoint']:<22} "
        f"{c['completed']:>6}/{c['total']:<6} failed {c['failed']:<6} {created}"
    )


def _print_errors(batch: Any) -> None:
    """The batch's validation errors on stderr: ``line N: code: message`` each."""
    errors = (batch.get("errors") or {}).get("data") or []
    for e in errors[:SHOWN_ERRORS]:
        where = f"line {e['line']}: " if e.get("line") is not None else ""
        print(f"  {where}{e.get('code')}: {e.get('message')}", file=sys.stderr)
    if len(errors) > SHOWN_ERRORS:
        print(
            f"  ... and {len(errors) - SHOWN_ERRORS} more: `batchd show {batch['id']}`",
            file=sys.stderr,
        )


def _save(client: Client, batch: Any, folder: Path, stem: str) -> dict[str, Path]:
    """Download the batch's output and error files as ``STEM.output.jsonl`` and
    ``STEM.errors.jsonl`` in ``folder``; the paths written, by kind."""
    written = {}
    for key, kind in (("output_file_id", "output"), ("error_file_id", "errors")):
        if batch.get(key):
            target = folder / f"{stem}.{kind}.jsonl"
            client.download(batch[key], target)
            written[kind] = target
    return written


def _report(client: Client, batch: Any, folder: Path, stem: str) -> int:
    """What ``submit --wait`` says when the batch ends, and its exit status."""
    print(_summary(batch))
    status = batch["status"]
    if status == "failed":
        print(f"batchd: batch {batch['id']} failed:", file=sys.stderr)
        _print_errors(batch)
    written = _save(client, batch, folder, stem)
    for kind, path in written.items():
        print(f"{kind}: {path}")
    failed = batch["request_counts"]["failed"]
    if failed and "errors" in written:
        noun = "request" if failed == 1 else "requests"
        print(f"{failed} {noun} failed: see {written['errors']}", file=sys.stderr)
    if status == "completed":
        return EXIT_OK
    return EXIT_MISTAKE if status == "failed" else EXIT_NOT_DONE


def _wait(client: Client, batch: Any, display: Display | None) -> Any:
    """Poll the batch until it ends (every 0.2 s at first, then every second)."""
    meter = RateMeter()
    delay = 0.2
    try:
        while True:
            if display is not None:
                display.update(meter.snapshot(batch))
            if batch["status"] in TERMINAL:
                return batch
            time.sleep(delay)
            delay = min(delay * 1.5, 1.0)
            batch = client.json("GET", f"/batches/{batch['id']}")
    except KeyboardInterrupt:
        raise ClientError(
            f"stopped waiting; batch {batch['id']} goes on: `batchd show {batch['id']}` "
            f"follows it, `batchd cancel {batch['id']}` stops it",
            EXIT_INTERRUPTED,
        ) from None
    finally:
        if display is not None:
            display.close()


# -- commands --------------------------------------------------------------------------------
def submit(client: Client, args: argparse.Namespace) -> int:
    path = Path(args.file)
    row = first_request(path)
    endpoint = args.endpoint or row.get("url")
    if not isinstance(endpoint, str) or not endpoint:
        raise ClientError(
            f'line 1 of {path} has no "url" to take the endpoint from; pass --endpoint'
        )
    if args.out is not None and not args.wait:
        raise ClientError(
            "--out goes with --wait; without it, `batchd results ID --out DIR` fetches the files"
        )
    folder = out_dir(args.out) if args.out is not None else path.resolve().parent
    file = client.upload(path)
    batch = client.json(
        "POST",
        "/batches",
        {"input_file_id": file["id"], "endpoint": endpoint, "completion_window": args.window},
    )
    print(batch["id"], flush=True)
    if args.wait:
        batch = _wait(client, batch, display_for(sys.stderr))
        return _report(client, batch, folder, path.name[: -len(".jsonl")])
    if file.get("status") == "error":
        # Not JSONL after all: the batch fails at once; say why rather than exit 0.
        batch = _wait(client, batch, None)
        print(f"batchd: batch {batch['id']} failed validation:", file=sys.stderr)
        _print_errors(batch)
        return EXIT_MISTAKE
    return EXIT_OK


def ls(client: Client, args: argparse.Namespace) -> int:
    for batch in client.json("GET", f"/batches?limit={args.limit}")["data"]:
        print(_summary(batch))
    return EXIT_OK


def show(client: Client, args: argparse.Namespace) -> int:
    print(json.dumps(client.json("GET", f"/batches/{_id(args.id)}"), indent=2))
    return EXIT_OK


def cancel(client: Client, args: argparse.Namespace) -> int:
    print(_summary(client.json("POST", f"/batches/{_id(args.id)}/cancel")))
    return EXIT_OK


def results(client: Client, args: argparse.Namespace) -> int:
    """The ended batch's output and error files into ``--out`` (default ``.``), as DESIGN.md
    fixes it; with ``--jsonl``, ``--follow``, ``--after`` or ``--outcome``, the results
    committed so far printed as JSONL (``--follow``: then each as it comes)."""
    streamed = args.jsonl or args.follow or args.after or args.outcome
    if not streamed:
        return _result_files(client, args)
    if args.out is not None:
        raise ClientError(
            "--out downloads the ended batch's files; --jsonl, --follow, --after and --outcome "
            "print the results as JSONL instead: give one or the other"
        )
    if not args.follow:
        for line in client.result_lines(
            args.id, after=args.after, outcome=args.outcome, follow=False
        ):
            _print_line(line)
        return EXIT_OK
    return _follow(client, args)


FOLLOW_RETRIES = 30  # tries in a row that fail before --follow gives up
FOLLOW_RETRY_MAX_SECONDS = 5.0


def _print_line(line: bytes) -> None:
    sys.stdout.buffer.write(line + b"\n")
    sys.stdout.buffer.flush()


def _follow(client: Client, args: argparse.Namespace) -> int:
    """Print each result once as it is committed until the batch ends; when the connection
    drops (or the server restarts) read again after the last line printed."""
    last: str | None = args.after
    failures, delay = 0, 0.5
    while True:
        try:
            for line in client.result_lines(
                args.id, after=last, outcome=args.outcome, follow=True
            ):
                _print_line(line)
                last = str(json.loads(line)["id"])
                failures, delay = 0, 0.5
            batch = client.json("GET", f"/batches/{_id(args.id)}")
            if batch["status"] in TERMINAL:
                return _ended(batch)
            # The stream ended early (a proxy's limit, a server stopping): read on.
        except Dropped as exc:
            failures += 1
            if failures > FOLLOW_RETRIES:
                raise
            where = f"after {last}" if last else "from the start"
            print(f"batchd: {exc}; reading again {where}", file=sys.stderr)
        time.sleep(delay)
        delay = min(delay * 2, FOLLOW_RETRY_MAX_SECONDS)


def _ended(batch: Any) -> int:
    """The exit status of a batch that ended (as ``submit --wait``'s): 0 completed, 1
    expired or cancelled, 2 failed (its errors are printed)."""
    status = batch["status"]
    if status == "completed":
        return EXIT_OK
    print(f"batchd: batch {batch['id']} ended {status}", file=sys.stderr)
    if status == "failed":
        _print_errors(batch)
        return EXIT_MISTAKE
    return EXIT_NOT_DONE


def _result_files(client: Client, args: argparse.Namespace) -> int:
    batch = client.json("GET", f"/batches/{_id(args.id)}")
    if batch["status"] not in TERMINAL:
        c = batch["request_counts"]
        raise ClientError(
            f"batch {args.id} is still {batch['status']} ({c['completed'] + c['failed']}/"
            f"{c['total']} done); its files come when it ends (`batchd results "
            f"{args.id} --follow` prints the results as they come)",
            EXIT_NOT_DONE,
        )
    written = _save(client, batch, out_dir(args.out if args.out is not None else "."), batch["id"])
    for path in written.values():
        print(path)
    if not written and batch["status"] != "failed":
        print(f"batchd: batch {args.id} ended {batch['status']} with no files", file=sys.stderr)
    return _ended(batch)  # the files are saved; the status says how the batch ended (README)


def retry(client: Client, args: argparse.Namespace) -> int:
    """A new batch of the requests that failed (or never ran) in batch ID."""
    batch = client.json("GET", f"/batches/{_id(args.id)}")
    if batch["status"] not in TERMINAL:
        raise ClientError(f"batch {args.id} is still {batch['status']}", EXIT_NOT_DONE)
    if not batch.get("error_file_id"):
        print(f"batch {args.id} has no failed requests", file=sys.stderr)
        return EXIT_OK
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
    path = out_dir(args.out or ".") / f"{args.id}_retry.jsonl"
    try:
        path.write_bytes(b"\n".join(lines) + b"\n")
    except OSError as exc:
        raise ClientError(f"cannot write {path}: {exc.strerror or exc}") from None
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
    return EXIT_OK


def _id(text: str) -> str:
    """An id as a path segment (an id with a slash or a space is no id of ours)."""
    return urllib.parse.quote(text, safe="")


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
        p.add_argument(
            "--url",
            default=os.environ.get("BATCHD_URL", DEFAULT_URL),
            help=f"the server: its root or its /v1 base URL (env BATCHD_URL; {DEFAULT_URL})",
        )
        p.add_argument(
            "--key", default=os.environ.get("BATCHD_API_KEY"), help="API key (BATCHD_API_KEY)"
        )

    p = sub.add_parser("submit", help="upload a JSONL file and create a batch")
    p.add_argument("file")
    p.add_argument("--endpoint", help="default: the url of the first line")
    p.add_argument("--window", default="24h", help="completion window")
    p.add_argument(
        "--wait",
        action="store_true",
        help="show progress until the batch ends, then write FILE's results beside it "
        "(NAME.output.jsonl, NAME.errors.jsonl)",
    )
    p.add_argument("--out", help="with --wait: the folder for the results (made if missing)")
    common(p)
    p = sub.add_parser("ls", help="list batches, newest first")
    p.add_argument("--limit", type=int, default=20)
    common(p)
    for name, text in (("show", "show a batch"), ("cancel", "cancel a batch")):
        p = sub.add_parser(name, help=text)
        p.add_argument("id")
        common(p)
    p = sub.add_parser(
        "results",
        help="download an ended batch's output and error files (into --out, default .), or "
        "print its results committed so far as JSONL (--jsonl; --follow: until it ends)",
    )
    p.add_argument("id")
    p.add_argument(
        "--jsonl", action="store_true", help="print the results committed so far as JSONL"
    )
    p.add_argument(
        "--follow", action="store_true", help="print each result as it comes until the batch ends"
    )
    p.add_argument("--after", help="the id of a result line: print the results after it")
    p.add_argument("--outcome", choices=("succeeded", "failed"), help="only these results")
    p.add_argument(
        "--out", help="the folder for the ended batch's output and error files (default .)"
    )
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
        return exc.exit_code
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # `batchd ls | head`: the reader left; say nothing more (and let the interpreter's
        # last flush of stdout go nowhere).
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_NOT_DONE
