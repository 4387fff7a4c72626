"""An embedded S3 for a first try, the demo, tests and benchmarks: a moto server in its own process.

It is real HTTP on a real port, so ranged GETs, retries and forked DataLoader workers behave as
they do against S3. ``--latency-ms`` delays every request, to model S3's per-request latency. The
tests wrap it in a fault injector (``tests/support/faults.py``) through ``serve(wrap=...)``.

    brainseg-s3server --port 9000 --latency-ms 20     # prints the variables to export, serves until Ctrl-C
"""

from __future__ import annotations

import argparse
import logging
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
from werkzeug.serving import make_server

START_TIMEOUT_S = 30.0


def _latency_middleware(app, latency_s: float):
    def delayed(environ, start_response):
        time.sleep(latency_s)
        return app(environ, start_response)

    return delayed


def serve(host: str, port: int, latency_ms: float, wrap=None) -> None:
    """Serve S3 on ``host:port`` until killed; ``wrap`` (a WSGI middleware) goes around moto."""
    logging.getLogger("werkzeug").setLevel(logging.CRITICAL)  # no line per request, none per injected reset
    app = DomainDispatcherApplication(create_backend_app)
    if latency_ms > 0:
        app = _latency_middleware(app, latency_ms / 1000.0)
    if wrap is not None:
        app = wrap(app)
    server = make_server(host, port, app, threaded=True, request_handler=MotoRequestHandler)
    server.serve_forever()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class EmbeddedS3:
    """Start a moto S3 server in a subprocess; use as a context manager.

    Attributes:
        endpoint_url: ``http://127.0.0.1:PORT`` for clients on this machine.
    """

    SERVER_MODULE = "infra.s3server"  # the module whose main() serves (``python -m``)

    def __init__(self, host: str = "127.0.0.1", port: int = 0, latency_ms: float = 0.0):
        self.host = host
        self.port = port or free_port(host)
        self.latency_ms = latency_ms
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        self._process: subprocess.Popen | None = None
        self._log = None

    def environment(self) -> dict[str, str]:
        """Variables that point boto3 at this server (moto accepts any credentials)."""
        return {"AWS_ENDPOINT_URL": self.endpoint_url, "AWS_ACCESS_KEY_ID": "embedded",
                "AWS_SECRET_ACCESS_KEY": "embedded", "AWS_DEFAULT_REGION": "us-east-1"}

    def start(self) -> EmbeddedS3:
        command = [sys.executable, "-m", self.SERVER_MODULE, "--host", self.host,
                   "--port", str(self.port), "--latency-ms", str(self.latency_ms), *self.server_flags()]
        # A file, not a pipe: a pipe nobody drains fills up and blocks the server.
        self._log = tempfile.TemporaryFile()
        self._process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=self._log)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"embedded S3 exited with code {self._process.returncode}: "
                                   f"{self._read_log()[-2000:]}")
            try:
                urllib.request.urlopen(self.endpoint_url + "/moto-api/", timeout=1).close()
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"embedded S3 did not answer on {self.endpoint_url} within {START_TIMEOUT_S} s")

    def server_flags(self) -> list[str]:
        """Extra flags of the server module (none here)."""
        return []

    def _read_log(self) -> str:
        self._log.seek(0)
        return self._log.read().decode(errors="replace")

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
        self._process = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> EmbeddedS3:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def server_parser(description: str = __doc__) -> argparse.ArgumentParser:
    """The server's flags (a wrapping server module adds its own)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for local-mode containers)")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--latency-ms", type=float, default=0.0, help="delay added to every request")
    return parser


def environment_text(port: int) -> str:
    """What a user exports to reach the server on ``port`` from this machine."""
    return "\n".join(f"export {name}={value}" for name, value in EmbeddedS3(port=port).environment().items())


def main(argv: list[str] | None = None) -> None:
    args = server_parser().parse_args(argv)
    print(f"embedded S3 (moto, in memory: everything is lost when it stops) on http://{args.host}:{args.port}\n"
          f"in another shell:\n{environment_text(args.port)}\n"
          f"then e.g. brainseg-upload ./my-cases s3://my-bucket/dataset/ (it creates the bucket); Ctrl-C stops",
          flush=True)
    try:
        serve(args.host, args.port, args.latency_ms)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
