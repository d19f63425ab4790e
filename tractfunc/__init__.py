"""tractfunc: differentiable streamline tractography in PyTorch, faithful to MRtrix3 SD_Stream.

Layout (one concept per module):
  sh           real SH basis (MRtrix3 convention), pole-safe derivatives, tckgen's Legendre table
  interpolate  trilinear sampling with MRtrix3's image-edge and zero-voxel rules
  direction    FOD peak by Newton iteration on the sphere (MRtrix3 get_peak, optional exact polish)
  implicit     derivative of the peak by the implicit function theorem (no backprop through Newton)
  integrate    Euler / RK4 steps composed from SD_Stream's elementary move
  stop         stopping rules and reason codes
  params       tckgen defaults from the voxel size
  field        FOD and mask containers
  tracking     TrackState, the pure step, eager and fixed-shape bidirectional trackers
               (soft termination, checkpointed backward)
  jacobian     per-streamline Jacobians of vertices wrt seeds / initial directions, batched
  seeds        seed generation with an explicit torch.Generator
  io           NIfTI in, .tck/.trk out, seed files
  phantom      built-in synthetic FOD phantom
  native       C kernel: SD_Stream with tckgen's exact float32 arithmetic (fast forward tracking)
  parity       re-tracking tckgen output and measuring agreement
  cli          the command line

Attributes are imported on first use (PEP 562), so ``import tractfunc`` and the command line's
native path do not pay for importing torch until something needs it.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "sh": None, "Peak": "direction", "peak": "direction", "attach_peak": "implicit",
    "seed_jacobian": "jacobian", "direction_jacobian": "jacobian",
    "FODField": "field", "MaskField": "field", "make_field": "field", "make_mask": "field",
    "sample_fod": "interpolate", "trilinear": "interpolate",
    "TractfuncError": "io", "load_fod": "io", "load_mask": "io", "write_tractogram": "io",
    "TrackParams": "params", "resolve": "params", "random_in_mask": "seeds",
    "euler": "integrate", "iterate": "integrate", "rk4": "integrate", "sd_next": "integrate",
    "Reason": "stop", "FixedTracks": "tracking", "Tractogram": "tracking", "TrackState": "tracking",
    "step": "tracking", "track": "tracking", "track_fixed": "tracking", "track_packed": "tracking",
    "PackedTracks": "tracking",
}
__all__ = list(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'tractfunc' has no attribute {name!r}")
    mod = _EXPORTS[name]
    value = importlib.import_module(f".{name if mod is None else mod}", __name__)
    if mod is not None:
        value = getattr(value, name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
