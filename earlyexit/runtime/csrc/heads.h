// The exit heads on the native step (included by step.cpp): the int8 reranked vocabulary head an fp32 model's exits
// take their logits from (RerankedHead, quantize.RerankedHead's C++ half) and the stop/exit/continue controller with
// the exit heads' hidden states and confidence (Controller, what ExitDecisions decides, asked inside Step::decide and
// Step::window_checked).
#pragma once

#include <torch/extension.h>

#include <algorithm>
#include <vector>

#include "ops.h"

namespace ee {

inline const float* f32(const torch::Tensor& t) { return t.data_ptr<float>(); }

// torch.argmax: the first largest, NaN above everything
inline int64_t argmax(const float* out, int64_t n) {
    int64_t b = 0;
    for (int64_t i = 1; i < n; ++i)
        if (!std::isnan(out[b]) && (out[i] > out[b] || std::isnan(out[i]))) b = i;
    return b;
}

// Logits (V) of a normed hidden z (d) through int8 rows, the `rerank` largest rescored with the fp32 rows (V, d): the
// fp32 head's argmax whenever its winner is among them (Int8GPT2.project, RerankedHead). best: the argmax of the
// rescored candidates (greedy's token), where asked.
inline void reranked_head(const Int8Rows& head, const float* rows, int64_t rerank, const float* z, float* out, int64_t* best) {
    const int64_t d = head.K, V = head.N;
    std::vector<float> zb(d);
    for (int64_t i = 0; i < d; ++i) zb[i] = bf16_round(z[i]);
    project(head, zb.data(), out);
    const int64_t r = std::min<int64_t>(rerank, V);
    if (r == 0) {
        if (best) *best = argmax(out, V);
        return;
    }
    std::vector<int64_t> idx(V);
    for (int64_t n = 0; n < V; ++n) idx[n] = n;
    auto key = [&](int64_t a) { return std::isnan(out[a]) ? -INFINITY : out[a]; };  // a strict weak order with NaN
    auto larger = [&](int64_t a, int64_t b) { return key(a) > key(b) || (key(a) == key(b) && a < b); };
    std::partial_sort(idx.begin(), idx.begin() + r, idx.end(), larger);
    float top = -INFINITY;
    for (int64_t j = 0; j < r; ++j) {
        out[idx[j]] = dot(rows + idx[j] * d, z, d);
        if (best && out[idx[j]] > top) top = out[idx[j]], *best = idx[j];
    }
    if (best && !(top > -INFINITY)) *best = idx[0];  // NaN logits: the int8 head's own top
}

inline torch::Tensor checked_rows(const torch::Tensor& z, int64_t d) {
    TORCH_CHECK(z.device().is_cpu() && z.scalar_type() == torch::kFloat && z.is_contiguous() && z.numel() == d,
                "the hidden state must be a contiguous fp32 CPU tensor of n_embd values");
    return z;
}

// An fp32 model's exit head on the CPU (RerankedHead): the tied head's int8 rows, the top `rerank` rescored in fp32
class RerankedHead {
  public:
    RerankedHead(torch::Tensor q, torch::Tensor scale, torch::Tensor rows, int64_t rerank)
        : q_(q), scale_(scale), rows_(rows), rerank_(rerank) {
        TORCH_CHECK(q.scalar_type() == torch::kChar && q.is_contiguous() && q.dim() == 2 && q.size(1) % 16 == 0,
                    "int8 rows must be contiguous (N, K) with K % 16 == 0");
        TORCH_CHECK(scale.numel() == q.size(0) && rows.sizes() == q.sizes() && rows.is_contiguous() &&
                        rows.scalar_type() == torch::kFloat, "one scale and one fp32 row per int8 row");
        head_ = {q.data_ptr<int8_t>(), f32(scale), nullptr, q.size(1), q.size(0)};
    }

    torch::Tensor logits(torch::Tensor z) const {  // z (1, d) normed -> (1, V)
        checked_rows(z, head_.K);
        torch::Tensor out = torch::empty({1, head_.N}, torch::kFloat);
        project(z.data_ptr<float>(), out.data_ptr<float>());
        return out;
    }

    void project(const float* z, float* out) const { reranked_head(head_, f32(rows_), rerank_, z, out, nullptr); }
    int64_t width() const { return head_.K; }
    int64_t vocab() const { return head_.N; }

  private:
    torch::Tensor q_, scale_, rows_;
    int64_t rerank_;
    Int8Rows head_;
};

// The stop/exit/continue controller of earlyexit.runtime.heads after a block, in C++ so that early exit on the
// native step is one call per token (EarlyExit.lean_step): probabilities = softmax(layer_norm(h) W^T + bias[layer,
// prev]) (ExitDecisions.lean_probs' ops, the sums in another order), the decision ExitDecisions.decide's: the first
// largest action, STOP above the stop threshold, EXIT above the exit threshold where allowed, else continue.
class Controller {
  public:
    static constexpr int64_t CONTINUE = 0, EXIT = 1, STOP = 2;  // earlyexit.runtime.heads' action order

    // ln (w, b, eps) and cls (3, d) the classifier's; bias (L, L + 1, 3) its whole bias per (layer, previous exit);
    // check[l]: ask after block l; allow_exit[l]: an exit may be decided there; thresholds compared in double
    // exit heads (ExitHeads.head_hidden): per layer below the last a layer norm (exit_ln_w, exit_ln_b (L - 1, d),
    // exit_eps) and a low-rank adapter (down (L - 1, r, d), up (L - 1, d, r); r = 0: none), projected by `exit_head`
    // (an fp32 model's int8 RerankedHead) or, where null, the step's own head. confidence[l] >= 0: under the
    // confidence rule a token leaves after block l when its exit head's max probability reaches it
    Controller(torch::Tensor ln_w, torch::Tensor ln_b, double eps, torch::Tensor cls, torch::Tensor bias,
               std::vector<bool> check, std::vector<bool> allow_exit, double exit_threshold, double stop_threshold,
               torch::Tensor exit_ln_w, torch::Tensor exit_ln_b, double exit_eps, torch::Tensor down, torch::Tensor up,
               std::vector<double> confidence, const RerankedHead* exit_head)
        : ln_w_(ln_w), ln_b_(ln_b), cls_(cls), bias_(bias), exit_ln_w_(exit_ln_w), exit_ln_b_(exit_ln_b), down_(down),
          up_(up), eps_(static_cast<float>(eps)), exit_eps_(static_cast<float>(exit_eps)), check_(std::move(check)),
          allow_exit_(std::move(allow_exit)), confidence_(std::move(confidence)), exit_threshold_(exit_threshold),
          stop_threshold_(stop_threshold), exit_head_(exit_head) {
        for (const auto* t : {&ln_w, &ln_b, &cls, &bias, &exit_ln_w, &exit_ln_b, &down, &up})
            TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == torch::kFloat && t->is_contiguous(),
                        "the controller's tensors must be contiguous fp32 CPU tensors");
        d_ = ln_w.numel();
        n_layer_ = static_cast<int64_t>(check_.size());
        TORCH_CHECK(ln_b.numel() == d_ && cls.dim() == 2 && cls.size(0) == 3 && cls.size(1) == d_,
                    "the controller's classifier must be (3, n_embd) with a layer norm of n_embd");
        TORCH_CHECK(bias.dim() == 3 && bias.size(0) == n_layer_ && bias.size(1) == n_layer_ + 1 && bias.size(2) == 3 &&
                        allow_exit_.size() == check_.size() && confidence_.size() == check_.size(),
                    "the controller's bias must be (L, L + 1, 3), one flag and one confidence per layer");
        TORCH_CHECK(exit_ln_w.numel() == (n_layer_ - 1) * d_ && exit_ln_b.numel() == (n_layer_ - 1) * d_,
                    "one exit layer norm of n_embd per layer below the last");
        rank_ = down.numel() ? down.size(1) : 0;
        TORCH_CHECK(!rank_ || (down.dim() == 3 && down.size(0) == n_layer_ - 1 && down.size(2) == d_ && up.dim() == 3 &&
                               up.size(0) == n_layer_ - 1 && up.size(1) == d_ && up.size(2) == rank_),
                    "the exit adapters must be (L - 1, r, d) and (L - 1, d, r)");
        TORCH_CHECK(!exit_head || exit_head->width() == d_, "the exit head does not match n_embd");
        TORCH_CHECK(!confidence_.empty() && confidence_.back() < 0, "no confidence exit after the last block");
    }

    int64_t n_layer() const { return n_layer_; }
    int64_t width() const { return d_; }
    bool checks(int64_t layer) const { return check_[layer]; }
    double confidence(int64_t layer) const { return confidence_[layer]; }
    const RerankedHead* exit_head() const { return exit_head_; }

    // the vector exit head `layer` projects (ExitHeads.head_hidden): z = LN_l(h), plus up_l (down_l z) with an adapter
    void hidden(const float* h, int64_t layer, float* z) const {
        layer_norm(h, f32(exit_ln_w_) + layer * d_, f32(exit_ln_b_) + layer * d_, exit_eps_, z, d_, false);
        if (!rank_) return;
        std::vector<float> t(rank_);
        const float* a = f32(down_) + layer * rank_ * d_;
        const float* b = f32(up_) + layer * d_ * rank_;
        for (int64_t j = 0; j < rank_; ++j) t[j] = dot(a + j * d_, z, d_);
        for (int64_t i = 0; i < d_; ++i) z[i] += dot(b + i * rank_, t.data(), rank_);
    }

    // the action probabilities of hidden state h (d) after block `layer`, the token before having run `prev` blocks
    void probs(const float* h, int64_t layer, int64_t prev, float p[3]) const {
        std::vector<float> z(d_);
        layer_norm(h, f32(ln_w_), f32(ln_b_), eps_, z.data(), d_, false);
        const float* b = f32(bias_) + (layer * (n_layer_ + 1) + prev) * 3;
        float top = -INFINITY;
        for (int j = 0; j < 3; ++j) top = std::max(top, p[j] = b[j] + dot(f32(cls_) + j * d_, z.data(), d_));
        float sum = 0.f;
        for (int j = 0; j < 3; ++j) sum += (p[j] = std::exp(p[j] - top));
        for (int j = 0; j < 3; ++j) p[j] /= sum;
    }

    int64_t decide(const float p[3], int64_t layer) const {
        int64_t action = 0;
        for (int j = 1; j < 3; ++j)
            if (p[j] > p[action]) action = j;
        if (action == STOP && static_cast<double>(p[STOP]) > stop_threshold_) return STOP;
        if (allow_exit_[layer] && action == EXIT && static_cast<double>(p[EXIT]) > exit_threshold_) return EXIT;
        return CONTINUE;
    }

    torch::Tensor probs_of(torch::Tensor h, int64_t layer, int64_t prev) const {  // (d,) -> (3,): for tests
        checked_rows(h, d_);
        TORCH_CHECK(0 <= layer && layer < n_layer_ && 0 <= prev && prev <= n_layer_, "layer or previous exit out of range");
        torch::Tensor out = torch::empty({3}, torch::kFloat);
        probs(h.data_ptr<float>(), layer, prev, out.data_ptr<float>());
        return out;
    }

  private:
    torch::Tensor ln_w_, ln_b_, cls_, bias_, exit_ln_w_, exit_ln_b_, down_, up_;
    float eps_, exit_eps_;
    std::vector<bool> check_, allow_exit_;
    std::vector<double> confidence_;
    double exit_threshold_, stop_threshold_;
    const RerankedHead* exit_head_;
    int64_t d_ = 0, n_layer_ = 0, rank_ = 0;
};

// softmax's largest probability of logits (n): 1 / sum e^(l - max) (NaN where a logit is)
inline float max_probability(const float* logits, int64_t n) {
    float top = -INFINITY;
    for (int64_t i = 0; i < n; ++i) top = std::max(top, logits[i]);
    float sum = 0.f;
    for (int64_t i = 0; i < n; ++i) sum += std::exp(logits[i] - top);
    return 1.f / sum;
}

}  // namespace ee
