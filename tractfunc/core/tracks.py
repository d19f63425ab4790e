"""The one result type of every tracker: accepted streamlines packed into one tensor, with per-seed records.

Packed means no Python object per streamline: ``vertices`` holds the accepted streamlines one after another and
``lengths`` says where each ends, which is what a GPU run, a file writer or a loss over a whole-brain
tractogram wants. :meth:`Tracks.streamlines` and :meth:`Tracks.padded` are views for the other uses.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Tuple

import torch

Tensor = torch.Tensor


class Tracks(NamedTuple):
    """Streamlines of one tracking call.

    vertices: (V, 3) scanner mm, the accepted streamlines concatenated, each in tckgen order (reversed
        forward half, seed, backward half); differentiable where the call was.
    lengths: (A,) int64 vertex count of each accepted streamline.
    seed_ids: (A,) int64 index, in the call's seeds, of each accepted streamline's seed.
    seed_index: (A,) int64 index of the seed vertex inside each streamline (= vertices of the forward half).
    reasons: (S, 2) int64 :class:`tractfunc.core.stop.Reason` of each half for every seed (SEED_REJECTED where
        the seed failed; CONTINUE where a fixed-shape run was still going after its last step).
    accepted: (S,) bool per seed: the seed was accepted and its streamline passed the length rule.
    weights: (V,) survival weight of each vertex (soft stopping: the product of the step factors from the seed
        out to the vertex), or None for hard stopping (every vertex weighs 1).
    engine: which engine produced the streamlines ("native", "follow", "eager" or "fixed", see
        :func:`tractfunc.track`), "local" for the DIPY family (``LocalTracks.to_tracks()``: a seed may give
        several streamlines there, so ``reasons`` (A, 2) holds each streamline's DIPY end status codes and
        ``accepted`` (A,) is all True).
    """
    vertices: Tensor
    lengths: Tensor
    seed_ids: Tensor
    seed_index: Tensor
    reasons: Tensor
    accepted: Tensor
    weights: Optional[Tensor] = None
    engine: str = ""

    def streamlines(self) -> List[Tensor]:
        """The accepted streamlines as a list of (n_i, 3) views of ``vertices``."""
        return list(torch.split(self.vertices, self.lengths.tolist()))

    def padded(self, fill: float = 0.0) -> Tuple[Tensor, Tensor]:
        """(vertices (A, L, 3), valid (A, L) bool) with L the longest streamline; padding holds ``fill``.
        Differentiable (a gather of ``vertices``)."""
        A = self.lengths.numel()
        L = int(self.lengths.max()) if A else 0
        pos = torch.arange(L, device=self.lengths.device)
        valid = pos.unsqueeze(0) < self.lengths.unsqueeze(1)
        start = torch.cumsum(self.lengths, 0) - self.lengths
        idx = (start.unsqueeze(1) + pos.unsqueeze(0)).clamp(max=max(self.vertices.shape[0] - 1, 0))
        out = self.vertices[idx.reshape(-1)].reshape(A, L, 3) if self.vertices.shape[0] else \
            self.vertices.new_zeros(A, L, 3)
        return torch.where(valid.unsqueeze(-1), out, torch.full_like(out, fill)), valid

    def vertex_weights(self) -> Tensor:
        """(V,) ``weights``, or ones for hard stopping."""
        return self.weights if self.weights is not None else torch.ones_like(self.vertices[:, 0])

    def decisions(self) -> Tensor:
        """(S, 4) int64 per seed: vertices added by the forward half, by the backward half (-1 where the seed gave
        no accepted streamline), and the two halves' stop reasons. Two runs took the same discrete decisions
        where these rows are equal (e.g. the two sides of a finite difference)."""
        S = self.accepted.shape[0]
        halves = torch.full((S, 2), -1, dtype=torch.long, device=self.lengths.device)
        halves[self.seed_ids, 0] = self.seed_index
        halves[self.seed_ids, 1] = self.lengths - self.seed_index - 1
        return torch.cat([halves, self.reasons.to(halves.device)], 1)

    def seeds_ok(self) -> Tensor:
        """(S,) bool: False where the seed was rejected (outside the mask or image, or no peak above the cutoff)."""
        from .stop import Reason
        return self.reasons[:, 0] != int(Reason.SEED_REJECTED)


def empty(like: Tensor, n_seeds: int = 0, engine: str = "") -> Tracks:
    """A result with no streamline, for ``n_seeds`` rejected seeds, in the dtype and device of ``like``."""
    from .stop import Reason
    z = torch.zeros(0, dtype=torch.long, device=like.device)
    return Tracks(like.new_zeros(0, 3), z, z, z,
                  torch.full((n_seeds, 2), int(Reason.SEED_REJECTED), dtype=torch.long, device=like.device),
                  torch.zeros(n_seeds, dtype=torch.bool, device=like.device), None, engine)


def concat(parts: List[Tracks], offsets: List[int]) -> Tracks:
    """Join the results of consecutive seed chunks; ``offsets[i]`` is chunk i's first seed index (one chunk from
    seed 0 comes back as it is, without a copy)."""
    if len(parts) == 1 and offsets[0] == 0:
        return parts[0]
    w = [p.weights for p in parts]
    return Tracks(torch.cat([p.vertices for p in parts]), torch.cat([p.lengths for p in parts]),
                  torch.cat([p.seed_ids + o for p, o in zip(parts, offsets)]),
                  torch.cat([p.seed_index for p in parts]), torch.cat([p.reasons for p in parts]),
                  torch.cat([p.accepted for p in parts]),
                  None if any(x is None for x in w) else torch.cat(w), parts[0].engine)
