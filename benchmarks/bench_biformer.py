"""BiFormer bi-level routing attention: gatx's routed graph vs the official gather formulation.

The official formulation (written here from BiFormer's definition) gathers the key / value pixels of
every region's ``topk`` routed regions into a (B, R, topk, P, C) tensor and runs dense attention per
region; "official gather" gathers as BiFormer's code does (``torch.gather`` from an expanded view, whose
backward allocates a (B, R, R, P, C) gradient), "index_select gather" is a leaner variant of it.
gatx builds one block-diagonal routed graph per forward pass and runs one ``sparse_attention`` call
on it (blocks backend by default; ``--backends`` adds others). Both use
the same weights; outputs are checked against each other.

Reports forward+backward median time, peak extra memory of one forward+backward, and the graph
build's share of gatx's layer time (``routed_region_graph`` alone, timed separately).

    OMP_NUM_THREADS=1 python benchmarks/bench_biformer.py            # BiFormer-T stage 1, topk 1 and 4
    OMP_NUM_THREADS=1 python benchmarks/bench_biformer.py --quick    # a smaller map, seconds
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _harness import PeakMemory, load_average, measure, reexec_with_malloc_env  # noqa: E402


class GatherBRA:
    """BiFormer's formulation from its definition: routing, top-k gather of k / v, dense attention per region."""

    def __init__(self, module, index_select: bool = False) -> None:
        self.m = module  # a gatx BiLevelRoutingAttention: its parameters and hyperparameters
        self.index_select = index_select  # False: BiFormer's gather from an expanded (B, R, R, P, C) view

    def __call__(self, x):
        import torch

        m = self.m
        B, Y, X, C = x.shape
        n, Ck, H = m.n_win, m.qk_dim, m.num_heads
        h, w = Y // n, X // n
        R, P = n * n, h * w
        t = m.qkv.qkv(x).view(B, n, h, n, w, -1).permute(0, 1, 3, 2, 4, 5).reshape(B, R, P, -1)  # (B, R, P, 2Ck+C)
        q, kv = t[..., :Ck], t[..., Ck:]
        with torch.no_grad():
            aff = (q.mean(2) * m.scale) @ kv[..., :Ck].mean(2).transpose(1, 2)  # (B, R, R)
            idx = aff.topk(m.topk, -1).indices  # (B, R, topk)
        if self.index_select:  # a leaner gather: its backward is an index_add, not a (B, R, R, P, C) buffer
            rows = (idx + torch.arange(0, B * R, R).view(B, 1, 1)).reshape(-1)  # (B*R*topk,)
            sel = kv.reshape(B * R, P, Ck + C).index_select(0, rows)  # (B*R*topk, P, Ck+C)
        else:  # BiFormer's KVGather
            sel = torch.gather(kv.unsqueeze(1).expand(B, R, R, P, Ck + C), 2,
                               idx.view(B, R, m.topk, 1, 1).expand(B, R, m.topk, P, Ck + C))  # (B, R, topk, P, Ck+C)
        k, v = sel.reshape(B * R, m.topk * P, Ck + C).split([Ck, C], -1)
        qh = q.reshape(B * R, P, H, -1).transpose(1, 2)  # (B*R, H, P, Dk)
        kh = k.reshape(B * R, m.topk * P, H, -1).permute(0, 2, 3, 1)  # (B*R, H, Dk, topk*P)
        vh = v.reshape(B * R, m.topk * P, H, -1).transpose(1, 2)  # (B*R, H, topk*P, Dv)
        out = ((qh * m.scale) @ kh).softmax(-1) @ vh  # (B*R, H, P, Dv)
        out = out.transpose(1, 2).reshape(B, n, n, h, w, C).permute(0, 1, 3, 2, 4, 5).reshape(B, Y, X, C)
        v_map = t[..., 2 * Ck:].reshape(B, n, n, h, w, C).permute(0, 5, 1, 3, 2, 4).reshape(B, C, Y, X)
        return m.wo(out + m.lepe(v_map).permute(0, 2, 3, 1))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--side", type=int, default=56)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--heads", type=int, default=2, help="BiFormer-T stage 1: 64 channels / head_dim 32")
    p.add_argument("--n-win", type=int, default=7)
    p.add_argument("--topk", type=int, nargs="+", default=[1, 4])
    p.add_argument("--side-dwconv", type=int, default=5, help="BiFormer-T uses 5")
    p.add_argument("--backends", nargs="+", default=["auto"], help="gatx backends to time (auto = blocks)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="28x28 map, 3 reps")
    args = p.parse_args(argv)
    reexec_with_malloc_env()
    import torch

    from gatx.vision import BiLevelRoutingAttention, routed_region_graph

    if args.quick:
        args.side, args.reps = 28, 3
    torch.manual_seed(0)
    B, S, C = args.batch, args.side, args.dim
    print(f"BiFormer routing attention: B={B}, {S}x{S}, C={C}, heads={args.heads}, n_win={args.n_win}, "
          f"side_dwconv={args.side_dwconv}, threads={torch.get_num_threads()}, load {load_average()}")
    print(f"{'topk':>4} {'system':<19} {'fwd+bwd ms':>10} {'peak MiB':>9} {'vs gather':>9}  note")
    for topk in args.topk:
        m = BiLevelRoutingAttention(C, args.heads, args.n_win, topk=topk, side_dwconv=args.side_dwconv)
        x = torch.randn(B, S, S, C, requires_grad=True)
        gout = torch.randn(B, S, S, C)
        systems = {"official gather": GatherBRA(m), "index_select gather": GatherBRA(m, index_select=True)}
        for be in args.backends:
            mod = BiLevelRoutingAttention(C, args.heads, args.n_win, topk=topk, side_dwconv=args.side_dwconv,
                                          backend=None if be == "auto" else be)
            mod.load_state_dict(m.state_dict())
            systems[f"gatx {be}"] = mod
        steps, peaks, grads = {}, {}, {}
        for name, fn in systems.items():
            params = [x, *(fn.m if isinstance(fn, GatherBRA) else fn).parameters()]

            def step(fn=fn, params=params):
                return torch.autograd.grad(fn(x), params, gout)

            step()  # warm-up: first-call allocations and caches are not the layer's memory
            with PeakMemory("cpu") as mem:
                grads[name] = step()
            steps[name], peaks[name] = step, mem.mib
        times = {name: [] for name in systems}
        for _ in range(args.reps):  # interleaved rounds: load changes hit every system alike
            for name, step in steps.items():
                t0 = time.perf_counter()
                step()
                times[name].append(1e3 * (time.perf_counter() - t0))
        base = statistics.median(times["official gather"])
        for name in systems:
            ms = statistics.median(times[name])
            diff = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(grads[name], grads["official gather"]))
            note = f"grads vs official: max rel. diff {diff:.1e}" if name != "official gather" else ""
            print(f"{topk:>4} {name:<19} {ms:>10.1f} {peaks[name]:>9.1f} {ms / base:>8.2f}x  {note}", flush=True)
        if "gatx auto" in systems:
            fn, ms = systems["gatx auto"], statistics.median(times["gatx auto"])
            q, k, _ = fn.qkv(x.detach())
            idx = fn.routes(q, k)
            tr = measure(lambda: fn.routes(q, k), "cpu", warmup=1, reps=args.reps, budget_s=10.0)["median_ms"]
            tb = measure(lambda: routed_region_graph(idx, (S, S), args.n_win), "cpu", warmup=1, reps=args.reps,
                         budget_s=10.0)["median_ms"]
            print(f"{'':>4} {'  graph build':<19} {tb:>10.1f} {'':>9} {'':>9}  {100 * tb / ms:.1f} % of gatx's fwd+bwd "
                  f"(routing top-k: {tr:.1f} ms, {100 * tr / ms:.1f} %)")
    print(f"load average at the end: {load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
