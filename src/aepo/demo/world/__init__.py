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

The package's modules: `templates` (wording, relations, question templates), `spec` (the
knobs and their presets), `names` (fictional word generation), `entities` (people,
organisations, cities and the `World`), `build` (a world from a seed), `forks` (the fork
kinds' namesakes, nickname groups and questions).
"""

from aepo.demo.world.build import build_world, demo_world
from aepo.demo.world.entities import (
    City,
    Org,
    Person,
    Value,
    World,
    apply_calc,
    bind_values,
    calc_expression,
    subjects,
)
from aepo.demo.world.forks import expected_solve_rate, fork_candidates
from aepo.demo.world.names import number_words, word_split
from aepo.demo.world.spec import (
    ALL_KINDS,
    DATA_SOURCE,
    FORK_KINDS,
    FORK_QUIET,
    FORMAT_VERSION,
    KINDS,
    LEVELS,
    SIZES,
    WorldSpec,
    has_forks,
    kinds_spec,
    parse_kinds,
    world_spec,
)
from aepo.demo.world.templates import (
    BIRTH_YEARS,
    DOC_CITY,
    DOC_FAMILY,
    DOC_FAMILY_TITLE,
    DOC_ORG,
    DOC_PERSON,
    DOC_PERSON_NICK,
    FACT_PAIRS,
    FORK_TEMPLATES,
    FOUNDED_YEARS,
    FOUNDER_AGE,
    NICKNAME_CLAUSE,
    NO_RESULTS,
    ORG_TYPES,
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
    TURN_AGES,
    Calc,
    Lookup,
    Template,
    template_by_key,
)

__all__ = [
    "ALL_KINDS",
    "BIRTH_YEARS",
    "DATA_SOURCE",
    "DOC_CITY",
    "DOC_FAMILY",
    "DOC_FAMILY_TITLE",
    "DOC_ORG",
    "DOC_PERSON",
    "DOC_PERSON_NICK",
    "FACT_PAIRS",
    "FORK_KINDS",
    "FORK_QUIET",
    "FORK_TEMPLATES",
    "FORMAT_VERSION",
    "FOUNDED_YEARS",
    "FOUNDER_AGE",
    "KINDS",
    "LEVELS",
    "NICKNAME_CLAUSE",
    "NO_RESULTS",
    "ORG_TYPES",
    "RELATIONS",
    "RESULT_PAGE",
    "SIZES",
    "TEMPLATES",
    "THINK_ANSWER",
    "THINK_CHECK",
    "THINK_COMPUTE",
    "THINK_GUESS",
    "THINK_HEAD_MATH",
    "THINK_LOOKUP",
    "THINK_NOT_FOUND",
    "THINK_PICK",
    "THINK_RESULT",
    "THINK_WHICH",
    "TURN_AGES",
    "Calc",
    "City",
    "Lookup",
    "Org",
    "Person",
    "Template",
    "Value",
    "World",
    "WorldSpec",
    "apply_calc",
    "bind_values",
    "build_world",
    "calc_expression",
    "demo_world",
    "expected_solve_rate",
    "fork_candidates",
    "has_forks",
    "kinds_spec",
    "number_words",
    "parse_kinds",
    "subjects",
    "template_by_key",
    "word_split",
    "world_spec",
]
