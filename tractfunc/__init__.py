"""tractfunc: differentiable streamline tractography in PyTorch, faithful to MRtrix3 SD_Stream.

The front door is :func:`track` (any engine, one result type :class:`Tracks`); :func:`track_fixed` is the
fixed-shape functional reference that composes with ``torch.func``, and :func:`follow_fixed` its fused C form
(custom ops: ``torch.compile``, ``vmap``, ``jacrev``). The folders are the layers, each importing
only those below it:

  errors     TractfuncError, the one exception type
  core/      the primitives: SH, interpolation, the Newton peak and its implicit derivative, integration steps,
             stopping rules, fields, parameters, seeds, the Tracks result type
  sdstream/  SD_Stream: the step, the fixed-shape reference, the eager engine, following the kernel's
             decisions, Jacobians, the native C kernel, and the front door with its engine rule
  local/     the DIPY family: discrete peaks, direction getters, probabilistic getters, LocalTracking
  io/        images (NIfTI, .mif) in, tractograms (.tck, .trk, .trx) in and out
  maps/      tractogram -> data: density maps, along-tract sampling, connectomes (hard = MRtrix3, soft = smooth)
  interop/   the JAX front end
  tools/     programs on the library: parity with tckgen, benchmarks, CSD, figures, the phantom, workers
  cli/       the command line (imported by nothing)

Attributes are imported on first use (PEP 562), so ``import tractfunc`` and the command line's
native path do not pay for importing torch until something needs it.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    # the front door and its options
    "track": ("sdstream.track", "track"), "Tracks": ("core.tracks", "Tracks"), "Soft": ("sdstream.engine", "Soft"),
    "Checkpoint": ("sdstream.engine", "Checkpoint"),
    # the functional reference and its pieces
    "track_fixed": ("sdstream.fixed", "track_fixed"), "FixedTracks": ("sdstream.fixed", "FixedTracks"),
    "follow_fixed": ("sdstream.ops", "follow_fixed"),
    "step": ("sdstream.step", "step"), "TrackState": ("sdstream.step", "TrackState"),
    "seed_jacobian": ("sdstream.jacobian", "seed_jacobian"),
    "seed_jacobian_packed": ("sdstream.jacobian", "seed_jacobian_packed"),
    "direction_jacobian": ("sdstream.jacobian", "direction_jacobian"),
    "strongest_peak": ("core.integrate", "strongest_peak"), "euler": ("core.integrate", "euler"),
    "rk4": ("core.integrate", "rk4"), "iterate": ("core.integrate", "iterate"), "sd_next": ("core.integrate", "sd_next"),
    "Peak": ("core.newton", "Peak"), "peak": ("core.newton", "peak"), "attach_peak": ("core.implicit", "attach_peak"),
    "sample_fod": ("core.interpolate", "sample_fod"), "trilinear": ("core.interpolate", "trilinear"),
    "Reason": ("core.stop", "Reason"), "sh": ("core.sh", None), "shbasis": ("core.shbasis", None),
    # inputs
    "FODField": ("core.field", "FODField"), "MaskField": ("core.field", "MaskField"),
    "make_field": ("core.field", "make_field"), "make_mask": ("core.field", "make_mask"),
    "ACTField": ("core.field", "ACTField"), "make_act": ("core.field", "make_act"),
    "Regions": ("sdstream.native", "Regions"), "Sphere": ("sdstream.native", "Sphere"),
    "ImageRegion": ("sdstream.native", "ImageRegion"), "gmwmi_seeder": ("sdstream.native", "gmwmi_seeder"),
    "TrackParams": ("core.params", "TrackParams"), "resolve": ("core.params", "resolve"),
    "random_in_mask": ("core.seeds", "random_in_mask"), "random_directions": ("core.seeds", "random_directions"),
    # files
    "TractfuncError": ("errors", "TractfuncError"), "load_fod": ("io", "load_fod"), "load_mask": ("io", "load_mask"),
    "write_tractogram": ("io", "write_tractogram"), "TrackFile": ("io.tractogram", "TrackFile"),
    "load_tractogram": ("io.tractogram", "load_tractogram"), "save_tractogram": ("io.tractogram", "save_tractogram"),
    "to_stateful_tractogram": ("io.tractogram", "to_stateful_tractogram"),
    "to_nibabel_tractogram": ("io.tractogram", "to_nibabel_tractogram"),
    # tractogram -> data (tckmap, tcksample, tck2connectome; hard and soft forms)
    "maps": ("maps", None), "density": ("maps.tdi", "density"), "soft_density": ("maps.tdi", "soft_density"),
    "sample_stat": ("maps.sample", "sample_stat"), "soft_stat": ("maps.sample", "soft_stat"),
    "connectome": ("maps.connectome", "connectome"), "soft_connectome": ("maps.connectome", "soft_connectome"),
    # the DIPY family
    "closest_peak": ("local.getters", "closest_peak"), "deterministic_maximum": ("local.getters", "deterministic_maximum"),
    "local_tracking": ("local.tracker", "local_tracking"), "probabilistic": ("local.probabilistic", None),
    "deterministic_tracking": ("local.tracking", "deterministic_tracking"),
    "probabilistic_tracking": ("local.tracking", "probabilistic_tracking"),
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
