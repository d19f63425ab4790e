"""ACT on the PyTorch side of the follow engine: tckgen's ``-crop_at_gmwmi`` applied to followed streamlines.

The native kernel decides which halves entered cortical GM (their termination codes); :func:`crop_ends` moves those
ends onto the GM-WM interface as tckgen does (:func:`tractfunc.core.tissues.crop_at_interface`), in the vertices'
dtype and differentiably wrt them.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..core.field import ACTField
from ..core.stop import Reason
from ..core.tissues import crop_at_interface

Tensor = torch.Tensor


MOVED = 1e-3   # mm: a kernel end farther than this from the followed one was cropped by the kernel


def crop_ends(act: ACTField, vertices: Tensor, lengths: Tensor, seed_index: Tensor, reasons: Tensor,
              decided: Optional[Tensor] = None) -> Tensor:
    """tckgen's ``-crop_at_gmwmi`` on packed streamlines.

    Args:
        act: the 5TT image; vertices (V, 3) scanner mm, packed; lengths, seed_index (A,) as in
            :class:`tractfunc.Tracks`; reasons (A, 2) each accepted streamline's termination codes (first half,
            second half; the second CONTINUE for a unidirectional streamline, whose only half ends last);
        decided: (V, 3) the native kernel's (cropped) vertices of the same streamlines, or None: an end is cropped
            where the kernel moved it (more than MOVED mm from the followed end), else as decided here.
    Returns:
        (V, 3) the vertices with every end that entered cortical GM moved onto the GM-WM interface (the first
        half's end as tckgen crops it, on that half alone, before the second half's)."""
    cgm = int(Reason.ENTER_CGM)
    end = torch.cumsum(lengths, 0) - 1
    start = end - lengths + 1
    uni = reasons[:, 1] == int(Reason.CONTINUE)
    # the first half ends first in the packed order when tracked both ways (it is stored reversed), last otherwise
    first = (reasons[:, 0] == cgm) & ~uni & (seed_index >= 2)
    last = ((reasons[:, 1] == cgm) | ((reasons[:, 0] == cgm) & uni)) & (lengths >= 3)
    out = vertices
    for rows, step in ((start[first], 1), (end[last], -1)):
        if rows.numel():
            idx = rows.unsqueeze(1) + step * torch.arange(3, device=rows.device)
            todo = None if decided is None else \
                torch.linalg.vector_norm(decided[rows].to(out.dtype) - out[rows].detach(), dim=-1) > MOVED
            out = out.index_copy(0, rows, crop_at_interface(act, out[idx], todo))
    return out
