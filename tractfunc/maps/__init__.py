"""From tractogram to data: density maps, along-tract sampling and connectomes, each hard (equal to the MRtrix3
command on the same tractogram) and soft (a smooth relaxation whose gradient reaches the vertices and weights).

  grid       a template grid and MRtrix3's scanner -> voxel rule (realigned axes, float32, std::round)
  packed     packed streamlines: checks, streamline ids, ends, tckmap's Hermite upsampling
  voxelise   which voxels a streamline visits: vertices, endpoints, precise chord lengths (tckmap's mapper)
  tdi        track density images: tckmap -template (counts, -precise, -ends_only, -dec, -tck_weights_in)
  sample     a scalar image along each streamline: tcksample -stat_tck mean / median / min / max
  connectome endpoint connectomes from a parcellation: tck2connectome
  fixels     FOD -> fixels (fod2fixel's FMLS segmentation), streamline -> fixel lengths (tcksift2's mapping)
  sift2      SIFT2 streamline weights: tcksift2 (hard) and a differentiable fit with implicit gradients (soft)

maps imports only :mod:`tractfunc.core` and :mod:`tractfunc.errors` (layer 2, beside sdstream, local and io).
"""
from .grid import Grid, make_grid
from .tdi import density, soft_density
from .sample import sample_stat, sample_vertices, soft_stat
from .connectome import assign, connectome, soft_assign, soft_connectome
from .fixels import Fixels, fixel_integrals, map_streamlines, segment, soft_lengths
from .sift2 import sift2, soft_sift2

__all__ = ["Grid", "make_grid", "density", "soft_density", "sample_stat", "sample_vertices", "soft_stat", "assign", "connectome",
           "soft_assign", "soft_connectome", "Fixels", "segment", "map_streamlines", "soft_lengths", "fixel_integrals", "sift2",
           "soft_sift2"]
