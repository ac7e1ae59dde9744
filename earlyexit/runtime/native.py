"""The native single-token steps: the lean steps' arithmetic (earlyexit.runtime.lean_step) in C++, one call per token.

At the default model's size (d = 256) a token through a torch lean step is ~600 aten calls, and their dispatch costs
more than their arithmetic. `NativeInt8Step` and `NativeFp32Step` run the same ops (csrc/step.cpp: int8 with
bf16-rounded inputs and outputs, fp32 with the weights as rows, transposed once) with none of that, on torch's own
thread pool; `quantize_int8` and `attach_lean_step` attach them as `model.lean` wherever they build. The exit heads
and their controller are there too (csrc/heads.h; `controller` builds one): an early-exit token is one call
(`decide`: blocks, checks, state copy, the head it leaves by) and lossless mode's stop check runs inside its verify
window (`window_checked`). The sums run in another order, so values can differ from the torch path in their last bits
(tested within that).

The extension is compiled on first use, once per machine (torch.utils.cpp_extension: gcc, ninja, -O3
-march=native; ~40 s on 2 cores, cached in torch's extension directory under a key of the sources, torch, Python,
flags and CPU). Where it cannot be built (no compiler, no ninja), the torch path runs and one line on stderr says
why. `EARLYEXIT_NATIVE=0` turns it off.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
import threading
from pathlib import Path

import torch

from .lean_step import LeanFp32Step, LeanInt8Step
from .heads import STOP
from .model import KVCache

CSRC = Path(__file__).with_name("csrc")
SOURCE, HEADERS = CSRC / "step.cpp", [CSRC / "ops.h", CSRC / "heads.h", CSRC / "phases.h"]
ACTIVATIONS = {"gelu_new": 0, "gelu_pytorch_tanh": 0, "gelu_fast": 0, "relu": 1}  # csrc's enum Activation
_lock = threading.Lock()
_built: dict[str, object] = {}  # "module" or "failure"


def enabled() -> bool:
    """Whether the native step may be used (EARLYEXIT_NATIVE=0 turns it off)."""
    return os.environ.get("EARLYEXIT_NATIVE", "1") != "0"


FLAGS = ["-O3", "-march=native", "-fopenmp"]


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return platform.processor()


def build_directory() -> Path:
    """Where this source, torch, Python, flags and CPU build to (torch's extension cache; TORCH_EXTENSIONS_DIR moves
    it): a new directory whenever any of them changes, so a build for another CPU or torch is never loaded."""
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), *(h.read_bytes() for h in HEADERS), torch.__version__.encode(), sys.version.encode(), " ".join(FLAGS).encode(),
                 _cpu_flags().encode()):
        key.update(part)
    base = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions")
    return base / f"earlyexit_step_{key.hexdigest()[:16]}"


def _ninja_on_path() -> None:
    """torch runs `ninja` from PATH; the pip package's binary is not on it when the venv is not activated."""
    try:
        import ninja
    except ImportError:
        return
    if ninja.BIN_DIR not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def extension():
    """The compiled module, built on first call; None where it cannot be built (the reason printed once)."""
    with _lock:
        if not _built:
            try:
                from torch.utils.cpp_extension import load

                where = build_directory()
                name = where.name
                if not (where / f"{name}.so").exists():
                    print("earlyexit: building the native step (once per machine, ~40 s)", file=sys.stderr, flush=True)
                where.mkdir(parents=True, exist_ok=True)
                _ninja_on_path()
                _built["module"] = load(name=name, sources=[str(SOURCE)], extra_cflags=FLAGS, extra_ldflags=["-fopenmp"],
                                        build_directory=str(where), verbose=False)
            except Exception as e:  # no compiler, no ninja, a failed build: the torch path still runs
                reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                _built["failure"] = reason
                print(f"earlyexit: native step unavailable ({reason}); using the torch path", file=sys.stderr)
        return _built.get("module")


def _on_cpu_fp32(model) -> bool:
    w = model.wte.weight
    return w.device.type == "cpu" and w.dtype == torch.float32 and model.dims.activation in ACTIVATIONS


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.detach().float().contiguous()


def _rows(conv1d_weight: torch.Tensor) -> torch.Tensor:
    """A Conv1D weight (in, out) as fp32 rows (out, in): each output's weights one contiguous stream (a copy)."""
    return conv1d_weight.detach().float().t().contiguous()


class _Native:
    """The C++ half both native steps share: every block, state copy, the logits and the greedy token through
    `self.native`, in the lean steps' interface. `self.native` is built by the step's `_gather` while the model is
    fp32 on the CPU; after a move elsewhere (`model.to("cuda")`) it is None and the torch lean step's methods run."""

    native = None

    def _gather(self) -> None:
        super()._gather()
        self.native = self._build() if _on_cpu_fp32(self.model) else None

    def built(self):
        """The C++ step, built on first use (gathered again if the model's tensors changed); None off the CPU. Ask this,
        not `self.native`, before a first call: `native` is None until something has used the step."""
        self.fresh()
        return self.native

    def block(self, i: int, x: torch.Tensor, cache: KVCache, pos: int) -> torch.Tensor:
        return self.blocks(i, i + 1, x, cache, pos)

    def _torch_blocks(self, start: int, stop: int, x: torch.Tensor, cache: KVCache, pos: int) -> torch.Tensor:
        for i in range(start, stop):
            x = super().block(i, x, cache, pos)  # the torch lean step's block (its `blocks` would call ours)
        return x

    def blocks(self, start: int, stop: int, x: torch.Tensor, cache: KVCache, pos: int) -> torch.Tensor:
        self.fresh()
        if self.native is None:
            return self._torch_blocks(start, stop, x, cache, pos)
        x = x.clone()  # callers may hold the stream they passed: the C++ writes in place
        self.native.blocks(x, cache.k, cache.v, pos, start, stop)
        return x

    def fill_kv(self, i: int, h: torch.Tensor, cache: KVCache, pos: int) -> None:
        self.fresh()
        if self.native is None:
            return super().fill_kv(i, h, cache, pos)
        self.native.fill_kv(i, h.contiguous(), cache.k, cache.v, pos)

    def final_logits(self, x: torch.Tensor) -> torch.Tensor:
        self.fresh()
        return super().final_logits(x) if self.native is None else self.native.logits(x.contiguous())

    @torch.inference_mode()
    def logits(self, token: int, cache: KVCache, pos: int) -> torch.Tensor:
        return self.final_logits(self.residual(token, cache, pos))

    @torch.inference_mode()
    def greedy(self, token: int, cache: KVCache, pos: int) -> int:
        self.fresh()
        if self.native is None:
            return super().greedy(token, cache, pos)
        return int(self.native.greedy(self.residual(token, cache, pos)))

    @torch.inference_mode()
    def window(self, tokens: list[int], cache: KVCache, pos: int) -> torch.Tensor | None:
        """Logits (T, V) of T tokens at positions pos.., their K/V written: row t the single-token step's logits at
        pos + t, bit for bit, with every weight read once (lossless mode's verification); None off the CPU."""
        x = self._window_input(tokens, pos)
        return None if x is None else self.native.window(x, cache.k, cache.v, pos)

    @torch.inference_mode()
    def window_from(self, streams: torch.Tensor, cache: KVCache, pos: int, start: int) -> torch.Tensor | None:
        """`window` from block `start` on: streams (T, d) are the residual streams after block start - 1 at positions
        pos.., whose K/V below `start` are cached already (self-speculation's verification); None off the CPU."""
        if self.built() is None:
            return None
        return self.native.window_from(streams.contiguous().clone(), cache.k, cache.v, pos, start)  # written in place

    def _window_input(self, tokens: list[int], pos: int) -> torch.Tensor | None:
        """The residual stream (T, d) entering the first block for a window of tokens; None off the CPU."""
        if self.built() is None:
            return None
        m = self.model
        return (m.wte.weight[tokens] + m.wpe.weight[pos:pos + len(tokens)]).contiguous()

    @torch.inference_mode()
    def decide(self, token: int, cache: KVCache, pos: int, prev_layers: int, controller) -> tuple[torch.Tensor | None, int, int] | None:
        """One early-exit token in one call (csrc's `Step::decide`): the blocks, the controller and the exit heads'
        confidence after each block they are asked at, the state copy on an exit, the head the token leaves by.
        (next-token logits (1, V), None on a stop; blocks run; action of earlyexit.runtime.heads); None off the CPU."""
        x = self.embed(token, pos)  # a new tensor: the C++ writes it in place
        if self.native is None:
            return None
        logits = torch.empty(1, self.model.dims.vocab_size)
        layers, action = self.native.decide(x, cache.k, cache.v, pos, prev_layers, controller, logits)
        return (None if action == STOP else logits), layers, action

    @torch.inference_mode()
    def window_checked(self, tokens: list[int], cache: KVCache, pos: int, controller) -> tuple[torch.Tensor, torch.Tensor] | None:
        """`window`, the controller asked at every position after every block it checks: (logits (T, V), whether it
        stops there (T,)); None off the CPU."""
        x = self._window_input(tokens, pos)
        return None if x is None else self.native.window_checked(x, cache.k, cache.v, pos, controller)


def profile_phases(lean, run) -> list[dict] | None:
    """Where `run()`'s native single-token calls on `lean` (a native lean step) spend their time, phase by phase
    (csrc/phases.h): [{"phase", "ms", "calls"}], or None where the step is not native. The timer is on only for
    `run`; window calls (lossless mode's verification) are not timed."""
    step = lean.built() if hasattr(lean, "built") else None  # built now if nothing has used it yet
    if step is None:
        return None
    step.set_profiling(True)
    try:
        run()
    finally:
        step.set_profiling(False)
    return [{"phase": name, "ms": ms, "calls": calls} for name, ms, calls in step.phases()]


def controller(heads, bias_table: torch.Tensor, check: list[bool], allow_exit: list[bool], exit_threshold: float,
               stop_threshold: float, confidence: dict[int, float] | None = None, exit_head=None):
    """The heads as csrc's `Controller`: the stop/exit/continue classifier asked after the blocks `check` names (exits
    allowed where `allow_exit` says; bias_table (L, L + 1, 3) is `ExitDecisions.bias_table`), the exit heads, and the
    confidence rule's thresholds {layer: max probability to leave at}. exit_head: the int8 `quantize.RerankedHead` an
    fp32 model's exits take their logits from, or None for the step's own head. None where the extension is not built
    or the heads are not on the CPU (a model moved to a GPU keeps its lean step, whose native half is then off)."""
    if not enabled() or heads.cls.weight.device.type != "cpu" or extension() is None:
        return None
    L = len(check)
    ln, cls = heads.cls_ln, heads.cls
    exit_ln_w = torch.stack([norm.weight for norm in heads.ln]) if L > 1 else torch.empty(0)
    exit_ln_b = torch.stack([norm.bias for norm in heads.ln]) if L > 1 else torch.empty(0)
    eps = heads.ln[0].eps if L > 1 else 1e-5
    none = torch.empty(0)
    down, up = (heads.down, heads.up) if heads.down is not None else (none, none)
    thresholds = [(confidence or {}).get(layer, -1.0) for layer in range(L)]
    native_head = None
    if exit_head is not None:
        native_head = exit_head.native.cpp()
        if native_head is None:
            return None  # the int8 exit head runs in torch here: so does the check
    return extension().Controller(_f32(ln.weight), _f32(ln.bias), float(ln.eps), _f32(cls.weight), _f32(bias_table),
                                  list(check), list(allow_exit), float(exit_threshold), float(stop_threshold),
                                  _f32(exit_ln_w), _f32(exit_ln_b), float(eps), _f32(down), _f32(up), thresholds, native_head)


class NativeInt8Step(_Native, LeanInt8Step):
    """`LeanInt8Step` in csrc/step.cpp (`Int8Step`): the same interface, bf16-rounded inputs to int8 rows."""

    @staticmethod
    def supports(model) -> bool:
        """An int8 copy the torch lean path takes, on the CPU in fp32, with an activation the C++ knows, the
        extension built."""
        return enabled() and LeanInt8Step.supports(model) and _on_cpu_fp32(model) and extension() is not None

    def _build(self):
        m, layers, scales = self.model, [], []
        for block in m.h:
            a, mlp = block.attn, block.mlp
            tensors = [_f32(block.ln_1.weight), _f32(block.ln_1.bias)]
            for lin in (a.c_attn, a.c_proj, None, mlp.c_fc, mlp.c_proj):
                if lin is None:
                    tensors += [_f32(block.ln_2.weight), _f32(block.ln_2.bias)]
                else:
                    tensors += [lin.qweight.contiguous(), _f32(lin.scale), _f32(lin.bias)]
            layers.append(tensors)
            scales.append(float(a.scale))
        head = [self.head.qweight.contiguous(), _f32(self.head.scale), _f32(self.head_rows)]
        return extension().Int8Step(layers, scales, _f32(m.ln_f.weight), _f32(m.ln_f.bias), head, self.n_head,
                                    float(self.eps), ACTIVATIONS[m.dims.activation], self.rerank)


class NativeFp32Step(_Native, LeanFp32Step):
    """`LeanFp32Step` in csrc/step.cpp (`Fp32Step`): fp32 throughout, each projection's weights as rows (N, K), the
    transpose of GPT-2's Conv1D layout, copied once (~38 MB for the default model): each output's weights are one
    contiguous stream, which this CPU reads ~1.7x faster per token than the (K, N) columns in place."""

    @staticmethod
    def supports(model) -> bool:
        return enabled() and LeanFp32Step.supports(model) and _on_cpu_fp32(model) and extension() is not None

    def _build(self):
        m, layers, scales = self.model, [], []
        for block in m.h:
            a, mlp = block.attn, block.mlp
            tensors = [_f32(block.ln_1.weight), _f32(block.ln_1.bias), _rows(a.c_attn.weight), _f32(a.c_attn.bias), _rows(a.c_proj.weight),
                       _f32(a.c_proj.bias), _f32(block.ln_2.weight), _f32(block.ln_2.bias), _rows(mlp.c_fc.weight), _f32(mlp.c_fc.bias),
                       _rows(mlp.c_proj.weight), _f32(mlp.c_proj.bias)]
            layers.append(tensors)
            scales.append(float(a.scale))
        return extension().Fp32Step(layers, scales, _f32(m.ln_f.weight), _f32(m.ln_f.bias), [_f32(m.head_weight)],
                                    self.n_head, float(self.eps), ACTIVATIONS[m.dims.activation], 0)


def reranked_head(qweight: torch.Tensor, scale: torch.Tensor, rows: torch.Tensor, rerank: int):
    """The C++ `reranked_projection` of one row (quantize.NativeHead), or None where the extension is not built."""
    if not enabled() or extension() is None or qweight.shape[1] % 16 or rows.dtype != torch.float32:
        return None
    return extension().RerankedHead(qweight.contiguous(), _f32(scale), _f32(rows), int(rerank))


def _fastest(model, native_step, torch_step):
    """The native step where it applies to `model`, else the torch one, else None."""
    if native_step.supports(model):
        return native_step(model)
    return torch_step(model) if torch_step.supports(model) else None


def lean_int8_step(model) -> LeanInt8Step | None:
    """The fastest lean step an int8 copy can take: native, else torch, else None."""
    return _fastest(model, NativeInt8Step, LeanInt8Step)


def lean_fp32_step(model) -> LeanFp32Step | None:
    """The fastest lean step an fp32 model can take: native, else torch, else None."""
    return _fastest(model, NativeFp32Step, LeanFp32Step)
