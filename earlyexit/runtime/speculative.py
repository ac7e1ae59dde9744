"""Lossless mode: self-speculative decoding, exactly the full model's greedy output, fewer full passes.

Each round drafts up to k tokens with the early-exit policy (shallow, state-copied K/V;
stopping disabled), then runs the full model once over the last written token and the
drafts at their positions. Draft i is kept while it equals the full model's own greedy
token at that position; at the first disagreement the full model's token is written
instead, and when all drafts agree the full model's next token comes as a bonus. The
verify pass rewrites every layer's K/V at the drafted positions, so whatever the drafts
state-copied is replaced by the true values; positions past the accepted prefix are
rewritten before any later token can attend to them (attention reads only positions at
or before its own). Rolling back is therefore just carrying on from the accepted position.

With a stop threshold below 1 the controller may also halt the completion, as early-exit
mode's would with exits switched off: the verify pass asks it at every position it writes
from, after every block early exit asks for a stop (`EarlyExit.stops_at`: the heads' exit
layers and the last; a few hundred multiply-adds beside the block's own; on the native step
inside its one window call), and a round writes the full model's tokens up to the first
position it stops at. The
output is then `EarlyExit(Thresholds(exit=1.0, stop=s))`'s exactly: the full model's greedy
tokens, cut where the controller predicts wrong code (tested). Off by default, so
`Lossless(model, heads)` is `full` mode's output.

A round drafts no further than the completion can go: the token budget, an EOS, or a stop
string the drafts complete (`Transcript.stops_after`), since whatever follows would be thrown away.

With `adaptive`, k grows by one after a round whose drafts were all accepted and falls to
one more than the accepted count after a rejection, within [1, max_draft].

With the n-gram cache on (`GenerationSettings.cache_weight`), the verify pass blends each
position's logits with the cache over the prompt, what was written and the drafts before
that position, as full mode would after them; the drafts themselves do without it (they
only have to be guessed right often), so the output is full mode's with the same cache.

Drafts come from `draft_model`: by default (`draft="auto"`) a weight-only int8 copy of an
fp32 CPU model (earlyexit.runtime.quantize), whose weights fit in the CPU's cache where the fp32
ones do not, or the model itself (`draft="same"`). The draft copy writes into the same fp32
KV cache, and the verify pass overwrites what it wrote, so the output does not depend on
how the drafts were made; only the acceptance rate and the speed do.

With `draft_layers=E` the drafts come from the model's own first E blocks and exit head E-1
(LayerSkip's self-speculation, `earlyexit.runtime.first_layers`); on the native step their
pass through those blocks is the full model's own, so without a stop threshold the verify
pass starts at block E over the streams the drafts left (with one, and in batches, it runs
every block). Measured on the default model (`experiments/results/draft_layers`):
slower than the int8 drafts, whose full depth agrees with fp32 far more often than any of its
shallow heads does.
"""

from __future__ import annotations

import time

import torch

from .decoding import per_kept_token
from ..errors import EarlyExitError
from .heads import ExitHeads, Thresholds
from .model import GPT2, KVCache
from .first_layers import FirstLayers, check_draft_layers
from .policies import EarlyExit, FullDepth, SpeculativePolicy, StepResult


@torch.inference_mode()
def verify_and_check(model: GPT2, controller: EarlyExit, tokens: torch.Tensor, cache: KVCache, pos, rows=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The full-depth pass over tokens (B, T) at positions pos.. that also asks the controller at every position after
    every block it asks for a stop (`stops_at`), as `EarlyExit.step` would for a token after a full-depth one: next-token
    logits (B, T, V) and whether it stops there (B, T). One row on the native step: one call (`window_checked`)."""
    L = model.dims.n_layer
    checked = getattr(model.lean, "window_checked", None)
    if checked is not None and rows is None and isinstance(pos, int) and tokens.shape[0] == 1:
        native = controller.native_controller(L, stops_only=True)
        got = checked(tokens[0].tolist(), cache, pos, native) if native is not None else None
        if got is not None:
            return got[0][None], got[1][None]
    x = model.embed(tokens, pos)
    B, T, d = x.shape
    stops = torch.zeros(B * T, dtype=torch.bool, device=x.device)
    for layer in range(L):
        if not controller.stops_at(layer, L):
            x = model.block(layer, x, cache, pos, rows)
            continue
        x_mid, mlp_out = model.block_branches(layer, x, cache, pos, rows)
        h, probs = controller.check_rows(layer, x_mid.reshape(-1, d), mlp_out.reshape(-1, d), L)
        stops |= controller.stops(probs)
        x = h.view(B, T, d)
    return model.logits(x), stops.view(B, T)


DRAFTS = ("auto", "int8", "same")


def draft_model(model: GPT2, draft: str) -> GPT2:
    """The model that drafts: `int8` a weight-only int8 copy, `same` the model itself, `auto`
    int8 for an fp32 model on the CPU (where decoding is bound by reading weights), else same."""
    from .quantize import quantize_int8

    if draft not in DRAFTS:
        raise EarlyExitError(f"draft must be one of {DRAFTS}, got {draft!r}")
    if draft == "auto":
        draft = "int8" if model.device.type == "cpu" and model.dtype == torch.float32 else "same"
    return model if draft == "same" else quantize_int8(model)  # which refuses a non-fp32 model


class Lossless(SpeculativePolicy):
    """Draft cheaply (int8 weights, exits, or the first `draft_layers` blocks), verify with the full model: `full`
    mode's tokens, faster.

    `exit_threshold` applies to the drafts; None: 1.0 (no exits) for an int8 draft, the
    heads' calibrated threshold for a draft by the model itself. `stop_threshold` below 1
    lets the controller halt the completion (see the module's docstring); 1.0, the default,
    never does.
    """

    name = "lossless"

    def __init__(self, model: GPT2, heads: ExitHeads, exit_threshold: float | None = None, max_draft: int = 12,
                 adaptive: bool = True, kernel_backend: str = "auto", draft: str = "auto", stop_threshold: float = 1.0,
                 draft_layers: int | None = None):
        if isinstance(max_draft, bool) or not isinstance(max_draft, int) or max_draft < 1:
            raise EarlyExitError(f"max_draft must be a positive integer, got {max_draft!r}")
        if max_draft > model.dims.n_positions:  # a draft never passes the context; the KV cache is sized by this
            raise EarlyExitError(f"max_draft ({max_draft:,}) must be at most the model's context ({model.dims.n_positions})")
        first = check_draft_layers(draft_layers, model.dims.n_layer)
        if first is not None and (draft not in ("auto", "same") or exit_threshold is not None):
            raise EarlyExitError(f"draft_layers drafts with the model's own first {first} blocks at a fixed depth: "
                                 "give it without draft='int8' and without an exit threshold")
        self.draft_model = draft_model(model, "same" if first is not None else draft)
        self.draft_kind = "same" if self.draft_model is model else "int8"
        if exit_threshold is None:  # measured on the default model (experiments/benchmark_generate.py): an int8 draft
            # agrees with fp32 ~99% of the time at full depth, and exits cost more acceptance than they save
            exit_threshold = 1.0 if self.draft_kind == "int8" or first is not None else heads.cfg.thresholds.exit
        self.thresholds = Thresholds(exit=exit_threshold, stop=1.0)  # a draft never stops the completion; the verify pass may
        stop = Thresholds(exit=1.0, stop=stop_threshold)
        self.stopper = EarlyExit(model, heads, stop, kernel_backend) if stop.stop < 1 else None
        if first is not None:  # LayerSkip's drafts: blocks 0..E-1 and exit head E-1; verified from block E where native
            self.drafter = FirstLayers(model, heads, first, kernel_backend, keep_streams=self.stopper is None)
            self.draft_kind = f"first {first} layers"
        else:  # with no exit possible the controller's checks would only cost time
            self.drafter = EarlyExit(self.draft_model, heads, self.thresholds, kernel_backend) if exit_threshold < 1 else FullDepth()
        # a full-depth int8 draft (the default) takes the lean single-token path (earlyexit.runtime.lean_step)
        self.lean = self.draft_model.lean if isinstance(self.drafter, FullDepth) else None
        self.max_draft, self.adaptive = max_draft, adaptive

    def prefill(self, model: GPT2, ids: torch.Tensor, cache: KVCache, start: int = 0) -> StepResult:
        return (self.stopper or FullDepth()).prefill(model, ids, cache, start)

    def verify_window(self, model: GPT2, window: torch.Tensor, cache: KVCache, pos, transcripts: list, drafts: list[list[int]],
                      rows=None) -> tuple[list, list | None]:
        """The full model over each row's window (B, T: the last written token, then that row's drafts): its greedy tokens
        after each (the n-gram cache applied as the row's transcript would, see `Transcript.greedy_ahead`) and, with a
        stop threshold, where the controller stops."""
        if self.stopper is not None:
            logits, stops = verify_and_check(model, self.stopper, window, cache, pos, rows)
            return [t.greedy_ahead(row, d) for t, row, d in zip(transcripts, logits, drafts)], stops.tolist()
        logits = self.native_window(model, window[0].tolist(), cache, pos) if rows is None and window.shape[0] == 1 else None
        logits = model(window, cache, pos, rows) if logits is None else logits[None]
        return [t.greedy_ahead(row, d) for t, row, d in zip(transcripts, logits, drafts)], None

    def native_window(self, model: GPT2, tokens: list[int], cache: KVCache, pos: int) -> torch.Tensor | None:
        """One row's verification on the native step, full's own logits (T, V): from block E over the drafts' own
        streams where they came from the first E layers, else through every block; None off the CPU."""
        if isinstance(self.drafter, FirstLayers):
            streams = self.drafter.take_streams(model, tokens, cache, pos)
            if streams is not None:
                return model.lean.window_from(streams, cache, pos, self.drafter.layers)
        native = getattr(model.lean, "window", None)
        return None if native is None else native(tokens, cache, pos)

    def draft(self, model: GPT2, cache: KVCache, transcript, pos: int, n: int, eos: int) -> tuple[list[int], list[int]]:
        """Up to n draft tokens after the transcript's last (at `pos`), with the layers each one used; drafting ends at
        an EOS or where the drafts complete a stop string (what comes after either would be thrown away)."""
        tokens, layers = [], []
        last, prev_layers = transcript.new[-1], transcript.layers[-1]
        if self.lean is not None:
            for i in range(n):
                tokens.append(self.lean.greedy(tokens[-1] if tokens else last, cache, pos + i))
                if tokens[-1] == eos or transcript.stops_after(tokens):
                    break
            return tokens, [model.dims.n_layer] * len(tokens)
        token = torch.tensor([[last]], device=model.device)
        for i in range(n):
            r = self.drafter.step(self.draft_model, token, cache, pos + i, prev_layers)
            tokens.append(int(r.logits.argmax(-1)))
            layers.append(r.layers)
            prev_layers = r.layers
            if tokens[-1] == eos or transcript.stops_after(tokens):
                break
            token = token.new_tensor([[tokens[-1]]])
        return tokens, layers

    @staticmethod
    def accept(transcript, drafts: list[int], layers: list[int], truth: list[int], n_layer: int,
               stops: list[bool] | None = None) -> tuple[int, int, str | None]:
        """Write the drafts the full model agrees with, then its own token, up to where the controller
        stops (stops[i]: before the token after window position i): (accepted, written, finish reason)."""
        m = next((i for i, (d, g) in enumerate(zip(drafts, truth)) if d != g), len(drafts))
        written, finish = 0, None
        for i, (token, used) in enumerate([*zip(drafts[:m], layers[:m]), (truth[m], n_layer)]):
            if stops is not None and stops[i]:
                return m, written, "stop"
            finish = transcript.write(token, used)
            written += 1
            if finish is not None:
                break
        return m, written, finish

    def write_pending(self, model: GPT2, cache: KVCache, transcript, finish: str | None) -> tuple[str | None, list[float]]:
        """The tokens token healing still constrains (what is left of the backed-off text), one full-depth step each,
        as `full` mode writes them (a draft would not follow the constraint): (finish reason, ms per token)."""
        policy, token_ms = self.stopper or FullDepth(), []
        while finish is None and transcript.pending:
            t0 = time.perf_counter()
            r = policy.step(model, transcript.input_ids[:, -1:], cache, transcript.position, transcript.layers[-1])
            finish = transcript.write_next(r.logits, r.layers, r.stop)
            if finish != "stop":
                token_ms.append((time.perf_counter() - t0) * 1e3)
        return finish, token_ms

    def write_pending_batch(self, model: GPT2, cache: KVCache, transcripts: list, finish: list) -> list[list[float]]:
        """`write_pending` for the rows that have such tokens, stepping together: ms per token per row."""
        policy, token_ms = self.stopper or FullDepth(), [[] for _ in transcripts]
        device = model.device
        while rows := [b for b, t in enumerate(transcripts) if finish[b] is None and t.pending]:
            t0 = time.perf_counter()
            step = policy.step_batch(model, torch.tensor([[transcripts[b].new[-1]] for b in rows], device=device), cache,
                                     torch.tensor([transcripts[b].position for b in rows], device=device),
                                     torch.tensor([transcripts[b].layers[-1] for b in rows], device=device), torch.tensor(rows, device=device))
            ms = (time.perf_counter() - t0) * 1e3
            for i, b in enumerate(rows):
                t = transcripts[b]
                finish[b] = t.write_next(step.logits[i:i + 1], step.layers[i], bool(step.stop[i]))
                token_ms[b] += [] if step.stop[i] else [ms]
        return token_ms

    def next_draft(self, k: int, accepted: int, drafted: int) -> int:
        """Adaptive k: one more after a fully accepted round, one past the accepted count after a rejection."""
        if not self.adaptive:
            return k
        return min(self.max_draft, k + 1) if accepted == drafted else max(1, accepted + 1)

    def run(self, model: GPT2, cache: KVCache, transcript, first_logits: torch.Tensor):
        """Write tokens into `transcript` until it ends: (finish reason, ms per token, drafting statistics)."""
        L = model.dims.n_layer
        eos = transcript.tokenizer.eos_token_id
        finish = transcript.write(int(transcript.cached(first_logits).argmax(-1)), L)
        finish, token_ms = self.write_pending(model, cache, transcript, finish)
        k, drafted, accepted, rounds = self.max_draft, 0, 0, 0
        while finish is None:
            t0 = time.perf_counter()
            pos = transcript.position
            budget = transcript.settings.max_new_tokens - len(transcript.new)
            drafts, layers = self.draft(model, cache, transcript, pos, min(k, budget), eos)
            window = torch.tensor([[transcript.new[-1], *drafts]], device=model.device)  # (1, n + 1)
            truth, stops = self.verify_window(model, window, cache, pos, [transcript], [drafts])  # the full model's token after each
            m, written, finish = self.accept(transcript, drafts, layers, truth[0], L, stops and stops[0])
            drafted, accepted, rounds = drafted + len(drafts), accepted + m, rounds + 1
            k = self.next_draft(k, m, len(drafts))
            if written:  # a round that stopped before writing is not a token's time, as in early-exit mode
                token_ms += [(time.perf_counter() - t0) * 1e3 / written] * written
        stats = {"drafted": drafted, "accepted": accepted, "acceptance_rate": accepted / drafted if drafted else None,
                 "rounds": rounds, "max_draft": self.max_draft, "adaptive": self.adaptive, "draft": self.draft_kind}
        return finish, per_kept_token(token_ms, len(transcript.new)), stats

    # ------------------------------------------------------------------ batched

    def prefill_batch(self, model: GPT2, ids: torch.Tensor, lengths: torch.Tensor, cache: KVCache):
        return (self.stopper or FullDepth()).prefill_batch(model, ids, lengths, cache)

    @torch.inference_mode()
    def run_batch(self, model: GPT2, cache: KVCache, transcripts: list, first_logits: torch.Tensor,
                  stopped: list[bool] | None = None) -> list[tuple]:
        """`run` for B rows at once (row b is cache row b): per row (finish reason, ms per token, statistics).
        `stopped`: rows the controller stopped at the prefill, which write nothing.

        Every row keeps its own draft length, budget and statistics, exactly as `run` would
        alone; a round drafts with the rows still drafting (a row leaves at its draft count or
        an EOS), then verifies every row's window in one ragged full-depth pass.
        """
        L, B = model.dims.n_layer, len(transcripts)
        device = model.device
        eos = transcripts[0].tokenizer.eos_token_id
        stopped = stopped or [False] * B
        finish = ["stop" if stopped[b] else t.write(int(t.cached(first_logits[b:b + 1]).argmax(-1)), L) for b, t in enumerate(transcripts)]
        token_ms = self.write_pending_batch(model, cache, transcripts, finish)
        k = [self.max_draft] * B
        drafted, accepted, rounds = [0] * B, [0] * B, [0] * B
        while any(f is None for f in finish):
            t0 = time.perf_counter()
            live = [b for b in range(B) if finish[b] is None]
            pos = {b: transcripts[b].position for b in live}
            want = {b: min(k[b], transcripts[b].settings.max_new_tokens - len(transcripts[b].new)) for b in live}
            drafts = {b: [] for b in live}
            layers = {b: [] for b in live}
            last = {b: transcripts[b].new[-1] for b in live}
            prev = {b: transcripts[b].layers[-1] for b in live}
            drafting = [b for b in live if want[b] > 0]
            while drafting:
                step = self.drafter.step_batch(
                    self.draft_model, torch.tensor([[last[b]] for b in drafting], device=device), cache,
                    torch.tensor([pos[b] + len(drafts[b]) for b in drafting], device=device),
                    torch.tensor([prev[b] for b in drafting], device=device), torch.tensor(drafting, device=device))
                for i, b in enumerate(drafting):
                    token = int(step.logits[i].argmax(-1))
                    drafts[b].append(token)
                    layers[b].append(step.layers[i])
                    last[b], prev[b] = token, step.layers[i]
                drafting = [b for b in drafting if len(drafts[b]) < want[b] and drafts[b][-1] != eos
                            and not transcripts[b].stops_after(drafts[b])]
            width = 1 + max(len(drafts[b]) for b in live)
            window = torch.full((len(live), width), eos, dtype=torch.long, device=device)  # padding past a row's window is overwritten later
            for i, b in enumerate(live):
                window[i, :1 + len(drafts[b])] = torch.tensor([transcripts[b].new[-1], *drafts[b]])
            starts = torch.tensor([pos[b] for b in live], device=device)
            rows = torch.tensor(live, device=device)
            truth, stops = self.verify_window(model, window, cache, starts, [transcripts[b] for b in live], [drafts[b] for b in live],
                                              rows)  # per live row: the full model's token after each of its window's tokens
            elapsed = (time.perf_counter() - t0) * 1e3
            for i, b in enumerate(live):
                m, written, finish[b] = self.accept(transcripts[b], drafts[b], layers[b], truth[i], L, stops and stops[i])
                drafted[b], accepted[b], rounds[b] = drafted[b] + len(drafts[b]), accepted[b] + m, rounds[b] + 1
                k[b] = self.next_draft(k[b], m, len(drafts[b]))
                token_ms[b] += [elapsed / written] * written if written else []
        return [(finish[b], per_kept_token(token_ms[b], len(transcripts[b].new)),
                 {"drafted": drafted[b], "accepted": accepted[b], "acceptance_rate": accepted[b] / drafted[b] if drafted[b] else None,
                  "rounds": rounds[b], "max_draft": self.max_draft, "adaptive": self.adaptive, "draft": self.draft_kind}) for b in range(B)]
