"""Building and caching the fused kernel's shared library safely (used by :mod:`gatx.backends.fused`).

The library is compiled once per machine from ``gatx/csrc/fused_attention.cpp`` with the system C++
compiler and loaded with ctypes, so whatever file sits at its cached path runs inside the process.
The rules, each of which turns a failure into a reason (the fused backend is then skipped) instead
of a crash or someone else's code:

- **Where**: ``$GATX_CACHE_DIR``, else ``$XDG_CACHE_HOME/gatx``, else ``~/.cache/gatx``. The folder
  must be owned by this user and not writable by group or others. When it cannot be created or
  written, the fallback is ``<tempdir>/gatx-<uid>``, created with mode 0700 and used only if it is a
  real folder (not a symlink) owned by this user with mode 0700: another local user cannot plant a
  library there. When neither is usable the kernel is not built, and :class:`GatxKernelCacheWarning`
  says why, once per process.
- **Atomic**: the compiler writes a temporary file in the same folder; it is fsynced, its size and
  sha256 are written to ``<library>.sha256`` (also through a temporary file), and both are renamed
  into place, the library last. Builds hold an exclusive lock on ``.build.lock``; under it,
  temporary files left by a killed build are removed.
- **Verified**: before ``dlopen`` the library's size and sha256 must match its record; a truncated
  or altered file (which would make ``dlopen`` raise SIGBUS) is rebuilt instead.

The build runs on first use, announced by one line on stderr (15-35 s of one core, once per
machine); ``python -m gatx.backends.fused_build`` runs it ahead of time (e.g. in a Dockerfile).
It is not built at install time: the library is tuned with ``-march=native`` for the CPU it is
built on, and an install-time build would travel inside cached or shared wheels to other CPUs;
editable installs would also need it rebuilt whenever the source changes, which the cache key
(source, flags, compiler, CPU) already handles.
"""
from __future__ import annotations

import hashlib
import os
import platform
import shutil
import stat
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

SOURCE = Path(__file__).resolve().parent.parent / "csrc" / "fused_attention.cpp"
FLAGS = ["-O3", "-std=c++17", "-fPIC", "-shared", "-fopenmp", "-fno-math-errno", "-march=native"]
_TMP = ".tmp-"
_warned: set[str] = set()


class GatxKernelCacheWarning(RuntimeWarning):
    """The fused kernel's cache folder is unusable (not writable, not private): the fused backend is off.

    Emitted once per process; filter it with ``warnings.filterwarnings("ignore", category=...)``.
    """


def compiler() -> str | None:
    cxx = os.environ.get("CXX")
    if cxx:
        return shutil.which(cxx) or cxx
    for name in ("c++", "g++", "clang++"):
        path = shutil.which(name)
        if path:
            return path
    return None


def cache_dir() -> Path:
    root = os.environ.get("GATX_CACHE_DIR")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "gatx"


def fallback_dir() -> Path:
    return Path(tempfile.gettempdir()) / f"gatx-{os.getuid()}"


def _cpu_signature() -> str:
    """Identifies the CPU the library was tuned for (-march=native): model name and flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))][:2]
        return "\n".join(lines)
    except OSError:
        return platform.processor()


def library_name(cxx: str, flags: list[str] | None = None) -> str:
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), " ".join(FLAGS if flags is None else flags).encode(), cxx.encode(),
                 platform.machine().encode(), _cpu_signature().encode()):
        key.update(part)
        key.update(b"\0")
    return f"fused_attention-{key.hexdigest()[:16]}.so"


def _unsafe(path: Path, *, private: bool) -> str | None:
    """Why ``path`` must not hold code we load (None: it may): not a real folder, someone else's, writable by others."""
    try:
        st = os.lstat(path)
    except OSError as err:
        return f"{path} cannot be inspected ({err.strerror})"
    if stat.S_ISLNK(st.st_mode) and private:
        return f"{path} is a symlink"
    if stat.S_ISLNK(st.st_mode):
        st = os.stat(path)
    if not stat.S_ISDIR(st.st_mode):
        return f"{path} is not a folder"
    if st.st_uid != os.getuid():
        return f"{path} is owned by uid {st.st_uid}, not by this user (uid {os.getuid()})"
    loose = st.st_mode & (0o077 if private else 0o022)
    if loose:
        return f"{path} has mode {stat.S_IMODE(st.st_mode):o} (must not be {'accessible' if private else 'writable'} by group or others)"
    if not os.access(path, os.W_OK | os.X_OK):
        return f"{path} is not writable"
    return None


def _usable_dir(path: Path, *, private: bool) -> str | None:
    """Create ``path`` (mode 0700) if missing and check it; the reason it cannot be used, or None."""
    try:
        if private:
            os.mkdir(path, 0o700)  # never follows or reuses a planted folder silently: checked below
        else:
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except FileExistsError:
        pass
    except OSError as err:
        return f"{path} cannot be created ({err.strerror})"
    return _unsafe(path, private=private)


def library_dir() -> Path:
    """The folder to build into and load from: the cache folder, else the private fallback; or raise OSError."""
    primary = cache_dir()
    why = _usable_dir(primary, private=False)
    if why is None:
        return primary
    fallback = fallback_dir()
    why_fallback = _usable_dir(fallback, private=True)
    if why_fallback is None:
        return fallback
    reason = (
        f"no safe folder for the compiled kernel: {why}, and the fallback {why_fallback}; point "
        "$GATX_CACHE_DIR at a folder of yours that only you can write to"
    )
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"gatx: the fused CPU backend is disabled: {reason}", GatxKernelCacheWarning, stacklevel=4)
    raise OSError(reason)


def _record(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _digest(path: Path) -> tuple[int, str]:
    data = path.read_bytes()
    return len(data), hashlib.sha256(data).hexdigest()


def verified(path: Path) -> bool:
    """The library exists, is a regular file of this user, and its size and sha256 match its record."""
    try:
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o022:
            return False
        want = _record(path).read_text().split()
        size, sha = _digest(path)
    except (OSError, ValueError):
        return False
    return len(want) == 2 and want[0] == sha and want[1] == str(size)


def _fsync_write(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _compile(cxx: str, path: Path) -> None:
    """Compile into a temporary file beside ``path``, record its hash, rename both into place."""
    folder = path.parent
    for leftover in folder.glob(_TMP + "*"):  # a killed build's files (we hold the build lock)
        leftover.unlink(missing_ok=True)
    tag = f"{_TMP}{os.getpid()}-{path.name}"
    tmp_lib, tmp_rec = folder / tag, folder / (tag + ".sha256")
    print(
        f"gatx: compiling the fused CPU attention kernel ({SOURCE.name}) with {Path(cxx).name} into {folder}; "
        "once per machine, about 15-35 s", file=sys.stderr, flush=True,
    )
    try:
        proc = subprocess.run([cxx, *FLAGS, str(SOURCE), "-o", str(tmp_lib)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise OSError(f"compiling {SOURCE.name} with {cxx} failed:\n{proc.stderr.strip()[-2000:]}")
        fd = os.open(tmp_lib, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp_lib, 0o700)
        size, sha = _digest(tmp_lib)
        _fsync_write(tmp_rec, f"{sha} {size}\n".encode())
        os.replace(tmp_rec, _record(path))
        os.replace(tmp_lib, path)  # last: a library is never in place without its record
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    finally:
        tmp_lib.unlink(missing_ok=True)
        tmp_rec.unlink(missing_ok=True)


def build() -> Path:
    """Compile the kernel into the cache (unless a verified copy is there) and return the library's path."""
    cxx = compiler()
    if cxx is None:
        raise OSError("no C++ compiler found (set $CXX or install g++ / clang++)")
    path = library_dir() / library_name(cxx)
    if verified(path):
        return path
    import fcntl

    with open(path.parent / ".build.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or when a killed process dies
        if not verified(path):  # another process may have built it while we waited
            _compile(cxx, path)
    if not verified(path):
        raise OSError(f"the compiled library {path} does not match its recorded size and sha256")
    return path


if __name__ == "__main__":  # python -m gatx.backends.fused_build: build ahead of first use (e.g. in a Dockerfile)
    print(build())
