import pytest

from earlyexit.metrics import edit_similarity, exact_match, is_degenerate, levenshtein, rouge_l


def test_levenshtein_and_edit_similarity():
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "abc") == 3
    assert edit_similarity("return x", "return x  ") == 1.0
    assert edit_similarity("abcd", "abcf") == pytest.approx(0.75)
    assert edit_similarity("", "") == 1.0


def test_exact_match_ignores_trailing_whitespace_only():
    assert exact_match("foo(x) ", "foo(x)")
    assert not exact_match(" foo(x)", "foo(x)")


def test_rouge_l_counts_code_punctuation():
    assert rouge_l("self.items.append(x)", "self.items.append(x)") == 1.0
    partial = rouge_l("self.items.pop()", "self.items.append(x)")
    assert 0 < partial < 1
    assert rouge_l("", "x") == 0.0


def test_degenerate_repetition():
    assert is_degenerate([5, 1, 2, 1, 2, 1, 2, 1, 2])
    assert is_degenerate([7] * 8)
    assert not is_degenerate(list(range(8)))
    assert not is_degenerate([1, 2, 3, 1, 2, 3, 1, 2, 4])
    assert not is_degenerate([1, 2])
