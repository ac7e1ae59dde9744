// Where a native single-token call's time goes, phase by phase (experiments/decode_profile.py reads it): torch's
// profiler sees one aten op per token on the native step, so the step times its own phases. Off unless switched on
// (Step::set_profiling); a scope's cost when off is one relaxed atomic load. Atomics, so calls from several threads
// add up; a phase that runs a parallel region (a projection split over the pool) counts its wall time on the
// calling thread.
#pragma once

#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

namespace ee {

enum Phase : int {
    kLayerNorms,      // ln_1 and ln_2 of every block
    kQkv,             // the QKV projection
    kAttention,       // writing the K/V and attending over the cache
    kOutProjection,   // attention's output projection and its residual add
    kMlpUp,           // the MLP's first projection and its activation
    kMlpDown,         // the MLP's second projection and its residual add
    kCheck,           // the controller's stop/exit/continue classifier
    kExitHead,        // an exit head's layer norm, adapter and vocabulary projection (and its confidence test)
    kStateCopy,       // the skipped blocks' K/V from the exit state
    kFinalHead,       // ln_f and the vocabulary projection after the last block
    kPhases
};

inline const char* phase_name(int p) {
    static const char* names[kPhases] = {"layer norms", "QKV projection", "attention (K/V write, softmax, weighted sum)",
                                         "output projection", "MLP up + activation", "MLP down", "controller check",
                                         "exit head", "state copy", "final head (ln_f + vocabulary)"};
    return names[p];
}

struct Phases {
    std::array<std::atomic<int64_t>, kPhases> ns, calls;
    std::atomic<bool> on{false};

    Phases() { reset(); }

    void reset() {
        for (int p = 0; p < kPhases; ++p) ns[p].store(0), calls[p].store(0);
    }

    // (phase, ms, calls) since profiling was last switched on
    std::vector<std::tuple<std::string, double, int64_t>> read() const {
        std::vector<std::tuple<std::string, double, int64_t>> out;
        for (int p = 0; p < kPhases; ++p) out.emplace_back(phase_name(p), ns[p].load() / 1e6, calls[p].load());
        return out;
    }
};

// times its scope into phase p while profiling is on
class Timed {
    using Clock = std::chrono::steady_clock;

  public:
    Timed(Phases& phases, int p) : phases_(phases.on.load(std::memory_order_relaxed) ? &phases : nullptr), p_(p) {
        if (phases_) t0_ = Clock::now();
    }
    ~Timed() {
        if (!phases_) return;
        const auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - t0_).count();
        phases_->ns[p_].fetch_add(ns, std::memory_order_relaxed);
        phases_->calls[p_].fetch_add(1, std::memory_order_relaxed);
    }
    Timed(const Timed&) = delete;
    Timed& operator=(const Timed&) = delete;

  private:
    Phases* phases_;
    int p_;
    Clock::time_point t0_{};
};

}  // namespace ee
