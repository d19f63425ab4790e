"""tractfunc from JAX: the primitives and the trackers as JAX functions with gradients.

Each function here takes and returns JAX arrays, runs tractfunc's PyTorch implementation, and declares
its derivative with ``jax.custom_vjp``, so ``jax.grad`` / ``jax.vjp`` of a loss on its outputs (e.g. on
streamline vertices, wrt seeds and FOD coefficients) works:

* forward: inputs go to torch by DLPack (zero-copy, same device), outputs come back the same way;
* under differentiation the forward records torch's graph for the inputs JAX differentiates and keeps it
  (at most ``KEEP_GRAPHS`` of them, oldest dropped) until the backward, which runs only
  ``torch.autograd.grad``: a gradient costs one forward and one backward, as in torch.  A backward whose graph
  was dropped (or is called twice) runs the forward again, with the same result.  The derivatives are exactly
  tractfunc's (implicit-function-theorem peaks, soft termination, the fused engine's C reverse sweep, ...).

:func:`track` is :func:`tractfunc.track` (the fused engine on the CPU: the C kernel's forward and one C reverse
sweep) with fixed-shape, per-seed padded outputs; :func:`track_fixed` is the fixed-shape reference tracker.

Under ``jax.jit`` / ``jax.vmap`` (traced inputs) the torch calls go through ``jax.pure_callback``: they
run on the host CPU on NumPy buffers, and ``vmap`` calls torch once per batch element (every function
here already batches over leading dimensions: pass batches directly where you can).

Dtypes follow the inputs.  JAX computes in float32 unless ``jax.config.update("jax_enable_x64", True)``
is set before arrays are created; gradient checks want float64.  Integer outputs (reason codes, seed
vertex index) are int32, masks are bool; they carry no gradient.

Requires the ``jax`` extra: ``pip install 'tractfunc[jax]'``.
"""
from __future__ import annotations

import contextvars
import itertools
import threading
import weakref
from collections import OrderedDict
from typing import Callable, NamedTuple, Optional, Sequence

import numpy as np
import torch

try:
    import jax
    import jax.numpy as jnp
    from jax.custom_derivatives import SymbolicZero
except ImportError as e:  # the optional extra is missing
    raise ImportError("tractfunc.interop.jax needs JAX: pip install 'tractfunc[jax]' (or pip install jax)") from e

from ..core import newton as _direction, integrate as _integrate, interpolate as _interpolate, sh as _sh
from ..sdstream import fixed as _fixed, track as _track
from ..core.arrays import as_tensor
from ..core.field import FODField, MaskField, make_field
from ..errors import TractfuncError
from ..core.params import TrackParams

__all__ = ["basis", "amplitude", "sh_jet", "trilinear", "peak", "euler", "rk4", "track", "track_fixed",
           "PaddedTracks"]

_ARRAYS: contextvars.ContextVar = contextvars.ContextVar("tractfunc_jax_arrays", default=(None,))
_TORCH_DTYPES = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64,
                 np.dtype(np.int32): torch.int32, np.dtype(np.bool_): torch.bool}


def _floating(x) -> jax.Array:
    """x as a JAX array; integer input becomes JAX's default float (float64 only with x64 enabled)."""
    x = jnp.asarray(x)
    return x if jnp.issubdtype(x.dtype, jnp.floating) else x.astype(float)


def _spec(shape, dtype) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype))


def _is_float(spec) -> bool:
    return jnp.issubdtype(spec.dtype, jnp.floating)


def _call(fn: Callable, specs: Sequence[jax.ShapeDtypeStruct], args: Sequence) -> tuple:
    """Run ``fn`` (torch tensors -> sequence of tensors) on JAX arrays; results cast to ``specs``.

    Concrete inputs: DLPack both ways (no copy, torch on the arrays' device).  Traced inputs (jit, vmap):
    ``jax.pure_callback`` on the host, one call per vmapped element."""
    def torch_side(*xs):
        entered = _ARRAYS.set(xs)   # the JAX arrays themselves, for :func:`_field_of`
        try:
            out = fn(*(as_tensor(x) for x in xs))
        finally:
            _ARRAYS.reset(entered)
        return tuple(t.detach().to(_TORCH_DTYPES[np.dtype(s.dtype)]) for t, s in zip(out, specs))

    if any(isinstance(a, jax.core.Tracer) for a in args):
        host = lambda *xs: tuple(t.cpu().numpy() for t in torch_side(*xs))  # noqa: E731
        return tuple(jax.pure_callback(host, tuple(specs), *args, vmap_method="sequential"))
    return tuple(jnp.from_dlpack(t.contiguous()) for t in torch_side(*args))


# Graphs recorded by a forward rule, kept for the backward rule (token -> (outputs, leaves)); the oldest are
# dropped beyond KEEP_GRAPHS, and a backward that finds none runs the torch forward again (same result).
KEEP_GRAPHS = 8
_GRAPHS: "OrderedDict[int, tuple]" = OrderedDict()
_GRAPHS_LOCK = threading.Lock()
_TOKENS = itertools.count(1)


def _keep(graph: tuple) -> int:
    with _GRAPHS_LOCK:
        token = next(_TOKENS) % 2 ** 31
        _GRAPHS[token] = graph
        while len(_GRAPHS) > KEEP_GRAPHS:
            _GRAPHS.popitem(last=False)
    return token


def _take(token) -> Optional[tuple]:
    with _GRAPHS_LOCK:
        return _GRAPHS.pop(int(token), None)


def _recorded(fn: Callable, xs: Sequence[torch.Tensor], need: Sequence[bool]) -> tuple:
    """Run ``fn`` with autograd on, the inputs marked in ``need`` as leaves -> (outputs, leaves)."""
    with torch.enable_grad():
        leaves = [x.detach().requires_grad_(bool(k)) for x, k in zip(xs, need)]
        return tuple(fn(*leaves)), leaves


def _forward_rule(fn: Callable, need: Sequence[bool]) -> Callable:
    """torch function of the inputs -> (*outputs, token of the kept graph (0-d int32))."""
    def fwd(*xs):
        graph = _recorded(fn, xs, need)
        return (*graph[0], torch.tensor(_keep(graph), dtype=torch.int32))
    return fwd


def _backward_rule(fn: Callable, need: Sequence[bool], used: Sequence[bool]) -> Callable:
    """torch function of (token, *inputs, *cotangents of the outputs marked in ``used``) -> cotangents of the
    inputs marked in ``need`` (zeros where unused): the kept graph's backward, or a new forward's."""
    n = len(need)

    def bwd(token, *xs):
        graph = _take(token)
        outs, leaves = graph if graph is not None else _recorded(fn, xs[:n], need)
        wrt = [x for x, k in zip(leaves, need) if k]
        pairs = [(o, c) for o, c in zip([o for o, u in zip(outs, used) if u], xs[n:]) if o.requires_grad]
        grads = [None] * len(wrt)
        if pairs:
            grads = torch.autograd.grad([o for o, _ in pairs], wrt, [c.to(o.dtype) for o, c in pairs],
                                        allow_unused=True)
        return tuple(torch.zeros_like(x) if g is None else g for x, g in zip(wrt, grads))
    return bwd


def _bridge(fn: Callable, specs: Sequence[jax.ShapeDtypeStruct], *args) -> tuple:
    """``fn`` (torch, floating tensors -> tensors) applied to floating JAX ``args`` as a JAX function whose
    derivative is torch autograd's (``jax.custom_vjp``).  specs: the outputs' shapes and dtypes.

    The forward rule records torch's graph for the inputs JAX differentiates (the others get no gradient) and
    keeps it for the backward rule, which runs only torch's backward: one forward and one backward per gradient."""
    specs = tuple(specs)
    arg_specs = tuple(_spec(a.shape, a.dtype) for a in args)
    need: list = []   # which inputs JAX differentiates: set by the forward rule, read by the backward rule

    @jax.custom_vjp
    def f(*xs):
        return _call(fn, specs, xs)

    def f_fwd(*xs):
        need[:] = [bool(x.perturbed) for x in xs]
        vals = tuple(x.value for x in xs)
        *outs, token = _call(_forward_rule(fn, need), specs + (_spec((), np.int32),), vals)
        return tuple(outs), (vals, token)

    def f_bwd(res, cots):
        vals, token = res
        used = [_is_float(s) and not isinstance(c, SymbolicZero) for c, s in zip(cots, specs)]
        grads = iter(_call(_backward_rule(fn, need, used), [s for s, k in zip(arg_specs, need) if k],
                           (token, *vals, *(c for c, u in zip(cots, used) if u))))
        return tuple(next(grads) if k else None for k in need)

    f.defvjp(f_fwd, f_bwd, symbolic_zeros=True)
    return f(*args)


def _int32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.int32)


# --------------------------------------------------------------------------------------------------
# primitives


def basis(dirs, lmax: int) -> jax.Array:
    """SH basis (MRtrix3 convention) at unit directions: dirs (..., 3) scanner frame -> (..., N),
    N = (lmax+1)(lmax+2)/2.  See :func:`tractfunc.core.sh.basis`."""
    dirs = _floating(dirs)
    spec = _spec(dirs.shape[:-1] + (_sh.n_coeffs(lmax),), dirs.dtype)
    return _bridge(lambda d: (_sh.basis(d, lmax),), [spec], dirs)[0]


def amplitude(coeffs, dirs) -> jax.Array:
    """FOD amplitude: coeffs (..., N) SH, dirs (..., 3) unit (leading dims broadcast) -> (...,).
    See :func:`tractfunc.core.sh.amplitude`."""
    coeffs, dirs = _floating(coeffs), _floating(dirs)
    spec = _spec(np.broadcast_shapes(coeffs.shape[:-1], dirs.shape[:-1]), jnp.result_type(coeffs, dirs))
    return _bridge(lambda c, d: (_sh.amplitude(c, d),), [spec], coeffs, dirs)[0]


def sh_jet(coeffs, u) -> _sh.SphereJet:
    """Amplitude (...,), tangent gradient (..., 3) and tangent Hessian (..., 3, 3) on the sphere at unit
    ``u`` (..., 3) of the SH series ``coeffs`` (..., N).  See :func:`tractfunc.core.sh.sh_jet`."""
    coeffs, u = _floating(coeffs), _floating(u)
    batch = np.broadcast_shapes(coeffs.shape[:-1], u.shape[:-1])
    dt = jnp.result_type(coeffs, u)
    specs = [_spec(batch, dt), _spec(batch + (3,), dt), _spec(batch + (3, 3), dt)]
    return _sh.SphereJet(*_bridge(lambda c, v: tuple(_sh.sh_jet(c, v)), specs, coeffs, u))


def trilinear(volume, vox) -> _interpolate.Sample:
    """Trilinear sampling with MRtrix3's edge rules: volume (X, Y, Z, C), vox (..., 3) voxel coordinates
    -> Sample(values (..., C) in volume's dtype, inside (...,) bool).  Differentiable wrt both.
    See :func:`tractfunc.core.interpolate.trilinear`."""
    volume, vox = _floating(volume), _floating(vox)
    specs = [_spec(vox.shape[:-1] + volume.shape[-1:], volume.dtype), _spec(vox.shape[:-1], bool)]
    return _interpolate.Sample(*_bridge(lambda v, x: tuple(_interpolate.trilinear(v, x)), specs, volume, vox))


def peak(coeffs, u0, max_iter: int = _direction.MAX_ITER, polish_iter: int = 0) -> _direction.Peak:
    """FOD peak reached by Newton iteration from unit ``u0`` (..., 3): coeffs (..., N) -> Peak(dir (..., 3),
    amp (...,)), NaN where the search did not converge.  Exact SH evaluation (no lookup table); the
    derivative is :func:`tractfunc.core.newton.peak`'s (through the iterations)."""
    coeffs, u0 = _floating(coeffs), _floating(u0)
    batch = np.broadcast_shapes(coeffs.shape[:-1], u0.shape[:-1])
    dt = jnp.result_type(coeffs, u0)
    fn = lambda c, u: tuple(_direction.peak(c, u, None, max_iter, polish_iter=polish_iter))  # noqa: E731
    return _direction.Peak(*_bridge(fn, [_spec(batch + (3,), dt), _spec(batch, dt)], coeffs, u0))


# --------------------------------------------------------------------------------------------------
# steps and tracking on an FOD given as a JAX array


def _field(sh: torch.Tensor, affine, precomputed: bool, voxel_sizes) -> FODField:
    return make_field(sh, np.asarray(affine, dtype=np.float64), precomputed=precomputed, voxel_sizes=voxel_sizes)


def _mask_on(mask: Optional[MaskField], device) -> Optional[MaskField]:
    if mask is None:
        return None
    return mask._replace(mask=as_tensor(mask.mask).to(device), world_to_voxel=as_tensor(mask.world_to_voxel).to(device))


def _move(integrator, sh, params: TrackParams, pos, dir, affine, voxel_sizes):
    sh, pos, dir = _floating(sh), _floating(pos), _floating(dir)
    B = pos.shape[:-1]
    dt = jnp.result_type(sh, pos, dir)
    specs = [_spec(B + (3,), dt), _spec(B + (3,), dt), _spec(B, np.int32), _spec(B, dt), _spec(B, dt), _spec(B, dt)]

    def fn(s, p, d):
        m = integrator(_field(s, affine, params.precomputed, voxel_sizes), params, p, d)
        return m._replace(reason=_int32(m.reason))
    return _integrate.Move(*_bridge(fn, specs, sh, pos, dir))


def euler(sh, params: TrackParams, pos, dir, *, affine, voxel_sizes=None) -> _integrate.Move:
    """One SD_Stream Euler step (:func:`tractfunc.core.integrate.euler`) of B streamlines.

    Arguments in the order of the torch function. sh: (X, Y, Z, N) FOD SH coefficients; params:
    :func:`tractfunc.resolve` output (``params.precomputed`` selects tckgen's Legendre lookup table, as in the
    torch trackers; ``resolve(..., exact=True)`` for gradients); pos: (B, 3) scanner mm; dir: (B, 3) unit;
    affine: (4, 4) voxel -> scanner (static, NumPy).
    Returns Move(pos, dir, reason (int32), amp, amp_margin, cos_margin); differentiable wrt sh and pos."""
    return _move(_integrate.euler, sh, params, pos, dir, affine, voxel_sizes)


def rk4(sh, params: TrackParams, pos, dir, *, affine, voxel_sizes=None) -> _integrate.Move:
    """One tckgen ``-rk4`` step (:func:`tractfunc.core.integrate.rk4`); arguments and result as :func:`euler`."""
    return _move(_integrate.rk4, sh, params, pos, dir, affine, voxel_sizes)


def _check_seeds(sh, seeds, init_dirs) -> None:
    if seeds.ndim != 2 or seeds.shape[-1] != 3 or init_dirs.shape != seeds.shape:
        raise TractfuncError(f"seeds {seeds.shape} and init_dirs {init_dirs.shape}: expected both (B, 3)")
    if not sh.dtype == seeds.dtype == init_dirs.dtype:
        raise TractfuncError(f"sh, seeds and init_dirs are {sh.dtype}, {seeds.dtype}, {init_dirs.dtype}; expected "
                             "one dtype (float64 needs jax.config.update('jax_enable_x64', True))")


def track_fixed(sh, params: TrackParams, seeds, init_dirs, n_steps: int, *, affine,
                mask: Optional[MaskField] = None, temperature: Optional[float] = None,
                checkpoint: int = 0, voxel_sizes=None) -> _fixed.FixedTracks:
    """Fixed-shape bidirectional tracking (:func:`tractfunc.track_fixed`) as a JAX function.

    Arguments in the order of the torch function. sh: (X, Y, Z, N) FOD SH coefficients; params:
    :func:`tractfunc.resolve` output (``exact=True`` for exact SH and peaks, the setting for gradients);
    seeds: (B, 3) scanner mm; init_dirs: (B, 3) unit start directions of the seed peak search (sh, seeds and
    init_dirs of one dtype); n_steps: steps per half; affine: (4, 4) voxel -> scanner of the FOD (static);
    mask: an optional :class:`tractfunc.MaskField` (torch, static); temperature: soft termination;
    checkpoint: recompute chunks of this many steps in the backward (saves memory).

    Returns FixedTracks of JAX arrays: vertices (B, 2T+1, 3) mm, valid (B, 2T+1) bool, seed_index (B,) int32,
    accepted (B,) bool, reason_fwd / reason_bwd (B,) int32, weights (B, 2T+1), acceptance (B,) (ones: no ACT here),
    reach (B, 0).  ``jax.grad`` of a loss on
    vertices / weights flows to sh and seeds (init_dirs: zero, the peak does not move within its basin)."""
    sh, seeds, init_dirs = _floating(sh), _floating(seeds), _floating(init_dirs)
    _check_seeds(sh, seeds, init_dirs)
    B, V, dt = seeds.shape[0], 2 * n_steps + 1, sh.dtype
    specs = [_spec((B, V, 3), dt), _spec((B, V), bool), _spec((B,), np.int32), _spec((B,), bool),
             _spec((B,), np.int32), _spec((B,), np.int32), _spec((B, V), dt), _spec((B,), dt), _spec((B, 0), dt)]

    def fn(s, p, d):
        r = _fixed.track_fixed(_field(s, affine, params.precomputed, voxel_sizes), params, p, d, n_steps,
                                  _mask_on(mask, s.device), temperature, checkpoint)
        return r._replace(seed_index=_int32(r.seed_index), reason_fwd=_int32(r.reason_fwd),
                          reason_bwd=_int32(r.reason_bwd))
    return _fixed.FixedTracks(*_bridge(fn, specs, sh, seeds, init_dirs))


class PaddedTracks(NamedTuple):
    """:func:`track`'s result: one row per seed, fixed shapes (S seeds, L = ``max_vertices``).

    vertices: (S, L, 3) scanner mm, each accepted streamline in tckgen order (reversed forward half, seed, backward
    half) from column 0, zeros after it and in the rows of seeds without an accepted streamline; valid: (S, L)
    bool; lengths: (S,) int32 vertex count (0: no accepted streamline); seed_index: (S,) int32 column of the seed
    vertex (0 where none); reasons: (S, 2) int32 :class:`tractfunc.Reason` of each half; accepted: (S,) bool."""
    vertices: jax.Array
    valid: jax.Array
    lengths: jax.Array
    seed_index: jax.Array
    reasons: jax.Array
    accepted: jax.Array


def per_seed(tracks, n_seeds: int, max_vertices: int) -> tuple:
    """Packed :class:`tractfunc.Tracks` -> the torch tensors of :class:`PaddedTracks` (one scatter of the vertices,
    differentiable wrt ``tracks.vertices``).

    Raises:
        TractfuncError: a streamline longer than ``max_vertices``."""
    ln, ids, S, L = tracks.lengths, tracks.seed_ids, n_seeds, max_vertices
    if ln.numel() and int(ln.max()) > L:
        raise TractfuncError(f"a streamline has {int(ln.max())} vertices, more than max_vertices={L}")
    start = torch.cumsum(ln, 0) - ln
    col = torch.arange(tracks.vertices.shape[0], device=ln.device) - start.repeat_interleave(ln)
    flat = ids.repeat_interleave(ln) * L + col                                 # (V,) slot of each vertex
    verts = tracks.vertices.new_zeros(S * L, 3).index_copy(0, flat, tracks.vertices).reshape(S, L, 3)
    lengths = ln.new_zeros(S).index_copy(0, ids, ln)
    valid = torch.arange(L, device=ln.device) < lengths.unsqueeze(1)
    seed_index = ln.new_zeros(S).index_copy(0, ids, tracks.seed_index)
    return verts, valid, _int32(lengths), _int32(seed_index), _int32(tracks.reasons), tracks.accepted


# The field of the last FOD array tracked (JAX arrays are immutable: the same array object, still alive, has the
# same contents), so that repeated calls on one FOD do not rebuild its non-zero mask and lookup table.
_FIELDS: dict = {}


def _field_of(s: torch.Tensor, affine, precomputed: bool, voxel_sizes) -> FODField:
    """The :class:`FODField` of torch FOD tensor ``s``, the first array of the running :func:`_call`; the last field
    built for the same JAX array object, affine and settings is reused."""
    arr = _ARRAYS.get()[0]
    if not isinstance(arr, jax.Array) or isinstance(arr, jax.core.Tracer):
        return _field(s, affine, precomputed, voxel_sizes)
    key = (id(arr), np.asarray(affine, dtype=np.float64).tobytes(), bool(precomputed),
           None if voxel_sizes is None else tuple(float(v) for v in voxel_sizes))
    hit = _FIELDS.get(key)
    if hit is not None and hit[0]() is arr:
        return hit[1]._replace(sh=s)
    f = _field(s, affine, precomputed, voxel_sizes)
    _FIELDS.clear()
    _FIELDS[key] = (weakref.ref(arr), f._replace(sh=None))   # not the volume: the JAX array owns it
    return f


def track(sh, params: TrackParams, seeds, init_dirs, *, affine, mask: Optional[MaskField] = None,
          max_vertices: Optional[int] = None, engine: str = "auto", voxel_sizes=None) -> PaddedTracks:
    """:func:`tractfunc.track` as a JAX function with fixed-shape outputs: the fast path from JAX.

    On the CPU with hard stopping the gradient comes from the fused engine (the C kernel's forward with tckgen's
    decisions, one C reverse sweep; ``engine="follow"``), which "auto" picks whenever JAX differentiates; without
    a gradient "auto" runs the native kernel (float32, tckgen's settings: the same vertices).

    Args:
        sh: (X, Y, Z, N) FOD SH coefficients; params: :func:`tractfunc.resolve` output (tckgen's settings, or
            ``exact=True`` for exact SH and peaks in float32 / float64, the setting for gradient checks).
        seeds: (S, 3) scanner mm; init_dirs: (S, 3) start directions of each seed's peak search (sh, seeds and
            init_dirs of one dtype).
        affine: (4, 4) voxel -> scanner of the FOD (static, NumPy); voxel_sizes: its header voxel sizes (static;
            the native kernel's transform, as :func:`tractfunc.make_field`).
        mask: optional :class:`tractfunc.MaskField` (torch, static).
        max_vertices: L, the static row length (default ``params.max_points + 1``, the most vertices a
            streamline can have: the budget counts both halves, and the backward half adds its first vertex
            before it checks); a longer streamline is an error.
        engine: as :func:`tractfunc.track` (static).
    Returns:
        :class:`PaddedTracks` of JAX arrays; ``jax.grad`` of a loss on ``vertices`` flows to ``sh`` and ``seeds``
        (``init_dirs``: zero, the peak does not move within its basin).
    Raises:
        TractfuncError: mismatched shapes or dtypes, or no static bound on the streamline length."""
    sh, seeds, init_dirs = _floating(sh), _floating(seeds), _floating(init_dirs)
    _check_seeds(sh, seeds, init_dirs)
    L = params.max_points + 1 if max_vertices is None else int(max_vertices)
    if not 1 <= L <= 2 ** 24:
        raise TractfuncError(f"max_vertices must be in [1, 2^24], got {L} (pass max_vertices=; params.max_points is "
                             f"{params.max_points})")
    S, dt = seeds.shape[0], sh.dtype
    specs = [_spec((S, L, 3), dt), _spec((S, L), bool), _spec((S,), np.int32), _spec((S,), np.int32),
             _spec((S, 2), np.int32), _spec((S,), bool)]

    def fn(s, p, d):
        tr = _track.track(_field_of(s, affine, params.precomputed, voxel_sizes), params, p, d,
                          mask=_mask_on(mask, s.device), engine=engine)
        return per_seed(tr, S, L)
    return PaddedTracks(*_bridge(fn, specs, sh, seeds, init_dirs))
