"""The triton backend, proven without a GPU and checked on one where there is one.

Triton's interpreter (``TRITON_INTERPRET=1``, read when triton is first imported) runs the kernels on
CPU tensors. The checks run in one subprocess (this file run as a script, under the interpreter)
against the ``torch`` backend: outputs, returned attention and the gradient of every input, in
float64 (to rounding) and float32, for additive, dot and given scores, every bias / edge_weight
shape, rows crossing a block boundary, a hub row of 3000 in-edges, empty rows, E = 0, duplicate
edges, rows whose scores are all -inf, half precision, and the dropout mask of the fused and torch
backends under the same seed. The pytest process only reads the results, so the tests are not
affected by whether triton was already imported here. Where ``torch.cuda.is_available()``, the same
script runs again on the GPU (``--cuda``: compiled kernels, the torch backend on the GPU as the
reference) and every check below is asserted on that run too.

Also: without the interpreter, CPU inputs never dispatch to triton and ``import gatx`` does not
import triton; the kernels compile for a CUDA GPU (sm_80 cubin) on this CPU-only machine; and the
GAT benchmark runs its ``gatx[triton]`` system under the interpreter.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# name: (graph, score, dtype, bias, edge_weight, extra); bias "EH" / "E1"; weight "E" / "E1" / "EH"
CASES = {
    "additive-f64": ("mixed", "additive", "float64", "EH", "E", {}),
    "dot-f64": ("mixed", "dot", "float64", "E1", "EH", {}),
    "given-f64": ("mixed", "given", "float64", "EH", "E1", {"scale": 0.7}),
    "additive-f32": ("mixed", "additive", "float32", None, "EH", {}),
    "dot-f32-no-attention": ("mixed", "dot", "float32", "EH", None, {"attn": False}),
    "given-f32": ("mixed", "given", "float32", "E1", "E", {}),
    "dot-f64-some-grads": ("mixed", "dot", "float64", "EH", "E", {"grads": "k,bias", "dk": 4, "dv": 3}),
    "additive-f64-attention-loss-only": ("mixed", "additive", "float64", "EH", None, {"out_loss": False}),
    "additive-f64-hub": ("hub", "additive", "float64", "EH", "E", {"spread": 6.0}),
    "dot-f32-hub": ("hub", "dot", "float32", None, None, {"attn": False}),
    "dot-f64-empty-graph": ("empty", "dot", "float64", "EH", "E", {}),
    "given-f64-masked-rows": ("mixed", "given", "float64", "masked", None, {}),
    "dot-f32-dropout": ("mixed", "dot", "float32", "EH", "E", {"dropout": 0.4}),
}


def _triton_missing() -> bool:
    return importlib.util.find_spec("triton") is None


def _run(args: list[str], interpret: bool, timeout: int) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""))
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


# ------------------------------------------------------------------ the tests (read the script's results)
pytestmark = pytest.mark.skipif(_triton_missing(), reason="triton is not installed (pip install 'gatx[triton]')")


# Triton's interpreter before 3.7 converts a loaded index with int() on a 1-element array, which NumPy
# 2.5 refuses (seen with triton 3.6.0 and numpy 2.5.2): every kernel whose loop bounds are loaded fails.
_OLD_INTERPRETER = "only 0-dimensional arrays can be converted to Python scalars"


def _skip_if_interpreter_cannot_index(text: str) -> None:
    """Skip, naming the versions, when ``text`` (a failed run's stderr, a skipped row's reason) shows it."""
    if _OLD_INTERPRETER in text:
        import numpy
        import triton

        pytest.skip(f"triton {triton.__version__}'s interpreter cannot run with numpy {numpy.__version__} "
                    f"({_OLD_INTERPRETER!r}); a newer triton runs these checks")


def _no_cuda() -> bool:
    import torch

    return not torch.cuda.is_available()


@pytest.fixture(scope="module", params=["interpreter", pytest.param("cuda", marks=pytest.mark.skipif(
    _no_cuda(), reason="no CUDA GPU: the same checks run on real hardware where torch.cuda.is_available()"))])
def checks(request) -> dict:
    """The script's results: on CPU tensors under the interpreter, and on a CUDA GPU where there is one
    (compiled kernels, no interpreter; the reference is the torch backend on the same GPU)."""
    cuda = request.param == "cuda"
    proc = _run([__file__, "--cuda"] if cuda else [__file__], interpret=not cuda, timeout=600)
    if proc.returncode != 0:
        _skip_if_interpreter_cannot_index(proc.stderr)
    assert proc.returncode == 0, f"the {request.param} checks failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", list(CASES))
def test_matches_torch_backend(checks, name):
    assert name not in checks["errors"], checks["errors"].get(name)
    res = checks["cases"][name]
    tol = 1e-12 if "f64" in name else 5e-5  # float32: two summation orders over up to 3000 terms
    bad = {k: d for k, d in res["diffs"].items() if not d <= tol}
    assert not bad, f"{name}: relative differences above {tol:g}: {bad}"
    assert res["finite"], f"{name}: non-finite output"
    assert res["grads"] and res["grads"] == res["ref_grads"], f"{name}: gradients of {res['grads']}, torch gives {res['ref_grads']}"


def test_dropout_mask_is_the_torch_and_fused_mask(checks):
    res = checks["cases"]["dot-f32-dropout"]
    assert res["dropped"] > 0, "no attention weight was dropped at p=0.4"
    assert res["mask_equals_torch"], "the triton dropout mask differs from F.dropout's under the same seed"
    assert res["mask_equals_fused"] in (True, None), "the triton dropout mask differs from the fused backend's"


def test_half_precision_accumulates_in_float32(checks):
    """3000 terms summed in the half type would be off by many ulps; float32 accumulation is within ~1."""
    for dtype, res in checks["half"].items():
        assert res["dtype"] == dtype, f"output dtype {res['dtype']} for {dtype} inputs"
        assert res["out_ulps"] <= 1.0, f"{dtype}: output off by {res['out_ulps']:.2f} ulps from float64"
        assert res["dv"] <= (2e-3 if dtype == "torch.float16" else 1.6e-2), f"{dtype}: dv relative diff {res['dv']:.3g}"


def test_reasons_under_the_interpreter(checks):
    if checks["device"] != "cpu":
        pytest.skip("the interpreter's dispatch (the cuda run checks its own in test_cuda_inputs_run_on_triton)")
    d = checks["dispatch"]
    assert d["interpreted"] and d["ok"] == [], d["ok"]
    assert d["chosen"] == "triton", f"backend=None picked {d['chosen']} for a CPU input under the interpreter"
    assert any("only sparse_attention" in r for r in d["other_op"]), d["other_op"]
    assert any("floating-point" in r for r in d["int_weight"]), d["int_weight"]
    assert any("one dtype" in r for r in d["mixed_dtypes"]), d["mixed_dtypes"]
    assert any("registers" in r for r in d["big_tile"]), d["big_tile"]
    assert any("bias of shape" in r for r in d["bad_bias"]), d["bad_bias"]


def test_cuda_inputs_run_on_triton(checks):
    if checks["device"] != "cuda":
        pytest.skip("needs the run on a CUDA GPU")
    d = checks["dispatch"]
    assert not d["interpreted"] and d["ok"] == [], d
    assert d["chosen"] == "triton" and d["out_device"].startswith("cuda"), d


def test_cpu_never_dispatches_to_triton_without_the_interpreter():
    code = (
        "import sys, torch, gatx\n"
        "from gatx import Graph, ops\n"
        "from gatx.backends import triton as tb\n"
        "assert 'triton' not in sys.modules, 'import gatx imported triton'\n"
        "g = Graph(torch.tensor([0, 1, 1]), torch.tensor([1, 0, 1]))\n"
        "q = torch.randn(2, 2, 4)\n"
        "mod = ops.select(None, g, q, q, q, op='sparse_attention', score='dot')\n"
        "ops.sparse_attention(g, q, q, q)\n"
        "why = tb.reasons(g, q, q, q, op='sparse_attention', score='dot')\n"
        "print(mod.NAME, 'triton' in sys.modules, why)\n"
        "assert mod.NAME != 'triton' and 'triton' not in sys.modules\n"
        "assert any('cuda' in r and 'TRITON_INTERPRET' in r for r in why), why\n"
        "try:\n"
        "    ops.sparse_attention(g, q, q, q, backend='triton')\n"
        "    raise SystemExit('a forced triton backend ran a CPU input without the interpreter')\n"
        "except ops.BackendUnavailable as err:\n"
        "    assert 'cuda' in str(err)\n"
    )
    proc = _run(["-c", code], interpret=False, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]


def test_kernels_compile_for_a_cuda_gpu():
    """The compiled path (not the interpreter): each kernel builds to an sm_80 cubin without a GPU."""
    proc = _run([__file__, "--compile"], interpret=False, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    built = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {b[0] for b in built} == {"fwd_kernel", "bwd_dst_kernel", "bwd_src_kernel"}
    assert all(b[3] > 1000 for b in built), built


def test_gat_benchmark_runs_the_triton_system(tmp_path):
    """benchmarks/bench_gat.py under the interpreter: gatx[triton] is checked against gatx[torch] and timed."""
    out = tmp_path / "gat.json"
    proc = _run([str(REPO / "benchmarks" / "bench_gat.py"), "--tiny", "--no-cora", "--sizes", "16", "--json", str(out)],
                interpret=True, timeout=300)
    if proc.returncode != 0:
        _skip_if_interpreter_cannot_index(proc.stderr)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [r for r in json.loads(out.read_text())["rows"] if r["system"] == "gatx[triton]"]
    _skip_if_interpreter_cannot_index(" ".join(r.get("reason", "") for r in rows))
    assert {r["mode"] for r in rows} == {"fwd", "fwd+bwd"}, rows
    for r in rows:
        assert r["status"] == "ok", r
        assert r["max_rel_diff"] <= 1e-5, r


# ------------------------------------------------------------------ the checks (run as a script)
def _graph(kind: str):
    import torch

    from gatx import Graph

    gen = torch.Generator().manual_seed(11)
    if kind == "mixed":  # 6 dst (dst 5 has no in-edge; dst 0 has 70, across a 64-edge block), 8 src (src 7 unused)
        dst = torch.cat([torch.zeros(70, dtype=torch.long), torch.randint(1, 5, (30,), generator=gen)])
        src = torch.randint(0, 7, (100,), generator=gen)  # 100 edges on 7 sources: many duplicates
        return Graph(src, dst, 8, 6)
    if kind == "hub":  # dst 0 has 3000 in-edges, dst 1 five, dst 2 none; each src has ~600 out-edges
        dst = torch.cat([torch.zeros(3000, dtype=torch.long), torch.ones(5, dtype=torch.long)])
        return Graph(torch.randint(0, 5, (3005,), generator=gen), dst, 5, 3)
    return Graph(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), 3, 4)


def _inputs(g, score: str, dtype, bias: str | None, weight: str | None, extra: dict):
    import torch

    gen = torch.Generator().manual_seed(5)
    H, Dk, Dv, E = 3, extra.get("dk", 5), extra.get("dv", 6), g.num_edges
    spread = extra.get("spread", 1.0)
    shape = {"dot": (H, Dk), "additive": (H,)}.get(score)
    q = spread * torch.randn(g.num_dst, *shape, generator=gen, dtype=dtype) if shape else None
    k = spread * torch.randn(g.num_src, *shape, generator=gen, dtype=dtype) if shape else None
    v = torch.randn(g.num_src, H, Dv, generator=gen, dtype=dtype)
    logits = 3 * torch.randn(E, H, generator=gen, dtype=dtype) if score == "given" else None
    b = None
    if bias in ("EH", "masked"):
        b = torch.randn(E, H, generator=gen, dtype=dtype)
    elif bias == "E1":
        b = torch.randn(E, 1, generator=gen, dtype=dtype)
    if bias == "masked":  # every score of dst 1 is -inf, and one head of dst 2
        b[g.dst == 1] = float("-inf")
        b[g.dst == 2, 0] = float("-inf")
    w = None
    if weight == "E":
        w = torch.rand(E, generator=gen, dtype=dtype)
    elif weight in ("E1", "EH"):
        w = torch.rand(E, 1 if weight == "E1" else H, generator=gen, dtype=dtype)
    return {"q": q, "k": k, "v": v, "logits": logits, "bias": b, "edge_weight": w}


def _forward_backward(backend: str, g, score: str, inputs: dict, extra: dict, seed: int = 0):
    """(out, attention, {name: grad}) for a random linear loss on the output and the attention."""
    import torch

    from gatx import ops

    want = extra.get("grads", "q,k,v,logits,bias,edge_weight").split(",")
    leaves = {n: (t.detach().clone().requires_grad_(n in want) if t is not None else None)
              for n, t in inputs.items()}
    attn = extra.get("attn", True)
    torch.manual_seed(seed)
    res = ops.sparse_attention(g, leaves["q"], leaves["k"], leaves["v"], score=score, logits=leaves["logits"],
                               scale=extra.get("scale"), bias=leaves["bias"], edge_weight=leaves["edge_weight"],
                               dropout_p=extra.get("dropout", 0.0), return_attention=attn, backend=backend)
    out, a = res if attn else (res, None)
    gen = torch.Generator().manual_seed(7)
    w_out = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out)  # out's dtype and device
    loss = (out * w_out).sum() if extra.get("out_loss", True) else 0
    if attn:
        loss = loss + (a * torch.randn(a.shape, generator=gen, dtype=torch.float64).to(a)).sum()
    if torch.is_tensor(loss) and loss.requires_grad:
        loss.backward()
    grads = {n: t.grad for n, t in leaves.items() if t is not None and t.requires_grad}
    return out, a, grads


def _diff(x, y) -> float:
    """max |x - y| / (1 + max |y|) over y's finite entries; inf if one is missing, the shapes differ or
    the non-finite entries differ."""
    import torch

    if x is None or y is None:
        return 0.0 if x is None and y is None else float("inf")
    if x.shape != y.shape:
        return float("inf")
    x, y = x.detach().double(), y.detach().double()
    fin = y.isfinite()
    if not torch.equal(x.isfinite(), fin) or not torch.equal(x[~fin].nan_to_num(), y[~fin].nan_to_num()):
        return float("inf")
    return float((x - y)[fin].abs().max() / (1.0 + y[fin].abs().max())) if fin.any() else 0.0


def _to(device: str, g, inputs: dict):
    """The graph and the inputs on ``device`` (drawn on the CPU, so every device sees the same values)."""
    return g.to(device), {n: (t.to(device) if t is not None else None) for n, t in inputs.items()}


def _check_case(name: str, device: str = "cpu") -> dict:
    import torch

    kind, score, dtype_name, bias, weight, extra = CASES[name]
    g, dtype = _graph(kind), getattr(torch, dtype_name)
    g, inputs = _to(device, g, _inputs(g, score, dtype, bias, weight, extra))
    got = _forward_backward("triton", g, score, inputs, extra)
    ref = _forward_backward("torch", g, score, inputs, extra)
    diffs = {"out": _diff(got[0], ref[0]), "attention": _diff(got[1], ref[1])}
    diffs |= {f"d{n}": _diff(got[2].get(n), ref[2].get(n)) for n in set(got[2]) | set(ref[2])}
    res = {"diffs": diffs, "finite": bool(got[0].isfinite().all())}
    res["grads"], res["ref_grads"] = ([n for n, t in sorted(r[2].items()) if t is not None] for r in (got, ref))
    if extra.get("dropout"):
        from gatx.ops import select

        fused = None
        try:  # the fused backend is CPU-only: on a GPU the mask is compared with the torch backend's only
            if device == "cpu":
                select("fused", g, *[inputs[n] for n in ("q", "k", "v")], op="sparse_attention", score=score)
                fused = _forward_backward("fused", g, score, inputs, extra)[1]
        except Exception:  # noqa: BLE001 - no C++ compiler: compare with the torch backend only
            pass
        res["dropped"] = int((got[1] == 0).sum())
        res["mask_equals_torch"] = bool(torch.equal(got[1] == 0, ref[1] == 0))
        res["mask_equals_fused"] = None if fused is None else bool(torch.equal(got[1] == 0, fused == 0))
    return res


def _check_half(device: str = "cpu") -> dict:
    """float16 / bfloat16 on the hub row: error against float64 on the same rounded inputs, in output ulps."""
    import torch

    g0, out = _graph("hub"), {}
    for dtype in (torch.float16, torch.bfloat16):
        g, inputs = _to(device, g0, _inputs(g0, "dot", dtype, "EH", None, {}))
        got = _forward_backward("triton", g, "dot", inputs, {"attn": False})
        ref = _forward_backward("torch", g, "dot", {n: t.double() if t is not None else None for n, t in inputs.items()},
                                {"attn": False})
        ulp = torch.finfo(dtype).eps * ref[0].abs().clamp_min(torch.finfo(dtype).tiny)
        out[str(dtype)] = {"out_ulps": float(((got[0].double() - ref[0]).abs() / ulp).max().detach()), "dtype": str(got[0].dtype),
                           "dv": _diff(got[2]["v"], ref[2]["v"])}
    return out


def _check_dispatch() -> dict:
    import torch

    from gatx import ops
    from gatx.backends import triton as tb

    g = _graph("mixed")
    q, k, v = torch.randn(6, 2, 4), torch.randn(8, 2, 4), torch.randn(8, 2, 4)
    why = lambda *t, **o: tb.reasons(g, *t, **{"op": "sparse_attention", "score": "dot", **o})  # noqa: E731
    return {
        "chosen": ops.select(None, g, q, k, v, op="sparse_attention", score="dot").NAME,
        "interpreted": tb.interpreted(),
        "other_op": tb.reasons(g, q, k, op="edge_softmax"),
        "int_weight": why(q, k, v, None, torch.ones(g.num_edges, dtype=torch.long), edge_weight=torch.ones(g.num_edges, dtype=torch.long)),
        "mixed_dtypes": why(q.double(), k, v),
        "big_tile": why(torch.randn(6, 8, 1024), torch.randn(8, 8, 1024), torch.randn(8, 8, 1024)),
        "bad_bias": why(q, k, v, bias=torch.randn(g.num_edges, 3)),
        "ok": why(q, k, v),
    }


def _check_cuda_dispatch() -> dict:
    """On a GPU (no interpreter): what ``backend=None`` picks for CUDA inputs, and the device it wrote."""
    import torch

    from gatx import ops
    from gatx.backends import triton as tb

    g = _graph("mixed").to("cuda")
    q, k, v = (torch.randn(n, 2, 4, device="cuda") for n in (6, 8, 8))
    out = ops.sparse_attention(g, q, k, v)
    return {"chosen": ops.select(None, g, q, k, v, op="sparse_attention", score="dot").NAME,
            "interpreted": tb.interpreted(), "out_device": str(out.device),
            "device_name": torch.cuda.get_device_name(), "ok": tb.reasons(g, q, k, v, op="sparse_attention", score="dot")}


def _main_checks(device: str = "cpu") -> None:
    results = {"cases": {}, "errors": {}, "device": device}
    for name in CASES:
        try:
            t0 = time.perf_counter()
            results["cases"][name] = _check_case(name, device)
            results["cases"][name]["seconds"] = round(time.perf_counter() - t0, 2)
        except Exception as err:  # noqa: BLE001 - reported per case
            results["errors"][name] = f"{type(err).__name__}: {err}"
    results["half"] = _check_half(device)
    results["dispatch"] = _check_dispatch() if device == "cpu" else _check_cuda_dispatch()
    print(json.dumps(results))


# ------------------------------------------------------------------ compile for a GPU (no device needed)
def _main_compile() -> None:
    """Compile each kernel to an sm_80 cubin (triton's bundled ptxas; no GPU or driver is used)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from gatx.backends import triton_kernels as K

    assert not K.INTERPRETED
    done = []
    for fn, mode, dt in [(K.fwd_kernel, 0, "bf16"), (K.fwd_kernel, 1, "fp32"), (K.bwd_dst_kernel, 1, "fp16"),
                         (K.bwd_src_kernel, 0, "fp64")]:
        acc = "fp64" if dt == "fp64" else "fp32"
        consts = dict(MODE=mode, HAS_BIAS=True, W_MODE=2, HAS_KEEP=True, WANT_ATTN=True, HAS_GA=True, WANT_DQ=True,
                      WANT_DB=True, WANT_DW=True, WANT_DK=True, WANT_DV=True, BLOCK_E=64, BLOCK_H=8,
                      BLOCK_DK=8 if mode == 1 else 1, BLOCK_DV=8)
        sig = {}
        for name in fn.arg_names:
            if name in consts:
                sig[name] = "constexpr"
            elif name in ("indptr", "nbr", "eids"):
                sig[name] = "*i64"
            elif name in ("H", "Dk", "Dv"):
                sig[name] = "i32"
            elif name in ("scale", "slope", "keep_scale"):
                sig[name] = "fp64"
            else:
                sig[name] = "*u8" if name == "keep_ptr" else "*" + (acc if name in ("lse_ptr", "delta_ptr") else dt)
        kernel = triton.compile(ASTSource(fn, sig, {n: v for n, v in consts.items() if n in fn.arg_names}),
                                target=GPUTarget("cuda", 80, 32), options={"enable_fp_fusion": True})
        done.append([fn.__name__, mode, dt, len(kernel.asm["cubin"])])
    print(json.dumps(done))


if __name__ == "__main__":
    if sys.argv[1:] == ["--compile"]:
        _main_compile()
    else:
        _main_checks("cuda" if sys.argv[1:] == ["--cuda"] else "cpu")
