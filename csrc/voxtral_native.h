/*
 * voxtral_native.h -- the C helpers of voxtral_wgpu (audio front end + GGML block dequantisation).
 *
 * This header is read by two consumers:
 *   - the C compiler (csrc/mel.c, csrc/q4.c), and
 *   - cffi (voxtral_wgpu/_native.py), which passes the text between the two
 *     "CFFI-CDEF" marker lines below to ffi.cdef() after deleting the token VX_API.
 * Keep that region plain C declarations (no #include/#if/#define, no macros other than VX_API).
 *
 * Conventions (whole file):
 *   - Audio is mono float32 at 16 kHz. One mel frame every 160 samples (10 ms).
 *   - Mel output is TIME-MAJOR: frame t occupies out[t*128 .. t*128+127] (128 float32 per frame).
 *     The encoder wants [128, T] (channels x time): transpose on the consumer side.
 *   - Functions return a non-negative count or 0 on success, and one of the negative VX_ERR_* codes on error.
 *   - No function keeps a pointer to caller memory after it returns. No global state: every call/context is
 *     independent, so different contexts may be used from different threads.
 */
#ifndef VOXTRAL_NATIVE_H
#define VOXTRAL_NATIVE_H

#include <stdint.h>

#if defined(_WIN32)
#  if defined(VOXTRAL_NATIVE_BUILD)
#    define VX_API __declspec(dllexport)
#  else
#    define VX_API __declspec(dllimport)
#  endif
#elif defined(__GNUC__)
#  define VX_API __attribute__((visibility("default")))
#else
#  define VX_API
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* ==== CFFI-CDEF BEGIN (plain declarations only; the loader removes the token VX_API) ==== */

/* ---------------------------------------------------------------------------------------------------------
 * Constants and error codes
 * ------------------------------------------------------------------------------------------------------- */
enum {
    VX_SAMPLE_RATE = 16000, /* Hz */
    VX_N_FFT       = 400,   /* STFT size = window length (25 ms)                       */
    VX_HOP         = 160,   /* samples between frames (10 ms)                           */
    VX_N_BINS      = 201,   /* rFFT bins kept: n_fft/2 + 1, bin k is at 40*k Hz         */
    VX_N_MEL       = 128,   /* mel channels per frame                                   */
    VX_PAD         = 200    /* center=True padding: n_fft/2 reflected samples each side */
};

enum {
    VX_OK            =  0,
    VX_ERR_ARG       = -1,  /* NULL pointer where data is needed, or a negative length/count   */
    VX_ERR_SHAPE     = -2,  /* n_cols is not a positive multiple of 32 (block size)            */
    VX_ERR_ROW_ID    = -3,  /* a row id is < 0 or >= n_rows                                    */
    VX_ERR_FINISHED  = -4,  /* feed()/finish() on a stream that was already finished           */
    VX_ERR_CAPACITY  = -5,  /* output buffer too small; nothing was consumed                  */
    VX_ERR_NOMEM     = -6   /* allocation failed                                              */
};

/* Version of this API; bumped on any incompatible change. The loader refuses a library whose value differs
 * from the one it was written for (protects against a stale build lying around). */
VX_API int32_t vx_native_abi_version(void);

/* ---------------------------------------------------------------------------------------------------------
 * Log-mel spectrogram (spec section 3.3), whole signal
 *
 * For a signal x[0..n-1] (float32, 16 kHz) this computes exactly what Voxtral's reference pipeline computes
 * (torch.stft(x, n_fft=400, hop_length=160, window=periodic Hann, center=True, pad_mode="reflect"),
 * last frame dropped, Slaney mel, log10, clamp, rescale), but in double precision throughout:
 *
 *   n_frames = floor(n / 160)                         (torch gives 1 + floor(n/160) frames; the last is dropped)
 *   frame t reads x[160t-200 .. 160t+199] where an index i outside [0, n) is reflected without repeating
 *     the edge sample (numpy/torch "reflect"): i < 0 -> -i, i >= n -> 2(n-1) - i (applied repeatedly when
 *     n <= 200, which torch rejects but numpy's np.pad(mode="reflect") defines the same way)
 *   w[j]    = 0.5 - 0.5 cos(2 pi j / 400),  j = 0..399                     (periodic Hann)
 *   X_t[k]  = sum_j w[j] x[160t-200+j] e^{-2 pi i k j / 400},  k = 0..200  (mixed-radix FFT, not a DFT loop)
 *   P_t[k]  = |X_t[k]|^2
 *   M_t[m]  = sum_k F[m][k] P_t[k],  m = 0..127, F = 128 x 201 Slaney filterbank, 0..8000 Hz, Slaney
 *             area normalisation (== librosa htk=False norm="slaney" == HF mel_filter_bank(norm="slaney",
 *             mel_scale="slaney")), built in double at run time (spec 3.3 step 5)
 *   v       = max(log10(max(M_t[m], 1e-10)), 1.5 - 8.0)
 *   out[t*128 + m] = (float)((v + 4) / 4)          -> digital silence gives exactly -0.625
 *
 * x:   n float32 samples (no alignment requirement). May be NULL when n == 0.
 * out: room for floor(n/160) * 128 float32, time-major [n_frames, 128].
 * Returns the number of frames written (floor(n/160), 0 when n < 160), or VX_ERR_ARG / VX_ERR_NOMEM.
 * Non-finite samples are not checked; frames that read them have unspecified values (the Python wrapper
 * rejects such input).
 */
VX_API int64_t vx_log_mel(const float *x, int64_t n, float *out);

/* floor(n / 160) for n >= 0 (frames vx_log_mel produces for n samples); VX_ERR_ARG for n < 0. */
VX_API int64_t vx_log_mel_num_frames(int64_t n);

/* Copies the 128 x 201 mel filterbank F (row-major, F[m*201 + k], float64) into out; returns VX_OK.
 * Exposed for tests and documentation; vx_log_mel uses the same numbers. */
VX_API int32_t vx_mel_filterbank(double *out);

/* ---------------------------------------------------------------------------------------------------------
 * Log-mel spectrogram, incremental (spec section 3.4)
 *
 * A stream sees ONE growing signal: everything the caller feeds (including any left-pad zeros, which the caller
 * feeds as ordinary samples). Frame t is emitted as soon as every sample its window reads exists:
 *   frame 0     needs samples 0..200   (its left half is x[1..200] reflected)  -> after 201 samples
 *   frame t>=1  needs samples up to 160t+199                                  -> after 160t+200 samples
 * so after N samples fed, ready(N) = (N < 201) ? 0 : floor((N - 40) / 160) frames have been emitted.
 * finish() declares the end of the signal: the remaining frames up to floor(N/160) are emitted with the
 * right-edge reflection of vx_log_mel. Concatenating all emitted frames gives bit-for-bit the output of
 * vx_log_mel on the whole signal, for any chunking (empty and 1-sample feeds included): both paths call the
 * same per-frame routine on the same 400 input samples.
 *
 * Memory is bounded: the stream keeps a fixed-size sample buffer (vx_mel_stream_buffer_capacity samples);
 * only the <= 399 samples still needed by future frames survive between calls, and a long feed is
 * processed through the buffer in pieces.
 */
typedef struct vx_mel_stream vx_mel_stream;

/* New empty stream (builds its own FFT tables and filterbank). NULL if out of memory. */
VX_API vx_mel_stream *vx_mel_stream_new(void);

/* Frees the stream; NULL is a no-op. */
VX_API void vx_mel_stream_free(vx_mel_stream *s);

/* Number of frames a vx_mel_stream_feed(s, ., n, ...) call would emit now (ready(fed + n) - emitted);
 * VX_ERR_ARG if s is NULL or n < 0; 0 once finished. Use it to size the output buffer. */
VX_API int64_t vx_mel_stream_frames_for_feed(const vx_mel_stream *s, int64_t n);

/* Appends x[0..n-1] to the signal and writes the newly ready frames, time-major, to out[0 .. k*128-1].
 * out_capacity_frames: how many frames out can hold. Returns k (>= 0, maybe 0), or
 *   VX_ERR_FINISHED (stream already finished), VX_ERR_CAPACITY (out too small for k; the stream is unchanged),
 *   VX_ERR_ARG (s NULL, n < 0, x NULL with n > 0, out NULL with k > 0). */
VX_API int64_t vx_mel_stream_feed(vx_mel_stream *s, const float *x, int64_t n, float *out,
                                  int64_t out_capacity_frames);

/* Number of frames vx_mel_stream_finish would emit now: floor(fed/160) - emitted; 0 once finished. */
VX_API int64_t vx_mel_stream_frames_for_finish(const vx_mel_stream *s);

/* Ends the signal and writes the remaining frames (right edge reflected like vx_log_mel) to out.
 * Returns the number of frames written, or VX_ERR_FINISHED (second call), VX_ERR_CAPACITY (stream unchanged),
 * VX_ERR_ARG. After a successful finish every feed/finish returns VX_ERR_FINISHED. */
VX_API int64_t vx_mel_stream_finish(vx_mel_stream *s, float *out, int64_t out_capacity_frames);

/* Total samples fed so far (all of them are consumed: nothing is ever rejected except on error). */
VX_API int64_t vx_mel_stream_samples_fed(const vx_mel_stream *s);

/* Total frames emitted so far (feed + finish). */
VX_API int64_t vx_mel_stream_frames_emitted(const vx_mel_stream *s);

/* 1 after a successful finish, 0 before, VX_ERR_ARG for NULL. */
VX_API int32_t vx_mel_stream_is_finished(const vx_mel_stream *s);

/* Size of the internal sample buffer in samples (a constant for the life of the stream). */
VX_API int64_t vx_mel_stream_buffer_capacity(const vx_mel_stream *s);

/* Samples currently held in the buffer (always < 400 between calls). */
VX_API int64_t vx_mel_stream_buffered(const vx_mel_stream *s);

/* ---------------------------------------------------------------------------------------------------------
 * GGML block dequantisation of selected rows (embedding lookups; spec section 8.3)
 *
 * A weight matrix [n_rows, n_cols] is stored row-major as n_rows * (n_cols/32) consecutive blocks, each block
 * holding 32 consecutive elements of one row. Row r starts at byte r * (n_cols/32) * BLOCK_BYTES.
 *
 *   Q4_0 block (18 bytes): d = little-endian IEEE half at bytes 0..1, qs = bytes 2..17
 *       elem j      = ((qs[j] & 0x0F) - 8) * d      j = 0..15
 *       elem j + 16 = ((qs[j] >> 4)   - 8) * d
 *   Q8_0 block (34 bytes): d = little-endian IEEE half at bytes 0..1, q = 32 int8 at bytes 2..33
 *       elem j      = q[j] * d                      j = 0..31
 *
 * d is converted half -> float exactly (subnormals, +-inf, NaN payloads kept); the product is one float32
 * multiplication, which is exact for finite d (an 11-bit significand times an integer of <= 8 bits), so
 * the result equals gguf.dequantize bit for bit.
 *
 * blocks:  n_rows * n_cols/32 * BLOCK_BYTES bytes (no alignment requirement).
 * row_ids: n_ids row indices, each in [0, n_rows); repeats allowed.
 * out:     n_ids * n_cols float32, row i = dequantised row row_ids[i].
 * Returns VX_OK, VX_ERR_SHAPE (n_cols <= 0 or n_cols % 32 != 0), VX_ERR_ROW_ID (nothing written in that case:
 * ids are checked first), or VX_ERR_ARG (NULL pointers or negative counts).
 */
VX_API int32_t vx_q4_0_dequant_rows(const uint8_t *blocks, int64_t n_rows, int64_t n_cols,
                                    const int32_t *row_ids, int64_t n_ids, float *out);
VX_API int32_t vx_q8_0_dequant_rows(const uint8_t *blocks, int64_t n_rows, int64_t n_cols,
                                    const int32_t *row_ids, int64_t n_ids, float *out);

/* IEEE 754 binary16 (bit pattern h) -> binary32, exact for every input (used for the block scales):
 * zeros and subnormals (man * 2^-24) become exact float32 normals, +-inf stay inf, NaN payloads move to the top
 * of the float32 mantissa (quiet bit kept as is). Note that returning a signalling NaN by value may quiet it in
 * the caller (e.g. Python's float conversion); use vx_f16_to_f32_array for exact bit patterns. */
VX_API float vx_f16_to_f32(uint16_t h);

/* dst[i] = the float32 bit pattern of half src[i], i = 0..n-1 (bit copies, signalling NaNs preserved).
 * Returns VX_OK or VX_ERR_ARG. */
VX_API int32_t vx_f16_to_f32_array(const uint16_t *src, int64_t n, float *dst);

/* ==== CFFI-CDEF END ==== */

#ifdef __cplusplus
}
#endif

#endif /* VOXTRAL_NATIVE_H */
