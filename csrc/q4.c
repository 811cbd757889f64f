/*
 * q4.c -- GGML Q4_0 / Q8_0 row dequantisation (spec section 8.3), used for token-embedding lookups: the
 * embedding table stays quantised in memory and only the rows of the tokens at hand are expanded to float32.
 */
#include "voxtral_native.h"

#include <string.h>

#define QK 32            /* elements per block                     */
#define Q4_0_BYTES 18    /* f16 scale + 16 bytes of packed nibbles */
#define Q8_0_BYTES 34    /* f16 scale + 32 int8                    */

/* IEEE binary16 -> binary32, exact. Layout: sign(1) exponent(5, bias 15) mantissa(10).
 *   exp == 0,  man == 0 : +-0
 *   exp == 0,  man != 0 : subnormal, value man * 2^-24 -> renormalise into a float32 normal
 *   exp == 31, man == 0 : +-inf;  man != 0 : NaN (payload shifted into the float32 mantissa, quiet bit kept)
 *   otherwise           : normal, float32 exponent = exp - 15 + 127, mantissa << 13                     */
static uint32_t f16_bits_to_f32_bits(uint16_t h)
{
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1Fu;
    uint32_t man = h & 0x3FFu;
    uint32_t bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else {
            /* Shift the leading 1 up to the implicit-bit position (bit 10), lowering the exponent each step. */
            int e = -1;
            do {
                man <<= 1;
                e++;
            } while ((man & 0x400u) == 0);
            man &= 0x3FFu;
            bits = sign | ((uint32_t)(127 - 15 - e) << 23) | (man << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7F800000u | (man << 13);
    } else {
        bits = sign | ((exp + (127 - 15)) << 23) | (man << 13);
    }
    return bits;
}

float vx_f16_to_f32(uint16_t h)
{
    const uint32_t bits = f16_bits_to_f32_bits(h);
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

int32_t vx_f16_to_f32_array(const uint16_t *src, int64_t n, float *dst)
{
    if (n < 0 || (n > 0 && (!src || !dst)))
        return VX_ERR_ARG;
    /* Bit copies, so that even signalling-NaN patterns arrive unchanged (no FPU register round trip). */
    for (int64_t i = 0; i < n; i++) {
        const uint32_t bits = f16_bits_to_f32_bits(src[i]);
        memcpy(dst + i, &bits, sizeof bits);
    }
    return VX_OK;
}

static float load_d(const uint8_t *p)
{
    return vx_f16_to_f32((uint16_t)(p[0] | ((uint16_t)p[1] << 8))); /* little-endian regardless of host */
}

/* Common argument checks; ids are validated before anything is written. */
static int32_t check_args(const uint8_t *blocks, int64_t n_rows, int64_t n_cols, const int32_t *row_ids,
                          int64_t n_ids, const float *out)
{
    if (n_rows < 0 || n_ids < 0)
        return VX_ERR_ARG;
    if (n_cols <= 0 || n_cols % QK != 0)
        return VX_ERR_SHAPE;
    if (n_ids == 0)
        return VX_OK;
    if (!row_ids || !out || (n_rows > 0 && !blocks))
        return VX_ERR_ARG;
    for (int64_t i = 0; i < n_ids; i++)
        if (row_ids[i] < 0 || (int64_t)row_ids[i] >= n_rows)
            return VX_ERR_ROW_ID;
    return VX_OK;
}

int32_t vx_q4_0_dequant_rows(const uint8_t *blocks, int64_t n_rows, int64_t n_cols, const int32_t *row_ids,
                             int64_t n_ids, float *out)
{
    const int32_t rc = check_args(blocks, n_rows, n_cols, row_ids, n_ids, out);
    if (rc != VX_OK || n_ids == 0)
        return rc;
    const int64_t nb = n_cols / QK;
    for (int64_t i = 0; i < n_ids; i++) {
        const uint8_t *b = blocks + (int64_t)row_ids[i] * nb * Q4_0_BYTES;
        float *o = out + i * n_cols;
        for (int64_t j = 0; j < nb; j++, b += Q4_0_BYTES, o += QK) {
            const float d = load_d(b);
            const uint8_t *qs = b + 2;
            /* low nibbles are elements 0..15, high nibbles elements 16..31; stored offset by +8 */
            for (int k = 0; k < QK / 2; k++) {
                o[k] = (float)((int)(qs[k] & 0x0F) - 8) * d;
                o[k + QK / 2] = (float)((int)(qs[k] >> 4) - 8) * d;
            }
        }
    }
    return VX_OK;
}

int32_t vx_q8_0_dequant_rows(const uint8_t *blocks, int64_t n_rows, int64_t n_cols, const int32_t *row_ids,
                             int64_t n_ids, float *out)
{
    const int32_t rc = check_args(blocks, n_rows, n_cols, row_ids, n_ids, out);
    if (rc != VX_OK || n_ids == 0)
        return rc;
    const int64_t nb = n_cols / QK;
    for (int64_t i = 0; i < n_ids; i++) {
        const uint8_t *b = blocks + (int64_t)row_ids[i] * nb * Q8_0_BYTES;
        float *o = out + i * n_cols;
        for (int64_t j = 0; j < nb; j++, b += Q8_0_BYTES, o += QK) {
            const float d = load_d(b);
            for (int k = 0; k < QK; k++)
                o[k] = (float)((int)b[2 + k] - ((b[2 + k] & 0x80) ? 256 : 0)) * d; /* two's-complement int8 */
        }
    }
    return VX_OK;
}
