"""Choosing where the controller is asked (earlyexit.training.exit_layers): the cost model and the greedy choice."""

import pytest

from earlyexit.training.exit_layers import PieceCosts, choose, decision_table, simulate

L = 4
COSTS = PieceCosts(block=1.0, check=0.1, fill=0.2, exit_head=0.5, final_head=0.5)


def table(n, exit_at=None, when_prev=None):
    """n tokens; every token's controller exits after block `exit_at` (when the previous token ran `when_prev` blocks)."""
    exits = [[[exit_at == layer and (when_prev is None or p == when_prev) for p in range(L + 1)] for layer in range(L - 1)]
             for _ in range(n)]
    agrees = [[True] * (L - 1) for _ in range(n)]
    return exits, agrees


def test_the_cost_of_a_token_is_its_blocks_checks_state_copies_and_head():
    exits, agrees = table(10, exit_at=1)
    none = simulate(exits, agrees, [], COSTS, L, windows=1)
    assert none["ms_per_token"] == pytest.approx(4 * 1.0 + 0.5) and none["mean_layers"] == 4
    asked = simulate(exits, agrees, [0, 1], COSTS, L, windows=1)  # checked twice, leaves after block 1, two copies
    assert asked["ms_per_token"] == pytest.approx(2 * 1.0 + 2 * 0.1 + 2 * 0.2 + 0.5)
    assert asked["mean_layers"] == 2 and asked["asked"] == [1, 2]


def test_the_choice_asks_where_exits_pay_and_nowhere_when_none_do():
    exits, agrees = table(20, exit_at=1)
    chosen, steps = choose(exits, agrees, COSTS, L, windows=1)
    assert chosen == [1]
    assert steps[-1]["ms_per_token"] < steps[0]["ms_per_token"]
    never, agrees = table(20, exit_at=None)
    assert choose(never, agrees, COSTS, L, windows=1)[0] == []  # a check that never fires only costs


def test_the_previous_token_feature_follows_the_simulated_depths():
    # exits after block 0 only when the previous token ran 1 block: the first token of a window (previous 0) never
    # does, so no token ever does; with "previous ran full depth (4)" instead, every token after the first does
    exits, agrees = table(6, exit_at=0, when_prev=1)
    assert simulate(exits, agrees, [0], COSTS, L, windows=2)["mean_layers"] == 4
    exits, agrees = table(6, exit_at=0, when_prev=4)
    result = simulate(exits, agrees, [0], COSTS, L, windows=2)  # per window of 3: 4, 1, 4 (a 1 resets the feature)
    assert result["mean_layers"] == pytest.approx((4 + 1 + 4) / 3)


def test_agreement_counts_the_exit_heads_that_agree_with_the_full_model():
    exits, agrees = table(4, exit_at=2)
    agrees[0][2] = agrees[1][2] = False
    assert simulate(exits, agrees, [2], COSTS, L, windows=1)["agreement"] == 0.5
    assert simulate(exits, agrees, [], COSTS, L, windows=1)["agreement"] == 1.0


def test_the_decision_table_is_the_controllers_own_decision(tiny_tokenizer):
    import torch

    from earlyexit.runtime.heads import EXIT, ExitHeads, Thresholds
    from earlyexit.runtime.model import GPT2
    from earlyexit.runtime.policies import EarlyExit

    from conftest import make_tiny_hf

    model = GPT2.from_hf(make_tiny_hf(len(tiny_tokenizer), n_layer=L)).eval()
    heads = ExitHeads.for_backbone(model, rank=0)
    with torch.no_grad():
        heads.cls.weight.normal_(0, 1.0)
        heads.prev_bias.normal_(0, 2.0)
        heads.layer_bias[:, EXIT] += 1.0
    windows = torch.randint(0, len(tiny_tokenizer), (2, 9), generator=torch.Generator().manual_seed(0))
    exits, agrees = decision_table(model, heads, windows, threshold=0.5)
    assert len(exits) == 18 and len(exits[0]) == L - 1 and len(exits[0][0]) == L + 1
    policy = EarlyExit(model, heads, Thresholds(exit=0.5, stop=1.0))
    from earlyexit.training.train_heads import layer_states

    states = layer_states(model, windows, bf16=False)
    for t in (0, 5, 13):
        b, i = divmod(t, 9)
        for layer in range(L - 1):
            for prev in (0, 2, L):
                probs = policy.lean_probs(layer, states[layer][b, i][None], prev)
                assert exits[t][layer][prev] == (policy.decide(probs, allow_exit=True) == EXIT)
