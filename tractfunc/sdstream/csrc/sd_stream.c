/* Native CPU kernel: SD_Stream tracking in single precision, following the arithmetic of MRtrix3 3.0.3's
 * tckgen operation for operation (types, evaluation order, the same libm calls), so that on the same
 * C library it draws the same float32 streamlines.  Written for tractfunc from the algorithm's
 * description and from checking tckgen's machine code; it shares no code with MRtrix3.
 *
 * Conventions
 *   - Voxel coordinates are in MRtrix3's realigned frame (axes permuted / flipped towards RAS); the
 *     caller passes strides that map that frame onto its array, and scanner->voxel transforms for it.
 *   - Every quantity that tckgen stores as float is a float here; every expression that C++ promotes to
 *     double (a double literal or constant in it) is evaluated in double here too, then rounded.
 *   - Must be compiled without floating-point contraction or reassociation (-ffp-contract=off, no
 *     -ffast-math): the rounding of every operation is what is being reproduced.
 *
 * Soft stopping (config.soft; tractfunc.Soft): only leaving the image or the mask and a failed peak search stop a
 * half, which takes at most soft_steps steps; each step records its stopping margins (amplitude above the cutoff,
 * cosine of the turn above the limit) for the survival weights the fused engine computes (fused.py).
 *
 * Termination codes (tractfunc.stop.Reason): 0 continue, 1 left the image, 2 cutoff / no peak,
 * 3 curvature, 4 left the mask, 5 vertex budget reached, 6 seed rejected; with ACT (a 5TT image) also
 * 7 entered cortical GM, 8 entered CSF, 9 terminated in sub-cortical GM, 10 exited sub-cortical GM; with ROIs
 * 11 entered an exclusion region (rejected), 12 traversed every include region (-stop).
 *
 * ACT (anatomically-constrained tracking, tckgen -act; off when act is NULL) follows tckgen 3.0.3's rules:
 * tissue fractions trilinearly interpolated on the 5TT image's own grid after each step (after the mask
 * test's place in the order: structural test first), the seed test (sub-cortical GM, or WM near the
 * GM-WM interface), the unidirectional seeds at the interface, the priors that reject a streamline (entered
 * CSF, too long, poor termination outside sub-cortical GM) and the truncation on leaving sub-cortical GM at
 * the vertex of lowest FOD amplitude along the path.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <pthread.h>

#define R_CONTINUE 0
#define R_EXIT_IMAGE 1
#define R_CUTOFF 2
#define R_CURVATURE 3
#define R_EXIT_MASK 4
#define R_MAX_LENGTH 5
#define R_SEED_REJECTED 6
#define R_ENTER_CGM 7
#define R_ENTER_CSF 8
#define R_TERM_IN_SGM 9
#define R_EXIT_SGM 10
#define R_ENTER_EXCLUDE 11
#define R_ALL_INCLUDE 12

#define TISSUE_SUM_THRESHOLD 0.5
#define GMWMI_ACCURACY 0.01
#define GMWMI_NORMAL_PERTURBATION 0.001

#define MAX_COEF 91          /* lmax 12 */
#define MAX_AL 64            /* (lmax/2 + 1)^2 for lmax 14 */

/* A volume on its own grid: value k at voxel (x, y, z) = data[x*s0 + y*s1 + z*s2 + k*sk], in MRtrix3's realigned
 * frame; the voxels holding any non-zero value (same frame), uint8; scanner mm -> voxel (double, row-major 3x4). */
typedef struct {
    const float *data;
    int64_t stride[4];
    int64_t dim[3];
    const uint8_t *nonzero;
    int64_t nz_stride[3];
    double s2v[12];
} sd_volume;

/* A region: an image (mask != NULL: nearest voxel non-zero, on its own grid, single-precision transform) or a
 * sphere (mask NULL: squared distance from centre <= radius2), as MRtrix3's ROI. */
typedef struct {
    const uint8_t *mask;
    int64_t dim[3];
    int64_t stride[3];
    float s2v[12];
    float centre[3];
    float radius2;
} sd_roi;

#define MAX_ROIS 64

typedef struct {
    sd_volume fod;            /* the FOD, ncoef SH coefficients per voxel */
    int32_t ncoef;
    int32_t lmax;
    sd_roi mask;              /* the tracking mask (its mask NULL: none) */
    /* Legendre lookup table: al[n * al_n + index_mpos(l, m)], n < al_ndir */
    const float *al;
    int32_t al_ndir;
    int32_t al_n;
    float al_inc;
    /* parameters */
    float step;
    float threshold;
    float dot_threshold;      /* first-order angle test (cos); -1 disables in practice */
    float cos_max_angle_ho;   /* RK4 angle test (cos) */
    int32_t rk4;
    int64_t max_points;
    int64_t min_points;
    /* optional ACT 5TT image (data NULL: no ACT): tissues cortical GM, sub-cortical GM, WM, CSF, pathological */
    sd_volume act;
    /* ROIs (tckgen -include, -include_ordered, -exclude; at most MAX_ROIS of each) and -stop */
    const sd_roi *include;
    int32_t n_include;
    const sd_roi *ordered;
    int32_t n_ordered;
    const sd_roi *exclude;
    int32_t n_exclude;
    int32_t stop_on_all_include;
    int32_t unidirectional;   /* tckgen -seed_unidirectional: one half from each seed, the seed first */
    /* soft stopping (tractfunc's Soft; off when 0): the cutoff and the angle no longer stop a streamline, and only
     * steps that hard tracking would still take count towards max_points (tractfunc.sdstream.step.step with a
     * temperature); no ACT or ROIs */
    int32_t soft;
    /* steps per half at most (0: no limit; soft stopping needs one): a half still running after them stops with
     * R_CONTINUE and the streamline is accepted from 2 vertices (tractfunc.track_fixed's n_steps); min_points 0
     * then accepts every streamline whose seed passed (the caller applies the length rule) */
    int64_t half_steps;
    /* tckgen -crop_at_gmwmi (with ACT): a half that enters cortical GM ends at the GM-WM interface instead; an
     * accepted streamline of at most min_points_postds or at least max_points_postds vertices is then measured
     * (min_dist, max_dist mm); act_min_vox: the 5TT image's smallest voxel size (mm) */
    int32_t crop_at_gmwmi;
    int64_t min_points_postds, max_points_postds;
    float min_dist, max_dist, act_min_vox;
} sd_config;

static inline int index_sh(int l, int m) { return l * (l + 1) / 2 + m; }
static inline int index_mpos(int l, int m) { return l * l / 4 + m; }

/* ------------------------------------------------------------------------------------------------ */
/* Associated Legendre table                                                                         */

static double plm_helper(double x, double m) {
    return m < 1.0 ? 1.0 : x * (m - 1.0) / m * plm_helper(x, m - 2.0);
}

/* Orthonormal associated Legendre values N_lm P_l^m(x) for l = m..lmax into a[l], single precision. */
static void plm_sph(float *a, int lmax, int m, float x) {
    float x2 = x * x;
    if (m && x2 >= 1.0) {
        for (int n = m; n <= lmax; ++n) a[n] = 0.0f;
        return;
    }
    a[m] = (float)0.282094791773878;
    if (m) a[m] = (float)((double)a[m] * sqrt((double)(float)(2 * m + 1) * plm_helper(1.0 - (double)x2, 2.0 * m)));
    if (m & 1) a[m] = -a[m];
    if (lmax == m) return;
    float f = sqrtf((float)(2 * m + 3));
    a[m + 1] = x * f * a[m];
    for (int n = m + 2; n <= lmax; n++) {
        a[n] = x * a[n - 1] - a[n - 2] / f;
        f = sqrtf((float)(4 * n * n - 1) / (float)(n * n - m * m));
        a[n] *= f;
    }
}

int32_t sd_al_size(int32_t lmax) { return (lmax / 2 + 1) * (lmax / 2 + 1); }

/* Fill out[ndir * sd_al_size(lmax)] with the table at elevations n * inc, inc = float(pi / (ndir-1)). */
float sd_build_al(int32_t lmax, int32_t ndir, float *out) {
    const int nal = sd_al_size(lmax);
    const float inc = (float)(3.14159265358979323846 / (ndir - 1));
    float buf[16];
    for (int n = 0; n < ndir; n++) {
        float *p = out + (int64_t)n * nal;
        float cos_el = cosf((float)n * inc);
        for (int m = 0; m <= lmax; m++) {
            plm_sph(buf, lmax, m, cos_el);
            for (int l = (m & 1) ? m + 1 : m; l <= lmax; l += 2) p[index_mpos(l, m)] = buf[l];
        }
    }
    return inc;
}

/* ------------------------------------------------------------------------------------------------ */
/* SH derivatives and the Newton peak search                                                        */

typedef struct {
    float amp, d_el, d_az, d2_el, d2_elaz, d2_az;
    float sel, cel, caz1, saz1;   /* sin/cos of the elevation and azimuth, for the Newton update */
} sh_derivs;

/* Constants of the (el, az) derivative formulas: each is the value sqrtf / the int->float conversion
 * would give where tckgen evaluates it inline, precomputed once (same bits, fewer instructions). */
#define MAXL 14
typedef struct { float s_lo, s_hi, mid, s_lo2, s_hi2; } pair_consts;
static float Z1[MAXL + 1], Z2[MAXL + 1], ZLL[MAXL + 1];
static pair_consts PC[MAXL + 1][MAXL + 1];
static pthread_once_t consts_once = PTHREAD_ONCE_INIT;

static void init_consts(void) {
    for (int l = 0; l <= MAXL; l += 2) {
        Z1[l] = sqrtf((float)(l * (l + 1)));
        Z2[l] = sqrtf((float)(l * (l + 1) * (l - 1) * (l + 2)));
        ZLL[l] = (float)(l * (l + 1));
        for (int m = 1; m <= l; m++) {
            pair_consts *k = &PC[l][m];
            k->s_lo = sqrtf((float)((l + m) * (l - m + 1)));
            k->s_hi = l > m ? sqrtf((float)((l - m) * (l + m + 1))) : 0.0f;
            k->mid = (float)(-((l + m) * (l - m + 1) + (l - m) * (l + m + 1)));
            k->s_lo2 = sqrtf((float)((l + m) * (l - m + 1) * (l + m - 1) * (l - m + 2)));
            k->s_hi2 = l > m + 1 ? sqrtf((float)((l - m) * (l + m + 1) * (l - m - 1) * (l + m + 2))) : 0.0f;
        }
    }
}

static void derivatives(const sd_config *c, const float *sh, float el, float az, sh_derivs *o) {
    const int lmax = c->lmax;
    float sel = sinf(el);
    float cel = cosf(el);
    int atpole = sel < 1e-4;
    float d_el = 0.0f, d_az = 0.0f, d2_el = 0.0f, d2_elaz = 0.0f, d2_az = 0.0f;
    float AL[MAX_AL];

    /* interpolated table row */
    float f2 = el / c->al_inc, f1;
    int i = (int)f2;
    if (i < 0) { i = 0; f1 = 1.0f; f2 = 0.0f; }
    else if (i >= c->al_ndir - 1) { i = c->al_ndir - 1; f1 = 1.0f; f2 = 0.0f; }
    else { f2 -= (float)i; f1 = (float)(1.0 - (double)f2); }
    const float *p1 = c->al + (int64_t)i * c->al_n;
    const float *p2 = p1 + c->al_n;
    const int nal = (lmax / 2 + 1) * (lmax / 2 + 1);
    if (f2 != 0.0f)
        for (int k = 0; k < nal; k++) AL[k] = f1 * p1[k] + f2 * p2[k];
    else
        for (int k = 0; k < nal; k++) AL[k] = f1 * p1[k];

    float amp = sh[0] * AL[0];
    for (int l = 2; l <= lmax; l += 2) {
        const float v = sh[index_sh(l, 0)];
        const float *A = AL + index_mpos(l, 0);
        amp += v * A[0];
        d_el += v * Z1[l] * A[1];
        d2_el = (float)((double)d2_el + (double)(v * (Z2[l] * A[2] - ZLL[l] * A[0])) / 2.0);
    }
    float caz1 = 0.0f, saz1 = 0.0f;
    for (int m = 1; m <= lmax; m++) {
        const float cm = cosf((float)m * az), sm = sinf((float)m * az);
        if (m == 1) { caz1 = cm; saz1 = sm; }
        const float caz = (float)(1.41421356237309504880 * (double)cm);
        const float saz = (float)(1.41421356237309504880 * (double)sm);
        const float fm = (float)m;
        for (int l = (m & 1) ? m + 1 : m; l <= lmax; l += 2) {
            const pair_consts *k = &PC[l][m];
            const float *A = AL + index_mpos(l, m);   /* A[j] = AL(l, m + j) */
            const float vp = sh[index_sh(l, m)];
            const float vm = sh[index_sh(l, -m)];
            const float w = vp * caz + vm * saz;
            amp += w * A[0];

            float tmp = k->s_lo * A[-1];
            if (l > m) tmp -= k->s_hi * A[1];
            tmp = (float)((double)tmp / -2.0);
            d_el += w * tmp;

            float tmp2 = k->mid * A[0];
            if (m == 1) tmp2 -= k->s_lo2 * A[0];
            else tmp2 += k->s_lo2 * A[-2];
            if (l > m + 1) tmp2 += k->s_hi2 * A[2];
            tmp2 = (float)((double)tmp2 / 4.0);
            d2_el += w * tmp2;

            const float wr = vm * caz - vp * saz;
            if (atpole) {
                d_az += wr * tmp;
            } else {
                d2_elaz += fm * wr * tmp;
                d_az += fm * wr * A[0];
                d2_az -= w * fm * fm * A[0];
            }
        }
    }
    if (!atpole) {
        d_az /= sel;
        d2_elaz /= sel;
        d2_az /= sel * sel;
    }
    o->amp = amp; o->d_el = d_el; o->d_az = d_az; o->d2_el = d2_el; o->d2_elaz = d2_elaz; o->d2_az = d2_az;
    o->sel = sel; o->cel = cel; o->caz1 = caz1; o->saz1 = saz1;
}

/* Eigen's reduction order for 3-vectors: a0 + (a1 + a2). */
static inline float dot3(const float *a, const float *b) { return a[0] * b[0] + (a[1] * b[1] + a[2] * b[2]); }

static inline void normalize3(float *u) {
    float n = dot3(u, u);
    if (n > 0.0f) {
        float s = sqrtf(n);
        u[0] /= s; u[1] /= s; u[2] /= s;
    }
}

/* Newton ascent on the sphere from u (unit, updated in place).  Returns the amplitude, or NaN (u NaN)
 * when 50 iterations did not converge. */
static float get_peak(const sd_config *c, const float *sh, float *u) {
    for (int it = 0; it < 50; it++) {
        float az = atan2f(u[1], u[0]);
        float el = acosf(u[2]);
        sh_derivs d;
        derivatives(c, sh, el, az, &d);
        float del = sqrtf(d.d_el * d.d_el + d.d_az * d.d_az);
        float daz = 0.0f;
        if (del != 0.0f) {
            daz = d.d_az / del;
            del = d.d_el / del;
        }
        float dt_num = daz * d.d_az + del * d.d_el;
        float dt2 = (float)((double)(daz * daz * d.d2_az) + 2.0 * (double)daz * (double)del * (double)d.d2_elaz
                            + (double)(del * del * d.d2_el));
        float dt = dt2 != 0.0f ? (float)(double)(-dt_num / dt2) : 0.0f;
        if (dt < 0.0) dt = -dt;
        if (dt > 0.2) dt = (float)0.2;
        del *= dt;
        daz *= dt;
        /* the same libm results as sinf/cosf of az and el (computed once, in derivatives) */
        float saz = d.saz1, caz = d.caz1, sel = d.sel, cel = d.cel;
        u[0] += del * caz * cel - daz * saz;
        u[1] += del * saz * cel + daz * caz;
        u[2] -= del * sel;
        normalize3(u);
        if (dt < 1e-4) return d.amp;
    }
    u[0] = u[1] = u[2] = NAN;
    return NAN;
}

/* ------------------------------------------------------------------------------------------------ */
/* Sampling                                                                                          */

static inline int64_t clampi(int64_t x, int64_t dim) { return x < 0 ? 0 : (x >= dim ? dim - 1 : x); }

/* Trilinear values (ncoef of them) of a (dim, ncoef) float volume at scanner position pos (MRtrix3's linear
 * interpolator, masked when `masked`); returns 0 when outside the image or (masked) where the nearest voxel is all
 * zero. */
static inline int sample_any(const sd_volume *vol, int ncoef, const float *pos, float *values, int masked) {
    const int64_t *stride = vol->stride, *dim = vol->dim, *nz_stride = vol->nz_stride;
    const uint8_t *nonzero = vol->nonzero;
    const float *data = vol->data;
    double v[3];
    {
        /* Eigen's affine * vector: rows 0-1 as a 2-wide SIMD product, row 2 scalar, each in its order */
        const double *s = vol->s2v, p0 = pos[0], p1 = pos[1], p2 = pos[2];
        v[0] = ((s[0] * p0 + s[1] * p1) + s[2] * p2) + s[3];
        v[1] = ((s[4] * p0 + s[5] * p1) + s[6] * p2) + s[7];
        v[2] = (s[10] * p2 + s[11]) + (s[8] * p0 + s[9] * p1);
    }
    for (int i = 0; i < 3; i++)
        if (!(v[i] > -0.5 && v[i] < (double)dim[i] - 0.5)) return 0;
    if (masked) {
        int64_t o = 0;
        for (int i = 0; i < 3; i++) o += (int64_t)round(v[i]) * nz_stride[i];
        if (!nonzero[o]) return 0;
    }
    double f[3];
    int64_t base[3];
    for (int i = 0; i < 3; i++) {
        double fl = floor(v[i]);
        f[i] = v[i] - fl;
        base[i] = (int64_t)fl;
        if (v[i] < 0.0 || v[i] > ((double)dim[i] - 0.5) - 0.5) f[i] = 0.0;
    }
    const float xw[2] = {(float)(1 - f[0]), (float)f[0]};
    const float yw[2] = {(float)(1 - f[1]), (float)f[1]};
    const float zw[2] = {(float)(1 - f[2]), (float)f[2]};
    float w[8];
    const float *src[8];
    int k = 0;
    for (int z = 0; z < 2; z++) {
        int64_t oz = clampi(base[2] + z, dim[2]) * stride[2];
        for (int y = 0; y < 2; y++) {
            int64_t oy = clampi(base[1] + y, dim[1]) * stride[1];
            float pw = yw[y] * zw[z];
            for (int x = 0; x < 2; x++) {
                int64_t ox = clampi(base[0] + x, dim[0]) * stride[0];
                w[k] = xw[x] * pw;
                if (w[k] < 1e-6f) w[k] = 0.0f;
                src[k] = data + ox + oy + oz;
                k++;
            }
        }
    }
    const int64_t sk = stride[3];
    for (int n = 0; n < ncoef; n++) {
        const int64_t o = n * sk;
        /* the 8-term dot product in the order of a 4-wide SIMD reduction */
        float a0 = src[0][o] * w[0] + src[4][o] * w[4];
        float a1 = src[1][o] * w[1] + src[5][o] * w[5];
        float a2 = src[2][o] * w[2] + src[6][o] * w[6];
        float a3 = src[3][o] * w[3] + src[7][o] * w[7];
        values[n] = (a0 + a2) + (a1 + a3);
    }
    return 1;
}

/* MRtrix3's masked linear interpolator (sample_any). */
static inline int sample_volume(const sd_volume *vol, int ncoef, const float *pos, float *values) {
    return sample_any(vol, ncoef, pos, values, 1);
}

/* Interpolated FOD coefficients at scanner position pos; returns 0 when outside the image or where
 * the nearest voxel is all zero (tckgen: the streamline leaves the image). */
static int get_data(const sd_config *c, const float *pos, float *values) {
    if (!sample_volume(&c->fod, c->ncoef, pos, values))
        return 0;
    return !isnan(values[0]);
}

/* Whether a region contains pos: the nearest voxel of an image (in its single-precision frame), or a sphere. */
static int roi_contains(const sd_roi *r, const float *pos) {
    if (!r->mask) {
        const float d[3] = {r->centre[0] - pos[0], r->centre[1] - pos[1], r->centre[2] - pos[2]};
        return dot3(d, d) <= r->radius2;
    }
    int64_t o = 0;
    for (int i = 0; i < 3; i++) {
        const float *m = r->s2v + 4 * i;
        float v = m[0] * pos[0] + (m[1] * pos[1] + m[2] * pos[2]) + m[3];
        /* outside for sure (also NaN/Inf, whose integer conversion below would be undefined) */
        if (!(v > -1.0f && v < (float)r->dim[i])) return 0;
        int64_t idx = (int64_t)roundf(v);
        if (idx < 0 || idx >= r->dim[i]) return 0;
        o += idx * r->stride[i];
    }
    return r->mask[o] != 0;
}

/* Nearest-voxel tracking mask test (no mask: everywhere). */
static int mask_contains(const sd_config *c, const float *pos) {
    return !c->mask.mask || roi_contains(&c->mask, pos);
}

static int any_contains(const sd_roi *r, int32_t n, const float *pos) {
    for (int32_t i = 0; i < n; i++)
        if (roi_contains(r + i, pos)) return 1;
    return 0;
}

/* ------------------------------------------------------------------------------------------------ */
/* Propagation                                                                                       */

typedef struct {
    float pos[3], dir[3];
    float values[MAX_COEF];
    /* what the last step records for the adjoint (SD_RECORD_WIDTH): Euler u, RK4 d1..d4; with soft stopping also
     * (RK4) the peak m5 at the new vertex, then the amplitude margin, the cosine margin and (RK4) the stage of the
     * smallest amplitude (0..4) */
    float stage[18];
    float amp_min;     /* soft: smallest peak amplitude of the step's stages */
    int amp_arg;       /* soft: its stage */
    int soft_ok;       /* soft: hard tracking would take this step (amplitudes and turn within the limits) */
    /* ACT state: the tissues of the last structural sample (cortical GM, sub-cortical GM, WM, CSF,
     * pathological; clamped to [0, 1]), whether they were valid, steps taken in sub-cortical GM, and whether the
     * seed was in sub-cortical GM and has since reached WM */
    float tis[5];
    int tis_valid;
    int64_t sgm_depth;
    int seed_in_sgm, sgm_seed_to_wm;
    /* include regions visited (bit i: unordered region i); ordered regions: next expected, order still legal */
    uint64_t visited;
    int32_t next_ordered, order_ok;
} walker;

/* ------------------------------------------------------------------------------------------------ */
/* Include regions (tckgen's visitation: every unordered region entered, the ordered ones in order)      */

static void visit(const sd_config *c, walker *w, const float *pos) {
    for (int32_t i = 0; i < c->n_include; i++)
        if (roi_contains(c->include + i, pos)) w->visited |= (uint64_t)1 << i;
    if (!w->order_ok) return;
    for (int32_t i = 0; i < c->n_ordered; i++)
        if (roi_contains(c->ordered + i, pos)) {
            if (i == w->next_ordered) w->next_ordered++;
            else if (i != w->next_ordered - 1) w->order_ok = 0;
            break;
        }
}

static int all_included(const sd_config *c, const walker *w) {
    const uint64_t all = c->n_include >= 64 ? ~(uint64_t)0 : (((uint64_t)1 << c->n_include) - 1);
    return (w->visited & all) == all && w->order_ok && w->next_ordered == c->n_ordered;
}

/* ------------------------------------------------------------------------------------------------ */
/* ACT: tissue rules (tckgen 3.0.3)                                                                  */

enum { T_CGM, T_SGM, T_WM, T_CSF, T_PATH };

static inline float clamp01(float x) { return x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x); }

/* The tissues at pos as MRtrix3's ACT::Tissues reads them from a linear interpolator (masked or not): t[5] clamped
 * to [0, 1], zeros outside the image, on a masked-out voxel or a NaN.  Returns 1 when pos is inside the image (and
 * not masked out); *valid: the tissues are usable (no NaN, fractions summing to at least TISSUE_SUM_THRESHOLD). */
static int tissues_at(const sd_volume *act, const float *pos, int masked, float *t, int *valid) {
    float v[5];
    const int inside = sample_any(act, 5, pos, v, masked);
    int ok = inside;
    for (int k = 0; k < 5; k++) ok = ok && !isnan(v[k]);
    if (!ok) {
        for (int k = 0; k < 5; k++) t[k] = 0.0f;
        *valid = 0;
        return inside;
    }
    for (int k = 0; k < 5; k++) t[k] = clamp01(v[k]);
    *valid = ((((t[0] + t[1]) + t[2]) + t[3]) + t[4]) >= TISSUE_SUM_THRESHOLD;
    return inside;
}

/* Sample the 5TT image at pos into w->tis; 0 (tissues zeroed) outside the image, on an all-zero voxel, on a
 * NaN, or where the fractions sum below TISSUE_SUM_THRESHOLD. */
static int fetch_tissues(const sd_config *c, walker *w, const float *pos) {
    int valid;
    tissues_at(&c->act, pos, 1, w->tis, &valid);
    return w->tis_valid = valid;
}

static inline float t_gm(const float *t) { return t[T_CGM] + t[T_SGM]; }
static inline int is_sgm(const float *t) {
    return t[T_SGM] > t[T_CGM] && t[T_SGM] >= t[T_WM] && t[T_SGM] > t[T_CSF] && t[T_SGM] > t[T_PATH];
}
static inline int is_csf(const float *t) {
    return t[T_CSF] >= t[T_CGM] && t[T_CSF] >= t[T_SGM] && t[T_CSF] >= t[T_WM] && t[T_CSF] >= t[T_PATH];
}
static inline int is_path(const float *t) {
    return t[T_PATH] >= t[T_CGM] && t[T_PATH] >= t[T_SGM] && t[T_PATH] >= t[T_WM] && t[T_PATH] > t[T_CSF];
}
static inline int is_gm(const float *t) {
    const float gm = t_gm(t);
    return gm >= t[T_WM] && gm > t[T_CSF] && gm > t[T_PATH];
}

/* The structural test after each step: a termination code, or R_CONTINUE. */
static int check_structural(const sd_config *c, walker *w) {
    if (!fetch_tissues(c, w, w->pos)) return R_EXIT_IMAGE;
    const float *t = w->tis;
    if (is_csf(t)) return w->sgm_depth ? R_EXIT_SGM : R_ENTER_CSF;
    if (is_gm(t)) {
        if (t[T_CGM] >= t[T_SGM]) return R_ENTER_CGM;
        ++w->sgm_depth;
    } else if (w->sgm_depth) {
        if (w->seed_in_sgm && !w->sgm_seed_to_wm) {
            w->sgm_seed_to_wm = 1;
            w->sgm_depth = 0;
            return R_CONTINUE;
        }
        return R_EXIT_SGM;
    }
    return R_CONTINUE;
}

/* Whether a seed at pos may be tracked: in sub-cortical GM, or with some WM, no CSF majority and GM not
 * exceeding WM by GMWMI_ACCURACY or more. */
static int act_check_seed(const sd_config *c, walker *w, const float *pos) {
    w->sgm_depth = 0;
    if (!fetch_tissues(c, w, pos)) return 0;
    const float *t = w->tis;
    if (is_sgm(t)) {
        w->seed_in_sgm = 1;
        w->sgm_seed_to_wm = 0;
        return 1;
    }
    w->seed_in_sgm = 0;
    if (is_csf(t) || !t[T_WM] || (t_gm(t) - t[T_WM]) >= GMWMI_ACCURACY) return 0;
    return 1;
}

/* A seed with more GM than WM (cortical above sub-cortical) is tracked one way only, into WM: w->dir is
 * flipped when GM - WM grows along it.  The seed's tissues (w->tis) are kept. */
static int act_unidirectional(const sd_config *c, walker *w) {
    const float *t = w->tis;
    if (is_sgm(t)) return 0;
    if (t[T_WM] >= t_gm(t) || t[T_SGM] >= t[T_CGM]) return 0;
    float at_seed[5];
    memcpy(at_seed, w->tis, sizeof at_seed);
    const float e = (float)GMWMI_NORMAL_PERTURBATION;
    float p[3], m[3];
    for (int i = 0; i < 3; i++) { p[i] = w->pos[i] + w->dir[i] * e; m[i] = w->pos[i] - w->dir[i] * e; }
    fetch_tissues(c, w, p);
    const float plus = t_gm(w->tis) - w->tis[T_WM];
    fetch_tissues(c, w, m);
    const float minus = t_gm(w->tis) - w->tis[T_WM];
    const float gradient = plus - minus;
    if (gradient > 0.0) for (int i = 0; i < 3; i++) w->dir[i] = -w->dir[i];
    memcpy(w->tis, at_seed, sizeof at_seed);
    w->tis_valid = 1;
    return 1;
}

static float find_peak(const sd_config *c, walker *w) {
    float amp = get_peak(c, w->values, w->dir);
    if (!isfinite(amp) || amp < c->threshold) amp = 0.0f;
    return amp;
}

/* ------------------------------------------------------------------------------------------------ */
/* The GM-WM interface (tckgen -crop_at_gmwmi, -seed_gmwmi): tissues from the unmasked linear interpolator     */

#define GMWMI_PERTURBATION 0.001       /* mm, central differences of GM - WM */
#define GMWMI_MAX_ITERS 10
#define GMWMI_HERMITE_TENSION 0.1f

/* The tissues at p as the interface search reads them: 1 when usable (inside the image, no NaN, sum >= 0.5). */
static int finder_tissues(const sd_volume *act, const float *p, float *t) {
    int valid;
    return tissues_at(act, p, 0, t, &valid) && valid;
}

/* Cardinal (Hermite) spline weights at mu in [0, 1] with tension GMWMI_HERMITE_TENSION, in single precision. */
static void hermite_weights(float mu, float *w) {
    const float t = 0.5f * GMWMI_HERMITE_TENSION;
    const float p2 = mu * mu, p3 = mu * p2;
    w[0] = (0.5f - t) * ((2.0f * p2 - p3) - mu);
    w[1] = (1.0f + (1.5f + t) * p3) - (2.5f + t) * p2;
    w[2] = ((2.0f + 2.0f * t) * p2 + (0.5f - t) * mu) - (1.5f + t) * p3;
    w[3] = (0.5f - t) * (p3 - p2);
}

/* The interface point near a streamline's last vertex (v: n vertices): where GM - WM crosses 0 on the Hermite curve
 * through the last three vertices and their extrapolation, by 10 bisections (tckgen's
 * GMWMI_finder::find_interface(tck, end)); the last vertex itself when the streamline is too short, either of the
 * last two vertices is outside the image, they do not straddle the interface, or the last one is already within
 * GMWMI_ACCURACY of it.  Written into out[3] (which may be the last vertex itself). */
static void interface_end(const sd_config *c, const float *v, int64_t n, float *out) {
    const float *pe = v + 3 * (n - 1);
    if (out != pe) memcpy(out, pe, 3 * sizeof(float));
    if (n < 3) return;
    const float *pp = v + 3 * (n - 2), *pq = v + 3 * (n - 3);
    float te[5], tp[5];
    int valid;
    if (!tissues_at(&c->act, pe, 0, te, &valid)) return;
    if (!tissues_at(&c->act, pp, 0, tp, &valid)) return;
    const float ge = t_gm(te), we = te[T_WM], gp = t_gm(tp), wp = tp[T_WM];
    if (!((ge > we && gp < wp) || (ge < we && gp > wp))) return;
    if ((double)(ge - we) < GMWMI_ACCURACY) return;
    float dom[4][3];
    for (int k = 0; k < 3; k++) {
        const float curv = (pe[k] - pp[k]) - (pp[k] - pq[k]);
        const float extrap = (pe[k] - pp[k]) + curv;
        dom[0][k] = pq[k];
        dom[1][k] = pp[k];
        dom[2][k] = pe[k];
        dom[3][k] = pe[k] + extrap;
    }
    float lo = 0.0f, hi = 1.0f;
    for (int it = 0; it < GMWMI_MAX_ITERS; it++) {
        const float mu = (float)(0.5 * (double)(lo + hi));
        float w[4], p[3], t[5];
        hermite_weights(mu, w);
        for (int k = 0; k < 3; k++) p[k] = ((w[0] * dom[0][k] + w[1] * dom[1][k]) + w[2] * dom[2][k]) + w[3] * dom[3][k];
        tissues_at(&c->act, p, 0, t, &valid);   /* outside the image: all zero, which counts as reached */
        if (t[T_WM] > t_gm(t)) {
            lo = mu;
        } else {
            hi = mu;
            memcpy(out, p, sizeof p);
            if ((double)(t_gm(t) - t[T_WM]) < GMWMI_ACCURACY) return;
        }
    }
}

/* The Gauss-Newton step towards GM - WM = 0 at p (central differences over GMWMI_PERTURBATION mm), at most half the
 * smallest voxel long; zero where a difference leaves the usable image or the gradient vanishes. */
static void interface_step(const sd_volume *act, float min_vox, const float *p, float *step) {
    float grad[3], t[5];
    step[0] = step[1] = step[2] = 0.0f;
    for (int a = 0; a < 3; a++) {
        float pm[3] = {p[0], p[1], p[2]}, pp[3] = {p[0], p[1], p[2]}, tm[5], tp[5];
        pm[a] = (float)((double)pm[a] - 0.5 * GMWMI_PERTURBATION);
        pp[a] = (float)((double)pp[a] + 0.5 * GMWMI_PERTURBATION);
        const int vm = finder_tissues(act, pm, tm), vp = finder_tissues(act, pp, tp);
        if (!vm || !vp) return;
        grad[a] = (t_gm(tp) - tp[T_WM]) - (t_gm(tm) - tm[T_WM]);
    }
    const float scale = (float)(1.0 / GMWMI_PERTURBATION);
    for (int a = 0; a < 3; a++) grad[a] *= scale;
    const float g2 = dot3(grad, grad);
    if (!g2) return;
    finder_tissues(act, p, t);
    const float diff = t_gm(t) - t[T_WM];
    for (int a = 0; a < 3; a++) step[a] = -grad[a] * (diff / g2);
    const float norm = sqrtf(dot3(step, step));
    if (norm > 0.5 * min_vox) {
        const float s = (float)(0.5 * min_vox / norm);
        for (int a = 0; a < 3; a++) step[a] *= s;
    }
}

/* Move p onto the GM-WM interface (tckgen's GMWMI_finder::find_interface(p)): Gauss-Newton steps until GM and WM
 * agree within GMWMI_ACCURACY, then, from the WM side, growing steps until just into GM.  Returns 1 on success;
 * p NaN otherwise (no interface there, or it lies in CSF, pathology, or no WM). */
static int find_interface_point(const sd_volume *act, float min_vox, float *p) {
    float t[5], step[3];
    int valid = finder_tissues(act, p, t), iters = 0;
    do {
        interface_step(act, min_vox, p, step);
        for (int a = 0; a < 3; a++) p[a] += step[a];
        valid = finder_tissues(act, p, t);
    } while (valid && dot3(step, step) && fabsf(t_gm(t) - t[T_WM]) > GMWMI_ACCURACY && ++iters < GMWMI_MAX_ITERS);
    if (!valid || is_csf(t) || is_path(t) || !t[T_WM] || fabsf(t_gm(t) - t[T_WM]) > GMWMI_ACCURACY) {
        p[0] = p[1] = p[2] = NAN;
        return 0;
    }
    if (t_gm(t) >= t[T_WM]) return 1;
    interface_step(act, min_vox, p, step);
    if (!(isfinite(step[0]) && isfinite(step[1]) && isfinite(step[2]))) return 1;
    if (!dot3(step, step)) {
        p[0] = p[1] = p[2] = NAN;
        return 0;
    }
    do {
        for (int a = 0; a < 3; a++) step[a] *= 1.5f;
        for (int a = 0; a < 3; a++) p[a] += step[a];
        valid = finder_tissues(act, p, t);
        if (valid && t_gm(t) >= t[T_WM] && (double)(t_gm(t) - t[T_WM]) < GMWMI_ACCURACY) return 1;
    } while (sqrtf(dot3(step, step)) < 0.5 * min_vox);
    p[0] = p[1] = p[2] = NAN;
    return 0;
}

/* The unit normal of the interface at p (direction of increasing WM - GM); NaN where it is undefined. */
static void interface_normal(const sd_volume *act, const float *p, float *nrm) {
    for (int a = 0; a < 3; a++) {
        float pm[3] = {p[0], p[1], p[2]}, pp[3] = {p[0], p[1], p[2]}, tm[5], tp[5];
        pm[a] = (float)((double)pm[a] - 0.5 * GMWMI_PERTURBATION);
        pp[a] = (float)((double)pp[a] + 0.5 * GMWMI_PERTURBATION);
        finder_tissues(act, pm, tm);
        finder_tissues(act, pp, tp);
        nrm[a] = (tp[T_WM] - t_gm(tp)) - (tm[T_WM] - t_gm(tm));
    }
    const float n2 = dot3(nrm, nrm);
    if (n2 > 0.0f) normalize3(nrm);
    else nrm[0] = nrm[1] = nrm[2] = NAN;
}

/* tckgen's GM-WM interface seeding (-seed_gmwmi), one attempt per point: pts (n, 3) scanner mm drawn from the
 * interface image, moved onto the interface, shifted within its tangent plane by (uv[i] - 0.5) * perturb mm
 * (uv (n, 2) uniform in [0, 1)) and moved onto the interface again.  ok[i] = 1 where every stage succeeded (pts[i]
 * is then the seed); act: the 5TT image; min_vox: its smallest voxel size (mm). */
void sd_gmwmi_seeds(const sd_volume *act, float min_vox, float perturb, int64_t n, float *pts, const float *uv,
                    uint8_t *ok) {
    for (int64_t i = 0; i < n; i++) {
        float *p = pts + 3 * i, nrm[3], one[3], two[3];
        ok[i] = 0;
        if (!find_interface_point(act, min_vox, p)) continue;
        interface_normal(act, p, nrm);
        if (!(isfinite(nrm[0]) && isfinite(nrm[1]) && isfinite(nrm[2]))) continue;
        one[0] = nrm[1]; one[1] = -nrm[0]; one[2] = 0.0f;                   /* normal x z */
        normalize3(one);
        if (!(isfinite(one[0]) && isfinite(one[1]) && isfinite(one[2]))) {
            one[0] = -nrm[2]; one[1] = 0.0f; one[2] = nrm[0];               /* normal x y */
            normalize3(one);
        }
        two[0] = nrm[1] * one[2] - nrm[2] * one[1];
        two[1] = nrm[2] * one[0] - nrm[0] * one[2];
        two[2] = nrm[0] * one[1] - nrm[1] * one[0];
        normalize3(two);
        const float a = (uv[2 * i] - 0.5f) * perturb, b = (uv[2 * i + 1] - 0.5f) * perturb;
        for (int k = 0; k < 3; k++) p[k] += a * one[k] + b * two[k];
        ok[i] = (uint8_t)find_interface_point(act, min_vox, p);
    }
}

/* SD_Stream's elementary move: peak at pos from dir, angle test, step.  With soft stopping only a failed search
 * stops; the amplitude is kept in w->amp_min (the caller's bookkeeping) and the turn is not tested here. */
static int sd_next(const sd_config *c, walker *w) {
    if (!get_data(c, w->pos, w->values)) return R_EXIT_IMAGE;
    float prev[3] = {w->dir[0], w->dir[1], w->dir[2]};
    if (c->soft) {
        const float amp = get_peak(c, w->values, w->dir);
        if (!isfinite(amp)) return R_CUTOFF;
        w->amp_min = amp;
        for (int i = 0; i < 3; i++) w->pos[i] += w->dir[i] * c->step;
        return R_CONTINUE;
    }
    if (find_peak(c, w) == 0.0f) return R_CUTOFF;
    if (dot3(prev, w->dir) < c->dot_threshold) return R_CURVATURE;
    for (int i = 0; i < 3; i++) w->pos[i] += w->dir[i] * c->step;
    return R_CONTINUE;
}

static int next_rk4(const sd_config *c, walker *w) {
    int t;
    const float p0[3] = {w->pos[0], w->pos[1], w->pos[2]};
    const float d0[3] = {w->dir[0], w->dir[1], w->dir[2]};
    const float half = (float)(0.5 * (double)c->step);
    float d1[3], d2[3], d3[3], d4[3], amp = INFINITY;
    int arg = 0;
#define SOFT_STAGE(k) if (c->soft && w->amp_min < amp) { amp = w->amp_min; arg = (k); }
    if ((t = sd_next(c, w))) return t;
    SOFT_STAGE(0)
    memcpy(d1, w->dir, sizeof d1);
    for (int i = 0; i < 3; i++) { w->pos[i] = p0[i] + d1[i] * half; w->dir[i] = d0[i]; }
    if ((t = sd_next(c, w))) return t;
    SOFT_STAGE(1)
    memcpy(d2, w->dir, sizeof d2);
    for (int i = 0; i < 3; i++) { w->pos[i] = p0[i] + d2[i] * half; w->dir[i] = d0[i]; }
    if ((t = sd_next(c, w))) return t;
    SOFT_STAGE(2)
    memcpy(d3, w->dir, sizeof d3);
    for (int i = 0; i < 3; i++) { w->pos[i] = p0[i] + d3[i] * c->step; w->dir[i] = d2[i] + d3[i]; }
    normalize3(w->dir);
    if ((t = sd_next(c, w))) return t;
    SOFT_STAGE(3)
    memcpy(d4, w->dir, sizeof d4);
    memcpy(w->stage, d1, sizeof d1);
    memcpy(w->stage + 3, d2, sizeof d2);
    memcpy(w->stage + 6, d3, sizeof d3);
    memcpy(w->stage + 9, d4, sizeof d4);
    for (int i = 0; i < 3; i++) w->dir[i] = ((d1[i] + d2[i] * 2.0f) + d3[i] * 2.0f) + d4[i];
    normalize3(w->dir);
    for (int i = 0; i < 3; i++) w->pos[i] = p0[i] + w->dir[i] * c->step;
    float fp[3], fd[3];
    memcpy(fp, w->pos, sizeof fp);
    memcpy(fd, w->dir, sizeof fd);
    if ((t = sd_next(c, w))) return t;
    if (c->soft) {   /* record m5 and the margins; the turn does not stop */
        SOFT_STAGE(4)
        const float cs = dot3(d1, w->dir);
        memcpy(w->stage + 12, w->dir, 3 * sizeof(float));
        w->stage[15] = amp - c->threshold;
        w->stage[16] = cs - c->cos_max_angle_ho;
        w->stage[17] = (float)arg;
        w->soft_ok = amp >= c->threshold && cs >= c->cos_max_angle_ho;
    } else if (dot3(d1, w->dir) < c->cos_max_angle_ho) return R_CURVATURE;
#undef SOFT_STAGE
    memcpy(w->pos, fp, sizeof fp);
    memcpy(w->dir, fd, sizeof fd);
    return R_CONTINUE;
}

static int iterate(const sd_config *c, walker *w) {
    const float prev[3] = {w->dir[0], w->dir[1], w->dir[2]};
    int t = c->rk4 ? next_rk4(c, w) : sd_next(c, w);
    if (t) return (c->act.data && w->sgm_depth) ? R_TERM_IN_SGM : t;
    if (!c->rk4) memcpy(w->stage, w->dir, 3 * sizeof(float));
    if (c->soft && !c->rk4) {   /* Euler's margins: the peak's amplitude, the turn from the previous direction */
        const float cs = dot3(prev, w->dir);
        w->stage[3] = w->amp_min - c->threshold;
        w->stage[4] = cs - c->dot_threshold;
        w->soft_ok = w->amp_min >= c->threshold && cs >= c->dot_threshold;
    }
    if (c->act.data && (t = check_structural(c, w))) return t;
    if (!mask_contains(c, w->pos)) return R_EXIT_MASK;
    if (any_contains(c->exclude, c->n_exclude, w->pos)) return R_ENTER_EXCLUDE;
    visit(c, w, w->pos);
    if (c->stop_on_all_include && all_included(c, w)) return R_ALL_INCLUDE;
    return R_CONTINUE;
}

/* A streamline's vertices (3 floats each), grown on demand: memory follows the streamlines actually traced,
 * not the vertex budget max_points (which may be astronomically large, e.g. for a huge maximum length). */
typedef struct {
    float *v;
    int64_t cap;    /* vertices */
    int width;      /* floats per vertex */
} growbuf;

/* Room for at least n vertices; 0 when out of memory (the buffer is then unchanged). */
static int reserve(growbuf *b, int64_t n) {
    if (n <= b->cap) return 1;
    int64_t cap = b->cap ? b->cap : 1024;
    while (cap < n) cap *= 2;
    float *v = (float *)realloc(b->v, (size_t)cap * b->width * sizeof(float));
    if (!v) return 0;
    b->v = v;
    b->cap = cap;
    return 1;
}

#define R_NO_MEMORY (-1)

/* One half: append vertices to out (n already there), and when dout is not NULL each new vertex's step
 * directions (dout->width floats of w->stage), return the termination code (R_NO_MEMORY when a buffer could
 * not grow). */
static int half(const sd_config *c, walker *w, growbuf *out, growbuf *dout, int64_t *n) {
    int t;
    int64_t steps = 0;
    do {
        t = iterate(c, w);
        if (t == R_CONTINUE || t == R_ENTER_CGM || t == R_ENTER_CSF || t == R_ENTER_EXCLUDE || t == R_ALL_INCLUDE) {
            /* the vertices tckgen keeps */
            if (!reserve(out, *n + 1)) return R_NO_MEMORY;
            if (dout && !reserve(dout, *n + 1)) return R_NO_MEMORY;
            memcpy(out->v + 3 * *n, w->pos, 3 * sizeof(float));
            if (dout) memcpy(dout->v + dout->width * *n, w->stage, dout->width * sizeof(float));
            (*n)++;
            if (t == R_CONTINUE && *n >= c->max_points) t = R_MAX_LENGTH;
            if (t == R_CONTINUE && c->half_steps && ++steps >= c->half_steps) return R_CONTINUE;   /* cut */
        }
    } while (t == R_CONTINUE);
    return t;
}

/* One half with soft stopping: every step that does not leave the image or the mask or fail its peak search is
 * kept, at most c->soft_steps of them; *counted (the vertices hard tracking would keep, over both halves) reaches
 * max_points only along the prefix of steps that hard tracking would take.  Returns the termination code
 * (R_CONTINUE when cut after soft_steps steps). */
static int soft_half(const sd_config *c, walker *w, growbuf *out, growbuf *dout, int64_t *n, int64_t *counted) {
    int hard = 1;
    for (int64_t s = 0; s < c->half_steps; s++) {
        const int t = iterate(c, w);
        if (t != R_CONTINUE) return t;
        if (!reserve(out, *n + 1)) return R_NO_MEMORY;
        if (dout && !reserve(dout, *n + 1)) return R_NO_MEMORY;
        memcpy(out->v + 3 * *n, w->pos, 3 * sizeof(float));
        if (dout) memcpy(dout->v + dout->width * *n, w->stage, dout->width * sizeof(float));
        (*n)++;
        hard = hard && w->soft_ok;
        if (hard && ++*counted >= c->max_points) return R_MAX_LENGTH;
    }
    return R_CONTINUE;
}

/* FOD amplitude at pos along the unit direction d (tckgen's get_metric; 0 outside the image). */
static float amplitude_at(const sd_config *c, walker *w, const float *pos, const float *d) {
    if (!get_data(c, pos, w->values)) return 0.0f;
    sh_derivs o;
    derivatives(c, w->values, acosf(d[2]), atan2f(d[1], d[0]), &o);
    return o.amp;
}

/* The priors on a half's termination t (possibly changed; ACT's, and entering an exclusion region): 1 when the
 * streamline is rejected. */
static int act_excluded(const sd_config *c, const walker *w, int *t) {
    if (*t == R_ENTER_EXCLUDE) return 1;
    if (!c->act.data) return 0;
    switch (*t) {
    case R_ENTER_CSF: case R_MAX_LENGTH:
        return 1;
    case R_CUTOFF: case R_CURVATURE:
        if (w->sgm_depth) { *t = R_TERM_IN_SGM; return 0; }
        return !(w->tis_valid && is_path(w->tis));
    default:
        return 0;
    }
}

/* On leaving sub-cortical GM: cut the streamline (n vertices in v) after its vertex in sub-cortical GM where the
 * FOD amplitude along the path is lowest.  Returns the new vertex count. */
static int64_t truncate_exit_sgm(const sd_config *c, walker *w, const float *v, int64_t n) {
    int64_t best = n - 1;
    float lowest = INFINITY;
    for (int64_t i = n - w->sgm_depth; i < n; i++) {
        float d[3];
        for (int k = 0; k < 3; k++) d[k] = v[3 * i + k] - v[3 * (i - 1) + k];
        normalize3(d);
        const float a = amplitude_at(c, w, v + 3 * i, d);
        if (a < lowest) { lowest = a; best = i; }
    }
    return best + 1;
}

/* A whole half with ACT's priors: the termination code, *excluded set when the streamline is rejected. */
static int act_half(const sd_config *c, walker *w, growbuf *out, growbuf *dout, int64_t *n, int *excluded) {
    int t = half(c, w, out, dout, n);
    if (t == R_NO_MEMORY) return t;
    *excluded = act_excluded(c, w, &t);
    if (t == R_EXIT_SGM) *n = truncate_exit_sgm(c, w, out->v, *n);
    if (t == R_ENTER_CGM && c->crop_at_gmwmi) interface_end(c, out->v, *n, out->v + 3 * (*n - 1));
    return t;
}

/* tckgen's acceptance of a finished streamline (v: n vertices; cut: a half was cut at half_steps): long enough,
 * (ACT) a seed in sub-cortical GM must have reached WM, and every include region visited (the ordered ones in
 * order); with -crop_at_gmwmi a streamline whose vertex count does not settle it is measured against the minimum and
 * maximum lengths. */
static int act_accepts(const sd_config *c, const walker *w, const float *v, int64_t n, int cut) {
    if (c->half_steps && c->min_points <= 0) return 1;
    if (cut && n >= 2) return all_included(c, w);
    if ((n == 1 && c->min_points > 1) || n < c->min_points) return 0;
    if (c->act.data && w->seed_in_sgm && !w->sgm_seed_to_wm) return 0;
    if (!all_included(c, w)) return 0;
    if (c->act.data && c->crop_at_gmwmi && !(n > c->min_points_postds && n < c->max_points_postds)) {
        float len = 0.0f;
        for (int64_t i = 1; i < n; i++) {
            const float d[3] = {v[3 * i] - v[3 * i - 3], v[3 * i + 1] - v[3 * i - 2], v[3 * i + 2] - v[3 * i - 1]};
            len += sqrtf(dot3(d, d));
        }
        if (len < c->min_dist || len > c->max_dist) return 0;
    }
    return 1;
}

/* Reverse the first n rows of out (and dout) so that a forward half ends at the seed. */
static void reverse_rows(growbuf *out, growbuf *dout, int64_t n) {
    for (int g = 0; g < 2; g++) {
        growbuf *b = g ? dout : out;
        if (!b) continue;
        const int dw = b->width;
        float *d = b->v;
        for (int64_t i = 0, j = n - 1; i < j; i++, j--)
            for (int k = 0; k < dw; k++) { float t = d[dw * i + k]; d[dw * i + k] = d[dw * j + k]; d[dw * j + k] = t; }
    }
}

/* track_one with soft stopping (no ACT, no ROIs; the seed test stays hard): both halves from the seed, at most
 * half_steps steps each; accepted when at least max(min_points, 2) vertices were kept, or 2 when a half was cut
 * (min_points 0: always).
 * The seed vertex records the seed peak (the previous direction of both halves' first steps, negated for the
 * second). */
static int64_t track_one_soft(const sd_config *c, walker *w, const float *seed, const float *init_dir, growbuf *out,
                              growbuf *dout, int64_t *seed_index, int32_t *reasons) {
    memcpy(w->pos, seed, sizeof w->pos);
    memcpy(w->dir, init_dir, sizeof w->dir);
    reasons[0] = reasons[1] = R_SEED_REJECTED;
    *seed_index = 0;
    if (!(isfinite(w->pos[0]) && isfinite(w->pos[1]) && isfinite(w->pos[2]))) return 0;
    if (!mask_contains(c, w->pos) || !get_data(c, w->pos, w->values)) return 0;
    normalize3(w->dir);
    if (find_peak(c, w) == 0.0f) return 0;
    const float seed_dir[3] = {w->dir[0], w->dir[1], w->dir[2]};
    int64_t n = 1, counted = 1;
    if (!reserve(out, 1) || (dout && !reserve(dout, 1))) return -1;
    memcpy(out->v, w->pos, 3 * sizeof(float));
    if (dout) {
        memset(dout->v, 0, dout->width * sizeof(float));
        memcpy(dout->v, seed_dir, sizeof seed_dir);
    }
    if ((reasons[0] = soft_half(c, w, out, dout, &n, &counted)) == R_NO_MEMORY) return -1;
    reverse_rows(out, dout, n);
    *seed_index = n - 1;
    memcpy(w->pos, out->v + 3 * (n - 1), 3 * sizeof(float));
    for (int k = 0; k < 3; k++) w->dir[k] = -seed_dir[k];
    if ((reasons[1] = soft_half(c, w, out, dout, &n, &counted)) == R_NO_MEMORY) return -1;
    const int64_t need = c->min_points > 2 ? c->min_points : (c->min_points <= 0 ? 1 : 2);
    const int cut = reasons[0] == R_CONTINUE || reasons[1] == R_CONTINUE;
    return (n >= need || (cut && n >= 2)) ? n : 0;
}

/* Track one seed into out (grown as needed).  Returns the vertex count (0 when rejected, -1 when out of
 * memory); seed_index: the seed vertex's index; reasons[2]: termination of each half (or seed rejected). */
static int64_t track_one(const sd_config *c, walker *w, const float *seed, const float *init_dir, growbuf *out,
                         growbuf *dout, int64_t *seed_index, int32_t *reasons) {
    memcpy(w->pos, seed, sizeof w->pos);
    memcpy(w->dir, init_dir, sizeof w->dir);
    reasons[0] = reasons[1] = R_SEED_REJECTED;
    *seed_index = 0;
    if (!(isfinite(w->pos[0]) && isfinite(w->pos[1]) && isfinite(w->pos[2]))) return 0;
    if (!mask_contains(c, w->pos) || any_contains(c->exclude, c->n_exclude, w->pos)) return 0;
    if (c->act.data && !act_check_seed(c, w, w->pos)) return 0;
    if (!get_data(c, w->pos, w->values)) return 0;
    normalize3(w->dir);
    if (find_peak(c, w) == 0.0f) return 0;
    const int unidirectional = c->unidirectional || (c->act.data && act_unidirectional(c, w));
    w->visited = 0;
    w->next_ordered = 0;
    w->order_ok = 1;
    visit(c, w, w->pos);
    const float seed_dir[3] = {w->dir[0], w->dir[1], w->dir[2]};
    int64_t n = 1;
    int excluded = 0;
    if (!reserve(out, 1)) return -1;
    if (dout && !reserve(dout, 1)) return -1;
    float *v = out->v;
    memcpy(v, w->pos, 3 * sizeof(float));
    if (dout) {   /* the seed vertex records the seed peak, the direction its (first) half starts from negated */
        memset(dout->v, 0, dout->width * sizeof(float));
        for (int k = 0; k < 3; k++) dout->v[k] = unidirectional ? -seed_dir[k] : seed_dir[k];
    }
    if ((reasons[0] = act_half(c, w, out, dout, &n, &excluded)) == R_NO_MEMORY) return -1;
    if (excluded) { reasons[1] = R_CONTINUE; return 0; }
    if (unidirectional) {   /* the seed stays first, as tckgen writes it */
        reasons[1] = R_CONTINUE;
        return act_accepts(c, w, out->v, n, reasons[0] == R_CONTINUE) ? n : 0;
    }
    v = out->v;
    reverse_rows(out, dout, n);
    *seed_index = n - 1;
    memcpy(w->pos, v + 3 * (n - 1), 3 * sizeof(float));
    for (int k = 0; k < 3; k++) w->dir[k] = -seed_dir[k];
    w->sgm_depth = 0;
    if ((reasons[1] = act_half(c, w, out, dout, &n, &excluded)) == R_NO_MEMORY) return -1;
    if (excluded) return 0;
    return act_accepts(c, w, out->v, n, reasons[0] == R_CONTINUE || reasons[1] == R_CONTINUE) ? n : 0;
}

/* ------------------------------------------------------------------------------------------------ */
/* Batches over threads                                                                              */

typedef struct {
    const sd_config *c;
    int64_t n;
    const float *seeds, *dirs;
    float **lines;   /* (n,) one malloc'd (lengths[i], 3) array per accepted seed, else NULL */
    float **dlines;  /* NULL, or (n,) one malloc'd (lengths[i], dwidth) array of step directions per accepted seed */
    int dwidth;
    int64_t *lengths, *seed_index;
    int32_t *reasons;
    int64_t next;    /* shared work counter */
    int32_t failed;  /* set when memory ran out */
} batch_job;

static void *worker(void *arg) {
    batch_job *j = (batch_job *)arg;
    walker w;
    growbuf buf = {NULL, 0, 3};   /* this thread's scratch streamline */
    growbuf dbuf = {NULL, 0, j->dwidth};
    growbuf *dout = j->dlines ? &dbuf : NULL;
    for (;;) {
        int64_t i = __atomic_fetch_add(&j->next, 1, __ATOMIC_RELAXED);
        if (i >= j->n) break;
        j->lines[i] = NULL;
        if (dout) j->dlines[i] = NULL;
        if (__atomic_load_n(&j->failed, __ATOMIC_RELAXED)) { j->lengths[i] = 0; continue; }
        int64_t len = (j->c->soft ? track_one_soft : track_one)(j->c, &w, j->seeds + 3 * i, j->dirs + 3 * i, &buf,
                                                                 dout, j->seed_index + i, j->reasons + 2 * i);
        if (len > 0) {
            float *copy = (float *)malloc((size_t)len * 3 * sizeof(float));
            if (copy) memcpy(copy, buf.v, (size_t)len * 3 * sizeof(float));
            else len = -1;
            j->lines[i] = copy;
            if (dout && len > 0) {
                float *dc = (float *)malloc((size_t)len * j->dwidth * sizeof(float));
                if (dc) memcpy(dc, dbuf.v, (size_t)len * j->dwidth * sizeof(float));
                else len = -1;
                j->dlines[i] = dc;
            }
        }
        if (len < 0) { __atomic_store_n(&j->failed, 1, __ATOMIC_RELAXED); len = 0; }
        j->lengths[i] = len;
    }
    free(buf.v);
    free(dbuf.v);
    return NULL;
}

/* Track n seeds on nthreads threads.  lines (n,): receives a malloc'd (lengths[i], 3) float array per
 * accepted seed (NULL otherwise), to be passed to sd_gather (which copies and frees them); lengths (n,)
 * vertex counts (0 = rejected); seed_index (n,); reasons (n, 2).  Returns 0; -1 when a thread could not be
 * started (the work is then done on the calling thread, same result); -2 when memory ran out (every line
 * is then freed and every length set to 0). */
int32_t sd_track_batch_dirs(const sd_config *c, int64_t n, const float *seeds, const float *dirs, float **lines,
                            float **dlines, int64_t *lengths, int64_t *seed_index, int32_t *reasons,
                            int32_t nthreads);

int32_t sd_track_batch(const sd_config *c, int64_t n, const float *seeds, const float *dirs, float **lines,
                       int64_t *lengths, int64_t *seed_index, int32_t *reasons, int32_t nthreads) {
    return sd_track_batch_dirs(c, n, seeds, dirs, lines, NULL, lengths, seed_index, reasons, nthreads);
}

/* Floats recorded per vertex (sd_track_batch_dirs): Euler 3 (u), RK4 12 (d1..d4); soft stopping adds the margins
 * (Euler: 5 = u, amplitude margin, cosine margin; RK4: 18 = d1..d4, m5, the two margins, the stage of the
 * smallest amplitude). */
int32_t sd_record_width(const sd_config *c) { return c->soft ? (c->rk4 ? 18 : 5) : (c->rk4 ? 12 : 3); }

/* sd_track_batch that also records, when dlines is not NULL, each vertex's step directions (Euler: the peak u
 * the step moved along; RK4: the four stage peaks d1..d4; at the seed vertex the seed peak, negated for a unidirectional streamline): dlines (n,) receives a
 * malloc'd (lengths[i], 3 or 12) float array per accepted seed, in the vertices' order (sd_gather_width). */
int32_t sd_track_batch_dirs(const sd_config *c, int64_t n, const float *seeds, const float *dirs, float **lines,
                            float **dlines, int64_t *lengths, int64_t *seed_index, int32_t *reasons,
                            int32_t nthreads) {
    pthread_once(&consts_once, init_consts);
    batch_job j = {c, n, seeds, dirs, lines, dlines, sd_record_width(c), lengths, seed_index, reasons, 0, 0};
    if (nthreads < 1) nthreads = 1;
    if (nthreads > 256) nthreads = 256;
    pthread_t th[256];
    int started = 0, rc = 0;
    for (int t = 1; t < nthreads; t++) {
        if (pthread_create(&th[started], NULL, worker, &j) != 0) { rc = -1; break; }
        started++;
    }
    worker(&j);
    for (int t = 0; t < started; t++) pthread_join(th[t], NULL);
    if (j.failed) {
        for (int64_t i = 0; i < n; i++) {
            free(lines[i]); lines[i] = NULL; lengths[i] = 0;
            if (dlines) { free(dlines[i]); dlines[i] = NULL; }
        }
        return -2;
    }
    return rc;
}

/* Copy the n streamlines of sd_track_batch one after another into out (sum of lengths, width) and free them. */
void sd_gather_width(int64_t n, float **lines, const int64_t *lengths, float *out, int32_t width) {
    for (int64_t i = 0; i < n; i++) {
        if (lines[i]) {
            memcpy(out, lines[i], (size_t)lengths[i] * width * sizeof(float));
            out += width * lengths[i];
            free(lines[i]);
            lines[i] = NULL;
        }
    }
}

void sd_gather(int64_t n, float **lines, const int64_t *lengths, float *out) {
    sd_gather_width(n, lines, lengths, out, 3);
}

/* Free the streamlines of sd_track_batch without copying them. */
void sd_release(int64_t n, float **lines) {
    for (int64_t i = 0; i < n; i++) { free(lines[i]); lines[i] = NULL; }
}

/* The seed peak and the first vertex of each half, as tckgen would produce them from start direction
 * dirs[i] at seeds[i] (for recovering tckgen's unrecorded random start directions).  peak (n, 3), fwd
 * (n, 3), bwd (n, 3): NaN where the seed is rejected or that half stops at its first step. */
void sd_seed_steps(const sd_config *c, int64_t n, const float *seeds, const float *dirs, float *peak, float *fwd,
                   float *bwd) {
    walker w;
    pthread_once(&consts_once, init_consts);
    for (int64_t i = 0; i < n; i++) {
        float *pk = peak + 3 * i, *f = fwd + 3 * i, *b = bwd + 3 * i;
        for (int k = 0; k < 3; k++) pk[k] = f[k] = b[k] = NAN;
        memcpy(w.pos, seeds + 3 * i, sizeof w.pos);
        memcpy(w.dir, dirs + 3 * i, sizeof w.dir);
        if (!mask_contains(c, w.pos) || any_contains(c->exclude, c->n_exclude, w.pos)
            || (c->act.data && !act_check_seed(c, &w, w.pos)) || !get_data(c, w.pos, w.values))
            continue;
        w.visited = 0;
        w.next_ordered = 0;
        w.order_ok = 1;
        normalize3(w.dir);
        if (find_peak(c, &w) == 0.0f) continue;
        if (c->act.data && !c->unidirectional) act_unidirectional(c, &w);
        const float p1[3] = {w.dir[0], w.dir[1], w.dir[2]};
        memcpy(pk, p1, sizeof p1);
        if (iterate(c, &w) == R_CONTINUE) memcpy(f, w.pos, sizeof w.pos);
        memcpy(w.pos, seeds + 3 * i, sizeof w.pos);
        for (int k = 0; k < 3; k++) w.dir[k] = -p1[k];
        w.sgm_depth = 0;
        if (iterate(c, &w) == R_CONTINUE) memcpy(b, w.pos, sizeof w.pos);
    }
}

/* Peak search alone (for tests): n directions u (n, 3) updated in place for coefficient rows sh (n, ncoef);
 * amplitudes into amp (n,). */
void sd_peaks(const sd_config *c, int64_t n, const float *sh, float *u, float *amp) {
    pthread_once(&consts_once, init_consts);
    for (int64_t i = 0; i < n; i++) amp[i] = get_peak(c, sh + (int64_t)c->ncoef * i, u + 3 * i);
}

/* FOD sampling alone (for tests): values (n, ncoef), inside (n,). */
void sd_sample(const sd_config *c, int64_t n, const float *pos, float *values, uint8_t *inside) {
    for (int64_t i = 0; i < n; i++) inside[i] = (uint8_t)get_data(c, pos + 3 * i, values + (int64_t)c->ncoef * i);
}

/* ------------------------------------------------------------------------------------------------ */
/* Volume preparation                                                                                */

typedef struct {
    const float *src;
    const int64_t *st, *dim;
    float *dst;
    uint8_t *nonzero;
    int64_t next, bad;
} repack_job;

static void *repack_worker(void *arg) {
    repack_job *j = (repack_job *)arg;
    const int64_t X = j->dim[0], Y = j->dim[1], Z = j->dim[2], N = j->dim[3];
    int64_t bad = 0;
    for (;;) {
        int64_t z = __atomic_fetch_add(&j->next, 1, __ATOMIC_RELAXED);
        if (z >= Z) break;
        for (int64_t y = 0; y < Y; y++)
            for (int64_t x = 0; x < X; x++) {
                const float *s = j->src + x * j->st[0] + y * j->st[1] + z * j->st[2];
                float *d = j->dst + ((x * Y + y) * Z + z) * N;
                int any = 0, nonfinite = 0;
                for (int64_t k = 0; k < N; k++) {
                    float v = s[k * j->st[3]];
                    d[k] = v;
                    any |= v != 0.0f;
                    nonfinite |= !isfinite(v);
                }
                j->nonzero[(x * Y + y) * Z + z] = (uint8_t)any;
                bad += nonfinite;
            }
    }
    __atomic_fetch_add(&j->bad, bad, __ATOMIC_RELAXED);
    return NULL;
}

/* Copy a (X, Y, Z, N) float volume with element strides st[4] into C order (coefficients contiguous,
 * what the sampler reads), and mark the voxels holding any non-zero value.  Returns the number of
 * voxels holding a non-finite value. */
int64_t sd_repack(const float *src, const int64_t *st, const int64_t *dim, float *dst, uint8_t *nonzero,
                  int32_t nthreads) {
    repack_job j = {src, st, dim, dst, nonzero, 0, 0};
    if (nthreads < 1) nthreads = 1;
    if (nthreads > 256) nthreads = 256;
    pthread_t th[256];
    int started = 0;
    for (int t = 1; t < nthreads; t++) {
        if (pthread_create(&th[started], NULL, repack_worker, &j) != 0) break;
        started++;
    }
    repack_worker(&j);
    for (int t = 0; t < started; t++) pthread_join(th[t], NULL);
    return j.bad;
}

int32_t sd_abi_version(void) { return 7; }
