"""Benchmark local attention over image maps: neighborhood and window attention, sparse versus dense.

Every system is a whole attention layer on (B, X, Y, C) input: ``qkv`` projection, attention,
``proj``, with the same weights. Two groups, each checked against its gatx module before timing:

- neighborhood attention (each pixel attends to the k x k window centred on it, shifted inward at
  the borders, as in NATTEN / NAT): ``gatx.vision.NeighborhoodAttention2d`` (the reference), dense
  ``scaled_dot_product_attention`` over all X*Y keys with a boolean mask, and a plain k*k gather
  (unfold-style: materialise each pixel's k*k keys and values, then softmax);
- window attention (Swin, no shift): ``gatx.vision.WindowAttention`` (the reference) and Swin's own
  window-partition formulation with its relative position bias, windows of k x k (maps not divisible
  by k are skipped, as Swin pads them instead).

Sizes: maps 14x14 to 112x112, kernels 3 / 7 / 13, C=96 with 3 heads (Swin-T stage 1) and, in the full
run, C=192 with 6 heads (stage 2). ``fwd`` is timed under ``torch.no_grad()``; ``fwd+bwd`` backpropagates
a fixed random output gradient into the input and the weights.

    python benchmarks/bench_vision.py --quick --json vision.json
    python benchmarks/bench_vision.py --maps 56,112 --kernels 7 --device cuda
"""
from __future__ import annotations

import argparse
import gc
import sys
from typing import Any, Callable

from _harness import HelpFormatter, Skip, check_and_time, environment, fwd_bwd, log, progress, reexec_with_malloc_env, write_json

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
    p.add_argument("--all-backends", action="store_true", help="time gatx on every backend, not only the default (full run: on)")
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
    args.all_backends = args.all_backends or not (args.tiny or args.quick)
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
    """Swin's WindowAttention: window_partition, attention with relative position bias, window_reverse."""

    def prepare(self, ny: int, nx: int, device: str) -> None:
        import torch

        k = self.k
        coords = torch.stack(torch.meshgrid(torch.arange(k), torch.arange(k), indexing="ij")).flatten(1)  # (2, k*k)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (k - 1)  # (k*k, k*k, 2): query - key
        self.relative_position_index = (rel[..., 0] * (2 * k - 1) + rel[..., 1]).to(device)  # (k*k, k*k)

    def __call__(self, x: Any) -> Any:
        b, ny, nx, c = x.shape
        w = self.k
        win = x.view(b, ny // w, w, nx // w, w, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, w * w, c)  # (B*nW, w*w, C)
        bw, n, _ = win.shape
        qkv = self.qkv(win).reshape(bw, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (B*nW, heads, w*w, D)
        attn = (q * (q.shape[-1] ** -0.5)) @ k.transpose(-2, -1)  # (B*nW, heads, w*w, w*w)
        bias = self.table[self.relative_position_index.view(-1)].view(n, n, -1)  # (w*w, w*w, heads)
        attn = (attn + bias.permute(2, 0, 1).unsqueeze(0)).softmax(-1)
        out = self.proj((attn @ v).transpose(1, 2).reshape(bw, n, c))  # (B*nW, w*w, C)
        return out.view(b, ny // w, nx // w, w, w, c).permute(0, 1, 3, 2, 4, 5).reshape(b, ny, nx, c)


# ---------------------------------------------------------------------------------- gatx
def gatx_module(kind: str, dim: int, heads: int, k: int, rpb: bool, backend: str | None) -> Any:
    from gatx.vision import NeighborhoodAttention2d, WindowAttention

    if kind == "na":
        return NeighborhoodAttention2d(dim, heads, k, rel_pos_bias=rpb, backend=backend)
    return WindowAttention(dim, k, heads, backend=backend)


def default_backend(kind: str, side: int, k: int, batch: int, heads: int, dim: int, rpb: bool, device: str) -> str:
    """The backend gatx picks (backend=None) for this layer's sparse_attention call."""
    import torch

    import gatx
    from gatx.vision import neighborhood_graph, window_graph

    g = neighborhood_graph(side, side, k, device=device) if kind == "na" else window_graph(side, side, k, device=device)
    q = torch.empty(g.num_dst, batch * heads, dim // heads, device=device)
    bias = torch.empty(g.num_edges, batch * heads, device=device) if rpb else None
    mod = gatx.ops.select(None, g, q, q, q, bias, None, op="sparse_attention", score="dot", scale=1.0, bias=bias,
                          negative_slope=0.2, edge_weight=None, dropout_p=0.0, return_attention=False)
    return mod.__name__.rsplit(".", 1)[-1]


# ---------------------------------------------------------------------------------- running
def run_group(kind: str, cfg: tuple[int, int, int], args: argparse.Namespace, env: dict[str, Any]) -> list[dict[str, Any]]:
    import torch

    import gatx

    stage, side, k = cfg
    dim, heads = STAGES[stage]
    dev, b = args.device, args.batch
    rpb = args.na_rpb if kind == "na" else True
    group = "neighborhood" if kind == "na" else "window"
    short = "NA" if kind == "na" else "WA"
    base = {"bench": "vision", "case": f"{group}-{side}x{side}-k{k}-C{dim}", "group": group, "map": side,
            "pixels": side * side, "kernel": k, "dim": dim, "heads": heads, "batch": b, "stage": stage,
            "rel_pos_bias": rpb, "device": env["device"], "threads": env["threads"],
            "reference": f"gatx.{short}[torch]"}
    log(f"{base['case']}: B={b} Y=X={side} C={dim} heads={heads} k={k} rel_pos_bias={rpb}")
    baselines = [("dense-sdpa-mask", "torch-dense", DenseMasked), ("gather-kxk", "torch", Gather)] if kind == "na" else [
        ("swin-window-partition", "torch", SwinWindow)]

    def skip_all(reason: str, names: list[str]) -> list[dict[str, Any]]:
        rows = [dict(base, system=n, backend="", mode=m, status="skipped", reason=reason) for n in names for m in ("fwd", "fwd+bwd")]
        log(f"  skipped: {reason}")
        return rows

    if kind == "win" and side % k:
        return skip_all(f"{side}x{side} is not a whole number of {k}x{k} windows (Swin pads the map; not compared)",
                        [f"gatx.{short}"] + [n for n, _, _ in baselines])
    try:
        auto = default_backend(kind, side, k, b, heads, dim, rpb, dev)
    except ImportError as err:
        return skip_all(f"gatx.vision is not available ({err})", [f"gatx.{short}"] + [n for n, _, _ in baselines])
    backends = list(gatx.ops.BACKENDS) if args.all_backends else [auto]

    gen = torch.Generator().manual_seed(args.seed + side * 100 + k)
    x = torch.randn(b, side, side, dim, generator=gen).to(dev).requires_grad_(True)
    gout = torch.randn(b, side, side, dim, generator=gen).to(dev)
    torch.manual_seed(args.seed)
    ref_mod = gatx_module(kind, dim, heads, k, rpb, "torch").to(dev)
    state = {n: t.detach().clone() for n, t in ref_mod.state_dict().items()}
    out = fwd_bwd(lambda: ref_mod(x), gout, [x] + list(ref_mod.parameters()))
    ref = {"out": out.detach(), "x": x.grad.detach().clone()} | {n: p.grad.detach().clone() for n, p in ref_mod.named_parameters()}
    del ref_mod, out

    def gatx_build(backend: str) -> Callable[[], Any]:
        def build() -> tuple[Callable[[], Any], dict[str, Any]]:
            mod = gatx_module(kind, dim, heads, k, rpb, backend).to(dev)
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
            mod.load(state)
            mod.prepare(side, side, dev)
            return (lambda: mod(x)), mod.named() | {"x": x}
        return build

    systems = [(f"gatx.{short}[{bk}]", bk, gatx_build(bk)) for bk in backends]
    systems += [(name, bk, baseline_build(cls)) for name, bk, cls in baselines]
    rows = []
    for name, backend, build in systems:
        row = dict(base, system=name, backend=backend, default_backend=auto)
        rows += check_and_time(row, build, ref, gout, args)
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        log("--device cuda was asked for but torch.cuda.is_available() is False")
        return 2
    env = environment(args.device)
    log(f"bench_vision on {env['device']}, {env['threads']} threads, torch {env['torch']}")
    rows: list[dict[str, Any]] = []
    weights = [m * m * k * k * STAGES[s][0] for s, m, k in args.configs]  # for the ETA: cost ~ pixels x k^2 x C
    for cfg in progress(args.configs if args.family != "only" else [], weights, "bench_vision map"):
        for kind in ("na", "win"):
            rows += run_group(kind, cfg, args, env)
            gc.collect()
    if args.family != "without":
        from bench_vision_family import run_family

        rows += run_family(args)
    write_json(args.json, env, rows)
    return 0


if __name__ == "__main__":
    reexec_with_malloc_env()
    sys.exit(main())
