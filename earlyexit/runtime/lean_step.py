"""Lean single-token steps: an int8 model's (lossless mode's drafts, `--weights int8`) and an fp32 model's.

`GPT2.hidden` is general (batches, ragged positions, T new tokens, per-layer hooks for the
exit controller) and goes through `Int8Linear`, whose fp32-in/fp32-out contract costs a
conversion, a reshape and a promoting add per projection. One drafted token at batch 1
needs none of that: measured on the default model (2 threads), 48 int8 projections take
0.7 ms as bare `_weight_int8pack_mm` calls and 2.1 ms as modules; a whole token takes
7.05 ms through the generic int8 path and 4.36 ms through this one
(experiments/results/decode_profile).

`LeanInt8Step` holds each layer's tensors in a flat tuple and runs the same arithmetic as
the generic int8 path with as few aten calls as it takes: the residual stream stays fp32,
each projection reads bf16 activations, K/V go into the shared fp32 cache with one
`index_copy_` each. `logits` ends with the model's own head (`Int8GPT2.project`, with its
fp32 rerank); `greedy`, for drafts, returns the token directly: the int8 head's top
`rerank` candidates rescored with the fp32 rows, without a vocabulary of logits. The cache
and logits equal the generic path's (tested); lossless mode verifies every draft with the
fp32 model anyway.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .model import _ACTIVATIONS, GPT2, KVCache
from .quantize import _FUSED_OP, Int8GPT2, Int8Linear, _fused_ok

_BF16 = torch.bfloat16


def _fusable(linear) -> bool:
    return isinstance(linear, Int8Linear) and linear.bias is not None and _fused_ok(linear.in_features, linear.qweight)


class _LeanStep:
    """What both lean steps share: the dimensions, the per-layer tensors gathered once (and again whenever the
    model's embedding is no longer the one seen: `model.to(...)` replaces its tensors), the embedding of one token
    and the walk through every block. Each subclass gathers its layers and runs one `block` and one `fill_kv`."""

    def __init__(self, model: GPT2):
        self.model, self._seen = model, None
        d = model.dims
        self.d, self.n_head, self.hs, self.eps = d.n_embd, d.n_head, d.head_size, d.layer_norm_epsilon
        self.act = _ACTIVATIONS[d.activation]

    def _gather(self) -> None:
        raise NotImplementedError

    def block(self, i: int, x: torch.Tensor, cache: KVCache, pos: int) -> torch.Tensor:
        raise NotImplementedError

    def fresh(self) -> None:
        """Gather the per-layer tensors again if the model's are no longer the ones seen (`model.to(...)`)."""
        if self.model.wte.weight is not self._seen:
            self._gather()
            self._seen = self.model.wte.weight

    def embed(self, token: int, pos: int) -> torch.Tensor:
        """The fp32 residual stream (1, d) entering the first block (the per-layer tensors gathered if stale)."""
        self.fresh()
        m = self.model
        return (m.wte.weight[token] + m.wpe.weight[pos]).view(1, self.d)

    def final_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Next-token logits (1, V) of the residual stream x (1, d) after the last block: ln_f and the model's head."""
        return self.model.logits(x)

    def blocks(self, start: int, stop: int, x: torch.Tensor, cache: KVCache, pos: int) -> torch.Tensor:
        """Blocks start..stop-1 on x (1, d), as many `block` calls (the native step: one call)."""
        for i in range(start, stop):
            x = self.block(i, x, cache, pos)
        return x

    def residual(self, token: int, cache: KVCache, pos: int) -> torch.Tensor:
        """The residual stream (1, d) after the last block, for `token` at `pos` (its K/V written into `cache`)."""
        x = self.embed(token, pos)  # first: it gathers the layers if stale
        return self.blocks(0, len(self.layers), x, cache, pos)


class LeanInt8Step(_LeanStep):
    """One token at batch 1 through every block of an `Int8GPT2`: its logits, or just its greedy token.

    The per-layer tensors are gathered once; `model.to(...)` replaces them, so they are
    gathered again whenever the embedding the model holds is no longer the one seen.
    """

    def __init__(self, model: Int8GPT2):
        super().__init__(model)
        self.rerank = max(1, model.rerank)
        self._at: tuple[int, torch.Tensor | None] = (-1, None)

    def _gather(self) -> None:
        model = self.model
        self._at = (-1, None)
        self.layers = []
        for block in model.h:
            a, m = block.attn, block.mlp
            self.layers.append((
                block.ln_1.weight, block.ln_1.bias, a.c_attn.qweight, a.c_attn.scale, a.c_attn.bias, a.scale,
                a.c_proj.qweight, a.c_proj.scale, a.c_proj.bias,
                block.ln_2.weight, block.ln_2.bias, m.c_fc.qweight, m.c_fc.scale, m.c_fc.bias,
                m.c_proj.qweight, m.c_proj.scale, m.c_proj.bias,
            ))
        d = self.d  # the K/V rows of each QKV projection, for state copying (contiguous slices: no copy)
        self.kv_rows = [(layer[2][d:], layer[3][d:], layer[4][d:]) for layer in self.layers]
        self.head = model.int8_head
        self.head_rows = GPT2.head_weight.fget(model)  # the fp32 rows the rerank reads (Int8GPT2 overrides the property)

    @staticmethod
    def supports(model) -> bool:
        """Whether `model` can take the lean path: an int8 copy whose every projection (and head) runs the fused op."""
        if _FUSED_OP is None or not isinstance(model, Int8GPT2) or model.int8_head is None:
            return False
        linears = [lin for b in model.h for lin in (b.attn.c_attn, b.attn.c_proj, b.mlp.c_fc, b.mlp.c_proj)]
        return all(_fusable(lin) for lin in linears) and _fused_ok(model.int8_head.in_features, model.int8_head.qweight)

    def block(self, i: int, x: torch.Tensor, cache: KVCache, pos: int) -> torch.Tensor:
        """Block `i` on the residual stream x (1, d) of the token at `pos`: its K/V into `cache`, the new stream back."""
        d, nh, hs, eps = self.d, self.n_head, self.hs, self.eps
        w1, b1, qa, sa, ba, scale, qp, sp, bp, w2, b2, qf, sf, bf, qm, sm, bm = self.layers[i]
        if self._at[0] != pos:  # index_copy_'s index, made once per position rather than once per block
            self._at = (pos, torch.tensor([pos], device=x.device))
        at = self._at[1]
        h = F.layer_norm(x, (d,), w1, b1, eps).to(_BF16)
        qkv = torch.add(ba, _FUSED_OP(h, qa, sa))  # fp32 (1, 3d)
        keys, values = cache.k[i], cache.v[i]  # (1, nh, S, hs)
        keys.index_copy_(2, at, qkv[:, d:2 * d].view(1, nh, 1, hs))
        values.index_copy_(2, at, qkv[:, 2 * d:].view(1, nh, 1, hs))
        # 4-d: with 3-d inputs SDPA takes its unfused math path, several times slower here
        y = F.scaled_dot_product_attention(qkv[:, :d].view(1, nh, 1, hs), keys[:, :, :pos + 1], values[:, :, :pos + 1], scale=scale)
        x = x + torch.add(bp, _FUSED_OP(y.view(1, d).to(_BF16), qp, sp))
        h = F.layer_norm(x, (d,), w2, b2, eps).to(_BF16)
        h = self.act(torch.add(bf, _FUSED_OP(h, qf, sf))).to(_BF16)  # (1, 4d)
        return x + torch.add(bm, _FUSED_OP(h, qm, sm))

    def fill_kv(self, i: int, h: torch.Tensor, cache: KVCache, pos: int) -> None:
        """State copying into skipped block `i`: K, V = split(ln_1(h) @ W_kv + b_kv), from the int8 K/V rows."""
        d, nh, hs = self.d, self.n_head, self.hs
        w1, b1, qa, sa, ba = self.layers[i][:5]
        qkv_rows, scales, bias = self.kv_rows[i]
        kv = torch.add(bias, _FUSED_OP(F.layer_norm(h, (d,), w1, b1, self.eps).to(_BF16), qkv_rows, scales))  # (1, 2d)
        cache.k[i, :, :, pos] = kv[:, :d].view(1, nh, hs)
        cache.v[i, :, :, pos] = kv[:, d:].view(1, nh, hs)

    @torch.inference_mode()
    def logits(self, token: int, cache: KVCache, pos: int) -> torch.Tensor:
        """Next-token logits (1, V): the generic int8 path's, from fewer ops."""
        return self.model.logits(self.residual(token, cache, pos))

    @torch.inference_mode()
    def greedy(self, token: int, cache: KVCache, pos: int) -> int:
        """The next greedy token, without materialising the vocabulary's logits in fp32."""
        m = self.model
        z = F.layer_norm(self.residual(token, cache, pos), (self.d,), m.ln_f.weight, m.ln_f.bias, self.eps)
        top = _FUSED_OP(z.to(_BF16), self.head.qweight, self.head.scale)[0].topk(self.rerank).indices  # (r,)
        exact = self.head_rows[top] @ z[0]  # the candidates' fp32 logits
        return int(top[exact.argmax()])



class LeanFp32Step(_LeanStep):
    """One token at batch 1 through every block of an fp32 `GPT2`, with the generic path's own ops and nothing else.

    The generic path (`GPT2.hidden`) is written for batches, ragged positions and T new tokens: each projection
    reshapes and views, each attention splits heads and slices the cache. For one token at one position none of
    that is needed; the same `addmm`s, layer norms, attention and adds in the same order give the same logits bit
    for bit (tested), so full mode's tokens stay `transformers`' greedy tokens.
    """

    def _gather(self) -> None:
        self.layers = []
        for block in self.model.h:
            a, m = block.attn, block.mlp
            self.layers.append((block.ln_1.weight, block.ln_1.bias, a.c_attn.weight, a.c_attn.bias, a.scale,
                                a.c_proj.weight, a.c_proj.bias, block.ln_2.weight, block.ln_2.bias,
                                m.c_fc.weight, m.c_fc.bias, m.c_proj.weight, m.c_proj.bias))

    @staticmethod
    def supports(model) -> bool:
        """An fp32 (or other float) `GPT2` whose projections are all Conv1D: not an int8 copy."""
        from .model import Conv1D

        return type(model) is GPT2 and all(isinstance(lin, Conv1D) for b in model.h
                                           for lin in (b.attn.c_attn, b.attn.c_proj, b.mlp.c_fc, b.mlp.c_proj))

    def block(self, i: int, x: torch.Tensor, cache: KVCache, pos: int) -> torch.Tensor:
        """Block `i` on the residual stream x (1, d) of the token at `pos`: its K/V into `cache`, the new stream back."""
        d, nh, hs, eps = self.d, self.n_head, self.hs, self.eps
        w1, b1, wa, ba, scale, wp, bp, w2, b2, wf, bf, wm, bm = self.layers[i]
        qkv = torch.addmm(ba, F.layer_norm(x, (d,), w1, b1, eps), wa)  # (1, 3d)
        keys, values = cache.k[i], cache.v[i]  # (1, nh, S, hs)
        keys[:, :, pos] = qkv[:, d:2 * d].view(1, nh, hs)
        values[:, :, pos] = qkv[:, 2 * d:].view(1, nh, hs)
        y = F.scaled_dot_product_attention(qkv[:, :d].view(1, nh, 1, hs), keys[:, :, :pos + 1], values[:, :, :pos + 1], scale=scale)
        x = x + torch.addmm(bp, y.view(1, d), wp)
        return x + torch.addmm(bm, self.act(torch.addmm(bf, F.layer_norm(x, (d,), w2, b2, eps), wf)), wm)

    def fill_kv(self, i: int, h: torch.Tensor, cache: KVCache, pos: int) -> None:
        """State copying into skipped block `i`: K, V = split(ln_1(h) @ W_kv + b_kv), from the K/V columns of c_attn."""
        d, nh, hs = self.d, self.n_head, self.hs
        w1, b1, wa, ba = self.layers[i][:4]
        kv = torch.addmm(ba[d:], F.layer_norm(h, (d,), w1, b1, self.eps), wa[:, d:])  # (1, 2d)
        cache.k[i, :, :, pos] = kv[:, :d].view(1, nh, hs)
        cache.v[i, :, :, pos] = kv[:, d:].view(1, nh, hs)

    @torch.inference_mode()
    def logits(self, token: int, cache: KVCache, pos: int) -> torch.Tensor:
        """Next-token logits (1, V): the generic path's, from fewer ops."""
        return self.model.logits(self.residual(token, cache, pos))

    def greedy(self, token: int, cache: KVCache, pos: int) -> int:
        """The next greedy token (what lossless mode's full-depth drafts of the model itself ask for)."""
        return int(self.logits(token, cache, pos).argmax(-1))


def attach_lean_step(model: GPT2) -> GPT2:
    """Give an fp32 model its lean single-token path (`model.lean`: the native step where it builds, else the torch
    one), where it applies; returns the model."""
    from .native import lean_fp32_step  # which imports this module

    model.lean = lean_fp32_step(model)
    return model
