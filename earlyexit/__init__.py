"""earlyexit: a dynamic-inference runtime for GPT-2 code-completion models.

    import earlyexit
    model, tokenizer = earlyexit.load_runtime_model()          # the embedded default
    completion = earlyexit.generate(model, tokenizer, "def fibonacci(n):")
    print(completion.text, completion.finish_reason, completion.token_ms)
    completions = earlyexit.generate_batch(model, tokenizer, ["import os\n", "class A:"])   # one per prompt
"""

from .batch import generate_batch
from .decoding import Completion, GenerationSettings, generate
from .errors import EarlyExitError
from .loading import DEFAULT_MODEL_DIR, load_runtime_model
from .model import GPT2, GPT2Dims, KVCache

__all__ = [
    "Completion", "DEFAULT_MODEL_DIR", "EarlyExitError", "GPT2", "GPT2Dims", "GenerationSettings", "KVCache",
    "generate", "generate_batch", "load_runtime_model",
]
__version__ = "0.1.0"
