"""The synthetic demo world: reproducibility, split disjointness, answers backed by the corpus."""

from __future__ import annotations

import re
from collections import Counter

import pytest
from typer.testing import CliRunner

from aepo.cli import app as cli_app
from aepo.demo.world import (
    KINDS,
    TEMPLATES,
    City,
    Lookup,
    Org,
    Person,
    World,
    WorldSpec,
    build_world,
    subjects,
    word_split,
    world_spec,
)

FILES = ("corpus.jsonl", "train.jsonl", "test.jsonl", "world.json")


@pytest.fixture(scope="module")
def world() -> World:
    return build_world(seed=0)


def test_same_seed_writes_identical_files(tmp_path, world):
    world.save(tmp_path / "a")
    build_world(seed=0).save(tmp_path / "b")
    for name in FILES:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_different_seed_gives_a_different_world(world):
    other = build_world(seed=1)
    assert [d["text"] for d in other.corpus] != [d["text"] for d in world.corpus]
    assert [r["question"] for r in other.train] != [r["question"] for r in world.train]
    assert {p.name for p in other.people} != {p.name for p in world.people}


def test_save_load_round_trip(tmp_path, world):
    world.save(tmp_path / "w")
    loaded = World.load(tmp_path / "w")
    assert loaded.corpus == world.corpus
    assert loaded.train == world.train and loaded.test == world.test
    assert loaded.people == world.people and loaded.orgs == world.orgs and loaded.cities == world.cities
    assert loaded.spec == world.spec
    assert loaded.vocabulary() == world.vocabulary()
    loaded.save(tmp_path / "again")
    for name in FILES:
        assert (tmp_path / "w" / name).read_bytes() == (tmp_path / "again" / name).read_bytes(), name


def test_train_and_test_ask_about_different_entities(world):
    train = set().union(*(subjects(r) for r in world.train))
    test = set().union(*(subjects(r) for r in world.test))
    assert train and test and not train & test
    # also by name, as a reader of the question text sees it
    test_people = {world.person_by_id[k].name for kind, k in test if kind == "person"}
    assert not any(name in r["question"] for r in world.train for name in test_people)


def test_rows_have_the_dataset_schema(world):
    for split, n in (("train", world.spec.train_questions), ("test", world.spec.test_questions)):
        rows = world.split(split)
        assert len(rows) == n
        assert len({r["question"] for r in rows}) == n  # no duplicate questions
        assert [r["id"] for r in rows] == [f"{split}-{i:05d}" for i in range(n)]
        for r in rows:
            assert r["data_source"] == "demo_world" and r["level"] == 2
            assert r["kind"] in KINDS and r["answer"] and all(isinstance(a, str) for a in r["answer"])
            t = TEMPLATES[r["template"]]
            assert r["hops"] == t.hops and r["needs"] == t.needs
            assert ("calc" in r["needs"]) == (r["kind"] == "arithmetic")
            if r["kind"] == "retry":
                p = world.person_by_id[r["bindings"]["p"]]
                assert r["question"].startswith(t.text.split("{")[0])
                assert f"{p.nickname} is the nickname of {p.name}." in r["question"]


def _facts_from_corpus_text(corpus: list[dict]) -> dict[tuple[str, str], str]:
    """Rebuild the facts from the document text alone (independent of the entity tables)."""
    facts: dict[tuple[str, str], str] = {}
    person = re.compile(
        r"^(\w+ \w+)(?:, nicknamed \w+,)? was born in (\w+) in (\d+) and works for (\w+ \w+)\.$"
    )
    org = re.compile(r"^(\w+ \w+) was founded in (\d+) by (\w+ \w+) and is based in (\w+)\.$")
    city = re.compile(r"^(\w+) is a city in the country of (\w+)\.$")
    for d in corpus:
        if m := person.match(d["text"]):
            name, c, y, o = m.groups()
            facts.update({(name, "born_city"): c, (name, "born_year"): y, (name, "employer"): o})
        elif m := org.match(d["text"]):
            name, y, f, c = m.groups()
            facts.update({(name, "founded_year"): y, (name, "founder"): f, (name, "based_city"): c})
        elif m := city.match(d["text"]):
            facts[(m.group(1), "country")] = m.group(2)
        else:  # a family page: names people, states no fact
            assert d["title"].endswith(" family"), d
            assert re.match(
                rf"^{d['title'][: -len(' family')]} grew up with the cousins [a-z, ]+ in one old house\.$",
                d["text"],
            ), d
        if not d["title"].endswith(" family"):
            assert d["text"].startswith(d["title"] + " ") or d["text"].startswith(d["title"] + ","), d
    return facts


def test_every_answer_follows_from_the_corpus_text(world):
    facts = _facts_from_corpus_text(world.corpus)
    corpus_text = " ".join(d["text"] for d in world.corpus)
    for row in world.train + world.test:
        t = TEMPLATES[row["template"]]
        env = {}
        for var, key in row["bindings"].items():
            env[var] = (
                world.person_by_id[key].name
                if var in "pq"
                else world.org_by_id[key].name
                if var == "o"
                else key
            )
        for step in t.steps:
            if isinstance(step, Lookup):
                for rel, out in zip(step.rels, step.outs):
                    env[out] = facts[(env[step.src], rel)]
            else:
                a, b = int(env[step.a]), int(env[step.b])
                env[step.out] = str({"+": a + b, "-": a - b, "absdiff": abs(a - b)}[step.op])
        assert env[t.answer] == row["answer"][0], row
        if row["kind"] != "arithmetic":
            assert all(alias in corpus_text for alias in row["answer"]), row
        else:
            assert int(row["answer"][0]) >= 0, row


def test_hand_built_world_facts_and_gold_answers():
    spec = world_spec("small", 1)
    w = World(
        seed=0,
        size="small",
        level=1,
        spec=spec,
        countries=["keronia"],
        cities=[City("c0", "tolva", "keronia"), City("c1", "barna", "keronia")],
        orgs=[Org("o0", "dorvo", "labs", 1920, "p1", "c1", "train")],
        people=[
            Person("p0", "mira", "velin", "c0", 1961, "o0", "train", nickname="zeky"),
            Person("p1", "kato", "dosta", "c1", 1890, "o0", "train"),
        ],
    )
    assert w.execute(TEMPLATES["p_city"], {"p": "p0"}) == ("city", "c0")
    assert w.execute(TEMPLATES["p_country"], {"p": "p0"}) == ("country", "keronia")
    assert w.execute(TEMPLATES["p_org_founder_city"], {"p": "p0"}) == ("city", "c1")
    assert w.execute(TEMPLATES["p_turn"], {"p": "p0", "n": 30}) == ("year", 1991)
    assert w.execute(TEMPLATES["pq_apart"], {"p": "p1", "q": "p0"}) == ("number", 71)
    assert w.execute(TEMPLATES["o_founder_age"], {"o": "o0"}) == ("number", 30)
    assert w.execute(TEMPLATES["op_after"], {"o": "o0", "p": "p0"}) == ("number", 41)
    assert w.aliases(("org", "o0")) == ["dorvo labs", "dorvo"]
    assert w.display(("person", "p1")) == "kato dosta"
    assert w.entity_by_title("mira velin") == ("person", "p0")
    with pytest.raises(ValueError, match="needs a person subject"):
        w.fact(("org", "o0"), "born_city")
    with pytest.raises(ValueError, match="unknown relation"):
        w.fact(("person", "p0"), "height")


def test_names_are_confusable(world):
    by_last = Counter(p.last for p in world.people)
    assert sum(by_last[p.last] > 1 for p in world.people) / len(world.people) > 0.9

    def one_letter_apart(a: str, b: str) -> bool:
        return len(a) == len(b) and sum(x != y for x, y in zip(a, b)) == 1

    names = {(p.first, p.last) for p in world.people}
    twins = sum(
        any(one_letter_apart(f, g) and (g, last) in names for g in {q.first for q in world.people})
        for f, last in names
    )
    assert twins / len(names) > 0.3
    assert sum(d["title"].endswith(" family") for d in world.corpus) > 20


def test_nicknames_make_retry_questions_of_every_outcome(world):
    nick_holders = Counter(p.nickname for p in world.people if p.nickname)
    indexed = {p.nickname for p in world.people if p.nickname_indexed}
    retry = [world.person_by_id[r["bindings"]["p"]] for r in world.train if r["kind"] == "retry"]
    found = sum(p.nickname_indexed for p in retry)
    nothing = sum(p.nickname not in indexed for p in retry)
    others_only = len(retry) - found - nothing
    assert min(found, nothing, others_only) > 0.1 * len(retry), (found, nothing, others_only)
    assert max(nick_holders.values()) > 1
    corpus_words = set(word_split(" ".join(d["text"] for d in world.corpus)))
    assert all(p.nickname in corpus_words for p in world.people if p.nickname_indexed)


def test_test_split_leans_on_decision_heavy_questions(world):
    def share(rows, kinds):
        return sum(r["kind"] in kinds for r in rows) / len(rows)

    assert share(world.test, {"retry", "arithmetic"}) > share(world.train, {"retry", "arithmetic"}) + 0.1
    assert share(world.test, {"one_hop"}) < share(world.train, {"one_hop"})
    mean_hops = {s: sum(r["hops"] for r in world.split(s)) / len(world.split(s)) for s in ("train", "test")}
    assert mean_hops["test"] > mean_hops["train"]
    twins = {
        s: sum(bool(p.twin_of) for p in world.people if p.split == s)
        / sum(not p.twin_of for p in world.people if p.split == s)
        for s in ("train", "test")
    }
    assert twins["test"] > twins["train"]


def test_levels_change_difficulty():
    easy, hard = build_world(seed=0, level=1), build_world(seed=0, level=3)
    assert max(r["hops"] for r in easy.train + easy.test) == 2
    assert sum(r["hops"] == 3 for r in hard.test) > 0.1 * len(hard.test)
    assert len(hard.people) > len(easy.people)
    assert (
        Counter(r["kind"] for r in hard.train)["one_hop"] < Counter(r["kind"] for r in easy.train)["one_hop"]
    )


def test_vocabulary_is_small_and_covers_every_text(world):
    vocab = world.vocabulary()
    assert 150 < len(vocab) < 600
    assert len(build_world(seed=0, size="medium", level=3).vocabulary()) < 3000
    for text in [d["title"] + ": " + d["text"] for d in world.corpus] + [r["question"] for r in world.test]:
        assert set(word_split(text)) <= vocab
    assert {"page", "no", "results", "found", "guess", "compute", "cousins", "'", "7"} <= vocab
    assert word_split("Page 1: mira velin, 1961.") == [
        "page",
        "1",
        ":",
        "mira",
        "velin",
        ",",
        "1",
        "9",
        "6",
        "1",
        ".",
    ]


def test_documents_are_short_and_lower_case(world):
    for d in world.corpus:
        assert d["text"] == d["text"].lower() and d["title"] == d["title"].lower()
        assert ":" not in d["text"] and ":" not in d["title"]  # the result rendering uses ": "
        assert len(d["text"].split()) <= 20
    assert len({d["title"] for d in world.corpus}) == len(world.corpus)


def test_bad_arguments_name_what_is_wrong(tmp_path):
    with pytest.raises(ValueError, match="size must be one of small, medium"):
        build_world(size="huge")
    with pytest.raises(ValueError, match="level must be one of 1, 2, 3"):
        build_world(level=7)
    with pytest.raises(ValueError, match="seed must be an integer"):
        build_world(seed="0")  # type: ignore[arg-type]
    spec = world_spec("small", 2)
    with pytest.raises(ValueError, match="train_mix"):
        build_world(spec=WorldSpec(**{**spec.__dict__, "train_mix": {"easy": 1.0}}))
    with pytest.raises(ValueError, match="test_share"):
        build_world(spec=WorldSpec(**{**spec.__dict__, "test_share": 1.5}))
    with pytest.raises(ValueError, match="could only make"):
        build_world(spec=WorldSpec(**{**spec.__dict__, "test_questions": 50_000}))
    with pytest.raises(FileNotFoundError, match="world.json"):
        World.load(tmp_path)
    with pytest.raises(ValueError, match="split must be"):
        build_world().split("dev")


def test_cli_build_writes_files_and_prints_counts(tmp_path):
    result = CliRunner().invoke(
        cli_app, ["world", "build", str(tmp_path / "w"), "--seed", "1", "--level", "1"]
    )
    assert result.exit_code == 0, result.output
    assert all((tmp_path / "w" / name).exists() for name in FILES)
    w = World.load(tmp_path / "w")
    assert w.seed == 1 and w.level == 1
    for split in ("train", "test"):
        assert split in result.output
    assert str(len(w.train)) in result.output and "retry" in result.output
    bad = CliRunner().invoke(cli_app, ["world", "build", str(tmp_path / "x"), "--size", "huge"])
    assert bad.exit_code == 2 and "--size 'huge' is not one of small, medium" in bad.output


def test_shared_name_pool_shares_words_not_facts():
    a = build_world(seed=1, name_seed=7)
    b = build_world(seed=2, name_seed=7)
    names_a = {w for p in a.people for w in p.name.split()}
    names_b = {w for p in b.people for w in p.name.split()}
    assert len(names_a & names_b) > 0.8 * len(names_a)
    facts_a = {(p.name, p.birth_year) for p in a.people}
    facts_b = {(p.name, p.birth_year) for p in b.people}
    assert len(facts_a & facts_b) < 0.1 * len(facts_a)
    assert build_world(seed=1, name_seed=7).corpus == a.corpus


@pytest.mark.parametrize("level", [1, 2, 3])
def test_number_words_cover_every_number_a_world_uses(level):
    from aepo.demo.world import number_words

    known = set(number_words())
    w = build_world(seed=3, level=level)
    texts = [d["text"] for d in w.corpus] + [r["question"] for r in w.train + w.test]
    texts += [a for r in w.train + w.test for a in r["answer"]]
    used = {n for t in texts for n in re.findall(r"\d+", t)}
    assert used and used <= known, sorted(used - known)[:10]
