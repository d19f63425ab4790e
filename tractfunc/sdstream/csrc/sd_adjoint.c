/* Fused reverse sweep of SD_Stream streamlines (the adjoint), and their exact replay, in double precision.
 *
 * Given streamlines whose discrete decisions are fixed (how many steps each half takes; from the native kernel
 * sd_stream.c, which also records each step's peak directions), this file evaluates
 *   - sd_replay: the streamlines again along those decisions, in double, with every peak either polished to the
 *     exact maximum of the exactly evaluated SH series (full tangent Newton iterations from the recorded
 *     direction), or searched as tckgen does (its Newton iteration and tolerance, the Legendre lookup table) from
 *     the directions tractfunc.sdstream.follow starts from;
 *   - sd_jvp: the Jacobian-vector product of the vertices (and soft stopping's weights), forward mode along the same
 *     records, with the same derivative rules;
 *   - sd_adjoint: the vector-Jacobian product of the vertices with respect to the FOD coefficients, the seeds
 *     and the step length, by one reverse sweep per streamline.  Each peak's derivative is the implicit-function
 *     one (proofs/peak_ift.md): du = -E H2^-1 E^T dF(u; dc), so its transpose applied to a cotangent ubar is the
 *     derivative of every basis function at u along t = -E H2^-1 E^T ubar, scattered into the 8 voxels of the
 *     trilinear sample with their weights, and through the weights' derivatives to the position.
 * The formulas are those of the PyTorch primitives (tractfunc.core.sh.sh_jet, core.newton.tangent_newton,
 * core.implicit.attach_peak, core.interpolate.trilinear, core.fodgrad, core.integrate.euler / rk4), which stay
 * the specification: tests/sdstream/test_fused.py compares the two.
 *
 * Frames: positions in scanner mm; the FOD is an (X, Y, Z, N) C-ordered array in its own voxel frame (the
 * PyTorch field's, not the kernel's realigned one), w2v the scanner -> voxel rows of its inverse affine.
 * Step records per vertex (rec_width), in the row of the vertex the step produced: Euler 3 (u), RK4 12 (d1..d4);
 * with soft stopping (tractfunc.Soft) Euler 5 (u, amplitude margin, cosine margin; the seed row holds the seed
 * peak) and RK4 18 (d1..d4, the peak m5 at the new vertex, the two margins, the stage of the smallest amplitude):
 * each step multiplies the survival weight by s(amp_margin / T) s(cos_margin / T), s the logistic function
 * (core.integrate.sd_move / rk4, sdstream.step.survival_increment), and sd_adjoint also takes dL/dweights.
 * Written for tractfunc; shares no code with MRtrix3.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <pthread.h>

#ifndef M_PI
#define M_PI 3.14159265358979323846
#endif
#define A_MAXL 12
#define A_MAXC 91
#define WEIGHT_EPS 1e-6
#define REL_EPS 1e-6

typedef struct {
    const void *fod;          /* (X, Y, Z, N) C order */
    int32_t fod_double;       /* 1: double, 0: float */
    int64_t dim[3];
    int32_t ncoef, lmax;
    const uint8_t *nonzero;   /* (X, Y, Z) voxels holding any non-zero coefficient */
    double w2v[12];           /* scanner mm -> voxel: rows 0..2 of the inverse affine */
    double step;
    int32_t rk4;
    int32_t polish;           /* sd_replay: at most this many exact Newton iterations per peak */
    int32_t soft;             /* soft stopping: margins recorded, survival weights (sd_soft_weights) */
    double temperature, cutoff, cos_max;   /* soft: T, the amplitude cutoff, the cosine limit of the scheme */
    const double *lut;        /* sd_replay with tckgen's peaks: (lut_ndir, lut_l1, lut_l1) N_lm P_l^m(cos el) at
                                 el = n lut_inc, indexed [n][l][m] (core.sh.LegendreTable), or NULL: exact peaks */
    double lut_inc;
    int32_t lut_ndir, lut_l1;
    int32_t pack;             /* RK4 records stored packed (sd_replay's double output; see stored_width) */
    int32_t own_starts;       /* sd_replay with tckgen's peaks: searches start as track_fixed's (replay_half) */
} adj_config;

/* Doubles per vertex in a step record (see the top of this file). */
static inline int rec_width(const adj_config *c) { return c->soft ? (c->rk4 ? 18 : 5) : (c->rk4 ? 12 : 3); }
#define AMP_OFF(c) ((c)->rk4 ? 15 : 3)   /* soft: the amplitude margin's slot; the cosine margin's is next */

/* Packed RK4 records (c->pack), what sd_replay stores between forward and backward in double: each unit peak as two
 * of its components, the one of largest magnitude dropped (|d_k| >= 1/sqrt 3, so d_k = +-sqrt(1 - a^2 - b^2) comes
 * back to the last bit or two), its index and sign in 3 bits of a flags word; with soft stopping also the amplitude
 * margin (the cosine margin is d1.m5 - cos_max again, the smallest stage is in the flags).  Hard: d1..d4 in 8
 * doubles and the flags, 72 bytes instead of 96; soft: d1..d4, m5, the margin and the flags, 96 instead of 144. */
static inline int packed(const adj_config *c) { return c->pack && c->rk4; }
static inline int stored_width(const adj_config *c) { return packed(c) ? (c->soft ? 12 : 9) : rec_width(c); }

/* Doubles per vertex sd_replay writes into its sdirs (what the caller allocates). */
int32_t sd_stored_width(const adj_config *c) { return stored_width(c); }

static int encode_dir(const double *d, double *out) {
    int k = 0;
    for (int i = 1; i < 3; i++) if (fabs(d[i]) > fabs(d[k])) k = i;
    out[0] = d[k == 0 ? 1 : 0];
    out[1] = d[k == 2 ? 1 : 2];
    return k | (d[k] < 0 ? 4 : 0);
}

static void decode_dir(const double *in, int code, double *d) {
    const int k = code & 3;
    const double r = 1.0 - in[0] * in[0] - in[1] * in[1];
    d[k == 0 ? 1 : 0] = in[0];
    d[k == 2 ? 1 : 2] = in[1];
    d[k] = (code & 4 ? -1.0 : 1.0) * sqrt(r > 0.0 ? r : 0.0);
}

/* full (rec_width doubles) -> out (stored_width doubles) */
static void encode_row(const adj_config *c, const double *full, double *out) {
    const int n = c->soft ? 5 : 4;
    int64_t flags = 0;
    for (int p = 0; p < n; p++) flags |= (int64_t)encode_dir(full + 3 * p, out + 2 * p) << (3 * p);
    if (c->soft) {
        out[10] = full[15];
        flags |= (int64_t)full[17] << 15;
    }
    out[stored_width(c) - 1] = (double)flags;
}

/* Row `row` of the records rec as rec_width doubles: rec's own row, or (packed) decoded into buf. */
static const double *rec_row(const adj_config *c, const double *rec, int64_t row, double *buf) {
    if (!packed(c)) return rec + (int64_t)rec_width(c) * row;
    const int sw = stored_width(c), n = c->soft ? 5 : 4;
    const double *in = rec + (int64_t)sw * row;
    const int64_t flags = (int64_t)in[sw - 1];
    for (int p = 0; p < n; p++) decode_dir(in + 2 * p, (int)((flags >> (3 * p)) & 7), buf + 3 * p);
    if (c->soft) {
        buf[15] = in[10];
        buf[16] = buf[0] * buf[12] + buf[1] * buf[13] + buf[2] * buf[14] - c->cos_max;
        buf[17] = (double)((flags >> 15) & 7);
    }
    return buf;
}

/* log s(x) and its derivative s(-x), s the logistic function (stable for large |x|). */
static inline double log_sigmoid(double x) { return x >= 0 ? -log1p(exp(-x)) : x - log1p(exp(x)); }
static inline double sigmoid_neg(double x) { return x >= 0 ? exp(-x) / (1.0 + exp(-x)) : 1.0 / (1.0 + exp(x)); }

/* ------------------------------------------------------------------------------------------------ */
/* SH basis as polynomials in (x, y, z): Y_k = n_k Q_{l,|m|}(z) T_k(x, y), Q_{l,j} = d^j P_l / dz^j,     */
/* T = Re (x + iy)^|m| (m >= 0) or Im (m < 0); value, Cartesian gradient and Hessian of the extension.   */

static int KL[A_MAXC], KM[A_MAXC], KNEG[A_MAXC];
static double KN[A_MAXC];
/* the (el, az) derivative constants of tckgen's peak search per coefficient (core.sh._mrtrix_deriv_consts) */
static double DS_LO[A_MAXC], DS_HI[A_MAXC], DS_LO2[A_MAXC], DMID[A_MAXC], DS_HI2[A_MAXC];
static pthread_once_t tables_once = PTHREAD_ONCE_INIT;

static void init_tables(void) {
    for (int l = 0; l <= A_MAXL; l += 2)
        for (int m = -l; m <= l; m++) {
            int k = l * (l + 1) / 2 + m, am = m < 0 ? -m : m;
            double ratio = 1.0;   /* (l - am)! / (l + am)! */
            for (int j = l - am + 1; j <= l + am; j++) ratio /= (double)j;
            double n = sqrt((2 * l + 1) / (4.0 * M_PI) * ratio);
            if (am) n *= sqrt(2.0) * ((am & 1) ? -1.0 : 1.0);
            KL[k] = l; KM[k] = am; KNEG[k] = m < 0; KN[k] = n;
            if (am == 0) {
                DS_LO[k] = sqrt((double)(l * (l + 1))); DS_HI[k] = 0.0;
                DS_LO2[k] = sqrt((double)(l * (l + 1) * (l - 1) * (l + 2))) / 2.0;
                DMID[k] = -(double)(l * (l + 1)) / 2.0; DS_HI2[k] = 0.0;
            } else {
                DS_LO[k] = sqrt((double)((l + am) * (l - am + 1)));
                DS_HI[k] = l > am ? sqrt((double)((l - am) * (l + am + 1))) : 0.0;
                DMID[k] = -(double)((l + am) * (l - am + 1) + (l - am) * (l + am + 1)) / 4.0;
                DS_LO2[k] = sqrt((double)((l + am) * (l - am + 1) * (l + am - 1) * (l - am + 2))) / 4.0;
                DS_HI2[k] = l > am + 1 ? sqrt((double)((l - am) * (l + am + 1) * (l - am - 1) * (l + am + 2))) / 4.0
                                       : 0.0;
            }
        }
}

/* B[k], dB[k][3], d2B[k][6] (xx, xy, xz, yy, yz, zz) at unit u for every coefficient k < n. */
static void basis_jet(int lmax, int n, const double *u, double *B, double (*dB)[3], double (*d2B)[6]) {
    const double x = u[0], y = u[1], z = u[2];
    const int ncol = lmax + 3;
    double Q[A_MAXL + 1][A_MAXL + 3];
    memset(Q, 0, sizeof Q);
    Q[0][0] = 1.0;
    if (lmax >= 1) { Q[1][0] = z; Q[1][1] = 1.0; }
    for (int l = 1; l < lmax; l++) {
        Q[l + 1][0] = ((2 * l + 1) * z * Q[l][0] - l * Q[l - 1][0]) / (l + 1);
        for (int j = 1; j < ncol; j++) Q[l + 1][j] = Q[l - 1][j] + (2 * l + 1) * Q[l][j - 1];
    }
    double C[A_MAXL + 1], S[A_MAXL + 1];
    C[0] = 1.0; S[0] = 0.0;
    for (int m = 0; m < lmax; m++) { C[m + 1] = C[m] * x - S[m] * y; S[m + 1] = S[m] * x + C[m] * y; }
    for (int k = 0; k < n; k++) {
        const int l = KL[k], m = KM[k], neg = KNEG[k];
        const double q0 = Q[l][m] * KN[k], q1 = Q[l][m + 1] * KN[k], q2 = Q[l][m + 2] * KN[k];
        const int i1 = m >= 1 ? m - 1 : 0, i2 = m >= 2 ? m - 2 : 0;
        const double T = neg ? S[m] : C[m];
        const double Tx = m * (neg ? S[i1] : C[i1]), Ty = m * (neg ? C[i1] : -S[i1]);
        const double mm = (double)m * (m - 1);
        const double Txx = mm * (neg ? S[i2] : C[i2]), Txy = mm * (neg ? C[i2] : -S[i2]);
        B[k] = q0 * T;
        if (dB) { dB[k][0] = q0 * Tx; dB[k][1] = q0 * Ty; dB[k][2] = q1 * T; }
        if (d2B) {
            d2B[k][0] = q0 * Txx; d2B[k][1] = q0 * Txy; d2B[k][2] = q1 * Tx;
            d2B[k][3] = -q0 * Txx; d2B[k][4] = q1 * Ty; d2B[k][5] = q2 * T;
        }
    }
}

/* Orthonormal tangent frame at unit u: e1, e2 (the rule of core.newton.tangent_basis). */
static void tangent_frame(const double *u, double *e1, double *e2) {
    double a[3] = {0.0, 0.0, 0.0};
    if (fabs(u[0]) < 0.9) a[0] = 1.0; else a[1] = 1.0;
    double d = a[0] * u[0] + a[1] * u[1] + a[2] * u[2];
    for (int i = 0; i < 3; i++) e1[i] = a[i] - d * u[i];
    double nn = sqrt(e1[0] * e1[0] + e1[1] * e1[1] + e1[2] * e1[2]);
    for (int i = 0; i < 3; i++) e1[i] /= nn;
    e2[0] = u[1] * e1[2] - u[2] * e1[1];
    e2[1] = u[2] * e1[0] - u[0] * e1[2];
    e2[2] = u[0] * e1[1] - u[1] * e1[0];
}

/* The tangent Hessian H2 = (a b; c d) of the series c at u, the tangent gradient (g0, g1) and the frame.
 * Returns 1 where H2 is negative definite with eigenvalue ratio above REL_EPS (core.newton.tangent_newton). */
typedef struct { double e1[3], e2[3], a, b, c, d, det, g0, g1; } tangent_jet;

static int tangent(int lmax, int n, const double *coef, const double *u, tangent_jet *t, double (*dB)[3], double *B) {
    double d2B[A_MAXC][6];
    basis_jet(lmax, n, u, B, dB, d2B);
    double g[3] = {0, 0, 0}, H[6] = {0, 0, 0, 0, 0, 0};
    for (int k = 0; k < n; k++) {
        for (int i = 0; i < 3; i++) g[i] += coef[k] * dB[k][i];
        for (int i = 0; i < 6; i++) H[i] += coef[k] * d2B[k][i];
    }
    const double radial = u[0] * g[0] + u[1] * g[1] + u[2] * g[2];
    tangent_frame(u, t->e1, t->e2);
    const double *E[2] = {t->e1, t->e2};
    double h2[2][2];
    for (int p = 0; p < 2; p++) {
        const double *e = E[p];
        double He[3] = {H[0] * e[0] + H[1] * e[1] + H[2] * e[2], H[1] * e[0] + H[3] * e[1] + H[4] * e[2],
                        H[2] * e[0] + H[4] * e[1] + H[5] * e[2]};
        for (int q = 0; q < 2; q++) h2[q][p] = E[q][0] * He[0] + E[q][1] * He[1] + E[q][2] * He[2];
        h2[p][p] -= radial;
    }
    t->a = h2[0][0]; t->b = h2[0][1]; t->c = h2[1][0]; t->d = h2[1][1];
    t->g0 = t->e1[0] * g[0] + t->e1[1] * g[1] + t->e1[2] * g[2];
    t->g1 = t->e2[0] * g[0] + t->e2[1] * g[1] + t->e2[2] * g[2];
    const double tr = t->a + t->d;
    t->det = t->a * t->d - t->b * t->c;
    return tr < 0 && t->det > (REL_EPS / ((1.0 + REL_EPS) * (1.0 + REL_EPS))) * tr * tr && isfinite(t->det);
}

/* ------------------------------------------------------------------------------------------------ */
/* Trilinear sampling with MRtrix3's rules (core.interpolate), remembering what the adjoint needs.        */

typedef struct {
    int64_t row[8];      /* voxel row of each corner in the (X*Y*Z, N) view */
    double w[8];         /* weights as the sum uses them (cast to the volume's precision, small ones dropped) */
    double frac[3], sgn_free[3];
    int inside;
} sample_info;

static inline double fod_at(const adj_config *c, int64_t i) {
    return c->fod_double ? ((const double *)c->fod)[i] : (double)((const float *)c->fod)[i];
}

static void to_voxel(const adj_config *c, const double *p, double *v) {
    for (int i = 0; i < 3; i++) {
        const double *r = c->w2v + 4 * i;
        v[i] = r[0] * p[0] + r[1] * p[1] + r[2] * p[2] + r[3];
    }
}

static double round_half_away(double x) { return x < 0 ? -floor(-x + 0.5) : floor(x + 0.5); }

/* Coefficients at scanner point pos into vals (zeros when outside); fills si. */
static void sample(const adj_config *c, const double *pos, double *vals, sample_info *si) {
    double v[3];
    to_voxel(c, pos, v);
    const int n = c->ncoef;
    si->inside = 1;
    int64_t near = 0;
    for (int i = 0; i < 3; i++) {
        if (!(v[i] > -0.5 && v[i] < (double)c->dim[i] - 0.5)) si->inside = 0;
    }
    if (si->inside) {
        int64_t r[3];
        for (int i = 0; i < 3; i++) {
            r[i] = (int64_t)round_half_away(v[i]);
            if (r[i] < 0 || r[i] > c->dim[i] - 1) si->inside = 0;
        }
        near = (r[0] * c->dim[1] + r[1]) * c->dim[2] + r[2];
        if (si->inside && !c->nonzero[near]) si->inside = 0;
    }
    if (!si->inside) { memset(vals, 0, n * sizeof(double)); return; }
    int64_t base[3];
    for (int i = 0; i < 3; i++) {
        double fl = floor(v[i]);
        base[i] = (int64_t)fl;
        int clamp = v[i] < 0 || v[i] > (double)(c->dim[i] - 1);
        si->frac[i] = clamp ? 0.0 : v[i] - fl;
        si->sgn_free[i] = clamp ? 0.0 : 1.0;
    }
    for (int k = 0; k < 8; k++) {
        int o[3] = {(k >> 2) & 1, (k >> 1) & 1, k & 1};
        int64_t idx[3];
        double f[3];
        for (int a = 0; a < 3; a++) {
            int64_t t = base[a] + o[a];
            idx[a] = t < 0 ? 0 : (t > c->dim[a] - 1 ? c->dim[a] - 1 : t);
            f[a] = o[a] ? si->frac[a] : 1.0 - si->frac[a];
        }
        double w = (f[0] * f[1]) * f[2];
        if (!c->fod_double) w = (double)(float)w;
        if (w < WEIGHT_EPS && w != 0.0) w = 0.0;
        si->w[k] = w;
        si->row[k] = (idx[0] * c->dim[1] + idx[1]) * c->dim[2] + idx[2];
    }
    for (int j = 0; j < n; j++) {
        double s = 0.0;
        for (int k = 0; k < 8; k++) s += si->w[k] * fod_at(c, si->row[k] * n + j);
        vals[j] = s;
    }
}

/* ------------------------------------------------------------------------------------------------ */
/* Peak polish (replay) and peak VJP (adjoint)                                                       */

static void normalize(double *u) {
    double n = sqrt(u[0] * u[0] + u[1] * u[1] + u[2] * u[2]);
    u[0] /= n; u[1] /= n; u[2] /= n;
}

/* Sum of vals[k] Y_k(u). */
static double series_at(const adj_config *c, const double *vals, const double *u) {
    double B[A_MAXC], f = 0.0;
    basis_jet(c->lmax, c->ncoef, u, B, NULL, NULL);
    for (int k = 0; k < c->ncoef; k++) f += vals[k] * B[k];
    return f;
}

/* Exact peak at pos from start u (in place): up to c->polish full tangent Newton iterations, stopping once
 * the move is below 1e-15 rad; *amp (when not NULL) its amplitude (0 outside).  Returns 0 where the sample is
 * outside or a Hessian is not regular (u then keeps its last value). */
static int polish_peak(const adj_config *c, const double *pos, double *u, double *amp) {
    double vals[A_MAXC], dB[A_MAXC][3], B[A_MAXC];
    sample_info si;
    if (amp) *amp = 0.0;
    sample(c, pos, vals, &si);
    if (!si.inside) return 0;
    normalize(u);
    int ok = 1;
    for (int it = 0; it < c->polish; it++) {
        tangent_jet t;
        if (!tangent(c->lmax, c->ncoef, vals, u, &t, dB, B)) { ok = 0; break; }
        const double x0 = -(t.d * t.g0 - t.b * t.g1) / t.det, x1 = -(t.a * t.g1 - t.c * t.g0) / t.det;
        double step = 0.0;
        for (int i = 0; i < 3; i++) {
            double dl = t.e1[i] * x0 + t.e2[i] * x1;
            u[i] += dl;
            step += dl * dl;
        }
        normalize(u);
        if (step < 1e-30) break;
    }
    if (amp) *amp = series_at(c, vals, u);
    return ok;
}

/* What one step of tckgen's peak search needs at u: the amplitude, the unit tangent direction of steepest ascent
 * (0 where the gradient vanishes), the slope and the curvature along it (core.sh.LineJet). */
typedef struct { double amp, gdir[3], slope, curv; } line_jet;

/* The line jet from the exact tangent jet (core.sh.exact_line_jet). */
static void exact_line(const adj_config *c, const double *vals, const double *u, line_jet *o) {
    double dB[A_MAXC][3], B[A_MAXC];
    tangent_jet t;
    tangent(c->lmax, c->ncoef, vals, u, &t, dB, B);
    double amp = 0.0;
    for (int k = 0; k < c->ncoef; k++) amp += vals[k] * B[k];
    const double gn = sqrt(t.g0 * t.g0 + t.g1 * t.g1);
    const double h0 = gn > 0 ? t.g0 / gn : 0.0, h1 = gn > 0 ? t.g1 / gn : 0.0;
    for (int i = 0; i < 3; i++) o->gdir[i] = h0 * t.e1[i] + h1 * t.e2[i];
    o->amp = amp; o->slope = gn;
    o->curv = h0 * h0 * t.a + h0 * h1 * (t.b + t.c) + h1 * h1 * t.d;
}

/* The line jet as MRtrix3 3.0.3's get_peak computes it, in double (core.sh.mrtrix_line_jet): Legendre values
 * linearly interpolated in the table, (el, az) partial derivatives; within 1e-3 rad of the z axis the exact one. */
static void lut_line(const adj_config *c, const double *vals, const double *u, line_jet *o) {
    const double z = u[2] < -1.0 ? -1.0 : (u[2] > 1.0 ? 1.0 : u[2]);
    const double az = atan2(u[1], u[0]), el = acos(z), sel = sin(el), cel = cos(el);
    if (sel < 1e-3) { exact_line(c, vals, u, o); return; }
    const int L1 = c->lut_l1;
    double t = el / c->lut_inc, fi = floor(t);
    if (!(fi >= 0.0)) fi = 0.0;   /* (NaN too) */
    if (fi > (double)(c->lut_ndir - 2)) fi = (double)(c->lut_ndir - 2);
    double f2 = t - fi;
    f2 = f2 < 0.0 ? 0.0 : (f2 > 1.0 ? 1.0 : f2);
    const double f1 = 1.0 - f2;
    const double *p1 = c->lut + (int64_t)fi * L1 * L1, *p2 = p1 + L1 * L1;
#define AL(l, m) ((m) < 0 || (m) >= L1 ? 0.0 : f1 * p1[(l) * L1 + (m)] + f2 * p2[(l) * L1 + (m)])
    double amp = 0.0, d_el = 0.0, d2_el = 0.0, daz_pole = 0.0, daz = 0.0, delaz = 0.0, daz2 = 0.0;
    for (int k = 0; k < c->ncoef; k++) {
        const int l = KL[k], m = KM[k];
        if (KNEG[k]) continue;
        const double a0 = AL(l, m), ap1 = AL(l, m + 1), ap2 = AL(l, m + 2);
        if (m == 0) {
            amp += vals[k] * a0;
            d_el += vals[k] * (DS_LO[k] * ap1);
            d2_el += vals[k] * (DS_LO2[k] * ap2 + DMID[k] * a0);
            continue;
        }
        const double am1 = AL(l, m - 1), am2 = AL(l, m - 2), mf = (double)m;
        const double caz = sqrt(2.0) * cos(mf * az), saz = sqrt(2.0) * sin(mf * az);
        const double vp = vals[k], vm = vals[k - 2 * m];
        const double w = vp * caz + vm * saz, wr = vm * caz - vp * saz;
        const double tmp = -(DS_LO[k] * am1 - DS_HI[k] * ap1) / 2.0;
        const double tmp2 = DMID[k] * a0 + (m == 1 ? -DS_LO2[k] * a0 : DS_LO2[k] * am2) + DS_HI2[k] * ap2;
        amp += w * a0;
        d_el += w * tmp;
        d2_el += w * tmp2;
        daz_pole += wr * tmp;
        daz += mf * wr * a0;
        delaz += mf * wr * tmp;
        daz2 += -w * mf * mf * a0;
    }
#undef AL
    const int atpole = sel < 1e-4;
    const double d_az = atpole ? daz_pole : daz / sel;
    const double d_elaz = atpole ? 0.0 : delaz / sel, d_az2 = atpole ? 0.0 : daz2 / (sel * sel);
    const double gn = sqrt(d_el * d_el + d_az * d_az);
    const double h_el = gn != 0 ? d_el / gn : 0.0, h_az = gn != 0 ? d_az / gn : 0.0;
    const double ca = cos(az), sa = sin(az);
    o->amp = amp;
    o->slope = h_az * d_az + h_el * d_el;
    o->curv = h_az * h_az * d_az2 + 2.0 * h_az * h_el * d_elaz + h_el * h_el * d2_el;
    o->gdir[0] = h_el * ca * cel - h_az * sa;
    o->gdir[1] = h_el * sa * cel + h_az * ca;
    o->gdir[2] = -h_el * sel;
}

/* tckgen's peak search in double (core.newton.peak with the table: 1-D Newton moves along the steepest ascent,
 * capped at 0.2 rad, until a move is below 1e-4 rad; the amplitude is the one before that last move) from u (in
 * place) on the sample at pos.  Returns 0 where the sample is outside, the start is not finite or 50 moves did not
 * converge (u then keeps its start; *amp is 0, or the last amplitude evaluated). */
static int lut_peak(const adj_config *c, const double *pos, double *u, double *amp) {
    double vals[A_MAXC];
    sample_info si;
    if (amp) *amp = 0.0;
    if (!(isfinite(u[0]) && isfinite(u[1]) && isfinite(u[2]))) return 0;
    sample(c, pos, vals, &si);
    if (!si.inside) return 0;
    double v[3] = {u[0], u[1], u[2]};
    for (int it = 0; it < 50; it++) {
        line_jet j;
        lut_line(c, vals, v, &j);
        if (amp) *amp = j.amp;
        double dt = j.curv != 0 ? -j.slope / j.curv : 0.0;
        dt = fabs(dt);
        if (dt > 0.2) dt = 0.2;
        for (int i = 0; i < 3; i++) v[i] += dt * j.gdir[i];
        normalize(v);
        if (dt < 1e-4) {
            memcpy(u, v, sizeof v);
            return 1;
        }
    }
    return 0;
}

/* The derivative of corner k's trilinear weight wrt the voxel coordinates into gw; returns 0 (gw zero) where the
 * weight was dropped as negligible (the sum then does not depend on it). */
static int corner_grad(const sample_info *si, int k, double *gw) {
    const int o[3] = {(k >> 2) & 1, (k >> 1) & 1, k & 1};
    const int kept = !(si->w[k] == 0.0 && ((o[0] ? si->frac[0] : 1 - si->frac[0]) * (o[1] ? si->frac[1] : 1 - si->frac[1])
                                           * (o[2] ? si->frac[2] : 1 - si->frac[2])) != 0.0);
    for (int a = 0; a < 3; a++) {
        const int b = a == 0 ? 1 : 0, cc = a == 2 ? 1 : 2;
        const double fb = o[b] ? si->frac[b] : 1 - si->frac[b], fc = o[cc] ? si->frac[cc] : 1 - si->frac[cc];
        gw[a] = kept ? (o[a] ? 1.0 : -1.0) * (fb * fc) * si->sgn_free[a] : 0.0;
    }
    return kept;
}

/* The tangent jet at the peak u of the sample at pos (si, t, dB, B; *regular: the tangent Hessian is); 0 where u is
 * not finite or pos is outside (no derivative there). */
static int peak_jet(const adj_config *c, const double *pos, const double *u, sample_info *si, tangent_jet *t,
                    double (*dB)[3], double *B, int *regular) {
    if (!(isfinite(u[0]) && isfinite(u[1]) && isfinite(u[2]))) return 0;
    double vals[A_MAXC];
    sample(c, pos, vals, si);
    if (!si->inside) return 0;
    *regular = tangent(c->lmax, c->ncoef, vals, u, t, dB, B);
    return 1;
}

/* gpos += d(<ubar, u*> + abar f(u*))/dpos and gfod += the same wrt the FOD (when gfod is not NULL; float or
 * double like the FOD) for the peak u (unit) of the sample at pos and its amplitude f(u*) (envelope derivative
 * Y(u*)).  No contribution where outside or u is not finite; no direction term where the tangent Hessian is not
 * regular (core.implicit.attach_peak's rules). */
static void peak_vjp(const adj_config *c, const double *pos, const double *u, const double *ubar, double abar,
                     double *gpos, void *gfod, uint8_t *dirty) {
    if (ubar[0] == 0.0 && ubar[1] == 0.0 && ubar[2] == 0.0 && abar == 0.0) return;
    const int n = c->ncoef;
    double dB[A_MAXC][3], B[A_MAXC], cbar[A_MAXC];
    sample_info si;
    tangent_jet t;
    int regular;
    if (!peak_jet(c, pos, u, &si, &t, dB, B, &regular) || (!regular && abar == 0.0)) return;
    const double y0 = t.e1[0] * ubar[0] + t.e1[1] * ubar[1] + t.e1[2] * ubar[2];
    const double y1 = t.e2[0] * ubar[0] + t.e2[1] * ubar[1] + t.e2[2] * ubar[2];
    /* x = -H2^-1 g2 as tangent_newton writes it; its transpose on (y0, y1): g2bar = -H2^-T y */
    const double z0 = -(t.d * y0 - t.c * y1) / t.det, z1 = -(t.a * y1 - t.b * y0) / t.det;
    double tv[3];
    for (int i = 0; i < 3; i++) tv[i] = regular ? t.e1[i] * z0 + t.e2[i] * z1 : 0.0;
    for (int k = 0; k < n; k++) cbar[k] = tv[0] * dB[k][0] + tv[1] * dB[k][1] + tv[2] * dB[k][2] + abar * B[k];
    double gvox[3] = {0.0, 0.0, 0.0};
    for (int k = 0; k < 8; k++) {
        const int64_t r = si.row[k] * n;
        double dot = 0.0, gw[3];
        for (int j = 0; j < n; j++) dot += fod_at(c, r + j) * cbar[j];
        if (corner_grad(&si, k, gw))
            for (int a = 0; a < 3; a++) gvox[a] += dot * gw[a];
        if (gfod && si.w[k] != 0.0) {
            const double w = si.w[k];
            if (dirty) dirty[si.row[k]] = 1;
            if (c->fod_double) { double *g = (double *)gfod + r; for (int j = 0; j < n; j++) g[j] += w * cbar[j]; }
            else { float *g = (float *)gfod + r; for (int j = 0; j < n; j++) g[j] += (float)(w * cbar[j]); }
        }
    }
    for (int i = 0; i < 3; i++)
        gpos[i] += c->w2v[i] * gvox[0] + c->w2v[4 + i] * gvox[1] + c->w2v[8 + i] * gvox[2];
}

/* U[i][j] = d u*_i / d pos_j of the peak u at pos (zero where peak_vjp passes nothing). */
static void peak_jacobian(const adj_config *c, const double *pos, const double *u, double U[3][3]) {
    for (int i = 0; i < 3; i++) {
        double e[3] = {0.0, 0.0, 0.0}, row[3] = {0.0, 0.0, 0.0};
        e[i] = 1.0;
        peak_vjp(c, pos, u, e, 0.0, row, NULL, NULL);
        for (int j = 0; j < 3; j++) U[i][j] = row[j];
    }
}

static void matmul3(const double A[3][3], const double B[3][3], double C[3][3]) {
    double T[3][3];
    for (int i = 0; i < 3; i++)
        for (int j = 0; j < 3; j++) T[i][j] = A[i][0] * B[0][j] + A[i][1] * B[1][j] + A[i][2] * B[2][j];
    memcpy(C, T, sizeof T);
}

/* J = d x_{k+1} / d x_k of one step from x with step directions sd (Euler u; RK4 d1..d4). */
static void step_jacobian(const adj_config *c, const double *x, const double *sd, double J[3][3]) {
    const double hs = c->step;
    if (!c->rk4) {
        double U[3][3];
        peak_jacobian(c, x, sd, U);
        for (int i = 0; i < 3; i++)
            for (int j = 0; j < 3; j++) J[i][j] = (i == j) + hs * U[i][j];
        return;
    }
    const double *d[4] = {sd, sd + 3, sd + 6, sd + 9};
    const double frac[4] = {0.0, 0.5, 0.5, 1.0};   /* stage i samples x + frac[i] h d[i-1] */
    double D[4][3][3], P[3][3], U[3][3], p[3];
    for (int i = 0; i < 3; i++) for (int j = 0; j < 3; j++) P[i][j] = (i == j);
    for (int st = 0; st < 4; st++) {
        if (st > 0) {
            for (int i = 0; i < 3; i++) p[i] = x[i] + d[st - 1][i] * (frac[st] * hs);
            for (int i = 0; i < 3; i++)
                for (int j = 0; j < 3; j++) P[i][j] = (i == j) + frac[st] * hs * D[st - 1][i][j];
        } else {
            memcpy(p, x, sizeof p);
        }
        peak_jacobian(c, p, d[st], U);
        matmul3(U, P, D[st]);   /* d d_st / d x */
    }
    double s[3], Dn[3];
    for (int i = 0; i < 3; i++) s[i] = d[0][i] + d[1][i] * 2.0 + d[2][i] * 2.0 + d[3][i];
    const double ns = sqrt(s[0] * s[0] + s[1] * s[1] + s[2] * s[2]);
    for (int i = 0; i < 3; i++) Dn[i] = s[i] / ns;
    double S[3][3];
    for (int i = 0; i < 3; i++)
        for (int j = 0; j < 3; j++) S[i][j] = D[0][i][j] + 2.0 * D[1][i][j] + 2.0 * D[2][i][j] + D[3][i][j];
    for (int i = 0; i < 3; i++)
        for (int j = 0; j < 3; j++) {
            double v = 0.0;
            for (int k = 0; k < 3; k++) v += ((i == k) - Dn[i] * Dn[k]) * S[k][j];
            J[i][j] = (i == j) + hs * v / ns;
        }
}

/* ------------------------------------------------------------------------------------------------ */
/* Streamlines                                                                                       */

/* The rows of one half, seed first: row(j) = seed_row + sgn * j for j = 0..steps; dsgn: the half starts along
 * dsgn times the seed peak (the first half +1, the second -1). */
typedef struct { int64_t seed_row, steps; int sgn, dsgn; } half_rows;

static void halves(int64_t start, int64_t len, int64_t seed_index, half_rows *h) {
    h[0].seed_row = h[1].seed_row = start + seed_index;
    h[0].steps = seed_index; h[0].sgn = -1; h[0].dsgn = 1;
    h[1].steps = len - seed_index - 1; h[1].sgn = 1; h[1].dsgn = -1;
}

static void unit_diff(const float *a, const float *b, double *d) {
    for (int i = 0; i < 3; i++) d[i] = (double)a[i] - (double)b[i];
    normalize(d);
}

/* Replay one half from the seed: verts / sdirs (double) rows written (packed with c->pack).  seed_peak: the seed
 * peak (soft Euler's first turn; with tckgen's peaks and c->own_starts the first step's start), else unused.
 *   - exact peaks (c->lut NULL): every peak polished from the kernel's recorded direction (sin, float);
 *   - tckgen's peak search (c->lut): the searches start where the reference engine's do, since the search's
 *     tolerance makes its answer depend on the start (about 1e-6 rad): by default as tractfunc.sdstream.follow (an
 *     Euler step from its own direction in the kernel's vertices ref, RK4's first three stages from the previous
 *     step's, the first step from the seed peak recorded at the seed row, times dsgn); with c->own_starts (always
 *     with soft stopping) as tractfunc.track_fixed and tckgen (the incoming direction: the previous replayed peak
 *     or step direction, the first step from seed_peak); RK4's fourth stage from the mean of the second and third,
 *     its peak at the new vertex (soft) from the step's direction.
 * Returns 0 where a peak could not be polished or searched (its start is then kept). */
static int replay_half(const adj_config *c, const half_rows *h, const double *seed, const double *seed_peak,
                       const float *sin, const float *ref, double *verts, double *sout) {
    const int width = rec_width(c), sw = stored_width(c), lut = c->lut != NULL;
    int (*find)(const adj_config *, const double *, double *, double *) = lut ? lut_peak : polish_peak;
    const double hs = c->step;
    double x[3] = {seed[0], seed[1], seed[2]}, prev[3], pk[3], full[18];
    for (int i = 0; i < 3; i++) {
        pk[i] = h->dsgn * seed_peak[i];
        prev[i] = !lut || c->own_starts ? pk[i] : h->dsgn * (double)sin[width * h->seed_row + i];
    }
    int ok = 1;
    for (int64_t j = 0; j < h->steps; j++) {
        const int64_t row = h->seed_row + h->sgn * (j + 1), row0 = row - h->sgn;
        double *so = packed(c) ? full : sout + width * row;
        double d[3] = {0.0, 0.0, 0.0}, dir[3], amp[5] = {0.0, 0.0, 0.0, 0.0, 0.0};
        if (lut) {   /* the starts */
            memset(so, 0, width * sizeof(double));
            if (c->own_starts) memcpy(d, prev, sizeof d);
            else unit_diff(ref + 3 * row, ref + 3 * row0, d);
            for (int k = 0; k < (c->rk4 ? 3 : 1); k++) memcpy(so + 3 * k, c->rk4 ? prev : d, sizeof d);
        } else {
            for (int i = 0; i < width; i++) so[i] = (double)sin[width * row + i];
        }
        if (!c->rk4) {
            ok &= find(c, x, so, amp);
            memcpy(dir, so, sizeof dir);
            if (c->soft) {
                so[3] = amp[0] - c->cutoff;
                so[4] = pk[0] * so[0] + pk[1] * so[1] + pk[2] * so[2] - c->cos_max;
                memcpy(pk, so, sizeof pk);
            }
        } else {
            double *d1 = so, *d2 = so + 3, *d3 = so + 6, *d4 = so + 9, p[3];
            ok &= find(c, x, d1, amp);
            for (int i = 0; i < 3; i++) p[i] = x[i] + d1[i] * (0.5 * hs);
            ok &= find(c, p, d2, amp + 1);
            for (int i = 0; i < 3; i++) p[i] = x[i] + d2[i] * (0.5 * hs);
            ok &= find(c, p, d3, amp + 2);
            for (int i = 0; i < 3; i++) p[i] = x[i] + d3[i] * hs;
            if (lut) {
                for (int i = 0; i < 3; i++) d4[i] = d2[i] + d3[i];
                normalize(d4);
            }
            ok &= find(c, p, d4, amp + 3);
            for (int i = 0; i < 3; i++) dir[i] = d1[i] + d2[i] * 2.0 + d3[i] * 2.0 + d4[i];
            normalize(dir);
        }
        for (int i = 0; i < 3; i++) x[i] += dir[i] * hs;
        memcpy(verts + 3 * row, x, sizeof x);
        if (c->soft && c->rk4) {   /* the peak m5 at the new vertex, the smallest stage amplitude, the turn */
            double *m5 = so + 12;
            if (lut) memcpy(m5, dir, sizeof dir);
            ok &= find(c, x, m5, amp + 4);
            int arg = 0;
            for (int k = 1; k < 5; k++) if (amp[k] < amp[arg]) arg = k;
            so[15] = amp[arg] - c->cutoff;
            so[16] = so[0] * m5[0] + so[1] * m5[1] + so[2] * m5[2] - c->cos_max;
            so[17] = (double)arg;
        }
        memcpy(prev, lut && !c->own_starts ? d : dir, sizeof dir);
        if (packed(c)) encode_row(c, full, sout + sw * row);
    }
    return ok;
}

/* Survival weights of one half from its margins: weights[row(j)] = prod over its steps i <= j of
 * s(amp_margin_i / T) s(cos_margin_i / T) (1 at the seed). */
static void weights_half(const adj_config *c, const half_rows *h, const double *rec, double *weights) {
    const int off = AMP_OFF(c);
    const double T = c->temperature;
    double lw = 0.0, buf[18];
    weights[h->seed_row] = 1.0;
    for (int64_t j = 0; j < h->steps; j++) {
        const int64_t row = h->seed_row + h->sgn * (j + 1);
        const double *r = rec_row(c, rec, row, buf);
        lw += log_sigmoid(r[off] / T) + log_sigmoid(r[off + 1] / T);
        weights[row] = exp(lw);
    }
}

/* Reverse sweep of one half: returns in abar the adjoint of the seed from this half's steps (its own loss term
 * excluded), in sbar that of the seed peak (soft Euler: the first turn's margin; else 0); gh += d/dstep.
 * gweights (soft stopping, or NULL): dL/dweights, weights the forward's. */
static void adjoint_half(const adj_config *c, const half_rows *h, const double *verts, const double *sdirs,
                         const double *gverts, const double *weights, const double *gweights, double *abar,
                         double *sbar, double *gh, void *gfod, uint8_t *dirty) {
    const int off = AMP_OFF(c), soft = c->soft && gweights;
    const double hs = c->step, T = c->temperature;
    double buf[18], pbuf[18];
    double a[3] = {0.0, 0.0, 0.0}, carry[3] = {0.0, 0.0, 0.0}, L = 0.0;
    sbar[0] = sbar[1] = sbar[2] = 0.0;
    for (int64_t j = h->steps - 1; j >= 0; j--) {
        const int64_t row1 = h->seed_row + h->sgn * (j + 1), row0 = h->seed_row + h->sgn * j;
        for (int i = 0; i < 3; i++) a[i] += gverts[3 * row1 + i];
        const double *x = verts + 3 * row0, *sd = rec_row(c, sdirs, row1, buf);
        double g[3] = {0.0, 0.0, 0.0}, amp_bar = 0.0, cos_bar = 0.0;
        if (soft) {   /* L = dL/d(log factor of this step) = sum of gweights * weights from this vertex outwards */
            L += gweights[row1] * weights[row1];
            amp_bar = L * sigmoid_neg(sd[off] / T) / T;
            cos_bar = L * sigmoid_neg(sd[off + 1] / T) / T;
        }
        if (!c->rk4) {
            double ubar[3] = {hs * a[0], hs * a[1], hs * a[2]};
            if (soft) {   /* the turn from prev (the previous step's peak, or the seed peak) */
                const double *pv = rec_row(c, sdirs, row0, pbuf);
                const double sg = j ? 1.0 : h->dsgn;
                for (int i = 0; i < 3; i++) ubar[i] += carry[i] + cos_bar * sg * pv[i];
                for (int i = 0; i < 3; i++) carry[i] = cos_bar * sd[i];
                if (j == 0) for (int i = 0; i < 3; i++) sbar[i] = h->dsgn * carry[i];
            }
            *gh += a[0] * sd[0] + a[1] * sd[1] + a[2] * sd[2];
            peak_vjp(c, x, sd, ubar, amp_bar, g, gfod, dirty);
            for (int i = 0; i < 3; i++) a[i] += g[i];
            continue;
        }
        double ab[5] = {0.0, 0.0, 0.0, 0.0, 0.0};
        if (soft) {   /* m5, the peak at the new vertex: its turn from d1 and maybe the smallest amplitude */
            const double *m5 = sd + 12, *x1 = verts + 3 * row1;
            int arg = (int)sd[17];
            ab[arg < 0 || arg > 4 ? 0 : arg] = amp_bar;
            double m5bar[3] = {cos_bar * sd[0], cos_bar * sd[1], cos_bar * sd[2]};
            peak_vjp(c, x1, m5, m5bar, ab[4], g, gfod, dirty);
            for (int i = 0; i < 3; i++) { a[i] += g[i]; g[i] = 0.0; }
        }
        const double *d1 = sd, *d2 = sd + 3, *d3 = sd + 6, *d4 = sd + 9;
        double s[3], D[3], p[3], b1[3], b2[3], b3[3], b4[3], p0bar[3];
        for (int i = 0; i < 3; i++) s[i] = d1[i] + d2[i] * 2.0 + d3[i] * 2.0 + d4[i];
        const double ns = sqrt(s[0] * s[0] + s[1] * s[1] + s[2] * s[2]);
        for (int i = 0; i < 3; i++) D[i] = s[i] / ns;
        *gh += a[0] * D[0] + a[1] * D[1] + a[2] * D[2];
        const double Ddot = hs * (D[0] * a[0] + D[1] * a[1] + D[2] * a[2]);
        for (int i = 0; i < 3; i++) {
            const double s_bar = (hs * a[i] - D[i] * Ddot) / ns;
            b1[i] = s_bar + (soft ? cos_bar * sd[12 + i] : 0.0);
            b2[i] = 2.0 * s_bar; b3[i] = 2.0 * s_bar; b4[i] = s_bar;
            p0bar[i] = a[i];
        }
        /* stage 4 at x + d3 h */
        for (int i = 0; i < 3; i++) p[i] = x[i] + d3[i] * hs;
        memset(g, 0, sizeof g);
        peak_vjp(c, p, d4, b4, ab[3], g, gfod, dirty);
        for (int i = 0; i < 3; i++) { p0bar[i] += g[i]; b3[i] += hs * g[i]; }
        *gh += g[0] * d3[0] + g[1] * d3[1] + g[2] * d3[2];
        /* stage 3 at x + d2 h/2 */
        for (int i = 0; i < 3; i++) p[i] = x[i] + d2[i] * (0.5 * hs);
        memset(g, 0, sizeof g);
        peak_vjp(c, p, d3, b3, ab[2], g, gfod, dirty);
        for (int i = 0; i < 3; i++) { p0bar[i] += g[i]; b2[i] += 0.5 * hs * g[i]; }
        *gh += 0.5 * (g[0] * d2[0] + g[1] * d2[1] + g[2] * d2[2]);
        /* stage 2 at x + d1 h/2 */
        for (int i = 0; i < 3; i++) p[i] = x[i] + d1[i] * (0.5 * hs);
        memset(g, 0, sizeof g);
        peak_vjp(c, p, d2, b2, ab[1], g, gfod, dirty);
        for (int i = 0; i < 3; i++) { p0bar[i] += g[i]; b1[i] += 0.5 * hs * g[i]; }
        *gh += 0.5 * (g[0] * d1[0] + g[1] * d1[1] + g[2] * d1[2]);
        /* stage 1 at x */
        memset(g, 0, sizeof g);
        peak_vjp(c, x, d1, b1, ab[0], g, gfod, dirty);
        for (int i = 0; i < 3; i++) a[i] = p0bar[i] + g[i];
    }
    memcpy(abar, a, sizeof a);
}

/* ------------------------------------------------------------------------------------------------ */
/* Forward mode (sd_jvp)                                                                              */

/* The tangent of the peak u (unit) of the sample at pos and of its amplitude, for a tangent dpos of pos and (with
 * ct, a config whose fod is the FOD's tangent; or NULL) of the FOD: du = -E H2^-1 E^T dg (the implicit-function
 * derivative whose transpose peak_vjp applies), da = sum dc_k Y_k(u) (the envelope derivative), dc the tangent of
 * the sampled coefficients.  Zero where outside, u is not finite, or (du) the tangent Hessian is not regular. */
static void peak_jvp(const adj_config *c, const adj_config *ct, const double *pos, const double *dpos,
                     const double *u, double *du, double *da) {
    du[0] = du[1] = du[2] = 0.0;
    *da = 0.0;
    const int n = c->ncoef;
    double dB[A_MAXC][3], B[A_MAXC], dc[A_MAXC];
    sample_info si;
    tangent_jet t;
    int regular;
    if (!peak_jet(c, pos, u, &si, &t, dB, B, &regular)) return;
    double dvox[3];
    for (int a = 0; a < 3; a++) dvox[a] = c->w2v[4 * a] * dpos[0] + c->w2v[4 * a + 1] * dpos[1] + c->w2v[4 * a + 2] * dpos[2];
    memset(dc, 0, n * sizeof(double));
    for (int k = 0; k < 8; k++) {
        const int64_t r = si.row[k] * n;
        double gw[3];
        corner_grad(&si, k, gw);
        const double dw = gw[0] * dvox[0] + gw[1] * dvox[1] + gw[2] * dvox[2];
        if (dw != 0.0) for (int j = 0; j < n; j++) dc[j] += dw * fod_at(c, r + j);
        if (ct && si.w[k] != 0.0) for (int j = 0; j < n; j++) dc[j] += si.w[k] * fod_at(ct, r + j);
    }
    double q[3] = {0.0, 0.0, 0.0}, a = 0.0;
    for (int k = 0; k < n; k++) {
        for (int i = 0; i < 3; i++) q[i] += dc[k] * dB[k][i];
        a += dc[k] * B[k];
    }
    *da = a;
    if (!regular) return;
    const double q0 = t.e1[0] * q[0] + t.e1[1] * q[1] + t.e1[2] * q[2];
    const double q1 = t.e2[0] * q[0] + t.e2[1] * q[1] + t.e2[2] * q[2];
    const double x0 = -(t.d * q0 - t.b * q1) / t.det, x1 = -(t.a * q1 - t.c * q0) / t.det;
    for (int i = 0; i < 3; i++) du[i] = t.e1[i] * x0 + t.e2[i] * x1;
}

/* Tangents of one half's vertices (dverts rows) and, with soft stopping, weights (dweights rows, given the
 * forward's weights), from the seed's tangent dseed, the FOD's (ct, or NULL) and the step's (dh); dpk: soft
 * Euler: the seed peak's tangent (the first turn's reference). */
static void jvp_half(const adj_config *c, const adj_config *ct, const half_rows *h, const double *verts,
                     const double *sdirs, const double *weights, const double *dseed, const double *dpk, double dh,
                     double *dverts, double *dweights) {
    const int off = AMP_OFF(c), soft = c->soft && dweights;
    const double hs = c->step, T = c->temperature;
    double dx[3] = {dseed[0], dseed[1], dseed[2]}, buf[18], pbuf[18], dprev[3], dlw = 0.0;
    for (int i = 0; i < 3; i++) dprev[i] = h->dsgn * dpk[i];
    for (int64_t j = 0; j < h->steps; j++) {
        const int64_t row0 = h->seed_row + h->sgn * j, row1 = row0 + h->sgn;
        const double *x = verts + 3 * row0, *sd = rec_row(c, sdirs, row1, buf);
        double dn[3], dam = 0.0, dcm = 0.0;
        if (!c->rk4) {
            double du[3], da;
            peak_jvp(c, ct, x, dx, sd, du, &da);
            for (int i = 0; i < 3; i++) dn[i] = dx[i] + hs * du[i] + dh * sd[i];
            if (soft) {   /* the turn from prev (the previous step's peak, or the seed peak) */
                const double *pv = rec_row(c, sdirs, row0, pbuf);
                const double sg = j ? 1.0 : h->dsgn;
                dam = da;
                for (int i = 0; i < 3; i++) dcm += dprev[i] * sd[i] + sg * pv[i] * du[i];
                memcpy(dprev, du, sizeof du);
            }
        } else {
            const double *d1 = sd, *d2 = sd + 3, *d3 = sd + 6, *d4 = sd + 9;
            double p[3], dp[3], dd1[3], dd2[3], dd3[3], dd4[3], da[5] = {0.0, 0.0, 0.0, 0.0, 0.0};
            peak_jvp(c, ct, x, dx, d1, dd1, da);
            for (int i = 0; i < 3; i++) { p[i] = x[i] + d1[i] * (0.5 * hs); dp[i] = dx[i] + 0.5 * hs * dd1[i] + 0.5 * dh * d1[i]; }
            peak_jvp(c, ct, p, dp, d2, dd2, da + 1);
            for (int i = 0; i < 3; i++) { p[i] = x[i] + d2[i] * (0.5 * hs); dp[i] = dx[i] + 0.5 * hs * dd2[i] + 0.5 * dh * d2[i]; }
            peak_jvp(c, ct, p, dp, d3, dd3, da + 2);
            for (int i = 0; i < 3; i++) { p[i] = x[i] + d3[i] * hs; dp[i] = dx[i] + hs * dd3[i] + dh * d3[i]; }
            peak_jvp(c, ct, p, dp, d4, dd4, da + 3);
            double s[3], ds[3], D[3];
            for (int i = 0; i < 3; i++) {
                s[i] = d1[i] + d2[i] * 2.0 + d3[i] * 2.0 + d4[i];
                ds[i] = dd1[i] + dd2[i] * 2.0 + dd3[i] * 2.0 + dd4[i];
            }
            const double ns = sqrt(s[0] * s[0] + s[1] * s[1] + s[2] * s[2]);
            for (int i = 0; i < 3; i++) D[i] = s[i] / ns;
            const double Dds = D[0] * ds[0] + D[1] * ds[1] + D[2] * ds[2];
            for (int i = 0; i < 3; i++) dn[i] = dx[i] + hs * (ds[i] - D[i] * Dds) / ns + dh * D[i];
            if (soft) {   /* m5, the peak at the new vertex: the turn from d1, maybe the smallest amplitude */
                const double *m5 = sd + 12;
                double dm5[3];
                peak_jvp(c, ct, verts + 3 * row1, dn, m5, dm5, da + 4);
                const int arg = (int)sd[17];
                dam = da[arg < 0 || arg > 4 ? 0 : arg];
                for (int i = 0; i < 3; i++) dcm += dd1[i] * m5[i] + d1[i] * dm5[i];
            }
        }
        if (soft) {
            dlw += sigmoid_neg(sd[off] / T) / T * dam + sigmoid_neg(sd[off + 1] / T) / T * dcm;
            dweights[row1] = weights[row1] * dlw;
        }
        memcpy(dverts + 3 * row1, dn, sizeof dn);
        memcpy(dx, dn, sizeof dn);
    }
}

/* ------------------------------------------------------------------------------------------------ */
/* Batches over threads                                                                              */

typedef struct {
    const adj_config *c;
    int64_t A;
    const int64_t *lengths, *starts, *seed_index;
    const double *seeds;        /* replay: (A, 3) */
    const float *sdirs_in;      /* replay: (V, w) kernel directions */
    const float *ref;           /* replay with tckgen's peaks: (V, 3) the kernel's vertices */
    const double *init;         /* replay with tckgen's peaks and soft stopping: (A, 3) unit start directions */
    double *verts, *sdirs;      /* replay: out; adjoint: in */
    uint8_t *ok;                /* replay: (A,) out */
    const double *gverts;       /* adjoint: (V, 3) */
    const double *weights, *gweights;   /* adjoint with soft stopping: (V,) the forward's and dL/dweights, or NULL */
    double *wout;               /* sd_soft_weights: (V,) out */
    double *gseeds;             /* adjoint: (A, 3) out */
    void *gfod;                 /* adjoint: (X*Y*Z, N) out (thread 0), or NULL */
    size_t gfod_bytes;
    double gh[256];
    void *gfod_t[256];
    uint8_t *dirty_t[256];      /* voxels a thread's private buffer holds (only those are reduced) */
    int32_t failed;
    int64_t next;
    int replay;
    int jac;
    int weights_only;
    double *jout;               /* seed Jacobian: (V, 3, 3) out */
    int jvp;                    /* forward mode (sd_jvp): */
    const adj_config *ct;       /*   the config with the FOD's tangent, or NULL */
    const double *dseeds;       /*   (A, 3) the seeds' tangents */
    double dh;                  /*   the step's tangent */
    double *dverts, *dweights;  /*   (V, 3) out, (V,) out (soft stopping) or NULL */
} adj_job;

typedef struct { adj_job *j; int t; } adj_arg;

static void *adj_worker(void *arg) {
    adj_job *j = ((adj_arg *)arg)->j;
    const int t = ((adj_arg *)arg)->t;
    void *gfod = j->gfod;
    uint8_t *dirty = NULL;
    if (gfod && t > 0) {
        const int64_t nvox = (int64_t)j->c->dim[0] * j->c->dim[1] * j->c->dim[2];
        gfod = calloc(1, j->gfod_bytes);
        dirty = (uint8_t *)calloc((size_t)nvox, 1);
        if (!gfod || !dirty) {
            free(gfod); free(dirty);
            __atomic_store_n(&j->failed, 1, __ATOMIC_RELAXED);
            return NULL;
        }
    }
    j->gfod_t[t] = t > 0 ? gfod : NULL;
    j->dirty_t[t] = dirty;
    double gh = 0.0;
    for (;;) {
        int64_t i = __atomic_fetch_add(&j->next, 1, __ATOMIC_RELAXED);
        if (i >= j->A) break;
        half_rows h[2];
        halves(j->starts[i], j->lengths[i], j->seed_index[i], h);
        if (j->weights_only) {
            weights_half(j->c, &h[0], j->sdirs, j->wout);
            weights_half(j->c, &h[1], j->sdirs, j->wout);
        } else if (j->jac) {
            for (int side = 0; side < 2; side++) {
                double M[3][3] = {{1, 0, 0}, {0, 1, 0}, {0, 0, 1}}, Jk[3][3];
                memcpy(j->jout + 9 * h[side].seed_row, M, sizeof M);
                double buf[18];
                for (int64_t k = 0; k < h[side].steps; k++) {
                    const int64_t r0 = h[side].seed_row + h[side].sgn * k, r1 = r0 + h[side].sgn;
                    step_jacobian(j->c, j->verts + 3 * r0, rec_row(j->c, j->sdirs, r1, buf), Jk);
                    matmul3(Jk, M, M);
                    memcpy(j->jout + 9 * r1, M, sizeof M);
                }
            }
        } else if (j->jvp) {
            const double *ds = j->dseeds + 3 * i;
            const int64_t r = h[0].seed_row;
            double dpk[3] = {0.0, 0.0, 0.0}, da, buf[18];
            memcpy(j->dverts + 3 * r, ds, 3 * sizeof(double));
            if (j->dweights) j->dweights[r] = 0.0;
            if (j->c->soft && !j->c->rk4 && j->dweights)   /* the seed peak, the first turns' reference */
                peak_jvp(j->c, j->ct, j->verts + 3 * r, ds, rec_row(j->c, j->sdirs, r, buf), dpk, &da);
            jvp_half(j->c, j->ct, &h[0], j->verts, j->sdirs, j->weights, ds, dpk, j->dh, j->dverts, j->dweights);
            jvp_half(j->c, j->ct, &h[1], j->verts, j->sdirs, j->weights, ds, dpk, j->dh, j->dverts, j->dweights);
        } else if (j->replay) {
            const double *seed = j->seeds + 3 * i;
            const int w = rec_width(j->c), sw = stored_width(j->c);
            double *srow = j->sdirs + sw * h[0].seed_row, pk[3] = {0.0, 0.0, 0.0};
            memcpy(j->verts + 3 * h[0].seed_row, seed, 3 * sizeof(double));
            memset(srow, 0, sw * sizeof(double));
            int ok = 1;
            if (j->c->lut && j->c->own_starts) {   /* the seed peak from the start direction, as track_fixed finds it */
                memcpy(pk, j->init + 3 * i, sizeof pk);
                ok &= lut_peak(j->c, seed, pk, NULL);
            } else if (j->c->soft && !j->c->rk4) {   /* the seed peak, the first turns' reference */
                for (int k = 0; k < 3; k++) pk[k] = (double)j->sdirs_in[w * h[0].seed_row + k];
                ok &= polish_peak(j->c, seed, pk, NULL);
            }
            if (!packed(j->c)) memcpy(srow, pk, sizeof pk);   /* (soft Euler: the seed peak's VJP reads it) */
            ok &= replay_half(j->c, &h[0], seed, pk, j->sdirs_in, j->ref, j->verts, j->sdirs);
            ok &= replay_half(j->c, &h[1], seed, pk, j->sdirs_in, j->ref, j->verts, j->sdirs);
            j->ok[i] = (uint8_t)ok;
        } else {
            double a0[3], a1[3], s0[3], s1[3], g[3] = {0.0, 0.0, 0.0};
            adjoint_half(j->c, &h[0], j->verts, j->sdirs, j->gverts, j->weights, j->gweights, a0, s0, &gh, gfod,
                         dirty);
            adjoint_half(j->c, &h[1], j->verts, j->sdirs, j->gverts, j->weights, j->gweights, a1, s1, &gh, gfod,
                         dirty);
            if (j->c->soft && !j->c->rk4) {   /* the seed peak, through the first turns */
                const int64_t r = h[0].seed_row;
                const double sb[3] = {s0[0] + s1[0], s0[1] + s1[1], s0[2] + s1[2]};
                double buf[18];
                peak_vjp(j->c, j->verts + 3 * r, rec_row(j->c, j->sdirs, r, buf), sb, 0.0, g, gfod, dirty);
            }
            const double *gs = j->gverts + 3 * h[0].seed_row;
            for (int k = 0; k < 3; k++) j->gseeds[3 * i + k] = gs[k] + a0[k] + a1[k] + g[k];
        }
    }
    j->gh[t] = gh;
    return NULL;
}

static int run_threads(adj_job *j, int nthreads) {
    if (nthreads < 1) nthreads = 1;
    if (nthreads > 256) nthreads = 256;
    pthread_t th[256];
    adj_arg args[256];
    int started = 0;
    for (int t = 0; t < 256; t++) { j->gh[t] = 0.0; j->gfod_t[t] = NULL; j->dirty_t[t] = NULL; }
    for (int t = 1; t < nthreads; t++) {
        args[t].j = j; args[t].t = t;
        if (pthread_create(&th[started], NULL, adj_worker, &args[t]) != 0) break;
        started++;
    }
    args[0].j = j; args[0].t = 0;
    adj_worker(&args[0]);
    for (int t = 0; t < started; t++) pthread_join(th[t], NULL);
    return started + 1;
}

/* Replay A streamlines (packed rows: starts[i], lengths[i], seed_index[i]) from seeds (A, 3) along the kernel's
 * step records sdirs_in (V, w) float, and with tckgen's peaks (c->lut) its vertices ref (V, 3) float and, with
 * c->own_starts, each seed's start direction init (A, 3) double, unit (else NULL): verts
 * (V, 3) and sdirs (V, w) double out; ok (A,) 0 where a peak could not be polished or searched. */
void sd_replay(const adj_config *c, int64_t A, const int64_t *starts, const int64_t *lengths,
               const int64_t *seed_index, const double *seeds, const double *init, const float *sdirs_in,
               const float *ref, double *verts, double *sdirs, uint8_t *ok, int32_t nthreads) {
    pthread_once(&tables_once, init_tables);
    adj_job j;
    memset(&j, 0, sizeof j);
    j.c = c; j.A = A; j.starts = starts; j.lengths = lengths; j.seed_index = seed_index; j.seeds = seeds;
    j.init = init; j.sdirs_in = sdirs_in; j.ref = ref; j.verts = verts; j.sdirs = sdirs; j.ok = ok; j.replay = 1;
    run_threads(&j, nthreads);
}

/* Reverse sweep: given the vertices (V, 3) and step records (V, w) double the forward took, gverts (V, 3)
 * = dL/dvertices, and with soft stopping the forward's weights (V,) and gweights = dL/dweights (or NULL: none), write gseeds (A, 3) = dL/dseed, gstep[0] = dL/dstep and, when gfod is not NULL, add dL/dFOD
 * into gfod (X*Y*Z*N, the FOD's precision, zeroed by the caller).  Returns 0, or -2 when memory ran out. */
int32_t sd_adjoint(const adj_config *c, int64_t A, const int64_t *starts, const int64_t *lengths,
                   const int64_t *seed_index, const double *verts, const double *sdirs, const double *gverts,
                   const double *weights, const double *gweights, double *gseeds, double *gstep, void *gfod,
                   int32_t nthreads) {
    pthread_once(&tables_once, init_tables);
    adj_job j;
    memset(&j, 0, sizeof j);
    j.c = c; j.A = A; j.starts = starts; j.lengths = lengths; j.seed_index = seed_index;
    j.verts = (double *)verts; j.sdirs = (double *)sdirs; j.gverts = gverts; j.gseeds = gseeds; j.gfod = gfod;
    j.weights = weights; j.gweights = gweights;
    j.gfod_bytes = (size_t)c->dim[0] * c->dim[1] * c->dim[2] * c->ncoef * (c->fod_double ? 8 : 4);
    int used = run_threads(&j, nthreads);
    double gh = 0.0;
    for (int t = 0; t < used; t++) gh += j.gh[t];
    *gstep = gh;
    const int64_t nvox = (int64_t)c->dim[0] * c->dim[1] * c->dim[2], n = c->ncoef;
    for (int t = 1; t < used; t++) {   /* add each private buffer's touched voxels into the output */
        const uint8_t *dirty = j.dirty_t[t];
        if (j.gfod_t[t] && dirty) {
            for (int64_t v = 0; v < nvox; v++) {
                if (!dirty[v]) continue;
                if (c->fod_double) { double *d = (double *)gfod + v * n; const double *s = (const double *)j.gfod_t[t] + v * n;
                                     for (int k = 0; k < n; k++) d[k] += s[k]; }
                else { float *d = (float *)gfod + v * n; const float *s = (const float *)j.gfod_t[t] + v * n;
                       for (int k = 0; k < n; k++) d[k] += s[k]; }
            }
        }
        free(j.gfod_t[t]);
        free(j.dirty_t[t]);
    }
    return j.failed ? -2 : 0;
}

/* Forward mode: the tangents of the vertices dverts (V, 3) and, with soft stopping and weights (V,) the forward's,
 * of the weights dweights (V,) (or NULL), for tangents dseeds (A, 3) of the seeds, dstep of the step and dfod
 * (X*Y*Z*N like the FOD, or NULL) of the FOD, along the forward's vertices and step records. */
void sd_jvp(const adj_config *c, const void *dfod, int64_t A, const int64_t *starts, const int64_t *lengths,
            const int64_t *seed_index, const double *verts, const double *sdirs, const double *weights,
            const double *dseeds, double dstep, double *dverts, double *dweights, int32_t nthreads) {
    pthread_once(&tables_once, init_tables);
    adj_config ct = *c;
    ct.fod = dfod;
    adj_job j;
    memset(&j, 0, sizeof j);
    j.c = c; j.A = A; j.starts = starts; j.lengths = lengths; j.seed_index = seed_index;
    j.verts = (double *)verts; j.sdirs = (double *)sdirs; j.weights = weights; j.jvp = 1;
    j.ct = dfod ? &ct : NULL; j.dseeds = dseeds; j.dh = dstep; j.dverts = dverts;
    j.dweights = c->soft && weights ? dweights : NULL;
    run_threads(&j, nthreads);
}

/* Per-vertex seed Jacobians d x_v / d seed (V, 3, 3) out, by forward propagation of the step Jacobians along each
 * half (the seed rows are the identity). */
void sd_seed_jacobian(const adj_config *c, int64_t A, const int64_t *starts, const int64_t *lengths,
                      const int64_t *seed_index, const double *verts, const double *sdirs, double *jout,
                      int32_t nthreads) {
    pthread_once(&tables_once, init_tables);
    adj_job j;
    memset(&j, 0, sizeof j);
    j.c = c; j.A = A; j.starts = starts; j.lengths = lengths; j.seed_index = seed_index;
    j.verts = (double *)verts; j.sdirs = (double *)sdirs; j.jac = 1; j.jout = jout;
    run_threads(&j, nthreads);
}


/* Survival weights (V,) of soft stopping from the step records (V, w) double (their margins): 1 at the seeds. */
void sd_soft_weights(const adj_config *c, int64_t A, const int64_t *starts, const int64_t *lengths,
                     const int64_t *seed_index, const double *rec, double *weights, int32_t nthreads) {
    adj_job j;
    memset(&j, 0, sizeof j);
    j.c = c; j.A = A; j.starts = starts; j.lengths = lengths; j.seed_index = seed_index;
    j.sdirs = (double *)rec; j.weights_only = 1; j.wout = weights;
    run_threads(&j, nthreads);
}
