"""``GATv2Conv``: dynamic graph attention, drop-in compatible with ``dgl.nn.GATv2Conv``."""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from ..backends import fused
from ._inputs import (
    check_edge_feat, check_zero_in_degree, fold, layer_inputs, store_layer_args,
)
from .._amp import autocast_off
from .._grad import wanted_grads
from ._utils import _diag_blocks, flat, head_blocks, linear, small_product


def _on_kernel(*tensors: Tensor | None) -> bool:
    """Whether the fused CPU library runs GATv2's score for these inputs (float32 / float64 on the CPU, one
    dtype, the library built and loaded)."""
    given = [t for t in tensors if t is not None]
    dtypes = {t.dtype for t in given}
    return (all(t.device.type == "cpu" for t in given) and len(dtypes) == 1 and dtypes <= set(fused._DTYPES)
            and fused.availability() is None)


def _written_score(graph: Any, fs: Tensor, fd: Tensor, attn: Tensor, ee: Tensor | None,
                   slope: float) -> tuple[tuple[Tensor | None, ...], Tensor]:
    """GATv2's (E, H) scores written out in differentiable torch ops, for a backward that builds a graph:
    (fresh aliases of (fs, fd, attn, ee), the scores from them). fd may be a slice of fs (shared weights):
    through the aliases each input's gradient counts its own uses only."""
    inputs = tuple(t.view_as(t) if t is not None else None for t in (fs, fd, attn, ee))
    fs, fd, attn, ee = inputs
    return inputs, (F.leaky_relu(ops.gat_score(graph, fs, fd, ee, backend="torch"), slope) * attn).sum(-1)


class _NodeScore(torch.autograd.Function):
    """GATv2's per-edge scores ``(leaky_relu(fs[src] + fd[dst] (+ ee)) * attn).sum(-1)`` (E, H) from the node
    rows and an optional per-edge term ``ee`` (E, H, D) (edge features), on the fused library
    (:func:`gatx.backends.fused.gat2_score`): no (E, H, D) pre-activations are made (written out, the sum,
    the LeakyReLU, the product and their gradients make five such tensors, 537 MB each at 100k nodes,
    2.1M edges, 8 x 8 heads); each pass gathers the other endpoint's row per edge (forward and fd's,
    attn's and ee's gradients over the CSR, fs's over the CSC). A backward that builds a graph
    (``create_graph=True``) differentiates the written-out form recomputed from the inputs."""

    @staticmethod
    def forward(ctx, fs: Tensor, fd: Tensor, attn: Tensor, ee: Tensor | None, slope: float, graph: Any) -> Tensor:
        ctx.save_for_backward(fs, fd, attn, ee)
        ctx.slope, ctx.graph = slope, graph
        return fused.gat2_score(graph, fs, fd, attn[0], slope, ee)

    @staticmethod
    def backward(ctx, g: Tensor):
        fs, fd, attn, ee = ctx.saved_tensors
        want = ctx.needs_input_grad[:4]
        if torch.is_grad_enabled():  # create_graph: a differentiable recomputation
            inputs, s = _written_score(ctx.graph, fs, fd, attn, ee, ctx.slope)
            return wanted_grads(s, inputs, want, g, create_graph=True) + (None, None)
        dfs, dfd, dattn, dee = fused.gat2_score(ctx.graph, fs, fd, attn[0], ctx.slope, ee, g, want)
        return dfs, dfd, dattn.unsqueeze(0) if dattn is not None else None, dee, None, None


class _FusedGAT2(torch.autograd.Function):
    """GATv2's score, softmax, attention dropout and aggregation in one kernel pass over the CSR, the score of
    each edge computed from the node rows as it is used (:func:`gatx.backends.fused.gat2_attention`), and
    the backward in one more such pass: neither the (E, H) scores nor their gradient is made, and each pass
    reads an edge's src row once (the score and the message are the same row). Saves the inputs, the output
    and the per-row log-sum-exp. A backward that builds a graph (``create_graph=True``)
    differentiates the written-out form recomputed from the inputs."""

    @staticmethod
    def forward(ctx, fs: Tensor, fd: Tensor, attn: Tensor, ee: Tensor | None, keep: Tensor | None, keep_scale: float,
                slope: float, graph: Any) -> Tensor:
        out, stat, _ = fused.gat2_attention(graph, fs, fd, attn[0], ee, slope, keep, keep_scale)
        ctx.save_for_backward(fs, fd, attn, ee, keep, stat, out)
        ctx.keep_scale, ctx.slope, ctx.graph = keep_scale, slope, graph
        return out

    @staticmethod
    def backward(ctx, g: Tensor):
        fs, fd, attn, ee, keep, stat, out = ctx.saved_tensors
        graph, slope, keep_scale = ctx.graph, ctx.slope, ctx.keep_scale
        want = ctx.needs_input_grad[:4]
        if torch.is_grad_enabled():  # create_graph: a differentiable recomputation
            inputs, s = _written_score(graph, fs, fd, attn, ee, slope)
            zq, zk = s.new_zeros((graph.num_dst, s.shape[1])), s.new_zeros((graph.num_src, s.shape[1]))
            o, _ = fused.reference(graph.src, graph.dst, graph.num_dst, zq, zk, inputs[0], s, None, keep, False, 1.0, 1.0,
                                   keep_scale)  # given scores: additive with zero node terms and slope 1
            return wanted_grads(o, inputs, want, g, create_graph=True) + (None,) * 4
        dfs, dfd, dattn, dee = fused.gat2_attention_backward(graph, fs, fd, attn[0], ee, slope, keep, keep_scale, stat,
                                                             out, g, want)
        return dfs, dfd, dattn.unsqueeze(0) if dattn is not None else None, dee, None, None, None, None


class _LeakyScore(torch.autograd.Function):
    """GATv2's per-edge scores ``(leaky_relu(pre) * attn).sum(-1)`` (E, H) for ``pre`` (E, H, D) and ``attn``
    (1, H, D), where :class:`_NodeScore` does not run (half precision, other devices and backends): the
    sum over D is one (E, H*D) x (H*D, H) product with ``attn``'s block-diagonal matrix, and the backward
    one product for pre's gradient (the LeakyReLU's backward in place on it) and a small one for attn's.
    Written out, the forward makes the (E, H, D) product before its sum and the backward two more. Saves
    what autograd would (pre, the LeakyReLU). A backward that builds a graph (``create_graph=True``)
    differentiates the written-out form recomputed from the inputs."""

    @staticmethod
    def forward(ctx, pre: Tensor, attn: Tensor, slope: float) -> Tensor:
        E, H, D = pre.shape
        dtype = torch.promote_types(pre.dtype, attn.dtype)  # the written-out product's dtype (autocast: float32)
        with autocast_off(pre.device.type):
            lr = F.leaky_relu(pre, slope).to(dtype).reshape(E, H * D)  # (E, H*D)
            s = lr @ head_blocks(attn.to(dtype))  # (E, H)
        ctx.save_for_backward(pre, attn, lr)
        ctx.slope = slope
        return s

    @staticmethod
    def backward(ctx, g: Tensor):
        pre, attn, lr = ctx.saved_tensors
        slope = ctx.slope
        E, H, D = pre.shape
        want = ctx.needs_input_grad[:2]
        if torch.is_grad_enabled():  # create_graph: a differentiable recomputation
            s = (F.leaky_relu(pre, slope) * attn).sum(-1)
            return wanted_grads(s, (pre, attn), want, g, create_graph=True) + (None,)
        g_pre = g_attn = None
        with autocast_off(pre.device.type):
            g = g.to(lr.dtype)
            if want[0]:
                g_lr = (g @ head_blocks(attn.to(lr.dtype)).t()).view(E, H, D)  # (E, H, D)
                g_pre = torch.ops.aten.leaky_relu_backward.grad_input(g_lr, pre, slope, False, grad_input=g_lr)
                g_pre = g_pre.to(pre.dtype)
            if want[1]:
                g_attn = _diag_blocks(small_product(g.t(), lr), H).to(attn.dtype)  # (1, H, D)
        return g_pre, g_attn, None


class GATv2Conv(nn.Module):
    r"""GATv2 layer from `How Attentive are Graph Attention Networks? <https://arxiv.org/abs/2105.14491>`_.

    Same constructor, parameter names and outputs as DGL's ``GATv2Conv``.

    .. math::
        e_{ij} = a^\top \mathrm{LeakyReLU}\big(W_s h_j + W_d h_i \;[+ W_e x_{ji}]\big),
        \qquad \alpha_{ij} = \mathrm{softmax}_{j \in \mathcal{N}(i)}(e_{ij}),
        \qquad h_i' = \sum_{j \in \mathcal{N}(i)} \alpha_{ij} W_s h_j \;[+ \mathrm{res}(h_i)]

    Args:
        in_feats: input width, or ``(src_width, dst_width)``.
        out_feats: D, output features per head.
        num_heads: H.
        feat_drop: input dropout (default 0). attn_drop: attention dropout (default 0).
        negative_slope: LeakyReLU slope (default 0.2).
        residual: residual connection (default False).
        activation: applied to the output (default None).
        allow_zero_in_degree: zeros instead of an error for nodes without in-edges (default False).
        bias: biases in ``fc_src``, ``fc_dst`` and ``res_fc`` (default True).
        share_weights: ``fc_dst`` is ``fc_src`` (default False).
        edge_feats: width of optional edge features added before the LeakyReLU (gatx extension).
        backend: ``None``, ``"dgl"`` or ``"torch"``. With ``None`` on float32 / float64 CPU inputs and the
            fused library available, the score, softmax, attention dropout and aggregation run as one
            kernel, each edge's vector score computed from the node rows (and the edge features' term)
            as it is used, with no (E, H, D) pre-activations and no (E, H) scores; its backward is one
            more pass. When a gradient is to come and the attention is returned (or torch asks for
            deterministic algorithms), the score is computed on its own, still from the node rows, and
            the rest is one ``sparse_attention`` call with the scores as given logits. Otherwise the
            chosen backend's ``gat_score`` / ``edge_softmax`` / ``aggregate``.

    Shapes:
        - input: ``feat`` (N, *, in_feats) dense, (N, in_feats) sparse, or a pair
          ``((N_src, *, ·), (N_dst, *, ·))``; ``edge_feat`` (E, edge_feats)
        - output: (N_dst, *, H, D), and attention (E, *, H, 1) if ``get_attention`` (each index of ``*``
          is an independent copy of the attention, as in GATConv; DGL's GATv2Conv takes (N, D_in) only)

    Raises:
        ZeroInDegreeError: (a ``ValueError``, and a ``dgl.DGLError`` when DGL is imported) for dst nodes
            without in-edges unless ``allow_zero_in_degree``.

    ``torch.compile(layer, fullgraph=True)`` works on CPU: while compiling, ``backend=None`` runs the
    torch backend's gather / scatter for the score (DGL's kernels cannot be traced) and the fused kernel's
    custom op for the rest, and the zero-in-degree check
    runs inside the compiled code and raises the same error.

    >>> import torch, gatx
    >>> g = gatx.Graph(torch.tensor([0, 1, 2]), torch.tensor([1, 2, 0]))
    >>> gatx.GATv2Conv(5, 4, num_heads=2)(g, torch.randn(3, 5)).shape
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
        share_weights: bool = False,
        edge_feats: int | None = None,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        num_heads, out_feats, edge_feats, feat_drop, attn_drop = store_layer_args(
            self, in_feats, out_feats, num_heads, feat_drop, attn_drop, allow_zero_in_degree, edge_feats, backend
        )
        hd = out_feats * num_heads
        self.fc_src = nn.Linear(self._in_src_feats, hd, bias=bias)
        if share_weights and not isinstance(in_feats, tuple):
            self.fc_dst = self.fc_src
        else:
            self.fc_dst = nn.Linear(self._in_dst_feats, hd, bias=bias)
        self.attn = nn.Parameter(torch.empty(1, num_heads, out_feats))
        if edge_feats is not None:
            self.fc_edge = nn.Linear(edge_feats, hd, bias=False)
        else:
            self.register_parameter("fc_edge", None)
        self.feat_drop = nn.Dropout(feat_drop)
        self.attn_drop = nn.Dropout(attn_drop)
        self.leaky_relu = nn.LeakyReLU(negative_slope)
        if residual:
            self.res_fc = nn.Linear(self._in_dst_feats, hd, bias=bias) if self._in_dst_feats != hd else nn.Identity()
        else:
            self.register_buffer("res_fc", None)
        self.activation = activation
        self.share_weights = share_weights
        self.bias = bias
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-normal weights (gain of ReLU) and zero biases, as DGL initialises them."""
        gain = nn.init.calculate_gain("relu")
        for lin in (self.fc_src, self.fc_dst, self.fc_edge, self.res_fc):
            if isinstance(lin, nn.Linear):
                nn.init.xavier_normal_(lin.weight, gain=gain)
                if lin.bias is not None:
                    nn.init.zeros_(lin.bias)
        nn.init.xavier_normal_(self.attn, gain=gain)

    def set_allow_zero_in_degree(self, set_value: bool) -> None:
        self._allow_zero_in_degree = set_value

    def forward(
        self,
        graph: Any,
        feat: Tensor | tuple[Tensor, Tensor],
        get_attention: bool = False,
        edge_feat: Tensor | None = None,
        backend: str | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        H, D = self._num_heads, self._out_feats
        backend = backend if backend is not None else self.backend
        g, h_src, h_dst, paired, prefix = layer_inputs(
            graph, feat, self._in_src_feats, self._in_dst_feats, self.feat_drop.p, self.training, self.attn
        )
        S = fold(prefix)  # (N, *, F) input: the * dimensions are folded into the heads, (N, S*H, D)
        feat_src = linear(self.fc_src, flat(h_src)).view(g.num_src, S * H, D)  # (N_src, S*H, D)
        if self.share_weights and not paired:
            feat_dst = feat_src[: g.num_dst]  # a block's dst nodes are its first src nodes
        else:
            feat_dst = linear(self.fc_dst, flat(h_dst)).view(g.num_dst, S * H, D)  # (N_dst, S*H, D)
        check_zero_in_degree(g, self._allow_zero_in_degree)

        ee = None
        if edge_feat is not None:
            check_edge_feat(self, edge_feat, g, self._edge_feats, self.attn)
            ee = self.fc_edge(edge_feat).view(g.num_edges, H, D).repeat(1, S, 1)  # (E, S*H, D)
        attn = self.attn.repeat(1, S, 1) if S != 1 else self.attn  # (1, S*H, D)
        slope = self.leaky_relu.negative_slope
        kernel = backend in (None, "fused") and not torch.compiler.is_compiling() and _on_kernel(feat_src, feat_dst, attn, ee)
        grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (feat_src, feat_dst, attn, ee))
        if kernel and (not grad or (not get_attention and not torch.are_deterministic_algorithms_enabled()
                                    and fused.gat2_fits(g.num_src, S * H * D, feat_src.dtype))):
            # score, softmax, attention dropout and aggregation in one kernel (without a gradient to come, the
            # forward alone, which also writes the attention when asked). With a gradient, when the attention is
            # returned, or torch asks for deterministic algorithms (this backward sums fs's gradient per
            # thread), the score and the attention run as two calls below.
            keep, keep_scale = fused.keep_mask(g.num_edges, S * H, self.attn_drop.p if self.training else 0.0)
            if grad:
                rst, a = _FusedGAT2.apply(feat_src, feat_dst, attn, ee, keep, keep_scale, slope, g), None
            else:
                rst, _, a = fused.gat2_attention(g, feat_src, feat_dst, attn[0], ee, slope, keep, keep_scale, get_attention)
        else:
            if kernel:
                s = _NodeScore.apply(feat_src, feat_dst, attn, ee, slope, g)  # (E, S*H): no (E, S*H, D) pre-activations
            else:
                pre = ops.gat_score(g, feat_src, feat_dst, ee, backend=backend)  # (E, S*H, D)
                if torch.compiler.is_compiling():  # Dynamo does not trace _LeakyScore's create_graph path (autograd.grad)
                    s = (F.leaky_relu(pre, slope) * attn).sum(-1)  # (E, S*H)
                else:
                    s = _LeakyScore.apply(pre, attn, slope)  # (E, S*H)
            # softmax, attention dropout and aggregation in one call: the fused kernel where it runs (the
            # given-logits score), else the backend's edge_softmax and aggregate, as written out
            res = ops.sparse_attention(g, None, None, feat_src, score="given", logits=s, dropout_p=self.attn_drop.p,
                                       training=self.training, return_attention=get_attention, backend=backend)
            rst, a = res if get_attention else (res, None)
        rst = rst.view(g.num_dst, *prefix, H, D)  # (N_dst, *, H, D)
        if self.res_fc is not None and rst.numel():  # no residual for 0 dst nodes, as DGL (PR 7894)
            rst = rst + linear(self.res_fc, flat(h_dst)).view(g.num_dst, *prefix, -1, D)
        if self.activation is not None:
            rst = self.activation(rst)
        return (rst, a.view(g.num_edges, *prefix, H, 1)) if get_attention else rst

    def extra_repr(self) -> str:
        s = f"in_feats={(self._in_src_feats, self._in_dst_feats)}, out_feats={self._out_feats}, num_heads={self._num_heads}"
        if self.share_weights:
            s += ", share_weights=True"
        if self._edge_feats is not None:
            s += f", edge_feats={self._edge_feats}"
        if self._allow_zero_in_degree:
            s += ", allow_zero_in_degree=True"
        if self.backend is not None:
            s += f", backend={self.backend!r}"
        return s
