"""Our own GPT-2 forward, block by block over a preallocated KV cache.

Reads top to bottom in the order the network runs: attention, MLP, block, the model.
`GPT2.from_hf` loads any Hugging Face `GPT2LMHeadModel`; everything else in the runtime
(decoding policies, exit heads, kernels) steps through `embed` -> `block` x L -> `logits`
itself, so it can stop between blocks, which `GPT2LMHeadModel.forward` cannot.

Shapes: B batch, T new tokens this step, S cache capacity, L layers, d width,
nh heads, hs head size (d / nh), V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import EarlyExitError

_ACTIVATIONS = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}


@dataclass(frozen=True)
class GPT2Dims:
    """The shape of a GPT-2 backbone: what a checkpoint of exit heads must match."""

    n_layer: int
    n_embd: int
    n_head: int
    vocab_size: int
    n_positions: int
    layer_norm_epsilon: float = 1e-5
    activation: str = "gelu_new"
    scale_attn_by_inverse_layer_idx: bool = False

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_hf_config(cls, config) -> "GPT2Dims":
        if getattr(config, "model_type", None) != "gpt2":
            raise EarlyExitError(f"expected a GPT-2 model, got model_type={getattr(config, 'model_type', None)!r}")
        if getattr(config, "add_cross_attention", False):
            raise EarlyExitError("GPT-2 models with cross-attention are not supported")
        if config.activation_function not in _ACTIVATIONS:
            raise EarlyExitError(f"unsupported activation_function {config.activation_function!r}")
        if not getattr(config, "scale_attn_weights", True):
            raise EarlyExitError("GPT-2 models with scale_attn_weights=False are not supported")
        return cls(
            n_layer=config.n_layer, n_embd=config.n_embd, n_head=config.n_head, vocab_size=config.vocab_size,
            n_positions=config.n_positions, layer_norm_epsilon=config.layer_norm_epsilon,
            activation=config.activation_function,
            scale_attn_by_inverse_layer_idx=bool(getattr(config, "scale_attn_by_inverse_layer_idx", False)),
        )


class KVCache:
    """Static K/V storage for every layer, written at absolute positions.

    Preallocated once per completion, so no tensor grows while decoding; rolling back
    (for speculative verification) is just decoding again from an earlier position.
    """

    def __init__(self, dims: GPT2Dims, batch: int, capacity: int, dtype: torch.dtype, device: torch.device | str = "cpu"):
        shape = (dims.n_layer, batch, dims.n_head, capacity, dims.head_size)  # (L, B, nh, S, hs)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.capacity = capacity

    def row(self, b: int) -> "KVCache":
        """Row `b` as a cache of batch 1 over the same storage (a view: what it writes, this cache holds). A server
        keeps one cache for all its rows: a request is prefilled into its own row, and later rows step together."""
        view = KVCache.__new__(KVCache)
        view.k, view.v, view.capacity = self.k[:, b:b + 1], self.v[:, b:b + 1], self.capacity
        return view


class Conv1D(nn.Module):
    """y = x @ W + b with W stored (in, out): Hugging Face GPT-2's projection, same layout, same one `addmm`.

    Kept rather than transposed into `nn.Linear`'s (out, in): the arithmetic is then the one
    `transformers` runs, and a single row through (in, out) weights is faster on this CPU
    (a decode step of the default model, A/B in one process on one prompt: 8.35 -> 7.24 ms).
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(in_features, out_features))
        self.bias = nn.Parameter(torch.zeros(out_features))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x.reshape(-1, self.in_features), self.weight).view(*x.shape[:-1], self.out_features)

    def outputs(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Output features start:stop only (state copying needs K and V, not Q)."""
        return torch.addmm(self.bias[start:stop], x.reshape(-1, self.in_features), self.weight[:, start:stop]).view(*x.shape[:-1], stop - start)

    @property
    def weight_out_in(self) -> torch.Tensor:
        """The weight as (out, in), the layout of `nn.Linear` and of the kernels."""
        return self.weight.t()


class Attention(nn.Module):
    def __init__(self, dims: GPT2Dims, layer_idx: int):
        super().__init__()
        self.n_head, self.hs = dims.n_head, dims.head_size
        self.c_attn = Conv1D(dims.n_embd, 3 * dims.n_embd)
        self.c_proj = Conv1D(dims.n_embd, dims.n_embd)
        self.scale = 1.0 / math.sqrt(self.hs)
        if dims.scale_attn_by_inverse_layer_idx:
            self.scale /= layer_idx + 1

    def split_heads(self, t: torch.Tensor) -> torch.Tensor:
        B, T, _ = t.shape
        return t.view(B, T, self.n_head, self.hs).transpose(1, 2)  # (B, nh, T, hs)

    def kv(self, x_ln: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of already-normalised inputs: all that state copying needs from a skipped layer."""
        d = x_ln.shape[-1]
        kv = self.c_attn.outputs(x_ln, d, 3 * d)  # (B, T, 2d)
        k, v = kv.split(d, dim=-1)
        return self.split_heads(k), self.split_heads(v)

    def forward(self, x_ln: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Attention for T new tokens at positions pos..pos+T-1, writing their K/V into the cache.

        `pos` is an int (every row at the same position) or a (B,) tensor of per-row positions
        (batched decoding, rows at different lengths); `rows` then names the cache rows these B
        inputs belong to (a batch whose finished or exited rows no longer run this layer).
        """
        B, T, d = x_ln.shape
        q, k, v = self.c_attn(x_ln).split(d, dim=-1)
        q, k, v = self.split_heads(q), self.split_heads(k), self.split_heads(v)  # (B, nh, T, hs)
        if isinstance(pos, torch.Tensor):
            return self.c_proj(self._ragged(q, k, v, k_cache, v_cache, pos, rows).transpose(1, 2).reshape(B, T, d))
        k_cache[:, :, pos:pos + T] = k
        v_cache[:, :, pos:pos + T] = v
        keys, values = k_cache[:, :, :pos + T], v_cache[:, :, :pos + T]  # (B, nh, pos+T, hs)
        if T == 1:
            y = F.scaled_dot_product_attention(q, keys, values, scale=self.scale)
        elif pos == 0:
            y = F.scaled_dot_product_attention(q, keys, values, is_causal=True, scale=self.scale)
        else:  # T new tokens after a filled prefix: query i sees keys up to pos + i
            mask = torch.ones(T, pos + T, dtype=torch.bool, device=x_ln.device).tril(diagonal=pos)
            y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.scale)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, d))  # (B, T, d)

    def _ragged(self, q, k, v, k_cache, v_cache, pos: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        """Per-row positions: row b's tokens go to slots pos[b].. of cache row rows[b] and see keys up to their own slot."""
        B, _, T, _ = q.shape
        rows = torch.arange(B, device=q.device) if rows is None else rows
        slots = pos[:, None] + torch.arange(T, device=q.device)  # (B, T)
        k_cache[rows[:, None], :, slots] = k.transpose(1, 2)  # (B, T, nh, hs) into (B, T) cache cells
        v_cache[rows[:, None], :, slots] = v.transpose(1, 2)
        S = int(slots.max()) + 1
        keys, values = k_cache[rows, :, :S], v_cache[rows, :, :S]  # (B, nh, S, hs)
        mask = torch.arange(S, device=q.device)[None, None, :] <= slots[:, :, None]  # (B, T, S)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask[:, None], scale=self.scale)  # (B, nh, T, hs)


class MLP(nn.Module):
    def __init__(self, dims: GPT2Dims):
        super().__init__()
        self.c_fc = Conv1D(dims.n_embd, 4 * dims.n_embd)
        self.c_proj = Conv1D(4 * dims.n_embd, dims.n_embd)
        self.act = _ACTIVATIONS[dims.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, dims: GPT2Dims, layer_idx: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dims.n_embd, eps=dims.layer_norm_epsilon)
        self.attn = Attention(dims, layer_idx)
        self.ln_2 = nn.LayerNorm(dims.n_embd, eps=dims.layer_norm_epsilon)
        self.mlp = MLP(dims)

    def branches(self, x: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos, rows=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(residual stream after attention, MLP branch output): the block's output is their sum.

        Split so the exit check can fuse that last add with its own work (earlyexit.kernels.layer_check).
        """
        x = x + self.attn(self.ln_1(x), k_cache, v_cache, pos, rows)
        return x, self.mlp(self.ln_2(x))

    def forward(self, x: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos, rows=None) -> torch.Tensor:
        x, mlp_out = self.branches(x, k_cache, v_cache, pos, rows)
        return x + mlp_out


class GPT2(nn.Module):
    """A GPT-2 language model whose forward the caller drives one block at a time."""

    lean = None  # a single-token fast path (earlyexit.runtime.lean_step): fp32 models from load_runtime_model, int8 copies

    def __init__(self, dims: GPT2Dims):
        super().__init__()
        self.dims = dims
        self.wte = nn.Embedding(dims.vocab_size, dims.n_embd)
        self.wpe = nn.Embedding(dims.n_positions, dims.n_embd)
        self.h = nn.ModuleList(Block(dims, i) for i in range(dims.n_layer))
        self.ln_f = nn.LayerNorm(dims.n_embd, eps=dims.layer_norm_epsilon)

    @classmethod
    def from_hf(cls, hf_model, dtype: torch.dtype = torch.float32) -> "GPT2":
        """Copy the weights of a `GPT2LMHeadModel` (or `GPT2Model`): the same names and layouts."""
        dims = GPT2Dims.from_hf_config(hf_model.config)
        model = cls(dims)
        sd = {k.removeprefix("transformer."): v for k, v in hf_model.state_dict().items()}
        ours = {}
        for name in model.state_dict():
            src = sd.get(name)
            if src is None:
                raise EarlyExitError(f"checkpoint has no weight {name!r}: not a GPT-2 state dict")
            ours[name] = src
        model.load_state_dict(ours)
        lm_head = hf_model.state_dict().get("lm_head.weight")
        if lm_head is not None and not torch.equal(lm_head, model.wte.weight.detach().to(lm_head.dtype)):
            # An untied head: keep it as its own parameter.
            model.lm_head_weight = nn.Parameter(lm_head.clone())
        return model.to(dtype).eval().requires_grad_(False)

    @property
    def head_weight(self) -> torch.Tensor:
        """The vocabulary projection (V, d): tied to the embedding unless the checkpoint had its own."""
        return getattr(self, "lm_head_weight", self.wte.weight)

    @property
    def dtype(self) -> torch.dtype:
        return self.wte.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.wte.weight.device

    def new_cache(self, batch: int, capacity: int | None = None) -> KVCache:
        return KVCache(self.dims, batch, capacity or self.dims.n_positions, self.dtype, self.device)

    def embed(self, ids: torch.Tensor, pos) -> torch.Tensor:
        """Token plus position embeddings of `ids` (B, T) placed at positions pos..pos+T-1 (pos: int or (B,) per row)."""
        T = ids.shape[1]
        positions = torch.arange(T, device=ids.device) + (pos[:, None] if isinstance(pos, torch.Tensor) else pos)
        return self.wte(ids) + self.wpe(positions)  # (B, T, d)

    def block(self, layer: int, x: torch.Tensor, cache: KVCache, pos, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Run block `layer` on x (B, T, d), writing its K/V at pos..pos+T-1 (of cache rows `rows`, when given)."""
        return self.h[layer](x, cache.k[layer], cache.v[layer], pos, rows)

    def block_branches(self, layer: int, x: torch.Tensor, cache: KVCache, pos, rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Block `layer` without its final residual add: (x after attention, MLP output), each (B, T, d)."""
        return self.h[layer].branches(x, cache.k[layer], cache.v[layer], pos, rows)

    def project(self, z: torch.Tensor) -> torch.Tensor:
        """The vocabulary projection of already-normalised states: (..., d) -> (..., V)."""
        return F.linear(z, self.head_weight)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Final layer norm and vocabulary projection: (..., d) -> (..., V)."""
        return self.project(self.ln_f(x))

    def hidden(self, ids: torch.Tensor, cache: KVCache, pos, rows: torch.Tensor | None = None) -> torch.Tensor:
        """All blocks over `ids` (B, T) at positions pos.. (per row when pos is (B,), of cache rows `rows`): (B, T, d)."""
        x = self.embed(ids, pos)
        for layer in range(self.dims.n_layer):
            x = self.block(layer, x, cache, pos, rows)
        return x

    def forward(self, ids: torch.Tensor, cache: KVCache, pos, rows: torch.Tensor | None = None) -> torch.Tensor:
        """All blocks over `ids` (B, T) at positions pos..: logits (B, T, V)."""
        return self.logits(self.hidden(ids, cache, pos, rows))
