"""Helpers for tests that run the real proxy and real upstreams.

``ProxyProcess`` starts ``outrider run -c FILE`` as a child process;
``ThreadedServer`` runs a real asyncio server (aiohttp app or a raw
Protocol) on its own loop in a background thread, so a test's own client can
run on the main thread.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable

from aiohttp import web


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (loopback only)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 5.0, method: str = "GET") -> tuple[int, str]:
    """A plain synchronous request (for admin endpoints)."""
    req = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


class ProxyProcess:
    """A running ``outrider run`` process and its admin interface."""

    def __init__(
        self,
        config_path: Path,
        admin_port: int,
        extra_args: list[str] | None = None,
        env: dict[str, str] | None = None,
        python: str = sys.executable,
    ) -> None:
        self.config_path = config_path
        self.admin_port = admin_port
        self.admin = f"http://127.0.0.1:{admin_port}"
        self.log_path = config_path.with_suffix(".log")
        self._log = open(self.log_path, "wb")
        cmd = [python, "-m", "outrider", "run", "-c", str(config_path), "--log-level", "debug"]
        self.proc = subprocess.Popen(
            cmd + (extra_args or []),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )

    def wait_ready(self, timeout: float = 15.0) -> "ProxyProcess":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"proxy exited with {self.proc.returncode}:\n{self.output()}")
            try:
                status, _ = http_get(f"{self.admin}/ready", timeout=1.0)
                if status == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"proxy not ready after {timeout}s:\n{self.output()}")

    def output(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stats(self) -> dict[str, int]:
        status, body = http_get(f"{self.admin}/stats?format=json")
        assert status == 200, body
        # Counters and gauges; Envoy's last element {"histograms": ...} is not one.
        return {s["name"]: s["value"] for s in json.loads(body)["stats"] if "name" in s}

    def stat(self, name: str) -> int:
        return self.stats().get(name, 0)

    def wait_stat(self, name: str, value: int, timeout: float = 5.0) -> int:
        """Poll until stat ``name`` reaches ``value`` (stats are updated just
        after a response is written, so a client may be a hair ahead)."""
        deadline = time.monotonic() + timeout
        current = self.stat(name)
        while current < value and time.monotonic() < deadline:
            time.sleep(0.02)
            current = self.stat(name)
        return current

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()
        return self.proc.returncode


class DefaultConfigProxy(ProxyProcess):
    """``outrider run`` with no ``-c``: the embedded default configuration
    (welcome page on 127.0.0.1:10000, admin on 127.0.0.1:9901). Its output
    goes to ``log_dir/outrider-default.log``."""

    def __init__(
        self,
        log_dir: Path,
        admin_port: int = 9901,
        extra_args: list[str] | None = None,
        env: dict[str, str] | None = None,
        python: str = sys.executable,
    ) -> None:
        self.config_path = None  # type: ignore[assignment]
        self.admin_port = admin_port
        self.admin = f"http://127.0.0.1:{admin_port}"
        self.log_path = log_dir / "outrider-default.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [python, "-m", "outrider", "run", *(extra_args or [])],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    """Whether binding ``host:port`` fails right now (something holds it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        # As the proxy binds (SO_REUSEADDR), so a TIME_WAIT leftover is not "in use".
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
        return False


class ProxyRunner:
    """Writes configs into a temp dir and starts proxies from them."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.procs: list[ProxyProcess] = []

    def config(self, yaml_text: str, name: str = "outrider.yaml", admin_port: int | None = None) -> tuple[Path, int]:
        admin_port = admin_port or free_port()
        text = textwrap.dedent(yaml_text)
        if "admin:" not in text:
            text = f"admin:\n  address: 127.0.0.1:{admin_port}\n" + text
        path = self.tmp_path / name
        path.write_text(text)
        return path, admin_port

    def start(
        self,
        yaml_text: str,
        wait: bool = True,
        env: dict[str, str] | None = None,
        extra_args: list[str] | None = None,
        python: str = sys.executable,
    ) -> ProxyProcess:
        path, admin_port = self.config(yaml_text, name=f"outrider-{len(self.procs)}.yaml")
        proc = ProxyProcess(path, admin_port, extra_args=extra_args, env=env, python=python)
        self.procs.append(proc)
        return proc.wait_ready() if wait else proc

    def stop_all(self) -> None:
        for proc in self.procs:
            proc.stop()


class ThreadedServer:
    """Runs ``start(loop)`` (a coroutine factory that binds a server and
    returns a closer) on a private event loop in a daemon thread."""

    def __init__(self, start: Callable[[], Any]) -> None:
        self.loop = asyncio.new_event_loop()
        self._start = start
        self._closer: Any = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("test server did not start")
        if self._error:
            raise self._error

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self._closer = self.loop.run_until_complete(self._start())
        except BaseException as exc:  # surfaced to the test
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        self.loop.run_forever()

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the server's loop and return its result."""
        done = threading.Event()
        result: list[Any] = []

        def run() -> None:
            result.append(fn())
            done.set()

        self.loop.call_soon_threadsafe(run)
        done.wait(5)
        return result[0] if result else None

    def stop(self) -> None:
        async def close() -> None:
            if self._closer is not None:
                await self._closer()

        if self.loop.is_running():
            asyncio.run_coroutine_threadsafe(close(), self.loop).result(10)
            self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def echo_app(name: str = "upstream") -> web.Application:
    """An HTTP upstream that reports what it received, with a few behaviours
    selected by path: ``/status/<code>``, ``/delay/<seconds>``,
    ``/bytes/<n>`` (n bytes, chunked when ``?chunked=1``), ``/stream/<n>``."""
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app["requests"] = []  # noqa

    async def echo(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        record = {
            "upstream": name,
            "method": request.method,
            "path": request.path_qs,
            "headers": [[k.lower(), v] for k, v in request.headers.items()],
            "body_len": len(body),
            "body": body.decode("latin-1") if len(body) <= 4096 else "",
        }
        request.app["requests"].append(record)
        parts = request.path.split("/")
        if len(parts) >= 3 and parts[1] == "status":
            return web.Response(status=int(parts[2]), text=f"status {parts[2]}\n")
        if len(parts) >= 3 and parts[1] == "delay":
            await asyncio.sleep(float(parts[2]))
        if len(parts) >= 3 and parts[1] == "bytes":
            n = int(parts[2])
            data = (b"0123456789abcdef" * (n // 16 + 1))[:n]
            if request.query.get("chunked"):
                resp = web.StreamResponse()
                resp.enable_chunked_encoding()
                await resp.prepare(request)
                for i in range(0, n, 65536):
                    await resp.write(data[i : i + 65536])
                await resp.write_eof()
                return resp
            return web.Response(body=data)
        return web.json_response(record, headers={"x-upstream": name})

    app.router.add_route("*", "/{tail:.*}", echo)
    return app


def start_aiohttp(app: web.Application, host: str = "127.0.0.1", port: int = 0) -> tuple[ThreadedServer, int]:
    bound: list[int] = []

    async def start() -> Any:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound.append(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]
        return runner.cleanup

    server = ThreadedServer(start)
    return server, bound[0]


class ScriptedProtocol(asyncio.Protocol):
    """A raw upstream: ``handler(data, transport)`` decides what to send."""

    def __init__(self, handler: Callable[[bytes, asyncio.Transport], None], received: list[bytes]) -> None:
        self.handler = handler
        self.received = received

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.received.append(data)
        self.handler(data, self.transport)


def start_raw(handler: Callable[[bytes, asyncio.Transport], None], host: str = "127.0.0.1") -> tuple[ThreadedServer, int, list[bytes]]:
    """A raw TCP upstream whose answers the test scripts byte by byte."""
    received: list[bytes] = []
    bound: list[int] = []

    async def start() -> Any:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: ScriptedProtocol(handler, received), host, 0)
        bound.append(server.sockets[0].getsockname()[1])

        async def close() -> None:
            server.close()

        return close

    srv = ThreadedServer(start)
    return srv, bound[0], received


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Poll ``predicate`` until it holds or ``timeout`` seconds pass; its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def serve_protocol(factory: Callable[[], asyncio.Protocol], sndbuf: int = 0, rcvbuf: int = 0) -> tuple[ThreadedServer, int]:
    """Run an asyncio server of ``factory`` protocols on 127.0.0.1:<free port>.

    ``sndbuf``/``rcvbuf`` shrink the kernel buffers of accepted sockets (set on
    the listening socket so they apply from the handshake on), which keeps
    the bytes the kernel holds small next to what a test measures.
    """
    bound: list[int] = []

    async def start() -> Any:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if sndbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.bind(("127.0.0.1", 0))
        server = await asyncio.get_running_loop().create_server(factory, sock=sock)
        bound.append(server.sockets[0].getsockname()[1])

        async def close() -> None:
            server.close()

        return close

    server = ThreadedServer(start)
    return server, bound[0]


def connect_socket(port: int, timeout: float = 10.0, rcvbuf: int = 0, sndbuf: int = 0) -> socket.socket:
    """A blocking client socket to 127.0.0.1:``port``, with small kernel
    buffers when asked (so that what a test holds back stays in the proxy)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    if sndbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    sock.settimeout(timeout)
    sock.connect(("127.0.0.1", port))
    return sock


def rss_bytes(pid: int) -> int:
    """Resident memory of process ``pid``."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def chunk_at(index: int, base: bytes) -> bytes:
    """``base`` stamped with its sequence number: a lost, repeated or
    reordered chunk changes the hash of a transfer."""
    return index.to_bytes(8, "big") + base[8:]


def raw_exchange(port: int, data: bytes, timeout: float = 5.0, host: str = "127.0.0.1") -> bytes:
    """Send ``data`` on a fresh connection; read until the peer closes or
    ``timeout`` passes; return everything read."""
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(data)
        chunks = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                break
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)


# -- virtual environments: third-party packages and wheel installs ----------

REPO_ROOT = Path(__file__).resolve().parent.parent

#: Overlaid on os.environ for every interpreter of a :class:`Venv` (also pass
#: it as ``env=`` to ``ProxyRunner.start``): no user site-packages, no
#: PYTHONPATH (an empty value counts as unset) and no current directory on
#: ``sys.path`` (PYTHONSAFEPATH; ``python -m`` run from the repository root
#: would otherwise read the entry points of ./outrider.egg-info, the editable
#: install's metadata, before the venv's), so such an interpreter sees only
#: the venv's own site-packages and then the system's.
VENV_ENV = {"PYTHONNOUSERSITE": "1", "PYTHONPATH": "", "PYTHONSAFEPATH": "1"}


class Venv:
    """A ``python3 -m venv --system-site-packages`` environment in ``path``.

    It sees everything installed system-wide (aiohttp, pluggy, ..., pip,
    build and the editable outrider) and installs into its own
    site-packages, which comes first on its ``sys.path``: a package installed
    here shadows a system one of the same name. (setuptools' editable finder
    for the system outrider sits at the *end* of ``sys.meta_path``, after the
    path-based finder, so it only answers when nothing on ``sys.path`` does.)
    It is made ``--without-pip`` (3 s faster): ``python -m pip`` imports the
    system's pip, which installs into the venv it runs in.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        subprocess.run(
            [sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(path)],
            check=True, capture_output=True, env={**os.environ, **VENV_ENV},
        )
        self.python = path / "bin" / "python"
        self.bin = path / "bin"
        self.site_packages = Path(self.run(
            "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"
        ).stdout.strip())

    def run(self, *args: str, check: bool = True, timeout: float = 120.0, cwd: Path | None = None) -> subprocess.CompletedProcess:
        """``python ARGS`` in this venv; output captured as text. With
        ``check``, a non-zero exit raises with both streams in the message."""
        proc = subprocess.run(
            [str(self.python), *args], capture_output=True, text=True, timeout=timeout,
            cwd=cwd, env={**os.environ, **VENV_ENV},
        )
        if check and proc.returncode != 0:
            raise RuntimeError(
                f"{self.python} {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
            )
        return proc

    def pip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.run("-m", "pip", "--disable-pip-version-check", "-q", *args, check=check, timeout=300)

    def outrider(self, *args: str, check: bool = False, timeout: float = 30.0) -> subprocess.CompletedProcess:
        """``outrider ARGS`` with this venv's interpreter."""
        return self.run("-m", "outrider", *args, check=check, timeout=timeout)

    def ensure_build_backend(self, pyproject: Path = REPO_ROOT / "pyproject.toml") -> list[str]:
        """Make ``--no-build-isolation`` / ``--no-isolation`` builds possible:
        the ``[build-system] requires`` of ``pyproject`` (setuptools>=68,
        wheel) must be importable here. What the system already satisfies is
        used as is (no network); only what is missing or too old is installed,
        into this venv alone, from the configured package index. Returns what
        was installed."""
        import tomllib

        requires = tomllib.loads(pyproject.read_text())["build-system"]["requires"]
        missing = self.run("-c", _MISSING_REQUIREMENTS, *requires).stdout.splitlines()
        if missing:
            self.pip("install", *missing)
        return missing


# Prints the requirements (argv) that the running interpreter does not satisfy.
_MISSING_REQUIREMENTS = """
import sys, importlib.metadata as md
from packaging.requirements import Requirement
for text in sys.argv[1:]:
    req = Requirement(text)
    if req.marker is not None and not req.marker.evaluate():
        continue
    try:
        ok = req.specifier.contains(md.version(req.name), prereleases=True)
    except md.PackageNotFoundError:
        ok = False
    if not ok:
        print(text)
"""


def copy_source_tree(src: Path, dst: Path) -> Path:
    """Copy a project's source into ``dst`` for building, leaving out VCS and
    build leftovers. Building a copy writes no ``build/`` or ``*.egg-info``
    into the work tree, and a stale ``build/lib`` (setuptools reuses it) can
    not smuggle deleted files into the wheel."""
    import fnmatch
    import shutil

    skip_top = {".git", "build", "dist", ".pytest_cache", ".benchmarks", "bench", "tests"}
    # *.so: modules built in place by an editable install; the wheel must
    # carry the ones its own build compiles.
    skip_any = ("__pycache__", "*.egg-info", "*.pyc", "*.so", ".venv*")

    def ignore(folder: str, names: list[str]) -> set[str]:
        top = Path(folder).resolve() == src.resolve()
        return {
            n for n in names
            if (top and n in skip_top) or any(fnmatch.fnmatch(n, p) for p in skip_any)
        }

    shutil.copytree(src, dst, ignore=ignore)
    return dst
