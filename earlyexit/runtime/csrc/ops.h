// The vector arithmetic of one token's step (csrc/step.cpp): rounding to bf16, e^x, dot products, layer norm, the MLP
// activation, softmax sums and the three projection kernels. AVX-512 where the compiler targets it (-march=native),
// plain loops otherwise; every sum runs in the same order whichever path or thread split computes it.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace ee {

enum Activation { GELU_TANH = 0, RELU = 1 };

inline float bf16_round(float x) {
    // round to nearest even, as c10::BFloat16 does; NaN stays NaN
    uint32_t u;
    std::memcpy(&u, &x, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return x;
    u += 0x7fffu + ((u >> 16) & 1u);
    u &= 0xffff0000u;
    std::memcpy(&x, &u, 4);
    return x;
}

#if defined(__AVX512F__)
inline float hsum(__m512 v) { return _mm512_reduce_add_ps(v); }

// e^x to ~1 ulp: x = n ln2 + r, |r| <= ln2 / 2, e^r by its Taylor series to r^7, times 2^n
inline __m512 exp512(__m512 x) {
    x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.3762626647949f)), _mm512_set1_ps(-88.3762626647949f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.f / 5040);
    for (float c : {1.f / 720, 1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f}) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
    return _mm512_scalef_ps(p, n);
}

inline __m512 load_i8(const int8_t* w) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w))));
}
#endif

inline float dot(const float* a, const float* b, int64_t n) {
    int64_t k = 0;
    float s = 0.f;
#if defined(__AVX512F__)
    __m512 acc = _mm512_setzero_ps();
    for (; k + 16 <= n; k += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + k), _mm512_loadu_ps(b + k), acc);
    s = hsum(acc);
#endif
    for (; k < n; ++k) s += a[k] * b[k];
    return s;
}

// p[t] = <q, keys[t]> for t < n, keys a stride apart: four at a time, so their sums overlap (each one still
// a single dot over hs)
inline void dots(const float* q, const float* keys, int64_t stride, int64_t hs, int64_t n, float* p) {
    int64_t t = 0;
#if defined(__AVX512F__)
    if (hs % 16 == 0)
        for (; t + 4 <= n; t += 4) {
            const float *k0 = keys + t * stride, *k1 = k0 + stride, *k2 = k1 + stride, *k3 = k2 + stride;
            __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
            for (int64_t j = 0; j < hs; j += 16) {
                const __m512 qv = _mm512_loadu_ps(q + j);
                a0 = _mm512_fmadd_ps(qv, _mm512_loadu_ps(k0 + j), a0);
                a1 = _mm512_fmadd_ps(qv, _mm512_loadu_ps(k1 + j), a1);
                a2 = _mm512_fmadd_ps(qv, _mm512_loadu_ps(k2 + j), a2);
                a3 = _mm512_fmadd_ps(qv, _mm512_loadu_ps(k3 + j), a3);
            }
            p[t] = hsum(a0), p[t + 1] = hsum(a1), p[t + 2] = hsum(a2), p[t + 3] = hsum(a3);
        }
#endif
    for (; t < n; ++t) p[t] = dot(q, keys + t * stride, hs);
}

// out[j] = sum_t (p[t] * inv) values[t][j] for j < hs, values a stride apart
inline void weighted_sum(const float* p, int64_t n, float inv, const float* values, int64_t stride, int64_t hs, float* out) {
    std::fill(out, out + hs, 0.f);
    int64_t j = 0;
#if defined(__AVX512F__)
    for (; j + 64 <= hs; j += 64) {
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
        for (int64_t t = 0; t < n; ++t) {
            const __m512 w = _mm512_set1_ps(p[t] * inv);
            const float* v = values + t * stride + j;
            a0 = _mm512_fmadd_ps(w, _mm512_loadu_ps(v), a0);
            a1 = _mm512_fmadd_ps(w, _mm512_loadu_ps(v + 16), a1);
            a2 = _mm512_fmadd_ps(w, _mm512_loadu_ps(v + 32), a2);
            a3 = _mm512_fmadd_ps(w, _mm512_loadu_ps(v + 48), a3);
        }
        _mm512_storeu_ps(out + j, a0), _mm512_storeu_ps(out + j + 16, a1);
        _mm512_storeu_ps(out + j + 32, a2), _mm512_storeu_ps(out + j + 48, a3);
    }
    for (; j + 16 <= hs; j += 16) {
        __m512 a = _mm512_setzero_ps();
        for (int64_t t = 0; t < n; ++t) a = _mm512_fmadd_ps(_mm512_set1_ps(p[t] * inv), _mm512_loadu_ps(values + t * stride + j), a);
        _mm512_storeu_ps(out + j, a);
    }
#endif
    for (; j < hs; ++j) {
        float a = 0.f;
        for (int64_t t = 0; t < n; ++t) a = std::fma(p[t] * inv, values[t * stride + j], a);
        out[j] = a;
    }
}

// out = layer_norm(x) * w + b over d values (two-pass, in double), each rounded to bf16 where `round`
inline void layer_norm(const float* x, const float* w, const float* b, float eps, float* out, int64_t d, bool round) {
    double mean = 0.0;
    for (int64_t i = 0; i < d; ++i) mean += x[i];
    mean /= d;
    double var = 0.0;
    for (int64_t i = 0; i < d; ++i) var += (x[i] - mean) * (x[i] - mean);
    var /= d;
    const float m = static_cast<float>(mean), r = static_cast<float>(1.0 / std::sqrt(var + eps));
    for (int64_t i = 0; i < d; ++i) {
        const float v = (x[i] - m) * r * w[i] + b[i];
        out[i] = round ? bf16_round(v) : v;
    }
}

// in place: the MLP's activation (rounded to bf16 where `round`: an int8 step's next projection input); gelu's tanh
// approximation (F.gelu(approximate="tanh")) as x * sigmoid(2u) = x / (1 + e^-2u), u = sqrt(2 / pi) (x + 0.044715 x^3)
inline void activate(float* x, int64_t n, int act, bool round) {
    if (act == RELU) {
        for (int64_t i = 0; i < n; ++i) x[i] = std::max(x[i], 0.f);
    } else {
        constexpr float c = -2.f * 0.7978845608028654f;
        int64_t i = 0;
#if defined(__AVX512F__)
        for (; i + 16 <= n; i += 16) {
            const __m512 v = _mm512_loadu_ps(x + i);
            const __m512 u = _mm512_mul_ps(_mm512_set1_ps(c),
                                           _mm512_fmadd_ps(_mm512_mul_ps(_mm512_set1_ps(0.044715f), v), _mm512_mul_ps(v, v), v));
            _mm512_storeu_ps(x + i, _mm512_div_ps(v, _mm512_add_ps(_mm512_set1_ps(1.f), exp512(u))));
        }
#endif
        for (; i < n; ++i) x[i] = x[i] / (1.f + std::exp(c * (x[i] + 0.044715f * x[i] * x[i] * x[i])));
    }
    if (round)
        for (int64_t i = 0; i < n; ++i) x[i] = bf16_round(x[i]);
}

// in place: p[0..n) -> e^(p - top), returning their sum
inline float exp_sum(float* p, int64_t n, float top) {
    int64_t t = 0;
    float sum = 0.f;
#if defined(__AVX512F__)
    __m512 acc = _mm512_setzero_ps();
    for (; t + 16 <= n; t += 16) {
        const __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(p + t), _mm512_set1_ps(top)));
        _mm512_storeu_ps(p + t, e);
        acc = _mm512_add_ps(acc, e);
    }
    sum = hsum(acc);
#endif
    for (; t < n; ++t) sum += (p[t] = std::exp(p[t] - top));
    return sum;
}

#if defined(__AVX512F__)
inline __m512 load16(const float* w) { return _mm512_loadu_ps(w); }
inline __m512 load16(const int8_t* w) { return load_i8(w); }

// s[j] = <x, w[j]> for four rows of K (K % 16 == 0) a row apart: four sums in flight, each reduced by one tree
template <class W>
inline void four_rows(const float* x, const W* w, int64_t K, float s[4]) {
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 16) {
        const __m512 xv = _mm512_loadu_ps(x + k);
        a0 = _mm512_fmadd_ps(load16(w + k), xv, a0);
        a1 = _mm512_fmadd_ps(load16(w + K + k), xv, a1);
        a2 = _mm512_fmadd_ps(load16(w + 2 * K + k), xv, a2);
        a3 = _mm512_fmadd_ps(load16(w + 3 * K + k), xv, a3);
    }
    s[0] = hsum(a0), s[1] = hsum(a1), s[2] = hsum(a2), s[3] = hsum(a3);
}
#endif

// An int8 projection, weight rows (N, K) with per-row scales: y[n] = bf16(scale[n] sum_k x[k] q[n, k]) + bias[n]
// (bias may be null); K % 16 == 0 (checked in Python). The int8 step's inputs are bf16-rounded.
struct Int8Rows {
    const int8_t* q;
    const float* scale;
    const float* bias;
    int64_t K, N;
    static constexpr bool kRoundInput = true;
    static constexpr int64_t kAlign = 1;

    void operator()(const float* x, float* y, int64_t n0, int64_t n1) const {
        int64_t n = n0;
#if defined(__AVX512F__)
        for (; n + 4 <= n1; n += 4) {
            float s[4];
            four_rows(x, q + n * K, K, s);
            for (int j = 0; j < 4; ++j) y[n + j] = bf16_round(s[j] * scale[n + j]) + (bias ? bias[n + j] : 0.f);
        }
#endif
        for (; n < n1; ++n) {
            const int8_t* wr = q + n * K;
            float acc[16] = {0};  // the vector path's lanes and its reduction tree, so no row depends on the split
            for (int64_t k = 0; k < K; k += 16)
                for (int j = 0; j < 16; ++j) acc[j] = std::fma(static_cast<float>(wr[k + j]), x[k + j], acc[j]);
            for (int w = 8; w >= 1; w /= 2)
                for (int j = 0; j < w; ++j) acc[j] += acc[j + w];
            y[n] = bf16_round(acc[0] * scale[n]) + (bias ? bias[n] : 0.f);
        }
    }

    void many(const float* x, float* y, int64_t T, int64_t n0, int64_t n1) const {
        for (int64_t t = 0; t < T; ++t) (*this)(x + t * K, y + t * N, n0, n1);
    }
};

// An fp32 projection over weight rows (N, K) (the transpose of Conv1D's), y[n] = <x, rows[n]> + bias[n]: rows
// stream in order. The vocabulary head is one (the tied embedding's rows, no bias).
struct Fp32RowsT {
    const float* rows;
    const float* bias;
    int64_t K, N;
    static constexpr bool kRoundInput = false;
    static constexpr int64_t kAlign = 1;

    // one row at a time: a single stream per thread, which the hardware prefetcher follows from DRAM better than four
    // interleaved ones (the head is read cold, after a token's blocks evicted it; on this machine the default model's
    // head took about two thirds of the time); dot is four_rows' sum, so no value changes
    void operator()(const float* x, float* y, int64_t n0, int64_t n1) const {
        for (int64_t n = n0; n < n1; ++n) y[n] = dot(x, rows + n * K, K) + (bias ? bias[n] : 0.f);
    }

    // many rows: x (T, K) -> y (T, N), outputs [n0, n1): each weight row read once for all T, four inputs' sums in
    // flight at a time (one sum each is a chain of dependent adds); each sum is dot's, lane for lane, so every output
    // is the single-row path's bit for bit
    void many(const float* x, float* y, int64_t T, int64_t n0, int64_t n1) const {
        for (int64_t n = n0; n < n1; ++n) {
            const float* r = rows + n * K;
            const float b = bias ? bias[n] : 0.f;
            int64_t t = 0;
#if defined(__AVX512F__)
            if (K % 16 == 0)
                for (; t + 4 <= T; t += 4) {
                    __m512 a[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
                    for (int64_t k = 0; k < K; k += 16) {
                        const __m512 w = _mm512_loadu_ps(r + k);
                        for (int j = 0; j < 4; ++j) a[j] = _mm512_fmadd_ps(_mm512_loadu_ps(x + (t + j) * K + k), w, a[j]);
                    }
                    for (int j = 0; j < 4; ++j) y[(t + j) * N + n] = hsum(a[j]) + b;
                }
#endif
            for (; t < T; ++t) y[t * N + n] = dot(x + t * K, r, K) + b;
        }
    }
};

// Y = P(X) for T rows (T, K) -> (T, N), split across torch's threads by output; each output as `project` computes it
template <class P>
void project_rows(const P& p, const float* x, float* y, int64_t T) {
    const int64_t half = (p.N + 1) / 2;
    const int64_t grain = std::max<int64_t>(16, (half + 15) / 16 * 16);
    at::parallel_for(0, p.N, grain, [&](int64_t n0, int64_t n1) {
        p.many(x, y, T, n0, n1);
    });
}

// y = P(x) over all N outputs, split across torch's threads in chunks of whole vectors
template <class P>
void project(const P& p, const float* x, float* y) {
    const int64_t half = (p.N + 1) / 2;
    const int64_t grain = std::max<int64_t>(64, (half + P::kAlign - 1) / P::kAlign * P::kAlign);
    at::parallel_for(0, p.N, grain, [&](int64_t n0, int64_t n1) { p(x, y, n0, n1); });
}

}  // namespace ee
