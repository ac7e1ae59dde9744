"""The library's front door on bad input: each case is one EarlyExitError naming the problem, never a traceback from
inside torch and never a silently wrong result. (The CLI's cases are in test_cli.py's catalogue.)"""

import numpy as np
import pytest
import torch

from earlyexit.errors import EarlyExitError
from earlyexit.runtime.decoding import GenerationSettings, complete
from earlyexit.runtime.heads import ExitHeads
from earlyexit.runtime.model import GPT2
from earlyexit.runtime.speculative import Lossless

from conftest import make_tiny_hf


@pytest.fixture(scope="module")
def model(tiny_tokenizer):
    return GPT2.from_hf(make_tiny_hf(len(tiny_tokenizer)).eval())


PROMPT_CASES = [
    ("bytes", b"def f():", "got bytes (decode it first)"),
    ("bytearray", bytearray(b"x"), "got bytearray"),
    ("lone_surrogate", "def f(\udcff):", "lone surrogate"),
    ("empty_str", "", "prompt is empty"),
    ("empty_ids", [], "prompt is empty"),
    ("id_too_large", [1, 2, 10_000_000], "token id 2 of the prompt is 10000000, outside the model's vocabulary"),
    ("id_negative", [3, -1], "token id 1 of the prompt is -1"),
    ("id_float", [1.0, 2.0], "token id 0 of the prompt is float"),
    ("id_bool", [True], "not an integer"),
    ("id_str", ["a", "b"], "not an integer"),
    ("number", 42, "got int"),
    ("none", None, "got NoneType"),
    ("float_tensor", torch.ones(3), "1-D integer token ids"),
    ("matrix_tensor", torch.ones(2, 3, dtype=torch.long), "1-D integer token ids"),
    ("huge_str", "x" * (4 * 1024 * 1024 + 1), "more than the 4,194,304 accepted"),
]


@pytest.mark.parametrize("case,prompt,message", PROMPT_CASES, ids=[c[0] for c in PROMPT_CASES])
def test_bad_prompts_are_one_clear_error(model, tiny_tokenizer, case, prompt, message):
    with pytest.raises(EarlyExitError, match=None) as e:
        complete(model, tiny_tokenizer, prompt, GenerationSettings(max_new_tokens=2))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_token_ids_in_other_integer_types_are_taken(model, tiny_tokenizer):
    ids = tiny_tokenizer.encode("def add(a, b):")
    want = complete(model, tiny_tokenizer, ids, GenerationSettings(max_new_tokens=3)).token_ids
    for same in (np.array(ids), torch.tensor(ids), torch.tensor([ids]), tuple(np.int64(t) for t in ids)):
        assert complete(model, tiny_tokenizer, same, GenerationSettings(max_new_tokens=3)).token_ids == want


SETTINGS_CASES = [
    ({"stop_strings": [""]}, "stop strings must be non-empty"),
    ({"stop_strings": [3]}, "a string or a list of strings"),
    ({"stop_strings": 3}, "a string or a list of strings"),
    ({"stop_strings": ["\udcff"]}, "a stop string is not valid text"),
    ({"max_new_tokens": True}, "max_new_tokens must be a positive integer"),
    ({"max_new_tokens": 2.5}, "max_new_tokens must be a positive integer"),
]


@pytest.mark.parametrize("fields,message", SETTINGS_CASES)
def test_bad_settings_are_one_clear_error(fields, message):
    with pytest.raises(EarlyExitError, match=None) as e:
        GenerationSettings(**fields)
    assert message in str(e.value)


def test_a_str_stop_string_is_one_string_as_in_transformers():
    assert GenerationSettings(stop_strings="return").stop_strings == ("return",)


@pytest.mark.parametrize("max_draft,message", [(10**6, "at most the model's context (96)"), (0, "positive integer"),
                                                (True, "positive integer"), (2.0, "positive integer")])
def test_a_draft_longer_than_the_context_is_refused_before_any_allocation(model, max_draft, message):
    with pytest.raises(EarlyExitError, match=None) as e:
        Lossless(model, ExitHeads.for_backbone(model, rank=2), max_draft=max_draft, draft="same")
    assert message in str(e.value)


def test_a_tokenizer_larger_than_the_models_vocabulary_is_refused(tmp_path, tiny_tokenizer):
    from earlyexit.runtime.loading import load_runtime_model

    make_tiny_hf(len(tiny_tokenizer) - 10).save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    with pytest.raises(EarlyExitError, match="more than the model's vocabulary"):
        load_runtime_model(tmp_path)


def test_a_model_folder_without_tokenizer_files_is_refused_not_read_as_empty(tmp_path, tiny_tokenizer):
    from earlyexit.runtime.loading import load_runtime_model

    make_tiny_hf(len(tiny_tokenizer)).save_pretrained(tmp_path)
    with pytest.raises(EarlyExitError, match="tokenizer"):
        load_runtime_model(tmp_path)


@pytest.mark.parametrize("tamper,message", [
    ("swap_weights", "is not the file exit_heads.json was written with"),
    ("blank_backbone", "carries no hash of its backbone's weights"),
    ("blank_heads", "carries no hash of its own weights"),
    ("no_heads_field", "carries no hash of its own weights"),
])
def test_exit_heads_are_tied_to_their_own_weights_and_their_backbone(tmp_path, model, tamper, message):
    import json

    from earlyexit.runtime.heads import HEADS_CONFIG, HEADS_WEIGHTS, load_heads

    ExitHeads.for_backbone(model, rank=2).save(tmp_path / "a")
    other = ExitHeads.for_backbone(model, rank=2)
    with torch.no_grad():
        other.cls.bias.add_(1.0)
    other.save(tmp_path / "b")
    load_heads(tmp_path / "a", model)  # untouched: loads
    config = tmp_path / "a" / HEADS_CONFIG
    raw = json.loads(config.read_text())
    if tamper == "swap_weights":  # same shapes, other values: loaded silently before
        (tmp_path / "a" / HEADS_WEIGHTS).write_bytes((tmp_path / "b" / HEADS_WEIGHTS).read_bytes())
    elif tamper == "no_heads_field":
        del raw["heads_sha256"]
    else:
        raw["backbone_sha256" if tamper == "blank_backbone" else "heads_sha256"] = ""
    config.write_text(json.dumps(raw))
    with pytest.raises(EarlyExitError, match=None) as e:
        load_heads(tmp_path / "a", model)
    assert message in str(e.value)


def test_thresholds_are_checked_when_changed_too_and_the_policy_checks_its_arguments(model):
    from earlyexit.runtime.heads import Thresholds
    from earlyexit.runtime.policies import EarlyExit

    t = Thresholds(exit=0.5, stop=1.0)
    for bad in (1.5, -0.1, "0.5", None, True):
        with pytest.raises(EarlyExitError, match="exit threshold must be a number in"):
            t.exit = bad
    assert t.exit == 0.5
    heads = ExitHeads.for_backbone(model, rank=2)
    with pytest.raises(EarlyExitError, match="thresholds must be a Thresholds"):
        EarlyExit(model, heads, {"exit": 0.5})
    with pytest.raises(EarlyExitError, match="needs ExitHeads"):
        EarlyExit(model, None)


@pytest.mark.parametrize("policy", [object(), "early-exit", 0.5])
def test_something_that_is_not_a_policy_is_refused_before_decoding(model, tiny_tokenizer, policy):
    from earlyexit import complete, complete_batch

    with pytest.raises(EarlyExitError, match="policy must be an earlyexit Policy"):
        complete(model, tiny_tokenizer, "def f():", policy=policy)
    with pytest.raises(EarlyExitError, match="policy must be an earlyexit Policy"):
        complete_batch(model, tiny_tokenizer, ["def f():"], policy=policy)


def test_weights_holding_nan_are_refused_at_load(tmp_path, tiny_tokenizer):
    from earlyexit.runtime.loading import load_runtime_model

    hf = make_tiny_hf(len(tiny_tokenizer))
    with torch.no_grad():
        hf.transformer.h[1].mlp.c_fc.weight[0, 0] = float("nan")
    hf.save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    with pytest.raises(EarlyExitError, match="NaN or infinite values"):
        load_runtime_model(tmp_path)


def test_a_pickle_holding_code_is_refused_without_torchs_advice_to_unpickle_it(tmp_path, tiny_tokenizer):
    import pickle

    from earlyexit.runtime.loading import load_runtime_model

    hf = make_tiny_hf(len(tiny_tokenizer))
    hf.config.save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)

    class Payload:
        def __reduce__(self):
            return (print, ("unpickled: this could have been any code",))

    state = {k: v for k, v in hf.state_dict().items()}
    state["payload"] = Payload()
    with open(tmp_path / "pytorch_model.bin", "wb") as f:
        pickle.dump(state, f, protocol=2)
    with pytest.raises(EarlyExitError) as e:
        load_runtime_model(tmp_path)
    assert "refusing to load the pickle" in str(e.value) and "weights_only=False" not in str(e.value) and "\n" not in str(e.value)
