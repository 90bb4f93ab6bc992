"""``GATConv``: the graph attention layer, drop-in compatible with ``dgl.nn.GATConv``."""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from ._inputs import (
    check_edge_feat, check_prob, check_zero_in_degree, fold, layer_inputs, store_layer_args,
)
from ._utils import dropout, flat, head_blocks, head_dropout_linear, is_sparse, linear, score_rows, scored_projection


def head_dot(feat: Tensor, attn: Tensor) -> Tensor:
    """(N, S*H) = ``(feat.view(N, S, H, D) * attn).sum(-1)`` for feat (N, S*H, D) and attn (1, H, D),
    as one GEMM with a block-diagonal (H*D, H) matrix: no (N, S*H, D) temporary, forward or backward
    (2x faster on CPU)."""
    H, D = attn.shape[1], attn.shape[2]
    return (feat.reshape(-1, H * D) @ head_blocks(attn)).view(feat.shape[0], feat.shape[1])  # (N*S, H) -> (N, S*H)


# Aggregate first (W (sum_j a_ij x_j) instead of sum_j a_ij (W x_j), per head): None decides by
# aggregates_first's cost rule; True / False force it where it can run, or not (tests, benchmarks).
AGGREGATE_FIRST: bool | None = None
# The rule's cost of a multiply-add in the fused kernel, in multiply-adds of a GEMM: fitted to GATConv
# fwd+bwd on sampled blocks and full graphs (float32, 2 threads, this 2-core CPU; see aggregates_first).
KERNEL_MAC_COST = 8.0


def aggregates_first(g: Any, x: Tensor, heads: int, out_feats: int, backend: str | None) -> bool:
    """Whether GATConv aggregates the input rows of a (dense, CPU, float32 / float64) ``x`` per head and
    projects the aggregates, instead of projecting every src row and aggregating the projections.

    Both give the same values (the projection is linear). Projecting first costs GEMMs over the N_src
    src rows (forward and the weight's gradient) of F x H*D each; aggregating first costs a kernel pass
    over the E edges of H*F per edge (forward and backward) and GEMMs over the N_dst dst rows only (plus
    the scores' F x 2H per src row). On a sampled block every src row has about one edge and N_src is
    ~10x N_dst, so aggregating first does several times less work; on a full graph (E >> N) projecting
    first does. Only for an ``x`` that needs no gradient (a model's input features): x's gradient would
    take a kernel pass that gathers a dst row's H x F gradient per edge, slower than its GEMM in every
    measured case.

    Measured (2 threads, float32, 8 heads; fwd+bwd, aggregating / projecting first): a layer-1 block
    (20k dst, fanout 10, 197k src, F=128) 0.50x with D=32, 1.4-1.7x with D=8 (the rule projects); 100k
    dst / 669k src 0.61x; fanout 25 (100k src) 0.76-0.82x, where the rule still projects (it errs that
    way); full graphs (in-degree 5-20) 1.9-5.9x (the rule projects). Over 20 block shapes (20k dst, fanout
    5-40, 30k-560k src rows, D 8-32, F 64-256, 4 or 8 heads) it picked the faster order in 18; the two
    misses project where aggregating took 0.87x and 0.93x (fanout 25 and 40 from a 100k-node graph).
    """
    if AGGREGATE_FIRST is False or backend not in (None, "fused") or torch.compiler.is_compiling():
        return False
    if (x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64) or x.dim() != 2 or x.requires_grad
            or torch.is_autocast_enabled("cpu")):
        return False
    from ..backends import fused

    if fused.availability() is not None:
        return False
    if AGGREGATE_FIRST:
        return True
    n_src, n_dst, E, F, H, D = g.num_src, g.num_dst, g.num_edges, x.shape[1], heads, out_feats
    project = 2 * n_src * F * H * D + KERNEL_MAC_COST * 2 * E * H * D  # forward + the weight's gradient
    aggregate = KERNEL_MAC_COST * 2 * E * H * F + 3 * n_dst * F * H * D + 2 * n_src * F * 2 * H
    return aggregate < project


class _HeadProjection(torch.autograd.Function):
    """(N, H, D) ``out[:, h] = agg[:, h] @ W_h.t()`` for aggregates (N, H, F) and a weight (H*D, F): one GEMM per
    head on the strided head slices, written in place (a batched product of the head-major transposes
    copies them: 20k x 8 x 128 aggregates, 2 threads, forward + backward 99 -> ~50 ms)."""

    @staticmethod
    def forward(ctx, agg: Tensor, weight: Tensor) -> Tensor:
        N, H = agg.shape[0], agg.shape[1]
        w = weight.view(H, -1, agg.shape[2])  # (H, D, F)
        out = agg.new_empty((N, H, w.shape[1]))
        for h in range(H):
            torch.mm(agg[:, h], w[h].t(), out=out[:, h])
        ctx.save_for_backward(agg, weight)
        return out

    @staticmethod
    def backward(ctx, g: Tensor):
        agg, weight = ctx.saved_tensors
        H = agg.shape[1]
        w = weight.view(H, -1, agg.shape[2])  # (H, D, F)
        g_agg = g_w = None
        if ctx.needs_input_grad[0]:
            g_agg = agg.new_empty(agg.shape)
            for h in range(H):
                torch.mm(g[:, h], w[h], out=g_agg[:, h])
        if ctx.needs_input_grad[1]:
            g_w = weight.new_zeros(w.shape)  # summed into (see small_product): no BLAS pass scaling it by 0
            for h in range(H):
                g_w[h].addmm_(g[:, h].t(), agg[:, h])
            g_w = g_w.view(weight.shape)
        return g_agg, g_w


def aggregated_projection(g: Any, x: Tensor, weight: Tensor, attn_l: Tensor, attn_r: Tensor,
                          **attention: Any) -> Tensor | tuple[Tensor, Tensor]:
    """GATConv's attention with the projection after the aggregation: per head h, ``W_h (sum_j a_ij x_j)``.

    The scores' node terms come from x directly (``el = x @ (W_h^T attn_l_h)`` per head, ``er`` alike
    for the dst rows), the fused kernel sums the (N_src, F) input rows per head with x as values shared
    by every head, and one GEMM per head projects the (N_dst, H, F) aggregates (:class:`_HeadProjection`):
    (N_dst, H, D), and the (E, H) attention when ``attention["return_attention"]``."""
    n_dst = g.num_dst
    el = x @ score_rows(attn_l, weight).t()  # (N_src, H)
    er = x[:n_dst] @ score_rows(attn_r, weight).t()  # (N_dst, H)
    res = ops.sparse_attention(g, er, el, x.unsqueeze(1), score="additive", **attention)
    agg, a = res if attention.get("return_attention") else (res, None)  # (N_dst, H, F)
    out = _HeadProjection.apply(agg, weight)  # (N_dst, H, D)
    return (out, a) if a is not None else out


def per_edge_heads(t: Tensor | None, heads: int, copies: int) -> Tensor | None:
    """A per-edge (E, H) tensor repeated for the S folded copies of the heads -> (E, S*H)."""
    if t is None or copies == 1 or not isinstance(t, Tensor) or t.dim() != 2 or t.shape[1] != heads:
        return t
    return t.repeat(1, copies)


class GATConv(nn.Module):
    r"""Graph attention layer from `Graph Attention Networks <https://arxiv.org/abs/1710.10903>`_.

    Same constructor, parameter names and outputs as DGL's ``GATConv`` (so
    ``layer.load_state_dict(dgl_layer.state_dict())`` works), running on gatx's sparse kernels.

    .. math::
        e_{ij} = \mathrm{LeakyReLU}\big(a_l^\top W h_j + a_r^\top W h_i \;[+ a_e^\top W_e x_{ji}]\big),
        \qquad \alpha_{ij} = \mathrm{softmax}_{j \in \mathcal{N}(i)}(e_{ij}),
        \qquad h_i' = \sum_{j \in \mathcal{N}(i)} \alpha_{ij} W h_j \;[+ \mathrm{res}(h_i)] + b

    per head, where :math:`j \to i` are the edges into :math:`i`.

    Args:
        in_feats: input width, or ``(src_width, dst_width)`` for bipartite input (then ``fc_src`` /
            ``fc_dst`` replace ``fc``).
        out_feats: D, output features per head.
        num_heads: H.
        feat_drop: dropout on the input features (default 0).
        attn_drop: dropout on the attention weights (default 0).
        negative_slope: LeakyReLU slope (default 0.2).
        residual: add a residual connection (default False).
        activation: applied to the output (default None).
        allow_zero_in_degree: give nodes without in-edges zeros instead of raising (default False).
        bias: learnable output bias (default True).
        edge_feats: width of optional edge features used in the score (gatx extension, like PyG's
            ``edge_dim``; default None).
        backend: ``None`` (fastest that can run), ``"fused"``, ``"dgl"`` or ``"torch"``.
        head_feat_drop: draw the ``feat_drop`` mask independently for every head, as the GAT authors'
            implementation does (each head drops its own copy of the input; keyword only, default
            False: one mask shared by all heads, as DGL and PyG). A residual branch gets its own mask.
            Training then costs H projections of width D instead of one of width H*D (sparse input
            stays sparse; dense input is masked per head).
        value_drop: dropout on the projected features :math:`W h_j` where they are aggregated, not
            where they are scored (the authors' implementation applies its input dropout rate there
            too; keyword only, default 0).

    Shapes:
        - input: ``feat`` (N, *, in_feats) dense, or (N, in_feats) sparse (COO / CSR), or a pair
          ``((N_src, *, src_width), (N_dst, *, dst_width))`` with the same ``*``; ``edge_weight`` (E,)
          (also (E, 1) or (E, H)); ``edge_feat`` (E, edge_feats). Features must have the dtype and device
          of the layer's parameters.
        - output: (N_dst, *, H, D), and attention (E, *, H, 1) if ``get_attention``. As in DGL, each
          index of ``*`` is an independent copy of the attention (it runs as ``S * H`` heads,
          ``S = prod(*)``); ``edge_weight`` and ``edge_feat`` are shared by all copies.

    Raises:
        ZeroInDegreeError: (a ``ValueError``; also a ``dgl.DGLError`` when DGL is imported) when a dst
            node has no in-edge and ``allow_zero_in_degree`` is False. With ``residual=True`` and no dst
            nodes the residual is skipped, as current DGL does.

    ``torch.compile(layer, fullgraph=True)`` works on CPU (the fused kernel runs as the custom op
    ``gatx::fused_attention2``; the zero-in-degree check runs inside the compiled code and raises the
    same error). A graph first used inside a compiled function gets its CSR / CSC built in the trace
    and cached on it, so the next call compiles once more; a graph already used eagerly compiles once.

    >>> import torch, gatx
    >>> g = gatx.Graph(torch.tensor([0, 1, 2, 0]), torch.tensor([1, 2, 0, 0]))
    >>> conv = gatx.GATConv(5, 4, num_heads=2)
    >>> conv(g, torch.randn(3, 5)).shape
    torch.Size([3, 2, 4])
    """

    def __init__(
        self,
        in_feats: int | tuple[int, int],
        out_feats: int,
        num_heads: int,
        feat_drop: float = 0.0,
        attn_drop: float = 0.0,
        negative_slope: float = 0.2,
        residual: bool = False,
        activation: Callable[[Tensor], Tensor] | None = None,
        allow_zero_in_degree: bool = False,
        bias: bool = True,
        edge_feats: int | None = None,
        backend: str | None = None,
        *,
        head_feat_drop: bool = False,
        value_drop: float = 0.0,
    ) -> None:
        super().__init__()
        num_heads, out_feats, edge_feats, feat_drop, attn_drop = store_layer_args(
            self, in_feats, out_feats, num_heads, feat_drop, attn_drop, allow_zero_in_degree, edge_feats, backend
        )
        self._negative_slope = negative_slope
        self.head_feat_drop = head_feat_drop
        self.value_drop = check_prob(value_drop, "value_drop")
        hd = out_feats * num_heads
        if isinstance(in_feats, tuple):
            self.fc_src = nn.Linear(self._in_src_feats, hd, bias=False)
            self.fc_dst = nn.Linear(self._in_dst_feats, hd, bias=False)
        else:
            self.fc = nn.Linear(self._in_src_feats, hd, bias=False)
        self.attn_l = nn.Parameter(torch.empty(1, num_heads, out_feats))
        self.attn_r = nn.Parameter(torch.empty(1, num_heads, out_feats))
        if edge_feats is not None:
            self.fc_edge = nn.Linear(edge_feats, hd, bias=False)
            self.attn_e = nn.Parameter(torch.empty(1, num_heads, out_feats))
        else:
            self.register_parameter("fc_edge", None)
            self.register_parameter("attn_e", None)
        self.feat_drop = nn.Dropout(feat_drop)
        self.attn_drop = nn.Dropout(attn_drop)
        self.leaky_relu = nn.LeakyReLU(negative_slope)
        self.has_linear_res = False
        self.has_explicit_bias = False
        if residual:
            if self._in_dst_feats != hd:
                self.res_fc = nn.Linear(self._in_dst_feats, hd, bias=bias)
                self.has_linear_res = True
            else:
                self.res_fc = nn.Identity()
        else:
            self.register_buffer("res_fc", None)
        if bias and not self.has_linear_res:
            self.bias = nn.Parameter(torch.empty(hd))
            self.has_explicit_bias = True
        else:
            self.register_buffer("bias", None)
        self.activation = activation
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-normal weights (gain of ReLU) and zero biases, as DGL initialises them."""
        gain = nn.init.calculate_gain("relu")
        for lin in (getattr(self, "fc", None), getattr(self, "fc_src", None), getattr(self, "fc_dst", None), self.fc_edge):
            if lin is not None:
                nn.init.xavier_normal_(lin.weight, gain=gain)
        for att in (self.attn_l, self.attn_r, self.attn_e):
            if att is not None:
                nn.init.xavier_normal_(att, gain=gain)
        if self.has_explicit_bias:
            nn.init.zeros_(self.bias)
        if isinstance(self.res_fc, nn.Linear):
            nn.init.xavier_normal_(self.res_fc.weight, gain=gain)
            if self.res_fc.bias is not None:
                nn.init.zeros_(self.res_fc.bias)

    def set_allow_zero_in_degree(self, set_value: bool) -> None:
        self._allow_zero_in_degree = set_value

    def forward(
        self,
        graph: Any,
        feat: Tensor | tuple[Tensor, Tensor],
        edge_weight: Tensor | None = None,
        get_attention: bool = False,
        edge_feat: Tensor | None = None,
        backend: str | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        H, D = self._num_heads, self._out_feats
        backend = backend if backend is not None else self.backend
        p = self.feat_drop.p
        g, h_src, h_dst, paired, prefix = layer_inputs(  # per-head masks are drawn in the projection below
            graph, feat, self._in_src_feats, self._in_dst_feats, 0.0 if self.head_feat_drop else p, self.training,
            self.attn_l,
        )
        S = fold(prefix)  # (N, *, F) input: the * dimensions are folded into the heads, (N, S*H, D)
        if self.head_feat_drop:
            def project(layer: nn.Linear, x: Tensor) -> Tensor:
                return head_dropout_linear(layer, flat(x), H, p, self.training)
        else:
            def project(layer: nn.Module, x: Tensor) -> Tensor:
                return linear(layer, flat(x))
        fast = not paired and S == 1 and not self.head_feat_drop and not is_sparse(h_src)
        if fast and not self.value_drop and aggregates_first(g, h_src, H, D, backend):
            check_zero_in_degree(g, self._allow_zero_in_degree)
            return self._finish(g, h_dst, prefix, get_attention, p, aggregated_projection(
                g, h_src, self.fc.weight, self.attn_l, self.attn_r, bias=self._edge_scores(g, edge_feat, H, S),
                negative_slope=self.leaky_relu.negative_slope, edge_weight=edge_weight, dropout_p=self.attn_drop.p,
                training=self.training, return_attention=get_attention, backend=backend,
            ), own_bias=False)
        if fast:  # one op for the projection and both score terms: fewer (N_src, H*D) buffers in backward
            feat, el, er = scored_projection(flat(h_src), self.fc.weight, self.attn_l, self.attn_r, g.num_dst)
            feat_src = feat.view(g.num_src, H, D)  # (N_src, H, D)
        elif paired:
            fc_src, fc_dst = (self.fc, self.fc) if hasattr(self, "fc") else (self.fc_src, self.fc_dst)
            feat_src = project(fc_src, h_src).view(g.num_src, S * H, D)  # (N_src, S*H, D)
            feat_dst = project(fc_dst, h_dst).view(g.num_dst, S * H, D)  # (N_dst, S*H, D)
        else:
            feat_src = project(self.fc, h_src).view(g.num_src, S * H, D)  # (N_src, S*H, D)
            feat_dst = feat_src[: g.num_dst]  # a block's dst nodes are its first src nodes
        check_zero_in_degree(g, self._allow_zero_in_degree)

        if not fast:
            el = head_dot(feat_src, self.attn_l)  # (N_src, S*H)
            er = head_dot(feat_dst, self.attn_r)  # (N_dst, S*H)
        ee = self._edge_scores(g, edge_feat, H, S)
        values = F.dropout(feat_src, self.value_drop, self.training) if self.value_drop else feat_src  # scores use feat_src
        # the bias goes into the op when nothing comes between (no residual, no * dimensions): the fused
        # kernel adds it as it writes the output and sums its gradient as it reads the output's gradient
        own_bias = self.has_explicit_bias and self.res_fc is None and S == 1
        res = ops.sparse_attention(
            g, er, el, values, score="additive", bias=ee, negative_slope=self.leaky_relu.negative_slope,
            edge_weight=per_edge_heads(edge_weight, H, S), dropout_p=self.attn_drop.p, training=self.training,
            return_attention=get_attention, backend=backend, out_bias=self.bias.view(H, D) if own_bias else None,
        )  # (N_dst, S*H, D), and (E, S*H) if get_attention
        return self._finish(g, h_dst, prefix, get_attention, p, res, own_bias)

    def _edge_scores(self, g: Any, edge_feat: Tensor | None, H: int, S: int) -> Tensor | None:
        """The edge features' score terms (E, S*H), or None without edge features."""
        if edge_feat is None:
            return None
        D = self._out_feats
        check_edge_feat(self, edge_feat, g, self._edge_feats, self.attn_l)
        return per_edge_heads(head_dot(self.fc_edge(edge_feat).view(g.num_edges, H, D), self.attn_e), H, S)  # (E, S*H)

    def _finish(self, g: Any, h_dst: Tensor, prefix: tuple[int, ...], get_attention: bool, p: float,
                res: Tensor | tuple[Tensor, Tensor], own_bias: bool) -> Tensor | tuple[Tensor, Tensor]:
        """The attention's result (N_dst, S*H, D) (and (E, S*H)) with the residual, bias and activation."""
        H, D = self._num_heads, self._out_feats
        rst, a = res if get_attention else (res, None)
        rst = rst.view(g.num_dst, *prefix, H, D)  # (N_dst, *, H, D)
        if self.res_fc is not None and rst.numel():  # no residual for 0 dst nodes, as DGL (PR 7894)
            h_res = dropout(h_dst, p, self.training) if self.head_feat_drop else h_dst
            rst = rst + linear(self.res_fc, flat(h_res)).view(g.num_dst, *prefix, -1, D)
        if self.has_explicit_bias and not own_bias:
            rst = rst + self.bias.view(H, D)
        if self.activation is not None:
            rst = self.activation(rst)
        return (rst, a.view(g.num_edges, *prefix, H, 1)) if get_attention else rst

    def extra_repr(self) -> str:
        s = f"in_feats={(self._in_src_feats, self._in_dst_feats)}, out_feats={self._out_feats}, num_heads={self._num_heads}"
        if self._negative_slope != 0.2:
            s += f", negative_slope={self._negative_slope}"
        if self._edge_feats is not None:
            s += f", edge_feats={self._edge_feats}"
        if self._allow_zero_in_degree:
            s += ", allow_zero_in_degree=True"
        if self.backend is not None:
            s += f", backend={self.backend!r}"
        if self.head_feat_drop:
            s += ", head_feat_drop=True"
        if self.value_drop:
            s += f", value_drop={self.value_drop}"
        return s

