"""Exports for other engines: ONNX with the KV cache (`onnx`) and the GGML GPT-2 layout (`ggml`)."""
