"""The engines a user would pick instead of ours, on the same weights: llama.cpp, ONNX Runtime, a GGML runner (ctransformers).

Each `*_engine` returns a runner with the benchmark's signature, (ids, max_new, stop_ids) ->
(token ids, seconds, per-token ms, None), ending after a token in `stop_ids`, decoding greedily (argmax of the logits the engine
returns, the same rule as ours), or raises `PeerUnavailable` saying why (the package is not
installed: `pip install .[bench]`), so the benchmark reports it instead of dropping it.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import numpy as np


class PeerUnavailable(Exception):
    pass


def ort_engine(model, eos: int, work: Path, threads: int):
    """ONNX Runtime on our export (earlyexit.export.onnx), KV cache fed back between steps."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise PeerUnavailable(f"onnxruntime not installed ({e.msg}); pip install .[bench]") from None
    from earlyexit.export.onnx import export_onnx

    path = export_onnx(model, work / "model.onnx")
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    dims = model.dims
    empty = np.zeros((dims.n_layer, 1, dims.n_head, 0, dims.head_size), np.float32)

    def run(ids: list[int], max_new: int, stop_ids: frozenset[int] = frozenset()):
        x, past_k, past_v = np.asarray([ids], np.int64), empty, empty
        tokens, stamps = [], []
        t0 = time.perf_counter()
        for _ in range(max_new):
            logits, past_k, past_v = session.run(None, {"input_ids": x, "past_k": past_k, "past_v": past_v})
            token = int(logits[0].argmax())
            tokens.append(token)
            stamps.append(time.perf_counter())
            if token == eos or token in stop_ids:
                break
            x = np.asarray([[token]], np.int64)
        return tokens, time.perf_counter() - t0, list(np.diff(stamps) * 1e3), None

    return run


def ggml_engine(model, tokenizer, work: Path, threads: int):
    """ctransformers' GGML GPT-2 runner on our GGML file (earlyexit.export.ggml), float32."""
    eos = tokenizer.eos_token_id
    try:
        from ctransformers import AutoModelForCausalLM
    except ImportError as e:
        raise PeerUnavailable(f"ctransformers not installed ({e.msg}); pip install .[bench]") from None
    from earlyexit.export.ggml import write_ggml

    path = write_ggml(model, tokenizer, work / "model-f32.bin")
    llm = AutoModelForCausalLM.from_pretrained(str(path), model_type="gpt2", threads=threads, context_length=model.dims.n_positions)

    def run(ids: list[int], max_new: int, stop_ids: frozenset[int] = frozenset()):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # reset() is marked deprecated in favour of generate(), which samples
            llm.reset()
        tokens, stamps = [], []
        t0 = time.perf_counter()
        llm.eval(ids)
        for _ in range(max_new):
            token = int(np.argmax(llm.logits))
            tokens.append(token)
            stamps.append(time.perf_counter())
            if token == eos or token in stop_ids:
                break
            llm.eval([token])
        return tokens, time.perf_counter() - t0, list(np.diff(stamps) * 1e3), None

    return run


def llama_cpp_engine(model, tokenizer, work: Path, threads: int, tensor_type: str = "f32"):
    """llama.cpp (llama-cpp-python) on our weights written as GGUF (earlyexit.export.gguf): `f32` or `q8_0`.

    Greedy by argmax over its logits after each token, one `eval` per token: the same loop ours runs."""
    try:
        from llama_cpp import Llama
    except ImportError as e:
        raise PeerUnavailable(f"llama-cpp-python not installed ({e.msg}); pip install .[bench]") from None
    from earlyexit.export.gguf import write_gguf

    eos = tokenizer.eos_token_id
    path = write_gguf(model, tokenizer, work / f"model-{tensor_type}.gguf", tensor_type)
    llm = Llama(model_path=str(path), n_ctx=model.dims.n_positions, n_batch=model.dims.n_positions, n_threads=threads,
                n_threads_batch=threads, logits_all=False, verbose=False)

    vocab = model.dims.vocab_size

    def last_logits():  # the newest position's logits, read in place (what llama.cpp's own sampler reads): without
        # logits_all, llama-cpp-python >= 0.3 no longer copies them into `scores`
        return np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(vocab,))

    def run(ids: list[int], max_new: int, stop_ids: frozenset[int] = frozenset()):
        llm.reset()
        tokens, stamps = [], []
        t0 = time.perf_counter()
        llm.eval(ids)
        for _ in range(max_new):
            token = int(np.argmax(last_logits()))
            tokens.append(token)
            stamps.append(time.perf_counter())
            if token == eos or token in stop_ids or llm.n_tokens >= model.dims.n_positions:
                break
            llm.eval([token])
        return tokens, time.perf_counter() - t0, list(np.diff(stamps) * 1e3), None

    return run
