"""earlyexit: a dynamic-inference runtime for GPT-2 code-completion models.

    import earlyexit
    model, tokenizer = earlyexit.load_runtime_model()          # the embedded default
    completion = earlyexit.complete(model, tokenizer, "def fibonacci(n):")
    print(completion.text, completion.finish_reason, completion.token_ms)
    completions = earlyexit.complete_batch(model, tokenizer, ["import os\n", "class A:"])   # one per prompt

The functions are `complete`, not `generate`: `earlyexit.cli` is the command-line module
(`python -m earlyexit.generate`), and importing a submodule sets the package attribute of its name, so a
function of that name would be replaced by the module as soon as anything imported the CLI.
"""

from .errors import EarlyExitError
from .runtime.batch import complete_batch
from .runtime.decoding import Completion, GenerationSettings, complete
from .runtime.loading import DEFAULT_MODEL_DIR, load_runtime_model
from .runtime.model import GPT2, GPT2Dims, KVCache
from .runtime.policies import EarlyExit, FullDepth, Policy, SpeculativePolicy
from .runtime.speculative import Lossless

__all__ = [
    "Completion", "DEFAULT_MODEL_DIR", "EarlyExit", "EarlyExitError", "FullDepth", "GPT2", "GPT2Dims", "GenerationSettings", "KVCache",
    "Lossless", "Policy", "SpeculativePolicy", "complete", "complete_batch", "load_runtime_model",
]
__version__ = "0.1.0"
