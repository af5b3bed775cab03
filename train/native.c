/* The training pipeline's inner loops (train/native.py compiles this file with the system C compiler and
 * loads it with ctypes; train/pipeline.py calls it). Every function reproduces the arithmetic of the
 * reference pipeline (train/transforms.py) bit for bit; the tests compare them on random inputs.
 *
 * Built with -ffp-contract=off: a compiler must not fuse a * b + c where the reference rounds twice
 * (aarch64 compilers fuse by default). Where the reference fuses (PyTorch's bilinear kernel, OpenCV's
 * HSV -> RGB), fma_f32 does: one instruction where the CPU has FMA (-march=native), else the exact
 * double product and one rounding of the sum to float, as train/pipeline.py's _fma. Loops are written
 * for the vectoriser: chunks, one select per statement, float gathers.
 */
#include <stdint.h>
#include <string.h>
#include <math.h>
#include <stdlib.h>

/* fma(a, b, c) in float32 */
#if defined(__FMA__) || defined(__ARM_FEATURE_FMA)
static inline float fma_f32(float a, float b, float c) { return fmaf(a, b, c); } /* one instruction */
#else /* the product is exact in double: one rounding of the sum to float is the fused result */
static inline float fma_f32(float a, float b, float c) { return (float)((double)a * (double)b + (double)c); }
#endif

/* The Paeth predictor, branch-free (noisy photos make its choice unpredictable) */
static inline int paeth(int a, int b, int c)
{
    const int pa = abs(b - c), pb = abs(a - c), pc = abs(a + b - 2 * c);
    const int ab = pb <= pc ? b : c;
    return (pa <= pb && pa <= pc) ? a : ab;
}

/* Paeth rows of 3 and 1 bytes a pixel, the left and upper-left pixels carried in registers */
static void paeth3(const uint8_t *src, const uint8_t *prev, uint8_t *dst, int64_t rowbytes)
{
    int a0 = 0, a1 = 0, a2 = 0, c0 = 0, c1 = 0, c2 = 0;
    for (int64_t i = 0; i + 2 < rowbytes; i += 3) {
        const int b0 = prev[i], b1 = prev[i + 1], b2 = prev[i + 2];
        a0 = (uint8_t)(src[i] + paeth(a0, b0, c0));
        a1 = (uint8_t)(src[i + 1] + paeth(a1, b1, c1));
        a2 = (uint8_t)(src[i + 2] + paeth(a2, b2, c2));
        dst[i] = (uint8_t)a0; dst[i + 1] = (uint8_t)a1; dst[i + 2] = (uint8_t)a2;
        c0 = b0; c1 = b1; c2 = b2;
    }
}

static void paeth1(const uint8_t *src, const uint8_t *prev, uint8_t *dst, int64_t rowbytes)
{
    int a = 0, c = 0;
    for (int64_t i = 0; i < rowbytes; i++) {
        const int b = prev[i];
        a = (uint8_t)(src[i] + paeth(a, b, c));
        dst[i] = (uint8_t)a;
        c = b;
    }
}

/* ---------------------------------------------------------------------------------------------------
 * PNG scanline filters (PNG spec section 9): `rows` filtered scanlines of 1 + rowbytes bytes each in
 * `in`, unfiltered into `out` (rows x rowbytes); `prev` is the unfiltered row above the first one
 * (NULL at the top of the image). Returns 0, or 1 + the row of the first unknown filter type.
 */
int64_t png_unfilter(const uint8_t *in, int64_t rows, int64_t rowbytes, int64_t bpp,
                     const uint8_t *prev, uint8_t *out)
{
    for (int64_t r = 0; r < rows; r++) {
        const uint8_t filter = in[0];
        const uint8_t *src = in + 1;
        uint8_t *dst = out + r * rowbytes;
        int64_t i;
        switch (filter) {
        case 0:
            memcpy(dst, src, (size_t)rowbytes);
            break;
        case 1: /* Sub */
            for (i = 0; i < bpp && i < rowbytes; i++) dst[i] = src[i];
            for (; i < rowbytes; i++) dst[i] = (uint8_t)(src[i] + dst[i - bpp]);
            break;
        case 2: /* Up */
            if (prev) for (i = 0; i < rowbytes; i++) dst[i] = (uint8_t)(src[i] + prev[i]);
            else memcpy(dst, src, (size_t)rowbytes);
            break;
        case 3: /* Average */
            for (i = 0; i < bpp && i < rowbytes; i++) dst[i] = (uint8_t)(src[i] + ((prev ? prev[i] : 0) >> 1));
            for (; i < rowbytes; i++)
                dst[i] = (uint8_t)(src[i] + ((dst[i - bpp] + (prev ? prev[i] : 0)) >> 1));
            break;
        case 4: /* Paeth */
            if (!prev) { /* above is zero: the predictor is the left byte */
                for (i = 0; i < bpp && i < rowbytes; i++) dst[i] = src[i];
                for (; i < rowbytes; i++) dst[i] = (uint8_t)(src[i] + dst[i - bpp]);
                break;
            }
            if (bpp == 3) paeth3(src, prev, dst, rowbytes);
            else if (bpp == 1) paeth1(src, prev, dst, rowbytes);
            else {
                for (i = 0; i < bpp && i < rowbytes; i++) dst[i] = (uint8_t)(src[i] + prev[i]);
                for (; i < rowbytes; i++) dst[i] = (uint8_t)(src[i] + paeth(dst[i - bpp], prev[i], prev[i - bpp]));
            }
            break;
        default:
            return r + 1;
        }
        prev = dst;
        in += 1 + rowbytes;
    }
    return 0;
}

/* ---------------------------------------------------------------------------------------------------
 * Source indices of PyTorch's resizes along one axis (in -> out samples), for `n` output indices from
 * `start` on, stepping by `step` (-1: a flipped window).
 *
 * Nearest (upsample_nearest's nearest_idx): equal sizes copy, twice the size halves, else
 * min(floor(dst * (float)in / out), in - 1), in float32.
 * Bilinear (align_corners=False, area_pixel_compute_source_index): src = fma(in / out, dst + 0.5, -0.5)
 * in float32 (the compiler fuses it), clamped at 0; i0 = min(floor(src), in - 1),
 * l1 = clamp(src - i0, 0, 1), l0 = 1 - l1, i1 = i0 + (i0 < in - 1); equal sizes copy.
 */
void nearest_index(int64_t in, int64_t out, int64_t start, int64_t n, int64_t step, int64_t *idx)
{
    const float scale = (float)in / (float)out;
    for (int64_t k = 0; k < n; k++) {
        const int64_t dst = start + k * step;
        int64_t src;
        if (in == out) src = dst;
        else if (out == 2 * in) src = dst >> 1;
        else {
            src = (int64_t)floorf((float)dst * scale);
            src = src < in - 1 ? src : in - 1;
        }
        idx[k] = src;
    }
}

void linear_coeffs(int64_t in, int64_t out, int64_t start, int64_t n, int64_t step, int64_t *i0, int64_t *i1,
                   float *l0, float *l1)
{
    const float scale = (float)in / (float)out;
    for (int64_t k = 0; k < n; k++) {
        const int64_t dst = start + k * step;
        if (in == out) {
            i0[k] = i1[k] = dst;
            l0[k] = 1.0f;
            l1[k] = 0.0f;
            continue;
        }
        float src = fma_f32(scale, (float)dst + 0.5f, -0.5f);
        src = src < 0.0f ? 0.0f : src;
        int64_t f = (int64_t)src; /* floor: src >= 0 */
        f = f < in - 1 ? f : in - 1;
        float l = src - (float)f;
        l = l < 0.0f ? 0.0f : (l > 1.0f ? 1.0f : l);
        i0[k] = f;
        i1[k] = f + (f < in - 1);
        l0[k] = 1.0f - l;
        l1[k] = l;
    }
}

/* ---------------------------------------------------------------------------------------------------
 * The window (top, left, height, width) of the nearest resize of a mask (in_h, in_w) to (out_h, out_w),
 * columns reversed when `flip`: the histogram of its stored values added to hist[256] and, when out is
 * not NULL, lut[value] (lut NULL: the value) written as int16 to out (row stride out_stride). Reads
 * source rows up to mask_last_row(...) only.
 */
int64_t mask_last_row(int64_t in_h, int64_t out_h, int64_t top, int64_t height)
{
    int64_t row;
    nearest_index(in_h, out_h, top + height - 1, 1, 1, &row);
    return row;
}

int64_t mask_window(const uint8_t *mask, int64_t stride, int64_t in_h, int64_t in_w, int64_t out_h, int64_t out_w,
                    int64_t top, int64_t left, int64_t height, int64_t width, int flip, const uint8_t *lut,
                    int16_t *out, int64_t out_stride, int64_t *hist)
{
    int64_t *rows = malloc(sizeof(int64_t) * (size_t)(height + 3 * width));
    if (!rows) return -1;
    int64_t *cols = rows + height, *runs = cols + width, *run_len = runs + width;
    nearest_index(in_h, out_h, top, height, 1, rows);
    nearest_index(in_w, out_w, flip ? left + width - 1 : left, width, flip ? -1 : 1, cols);
    /* an upscaled window repeats source rows and columns: count each source pixel once, times its
       repeats (indices are monotonic, so repeats are runs) */
    int64_t nruns = 0;
    for (int64_t j = 0; j < width; j++) {
        if (j == 0 || cols[j] != cols[j - 1]) { runs[nruns] = cols[j]; run_len[nruns++] = 0; }
        run_len[nruns - 1]++;
    }
    uint32_t sub[4][256]; /* four histograms: runs of one label would stall on a single counter */
    memset(sub, 0, sizeof sub);
    for (int64_t i = 0; i < height; i++) {
        const uint8_t *src = mask + rows[i] * stride;
        if (i == 0 || rows[i] != rows[i - 1]) {
            int64_t repeat = 1;
            while (i + repeat < height && rows[i + repeat] == rows[i]) repeat++;
            int64_t u = 0;
            for (; u + 3 < nruns; u += 4) {
                sub[0][src[runs[u]]] += (uint32_t)(repeat * run_len[u]);
                sub[1][src[runs[u + 1]]] += (uint32_t)(repeat * run_len[u + 1]);
                sub[2][src[runs[u + 2]]] += (uint32_t)(repeat * run_len[u + 2]);
                sub[3][src[runs[u + 3]]] += (uint32_t)(repeat * run_len[u + 3]);
            }
            for (; u < nruns; u++) sub[0][src[runs[u]]] += (uint32_t)(repeat * run_len[u]);
        }
        if (out) {
            int16_t *dst = out + i * out_stride;
            if (i > 0 && rows[i] == rows[i - 1]) memcpy(dst, dst - out_stride, sizeof(int16_t) * (size_t)width);
            else if (lut) for (int64_t j = 0; j < width; j++) dst[j] = lut[src[cols[j]]];
            else for (int64_t j = 0; j < width; j++) dst[j] = src[cols[j]];
        }
    }
    for (int v = 0; v < 256; v++) hist[v] += (int64_t)sub[0][v] + sub[1][v] + sub[2][v] + sub[3][v];
    free(rows);
    return 0;
}

/* ---------------------------------------------------------------------------------------------------
 * OpenCV's 8-bit HSV conversions (hue range 180), as train/transforms.py's rgb_to_hsv_uint8 and
 * hsv_to_rgb_uint8: RGB2HSV_b in fixed point with the caller's sdiv/hdiv tables, HSV2RGB_b in float32
 * (vector path: outputs truncated; from column `scalar_from` on (the last W mod 32 pixels of a row, which
 * OpenCV converts with scalar code): rounded half to even). A chunk of pixels at a time, each step a
 * branch-free loop over the chunk, so that the compiler vectorises them.
 */
#define CHUNK 64

static void rgb_to_hsv(const int32_t *r, const int32_t *g, const int32_t *b, int m, const int32_t *sdiv,
                       const int32_t *hdiv, int32_t *h, int32_t *s, int32_t *v)
{
    int32_t diff[CHUNK], sd[CHUNK], hd[CHUNK];
    for (int i = 0; i < m; i++) {
        const int32_t hi = r[i] > g[i] ? r[i] : g[i], lo = r[i] < g[i] ? r[i] : g[i];
        v[i] = hi > b[i] ? hi : b[i];
        diff[i] = v[i] - (lo < b[i] ? lo : b[i]);
    }
    for (int i = 0; i < m; i++) { sd[i] = sdiv[v[i]]; hd[i] = hdiv[diff[i]]; }
    for (int i = 0; i < m; i++) {
        s[i] = (diff[i] * sd[i] + (1 << 11)) >> 12;
        /* OpenCV tests v == r first, then v == g */
        /* selects as masks: compilers turn ?: chains into branches, which stop the vectoriser */
        const int32_t is_r = -(int32_t)(v[i] == r[i]), is_g = -(int32_t)(v[i] == g[i]) & ~is_r;
        const int32_t hh = (is_r & (g[i] - b[i])) | (is_g & (b[i] - r[i] + 2 * diff[i])) |
                           (~(is_r | is_g) & (r[i] - g[i] + 4 * diff[i]));
        const int32_t q = (hh * hd[i] + (1 << 11)) >> 12; /* arithmetic shift: a floor division (GCC, Clang) */
        h[i] = q + (180 & -(int32_t)(q < 0));
    }
}

static inline uint32_t fbits(float x) { uint32_t u; memcpy(&u, &x, 4); return u; }
static inline float bitsf(uint32_t u) { float x; memcpy(&x, &u, 4); return x; }

/* clamp(trunc(x), 0, 255): for x in (-1, 256) an int conversion truncates as truncf does */
static inline int32_t trunc_u8(float x) { return x <= 0.0f ? 0 : (x >= 255.0f ? 255 : (int32_t)x); }

static void hsv_to_rgb(const int32_t *h, const int32_t *s, const int32_t *v, int m, int scalar_from,
                       int32_t *r, int32_t *g, int32_t *b)
{
    float fr[CHUNK], fg[CHUNK], fb[CHUNK];
    for (int i = 0; i < m; i++) {
        const float hf = (float)h[i] * (float)(6.0 / 180.0);
        const float sf = (float)s[i] * (float)(1.0 / 255.0);
        const float vf = (float)v[i] * (float)(1.0 / 255.0);
        const int32_t k = (int32_t)hf; /* truncf: hf >= 0; below 6 since h < 180 */
        const float frac = hf - (float)k;
        const float t2 = fma_f32(-sf, frac, 1.0f), t3 = fma_f32(-sf, 1.0f - frac, 1.0f); /* fused in OpenCV */
        const float tab0 = vf, tab1 = vf * (1.0f - sf), tab2 = vf * t2, tab3 = vf * t3;
        /* OpenCV's sector_data: (b, g, r) = tab rows {1,3,0} {1,0,2} {3,0,1} {0,2,1} {0,1,3} {2,1,0} */
        /* the sector's rows picked with bit masks: compilers turn selects into branches here, which
           stop the vectoriser */
        const uint32_t m0 = -(uint32_t)(k == 0), m1 = -(uint32_t)(k == 1), m2 = -(uint32_t)(k == 2),
                       m3 = -(uint32_t)(k == 3), m4 = -(uint32_t)(k == 4), m5 = -(uint32_t)(k == 5);
        const uint32_t u0 = fbits(tab0), u1 = fbits(tab1), u2 = fbits(tab2), u3 = fbits(tab3);
        fb[i] = bitsf(((m0 | m1) & u1) | (m2 & u3) | ((m3 | m4) & u0) | (m5 & u2));
        fg[i] = bitsf((m0 & u3) | ((m1 | m2) & u0) | (m3 & u2) | ((m4 | m5) & u1));
        fr[i] = bitsf(((m0 | m5) & u0) | (m1 & u2) | ((m2 | m3) & u1) | (m4 & u3));
    }
    const int vec = m < scalar_from ? m : (scalar_from > 0 ? scalar_from : 0);
    for (int i = 0; i < vec; i++) {
        r[i] = trunc_u8(fr[i] * 255.0f);
        g[i] = trunc_u8(fg[i] * 255.0f);
        b[i] = trunc_u8(fb[i] * 255.0f);
    }
    for (int i = vec; i < m; i++) {
        r[i] = trunc_u8(rintf(fr[i] * 255.0f));
        g[i] = trunc_u8(rintf(fg[i] * 255.0f));
        b[i] = trunc_u8(rintf(fb[i] * 255.0f));
    }
}

/* The photometric distortion's steps in MMSeg's order on n pixels of one row, planes in (r, g, b) and
 * out (may be the same): `pre`: brightness then contrast-first as one table; `sat`: saturation table of
 * S or NULL; `hue`: added to H mod 180 when has_hue; `post`: contrast-last table or NULL; columns >=
 * scalar_from use OpenCV's scalar HSV -> RGB rounding. */
static void distort(const uint8_t *in_r, const uint8_t *in_g, const uint8_t *in_b, uint8_t *out_r, uint8_t *out_g,
                    uint8_t *out_b, int64_t n, const uint8_t *pre, const uint8_t *sat, int has_hue, int hue,
                    const uint8_t *post, int64_t scalar_from, const int32_t *sdiv, const int32_t *hdiv)
{
    int32_t r[CHUNK], g[CHUNK], b[CHUNK], h[CHUNK], s[CHUNK], v[CHUNK];
    int32_t pre32[256], sat32[256], post32[256]; /* 32-bit tables: lookups the vectoriser can gather */
    for (int i = 0; i < 256; i++) {
        pre32[i] = pre ? pre[i] : i;
        sat32[i] = sat ? sat[i] : i;
        post32[i] = post ? post[i] : i;
    }
    for (int64_t j0 = 0; j0 < n; j0 += CHUNK) {
        const int m = n - j0 < CHUNK ? (int)(n - j0) : CHUNK;
        const int scalar = (int)(scalar_from - j0 < 0 ? 0 : (scalar_from - j0 > CHUNK ? CHUNK : scalar_from - j0));
        for (int i = 0; i < m; i++) { r[i] = in_r[j0 + i]; g[i] = in_g[j0 + i]; b[i] = in_b[j0 + i]; }
        if (pre)
            for (int i = 0; i < m; i++) { r[i] = pre32[r[i]]; g[i] = pre32[g[i]]; b[i] = pre32[b[i]]; }
        if (sat) {
            rgb_to_hsv(r, g, b, m, sdiv, hdiv, h, s, v);
            for (int i = 0; i < m; i++) s[i] = sat32[s[i]];
            hsv_to_rgb(h, s, v, m, scalar, r, g, b);
        }
        if (has_hue) {
            rgb_to_hsv(r, g, b, m, sdiv, hdiv, h, s, v);
            for (int i = 0; i < m; i++) {
                const int32_t x = h[i] + hue; /* hue in [-180, 180): one wrap either way */
                h[i] = x < 0 ? x + 180 : (x >= 180 ? x - 180 : x);
            }
            hsv_to_rgb(h, s, v, m, scalar, r, g, b);
        }
        if (post)
            for (int i = 0; i < m; i++) { r[i] = post32[r[i]]; g[i] = post32[g[i]]; b[i] = post32[b[i]]; }
        for (int i = 0; i < m; i++) {
            out_r[j0 + i] = (uint8_t)r[i]; out_g[j0 + i] = (uint8_t)g[i]; out_b[j0 + i] = (uint8_t)b[i];
        }
    }
}

void hsv_roundtrip(const uint8_t *rgb, int64_t n, int64_t width, const uint8_t *sat, int has_hue, int hue,
                   const int32_t *sdiv, const int32_t *hdiv, uint8_t *out)
{   /* the distortion's HSV steps on planes (3, n) of rows `width` wide, into out (3, n) (tests) */
    const int64_t scalar_from = width / 32 * 32;
    for (int64_t i = 0; i < n; i += width) {
        const int64_t m = n - i < width ? n - i : width;
        distort(rgb + i, rgb + n + i, rgb + 2 * n + i, out + i, out + n + i, out + 2 * n + i, m, NULL, sat,
                has_hue, hue, NULL, scalar_from, sdiv, hdiv);
    }
}

/* ---------------------------------------------------------------------------------------------------
 * One training crop: the window (top, left, height, width) of PyTorch's bilinear resize of an RGB image
 * (in_h, in_w) to (out_h, out_w) (align_corners=False, float32; per source row t = fma(s[x0], w0,
 * s[x1] * w1), then fma(t_top, h0, t_bottom * h1), rounded floor(v + 0.5f) and clamped, as
 * train/pipeline.py's _exact_pixels), columns reversed when `flip`, then the photometric distortion,
 * written as planes (3, height, width) at out[c * plane + i * out_stride + j].
 *
 * src: uint8 with element strides (sy, sx, sc), from row 0; only rows below resize_last_row(...) + 1
 * are read. Returns 0, or -1 when out of memory.
 */
static void horizontal(float *restrict t, const float *restrict frow, const int32_t *restrict x0,
                       const int32_t *restrict x1, const float *restrict w0, const float *restrict w1, int64_t n)
{
    for (int64_t j = 0; j < n; j++) t[j] = fma_f32(frow[x0[j]], w0[j], frow[x1[j]] * w1[j]);
}

int64_t resize_last_row(int64_t in_h, int64_t out_h, int64_t top, int64_t height)
{
    int64_t i0, i1;
    float l0, l1;
    linear_coeffs(in_h, out_h, top + height - 1, 1, 1, &i0, &i1, &l0, &l1);
    return i1;
}

int64_t resize_distort(const uint8_t *src, int64_t sy, int64_t sx, int64_t sc, int64_t in_h, int64_t in_w,
                       int64_t out_h, int64_t out_w, int64_t top, int64_t left, int64_t height, int64_t width,
                       int flip, const uint8_t *pre, const uint8_t *sat, int has_hue, int hue, const uint8_t *post,
                       int photometric, const int32_t *sdiv, const int32_t *hdiv, uint8_t *out, int64_t plane,
                       int64_t out_stride)
{
    const int64_t n = 3 * width, scalar_from = width / 32 * 32;
    int64_t y0[1], y1[1];
    float h0[1], h1[1];
    linear_coeffs(in_h, out_h, top, 1, 1, y0, y1, h0, h1);
    const int64_t r_lo = y0[0], r_hi = resize_last_row(in_h, out_h, top, height) + 1, rows = r_hi - r_lo;
    /* per output value (channel c, column j at c * width + j): its two source values' places in `frow`
       (a source row's columns c_lo..c_hi as float planes), their weights; work rows and rowbuf are planes
       too */
    int64_t *c0 = malloc(sizeof(int64_t) * (size_t)(2 * width));
    int32_t *x0 = malloc(sizeof(int32_t) * (size_t)(2 * n));
    float *w = malloc(sizeof(float) * (size_t)(2 * n + 2 * width + rows * n + 3 * (in_w + 1)));
    uint8_t *scratch = malloc((size_t)(rows + n));
    if (!c0 || !x0 || !w || !scratch) { free(c0); free(x0); free(w); free(scratch); return -1; }
    int64_t *c1 = c0 + width;
    int32_t *x1 = x0 + n;
    float *w0 = w, *w1 = w0 + n, *l0 = w1 + n, *l1 = l0 + width, *work = l1 + width, *frow = work + rows * n;
    uint8_t *done = scratch, *rowbuf = scratch + rows;
    linear_coeffs(in_w, out_w, flip ? left + width - 1 : left, width, flip ? -1 : 1, c0, c1, l0, l1);
    int64_t c_lo = in_w, c_hi = 0;
    for (int64_t j = 0; j < width; j++) {
        c_lo = c0[j] < c_lo ? c0[j] : c_lo;
        c_hi = c1[j] + 1 > c_hi ? c1[j] + 1 : c_hi;
    }
    const int64_t span = c_hi - c_lo;
    for (int c = 0; c < 3; c++)
        for (int64_t j = 0; j < width; j++) {
            x0[c * width + j] = (int32_t)(c * span + c0[j] - c_lo);
            x1[c * width + j] = (int32_t)(c * span + c1[j] - c_lo);
            w0[c * width + j] = l0[j];
            w1[c * width + j] = l1[j];
        }
    memset(done, 0, (size_t)rows);
    for (int64_t i = 0; i < height; i++) {
        linear_coeffs(in_h, out_h, top + i, 1, 1, y0, y1, h0, h1);
        const int64_t ys[2] = {y0[0] - r_lo, y1[0] - r_lo};
        for (int k = 0; k < 2; k++) { /* each source row's horizontal pass, once, when first needed */
            const int64_t y = ys[k];
            if (done[y]) continue;
            const uint8_t *row = src + (r_lo + y) * sy + c_lo * sx;
            for (int c = 0; c < 3; c++) /* to float planes first: then the gathers are float gathers, which vectorise */
                for (int64_t x = 0; x < span; x++) frow[c * span + x] = (float)row[x * sx + c * sc];
            horizontal(work + y * n, frow, x0, x1, w0, w1, n);
            done[y] = 1;
        }
        const float *upper = work + ys[0] * n, *lower = work + ys[1] * n;
        const float a = h0[0], b = h1[0];
        for (int64_t j = 0; j < n; j++) {
            /* clamp(floor(v + 0.5f), 0, 255): v + 0.5f > -1, and there the int conversion floors */
            int32_t q = (int32_t)(fma_f32(upper[j], a, lower[j] * b) + 0.5f);
            q = q < 0 ? 0 : q;
            q = q > 255 ? 255 : q;
            rowbuf[j] = (uint8_t)q;
        }
        uint8_t *o = out + i * out_stride;
        if (photometric)
            distort(rowbuf, rowbuf + width, rowbuf + 2 * width, o, o + plane, o + 2 * plane, width, pre, sat, has_hue,
                    hue, post, scalar_from, sdiv, hdiv);
        else
            for (int c = 0; c < 3; c++) memcpy(o + c * plane, rowbuf + c * width, (size_t)width);
    }
    free(c0); free(x0); free(w); free(scratch);
    return 0;
}
