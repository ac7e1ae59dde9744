"""Exports for the peer engines: the GGML file layout, and ONNX / GGML runners giving our runtime's greedy tokens."""

import struct

import numpy as np
import pytest
import torch

from earlyexit.runtime.decoding import GenerationSettings, complete
from earlyexit.export.ggml import GGML_MAGIC, byte_level_alphabet, token_bytes, write_ggml
from earlyexit.runtime.model import GPT2

from conftest import make_tiny_hf


@pytest.fixture
def model(tiny_tokenizer):
    return GPT2.from_hf(make_tiny_hf(len(tiny_tokenizer), n_layer=2, n_embd=32, n_head=4, seed=3))


def read_ggml(path):
    """Parse a GGML GPT-2 file back: hyper-parameters, vocabulary, {name: array in numpy order}."""
    raw = path.read_bytes()
    magic, *hparams = struct.unpack_from("<I6i", raw, 0)
    offset = 28
    (n_vocab,) = struct.unpack_from("<i", raw, offset)
    offset += 4
    vocab = []
    for _ in range(n_vocab):
        (length,) = struct.unpack_from("<I", raw, offset)
        vocab.append(raw[offset + 4:offset + 4 + length])
        offset += 4 + length
    tensors = {}
    while offset < len(raw):
        n_dims, name_len, ftype = struct.unpack_from("<3i", raw, offset)
        extents = struct.unpack_from(f"<{n_dims}i", raw, offset + 12)
        offset += 12 + 4 * n_dims
        name = raw[offset:offset + name_len].decode()
        offset += name_len
        count = int(np.prod(extents))
        tensors[name] = np.frombuffer(raw, np.float32, count, offset).reshape(tuple(reversed(extents)))
        offset += 4 * count
        assert ftype == 0
    return magic, hparams, vocab, tensors


def test_byte_level_alphabet_covers_every_byte_once():
    alphabet = byte_level_alphabet()
    assert sorted(alphabet.values()) == list(range(256)) and alphabet["A"] == ord("A") and alphabet["\u0120"] == ord(" ")


def test_ggml_file_holds_every_weight_in_ggml_order(tmp_path, model, tiny_tokenizer):
    magic, hparams, vocab, tensors = read_ggml(write_ggml(model, tiny_tokenizer, tmp_path / "m.bin"))
    d = model.dims
    assert magic == GGML_MAGIC and hparams == [d.vocab_size, d.n_positions, d.n_embd, d.n_head, d.n_layer, 0]
    ids = tiny_tokenizer.encode("def add(a, b):\n    return a + b")
    assert b"".join(vocab[i] for i in ids).decode() == tiny_tokenizer.decode(ids) and vocab == token_bytes(tiny_tokenizer)
    assert len(tensors) == 5 + 12 * d.n_layer
    np.testing.assert_array_equal(tensors["model/wte"], model.wte.weight.numpy())
    np.testing.assert_array_equal(tensors["model/lm_head"], model.head_weight.numpy())
    # ggml multiplies by (out, in) rows: Hugging Face's (and our) Conv1D (in, out) transposed
    np.testing.assert_array_equal(tensors["model/h1/attn/c_attn/w"], model.h[1].attn.c_attn.weight.numpy().T)
    np.testing.assert_array_equal(tensors["model/h0/mlp/c_proj/w"], model.h[0].mlp.c_proj.weight.numpy().T)
    assert tensors["model/h0/mlp/c_fc/w"].shape == (4 * d.n_embd, d.n_embd)


def test_ggml_runner_gives_our_greedy_tokens(tmp_path, model, tiny_tokenizer):
    pytest.importorskip("ctransformers", reason="the GGML peer is the optional [bench] extra")
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
    from peers import ggml_engine

    run = ggml_engine(model, tiny_tokenizer, tmp_path, threads=1)
    for prompt in ("class Stack:", "for i in range(10):\n    print("):
        ids = tiny_tokenizer.encode(prompt)
        ours = complete(model, tiny_tokenizer, ids, GenerationSettings(max_new_tokens=12)).token_ids
        assert run(ids, 12)[0] == ours
        assert run(ids, 12)[0] == ours  # a second call starts from a reset context


def test_onnx_export_matches_our_runtime(tmp_path, model, tiny_tokenizer):
    ort = pytest.importorskip("onnxruntime", reason="the ONNX Runtime peer is the optional [bench] extra")
    from earlyexit.export.onnx import CachedDecoder, empty_cache, export_onnx

    ids = torch.tensor([tiny_tokenizer.encode("def add(a, b):")])
    # the concatenated-cache graph computes what the runtime computes: prefill, then one step on the cache
    logits, k, v = CachedDecoder(model)(ids, *empty_cache(model.dims))
    cache = model.new_cache(1, 32)
    torch.testing.assert_close(logits, model(ids, cache, 0)[:, -1], rtol=1e-5, atol=1e-5)
    nxt = logits.argmax(-1, keepdim=True)
    torch.testing.assert_close(CachedDecoder(model)(nxt, k, v)[0], model(nxt, cache, ids.shape[1])[:, -1], rtol=1e-5, atol=1e-5)
    session = ort.InferenceSession(str(export_onnx(model, tmp_path / "m.onnx")), providers=["CPUExecutionProvider"])
    past_k, past_v = (t.numpy() for t in empty_cache(model.dims))
    x, tokens = ids.numpy(), []
    for _ in range(10):
        out, past_k, past_v = session.run(None, {"input_ids": x, "past_k": past_k, "past_v": past_v})
        tokens.append(int(out[0].argmax()))
        x = np.asarray([[tokens[-1]]])
    assert tokens == complete(model, tiny_tokenizer, ids[0].tolist(), GenerationSettings(max_new_tokens=10)).token_ids


def gguf_read(path):
    gguf = pytest.importorskip("gguf", reason="GGUF export needs the gguf package (the [dev] and [bench] extras)")
    reader = gguf.GGUFReader(str(path))
    fields = {name: field.contents() for name, field in reader.fields.items()}
    return gguf, fields, {t.name: t for t in reader.tensors}


def test_gguf_file_holds_every_weight_in_llama_cpp_gpt2_layout(tmp_path, model, tiny_tokenizer):
    from earlyexit.export.gguf import write_gguf

    gguf, fields, tensors = gguf_read(write_gguf(model, tiny_tokenizer, tmp_path / "m.gguf"))
    d = model.dims
    assert fields["general.architecture"] == "gpt2"
    assert (fields["gpt2.block_count"], fields["gpt2.embedding_length"], fields["gpt2.attention.head_count"],
            fields["gpt2.context_length"], fields["gpt2.feed_forward_length"]) == (d.n_layer, d.n_embd, d.n_head, d.n_positions, 4 * d.n_embd)
    assert (fields["tokenizer.ggml.model"] == "gpt2"
            and fields["tokenizer.ggml.tokens"] == tiny_tokenizer.convert_ids_to_tokens(list(range(d.vocab_size))))
    assert fields["tokenizer.ggml.eos_token_id"] == tiny_tokenizer.eos_token_id and len(fields["tokenizer.ggml.merges"]) > 0
    assert len(tensors) == 5 + 12 * d.n_layer
    values = {name: np.asarray(t.data).reshape(tuple(reversed(t.shape.tolist()))) for name, t in tensors.items()}
    np.testing.assert_array_equal(values["token_embd.weight"], model.wte.weight.numpy())
    np.testing.assert_array_equal(values["output.weight"], model.head_weight.numpy())
    # GGUF takes PyTorch's (out, in): Hugging Face's (and our) Conv1D (in, out) transposed
    np.testing.assert_array_equal(values["blk.1.attn_qkv.weight"], model.h[1].attn.c_attn.weight.numpy().T)
    np.testing.assert_array_equal(values["blk.0.ffn_down.weight"], model.h[0].mlp.c_proj.weight.numpy().T)
    np.testing.assert_array_equal(values["blk.0.ffn_norm.bias"], model.h[0].ln_2.bias.numpy())
    assert values["blk.0.ffn_up.weight"].shape == (4 * d.n_embd, d.n_embd)


def test_gguf_q8_0_stores_the_projections_and_head_as_q8_0_within_their_rounding(tmp_path, tiny_tokenizer):
    from earlyexit.export.gguf import write_gguf

    model = GPT2.from_hf(make_tiny_hf(len(tiny_tokenizer), n_layer=2, n_embd=64, n_head=4, seed=1))
    gguf, fields, tensors = gguf_read(write_gguf(model, tiny_tokenizer, tmp_path / "m.gguf", "q8_0"))
    assert tensors["blk.0.attn_qkv.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert tensors["output.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert tensors["token_embd.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert tensors["blk.0.attn_qkv.bias"].tensor_type == gguf.GGMLQuantizationType.F32
    t = tensors["blk.1.ffn_down.weight"]
    back = gguf.quants.dequantize(t.data, t.tensor_type)
    want = model.h[1].mlp.c_proj.weight.numpy().T
    assert back.shape == want.shape
    assert np.abs(back - want).max() <= np.abs(want).max() / 127 + 1e-6  # a scale per 32 weights: error <= scale / 2


def test_gguf_export_refuses_what_llama_cpp_would_compute_differently(tmp_path, tiny_tokenizer):
    from earlyexit.errors import EarlyExitError
    from earlyexit.export.gguf import write_gguf

    relu = GPT2.from_hf(make_tiny_hf(len(tiny_tokenizer), n_layer=1, n_embd=32))
    object.__setattr__(relu.dims, "activation", "relu")
    with pytest.raises(EarlyExitError, match="tanh GELU"):
        write_gguf(relu, tiny_tokenizer, tmp_path / "m.gguf")
    with pytest.raises(EarlyExitError, match="tensor type"):
        write_gguf(GPT2.from_hf(make_tiny_hf(len(tiny_tokenizer), n_layer=1, n_embd=32)), tiny_tokenizer, tmp_path / "m.gguf", "q4_0")


@pytest.mark.parametrize("tensor_type", ["f32", "q8_0"])
def test_llama_cpp_on_our_gguf_writes_our_greedy_tokens(tmp_path, tiny_tokenizer, tensor_type):
    pytest.importorskip("llama_cpp", reason="llama.cpp's Python binding is the optional [bench] extra")
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
    from peers import llama_cpp_engine

    model = GPT2.from_hf(make_tiny_hf(len(tiny_tokenizer), n_layer=2, n_embd=64, n_head=4, seed=3))
    run = llama_cpp_engine(model, tiny_tokenizer, tmp_path, threads=1, tensor_type=tensor_type)
    same = total = 0
    for prompt in ("class Stack:", "for i in range(10):\n    print("):
        ids = tiny_tokenizer.encode(prompt)
        ours = complete(model, tiny_tokenizer, ids, GenerationSettings(max_new_tokens=12)).token_ids
        theirs = run(ids, 12)[0]
        assert run(ids, 12)[0] == theirs  # a second call starts from a reset context
        if tensor_type == "f32":
            assert theirs == ours
        same += sum(a == b for a, b in zip(theirs, ours))
        total += len(ours)
    assert same >= 0.5 * total  # Q8_0 rounds every weight: its tokens may part from ours, not all of them
