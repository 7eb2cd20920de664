"""Real object-storage endpoints on loopback for tests: an HTTP file server and moto's standalone S3 server.

Both run as threads of the test process and serve real sockets on 127.0.0.1, so trainer subprocesses (run.sh →
deepspeed → sd_ds.train) reach them exactly as they would reach a real store. Both count the bytes of object
data they send, so a test can assert how much a run read (e.g. before the first step after a resume).

    from tests.object_stores import HTTPFileServer, S3Server

    with HTTPFileServer(shard_dir) as http:          # GET/HEAD with Range, directory listings
        url = http.url("shards/")                    # http://127.0.0.1:PORT/shards/
        ...; http.bytes_served; http.reset_counts()

    HTTPFileServer(root, fail_every=7)                # every 7th GET answered 503 (1: every GET); fail_suffix=".tar":
                                                      # only GETs of paths ending so count and fail; http.failures
    HTTPFileServer(root, basic_auth=("user", "TOKEN"), query_token=("X-Amz-Signature", "SIG"))
                                                      # a request without the basic-auth credential or the query
                                                      # parameter is refused (401); http.url(...) has neither:
    http.url("shards/", auth=True)                    # http://user:TOKEN@127.0.0.1:PORT/shards/

    with S3Server() as s3:                            # moto's ThreadedMotoServer (what s3fs's own tests use)
        url = s3.upload_dir(shard_dir, "bucket", "prefix")   # -> "s3://bucket/prefix"
        env = s3.env                                  # AWS_* variables for a subprocess (endpoint, dummy keys)
        with s3.environ(): ...                        # the same variables in this process, restored after
        ...; s3.bytes_served; s3.reset_counts()

pytest fixtures ``http_server_factory`` and ``s3_server`` (module scope) wrap them; import them into a test module
(``from tests.object_stores import s3_server, http_server_factory  # noqa: F401``).

Keep this API stable: tests of other modules (the converter, the latent encoder) use it too.
"""

from __future__ import annotations

import contextlib
import http.server
import os
import re
import threading
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import pytest

from sd_ds.testing import free_port

__all__ = ["HTTPFileServer", "S3Server", "http_server_factory", "s3_server"]

_RANGE = re.compile(r"bytes=(\d*)-(\d*)$")


class _Counter:
    """Bytes and requests served, shared by a server's handler threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.bytes = 0
        self.requests: list[tuple[str, str, int]] = []  # (method, path, bytes of body sent)

    def add(self, method: str, path: str, nbytes: int) -> None:
        with self.lock:
            self.bytes += nbytes
            self.requests.append((method, path, nbytes))

    def reset(self) -> None:
        with self.lock:
            self.bytes = 0
            self.requests = []


class _Served:
    """What both servers share: the byte counts, and start/stop as a context manager."""

    counter: _Counter
    _server: Any
    _thread: Optional[threading.Thread]

    @property
    def bytes_served(self) -> int:
        return self.counter.bytes

    @property
    def requests(self) -> list[tuple[str, str, int]]:
        return list(self.counter.requests)

    def reset_counts(self) -> None:
        self.counter.reset()

    def _serve(self, name: str) -> None:
        self._thread = threading.Thread(target=self._server.serve_forever, name=name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            close = getattr(self._server, "server_close", None)
            if close is not None:
                close()
        if self._thread is not None:
            self._thread.join()

    def start(self) -> Any:
        raise NotImplementedError

    def __enter__(self) -> Any:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


# --- HTTP ------------------------------------------------------------------------------------------------

class _Handler(http.server.SimpleHTTPRequestHandler):
    """SimpleHTTPRequestHandler plus single byte ranges (what fsspec's HTTP filesystem asks for) and a count of
    the body bytes sent. Directory listings (HTML with links) are what fsspec's ``ls``/``glob`` read."""

    counter: _Counter  # set on the per-server subclass
    server_object: "HTTPFileServer"
    protocol_version = "HTTP/1.1"  # keep-alive, as a real server; every response has a Content-Length

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet: tests read their own logs
        pass

    def _refuse(self, status: int) -> None:
        self.send_response(status)
        if status == 401:
            self.send_header("WWW-Authenticate", 'Basic realm="shards"')
        self.send_header("Content-Length", "0")
        self.end_headers()

    def send_head(self):  # type: ignore[override]
        status = self.server_object.refusal(self)
        if status:
            self._refuse(status)
            return None
        path = self.translate_path(self.path)
        if os.path.isdir(path) or not os.path.isfile(path):
            return super().send_head()  # listings, redirects to "dir/", 404
        size = os.path.getsize(path)
        start, end = 0, size - 1
        match = _RANGE.match(self.headers.get("Range", "").strip())
        if match and (match.group(1) or match.group(2)):
            if match.group(1):
                start = int(match.group(1))
                end = min(int(match.group(2)), size - 1) if match.group(2) else size - 1
            else:  # a suffix: the last N bytes
                start = max(0, size - int(match.group(2)))
            if start >= size or start > end:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return None
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        else:
            self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(end - start + 1))
        self.end_headers()
        f = open(path, "rb")
        f.seek(start)
        self._remaining = end - start + 1
        return f

    def copyfile(self, source, outputfile) -> None:  # type: ignore[override]
        remaining = getattr(self, "_remaining", None)
        sent = 0
        while remaining is None or remaining > 0:
            chunk = source.read(1 << 16 if remaining is None else min(1 << 16, remaining))
            if not chunk:
                break
            try:
                outputfile.write(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break  # the client stopped reading (closed a stream early): count what was sent
            sent += len(chunk)
            if remaining is not None:
                remaining -= len(chunk)
        self._remaining = None
        self.counter.add(self.command, self.path, sent)


class HTTPFileServer(_Served):
    """A directory served over HTTP on 127.0.0.1 (a free port) from a thread; counts body bytes sent. Optionally
    a flaky store (``fail_every``: every Nth GET, of paths ending in ``fail_suffix``, is answered 503) and one
    that wants a credential (``basic_auth`` user and password, or ``query_token`` name and value: either one)."""

    def __init__(self, root: str | os.PathLike, *, fail_every: int = 0, fail_suffix: str = "",
                 basic_auth: Optional[tuple[str, str]] = None, query_token: Optional[tuple[str, str]] = None) -> None:
        self.root = Path(root)
        self.counter = _Counter()
        self.fail_every, self.fail_suffix = fail_every, fail_suffix
        self.basic_auth, self.query_token = basic_auth, query_token
        self.gets = 0  # GETs that count towards fail_every
        self.failures = 0  # answered 503
        self.failed_paths: list[str] = []  # their paths, in order
        self.failed_ranges: list[Optional[str]] = []  # and Range headers
        self.refused = 0  # answered 401 (no credential)
        handler = type("Handler", (_Handler,), {"counter": self.counter, "server_object": self})
        self._server = http.server.ThreadingHTTPServer(
            ("127.0.0.1", 0), lambda *a, **kw: handler(*a, directory=str(self.root), **kw))
        self._server.daemon_threads = True
        self._thread: Optional[threading.Thread] = None

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def url(self, path: str = "", auth: bool = False) -> str:
        """http://127.0.0.1:PORT/<path> (path relative to the served root); ``auth``: with the basic-auth
        credential in the URL (http://user:password@...)."""
        userinfo = f"{self.basic_auth[0]}:{self.basic_auth[1]}@" if auth and self.basic_auth else ""
        return f"http://{userinfo}127.0.0.1:{self.port}/{path.lstrip('/')}"

    def refusal(self, request: http.server.BaseHTTPRequestHandler) -> int:
        """The status a request is refused with (0: served)."""
        import base64
        from urllib.parse import parse_qsl, urlsplit

        if self.basic_auth or self.query_token:
            query = dict(parse_qsl(urlsplit(request.path).query))
            given = request.headers.get("Authorization", "")
            expected = "Basic " + base64.b64encode(":".join(self.basic_auth or ("", "")).encode()).decode()
            if not ((self.basic_auth and given == expected)
                    or (self.query_token and query.get(self.query_token[0]) == self.query_token[1])):
                with self.counter.lock:
                    self.refused += 1
                return 401
        if self.fail_every and request.command == "GET" and urlsplit_path(request.path).endswith(self.fail_suffix):
            with self.counter.lock:
                self.gets += 1
                if self.gets % self.fail_every == 0:
                    self.failures += 1
                    self.failed_paths.append(urlsplit_path(request.path))
                    self.failed_ranges.append(request.headers.get("Range"))
                    return 503
        return 0

    def start(self) -> "HTTPFileServer":
        self._serve("http-file-server")
        return self


def urlsplit_path(path: str) -> str:
    return path.split("?", 1)[0]


# --- S3 (moto's standalone server) ------------------------------------------------------------------------

class _CountingApp:
    """WSGI middleware: counts the bytes of the bodies of GET responses (object data, listings)."""

    def __init__(self, app: Callable, counter: _Counter) -> None:
        self.app, self.counter = app, counter

    def __call__(self, environ: dict, start_response: Callable) -> Iterator[bytes]:
        method, path = environ.get("REQUEST_METHOD", ""), environ.get("PATH_INFO", "")
        sent = 0
        try:
            for chunk in self.app(environ, start_response):
                sent += len(chunk)
                yield chunk
        finally:
            if method == "GET":
                self.counter.add(method, path, sent)


class S3Server(_Served):
    """moto's S3 API on 127.0.0.1 (a free port) in a thread of this process, with dummy credentials.

    Clients find it the standard way: ``AWS_ENDPOINT_URL`` (botocore ≥ 1.31, hence s3fs), the access keys and
    region in ``env``. Buckets are created by ``upload_dir``."""

    ACCESS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_SESSION_TOKEN": "testing",
              "AWS_DEFAULT_REGION": "us-east-1"}

    def __init__(self) -> None:
        self.counter = _Counter()
        self.port = free_port()
        self._server: Any = None
        self._thread: Optional[threading.Thread] = None

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        """What a subprocess needs to reach this server through the standard AWS variables."""
        return {**self.ACCESS, "AWS_ENDPOINT_URL": self.endpoint_url}

    @contextlib.contextmanager
    def environ(self) -> Iterator[None]:
        """``env`` set in this process (and fsspec's cached S3 clients dropped), restored afterwards."""
        saved = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)
        _clear_fsspec_cache()
        try:
            yield
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            _clear_fsspec_cache()

    def client(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name=self.ACCESS["AWS_DEFAULT_REGION"],
                            aws_access_key_id=self.ACCESS["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=self.ACCESS["AWS_SECRET_ACCESS_KEY"])

    def upload_dir(self, local: str | os.PathLike, bucket: str, prefix: str = "") -> str:
        """Every file under ``local`` (hidden ones included) to ``s3://bucket/prefix/<relative path>``; the
        bucket is created if needed. Returns ``s3://bucket/prefix`` (no trailing slash)."""
        client = self.client()
        existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
        if bucket not in existing:
            client.create_bucket(Bucket=bucket)
        local = Path(local)
        prefix = prefix.strip("/")
        for path in sorted(local.rglob("*")):
            if path.is_file():
                key = "/".join(filter(None, [prefix, path.relative_to(local).as_posix()]))
                client.upload_file(str(path), bucket, key)
        return f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"

    def start(self) -> "S3Server":
        from moto.server import DomainDispatcherApplication, create_backend_app
        from werkzeug.serving import WSGIRequestHandler, make_server

        class Quiet(WSGIRequestHandler):
            def log_request(self, *args: Any, **kwargs: Any) -> None:  # tests read their own logs
                pass

        # ThreadedMotoServer's own setup, with the counting middleware around the app.
        app = _CountingApp(DomainDispatcherApplication(create_backend_app), self.counter)
        self._server = make_server("127.0.0.1", self.port, app, threaded=True, request_handler=Quiet)
        self._serve("moto-s3")
        return self


def _clear_fsspec_cache() -> None:
    # fsspec caches filesystem instances (and s3fs its clients) by their arguments, not by the environment.
    try:
        import fsspec

        for cls in list(fsspec.registry.values()) if hasattr(fsspec.registry, "values") else []:
            clear = getattr(cls, "clear_instance_cache", None)
            if clear is not None:
                clear()
    except Exception:  # noqa: BLE001 - an optional clean-up
        pass


# --- pytest fixtures --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def s3_server() -> Iterator[S3Server]:
    """One moto S3 server per test module, its AWS_* variables set in this process while it runs."""
    with S3Server() as server, server.environ():
        yield server


@pytest.fixture(scope="module")
def http_server_factory() -> Iterator[Callable[[str | os.PathLike], HTTPFileServer]]:
    """``factory(directory)`` → a started HTTPFileServer over it; all are stopped at the end of the module."""
    servers: list[HTTPFileServer] = []

    def make(root: str | os.PathLike) -> HTTPFileServer:
        servers.append(HTTPFileServer(root).start())
        return servers[-1]

    yield make
    for server in servers:
        server.stop()
