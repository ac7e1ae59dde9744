"""Write a GPT-2 checkpoint as GGUF, llama.cpp's file format: the same weights, for the CPU engine to beat.

    python -m earlyexit.export.gguf [--model DIR] [--type f32|q8_0] OUT.gguf

llama.cpp's GPT-2 layout (architecture `gpt2`, as its own converter writes it):
`token_embd`, `position_embd`, `output_norm`, `output` and per block `blk.N.attn_norm`,
`attn_qkv`, `attn_output`, `ffn_norm`, `ffn_up`, `ffn_down`, weights and biases. Hugging
Face's Conv1D stores projections (in, out); GGUF takes PyTorch's (out, in) and writes
the extents innermost first, so each projection is transposed here. The head is written
as `output` even when tied to the embedding, so an untied head survives. The tokenizer
goes in as byte-level BPE (`gpt2` model, GPT-2 pre-tokenizer): the vocabulary in its
byte-level characters, the merges in rank order, special tokens marked as control.

`--type q8_0` stores every projection and the head as Q8_0 (a float16 scale per 32
weights), llama.cpp's int8 format, the counterpart of our `--weights int8`; norms, biases
and the position table stay float32, the token table too (a row is read per token).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from ..errors import EarlyExitError

TYPES = ("f32", "q8_0")
_PROJECTIONS = {"attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}
_NORMS = {"ln_1": "attn_norm", "ln_2": "ffn_norm"}


def gguf_tensors(model) -> list[tuple[str, np.ndarray, bool]]:
    """(GGUF name, float32 array in PyTorch's (out, in) order, whether it is a matrix Q8_0 may quantize)."""
    sd = {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}
    out = [("token_embd.weight", sd["wte.weight"], False), ("position_embd.weight", sd["wpe.weight"], False),
           ("output_norm.weight", sd["ln_f.weight"], False), ("output_norm.bias", sd["ln_f.bias"], False),
           ("output.weight", model.head_weight.detach().float().cpu().numpy(), True)]
    for i in range(model.dims.n_layer):
        for ours, theirs in _NORMS.items():
            out += [(f"blk.{i}.{theirs}.weight", sd[f"h.{i}.{ours}.weight"], False), (f"blk.{i}.{theirs}.bias", sd[f"h.{i}.{ours}.bias"], False)]
        for ours, theirs in _PROJECTIONS.items():
            w = sd[f"h.{i}.{ours}.weight"]  # Conv1D (in, out)
            out += [(f"blk.{i}.{theirs}.weight", np.ascontiguousarray(w.T), True), (f"blk.{i}.{theirs}.bias", sd[f"h.{i}.{ours}.bias"], False)]
    return out


def tokenizer_tables(tokenizer) -> tuple[list[str], list[int], list[str]]:
    """The vocabulary (byte-level strings, by id), each token's GGUF type and the BPE merges in rank order."""
    import gguf

    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    model = backend.get("model", {})
    if model.get("type") != "BPE":
        raise EarlyExitError(f"GGUF export writes byte-level BPE tokenizers; this one is {model.get('type')!r}")
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    special = {t["id"] for t in backend.get("added_tokens", []) if t.get("special")}
    types = [int(gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL) for i in range(len(tokens))]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return tokens, types, merges


def write_gguf(model, tokenizer, path: str | Path, tensor_type: str = "f32") -> Path:
    import gguf

    if tensor_type not in TYPES:
        raise EarlyExitError(f"GGUF tensor type must be one of {', '.join(TYPES)}, got {tensor_type!r}")
    dims = model.dims
    if dims.activation not in ("gelu_new", "gelu_pytorch_tanh"):
        raise EarlyExitError(f"llama.cpp's GPT-2 uses the tanh GELU; this model uses {dims.activation!r}")
    if dims.scale_attn_by_inverse_layer_idx:
        raise EarlyExitError("llama.cpp's GPT-2 does not scale attention by the inverse layer index")
    tokens, types, merges = tokenizer_tables(tokenizer)
    if len(tokens) != dims.vocab_size:
        raise EarlyExitError(f"tokenizer has {len(tokens)} tokens, the model {dims.vocab_size}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_name("earlyexit GPT-2")
    writer.add_context_length(dims.n_positions)
    writer.add_embedding_length(dims.n_embd)
    writer.add_feed_forward_length(4 * dims.n_embd)
    writer.add_block_count(dims.n_layer)
    writer.add_head_count(dims.n_head)
    writer.add_layer_norm_eps(dims.layer_norm_epsilon)
    q8 = tensor_type == "q8_0"
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if q8 else gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    eos = tokenizer.eos_token_id
    if eos is not None:
        writer.add_eos_token_id(eos)
        writer.add_bos_token_id(tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos)
    writer.add_add_bos_token(False)  # GPT-2 completes raw text: no BOS in front of a prompt
    for name, data, matrix in gguf_tensors(model):
        data = np.ascontiguousarray(data, dtype=np.float32)
        if q8 and matrix and data.shape[-1] % 32 == 0:
            # bytes (rows, blocks x 34); the writer recovers the (rows, columns) shape from the type
            writer.add_tensor(name, gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0), raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def main(argv: list[str] | None = None) -> int:
    from . import export_main

    kind = ("--type", {"choices": TYPES, "default": "f32", "help": "tensor type of the projections and the head (default %(default)s)"})
    return export_main(argv, "gguf", __doc__, ".gguf", lambda model, tok, out, args: write_gguf(model, tok, out, args.type), [kind])


if __name__ == "__main__":
    sys.exit(main())
