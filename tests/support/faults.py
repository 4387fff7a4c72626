"""Fault injection for the embedded S3: what a flaky network and a throttled S3 do to requests.

A WSGI middleware in front of moto applies *rules* to matching requests; tests and benchmarks set
the rules over HTTP (``POST /_faults``) on the running server, so the faults reach the client as
real HTTP: status codes, reset connections, bodies cut short.

Faults:

* ``slowdown``: ``503 SlowDown``, as S3 answers above its request rate.
* ``error500``: ``500 InternalError``.
* ``reset``: the TCP connection is reset before any response (``ECONNRESET`` at the client).
* ``lost-reply``: the request is carried out, then the connection is reset before the answer (a
  retried conditional write then meets its own first write).
* ``cut``: headers promise the whole body, half of it is sent, then the connection is reset.
* ``short``: a well-formed response whose body (and Content-Length) is half of what was asked.
* ``short-checksum``: as ``short``, with an ``x-amz-checksum-crc32`` header of the whole body, so
  botocore's checksum validation fails (``FlexibleChecksumError``).
* ``latency``: the request is delayed by ``latency_ms``.

A rule is a JSON object: ``fault`` (required), ``method`` (``GET``, ``PUT``, ... or ``*``), ``key``
(a regular expression searched in the request path ``/bucket/key``), ``ranged`` (only requests
with, or without, a ``Range`` header), ``times`` (inject at most this often), ``every`` (every
N-th matching request), ``probability`` (with the server's seeded generator), ``latency_ms``.
"""

from __future__ import annotations

import base64
import json
import random
import re
import socket
import struct
import threading
import time
import urllib.request
import zlib
from dataclasses import asdict, dataclass

from infra.s3server import EmbeddedS3, serve, server_parser

CONTROL_PATH = "/_faults"
FAULTS = ("slowdown", "error500", "reset", "lost-reply", "cut", "short", "short-checksum", "latency")
ERROR_BODIES = {
    "slowdown": ("503 Slow Down", "SlowDown", "Please reduce your request rate."),
    "error500": ("500 Internal Server Error", "InternalError", "We encountered an internal error. Please try again."),
}


@dataclass
class Rule:
    """Which requests get which fault, and how often (see the module docstring)."""

    fault: str
    method: str = "*"
    key: str = ""
    ranged: bool | None = None
    times: int | None = None
    every: int = 1
    probability: float = 1.0
    latency_ms: float = 0.0
    matched: int = 0
    injected: int = 0

    def __post_init__(self) -> None:
        if self.fault not in FAULTS:
            raise ValueError(f"fault {self.fault!r}: expected one of {', '.join(FAULTS)}")
        if self.every < 1 or not 0.0 <= self.probability <= 1.0:
            raise ValueError(f"every {self.every}, probability {self.probability}: expected >= 1 and in [0, 1]")
        re.compile(self.key)

    def wants(self, environ: dict, rng: random.Random) -> bool:
        """Count a request against this rule; true when it gets the fault."""
        if self.method not in ("*", environ.get("REQUEST_METHOD")):
            return False
        if self.ranged is not None and self.ranged != ("HTTP_RANGE" in environ):
            return False
        if self.key and not re.search(self.key, environ.get("PATH_INFO", "")):
            return False
        self.matched += 1
        if self.times is not None and self.injected >= self.times:
            return False
        if self.matched % self.every or rng.random() >= self.probability:
            return False
        self.injected += 1
        return True


def _reset(environ: dict) -> None:
    """Abort the client's TCP connection with a reset (SO_LINGER 0, then close)."""
    connection = environ.get("werkzeug.socket")
    if connection is None:
        raise ConnectionAbortedError("fault injection needs werkzeug's socket to reset a connection")
    connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    connection.shutdown(socket.SHUT_RDWR)
    connection.close()


def _respond(app, environ: dict) -> tuple[str, list, bytes]:
    captured = {}

    def capture(status, headers, exc_info=None):
        captured["status"], captured["headers"] = status, headers
        return lambda data: None

    body = b"".join(app(environ, capture))
    return captured["status"], captured["headers"], body


def _with_length(headers: list, length: int, extra: list = ()) -> list:
    kept = [(k, v) for k, v in headers if k.lower() != "content-length" and not k.lower().startswith("x-amz-checksum")]
    return kept + [("Content-Length", str(length)), *extra]


class FaultInjector:
    """WSGI middleware applying :class:`Rule` s, controlled at ``CONTROL_PATH``."""

    def __init__(self, app, seed: int = 0):
        self.app = app
        self.rules: list[Rule] = []
        self.rng = random.Random(seed)
        self.lock = threading.Lock()

    def __call__(self, environ, start_response):
        if environ.get("PATH_INFO") == CONTROL_PATH:
            return self._control(environ, start_response)
        with self.lock:
            chosen = [rule for rule in self.rules if rule.wants(environ, self.rng)]
        for rule in chosen:
            if rule.fault == "latency":
                time.sleep(rule.latency_ms / 1000.0)
        fault = next((rule.fault for rule in chosen if rule.fault != "latency"), None)
        if fault is None:
            return self.app(environ, start_response)
        if fault in ERROR_BODIES:
            status, code, message = ERROR_BODIES[fault]
            body = f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code><Message>{message}</Message></Error>"
            start_response(status, [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))])
            return [body.encode()]
        if fault == "reset":
            _reset(environ)
            return []
        status, headers, body = _respond(self.app, environ)
        if fault == "lost-reply":
            _reset(environ)
            return []
        if not status.startswith("2") or len(body) < 2:
            start_response(status, _with_length(headers, len(body)))
            return [body]
        half = body[:len(body) // 2]
        if fault == "cut":
            start_response(status, _with_length(headers, len(body)))
            return self._cut_after(half, environ)
        extra = []
        if fault == "short-checksum":
            extra = [("x-amz-checksum-crc32", base64.b64encode(struct.pack(">I", zlib.crc32(body))).decode())]
        start_response(status, _with_length(headers, len(half), extra))
        return [half]

    @staticmethod
    def _cut_after(data: bytes, environ: dict):
        yield data
        _reset(environ)

    def _control(self, environ, start_response):
        method = environ.get("REQUEST_METHOD")
        try:
            if method == "POST":
                length = int(environ.get("CONTENT_LENGTH") or 0)
                rules = [Rule(**rule) for rule in json.loads(environ["wsgi.input"].read(length) or b"[]")]
                with self.lock:
                    self.rules = rules
            elif method == "DELETE":
                with self.lock:
                    self.rules = []
        except (ValueError, TypeError) as err:
            body = json.dumps({"error": str(err)}).encode()
            start_response("400 Bad Request", [("Content-Type", "application/json"),
                                               ("Content-Length", str(len(body)))])
            return [body]
        with self.lock:
            body = json.dumps([asdict(rule) for rule in self.rules]).encode()
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]


class Faults:
    """The client side: set, read and clear the rules of a running server at ``endpoint_url``."""

    def __init__(self, endpoint_url: str):
        self.url = endpoint_url.rstrip("/") + CONTROL_PATH

    def _call(self, method: str, payload: list | None = None) -> list[dict]:
        data = json.dumps(payload).encode() if payload is not None else None
        request = urllib.request.Request(self.url, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def set(self, *rules: dict) -> list[dict]:
        """Replace the server's rules (each a dict of :class:`Rule` fields)."""
        return self._call("POST", [dict(rule) for rule in rules])

    def rules(self) -> list[dict]:
        """The current rules with how many requests each matched and how many got the fault."""
        return self._call("GET")

    def injected(self) -> int:
        return sum(rule["injected"] for rule in self.rules())

    def clear(self) -> None:
        self._call("DELETE")

    def __enter__(self) -> Faults:
        return self

    def __exit__(self, *exc) -> None:
        self.clear()


class FaultyS3(EmbeddedS3):
    """The embedded S3 with a :class:`FaultInjector` in front of moto (``python -m tests.support.faults``);
    ``faults`` sets its rules while it runs."""

    SERVER_MODULE = "tests.support.faults"

    def __init__(self, host: str = "127.0.0.1", port: int = 0, latency_ms: float = 0.0, seed: int = 0):
        super().__init__(host, port, latency_ms)
        self.seed = seed

    def server_flags(self) -> list[str]:
        return ["--seed", str(self.seed)]

    @property
    def faults(self) -> Faults:
        """The server's fault rules."""
        return Faults(self.endpoint_url)


def main(argv: list[str] | None = None) -> None:
    parser = server_parser(__doc__)
    parser.add_argument("--seed", type=int, default=0, help="seed of probabilistic faults")
    args = parser.parse_args(argv)
    serve(args.host, args.port, args.latency_ms, wrap=lambda app: FaultInjector(app, args.seed))


if __name__ == "__main__":
    main()
