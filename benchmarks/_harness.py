"""Shared benchmark machinery: environment record, timing, peak memory, output checks, rows.

Imported by the ``bench_*.py`` scripts and ``run.py`` (which put this folder on ``sys.path`` by being
run as scripts). Nothing here is part of the ``gatx`` package.

Peak memory, what the number means:

- CUDA: ``torch.cuda.max_memory_allocated()`` during the measured phase minus the memory allocated
  when it began (inputs, parameters and the reference outputs are not counted).
- CPU: the process's peak resident set size (``VmHWM``) during the phase minus its resident size
  (``VmRSS``) when it began. The peak is reset before each phase by writing ``5`` to
  ``/proc/self/clear_refs`` (Linux). During a memory phase glibc's allocator is switched (``mallopt``)
  to hand every buffer over 64 KiB to ``mmap`` and back to the OS on free, after returning its free
  pages (``malloc_trim``); otherwise memory freed by one system could be reused by the next without
  showing up in its resident size. This counts every allocator (PyTorch's, DGL's C++ workspace,
  NumPy's) alike. Without ``/proc`` it falls back to ``ru_maxrss`` growth (a lower bound), and says so.

Time is never measured in a memory phase: the allocator settings of a memory phase make every large
buffer a fresh ``mmap`` with page faults on first touch, which slowed DGL's GATConv 3.4x and gatx's
Cora layer 1.8x. Timed calls run with the allocator reusing freed buffers as a long-running process
does (:func:`allocator` ``"reuse"``: glibc's own dynamic ceiling, buffers up to 32 MiB kept in the heap).
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import statistics
import sys
import time
import warnings
from typing import Any, Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")

# glibc's mallopt parameters, and the two settings the benchmarks switch between
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_ALLOCATOR = {
    "strict": {_M_MMAP_THRESHOLD: 64 * 1024, _M_TRIM_THRESHOLD: 0},  # memory phases
    "reuse": {_M_MMAP_THRESHOLD: 32 * 2**20, _M_TRIM_THRESHOLD: 64 * 2**20},  # timing: glibc's dynamic ceiling
}
_libc: Any = None
_mode: str | None = None  # the setting allocator() last made, None off glibc or before any


def allocator(mode: str) -> bool:
    """Switch glibc's allocator to ``"strict"`` (memory phases) or ``"reuse"`` (timing); False off glibc.

    ``strict`` also returns the heap's free pages to the OS first, so a memory phase starts from a
    resident size that holds only live buffers.
    """
    global _libc, _mode
    if sys.platform != "linux":
        return False
    if _libc is None:
        import ctypes

        try:
            _libc = ctypes.CDLL("libc.so.6")
            _libc.mallopt, _libc.malloc_trim  # noqa: B018 - raises AttributeError off glibc (musl)
        except (OSError, AttributeError):
            _libc = False
    if not _libc:
        return False
    ok = all(_libc.mallopt(k, v) == 1 for k, v in _ALLOCATOR[mode].items())
    if mode == "strict":
        _libc.malloc_trim(0)
    _mode = mode if ok else None
    return ok


def quiet_import_dgl() -> Any:
    """DGL through gatx's importer (a plain ``import dgl`` fails on this torch), warnings silenced."""
    from gatx.backends.dgl import import_dgl

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return import_dgl()


def _version(dist: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:  # noqa: BLE001 - not installed
        return None


def environment(device: str) -> dict[str, Any]:
    """Versions, device and thread count: stored once per run and in every row's ``device``."""
    import torch

    import gatx

    dev = device
    if device.startswith("cuda") and torch.cuda.is_available():
        dev = f"cuda ({torch.cuda.get_device_name(0)})"
    return {
        "device": dev,
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        # how OpenMP's idle threads wait (spin or sleep): read once when torch loads its OpenMP runtime
        "openmp_wait_env": {k: v for k, v in os.environ.items() if k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")},
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "gatx": gatx.__version__,
        "dgl": _version("dgl"),
        "torch_geometric": _version("torch_geometric"),
        "gatx_backends": list(gatx.ops.BACKENDS),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "load_avg_1min": load_average(),
        "allocator": ("glibc: timed with freed buffers reused (mmap threshold 32 MiB), memory phases strict"
                      if _mode == "reuse" else "the platform's default (memory numbers may undercount reuse)"),
        # glibc's own tunables from the environment (e.g. MALLOC_MMAP_MAX_=0: no buffer is a fresh mmap)
        "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_") or k.startswith("GLIBC_TUNABLES")},
    }


def load_average() -> float | None:
    """The 1-minute load average (other jobs competing for the cores make timings noisy)."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


# ---------------------------------------------------------------------------------- memory
def _proc_status() -> dict[str, int] | None:
    try:
        out = {}
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    key, val = line.split(":")
                    out[key] = int(val.split()[0]) * 1024  # kB -> bytes
        return out if len(out) == 2 else None
    except OSError:
        return None


class PeakMemory:
    """Context manager: ``.mib`` is the peak extra memory used inside it (see the module docstring)."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")
        self.mib: float | None = None
        self.method = ""

    def __enter__(self) -> "PeakMemory":
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
            self.method = "cuda max_memory_allocated"
            return self
        gc.collect()
        allocator("strict")
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current VmRSS
            status = _proc_status()
        except OSError:
            status = None
        if status is not None:
            self._base = status["VmRSS"]
            self.method = "VmHWM-VmRSS"
        else:
            import resource

            self._base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            self.method = "ru_maxrss growth (lower bound)"
        return self

    def __exit__(self, *exc: Any) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        elif self.method == "VmHWM-VmRSS":
            peak = _proc_status()["VmHWM"]
        else:
            import resource

            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.mib = max(0.0, (peak - self._base) / 2**20)
        if not self.cuda:
            allocator("reuse")


def peak_memory(fn: Callable[[], Any], device: str, calls: int = 2) -> PeakMemory:
    """The peak extra memory of ``calls`` calls of ``fn`` in a memory phase (never timed)."""
    with PeakMemory(device) as mem:
        for _ in range(calls):
            fn()
        synchronizer(device)()
    return mem


# ---------------------------------------------------------------------------------- timing
def cuda_missing(device: str) -> bool:
    """True (and says so) when a CUDA device was asked for but torch sees none: the benchmark exits with 2."""
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        log("--device cuda was asked for but torch.cuda.is_available() is False")
        return True
    return False


def synchronizer(device: str) -> Callable[[], None]:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.synchronize
    return lambda: None


def measure(fn: Callable[[], Any], device: str, warmup: int, reps: int, budget_s: float) -> dict[str, Any]:
    """Median wall time of ``fn`` after ``warmup`` calls (one, when a call takes over a second).

    Runs ``reps`` timed calls, or fewer (never under min(3, reps)) once ``budget_s`` seconds are spent.
    The device is synchronised before every clock read.
    """
    sync = synchronizer(device)
    for _ in range(warmup):
        t0 = time.perf_counter()
        fn()
        sync()
        if time.perf_counter() - t0 > 1.0:  # a call this long is past warm-up effects after one
            break
    times: list[float] = []
    spent = 0.0
    while len(times) < reps:
        t0 = time.perf_counter()
        fn()
        sync()
        dt = time.perf_counter() - t0
        times.append(dt)
        spent += dt
        if len(times) >= min(3, reps) and spent > budget_s:
            break
    return {
        "median_ms": 1e3 * statistics.median(times),
        "min_ms": 1e3 * min(times),
        "reps": len(times),
        "warmup": warmup,
    }


# ---------------------------------------------------------------------------------- roofline
COPY_MIB = 256  # the copied tensor: larger than the last-level caches of the machines we run on


def copy_bandwidth(device: str, mib: int = COPY_MIB, reps: int = 5) -> float:
    """The machine's copy bandwidth in GB/s (1e9 bytes/s): ``dst.copy_(src)`` of a ``mib`` MiB float32
    tensor with the current thread count, counting the bytes read plus the bytes written; median of
    ``reps`` copies after one warm-up copy."""
    import torch

    src = torch.ones(mib * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    timing = measure(lambda: dst.copy_(src), device, 1, reps, float("inf"))
    return 2 * src.numel() * 4 / (timing["median_ms"] * 1e-3) / 1e9


def gemm_rate(m: int, k: int, n: int, device: str, reps: int = 5) -> float:
    """GFLOP/s of one float32 ``(m, k) @ (k, n)`` product (2mkn flops) with the current thread count:
    the rate of the problem's own GEMM shape (small inner sizes run well below the CPU's peak)."""
    import torch

    a, b = torch.randn(m, k, device=device), torch.randn(k, n, device=device)
    out = torch.empty(m, n, device=device)
    inner = max(1, int(2e8 // max(1, 2 * m * k * n)))  # products per timed call: small shapes are timed in bulk

    def products() -> None:
        for _ in range(inner):
            torch.mm(a, b, out=out)

    timing = measure(products, device, 2, reps, float("inf"))
    return 2 * m * k * n * inner / (timing["median_ms"] * 1e-3) / 1e9


def roofline(row: dict[str, Any], nbytes: float, flops: float, gbps: float, gflops: float) -> dict[str, Any]:
    """Fields for a timed row: the model's minimum bytes and flops, the achieved rates and how far the
    time is from the limit.

    Model: ``limit = bytes / copy bandwidth + flops / GEMM rate`` (the gathers and the GEMMs run one
    after the other, each at best at the machine's measured rate); ``x_of_limit = time / limit``
    (1.0 would be at the limit). ``achieved_gbps`` and ``achieved_gflops`` are the model's bytes and
    flops over the whole measured time.
    """
    limit_ms = 1e3 * (nbytes / (gbps * 1e9) + flops / (gflops * 1e9))
    sec = row["median_ms"] * 1e-3
    return {
        "min_bytes": int(nbytes), "min_flops": int(flops), "copy_gbps": round(gbps, 2), "gemm_gflops": round(gflops, 2),
        "achieved_gbps": round(nbytes / sec / 1e9, 3), "achieved_gflops": round(flops / sec / 1e9, 3),
        "limit_ms": round(limit_ms, 3), "x_of_limit": round(row["median_ms"] / limit_ms, 3),
    }


# ---------------------------------------------------------------------------------- checks
def max_diff(got: dict[str, Any], ref: dict[str, Any]) -> tuple[float, float]:
    """(max abs difference, max abs difference / max abs reference) over the shared keys."""
    worst_abs, worst_rel = 0.0, 0.0
    for key, r in ref.items():
        g = got[key].detach().to(r.dtype).reshape(r.shape)
        d = float((g - r).abs().max()) if r.numel() else 0.0
        scale = float(r.abs().max()) if r.numel() else 1.0
        worst_abs = max(worst_abs, d)
        worst_rel = max(worst_rel, d / scale if scale > 0 else d)
    return worst_abs, worst_rel


Runs = dict[str, tuple[Callable[[], Any], dict[str, Any]]]  # {system: (forward, {reference's name: tensor})}


def check_runs(runs: Runs, gout: Any, ref: str) -> dict[str, float]:
    """Each system's largest relative difference to system ``ref``'s (output and the gradients of its named
    tensors, after one :func:`fwd_bwd` each; every system names its tensors as ``ref`` does)."""
    got = {}
    for name, (forward, named) in runs.items():
        out = fwd_bwd(forward, gout, list(named.values()))
        got[name] = {"out": out.detach()} | {key: t.grad.detach().clone() for key, t in named.items()}
    return {name: max_diff(got[name], got[ref])[1] for name in runs}


def alternate(runs: Runs, gout: Any, reps: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per :func:`fwd_bwd`, the systems called in turn ``reps`` times after ``warmup`` rounds, the
    order rotated every round (so a change of load, or what ran just before, hits every system alike)."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for rep in range(warmup + reps):
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            forward, named = runs[name]
            t0 = time.perf_counter()
            fwd_bwd(forward, gout, list(named.values()))
            if rep >= warmup:
                times[name].append(time.perf_counter() - t0)
    return times


def log(msg: str) -> None:
    """A line on stderr (through tqdm, so an active progress bar is redrawn below it)."""
    from tqdm import tqdm

    tqdm.write(msg, file=sys.stderr)
    sys.stderr.flush()


def fmt_time(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else f"{seconds // 60}:{seconds % 60:02d}"


def progress(items: Iterable[T], weights: list[float], label: str, bar: bool | None = None) -> Iterator[T]:
    """Yield ``items``, reporting progress with an ETA that assumes each item costs time in proportion
    to its weight (e.g. its node count). On a terminal (stderr) a tqdm bar; otherwise one plain line
    per item."""
    items = list(items)
    total, done, t0 = float(sum(weights)) or 1.0, 0.0, time.perf_counter()
    pbar = None
    if sys.stderr.isatty() if bar is None else bar:
        from tqdm import tqdm

        pbar = tqdm(total=total, leave=False, dynamic_ncols=True,
                    bar_format="{desc} {percentage:3.0f}%|{bar}| {elapsed}<{remaining}")
    try:
        for i, (item, weight) in enumerate(zip(items, weights), 1):
            spent = time.perf_counter() - t0
            eta = fmt_time(spent / done * (total - done)) if done > 0 else "-"
            if pbar is not None:
                pbar.set_description(f"{label} {i}/{len(items)}")
            else:
                log(f"[{label} {i}/{len(items)}] {fmt_time(spent)} elapsed, ETA {eta} (by size)")
            yield item
            done += weight
            if pbar is not None:
                pbar.update(weight)
    finally:
        if pbar is not None:
            pbar.close()


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help keeps the description's layout and shows every option's default (also of options without
    a help text); a default of None means "see the help" and is not shown."""

    def _format_action(self, action: argparse.Action) -> str:
        if not action.help and action.option_strings and action.default not in (None, argparse.SUPPRESS):
            action = copy.copy(action)
            action.help = "(default: %(default)s)"
        return super()._format_action(action)

    def _get_help_string(self, action: argparse.Action) -> str:
        return action.help if action.default is None else super()._get_help_string(action)


def fmt_row(row: dict[str, Any]) -> str:
    if row["status"] != "ok":
        return f"  {row['system']:<22s} {row['mode']:<8s} {row['status']}: {row.get('reason', '')}"
    mem = row.get("peak_mem_mib")
    line = (
        f"  {row['system']:<22s} {row['mode']:<8s} {row['median_ms']:10.2f} ms  (min {row['min_ms']:.2f}, "
        f"{row['reps']} reps)  peak {mem:8.1f} MiB  max|diff| {row['max_abs_diff']:.2e}"
    )
    if "x_of_limit" in row:
        line += (f"  {row['achieved_gbps']:.1f} GB/s {row['achieved_gflops']:.1f} GFLOP/s = "
                 f"{row['x_of_limit']:.2f}x of the limit ({row['limit_ms']:.1f} ms)")
    return line


def write_json(path: str | None, env: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    payload = json.dumps({"env": env, "rows": rows}, indent=1)
    if path is None or path == "-":
        print(payload)
        return
    with open(path, "w") as f:
        f.write(payload)


# ---------------------------------------------------------------------------------- one system
def pyg_gat(in_feats: int, out_feats: int, heads: int, state: dict[str, Any], device: Any = "cpu") -> tuple[Any, dict[str, Any]]:
    """PyG's ``GATConv`` (no self-loops added; one ``lin`` for src and dst rows, as gatx's ``fc``) holding the
    weights of a gatx GATConv ``state``, and {gatx parameter name: the PyG parameter holding it}."""
    try:
        from torch_geometric.nn import GATConv as PygGATConv
    except ImportError as err:
        raise Skip(f"torch_geometric is not installed ({err})") from err
    import torch

    layer = PygGATConv(in_feats, out_feats, heads=heads, add_self_loops=False).to(device)
    names = {"fc.weight": "lin.weight", "attn_l": "att_src", "attn_r": "att_dst", "bias": "bias"}
    params = dict(layer.named_parameters())
    if set(params) != set(names.values()):
        raise Skip(f"unexpected PyG GATConv parameters {sorted(params)}; update the name map")
    with torch.no_grad():
        for ours, theirs in names.items():
            params[theirs].copy_(state[ours].view_as(params[theirs]))
    return layer, {o: params[t] for o, t in names.items()}


class Skip(Exception):
    """A system or case that cannot run here; the message says why."""


def fwd_bwd(forward: Callable[[], Any], gout: Any, params: list[Any]) -> Any:
    """One forward and the backward of ``gout`` into ``params`` (their grads reset first)."""
    for p in params:
        p.grad = None
    out = forward()
    out.backward(gout)
    return out


def check_and_time(row: dict[str, Any], build: Callable[[], tuple[Callable[[], Any], dict[str, Any]]],
                   ref: dict[str, Any], gout: Any, args: Any, model: dict[str, tuple[float, float]] | None = None,
                   rates: tuple[float, float] | None = None) -> list[dict[str, Any]]:
    """Rows ``fwd`` and ``fwd+bwd`` for one system: checked against ``ref`` first, then timed.

    With ``model`` ({mode: (minimum bytes, flops)}) and ``rates`` ((copy GB/s, GEMM GFLOP/s) measured
    in this run), each timed row also gets the :func:`roofline` fields.

    ``build()`` returns ``(forward, named)``: ``forward()`` gives the output in the reference's layout,
    ``named`` maps the reference's names to the tensors whose gradients are compared (parameters, and
    inputs that require grad). ``ref`` holds ``"out"`` and those gradients. A system that raises
    ``Skip`` (or any error, e.g. ``gatx.ops.BackendUnavailable``) gives "skipped" rows with the reason;
    one whose relative difference exceeds ``args.tol`` gives "mismatch" rows and is not timed.
    """
    import torch

    modes = ("fwd", "fwd+bwd")
    try:
        forward, named = build()
        params = list(named.values())
        got = fwd_bwd(forward, gout, params)
        diff_abs, diff_rel = max_diff({"out": got} | {k: p.grad for k, p in named.items()}, ref)
        del got
    except Exception as err:  # noqa: BLE001 - every failure to run is reported as a reason
        reason = str(err) if isinstance(err, Skip) else f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}"
        rows = [dict(row, mode=m, status="skipped", reason=reason) for m in modes]
        log(fmt_row(rows[-1]))
        return rows
    check = {"max_abs_diff": diff_abs, "max_rel_diff": diff_rel}
    log(f"  {row['system']:<22s} check vs {row['reference']}: max|diff| {diff_abs:.2e} (relative {diff_rel:.2e})")
    if not diff_rel <= args.tol:
        rows = [dict(row, mode=m, status="mismatch", reason=f"relative difference {diff_rel:.2e} > tol {args.tol}", **check)
                for m in modes]
        log(fmt_row(rows[-1]))
        return rows
    rows = []
    for mode in modes:
        if mode == "fwd":
            def call() -> None:
                with torch.no_grad():
                    forward()
        else:
            def call() -> None:
                fwd_bwd(forward, gout, params)
        mem = peak_memory(call, args.device)
        timing = measure(call, args.device, args.warmup, args.reps, args.budget)
        rows.append(dict(row, mode=mode, status="ok", **timing, peak_mem_mib=mem.mib, mem_method=mem.method, **check))
        if model is not None and rates is not None and mode in model:
            rows[-1].update(roofline(rows[-1], *model[mode], *rates))
        log(fmt_row(rows[-1]))
    return rows
