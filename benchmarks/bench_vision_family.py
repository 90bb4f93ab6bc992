"""Benchmark the vision attention family against the formulations their official code uses.

Each gatx module runs against the official formulation, written here from its definition
(/work/shared/vision-family.md, the papers), as an ``nn.Module`` with the official parameter names
that loads the gatx module's state dict (``strict=True``), so both run with the same weights:

- VOLO outlook attention, ``gatx.vision.OutlookAttention`` vs unfold / fold: ``nn.Unfold`` of the
  projected, zero-padded v (k^2 copies of it), logits from ``attn`` on the (average-pooled) centre
  tokens, softmax, matmul, ``F.fold``, ``proj``. VOLO-D1 stage 1: 28x28, C=192, 6 heads, k=3, padding
  1, stride 2 (VOLO's setting) and stride 1.
- BiFormer bi-level routing attention, ``gatx.vision.BiLevelRoutingAttention`` vs BiFormer's gather:
  region routing, then the routed regions' k / v gathered (topk times their memory) and dense attention
  per region, LePE, ``wo``. Two gathers: ``torch.gather`` from an expanded (B, R, R, P, C) view as
  BiFormer's ``KVGather`` (its backward allocates that full buffer), and a leaner ``index_select``.
  BiFormer-T stage 1: 56x56, C=64, 2 heads, n_win=7, LePE kernel 5, topk 1 and 4. The gatx rows also
  carry the graph build's share of the layer's time (``routed_region_graph`` timed alone) and the top-k
  routing's time (``--only routing`` gives what the former ``bench_biformer.py`` measured).
- ACmix, ``gatx.vision.ACmix`` vs its unfold formulation: ``nn.Unfold`` of the reflection-padded k, v
  and position encoding (kernel_att^2 copies each), the literal logit (q / sqrt(d)) . (k_j + pe_i - pe_j);
  the convolution branch is the same code in both. ResNet-50 stage 1: 56x56, C=64, 4 heads, kernel_att 7.
- Temporal window attention, ``WindowAttention(..., num_ttokens=T)(x, temporal=True)`` on (B', T, C)
  vs dense attention over T (qkv, q * scale @ k^T + bias table, softmax, @ v, proj), and the same with
  ``scaled_dot_product_attention``. T=8 and 16, C=96, 3 heads, B' = 2 x 28 x 28 (full run: 2 x 56 x 56).

Before timing, every system's output and gradients (input and parameters) are checked against the gatx
module on its default backend (``--tol``, relative). Then ``fwd`` (no_grad) and ``fwd+bwd`` median time
and peak memory (see ``_harness.py``). B=2 everywhere except in ``--tiny``.

    OMP_NUM_THREADS=1 python benchmarks/bench_vision_family.py --quick        # about 2 minutes on 1 core
    python benchmarks/bench_vision_family.py --tiny --out-dir /tmp/fam        # seconds (tests)
    python benchmarks/bench_vision.py --quick --family only --json rows.json  # the same rows, JSON only

Standalone, it writes ``results.json`` and ``results.md`` (the table of gatx / official ratios) into
``--out-dir``, by default a fresh ``runs/benchmarks/vision-family-<mode>-<time>/`` (git-ignored).
``benchmarks/run.py`` runs these rows through ``bench_vision.py`` into its results.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _harness import (  # noqa: E402
    HelpFormatter, allocator, check_and_time, cuda_missing, environment, fwd_bwd, load_average, log, measure, progress,
    write_json,
)

BENCH = "vision_family"
GROUPS = ("outlook", "routing", "acmix", "temporal")
# Gradients that are zero in exact arithmetic (only rounding noise, so a relative comparison means
# nothing): ACmix's conv_p bias shifts every pe alike, which cancels in pe_i - pe_j.
ZERO_GRADS = {"conv_p.bias"}
LABELS = {"outlook": "VOLO outlook", "routing": "BiFormer routing", "acmix": "ACmix", "temporal": "temporal window"}


def configs(mode: str, groups: tuple[str, ...] = GROUPS) -> list[dict[str, Any]]:
    """The cases of a mode (tiny / quick / full): paper stage-1 sizes, tiny ones for tests."""
    if mode == "tiny":
        cases = [dict(group="outlook", B=1, side=8, dim=24, heads=3, k=3, stride=2),
                 dict(group="routing", B=1, side=14, dim=16, heads=2, n_win=7, topk=2, dwconv=3),
                 dict(group="acmix", B=1, side=10, dim=16, heads=4, k=7),
                 dict(group="temporal", B=64, T=4, dim=24, heads=3)]
    else:
        spatial = 28 if mode == "quick" else 56
        cases = [dict(group="outlook", B=2, side=28, dim=192, heads=6, k=3, stride=s) for s in (2, 1)]
        cases += [dict(group="routing", B=2, side=56, dim=64, heads=2, n_win=7, topk=t, dwconv=5) for t in (1, 4)]
        cases += [dict(group="acmix", B=2, side=56, dim=64, heads=4, k=7)]
        cases += [dict(group="temporal", B=2 * spatial * spatial, T=t, dim=96, heads=3) for t in (8, 16)]
    return [c for c in cases if c["group"] in groups]


def describe(c: dict[str, Any]) -> tuple[str, str]:
    """(case id, human-readable setting) of a config."""
    g = c["group"]
    if g == "outlook":
        return (f"outlook-{c['side']}-C{c['dim']}-k{c['k']}-s{c['stride']}",
                f"{c['side']}x{c['side']}, C={c['dim']}, {c['heads']} heads, k={c['k']}, stride {c['stride']}")
    if g == "routing":
        return (f"routing-{c['side']}-C{c['dim']}-win{c['n_win']}-top{c['topk']}",
                f"{c['side']}x{c['side']}, C={c['dim']}, {c['heads']} heads, n_win={c['n_win']}, topk={c['topk']}")
    if g == "acmix":
        return (f"acmix-{c['side']}-C{c['dim']}-k{c['k']}",
                f"{c['side']}x{c['side']}, C={c['dim']}, {c['heads']} heads, kernel_att={c['k']}")
    return (f"temporal-T{c['T']}-B{c['B']}-C{c['dim']}", f"B'={c['B']:,}, T={c['T']}, C={c['dim']}, {c['heads']} heads")


# ---------------------------------------------------------------------------------- one case
def systems_of(c: dict[str, Any]) -> tuple[Callable[[str | None], Any], list[tuple[str, Callable[[], Any]]], Any, Any]:
    """(gatx module for a backend, [(official name, module maker)], input shape, call(module, x))."""
    from _vision_official import ACmixUnfold, BiFormerGather, TemporalDense, VoloUnfoldFold

    from gatx.vision import ACmix, BiLevelRoutingAttention, OutlookAttention, WindowAttention

    g, B, C, h = c["group"], c["B"], c["dim"], c["heads"]
    plain = lambda m, x: m(x)  # noqa: E731
    if g == "outlook":
        return (lambda be: OutlookAttention(C, h, c["k"], c["k"] // 2, c["stride"], backend=be),
                [("volo.unfold-fold", lambda: VoloUnfoldFold(C, h, c["k"], c["k"] // 2, c["stride"]))],
                (B, c["side"], c["side"], C), plain)
    if g == "routing":
        args = (C, h, c["n_win"], c["topk"], c["dwconv"])
        return (lambda be: BiLevelRoutingAttention(C, h, c["n_win"], topk=c["topk"], side_dwconv=c["dwconv"], backend=be),
                [("biformer.gather", lambda: BiFormerGather(*args)),
                 ("biformer.index_select", lambda: BiFormerGather(*args, index_select=True))],
                (B, c["side"], c["side"], C), plain)
    if g == "acmix":
        return (lambda be: ACmix(C, C, c["k"], h, backend=be), [("acmix.unfold", lambda: ACmixUnfold(C, h, c["k"]))],
                (B, C, c["side"], c["side"]), plain)
    return (lambda be: WindowAttention(C, 7, h, num_ttokens=c["T"], backend=be),
            [("dense-over-T", lambda: TemporalDense(C, h, c["T"], 7)),
             ("dense-over-T.sdpa", lambda: TemporalDense(C, h, c["T"], 7, sdpa=True))],
            (B, c["T"], C), lambda m, x: m(x, temporal=True))


def run_case(c: dict[str, Any], args: argparse.Namespace, env: dict[str, Any]) -> list[dict[str, Any]]:
    import torch

    import gatx

    make_gatx, officials, shape, call = systems_of(c)
    case, setting = describe(c)
    module = type(make_gatx(None)).__name__
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.randn(*shape, generator=gen).to(args.device).requires_grad_(True)
    torch.manual_seed(args.seed)
    state = {n: t.detach().clone() for n, t in make_gatx(None).state_dict().items()}
    if c["group"] == "temporal":  # non-zero tables, so a wrong bias index would show
        state["temporal_position_bias_table"] = torch.randn(state["temporal_position_bias_table"].shape, generator=gen)

    def gatx_mod(backend: str) -> Any:
        m = make_gatx(backend).to(args.device)
        m.load_state_dict(state)
        return m

    ref, default, gout = None, None, None
    for backend in gatx.ops.BACKENDS:  # the default backend = the first that runs (what backend=None picks)
        try:
            m = gatx_mod(backend)
            with torch.no_grad():
                out = call(m, x)
        except gatx.ops.BackendUnavailable:
            continue
        gout = torch.randn(out.shape, generator=gen).to(args.device)
        out = fwd_bwd(lambda: call(m, x), gout, [x, *m.parameters()])
        ref = {"out": out.detach(), "x": x.grad.detach().clone()}
        ref |= {n: p.grad.detach().clone() for n, p in m.named_parameters() if p.grad is not None and n not in ZERO_GRADS}
        default = backend
        break
    assert ref is not None, "the torch backend runs every input"
    base = {"bench": BENCH, "case": case, "group": c["group"], "module": module, "setting": setting,
            "device": env["device"], "threads": env["threads"], "reference": f"gatx.{module}[{default}]",
            "default_backend": default, **{k: v for k, v in c.items() if k != "group"}}
    log(f"{case}: {LABELS[c['group']]}, {setting}, B={c['B']}; gatx default backend {default}")

    def build_gatx(backend: str) -> Callable[[], tuple[Callable[[], Any], dict[str, Any]]]:
        def build() -> tuple[Callable[[], Any], dict[str, Any]]:
            m = gatx_mod(backend)
            return (lambda: call(m, x)), {n: p for n, p in m.named_parameters() if n in ref} | {"x": x}
        return build

    def build_official(make: Callable[[], Any]) -> Callable[[], tuple[Callable[[], Any], dict[str, Any]]]:
        def build() -> tuple[Callable[[], Any], dict[str, Any]]:
            m = make().to(args.device)
            m.load_state_dict(state, strict=True)  # the official parameter names, the same weights
            return (lambda: m(x)), {n: p for n, p in m.named_parameters() if n in ref} | {"x": x}
        return build

    backends = [default] + ([b for b in gatx.ops.BACKENDS if b != default] if args.all_backends else [])
    systems = [(f"gatx.{module}[{b}]", b, build_gatx(b)) for b in backends]
    systems += [(name, "torch", build_official(make)) for name, make in officials]
    rows: list[dict[str, Any]] = []
    for name, backend, build in systems:
        rows += check_and_time(dict(base, system=name, backend=backend), build, ref, gout, args)
    if c["group"] == "routing":
        rows = add_build_share(rows, gatx_mod(default), x, c, args)
    return rows


def add_build_share(rows: list[dict[str, Any]], m: Any, x: Any, c: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Time the routed graph's build (and the top-k routing) alone; add them and their share of the
    gatx layer's time to its rows."""
    import torch

    from gatx.vision import routed_region_graph

    with torch.no_grad():
        q, k, _ = m.qkv(x)
        idx = m.routes(q, k)
    build = measure(lambda: routed_region_graph(idx, (c["side"], c["side"]), c["n_win"]), args.device,
                    args.warmup, max(args.reps, 5), args.budget)["median_ms"]
    route = measure(lambda: m.routes(q, k), args.device, args.warmup, max(args.reps, 5), args.budget)["median_ms"]
    for r in rows:
        if r["system"].startswith("gatx.") and r["status"] == "ok":
            r.update(graph_build_ms=build, routing_ms=route, graph_build_share=build / r["median_ms"])
            if r["mode"] == "fwd+bwd" and r["backend"] == r["default_backend"]:
                log(f"  graph build {build:.2f} ms = {100 * build / r['median_ms']:.1f} % of gatx's fwd+bwd "
                    f"(top-k routing {route:.2f} ms)")
    return rows


def run_family(args: argparse.Namespace, groups: tuple[str, ...] = GROUPS) -> list[dict[str, Any]]:
    """Rows of every case of ``args``' mode (``args.tiny`` / ``args.quick``): what bench_vision.py calls."""
    import gc

    env = environment(args.device)
    cases = configs("tiny" if args.tiny else "quick" if args.quick else "full", groups)
    rows: list[dict[str, Any]] = []
    weights = [{"outlook": 2.0, "routing": 3.0, "acmix": 4.0, "temporal": 2.0}[c["group"]] for c in cases]  # ~ seconds
    for c in progress(cases, weights, "bench_vision_family case"):
        rows += run_case(c, args, env)
        gc.collect()
    return rows


# ---------------------------------------------------------------------------------- report
def markdown_section(rows: list[dict[str, Any]]) -> list[str]:
    """The markdown table of this benchmark's rows: per case and official formulation, gatx / official."""
    rows = [r for r in rows if r.get("bench") == BENCH]
    ok = {(r["case"], r["system"], r["mode"]): r for r in rows if r["status"] == "ok"}
    cases = list(dict.fromkeys(r["case"] for r in rows))
    out = ["## Vision attention family vs the official formulations", "",
           "Each official formulation is written from its definition and loads the gatx module's weights; "
           "both are checked against gatx (default backend) before timing. Ratios are gatx / official from "
           "the same run, median (min in parentheses): **below 1, gatx is faster or uses less memory**. "
           "Peak memory: forward + backward, above the inputs.", ""]
    head = ["module", "setting", "B", "gatx [backend]", "fwd+bwd ms", "peak MiB", "official formulation", "fwd+bwd ms",
            "peak MiB", "time gatx/official fwd+bwd", "fwd", "peak mem gatx/official", "note"]
    body, slower = [], []
    fmt = lambda v: "-" if v is None else f"{v:.0f}" if v >= 100 else f"{v:.1f}" if v >= 10 else f"{v:.2f}"  # noqa: E731
    ratio = lambda a, b: "-" if a is None or b is None or not b else f"{a / b:.2f}"  # noqa: E731
    for case in cases:
        gx = [r for r in rows if r["case"] == case and r["system"].startswith("gatx.") and r["mode"] == "fwd+bwd"
              and r["status"] == "ok" and r["backend"] == r["default_backend"]]
        if not gx:
            continue
        g = gx[0]
        gf = ok.get((case, g["system"], "fwd"))
        note = ""
        if "graph_build_ms" in g:
            note = f"graph build {g['graph_build_ms']:.1f} ms = {100 * g['graph_build_share']:.1f} % of gatx fwd+bwd"
        for o in dict.fromkeys(r["system"] for r in rows if r["case"] == case and not r["system"].startswith("gatx.")):
            ob, of = ok.get((case, o, "fwd+bwd")), ok.get((case, o, "fwd"))
            if ob is None:
                continue
            t = f"{ratio(g['median_ms'], ob['median_ms'])} ({ratio(g['min_ms'], ob['min_ms'])})"
            f = "-" if gf is None or of is None else ratio(gf["median_ms"], of["median_ms"])
            if g["median_ms"] > ob["median_ms"]:
                slower.append(f"{case} vs {o} ({g['median_ms'] / ob['median_ms']:.2f}x)")
            body.append([LABELS[g["group"]], g["setting"], str(g["B"]), f"{g['module']} [{g['backend']}]",
                         fmt(g["median_ms"]), fmt(g.get("peak_mem_mib")), o, fmt(ob["median_ms"]), fmt(ob.get("peak_mem_mib")),
                         t, f, ratio(g.get("peak_mem_mib"), ob.get("peak_mem_mib")), note])
    out += ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in body]
    out += ["", "- gatx slower (fwd+bwd median) than: " + ("; ".join(slower) if slower else "none of the formulations"), ""]
    return out


# ---------------------------------------------------------------------------------- script
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="the paper sizes, few repetitions (CPU: about 2 minutes)")
    size.add_argument("--tiny", action="store_true", help="seconds: tiny sizes, one repetition (for tests)")
    p.add_argument("--only", default=",".join(GROUPS), help=f"comma-separated groups out of {','.join(GROUPS)}")
    p.add_argument("--device", default="cpu")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first (default: tiny 1, quick 1, full 2)")
    p.add_argument("--reps", type=int, default=None, help="timed calls, median reported (default: tiny 1, quick 5, full 10)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds per timing phase before stopping early, >= 3 reps (default: tiny 0.5, quick 1, full 10)")
    p.add_argument("--all-backends", action="store_true", help="time gatx on every backend that runs, not only the default")
    p.add_argument("--tol", type=float, default=1e-3, help="largest relative difference to gatx before a system is timed")
    p.add_argument("--seed", type=int, default=0)
    where = p.add_mutually_exclusive_group()
    where.add_argument("--out-dir", default=None,
                       help="folder for results.json and results.md (default: runs/benchmarks/vision-family-<mode>-<time>/)")
    where.add_argument("--json", default=None, help="write only the JSON rows to this file ('-': stdout), as bench_vision.py")
    args = p.parse_args(argv)
    groups = tuple(g.strip() for g in args.only.split(",") if g.strip())
    bad = [g for g in groups if g not in GROUPS]
    if bad or not groups:
        p.error(f"--only takes groups out of {','.join(GROUPS)}, got {args.only!r}")
    args.groups = groups
    args.mode = "tiny" if args.tiny else "quick" if args.quick else "full"
    warmup, reps, budget = {"tiny": (1, 1, 0.5), "quick": (1, 5, 1.0), "full": (2, 10, 10.0)}[args.mode]
    args.warmup = warmup if args.warmup is None else args.warmup
    args.reps = reps if args.reps is None else args.reps
    args.budget = budget if args.budget is None else args.budget
    if args.json is None and args.out_dir is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        args.out_dir = str(HERE.parent / "runs" / "benchmarks" / f"vision-family-{args.mode}-{args.device.replace(':', '')}-{stamp}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if cuda_missing(args.device):
        return 2
    t0, load_start = time.perf_counter(), load_average()
    env = environment(args.device)
    log(f"bench_vision_family on {env['device']}, {env['threads']} threads, torch {env['torch']}, load average {load_start}")
    rows = run_family(args, args.groups)
    env["load_avg_1min_end"] = load_average()
    log(f"load average at the end: {env['load_avg_1min_end']}")
    if args.json is not None:
        write_json(args.json, env, rows)
        return 0
    from report import busy_note, write_markdown

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/bench_vision_family.py" + (f" --{args.mode}" if args.mode != "full" else "")
    payload = {"env": env, "mode": args.mode, "command": command, "seconds": round(time.perf_counter() - t0, 1), "rows": rows}
    (out / "results.json").write_text(json.dumps(payload, indent=1))
    write_markdown(payload, out / "results.md")
    log(f"wrote results.json, results.md to {out} in {payload['seconds']} s")
    note = busy_note(env)
    if note:
        log("note: " + note)
    return 0


if __name__ == "__main__":
    allocator("reuse")
    sys.exit(main())
