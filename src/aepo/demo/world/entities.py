"""The world's entities (people, organisations, cities), the `World` that holds them with its
corpus and questions, and the arithmetic and binding helpers its templates use."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from aepo.demo.world.names import _strip_fields, word_split
from aepo.demo.world.spec import DATA_SOURCE, FORMAT_VERSION, WorldSpec, has_forks
from aepo.demo.world.templates import (
    DOC_PERSON,
    DOC_PERSON_NICK,
    FACT_PAIRS,
    FORK_TEMPLATES,
    NICKNAME_CLAUSE,
    NO_RESULTS,
    RELATIONS,
    RESULT_PAGE,
    TEMPLATES,
    THINK_ANSWER,
    THINK_CHECK,
    THINK_COMPUTE,
    THINK_GUESS,
    THINK_HEAD_MATH,
    THINK_LOOKUP,
    THINK_NOT_FOUND,
    THINK_PICK,
    THINK_RESULT,
    THINK_WHICH,
    Lookup,
    Template,
)
from aepo.io import atomic_write_text, read_jsonl, write_jsonl

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
        self._same_name: dict[str, list[str]] = {}  # full name -> person ids (namesakes: 2 or more)
        for p in self.people:
            self._same_name.setdefault(p.name, []).append(p.id)

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

    def execute(self, template: Template, bindings: dict, pick: dict[str, Value] | None = None) -> Value:
        """The gold answer of a template over this world's true facts (with `pick`, the answer
        reached when variable v is taken to be pick[v], e.g. a namesake at a fork)."""
        return self.trace(template, bindings, pick)[template.answer]

    def trace(
        self, template: Template, bindings: dict, pick: dict[str, Value] | None = None
    ) -> dict[str, Value]:
        """Every variable of a template's chain: bindings, then each step's outputs."""
        pick = pick or {}
        env = bind_values(bindings)
        env.update({k: v for k, v in pick.items() if k in env})
        for step in template.steps:
            if isinstance(step, Lookup):
                for rel, out in zip(step.rels, step.outs):
                    env[out] = pick.get(out, self.fact(env[step.src], rel))
            else:
                env[step.out] = (
                    "number" if step.op != "+" else "year",
                    apply_calc(step.op, int(env[step.a][1]), int(env[step.b][1])),
                )
        return env

    def namesakes(self, person_id: str) -> list[str]:
        """Ids of the people with this person's full name, the person included."""
        return list(self._same_name[self.person_by_id[person_id].name])

    def nickname_holders(self, nick: str) -> list[str]:
        """Ids of the people whose document names them by nickname `nick`."""
        return [p.id for p in self.people if p.nickname == nick and p.nickname_indexed]

    def person_doc(self, p: Person) -> str:
        """The text of a person's corpus document."""
        tmpl = DOC_PERSON_NICK if p.nickname_indexed else DOC_PERSON
        city, org = self.city_by_id[p.birth_city].name, self.org_by_id[p.employer].name
        return tmpl.format(name=p.name, nick=p.nickname, city=city, year=p.birth_year, org=org)

    def entity_by_page(self, title: str, text: str) -> Value | None:
        """The entity a result page is about; namesakes' pages (one title) are told apart by
        their text (a page cut short must still hold the birth city)."""
        ids = self._same_name.get(title, [])
        if len(ids) < 2:
            return self.entity_by_title(title)
        text = text.split(" ...")[0].strip()  # a page cut short ends with " ...[truncated]"
        found = [i for i in ids if self.person_doc(self.person_by_id[i]).startswith(text)]
        city_ok = [i for i in found if self.city_by_id[self.person_by_id[i].birth_city].name in text]
        return ("person", city_ok[0]) if len(city_ok) == 1 else None

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
        if has_forks(self.spec):  # only then, so that default worlds keep their vocabulary
            phrases += [THINK_WHICH, THINK_PICK] + [t.text for t in FORK_TEMPLATES.values()]
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
        elif var in ("k", "k2"):  # a fork's clue: a country of birth
            env[var] = ("country", key)
        else:
            raise ValueError(f"unknown binding variable {var!r}; valid: p, q, o, n, k, k2")
    return env


def subjects(row: dict) -> set[tuple[str, str]]:
    """The entities a question row names ("person"/"org", id): train and test never share one."""
    out = set()
    for var, key in row.get("bindings", {}).items():
        if var in ("p", "q"):
            out.add(("person", key))
        elif var == "o":
            out.add(("org", key))
    return out
