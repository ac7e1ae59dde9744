"""Export a GPT-2 checkpoint to ONNX with its KV cache, for ONNX Runtime (the deployment path IntelliCode shipped).

    python -m earlyexit.export.onnx [--model DIR] OUT.onnx

One graph serves prefill and decode: inputs `input_ids` (1, T) and the cache `past_k`,
`past_v` (L, 1, heads, P, head size) with P = 0 for a prompt; outputs the next-token
`logits` (1, V) of the last position and `present_k`, `present_v` (L, 1, heads, P + T,
head size) to feed back. Positions are P..P+T-1 and query t sees keys 0..P+t, so the
graph computes what our runtime computes, in float32, from the same weights.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import EarlyExitError


class CachedDecoder(nn.Module):
    """Our GPT2's blocks rewritten with a concatenated (not preallocated) cache: what an ONNX graph can hold."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor):
        m, dims = self.model, self.model.dims
        B, T = input_ids.shape
        P = past_k.shape[3]
        d, nh, hs = dims.n_embd, dims.n_head, dims.head_size
        x = m.wte(input_ids) + m.wpe(torch.arange(T, device=input_ids.device) + P)
        hidden_mask = (torch.arange(P + T, device=input_ids.device)[None, :] > torch.arange(T, device=input_ids.device)[:, None] + P)
        keys, values = [], []
        for i, block in enumerate(m.h):
            q, k, v = block.attn.c_attn(block.ln_1(x)).split(d, dim=-1)
            q, k, v = (t.reshape(B, T, nh, hs).transpose(1, 2) for t in (q, k, v))
            k = torch.cat([past_k[i], k], dim=2)
            v = torch.cat([past_v[i], v], dim=2)
            keys.append(k)
            values.append(v)
            scores = (q @ k.transpose(-1, -2)) * block.attn.scale
            y = scores.masked_fill(hidden_mask, float("-inf")).softmax(-1) @ v
            x = x + block.attn.c_proj(y.transpose(1, 2).reshape(B, T, d))
            x = x + block.mlp.c_proj(F.gelu(block.mlp.c_fc(block.ln_2(x)), approximate="tanh"))
        return m.logits(x[:, -1]), torch.stack(keys), torch.stack(values)


def empty_cache(dims, past: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (dims.n_layer, 1, dims.n_head, past, dims.head_size)
    return torch.zeros(shape), torch.zeros(shape)


def export_onnx(model, path: str | Path, opset: int = 17) -> Path:
    if model.dims.activation not in ("gelu_new", "gelu_pytorch_tanh"):
        raise EarlyExitError(f"the ONNX export writes the tanh GELU; this model uses {model.dims.activation!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    decoder = CachedDecoder(model.float()).eval()
    ids = torch.zeros(1, 3, dtype=torch.long)
    past_k, past_v = empty_cache(model.dims, past=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice; it needs no extra package
        torch.onnx.export(
            decoder, (ids, past_k, past_v), str(path), dynamo=False, opset_version=opset,
            input_names=["input_ids", "past_k", "past_v"], output_names=["logits", "present_k", "present_v"],
            dynamic_axes={"input_ids": {1: "new"}, "past_k": {3: "past"}, "past_v": {3: "past"},
                          "present_k": {3: "total"}, "present_v": {3: "total"}},
        )
    return path


def main(argv: list[str] | None = None) -> int:
    from . import export_main

    return export_main(argv, "onnx", __doc__, ".onnx", lambda model, tok, out, args: export_onnx(model, out), ())


if __name__ == "__main__":
    sys.exit(main())
