"""Greedy decoding over our GPT-2 runtime, in named phases: prefill, decode_one_token, complete.

`complete` takes a prompt string (or token ids) and returns a `Completion` that says what
was written, why it ended and how long each phase took. It accepts transformers'
`LogitsProcessorList` and `StoppingCriteriaList`, so code written for `model.generate`
carries over.

Context policy: a prompt whose tokens plus `max_new_tokens` exceed the model's context is
refused with an error naming the sizes, unless `truncate_prompt=True`, which keeps the
prompt's last tokens (the end is what a completion continues) and warns.
"""

from __future__ import annotations

import operator
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Sequence

import torch

from ..errors import EarlyExitError
from .model import GPT2, KVCache
from .ngram_cache import SKIP_RECENT, cached_scores, check_skip_recent, check_weight
from .policies import FullDepth, SpeculativePolicy, check_policy
from .repetition import loop_tail
from .sampling import Sampler, check_sampling

# "stop": the controller halted; "repetition": the tail repeated a line, block or phrase (earlyexit.runtime.repetition), cut to one copy
FINISH_REASONS = ("eos", "max_tokens", "stop", "stop_string", "repetition", "stopping_criteria")


@dataclass
class GenerationSettings:
    """What a completion may do. Validated here, so every front end reports the same errors."""

    max_new_tokens: int = 64
    stop_strings: Sequence[str] = ()
    truncate_prompt: bool = False
    token_healing: bool = False  # back off a prompt's partial word and make the new tokens write it again first (earlyexit.runtime.healing)
    healing_mode: str = "word"  # "word": the whole partial word; "token": the last token only, as earlier versions (earlyexit.runtime.healing)
    stop_on_repetition: bool = False  # end a completion that loops, keeping one copy of the loop (earlyexit.runtime.repetition)
    cache_weight: float = 0.0  # blend weight of the n-gram cache over the prompt, truncated part included; 0: off (earlyexit.runtime.ngram_cache)
    cache_skip_recent: int = SKIP_RECENT  # the cache does not search the last this many tokens (earlyexit.runtime.ngram_cache)
    temperature: float = 0.0  # 0: greedy; above 0 each token is drawn (earlyexit.runtime.sampling)
    top_p: float = 1.0  # nucleus sampling's probability mass; 1: off
    seed: int | None = None  # the draws' seed, for a reproducible sampled completion; None: a fresh one each completion

    def __post_init__(self):
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise EarlyExitError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if isinstance(self.stop_strings, str):  # one stop string, as transformers reads a str (not its characters)
            self.stop_strings = (self.stop_strings,)
        if not isinstance(self.stop_strings, (list, tuple)) or any(not isinstance(s, str) for s in self.stop_strings):
            raise EarlyExitError(f"stop_strings must be a string or a list of strings, got {self.stop_strings!r}")
        if any(not s for s in self.stop_strings):
            raise EarlyExitError("stop strings must be non-empty")
        for s in self.stop_strings:
            check_text(s, "a stop string")
        from .healing import HEALING_MODES

        if self.healing_mode not in HEALING_MODES:
            raise EarlyExitError(f"healing_mode must be one of {HEALING_MODES}, got {self.healing_mode!r}")
        check_weight(self.cache_weight)
        check_skip_recent(self.cache_skip_recent)
        check_sampling(self.temperature, self.top_p, self.seed)


@dataclass
class Completion:
    """One finished completion and how it was made."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str
    exit_layers: list[int]  # per generated token, the number of blocks it went through
    prefill_ms: float
    token_ms: list[float] = field(default_factory=list)  # per generated token after the first (see `per_kept_token`)
    prompt_truncated_tokens: int = 0
    speculation: dict = field(default_factory=dict)  # lossless mode: drafted, accepted, acceptance rate, rounds
    healed_prefix: str = ""  # token healing: the prompt's backed-off end, rewritten by the first token

    @property
    def mean_layers(self) -> float:
        return sum(self.exit_layers) / max(1, len(self.exit_layers))

    @property
    def total_ms(self) -> float:
        return self.prefill_ms + sum(self.token_ms)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean_layers"] = self.mean_layers
        d["total_ms"] = self.total_ms
        return d


MAX_PROMPT_CHARS = 4 * 1024 * 1024  # a prompt this long is ~1M tokens: far past any context, and seconds to tokenize


def check_text(text: str, what: str = "prompt") -> None:
    """Text the tokenizer can take: non-empty, bounded, and valid Unicode (no lone surrogate, which a non-UTF-8 argv
    or `errors="surrogateescape"` leaves in a str)."""
    if not text:
        raise EarlyExitError(f"{what} is empty: give at least one character" + (" of code to complete" if what == "prompt" else ""))
    if len(text) > MAX_PROMPT_CHARS:
        raise EarlyExitError(f"{what} has {len(text):,} characters, more than the {MAX_PROMPT_CHARS:,} accepted")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise EarlyExitError(f"{what} is not valid text: character {e.start} is a lone surrogate "
                             f"({text[e.start]!r}; was it read from bytes that are not UTF-8?)") from None


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    if not isinstance(prompt, str):
        raise EarlyExitError(f"prompt must be a string, got {type(prompt).__name__}")
    check_text(prompt)
    return tokenizer.encode(prompt, add_special_tokens=False)


def prompt_ids(tokenizer, model: GPT2, prompt) -> list[int]:
    """The prompt as token ids: a str is encoded; a sequence of ints is taken as ids, each checked against the
    vocabulary. Anything else (bytes among them, which would otherwise read as ids) is refused."""
    if isinstance(prompt, str):
        return encode_prompt(tokenizer, prompt)
    if isinstance(prompt, (bytes, bytearray, memoryview)):
        raise EarlyExitError(f"prompt must be a str or a sequence of token ids, got {type(prompt).__name__} (decode it first)")
    if isinstance(prompt, torch.Tensor):
        if prompt.dim() > 1 and prompt.shape[0] == 1:
            prompt = prompt[0]
        if prompt.dim() != 1 or prompt.dtype.is_floating_point or prompt.dtype == torch.bool:
            raise EarlyExitError(f"a tensor prompt must be 1-D integer token ids, got shape {tuple(prompt.shape)} {prompt.dtype}")
        prompt = prompt.tolist()
    try:
        ids = list(prompt)
    except TypeError:
        raise EarlyExitError(f"prompt must be a str or a sequence of token ids, got {type(prompt).__name__}") from None
    vocab = model.dims.vocab_size
    out = []
    for i, t in enumerate(ids):
        try:
            if isinstance(t, bool):
                raise TypeError
            t = operator.index(t)
        except TypeError:
            raise EarlyExitError(f"token id {i} of the prompt is {type(t).__name__} {t!r}, not an integer") from None
        if not 0 <= t < vocab:
            raise EarlyExitError(f"token id {i} of the prompt is {t}, outside the model's vocabulary of {vocab}")
        out.append(t)
    return out


def fit_context(ids: list[int], model: GPT2, settings: GenerationSettings) -> tuple[list[int], int]:
    """Check the prompt against the context: (ids, how many of its first tokens to drop so prompt + new tokens fit)."""
    context = model.dims.n_positions
    if settings.max_new_tokens >= context:
        raise EarlyExitError(f"max_new_tokens ({settings.max_new_tokens}) must be smaller than the model's context ({context})")
    room = context - settings.max_new_tokens
    if len(ids) <= room:
        return ids, 0
    if not settings.truncate_prompt:
        raise EarlyExitError(
            f"prompt is {len(ids)} tokens; with max_new_tokens={settings.max_new_tokens} the model's context of "
            f"{context} leaves room for {room} (shorten it, lower max_new_tokens, or allow truncate_prompt)"
        )
    dropped = len(ids) - room
    warnings.warn(f"prompt left-truncated by {dropped} tokens to fit the context of {context}", stacklevel=3)
    return ids, dropped


def prepare_prompt(tokenizer, model: GPT2, prompt, settings: GenerationSettings):
    """A prompt's ids, checked against the context (or left-truncated) and healed when asked:
    (ids, backed-off text the completion must write first, the ids truncated)."""
    ids = prompt_ids(tokenizer, model, prompt)
    if not ids:
        raise EarlyExitError("prompt is empty: give at least one token to complete")
    ids, dropped = fit_context(ids, model, settings)
    truncated, ids = ids[:dropped], ids[dropped:]
    healed = ""
    if settings.token_healing:
        from .healing import heal

        ids, healed = heal(ids, tokenizer, settings.healing_mode)
    return ids, healed, truncated


@torch.inference_mode()
def prefill(model: GPT2, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Run the prompt (B, T) through every block at positions 0..T-1: next-token logits (B, V)."""
    return FullDepth().prefill(model, ids, cache).logits


@torch.inference_mode()
def decode_one_token(model: GPT2, token: torch.Tensor, cache: KVCache, pos: int) -> torch.Tensor:
    """One new token (B, 1) at position `pos` through every block: next-token logits (B, V)."""
    return FullDepth().step(model, token, cache, pos, model.dims.n_layer).logits


def _stop_string_cut(text: str, stop_strings: Sequence[str]) -> int | None:
    cuts = [i for i in (text.find(s) for s in stop_strings) if i >= 0]
    return min(cuts) if cuts else None


class Transcript:
    """The tokens written so far and the checks that end a completion (EOS, stop strings, criteria)."""

    def __init__(self, tokenizer, settings: GenerationSettings, input_ids: torch.Tensor, stopping_criteria=None, healed: str = "",
                 truncated: Sequence[int] = ()):
        self.tokenizer, self.settings, self.stopping_criteria = tokenizer, settings, stopping_criteria
        self.truncated = torch.tensor(list(truncated), dtype=torch.long)  # prompt ids left of the context: the n-gram cache searches them
        self.healed = healed  # text of the backed-off prompt tokens: written again, not reported
        self.pending = healed  # what of it the next tokens must still write (earlyexit.runtime.healing)
        self.input_ids = input_ids  # (1, prompt + written)
        self.new: list[int] = []
        self.layers: list[int] = []
        self.text: str | None = None  # set when a stop string cut it
        self.choose = Sampler(settings.temperature, settings.top_p, settings.seed)  # argmax unless the settings sample

    @property
    def position(self) -> int:
        """Where the last written token sits: the next step runs it there (its K/V are not in the cache yet)."""
        return self.input_ids.shape[1] - 1

    @property
    def full(self) -> bool:
        return len(self.new) >= self.settings.max_new_tokens

    def constrain(self, logits: torch.Tensor) -> torch.Tensor:
        """Next-token logits (1, V) with the tokens that cannot rewrite the backed-off text masked out (token healing)."""
        if not self.pending:
            return logits
        from .healing import allowed_tokens

        allowed = allowed_tokens(self.pending, self.tokenizer, self.settings.healing_mode)
        return logits.masked_fill(~allowed.to(logits.device), float("-inf"))

    def cached(self, logits: torch.Tensor, ahead: Sequence[int] = ()) -> torch.Tensor:
        """Next-token scores (1, V) after what was written and then `ahead` (tokens not written yet: a speculative
        policy's drafts), blended with the n-gram cache over the prompt (its truncated part first), what was written and
        `ahead`, where `settings.cache_weight` > 0 (earlyexit.runtime.ngram_cache)."""
        if not self.settings.cache_weight:
            return logits
        sequence = torch.cat([self.truncated, self.input_ids[0].cpu(), torch.tensor(list(ahead), dtype=torch.long)])
        return cached_scores(logits[0], sequence, self.settings.cache_weight, skip_recent=self.settings.cache_skip_recent).unsqueeze(0)

    def greedy_ahead(self, logits: torch.Tensor, ahead: Sequence[int]) -> list[int]:
        """Greedy tokens after what was written and each prefix of `ahead`: logits (>= len(ahead) + 1, V), row i the
        next-token logits after ahead[:i]. With the n-gram cache off this is the argmax of each row."""
        n = len(ahead) + 1
        if not self.settings.cache_weight:
            return logits[:n].argmax(-1).tolist()
        return [int(self.cached(logits[i:i + 1], ahead[:i]).argmax(-1)) for i in range(n)]

    def write_next(self, logits: torch.Tensor, layers: int, stopped: bool = False, logits_processor=None) -> str | None:
        """Write the next token from `logits` (1, V), after token healing's constraint and then `logits_processor`:
        the greedy one, or a draw where the settings sample. The finish reason as `write` gives it, or "stop", writing
        nothing, where the policy `stopped` before this token. Every non-speculative step of every engine writes
        through here."""
        if stopped:
            return "stop"
        logits = self.cached(self.constrain(logits))
        if logits_processor is not None:
            logits = logits_processor(self.input_ids, logits)
        return self.write(self.choose(logits), layers, logits)

    def write(self, token: int, layers: int, scores: torch.Tensor | None = None) -> str | None:
        """Append one token; the finish reason if it ends the completion, else None."""
        self.new.append(token)
        self.layers.append(layers)
        if self.pending:
            from .healing import still_pending

            self.pending = still_pending(self.pending, self.tokenizer.decode([token]))
        self.input_ids = torch.cat([self.input_ids, self.input_ids.new_tensor([[token]])], dim=1)
        if token == self.tokenizer.eos_token_id:
            return "eos"
        if self.settings.stop_strings:
            text = self.decoded()
            cut = _stop_string_cut(text, self.settings.stop_strings)
            if cut is not None:
                self.text = text[:cut]
                return "stop_string"
        if self.settings.stop_on_repetition:
            drop = loop_tail(self.new, self.tokenizer.decode)
            if drop:
                del self.new[-drop:], self.layers[-drop:]
                self.input_ids = self.input_ids[:, :-drop]
                return "repetition"
        if self.stopping_criteria is not None and bool(self.stopping_criteria(self.input_ids, scores).all()):
            return "stopping_criteria"
        if self.full:
            return "max_tokens"
        return None

    def stops_after(self, ahead: Sequence[int]) -> bool:
        """Whether writing `ahead` (drafts, not written yet) would end the completion at a stop string: a speculative
        policy drafts no further, since the tokens after one would be thrown away."""
        return bool(self.settings.stop_strings) and _stop_string_cut(self.decoded(ahead), self.settings.stop_strings) is not None

    def decoded(self, ahead: Sequence[int] = ()) -> str:
        """The text written after the caller's prompt (a healed prefix is part of the prompt), then `ahead`'s."""
        text = self.tokenizer.decode([*self.new, *ahead], skip_special_tokens=True)
        if text.startswith(self.healed):
            return text[len(self.healed):]
        return "" if self.healed.startswith(text) else text  # still rewriting the backed-off text

    def final_text(self) -> str:
        return self.text if self.text is not None else self.decoded()


def per_kept_token(token_ms: list[float], kept: int) -> list[float]:
    """Timings of the tokens written after the first, one per token the completion kept.

    A repetition cut or a speculative round past the end removes tokens whose work was done:
    their time is charged to the last kept token, so the list stays one entry per kept token
    and `Completion.total_ms` stays the time the completion took (a completion of one token has
    no entry to charge).
    """
    n = max(0, kept - 1)
    if len(token_ms) <= n:
        return token_ms
    out = token_ms[:n]
    if out:
        out[-1] += sum(token_ms[n:])
    return out


def check_reproducible(policy, logits_processor, settings: GenerationSettings | None = None) -> None:
    """A speculative policy writes full mode's greedy tokens (the n-gram cache's included): no other processor may change
    them, and it does not sample."""
    check_policy(policy)
    if isinstance(policy, SpeculativePolicy) and logits_processor is not None:
        raise EarlyExitError(f"logits processors change greedy tokens, which {policy.name} mode must reproduce: use full or early-exit")
    if isinstance(policy, SpeculativePolicy) and settings is not None and settings.temperature > 0:
        raise EarlyExitError(f"{policy.name} mode reproduces full mode's greedy tokens and does not sample "
                             f"(temperature {settings.temperature:g}): use temperature 0, or full or early-exit mode to sample")


@torch.inference_mode()
def complete(
    model: GPT2,
    tokenizer,
    prompt: str | Sequence[int],
    settings: GenerationSettings | None = None,
    logits_processor=None,
    stopping_criteria=None,
    policy=None,
) -> Completion:
    """Greedy (or, where `settings` say, sampled) completion of one prompt under `policy` (default: `FullDepth`).

    With the full-depth policy and no processors this equals
    `GPT2LMHeadModel.generate(do_sample=False)` token for token (tested). The returned
    `token_ids` include the EOS token when one ended it; the text never does. Under
    `EarlyExit` a completion may end with reason `stop`: the controller predicted that
    the next token would be wrong, and what was written so far is kept. A speculative
    policy (`Lossless`) writes several tokens per round and reports its drafting statistics.
    """
    settings = settings or GenerationSettings()
    policy = policy or FullDepth()
    ids, healed, truncated = prepare_prompt(tokenizer, model, prompt, settings)
    check_reproducible(policy, logits_processor, settings)
    cache = model.new_cache(batch=1, capacity=min(model.dims.n_positions, len(ids) + settings.max_new_tokens + policy.max_draft))
    transcript = Transcript(tokenizer, settings, torch.tensor([ids], device=model.device), stopping_criteria, healed, truncated)

    t0 = time.perf_counter()
    result = policy.prefill(model, transcript.input_ids, cache)
    prefill_ms = (time.perf_counter() - t0) * 1e3
    token_ms: list[float] = []
    stats: dict = {}
    if result.stop:
        finish = "stop"
    elif isinstance(policy, SpeculativePolicy):
        finish, token_ms, stats = policy.run(model, cache, transcript, transcript.constrain(result.logits))
    else:
        finish = None
        while finish is None:
            t0 = time.perf_counter()
            if transcript.new:
                result = policy.step(model, transcript.input_ids[:, -1:], cache, transcript.position, transcript.layers[-1])
            finish = transcript.write_next(result.logits, result.layers, result.stop, logits_processor)
            if finish != "stop" and len(transcript.new) > 1:
                token_ms.append((time.perf_counter() - t0) * 1e3)
    return Completion(
        text=transcript.final_text(), token_ids=transcript.new, prompt_tokens=len(ids), finish_reason=finish,
        exit_layers=transcript.layers, prefill_ms=prefill_ms, token_ms=per_kept_token(token_ms, len(transcript.new)),
        prompt_truncated_tokens=len(truncated),
        speculation=stats, healed_prefix=healed,
    )
