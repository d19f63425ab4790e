"""Stopping criteria of the DIPY family: DIPY's status codes, its threshold and binary criteria (batched),
drop-in classes with DIPY's names, and DIPY's own criterion objects.

A criterion here is a callable ``pos_vox (B, 3) voxel coords -> status (B,) int64`` (:class:`Status`, DIPY's
``StreamlineStatus`` codes).  :func:`as_criterion` turns what a caller passes into one:

* a tractfunc criterion (:func:`threshold_criterion`, :func:`binary_criterion`, the classes below, or any
  such callable): used as is;
* DIPY's ``BinaryStoppingCriterion``: DIPY keeps the mask in a private (``cdef``) attribute, so it is read
  back exactly, one ``check_point`` per voxel centre (voxel centres are integers and DIPY rounds to the
  nearest voxel), once, on the grid of the field; then tracked batched like :func:`binary_criterion`;
* any other DIPY criterion (``ThresholdStoppingCriterion``, ACT, CMC, ...): its metric maps are private
  too and a thresholded trilinear map cannot be read back from statuses, so its ``check_point`` is called
  point by point on the CPU in float64: exact, but a Python call per point per step (about a microsecond
  each).  :class:`ThresholdStoppingCriterion` here takes DIPY's arguments and runs batched.
"""
from __future__ import annotations

from enum import IntEnum
from typing import Callable

import numpy as np
import torch

from ..core.arrays import as_tensor
from ..errors import TractfuncError
from .getters import trilinear_dipy

Tensor = torch.Tensor


class Status(IntEnum):
    """DIPY's ``StreamlineStatus`` codes."""
    OUTSIDEIMAGE = -1
    INVALIDPOINT = 0
    TRACKPOINT = 1
    ENDPOINT = 2


def _converter(t: Tensor):
    """``f(like, dtype=None)``: ``t`` on ``like``'s device (and in ``dtype``), converted once per pair."""
    cache = {}

    def to(like: Tensor, dtype=None) -> Tensor:
        key = (like.device, dtype)
        if key not in cache:
            cache[key] = t.to(device=like.device, dtype=dtype) if dtype is not None else t.to(like.device)
        return cache[key]
    return to


def threshold_criterion(metric_map: Tensor, threshold: float) -> Callable[[Tensor], Tensor]:
    """DIPY ``ThresholdStoppingCriterion(metric_map, threshold)``: metric_map (X, Y, Z) (e.g. FA, GFA),
    interpolated with DIPY's trilinear rule; ``> threshold`` continues, else ENDPOINT; outside OUTSIDEIMAGE."""
    vol = as_tensor(metric_map).contiguous().unsqueeze(-1)   # sampling gathers rows of the flat volume
    if vol.dim() != 4:
        raise TractfuncError(f"metric map has shape {tuple(vol.shape[:-1])}; expected (X, Y, Z)")

    as_pos = _converter(vol)

    def check(pos_vox: Tensor) -> Tensor:
        v, inside = trilinear_dipy(as_pos(pos_vox, pos_vox.dtype), pos_vox)
        code = torch.where(v[..., 0] > threshold, Status.TRACKPOINT, Status.ENDPOINT)
        return torch.where(inside, code, Status.OUTSIDEIMAGE)
    return check


def binary_criterion(mask: Tensor) -> Callable[[Tensor], Tensor]:
    """DIPY ``BinaryStoppingCriterion(mask)``: mask (X, Y, Z), ``> 0`` inside; the nearest voxel by
    round-half-to-even; off the array OUTSIDEIMAGE."""
    m = as_tensor(mask) > 0
    if m.dim() != 3:
        raise TractfuncError(f"mask has shape {tuple(m.shape)}; expected (X, Y, Z)")
    dims = m.shape
    as_pos = _converter(m)

    def check(pos_vox: Tensor) -> Tensor:
        r = torch.round(pos_vox.detach())                                     # rint: half to even
        hi = torch.as_tensor(dims, dtype=r.dtype, device=r.device)
        inside = ((r >= 0) & (r < hi)).all(-1)
        idx = r.long().clamp(min=0)
        idx = torch.minimum(idx, (hi - 1).long())
        val = as_pos(r)[idx[..., 0], idx[..., 1], idx[..., 2]]
        code = torch.where(val, Status.TRACKPOINT, Status.ENDPOINT)
        return torch.where(inside, code, Status.OUTSIDEIMAGE)
    return check


class _Criterion:
    """Shared part of the drop-in classes: batched ``__call__`` and DIPY's one-point ``check_point``."""

    def __call__(self, pos_vox: Tensor) -> Tensor:
        return self._check(pos_vox)

    def check_point(self, point) -> int:
        """DIPY's ``check_point``: one voxel-coordinate point (3,) -> its :class:`Status` code (int)."""
        p = torch.as_tensor(np.asarray(point, dtype=np.float64)).reshape(1, 3)
        return int(self._check(p)[0])


class ThresholdStoppingCriterion(_Criterion):
    """DIPY's ``ThresholdStoppingCriterion(metric_map, threshold)`` (:func:`threshold_criterion`), with the
    map public: ``metric_map`` (X, Y, Z) tensor, ``threshold`` float."""

    def __init__(self, metric_map, threshold: float):
        self.metric_map, self.threshold = as_tensor(metric_map), float(threshold)
        self._check = threshold_criterion(self.metric_map, self.threshold)


class BinaryStoppingCriterion(_Criterion):
    """DIPY's ``BinaryStoppingCriterion(mask)`` (:func:`binary_criterion`), with ``mask`` (X, Y, Z) bool
    public."""

    def __init__(self, mask):
        self.mask = as_tensor(mask) > 0
        self._check = binary_criterion(self.mask)


def _is_dipy(sc) -> bool:
    return any(c.__module__.startswith("dipy.tracking") and c.__name__ == "StoppingCriterion"
               for c in type(sc).__mro__)


def dipy_binary_mask(sc, shape) -> np.ndarray:
    """The mask (X, Y, Z) bool of DIPY's ``BinaryStoppingCriterion`` ``sc`` on a grid of ``shape`` (that of
    the field it is used with), read back with one ``check_point`` per voxel centre (exact: DIPY rounds to
    the nearest voxel).  A grid that differs from the criterion's is an error."""
    X, Y, Z = (int(n) for n in shape)
    out = int(Status.OUTSIDEIMAGE)
    pt = np.zeros(3)

    def status(i, j, k):
        pt[:] = (i, j, k)
        return sc.check_point(pt)
    if status(X - 1, Y - 1, Z - 1) == out or any(status(*c) != out for c in ((X, 0, 0), (0, Y, 0), (0, 0, Z))):
        raise TractfuncError(f"the DIPY BinaryStoppingCriterion's mask is not on the field's grid {(X, Y, Z)}")
    grid = np.stack(np.meshgrid(np.arange(X), np.arange(Y), np.arange(Z), indexing="ij"), -1).reshape(-1, 3)
    codes = np.fromiter((sc.check_point(p) for p in grid.astype(np.float64)), dtype=np.int64, count=len(grid))
    return (codes == int(Status.TRACKPOINT)).reshape(X, Y, Z)


def dipy_point_criterion(sc) -> Callable[[Tensor], Tensor]:
    """Any DIPY criterion as a batched one: its ``check_point`` on each row, on the CPU in float64 (exact,
    one Python call per point: slow; no gradient, as none flows through a status)."""
    def check(pos_vox: Tensor) -> Tensor:
        pts = pos_vox.detach().to("cpu", torch.float64).numpy()
        codes = np.fromiter((sc.check_point(np.ascontiguousarray(p)) for p in pts), dtype=np.int64,
                            count=len(pts))
        return torch.as_tensor(codes, device=pos_vox.device)
    return check


def as_criterion(sc, shape=None) -> Callable[[Tensor], Tensor]:
    """What a caller passes as a stopping criterion -> ``pos_vox (B, 3) -> status (B,)`` (module docstring).

    Args:
        sc: a tractfunc criterion (callable), or a DIPY ``StoppingCriterion`` object.
        shape: (X, Y, Z) of the field's grid, used to read a DIPY ``BinaryStoppingCriterion``'s mask back.

    Returns:
        A batched criterion."""
    if _is_dipy(sc):
        if type(sc).__name__ == "BinaryStoppingCriterion" and shape is not None:
            return binary_criterion(torch.as_tensor(dipy_binary_mask(sc, shape)))
        return dipy_point_criterion(sc)
    if not callable(sc):
        raise TractfuncError(f"stopping criterion is a {type(sc).__name__}; expected a tractfunc criterion "
                             "(threshold_criterion, binary_criterion, ...) or a DIPY StoppingCriterion")
    return sc
