"""Weight-only int8 copies of the backbone: cheap drafts for lossless mode.

Decoding one token at batch 1 runs 48 matrix-vector products and the head. The default
model's 48 fp32 projections (38 MB) do not fit a 32 MB L3, so each token streams them from
memory; as int8 they are 9.4 MB and stay in cache (experiments/decode_profile.py measures
the step both ways, and where an fp32 token's time goes). An `Int8Linear` keeps each
projection as int8 with one bf16 scale per output channel (symmetric, round to nearest) and
multiplies bf16 activations by it in one fused op (`torch._weight_int8pack_mm`, the kernel
behind weight-only int8 in PyTorch's gpt-fast and torchao). Everything else (layer norms, attention,
the residual stream, the KV cache) stays fp32, so a quantized copy can write into, and read
from, the same cache as the fp32 model.

Quantized tokens are not the fp32 model's tokens: lossless mode drafts with the int8 copy
and verifies every draft with the fp32 model, so its output stays exactly fp32 greedy.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import EarlyExitError
from .model import GPT2

_FUSED_OP = getattr(torch, "_weight_int8pack_mm", None)


def _fused_ok(in_features: int, x: torch.Tensor) -> bool:
    """Whether the fused op handles this call: only CPU and CUDA implement it, and on the CPU it
    reads the input dimension in blocks of 16, returning wrong numbers (or crashing) otherwise."""
    return _FUSED_OP is not None and in_features % 16 == 0 and x.device.type in ("cpu", "cuda")


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float weight -> int8 weight (out, in) and bf16 scales (out,), symmetric per row."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12).to(torch.bfloat16)  # rounded to bf16 before use, so
    q = torch.round(w / scale.float()[:, None]).clamp(-127, 127).to(torch.int8)  # int8 * scale is what runs
    return q.contiguous(), scale


def _dequantize(qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """int8 rows times their bf16 scales, in fp32: the weight the fused op multiplies by."""
    return qweight.float() * scale.float()[:, None]


class Int8Linear(nn.Module):
    """A drop-in `nn.Linear` (fp32 in, fp32 out) over int8 weights and bf16 arithmetic."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        q, scale = quantize_rows(weight)
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    @classmethod
    def from_linear(cls, linear: nn.Module) -> "Int8Linear":
        """From an `nn.Linear` (weight (out, in)) or a GPT-2 `Conv1D` (weight (in, out))."""
        return cls(getattr(linear, "weight_out_in", linear.weight), linear.bias)

    @property
    def weight(self) -> torch.Tensor:
        """The weight this layer actually multiplies by, dequantized to fp32 (out, in): for
        code that reads weights directly (state copying's K/V projection)."""
        return _dequantize(self.qweight, self.scale)

    weight_out_in = weight  # the name `Conv1D` gives its (out, in) view: the kernels read either

    def outputs(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Output features start:stop only, through the same int8 rows as `forward` (state copying's K/V)."""
        return self._multiply(x, self.qweight[start:stop], self.scale[start:stop], None if self.bias is None else self.bias[start:stop])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._multiply(x, self.qweight, self.scale, self.bias)

    def _multiply(self, x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()
        if _fused_ok(self.in_features, x2):
            y = _FUSED_OP(x2, qweight, scale)
        else:
            y = F.linear(x2, _dequantize(qweight, scale).to(torch.bfloat16))
        y = y.view(*lead, qweight.shape[0])
        return y.float() if bias is None else torch.add(bias, y)  # bf16 + fp32 bias -> fp32 in one op

    def _apply(self, fn, recurse=True):
        _refuse_dtype_change(fn, torch.bfloat16, "an Int8Linear's scales")
        return super()._apply(fn, recurse)


def _refuse_dtype_change(fn, dtype: torch.dtype, what: str) -> None:
    """`Module.to(dtype)` / `.half()` / `.float()` reach `_apply` with a converting `fn`: refuse those, keep device moves."""
    probe = fn(torch.zeros(1, dtype=dtype))
    if probe.dtype != dtype:
        raise EarlyExitError(
            f"{what} must stay {dtype} (the int8 op's contract); converting to {probe.dtype} would break it: "
            "quantize an fp32 model in the dtype you want instead"
        )


class Int8GPT2(GPT2):
    """`GPT2` whose projections and vocabulary head are `Int8Linear`; embeddings and norms stay fp32.

    The int8 head's rounding decides near-ties wrongly often enough to matter for drafts, so
    the `rerank` largest int8 logits are recomputed exactly with the fp32 head rows (kept
    anyway as the token embedding): the argmax is then the fp32 head's whenever its winner is
    among them, for a few dozen microseconds instead of a full fp32 head.
    """

    rerank: int = 0

    def project(self, z: torch.Tensor) -> torch.Tensor:
        if self.int8_head is None:
            return super().project(z)
        return self._native_head(z)

    @property
    def _native_head(self) -> "NativeHead":
        if self.__dict__.get("_native") is None:
            self.__dict__["_native"] = NativeHead(self.int8_head, GPT2.head_weight.fget(self), self.rerank)
        return self.__dict__["_native"]

    @property
    def head_weight(self) -> torch.Tensor:
        """The head as it multiplies (dequantized int8 rows), computed once: export and GPU kernels read it."""
        if self.int8_head is None:
            return super().head_weight
        if self._dequantized_head is None:
            self._dequantized_head = self.int8_head.weight
        return self._dequantized_head

    _dequantized_head: torch.Tensor | None = None

    def _apply(self, fn, recurse=True):
        _refuse_dtype_change(fn, torch.float32, "an int8 copy's embeddings, norms and residual stream")
        self._dequantized_head = None  # a device move would leave the cached copies behind
        self.__dict__["_native"] = None
        return super()._apply(fn, recurse)


def reranked_projection(int8_head: Int8Linear, rows: torch.Tensor, z: torch.Tensor, rerank: int) -> torch.Tensor:
    """Vocabulary logits (..., V) through the int8 head, its `rerank` largest recomputed exactly with the fp32 `rows`
    (V, d): the fp32 head's argmax whenever that winner is among the int8 head's top `rerank`."""
    y = int8_head(z)
    if rerank:
        top = y.topk(min(rerank, y.shape[-1]), dim=-1).indices  # (..., r)
        exact = (rows[top] @ z.unsqueeze(-1)).squeeze(-1)  # (..., r, d) @ (..., d, 1)
        y = y.scatter(-1, top, exact)
    return y


class NativeHead:
    """`reranked_projection(int8, rows, z, rerank)`, one row of z in C++ (earlyexit.runtime.native's RerankedHead:
    the same int8 rows, bf16 input, fp32 rescoring of the top `rerank`; one call where torch takes ~10), built on
    first use; more rows, another device or no extension: the torch ops."""

    def __init__(self, int8: Int8Linear, rows: torch.Tensor, rerank: int):
        self.int8, self.rows, self.rerank, self.built = int8, rows, rerank, None

    def get(self, z: torch.Tensor):
        """The C++ head where it applies to z (one fp32 CPU row, the extension built), else None."""
        if z.numel() != self.int8.in_features or z.dtype != torch.float32 or z.device.type != "cpu":
            return None
        return self.cpp()

    def cpp(self):
        """The C++ head (built on first call; one row of fp32 on the CPU), or None where the extension is not built or
        nothing is rescored."""
        if not self.rerank:
            return None
        if self.built is None:
            from .native import reranked_head  # which imports this module

            self.built = reranked_head(self.int8.qweight, self.int8.scale, self.rows, self.rerank) or False
        return self.built or None

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        native = self.get(z)
        if native is not None:
            return native.logits(z.reshape(1, -1).contiguous()).view(z.shape[:-1] + (-1,))
        return reranked_projection(self.int8, self.rows, z, self.rerank)


class RerankedHead:
    """An fp32 model's vocabulary projection for early-exit mode: int8 rows (a quarter of the bytes a token reads
    there, which on a CPU is most of the head's time) with the top `rerank` logits recomputed in fp32."""

    def __init__(self, rows: torch.Tensor, rerank: int = 8):
        self.int8, self.rows, self.rerank = Int8Linear(rows, None), rows, rerank
        self.native = NativeHead(self.int8, rows, rerank)

    @staticmethod
    def supports(model: GPT2) -> bool:
        return type(model) is GPT2 and model.dtype == torch.float32 and _fused_ok(model.dims.n_embd, model.head_weight)

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        return self.native(z)


def quantize_int8(model: GPT2, head: bool = True, rerank: int = 8) -> Int8GPT2:
    """A weight-only int8 copy of an fp32 `GPT2` (the original is left untouched); `head=False`
    keeps the vocabulary projection in fp32, `rerank` (int8 head) recomputes that many top logits in fp32."""
    if model.dtype != torch.float32:
        raise EarlyExitError(f"int8 quantization starts from an fp32 model, got {model.dtype}")
    q = Int8GPT2(model.dims)  # built as what it is; the fp32 weights copied in, then the projections replaced
    if hasattr(model, "lm_head_weight"):  # an untied head is a parameter of its own
        q.lm_head_weight = nn.Parameter(torch.empty_like(model.lm_head_weight))
    q.load_state_dict(model.state_dict())
    for block in q.h:
        for parent, name in ((block.attn, "c_attn"), (block.attn, "c_proj"), (block.mlp, "c_fc"), (block.mlp, "c_proj")):
            setattr(parent, name, Int8Linear.from_linear(getattr(parent, name)))
    q.int8_head = Int8Linear(model.head_weight, None) if head else None
    q.rerank = rerank if head else 0
    from .native import lean_int8_step  # which imports this module

    q.lean = lean_int8_step(q)  # the C++ step where it builds, else the torch one
    return q.eval().requires_grad_(False)
