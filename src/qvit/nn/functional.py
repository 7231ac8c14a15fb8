"""Plain tensor functions the quantized modules share."""
from __future__ import annotations

from typing import Optional

import torch


def scaled_matmul(a: torch.Tensor, b: torch.Tensor, alpha: float = 1.0,
                  out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``alpha · (a @ b)`` for ``a`` ``[..., n, k]`` and ``b`` ``[..., k, m]`` with equal batch dimensions, the factor
    applied inside the matrix product (no separate pass over the ``[..., n, m]`` result); written into ``out``
    (contiguous ``[..., n, m]``) when given."""
    if alpha == 1.0:
        return a @ b if out is None else torch.matmul(a, b, out=out)
    batch = a.shape[:-2]
    a3, b3 = a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:])
    if out is not None:
        torch.baddbmm(out.view(-1, *out.shape[-2:]), a3, b3, beta=0.0, alpha=alpha, out=out.view(-1, *out.shape[-2:]))
        return out
    result = torch.baddbmm(a.new_zeros(()), a3, b3, beta=0.0, alpha=alpha)
    return result.reshape(*batch, *result.shape[-2:])
