"""One helper for the autograd Functions whose backward differentiates a recomputed (or kept) graph."""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor


def wanted_grads(out: Tensor, inputs: Sequence[Tensor | None], want: Sequence[bool], grad: Tensor,
                 **kw: Any) -> tuple[Tensor | None, ...]:
    """``torch.autograd.grad(out, ..., grad, **kw)`` with respect to the inputs whose ``want`` flag is set
    (a Function's ``needs_input_grad``), spread back to one entry per input: None where not wanted."""
    got = iter(torch.autograd.grad(out, [t for t, w in zip(inputs, want) if w], grad, **kw))
    return tuple(next(got) if w else None for w in want)
