// One token at batch 1 through an int8 GPT-2, in one call per run of blocks: earlyexit.runtime.native builds this
// file once per machine (torch.utils.cpp_extension, -O3 -march=native) and `NativeInt8Step` calls it.
//
// The arithmetic is LeanInt8Step's (earlyexit/runtime/lean_step.py), op for op: layer norms in fp32, every
// projection's input rounded to bf16, int8 rows times that input accumulated in fp32, times the row's scale,
// rounded to bf16, plus the fp32 bias; attention and the residual stream in fp32. What differs is the order of the
// fp32 sums (so a logit can move in its last bits) and what is not done: no dispatch, no temporaries, no aten call.
// At this model's size (d = 256) a token's ~600 aten calls cost more than its arithmetic; here a token is one call.
//
// Threads: the rows of each projection (and the heads of attention) are split over at::parallel_for, which is
// torch's own OpenMP pool (torch.set_num_threads). The GIL is released for the whole call; each call has its own
// scratch, so threads decoding with one model at once (each with its own cache) do not share any buffer.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

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

// y[n] = bf16(scale[n] * sum_k x[k] w[n, k]) + bias[n] for n in [n0, n1); K % 16 == 0 (checked in Python)
void rows_i8(const float* x, const int8_t* w, const float* scale, const float* bias, float* y, int64_t K, int64_t n0,
             int64_t n1) {
    int64_t n = n0;
#if defined(__AVX512F__)
    for (; n + 4 <= n1; n += 4) {
        const int8_t* w0 = w + n * K;
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
        for (int64_t k = 0; k < K; k += 16) {
            const __m512 xv = _mm512_loadu_ps(x + k);
            a0 = _mm512_fmadd_ps(load_i8(w0 + k), xv, a0);
            a1 = _mm512_fmadd_ps(load_i8(w0 + K + k), xv, a1);
            a2 = _mm512_fmadd_ps(load_i8(w0 + 2 * K + k), xv, a2);
            a3 = _mm512_fmadd_ps(load_i8(w0 + 3 * K + k), xv, a3);
        }
        y[n] = bf16_round(hsum(a0) * scale[n]);
        y[n + 1] = bf16_round(hsum(a1) * scale[n + 1]);
        y[n + 2] = bf16_round(hsum(a2) * scale[n + 2]);
        y[n + 3] = bf16_round(hsum(a3) * scale[n + 3]);
        if (bias)
            for (int j = 0; j < 4; ++j) y[n + j] += bias[n + j];
    }
#endif
    for (; n < n1; ++n) {
        const int8_t* wr = w + n * K;
        float acc[16] = {0};
        for (int64_t k = 0; k < K; k += 16)
            for (int j = 0; j < 16; ++j) acc[j] += x[k + j] * static_cast<float>(wr[k + j]);
        float s = 0.f;
        for (int j = 0; j < 16; ++j) s += acc[j];
        y[n] = bf16_round(s * scale[n]) + (bias ? bias[n] : 0.f);
    }
}

// the projection over all N rows, split across torch's threads (a grain of whole cache lines of output)
void gemv_i8(const float* x, const int8_t* w, const float* scale, const float* bias, float* y, int64_t K, int64_t N) {
    const int64_t grain = std::max<int64_t>(64, (N + 1) / 2);
    at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) { rows_i8(x, w, scale, bias, y, K, n0, n1); });
}

float dot(const float* a, const float* b, int64_t n) {
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

void layer_norm(const float* x, const float* w, const float* b, float eps, float* out, int64_t d, bool round) {
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

// in place: the MLP's activation, rounded to bf16 (the next projection's input); gelu's tanh approximation
// (F.gelu(approximate="tanh")) as x * sigmoid(2u) = x / (1 + e^-2u), u = sqrt(2 / pi) (x + 0.044715 x^3)
void activate(float* x, int64_t n, int act) {
    if (act == RELU) {
        for (int64_t i = 0; i < n; ++i) x[i] = bf16_round(std::max(x[i], 0.f));
        return;
    }
    constexpr float c = -2.f * 0.7978845608028654f;
    int64_t i = 0;
#if defined(__AVX512F__)
    for (; i + 16 <= n; i += 16) {
        const __m512 v = _mm512_loadu_ps(x + i);
        const __m512 u = _mm512_mul_ps(_mm512_set1_ps(c), _mm512_fmadd_ps(_mm512_mul_ps(_mm512_set1_ps(0.044715f), v), _mm512_mul_ps(v, v), v));
        _mm512_storeu_ps(x + i, _mm512_div_ps(v, _mm512_add_ps(_mm512_set1_ps(1.f), exp512(u))));
    }
#endif
    for (; i < n; ++i) x[i] = x[i] / (1.f + std::exp(c * (x[i] + 0.044715f * x[i] * x[i] * x[i])));
    for (i = 0; i < n; ++i) x[i] = bf16_round(x[i]);
}

// in place: p[0..n) -> e^(p - top), returning their sum
float exp_sum(float* p, int64_t n, float top) {
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

struct Scratch {  // one call's intermediate vectors (a few KB: allocated per call, so calls may run concurrently)
    std::vector<float> h, qkv, y, f;
    Scratch(int64_t d, int64_t inner) : h(d), qkv(3 * d), y(d), f(inner) {}
};

struct Layer {
    torch::Tensor ln1_w, ln1_b, qkv_q, qkv_s, qkv_b, proj_q, proj_s, proj_b, ln2_w, ln2_b, fc_q, fc_s, fc_b, mp_q, mp_s,
        mp_b;
    float attn_scale;
};

const float* f32(const torch::Tensor& t) { return t.data_ptr<float>(); }
const int8_t* i8(const torch::Tensor& t) { return t.data_ptr<int8_t>(); }

class Int8Step {
  public:
    Int8Step(std::vector<std::vector<torch::Tensor>> layers, std::vector<double> attn_scales, torch::Tensor lnf_w,
             torch::Tensor lnf_b, torch::Tensor head_q, torch::Tensor head_s, torch::Tensor head_rows, int64_t n_head,
             double eps, int64_t act, int64_t rerank)
        : lnf_w_(lnf_w), lnf_b_(lnf_b), head_q_(head_q), head_s_(head_s), head_rows_(head_rows), n_head_(n_head),
          eps_(static_cast<float>(eps)), act_(static_cast<int>(act)), rerank_(rerank) {
        TORCH_CHECK(layers.size() == attn_scales.size(), "one attention scale per layer");
        for (size_t i = 0; i < layers.size(); ++i) {
            auto& t = layers[i];
            TORCH_CHECK(t.size() == 16, "a layer is 16 tensors");
            layers_.push_back({t[0], t[1], t[2], t[3], t[4], t[5], t[6], t[7], t[8], t[9], t[10], t[11], t[12], t[13],
                               t[14], t[15], static_cast<float>(attn_scales[i])});
        }
        d_ = lnf_w.size(0);
        inner_ = layers_.empty() ? 0 : layers_[0].fc_q.size(0);
        vocab_ = head_q.size(0);
        hs_ = d_ / n_head_;
    }

    // blocks start..stop-1 on the residual stream x (d,) in place; K/V of each into cache k, v (L, B, nh, S, hs) row 0
    void blocks(torch::Tensor x, torch::Tensor k, torch::Tensor v, int64_t pos, int64_t start, int64_t stop) {
        check_stream(x);
        check_cache(k, v, pos);
        TORCH_CHECK(0 <= start && start <= stop && stop <= static_cast<int64_t>(layers_.size()), "blocks out of range");
        float* xs = x.data_ptr<float>();
        Scratch s(d_, inner_);
        for (int64_t i = start; i < stop; ++i) block(s, i, xs, k, v, pos);
    }

    // state copying into skipped block i: K, V = split(ln_1(h) W_kv + b_kv) at pos, through the int8 K/V rows
    void fill_kv(int64_t i, torch::Tensor h, torch::Tensor k, torch::Tensor v, int64_t pos) {
        check_stream(h);
        check_cache(k, v, pos);
        TORCH_CHECK(0 <= i && i < static_cast<int64_t>(layers_.size()), "block out of range");
        const Layer& L = layers_[i];
        const int64_t d = d_;
        Scratch s(d_, 0);
        layer_norm(h.data_ptr<float>(), f32(L.ln1_w), f32(L.ln1_b), eps_, s.h.data(), d, true);
        gemv_i8(s.h.data(), i8(L.qkv_q) + d * d, f32(L.qkv_s) + d, f32(L.qkv_b) + d, s.qkv.data() + d, d, 2 * d);
        write_kv(s, i, k, v, pos);
    }

    // next-token logits (1, V) after the last block: ln_f, the int8 head, its `rerank` largest rescored in fp32 (the
    // fp32 head's argmax whenever its winner is among them), as Int8GPT2.project
    torch::Tensor logits(torch::Tensor x) {
        check_stream(x);
        torch::Tensor out = torch::empty({1, vocab_}, torch::kFloat);
        project(x.data_ptr<float>(), out.data_ptr<float>(), nullptr);
        return out;
    }

    // the greedy token after the last block: the argmax of the rescored candidates, without a vocabulary of logits
    int64_t greedy(torch::Tensor x) {
        check_stream(x);
        std::vector<float> out(vocab_);
        int64_t best = 0;
        project(x.data_ptr<float>(), out.data(), &best);
        return best;
    }

  private:
    void project(const float* x, float* out, int64_t* best) const {
        const int64_t d = d_;
        std::vector<float> z(d), zb(d);
        layer_norm(x, f32(lnf_w_), f32(lnf_b_), eps_, z.data(), d, false);
        for (int64_t i = 0; i < d; ++i) zb[i] = bf16_round(z[i]);
        gemv_i8(zb.data(), i8(head_q_), f32(head_s_), nullptr, out, d, vocab_);
        const int64_t r = std::min<int64_t>(rerank_, vocab_);
        if (r == 0) {
            if (best) *best = std::max_element(out, out + vocab_) - out;
            return;
        }
        std::vector<int64_t> idx(vocab_);
        for (int64_t n = 0; n < vocab_; ++n) idx[n] = n;
        auto key = [&](int64_t a) { return std::isnan(out[a]) ? -INFINITY : out[a]; };  // a strict weak order even with NaN
        auto larger = [&](int64_t a, int64_t b) { return key(a) > key(b) || (key(a) == key(b) && a < b); };
        std::partial_sort(idx.begin(), idx.begin() + r, idx.end(), larger);
        const float* rows = f32(head_rows_);
        float top = -INFINITY;
        for (int64_t j = 0; j < r; ++j) {
            out[idx[j]] = dot(rows + idx[j] * d, z.data(), d);
            if (best && out[idx[j]] > top) top = out[idx[j]], *best = idx[j];
        }
        if (best && !(top > -INFINITY)) *best = idx[0];  // NaN logits: the int8 head's own top
    }

    void check_stream(const torch::Tensor& x) const {
        TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat && x.is_contiguous() && x.numel() == d_,
                    "the residual stream must be a contiguous fp32 CPU tensor of n_embd values");
    }

    void check_cache(const torch::Tensor& k, const torch::Tensor& v, int64_t pos) const {
        for (const auto* c : {&k, &v})
            TORCH_CHECK(c->device().is_cpu() && c->scalar_type() == torch::kFloat && c->dim() == 5 &&
                            c->size(0) == static_cast<int64_t>(layers_.size()) && c->size(2) == n_head_ &&
                            c->size(4) == hs_ && c->stride(4) == 1,
                        "the KV cache must be fp32 (L, B, nh, S, hs) on the CPU");
        TORCH_CHECK(0 <= pos && pos < k.size(3) && pos < v.size(3), "position ", pos, " outside the KV cache");
    }

    void write_kv(const Scratch& s, int64_t i, const torch::Tensor& k, const torch::Tensor& v, int64_t pos) {
        // cache (L, B, nh, S, hs), hs contiguous; row 0 of B (a server's row is a view starting at its row)
        float* kp = k.data_ptr<float>() + i * k.stride(0);
        float* vp = v.data_ptr<float>() + i * v.stride(0);
        for (int64_t h = 0; h < n_head_; ++h) {
            std::memcpy(kp + h * k.stride(2) + pos * k.stride(3), s.qkv.data() + d_ + h * hs_, hs_ * sizeof(float));
            std::memcpy(vp + h * v.stride(2) + pos * v.stride(3), s.qkv.data() + 2 * d_ + h * hs_, hs_ * sizeof(float));
        }
    }

    void attend(Scratch& s, int64_t i, const torch::Tensor& k, const torch::Tensor& v, int64_t pos, float scale) {
        const float* kp = k.data_ptr<float>() + i * k.stride(0);
        const float* vp = v.data_ptr<float>() + i * v.stride(0);
        const int64_t hs = hs_, ks = k.stride(3), vs = v.stride(3), kh = k.stride(2), vh = v.stride(2);
        at::parallel_for(0, n_head_, 1, [&](int64_t h0, int64_t h1) {
            std::vector<float> p(pos + 1);
            for (int64_t h = h0; h < h1; ++h) {
                const float* q = s.qkv.data() + h * hs;
                float top = -INFINITY;
                for (int64_t t = 0; t <= pos; ++t) {
                    p[t] = dot(q, kp + h * kh + t * ks, hs) * scale;
                    top = std::max(top, p[t]);
                }
                const float sum = exp_sum(p.data(), pos + 1, top);
                float* out = s.y.data() + h * hs;
                std::fill(out, out + hs, 0.f);
                for (int64_t t = 0; t <= pos; ++t) {
                    const float w = p[t] / sum;
                    const float* vr = vp + h * vh + t * vs;
                    for (int64_t j = 0; j < hs; ++j) out[j] += w * vr[j];
                }
            }
        });
    }

    void block(Scratch& s, int64_t i, float* x, const torch::Tensor& k, const torch::Tensor& v, int64_t pos) {
        const Layer& L = layers_[i];
        const int64_t d = d_;
        float *h = s.h.data(), *y = s.y.data();
        layer_norm(x, f32(L.ln1_w), f32(L.ln1_b), eps_, h, d, true);
        gemv_i8(h, i8(L.qkv_q), f32(L.qkv_s), f32(L.qkv_b), s.qkv.data(), d, 3 * d);
        write_kv(s, i, k, v, pos);
        attend(s, i, k, v, pos, L.attn_scale);
        for (int64_t j = 0; j < d; ++j) y[j] = bf16_round(y[j]);
        gemv_i8(y, i8(L.proj_q), f32(L.proj_s), f32(L.proj_b), h, d, d);
        for (int64_t j = 0; j < d; ++j) x[j] += h[j];
        layer_norm(x, f32(L.ln2_w), f32(L.ln2_b), eps_, h, d, true);
        gemv_i8(h, i8(L.fc_q), f32(L.fc_s), f32(L.fc_b), s.f.data(), d, inner_);
        activate(s.f.data(), inner_, act_);
        gemv_i8(s.f.data(), i8(L.mp_q), f32(L.mp_s), f32(L.mp_b), h, inner_, d);
        for (int64_t j = 0; j < d; ++j) x[j] += h[j];
    }

    std::vector<Layer> layers_;
    torch::Tensor lnf_w_, lnf_b_, head_q_, head_s_, head_rows_;
    int64_t n_head_, d_ = 0, inner_ = 0, vocab_ = 0, hs_ = 0;
    float eps_;
    int act_;
    int64_t rerank_;
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    namespace py = pybind11;
    py::class_<Int8Step>(m, "Int8Step")
        .def(py::init<std::vector<std::vector<torch::Tensor>>, std::vector<double>, torch::Tensor, torch::Tensor,
                      torch::Tensor, torch::Tensor, torch::Tensor, int64_t, double, int64_t, int64_t>())
        .def("blocks", &Int8Step::blocks, py::call_guard<py::gil_scoped_release>())
        .def("fill_kv", &Int8Step::fill_kv, py::call_guard<py::gil_scoped_release>())
        .def("logits", &Int8Step::logits, py::call_guard<py::gil_scoped_release>())
        .def("greedy", &Int8Step::greedy, py::call_guard<py::gil_scoped_release>());
}
