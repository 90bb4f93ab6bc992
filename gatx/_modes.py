"""Inference mode and gatx's cached index tensors.

Tensors made under ``torch.inference_mode()`` are *inference tensors*: they carry no version counter
and autograd refuses to save them for a backward pass. gatx caches index tensors (a graph's CSR,
in-degrees, the grid graphs of the vision builders) and reuses them in later calls, which may train.
So whatever gatx builds to keep is built with inference mode off (:func:`outside_inference`), and
index tensors that arrive as inference tensors are copied once into normal ones (:func:`normal`).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, TypeVar

import torch
from torch import Tensor

F = TypeVar("F", bound=Callable[..., Any])


def outside_inference(fn: F) -> F:
    """``fn`` run with inference mode off, so the tensors it makes are normal tensors (a no-op outside
    inference mode and while ``torch.compile`` traces)."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling() or not torch.is_inference_mode_enabled():
            return fn(*args, **kwargs)
        with torch.inference_mode(False):
            return fn(*args, **kwargs)

    return run  # type: ignore[return-value]


def has_version(t: Tensor) -> bool:
    """Whether ``t`` carries a version counter (not an inference tensor). True while ``torch.compile``
    traces: Dynamo cannot ask, and inference mode and compile do not mix."""
    return torch.compiler.is_compiling() or not t.is_inference()


def normal(t: Tensor) -> Tensor:
    """``t``, or a normal copy of it when it is an inference tensor (call with inference mode off)."""
    return t if has_version(t) else t.clone()


def version(t: Tensor) -> int | None:
    """``t._version``, or None for an inference tensor (it has no version counter)."""
    return t._version if has_version(t) else None
