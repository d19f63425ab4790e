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
  parity       re-tracking tckgen output and measuring agreement
  cli          the command line
"""
from . import sh
from .direction import Peak, peak
from .implicit import attach_peak
from .jacobian import direction_jacobian, seed_jacobian
from .field import FODField, MaskField, make_field, make_mask
from .interpolate import sample_fod, trilinear
from .io import TractfuncError, load_fod, load_mask, write_tractogram
from .params import TrackParams, resolve
from .seeds import random_in_mask
from .integrate import euler, iterate, rk4, sd_next
from .stop import Reason
from .tracking import FixedTracks, PackedTracks, Tractogram, TrackState, step, track, track_fixed, track_packed

__all__ = [
    "sh", "Peak", "peak", "attach_peak", "seed_jacobian", "direction_jacobian", "FODField", "MaskField", "make_field", "make_mask", "sample_fod", "trilinear",
    "TractfuncError", "load_fod", "load_mask", "write_tractogram", "TrackParams", "resolve",
    "random_in_mask", "euler", "iterate", "rk4", "sd_next", "Reason", "FixedTracks", "Tractogram",
    "TrackState", "step", "track", "track_fixed", "track_packed", "PackedTracks",
]
__version__ = "0.1.0"
