"""The demo world's wording and question templates: every text an agent reads or writes.

Documents, result pages and the expert's thoughts are built from these strings, so a tokenizer
fitted on `World.vocabulary_texts()` never meets an unknown word (docs/algorithms.md has none of
this; the world's shape is described in the package docstring).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

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
    kind: Literal["one_hop", "multi_hop", "arithmetic", "fork", "fork_run", "alias"]
    text: str
    steps: tuple[Lookup | Calc, ...]
    answer: str
    retry_ok: bool = False  # may be asked through a nickname ("retry" kind)
    # (entity variable, clue variable): the entity's name is shared by 2-3 pages and the
    # question tells them apart only by the clue, the country the entity was born in
    forks: tuple[tuple[str, str], ...] = ()

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

# ----------------------------------------------------------------------------- forks
# Questions whose chain passes a name shared by two or three pages (namesakes, or people who
# share a nickname): only the country of birth in the question tells them apart, and it is on
# none of those pages. A verification search ("kasta tolva country") settles it; each
# candidate leads to a different answer (`aepo.demo.world.forks`).

THINK_WHICH = "which {name}?"
THINK_PICK = "the {name} born in {city} is the one."

FORK_TEMPLATES: dict[str, Template] = {
    t.key: t
    for t in [
        Template(
            "fork_o",
            "fork",
            "the founder of {o} was born in {k}. in which city is the company that founder works for based?",
            (_l("o", "founder", "f"), _l("f", "employer", "o2"), _l("o2", "based_city", "a")),
            "a",
            forks=(("f", "k"),),
        ),
        Template(
            "fork_p",
            "fork",
            "the founder of the company {p} works for was born in {k}. "
            "in which city is the company that founder works for based?",
            (
                _l("p", "employer", "o"),
                _l("o", "founder", "f"),
                _l("f", "employer", "o2"),
                _l("o2", "based_city", "a"),
            ),
            "a",
            forks=(("f", "k"),),
        ),
        Template(
            "alias_city",
            "alias",
            "the person nicknamed {nick} was born in {k}. in which city is the company {nick} works for based?",
            (_l("p", "employer", "o"), _l("o", "based_city", "a")),
            "a",
            forks=(("p", "k"),),
        ),
        Template(
            "alias_year",
            "alias",
            "the person nicknamed {nick} was born in {k}. in what year was the company {nick} works for founded?",
            (_l("p", "employer", "o"), _l("o", "founded_year", "a")),
            "a",
            forks=(("p", "k"),),
        ),
        Template(
            "fork_run",
            "fork_run",
            "the person nicknamed {nick} was born in {k}, and the founder of the company {nick} works for "
            "was born in {k2}. which company does that founder work for?",
            (_l("p", "employer", "o"), _l("o", "founder", "f"), _l("f", "employer", "a")),
            "a",
            forks=(("p", "k"), ("f", "k2")),
        ),
    ]
}


def template_by_key(key: str) -> Template:
    """A question row's template, default or fork (KeyError naming the valid keys)."""
    if key in TEMPLATES:
        return TEMPLATES[key]
    if key in FORK_TEMPLATES:
        return FORK_TEMPLATES[key]
    raise KeyError(f"unknown template {key!r}; valid: {', '.join([*TEMPLATES, *FORK_TEMPLATES])}")
