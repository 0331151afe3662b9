"""Fork worlds: names shared by two or three pages, told apart only by a verification search.

A world whose mix holds `fork`, `fork_run` or `alias` questions (`kinds_spec`) gets, beside
its usual entities:

- namesakes: every organisation's founder shares the full name with one or two other people
  of the split, each born in a city of another country and working for another company;
- alias groups: two or three people share a nickname of their own, each born in another
  country, and their documents name them by it.

A fork question names such an entity and says only the country it was born in ("the founder
of dorva labs was born in keronia. ..."). The pages of the shared name state birth cities,
not countries, so telling the candidates apart takes one more search ("kasta tolva country").
Every fork question is kept only if each wrong candidate leads to another answer, so its gold
answer is reachable only through the right one (docs/algorithms.md, "Fork worlds").
"""

from __future__ import annotations

import random
from collections.abc import Iterator

from aepo.demo.world.entities import City, Org, Person, Value, World
from aepo.demo.world.names import _Words
from aepo.demo.world.templates import BIRTH_YEARS, Template

GROUP_SIZES = (2, 3)  # pages that share a name at a fork
ALIAS_SHARE = 0.9  # share of a split's people (namesakes aside) put in alias groups


def add_namesakes(rng: random.Random, orgs: list[Org], people: list[Person], cities: list[City]) -> None:
    """Give every organisation's founder one or two namesakes in other countries and companies."""
    by_id = {p.id: p for p in people}
    country_of = {c.id: c.country for c in cities}
    cities_in: dict[str, list[str]] = {}
    for c in cities:
        cities_in.setdefault(c.country, []).append(c.id)
    for org in orgs:
        founder = by_id[org.founder]
        used_countries = {country_of[founder.birth_city]}
        org_city = {o.id: o.city for o in orgs}
        used_cities = {org_city[founder.employer]}  # each namesake's company in another city
        split_orgs = [o.id for o in orgs if o.split == founder.split]
        for _ in range(rng.choice(GROUP_SIZES) - 1):
            free = [c for c in cities_in if c not in used_countries]
            employers = [o for o in split_orgs if org_city[o] not in used_cities]
            if not free or not employers:
                break
            country = rng.choice(free)
            employer = rng.choice(employers)
            used_countries.add(country)
            used_cities.add(org_city[employer])
            person = Person(
                f"p{len(people):04d}",
                founder.first,
                founder.last,
                rng.choice(cities_in[country]),
                rng.randint(*BIRTH_YEARS),
                employer,
                founder.split,
            )
            people.append(person)


def add_alias_groups(rng: random.Random, words: _Words, people: list[Person], cities: list[City]) -> None:
    """Put ALIAS_SHARE of each split's people (namesakes aside) in groups of 2-3 born in
    different countries, each group named in its documents by a nickname of its own."""
    country_of = {c.id: c.country for c in cities}
    names: dict[str, int] = {}
    for p in people:
        names[p.name] = names.get(p.name, 0) + 1
    groups: list[list[Person]] = []
    for split in ("train", "test"):
        pool = [p for p in people if p.split == split and names[p.name] == 1]
        rng.shuffle(pool)
        want = round(len(pool) * ALIAS_SHARE / 2.5)
        for _ in range(want):
            size, group, seen = rng.choice(GROUP_SIZES), [], set()
            for p in list(pool):
                if country_of[p.birth_city] not in seen:
                    group.append(p)
                    seen.add(country_of[p.birth_city])
                    pool.remove(p)
                    if len(group) == size:
                        break
            if len(group) < 2:
                break
            groups.append(group)
    for group, nick in zip(groups, words.nick(len(groups))):
        for p in group:
            p.nickname, p.nickname_indexed = nick, True


def fork_candidates(world: World, template: Template, bindings: dict, var: str, env: dict) -> list[str]:
    """Ids of the people a fork's pages show: the nickname's holders for the question's
    person (alias), the entity's namesakes otherwise."""
    if var == "p" and "{nick}" in template.text:
        return world.nickname_holders(world.person_by_id[bindings["p"]].nickname)
    return world.namesakes(env[var][1])


def _country(world: World, person: Value) -> str:
    return world.city_by_id[world.person_by_id[person[1]].birth_city].country


def is_ambiguous(world: World, template: Template, bindings: dict) -> bool:
    """Whether a default question's chain looks up a person whose name is shared."""
    env = world.trace(template, bindings)
    for step in template.steps:
        src = env.get(getattr(step, "src", ""), None)
        if src and src[0] == "person" and len(world.namesakes(src[1])) > 1:
            return True
    return False


def _answers(world: World, template: Template, b: dict, forks: tuple, pick: dict) -> list[Value]:
    """The answer of every way through the forks (each candidate at each fork, in turn)."""
    if not forks:
        return [world.execute(template, b, pick)]
    var = forks[0][0]
    env = world.trace(template, b, pick)
    out: list[Value] = []
    for i in fork_candidates(world, template, b, var, env):
        out += _answers(world, template, b, forks[1:], {**pick, var: ("person", i)})
    return out


def _alias_ok(world: World, person: Person) -> bool:
    """A person the "nicknamed" questions can name: 2-3 documents carry the nickname, each of
    someone born in another country (so the question's country tells them apart)."""
    if not person.nickname_indexed:
        return False
    ids = world.nickname_holders(person.nickname)
    countries = {_country(world, ("person", i)) for i in ids}
    return len(ids) in GROUP_SIZES and len(countries) == len(ids)


def fork_bindings(rng: random.Random, world: World, split: str, template: Template) -> Iterator[dict]:
    """Random bindings of a fork template in one split (lazily, no end), each with its clues,
    kept only when its gold answer is reached by the right candidates alone: every other way
    through the forks gives another answer."""
    orgs = [o.id for o in world.orgs if o.split == split]
    singles = [p.id for p in world.people if p.split == split and len(world.namesakes(p.id)) == 1]
    aliased = [i for i in singles if _alias_ok(world, world.person_by_id[i])]
    for _ in range(100_000):
        b: dict = {}
        if "{o}" in template.text:
            b["o"] = rng.choice(orgs)
        if "{p}" in template.text:
            b["p"] = rng.choice(singles)
        if "{nick}" in template.text:
            if not aliased:
                return
            b["p"] = rng.choice(aliased)
        env = world.trace(template, b)
        sizes = []
        for var, clue in template.forks:
            b[clue] = _country(world, env[var])
            sizes.append(len(fork_candidates(world, template, b, var, env)))
        if not all(n in GROUP_SIZES for n in sizes):
            continue
        gold = set(world.aliases(env[template.answer]))
        hits = sum(bool(gold & set(world.aliases(a))) for a in _answers(world, template, b, template.forks, {}))
        if hits == 1:  # the true way through only
            yield b


def fork_question_text(world: World, template: Template, b: dict) -> str:
    """A fork question: the template's text with names, nickname and clue countries."""
    names: dict[str, object] = {k: b[k] for k in ("k", "k2") if k in b}
    if "o" in b:
        names["o"] = world.org_by_id[b["o"]].name
    if "p" in b:
        p = world.person_by_id[b["p"]]
        names["p"], names["nick"] = p.name, p.nickname
    return template.text.format(**names)


def expected_solve_rate(world: World, row: dict, skip_verify: float) -> float:
    """The chance that an expert who skips verification at rate `skip_verify` (then picks a
    page uniformly) answers a fork row: the product over its forks of (1 - s) + s / n."""
    from aepo.demo.world.templates import template_by_key

    template = template_by_key(row["template"])
    env = world.trace(template, row["bindings"])
    rate = 1.0
    for var, _ in template.forks:
        n = len(fork_candidates(world, template, row["bindings"], var, env))
        rate *= (1 - skip_verify) + skip_verify / n
    return rate
