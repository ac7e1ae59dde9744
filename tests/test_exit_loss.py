"""The early-exit training objective (earlyexit.training.exit_loss) and its place in train_lm."""

import json

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from earlyexit.errors import EarlyExitError
from earlyexit.runtime.heads import EXIT_NORMS
from earlyexit.training.exit_loss import EarlyExitObjective, ExitNorms, layer_states, objective_loss
from earlyexit.training.train_lm import main

from test_train_lm import make_corpus, tiny_recipe


@pytest.fixture(scope="module")
def hf():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=97, n_positions=40, n_embd=24, n_layer=5, n_head=3,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).eval()


def test_our_training_forward_is_gpt2s_when_nothing_is_dropped(hf):
    x = torch.randint(0, 97, (3, 17))
    states = layer_states(hf, x)
    with torch.no_grad():
        ref = hf(x, output_hidden_states=True)
    logits = hf.lm_head(hf.transformer.ln_f(states[-1]))
    torch.testing.assert_close(logits, ref.logits, rtol=1e-4, atol=1e-4)
    for layer in range(4):  # hidden_states[l + 1] is block l's output (the last one is after ln_f)
        torch.testing.assert_close(states[layer], ref.hidden_states[layer + 1], rtol=1e-4, atol=1e-4)


def test_a_dropped_block_passes_its_input_on(hf):
    x = torch.randint(0, 97, (2, 9))
    full = layer_states(hf, x)
    dropped = layer_states(hf, x, [False, True, False, False, False])
    torch.testing.assert_close(dropped[0], full[0])
    torch.testing.assert_close(dropped[1], dropped[0])  # block 1 skipped
    assert not torch.allclose(dropped[2], full[2])


@pytest.mark.parametrize("scale,layers", [(1.0, [0, 2]), (0.5, []), (3.0, [0, 1, 2, 3])])
def test_loss_weights_sum_to_one_grow_with_depth_and_keep_the_last(scale, layers):
    w = EarlyExitObjective(scale=scale).loss_weights(5, layers)
    assert sum(w.values()) == pytest.approx(1.0) and 4 in w and set(w) == {*layers, 4}
    early = [w[layer] for layer in sorted(layers)]
    assert early == sorted(early) and len(set(early)) == len(early)


def test_layer_dropout_rises_with_depth_never_touches_the_first_block_and_is_seeded():
    objective = EarlyExitObjective(layer_dropout=0.6, seed=3)
    draws = torch.tensor([objective.dropped_layers(6, s) for s in range(4000)], dtype=torch.float64).mean(0)
    assert draws[0] == 0 and torch.allclose(draws, torch.linspace(0, 0.6, 6, dtype=torch.float64), atol=0.03)
    assert objective.dropped_layers(6, 17) == objective.dropped_layers(6, 17)
    assert EarlyExitObjective().dropped_layers(6, 17) == [False] * 6


def test_the_rotational_curriculum_visits_every_early_layer_and_skips_dropped_ones():
    objective = EarlyExitObjective(scale=1.0, rotation=3)
    seen = [objective.exit_layers(7, s, [False] * 7) for s in range(3)]
    assert sorted(layer for ls in seen for layer in ls) == list(range(6)) and all(len(ls) == 2 for ls in seen)
    assert 0 not in objective.exit_layers(7, 0, [True] + [False] * 6)
    assert EarlyExitObjective(scale=1.0, curriculum="all").exit_layers(7, 5, [False] * 7) == list(range(6))
    assert EarlyExitObjective(scale=0.0).exit_layers(7, 0, [False] * 7) == []


def test_the_objective_is_the_weighted_sum_of_each_layers_cross_entropy(hf):
    norms = ExitNorms(hf.transformer.ln_f, 5)
    x = torch.randint(0, 97, (2, 12))
    objective = EarlyExitObjective(scale=1.0, curriculum="all", positions=0)
    loss, per_layer = objective_loss(hf, norms, x, objective, step=0)
    w = objective.loss_weights(5, [0, 1, 2, 3])
    assert set(per_layer) == {0, 1, 2, 3, 4}
    assert loss.item() == pytest.approx(sum(w[layer] * per_layer[layer] for layer in per_layer), rel=1e-5)
    plain, _ = objective_loss(hf, norms, x, EarlyExitObjective(layer_dropout=0.0), step=0)
    ref = torch.nn.functional.cross_entropy(hf(x[:, :-1]).logits.flatten(0, 1), x[:, 1:].flatten())
    assert plain.item() == pytest.approx(ref.item(), rel=1e-5)
    distilled, _ = objective_loss(hf, norms, x, EarlyExitObjective(scale=1.0, curriculum="all", positions=0, kd=1.0), step=0)
    assert distilled.item() > loss.item()  # KL >= 0, and > 0 for untrained exits


def test_bad_objective_fields_are_refused():
    for bad in ({"curriculum": "random"}, {"layer_dropout": 1.0}, {"rotation": 0}, {"scale": -1.0}):
        with pytest.raises(EarlyExitError):
            EarlyExitObjective(**bad)


def exit_recipe(tmp_path, corpus, **extra):
    return tiny_recipe(tmp_path, corpus, n_layer=3, early_exit_scale=1.0, early_exit_rotation=2, early_exit_positions=8,
                       early_exit_kd=0.5, layer_dropout=0.3, compile=False, bf16=False, **extra)


def test_early_exit_training_resumes_bit_for_bit_and_exports_its_exit_norms(tmp_path):
    corpus = make_corpus(tmp_path)
    assert main(exit_recipe(tmp_path / "a", corpus)) == 0
    assert main(exit_recipe(tmp_path / "b", corpus, max_steps=2)) == 0
    assert main(["--resume", *exit_recipe(tmp_path / "b", corpus)]) == 0
    a, b = (torch.load(tmp_path / d / "run/checkpoint.pt", weights_only=True) for d in "ab")
    assert a["step"] == b["step"] == 4
    for part in ("model", "exit_norms"):
        for name, value in a[part].items():
            assert torch.equal(value, b[part][name]), name
    log = [json.loads(line) for line in (tmp_path / "a/run/log.jsonl").read_text().splitlines()]
    assert all("2" in r["ce_by_layer"] for r in log)  # the last layer is scored at every step
    assert len(log[-1]["val_top1_by_layer"]) == 3 and log[-1]["val_agree_by_layer"][-1] == 1.0
    assert (tmp_path / "a/run/export" / EXIT_NORMS).is_file()


def test_exit_heads_start_from_the_exit_norms_the_backbone_trained_with(tmp_path):
    from earlyexit.runtime.heads import ExitHeads, load_exit_norms
    from earlyexit.runtime.loading import load_runtime_model

    corpus = make_corpus(tmp_path)
    assert main(exit_recipe(tmp_path, corpus, max_steps=2)) == 0
    export = tmp_path / "run/export"
    model, _ = load_runtime_model(export)
    norms = load_exit_norms(export, model)
    heads = ExitHeads.for_backbone(model, rank=2, exit_norms=norms)
    for layer, ln in enumerate(heads.ln):
        assert torch.equal(ln.weight.float(), norms[f"ln.{layer}.weight"].to(model.dtype).float())
    (export / EXIT_NORMS).write_bytes(b"not safetensors")
    with pytest.raises(EarlyExitError, match="cannot read"):
        load_exit_norms(export, model)
    (export / EXIT_NORMS).unlink()
    assert load_exit_norms(export, model) is None
