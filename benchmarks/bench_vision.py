"""Benchmark local attention over image maps: neighborhood and window attention, sparse versus dense.

Every system is a whole attention layer on (B, X, Y, C) input: ``qkv`` projection, attention,
``proj``, with the same weights. Two groups, each checked against its gatx module before timing:

- neighborhood attention (each pixel attends to the k x k window centred on it, shifted inward at
  the borders, as in NATTEN / NAT): ``gatx.vision.NeighborhoodAttention2d`` (the reference), dense
  ``scaled_dot_product_attention`` over all X*Y keys with a boolean mask, and a plain k*k gather
  (unfold-style: materialise each pixel's k*k keys and values, then softmax);
- window attention (Swin, shift 0 and, by default, shift 3 = k // 2 for k = 7):
  ``gatx.vision.WindowAttention`` (the reference) and Swin's own formulation written from the paper:
  cyclic roll by -shift, window partition, attention with the relative position bias and, for
  shifted windows, Swin's additive -100 mask between regions, window reverse, roll back; windows of
  k x k (maps not divisible by k are skipped, as Swin pads them instead). Swin's -100 mask gives
  subnormal attention weights (exp(-100) ~ 4e-44) that slow its matmuls on CPUs without flush-to-zero:
  window rows run with ``torch.set_flush_denormal`` on, off, or both (``--ftz``; field ``flush_denormal``);
- neighborhood attention at op level (``neighborhood-op``, always with a relative position bias):
  ``gatx.ops.sparse_attention`` on (N, B*H, D) views with the per-edge bias from the table, against
  dense SDPA over all Y*X keys with the float mask (bias where allowed, -inf elsewhere) built from the
  table in each call; no qkv / proj.

Sizes: maps 14x14 to 112x112, kernels 3 / 7 / 13, C=96 with 3 heads (Swin-T stage 1) and, in the full
run, C=192 with 6 heads (stage 2). ``fwd`` is timed under ``torch.no_grad()``; ``fwd+bwd`` backpropagates
a fixed random output gradient into the input and the weights.

    python benchmarks/bench_vision.py --quick --json vision.json
    python benchmarks/bench_vision.py --maps 56 --kernels 7 --shifts 0,3 --ftz both --family without
    python benchmarks/bench_vision.py --maps 56,112 --kernels 7 --device cuda
"""
from __future__ import annotations

import argparse
import gc
import sys
from typing import Any, Callable

from _harness import HelpFormatter, Skip, check_and_time, cuda_missing, environment, fwd_bwd, log, progress, allocator, write_json

STAGES = {1: (96, 3), 2: (192, 6)}  # Swin-T: stage -> (C, heads)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--quick", action="store_true", help="CPU sizes for a run of about a minute")
    p.add_argument("--tiny", action="store_true", help="a few seconds: one small map (for tests)")
    p.add_argument("--maps", type=str, default=None, help="comma-separated map sides, e.g. 14,28,56,112")
    p.add_argument("--kernels", type=str, default=None, help="comma-separated kernel sizes, e.g. 3,7,13")
    p.add_argument("--stages", type=str, default=None, help="Swin-T stages for (C, heads): 1 = (96, 3), 2 = (192, 6)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--device", type=str, default="cpu")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--budget", type=float, default=None, help="seconds per timing phase before stopping early (>= 3 reps)")
    p.add_argument("--dense-max-gib", type=float, default=2.0,
                   help="largest (YX)^2 mask (+ bias) for dense SDPA, GiB (default 2: 112x112 with a boolean mask)")
    p.add_argument("--gather-max-gib", type=float, default=6.0,
                   help="largest estimated peak of the k*k gather, GiB (about 3 x its gathered keys)")
    p.add_argument("--na-rpb", action="store_true",
                   help="neighborhood attention with a relative position bias (dense then uses a float mask)")
    p.add_argument("--shifts", type=str, default="0,3",
                   help="window shifts, comma-separated; a shift must be < k (others are skipped for that k)")
    p.add_argument("--ftz", choices=("on", "off", "both"), default=None,
                   help="flush denormals to zero (torch.set_flush_denormal) for the window rows: on, off, or both "
                        "(default: both; on with --tiny)")
    p.add_argument("--no-na-op", action="store_true", help="skip the op-level neighborhood rows (neighborhood-op)")
    p.add_argument("--all-backends", action="store_true", help="time gatx on every backend, not only the default (full run: on)")
    p.add_argument("--default-backend-only", action="store_true", help="time gatx on the backend it picks only (overrides the full run's default)")
    p.add_argument("--family", choices=("with", "without", "only"), default="with",
                   help="rows of the vision family vs their official formulations (outlook, bi-level routing, ACmix, "
                        "temporal; bench_vision_family.py, sizes by --tiny / --quick): with these rows, without, or only them")
    p.add_argument("--tol", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=str, default=None)
    args = p.parse_args(argv)
    if args.tiny:
        configs = [(1, 14, 7), (1, 14, 3)]
        warmup, reps, budget = 1, 1, 0.5
    elif args.quick:
        configs = [(1, m, 7) for m in (14, 28, 56)] + [(1, m, k) for k in (3, 13) for m in (28, 56)]
        warmup, reps, budget = 1, 5, 1.0
    else:
        configs = [(1, m, k) for m in (14, 28, 56, 112) for k in (3, 7, 13)] + [(2, 28, 7), (2, 56, 7)]
        warmup, reps, budget = 2, 10, 10.0
    if args.maps or args.kernels or args.stages:
        maps = [int(m) for m in (args.maps or "14,28,56").split(",")]
        kernels = [int(k) for k in (args.kernels or "7").split(",")]
        stages = [int(s) for s in (args.stages or "1").split(",")]
        configs = [(s, m, k) for s in stages for m in maps for k in kernels]
    args.configs = configs
    args.shift_list = [int(v) for v in args.shifts.split(",")]
    args.ftz_list = {"on": [True], "off": [False], "both": [True, False]}[args.ftz or ("on" if args.tiny else "both")]
    args.all_backends = (args.all_backends or not (args.tiny or args.quick)) and not args.default_backend_only
    args.warmup = warmup if args.warmup is None else args.warmup
    args.reps = reps if args.reps is None else args.reps
    args.budget = budget if args.budget is None else args.budget
    return args


# ---------------------------------------------------------------------------------- baselines
# Layout (B, Y, X, C) as gatx.vision; heads split off as (B, heads, Y, X, D).
def window_starts(length: int, k: int, device: Any) -> Any:
    """(length, k) key positions along one axis: the k-window centred on each position, shifted inward."""
    import torch

    pos = torch.arange(length, device=device)
    start = (pos - k // 2).clamp(0, length - k)
    return start.unsqueeze(1) + torch.arange(k, device=device)  # (L, k)


def split_heads(qkv: Any, heads: int) -> tuple[Any, Any, Any]:
    """(B, Y, X, 3C) -> q, k, v each (B, heads, Y, X, D)."""
    b, ny, nx, c3 = qkv.shape
    t = qkv.view(b, ny, nx, 3, heads, c3 // (3 * heads)).permute(3, 0, 4, 1, 2, 5)
    return t[0], t[1], t[2]


class _Base:
    """qkv and proj linears (and optionally the bias table), named as gatx.vision / Swin name them."""

    def __init__(self, dim: int, heads: int, k: int, rpb: bool, device: str) -> None:
        import torch
        from torch import nn

        self.dim, self.heads, self.k = dim, heads, k
        self.qkv = nn.Linear(dim, 3 * dim).to(device)
        self.proj = nn.Linear(dim, dim).to(device)
        self.table = nn.Parameter(torch.zeros((2 * k - 1) ** 2, heads, device=device)) if rpb else None

    def named(self) -> dict[str, Any]:
        out = {f"qkv.{n}": p for n, p in self.qkv.named_parameters()} | {f"proj.{n}": p for n, p in self.proj.named_parameters()}
        return out | ({"relative_position_bias_table": self.table} if self.table is not None else {})

    def load(self, state: dict[str, Any]) -> None:
        import torch

        with torch.no_grad():
            for name, p in self.named().items():
                p.copy_(state[name])

    def neighbor_rel_index(self, ny: int, nx: int, device: Any) -> tuple[Any, Any, Any]:
        """Key rows (Y, 1, k, 1), key columns (1, X, 1, k) and bias-table rows (Y, X, k, k) (NATTEN offsets)."""
        import torch

        k = self.k
        r = window_starts(ny, k, device)[:, None, :, None]
        s = window_starts(nx, k, device)[None, :, None, :]
        qy = torch.arange(ny, device=device)[:, None, None, None]
        qx = torch.arange(nx, device=device)[None, :, None, None]
        rel = (r - qy + k - 1) * (2 * k - 1) + (s - qx + k - 1)  # key - query per axis -> table row
        return r, s, rel


class DenseMasked(_Base):
    """Neighborhood attention as dense SDPA over all Y*X keys: boolean (YX, YX) mask, or with the
    relative position bias an additive float mask (bias where allowed, -inf elsewhere)."""

    def prepare(self, ny: int, nx: int, device: str) -> None:
        import torch

        r, s, rel = self.neighbor_rel_index(ny, nx, device)
        keys = (r * nx + s).expand(ny, nx, self.k, self.k).reshape(ny * nx, -1)  # (YX, k*k)
        self.mask = torch.zeros(ny * nx, ny * nx, dtype=torch.bool, device=device)
        self.mask.scatter_(1, keys, True)
        if self.table is not None:  # (YX, YX) table row per pair; the extra last row is -inf
            self.rows = torch.full((ny * nx, ny * nx), (2 * self.k - 1) ** 2, dtype=torch.long, device=device)
            self.rows.scatter_(1, keys, rel.reshape(ny * nx, -1))

    def __call__(self, x: Any) -> Any:
        import torch
        import torch.nn.functional as F

        b, ny, nx, c = x.shape
        q, k, v = (t.reshape(b, self.heads, ny * nx, -1) for t in split_heads(self.qkv(x), self.heads))
        mask = self.mask
        if self.table is not None:
            table = torch.cat([self.table, self.table.new_full((1, self.heads), float("-inf"))])
            mask = table[self.rows].permute(2, 0, 1).unsqueeze(0)  # (1, heads, YX, YX)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, heads, YX, D)
        return self.proj(out.transpose(1, 2).reshape(b, ny, nx, c))


class Gather(_Base):
    """Neighborhood attention by gathering each pixel's k*k keys and values: (B, heads, Y, X, k, k, D)."""

    def prepare(self, ny: int, nx: int, device: str) -> None:
        self.r, self.s, self.rel = self.neighbor_rel_index(ny, nx, device)

    def __call__(self, x: Any) -> Any:
        import torch

        b, ny, nx, c = x.shape
        q, k, v = split_heads(self.qkv(x), self.heads)  # (B, heads, Y, X, D)
        kn, vn = k[:, :, self.r, self.s], v[:, :, self.r, self.s]  # (B, heads, Y, X, k, k, D)
        scores = torch.einsum("bhyxd,bhyxijd->bhyxij", q, kn) * q.shape[-1] ** -0.5
        if self.table is not None:
            scores = scores + self.table[self.rel].permute(4, 0, 1, 2, 3)  # + (heads, Y, X, k, k)
        a = torch.softmax(scores.flatten(-2), -1).view_as(scores)  # (B, heads, Y, X, k, k)
        out = torch.einsum("bhyxij,bhyxijd->bhyxd", a, vn)  # (B, heads, Y, X, D)
        return self.proj(out.permute(0, 2, 3, 1, 4).reshape(b, ny, nx, c))


class SwinWindow(_Base):
    """Swin's (shifted) window attention: roll by -shift, window_partition, attention with relative position
    bias (+ the -100 mask between the regions of a shifted window), window_reverse, roll back."""

    shift = 0

    def prepare(self, ny: int, nx: int, device: str) -> None:
        import torch

        k, s = self.k, self.shift
        coords = torch.stack(torch.meshgrid(torch.arange(k), torch.arange(k), indexing="ij")).flatten(1)  # (2, k*k)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (k - 1)  # (k*k, k*k, 2): query - key
        self.relative_position_index = (rel[..., 0] * (2 * k - 1) + rel[..., 1]).to(device)  # (k*k, k*k)
        self.mask = None
        if s:  # Swin's attn_mask: region ids of the rolled map, -100 between different regions
            region = torch.zeros(ny, nx)
            cuts = (slice(0, -k), slice(-k, -s), slice(-s, None))
            for i, ys in enumerate(cuts):
                for j, xs in enumerate(cuts):
                    region[ys, xs] = 3 * i + j
            ids = region.view(ny // k, k, nx // k, k).permute(0, 2, 1, 3).reshape(-1, k * k)  # (nW, k*k)
            diff = ids[:, None, :] - ids[:, :, None]  # (nW, k*k, k*k)
            self.mask = torch.zeros_like(diff).masked_fill_(diff != 0, -100.0).to(device)

    def __call__(self, x: Any) -> Any:
        import torch

        b, ny, nx, c = x.shape
        w, s = self.k, self.shift
        if s:
            x = torch.roll(x, shifts=(-s, -s), dims=(1, 2))
        win = x.view(b, ny // w, w, nx // w, w, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, w * w, c)  # (B*nW, w*w, C)
        bw, n, _ = win.shape
        qkv = self.qkv(win).reshape(bw, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (B*nW, heads, w*w, D)
        attn = (q * (q.shape[-1] ** -0.5)) @ k.transpose(-2, -1)  # (B*nW, heads, w*w, w*w)
        bias = self.table[self.relative_position_index.view(-1)].view(n, n, -1)  # (w*w, w*w, heads)
        attn = attn + bias.permute(2, 0, 1).unsqueeze(0)
        if self.mask is not None:
            nw = self.mask.shape[0]
            attn = (attn.view(bw // nw, nw, self.heads, n, n) + self.mask[None, :, None]).view(bw, self.heads, n, n)
        attn = attn.softmax(-1)
        out = self.proj((attn @ v).transpose(1, 2).reshape(bw, n, c))  # (B*nW, w*w, C)
        out = out.view(b, ny // w, nx // w, w, w, c).permute(0, 1, 3, 2, 4, 5).reshape(b, ny, nx, c)
        return torch.roll(out, shifts=(s, s), dims=(1, 2)) if s else out


# ---------------------------------------------------------------------------------- gatx
def gatx_module(kind: str, dim: int, heads: int, k: int, rpb: bool, backend: str | None, shift: int = 0) -> Any:
    from gatx.vision import NeighborhoodAttention2d, WindowAttention

    if kind == "na":
        return NeighborhoodAttention2d(dim, heads, k, rel_pos_bias=rpb, backend=backend)
    return WindowAttention(dim, k, heads, shift_size=shift, backend=backend)


def default_backend(kind: str, side: int, k: int, batch: int, heads: int, dim: int, rpb: bool, device: str,
                    shift: int = 0) -> str:
    """The backend gatx picks (backend=None) for this layer's sparse_attention call."""
    import torch

    import gatx
    from gatx.vision import neighborhood_graph, window_graph

    g = neighborhood_graph(side, side, k, device=device) if kind == "na" else window_graph(side, side, k, shift, device=device)
    q = torch.empty(g.num_dst, batch * heads, dim // heads, device=device)
    bias = torch.empty(g.num_edges, batch * heads, device=device) if rpb else None
    mod = gatx.ops.select(None, g, q, q, q, bias, None, op="sparse_attention", score="dot", scale=1.0, bias=bias,
                          negative_slope=0.2, edge_weight=None, dropout_p=0.0, return_attention=False)
    return mod.__name__.rsplit(".", 1)[-1]


# ---------------------------------------------------------------------------------- running
def run_group(kind: str, cfg: tuple[int, int, int], args: argparse.Namespace, env: dict[str, Any],
              shift: int = 0, ftz: bool = False) -> list[dict[str, Any]]:
    """Rows of one layer group: kind "na" (neighborhood) or "win" (window attention with ``shift``), run
    with flush-to-zero set to ``ftz`` (``torch.set_flush_denormal``; restored to off at the end)."""
    import torch

    import gatx

    stage, side, k = cfg
    dim, heads = STAGES[stage]
    dev, b = args.device, args.batch
    rpb = args.na_rpb if kind == "na" else True
    group = "neighborhood" if kind == "na" else "window"
    short = "NA" if kind == "na" else "WA"
    case = f"{group}-{side}x{side}-k{k}" + (f"-s{shift}" if shift else "") + f"-C{dim}"
    case += "-noftz" if kind == "win" and not ftz else ""
    base = {"bench": "vision", "case": case, "group": group, "map": side,
            "pixels": side * side, "kernel": k, "dim": dim, "heads": heads, "batch": b, "stage": stage,
            "rel_pos_bias": rpb, "shift": shift, "flush_denormal": ftz, "device": env["device"],
            "threads": env["threads"], "reference": f"gatx.{short}[torch]"}
    log(f"{base['case']}: B={b} Y=X={side} C={dim} heads={heads} k={k} rel_pos_bias={rpb} shift={shift} flush_denormal={ftz}")
    baselines = [("dense-sdpa-mask", "torch-dense", DenseMasked), ("gather-kxk", "torch", Gather)] if kind == "na" else [
        ("swin-window-partition", "torch", SwinWindow)]

    def skip_all(reason: str, names: list[str]) -> list[dict[str, Any]]:
        rows = [dict(base, system=n, backend="", mode=m, status="skipped", reason=reason) for n in names for m in ("fwd", "fwd+bwd")]
        log(f"  skipped: {reason}")
        return rows

    if kind == "win" and shift >= k:
        return skip_all(f"shift {shift} needs a window larger than the shift (k={k})", [f"gatx.{short}"] + [n for n, _, _ in baselines])
    if kind == "win" and side % k:
        return skip_all(f"{side}x{side} is not a whole number of {k}x{k} windows (Swin pads the map; not compared)",
                        [f"gatx.{short}"] + [n for n, _, _ in baselines])
    try:
        auto = default_backend(kind, side, k, b, heads, dim, rpb, dev, shift)
    except ImportError as err:
        return skip_all(f"gatx.vision is not available ({err})", [f"gatx.{short}"] + [n for n, _, _ in baselines])
    backends = list(gatx.ops.BACKENDS) if args.all_backends else [auto]

    gen = torch.Generator().manual_seed(args.seed + side * 100 + k)
    x = torch.randn(b, side, side, dim, generator=gen).to(dev).requires_grad_(True)
    gout = torch.randn(b, side, side, dim, generator=gen).to(dev)
    torch.manual_seed(args.seed)
    ref_mod = gatx_module(kind, dim, heads, k, rpb, "torch", shift).to(dev)
    state = {n: t.detach().clone() for n, t in ref_mod.state_dict().items()}
    out = fwd_bwd(lambda: ref_mod(x), gout, [x] + list(ref_mod.parameters()))
    ref = {"out": out.detach(), "x": x.grad.detach().clone()} | {n: p.grad.detach().clone() for n, p in ref_mod.named_parameters()}
    del ref_mod, out

    def gatx_build(backend: str) -> Callable[[], Any]:
        def build() -> tuple[Callable[[], Any], dict[str, Any]]:
            mod = gatx_module(kind, dim, heads, k, rpb, backend, shift).to(dev)
            mod.load_state_dict(state)
            return (lambda: mod(x)), dict(mod.named_parameters()) | {"x": x}
        return build

    def baseline_build(cls: type) -> Callable[[], Any]:
        def build() -> tuple[Callable[[], Any], dict[str, Any]]:
            if cls is DenseMasked:
                per_pair = 1 + (heads * 4 + 8 if rpb else 0)  # bool mask (+ float bias and its table rows)
                gib = (side * side) ** 2 * per_pair / 2**30
                if gib > args.dense_max_gib:
                    raise Skip(f"the (YX)^2 mask{' and bias' if rpb else ''} would take {gib:.1f} GiB "
                               f"> --dense-max-gib={args.dense_max_gib}")
            if cls is Gather:
                gib = 3 * b * dim * side * side * k * k * 4 / 2**30  # measured: peak ~ 3 x the gathered keys
                if gib > args.gather_max_gib:
                    raise Skip(f"estimated peak {gib:.1f} GiB > --gather-max-gib={args.gather_max_gib}")
            mod = cls(dim, heads, k, rpb, dev)
            mod.shift = shift
            mod.load(state)
            mod.prepare(side, side, dev)
            return (lambda: mod(x)), mod.named() | {"x": x}
        return build

    systems = [(f"gatx.{short}[{bk}]", bk, gatx_build(bk)) for bk in backends]
    systems += [(name, bk, baseline_build(cls)) for name, bk, cls in baselines]
    rows = []
    torch.set_flush_denormal(ftz)
    try:
        for name, backend, build in systems:
            row = dict(base, system=name, backend=backend, default_backend=auto)
            rows += check_and_time(row, build, ref, gout, args)
    finally:
        torch.set_flush_denormal(False)
    return rows


def run_op_group(cfg: tuple[int, int, int], args: argparse.Namespace, env: dict[str, Any]) -> list[dict[str, Any]]:
    """Neighborhood attention at op level with a relative position bias: gatx.ops.sparse_attention (per-edge
    bias from the table) against dense SDPA over all keys with the float mask built from the table."""
    import torch
    import torch.nn.functional as F

    import gatx
    from gatx.vision import neighborhood_graph

    stage, side, k = cfg
    dim, heads = STAGES[stage]
    dev, b, n, d = args.device, args.batch, side * side, dim // heads
    base = {"bench": "vision", "case": f"neighborhood-op-{side}x{side}-k{k}-C{dim}", "group": "neighborhood-op",
            "map": side, "pixels": n, "kernel": k, "dim": dim, "heads": heads, "batch": b, "stage": stage,
            "rel_pos_bias": True, "shift": 0, "flush_denormal": False, "device": env["device"],
            "threads": env["threads"], "reference": "gatx.ops[torch]"}
    log(f"{base['case']}: B={b} Y=X={side} heads={heads} D={d} k={k}, op level with relative position bias")
    g = neighborhood_graph(side, side, k, device=dev)
    st = g.structure
    gen = torch.Generator().manual_seed(args.seed + side * 100 + k)
    qkv = torch.randn(3, b * heads, n, d, generator=gen).to(dev).requires_grad_(True)  # head-major, as the modules
    table = (0.02 * torch.randn(st.table_size, heads, generator=gen)).to(dev).requires_grad_(True)
    gout = torch.randn(b * heads, n, d, generator=gen).to(dev)

    def gatx_call(backend: str | None) -> Any:
        q, kk, v = (t.transpose(0, 1) for t in qkv)  # (N, B*H, D) views
        out = gatx.ops.sparse_attention(g, q, kk, v, scale=d ** -0.5, bias=st.table_bias(table, b),
                                        backend=backend)
        return out.transpose(0, 1)  # (B*H, N, D)

    out = fwd_bwd(lambda: gatx_call("torch"), gout, [qkv, table])
    ref = {"out": out.detach(), "qkv": qkv.grad.detach().clone(), "table": table.grad.detach().clone()}
    del out
    rows_of_table = torch.full((n, n), st.table_size, dtype=torch.long, device=dev)  # the extra last row is -inf
    rows_of_table[g.dst, g.src] = st.rel_pos_index

    def dense_call() -> Any:
        q, kk, v = (t.view(b, heads, n, d) for t in qkv)
        padded = torch.cat([table, table.new_full((1, heads), float("-inf"))])
        mask = padded[rows_of_table].permute(2, 0, 1).unsqueeze(0)  # (1, heads, N, N)
        return F.scaled_dot_product_attention(q, kk, v, attn_mask=mask, scale=d ** -0.5).reshape(b * heads, n, d)

    def dense_build() -> tuple[Callable[[], Any], dict[str, Any]]:
        gib = n * n * (heads * 4 * 2 + 8) / 2**30  # float mask, its gradient, the table rows
        if gib > args.dense_max_gib:
            raise Skip(f"the (YX)^2 float mask would take {gib:.1f} GiB > --dense-max-gib={args.dense_max_gib}")
        return dense_call, {"qkv": qkv, "table": table}

    auto = default_backend("na", side, k, b, heads, dim, True, dev)
    systems = [(f"gatx.op[{auto}]", auto, lambda: ((lambda: gatx_call(None)), {"qkv": qkv, "table": table})),
               ("dense-sdpa-mask", "torch-dense", dense_build)]
    rows = []
    for name, backend, build in systems:
        rows += check_and_time(dict(base, system=name, backend=backend, default_backend=auto), build, ref, gout, args)
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if cuda_missing(args.device):
        return 2
    env = environment(args.device)
    log(f"bench_vision on {env['device']}, {env['threads']} threads, torch {env['torch']}")
    rows: list[dict[str, Any]] = []
    weights = [m * m * k * k * STAGES[s][0] for s, m, k in args.configs]  # for the ETA: cost ~ pixels x k^2 x C
    for cfg in progress(args.configs if args.family != "only" else [], weights, "bench_vision map"):
        rows += run_group("na", cfg, args, env)
        gc.collect()
        if not args.no_na_op:
            rows += run_op_group(cfg, args, env)
            gc.collect()
        for shift in args.shift_list:
            for ftz in args.ftz_list:
                rows += run_group("win", cfg, args, env, shift, ftz)
                gc.collect()
    if args.family != "without":
        from bench_vision_family import run_family

        rows += run_family(args)
    write_json(args.json, env, rows)
    return 0


if __name__ == "__main__":
    allocator("reuse")
    sys.exit(main())
