"""Memory layout helpers shared by the layers and the backends."""
from __future__ import annotations

from torch import Tensor


def side_by_side(*parts: Tensor | None) -> Tensor | None:
    """The (N, S) tensor whose consecutive column slices ``parts`` are, else None (also when a part is None).

    Each part has the same N >= 2 rows and dtype, each row contiguous; S is the sum of their row widths
    and every part starts where the previous one's row ends (e.g. ``[feat | el | er]`` of one product,
    or the fused backend's ``[dv | dk | dq]`` gradient buffer). The result is a view of their memory.
    """
    if any(p is None for p in parts):
        return None
    first = parts[0]
    N, it = first.shape[0], first.element_size()
    if N < 2 or any(p.shape[0] != N or p.dtype != first.dtype or not p[0].is_contiguous() for p in parts):
        return None
    S = sum(p[0].numel() for p in parts)
    ptr = first.data_ptr()
    for p in parts:
        if p.stride(0) != S or p.data_ptr() != ptr:
            return None
        ptr += p[0].numel() * it
    return first.as_strided((N, S), (S, 1))  # rows S apart inside one allocation, as the checks above say
