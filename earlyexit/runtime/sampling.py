"""How the next token is chosen from its scores: greedy (temperature 0, the default) or sampled.

Sampling follows transformers' order for `do_sample=True`: the scores divided by the
temperature, then nucleus (top-p) filtering (the smallest set of most likely tokens whose
probability reaches `top_p`; the most likely token is always kept), then one draw from the
softmax. A `seed` makes the draws of one completion reproducible: each completion owns its
generator, so rows of a batch, or requests of a server, never share a random stream.

Lossless mode reproduces full mode's *greedy* tokens; it refuses a temperature above 0
(`check_sampling_policy`) rather than sampling from something that is not the full model's
distribution.
"""

from __future__ import annotations

import math

import torch

from ..errors import EarlyExitError

MAX_TEMPERATURE = 100.0  # past this every distribution is uniform to fp32 precision: a typo, not a choice


def check_sampling(temperature, top_p, seed) -> None:
    """One line naming the first value a sampler cannot take."""
    for name, value in (("temperature", temperature), ("top_p", top_p)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise EarlyExitError(f"{name} must be a finite number, got {value!r}")
    if not 0 <= temperature <= MAX_TEMPERATURE:
        raise EarlyExitError(f"temperature must be in [0, {MAX_TEMPERATURE:g}] (0: greedy), got {temperature!r}")
    if not 0 < top_p <= 1:
        raise EarlyExitError(f"top_p must be in (0, 1] (1: no nucleus filtering), got {top_p!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
        raise EarlyExitError(f"seed must be an integer in [0, 2**63), or None, got {seed!r}")


class Sampler:
    """Chooses one token from next-token scores (1, V): `argmax` at temperature 0, else a draw."""

    def __init__(self, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None):
        check_sampling(temperature, top_p, seed)
        self.temperature, self.top_p = float(temperature), float(top_p)
        self.generator = None
        if self.temperature > 0:
            self.generator = torch.Generator()
            if seed is None:
                self.generator.seed()  # a fresh, unpredictable stream
            else:
                self.generator.manual_seed(seed)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def probabilities(self, scores: torch.Tensor) -> torch.Tensor:
        """The distribution (V,) a draw is taken from: temperature, then top-p."""
        probs = torch.softmax(scores.reshape(-1).float() / self.temperature, dim=-1)
        if self.top_p < 1:
            sorted_probs, order = probs.sort(descending=True)
            before = sorted_probs.cumsum(0) - sorted_probs  # mass of the tokens more likely than each
            sorted_probs[before >= self.top_p] = 0  # the first token has 0 before it: always kept
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
            probs /= probs.sum()
        return probs

    def __call__(self, scores: torch.Tensor) -> int:
        if self.greedy:
            return int(scores.argmax(-1))
        probs = self.probabilities(scores)
        if not bool(torch.isfinite(probs).all()):
            raise EarlyExitError("the model's scores are not finite (NaN or infinity in the weights?): nothing to sample from")
        return int(torch.multinomial(probs.cpu(), 1, generator=self.generator))
