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
 * Termination codes (tractfunc.stop.Reason): 0 continue, 1 left the image, 2 cutoff / no peak,
 * 3 curvature, 4 left the mask, 5 vertex budget reached, 6 seed rejected.
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

#define MAX_COEF 91          /* lmax 12 */
#define MAX_AL 64            /* (lmax/2 + 1)^2 for lmax 14 */

typedef struct {
    /* FOD: value of coefficient k at voxel (x, y, z) = fod[x*s0 + y*s1 + z*s2 + k*sk] */
    const float *fod;
    int64_t fod_stride[4];
    int64_t dim[3];
    int32_t ncoef;
    int32_t lmax;
    /* voxels holding any non-zero coefficient (same frame), uint8 */
    const uint8_t *nonzero;
    int64_t nz_stride[3];
    /* scanner mm -> voxel (double, row-major 3x4) */
    double s2v[12];
    /* optional tracking mask (NULL: none), its own grid and single-precision transform */
    const uint8_t *mask;
    int64_t mask_dim[3];
    int64_t mask_stride[3];
    float mask_s2v[12];
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

/* Interpolated FOD coefficients at scanner position pos; returns 0 when outside the image or where
 * the nearest voxel is all zero (tckgen: the streamline leaves the image). */
static int get_data(const sd_config *c, const float *pos, float *values) {
    double v[3];
    {
        /* Eigen's affine * vector: rows 0-1 as a 2-wide SIMD product, row 2 scalar, each in its order */
        const double *s = c->s2v, p0 = pos[0], p1 = pos[1], p2 = pos[2];
        v[0] = ((s[0] * p0 + s[1] * p1) + s[2] * p2) + s[3];
        v[1] = ((s[4] * p0 + s[5] * p1) + s[6] * p2) + s[7];
        v[2] = (s[10] * p2 + s[11]) + (s[8] * p0 + s[9] * p1);
    }
    for (int i = 0; i < 3; i++)
        if (!(v[i] > -0.5 && v[i] < (double)c->dim[i] - 0.5)) return 0;
    {
        int64_t o = 0;
        for (int i = 0; i < 3; i++) o += (int64_t)round(v[i]) * c->nz_stride[i];
        if (!c->nonzero[o]) return 0;
    }
    double f[3];
    int64_t base[3];
    for (int i = 0; i < 3; i++) {
        double fl = floor(v[i]);
        f[i] = v[i] - fl;
        base[i] = (int64_t)fl;
        if (v[i] < 0.0 || v[i] > ((double)c->dim[i] - 0.5) - 0.5) f[i] = 0.0;
    }
    const float xw[2] = {(float)(1 - f[0]), (float)f[0]};
    const float yw[2] = {(float)(1 - f[1]), (float)f[1]};
    const float zw[2] = {(float)(1 - f[2]), (float)f[2]};
    float w[8];
    const float *src[8];
    int k = 0;
    for (int z = 0; z < 2; z++) {
        int64_t oz = clampi(base[2] + z, c->dim[2]) * c->fod_stride[2];
        for (int y = 0; y < 2; y++) {
            int64_t oy = clampi(base[1] + y, c->dim[1]) * c->fod_stride[1];
            float pw = yw[y] * zw[z];
            for (int x = 0; x < 2; x++) {
                int64_t ox = clampi(base[0] + x, c->dim[0]) * c->fod_stride[0];
                w[k] = xw[x] * pw;
                if (w[k] < 1e-6f) w[k] = 0.0f;
                src[k] = c->fod + ox + oy + oz;
                k++;
            }
        }
    }
    const int64_t sk = c->fod_stride[3];
    for (int n = 0; n < c->ncoef; n++) {
        const int64_t o = n * sk;
        /* the 8-term dot product in the order of a 4-wide SIMD reduction */
        float a0 = src[0][o] * w[0] + src[4][o] * w[4];
        float a1 = src[1][o] * w[1] + src[5][o] * w[5];
        float a2 = src[2][o] * w[2] + src[6][o] * w[6];
        float a3 = src[3][o] * w[3] + src[7][o] * w[7];
        values[n] = (a0 + a2) + (a1 + a3);
    }
    return !isnan(values[0]);
}

/* Nearest-voxel mask test in the mask's single-precision frame. */
static int mask_contains(const sd_config *c, const float *pos) {
    if (!c->mask) return 1;
    int64_t o = 0;
    for (int i = 0; i < 3; i++) {
        const float *r = c->mask_s2v + 4 * i;
        float v = r[0] * pos[0] + (r[1] * pos[1] + r[2] * pos[2]) + r[3];
        /* outside for sure (also NaN/Inf, whose integer conversion below would be undefined) */
        if (!(v > -1.0f && v < (float)c->mask_dim[i])) return 0;
        int64_t idx = (int64_t)roundf(v);
        if (idx < 0 || idx >= c->mask_dim[i]) return 0;
        o += idx * c->mask_stride[i];
    }
    return c->mask[o] != 0;
}

/* ------------------------------------------------------------------------------------------------ */
/* Propagation                                                                                       */

typedef struct {
    float pos[3], dir[3];
    float values[MAX_COEF];
    float stage[12];   /* the peak directions of the last step: Euler u, RK4 d1..d4 (for the adjoint) */
} walker;

static float find_peak(const sd_config *c, walker *w) {
    float amp = get_peak(c, w->values, w->dir);
    if (!isfinite(amp) || amp < c->threshold) amp = 0.0f;
    return amp;
}

/* SD_Stream's elementary move: peak at pos from dir, angle test, step. */
static int sd_next(const sd_config *c, walker *w) {
    if (!get_data(c, w->pos, w->values)) return R_EXIT_IMAGE;
    float prev[3] = {w->dir[0], w->dir[1], w->dir[2]};
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
    float d1[3], d2[3], d3[3], d4[3];
    if ((t = sd_next(c, w))) return t;
    memcpy(d1, w->dir, sizeof d1);
    for (int i = 0; i < 3; i++) { w->pos[i] = p0[i] + d1[i] * half; w->dir[i] = d0[i]; }
    if ((t = sd_next(c, w))) return t;
    memcpy(d2, w->dir, sizeof d2);
    for (int i = 0; i < 3; i++) { w->pos[i] = p0[i] + d2[i] * half; w->dir[i] = d0[i]; }
    if ((t = sd_next(c, w))) return t;
    memcpy(d3, w->dir, sizeof d3);
    for (int i = 0; i < 3; i++) { w->pos[i] = p0[i] + d3[i] * c->step; w->dir[i] = d2[i] + d3[i]; }
    normalize3(w->dir);
    if ((t = sd_next(c, w))) return t;
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
    if (dot3(d1, w->dir) < c->cos_max_angle_ho) return R_CURVATURE;
    memcpy(w->pos, fp, sizeof fp);
    memcpy(w->dir, fd, sizeof fd);
    return R_CONTINUE;
}

static int iterate(const sd_config *c, walker *w) {
    int t = c->rk4 ? next_rk4(c, w) : sd_next(c, w);
    if (t) return t;
    if (!c->rk4) memcpy(w->stage, w->dir, 3 * sizeof(float));
    if (!mask_contains(c, w->pos)) return R_EXIT_MASK;
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
    do {
        t = iterate(c, w);
        if (t == R_CONTINUE) {
            if (!reserve(out, *n + 1)) return R_NO_MEMORY;
            if (dout && !reserve(dout, *n + 1)) return R_NO_MEMORY;
            memcpy(out->v + 3 * *n, w->pos, 3 * sizeof(float));
            if (dout) memcpy(dout->v + dout->width * *n, w->stage, dout->width * sizeof(float));
            (*n)++;
            if (*n >= c->max_points) t = R_MAX_LENGTH;
        }
    } while (t == R_CONTINUE);
    return t;
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
    if (!mask_contains(c, w->pos)) return 0;
    if (!get_data(c, w->pos, w->values)) return 0;
    normalize3(w->dir);
    if (find_peak(c, w) == 0.0f) return 0;
    const float seed_dir[3] = {w->dir[0], w->dir[1], w->dir[2]};
    int64_t n = 1;
    if (!reserve(out, 1)) return -1;
    if (dout && !reserve(dout, 1)) return -1;
    float *v = out->v;
    memcpy(v, w->pos, 3 * sizeof(float));
    if (dout) memset(dout->v, 0, dout->width * sizeof(float));   /* the seed vertex: no step */
    if ((reasons[0] = half(c, w, out, dout, &n)) == R_NO_MEMORY) return -1;
    v = out->v;
    /* reverse the forward half so it ends at the seed */
    for (int64_t i = 0, j = n - 1; i < j; i++, j--)
        for (int k = 0; k < 3; k++) { float t = v[3 * i + k]; v[3 * i + k] = v[3 * j + k]; v[3 * j + k] = t; }
    if (dout) {
        const int dw = dout->width;
        float *d = dout->v;
        for (int64_t i = 0, j = n - 1; i < j; i++, j--)
            for (int k = 0; k < dw; k++) { float t = d[dw * i + k]; d[dw * i + k] = d[dw * j + k]; d[dw * j + k] = t; }
    }
    *seed_index = n - 1;
    memcpy(w->pos, v + 3 * (n - 1), 3 * sizeof(float));
    for (int k = 0; k < 3; k++) w->dir[k] = -seed_dir[k];
    if ((reasons[1] = half(c, w, out, dout, &n)) == R_NO_MEMORY) return -1;
    if ((n == 1 && c->min_points > 1) || n < c->min_points) return 0;
    return n;
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
        int64_t len = track_one(j->c, &w, j->seeds + 3 * i, j->dirs + 3 * i, &buf, dout, j->seed_index + i,
                                j->reasons + 2 * i);
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

/* sd_track_batch that also records, when dlines is not NULL, each vertex's step directions (Euler: the peak u
 * the step moved along; RK4: the four stage peaks d1..d4; zeros at the seed vertex): dlines (n,) receives a
 * malloc'd (lengths[i], 3 or 12) float array per accepted seed, in the vertices' order (sd_gather_width). */
int32_t sd_track_batch_dirs(const sd_config *c, int64_t n, const float *seeds, const float *dirs, float **lines,
                            float **dlines, int64_t *lengths, int64_t *seed_index, int32_t *reasons,
                            int32_t nthreads) {
    pthread_once(&consts_once, init_consts);
    batch_job j = {c, n, seeds, dirs, lines, dlines, c->rk4 ? 12 : 3, lengths, seed_index, reasons, 0, 0};
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
        if (!mask_contains(c, w.pos) || !get_data(c, w.pos, w.values)) continue;
        normalize3(w.dir);
        if (find_peak(c, &w) == 0.0f) continue;
        const float p1[3] = {w.dir[0], w.dir[1], w.dir[2]};
        memcpy(pk, p1, sizeof p1);
        if (iterate(c, &w) == R_CONTINUE) memcpy(f, w.pos, sizeof w.pos);
        memcpy(w.pos, seeds + 3 * i, sizeof w.pos);
        for (int k = 0; k < 3; k++) w.dir[k] = -p1[k];
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

int32_t sd_abi_version(void) { return 3; }
