"""Compiling the CPU kernels on first use, and caching the shared library.

The kernels are one C++17 file with a plain C interface (no torch headers), compiled on first use
by the machine's C++ compiler for the machine's own instruction set (``-march=native``), the way
Triton and torch.compile build theirs. The library is cached under a name that hashes everything it
depends on (the source, the compiler and its version, the flags, the CPU's feature flags), and is
written to a temporary file first and moved into place, so that concurrent or interrupted builds
never leave a broken library behind. Processes that build at once into one cache compile once: the
others wait on the first's lock on the cache folder, then load its library.

Environment:

- ``CXX``: the compiler, one executable (default: the first of ``c++``, ``g++``, ``clang++`` on
  ``PATH``);
- ``INNERLOOP_CACHE_DIR``: where libraries go (default ``$XDG_CACHE_HOME/innerloop`` or
  ``~/.cache/innerloop``; a leading ``~`` is the home folder);
- ``INNERLOOP_DISABLE_CPU_KERNELS=1`` (or ``true``, ``yes``, ``on``; ``0``, ``false``, ``no``, ``off`` or
  unset: use them): do not use them (the torch paths run instead). Read at every choice of path, so it
  can be set at any time: it applies from the next call, and a backward of a forward that ran on the
  kernels finishes on them. A value that is not yes/no keeps them off, the dispatch reason says why.

A build that fails is not retried within the process (``clear_cache`` forgets the outcome).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import struct
import subprocess
import tempfile
import time
import warnings
from pathlib import Path

from innerloop.core.callers import warning_stacklevel
from innerloop.core.durable import fsync_directory
from innerloop.core.environment import EnvironmentSwitchError, environment_flag

try:
    import fcntl
except ImportError:  # not on Windows: abandoned temporary libraries are then left in the cache
    fcntl = None  # type: ignore[assignment]

SOURCE = Path(__file__).with_name("ttt_stack.cpp")
BASE_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno", "-fno-trapping-math")
# Tried in order, the first that compiles wins: the host's instruction set and OpenMP (which, inside
# torch, resolves to torch's own OpenMP runtime and thread pool), then without either. The first set
# also lets the compiler's own vectorised loops use 512-bit registers where the host has them (GCC's
# -march=native prefers 256-bit ones on recent Intel CPUs; the products' tiles are 512 bits anyway):
# the hoisting's backward ran 25-30% faster and a training step 2-4% (README.md), same numbers.
FLAG_SETS = (
    (*BASE_FLAGS, "-march=native", "-mprefer-vector-width=512", "-fopenmp"),
    (*BASE_FLAGS, "-march=native", "-fopenmp"),
    (*BASE_FLAGS, "-fopenmp"),
    (*BASE_FLAGS, "-march=native"),
    BASE_FLAGS,
)
DISABLE_VARIABLE = "INNERLOOP_DISABLE_CPU_KERNELS"


class CPUKernelUnavailable(RuntimeError):
    """The CPU kernels cannot be built or loaded here (the message says why)."""


def cache_dir() -> Path:
    """Where compiled libraries are kept: ``$INNERLOOP_CACHE_DIR`` (a leading ``~`` is the home folder,
    as a shell would have expanded it), else ``innerloop`` in ``$XDG_CACHE_HOME`` or ``~/.cache``. Either
    variable empty or only spaces is unset (not a folder named by spaces in the current folder)."""
    if os.environ.get("INNERLOOP_CACHE_DIR", "").strip():
        return Path(os.path.expanduser(os.environ["INNERLOOP_CACHE_DIR"]))
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = xdg if xdg.strip() else os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "innerloop"


def find_compiler() -> str | None:
    """The C++ compiler to use: ``$CXX`` or the first usual name on ``PATH``."""
    if os.environ.get("CXX"):
        return shutil.which(os.environ["CXX"]) or os.environ["CXX"]
    for name in ("c++", "g++", "clang++"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _cpu_identity() -> str:
    """What ``-march=native`` depends on: the CPU's feature flags where Linux lists them."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith(("flags", "Features")):
                    return line.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


COMPILE_TIMEOUT_SECONDS = 1800.0
"""How long one compile may take before it is stopped and counted a failure: a guard against a compiler that
hangs, far above a slow compile (about 15 s of a core alone; minutes on a loaded machine). It was 300 s, and
a machine at load 24 on 2 cores ran past it: that process fell back to the torch paths for its whole life
while the next one, built later, ran the kernels."""


def _compile(compiler: str, flags: list[str], target: Path) -> subprocess.CompletedProcess:
    command = [compiler, *flags, str(SOURCE), "-o", str(target)]
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        raise CPUKernelUnavailable(
            f"compiling {SOURCE.name} with {compiler} ran past {COMPILE_TIMEOUT_SECONDS:g} s and was stopped"
        ) from None


def _first_error(output: str) -> str:
    """The line of a compiler's output that says what went wrong (else its first line)."""
    lines = [line.strip() for line in output.strip().splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    return (errors or lines or ["no output"])[0]


def _build() -> Path:
    """Build the library if it is not cached yet, and return its path (raises with the reason)."""
    compiler = find_compiler()
    if compiler is None:
        raise CPUKernelUnavailable("no C++ compiler found (set CXX, or install g++ or clang++)")
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as error:
        chosen = (
            f"CXX={os.environ['CXX']!r} (it must name one executable, no arguments)"
            if os.environ.get("CXX")
            else f"C++ compiler {compiler!r}"
        )
        raise CPUKernelUnavailable(f"{chosen} does not run: {error}") from error
    source = SOURCE.read_bytes()
    key = hashlib.sha256(
        b"\0".join(x.encode() for x in (compiler, version, repr(FLAG_SETS), _cpu_identity())) + source
    ).hexdigest()[:20]
    directory = cache_dir() / "cpu_kernels"
    target = directory / f"ttt_stack-{key}.so"
    if _cached(target):
        return target

    try:
        directory.mkdir(parents=True, exist_ok=True)
        building = _wait_for_other_builds(directory)
    except OSError as error:
        raise _unwritable(directory, error) from error
    try:  # closing `building` releases the build lock: the processes waiting on it load the library
        if not _cached(target):  # else another process built it while this one waited
            _build_into(compiler, directory, target)
    finally:
        os.close(building)
    return target


def _unwritable(directory: Path, error: OSError) -> CPUKernelUnavailable:
    return CPUKernelUnavailable(
        f"cannot write the kernel cache {directory} ({error}); set INNERLOOP_CACHE_DIR to a writable folder"
    )


def _build_into(compiler: str, directory: Path, target: Path) -> None:
    """Compile into a temporary file of ``directory`` and rename it to ``target``."""
    try:
        _remove_abandoned_builds(directory)
        handle, temporary = tempfile.mkstemp(dir=directory, prefix=".build-", suffix=".so")
        _lock(handle)  # held until the build ends (the process's end releases it): it is not abandoned
    except OSError as error:
        raise _unwritable(directory, error) from error
    try:
        _compile_first_that_loads(compiler, temporary)
        os.chmod(temporary, 0o755)  # mkstemp made it private; in a shared cache others must load it
        os.fsync(handle)  # the bytes on disk before the rename: after a power cut, never the name alone
        os.replace(temporary, target)  # atomic: other processes see no file or the whole file
        fsync_directory(directory)  # and the rename itself
    except (OSError, subprocess.SubprocessError) as error:
        raise CPUKernelUnavailable(f"compiling {SOURCE.name} failed: {error}") from error
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
        os.close(handle)


BUILD_WAIT_SECONDS = 900.0
"""How long a process waits for another's build of the same library (five flag sets of a slow compile)
before it builds its own: correct either way, the wait only saves the duplicate compile."""

WAIT_NOTICE_SECONDS = 5.0
"""After this long waiting for another process's build, one log line says what the process waits for."""

_log = logging.getLogger(__name__)


def _wait_for_other_builds(folder: Path) -> int:
    """Open the cache ``folder`` and take its exclusive lock, waiting while another process holds it
    (its build runs): processes started together (ranks of one job, test workers, several runs on one
    machine) compile once, the others load that library. Returns the open folder, whose closing (or
    the process's end) releases the lock; where folders cannot be locked, at once."""
    handle = os.open(folder, os.O_RDONLY)  # the folder itself: no lock file is left in the cache
    start = time.monotonic()
    noticed = False
    while fcntl is not None:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # another build holds it
            waited = time.monotonic() - start
            if waited >= WAIT_NOTICE_SECONDS and not noticed:
                noticed = True
                _log.warning(
                    "innerloop: waiting for another process's build of the CPU kernels in %s (up to %.0f "
                    "minutes; then this one builds its own)",
                    folder,
                    BUILD_WAIT_SECONDS / 60,
                )
            if waited < BUILD_WAIT_SECONDS:
                time.sleep(0.05)
                continue
        except OSError:  # a file system without locks (some NFS): build without waiting
            pass
        break
    return handle


def _compile_first_that_loads(compiler: str, temporary: str) -> None:
    """Compile into ``temporary`` with the first flag set that compiles and loads: usually the first,
    so one compile (a few seconds). A library that compiles but does not load (e.g. an OpenMP runtime
    missing) tries the next; none that does raises with each set's problem."""
    problems: list[str] = []
    for flags in FLAG_SETS:
        result = _compile(compiler, list(flags), Path(temporary))
        if result.returncode != 0:
            problems.append(_first_error(result.stderr or result.stdout))
            continue
        try:
            if not _intact(Path(temporary)):
                raise OSError("the compiler wrote a truncated library")
            ctypes.CDLL(temporary)
        except OSError as error:
            problems.append(f"built with {' '.join(flags)} but does not load: {error}")
            continue
        return
    raise CPUKernelUnavailable(f"building {SOURCE.name} with {compiler} failed: {'; '.join(problems)}")


def _intact(path: Path) -> bool:
    """Whether the library at ``path`` holds every byte its ELF header says it has (its program
    segments and section headers end inside the file). ``dlopen`` maps a truncated library and dies
    of SIGBUS on its missing pages, so a cut-short file (a full disk, a killed copy) must never reach
    it. A file that is not ELF (another platform's format) is left to the loader."""
    try:
        with open(path, "rb") as handle:
            header = handle.read(64)
            size = os.fstat(handle.fileno()).st_size
            if header[:4] != b"\x7fELF":
                return len(header) >= 4  # shorter is no library of any format
            wide, order = header[4] == 2, "<" if header[5] == 1 else ">"
            if len(header) < (64 if wide else 52):
                return False
            phoff, shoff = struct.unpack_from(order + ("QQ" if wide else "II"), header, 32 if wide else 28)
            phentsize, phnum, shentsize, shnum = struct.unpack_from(
                order + "HHHH", header, 54 if wide else 42
            )
            if phoff + phentsize * phnum > size or shoff + shentsize * shnum > size:
                return False
            handle.seek(phoff)
            table = handle.read(phentsize * phnum)
    except OSError:
        return False
    entry = order + ("IIQQQQ" if wide else "IIIIII")
    if phentsize < struct.calcsize(entry) and phnum:
        return False  # a malformed header
    for index in range(phnum):  # each segment's bytes (offset + size in file) lie inside the file
        values = struct.unpack_from(entry, table, index * phentsize)
        offset, filesz = (values[2], values[5]) if wide else (values[1], values[4])
        if offset + filesz > size:
            return False
    return True


def _cached(target: Path) -> bool:
    """Whether ``target`` is built already; a truncated one (it would crash the process in ``dlopen``,
    SIGBUS) is removed, to be built again."""
    if not target.exists():
        return False
    if _intact(target):
        return True
    try:
        target.unlink()
    except FileNotFoundError:
        pass
    except OSError as error:
        raise CPUKernelUnavailable(
            f"the cached library {target} is truncated and cannot be removed ({error}); delete it"
        ) from error
    return False


def _lock(handle: int) -> bool:
    """Take an exclusive ``flock`` on the open file ``handle``; False where there is none to take."""
    if fcntl is None:
        return False
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


ABANDONED_AFTER_SECONDS = 60.0
"""A temporary library this much older than now, unlocked, is a killed build's: a younger one may belong to
a build that has created it and not locked it yet."""


def _remove_abandoned_builds(directory: Path) -> None:
    """Remove the temporary libraries (``.build-*.so``) that builds killed mid-compile left: those no
    running build holds locked, untouched for :data:`ABANDONED_AFTER_SECONDS` (where files cannot be
    locked, none is removed)."""
    for path in directory.glob(".build-*.so"):
        try:
            if time.time() - path.stat().st_mtime < ABANDONED_AFTER_SECONDS:
                continue  # perhaps made by a build that is about to lock it
            handle = os.open(path, os.O_RDONLY)
        except OSError:
            continue  # gone meanwhile
        try:
            if _lock(handle):
                path.unlink(missing_ok=True)
        finally:
            os.close(handle)


def _disabled() -> str | None:
    """Why the kernels are switched off (:data:`DISABLE_VARIABLE` on, or a value that is not yes/no:
    they stay off until it is one), else None."""
    try:
        disabled = environment_flag(DISABLE_VARIABLE, default=False)
    except EnvironmentSwitchError as error:
        return f"{error}: the CPU kernels stay off until it is one"
    return f"disabled by {DISABLE_VARIABLE}={os.environ[DISABLE_VARIABLE]}" if disabled else None


@functools.cache
def _outcome() -> tuple[ctypes.CDLL | None, Path | None, str | None]:
    """Build and load once per process: ``(library, path, None)`` or ``(None, None, reason)``.

    A failure is remembered as well, so that a missing or broken compiler costs one attempt, not one
    per layer call."""
    import torch  # torch's OpenMP runtime must be loaded first, so that the kernels share it

    try:
        path = _build()
    except CPUKernelUnavailable as error:
        return _unavailable(str(error))
    except Exception as error:  # noqa: BLE001  anything else (an unreadable cache, odd bytes...) is a reason too
        return _unavailable(f"building the CPU kernels failed: {type(error).__name__}: {error}")
    try:
        library = ctypes.CDLL(str(path))
        library.innerloop_uses_openmp  # noqa: B018  a library of that name but not innerloop's lacks it
    except (OSError, AttributeError) as error:
        return _unavailable(f"loading {path} failed: {error} (delete it to rebuild)")
    if torch.get_num_threads() > 1 and not library.innerloop_uses_openmp():
        _warn_never_raise(
            "innerloop's CPU kernel runs on one thread: its OpenMP build failed or did not load; "
            "install an OpenMP-capable compiler (e.g. g++) or set CXX to one"
        )
    return library, path, None


def _warn_never_raise(message: str) -> None:
    """A ``RuntimeWarning`` about the kernels' build, which never fails the caller: where warnings are
    errors (``python -W error``), a slower path is still no reason to fail a forward."""
    try:
        warnings.warn(message, RuntimeWarning, stacklevel=warning_stacklevel())
    except Warning:
        pass


def _unavailable(reason: str) -> tuple[None, None, str]:
    """The outcome of a build or load that failed, said once per process (:func:`_outcome` is cached): the
    layers run the torch paths instead, slower, and their numbers equal the kernels' to rounding, not bit for
    bit, so a run resumed where the kernels load again does not end bit-identical to an uninterrupted one."""
    _warn_never_raise(
        f"innerloop's CPU kernels are unavailable in this process ({reason}): the TTT layers run their "
        "torch paths instead, slower and equal to the kernels to rounding, not bit for bit (a run resumed "
        f"where the kernels load continues to the same result to rounding only); {DISABLE_VARIABLE}=1 "
        "chooses the torch paths without this warning"
    )
    return None, None, reason


def library_path() -> Path:
    """The compiled library's path, built on first use.

    Raises :class:`CPUKernelUnavailable` with the reason when the kernels are disabled, no compiler
    is found, compilation fails or the library does not load.
    """
    return _checked()[1]


def load_library() -> ctypes.CDLL:
    """The loaded kernels (built on first use); raises :class:`CPUKernelUnavailable` with why not."""
    return _checked()[0]


def library_in_use() -> ctypes.CDLL:
    """The loaded kernels for a call already on them (the backward of a forward that ran on them),
    whatever :data:`DISABLE_VARIABLE` says now: the variable chooses the path of new calls only, and a
    graph recorded on the kernels cannot switch half-way. Raises as :func:`load_library` where they
    never loaded."""
    library, _, reason = _outcome()
    if library is None:
        raise CPUKernelUnavailable(reason)
    return library


def _checked() -> tuple[ctypes.CDLL, Path]:
    reason = _disabled()  # read on every call: setting the variable later takes effect
    if reason is None:
        library, path, reason = _outcome()
        if library is not None:
            return library, path
    raise CPUKernelUnavailable(reason)


def uses_openmp() -> bool:
    """Whether the loaded library runs on several threads (it was built with OpenMP)."""
    return bool(load_library().innerloop_uses_openmp())


def clear_cache() -> None:
    """Forget this process's build outcome (the next use builds or loads again; for tests)."""
    _outcome.cache_clear()


__all__ = [
    "CPUKernelUnavailable",
    "cache_dir",
    "clear_cache",
    "find_compiler",
    "library_path",
    "library_in_use",
    "load_library",
    "uses_openmp",
]
