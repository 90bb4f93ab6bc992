"""gatx.ops.TableBias: a per-edge bias held as a table plus a row index, on every backend."""
import pytest
import torch

import gatx
from gatx.ops import TableBias
from tests.conftest import usable_backends


def _graph(n=7, extra=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    src = torch.cat([torch.arange(n), torch.randint(0, n, (extra,), generator=g)])
    dst = torch.cat([torch.arange(n), torch.randint(0, n, (extra,), generator=g)])
    return gatx.Graph(src, dst, n, n)


@pytest.mark.parametrize("backend", usable_backends(bias=torch.zeros(1, 1)))
@pytest.mark.parametrize("repeat,table_heads", [(1, 4), (2, 2), (1, 1), (4, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_table_bias_equals_its_per_edge_tensor(backend, repeat, table_heads, dtype):
    """Outputs and gradients (q, k, v, table) equal those of the per-edge tensor table[index].repeat(1, repeat)."""
    g = _graph()
    H, D = 4, 3
    torch.manual_seed(1)
    q, k, v = (torch.randn(g.num_dst, H, D, dtype=dtype, requires_grad=True) for _ in range(3))
    table = torch.randn(5, table_heads, dtype=dtype, requires_grad=True)
    index = torch.randint(0, 5, (g.num_edges,))
    per_edge = table[index].repeat(1, repeat)  # (E, repeat * Ht)
    if per_edge.shape[1] not in (1, H):
        pytest.skip("heads must be H or 1")
    outs = []
    for bias in (TableBias(table, index, repeat), per_edge):
        out = gatx.ops.sparse_attention(g, q, k, v, bias=bias, backend=backend)
        outs.append([out, *torch.autograd.grad(out.square().sum(), [q, k, v, table])])
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for a, b in zip(*outs):
        err = float((a - b).detach().abs().max())
        assert err < tol, f"{backend}: TableBias differs from its per-edge tensor by {err:.3g}"


def test_table_bias_per_edge_form():
    table = torch.arange(10.0).view(5, 2)
    bias = TableBias(table, torch.tensor([4, 0, 2]), repeat=3)
    assert bias.heads == 6 and bias.num_edges == 3
    assert torch.equal(bias.per_edge(), table[[4, 0, 2]].repeat(1, 3))
    assert "TableBias" in repr(bias)


@pytest.mark.parametrize("make,match", [
    (lambda: TableBias(torch.zeros(5), torch.zeros(3, dtype=torch.long)), "table must be a tensor of shape"),
    (lambda: TableBias(torch.zeros(5, 2), torch.zeros(3)), "int64 or int32"),
    (lambda: TableBias(torch.zeros(5, 2), torch.zeros(3, 1, dtype=torch.long)), "shape \\(E,\\)"),
    (lambda: TableBias(torch.zeros(5, 2), torch.tensor([0, 5])), r"in \[0, 5\)"),
    (lambda: TableBias(torch.zeros(5, 2), torch.tensor([-1, 2])), r"in \[0, 5\)"),
    (lambda: TableBias(torch.zeros(5, 2), torch.tensor([0]), repeat=0), "repeat must be an int >= 1"),
    (lambda: TableBias(torch.zeros(5, 2), torch.tensor([0]), repeat=True), "repeat must be an int >= 1"),
])
def test_table_bias_refuses_bad_parts(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_sparse_attention_refuses_a_table_bias_that_does_not_fit():
    g = _graph()
    q = k = v = torch.randn(g.num_dst, 4, 3)
    with pytest.raises(ValueError, match="one table row per edge"):
        gatx.ops.sparse_attention(g, q, k, v, bias=TableBias(torch.zeros(5, 4), torch.zeros(g.num_edges - 1, dtype=torch.long)))
    with pytest.raises(ValueError, match="H=4 or 1 heads"):
        gatx.ops.sparse_attention(g, q, k, v, bias=TableBias(torch.zeros(5, 2), torch.zeros(g.num_edges, dtype=torch.long)))
    with pytest.raises(ValueError, match="bias is torch.float64"):
        gatx.ops.sparse_attention(g, q, k, v, bias=TableBias(torch.zeros(5, 4, dtype=torch.float64),
                                                            torch.zeros(g.num_edges, dtype=torch.long)))
    with pytest.raises(ValueError, match="floating-point"):
        gatx.ops.sparse_attention(g, q, k, v, bias=TableBias(torch.zeros(5, 4, dtype=torch.long),
                                                            torch.zeros(g.num_edges, dtype=torch.long)))


def test_table_bias_under_autocast_is_cast_like_a_bias():
    """A float32 table meets bfloat16 projections under CPU autocast: cast like any other bias."""
    g = _graph()
    q = k = v = torch.randn(g.num_dst, 2, 4)
    table, index = torch.randn(3, 2), torch.randint(0, 3, (g.num_edges,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a = gatx.ops.sparse_attention(g, q, k, v, bias=TableBias(table, index), backend="torch")
        b = gatx.ops.sparse_attention(g, q, k, v, bias=table[index], backend="torch")
    assert a.dtype == torch.bfloat16 and torch.equal(a, b)
