"""How :func:`tractfunc.track` runs: the options a caller passes, and the one rule that turns them into an engine.

Every engine draws SD_Stream streamlines with tckgen's bookkeeping; they differ in what they can do:

=========  ==================================================  ====================  ==========================
engine     what runs                                           gradients             stopping
=========  ==================================================  ====================  ==========================
native     the C kernel, tckgen's float32 arithmetic bit for   none                  hard
           bit (:mod:`tractfunc.sdstream.native`)
follow     values along the kernel's discrete decisions:       a C reverse sweep     hard, or soft (fused)
           tckgen's streamlines, in the field's dtype; fused   (fused), else direct
           in C on the CPU with tckgen's settings (float32,
           or float64 with a float64 state) or exact peaks
           (:mod:`tractfunc.sdstream.fused`), else the
           PyTorch primitives (:mod:`~.follow`)
eager      the PyTorch primitives, own decisions, dead         direct                hard
           streamlines dropped between steps
fixed      :func:`tractfunc.track_fixed`: fixed shapes and an  direct or             hard or soft
           alive mask, the readable reference                  checkpointed
=========  ==================================================  ====================  ==========================

``engine="auto"`` (the default of the API and the command line alike) takes the first that applies: native
(float32 on the CPU, no gradient, tckgen's lookup-table peaks), follow (tckgen's lookup-table peaks or exact peaks
on the CPU, not traced by vmap or compile; soft stopping and checkpointing only in its fused form, where
checkpoints are moot), eager (hard stopping, direct gradients), fixed (soft stopping or checkpointing otherwise,
and everything traced). The rule reads only plain values, so the command line applies it before importing torch.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

from ..errors import TractfuncError

ENGINES = ("auto", "native", "follow", "eager", "fixed")


class Soft(NamedTuple):
    """Soft stopping: the cutoff and angle rules no longer stop a streamline; each step multiplies its survival
    weight by ``sigmoid(amp_margin / T) * sigmoid(cos_margin / T)`` (T = ``temperature`` > 0; T -> 0 recovers hard
    stopping). Weights come back in :attr:`Tracks.weights`."""
    temperature: float


class Checkpoint(NamedTuple):
    """Checkpointed gradients: backward recomputes chunks of ``every`` steps instead of storing them (memory
    O(streamlines x steps x state)); the recomputation is bit-identical, so gradients do not change."""
    every: int = 10


Stopping = Optional[Soft]          # None: hard stopping (tckgen)
Gradient = Optional[Checkpoint]    # None: direct autograd


class Job(NamedTuple):
    """Plain-value description of a tracking call, what :func:`choose` decides from.

    dtype: "float32" / "float64"; device: "cpu", "cuda", ...; grad: a derivative is requested (autograd or a
    torch.func transform); lut: tckgen's lookup-table peaks (``params.precomputed``); polish: Newton polish
    iterations; state32: the state is float32 or the dtype's own; numeric_step: the step is a number, not a
    tensor; lmax_ok: lmax <= 12 (the kernel's limit); compiled: the eager engine's compiled Newton move;
    kernel: the native kernel builds and loads on this machine; rk4: the RK4 scheme; traced: under
    ``torch.func.vmap`` (jacrev, jacfwd) or ``torch.compile`` (``grad`` / ``vjp`` alone do not count); narrow: the
    state is rounded to float32 under a float64 dtype."""
    dtype: str
    device: str
    grad: bool
    lut: bool
    polish: int
    state32: bool
    numeric_step: bool
    lmax_ok: bool
    compiled: bool
    kernel: bool
    rk4: bool = False
    traced: bool = False
    narrow: bool = False


def _native_fits(job: Job, stopping: Stopping, gradient: Gradient) -> Optional[str]:
    """None when the native kernel can run ``job``, else why not (one phrase)."""
    if job.dtype != "float32" or job.device != "cpu":
        return "it runs float32 on the CPU"
    if job.grad or gradient is not None:
        return "it has no gradients"
    if stopping is not None:
        return "it stops hard"
    if not (job.lut and job.polish == 0 and job.state32 and job.numeric_step and job.lmax_ok):
        return "it needs tckgen's settings (lookup-table peaks, no polish, float32 state, a numeric step, lmax <= 12)"
    if job.compiled:
        return "compiled applies to the eager engine"
    return None if job.kernel else "the kernel is unavailable on this machine"


def fused_fits(job: Job) -> bool:
    """Whether the follow engine runs in its fused C form (:mod:`tractfunc.sdstream.fused`): the CPU, lmax <= 12,
    exact peaks (``peak_polish > 0``) in either dtype, or tckgen's lookup-table peaks in float32 with tckgen's
    settings or in float64 with a float64 state."""
    lut = job.lut and ((job.dtype == "float32" and job.state32) or (job.dtype == "float64" and not job.narrow))
    return (job.device == "cpu" and job.lmax_ok and job.dtype in ("float32", "float64")
            and (job.polish > 0 or lut))


def _follow_fits(job: Job, stopping: Stopping, gradient: Gradient) -> Optional[str]:
    if job.traced:
        return "its decisions come from the C kernel, which torch.func.vmap and torch.compile do not trace"
    if not ((job.lut or job.polish > 0) and job.lmax_ok):
        return ("it takes tckgen's lookup-table peaks (precomputed=True) or exact peaks (peak_polish > 0), "
                "and lmax <= 12")
    if (stopping is not None or gradient is not None) and not fused_fits(job):
        return ("soft stopping and checkpointing run on its fused C form only: the CPU, tckgen's settings in float32 "
                "or float64 (a float64 state), or exact peaks (peak_polish > 0)")
    if job.compiled:
        return "compiled applies to the eager engine"
    return None if job.kernel else "the kernel is unavailable on this machine"


def choose(job: Job, engine: str = "auto", stopping: Stopping = None, gradient: Gradient = None) -> str:
    """The engine that runs ``job``: ``engine`` itself when it can, the first that applies for "auto".

    Raises:
        TractfuncError: an unknown engine or option, or an explicit engine that cannot run this job (the
            message says why).
    """
    if engine not in ENGINES:
        raise TractfuncError(f"engine must be one of {ENGINES}, got {engine!r}")
    if job.compiled and (job.rk4 or job.polish or job.grad):
        raise TractfuncError("compiled=True fuses the eager engine's Euler Newton move without gradients; it does "
                             "not apply to RK4, peak polishing or a differentiable run")
    if stopping is not None and not (isinstance(stopping, Soft) and stopping.temperature > 0):
        raise TractfuncError(f"stopping must be None (hard) or tractfunc.Soft(temperature > 0), got {stopping!r}")
    if gradient is not None and not (isinstance(gradient, Checkpoint) and int(gradient.every) >= 1):
        raise TractfuncError(f"gradient must be None (direct) or tractfunc.Checkpoint(every >= 1), got {gradient!r}")
    why = {"native": _native_fits, "follow": _follow_fits}
    if engine == "auto":
        if _native_fits(job, stopping, gradient) is None:
            return "native"
        if job.device == "cpu" and _follow_fits(job, stopping, gradient) is None:
            return "follow"
        return "eager" if stopping is None and gradient is None else "fixed"
    if engine in why:
        reason = why[engine](job, stopping, gradient)
        if reason is not None:
            raise TractfuncError(f"engine={engine!r} cannot run this job: {reason}")
    if engine == "eager" and (stopping is not None or gradient is not None):
        raise TractfuncError("engine='eager' stops hard and takes direct gradients; use engine='fixed' for "
                             "soft stopping or checkpointing")
    if engine != "eager" and job.compiled:
        raise TractfuncError("compiled=True applies to the eager engine")
    return engine


def settings(field, params) -> Job:
    """The :class:`Job` fields that ``field`` (:class:`FODField`) and ``params`` fix by their values alone (no
    gradient, no compile, no kernel, not traced): what :func:`fused_fits` reads, and traceable by ``torch.compile``."""
    import torch
    sh = field.sh
    return Job(dtype=str(sh.dtype).replace("torch.", ""), device=sh.device.type, grad=False,
               lut=bool(params.precomputed and field.table is not None), polish=int(params.peak_polish),
               state32=params.state_dtype in (None, torch.float32),
               numeric_step=not torch.is_tensor(params.step), lmax_ok=sh.shape[-1] <= 91, compiled=False,
               kernel=False, rk4=bool(params.rk4),
               narrow=params.state_dtype == torch.float32 and sh.dtype == torch.float64)


def describe(field, params, seeds, compiled: bool = False) -> Job:
    """The :class:`Job` of a Python-API call on ``field`` (:class:`FODField`), ``params`` and ``seeds`` (S, 3)."""
    import torch
    from . import native
    from ..core.tracing import is_tracing, is_vectorized, needs_grad
    sh = field.sh
    return settings(field, params)._replace(
        grad=bool(needs_grad(seeds, sh) or is_tracing(seeds, sh) or torch.is_tensor(params.step)
                  and params.step.requires_grad),
        compiled=bool(compiled), kernel=native.available()[0], traced=is_vectorized(seeds, sh))

