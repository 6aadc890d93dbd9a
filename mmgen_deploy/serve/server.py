"""Find, start, watch and stop a real `tritonserver`.

Where no Triton is installed system-wide, the server binary and the Python backend come
from the `nvidia-pytriton` wheel (extra `serve`). PyTriton's own `Triton()` wrapper is not
used (it fails on Python 3.11.7, pytriton issue #51); we drive the binary with a model
repository instead, which is also exactly what the official Triton container does.

Process hygiene: the server runs in its own process group (so its Python-backend stub
processes can be stopped together with it), gets SIGTERM when the process that started it
dies (`prctl(PR_SET_PDEATHSIG)`), and `TritonServer.stop()` escalates to SIGKILL.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from mmgen_deploy.errors import MMGenError, NotAvailableError
from mmgen_deploy.io_utils import check_write_target

_PR_SET_PDEATHSIG = 1
_PYTHON_BACKEND_FILES = ("libtriton_python.so", "triton_python_backend_utils.py")
_STUB_NAME = "triton_python_backend_stub"
PYTHONPATH_VARIABLE = "MMGEN_PYTHONPATH"
NUMPY1_VARIABLE = "MMGEN_TRITON_NUMPY1"
# Error lines every CPU-only start prints; they never explain a failure.
_NOISE = ("CudaDriverHelper has not been initialized", "Unable to allocate pinned system memory")


class ServerError(MMGenError):
    """The Triton server failed to start, load its models, or become ready."""


@dataclass(frozen=True)
class TritonInstall:
    """Where a usable `tritonserver` lives and what it needs to run."""

    binary: Path
    origin: str  # "system" or "nvidia-pytriton"
    # Directory holding `python/libtriton_python.so`; for the wheel it is assembled per launch
    # because the stub for the running Python has to sit next to the backend library.
    backends_dir: Path | None = None
    python_backend_dir: Path | None = None
    stub: Path | None = None
    lib_dirs: tuple[Path, ...] = field(default_factory=tuple)


def _python_tag() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def find_triton() -> TritonInstall:
    """The server to use: $MMGEN_TRITONSERVER, a system-wide `tritonserver`, or the pytriton wheel's."""
    explicit = os.environ.get("MMGEN_TRITONSERVER")
    if explicit:
        binary = Path(explicit)
        if not (binary.is_file() and os.access(binary, os.X_OK)):
            raise NotAvailableError(f"MMGEN_TRITONSERVER={explicit} is not an executable file",
                                    "point it at a tritonserver binary or unset it")
        return _system_install(binary)
    on_path = shutil.which("tritonserver")
    if on_path:
        return _system_install(Path(on_path))
    if Path("/opt/tritonserver/bin/tritonserver").is_file():
        return _system_install(Path("/opt/tritonserver/bin/tritonserver"))
    return _wheel_install()


def _system_install(binary: Path) -> TritonInstall:
    # The official layout is <root>/bin/tritonserver next to <root>/backends.
    backends = binary.resolve().parent.parent / "backends"
    return TritonInstall(binary=binary, origin="system", backends_dir=backends if backends.is_dir() else None)


def _wheel_install() -> TritonInstall:
    spec = importlib.util.find_spec("pytriton")  # locate without importing (its __init__ is heavy)
    if spec is None or not spec.submodule_search_locations:
        raise NotAvailableError("no Triton Inference Server found: no `tritonserver` on PATH and the "
                                "nvidia-pytriton wheel is not installed",
                                "pip install 'mmgen-deploy[serve]' (ships tritonserver), or run inside the "
                                "official Triton container (see `mmgen triton-repo`)")
    package = Path(next(iter(spec.submodule_search_locations)))
    dist = package / "tritonserver"
    binary = dist / "bin" / "tritonserver"
    backend = dist / "backends" / "python"
    stub = dist / "python_backend_stubs" / _python_tag() / _STUB_NAME
    missing = [p for p in (binary, backend / "libtriton_python.so") if not p.is_file()]
    if missing:
        raise NotAvailableError(f"the nvidia-pytriton wheel at {package} lacks {missing[0].name}",
                                "reinstall it: pip install --force-reinstall --no-deps nvidia-pytriton")
    if not stub.is_file():
        available = sorted(p.name for p in (dist / "python_backend_stubs").glob("*"))
        raise NotAvailableError(f"nvidia-pytriton has no Python-backend stub for Python {_python_tag()} "
                                f"(it has {', '.join(available) or 'none'})",
                                "use one of those Python versions, or the official Triton container")
    lib_dirs = [package.parent / "nvidia_pytriton.libs", dist / "external_libs"]
    # The stub links libpython<major.minor>.so; the running interpreter's copy must win over
    # whatever the system has, or the embedded interpreter would not match this Python.
    libpython_dir = sysconfig.get_config_var("LIBDIR")
    if libpython_dir:
        lib_dirs.insert(0, Path(libpython_dir))
    return TritonInstall(binary=binary, origin="nvidia-pytriton", python_backend_dir=backend, stub=stub,
                         lib_dirs=tuple(p for p in lib_dirs if p.is_dir()))


def prepare_backends(install: TritonInstall, workdir: Path) -> Path | None:
    """The --backend-directory to pass: for the wheel, a fresh `python` backend with the stub beside it."""
    if install.python_backend_dir is None:
        return install.backends_dir
    backends = workdir / "backends"
    python_dir = backends / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    for name in _PYTHON_BACKEND_FILES:
        shutil.copy2(install.python_backend_dir / name, python_dir / name)
    assert install.stub is not None
    shutil.copy2(install.stub, python_dir / _STUB_NAME)
    return backends


def _numpy_major() -> int:
    from importlib import metadata

    try:
        return int(metadata.version("numpy").split(".")[0])
    except (metadata.PackageNotFoundError, ValueError):
        return 0


def numpy1_overlay_dir() -> Path:
    """Where a numpy<2 for the wheel's Python-backend stub is looked for ($MMGEN_TRITON_NUMPY1)."""
    explicit = os.environ.get(NUMPY1_VARIABLE)
    if explicit:
        return Path(explicit)
    beside = Path(sys.prefix) / "mmgen-serve" / "numpy1"
    if beside.is_dir() or os.access(sys.prefix, os.W_OK):
        return beside
    # A read-only interpreter (a system Python): a per-user cache instead.
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "mmgen" / f"triton-numpy1-py{_python_tag()}"


def _has_numpy(directory: Path) -> bool:
    return (directory / "numpy" / "__init__.py").is_file()


def install_numpy1(target: Path, echo: Callable[[str], None] | None = None) -> None:
    """`pip install --target TARGET 'numpy<2'` with this interpreter's pip, into a temp dir renamed into place."""
    say = echo or (lambda line: print(line, file=sys.stderr, flush=True))
    say(f"first use of the nvidia-pytriton server: installing numpy<2 for its Python-backend stub into {target} "
        "(once; this environment keeps its numpy 2)")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".numpy1-", dir=target.parent))
    try:
        result = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                                 "--no-input", "--target", str(staging), "numpy<2"],
                                capture_output=True, text=True, timeout=900)
        if result.returncode != 0 or not _has_numpy(staging):
            lines = [line for line in (result.stderr or result.stdout).splitlines() if line.strip()]
            raise NotAvailableError(
                "the Python-backend stub shipped in nvidia-pytriton needs numpy<2, and installing it failed"
                + (f" ({lines[-1].strip()})" if lines else ""),
                f"pip install --target {target} 'numpy<2' (or set {NUMPY1_VARIABLE} to such a directory)")
        try:
            staging.rename(target)
        except OSError:
            if not _has_numpy(target):  # another process won the race: its copy is as good as ours
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def prepare_stub_python(install: TritonInstall, workdir: Path, echo: Callable[[str], None] | None = None,
                        auto_install: bool = True) -> Path:
    """The directory whose `python3` the stub should find on PATH.

    nvidia-pytriton's stub was built against numpy 1 (pybind11 reads numpy's dtype struct
    directly; under numpy 2 every tensor crossing the backend is garbled), which is why the
    wheel requires numpy<2. In an environment that has numpy 2 we give the stub a thin
    virtual environment of its own: a numpy 1 directory first, then this environment's
    site-packages (so onnxruntime, torch and mmgen_deploy are the same). On first use that
    directory is installed with pip (unless $MMGEN_TRITON_NUMPY1 names one: then it must exist).
    """
    this_env_bin = Path(sys.executable).parent
    if install.origin != "nvidia-pytriton" or _numpy_major() < 2:
        return this_env_bin
    numpy1 = numpy1_overlay_dir()
    if not _has_numpy(numpy1):
        if not auto_install or os.environ.get(NUMPY1_VARIABLE):
            raise NotAvailableError(
                "the Python-backend stub shipped in nvidia-pytriton needs numpy<2, but this environment has "
                f"numpy 2 and {numpy1} holds no numpy",
                f"pip install --target {numpy1} 'numpy<2' (or set {NUMPY1_VARIABLE} to such a directory, or unset "
                "it: `mmgen serve` then installs one on first use)")
        install_numpy1(numpy1, echo)
    env_dir = workdir / "stub-python"
    site_packages = env_dir / "lib" / f"python{_python_tag()}" / "site-packages"
    site_packages.mkdir(parents=True)
    (env_dir / "bin").mkdir()
    # getpath finds pyvenv.cfg next to the (unresolved) `python3` and makes env_dir sys.prefix.
    (env_dir / "bin" / "python3").symlink_to(Path(sys.executable).resolve())
    base_home = Path(sys.executable).resolve().parent
    (env_dir / "pyvenv.cfg").write_text(f"home = {base_home}\ninclude-system-site-packages = false\n"
                                        f"version = {'.'.join(map(str, sys.version_info[:3]))}\n")
    parent_sites = [p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()]
    # numpy 1 first; then this environment's site dirs through site.addsitedir, so that their own
    # .pth files (editable installs and the like) are processed as in this interpreter.
    lines = [str(numpy1)] + [f"import site; site.addsitedir({p!r})" for p in parent_sites]
    (site_packages / "mmgen_stub_paths.pth").write_text("\n".join(lines) + "\n")
    return env_dir / "bin"


def server_environment(install: TritonInstall, python_paths: list[Path], stub_python_bin: Path) -> dict[str, str]:
    """Environment for the server and the Python-backend stubs it spawns (they inherit it)."""
    env = os.environ.copy()
    lib_path = [str(p) for p in install.lib_dirs]
    if env.get("LD_LIBRARY_PATH"):
        lib_path.append(env["LD_LIBRARY_PATH"])
    if lib_path:
        env["LD_LIBRARY_PATH"] = os.pathsep.join(lib_path)
    # The Python-backend stub embeds libpython with an isolated configuration: it ignores
    # PYTHONPATH and derives sys.prefix from the `python3` it finds on PATH (a virtual
    # environment's pyvenv.cfg included). Put this interpreter's directory first so the stub sees
    # the same site-packages (numpy, onnxruntime, torch) as this process.
    env["PATH"] = os.pathsep.join([str(stub_python_bin), env.get("PATH", "")])
    # Extra import roots (e.g. a source checkout of mmgen_deploy) go through our own variable,
    # which the generated model.py prepends to sys.path.
    if python_paths:
        env[PYTHONPATH_VARIABLE] = os.pathsep.join(str(p) for p in python_paths)
    # Each stub would otherwise start one thread per core; several instances share the machine.
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _die_with_parent() -> None:
    """preexec_fn: deliver SIGTERM to the server if the process that started it dies."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the process group kill in stop() still applies
        pass


def summarize_failure(lines: list[str]) -> str:
    """The server's own error lines: model load failures (`UNAVAILABLE: ...`) and `error: ...`."""
    found: list[str] = []
    rows = iter(lines)
    for line in rows:
        if "UNAVAILABLE:" in line:
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            text = " ".join(cells[2:]) if len(cells) >= 3 else line.strip()
            # Triton wraps long table cells over several rows; append the continuation text.
            for more in rows:
                if more.startswith("+") or not more.startswith("|"):
                    break
                cont = [c.strip() for c in more.strip().strip("|").split("|")]
                if cont and not cont[0]:
                    text += " " + " ".join(c for c in cont if c)
                else:
                    break
            # The Python backend appends the Python stack ("At: file(line): fn ..."): drop it.
            text = text.split(" At: ")[0].split("  At:")[0].strip()
            found.append(f"model {cells[0]}: {text}" if cells else text)
        elif line.startswith("error:"):
            found.append(line.strip())
    if not found:
        # glog error lines: "E1124 14:23:33.151539 13283 main.cc:257] \"message\"".
        messages = [line.split("] ", 1)[-1].strip().strip('"').strip() for line in lines
                    if line[:1] == "E" and line[1:5].isdigit()]
        found = [m for m in messages if not any(noise in m for noise in _NOISE)][-2:]
    return "; ".join(dict.fromkeys(found)) or "tritonserver exited without an error message"


def free_loopback_ports(count: int) -> list[int]:
    """`count` distinct loopback ports free right now, for a server started on them next (tests,
    benchmarks). All sockets are held open together, so none is handed out twice; another process
    may still take one before the server binds it, which the server then reports as "already in use"."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


# How long `TritonServer.stop` waits: for tritonserver after SIGTERM (it has --exit-timeout-secs to
# finish in-flight requests), for the process after SIGKILL, and for the thread reading its log.
SIGTERM_GRACE_S = 15.0
SIGKILL_WAIT_S = 10.0
READER_JOIN_S = 5.0
LONGEST_STOP_S = SIGTERM_GRACE_S + SIGKILL_WAIT_S + READER_JOIN_S


class TritonServer:
    """One supervised `tritonserver` process on a model repository.

    Use as a context manager, or call `start()` / `wait_ready()` / `stop()`.
    """

    def __init__(self, repository: Path, *, host: str = "127.0.0.1", http_port: int = 8000,
                 grpc_port: int = 8001, metrics_port: int | None = 8002, log_file: Path | None = None,
                 python_paths: list[Path] | None = None, echo: Callable[[str], None] | None = None,
                 install: TritonInstall | None = None, exit_timeout_s: int = 5) -> None:
        self.repository = Path(repository)
        self.host, self.http_port, self.grpc_port, self.metrics_port = host, http_port, grpc_port, metrics_port
        self.log_file = log_file
        self.python_paths = python_paths or []
        self.echo = echo
        self.install = install or find_triton()
        self.exit_timeout_s = exit_timeout_s
        self.process: subprocess.Popen[bytes] | None = None
        self.log_tail: collections.deque[str] = collections.deque(maxlen=2000)
        self._workdir: Path | None = None
        self._reader: threading.Thread | None = None

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def command(self, backends: Path | None) -> list[str]:
        cmd = [str(self.install.binary), f"--model-repository={self.repository}",
               f"--http-address={self.host}", f"--http-port={self.http_port}",
               f"--grpc-address={self.host}", f"--grpc-port={self.grpc_port}",
               f"--exit-timeout-secs={self.exit_timeout_s}", "--strict-readiness=true",
               "--disable-auto-complete-config"]
        if backends is not None:
            cmd.append(f"--backend-directory={backends}")
        if self.metrics_port is None:
            cmd.append("--allow-metrics=false")
        else:
            cmd += [f"--metrics-address={self.host}", f"--metrics-port={self.metrics_port}"]
        return cmd

    def start(self) -> None:
        if not self.repository.is_dir():
            raise ServerError(f"model repository {self.repository} does not exist",
                              "write one with `mmgen triton-repo RUN_DIR --out REPO`")
        self._workdir = Path(tempfile.mkdtemp(prefix="mmgen-triton-"))
        backends = prepare_backends(self.install, self._workdir)
        stub_bin = prepare_stub_python(self.install, self._workdir, echo=self.echo)
        env = server_environment(self.install, self.python_paths, stub_bin)
        self.process = subprocess.Popen(
            self.command(backends), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=env, start_new_session=True, preexec_fn=_die_with_parent)
        self._reader = threading.Thread(target=self._read_output, name="tritonserver-log", daemon=True)
        self._reader.start()

    def _read_output(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        if self.log_file:
            check_write_target(self.log_file, label="log file")
        log = open(self.log_file, "a", encoding="utf-8") if self.log_file else None  # noqa: SIM115
        try:
            for raw in self.process.stdout:
                line = raw.decode("utf-8", errors="replace").rstrip("\n")
                self.log_tail.append(line)
                if log:
                    log.write(line + "\n")
                    log.flush()
                if self.echo:
                    self.echo(line)
        finally:
            if log:
                log.close()

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.http_url}/v2/health/ready", timeout=2) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, ready_timeout_s: float = 120.0) -> None:
        """Block until Triton says ready (every model loaded); raise with the server's error otherwise."""
        assert self.process is not None, "start() first"
        deadline = time.monotonic() + ready_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self._join_reader()
                summary = summarize_failure(list(self.log_tail))
                self._cleanup()
                raise ServerError(f"tritonserver exited with code {self.process.returncode}: {summary}",
                                  "fix the repository or the ports; `mmgen serve --verbose` shows the full log")
            if self.is_ready():
                return
            time.sleep(0.25)
        summary = summarize_failure(list(self.log_tail))
        self.stop()
        raise ServerError(f"tritonserver not ready after {ready_timeout_s:.0f} s ({summary})",
                          "raise {ready_timeout_s}, or check the log with {verbose}",
                          params=["ready_timeout_s", "verbose"])

    def _join_reader(self) -> None:
        if self._reader is not None:
            self._reader.join(timeout=READER_JOIN_S)

    def stop(self, timeout_s: float = SIGTERM_GRACE_S) -> int | None:
        """SIGTERM the server's process group, SIGKILL what is left after `timeout_s`. Idempotent.
        At most `LONGEST_STOP_S` with the default grace."""
        proc = self.process
        if proc is None:
            return None
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=SIGKILL_WAIT_S)
        # Stub processes of the Python backend share the group: make sure none outlives the server.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        self._join_reader()
        self._cleanup()
        return proc.returncode

    def _cleanup(self) -> None:
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def __enter__(self) -> TritonServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def running_server(repository: Path, ready_timeout_s: float = 120.0, **kwargs: object) -> Iterator[TritonServer]:
    """Start a server, wait until ready, yield it, always stop it."""
    server = TritonServer(repository, **kwargs)  # type: ignore[arg-type]
    server.start()
    try:
        server.wait_ready(ready_timeout_s)
        yield server
    finally:
        server.stop()
