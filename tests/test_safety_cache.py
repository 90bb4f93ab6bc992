"""The fused kernel's library cache (issue 12 items 3, 4, 14): verified before loading, atomic,
private, and loud when unusable.

A stand-in compiler copies the real, already built library to its ``-o`` path (optionally slowly),
so these tests exercise the cache rules in about a second instead of a 15-35 s compile.
"""
from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
import warnings
from pathlib import Path

import pytest

from gatx.backends import fused, fused_build

pytestmark = pytest.mark.skipif(fused.availability() is not None, reason="the fused kernel is not usable here")


@pytest.fixture(scope="module")
def real_library() -> Path:
    """The real library, from the cache in use before any test changes the environment."""
    return fused_build.build()


@pytest.fixture
def fake_cxx(tmp_path: Path, real_library: Path) -> Path:
    """A 'compiler' that copies the real library to its -o argument; with $FAKE_SLOW it writes half, then hangs."""
    real = real_library
    script = tmp_path / "fake-c++"
    script.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        prev=""; out=""
        for a in "$@"; do [ "$prev" = "-o" ] && out="$a"; prev="$a"; done
        if [ -n "$FAKE_SLOW" ]; then head -c 4096 '{real}' > "$out"; sleep 120; fi
        cp '{real}' "$out"
        """))
    script.chmod(0o755)
    return script


@pytest.fixture
def cache(tmp_path: Path, fake_cxx: Path, monkeypatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("GATX_CACHE_DIR", str(folder))
    monkeypatch.setenv("CXX", str(fake_cxx))
    return folder


def run_python(code: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})


def test_build_writes_a_private_verified_library_and_its_record(cache):
    path = fused_build.build()
    assert path.parent == cache and fused_build.verified(path)
    sha, size = (cache / (path.name + ".sha256")).read_text().split()
    assert int(size) == path.stat().st_size and len(sha) == 64
    assert stat.S_IMODE(path.stat().st_mode) & 0o022 == 0
    assert sorted(p.name for p in cache.iterdir()) == sorted([path.name, path.name + ".sha256", ".build.lock"])


def test_truncated_cached_library_is_rebuilt_not_loaded(cache, fake_cxx):
    """A partial .so made dlopen raise SIGBUS inside backend=None's availability check."""
    path = fused_build.build()
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    r = run_python(
        """
        import torch, gatx
        from gatx.backends import fused
        g = gatx.Graph(torch.tensor([0, 1, 2]), torch.tensor([1, 2, 0]))
        out = gatx.GATConv(4, 2, 2)(g, torch.randn(3, 4))  # backend=None: probes the fused kernel first
        print(tuple(out.shape), fused.availability())
        """,
        {"GATX_CACHE_DIR": str(cache), "CXX": str(fake_cxx)},
    )
    assert r.returncode == 0, f"the process died ({r.returncode}): {r.stderr[-2000:]}"
    assert r.stdout.split("\n")[0] == "(3, 2, 2) None", r.stdout + r.stderr
    assert "compiling the fused CPU attention kernel" in r.stderr, "the rebuild announces itself"
    assert fused_build.verified(path) and not list(cache.glob(".tmp-*"))


def test_altered_library_is_not_loaded(cache):
    path = fused_build.build()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different bytes
    path.write_bytes(bytes(data))
    assert not fused_build.verified(path)
    assert fused_build.build() == path and fused_build.verified(path)


def test_killed_build_leaves_no_library_and_its_leftovers_are_removed(cache, fake_cxx):
    proc = subprocess.Popen(
        [sys.executable, "-c", "from gatx.backends import fused_build; fused_build.build()"],
        env={**os.environ, "GATX_CACHE_DIR": str(cache), "CXX": str(fake_cxx), "FAKE_SLOW": "1"},
        stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not list(cache.glob(".tmp-*")) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert list(cache.glob(".tmp-*")), "the stand-in compiler never started"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the build and its compiler, killed midway
        proc.wait()
    name = fused_build.library_name(str(fake_cxx))
    assert not (cache / name).exists() and not (cache / (name + ".sha256")).exists(), "nothing half-written in place"
    path = fused_build.build()
    assert fused_build.verified(path) and not list(cache.glob(".tmp-*")), "the next build removes the leftovers"


# ------------------------------------------------------------------ where the library may live
@pytest.fixture
def no_primary(tmp_path: Path, monkeypatch) -> Path:
    """A cache folder that cannot be created (its parent is a file) and a private temp dir; returns the fallback."""
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("GATX_CACHE_DIR", str(tmp_path / "file" / "gatx"))
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    monkeypatch.setattr(fused_build, "_warned", set())
    return tmp / f"gatx-{os.getuid()}"


def test_fallback_is_created_private(no_primary, fake_cxx, monkeypatch):
    monkeypatch.setenv("CXX", str(fake_cxx))
    assert fused_build.library_dir() == no_primary
    st = os.lstat(no_primary)
    assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == os.getuid()
    assert fused_build.build().parent == no_primary


def _planted(fallback: Path, how: str) -> None:
    if how == "mode":
        fallback.mkdir()
        fallback.chmod(0o777)
    elif how == "symlink":
        target = fallback.with_name("elsewhere")
        target.mkdir(mode=0o700)
        fallback.symlink_to(target)
    elif how == "owner":
        fallback.mkdir(mode=0o700)
        os.chown(fallback, 65534, 65534)
    else:
        fallback.write_text("not a folder")


@pytest.mark.parametrize("how,why", [("mode", "has mode 777"), ("symlink", "is a symlink"),
                                     ("owner", "is owned by uid 65534"), ("file", "is not a folder")])
def test_planted_fallback_is_never_used_and_the_reason_is_reported_once(no_primary, fake_cxx, monkeypatch, how, why):
    if how == "owner" and os.getuid() != 0:
        pytest.skip("making a folder owned by another user needs root")
    monkeypatch.setenv("CXX", str(fake_cxx))
    _planted(no_primary, how)
    monkeypatch.setattr(fused, "_state", fused._State())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = fused.availability()
        monkeypatch.setattr(fused, "_state", fused._State())
        second = fused.availability()
    assert first is not None and why in first and "GATX_CACHE_DIR" in first, first
    assert second == first
    assert [w.category for w in caught] == [fused_build.GatxKernelCacheWarning], "warned exactly once"
    assert not list(no_primary.parent.rglob("*.so")), "nothing was built or loaded there"


def test_cache_folder_writable_by_others_is_not_used(tmp_path, no_primary, fake_cxx, monkeypatch):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    monkeypatch.setenv("GATX_CACHE_DIR", str(shared))
    monkeypatch.setenv("CXX", str(fake_cxx))
    assert fused_build.library_dir() == no_primary  # the private fallback instead
