"""Autocast queries that torch.compile can trace on every supported torch.

``torch.amp.is_autocast_available`` calls ``torch._C._is_autocast_available``, which Dynamo refuses to
trace on some torch releases (seen on 2.11: "Attempted to call function marked as skipped", which
breaks ``fullgraph=True``). CPU and CUDA always have autocast, so for them no call is made.
"""
from __future__ import annotations

import contextlib
from typing import Any

import torch

_ALWAYS = ("cpu", "cuda")


def autocast_available(device_type: str) -> bool:
    """Whether ``torch.autocast`` exists for this device type (CPU and CUDA: always)."""
    return device_type in _ALWAYS or torch.amp.is_autocast_available(device_type)


def autocast_off(device_type: str) -> Any:
    """A context with autocast disabled on ``device_type`` (a no-op where it has no autocast)."""
    return torch.autocast(device_type, enabled=False) if autocast_available(device_type) else contextlib.nullcontext()
