"""The file boundary: NIfTI / .mif images in, .tck / .trk / .trx tractograms and seed files in and out.

  images      FOD, mask and 5TT images, seed files, tractogram writing
  mif         the MRtrix3 .mif/.mif.gz reader (NumPy only)
  tractogram  .tck/.trk/.trx in memory; DIPY StatefulTractogram and nibabel Tractogram conversion

io imports the core's SH helpers and :mod:`tractfunc.errors`, never a tracker.
"""
from ..errors import TractfuncError
from .images import (Image, TckWriter, load_5tt, load_fod, load_mask, nonfinite_error, read_directions, read_seed_points,
                     same_grid, write_seeds_csv, write_tractogram)
# read_image(path) -> (data, affine (4, 4), voxel sizes (3,)), NIfTI or .mif; load_nifti(path) -> (nibabel
# image, data, affine (4, 4)), checked
from .images import load_nifti, read_image, save_nifti

__all__ = ["TractfuncError", "Image", "TckWriter", "load_5tt", "load_fod", "load_mask", "nonfinite_error",
           "read_directions", "read_seed_points", "same_grid", "write_seeds_csv", "write_tractogram", "read_image",
           "load_nifti", "save_nifti"]
