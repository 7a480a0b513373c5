"""mean@k, pass@k (unbiased and bootstrap), maj@k and the per-problem summary, on hand-computed values."""

from __future__ import annotations

from math import comb

import numpy as np
import pytest

from rpg.train.evaluate import maj_at_k, mean_at_k, pass_at_k, pass_at_k_bootstrap, summarize_eval


@pytest.mark.parametrize(
    ("n", "c", "k", "expected"),
    [
        (5, 2, 2, 0.7),  # 1 - C(3,2)/C(5,2) = 1 - 3/10
        (10, 3, 3, 1 - 35 / 120),  # 1 - C(7,3)/C(10,3) = 1 - 35/120 = 0.708333...
        (8, 2, 4, 1 - 15 / 70),  # 1 - C(6,4)/C(8,4) = 0.785714...
        (4, 1, 1, 0.25),  # k = 1 is c/n
        (32, 0, 8, 0.0),  # nothing correct
        (4, 3, 2, 1.0),  # n - c = 1 < k = 2: every pair holds a correct sample
        (32, 32, 32, 1.0),
        (32, 1, 32, 1.0),  # k = n: any correct sample is drawn
        (1000, 1, 1, 0.001),  # large n, no overflow
    ],
)
def test_pass_at_k_hand_values(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_matches_binomials_exhaustively():
    for n in range(1, 13):
        for c in range(n + 1):
            for k in range(1, n + 1):
                exact = 1 - comb(n - c, k) / comb(n, k)
                assert pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12), (n, c, k)


@pytest.mark.parametrize(
    ("n", "c", "k"), [(4, 1, 5), (4, 1, 0), (4, 5, 1), (4, -1, 1), (0, 0, 1), (4.0, 1, 1), (4, True, 1)]
)
def test_pass_at_k_rejects_bad_input(n, c, k):
    with pytest.raises(ValueError, match="pass@k"):
        pass_at_k(n, c, k)


def test_bootstrap_reads_lower_than_unbiased():
    correct = [True, True, False, False, False, False, False, False]  # n=8, c=2
    value = pass_at_k_bootstrap(correct, k=4, num_resamples=20000, rng=0)
    # expectation 1 - (1 - 2/8)^4 = 1 - 0.75^4 = 0.68359375; sd of the mean sqrt(.68*.32/20000) = 0.0033
    assert value == pytest.approx(0.68359375, abs=0.015)
    assert value < pass_at_k(8, 2, 4) - 0.05  # unbiased: 0.7857
    assert pass_at_k_bootstrap(correct, 4, 500, rng=3) == pass_at_k_bootstrap(correct, 4, 500, rng=3)
    # a Generator is used as given (its stream advances), a seed starts a fresh one
    gen = np.random.default_rng(1)
    first, second = pass_at_k_bootstrap(correct, 4, 10, gen), pass_at_k_bootstrap(correct, 4, 10, gen)
    assert first == pass_at_k_bootstrap(correct, 4, 10, 1)
    fresh = np.random.default_rng(1)
    fresh.integers(0, 8, size=(10, 4))
    assert second == pass_at_k_bootstrap(correct, 4, 10, fresh)


def test_bootstrap_edge_cases():
    assert pass_at_k_bootstrap([True] * 5, 3, 100) == 1.0
    assert pass_at_k_bootstrap([False] * 5, 3, 100) == 0.0
    with pytest.raises(ValueError, match="k=6"):
        pass_at_k_bootstrap([True] * 5, 6, 100)
    with pytest.raises(ValueError, match="num_resamples"):
        pass_at_k_bootstrap([True] * 5, 2, 0)
    with pytest.raises(ValueError, match="non-empty"):
        pass_at_k_bootstrap([], 1, 10)


def test_mean_at_k():
    assert mean_at_k([True, False, False, True]) == 0.5
    assert mean_at_k([False]) == 0.0
    with pytest.raises(ValueError, match="non-empty"):
        mean_at_k([])


def test_maj_at_k_votes_and_breaks_ties_by_first_appearance():
    assert maj_at_k(["3", "5", "3", None], [True, False, True, False]) == 1.0  # "3" twice
    assert maj_at_k(["5", "3"], [False, True]) == 0.0  # tie 1-1: "5" appears first
    assert maj_at_k(["3", "5"], [True, False]) == 1.0
    assert maj_at_k([None, None, None, "4", "4"], [False, False, False, True, True]) == 1.0  # None never votes
    assert maj_at_k([None, None], [False, False]) == 0.0
    # first k=2 samples only: "7" vs "8" tie -> "7" (wrong) although "8" wins over all four
    assert maj_at_k(["7", "8", "8", "8"], [False, True, True, True], k=2) == 0.0
    assert maj_at_k(["7", "8", "8", "8"], [False, True, True, True]) == 1.0
    with pytest.raises(ValueError, match="k=5"):
        maj_at_k(["1"] * 4, [True] * 4, k=5)
    with pytest.raises(ValueError, match="3 predictions but 4"):
        maj_at_k(["1"] * 3, [True] * 4)


def _two_problems():
    # problem "A": correct T F F F, answers 1 2 2 3; problem "B": T T F T, answers 7 7 8 7
    ids = ["A"] * 4 + ["B"] * 4
    preds = ["1", "2", "2", "3", "7", "7", "8", "7"]
    correct = [True, False, False, False, True, True, False, True]
    return ids, preds, correct


def test_summarize_eval_hand_values():
    ids, preds, correct = _two_problems()
    out = summarize_eval(ids, preds, correct, ks=(1, 2, 4), num_resamples=4000, seed=0)
    expected = {
        "mean@4": 0.5,  # (1/4 + 3/4) / 2
        "pass@1": 0.5,  # (1/4 + 3/4) / 2
        "pass@2": 0.75,  # A: 1 - C(3,2)/C(4,2) = 0.5; B: n-c=1 < 2 -> 1
        "pass@4": 1.0,
        "maj@1": 1.0,  # both first samples are right
        "maj@2": 1.0,  # A: "1" vs "2" tie -> "1" (first), right; B: "7"
        "maj@4": 0.5,  # A: "2" wins (wrong); B: "7" wins (right)
    }
    for key, value in expected.items():
        assert out[key] == pytest.approx(value, abs=1e-12), key
    assert set(out) == set(expected) | {"pass@1_bootstrap", "pass@2_bootstrap", "pass@4_bootstrap"}
    # bootstrap expectations: k=1 -> 0.5; k=2 -> (1-.75^2 + 1-.25^2)/2 = 0.6875; k=4 -> (1-.75^4 + 1-.25^4)/2 = 0.8398
    assert out["pass@1_bootstrap"] == pytest.approx(0.5, abs=0.03)
    assert out["pass@2_bootstrap"] == pytest.approx(0.6875, abs=0.03)
    assert out["pass@4_bootstrap"] == pytest.approx(0.83984375, abs=0.03)


def test_summarize_eval_ignores_row_order():
    ids, preds, correct = _two_problems()
    order = [4, 0, 5, 1, 6, 2, 7, 3]  # interleave the problems, keep each problem's sample order
    pick = lambda xs: [xs[i] for i in order]  # noqa: E731
    shuffled = summarize_eval(pick(ids), pick(preds), pick(correct), ks=(1, 2, 4))
    plain = summarize_eval(ids, preds, correct, ks=(1, 2, 4))
    for key in ("mean@4", "pass@1", "pass@2", "pass@4", "maj@1", "maj@2", "maj@4"):
        assert shuffled[key] == plain[key], key


def test_summarize_eval_rejects_bad_input():
    ids, preds, correct = _two_problems()
    with pytest.raises(ValueError, match=r"every k in ks=\[1, 8\] must lie in \[1, 4\]"):
        summarize_eval(ids, preds, correct, ks=(1, 8))
    with pytest.raises(ValueError, match=r"different sample counts \[3, 4\]"):
        summarize_eval(ids[:-1], preds[:-1], correct[:-1], ks=(1,))
    with pytest.raises(ValueError, match="one of each per sample"):
        summarize_eval(ids, preds[:-1], correct, ks=(1,))
    with pytest.raises(ValueError, match="no samples"):
        summarize_eval([], [], [], ks=(1,))
