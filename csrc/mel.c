/*
 * mel.c -- Voxtral log-mel front end (spec section 3.3 / 3.4), whole-signal and incremental.
 *
 * Every frame, whichever API produced it, goes through mel_frame() on the same 400 float32 input samples, so
 * the streaming output is bit-identical to the whole-signal output. All arithmetic after reading the samples is
 * in double; only the final value is rounded to float32.
 *
 * FFT: the 400-point real DFT is computed as a 200-point complex FFT of z[m] = y[2m] + i*y[2m+1] (y = windowed
 * frame) followed by the usual even/odd split (see mel_frame). The 200-point FFT is a recursive mixed-radix
 * decimation-in-time FFT with radices 4*2*5*5 and precomputed twiddles (about 2k complex multiplies per frame).
 */
#include "voxtral_native.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#define VX_ABI_VERSION 1

#define FFT_N 200                 /* complex FFT length = VX_N_FFT / 2 */
#define STREAM_BUF_CAP 16384      /* stream sample buffer (floats); must be >= 400 + some room */

static const double VX_PI = 3.14159265358979323846264338327950288;

typedef struct {
    double re, im;
} cpx;

/* All constant tables one computation needs. Built per call / per stream: no global state. */
typedef struct {
    double window[VX_N_FFT];     /* periodic Hann 0.5 - 0.5 cos(2 pi j / 400)                         */
    cpx tw[FFT_N];               /* e^{-2 pi i k / 200}: twiddles of the complex FFT                     */
    cpx rtw[VX_N_BINS];          /* e^{-2 pi i k / 400}, k = 0..200: twiddles of the real-input split    */
    int fb_k0[VX_N_MEL];         /* first nonzero bin of mel filter m                                   */
    int fb_len[VX_N_MEL];        /* number of (contiguous) nonzero bins of filter m                      */
    int fb_off[VX_N_MEL];        /* offset of filter m's weights in fb_w                                 */
    double fb_w[VX_N_MEL * VX_N_BINS]; /* packed nonzero weights (worst-case size)                      */
    double fb_dense[VX_N_MEL * VX_N_BINS]; /* the full 128 x 201 matrix, for vx_mel_filterbank          */
} mel_tables;

/* ------------------------------------------------------------------------------------------------------------
 * Slaney mel scale (spec 3.3 step 5): linear below 1 kHz (3 mel per 200 Hz), logarithmic above
 * (27 mel per factor 6.4). Same formulas as librosa (htk=False) and HF audio_utils (mel_scale="slaney").
 * ---------------------------------------------------------------------------------------------------------- */
static double hz_to_mel(double f)
{
    if (f < 1000.0)
        return 3.0 * f / 200.0;
    return 15.0 + log(f / 1000.0) * (27.0 / log(6.4));
}

static double mel_to_hz(double m)
{
    if (m < 15.0)
        return 200.0 * m / 3.0;
    return 1000.0 * exp((m - 15.0) * (log(6.4) / 27.0));
}

/* F[m][k] = max(0, min((f_k - e_m)/(e_{m+1} - e_m), (e_{m+2} - f_k)/(e_{m+2} - e_{m+1}))) * 2/(e_{m+2} - e_m)
 * with f_k = 40k Hz (k = 0..200) and e_j = mel_to_hz(j * mel(8000) / 129), j = 0..129 (130 edges for 128
 * triangles). The factor 2/(e_{m+2} - e_m) is Slaney's "area" normalisation (each triangle has area 1 in Hz). */
static void build_filterbank(mel_tables *T)
{
    double edges[VX_N_MEL + 2];
    const double mel_max = hz_to_mel(VX_SAMPLE_RATE / 2.0);
    for (int j = 0; j < VX_N_MEL + 2; j++)
        edges[j] = mel_to_hz(mel_max * (double)j / (double)(VX_N_MEL + 1));

    int off = 0;
    for (int m = 0; m < VX_N_MEL; m++) {
        const double lo = edges[m], mid = edges[m + 1], hi = edges[m + 2];
        const double enorm = 2.0 / (hi - lo);
        int k0 = -1, k1 = -1;
        for (int k = 0; k < VX_N_BINS; k++) {
            const double fk = (double)k * ((double)VX_SAMPLE_RATE / (double)VX_N_FFT);
            const double up = (fk - lo) / (mid - lo);
            const double down = (hi - fk) / (hi - mid);
            double w = up < down ? up : down;
            if (w < 0.0)
                w = 0.0;
            w *= enorm;
            T->fb_dense[m * VX_N_BINS + k] = w;
            if (w > 0.0) {
                if (k0 < 0)
                    k0 = k;
                k1 = k + 1;
            }
        }
        /* A triangle is convex, so its support is one contiguous range [k0, k1). A filter narrower than
         * the 40 Hz bin spacing may have no bin at all (then it is identically 0, log-mel = -0.625). */
        if (k0 < 0)
            k0 = k1 = 0;
        T->fb_k0[m] = k0;
        T->fb_len[m] = k1 - k0;
        T->fb_off[m] = off;
        for (int k = k0; k < k1; k++)
            T->fb_w[off++] = T->fb_dense[m * VX_N_BINS + k];
    }
}

static mel_tables *tables_new(void)
{
    mel_tables *T = (mel_tables *)malloc(sizeof(mel_tables));
    if (!T)
        return NULL;
    for (int j = 0; j < VX_N_FFT; j++)
        T->window[j] = 0.5 - 0.5 * cos(2.0 * VX_PI * (double)j / (double)VX_N_FFT);
    for (int k = 0; k < FFT_N; k++) {
        const double a = -2.0 * VX_PI * (double)k / (double)FFT_N;
        T->tw[k].re = cos(a);
        T->tw[k].im = sin(a);
    }
    for (int k = 0; k < VX_N_BINS; k++) {
        const double a = -2.0 * VX_PI * (double)k / (double)VX_N_FFT;
        T->rtw[k].re = cos(a);
        T->rtw[k].im = sin(a);
    }
    /* Exact values where they are known, so that e.g. bin 0 / bin 200 stay purely real. */
    T->rtw[0].re = 1.0;  T->rtw[0].im = 0.0;
    T->rtw[100].re = 0.0; T->rtw[100].im = -1.0;
    T->rtw[200].re = -1.0; T->rtw[200].im = 0.0;
    T->tw[0].re = 1.0;   T->tw[0].im = 0.0;
    T->tw[50].re = 0.0;  T->tw[50].im = -1.0;
    T->tw[100].re = -1.0; T->tw[100].im = 0.0;
    T->tw[150].re = 0.0; T->tw[150].im = 1.0;
    build_filterbank(T);
    return T;
}

/* ------------------------------------------------------------------------------------------------------------
 * 200-point complex FFT, forward (X[k] = sum_n x[n] e^{-2 pi i k n / 200}).
 *
 * Decimation in time, recursively (the structure of kissfft): a length-(p*m) transform of the sequence
 * in[0], in[s], in[2s], ... is p length-m transforms of the p decimated sub-sequences (stride s*p), written to
 * out[q*m .. q*m+m-1], then m radix-p butterflies
 *     out[u + k*m] = sum_q (out[u + q*m] * W_N^{q*u*s}) * W_p^{q*k},   W_N = e^{-2 pi i / 200}, N = p*m*s,
 * where W_N^{q*u*s} is the twiddle (s = total stride so far, so the table of W_200 serves every stage).
 * ---------------------------------------------------------------------------------------------------------- */
static const int FFT_FACTORS[] = {4, 2, 5, 5}; /* product = 200 */

static inline cpx cmul(cpx a, cpx b)
{
    cpx r = {a.re * b.re - a.im * b.im, a.re * b.im + a.im * b.re};
    return r;
}

static void bfly2(cpx *out, int s, int m, const cpx *tw)
{
    for (int u = 0; u < m; u++) {
        const cpx a0 = out[u];
        const cpx a1 = cmul(out[u + m], tw[u * s]);
        out[u].re = a0.re + a1.re;
        out[u].im = a0.im + a1.im;
        out[u + m].re = a0.re - a1.re;
        out[u + m].im = a0.im - a1.im;
    }
}

/* Radix 4 with W_4 = -i:
 *   y0 = a0+a1+a2+a3, y1 = (a0-a2) - i(a1-a3), y2 = a0-a1+a2-a3, y3 = (a0-a2) + i(a1-a3). */
static void bfly4(cpx *out, int s, int m, const cpx *tw)
{
    for (int u = 0; u < m; u++) {
        const cpx a0 = out[u];
        const cpx a1 = cmul(out[u + m], tw[u * s]);
        const cpx a2 = cmul(out[u + 2 * m], tw[2 * u * s]);
        const cpx a3 = cmul(out[u + 3 * m], tw[3 * u * s]);
        const cpx s02 = {a0.re + a2.re, a0.im + a2.im};
        const cpx d02 = {a0.re - a2.re, a0.im - a2.im};
        const cpx s13 = {a1.re + a3.re, a1.im + a3.im};
        const cpx d13 = {a1.re - a3.re, a1.im - a3.im};
        /* -i * d13 = (d13.im, -d13.re) */
        out[u].re = s02.re + s13.re;
        out[u].im = s02.im + s13.im;
        out[u + m].re = d02.re + d13.im;
        out[u + m].im = d02.im - d13.re;
        out[u + 2 * m].re = s02.re - s13.re;
        out[u + 2 * m].im = s02.im - s13.im;
        out[u + 3 * m].re = d02.re - d13.im;
        out[u + 3 * m].im = d02.im + d13.re;
    }
}

/* Radix 5 with c1 = cos(2pi/5), c2 = cos(4pi/5), s1 = sin(2pi/5), s2 = sin(4pi/5), b1 = a1+a4, b2 = a2+a3,
 * d1 = a1-a4, d2 = a2-a3:
 *   y0 = a0 + b1 + b2
 *   y1 = a0 + c1 b1 + c2 b2 - i (s1 d1 + s2 d2),   y4 = same with +i
 *   y2 = a0 + c2 b1 + c1 b2 - i (s2 d1 - s1 d2),   y3 = same with +i */
static void bfly5(cpx *out, int s, int m, const cpx *tw)
{
    const double c1 = cos(2.0 * VX_PI / 5.0), c2 = cos(4.0 * VX_PI / 5.0);
    const double s1 = sin(2.0 * VX_PI / 5.0), s2 = sin(4.0 * VX_PI / 5.0);
    for (int u = 0; u < m; u++) {
        const cpx a0 = out[u];
        const cpx a1 = cmul(out[u + m], tw[u * s]);
        const cpx a2 = cmul(out[u + 2 * m], tw[2 * u * s]);
        const cpx a3 = cmul(out[u + 3 * m], tw[3 * u * s]);
        const cpx a4 = cmul(out[u + 4 * m], tw[4 * u * s]);
        const cpx b1 = {a1.re + a4.re, a1.im + a4.im};
        const cpx b2 = {a2.re + a3.re, a2.im + a3.im};
        const cpx d1 = {a1.re - a4.re, a1.im - a4.im};
        const cpx d2 = {a2.re - a3.re, a2.im - a3.im};
        const cpx r1 = {a0.re + c1 * b1.re + c2 * b2.re, a0.im + c1 * b1.im + c2 * b2.im};
        const cpx r2 = {a0.re + c2 * b1.re + c1 * b2.re, a0.im + c2 * b1.im + c1 * b2.im};
        const cpx j1 = {s1 * d1.re + s2 * d2.re, s1 * d1.im + s2 * d2.im}; /* multiplied by -i below */
        const cpx j2 = {s2 * d1.re - s1 * d2.re, s2 * d1.im - s1 * d2.im};
        out[u].re = a0.re + b1.re + b2.re;
        out[u].im = a0.im + b1.im + b2.im;
        /* r - i*j = (r.re + j.im, r.im - j.re) ; r + i*j = (r.re - j.im, r.im + j.re) */
        out[u + m].re = r1.re + j1.im;
        out[u + m].im = r1.im - j1.re;
        out[u + 4 * m].re = r1.re - j1.im;
        out[u + 4 * m].im = r1.im + j1.re;
        out[u + 2 * m].re = r2.re + j2.im;
        out[u + 2 * m].im = r2.im - j2.re;
        out[u + 3 * m].re = r2.re - j2.im;
        out[u + 3 * m].im = r2.im + j2.re;
    }
}

/* out[0 .. n-1] = DFT of in[0], in[s], ..., in[(n-1)s] where n = product of factors[0..]. */
static void fft_work(cpx *out, const cpx *in, int s, const int *factors, int n, const cpx *tw)
{
    const int p = factors[0];
    const int m = n / p;
    if (m == 1) {
        for (int q = 0; q < p; q++)
            out[q] = in[q * s];
    } else {
        for (int q = 0; q < p; q++)
            fft_work(out + q * m, in + q * s, s * p, factors + 1, m, tw);
    }
    switch (p) {
    case 2: bfly2(out, s, m, tw); break;
    case 4: bfly4(out, s, m, tw); break;
    case 5: bfly5(out, s, m, tw); break;
    default: break; /* unreachable: FFT_FACTORS holds only 2, 4, 5 */
    }
}

/* ------------------------------------------------------------------------------------------------------------
 * One frame: 400 float32 samples (already reflected where needed) -> 128 log-mel values.
 * ---------------------------------------------------------------------------------------------------------- */
static void mel_frame(const mel_tables *T, const float *frame, float *out)
{
    cpx z[FFT_N], Z[FFT_N];
    double pw[VX_N_BINS];

    /* Pack the windowed real frame y[j] = w[j] * frame[j] as z[m] = y[2m] + i y[2m+1]. */
    for (int m = 0; m < FFT_N; m++) {
        z[m].re = T->window[2 * m] * (double)frame[2 * m];
        z[m].im = T->window[2 * m + 1] * (double)frame[2 * m + 1];
    }
    fft_work(Z, z, 1, FFT_FACTORS, FFT_N, T->tw);

    /* Z = E + iO with E, O the 200-point DFTs of the even/odd samples (both real sequences, so Hermitian):
     *   E[k] = (Z[k] + conj(Z[-k])) / 2,   O[k] = (Z[k] - conj(Z[-k])) / (2i)
     *   X[k] = E[k] + e^{-2 pi i k/400} O[k],  k = 0..200   (indices of Z mod 200)                     */
    for (int k = 0; k < VX_N_BINS; k++) {
        const cpx a = Z[k % FFT_N];
        const cpx b = Z[(FFT_N - k) % FFT_N]; /* conj taken inline */
        const double e_re = 0.5 * (a.re + b.re), e_im = 0.5 * (a.im - b.im);
        /* (a - conj b) / (2i) = -i/2 * (a - conj b); a - conj b = (a.re - b.re, a.im + b.im) */
        const double o_re = 0.5 * (a.im + b.im), o_im = -0.5 * (a.re - b.re);
        const cpx w = T->rtw[k];
        const double x_re = e_re + (w.re * o_re - w.im * o_im);
        const double x_im = e_im + (w.re * o_im + w.im * o_re);
        pw[k] = x_re * x_re + x_im * x_im;
    }

    /* Mel projection over each filter's nonzero bins, log10 with floor, clamp to 1.5 - 8, rescale. */
    for (int m = 0; m < VX_N_MEL; m++) {
        const double *w = T->fb_w + T->fb_off[m];
        const double *p = pw + T->fb_k0[m];
        const int len = T->fb_len[m];
        double acc = 0.0;
        for (int k = 0; k < len; k++)
            acc += w[k] * p[k];
        /* Below 3.162e-7 (< 10^-6.5 = 3.16227766e-7) the clamp wins for sure: skip the log10 (a large share of
         * the time on the zero padding). Same result as max(log10(max(acc, 1e-10)), -6.5) for every acc. */
        double v = 1.5 - 8.0;
        if (acc >= 3.162e-7) {
            v = log10(acc);
            if (v < 1.5 - 8.0)
                v = 1.5 - 8.0;
        }
        out[m] = (float)((v + 4.0) / 4.0);
    }
}

/* numpy/torch "reflect" index for a signal of length n >= 2 (edge sample not repeated), applied repeatedly:
 * the padded signal is periodic with period 2(n-1). For n == 1 every index maps to 0. */
static int64_t reflect_index(int64_t i, int64_t n)
{
    if (i >= 0 && i < n)
        return i;
    if (n == 1)
        return 0;
    const int64_t period = 2 * (n - 1);
    int64_t j = i % period;
    if (j < 0)
        j += period;
    return j < n ? j : period - j;
}

/* Returns a pointer to the 400 input samples of frame t of a signal of total (current) length n_sig, whose
 * samples [seg_base, seg_base + seg_len) are available at seg[0..]. If the window lies inside [0, n_sig)
 * this points into seg (no copy); otherwise the reflected samples are gathered into tmp. The caller
 * guarantees every index the window needs (after reflection) lies in the available segment. */
static const float *frame_window(const float *seg, int64_t seg_base, int64_t n_sig, int64_t t, float *tmp)
{
    const int64_t start = t * VX_HOP - VX_PAD;
    if (start >= 0 && start + VX_N_FFT <= n_sig)
        return seg + (start - seg_base);
    for (int j = 0; j < VX_N_FFT; j++)
        tmp[j] = seg[reflect_index(start + j, n_sig) - seg_base];
    return tmp;
}

/* ------------------------------------------------------------------------------------------------------------
 * Whole signal
 * ---------------------------------------------------------------------------------------------------------- */
int32_t vx_native_abi_version(void)
{
    return VX_ABI_VERSION;
}

int64_t vx_log_mel_num_frames(int64_t n)
{
    if (n < 0)
        return VX_ERR_ARG;
    return n / VX_HOP;
}

int64_t vx_log_mel(const float *x, int64_t n, float *out)
{
    if (n < 0)
        return VX_ERR_ARG;
    const int64_t n_frames = n / VX_HOP;
    if (n_frames == 0)
        return 0;
    if (!x || !out)
        return VX_ERR_ARG;
    mel_tables *T = tables_new();
    if (!T)
        return VX_ERR_NOMEM;
    float tmp[VX_N_FFT];
    for (int64_t t = 0; t < n_frames; t++)
        mel_frame(T, frame_window(x, 0, n, t, tmp), out + t * VX_N_MEL);
    free(T);
    return n_frames;
}

int32_t vx_mel_filterbank(double *out)
{
    if (!out)
        return VX_ERR_ARG;
    mel_tables *T = tables_new();
    if (!T)
        return VX_ERR_NOMEM;
    memcpy(out, T->fb_dense, sizeof(T->fb_dense));
    free(T);
    return VX_OK;
}

/* ------------------------------------------------------------------------------------------------------------
 * Incremental
 * ---------------------------------------------------------------------------------------------------------- */
struct vx_mel_stream {
    mel_tables *T;
    float *buf;       /* buf[0 .. len-1] holds signal samples [base, base + len) */
    int64_t cap;      /* capacity of buf in samples                            */
    int64_t base;
    int64_t len;
    int64_t n_fed;    /* total samples fed = base + len                        */
    int64_t emitted;  /* frames emitted so far = index of the next frame       */
    int finished;
};

/* Frames whose windows are complete once n samples exist, before the end is known:
 * frame 0 needs index 200 (reflection of its left half), frame t >= 1 needs index 160t + 199. */
static int64_t frames_ready(int64_t n)
{
    if (n < VX_PAD + 1)
        return 0;
    return (n - (VX_PAD - VX_HOP)) / VX_HOP; /* = floor((n - 40)/160): largest t with 160t+200 <= n, plus 1 */
}

vx_mel_stream *vx_mel_stream_new(void)
{
    vx_mel_stream *s = (vx_mel_stream *)calloc(1, sizeof(vx_mel_stream));
    if (!s)
        return NULL;
    s->T = tables_new();
    s->cap = STREAM_BUF_CAP;
    s->buf = (float *)malloc((size_t)s->cap * sizeof(float));
    if (!s->T || !s->buf) {
        free(s->T);
        free(s->buf);
        free(s);
        return NULL;
    }
    return s;
}

void vx_mel_stream_free(vx_mel_stream *s)
{
    if (!s)
        return;
    free(s->T);
    free(s->buf);
    free(s);
}

int64_t vx_mel_stream_frames_for_feed(const vx_mel_stream *s, int64_t n)
{
    if (!s || n < 0)
        return VX_ERR_ARG;
    if (s->finished)
        return 0;
    return frames_ready(s->n_fed + n) - s->emitted;
}

int64_t vx_mel_stream_frames_for_finish(const vx_mel_stream *s)
{
    if (!s)
        return VX_ERR_ARG;
    if (s->finished)
        return 0;
    return s->n_fed / VX_HOP - s->emitted;
}

/* Drop samples no future frame can read: frame t reads indices >= 160t - 200 (its left reflection, for t <= 1,
 * reads indices >= 1 >= 0). Afterwards len < 400 whenever the next frame is not yet ready. */
static void stream_compact(vx_mel_stream *s)
{
    int64_t keep_from = s->emitted * VX_HOP - VX_PAD;
    if (keep_from < 0)
        keep_from = 0;
    const int64_t drop = keep_from - s->base;
    if (drop <= 0)
        return;
    s->len -= drop;
    memmove(s->buf, s->buf + drop, (size_t)s->len * sizeof(float));
    s->base = keep_from;
}

int64_t vx_mel_stream_feed(vx_mel_stream *s, const float *x, int64_t n, float *out, int64_t out_capacity_frames)
{
    if (!s || n < 0 || (n > 0 && !x))
        return VX_ERR_ARG;
    if (s->finished)
        return VX_ERR_FINISHED;
    const int64_t k = frames_ready(s->n_fed + n) - s->emitted;
    if (k > 0 && !out)
        return VX_ERR_ARG;
    if (k > out_capacity_frames)
        return VX_ERR_CAPACITY;

    float tmp[VX_N_FFT];
    int64_t written = 0;
    while (n > 0) {
        /* After compaction len < 400 <= cap, so every pass makes progress (chunk >= cap - 399). */
        int64_t chunk = s->cap - s->len;
        if (chunk > n)
            chunk = n;
        memcpy(s->buf + s->len, x, (size_t)chunk * sizeof(float));
        s->len += chunk;
        s->n_fed += chunk;
        x += chunk;
        n -= chunk;
        const int64_t ready = frames_ready(s->n_fed);
        while (s->emitted < ready) {
            /* n_sig = samples so far: the window ends before n_fed and only the left edge may be reflected,
             * which maps i -> -i exactly as the whole-signal reflection does (n_fed > 200 here). */
            mel_frame(s->T, frame_window(s->buf, s->base, s->n_fed, s->emitted, tmp),
                      out + written * VX_N_MEL);
            s->emitted++;
            written++;
        }
        stream_compact(s);
    }
    return written;
}

int64_t vx_mel_stream_finish(vx_mel_stream *s, float *out, int64_t out_capacity_frames)
{
    if (!s)
        return VX_ERR_ARG;
    if (s->finished)
        return VX_ERR_FINISHED;
    const int64_t total = s->n_fed / VX_HOP;
    const int64_t k = total - s->emitted;
    if (k > 0 && !out)
        return VX_ERR_ARG;
    if (k > out_capacity_frames)
        return VX_ERR_CAPACITY;
    /* The remaining windows read indices >= 160t - 200 >= base and, after right reflection
     * (i -> 2(n-1) - i), indices >= n - 41 > base: all inside the buffer (see stream_compact). */
    float tmp[VX_N_FFT];
    int64_t written = 0;
    while (s->emitted < total) {
        mel_frame(s->T, frame_window(s->buf, s->base, s->n_fed, s->emitted, tmp), out + written * VX_N_MEL);
        s->emitted++;
        written++;
    }
    s->finished = 1;
    s->len = 0;
    s->base = s->n_fed;
    return written;
}

int64_t vx_mel_stream_samples_fed(const vx_mel_stream *s)
{
    return s ? s->n_fed : VX_ERR_ARG;
}

int64_t vx_mel_stream_frames_emitted(const vx_mel_stream *s)
{
    return s ? s->emitted : VX_ERR_ARG;
}

int32_t vx_mel_stream_is_finished(const vx_mel_stream *s)
{
    return s ? (int32_t)(s->finished != 0) : VX_ERR_ARG;
}

int64_t vx_mel_stream_buffer_capacity(const vx_mel_stream *s)
{
    return s ? s->cap : VX_ERR_ARG;
}

int64_t vx_mel_stream_buffered(const vx_mel_stream *s)
{
    return s ? s->len : VX_ERR_ARG;
}
