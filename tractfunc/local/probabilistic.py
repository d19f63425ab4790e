"""Probabilistic direction getters on a discrete sphere, and two ways for gradients to reach the FOD.

Each getter samples one sphere vertex per streamline, with probability proportional to a non-negative
weight derived from the FOD amplitude (the PMF of :mod:`tractfunc.local.getters`: SH interpolated with DIPY's
trilinear rule, evaluated at the vertices, values below ``pmf_threshold * max`` set to 0), then points it
forward (the vertex, or its antipode when ``v . prev <= 0``):

* :func:`probabilistic` -- DIPY ``ProbabilisticDirectionGetter`` (``from_shcoeff``; DIPY 1.12's
  ``probabilistic_direction_getter.pyx``, ``closest_peak_direction_getter.pyx``, ``pmf.pyx``): vertices
  with ``|v . prev| < cos(max_angle)`` get weight 0 (an antipodally symmetric cone); the vertex drawn is
  the first whose running sum of weights exceeds ``U * total`` (inverse CDF; DIPY's ``where_to_insert``);
  ``total == 0`` or a zero ``prev`` -> ``ok`` False.
* :func:`ifod1` -- MRtrix3 ``iFOD1``-like: weight ``amp ** power`` where ``amp > cutoff`` (an absolute FOD
  amplitude, MRtrix3's ``-cutoff`` 0.1 and ``-power`` 1) inside the cone, else 0; no relative threshold.
  iFOD1 draws uniformly in the one-sided cone around ``prev`` and accepts with probability ``amp / max``;
  the FOD is antipodally symmetric (even degrees), so weighting the vertices in the symmetric cone and
  flipping them forward samples the same density on the grid ``V u -V``.  Inverse CDF instead of rejection:
  no ``max_trials`` failure; no candidate above the cutoff -> ``ok`` False.  Default grid: a Fibonacci
  sphere of 2000 vertices (:func:`fibonacci_sphere`; ~5 degrees apart, ~70 vertices in a 15 degree cone).

A getter is ``getter(pos_vox (B, 3) voxel coords, prev_dir (B, 3) unit, generator) -> (dir (B, 3), ok (B,))``
in the frames of :mod:`tractfunc.local.getters` (directions in the array-axis frame; ``sh_frame="scanner"`` for
an MRtrix3 FOD), with ``initial_directions`` from the same base class.  Where ``ok`` is False it returns
``prev_dir``.  Randomness: exactly one uniform per streamline per call (M Gumbel variates for
:func:`gumbel`), drawn from the explicit ``generator`` on its device, whether or not the streamline can
continue, so the same seed gives the same output (bit for bit on the CPU).

Gradients (docs/probabilistic.md, proofs/probabilistic_estimators.md): the sampled vertex is discrete, so
autograd gives no gradient through it.  Two estimators of ``d E[f(u)] / d (SH, position)``:

* Gumbel-softmax (:func:`gumbel`, :func:`gumbel_softmax_weights`): ``y = softmax((log w + g) / T)`` with
  Gumbel noise ``g``; the direction is the normalised ``y``-weighted mean of the forward-flipped vertices
  (biased; bias grows and variance falls with ``T``); ``hard=True`` is straight-through (forward = the exact
  sample by the Gumbel-max trick, backward = the soft sample's derivative).
* Score function / REINFORCE (:meth:`ProbabilisticGetter.draw`, :func:`score_function_surrogate`,
  :func:`leave_one_out_baseline`): unbiased, ``E[(f(u) - b) grad log p(u)]`` with a baseline ``b``
  independent of the sample.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import numpy as np
import torch

from .getters import DEFAULT_SH_FRAME, PmfGetter, build_getter, forward_flip, unit_nonzero
from .peaks import Sphere, make_sphere

Tensor = torch.Tensor


def fibonacci_sphere(n: int = 2000) -> Sphere:
    """Near-uniform full sphere of ``n`` vertices (golden-angle spiral; float64), with the edges of its
    convex hull (for :mod:`tractfunc.local.peaks`).  Deterministic."""
    if n < 4:
        raise ValueError(f"fibonacci_sphere needs n >= 4 vertices, got {n}")
    from scipy.spatial import ConvexHull
    k = np.arange(n, dtype=np.float64)
    z = 1 - (2 * k + 1) / n
    r = np.sqrt(1 - z * z)
    phi = k * math.pi * (3 - math.sqrt(5))   # the mirror image of core.sphere's lattice: kept, the sampled
    v = np.stack([r * np.cos(phi), r * np.sin(phi), z], -1)   # directions (and tests' draws) depend on it
    tri = ConvexHull(v).simplices
    edges = np.concatenate([tri[:, [0, 1]], tri[:, [1, 2]], tri[:, [2, 0]]])
    return make_sphere(v, np.unique(np.sort(edges, 1), axis=0))


def _uniform(shape, generator: Optional[torch.Generator], like: Tensor) -> Tensor:
    """Uniforms in [0, 1) drawn on the generator's device in float64, then cast to ``like``."""
    dev = generator.device if generator is not None else torch.device("cpu")
    return torch.rand(shape, generator=generator, dtype=torch.float64, device=dev).to(like.device, like.dtype)


def inverse_cdf(weights: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
    """Index drawn with probability ``weights / sum(weights)`` by inverse CDF.

    weights: (..., M) >= 0; u: (...,) uniforms in [0, 1).  Returns (index (...,) int64, ok (...,) bool,
    False where all weights are 0).  The index is the first vertex whose running sum exceeds
    ``u * total`` (DIPY's ``where_to_insert``), so a zero-weight vertex is never drawn."""
    cdf = torch.cumsum(weights, -1)
    total = cdf[..., -1]
    idx = torch.searchsorted(cdf.contiguous(), (u * total).unsqueeze(-1).contiguous(), right=True).squeeze(-1)
    # u * total can round up to total (u cast to float32 can be 1.0): no running sum exceeds it and
    # searchsorted returns M; take the last positive-weight vertex there, never a zero-weight one
    M = weights.shape[-1]
    last = (M - 1) - torch.flip(weights > 0, [-1]).to(torch.uint8).argmax(-1)
    return torch.where(idx < M, idx, last), total > 0


class Draw(NamedTuple):
    """One draw with its log probability (for the score-function estimator).

    dir: (B, 3) unit, forward; ok: (B,) bool; index: (B,) int64 vertex; log_prob: (B,) ``log p(index)``,
    differentiable with respect to the SH volume and the position (0 where ``ok`` is False)."""
    dir: Tensor
    ok: Tensor
    index: Tensor
    log_prob: Tensor


class ProbabilisticGetter(PmfGetter):
    """Sampling getter (module docstring).  cutoff: absolute amplitude a vertex must exceed (0: DIPY);
    power: exponent of the amplitude in the weight (1: DIPY)."""

    def __init__(self, *args, cutoff: float = 0.0, power: float = 1.0, **kw):
        super().__init__(*args, **kw)
        if cutoff < 0 or not power > 0:
            raise ValueError(f"cutoff must be >= 0 and power > 0, got cutoff={cutoff}, power={power}")
        self.cutoff, self.power = float(cutoff), float(power)

    def weights(self, pos_vox: Tensor, prev_dir: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(weights (B, V) >= 0, unit prev (B, 3), prev non-zero (B,)) at voxel positions (B, 3)."""
        pmf = self.pmf(pos_vox)
        d, nonzero = unit_nonzero(prev_dir.to(pmf.dtype))
        keep = ((d @ self.vertices.T).abs() >= self.cos_similarity) & (pmf > self.cutoff) & (pmf > 0)
        amp = torch.where(keep, pmf, torch.ones_like(pmf))         # double where: pow's gradient stays finite
        w = amp if self.power == 1.0 else amp ** self.power
        return torch.where(keep, w, torch.zeros_like(w)), d, nonzero

    def draw(self, pos_vox: Tensor, prev_dir: Tensor, generator: Optional[torch.Generator] = None) -> Draw:
        """The sample of ``__call__`` (same generator use) with its log probability."""
        w, d, nonzero = self.weights(pos_vox, prev_dir)
        idx, ok = inverse_cdf(w.detach(), _uniform(w.shape[:-1], generator, w))
        ok = ok & nonzero
        lp = log_pmf(w).gather(-1, idx.unsqueeze(-1)).squeeze(-1)
        lp = torch.where(ok, lp, torch.zeros_like(lp))
        new = torch.where(ok.unsqueeze(-1), forward_flip(self.vertices[idx], d), prev_dir.to(w.dtype))
        return Draw(new, ok, idx, lp)

    def __call__(self, pos_vox: Tensor, prev_dir: Tensor, generator: Optional[torch.Generator] = None):
        with torch.no_grad():
            r = self.draw(pos_vox, prev_dir, generator)
        return r.dir, r.ok


class GumbelGetter(ProbabilisticGetter):
    """Gumbel-softmax relaxation of :class:`ProbabilisticGetter` (module docstring): differentiable
    direction; ``hard``: straight-through (forward = an exact sample of the same distribution)."""

    def __init__(self, *args, temperature: float = 0.1, hard: bool = False, **kw):
        super().__init__(*args, **kw)
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature, self.hard = float(temperature), bool(hard)

    def __call__(self, pos_vox: Tensor, prev_dir: Tensor, generator: Optional[torch.Generator] = None):
        w, d, nonzero = self.weights(pos_vox, prev_dir)
        y = gumbel_softmax_weights(w, gumbel_noise(w.shape, generator, w), self.temperature, self.hard)
        signed = forward_flip(self.vertices.unsqueeze(0), d.unsqueeze(-2))   # (B, V, 3)
        new, _ = unit_nonzero((y.unsqueeze(-1) * signed).sum(-2))
        ok = (w.sum(-1) > 0) & nonzero
        return torch.where(ok.unsqueeze(-1), new, prev_dir.to(new.dtype)), ok


_PEAKS = dict(relative_peak_threshold=0.5, min_separation_angle=25.0, max_peaks=16)


def probabilistic(sh_volume: Tensor, max_angle: float = 30.0, sphere="default", pmf_threshold: float = 0.1,
                  affine=None, sh_frame: str = DEFAULT_SH_FRAME, sh_basis: Optional[str] = "descoteaux07",
                  legacy: bool = True, **peak_kw) -> ProbabilisticGetter:
    """DIPY ``ProbabilisticDirectionGetter.from_shcoeff(sh, max_angle, sphere, pmf_threshold, basis_type,
    legacy)``.

    sh_volume: (X, Y, Z, N) SH in the basis ``sh_basis``/``legacy`` (DIPY's names; default DIPY's
    ``"descoteaux07"``, True; an MRtrix3 FOD is ``"tournier07"``, False); max_angle: degrees; sphere: a DIPY
    ``Sphere``/``HemiSphere``, a DIPY sphere name (default DIPY's ``default_sphere``) or a tractfunc
    ``Sphere``; affine/sh_frame and ``peak_kw`` (initial directions at seeds): as
    :func:`tractfunc.local.getters.closest_peak`."""
    return build_getter(ProbabilisticGetter, sh_volume, sphere, affine, sh_frame, max_angle, pmf_threshold,
                  sh_basis=sh_basis, legacy=legacy, **{**_PEAKS, **peak_kw})


def ifod1(sh_volume: Tensor, max_angle: float = 15.0, cutoff: float = 0.1, power: float = 1.0, sphere=None,
          affine=None, sh_frame: str = DEFAULT_SH_FRAME, pmf_threshold: float = 0.0,
          sh_basis: Optional[str] = "descoteaux07", legacy: bool = True, **peak_kw) -> ProbabilisticGetter:
    """iFOD1-like getter (module docstring): MRtrix3's defaults ``-angle 15 -cutoff 0.1 -power 1``.

    sphere: default (None or ``"fibonacci"``) :func:`fibonacci_sphere` (2000 vertices), else as
    :func:`probabilistic`; pmf_threshold: an optional relative threshold on top of the cutoff (iFOD1: 0);
    sh_basis/legacy: as :func:`probabilistic` (an MRtrix3 FOD: ``"tournier07"``, False)."""
    sphere = fibonacci_sphere() if sphere is None or sphere == "fibonacci" else sphere
    return build_getter(ProbabilisticGetter, sh_volume, sphere, affine, sh_frame, max_angle, pmf_threshold,
                  sh_basis=sh_basis, legacy=legacy, cutoff=cutoff, power=power, **{**_PEAKS, **peak_kw})


def gumbel(sh_volume: Tensor, max_angle: float = 15.0, temperature: float = 0.1, hard: bool = False,
           cutoff: float = 0.1, pmf_threshold: float = 0.0, power: float = 1.0, sphere=None, affine=None,
           sh_frame: str = DEFAULT_SH_FRAME, sh_basis: Optional[str] = "descoteaux07", legacy: bool = True,
           **peak_kw) -> GumbelGetter:
    """Gumbel-softmax relaxation of :func:`ifod1` (defaults) or, with ``cutoff=0, pmf_threshold=0.1,
    sphere='default'``, of :func:`probabilistic`.  Gradients reach ``sh_volume`` and the position.
    sh_basis/legacy: as :func:`probabilistic`."""
    sphere = fibonacci_sphere() if sphere is None or sphere == "fibonacci" else sphere
    return build_getter(GumbelGetter, sh_volume, sphere, affine, sh_frame, max_angle, pmf_threshold, sh_basis=sh_basis,
                  legacy=legacy, cutoff=cutoff, power=power, temperature=temperature, hard=hard,
                  **{**_PEAKS, **peak_kw})


# ------------------------------------------------------------------------ differentiable relaxations

def safe_log(w: Tensor) -> Tensor:
    """log w where w > 0, -inf elsewhere, with a finite (zero) gradient at w == 0 (double where)."""
    pos = w > 0
    return torch.where(pos, torch.log(torch.where(pos, w, torch.ones_like(w))), torch.full_like(w, -math.inf))


def log_pmf(weights: Tensor) -> Tensor:
    """Normalised log probabilities (..., M) of non-negative weights (-inf where a weight is 0; an all-zero
    row is -inf throughout, without NaN: mask it with the draw's ``ok``)."""
    lw = safe_log(weights)
    lz = torch.logsumexp(lw, -1, keepdim=True)
    return lw - torch.where(torch.isfinite(lz), lz, torch.zeros_like(lz))


def gumbel_noise(shape, generator: Optional[torch.Generator], like: Tensor) -> Tensor:
    """Standard Gumbel noise ``-log(-log U)`` of ``shape`` (U in (0, 1), from ``generator``)."""
    u = _uniform(shape, generator, like).clamp(min=torch.finfo(like.dtype).tiny, max=1 - torch.finfo(like.dtype).eps)
    return -torch.log(-torch.log(u))


def gumbel_softmax_weights(weights: Tensor, noise: Tensor, temperature: float, hard: bool = False) -> Tensor:
    """Relaxed one-hot sample (..., M) of the categorical ``weights / sum(weights)``.

    ``softmax((log w + noise) / temperature)``; zero-weight vertices get exactly 0.  ``hard``: the
    straight-through estimator, forward value = one-hot of the argmax (an exact sample of the categorical,
    the Gumbel-max trick), gradient = that of the soft sample.  noise: Gumbel (..., M) (:func:`gumbel_noise`)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    lw = safe_log(weights)
    z = torch.where(torch.isfinite(lw), (lw + noise) / temperature, lw)
    z = torch.where(torch.isfinite(lw).any(-1, keepdim=True), z, torch.zeros_like(z))   # all-zero rows
    y = torch.softmax(z, -1)
    y = torch.where(torch.isfinite(lw), y, torch.zeros_like(y))   # all-zero rows: NaN-free zeros
    if not hard:
        return y
    one_hot = torch.nn.functional.one_hot(z.argmax(-1), weights.shape[-1]).to(y.dtype)
    return one_hot + (y - y.detach())


def score_function_surrogate(loss: Tensor, log_prob: Tensor, baseline: Tensor) -> Tensor:
    """Surrogate whose gradient is the REINFORCE estimate of ``grad E[loss]``.

    ``loss`` (...,): per-sample loss (may itself depend on the parameters: its pathwise gradient is kept);
    ``log_prob`` (...,): log probability of the sample (summed over the steps of a path); ``baseline``
    (...,): a value independent of this sample (e.g. :func:`leave_one_out_baseline`); detached here.
    Forward value equals ``loss``; gradient = ``grad loss + (loss - b) grad log_prob``."""
    adv = (loss - baseline).detach()
    return loss + adv * (log_prob - log_prob.detach())


def leave_one_out_baseline(loss: Tensor, dim: int = 0) -> Tensor:
    """For K samples along ``dim`` (K >= 2): the mean of the *other* K - 1 losses for each sample, which
    keeps the estimator unbiased (the baseline is independent of the sample it is paired with)."""
    k = loss.shape[dim]
    if k < 2:
        raise ValueError(f"a leave-one-out baseline needs >= 2 samples along dim {dim}, got {k}")
    total = loss.sum(dim, keepdim=True)
    return ((total - loss) / (k - 1)).detach()
