import pytest

from earlyexit.evaluation.metrics import (edit_similarity, exact_match, indel_similarity, is_degenerate, levenshtein, longest_common_subsequence,
                                          rouge_l)


def test_levenshtein_and_edit_similarity():
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "abc") == 3
    assert edit_similarity("return x", "return x  ") == 1.0
    assert edit_similarity("abcd", "abcf") == pytest.approx(0.75)
    assert edit_similarity("", "") == 1.0



def test_indel_similarity_is_the_codexglue_ratio():
    assert longest_common_subsequence("kitten", "sitting") == 4  # i, t, t, n
    assert indel_similarity("kitten", "sitting") == pytest.approx(8 / 13)  # python-Levenshtein's ratio: 0.615...
    assert indel_similarity("", "") == 1.0 and indel_similarity("abc", "") == 0.0
    assert indel_similarity("return x", "return x  ") == 1.0
    # a completion that writes the target's start and stops: credited more than by edit similarity
    assert indel_similarity("self.assert", "self.assertEqual(a, b)") > edit_similarity("self.assert", "self.assertEqual(a, b)")


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
