"""Evaluation metrics (docs/algorithms.md section 8): unbiased pass@k and rollout diversity.

pass@k is the chance that at least one of k samples drawn without replacement from n is
correct, estimated from c correct ones: 1 - C(n-c, k) / C(n, k), computed as a product so
large n does not overflow. Diversity counts the distinct clusters among one prompt's
rollouts, either by their action sequence (tool calls and final answer, normalised) or by
agglomerative clustering of TF-IDF vectors under a cosine-distance threshold.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np

from aepo.protocol import Part, extract_answer, model_text, parse_tool_calls, split_response
from aepo.rewards.qa import normalize_answer

__all__ = [
    "agglomerative_clusters",
    "mean_diversity",
    "mean_pass_at_k",
    "pass_at_k",
    "rollout_action_key",
    "rollout_clusters",
]

Linkage = Literal["average", "single", "complete"]
_LINKAGES = ("average", "single", "complete")
_DIVERSITY_BY = ("actions", "text")


def _check_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return int(value)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k)."""
    n, c, k = _check_int("n", n), _check_int("c", c), _check_int("k", k)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 0 <= c <= n:
        raise ValueError(f"c must be in [0, n={n}], got {c}")
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, n={n}], got {k}")
    if n - c < k:
        return 1.0
    # C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k / i)
    fail = math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))
    return 1.0 - fail


def mean_pass_at_k(correct_matrix: Sequence[Sequence[Any]] | np.ndarray, k: int) -> float:
    """pass@k averaged over questions; row q holds the 0/1 (or bool) correctness of its samples.

    Rows may have different lengths; each must have at least k samples.
    """
    rows = list(correct_matrix)
    if not rows:
        raise ValueError("correct_matrix is empty: need at least one question")
    total = 0.0
    for q, row in enumerate(rows):
        values = np.asarray(row, dtype=float).ravel()
        if values.size == 0:
            raise ValueError(f"correct_matrix row {q} is empty")
        if not np.all((values == 0) | (values == 1)):
            raise ValueError(f"correct_matrix row {q} must hold only 0/1 or booleans")
        if k > values.size:
            raise ValueError(f"k={k} exceeds the {values.size} samples of correct_matrix row {q}")
        total += pass_at_k(int(values.size), int(values.sum()), k)
    return total / len(rows)


# ------------------------------------------------------------------------- rollout diversity


def _field(rollout: Any, name: str, default: Any = None) -> Any:
    if isinstance(rollout, Mapping):
        return rollout.get(name, default)
    return getattr(rollout, name, default)


def _rollout_text(rollout: Any) -> str:
    if isinstance(rollout, str):
        return rollout
    text = _field(rollout, "text")
    if text is None:
        text = _field(rollout, "response", "")
    if not isinstance(text, str):
        raise ValueError(f"rollout text must be a string, got {type(text).__name__}")
    return text


def _model_text(rollout: Any) -> str:
    """What the model itself wrote: segments by position when the rollout has them (a
    Trajectory, or a dict with "segments" of {"role", "text"}), else the text cut at its
    result blocks. Tool output never supplies an answer."""
    segments = None if isinstance(rollout, str) else _field(rollout, "segments")
    if not segments:
        return model_text(split_response(_rollout_text(rollout)))
    parts: list[Part] = [(_field(seg, "role"), str(_field(seg, "text", ""))) for seg in segments]
    return model_text(parts)


def _normalise_argument(tool: str, argument: str) -> str:
    if tool == "search":
        return normalize_answer(argument)
    return " ".join(str(argument).split())


def _tool_call_pairs(rollout: Any) -> list[tuple[str, str]]:
    if isinstance(rollout, str):
        return parse_tool_calls(rollout)
    calls = _field(rollout, "tool_calls")
    if calls is None:
        return parse_tool_calls(_model_text(rollout))
    pairs = []
    for call in calls:
        if isinstance(call, (tuple, list)) and len(call) >= 2:
            pairs.append((str(call[0]), str(call[1])))
        else:
            name, arg = _field(call, "name"), _field(call, "argument")
            if name is None:
                raise ValueError(f"a tool call must have a name and an argument, got {call!r}")
            pairs.append((str(name), "" if arg is None else str(arg)))
    return pairs


def rollout_action_key(rollout: Any) -> tuple[tuple[tuple[str, str], ...], str]:
    """(normalised tool calls, normalised final answer) of a response text, dict or Trajectory.

    Dicts/objects may give `tool_calls` ((name, argument) pairs, dicts or ToolCall objects)
    and `answer`; missing parts are parsed from what the model wrote (`segments` when given,
    else `text` or `response` without its result blocks).
    """
    calls = tuple((name, _normalise_argument(name, arg)) for name, arg in _tool_call_pairs(rollout))
    answer = None if isinstance(rollout, str) else _field(rollout, "answer")
    if answer is None:
        answer = extract_answer(_model_text(rollout))
    return calls, normalize_answer(answer) if answer is not None else ""


_WORD_RE = re.compile(r"\w+")


def _words(text: str) -> list[str]:
    """Lower-case word tokens, accents stripped; punctuation and tags separate words."""
    s = unicodedata.normalize("NFKD", text)
    return _WORD_RE.findall("".join(ch for ch in s if not unicodedata.combining(ch)).lower())


def _tfidf(texts: Sequence[str]) -> np.ndarray:
    """L2-normalised TF-IDF rows (smooth idf: log((1+n)/(1+df)) + 1) over the given texts."""
    docs = [_words(t) for t in texts]
    vocab = {w: i for i, w in enumerate(sorted({w for d in docs for w in d}))}
    tf = np.zeros((len(docs), len(vocab)))
    for r, d in enumerate(docs):
        for w, cnt in Counter(d).items():
            tf[r, vocab[w]] = cnt
    df = (tf > 0).sum(axis=0)
    idf = np.log((1 + len(docs)) / (1 + df)) + 1.0
    x = tf * idf
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)


def agglomerative_clusters(distance: np.ndarray, threshold: float, linkage: Linkage = "average") -> list[int]:
    """Cluster labels from a symmetric distance matrix: repeatedly merge the two closest
    clusters while their linkage distance is below `threshold`."""
    if linkage not in _LINKAGES:
        raise ValueError(f"linkage must be one of {', '.join(_LINKAGES)}, got {linkage!r}")
    d = np.asarray(distance, dtype=float)
    if d.ndim != 2 or d.shape[0] != d.shape[1]:
        raise ValueError(f"distance must be a square matrix, got shape {d.shape}")
    clusters: list[list[int]] = [[i] for i in range(d.shape[0])]
    reduce = {"average": np.mean, "single": np.min, "complete": np.max}[linkage]
    while len(clusters) > 1:
        best, pair = math.inf, (0, 0)
        for a in range(len(clusters)):
            for b in range(a + 1, len(clusters)):
                link = float(reduce(d[np.ix_(clusters[a], clusters[b])]))
                if link < best:
                    best, pair = link, (a, b)
        if best >= threshold:
            break
        a, b = pair
        clusters[a] = clusters[a] + clusters[b]
        del clusters[b]
    labels = [0] * d.shape[0]
    for label, members in enumerate(clusters):
        for i in members:
            labels[i] = label
    return labels


def rollout_clusters(
    rollouts: Sequence[Any],
    by: Literal["actions", "text"] = "actions",
    *,
    threshold: float = 0.3,
    linkage: Linkage = "average",
) -> int:
    """Number of distinct clusters among one prompt's rollouts.

    by="actions": rollouts with the same normalised tool-call sequence and final answer
    share a cluster. by="text": agglomerative clustering of TF-IDF vectors of the response
    texts; two clusters merge while their cosine distance (by `linkage`) is below `threshold`.
    """
    if by not in _DIVERSITY_BY:
        raise ValueError(f"by must be one of {', '.join(_DIVERSITY_BY)}, got {by!r}")
    items = list(rollouts)
    if not items:
        return 0
    if by == "actions":
        return len({rollout_action_key(r) for r in items})
    if not 0.0 <= threshold <= 2.0:
        raise ValueError(f"threshold is a cosine distance in [0, 2], got {threshold}")
    texts = [_rollout_text(r) for r in items]
    x = _tfidf(texts)
    dist = 1.0 - x @ x.T
    tokens = [tuple(_words(t)) for t in texts]
    for i in range(len(items)):  # identical (also empty) texts are at distance 0
        for j in range(len(items)):
            if tokens[i] == tokens[j]:
                dist[i, j] = 0.0
    np.clip(dist, 0.0, 2.0, out=dist)
    return len(set(agglomerative_clusters(dist, threshold, linkage)))


def mean_diversity(
    groups: Sequence[Sequence[Any]],
    by: Literal["actions", "text"] = "actions",
    *,
    threshold: float = 0.3,
    linkage: Linkage = "average",
) -> float:
    """`rollout_clusters` averaged over prompts (one group of rollouts per prompt)."""
    groups = list(groups)
    if not groups:
        raise ValueError("groups is empty: need at least one prompt's rollouts")
    return float(np.mean([rollout_clusters(g, by, threshold=threshold, linkage=linkage) for g in groups]))
