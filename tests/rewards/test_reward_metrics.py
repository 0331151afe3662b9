"""pass@k (hand-computed and brute-force) and rollout diversity."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import numpy as np
import pytest

from aepo.rewards.metrics import (
    agglomerative_clusters,
    mean_diversity,
    mean_pass_at_k,
    pass_at_k,
    rollout_action_key,
    rollout_clusters,
)
from aepo.types import ToolCall, Trajectory

# ----------------------------------------------------------------------------- pass@k


def test_pass_at_k_hand_computed() -> None:
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    assert pass_at_k(10, 3, 5) == pytest.approx(1 - 21 / 252)  # 1 - C(7,5)/C(10,5)
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert pass_at_k(8, 0, 3) == 0.0
    assert pass_at_k(8, 8, 3) == 1.0
    assert pass_at_k(8, 6, 3) == 1.0  # fewer than k wrong samples: every draw has a correct one
    for n in range(1, 12):
        for c in range(n + 1):
            assert pass_at_k(n, c, 1) == pytest.approx(c / n)


def test_pass_at_k_matches_brute_force_enumeration() -> None:
    for n in range(1, 9):
        for c in range(n + 1):
            samples = [1] * c + [0] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(range(n), k))
                hit = sum(any(samples[i] for i in s) for s in subsets)
                assert pass_at_k(n, c, k) == pytest.approx(hit / len(subsets), abs=1e-12), (n, c, k)


def test_pass_at_k_is_stable_for_large_n() -> None:
    n, c, k = 2000, 37, 100
    exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
    assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-12)
    assert pass_at_k(100000, 1, 1) == pytest.approx(1e-5)


@pytest.mark.parametrize(
    "args, message",
    [
        ((5, 2, 6), r"k must be in \[1, n=5\], got 6"),
        ((5, 2, 0), r"k must be in \[1, n=5\], got 0"),
        ((5, 6, 1), r"c must be in \[0, n=5\], got 6"),
        ((5, -1, 1), r"c must be in \[0, n=5\], got -1"),
        ((0, 0, 1), r"n must be >= 1, got 0"),
        ((5.0, 2, 1), r"n must be an integer"),
        ((5, True, 1), r"c must be an integer"),
    ],
)
def test_pass_at_k_rejects_bad_arguments(args: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        pass_at_k(*args)


def test_mean_pass_at_k() -> None:
    matrix = [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [True, True, True, True]]
    expected = np.mean([pass_at_k(4, c, 2) for c in (1, 2, 0, 4)])  # (0.5 + 5/6 + 0 + 1) / 4
    assert mean_pass_at_k(matrix, 2) == pytest.approx(expected)
    assert mean_pass_at_k(matrix, 2) == pytest.approx((0.5 + 5 / 6 + 0 + 1) / 4)
    assert mean_pass_at_k(np.array(matrix, dtype=bool), 1) == pytest.approx((1 / 4 + 2 / 4 + 0 + 1) / 4)
    assert mean_pass_at_k([[1, 0], [0, 0, 1, 1]], 2) == pytest.approx((1.0 + (1 - 1 / 6)) / 2)  # ragged rows
    with pytest.raises(ValueError, match="k=3 exceeds the 2 samples of correct_matrix row 0"):
        mean_pass_at_k([[1, 0]], 3)
    with pytest.raises(ValueError, match="correct_matrix is empty"):
        mean_pass_at_k([], 1)
    with pytest.raises(ValueError, match="row 1 must hold only 0/1"):
        mean_pass_at_k([[1, 0], [0.5, 1]], 1)


# ----------------------------------------------------------------------------- diversity


def _resp(calls: list[tuple[str, str]], answer: str) -> str:
    body = "".join(
        f"<think>step</think><{n}>{a}</{n}><result>whatever {i}</result>" for i, (n, a) in enumerate(calls)
    )
    return body + f"<answer>{answer}</answer>"


def test_action_clusters_normalise_calls_and_answers() -> None:
    group = [
        _resp([("search", "Capital of France")], "Paris"),
        _resp([("search", "capital of  france?")], "the Paris."),  # same after normalisation
        _resp([("search", "capital of france")], "Lyon"),  # other answer
        _resp([("search", "capital of france"), ("python", "print(1)")], "Paris"),  # other actions
        _resp([("python", "print( 1 )")], "Paris"),  # code keeps its punctuation
        _resp([("python", "print(1)")], "Paris"),
        _resp([], "Paris"),
    ]
    assert rollout_clusters(group) == 6
    key = rollout_action_key(group[0])
    assert key == ((("search", "capital of france"),), "paris")


def test_action_clusters_accept_dicts_and_trajectories() -> None:
    text = _resp([("search", "Who wrote Hamlet")], "Shakespeare")
    as_dict = {"tool_calls": [{"name": "search", "argument": "who wrote hamlet"}], "answer": "shakespeare"}
    as_pairs = {"tool_calls": [("search", "WHO wrote Hamlet?")], "text": "<answer>Shakespeare</answer>"}
    traj = Trajectory(
        prompt_id="p",
        row_id=0,
        prompt_ids=[1],
        text=text,
        tool_calls=[ToolCall(name="search", argument="Who wrote Hamlet", result="...")],
    )
    other = {"text": _resp([("search", "hamlet author")], "Shakespeare")}
    assert rollout_clusters([text, as_dict, as_pairs, traj]) == 1
    assert rollout_clusters([text, as_dict, as_pairs, traj, other]) == 2
    assert rollout_clusters([]) == 0
    with pytest.raises(ValueError, match="by must be one of actions, text"):
        rollout_clusters([text], by="tokens")  # type: ignore[arg-type]


def test_agglomerative_clusters_linkages() -> None:
    # points on a line at 0, 1, 2, 10: single linkage chains 0-1-2, complete splits by span
    x = np.array([0.0, 1.0, 2.0, 10.0])
    d = np.abs(x[:, None] - x[None, :])
    single = agglomerative_clusters(d, threshold=1.5, linkage="single")
    assert single[0] == single[1] == single[2] != single[3]
    complete = agglomerative_clusters(d, threshold=1.5, linkage="complete")
    assert len(set(complete)) == 3  # {0,1} (or {1,2}), the other end, and 10
    average = agglomerative_clusters(d, threshold=1.6, linkage="average")
    assert len(set(average)) == 2  # {0,1} merges at 1.0, then {0,1}+{2}: mean(2, 1) = 1.5 < 1.6
    assert len(set(agglomerative_clusters(d, threshold=1.4, linkage="average"))) == 3
    assert len(set(agglomerative_clusters(d, threshold=0.5))) == 4
    assert len(set(agglomerative_clusters(d, threshold=100.0))) == 1
    with pytest.raises(ValueError, match="linkage must be one of average, single, complete"):
        agglomerative_clusters(d, 0.5, linkage="ward")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"square matrix, got shape \(2, 3\)"):
        agglomerative_clusters(np.zeros((2, 3)), 0.5)


def test_text_clusters_tfidf_cosine() -> None:
    group = [
        "The cat sat on the mat.",
        "the cat sat on the mat",  # the same words: distance 0
        "A cat sat on a mat today",  # shares cat/sat/on/mat: distance ~0.66 to the first two
        "Quantum chromodynamics lecture notes",  # no shared word: distance 1
        "",
        "",  # two empty texts are identical
    ]
    assert rollout_clusters(group, by="text", threshold=0.3) == 4  # {0,1} {2} {3} {4,5}
    assert rollout_clusters(group, by="text", threshold=0.7) == 3  # {0,1,2} {3} {4,5}
    assert rollout_clusters(group, by="text", threshold=1e-9) == 4  # only identical texts merge
    assert rollout_clusters(group, by="text", threshold=0.0) == 6  # merging needs distance < threshold
    assert rollout_clusters(group, by="text", threshold=1.01) == 1
    with pytest.raises(ValueError, match="cosine distance"):
        rollout_clusters(group, by="text", threshold=3.0)


def test_text_clusters_hand_computed_distance() -> None:
    # TF-IDF over 2 docs "a b" / "a c" (smooth idf): a -> 1, b, c -> log(3/2) + 1.
    # cosine = 1 / (1 + w^2) with w = log 1.5 + 1, so distance = 1 - 1/(1 + w^2) ~ 0.6640
    w = math.log(1.5) + 1
    dist = 1 - 1 / (1 + w * w)
    pair = ["alpha beta", "alpha gamma"]
    assert rollout_clusters(pair, by="text", threshold=dist + 1e-6) == 1
    assert rollout_clusters(pair, by="text", threshold=dist - 1e-6) == 2


def test_mean_diversity() -> None:
    g1 = [_resp([], "a"), _resp([], "a"), _resp([], "b")]  # 2 clusters
    g2 = [_resp([("search", "x")], "a")] * 4  # 1 cluster
    g3 = [_resp([], str(i)) for i in range(3)]  # 3 clusters
    assert mean_diversity([g1, g2, g3]) == pytest.approx(2.0)
    assert mean_diversity([["one two", "one two"], ["x", "y z"]], by="text") == pytest.approx(1.5)
    with pytest.raises(ValueError, match="groups is empty"):
        mean_diversity([])
