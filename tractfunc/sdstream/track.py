"""The front door: :func:`track`, one call for every SD_Stream engine, returning :class:`tractfunc.Tracks`.

The engine is chosen by :func:`tractfunc.sdstream.engine.choose` (the rule the command line applies too); each
engine keeps its own inner loop, since bit-for-bit parity with tckgen depends on it.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Callable, Optional

import torch

from ..core import fodgrad
from ..core.arrays import as_tensor
from ..core.field import ACTField, FODField, MaskField, tracking_field
from ..core.params import TrackParams
from ..core.seeds import random_directions
from ..core import tracks as T
from ..core.tracks import Tracks
from ..errors import TractfuncError
from . import engine as E
from .eager import track_chunk
from .fixed import track_fixed
from .step import check_inputs

Tensor = torch.Tensor


def decision_kernel(field: FODField, params: TrackParams, mask: Optional[MaskField], act: Optional[ACTField] = None,
                    regions=None, soft_steps: Optional[int] = None, half_steps: int = 0):
    """The native kernel on a float32 CPU copy of the field, with tckgen's settings of ``params`` (and ACT's rules
    with a 5TT image ``act``; soft stopping with ``soft_steps`` steps per half; hard stopping cut after
    ``half_steps`` steps per half, 0 for never): the decider of the follow engine."""
    from . import native
    from ..core.tracing import unwrap
    step = float(unwrap(params.step).detach()) if torch.is_tensor(params.step) else params.step
    with torch._C._DisableFuncTorch():   # plain tensors for the kernel, also under torch.func.grad / vjp
        return native.Kernel.from_field(field._replace(sh=unwrap(field.sh).detach().to("cpu", torch.float32),
                                                       nonzero=field.nonzero.cpu(), grad_token=None, grad_sink=None),
                                        params._replace(step=step, peak_polish=0, state_dtype=torch.float32), mask,
                                        act=act, regions=regions, soft_steps=soft_steps, half_steps=half_steps)


def _follow_chunk(field, params, kernel, seeds, init_dirs, act: Optional[ACTField] = None):
    """Decisions from ``kernel`` (tckgen's arithmetic), values in ``field``'s dtype and device (and ``act``'s
    ``-crop_at_gmwmi`` crops where the kernel made them)."""
    from .follow import follow
    s32, d32 = seeds.detach().float().cpu().numpy(), init_dirs.detach().float().cpu().numpy()
    out = kernel.track(s32, d32, record=bool(params.rk4))
    v, ln, ids, si, r, a = (torch.from_numpy(x) for x in out[:6])
    dev = seeds.device
    seed_peak = None
    if params.rk4:   # RK4's first stages search from the seed peak (Euler searches from each step's own direction)
        # the kernel records it at the seed vertex, negated for a unidirectional streamline (follow() starts the
        # half after the seed from -record: that streamline's only half goes along the peak)
        seed_peak = torch.from_numpy(out[6])[torch.cumsum(ln, 0) - ln + si, :3].to(seeds.dtype).to(dev)
    ids, ln, si = ids.to(dev), ln.to(dev), si.to(dev)
    fol = follow(field, params, seeds[ids], v.to(dev), ln, si, seed_peak)
    verts = fol.vertices
    if act is not None and act.crop_at_gmwmi and ln.numel():   # the kernel's crops, redone in this dtype
        from .act import crop_ends
        verts = crop_ends(act, verts, ln, si, r.to(dev)[ids], v.to(dev))
    if not bool(fol.faithful.all()):
        warnings.warn(f"{int((~fol.faithful).sum())} streamline(s) could not take every step of the native "
                      f"kernel's decisions in {seeds.dtype} (a peak search failed or a step left the image)")
    return verts, ln, ids, si, r.to(dev), a.to(dev)


def _cropped(act: Optional[ACTField], part: Tracks, decided: Optional[Tensor] = None) -> Tracks:
    """``part`` (a fused follow engine's chunk) with tckgen's ``-crop_at_gmwmi`` applied when ``act`` asks for it
    (the kernel cropped its own float32 vertices ``decided``; the fused engine recomputes them as steps): an end is
    cropped where the kernel cropped it (:func:`tractfunc.sdstream.act.crop_ends`)."""
    if act is None or not act.crop_at_gmwmi or not part.lengths.numel():
        return part
    from .act import crop_ends
    return part._replace(vertices=crop_ends(act, part.vertices, part.lengths, part.seed_index,
                                            part.reasons[part.seed_ids], decided))


def track(field: FODField, params: TrackParams, seeds: Tensor, init_dirs: Optional[Tensor] = None, *,
          mask: Optional[MaskField] = None, engine: str = "auto", stopping: E.Stopping = None,
          gradient: E.Gradient = None, n_steps: Optional[int] = None, generator: Optional[torch.Generator] = None,
          chunk_size: int = 20000, progress: Optional[Callable[[int, int, int], None]] = None,
          compiled: bool = False, act: Optional[ACTField] = None, regions=None) -> Tracks:
    """Track SD_Stream streamlines from every seed (tckgen ``-algorithm SD_Stream``), with any engine.

    Differentiable wherever the inputs ask for it: give ``field.sh``, ``seeds`` or ``params.step`` (a 0-d
    tensor) ``requires_grad`` and backpropagate from ``Tracks.vertices`` / ``Tracks.weights``.

    Args:
        field: FOD (:func:`tractfunc.make_field`); params: :func:`tractfunc.resolve` (``exact=True`` for
            gradient checks: exact SH and exact peaks).
        seeds: (S, 3) scanner mm, in the field's dtype and on its device.
        init_dirs: (S, 3) start directions of each seed's peak search (normalised here), or None for uniformly
            random ones from ``generator`` (tckgen's behaviour; :func:`tractfunc.strongest_peak` gives the
            strongest peak instead).
        mask: optional tracking mask (:func:`tractfunc.make_mask`).
        engine: "auto" (default), "native", "follow", "eager" or "fixed"; see
            :mod:`tractfunc.sdstream.engine` for what each does and the rule "auto" applies.
        stopping: None (hard, tckgen) or :class:`tractfunc.Soft` (temperature): survival weights in
            ``Tracks.weights`` (fixed engine, and the follow engine's fused C form).
        gradient: None (direct autograd) or :class:`tractfunc.Checkpoint` (every k steps recomputed in backward; the
            follow engine's fused C form stores 24 to 128 bytes per vertex and needs no checkpoints).
        n_steps: steps per half at most, for the fixed and follow engines (None: ``params.max_points`` under soft
            stopping, else no limit; a half cut there ends with reason CONTINUE and its streamline is kept from 2
            vertices, as :func:`tractfunc.track_fixed` does).
        generator: the source of random start directions.
        chunk_size: seeds per batch (bounds memory).
        progress: called as ``progress(done_seeds, total_seeds, accepted)`` after each chunk.
        compiled: the eager engine's Newton move fused by ``torch.compile`` (float32 results then differ from
            tckgen's arithmetic in the last bits).
        act: a 5TT image (:func:`tractfunc.make_act`) for anatomically-constrained tracking with tckgen's
            ``-act`` rules (resolve ``params`` with ``act=True`` for tckgen's ACT defaults; ``make_act(...,
            crop_at_gmwmi=True)`` for ``-crop_at_gmwmi``).  Runs on the native kernel, and on the follow engine
            (values and gradients along the kernel's ACT decisions).
        regions: tckgen's ROIs (:class:`tractfunc.Regions`: include, ordered include, exclude spheres / images,
            and ``stop``), with tckgen's acceptance, rejection and truncation; native and follow engines.  On the
            fixed engine with ``stopping=Soft(T)``, ``act`` and ``regions`` (include, exclude) are soft: survival
            and acceptance weights in ``Tracks.weights`` (:func:`tractfunc.sdstream.act.soft_act`).
    Returns:
        :class:`tractfunc.Tracks` (``engine`` records which engine ran; ``decisions()`` which discrete decisions
        each streamline took).
    Raises:
        TractfuncError: bad shapes, dtypes or devices, or an engine that cannot run this job.
    """
    seeds = as_tensor(seeds)
    init_dirs = None if init_dirs is None else as_tensor(init_dirs)
    check_inputs(field, seeds, init_dirs)
    field = tracking_field(field, params)
    job = E.describe(field, params, seeds, compiled)
    name = E.choose(job, engine, stopping, gradient)
    if (act is not None or regions is not None) and (name not in ("native", "follow") or stopping is not None) and \
            not (name == "fixed" and stopping is not None):
        raise TractfuncError(f"ACT (act=) and ROIs (regions=) run on the native or follow engine (hard), or softly on "
                             f"the fixed engine (engine='fixed', stopping=Soft(T)), not {name!r}"
                             + (" with soft stopping" if stopping is not None else ""))
    S = seeds.shape[0]
    if init_dirs is None:
        init_dirs = random_directions(S, generator, seeds.dtype, seeds.device)
    if name in ("eager", "fixed"):   # (the kernel normalises in single precision, as tckgen does)
        init_dirs = init_dirs / torch.linalg.vector_norm(init_dirs, dim=-1, keepdim=True)
    kernel = None
    soft = stopping is not None
    if name == "native":
        from . import native
        kernel = native.Kernel.from_field(field, params, mask, act=act, regions=regions)
    elif name == "follow":
        steps = (params.max_points if n_steps is None else int(n_steps)) if soft else None
        kernel = decision_kernel(field, params, mask, act, regions, steps, 0 if n_steps is None else int(n_steps))
    from . import fused
    use_fused = name == "follow" and E.fused_fits(job)
    if name == "eager" or (name == "follow" and not use_fused):   # one compact FOD-gradient buffer for the call
        token, sink = fodgrad.attach(field.sh)
        if sink is not None:
            field = field._replace(grad_token=token, grad_sink=sink)
    parts, offsets, n_acc = [], [], 0
    with contextlib.nullcontext() if job.grad else torch.no_grad():
        for start in range(0, S, chunk_size):
            sl = slice(start, min(S, start + chunk_size))
            s, d = seeds[sl], init_dirs[sl]
            if name == "native":
                part = Tracks(*(torch.from_numpy(x) for x in kernel.track(s.numpy(), d.numpy())), None, name)
            elif use_fused:
                decided = []
                part = _cropped(act, Tracks(*fused.track_fused(field, params, kernel, s, d,
                                                               stopping.temperature if soft else None, decided),
                                            name), decided[0] if fused.replays(field, params) else None)
            elif name == "follow":
                part = Tracks(*_follow_chunk(field, params, kernel, s, d, act), None, name)
            elif name == "eager":
                part = Tracks(*track_chunk(field, params, mask, s, d, compiled=compiled), None, name)
            else:
                part = track_fixed(field, params, s, d, n_steps, mask, stopping.temperature if soft else None,
                                   gradient.every if gradient is not None else 0, act, regions).to_tracks(soft)
            parts.append(part)
            offsets.append(start)
            n_acc += part.lengths.numel()
            if progress is not None:
                progress(sl.stop, S, n_acc)
    return T.concat(parts, offsets) if parts else T.empty(seeds, 0, name)
