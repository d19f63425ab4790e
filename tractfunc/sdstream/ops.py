"""The fused engine as ``torch.library`` custom ops of fixed shapes: what ``torch.compile``, ``vmap``, ``jacrev`` and
``jacfwd`` see.

:func:`follow_fixed` has :func:`tractfunc.track_fixed`'s contract -- every seed, ``n_steps`` steps per half at most,
padded outputs (:class:`tractfunc.sdstream.fixed.FixedTracks`) -- computed by the fused C engine
(:mod:`tractfunc.sdstream.fused`: the native kernel's decisions, exact or tckgen's values, the C reverse sweep).
Three ops carry it, so that it stays a tensor function under every transform:

* ``tractfunc::follow_fixed`` (forward): a fake kernel gives its shapes from the inputs alone, so
  ``torch.compile(fullgraph=True)`` traces it without a graph break, with the seed count symbolic (no recompile
  across batch sizes);
* ``tractfunc::follow_fixed_vjp`` (backward, an ``autograd.Function``'s): it tracks again (the same decisions, the
  kernel is deterministic) and runs one C reverse sweep per cotangent in its leading dimension; nothing of the
  forward is saved but its inputs.
* vmap rules (``register_vmap``): a batch of seeds joins the seed dimension (one kernel call); a batch of
  cotangents joins the leading dimension of the backward (``jacrev``); a batch of FODs or steps runs one call per
  element.  So ``vmap(jacrev(f))`` gives per-streamline Jacobians.
* forward mode (``torch.func.jvp``, ``jacfwd``; not under ``torch.compile``, which does not trace a custom jvp): a
  third op, ``tractfunc::follow_fixed_jvp``, tracks again and runs one C forward-mode sweep per tangent row
  (tangents of the FOD, the seeds and the step; hard or soft stopping), with a vmap rule like the backward's.

The decisions are discrete (locally constant), as in every engine; the values and derivatives are those of the
primitives (tests/sdstream/test_ops.py compares them with :func:`tractfunc.track_fixed`).
"""
from __future__ import annotations

import functools
from typing import List, Optional, Tuple

import numpy as np
import torch

from ..core.field import FODField, MaskField, tracking_field
from ..core.params import TrackParams
from ..core.sh import LegendreTable
from ..core.shsize import lmax_for
from ..core.stop import Reason
from ..core.tracing import is_vectorized, live_tangent, unwrap
from ..errors import TractfuncError
from .fixed import FixedTracks, length_accepted

Tensor = torch.Tensor


def _params(fp: List[float], ip: List[int]) -> TrackParams:
    """TrackParams from the ops' plain lists (see :func:`_pack`); step is set by the caller."""
    return TrackParams(step=0.0, cutoff=fp[0], cos_angle_step=fp[1], cos_angle_rk4=fp[2], max_points=ip[1],
                       min_points=ip[2], rk4=bool(ip[0]), precomputed=bool(ip[4]), angle=0.0, min_length=0.0,
                       max_length=0.0, peak_polish=ip[3], state_dtype=torch.float32 if ip[6] else None)


def _pack(params: TrackParams, n_steps: int, temperature: Optional[float]) -> Tuple[List[float], List[int]]:
    """The ops' plain arguments: fp = [cutoff, cos_angle_step, cos_angle_rk4, temperature (0: hard)];
    ip = [rk4, max_points, min_points, peak_polish, precomputed, n_steps, state float32]."""
    fp = [float(params.cutoff), float(params.cos_angle_step), float(params.cos_angle_rk4), float(temperature or 0.0)]
    ip = [int(params.rk4), int(params.max_points), int(params.min_points), int(params.peak_polish),
          int(params.precomputed), int(n_steps), int(params.state_dtype == torch.float32)]
    return fp, ip


def _run(sh, nonzero, seeds, init_dirs, step, w2v, mask, mask_w2v, vs, mvs, fp, ip):
    """Kernel and replay on plain tensors -> (packed values, weights or None, tape, ids, reasons, accepted, field,
    params)."""
    from . import fused
    from .track import decision_kernel
    params = _params(fp, ip)._replace(step=float(step))
    table = None
    if params.precomputed and params.peak_polish == 0 and sh.dtype == torch.float64:   # tckgen's search in double
        table = _legendre_table(lmax_for(sh.shape[-1]))
    field = FODField(sh.contiguous(), nonzero, w2v, table, voxel_sizes=tuple(vs) if vs else None)
    mfield = None if mask is None else MaskField(mask, mask_w2v, tuple(mvs) if mvs else None)
    T, temp = ip[5], (fp[3] if fp[3] > 0 else None)
    kernel = decision_kernel(field, params._replace(min_points=0), mfield, soft_steps=T if temp else None,
                             half_steps=0 if temp else T)
    values, weights, tape, ids, reasons, acc, _ = fused.forward(field, params, kernel, seeds, init_dirs, temp,
                                                                own_starts=True)
    return values, weights, tape, ids, reasons, acc, params


@functools.lru_cache(maxsize=None)
def _legendre_table(lmax: int) -> LegendreTable:
    return LegendreTable(lmax, dtype=torch.float64)


def _layout(tape, ids: Tensor, S: int, T: int):
    """Padded positions of the packed rows: (slot (V,) int64 index into the flattened (S, 2T+1) grid, n_fwd (A,),
    total (A,))."""
    ln = torch.from_numpy(tape.lengths)
    si = torch.from_numpy(tape.seed_index)
    row_of = torch.repeat_interleave(ids, ln)
    start = torch.repeat_interleave(torch.cumsum(ln, 0) - ln, ln)
    slot = row_of * (2 * T + 1) + (torch.arange(int(ln.sum())) - start)
    return slot, si, ln


@torch.library.custom_op("tractfunc::follow_fixed", mutates_args=())
def _follow_fixed(sh: Tensor, nonzero: Tensor, seeds: Tensor, init_dirs: Tensor, step: Tensor, w2v: Tensor,
                  mask: Optional[Tensor], mask_w2v: Optional[Tensor], vs: List[float], mvs: List[float],
                  fp: List[float], ip: List[int]) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    S, T = seeds.shape[0], ip[5]
    values, weights, tape, ids, reasons, acc, params = _run(sh, nonzero, seeds, init_dirs, step, w2v, mask,
                                                            mask_w2v, vs, mvs, fp, ip)
    dt = sh.dtype
    slot, n_fwd, total = _layout(tape, ids, S, T)
    verts = torch.zeros(S * (2 * T + 1), 3, dtype=dt).index_copy_(0, slot, values.to(dt))
    valid = torch.zeros(S * (2 * T + 1), dtype=torch.bool).index_fill_(0, slot, True)
    w = torch.zeros(S * (2 * T + 1), dtype=dt).index_copy_(0, slot, weights.to(dt) if weights is not None
                                                            else torch.ones(slot.shape[0], dtype=dt))
    seed_index = torch.zeros(S, dtype=torch.long).index_copy_(0, ids, n_fwd)
    tot = torch.zeros(S, dtype=torch.long).index_copy_(0, ids, total)
    cut = (reasons == int(Reason.CONTINUE)).any(1)
    accepted = (reasons[:, 0] != int(Reason.SEED_REJECTED)) & length_accepted(tot, cut, params.min_points)
    return (verts.reshape(S, 2 * T + 1, 3), valid.reshape(S, 2 * T + 1), seed_index, accepted,
            reasons[:, 0].clone(), reasons[:, 1].clone(), w.reshape(S, 2 * T + 1))


@_follow_fixed.register_fake
def _(sh, nonzero, seeds, init_dirs, step, w2v, mask, mask_w2v, vs, mvs, fp, ip):
    S, L = seeds.shape[0], 2 * ip[5] + 1
    return (sh.new_empty(S, L, 3), torch.empty(S, L, dtype=torch.bool, device=sh.device),
            torch.empty(S, dtype=torch.long, device=sh.device), torch.empty(S, dtype=torch.bool, device=sh.device),
            torch.empty(S, dtype=torch.long, device=sh.device), torch.empty(S, dtype=torch.long, device=sh.device),
            sh.new_empty(S, L))


@torch.library.custom_op("tractfunc::follow_fixed_vjp", mutates_args=())
def _follow_fixed_vjp(sh: Tensor, nonzero: Tensor, seeds: Tensor, init_dirs: Tensor, step: Tensor, w2v: Tensor,
                      mask: Optional[Tensor], mask_w2v: Optional[Tensor], vs: List[float], mvs: List[float],
                      fp: List[float], ip: List[int], g_verts: Tensor, g_weights: Tensor,
                      wants: List[bool]) -> Tuple[Tensor, Tensor, Tensor]:
    """K cotangents (K, S, 2T+1, 3) / (K, S, 2T+1) -> (d/dsh (K, ...) or (0,), d/dseeds (K, S, 3), d/dstep (K,))."""
    from . import fused
    S, T, K = seeds.shape[0], ip[5], g_verts.shape[0]
    _, _, tape, ids, _, _, _ = _run(sh, nonzero, seeds, init_dirs, step, w2v, mask, mask_w2v, vs, mvs, fp, ip)
    slot, _, _ = _layout(tape, ids, S, T)
    g_sh = torch.zeros((K,) + tuple(sh.shape), dtype=sh.dtype) if wants[0] else sh.new_zeros(0)
    g_seeds = torch.zeros(K, S, 3, dtype=seeds.dtype)
    g_step = torch.zeros(K, dtype=sh.dtype)
    soft = tape.weights is not None
    for k in range(K):
        gv = g_verts[k].reshape(-1, 3)[slot]
        gw = g_weights[k].reshape(-1)[slot] if soft else None
        gs, gh = fused.adjoint(tape, gv, gw, g_sh[k] if wants[0] else None)
        g_seeds[k].index_add_(0, ids, torch.from_numpy(gs).to(seeds.dtype))
        g_step[k] = gh
    return g_sh, g_seeds, g_step


@_follow_fixed_vjp.register_fake
def _(sh, nonzero, seeds, init_dirs, step, w2v, mask, mask_w2v, vs, mvs, fp, ip, g_verts, g_weights, wants):
    K, S = g_verts.shape[0], seeds.shape[0]
    g_sh = sh.new_empty((K,) + tuple(sh.shape)) if wants[0] else sh.new_empty(0)
    return g_sh, seeds.new_empty(K, S, 3), sh.new_empty(K)


@torch.library.custom_op("tractfunc::follow_fixed_jvp", mutates_args=())
def _follow_fixed_jvp(sh: Tensor, nonzero: Tensor, seeds: Tensor, init_dirs: Tensor, step: Tensor, w2v: Tensor,
                      mask: Optional[Tensor], mask_w2v: Optional[Tensor], vs: List[float], mvs: List[float],
                      fp: List[float], ip: List[int], t_sh: Tensor, t_seeds: Tensor, t_step: Tensor,
                      has_sh: bool) -> Tuple[Tensor, Tensor]:
    """K tangents (FOD (K, ...) when ``has_sh``, else (0,); seeds (K, S, 3); step (K,)) -> the padded vertices' and
    weights' tangents (K, S, 2T+1, 3), (K, S, 2T+1) (zero where not valid; weights' zero under hard stopping): one C
    forward-mode sweep per tangent row, along the forward's tape (it tracks again, as the backward op does)."""
    from . import fused
    S, T, K = seeds.shape[0], ip[5], t_seeds.shape[0]
    L = 2 * T + 1
    _, _, tape, ids, _, _, _ = _run(sh, nonzero, seeds, init_dirs, step, w2v, mask, mask_w2v, vs, mvs, fp, ip)
    slot, _, _ = _layout(tape, ids, S, T)
    t_verts = torch.zeros(K, S * L, 3, dtype=sh.dtype)
    t_weights = torch.zeros(K, S * L, dtype=sh.dtype)
    for k in range(K):
        dv, dw = fused.jvp(tape, t_sh[k] if has_sh else None, t_seeds[k][ids], float(t_step[k]))
        t_verts[k].index_copy_(0, slot, dv.to(sh.dtype))
        if dw is not None:
            t_weights[k].index_copy_(0, slot, dw.to(sh.dtype))
    return t_verts.reshape(K, S, L, 3), t_weights.reshape(K, S, L)


@_follow_fixed_jvp.register_fake
def _(sh, nonzero, seeds, init_dirs, step, w2v, mask, mask_w2v, vs, mvs, fp, ip, t_sh, t_seeds, t_step, has_sh):
    K, S, L = t_seeds.shape[0], seeds.shape[0], 2 * ip[5] + 1
    return sh.new_empty(K, S, L, 3), sh.new_empty(K, S, L)


@_follow_fixed_jvp.register_vmap
def _(info, in_dims, *args):
    B = info.batch_size
    seeds_b, other_b = _seed_dims(in_dims)
    has_sh = args[15]
    if other_b or (seeds_b and (has_sh or in_dims[14] is not None)):   # FOD or step tangents per batch element
        return _each(torch.ops.tractfunc.follow_fixed_jvp, B, args, in_dims, 2)
    ts = _batch(args[13], in_dims[13], B)   # (B, K, S, 3)
    K, S = ts.shape[1], ts.shape[2]
    if not seeds_b:   # a batch of tangents (jacfwd): more rows of the leading dimension
        th = args[12]
        if has_sh:
            th = _batch(th, in_dims[12], B)
            th = th.reshape((B * K,) + th.shape[2:])
        tstep = _batch(args[14], in_dims[14], B).reshape(B * K)
        tv, tw = torch.ops.tractfunc.follow_fixed_jvp(*args[:12], th, ts.reshape(B * K, S, 3), tstep, has_sh)
        return (tv.reshape((B, K) + tv.shape[1:]), tw.reshape((B, K) + tw.shape[1:])), (0, 0)
    # a batch of seeds (vmap over streamlines), seed tangents only: the blocks join the seed dimension
    s, d = _batch(args[2], in_dims[2], B), _batch(args[3], in_dims[3], B)
    tv, tw = torch.ops.tractfunc.follow_fixed_jvp(
        args[0], args[1], s.reshape(B * S, 3), d.reshape(B * S, 3), *args[4:12], args[12],
        ts.transpose(0, 1).reshape(K, B * S, 3), args[14], has_sh)
    L = tv.shape[2]
    return (tv.reshape(K, B, S, L, 3).transpose(0, 1), tw.reshape(K, B, S, L).transpose(0, 1)), (0, 0)


_CONFIG = slice(5, 12)   # the non-differentiable arguments after step: w2v, mask, mask_w2v, vs, mvs, fp, ip


def _vjp(*args):
    """The backward op; under ``torch.func.grad`` alone (no vmap, no compile) on the plain tensors, since the op has
    no derivative of its own to offer that transform."""
    if torch.compiler.is_compiling() or is_vectorized(*[a for a in args if torch.is_tensor(a)]):
        return torch.ops.tractfunc.follow_fixed_vjp(*args)
    with torch._C._DisableFuncTorch():
        return torch.ops.tractfunc.follow_fixed_vjp(*[unwrap(a) if torch.is_tensor(a) else a for a in args])


class _FollowFixed(torch.autograd.Function):
    """The forward op with the backward op as its derivative (an autograd.Function rather than the op's own
    ``register_autograd``, so that torch.func's grad transforms go through it too; its vmap rule is generated from
    the ops' rules)."""
    generate_vmap_rule = True

    @staticmethod
    def forward(*args):
        return torch.ops.tractfunc.follow_fixed(*args)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:8])
        ctx.save_for_forward(*inputs[:8])
        ctx.lists = inputs[8:]
        ctx.mark_non_differentiable(*output[1:6])

    @staticmethod
    def backward(ctx, g_verts, g_valid, g_si, g_acc, g_rf, g_rb, g_weights):
        tensors = ctx.saved_tensors
        sh, seeds, T = tensors[0], tensors[2], ctx.lists[3][5]
        wants = [bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[2]), bool(ctx.needs_input_grad[4])]
        gv = g_verts if g_verts is not None else sh.new_zeros(seeds.shape[0], 2 * T + 1, 3)
        gw = g_weights if g_weights is not None else sh.new_zeros(seeds.shape[0], 2 * T + 1)
        g_sh, g_seeds, g_step = _vjp(*tensors, *ctx.lists, gv.unsqueeze(0), gw.unsqueeze(0), wants)
        return (g_sh[0] if wants[0] else None, None, g_seeds[0] if wants[1] else None, None,
                g_step[0] if wants[2] else None) + (None,) * 7


class _FollowFixedForward(_FollowFixed):
    """:class:`_FollowFixed` with forward mode (``jvp``, for ``torch.func.jvp`` / ``jacfwd``); Dynamo does not trace a
    Function with a custom jvp, so :func:`follow_fixed` takes this one outside ``torch.compile``."""

    @staticmethod
    def jvp(ctx, t_sh, t_nonzero, t_seeds, t_dirs, t_step, *_):
        """Forward mode wrt the FOD, the seeds and the step (hard or soft stopping): the forward-mode op."""
        tensors = ctx.saved_tensors
        sh, seeds, step = tensors[0], tensors[2], tensors[4]
        has_sh = live_tangent(t_sh)
        th = t_sh.to(sh.dtype).unsqueeze(0) if has_sh else sh.new_zeros(0)
        ts = (t_seeds if t_seeds is not None else torch.zeros_like(seeds)).to(sh.dtype).unsqueeze(0)
        tstep = (t_step if t_step is not None else torch.zeros_like(step)).to(sh.dtype).reshape(1)
        tv, tw = torch.ops.tractfunc.follow_fixed_jvp(*tensors, *ctx.lists, th, ts, tstep, has_sh)
        return (tv[0], None, None, None, None, None, tw[0])


def _batch(x: Optional[Tensor], d: Optional[int], B: int) -> Optional[Tensor]:
    """x with its vmap dimension first, (B, ...), broadcasting an unbatched x."""
    if x is None:
        return None
    return x.movedim(d, 0) if d is not None else x.unsqueeze(0).expand(B, *x.shape)


def _each(op, B: int, args, in_dims, n_out: int):
    """The op once per batch element (a batch of FODs, steps or masks): outputs stacked along dimension 0."""
    moved = [a.movedim(d, 0) if d is not None else a for a, d in zip(args, in_dims)]
    outs = [op(*[a[b] if d is not None else a for a, d in zip(moved, in_dims)]) for b in range(B)]
    return tuple(torch.stack(o) for o in zip(*outs)), (0,) * n_out


def _seed_dims(in_dims) -> Tuple[bool, bool]:
    """(seeds or start directions batched, anything else of the primal batched)."""
    return (in_dims[2] is not None or in_dims[3] is not None,
            any(d is not None for i, d in enumerate(in_dims[:8]) if i not in (2, 3)))


@_follow_fixed.register_vmap
def _(info, in_dims, *args):
    B = info.batch_size
    seeds_b, other_b = _seed_dims(in_dims)
    if other_b:
        return _each(torch.ops.tractfunc.follow_fixed, B, args, in_dims, 7)
    s, d = _batch(args[2], in_dims[2], B), _batch(args[3], in_dims[3], B)   # (B, S, 3): one call for all
    S = s.shape[1]
    out = torch.ops.tractfunc.follow_fixed(args[0], args[1], s.reshape(B * S, 3), d.reshape(B * S, 3), *args[4:])
    return tuple(o.reshape((B, S) + o.shape[1:]) for o in out), (0,) * 7


@_follow_fixed_vjp.register_vmap
def _(info, in_dims, *args):
    B = info.batch_size
    seeds_b, other_b = _seed_dims(in_dims)
    wants = args[14]
    if other_b or (seeds_b and (wants[0] or wants[2])):   # FOD and step gradients sum over seeds: one call each
        return _each(torch.ops.tractfunc.follow_fixed_vjp, B, args, in_dims, 3)
    gv, gw = _batch(args[12], in_dims[12], B), _batch(args[13], in_dims[13], B)   # (B, K, S, L, 3), (B, K, S, L)
    K, S, L = gv.shape[1], gv.shape[2], gv.shape[3]
    if not seeds_b:   # a batch of cotangents (jacrev): more rows of the backward's leading dimension
        g_sh, g_seeds, g_step = torch.ops.tractfunc.follow_fixed_vjp(
            *args[:12], gv.reshape(B * K, S, L, 3), gw.reshape(B * K, S, L), wants)
        sh_out = (g_sh.reshape((B, K) + g_sh.shape[1:]), 0) if wants[0] else (g_sh, None)
        return (sh_out[0], g_seeds.reshape(B, K, S, 3), g_step.reshape(B, K)), (sh_out[1], 0, 0)
    # a batch of seeds (vmap over streamlines), seed gradients only: the blocks join the seed dimension; streamlines
    # are independent, so cotangent k of every block goes into one sweep
    s, d = _batch(args[2], in_dims[2], B), _batch(args[3], in_dims[3], B)
    g_sh, g_seeds, g_step = torch.ops.tractfunc.follow_fixed_vjp(
        args[0], args[1], s.reshape(B * S, 3), d.reshape(B * S, 3), *args[4:12],
        gv.transpose(0, 1).reshape(K, B * S, L, 3), gw.transpose(0, 1).reshape(K, B * S, L), wants)
    return (g_sh, g_seeds.reshape(K, B, S, 3).transpose(0, 1), g_step), (None, 0, None)


def follow_fixed(field: FODField, params: TrackParams, seeds: Tensor, init_dirs: Tensor,
                 n_steps: Optional[int] = None, mask: Optional[MaskField] = None,
                 temperature: Optional[float] = None) -> FixedTracks:
    """:func:`tractfunc.track_fixed`'s result, computed by the fused C engine: ``torch.compile(fullgraph=True)``,
    ``vmap`` and ``jacrev`` go through it (custom ops with fake kernels, an autograd rule and vmap rules).

    Args:
        field: the FOD on the CPU, tckgen's settings (``resolve(vox)``; float64 replays its peak search in double,
            from the starts :func:`tractfunc.track_fixed` takes) or exact peaks (``resolve(vox, exact=True)``), in
            float32 or float64; ``field.sh`` may require grad.
        params: :func:`tractfunc.resolve`'s; ``params.step`` may be a 0-d tensor requiring grad.
        seeds: (S, 3) scanner mm; init_dirs: (S, 3) start directions (normalised by the kernel).
        n_steps: steps per half (None: ``params.max_points``); the outputs hold 2 n_steps + 1 vertices per seed.
        mask: optional tracking mask.
        temperature: None (hard stopping) or soft stopping's T (survival weights in ``weights``).
    Returns:
        :class:`FixedTracks` (S, 2T+1, ...) as :func:`tractfunc.track_fixed` defines it, the decisions the native
        kernel's; ``vertices`` and ``weights`` differentiable wrt ``field.sh``, ``seeds`` and a tensor step.
    Raises:
        TractfuncError: a field or params the fused engine cannot run (see :func:`tractfunc.sdstream.fused.applies`).
    """
    from . import fused
    field = tracking_field(field, params)
    if not fused.applies(field, params):
        raise TractfuncError("follow_fixed runs the fused engine: the CPU, lmax <= 12, tckgen's settings (a float32 "
                             "state only on float32) or exact peaks (resolve(..., exact=True))")
    T = params.max_points if n_steps is None else int(n_steps)
    fp, ip = _pack(params, T, temperature)
    step = params.step if torch.is_tensor(params.step) else torch.tensor(float(params.step), dtype=field.sh.dtype)
    vs = list(field.voxel_sizes) if field.voxel_sizes else []
    m, mw, mvs = (None, None, []) if mask is None else (mask.mask, mask.world_to_voxel,
                                                         list(mask.voxel_sizes) if mask.voxel_sizes else [])
    fn = _FollowFixed if torch.compiler.is_compiling() else _FollowFixedForward
    out = fn.apply(field.sh, field.nonzero, seeds, init_dirs, step, field.world_to_voxel, m, mw, vs, mvs,
                             fp, ip)
    return FixedTracks(*out, acceptance=seeds.new_ones(seeds.shape[:1]), reach=seeds.new_zeros(seeds.shape[0], 0))
