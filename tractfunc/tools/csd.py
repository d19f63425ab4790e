"""FODs for users without MRtrix3: single-shell constrained spherical deconvolution with DIPY, written in
tractfunc's FOD convention (what ``dwi2fod`` writes and ``tckgen`` reads).

* SH basis: MRtrix3 (== DIPY ``tournier07``, ``legacy=False``).  DIPY's CSD fits in its
  ``descoteaux07`` legacy basis; :func:`tractfunc.core.shbasis.to_native` converts exactly.
* Direction frame: scanner (world) axes.  FSL-style bvecs are given in the image's voxel axes, with x
  negated when the voxel->scanner affine has a positive determinant; :func:`fsl_bvecs_to_scanner` undoes
  both as MRtrix3 does on import (``DWI::load_bvecs_bvals``), so the fit -- which DIPY runs in whatever
  frame its gradients are in -- comes out in the scanner frame.  (DIPY's own workflows keep the bvecs as
  given, i.e. the voxel frame; their FODs differ from MRtrix3's by the affine's rotation, e.g. an x mirror
  for the usual LAS-stored images.)

NumPy and DIPY only (no torch).  Shapes: DWI (X, Y, Z, V); bvals (V,) s/mm^2; bvecs (V, 3); FOD
(X, Y, Z, N) with N = (lmax+1)(lmax+2)/2.
"""
from __future__ import annotations

import os
import time
import warnings
from typing import NamedTuple, Optional

import numpy as np

from .. import io
from ..core import shbasis
from ..errors import TractfuncError

B0_MAX = 50.0          # b-values at or below this are b=0 volumes (DIPY's default b0_threshold)
SHELL_TOL = 100.0      # DW b-values within this of their median form one shell


def _require_dipy():
    try:
        import dipy  # noqa: F401
    except ImportError:
        raise TractfuncError("tractfunc fod needs DIPY: pip install 'tractfunc[fod]' (or pip install dipy)") from None


def polar_rotation(affine: np.ndarray) -> np.ndarray:
    """Orthogonal factor (3, 3) of the affine's direction cosines (columns normalised), U V^T of its SVD:
    the rotation (or reflection) MRtrix3 applies to image-frame vectors."""
    M = np.asarray(affine, dtype=np.float64)[:3, :3]
    M = M / np.linalg.norm(M, axis=0, keepdims=True)
    U, _, Vt = np.linalg.svd(M)
    return U @ Vt


def fsl_bvecs_to_scanner(bvecs: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """FSL bvecs (V, 3) (image voxel axes, x negated if det(affine) > 0) -> unit scanner-frame (V, 3).
    Zero vectors (b=0 volumes) stay zero."""
    g = np.array(bvecs, dtype=np.float64)
    if np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3]) > 0:
        g[:, 0] = -g[:, 0]
    g = g @ polar_rotation(affine).T
    n = np.linalg.norm(g, axis=1, keepdims=True)
    return np.where(n > 0, g / np.where(n > 0, n, 1.0), 0.0)


def read_gradients(bval_path: str, bvec_path: str, n_volumes: int):
    """FSL bval/bvec files -> (bvals (V,), bvecs (V, 3) as in the file), validated against the DWI's V."""
    for p in (bval_path, bvec_path):
        if not os.path.exists(p):
            raise TractfuncError(f"{p}: no such file")
    try:
        bvals = np.loadtxt(bval_path, dtype=np.float64, ndmin=1).ravel()
        bvecs = np.loadtxt(bvec_path, dtype=np.float64, ndmin=2)
    except ValueError as e:
        raise TractfuncError(f"{bval_path} / {bvec_path}: not numeric FSL bval/bvec files ({e})") from None
    if bvecs.shape[0] == 3 and bvecs.shape[1] != 3:
        bvecs = bvecs.T
    elif bvecs.shape == (3, 3):
        bvecs = bvecs.T          # FSL's layout: one column per volume
    if bvecs.shape != (n_volumes, 3) or bvals.shape != (n_volumes,):
        raise TractfuncError(f"{bvec_path}: {bvecs.shape} bvecs and {bvals.shape} bvals for a DWI with {n_volumes} "
                             f"volumes; expected 3 x {n_volumes} and {n_volumes} values (FSL format)")
    if not (np.all(np.isfinite(bvals)) and np.all(np.isfinite(bvecs))):
        raise TractfuncError(f"{bval_path} / {bvec_path}: non-finite values")
    dw = bvals > B0_MAX
    if not dw.any():
        raise TractfuncError(f"{bval_path}: no diffusion-weighted volume (all b <= {B0_MAX:g})")
    norms = np.linalg.norm(bvecs[dw], axis=1)
    if np.any(np.abs(norms - 1) > 0.1):
        raise TractfuncError(f"{bvec_path}: {int(np.sum(np.abs(norms - 1) > 0.1))} diffusion-weighted bvecs are not "
                             "unit vectors; expected unit directions for b > 0")
    shell = np.median(bvals[dw])
    if np.any(np.abs(bvals[dw] - shell) > SHELL_TOL):
        raise TractfuncError(f"{bval_path}: b-values {sorted(set(np.round(bvals[dw], -1).tolist()))} form several "
                             "shells; tractfunc fod fits single-shell CSD (use MRtrix3 dwi2fod msmt_csd)")
    return bvals, bvecs


def read_response(path: str, lmax: int) -> np.ndarray:
    """Single-shell WM response from an MRtrix3 text file (``dwi2response``: one row of zonal SH
    coefficients l = 0, 2, ...) -> (lmax/2 + 1,) float64, padded with zeros or cut to ``lmax``."""
    if not os.path.exists(path):
        raise TractfuncError(f"{path}: no such file")
    try:
        rows = np.loadtxt(path, comments="#", dtype=np.float64, ndmin=2)
    except ValueError as e:
        raise TractfuncError(f"{path}: not an MRtrix3 response file ({e})") from None
    if rows.shape[0] != 1 or not np.all(np.isfinite(rows)) or rows[0, 0] <= 0:
        raise TractfuncError(f"{path}: {rows.shape[0]} rows; expected one row of zonal SH coefficients with a "
                             "positive l=0 term (a single-shell dwi2response file)")
    out = np.zeros(lmax // 2 + 1)
    k = min(len(out), rows.shape[1])
    out[:k] = rows[0, :k]
    return out


def brain_mask(data: np.ndarray, b0: np.ndarray) -> np.ndarray:
    """(X, Y, Z) bool brain mask of a DWI (X, Y, Z, V) from its b=0 volumes (V,) bool: DIPY median_otsu."""
    from dipy.segment.mask import median_otsu
    _, mask = median_otsu(data, vol_idx=np.flatnonzero(b0), median_radius=2, numpass=1)
    return mask.astype(bool)


def zonal_response(signal: np.ndarray, bvecs: np.ndarray, axes: np.ndarray, lmax: int) -> np.ndarray:
    """Single-fibre response as zonal SH coefficients (lmax/2 + 1,) (the form of an MRtrix3 response file):
    the least-squares fit of ``S(g) = sum_l c_l Y_l^0(g . e)`` to the DW signals (n, V) of n single-fibre
    voxels, each about its own fibre axis ``e`` (n, 3) (unit, same frame as the unit bvecs (V, 3))."""
    from numpy.polynomial import legendre
    x = (np.asarray(axes, dtype=np.float64) @ np.asarray(bvecs, dtype=np.float64).T).ravel()   # cos(angle), (n*V,)
    cols = [np.sqrt((2 * ell + 1) / (4 * np.pi)) * legendre.legval(x, np.eye(ell + 1)[ell])
            for ell in range(0, lmax + 1, 2)]
    return np.linalg.lstsq(np.stack(cols, 1), np.asarray(signal, dtype=np.float64).ravel(), rcond=None)[0]


def auto_response(gtab, data: np.ndarray, lmax: int, fa_thr: float = 0.7, roi_radii: int = 10):
    """(zonal coefficients (lmax/2 + 1,), voxels used): the voxels with FA > fa_thr within roi_radii voxels
    of the volume centre (DIPY ``mask_for_response_ssst``), each voxel's DW signal taken about its tensor's
    principal axis (:func:`zonal_response`).  Unlike DIPY's ``auto_response_ssst`` (a tensor with its two
    smaller eigenvalues set equal, then fitted by least squares on the DW directions, underdetermined at
    lmax 8 with 32 directions), this fits the measured signal shape, as MRtrix3's amp2response does."""
    from dipy.reconst.csdeconv import mask_for_response_ssst
    from dipy.reconst.dti import TensorModel
    roi = mask_for_response_ssst(gtab, data, roi_radii=roi_radii, fa_thr=fa_thr) > 0
    n = int(roi.sum())
    if n == 0:
        raise TractfuncError(f"no voxel with FA > {fa_thr:g} within {roi_radii} voxels of the volume centre for the "
                             "automatic response; lower --fa-thr or pass --response FILE")
    signal = np.asarray(data[roi], dtype=np.float64)
    axes = TensorModel(gtab).fit(signal).evecs[:, :, 0]
    dw = ~gtab.b0s_mask
    return zonal_response(signal[:, dw], gtab.bvecs[dw], axes, lmax), n


_WORK = None


def _init_worker(work):
    global _WORK
    _WORK = work


def _fit_chunk(signal: np.ndarray):
    """CSD of voxels (n, V) with the worker's (model, X, P, ridge P) -> (coefficients (n, N) DIPY basis,
    voxels that did not converge, voxels refitted with a ridge)."""
    from dipy.reconst.csdeconv import csdeconv
    model, X, P, P_ridge = _WORK
    dw = signal[:, ~model.gtab.b0s_mask]
    out = np.zeros((len(signal), X.shape[1]))
    ridged = 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i, s in enumerate(dw):
            try:
                out[i] = csdeconv(s, X, model.B_reg, tau=model.tau, convergence=model.convergence, P=P)[0]
            except np.linalg.LinAlgError:   # too few constrained directions to make the system definite
                out[i] = csdeconv(s, X, model.B_reg, tau=model.tau, convergence=model.convergence, P=P_ridge)[0]
                ridged += 1
    return out, sum("failed to converge" in str(w.message) for w in caught), ridged


def fit_voxels(model, signal: np.ndarray, jobs: int = 1, ridge: float = 2e-4, chunk: int = 2000):
    """CSD fit of voxels (n, V) with a DIPY ``ConstrainedSphericalDeconvModel`` (DIPY's ``csdeconv``) ->
    (MRtrix3-basis coefficients (n, N) float64, voxels that did not converge, voxels refitted with a 10x
    ridge because the Cholesky solve failed).  jobs > 1 fits chunks in that many processes.

    ridge: Tikhonov term ``ridge * (X^T X)[0, 0]`` added to the normal matrix, MRtrix3 dwi2fod's
    ``norm_lambda`` (1 x 0.0002).  Without it, super-resolved CSD (more SH coefficients than DW directions,
    e.g. lmax 8 from 32) starts from a near-singular solve and fails to converge in most white-matter
    voxels of the Philips data."""
    X = model.R.diagonal() * model.B_dwi            # DIPY's deconvolution matrix (DW rows x N)
    XtX = X.T @ X
    eye = np.eye(len(XtX)) * XtX[0, 0]
    work = (model, X, XtX + ridge * eye, XtX + max(10 * ridge, 1e-6) * eye)
    parts = [signal[i:i + chunk] for i in range(0, len(signal), chunk)]
    if jobs > 1 and len(parts) > 1:
        from concurrent.futures import ProcessPoolExecutor
        with ProcessPoolExecutor(jobs, initializer=_init_worker, initargs=(work,)) as ex:
            results = list(ex.map(_fit_chunk, parts))
    else:
        _init_worker(work)
        results = [_fit_chunk(p) for p in parts]
    coeffs = np.concatenate([r[0] for r in results]) if results else np.zeros((0, X.shape[1]))
    return (shbasis.to_native(coeffs, "descoteaux07_legacy"), sum(r[1] for r in results),
            sum(r[2] for r in results))


class FodResult(NamedTuple):
    """fod: (X, Y, Z, N) float32, MRtrix3 basis, scanner frame; mask: (X, Y, Z) bool fitted voxels;
    response: ('auto' or 'file', zonal coefficients (lmax/2 + 1,));
    response_voxels: voxels the automatic response came from (0 for a file); not_converged: voxels whose
    CSD hit its iteration limit; ridged: voxels refitted with a small ridge (:func:`fit_voxels`);
    seconds: time of the fit alone."""
    fod: np.ndarray
    mask: np.ndarray
    response: tuple
    response_voxels: int
    not_converged: int
    ridged: int
    seconds: float


def compute_fod(data: np.ndarray, affine: np.ndarray, bvals: np.ndarray, bvecs_fsl: np.ndarray,
                mask: Optional[np.ndarray] = None, lmax: int = 8, response=None, fa_thr: float = 0.7,
                roi_radii: int = 10, jobs: int = 1, tau: float = 0.0, ridge: float = 2e-4) -> FodResult:
    """Single-shell CSD FOD of a DWI.

    data: (X, Y, Z, V) signal; affine: (4, 4) voxel -> scanner mm; bvals (V,); bvecs_fsl (V, 3) FSL
    convention; mask: (X, Y, Z) voxels to fit (None: DIPY median_otsu on the b=0 volumes);
    response: None (automatic, :func:`auto_response`) or zonal SH coefficients (lmax/2 + 1,) as from
    :func:`read_response`.  tau: DIPY's non-negativity threshold as a fraction of the mean FOD amplitude
    (0 = MRtrix3's; DIPY's default is 0.1); ridge: see :func:`fit_voxels`.
    Returns :class:`FodResult`; voxels outside the mask are zero."""
    _require_dipy()
    from dipy.core.gradients import gradient_table
    from dipy.reconst.csdeconv import AxSymShResponse, ConstrainedSphericalDeconvModel
    if lmax < 2 or lmax % 2 or lmax > 12:
        raise TractfuncError(f"--lmax {lmax}: expected an even order from 2 to 12")
    gtab = gradient_table(bvals, bvecs=fsl_bvecs_to_scanner(bvecs_fsl, affine), b0_threshold=B0_MAX)
    if mask is None:
        if not gtab.b0s_mask.any():
            raise TractfuncError("no b=0 volume to compute a brain mask from; pass --mask")
        mask = brain_mask(data, gtab.b0s_mask)
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        raise TractfuncError("the mask has no voxel to fit")
    bval = float(np.median(bvals[~gtab.b0s_mask]))
    n_resp = 0
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Number of parameters required")   # super-resolution CSD
        if response is None:
            zonal, n_resp = auto_response(gtab, data, lmax, fa_thr, roi_radii)
            info = ("auto", zonal)
        else:
            zonal = np.asarray(response, dtype=np.float64)
            info = ("file", zonal)
        if zonal[0] <= 0:
            raise TractfuncError(f"response l=0 coefficient {zonal[0]:g}; expected a positive signal")
        model = ConstrainedSphericalDeconvModel(gtab, AxSymShResponse(float(zonal[0]) / np.sqrt(4 * np.pi), zonal,
                                                                      bvalue=bval), sh_order_max=lmax, tau=tau)
        t0 = time.time()
        coeffs, not_conv, ridged = fit_voxels(model, np.asarray(data[mask], dtype=np.float64), jobs, ridge)
        dt = time.time() - t0
    coeffs[~np.isfinite(coeffs).all(-1)] = 0.0
    fod = np.zeros(mask.shape + (coeffs.shape[-1],), dtype=np.float32)
    fod[mask] = coeffs
    return FodResult(fod, mask, info, n_resp, not_conv, ridged, dt)


def save_fod(path: str, fod: np.ndarray, reference) -> None:
    """Write (X, Y, Z, N) float32 to NIfTI with the reference image's affine, qform/sform codes and zooms."""
    from ..io.images import save_nifti
    save_nifti(path, np.asarray(fod, dtype=np.float32), reference.affine,
               descrip="tractfunc fod: DIPY CSD, MRtrix3 SH basis", reference_header=reference.header)


def fod_from_files(dwi: str, bval: str, bvec: str, out: str, mask: Optional[str] = None, lmax: int = 8,
                   response: str = "auto", fa_thr: float = 0.7, roi_radii: int = 10, jobs: int = 1,
                   tau: float = 0.0) -> FodResult:
    """``tractfunc fod``: read the DWI (NIfTI) and FSL gradients, fit, write ``out``; returns the result."""
    _require_dipy()
    if not out.lower().endswith((".nii", ".nii.gz")):
        raise TractfuncError(f"{out}: expected a .nii or .nii.gz output path")
    if jobs < 1:
        raise TractfuncError(f"--jobs must be a positive number of processes, got {jobs}")
    img, data, _ = io.load_nifti(dwi)
    data = np.asarray(data, dtype=np.float32)
    if data.ndim != 4:
        raise TractfuncError(f"{dwi}: DWI has shape {data.shape}; expected 4-D (X, Y, Z, volumes)")
    bvals, bvecs = read_gradients(bval, bvec, data.shape[3])
    msk = None
    if mask:
        m = io.load_mask(mask)
        if m.data.shape != data.shape[:3] or not np.allclose(m.affine, img.affine, atol=1e-4):
            raise TractfuncError(f"{mask}: mask grid {m.data.shape} does not match the DWI grid {data.shape[:3]} "
                                 "(same dimensions and affine expected)")
        msk = m.data
    resp = None if response == "auto" else read_response(response, lmax)
    res = compute_fod(data, np.asarray(img.affine, dtype=np.float64), bvals, bvecs, msk, lmax, resp, fa_thr,
                      roi_radii, jobs, tau)
    save_fod(out, res.fod, img)
    return res


def dominant_peaks(coeffs: np.ndarray, n_sphere: int = 4000, newton: int = 3, chunk: int = 4000) -> np.ndarray:
    """Largest FOD peak per voxel: coeffs (n, N) MRtrix3 basis -> unit directions (n, 3) float64: the best of
    ``n_sphere`` Fibonacci-sphere directions (spacing ~3 deg at 4000), refined by ``newton`` iterations of
    :func:`tractfunc.core.newton.peak` (exact SH evaluation, float64; the sphere direction is kept where
    the refinement does not converge)."""
    import torch
    from ..core import sh
    from ..core.newton import peak
    from ..core.shsize import lmax_for
    from ..core.sphere import fibonacci_sphere
    sphere = fibonacci_sphere(n_sphere)
    B = sh.basis(sphere, lmax_for(coeffs.shape[-1]))
    out = []
    for i in range(0, len(coeffs), chunk):
        c = torch.as_tensor(np.asarray(coeffs[i:i + chunk], dtype=np.float64))
        u = sphere[(c @ B.T).argmax(-1)]
        if newton:
            p = peak(c, u, max_iter=newton).dir
            u = torch.where(torch.isfinite(p).all(-1, keepdim=True), p, u)
        out.append(u.numpy())
    return np.concatenate(out) if out else np.zeros((0, 3))


def peak_angles(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Angles (n,) degrees between the dominant peaks of two FODs (n, N) (MRtrix3 basis, same frame),
    axes compared (0..90).  Never NaN: a voxel without a peak (e.g. an all-zero FOD) contributes the
    direction :func:`dominant_peaks` falls back to (the first sphere direction), so mask such voxels first."""
    pa, pb = dominant_peaks(a), dominant_peaks(b)
    cos = np.clip(np.abs(np.sum(pa * pb, axis=-1)), 0.0, 1.0)
    return np.degrees(np.arccos(cos))
