// One token at batch 1 through a GPT-2, in one call per run of blocks: earlyexit.runtime.native builds this file
// once per machine (torch.utils.cpp_extension, -O3 -march=native) and `NativeInt8Step` / `NativeFp32Step` call it.
//
// At the default model's size (d = 256) a token's ~600 aten calls cost more than its arithmetic; here a token is
// one call, with no dispatch, no temporaries and no aten op. The arithmetic is the lean steps'
// (earlyexit/runtime/lean_step.py), op for op:
// - Int8Step: layer norms in fp32, every projection's input rounded to bf16, int8 rows times that input summed in
//   fp32, times the row's scale, rounded to bf16, plus the fp32 bias; the head's top `rerank` rescored in fp32.
// - Fp32Step: fp32 throughout, each projection's weights as rows (out, in) (Conv1D's transposed, copied once by
//   NativeFp32Step: one stream per output, ~1.7x faster per token here than reading (in, out) columns), the tied head's rows.
// - Controller (csrc/heads.h): the exit heads' stop/exit/continue classifier (ExitDecisions.lean_probs and decide), asked inside
//   `decide` (one early-exit token in one call) and `window_checked` (lossless mode's verification with a stop check).
// - Phases (csrc/phases.h): where a single-token call's time goes, timed by the step itself while switched on.
// Attention and the residual stream are fp32 in both. What differs from torch is the order of the fp32 sums, so a
// value can move in its last bits (an int8 output by one bf16 step where it lands on a rounding boundary).
//
// Threads: the outputs of each projection (and the heads of attention) are split over at::parallel_for, torch's
// own OpenMP pool (torch.set_num_threads). The GIL is released for the whole call; each call has its own scratch,
// so threads decoding with one model at once (each with its own cache) share no buffer.

#include <torch/extension.h>

#include <type_traits>
#include <vector>

#include "heads.h"
#include "ops.h"
#include "phases.h"

namespace {

using namespace ee;


template <class P>
P projection(const std::vector<torch::Tensor>& t, size_t& at);

template <>
Int8Rows projection<Int8Rows>(const std::vector<torch::Tensor>& t, size_t& at) {  // int8 rows (N, K), scales, bias
    const auto &q = t[at], &s = t[at + 1], &b = t[at + 2];
    at += 3;
    TORCH_CHECK(q.scalar_type() == torch::kChar && q.is_contiguous() && q.dim() == 2 && q.size(1) % 16 == 0,
                "int8 rows must be contiguous (N, K) with K % 16 == 0");
    TORCH_CHECK(s.numel() == q.size(0) && b.numel() == q.size(0), "one scale and one bias per int8 row");
    return {q.data_ptr<int8_t>(), f32(s), f32(b), q.size(1), q.size(0)};
}

template <>
Fp32RowsT projection<Fp32RowsT>(const std::vector<torch::Tensor>& t, size_t& at) {  // weight rows (N, K), bias
    const auto &w = t[at], &b = t[at + 1];
    at += 2;
    TORCH_CHECK(w.scalar_type() == torch::kFloat && w.dim() == 2 && w.is_contiguous(), "fp32 weight rows must be contiguous (N, K)");
    TORCH_CHECK(b.numel() == w.size(0), "one bias per output");
    return {f32(w), f32(b), w.size(1), w.size(0)};
}

// the K/V outputs d..3d of a layer's QKV projection (state copying)
Int8Rows kv_part(const Int8Rows& p, int64_t d) { return {p.q + d * p.K, p.scale + d, p.bias + d, p.K, 2 * d}; }
Fp32RowsT kv_part(const Fp32RowsT& p, int64_t d) { return {p.rows + d * p.K, p.bias + d, p.K, 2 * d}; }

template <class P>
struct Layer {
    const float *ln1_w, *ln1_b, *ln2_w, *ln2_b;
    P qkv, proj, fc, mp, kv;
    float attn_scale;
};

struct Scratch {  // one call's intermediate vectors (a few KB: allocated per call, so calls may run concurrently)
    std::vector<float> h, qkv, y, f;
    Scratch(int64_t d, int64_t inner) : h(d), qkv(3 * d), y(d), f(inner) {}
};

// positions x head size x heads of one token's attention at and above which its heads run on several threads:
// below it (the default model: under 64 positions) a thread's share is a few µs, about what waking the pool costs,
// and the int8 step's attention at 20 positions took a third of the time on one thread (csrc/phases.h, this machine)
constexpr int64_t kParallelAttention = 16384;

template <class P>
class Step {
    static constexpr bool kInt8 = std::is_same_v<P, Int8Rows>;
    static constexpr bool kRound = P::kRoundInput;

  public:
    // layers: per block ln_1 (w, b), the QKV and output projections, ln_2 (w, b), the MLP's two projections, each
    // projection's tensors as `projection<P>` reads them; head: int8 (rows, scales, fp32 rows) or fp32 (rows)
    Step(std::vector<std::vector<torch::Tensor>> layers, std::vector<double> attn_scales, torch::Tensor lnf_w,
         torch::Tensor lnf_b, std::vector<torch::Tensor> head, int64_t n_head, double eps, int64_t act, int64_t rerank)
        : n_head_(n_head), eps_(static_cast<float>(eps)), act_(static_cast<int>(act)), rerank_(rerank) {
        TORCH_CHECK(!layers.empty() && layers.size() == attn_scales.size(), "one attention scale per layer");
        d_ = lnf_w.size(0);
        TORCH_CHECK(n_head > 0 && d_ % n_head == 0, "n_embd must divide into heads");
        hs_ = d_ / n_head_;
        keep(lnf_w), keep(lnf_b);
        lnf_w_ = f32(lnf_w), lnf_b_ = f32(lnf_b);
        for (size_t i = 0; i < layers.size(); ++i) {
            const auto& t = layers[i];
            for (const auto& x : t) keep(x);
            size_t at = 2;
            Layer<P> L{f32(t[0]), f32(t[1]), nullptr, nullptr, {}, {}, {}, {}, {}, static_cast<float>(attn_scales[i])};
            L.qkv = projection<P>(t, at);
            L.proj = projection<P>(t, at);
            L.ln2_w = f32(t[at]), L.ln2_b = f32(t[at + 1]);
            at += 2;
            L.fc = projection<P>(t, at);
            L.mp = projection<P>(t, at);
            TORCH_CHECK(at == t.size(), "a layer's tensors do not match its projections");
            TORCH_CHECK(L.qkv.K == d_ && L.qkv.N == 3 * d_ && L.proj.K == d_ && L.proj.N == d_ && L.fc.K == d_ &&
                            L.mp.K == L.fc.N && L.mp.N == d_, "a layer's projections do not match n_embd");
            L.kv = kv_part(L.qkv, d_);
            layers_.push_back(L);
        }
        inner_ = layers_[0].fc.N;
        for (const auto& x : head) keep(x);
        if constexpr (kInt8) {
            TORCH_CHECK(head.size() == 3, "an int8 head is its rows, their scales and the fp32 rows");
            head_ = {head[0].data_ptr<int8_t>(), f32(head[1]), nullptr, head[0].size(1), head[0].size(0)};
            rows_ = f32(head[2]);
        } else {
            TORCH_CHECK(head.size() == 1, "an fp32 head is its rows");
            head_ = {f32(head[0]), nullptr, head[0].size(1), head[0].size(0)};
        }
        TORCH_CHECK(head_.K == d_, "the head does not match n_embd");
        vocab_ = head_.N;
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

    // state copying into skipped block i: K, V = split(ln_1(h) W_kv + b_kv) at pos
    void fill_kv(int64_t i, torch::Tensor h, torch::Tensor k, torch::Tensor v, int64_t pos) {
        check_stream(h);
        check_cache(k, v, pos);
        TORCH_CHECK(0 <= i && i < static_cast<int64_t>(layers_.size()), "block out of range");
        Scratch s(d_, 0);
        Timed t(phases_, kStateCopy);
        copy_state(s, i, h.data_ptr<float>(), k, v, pos);
    }

    // next-token logits (1, V) after the last block: ln_f and the head (int8: its `rerank` largest rescored with the
    // fp32 rows, the fp32 head's argmax whenever its winner is among them, as Int8GPT2.project)
    torch::Tensor logits(torch::Tensor x) {
        check_stream(x);
        torch::Tensor out = torch::empty({1, vocab_}, torch::kFloat);
        Timed t(phases_, kFinalHead);
        head(x.data_ptr<float>(), out.data_ptr<float>(), nullptr);
        return out;
    }

    // one token's early exit (EarlyExit.lean_step) in one call: blocks from the first on the residual stream x (d,) in
    // place; after each block the controller where it checks, the exit head's confidence where it has a threshold;
    // on an exit the skipped blocks' K/V filled by state copying from x. out (1, V): the token's next-token logits
    // (EXIT: the exit head's, CONTINUE: the final head's after the last block; STOP: untouched). (blocks run, action)
    std::tuple<int64_t, int64_t> decide(torch::Tensor x, torch::Tensor k, torch::Tensor v, int64_t pos, int64_t prev,
                                        const Controller& c, torch::Tensor out) {
        check_stream(x);
        check_cache(k, v, pos);
        const int64_t L = static_cast<int64_t>(layers_.size());
        TORCH_CHECK(c.n_layer() == L && c.width() == d_, "the controller does not match the model");
        TORCH_CHECK(!c.exit_head() || c.exit_head()->vocab() == vocab_, "the exit head does not match the vocabulary");
        TORCH_CHECK(0 <= prev && prev <= L, "previous exit out of range");
        TORCH_CHECK(out.device().is_cpu() && out.scalar_type() == torch::kFloat && out.is_contiguous() && out.numel() == vocab_,
                    "the logits must be a contiguous fp32 CPU tensor of vocab_size values");
        float *xs = x.data_ptr<float>(), *o = out.data_ptr<float>();
        Scratch s(d_, inner_);
        auto leave = [&](int64_t i) {
            Timed t(phases_, kStateCopy);
            for (int64_t j = i + 1; j < L; ++j) copy_state(s, j, xs, k, v, pos);
            return std::tuple<int64_t, int64_t>{i + 1, Controller::EXIT};
        };
        for (int64_t i = 0; i < L; ++i) {
            block(s, i, xs, k, v, pos);
            if (c.checks(i)) {
                int64_t action;
                {
                    Timed t(phases_, kCheck);
                    float p[3];
                    c.probs(xs, i, prev, p);
                    action = c.decide(p, i);
                }
                if (action == Controller::STOP) return {i + 1, action};
                if (action == Controller::EXIT) {
                    {
                        Timed t(phases_, kExitHead);
                        exit_logits(c, i, xs, o);
                    }
                    return leave(i);
                }
            }
            if (c.confidence(i) >= 0) {
                bool sure;
                {
                    Timed t(phases_, kExitHead);
                    exit_logits(c, i, xs, o);
                    sure = static_cast<double>(max_probability(o, vocab_)) >= c.confidence(i);
                }
                if (sure) return leave(i);
            }
        }
        Timed t(phases_, kFinalHead);
        head(xs, o, nullptr);
        return {L, Controller::CONTINUE};
    }

    // T tokens at positions pos..pos+T-1 (x (T, d) in place, each row's K/V written) through every block, then the
    // head: logits (T, V), each row's those of the single-token step at its position, bit for bit (the same sums in
    // the same order, every weight read once for all T rows): lossless mode's verification of its drafts
    torch::Tensor window(torch::Tensor x, torch::Tensor k, torch::Tensor v, int64_t pos) {
        return window_impl(x, k, v, pos, nullptr, nullptr);
    }

    // `window` from block `start` on: x (T, d) the residual streams after block start-1, whose K/V below `start` are
    // in the cache already (self-speculation's verification: its drafts ran blocks 0..start-1 on the same step)
    torch::Tensor window_from(torch::Tensor x, torch::Tensor k, torch::Tensor v, int64_t pos, int64_t start) {
        TORCH_CHECK(0 <= start && start <= static_cast<int64_t>(layers_.size()), "window start out of range");
        return window_impl(x, k, v, pos, nullptr, nullptr, start);
    }

    // `window`, the controller asked after every block it checks at every position (as after a full-depth token):
    // (logits (T, V), stops (T,) whether it stops there): lossless mode's verification with a stop threshold
    std::tuple<torch::Tensor, torch::Tensor> window_checked(torch::Tensor x, torch::Tensor k, torch::Tensor v, int64_t pos,
                                                            const Controller& c) {
        TORCH_CHECK(c.n_layer() == static_cast<int64_t>(layers_.size()) && c.width() == d_, "the controller does not match the model");
        torch::Tensor stops = torch::zeros({x.dim() == 2 ? x.size(0) : 0}, torch::kBool);
        torch::Tensor logits = window_impl(x, k, v, pos, &c, stops.data_ptr<bool>());
        return {logits, stops};
    }

  private:
    torch::Tensor window_impl(torch::Tensor x, torch::Tensor k, torch::Tensor v, int64_t pos, const Controller* c, bool* stops,
                              int64_t start = 0) {
        TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat && x.is_contiguous() && x.dim() == 2 &&
                        x.size(0) >= 1 && x.size(1) == d_, "a window must be a contiguous fp32 CPU tensor (T, n_embd)");
        const int64_t T = x.size(0), d = d_;
        check_cache(k, v, pos);
        check_cache(k, v, pos + T - 1);
        std::vector<float> h(T * d), qkv(T * 3 * d), y(T * d), f(T * inner_);
        float* xs = x.data_ptr<float>();
        for (size_t i = static_cast<size_t>(start); i < layers_.size(); ++i) {
            const Layer<P>& L = layers_[i];
            for (int64_t t = 0; t < T; ++t) layer_norm(xs + t * d, L.ln1_w, L.ln1_b, eps_, h.data() + t * d, d, kRound);
            project_rows(L.qkv, h.data(), qkv.data(), T);
            for (int64_t t = 0; t < T; ++t) write_kv(qkv.data() + t * 3 * d, i, k, v, pos + t);
            for (int64_t t = 0; t < T; ++t) attend(qkv.data() + t * 3 * d, y.data() + t * d, i, k, v, pos + t, L.attn_scale);
            if constexpr (kRound)
                for (auto& e : y) e = bf16_round(e);
            project_rows(L.proj, y.data(), h.data(), T);
            for (int64_t j = 0; j < T * d; ++j) xs[j] += h[j];
            for (int64_t t = 0; t < T; ++t) layer_norm(xs + t * d, L.ln2_w, L.ln2_b, eps_, h.data() + t * d, d, kRound);
            project_rows(L.fc, h.data(), f.data(), T);
            for (int64_t t = 0; t < T; ++t) activate(f.data() + t * inner_, inner_, act_, kRound);  // per row, as one token
            project_rows(L.mp, f.data(), h.data(), T);
            for (int64_t j = 0; j < T * d; ++j) xs[j] += h[j];
            if (c && c->checks(static_cast<int64_t>(i)))
                for (int64_t t = 0; t < T; ++t) {
                    float p[3];
                    c->probs(xs + t * d, static_cast<int64_t>(i), c->n_layer(), p);
                    stops[t] = stops[t] || c->decide(p, static_cast<int64_t>(i)) == Controller::STOP;
                }
        }
        torch::Tensor out = torch::empty({T, vocab_}, torch::kFloat);
        float* o = out.data_ptr<float>();
        std::vector<float> z(T * d);
        for (int64_t t = 0; t < T; ++t) layer_norm(xs + t * d, lnf_w_, lnf_b_, eps_, z.data() + t * d, d, false);
        if constexpr (kInt8) {
            for (int64_t t = 0; t < T; ++t) reranked_head(head_, rows_, rerank_, z.data() + t * d, o + t * vocab_, nullptr);
        } else {
            project_rows(head_, z.data(), o, T);
        }
        return out;
    }

  public:
    // logits (1, V) of a hidden state already normed (an exit head's): the head alone, without ln_f
    torch::Tensor project_normed(torch::Tensor z) {
        checked_rows(z, d_);
        torch::Tensor out = torch::empty({1, vocab_}, torch::kFloat);
        head_normed(z.data_ptr<float>(), out.data_ptr<float>(), nullptr);
        return out;
    }

    // the greedy token after the last block, without returning a vocabulary of logits (int8: the argmax of the
    // rescored candidates; fp32: the first largest logit, as torch.argmax)
    int64_t greedy(torch::Tensor x) {
        check_stream(x);
        std::vector<float> out(vocab_);
        int64_t best = 0;
        Timed t(phases_, kFinalHead);
        head(x.data_ptr<float>(), out.data(), &best);
        return best;
    }

    // switch the phase timer on (from zero) or off; phases(): (phase, ms, calls) since it was switched on
    void set_profiling(bool on) {
        if (on) phases_.reset();
        phases_.on.store(on);
    }
    std::vector<std::tuple<std::string, double, int64_t>> phases() const { return phases_.read(); }

  private:
    void keep(const torch::Tensor& t) {
        TORCH_CHECK(t.device().is_cpu(), "the native step runs on the CPU");
        TORCH_CHECK(t.scalar_type() != torch::kFloat || t.stride(-1) == 1, "fp32 tensors must be contiguous in their last dim");
        kept_.push_back(t);
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

    void head(const float* x, float* out, int64_t* best) const {
        std::vector<float> z(d_);
        layer_norm(x, lnf_w_, lnf_b_, eps_, z.data(), d_, false);
        head_normed(z.data(), out, best);
    }

    void head_normed(const float* z, float* out, int64_t* best) const {
        if constexpr (kInt8) {
            reranked_head(head_, rows_, rerank_, z, out, best);
        } else {
            project(head_, z, out);
            if (best) *best = argmax(out, vocab_);
        }
    }

    void write_kv(const float* qkv, int64_t i, const torch::Tensor& k, const torch::Tensor& v, int64_t pos) const {
        // cache (L, B, nh, S, hs), hs contiguous; row 0 of B (a server's row is a view starting at its row)
        float* kp = k.data_ptr<float>() + i * k.stride(0);
        float* vp = v.data_ptr<float>() + i * v.stride(0);
        for (int64_t h = 0; h < n_head_; ++h) {
            std::memcpy(kp + h * k.stride(2) + pos * k.stride(3), qkv + d_ + h * hs_, hs_ * sizeof(float));
            std::memcpy(vp + h * v.stride(2) + pos * v.stride(3), qkv + 2 * d_ + h * hs_, hs_ * sizeof(float));
        }
    }

    // one query per head against positions 0..pos of layer i's cache, softmax in fp32
    void attend(const float* qkv, float* y, int64_t i, const torch::Tensor& k, const torch::Tensor& v, int64_t pos,
                float scale) const {
        const float* kp = k.data_ptr<float>() + i * k.stride(0);
        const float* vp = v.data_ptr<float>() + i * v.stride(0);
        const int64_t hs = hs_, ks = k.stride(3), vs = v.stride(3), kh = k.stride(2), vh = v.stride(2);
        // heads split over the threads only where each thread's share outweighs waking the pool (a few µs)
        const int64_t grain = (pos + 1) * hs * n_head_ >= kParallelAttention ? 1 : n_head_;
        at::parallel_for(0, n_head_, grain, [&](int64_t h0, int64_t h1) {
            std::vector<float> p(pos + 1);
            for (int64_t h = h0; h < h1; ++h) {
                const float* q = qkv + h * hs;
                float top = -INFINITY;
                dots(q, kp + h * kh, ks, hs, pos + 1, p.data());
                for (int64_t t = 0; t <= pos; ++t) top = std::max(top, p[t] *= scale);
                const float sum = exp_sum(p.data(), pos + 1, top);
                weighted_sum(p.data(), pos + 1, 1.f / sum, vp + h * vh, vs, hs, y + h * hs);
            }
        });
    }

    // the logits (V) of exit head i of the controller's heads for hidden state h
    void exit_logits(const Controller& c, int64_t i, const float* h, float* out) const {
        std::vector<float> z(d_);
        c.hidden(h, i, z.data());
        if (c.exit_head())
            c.exit_head()->project(z.data(), out);
        else
            head_normed(z.data(), out, nullptr);
    }

    // state copying: block i's K/V at pos from hidden state h, split(ln_1(h) W_kv + b_kv)
    void copy_state(Scratch& s, int64_t i, const float* h, const torch::Tensor& k, const torch::Tensor& v, int64_t pos) const {
        const Layer<P>& L = layers_[i];
        layer_norm(h, L.ln1_w, L.ln1_b, eps_, s.h.data(), d_, kRound);
        project(L.kv, s.h.data(), s.qkv.data() + d_);
        write_kv(s.qkv.data(), i, k, v, pos);
    }

    void block(Scratch& s, int64_t i, float* x, const torch::Tensor& k, const torch::Tensor& v, int64_t pos) const {
        const Layer<P>& L = layers_[i];
        const int64_t d = d_;
        float *h = s.h.data(), *y = s.y.data();
        {
            Timed t(phases_, kLayerNorms);
            layer_norm(x, L.ln1_w, L.ln1_b, eps_, h, d, kRound);
        }
        {
            Timed t(phases_, kQkv);
            project(L.qkv, h, s.qkv.data());
        }
        {
            Timed t(phases_, kAttention);
            write_kv(s.qkv.data(), i, k, v, pos);
            attend(s.qkv.data(), y, i, k, v, pos, L.attn_scale);
            if constexpr (kRound)
                for (int64_t j = 0; j < d; ++j) y[j] = bf16_round(y[j]);
        }
        {
            Timed t(phases_, kOutProjection);
            project(L.proj, y, h);
            for (int64_t j = 0; j < d; ++j) x[j] += h[j];
        }
        {
            Timed t(phases_, kLayerNorms);
            layer_norm(x, L.ln2_w, L.ln2_b, eps_, h, d, kRound);
        }
        {
            Timed t(phases_, kMlpUp);
            project(L.fc, h, s.f.data());
            activate(s.f.data(), inner_, act_, kRound);
        }
        Timed t(phases_, kMlpDown);
        project(L.mp, s.f.data(), h);
        for (int64_t j = 0; j < d; ++j) x[j] += h[j];
    }

    std::vector<Layer<P>> layers_;
    std::vector<torch::Tensor> kept_;  // every tensor read through a pointer, alive as long as this step
    std::conditional_t<kInt8, Int8Rows, Fp32RowsT> head_;
    const float *rows_ = nullptr, *lnf_w_ = nullptr, *lnf_b_ = nullptr;
    int64_t n_head_, d_ = 0, inner_ = 0, vocab_ = 0, hs_ = 0;
    float eps_;
    int act_;
    int64_t rerank_;
    mutable Phases phases_;  // off unless set_profiling(true): the const steps add to it
};

template <class P>
void bind(pybind11::module& m, const char* name) {
    namespace py = pybind11;
    using S = Step<P>;
    py::class_<S>(m, name)
        .def(py::init<std::vector<std::vector<torch::Tensor>>, std::vector<double>, torch::Tensor, torch::Tensor,
                      std::vector<torch::Tensor>, int64_t, double, int64_t, int64_t>())
        .def("blocks", &S::blocks, py::call_guard<py::gil_scoped_release>())
        .def("fill_kv", &S::fill_kv, py::call_guard<py::gil_scoped_release>())
        .def("logits", &S::logits, py::call_guard<py::gil_scoped_release>())
        .def("project", &S::project_normed, py::call_guard<py::gil_scoped_release>())
        .def("window", &S::window, py::call_guard<py::gil_scoped_release>())
        .def("window_from", &S::window_from, py::call_guard<py::gil_scoped_release>())
        .def("window_checked", &S::window_checked, py::call_guard<py::gil_scoped_release>())
        .def("decide", &S::decide, py::call_guard<py::gil_scoped_release>())
        .def("greedy", &S::greedy, py::call_guard<py::gil_scoped_release>())
        .def("set_profiling", &S::set_profiling)
        .def("phases", &S::phases);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    bind<Int8Rows>(m, "Int8Step");
    bind<Fp32RowsT>(m, "Fp32Step");
    pybind11::class_<Controller>(m, "Controller")
        .def(pybind11::init<torch::Tensor, torch::Tensor, double, torch::Tensor, torch::Tensor, std::vector<bool>,
                            std::vector<bool>, double, double, torch::Tensor, torch::Tensor, double, torch::Tensor,
                            torch::Tensor, std::vector<double>, const RerankedHead*>(),
             pybind11::keep_alive<1, 17>())  // the controller holds the exit head it projects with
        .def("probs", &Controller::probs_of);
    pybind11::class_<RerankedHead>(m, "RerankedHead")
        .def(pybind11::init<torch::Tensor, torch::Tensor, torch::Tensor, int64_t>())
        .def("logits", &RerankedHead::logits, pybind11::call_guard<pybind11::gil_scoped_release>());
}
