"""Fault injection for tests and the reliability report: a failing filesystem and a failing S3.

:class:`FaultyFileSystem` is an fsspec filesystem (protocol ``faulty``) that wraps another
one and fails chosen operations with ``ENOSPC``, ``EIO``, ``EROFS`` or a transient error,
by operation kind and path glob. It is used through the normal storage layer, either by
URL with storage options or constructed explicitly::

    save_model("faulty:///tmp/run/model.ckpt-5", model,
               storage_options={"faults": [Fault("write", "ENOSPC", "*.distcp")]})

A ``faulty`` URL wrapping local disk keeps the POSIX commit protocol (atomic rename,
fsync); wrapping ``s3`` (``target_protocol="s3"``) keeps the object-store one.

:class:`FaultProxy` is an HTTP proxy on 127.0.0.1 in front of an S3 server (moto in the
tests) that answers a seeded fraction of requests with ``500 InternalError`` or drops the
connection without an answer.
"""

from __future__ import annotations

import errno
import fnmatch
import http.client
import random
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import IO, Any

import fsspec
from fsspec.spec import AbstractFileSystem

__all__ = ["Fault", "FaultInjector", "FaultyFileSystem", "FaultProxy", "read_only", "disk_full"]

#: Operation kinds a :class:`Fault` can target.
OPS = ("read", "list", "write", "append", "mkdir", "rename", "delete", "fsync")
MUTATING = ("write", "append", "mkdir", "rename", "delete")

_ERRORS = {
    "ENOSPC": (errno.ENOSPC, "No space left on device"),
    "EIO": (errno.EIO, "Input/output error"),
    "EROFS": (errno.EROFS, "Read-only file system"),
    "transient": (errno.EAGAIN, "Resource temporarily unavailable"),
}


@dataclass(slots=True)
class Fault:
    """Fail matching operations.

    Attributes:
        op: an operation kind from :data:`OPS`, several joined by ``|``, or ``*``.
        error: ``ENOSPC``, ``EIO``, ``EROFS`` or ``transient`` (``EAGAIN``).
        path: an ``fnmatch`` glob on the path (``*`` matches ``/`` too).
        after: let this many matching operations succeed first.
        times: fail this many times, then succeed again (``None``: for ever).
    """

    op: str
    error: str
    path: str = "*"
    after: int = 0
    times: int | None = None
    seen: int = field(default=0, compare=False)
    fired: int = field(default=0, compare=False)

    def __post_init__(self) -> None:
        kinds = self.op.split("|")
        if self.op != "*" and any(k not in OPS for k in kinds):
            raise ValueError(f"Fault.op {self.op!r}: use '*' or kinds from {OPS} joined by '|'")
        if self.error not in _ERRORS:
            raise ValueError(f"Fault.error {self.error!r}: use one of {sorted(_ERRORS)}")

    def matches(self, op: str, path: str) -> bool:
        return (self.op == "*" or op in self.op.split("|")) and fnmatch.fnmatchcase(path, self.path)


def read_only(path: str = "*") -> list[Fault]:
    """Faults of a read-only location: every mutating operation fails with ``EROFS``."""
    return [Fault("|".join(MUTATING), "EROFS", path)]


def disk_full(after_writes: int = 0, path: str = "*") -> list[Fault]:
    """Faults of a full disk: writing data into files fails with ``ENOSPC`` after ``after_writes``
    writes succeed (creating an empty file still works, as on a real full disk)."""
    return [Fault("append", "ENOSPC", path, after=after_writes)]


class FaultInjector:
    """Decides, per operation, whether to fail it; counts what it injected (thread-safe)."""

    def __init__(self, faults: Iterable[Fault] = ()) -> None:
        self.faults = list(faults)
        self.injected: list[tuple[str, str, str]] = []
        self._lock = threading.Lock()

    def check(self, op: str, path: str) -> None:
        """Raise the first matching fault's error, or return."""
        with self._lock:
            for fault in self.faults:
                if not fault.matches(op, path):
                    continue
                fault.seen += 1
                if fault.seen <= fault.after or (fault.times is not None and fault.fired >= fault.times):
                    continue
                fault.fired += 1
                self.injected.append((op, path, fault.error))
                code, text = _ERRORS[fault.error]
                raise OSError(code, f"{text} (injected on {op})", path)


class _FaultyFile:
    """A file of :class:`FaultyFileSystem`: writes may fail (``append`` faults)."""

    def __init__(self, raw: IO[bytes], path: str, injector: FaultInjector) -> None:
        self._raw, self._path, self._injector = raw, path, injector

    def write(self, data: Any) -> int:
        self._injector.check("append", self._path)
        return int(self._raw.write(data))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._raw, name)

    def __enter__(self) -> _FaultyFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self._raw.close()


class FaultyFileSystem(AbstractFileSystem):  # type: ignore[misc]
    """An fsspec filesystem that wraps another and fails chosen operations.

    Args:
        target_protocol: the wrapped filesystem's protocol (``file``, ``s3``, ``memory`` ...).
        target_options: its options (endpoint, credentials ...).
        faults: the faults to inject (:class:`Fault`).
        injector: share an existing :class:`FaultInjector` (overrides ``faults``).

    Example:
        >>> fs = FaultyFileSystem("memory", faults=read_only())
        >>> fs.pipe_file("/x", b"1")
        Traceback (most recent call last):
        OSError: [Errno 30] Read-only file system (injected on write): '/x'
    """

    protocol = ("faulty",)
    cachable = False

    def __init__(
        self,
        target_protocol: str = "file",
        target_options: Mapping[str, Any] | None = None,
        faults: Sequence[Fault] = (),
        injector: FaultInjector | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        options = dict(target_options or {})
        if target_protocol not in ("file", "local", "memory"):
            options.setdefault("use_listings_cache", False)  # as storage_for does
        self.fs = fsspec.filesystem(target_protocol, **options)
        self.injector = injector if injector is not None else FaultInjector(faults)
        protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple | list) else (self.fs.protocol,)
        self.target_is_local = bool({"file", "local"} & set(protocols))

    @classmethod
    def _strip_protocol(cls, path: Any) -> Any:
        if isinstance(path, list):
            return [cls._strip_protocol(p) for p in path]
        text = str(path)
        return text[len("faulty://") :] if text.startswith("faulty://") else text

    def inject(self, op: str, path: str) -> None:
        """The hook :class:`reckpt.storage.core.Storage` calls for operations done with ``os``."""
        self.injector.check(op, path)

    # -- delegated operations, each checked first --------------------------------------
    def _open(self, path: str, mode: str = "rb", **kwargs: Any) -> Any:
        path = self._strip_protocol(path)
        writing = "w" in mode or "a" in mode
        self.injector.check("write" if writing else "read", path)
        raw = self.fs.open(path, mode, **kwargs)
        return _FaultyFile(raw, path, self.injector) if writing else raw

    def cat_file(self, path: str, start: int | None = None, end: int | None = None, **kw: Any) -> bytes:
        path = self._strip_protocol(path)
        self.injector.check("read", path)
        return bytes(self.fs.cat_file(path, start=start, end=end, **kw))

    def pipe_file(self, path: str, value: bytes, **kwargs: Any) -> None:
        path = self._strip_protocol(path)
        self.injector.check("write", path)
        self.fs.pipe_file(path, value, **kwargs)

    def ls(self, path: str, detail: bool = True, **kwargs: Any) -> Any:
        path = self._strip_protocol(path)
        self.injector.check("list", path)
        return self.fs.ls(path, detail=detail, **kwargs)

    def info(self, path: str, **kwargs: Any) -> Any:
        path = self._strip_protocol(path)
        self.injector.check("list", path)
        return self.fs.info(path, **kwargs)

    def find(self, path: str, *args: Any, **kwargs: Any) -> Any:
        path = self._strip_protocol(path)
        self.injector.check("list", path)
        return self.fs.find(path, *args, **kwargs)

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        path = self._strip_protocol(path)
        self.injector.check("mkdir", path)
        self.fs.makedirs(path, exist_ok=exist_ok)

    def mkdir(self, path: str, create_parents: bool = True, **kwargs: Any) -> None:
        path = self._strip_protocol(path)
        self.injector.check("mkdir", path)
        self.fs.mkdir(path, create_parents=create_parents, **kwargs)

    def rm_file(self, path: str) -> None:
        path = self._strip_protocol(path)
        self.injector.check("delete", path)
        self.fs.rm_file(path)

    def rm(self, path: Any, recursive: bool = False, maxdepth: int | None = None) -> None:
        path = self._strip_protocol(path)
        self.injector.check("delete", str(path))
        self.fs.rm(path, recursive=recursive, maxdepth=maxdepth)

    def copy(self, path1: Any, path2: Any, *args: Any, **kwargs: Any) -> None:
        path1, path2 = self._strip_protocol(path1), self._strip_protocol(path2)
        self.injector.check("write", str(path2))
        self.fs.copy(path1, path2, *args, **kwargs)

    def mv(self, path1: Any, path2: Any, *args: Any, **kwargs: Any) -> None:
        path1, path2 = self._strip_protocol(path1), self._strip_protocol(path2)
        self.injector.check("rename", str(path2))
        self.fs.mv(path1, path2, *args, **kwargs)


fsspec.register_implementation("faulty", FaultyFileSystem, clobber=True)


class _ProxyHandler(BaseHTTPRequestHandler):
    server: _ProxyServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        return

    def _body(self) -> bytes:
        length = self.headers.get("Content-Length")
        if length is not None:
            return self.rfile.read(int(length))
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            out = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                chunk = self.rfile.read(size)
                self.rfile.readline()
                if size == 0:
                    # Trailers end with an empty line.
                    while self.rfile.readline().strip():
                        pass
                    return out
                out += chunk
        return b""

    def _handle(self) -> None:
        proxy = self.server.proxy
        body = self._body()
        verdict = proxy.decide()
        if verdict == "drop":
            self.close_connection = True
            self.connection.shutdown(2)
            return
        if verdict == "error":
            payload = b"<Error><Code>InternalError</Code><Message>injected</Message></Error>"
            self.send_response(500)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)
            return
        hop = ("transfer-encoding", "connection", "expect", "host")
        headers = {k: v for k, v in self.headers.items() if k.lower() not in hop}
        headers["Content-Length"] = str(len(body))
        conn = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=60)
        try:
            conn.request(self.command, self.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        self.send_response(resp.status)
        length = str(len(data))
        for k, v in resp.getheaders():
            if k.lower() == "content-length" and self.command == "HEAD":
                length = v  # a HEAD answer has no body but tells the object's size
            elif k.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(k, v)
        self.send_header("Content-Length", length)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle


class _ProxyServer(ThreadingHTTPServer):
    daemon_threads = True
    proxy: FaultProxy


class FaultProxy:
    """An HTTP proxy on 127.0.0.1 that fails a seeded fraction of S3 requests.

    Args:
        upstream_port: the S3 server's port on 127.0.0.1.
        error_rate: fraction answered ``500 InternalError`` without reaching the server.
        drop_rate: fraction whose connection is closed without an answer.
        seed: the seed of the decisions.

    Use as a context manager; :attr:`endpoint` is the URL to give the S3 client, and
    :attr:`requests`, :attr:`errors`, :attr:`drops` count what happened.
    """

    def __init__(
        self, upstream_port: int, error_rate: float = 0.0, drop_rate: float = 0.0, seed: int = 0
    ) -> None:
        self.upstream_port = upstream_port
        self.error_rate = error_rate
        self.drop_rate = drop_rate
        self.requests = self.errors = self.drops = 0
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._server = _ProxyServer(("127.0.0.1", 0), _ProxyHandler)
        self._server.proxy = self
        self._thread = threading.Thread(target=self._server.serve_forever, name="fault-proxy", daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def decide(self) -> str:
        """``pass``, ``error`` or ``drop`` for the next request (seeded, thread-safe)."""
        with self._lock:
            self.requests += 1
            x = self._rng.random()
            if x < self.drop_rate:
                self.drops += 1
                return "drop"
            if x < self.drop_rate + self.error_rate:
                self.errors += 1
                return "error"
            return "pass"

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
