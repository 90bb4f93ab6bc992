"""Markdown tables, a short reading with same-run ratios, and PNG plots from benchmark rows.

    python benchmarks/report.py benchmarks/results/results.json   # re-render .md and .png from JSON
"""
from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

def _ms(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.0f}" if v >= 100 else f"{v:.1f}" if v >= 10 else f"{v:.2f}"


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None or b == 0 else f"{a / b:.2f}x"


def _ordered(values: Iterable[Any]) -> list[Any]:
    out: list[Any] = []
    for v in values:
        if v not in out:
            out.append(v)
    return out


class Rows:
    """Index of rows: ok timings by (case, system, mode), plus case and system order."""

    def __init__(self, rows: list[dict[str, Any]], bench: str) -> None:
        self.rows = [r for r in rows if r.get("bench") == bench]
        self.ok = {(r["case"], r["system"], r["mode"]): r for r in self.rows if r["status"] == "ok"}
        self.cases = _ordered(r["case"] for r in self.rows if r["status"] == "ok")
        self.systems = _ordered(r["system"] for r in self.rows if r["status"] == "ok")  # timed at least once
        self.first = {}
        for r in self.rows:
            self.first.setdefault(r["case"], r)

    def t(self, case: str, system: str, mode: str) -> float | None:
        r = self.ok.get((case, system, mode))
        return None if r is None else r["median_ms"]

    def mem(self, case: str, system: str, mode: str) -> float | None:
        r = self.ok.get((case, system, mode))
        return None if r is None else r.get("peak_mem_mib")

    def best_gatx(self, case: str, mode: str) -> tuple[str | None, float | None]:
        cands = [(self.t(case, s, mode), s) for s in self.systems if s.startswith("gatx")]
        cands = [c for c in cands if c[0] is not None]
        return (min(cands)[1], min(cands)[0]) if cands else (None, None)


def _table(header: list[str], body: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"] + [
        "| " + " | ".join(r) + " |" for r in body
    ]


VISION_HEAD = ["map", "k", "C/heads", "variant"]


def _variant(r: dict[str, Any]) -> str:
    """A window row's shift and flush-to-zero setting; "-" for other rows."""
    if r.get("group") != "window" or r.get("shift") is None:
        return "-"
    ftz = r.get("flush_denormal")
    return f"shift {r['shift']}" + ("" if ftz is None else ", FTZ on" if ftz else ", FTZ off")


def _case_cols(idx: Rows, case: str, bench: str) -> list[str]:
    r = idx.first[case]
    if bench == "gat":
        return [r["case"], f"{r['nodes']:,}", f"{r['edges']:,}"]
    return [f"{r['map']}x{r['map']}", str(r["kernel"]), f"{r['dim']}/{r['heads']}", _variant(r)]


def _section(idx: Rows, bench: str, systems: list[str], cases: list[str]) -> list[str]:
    head = ["graph", "N", "E"] if bench == "gat" else VISION_HEAD
    out = []
    for mode, what in (("fwd+bwd", "forward + backward, median ms"), ("fwd", "forward (no_grad), median ms")):
        out += [f"**{what}**", ""]
        out += _table(head + systems, [_case_cols(idx, c, bench) + [_ms(idx.t(c, s, mode)) for s in systems] for c in cases])
        out.append("")
    out += ["**forward + backward, peak memory above inputs, MiB**", ""]
    out += _table(head + systems, [_case_cols(idx, c, bench) + [_ms(idx.mem(c, s, "fwd+bwd")) for s in systems] for c in cases])
    return out + [""]


def ratio_table(idx: Rows, bench: str) -> list[str]:
    """Time of each other system / time of the best gatx backend, per case, from the same run."""
    others = [s for s in idx.systems if not s.startswith("gatx")]
    head = (["graph", "N"] if bench == "gat" else VISION_HEAD) + ["best gatx (fwd+bwd / fwd)"] + others
    body = []
    for c in idx.cases:
        cols = _case_cols(idx, c, bench)[: 2 if bench == "gat" else 4]
        name_b, g_b = idx.best_gatx(c, "fwd+bwd")
        name_f, g_f = idx.best_gatx(c, "fwd")
        if g_b is None:
            continue
        best = f"{name_b.split('[')[-1].rstrip(']')} {_ms(g_b)} / {name_f.split('[')[-1].rstrip(']')} {_ms(g_f)} ms"
        cells = []
        for o in others:
            b, f = idx.t(c, o, "fwd+bwd"), idx.t(c, o, "fwd")
            cells.append("-" if b is None else f"{_ratio(b, g_b)} / {_ratio(f, g_f)}")
        body.append(cols + [best] + cells)
    return ["**time / best gatx time, fwd+bwd / fwd (same run; >1 means gatx is faster)**", ""] + _table(head, body) + [""]


def dense_reading(idx: Rows) -> list[str]:
    dense = [c for c in idx.cases if idx.t(c, "dense-masked", "fwd+bwd") is not None]
    if not dense:
        return []
    wins = [idx.first[c]["case"] for c in dense if idx.t(c, "dense-masked", "fwd+bwd") < idx.best_gatx(c, "fwd+bwd")[1]]
    return ["- Dense masked attention is faster than gatx (fwd+bwd) on " + (", ".join(wins) if wins else "none of the measured graphs")
            + "; above --dense-max-nodes it is not run (H x N x N scores)."]


def _checks_and_skips(rows: list[dict[str, Any]]) -> list[str]:
    out = ["## Checks (before timing, against the reference named in each row)", ""]
    worst: dict[tuple[str, str], list[float]] = {}
    for r in rows:
        if "max_rel_diff" in r and r["mode"] == "fwd+bwd":
            key = (r["bench"], r["system"])
            w = worst.setdefault(key, [0.0, 0.0, r.get("reference", "")])
            w[0], w[1] = max(w[0], r["max_abs_diff"]), max(w[1], r["max_rel_diff"])
    out += _table(["bench", "system", "reference", "max abs diff", "max rel diff"],
                  [[b, s, str(w[2]), f"{w[0]:.1e}", f"{w[1]:.1e}"] for (b, s), w in worst.items()])
    skipped: dict[tuple[str, str], list[str]] = defaultdict(list)
    for r in rows:
        if r["status"] != "ok" and r["mode"] in ("fwd+bwd", "*"):
            skipped[(r["system"], r["status"] + ": " + r.get("reason", ""))].append(r["case"])
    if skipped:
        out += ["", "## Not timed", ""]
        for (system, reason), cases in skipped.items():
            out.append(f"- {system} on {', '.join(cases)}: {reason}")
    return out + [""]


def busy_note(env: dict[str, Any]) -> str | None:
    """A warning when the 1-minute load average exceeded the core count at the start or the end of the
    run (other jobs competed for the cores, so the timings are unreliable); None otherwise."""
    cores = env.get("cpu_count")
    loads = {when: env.get(key) for when, key in (("start", "load_avg_1min"), ("end", "load_avg_1min_end"))}
    busy = [f"{load} at the {when}" for when, load in loads.items() if load is not None and cores and load > cores]
    if not busy:
        return None
    return (f"UNRELIABLE TIMINGS: the machine was busy (1-minute load average {' and '.join(busy)}, "
            f"above its {cores} cores); other jobs competed for the CPU, so absolute times are inflated "
            "and even same-run ratios can be off. Re-run on a quiet machine before quoting these numbers.")


def env_line(payload: dict[str, Any], short: bool = False) -> str:
    e = payload["env"]
    line = (f"{e.get('device', '?')} ({e.get('cpu_count')} cores visible, torch threads: {e.get('threads')}), "
            f"torch {e.get('torch')}, DGL {e.get('dgl')}, PyG {e.get('torch_geometric')}, gatx {e.get('gatx')}")
    if short:
        return line
    load = f"; 1-min load average {e.get('load_avg_1min')} at the start, {e.get('load_avg_1min_end')} at the end"
    return line + f" (backends {', '.join(e.get('gatx_backends', []))}), {e.get('time')}{load} ({e.get('cpu_count')} cores)"


def roofline_table(rows: list[dict[str, Any]]) -> list[str]:
    """Every timed row that carries bench_gat's roofline fields: its distance to the machine's limit."""
    timed = [r for r in rows if r.get("x_of_limit") is not None]
    if not timed:
        return []
    first = timed[0]
    out = ["**Distance to the machine's limit** (limit = minimum bytes / copy bandwidth + projection flops / "
           f"GEMM rate, both measured in this run: copy {first['copy_gbps']:.1f} GB/s; see bench_gat.py)", "",
           "| graph | system | mode | median ms | limit ms | x of the limit | achieved GB/s | achieved GFLOP/s |",
           "|---|---|---|---|---|---|---|---|"]
    for r in timed:
        out.append(f"| {r['case']} | {r['system']} | {r['mode']} | {_ms(r['median_ms'])} | {r['limit_ms']:.3g} | "
                   f"{r['x_of_limit']:.2f} | {r['achieved_gbps']:.2f} | {r['achieved_gflops']:.2f} |")
    return out + [""]


def write_markdown(payload: dict[str, Any], path: Path) -> None:
    rows = payload["rows"]
    out = ["# gatx benchmarks", "", f"Environment: {env_line(payload)}.", "",
           f"Command: `{payload['command']}` ({payload.get('mode')} mode, {payload.get('seconds')} s). "
           "Median wall time after warm-up; the device is synchronised before each clock read. "
           "Peak memory is the extra resident memory (CPU) or allocated memory (CUDA) while the "
           "system ran, above what its inputs already used. Wall-clock timings on a shared machine are noisy.", ""]
    note = busy_note(payload["env"])
    if note:
        out[2:2] = [f"> **{note.split(':')[0]}**:{note.split(':', 1)[1]}", ""]
    gat = Rows(rows, "gat")
    if gat.rows:
        out += ["## One GAT layer, 8 heads x 8 features", ""]
        out += _section(gat, "gat", [s for s in gat.systems], gat.cases)
        out += ratio_table(gat, "gat") + dense_reading(gat) + roofline_table(gat.rows) + [""]
    vis = Rows(rows, "vision")
    if vis.rows:
        out += ["## Local attention on image maps (B=2)", ""]
        for group in ("neighborhood", "neighborhood-op", "window"):
            cases = [c for c in vis.cases if vis.first[c].get("group") == group]
            systems = [s for s in vis.systems if any(r["system"] == s and r.get("group") == group for r in vis.rows)]
            if cases:
                out += [f"### {group} attention", ""] + _section(vis, "vision", systems, cases)
        for group in ("neighborhood", "neighborhood-op", "window"):
            sub = Rows([r for r in rows if r.get("group") == group], "vision")
            if sub.cases:
                out += [f"### {group} attention: ratios", ""] + ratio_table(sub, "vision")
    if any(r.get("bench") == "vision_family" for r in rows):  # outlook, routing, ACmix, temporal vs official
        from bench_vision_family import markdown_section

        out += markdown_section(rows)
    if any(r.get("bench") == "compile" for r in rows):  # torch.compile vs eager
        from bench_compile import markdown_section as compile_section

        out += compile_section(rows)
    out += _checks_and_skips(rows)
    path.write_text("\n".join(out))


# ---------------------------------------------------------------------------------- plots
def _stamp_busy(fig: Any, note: str | None) -> None:
    if note:
        fig.text(0.5, 0.5, "UNRELIABLE TIMINGS\n(busy machine)", ha="center", va="center", fontsize=28,
                 color="red", alpha=0.25, rotation=20, transform=fig.transFigure)
        fig.text(0.01, 0.005, note, fontsize=6.5, color="red", wrap=True, va="bottom")


def write_plots(payload: dict[str, Any], out_dir: Path) -> list[str]:
    """Write ``gat.png`` / ``vision.png`` for the benchmarks present in the rows; returns the file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    title_env = env_line(payload, short=True)
    note = busy_note(payload["env"])
    rows = payload["rows"]
    written = []
    gat = Rows(rows, "gat")
    if gat.ok:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        for ax, mode in zip(axes, ("fwd", "fwd+bwd")):
            for i, s in enumerate(gat.systems):
                pts = sorted((gat.first[c]["nodes"], gat.t(c, s, mode)) for c in gat.cases
                             if gat.first[c].get("graph") == "random" and gat.t(c, s, mode) is not None)
                color = f"C{i}"
                if pts:
                    ax.plot(*zip(*pts), marker="o", ms=4, color=color, label=s, ls="--" if s == "dense-masked" else "-")
                cora = [(gat.first[c]["nodes"], gat.t(c, s, mode)) for c in gat.cases if gat.first[c].get("graph") == "cora"]
                cora = [p for p in cora if p[1] is not None]
                if cora:
                    ax.plot(*zip(*cora), marker="*", ms=11, ls="none", color=color)
            ax.set(xscale="log", yscale="log", xlabel="nodes N (random graphs, in-degree 20; star = Cora)",
                   ylabel="median ms", title=f"GAT layer 8x8, {mode}")
            ax.grid(True, which="both", alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.suptitle(title_env, fontsize=8)
        fig.tight_layout(rect=(0, 0.05 if note else 0, 1, 1))
        _stamp_busy(fig, note)
        fig.savefig(out_dir / "gat.png", dpi=90)
        plt.close(fig)
        written.append("gat.png")
    vis = Rows(rows, "vision")
    if vis.ok:
        kernels = sorted({vis.first[c]["kernel"] for c in vis.cases})
        fig, axes = plt.subplots(2, len(kernels), figsize=(4.2 * len(kernels), 7), squeeze=False)
        for row, mode in enumerate(("fwd", "fwd+bwd")):
            for col, k in enumerate(kernels):
                ax = axes[row][col]
                sides = set()
                for i, s in enumerate(vis.systems):
                    pts = sorted((vis.first[c]["map"], vis.t(c, s, mode)) for c in vis.cases
                                 if vis.first[c]["kernel"] == k and vis.first[c]["stage"] == 1 and vis.t(c, s, mode) is not None)
                    if pts:
                        ax.plot(*zip(*pts), marker="o", ms=4, color=f"C{i}", label=s, ls="--" if "dense" in s else "-")
                        sides |= {p[0] for p in pts}
                ax.set(xscale="log", yscale="log", xlabel="map side, log scale (C=96, 3 heads, B=2)", ylabel="median ms",
                       title=f"kernel/window {k}, {mode}")
                ax.set_xticks(sorted(sides), [f"{m}x{m}" for m in sorted(sides)])
                ax.xaxis.set_minor_formatter(NullFormatter())
                ax.grid(True, which="both", alpha=0.3)
                if ax.get_legend_handles_labels()[0]:
                    ax.legend(fontsize=7)
        fig.suptitle(title_env, fontsize=8)
        fig.tight_layout(rect=(0, 0.05 if note else 0, 1, 1))
        _stamp_busy(fig, note)
        fig.savefig(out_dir / "vision.png", dpi=80)
        plt.close(fig)
        written.append("vision.png")
    return written


if __name__ == "__main__":
    src = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "results" / "results.json")
    try:
        data = json.loads(src.read_text())
    except (OSError, ValueError) as err:  # expected: a wrong path or a file that is not run.py's JSON
        sys.exit(f"error: cannot read benchmark results from {src}: {err}")
    write_markdown(data, src.with_name("results.md"))
    write_plots(data, src.parent)
    print(f"wrote {src.with_name('results.md')} and plots in {src.parent}")
