"""Write a GPT-2 checkpoint in the GGML GPT-2 file layout, for C++ runners (ggml's gpt-2 example, ctransformers).

    python -m earlyexit.export.ggml [--model DIR] OUT.bin

The layout, as ggml's examples/gpt-2 reads it: the magic 0x67676d6c; six int32
hyper-parameters (vocabulary, context, width, heads, layers, ftype: 0 = float32); the
vocabulary as (uint32 length, bytes) per token; then every tensor as (int32 dims, int32
name length, int32 type, int32 extents innermost first, name, raw data). Linear weights
are stored (out, in), i.e. transposed from Hugging Face's Conv1D (in, out), which is the
orientation ggml_mul_mat wants. The LM head is written as its own tensor, so an untied
head survives. Everything is float32: the runner computes what our runtime computes.
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import numpy as np

from ..errors import EarlyExitError

GGML_MAGIC = 0x67676D6C
FTYPE_F32 = 0


def byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE's printable stand-in character for each byte, inverted: char -> byte.

    Printable Latin-1 bytes stand for themselves; the other 68 bytes are mapped, in order,
    to the code points from 256 up (so the vocabulary never holds whitespace or controls).
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1), *range(ord("\u00ae"), ord("\u00ff") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + i): b for i, b in enumerate(others)}}


def token_bytes(tokenizer) -> list[bytes]:
    """Every token id's bytes (the byte-level alphabet undone)."""
    byte_decoder = byte_level_alphabet()
    vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    out = []
    for piece in vocab:
        try:
            out.append(bytes(byte_decoder[c] for c in piece))
        except KeyError:  # a special token written as text, e.g. <|endoftext|>
            out.append(piece.encode("utf-8"))
    return out


def ggml_tensors(model) -> list[tuple[str, np.ndarray]]:
    """(ggml name, float32 array in ggml's row order) for every weight of our GPT2 runtime model."""
    sd = {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}
    out = [("model/ln_f/g", sd["ln_f.weight"]), ("model/ln_f/b", sd["ln_f.bias"]),
           ("model/wte", sd["wte.weight"]), ("model/wpe", sd["wpe.weight"]),
           ("model/lm_head", model.head_weight.detach().float().cpu().numpy())]
    names = {"ln_1.weight": "ln_1/g", "ln_1.bias": "ln_1/b", "ln_2.weight": "ln_2/g", "ln_2.bias": "ln_2/b",
             "attn.c_attn.weight": "attn/c_attn/w", "attn.c_attn.bias": "attn/c_attn/b",
             "attn.c_proj.weight": "attn/c_proj/w", "attn.c_proj.bias": "attn/c_proj/b",
             "mlp.c_fc.weight": "mlp/c_fc/w", "mlp.c_fc.bias": "mlp/c_fc/b",
             "mlp.c_proj.weight": "mlp/c_proj/w", "mlp.c_proj.bias": "mlp/c_proj/b"}
    for i in range(model.dims.n_layer):
        for ours, theirs in names.items():
            w = sd[f"h.{i}.{ours}"]
            out.append((f"model/h{i}/{theirs}", np.ascontiguousarray(w.T) if w.ndim == 2 else w))  # Conv1D (in, out) -> ggml's (out, in)
    return out


def write_ggml(model, tokenizer, path: str | Path) -> Path:
    dims = model.dims
    if dims.activation not in ("gelu_new", "gelu_pytorch_tanh"):
        raise EarlyExitError(f"GGML's GPT-2 uses the tanh GELU; this model uses {dims.activation!r}")
    if getattr(dims, "scale_attn_by_inverse_layer_idx", False):
        raise EarlyExitError("GGML's GPT-2 does not scale attention by the inverse layer index")
    vocab = token_bytes(tokenizer)
    if len(vocab) != dims.vocab_size:
        raise EarlyExitError(f"tokenizer has {len(vocab)} tokens, the model {dims.vocab_size}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack("<I", GGML_MAGIC))
        f.write(struct.pack("<6i", dims.vocab_size, dims.n_positions, dims.n_embd, dims.n_head, dims.n_layer, FTYPE_F32))
        f.write(struct.pack("<i", len(vocab)))
        for piece in vocab:
            f.write(struct.pack("<I", len(piece)))
            f.write(piece)
        for name, data in ggml_tensors(model):
            data = np.ascontiguousarray(data, dtype=np.float32)
            encoded = name.encode()
            f.write(struct.pack("<3i", data.ndim, len(encoded), FTYPE_F32))
            f.write(struct.pack(f"<{data.ndim}i", *reversed(data.shape)))  # ggml extents: innermost first
            f.write(encoded)
            f.write(data.tobytes())
    return path


def main(argv: list[str] | None = None) -> int:
    from . import export_main

    return export_main(argv, "ggml", __doc__, ".bin", lambda model, tok, out, args: write_ggml(model, tok, out), ())


if __name__ == "__main__":
    sys.exit(main())
