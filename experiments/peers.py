"""The engines a user would pick instead of ours, on the same weights: ONNX Runtime and a GGML runner (ctransformers).

Each `*_engine` returns a runner with the benchmark's signature, (ids, max_new) -> (token
ids, seconds, per-token ms, None), decoding greedily (argmax of the logits the engine
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

    def run(ids: list[int], max_new: int):
        x, past_k, past_v = np.asarray([ids], np.int64), empty, empty
        tokens, stamps = [], []
        t0 = time.perf_counter()
        for _ in range(max_new):
            logits, past_k, past_v = session.run(None, {"input_ids": x, "past_k": past_k, "past_v": past_v})
            token = int(logits[0].argmax())
            tokens.append(token)
            stamps.append(time.perf_counter())
            if token == eos:
                break
            x = np.asarray([[token]], np.int64)
        return tokens, time.perf_counter() - t0, list(np.diff(stamps) * 1e3), None

    return run


def ggml_engine(model, tokenizer, work: Path, threads: int):
    eos = tokenizer.eos_token_id
    """ctransformers' GGML GPT-2 runner on our GGML file (earlyexit.export.ggml), float32."""
    try:
        from ctransformers import AutoModelForCausalLM
    except ImportError as e:
        raise PeerUnavailable(f"ctransformers not installed ({e.msg}); pip install .[bench]") from None
    from earlyexit.export.ggml import write_ggml

    path = write_ggml(model, tokenizer, work / "model-f32.bin")
    llm = AutoModelForCausalLM.from_pretrained(str(path), model_type="gpt2", threads=threads, context_length=model.dims.n_positions)

    def run(ids: list[int], max_new: int):
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
            if token == eos:
                break
            llm.eval([token])
        return tokens, time.perf_counter() - t0, list(np.diff(stamps) * 1e3), None

    return run
