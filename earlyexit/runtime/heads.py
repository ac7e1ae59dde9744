"""Per-layer exit heads and the stop/exit/continue controller, trained on a frozen backbone.

Exit head l (after block l, for every block but the last): the layer's own LayerNorm,
then an optional low-rank adapter z + B(A z) (B starts at zero, so a new head is just a
layer norm), then the backbone's own frozen, tied LM head. The study's heads are untied
Linear(d, V) layers, 3.4x GPT-2 small's parameters for 11 of them; ours together stay a
few percent of the backbone (`ExitHeads.parameter_share`).

The controller is one classifier shared by all layers: softmax(C LN_c(h) + c + E_layer[l]
+ E_prev[previous token's exit layer]) over (continue, exit, stop). The two tables are
the cheap features; the sum is exactly the `extra_bias` input of the fused
`earlyexit.kernels.layer_check` kernel. It reads only the newest token's hidden state:
no vocabulary projection is needed to decide.

Heads are saved beside the backbone as `exit_heads.safetensors` + `exit_heads.json`; the
JSON records the backbone's layers, width, vocabulary and a hash of its weights, and
loading onto any other backbone is refused.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import EarlyExitError
from .model import GPT2

CONTINUE, EXIT, STOP = 0, 1, 2
ACTIONS = ("continue", "exit", "stop")
HEADS_FORMAT = "earlyexit-heads/1"
HEADS_WEIGHTS, HEADS_CONFIG = "exit_heads.safetensors", "exit_heads.json"
EXIT_NORMS = "exit_norms.safetensors"  # beside a backbone trained to exit (training.exit_loss.ExitNorms): heads start from it


@dataclass
class Thresholds:
    """Controller thresholds in [0, 1]; 1.0 switches an action off (a probability never exceeds it)."""

    exit: float = 1.0
    stop: float = 1.0

    def __setattr__(self, name: str, value) -> None:  # checked on every assignment, not only at construction
        if name in ("exit", "stop") and (isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0):
            raise EarlyExitError(f"{name} threshold must be a number in [0, 1], got {value!r}")
        super().__setattr__(name, value)


@dataclass
class HeadsConfig:
    rank: int = 32  # low-rank adapter per head; 0 = layer norm only
    n_layer: int = 12
    n_embd: int = 256
    vocab_size: int = 8192
    backbone_sha256: str = ""
    heads_sha256: str = ""  # of the heads' own tensors as saved: exit_heads.safetensors belongs to this JSON only
    thresholds: Thresholds = field(default_factory=Thresholds)
    # the blocks (0-based) after which the controller is asked, as earlyexit.training.exit_layers chose them; None: all
    exit_layers: list[int] | None = None
    # the confidence rule (earlyexit.training.confidence_rule): {"layer" (0-based): threshold} on the exit head's max
    # probability, where an exit is decided by the head itself instead of the controller's p(exit); None: not calibrated
    exit_confidence: dict[str, float] | None = None
    # the same, calibrated over the int8 copy `--weights int8` runs (its costs and its own tokens); {}: no exit pays there
    exit_confidence_int8: dict[str, float] | None = None
    training: dict = field(default_factory=dict)  # what train_heads measured; informational
    calibration: dict = field(default_factory=dict)  # what earlyexit.training.calibrate measured and chose; empty until it runs


_PROJECTIONS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def tensors_fingerprint(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over names, shapes and fp32 bytes, in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(tensors.items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().to(torch.float32).contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


def backbone_fingerprint(model: GPT2) -> str:
    """sha256 over the backbone's parameters (names, shapes and fp32 bytes): heads belong to exactly one backbone."""
    # projections hashed (out, in), as before GPT2 kept Conv1D's (in, out): old heads stay valid
    return tensors_fingerprint({name: t.t() if name.endswith(_PROJECTIONS) else t for name, t in model.state_dict().items()})


class ExitHeads(nn.Module):
    """The trainable part: L-1 exit heads and the shared action classifier."""

    def __init__(self, cfg: HeadsConfig):
        super().__init__()
        self.cfg = cfg
        L, d, r = cfg.n_layer, cfg.n_embd, cfg.rank
        self.ln = nn.ModuleList(nn.LayerNorm(d) for _ in range(L - 1))
        self.down = nn.Parameter(torch.randn(L - 1, r, d) * d ** -0.5) if r else None  # A: (L-1, r, d)
        self.up = nn.Parameter(torch.zeros(L - 1, d, r)) if r else None  # B: (L-1, d, r), zero = identity head
        self.cls_ln = nn.LayerNorm(d)
        self.cls = nn.Linear(d, len(ACTIONS))
        self.layer_bias = nn.Parameter(torch.zeros(L, len(ACTIONS)))  # E_layer
        self.prev_bias = nn.Parameter(torch.zeros(L + 1, len(ACTIONS)))  # E_prev; index L = no previous token

    @classmethod
    def for_backbone(cls, model: GPT2, rank: int = 32, exit_norms: dict[str, torch.Tensor] | None = None) -> "ExitHeads":
        """New heads whose layer norms start as the backbone's final one (so layer L-1's head is the model's own),
        or as the exit norms a backbone trained to exit came with (`ln.<l>.weight`/`.bias`, train_lm's EXIT_NORMS)."""
        dims = model.dims
        heads = cls(HeadsConfig(rank=rank, n_layer=dims.n_layer, n_embd=dims.n_embd, vocab_size=dims.vocab_size,
                                backbone_sha256=backbone_fingerprint(model)))
        with torch.no_grad():
            for layer, ln in enumerate(heads.ln):
                ln.weight.copy_(exit_norms[f"ln.{layer}.weight"] if exit_norms else model.ln_f.weight)
                ln.bias.copy_(exit_norms[f"ln.{layer}.bias"] if exit_norms else model.ln_f.bias)
        return heads.to(model.dtype)

    def parameter_share(self, model: GPT2) -> float:
        return sum(p.numel() for p in self.parameters()) / sum(p.numel() for p in model.parameters())

    # ------------------------------------------------------------------ exit heads

    def head_hidden(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        """The vector head `layer` feeds the tied LM head: LN_l(h) (+ low-rank adapter). (..., d) -> (..., d)."""
        z = self.ln[layer](h)
        if self.down is not None:
            z = z + (z @ self.down[layer].t()) @ self.up[layer].t()
        return z

    def head_logits(self, layer: int, h: torch.Tensor, model: GPT2) -> torch.Tensor:
        """Next-token logits of exit head `layer` (the last layer uses the backbone's own ln_f): (..., V)."""
        if layer == self.cfg.n_layer - 1:
            return model.logits(h)
        return model.project(self.head_hidden(layer, h))

    # ------------------------------------------------------------------ controller

    def action_logits(self, layer: int | torch.Tensor, h: torch.Tensor, prev_exit: int | torch.Tensor) -> torch.Tensor:
        """(..., d) hidden state at `layer` -> (..., 3) logits over (continue, exit, stop).

        `prev_exit` is the number of blocks the previous token ran (1..L), or 0 for none.
        """
        return self.cls(self.cls_ln(h)) + self.extra_bias(layer, prev_exit)

    def extra_bias(self, layer: int | torch.Tensor, prev_exit: int | torch.Tensor) -> torch.Tensor:
        """E_layer[layer] + E_prev[prev]: the per-call bias the fused layer_check kernel adds.

        Row prev_exit - 1 of E_prev, and row L (the last) for prev_exit = 0 (no previous
        token): (prev_exit - 1) mod (L + 1) gives both, for ints and tensors alike.
        """
        return self.layer_bias[layer] + self.prev_bias[(prev_exit - 1) % (self.cfg.n_layer + 1)]

    # ------------------------------------------------------------------ files

    def save(self, directory: str | Path) -> None:
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().to(torch.float32).contiguous() for k, v in self.state_dict().items()}
        save_file(tensors, str(directory / HEADS_WEIGHTS))
        self.cfg.heads_sha256 = tensors_fingerprint(tensors)
        self.save_config(directory)

    def save_config(self, directory: str | Path) -> None:
        """Only exit_heads.json (thresholds, calibration): the weights stay as they are."""
        (Path(directory) / HEADS_CONFIG).write_text(json.dumps({"format": HEADS_FORMAT, **asdict(self.cfg)}, indent=2))


def load_exit_norms(directory: str | Path, model: GPT2) -> dict[str, torch.Tensor] | None:
    """The per-layer exit LayerNorms a backbone trained to exit was exported with (None where there are none)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(directory) / EXIT_NORMS
    if not path.is_file():
        return None
    try:
        norms = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise EarlyExitError(f"cannot read {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    d, L = model.dims.n_embd, model.dims.n_layer
    expected = {f"ln.{layer}.{p}" for layer in range(L - 1) for p in ("weight", "bias")}
    if set(norms) != expected or any(v.shape != (d,) for v in norms.values()):
        raise EarlyExitError(f"{path} does not hold {L - 1} layer norms of width {d}: not this backbone's exit norms")
    return norms


def heads_available(directory: str | Path) -> bool:
    return (Path(directory) / HEADS_CONFIG).is_file()


def load_heads(directory: str | Path, model: GPT2) -> ExitHeads:
    """Heads saved in `directory`, checked against `model`; every mismatch is one clear error."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    config_file = directory / HEADS_CONFIG
    if not config_file.is_file():
        raise EarlyExitError(f"no exit heads in {directory} ({HEADS_CONFIG} missing): train them with python -m earlyexit.training.train_heads")
    try:
        raw = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise EarlyExitError(f"{config_file} is not valid JSON") from None
    if not isinstance(raw, dict) or raw.pop("format", None) != HEADS_FORMAT:
        raise EarlyExitError(f"{config_file} is not an earlyexit heads config ({HEADS_FORMAT})")
    try:
        cfg = HeadsConfig(**{**raw, "thresholds": Thresholds(**raw.get("thresholds", {}))})
    except TypeError as e:
        raise EarlyExitError(f"{config_file} has unexpected fields: {e}") from None
    for name in ("rank", "n_layer", "n_embd", "vocab_size"):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise EarlyExitError(f"{config_file}: {name} must be a non-negative integer, got {value!r}")
    if cfg.rank > cfg.n_embd:
        raise EarlyExitError(f"{config_file}: rank {cfg.rank} is larger than the width {cfg.n_embd}: corrupt or mixed files")
    for name in ("training", "calibration"):
        if not isinstance(getattr(cfg, name), dict):
            raise EarlyExitError(f"{config_file}: {name} must be an object, got {type(getattr(cfg, name)).__name__}")
    for name in ("exit_confidence", "exit_confidence_int8"):
        if getattr(cfg, name) is not None and not isinstance(getattr(cfg, name), dict):
            raise EarlyExitError(f"{config_file}: {name} must be an object of thresholds, got {type(getattr(cfg, name)).__name__}")
    dims = model.dims
    for name, theirs, ours in (("layers", cfg.n_layer, dims.n_layer), ("width", cfg.n_embd, dims.n_embd),
                               ("vocabulary", cfg.vocab_size, dims.vocab_size)):
        if theirs != ours:
            raise EarlyExitError(f"exit heads in {directory} were trained for a backbone with {name} {theirs}, this model has {ours}")
    for field_name, what in (("backbone_sha256", "its backbone's weights"), ("heads_sha256", "its own weights")):
        if not isinstance(getattr(cfg, field_name), str) or len(getattr(cfg, field_name)) != 64:
            raise EarlyExitError(f"{config_file} carries no hash of {what} ({field_name}): heads that cannot be tied to "
                                 "their weights are not loaded; retrain them with python -m earlyexit.training.train_heads")
    if cfg.backbone_sha256 != backbone_fingerprint(model):
        raise EarlyExitError(f"exit heads in {directory} were trained on different backbone weights (hash mismatch): retrain them")
    try:
        tensors = load_file(str(directory / HEADS_WEIGHTS))
    except (SafetensorError, OSError, FileNotFoundError) as e:
        raise EarlyExitError(f"cannot read {directory / HEADS_WEIGHTS}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if tensors_fingerprint(tensors) != cfg.heads_sha256:
        raise EarlyExitError(f"{directory / HEADS_WEIGHTS} is not the file {config_file.name} was written with (hash mismatch): "
                             "corrupt or mixed files")
    heads = ExitHeads(cfg)
    try:
        heads.load_state_dict(tensors)
    except RuntimeError:
        raise EarlyExitError(f"{directory / HEADS_WEIGHTS} does not match its config (rank {cfg.rank}): corrupt or mixed files") from None
    return heads.to(model.dtype).eval().requires_grad_(False)
