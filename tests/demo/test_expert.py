"""The scripted expert: real tool calls, solvable questions, noise rates as configured."""

from __future__ import annotations

import functools
import math
import random
import re
from collections import Counter, defaultdict

import pytest

from aepo.demo.expert import (
    NOISE_KINDS,
    ExpertNoise,
    demonstrations,
    expert_trajectory,
    is_correct,
    normalize_answer,
    parse_number,
    parse_search_result,
    run_expert,
)
from aepo.demo.world import World, build_world, word_split
from aepo.tools.search import _import_bm25s  # bm25s without JAX (a JAX import claims GPU memory per process)

TAG = re.compile(r"</?(think|search|calc|python|answer|result)>")
MODEL_CALL = re.compile(r"^<think> [^<>]+ </think>\n<(search|calc|python)> ([^<>]+) </\1>$")
MODEL_ANSWER = re.compile(r"^<think> [^<>]* </think>\n<answer> ([^<>]+) </answer>$")


def make_tool(corpus: list[dict], with_title: bool = True, k: int = 3):
    """BM25 search over the corpus (lower case, split on non-alphanumerics) plus a tiny
    calculator: the same rendering as the project's search tool."""

    def tok(text: str) -> list[str]:
        return re.findall(r"[a-z0-9]+", text.lower())

    retriever = _import_bm25s().BM25()
    retriever.index(
        [tok((d["title"] + " " + d["text"]) if with_title else d["text"]) for d in corpus],
        show_progress=False,
    )

    @functools.cache
    def search(query: str) -> str:
        ids, scores = retriever.retrieve([tok(query) or [""]], k=k, show_progress=False)
        pages = [corpus[i] for i, s in zip(ids[0], scores[0]) if s > 0]
        if not pages:
            return f"No results found for '{query}'."
        return "\n".join(f"Page {j}: {d['title']}: {d['text']}" for j, d in enumerate(pages, 1))

    def tool(name: str, argument: str) -> str:
        if name == "search":
            return search(argument)
        m = re.fullmatch(r"(?:print\()?(\d+) ([-+]) (\d+)\)?", argument.strip())
        assert m, argument
        a, b = int(m[1]), int(m[3])
        return str(a + b if m[2] == "+" else a - b) + ("\n" if name == "python" else "")

    return tool


@pytest.fixture(scope="module")
def world() -> World:
    return build_world(seed=0)


@pytest.fixture(scope="module")
def tool(world):
    return make_tool(world.corpus)


def _accuracy_by_kind(runs) -> dict[str, float]:
    by = defaultdict(list)
    for kind, ok in runs:
        by[kind].append(ok)
    return {k: sum(v) / len(v) for k, v in by.items()}


@pytest.mark.parametrize("with_title", [True, False])
def test_clean_expert_answers_every_kind(world, with_title):
    tool = make_tool(world.corpus, with_title)
    rows = world.test + world.train[:600]
    runs = [
        (r["kind"], run_expert(r, world, tool, random.Random(i), ExpertNoise.clean()).correct)
        for i, r in enumerate(rows)
    ]
    acc = _accuracy_by_kind(runs)
    assert set(acc) == {"one_hop", "multi_hop", "arithmetic", "retry"}
    assert all(a >= 0.95 for a in acc.values()), acc


def test_segments_are_well_formed_and_tool_results_are_real(world, tool):
    calls = []

    def recording_tool(name: str, argument: str) -> str:
        calls.append((name, argument))
        return tool(name, argument)

    for i, row in enumerate(world.train[:300]):
        calls.clear()
        segments = expert_trajectory(row, world, recording_tool, random.Random(i), ExpertNoise())
        roles = [role for role, _ in segments]
        assert roles == ["model", "tool"] * (len(segments) // 2) + ["model"]
        for (_, text), (name, arg), (_, result) in zip(segments[0::2], calls, segments[1::2]):
            m = MODEL_CALL.match(text)
            assert m and (m.group(1), m.group(2)) == (name, arg), text
            assert result == tool(name, arg)
        assert len(calls) == len(segments) // 2
        assert MODEL_ANSWER.match(segments[-1][1]), segments[-1][1]


def test_every_word_the_expert_reads_or_writes_is_in_the_vocabulary(world, tool):
    vocab = world.vocabulary()
    rows = demonstrations(world, "train", tool, n=400, seed=0, noise=ExpertNoise(unnecessary_call=0.5))
    rows += demonstrations(world, "test", tool, n=100, seed=0, noise=ExpertNoise(skip_calc=0.0))
    for row in rows:
        for _, text in row["segments"]:
            words = set(word_split(TAG.sub(" ", text)))
            assert words <= vocab, words - vocab


def _noisy_runs(world, tool, noise, rows, seed=0):
    rng = random.Random(seed)
    return [run_expert(r, world, tool, rng, noise) for r in rows]


def test_noise_rates_are_realised(world, tool):
    noise = ExpertNoise(
        wrong_trust=0.2,
        early_answer=0.15,
        no_retry=0.4,
        vague_query=0.2,
        unnecessary_call=0.25,
        skip_calc=0.3,
    )
    runs = _noisy_runs(world, tool, noise, world.train)
    chances, events = Counter(), Counter()
    for run in runs:
        chances.update(run.chances)
        events.update(run.events)
    for kind in NOISE_KINDS:
        p, n = getattr(noise, kind), chances[kind]
        assert n >= 100, (kind, n)
        assert abs(events[kind] / n - p) < 4 * math.sqrt(p * (1 - p) / n) + 0.01, (kind, events[kind], n)


def test_noisy_expert_accuracy_is_in_band(world, tool):
    for split in ("train", "test"):
        runs = _noisy_runs(world, tool, ExpertNoise(), world.split(split))
        acc = sum(r.correct for r in runs) / len(runs)
        assert 0.55 <= acc <= 0.8, (split, acc)
        by_kind = _accuracy_by_kind((r["kind"], run.correct) for r, run in zip(world.split(split), runs))
        assert by_kind["one_hop"] > max(by_kind["arithmetic"], by_kind["retry"]), by_kind
        assert all(0.3 < a < 0.95 for a in by_kind.values()), by_kind


def test_each_noise_kind_costs_accuracy_where_it_acts(world, tool):
    def acc(noise, kinds):
        rows = [r for r in world.train if r["kind"] in kinds][:300]
        return sum(run.correct for run in _noisy_runs(world, tool, noise, rows)) / len(rows)

    clean = ExpertNoise.clean()
    assert acc(ExpertNoise(**{**clean.__dict__, "early_answer": 1.0}), {"one_hop", "multi_hop"}) < 0.2
    assert (
        acc(ExpertNoise(**{**clean.__dict__, "skip_calc": 1.0, "head_math_error": 1.0}), {"arithmetic"}) == 0
    )
    assert acc(ExpertNoise(**{**clean.__dict__, "skip_calc": 1.0}), {"arithmetic"}) == 1.0  # head math right
    assert acc(ExpertNoise(**{**clean.__dict__, "wrong_trust": 1.0}), {"one_hop"}) < 0.3
    no_retry = acc(ExpertNoise(**{**clean.__dict__, "no_retry": 1.0}), {"retry"})
    assert 0.3 < no_retry < 0.8  # right only when the nickname search found the person
    assert acc(ExpertNoise(**{**clean.__dict__, "unnecessary_call": 1.0}), {"one_hop", "arithmetic"}) == 1.0
    assert acc(ExpertNoise(**{**clean.__dict__, "vague_query": 1.0}), {"one_hop"}) == 1.0  # it retries


def test_search_results_hold_distractors(world, tool):
    """Person searches return other people with the same last name, often with a first name
    one letter off; nickname searches find the person (not always first), others, or nothing."""
    same_last = one_letter = lookups = 0
    nick = Counter()
    for i, row in enumerate(world.test + world.train[:300]):
        segments = expert_trajectory(row, world, tool, random.Random(i), ExpertNoise.clean())
        for j, ((_, call), (_, result)) in enumerate(zip(segments[0::2], segments[1::2])):
            query = MODEL_CALL.match(call).group(2)
            titles = [t for t, _ in parse_search_result(result)]
            if row["kind"] == "retry" and j == 0:
                name = world.person_by_id[row["bindings"]["p"]].name
                outcome = "nothing" if not titles else "found" if name in titles else "others"
                nick[outcome] += 1
                nick["not_first"] += outcome == "found" and titles[0] != name
                continue
            if not query.endswith(" born") or query.count(" ") != 2:
                continue
            first, last = query.split()[:2]
            assert f"{first} {last}" in titles, (query, titles)
            lookups += 1
            others = [t.split() for t in titles if t != f"{first} {last}" and world.entity_by_title(t)]
            same_last += any(o[-1] == last for o in others)
            one_letter += any(
                o[-1] == last and len(o[0]) == len(first) and sum(a != b for a, b in zip(o[0], first)) == 1
                for o in others
            )
    assert lookups > 200
    assert same_last / lookups > 0.6 and one_letter / lookups > 0.3, (same_last, one_letter, lookups)
    retries = nick["nothing"] + nick["found"] + nick["others"]
    assert min(nick["nothing"], nick["found"], nick["others"]) > 0.1 * retries, nick
    assert nick["not_first"] > 0.2 * nick["found"], nick


def _retry_row(world, indexed: bool) -> dict:
    for row in world.train:
        person = world.person_by_id[row["bindings"].get("p", "")] if "p" in row["bindings"] else None
        if row["kind"] == "retry" and row["template"] == "p_city" and person.nickname_indexed == indexed:
            return row
    raise AssertionError("no such retry question")


def test_retry_after_an_empty_search(world, tool):
    row = _retry_row(world, indexed=False)
    p = world.person_by_id[row["bindings"]["p"]]

    def empty_first(name: str, argument: str) -> str:
        return f"No results found for '{argument}'." if argument == p.nickname else tool(name, argument)

    segs = expert_trajectory(row, world, empty_first, random.Random(0), ExpertNoise.clean())
    assert segs[0][1].endswith(f"<search> {p.nickname} </search>")
    assert segs[1][1] == f"No results found for '{p.nickname}'."
    assert f"{p.nickname} not found. look up {p.name}." in segs[2][1]
    assert segs[2][1].endswith(f"<search> {p.name} born </search>")
    city = world.city_by_id[p.birth_city].name
    assert segs[-1][1] == f"<think> {p.name} was born in {city}. </think>\n<answer> {city} </answer>"

    gave_up = expert_trajectory(
        row, world, empty_first, random.Random(0), ExpertNoise(no_retry=1.0, early_answer=0.0)
    )
    assert len(gave_up) == 3 and f"{p.nickname} not found. guess." in gave_up[2][1]


def test_wrong_trust_reads_the_distractor_page(world):
    p = world.people[0]
    other = next(q for q in world.people if q.last == p.last and q.birth_city != p.birth_city)
    page = "Page {}: {}: {}".format
    doc = {d["title"]: d["text"] for d in world.corpus}
    result = "\n".join([page(1, other.name, doc[other.name]), page(2, p.name, doc[p.name])])
    row = {
        "id": "x",
        "template": "p_city",
        "bindings": {"p": p.id},
        "kind": "one_hop",
        "answer": [world.city_by_id[p.birth_city].name],
    }
    noise = ExpertNoise(**{**ExpertNoise.clean().__dict__, "wrong_trust": 1.0})
    run = run_expert(row, world, lambda name, arg: result, random.Random(0), noise)
    assert run.prediction == world.city_by_id[other.birth_city].name and not run.correct
    assert f"{p.name} was born in {run.prediction}." in run.segments[-1][1]  # misattributed
    run = run_expert(row, world, lambda name, arg: result, random.Random(0), ExpertNoise.clean())
    assert run.correct and run.events == Counter()


def test_arithmetic_through_the_python_tool(world, tool):
    rows = [r for r in world.test if r["kind"] == "arithmetic"][:40]
    for i, row in enumerate(rows):
        segs = expert_trajectory(row, world, tool, random.Random(i), ExpertNoise.clean(), calc_tool="python")
        assert re.search(r"<python> print\(\d+ [-+] \d+\) </python>$", segs[-3][1]), segs[-3][1]
        assert segs[-1][1].endswith(f"<answer> {row['answer'][0]} </answer>")


def test_expert_is_deterministic_given_rng(world, tool):
    rows = world.train[:200]
    a = [expert_trajectory(r, world, tool, random.Random(i), ExpertNoise()) for i, r in enumerate(rows)]
    b = [expert_trajectory(r, world, tool, random.Random(i), ExpertNoise()) for i, r in enumerate(rows)]
    assert a == b
    d1 = demonstrations(world, "train", tool, n=100, seed=3)
    assert d1 == demonstrations(world, "train", tool, n=100, seed=3)
    assert d1 != demonstrations(world, "train", tool, n=100, seed=4)


def test_demonstrations_rows(world, tool):
    rows = demonstrations(world, "test", tool, n=len(world.test) + 10, seed=0, noise=ExpertNoise())
    assert len(rows) == len(world.test) + 10
    assert {r["id"] for r in rows} == {r["id"] for r in world.test}  # a full pass, then more
    by_id = {r["id"]: r for r in world.test}
    for r in rows:
        assert set(r) == {"id", "prompt", "segments", "answer", "prediction", "correct", "kind", "events"}
        assert r["prompt"] == by_id[r["id"]]["question"] and r["answer"] == by_id[r["id"]]["answer"]
        assert r["correct"] == is_correct(r["prediction"], r["answer"])
        assert r["segments"][-1][1].endswith(f"<answer> {r['prediction']} </answer>")
    assert demonstrations(world, "train", tool, n=0) == []
    assert len(demonstrations(world, "test", tool)) == len(world.test)


def test_bad_inputs_raise_clear_errors(world, tool):
    with pytest.raises(ValueError, match="ExpertNoise.wrong_trust"):
        ExpertNoise(wrong_trust=1.5)
    with pytest.raises(ValueError, match="template"):
        run_expert({"id": "q1", "question": "?"}, world, tool, random.Random(0))
    with pytest.raises(ValueError, match="calc_tool"):
        run_expert(world.train[0], world, tool, random.Random(0), calc_tool="abacus")
    with pytest.raises(ValueError, match="returned int"):
        run_expert(world.train[0], world, lambda name, arg: 3, random.Random(0), ExpertNoise.clean())
    with pytest.raises(ValueError, match="split must be"):
        demonstrations(world, "dev", tool)
    with pytest.raises(ValueError, match="n must be"):
        demonstrations(world, "test", tool, n=-1)


def test_parsing_helpers():
    text = "Page 1: mira velin: mira velin was born in tolva.\nPage 2: velin family: a, b and c are cousins."
    assert parse_search_result(text) == [
        ("mira velin", "mira velin was born in tolva."),
        ("velin family", "a, b and c are cousins."),
    ]
    assert parse_search_result("No results found for 'zeky'.") == []
    assert parse_number("41\n") == 41 and parse_number("result: 41.0") == 41
    assert parse_number("error: bad expression") is None and parse_number("2.5") is None
    assert normalize_answer("The  Dorvo Labs!") == "dorvo labs"
    assert is_correct("dorvo", ["dorvo labs", "dorvo"]) and not is_correct("dorvo lab", ["dorvo labs"])
