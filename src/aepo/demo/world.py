"""The synthetic demo world: fictional entities, a corpus of short documents, and questions.

A world is generated from a seed. It holds people (first + last names built from syllables,
some with a nickname), organisations, cities and countries, one short document per entity
for the search tool to index, and question rows for a train and a test split that name
*different* entities. Questions can only be answered by searching (and, for arithmetic, by
calling a calculator). The world is built so that search results are where an agent is
uncertain:

- people come in confusable families: same last name, first names one letter apart
  ("mira velin", "mora velin", "mina velin"), so a search returns several plausible people,
  and some families have a "mira velin family" page that names the cousins but states no fact;
- organisation and city lookups also return employees or other cities beside the target;
- "retry" questions name a person by a nickname first; the nickname query finds the person,
  only other people with that nickname, or nothing at all, and the full name given in the
  question always works.

All text is lower case, uses a small closed vocabulary, and one relation keyword per query
("born", "works", "founded", "based", "country") so that a query built from question words
(the entity's name and the keyword) always brings the right document into the top 3 under BM25.

    world = build_world(seed=0, size="small", level=2)
    world.save("runs/world"); same = World.load("runs/world")
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Literal

from aepo.io import atomic_write_text, read_jsonl, write_jsonl

DATA_SOURCE = "demo_world"
KINDS = ("one_hop", "multi_hop", "arithmetic", "retry")
SIZES = ("small", "medium")
LEVELS = (1, 2, 3)
FORMAT_VERSION = 1

# ----------------------------------------------------------------------------- wording
# Everything an agent reads or writes in this world is built from these strings, so the
# tokenizer can be fitted on `World.vocabulary_texts()` and never meet an unknown word.

ORG_TYPES = ("labs", "group", "press", "bank", "motors", "foods")

DOC_PERSON = "{name} was born in {city} in {year} and works for {org}."
DOC_PERSON_NICK = "{name}, nicknamed {nick}, was born in {city} in {year} and works for {org}."
DOC_ORG = "{name} was founded in {year} by {founder} and is based in {city}."
DOC_CITY = "{name} is a city in the country of {country}."
DOC_FAMILY_TITLE = "{name} family"  # named after the person the twins resemble
DOC_FAMILY = "{name} grew up with the cousins {others} in one old house."  # about a person and their twins

NICKNAME_CLAUSE = "{nick} is the nickname of {name}."

# How the search tool renders results (aepo.tools.search uses the same shape).
RESULT_PAGE = "Page {i}: {title}: {text}"
NO_RESULTS = "No results found for '{query}'."

# The expert's reasoning phrases (the "{...}" parts are names, numbers or facts).
# Ranges the generator draws numbers from (inclusive).
FOUNDED_YEARS = (1850, 1990)
BIRTH_YEARS = (1900, 1999)
FOUNDER_AGE = (25, 60)  # a founder's age when founding the organisation
TURN_AGES = (10, 60)  # "in what year did X turn N?"

THINK_LOOKUP = "look up {name}."
THINK_NOT_FOUND = "{name} not found."
THINK_GUESS = "guess."
THINK_COMPUTE = "compute {expr}."
THINK_HEAD_MATH = "{expr} is {value}."
THINK_RESULT = "the result is {value}."
THINK_ANSWER = "the answer is {value}."
THINK_CHECK = "check again."

# Relation -> (subject type, query keyword, value type, fact sentence).
RELATIONS: dict[str, tuple[str, str, str, str]] = {
    "born_city": ("person", "born", "city", "{s} was born in {v}"),
    "born_year": ("person", "born", "year", "{s} was born in {v}"),
    "employer": ("person", "works", "org", "{s} works for {v}"),
    "founded_year": ("org", "founded", "year", "{s} was founded in {v}"),
    "founder": ("org", "founded", "person", "{s} was founded by {v}"),
    "based_city": ("org", "based", "city", "{s} is based in {v}"),
    "country": ("city", "country", "country", "{s} is in {v}"),
}
# Facts read together from one document, said in one sentence.
FACT_PAIRS: dict[tuple[str, ...], str] = {
    ("founded_year", "founder"): "{s} was founded in {v0} by {v1}",
}

# ----------------------------------------------------------------------------- templates


@dataclass(frozen=True)
class Lookup:
    """Search for entity `src` and read relations `rels` into variables `outs`."""

    src: str
    rels: tuple[str, ...]
    outs: tuple[str, ...]


@dataclass(frozen=True)
class Calc:
    """Arithmetic over found numbers: "+", "-" or "absdiff" (larger minus smaller)."""

    op: Literal["+", "-", "absdiff"]
    a: str
    b: str
    out: str


@dataclass(frozen=True)
class Template:
    """A question form: its text, the steps that answer it and the answer variable."""

    key: str
    kind: Literal["one_hop", "multi_hop", "arithmetic"]
    text: str
    steps: tuple[Lookup | Calc, ...]
    answer: str
    retry_ok: bool = False  # may be asked through a nickname ("retry" kind)

    @property
    def hops(self) -> int:
        return sum(isinstance(s, Lookup) for s in self.steps)

    @property
    def needs(self) -> list[str]:
        return ["search", "calc"] if any(isinstance(s, Calc) for s in self.steps) else ["search"]

    @property
    def subject_vars(self) -> tuple[str, ...]:
        return tuple(v for v in ("p", "q", "o") if "{" + v + "}" in self.text)


def _l(src: str, rel: str, out: str) -> Lookup:
    return Lookup(src, (rel,), (out,))


TEMPLATES: dict[str, Template] = {
    t.key: t
    for t in [
        Template("p_city", "one_hop", "where was {p} born?", (_l("p", "born_city", "a"),), "a", True),
        Template("p_year", "one_hop", "in what year was {p} born?", (_l("p", "born_year", "a"),), "a", True),
        Template(
            "p_org", "one_hop", "which company does {p} work for?", (_l("p", "employer", "a"),), "a", True
        ),
        Template("o_year", "one_hop", "in what year was {o} founded?", (_l("o", "founded_year", "a"),), "a"),
        Template("o_founder", "one_hop", "who founded {o}?", (_l("o", "founder", "a"),), "a"),
        Template("o_city", "one_hop", "in which city is {o} based?", (_l("o", "based_city", "a"),), "a"),
        Template(
            "p_country",
            "multi_hop",
            "in which country was {p} born?",
            (_l("p", "born_city", "c"), _l("c", "country", "a")),
            "a",
            True,
        ),
        Template(
            "p_org_year",
            "multi_hop",
            "in what year was the company {p} works for founded?",
            (_l("p", "employer", "o2"), _l("o2", "founded_year", "a")),
            "a",
            True,
        ),
        Template(
            "p_org_founder",
            "multi_hop",
            "who founded the company {p} works for?",
            (_l("p", "employer", "o2"), _l("o2", "founder", "a")),
            "a",
        ),
        Template(
            "p_org_city",
            "multi_hop",
            "in which city is the company {p} works for based?",
            (_l("p", "employer", "o2"), _l("o2", "based_city", "a")),
            "a",
        ),
        Template(
            "o_founder_city",
            "multi_hop",
            "where was the founder of {o} born?",
            (_l("o", "founder", "f"), _l("f", "born_city", "a")),
            "a",
        ),
        Template(
            "o_country",
            "multi_hop",
            "in which country is {o} based?",
            (_l("o", "based_city", "c"), _l("c", "country", "a")),
            "a",
        ),
        Template(
            "o_founder_year",
            "multi_hop",
            "in what year was the founder of {o} born?",
            (_l("o", "founder", "f"), _l("f", "born_year", "a")),
            "a",
        ),
        Template(
            "p_org_country",
            "multi_hop",
            "in which country is the company {p} works for based?",
            (_l("p", "employer", "o2"), _l("o2", "based_city", "c"), _l("c", "country", "a")),
            "a",
        ),
        Template(
            "p_org_founder_city",
            "multi_hop",
            "where was the founder of the company {p} works for born?",
            (_l("p", "employer", "o2"), _l("o2", "founder", "f"), _l("f", "born_city", "a")),
            "a",
        ),
        Template(
            "o_founder_country",
            "multi_hop",
            "in which country was the founder of {o} born?",
            (_l("o", "founder", "f"), _l("f", "born_city", "c"), _l("c", "country", "a")),
            "a",
        ),
        Template(
            "p_turn",
            "arithmetic",
            "in what year did {p} turn {n}?",
            (_l("p", "born_year", "y"), Calc("+", "y", "n", "a")),
            "a",
        ),
        Template(
            "pq_apart",
            "arithmetic",
            "how many years apart were {p} and {q} born?",
            (_l("p", "born_year", "y1"), _l("q", "born_year", "y2"), Calc("absdiff", "y1", "y2", "a")),
            "a",
        ),
        Template(
            "o_founder_age",
            "arithmetic",
            "how old was the founder of {o} when it was founded?",
            (
                Lookup("o", ("founded_year", "founder"), ("y", "f")),
                _l("f", "born_year", "b"),
                Calc("-", "y", "b", "a"),
            ),
            "a",
        ),
        Template(
            "op_after",
            "arithmetic",
            "how many years after {o} was founded was {p} born?",
            (_l("o", "founded_year", "y"), _l("p", "born_year", "b"), Calc("-", "b", "y", "a")),
            "a",
        ),
    ]
}

# ----------------------------------------------------------------------------- difficulty


@dataclass(frozen=True)
class WorldSpec:
    """Every knob of a world. `world_spec(size, level)` gives the presets; change single knobs
    with `dataclasses.replace(world_spec("small", 2), twins_test=2.0)`."""

    first_families: int  # first-name families; each has 3 names one letter apart
    last_names: int
    cities: int
    countries: int
    orgs: int
    base_people: int  # people before confusable twins are added
    train_questions: int
    test_questions: int
    test_share: float = 0.2  # share of base people and organisations in the test pool
    twins_train: float = 0.6  # mean confusable twins (same last name, first name 1 letter off)
    twins_test: float = 1.2
    twin_same_city: float = 0.5
    family_docs: float = 0.5  # share of twin groups with a "mira velin family" page naming the cousins
    nickname_share: float = 0.35  # share of people with a nickname
    nickname_indexed: float = 0.4  # share of those whose document mentions the nickname
    people_per_nickname: float = 3.0  # nickname reuse: retry searches can find other people
    three_hop_share: float = 0.3  # share of multi-hop questions with 3 hops
    max_hops: int = 3
    train_mix: dict[str, float] = field(default_factory=dict)
    test_mix: dict[str, float] = field(default_factory=dict)

    def validate(self) -> None:
        for name in ("first_families", "last_names", "cities", "countries", "orgs", "base_people"):
            if getattr(self, name) < 2:
                raise ValueError(f"WorldSpec.{name} must be >= 2, got {getattr(self, name)}")
        if self.orgs < 4:
            raise ValueError(f"WorldSpec.orgs must be >= 4 (two per split), got {self.orgs}")
        if not 0.0 < self.test_share < 1.0:
            raise ValueError(f"WorldSpec.test_share must be in (0, 1), got {self.test_share}")
        for name in (
            "twin_same_city",
            "family_docs",
            "nickname_share",
            "nickname_indexed",
            "three_hop_share",
        ):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"WorldSpec.{name} must be in [0, 1], got {v}")
        for name in ("twins_train", "twins_test"):
            v = getattr(self, name)
            if not 0.0 <= v <= 2.0:
                raise ValueError(
                    f"WorldSpec.{name} must be in [0, 2] (a first-name family has 3 names), got {v}"
                )
        if self.people_per_nickname < 1.0:
            raise ValueError(f"WorldSpec.people_per_nickname must be >= 1, got {self.people_per_nickname}")
        if self.train_questions < 0 or self.test_questions < 0:
            raise ValueError("WorldSpec.train_questions and test_questions must be >= 0")
        if self.max_hops not in (1, 2, 3):
            raise ValueError(f"WorldSpec.max_hops must be 1, 2 or 3, got {self.max_hops}")
        for split in ("train", "test"):
            mix = getattr(self, f"{split}_mix")
            bad = sorted(set(mix) - set(KINDS))
            if bad or not mix or any(v < 0 for v in mix.values()) or sum(mix.values()) <= 0:
                raise ValueError(
                    f"WorldSpec.{split}_mix must map some of {', '.join(KINDS)} to weights >= 0 "
                    f"with a positive sum, got {mix!r}"
                )


_SIZE_PRESETS: dict[str, dict] = {
    "small": {
        "first_families": 12,
        "last_names": 160,
        "cities": 16,
        "countries": 6,
        "orgs": 20,
        "base_people": 280,
        "train_questions": 2000,
        "test_questions": 300,
    },
    "medium": {
        "first_families": 20,
        "last_names": 450,
        "cities": 32,
        "countries": 10,
        "orgs": 40,
        "base_people": 800,
        "train_questions": 6000,
        "test_questions": 600,
    },
}
_LEVEL_PRESETS: dict[int, dict] = {
    1: {
        "twins_train": 0.3,
        "twins_test": 0.8,
        "nickname_indexed": 0.5,
        "three_hop_share": 0.0,
        "max_hops": 2,
        "train_mix": {"one_hop": 0.4, "multi_hop": 0.35, "arithmetic": 0.15, "retry": 0.1},
        "test_mix": {"one_hop": 0.25, "multi_hop": 0.35, "arithmetic": 0.2, "retry": 0.2},
    },
    2: {
        "twins_train": 0.6,
        "twins_test": 1.2,
        "nickname_indexed": 0.4,
        "three_hop_share": 0.3,
        "max_hops": 3,
        "train_mix": {"one_hop": 0.35, "multi_hop": 0.35, "arithmetic": 0.15, "retry": 0.15},
        "test_mix": {"one_hop": 0.15, "multi_hop": 0.35, "arithmetic": 0.25, "retry": 0.25},
    },
    3: {
        "twins_train": 1.0,
        "twins_test": 2.0,
        "nickname_indexed": 0.3,
        "three_hop_share": 0.5,
        "max_hops": 3,
        "train_mix": {"one_hop": 0.25, "multi_hop": 0.4, "arithmetic": 0.2, "retry": 0.15},
        "test_mix": {"one_hop": 0.1, "multi_hop": 0.35, "arithmetic": 0.3, "retry": 0.25},
    },
}


def world_spec(size: str = "small", level: int = 2) -> WorldSpec:
    """The preset knobs for a size ("small" | "medium") and a difficulty level (1 | 2 | 3).

    Higher levels add confusable twins, 3-hop chains and decision-heavy kinds. At every
    level the test split leans more on multi-hop, arithmetic and retry questions (and its
    people have more twins) than the train split the demonstrations come from.
    """
    if size not in _SIZE_PRESETS:
        raise ValueError(f"size must be one of {', '.join(SIZES)}, got {size!r}")
    if level not in _LEVEL_PRESETS:
        raise ValueError(f"level must be one of {', '.join(map(str, LEVELS))}, got {level!r}")
    return WorldSpec(**_SIZE_PRESETS[size], **_LEVEL_PRESETS[level])


# ----------------------------------------------------------------------------- entities


@dataclass
class Person:
    id: str
    first: str
    last: str
    birth_city: str  # city id
    birth_year: int
    employer: str  # org id
    split: str
    nickname: str = ""
    nickname_indexed: bool = False  # the person's document mentions the nickname
    twin_of: str = ""  # id of the person this one was made to resemble, or ""

    @property
    def name(self) -> str:
        return f"{self.first} {self.last}"


@dataclass
class Org:
    id: str
    base: str  # "dorva"
    type: str  # "labs"
    founded_year: int
    founder: str  # person id
    city: str  # city id
    split: str

    @property
    def name(self) -> str:
        return f"{self.base} {self.type}"


@dataclass
class City:
    id: str
    name: str
    country: str


Value = tuple[str, object]  # (type, key): ("person", "p0001"), ("year", 1961), ("country", "keronia")


# ----------------------------------------------------------------------------- the world


@dataclass
class World:
    """A generated world: entity tables, the search corpus and the question splits."""

    seed: int
    size: str
    level: int
    spec: WorldSpec
    countries: list[str]
    cities: list[City]
    orgs: list[Org]
    people: list[Person]
    corpus: list[dict] = field(default_factory=list)
    train: list[dict] = field(default_factory=list)
    test: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.person_by_id = {p.id: p for p in self.people}
        self.org_by_id = {o.id: o for o in self.orgs}
        self.city_by_id = {c.id: c for c in self.cities}
        self._by_title: dict[str, Value] = {}
        for p in self.people:
            self._by_title[p.name] = ("person", p.id)
        for o in self.orgs:
            self._by_title[o.name] = ("org", o.id)
        for c in self.cities:
            self._by_title[c.name] = ("city", c.id)

    # --- facts

    def entity_by_title(self, title: str) -> Value | None:
        """The entity a corpus document is about, from the document's title."""
        return self._by_title.get(title)

    def fact(self, subject: Value, relation: str) -> Value:
        """The true value of `relation` for `subject` (raises ValueError for a wrong pairing)."""
        if relation not in RELATIONS:
            raise ValueError(f"unknown relation {relation!r}; valid: {', '.join(RELATIONS)}")
        want = RELATIONS[relation][0]
        kind, key = subject
        if kind != want:
            raise ValueError(f"relation {relation!r} needs a {want} subject, got {kind} {key!r}")
        if kind == "person":
            p = self.person_by_id[key]
            return {
                "born_city": ("city", p.birth_city),
                "born_year": ("year", p.birth_year),
                "employer": ("org", p.employer),
            }[relation]
        if kind == "org":
            o = self.org_by_id[key]
            return {
                "founded_year": ("year", o.founded_year),
                "founder": ("person", o.founder),
                "based_city": ("city", o.city),
            }[relation]
        return ("country", self.city_by_id[key].country)

    def display(self, value: Value) -> str:
        """How a value is written in text: a name or a number."""
        kind, key = value
        if kind == "person":
            return self.person_by_id[key].name
        if kind == "org":
            return self.org_by_id[key].name
        if kind == "city":
            return self.city_by_id[key].name
        return str(key)

    def aliases(self, value: Value) -> list[str]:
        """Accepted spellings of an answer: organisations may drop their type word."""
        if value[0] == "org":
            o = self.org_by_id[value[1]]
            return [o.name, o.base]
        return [self.display(value)]

    def execute(self, template: Template, bindings: dict) -> Value:
        """The gold answer of a template over this world's true facts."""
        env = bind_values(bindings)
        for step in template.steps:
            if isinstance(step, Lookup):
                for rel, out in zip(step.rels, step.outs):
                    env[out] = self.fact(env[step.src], rel)
            else:
                env[step.out] = (
                    "number" if step.op != "+" else "year",
                    apply_calc(step.op, int(env[step.a][1]), int(env[step.b][1])),
                )
        return env[template.answer]

    # --- text

    def vocabulary_texts(self) -> list[str]:
        """Every text the tokenizer must cover: corpus, questions and the agent's wording."""
        texts = [f"{d['title']}: {d['text']}" for d in self.corpus]
        texts += [row["question"] for row in self.train + self.test]
        texts += [" ".join(self.aliases(("org", o.id))) for o in self.orgs]
        texts += [RESULT_PAGE.format(i=i, title="", text="") for i in range(1, 11)]
        texts.append(NO_RESULTS.format(query=""))
        phrases = [
            THINK_LOOKUP,
            THINK_NOT_FOUND,
            THINK_GUESS,
            THINK_COMPUTE,
            THINK_HEAD_MATH,
            THINK_RESULT,
            THINK_ANSWER,
            THINK_CHECK,
            NICKNAME_CLAUSE,
        ]
        phrases += [r[3] for r in RELATIONS.values()] + list(FACT_PAIRS.values())
        phrases += [t.text for t in TEMPLATES.values()]
        texts += [_strip_fields(p) for p in phrases]
        texts.append("0 1 2 3 4 5 6 7 8 9 + - ( ) print")
        return texts

    def vocabulary(self) -> set[str]:
        """Distinct lower-cased words of `vocabulary_texts()` (digits counted one by one)."""
        return set(word_split(" ".join(self.vocabulary_texts())))

    # --- files

    def save(self, out_dir: str | Path) -> None:
        """Write corpus.jsonl, train.jsonl, test.jsonl and world.json (each atomically)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_jsonl(out / "corpus.jsonl", self.corpus)
        write_jsonl(out / "train.jsonl", self.train)
        write_jsonl(out / "test.jsonl", self.test)
        meta = {
            "format": FORMAT_VERSION,
            "data_source": DATA_SOURCE,
            "seed": self.seed,
            "size": self.size,
            "level": self.level,
            "spec": asdict(self.spec),
            "countries": self.countries,
            "cities": [asdict(c) for c in self.cities],
            "orgs": [asdict(o) for o in self.orgs],
            "people": [asdict(p) for p in self.people],
        }
        atomic_write_text(out / "world.json", json.dumps(meta, indent=1) + "\n")

    @classmethod
    def load(cls, out_dir: str | Path) -> World:
        """Read a world written by `save`; a missing file raises FileNotFoundError naming it."""
        out = Path(out_dir)
        for name in ("world.json", "corpus.jsonl", "train.jsonl", "test.jsonl"):
            if not (out / name).exists():
                raise FileNotFoundError(
                    f"{out / name} is missing: not a world directory written by World.save"
                )
        meta = json.loads((out / "world.json").read_text(encoding="utf-8"))
        if meta.get("format") != FORMAT_VERSION:
            raise ValueError(
                f"{out / 'world.json'}: format {meta.get('format')!r}, expected {FORMAT_VERSION}"
            )
        spec_fields = {f.name for f in fields(WorldSpec)}
        spec = WorldSpec(**{k: v for k, v in meta["spec"].items() if k in spec_fields})
        return cls(
            seed=meta["seed"],
            size=meta["size"],
            level=meta["level"],
            spec=spec,
            countries=list(meta["countries"]),
            cities=[City(**c) for c in meta["cities"]],
            orgs=[Org(**o) for o in meta["orgs"]],
            people=[Person(**p) for p in meta["people"]],
            corpus=read_jsonl(out / "corpus.jsonl"),
            train=read_jsonl(out / "train.jsonl"),
            test=read_jsonl(out / "test.jsonl"),
        )

    def split(self, name: str) -> list[dict]:
        """The question rows of split `name` ("train" | "test")."""
        if name not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {name!r}")
        return self.train if name == "train" else self.test

    def counts(self) -> dict[str, Counter]:
        """Questions per kind in each split."""
        return {s: Counter(r["kind"] for r in self.split(s)) for s in ("train", "test")}


# ----------------------------------------------------------------------------- helpers


def number_words() -> list[str]:
    """Every number a world can state, ask about or compute, as text: counts, ages and year
    differences (0-299) and years (1780-2069: founders' births at 1850-60 = 1790 up to
    1999+60 = 2059 for "turn N" answers, with a margin of 10). A tokenizer that keeps digit
    runs whole can make each of them one token."""
    return [str(n) for n in [*range(300), *range(1780, 2070)]]


def word_split(text: str) -> list[str]:
    """Lower-case words of `text` as a word-level tokenizer sees them: digits one by one,
    punctuation as its own word."""
    out: list[str] = []
    word = ""
    for ch in text.lower():
        if ch.isalpha():
            word += ch
            continue
        if word:
            out.append(word)
            word = ""
        if not ch.isspace():
            out.append(ch)
    if word:
        out.append(word)
    return out


def apply_calc(op: str, a: int, b: int) -> int:
    """The arithmetic a `Calc` step asks for."""
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "absdiff":
        return abs(a - b)
    raise ValueError(f"unknown calc op {op!r}; valid: +, -, absdiff")


def calc_expression(op: str, a: int, b: int) -> str:
    """The expression a calculator is given for a `Calc` step ("1961 - 1920")."""
    if op == "absdiff":
        a, b = max(a, b), min(a, b)
        op = "-"
    if op not in ("+", "-"):
        raise ValueError(f"unknown calc op {op!r}; valid: +, -, absdiff")
    return f"{a} {op} {b}"


def _strip_fields(template: str) -> str:
    out, depth = "", 0
    for ch in template:
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            out += " "
        elif depth == 0:
            out += ch
    return out


def bind_values(bindings: dict) -> dict[str, Value]:
    """A question row's `bindings` ({"p": "p0001", "n": 30}) as typed values."""
    env: dict[str, Value] = {}
    for var, key in bindings.items():
        if var in ("p", "q"):
            env[var] = ("person", key)
        elif var == "o":
            env[var] = ("org", key)
        elif var == "n":
            env[var] = ("number", int(key))
        else:
            raise ValueError(f"unknown binding variable {var!r}; valid: p, q, o, n")
    return env


def _reserved_words() -> set[str]:
    texts = [
        DOC_PERSON,
        DOC_PERSON_NICK,
        DOC_ORG,
        DOC_CITY,
        DOC_FAMILY_TITLE,
        DOC_FAMILY,
        NICKNAME_CLAUSE,
        RESULT_PAGE,
        NO_RESULTS,
        THINK_LOOKUP,
        THINK_NOT_FOUND,
        THINK_GUESS,
        THINK_COMPUTE,
        THINK_HEAD_MATH,
        THINK_RESULT,
        THINK_ANSWER,
        THINK_CHECK,
        "print search calc python answer think result",
    ]
    texts += [r[3] for r in RELATIONS.values()] + [t.text for t in TEMPLATES.values()] + list(ORG_TYPES)
    return set(word_split(" ".join(_strip_fields(t) for t in texts)))


_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"
_CLUSTERS = ("lv", "rn", "sk", "nd", "mb", "st", "rk", "lt", "nt", "rd", "lk", "mp")


class _Words:
    """Makes unique pronounceable words of fixed shapes, never a reserved English word."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.used = _reserved_words()

    def _claim(self, make, n: int, what: str) -> list[str]:
        out: list[str] = []
        tries = 0
        while len(out) < n:
            tries += 1
            if tries > 200 * n + 1000:
                raise ValueError(f"cannot make {n} distinct {what} names; lower the count")
            w = make()
            if w not in self.used:
                self.used.add(w)
                out.append(w)
        return out

    def c(self) -> str:
        return self.rng.choice(_CONSONANTS)

    def v(self) -> str:
        return self.rng.choice(_VOWELS)

    def first_families(self, n: int) -> list[list[str]]:
        """Families of 3 first names one letter apart: mira, mora (vowel), mina (consonant)."""
        families: list[list[str]] = []
        tries = 0
        while len(families) < n:
            tries += 1
            if tries > 200 * n + 1000:
                raise ValueError(f"cannot make {n} first-name families; lower the count")
            c1, v1, c2, v2 = self.c(), self.v(), self.c(), self.v()
            v1b = self.rng.choice([x for x in _VOWELS if x != v1])
            c2b = self.rng.choice([x for x in _CONSONANTS if x != c2])
            fam = [c1 + v1 + c2 + v2, c1 + v1b + c2 + v2, c1 + v1 + c2b + v2]
            if len(set(fam)) == 3 and not any(w in self.used for w in fam):
                self.used.update(fam)
                families.append(fam)
        return families

    def last(self, n: int) -> list[str]:
        return self._claim(
            lambda: self.c() + self.v() + self.c() + self.v() + self.rng.choice("nrlks"), n, "last"
        )

    def nick(self, n: int) -> list[str]:
        return self._claim(lambda: self.c() + self.v() + self.c() + "y", n, "nickname")

    def city(self, n: int) -> list[str]:
        return self._claim(lambda: self.c() + self.v() + self.rng.choice(_CLUSTERS) + "a", n, "city")

    def country(self, n: int) -> list[str]:
        return self._claim(lambda: self.c() + self.v() + self.c() + self.v() + "nia", n, "country")

    def org(self, n: int) -> list[str]:
        return self._claim(lambda: self.c() + self.v() + self.rng.choice(_CLUSTERS) + "o", n, "organisation")


# ----------------------------------------------------------------------------- building


def demo_world(seed: int = 0, size: str = "small", level: int = 2) -> World:
    """The world `aepo demo --seed SEED` trains on (its names drawn from `name_seed=seed`), so
    `aepo train` and `aepo world build` with the same seed give the SFT model its own world."""
    return build_world(seed=seed, size=size, level=level, name_seed=seed)




def build_world(seed: int = 0, size: str = "small", level: int = 2, spec: WorldSpec | None = None,
                name_seed: int | None = None) -> World:
    """Generate the world for `seed` (same seed and knobs -> identical world and files).

    `size` and `level` pick the preset knobs (`world_spec`); pass `spec` to set them all.
    """
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    spec = spec if spec is not None else world_spec(size, level)
    spec.validate()
    rng = random.Random(f"aepo-world:{seed}")
    # name_seed: worlds that share it share every name word (people, cities, countries,
    # organisations, nicknames) but not who is who or any fact.
    words = _Words(rng if name_seed is None else random.Random(f"aepo-names:{name_seed}"))

    countries = words.country(spec.countries)
    city_names = words.city(spec.cities)
    cities = [City(f"c{i:03d}", name, countries[i % len(countries)]) for i, name in enumerate(city_names)]
    families = words.first_families(spec.first_families)
    lasts = words.last(spec.last_names)

    n_test_orgs = min(max(2, round(spec.orgs * spec.test_share)), spec.orgs - 2)
    org_bases = words.org(spec.orgs)
    orgs = [
        Org(
            f"o{i:03d}",
            base,
            rng.choice(ORG_TYPES),
            rng.randint(*FOUNDED_YEARS),
            "",
            rng.choice(cities).id,
            "test" if i < n_test_orgs else "train",
        )
        for i, base in enumerate(org_bases)
    ]
    people = _make_people(rng, spec, families, lasts, cities, orgs)
    _assign_founders(rng, orgs, people)
    _assign_nicknames(rng, spec, words, people)

    world = World(
        seed=seed,
        size=size,
        level=level,
        spec=spec,
        countries=countries,
        cities=cities,
        orgs=orgs,
        people=people,
    )
    world.corpus = _make_corpus(rng, world)
    world.train = _make_questions(rng, world, "train", spec.train_questions, spec.train_mix)
    world.test = _make_questions(rng, world, "test", spec.test_questions, spec.test_mix)
    return world


def _make_people(
    rng: random.Random,
    spec: WorldSpec,
    families: list[list[str]],
    lasts: list[str],
    cities: list[City],
    orgs: list[Org],
) -> list[Person]:
    family_of = {name: fam for fam in families for name in fam}
    firsts = [name for fam in families for name in fam]
    combos = [(f, last) for f in firsts for last in lasts]
    if spec.base_people > len(combos) // 2:
        raise ValueError(
            f"WorldSpec.base_people={spec.base_people} is too many for {len(firsts)} first and "
            f"{len(lasts)} last names; raise first_families or last_names"
        )
    base = rng.sample(combos, spec.base_people)
    n_test = round(spec.base_people * spec.test_share)
    taken = set(base)
    org_ids = {s: [o.id for o in orgs if o.split == s] for s in ("train", "test")}
    people: list[Person] = []

    def add(first: str, last: str, split: str, city: str, twin_of: str = "") -> str:
        pid = f"p{len(people):04d}"
        people.append(
            Person(
                pid,
                first,
                last,
                city,
                rng.randint(*BIRTH_YEARS),
                rng.choice(org_ids[split]),
                split,
                twin_of=twin_of,
            )
        )
        return pid

    for i, (first, last) in enumerate(base):
        split = "test" if i < n_test else "train"
        city = rng.choice(cities).id
        base_id = add(first, last, split, city)
        mean = spec.twins_test if split == "test" else spec.twins_train
        n_twins = int(mean) + (rng.random() < mean - int(mean))
        options = [f for f in family_of[first] if f != first]
        rng.shuffle(options)
        for twin_first in options[:n_twins]:
            if (twin_first, last) in taken:
                continue
            taken.add((twin_first, last))
            twin_city = city if rng.random() < spec.twin_same_city else rng.choice(cities).id
            add(twin_first, last, split, twin_city, base_id)
    return people


def _assign_founders(rng: random.Random, orgs: list[Org], people: list[Person]) -> None:
    """Each organisation's founder is a distinct person of its split, born 25-60 years before."""
    for split in ("train", "test"):
        pool = [p for p in people if p.split == split]
        split_orgs = [o for o in orgs if o.split == split]
        if len(pool) < len(split_orgs):
            raise ValueError(f"the {split} split has {len(pool)} people for {len(split_orgs)} organisations")
        for org, founder in zip(split_orgs, rng.sample(pool, len(split_orgs))):
            org.founder = founder.id
            founder.birth_year = org.founded_year - rng.randint(*FOUNDER_AGE)


def _assign_nicknames(rng: random.Random, spec: WorldSpec, words: _Words, people: list[Person]) -> None:
    chosen = [p for p in people if rng.random() < spec.nickname_share]
    if not chosen:
        return
    pool = words.nick(max(1, round(len(chosen) / spec.people_per_nickname)))
    for p in chosen:
        p.nickname = rng.choice(pool)
        p.nickname_indexed = rng.random() < spec.nickname_indexed


def _make_corpus(rng: random.Random, world: World) -> list[dict]:
    docs: list[tuple[str, str]] = []
    for p in world.people:
        city = world.city_by_id[p.birth_city].name
        org = world.org_by_id[p.employer].name
        tmpl = DOC_PERSON_NICK if p.nickname_indexed else DOC_PERSON
        docs.append(
            (p.name, tmpl.format(name=p.name, nick=p.nickname, city=city, year=p.birth_year, org=org))
        )
    twins: dict[str, list[Person]] = {}
    for p in world.people:
        if p.twin_of:
            twins.setdefault(p.twin_of, []).append(p)
    for base_id, group in twins.items():
        if rng.random() < world.spec.family_docs:
            base = world.person_by_id[base_id]
            firsts = [m.first for m in group]
            rng.shuffle(firsts)
            others = firsts[0] if len(firsts) == 1 else ", ".join(firsts[:-1]) + " and " + firsts[-1]
            text = DOC_FAMILY.format(name=base.name, others=others)
            docs.append((DOC_FAMILY_TITLE.format(name=base.name), text))
    for o in world.orgs:
        founder = world.person_by_id[o.founder].name
        docs.append(
            (
                o.name,
                DOC_ORG.format(
                    name=o.name, year=o.founded_year, founder=founder, city=world.city_by_id[o.city].name
                ),
            )
        )
    for c in world.cities:
        docs.append((c.name, DOC_CITY.format(name=c.name, country=c.country)))
    rng.shuffle(docs)  # the index order decides BM25 ties; keep it unrelated to entity ids
    return [{"id": f"doc{i:05d}", "title": t, "text": x} for i, (t, x) in enumerate(docs)]


def _kind_counts(n: int, mix: dict[str, float]) -> dict[str, int]:
    """Split n questions over kinds by `mix` (largest remainders, in KINDS order)."""
    total = sum(mix.values())
    exact = {k: n * mix.get(k, 0.0) / total for k in KINDS}
    counts = {k: int(v) for k, v in exact.items()}
    for k in sorted(KINDS, key=lambda k: counts[k] - exact[k])[: n - sum(counts.values())]:
        counts[k] += 1
    return counts


def _candidates(
    rng: random.Random, world: World, split: str, template: Template, retry: bool
) -> Iterator[dict]:
    """Random bindings of a template's variables to entities of one split (lazily, no end)."""
    people = [p for p in world.people if p.split == split and (p.nickname or not retry)]
    orgs = [o for o in world.orgs if o.split == split]
    if not people or not orgs:
        return
    subjects = template.subject_vars
    for _ in range(100_000):
        b: dict = {}
        if "o" in subjects:
            b["o"] = rng.choice(orgs).id
        if "p" in subjects:
            b["p"] = rng.choice(people).id
        if "q" in subjects:
            b["q"] = rng.choice(people).id
            if (
                b["q"] == b["p"]
                or world.person_by_id[b["q"]].birth_year == world.person_by_id[b["p"]].birth_year
            ):
                continue
        if template.key == "p_turn":
            b["n"] = rng.randint(*TURN_AGES)
        if template.key == "op_after" and (
            world.person_by_id[b["p"]].birth_year <= world.org_by_id[b["o"]].founded_year
        ):
            continue
        yield b


def _question_text(world: World, template: Template, b: dict, retry: bool) -> str:
    names: dict[str, object] = {}
    for var in ("p", "q"):
        if var in b:
            names[var] = world.person_by_id[b[var]].name
    if "o" in b:
        names["o"] = world.org_by_id[b["o"]].name
    if "n" in b:
        names["n"] = b["n"]
    if not retry:
        return template.text.format(**names)
    p = world.person_by_id[b["p"]]
    names["p"] = p.nickname
    return template.text.format(**names) + " " + NICKNAME_CLAUSE.format(nick=p.nickname, name=p.name)


def _make_questions(
    rng: random.Random, world: World, split: str, n: int, mix: dict[str, float]
) -> list[dict]:
    spec = world.spec
    rows: list[dict] = []
    seen: set[str] = set()
    for kind, count in _kind_counts(n, mix).items():
        if count == 0:
            continue
        retry = kind == "retry"
        pool = [
            t
            for t in TEMPLATES.values()
            if t.hops <= spec.max_hops and (t.retry_ok if retry else t.kind == kind)
        ]
        if not pool:
            raise ValueError(f"no {kind} question fits WorldSpec.max_hops={spec.max_hops}")
        three = [t for t in pool if t.hops == 3]
        short = [t for t in pool if t.hops < 3] or three
        streams = {t.key: _candidates(rng, world, split, t, retry) for t in pool}
        made = stalled = 0
        while made < count and stalled < 2000:  # stalled: tries since the last new question
            stalled += 1
            group = (
                three if (kind == "multi_hop" and three and rng.random() < spec.three_hop_share) else short
            )
            template = rng.choice(group)
            b = next(streams[template.key], None)
            if b is None:
                continue
            text = _question_text(world, template, b, retry)
            if text in seen:
                continue
            seen.add(text)
            stalled = 0
            gold = world.execute(template, b)
            rows.append(
                {
                    "id": f"{split}-{len(rows):05d}",
                    "question": text,
                    "answer": world.aliases(gold),
                    "data_source": DATA_SOURCE,
                    "kind": kind,
                    "hops": template.hops,
                    "level": world.level,
                    "needs": template.needs,
                    "template": template.key,
                    "bindings": b,
                }
            )
            made += 1
        if made < count:
            raise ValueError(
                f"could only make {made} of {count} distinct {kind} questions for the {split} split; "
                f"lower {split}_questions or raise base_people"
            )
    rng.shuffle(rows)
    for i, row in enumerate(rows):
        row["id"] = f"{split}-{i:05d}"
    return rows


def subjects(row: dict) -> set[tuple[str, str]]:
    """The entities a question row names ("person"/"org", id): train and test never share one."""
    out = set()
    for var, key in row.get("bindings", {}).items():
        if var in ("p", "q"):
            out.add(("person", key))
        elif var == "o":
            out.add(("org", key))
    return out


__all__ = [
    "DATA_SOURCE",
    "KINDS",
    "RELATIONS",
    "TEMPLATES",
    "Calc",
    "City",
    "Lookup",
    "Org",
    "Person",
    "Template",
    "World",
    "WorldSpec",
    "apply_calc",
    "bind_values",
    "build_world",
    "calc_expression",
    "subjects",
    "word_split",
    "world_spec",
]
