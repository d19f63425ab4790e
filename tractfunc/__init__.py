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
  follow       recompute given streamlines in any dtype with their decisions held fixed (float64 and
               gradients along tckgen's own streamlines)
  jacobian     per-streamline Jacobians of vertices wrt seeds / initial directions, batched
  seeds        seed generation with an explicit torch.Generator
  peaks        DIPY-style peak extraction on a discrete sphere
  getters      DIPY's closest-peak and deterministic-maximum direction getters (hard, soft, straight-through)
  probabilistic  DIPY probabilistic and iFOD1-like sampling getters, Gumbel-softmax, REINFORCE
  local        DIPY LocalTracking: fixed-step Euler, threshold/binary stopping, bidirectional assembly
  shbasis      conversions between MRtrix3/tournier07 and descoteaux07 SH bases (legacy and not)
  io           NIfTI and .mif images in, .tck/.trk/.trx out, seed files
  mif          the MRtrix3 .mif/.mif.gz reader (NumPy only)
  tractogram   .tck/.trk/.trx in memory; DIPY StatefulTractogram and nibabel Tractogram conversion
  arrays       the DLPack/NumPy boundary (zero-copy inputs)
  jax          JAX front end: custom_vjp wrappers whose gradients run through torch autograd
  csd          FODs from a DWI with DIPY CSD, in the MRtrix3 basis (``tractfunc fod``)
  render       direction-coloured tractogram figures (``tractfunc render``)
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
    "sh": ("core.sh", None), "Peak": ("core.newton", 'Peak'), "peak": ("core.newton", 'peak'),
    "attach_peak": ("core.implicit", 'attach_peak'), "seed_jacobian": ("sdstream.jacobian", 'seed_jacobian'),
    "direction_jacobian": ("sdstream.jacobian", 'direction_jacobian'), "FODField": ("core.field", 'FODField'),
    "MaskField": ("core.field", 'MaskField'), "make_field": ("core.field", 'make_field'),
    "make_mask": ("core.field", 'make_mask'), "sample_fod": ("core.interpolate", 'sample_fod'),
    "trilinear": ("core.interpolate", 'trilinear'), "TractfuncError": ("errors", 'TractfuncError'),
    "load_fod": ("io", 'load_fod'), "load_mask": ("io", 'load_mask'), "write_tractogram": ("io", 'write_tractogram'),
    "TrackParams": ("core.params", 'TrackParams'), "resolve": ("core.params", 'resolve'),
    "random_in_mask": ("core.seeds", 'random_in_mask'), "euler": ("core.integrate", 'euler'),
    "iterate": ("core.integrate", 'iterate'), "rk4": ("core.integrate", 'rk4'),
    "sd_next": ("core.integrate", 'sd_next'), "Reason": ("core.stop", 'Reason'),
    "FixedTracks": ("sdstream.tracking", 'FixedTracks'), "Tractogram": ("sdstream.tracking", 'Tractogram'),
    "TrackState": ("sdstream.tracking", 'TrackState'), "step": ("sdstream.tracking", 'step'),
    "track": ("sdstream.tracking", 'track'), "track_fixed": ("sdstream.tracking", 'track_fixed'),
    "track_packed": ("sdstream.tracking", 'track_packed'), "PackedTracks": ("sdstream.tracking", 'PackedTracks'),
    "Tracks": ("io.tractogram", 'Tracks'), "load_tractogram": ("io.tractogram", 'load_tractogram'),
    "save_tractogram": ("io.tractogram", 'save_tractogram'),
    "to_stateful_tractogram": ("io.tractogram", 'to_stateful_tractogram'),
    "to_nibabel_tractogram": ("io.tractogram", 'to_nibabel_tractogram'),
    "closest_peak": ("local.getters", 'closest_peak'),
    "deterministic_maximum": ("local.getters", 'deterministic_maximum'),
    "local_tracking": ("local.tracker", 'local_tracking'), "shbasis": ("core.shbasis", None),
    "deterministic_tracking": ("local.tracking", 'deterministic_tracking'),
    "probabilistic_tracking": ("local.tracking", 'probabilistic_tracking'),
    "probabilistic": ("local.probabilistic", None),
}
__all__ = list(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'tractfunc' has no attribute {name!r}")
    mod, attr = _EXPORTS[name]
    value = importlib.import_module(f".{mod}", __name__)
    if attr is not None:
        value = getattr(value, attr)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
