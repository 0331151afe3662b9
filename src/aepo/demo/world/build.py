"""Building a world from a seed: entities, the search corpus and the question splits."""

from __future__ import annotations

import random
from collections.abc import Iterator

from aepo.demo.world.entities import City, Org, Person, World
from aepo.demo.world.forks import (
    add_alias_groups,
    add_namesakes,
    fork_bindings,
    fork_question_text,
    is_ambiguous,
)
from aepo.demo.world.names import _Words
from aepo.demo.world.spec import DATA_SOURCE, FORK_KINDS, KINDS, WorldSpec, has_forks, kinds_spec, world_spec
from aepo.demo.world.templates import (
    BIRTH_YEARS,
    DOC_CITY,
    DOC_FAMILY,
    DOC_FAMILY_TITLE,
    DOC_ORG,
    DOC_PERSON,
    DOC_PERSON_NICK,
    FORK_TEMPLATES,
    FOUNDED_YEARS,
    FOUNDER_AGE,
    NICKNAME_CLAUSE,
    ORG_TYPES,
    TEMPLATES,
    TURN_AGES,
    Template,
)


def demo_world(
    seed: int = 0, size: str = "small", level: int = 2, kinds: str | tuple[str, ...] = ()
) -> World:
    """The world `aepo demo --seed SEED` trains on (its names drawn from `name_seed=seed`), so
    `aepo train` and `aepo world build` with the same seed give the SFT model its own world.
    `kinds` ("fork,fork_run,alias"; empty: the level's mix) asks only those kinds (`kinds_spec`)."""
    spec = kinds_spec(world_spec(size, level), kinds) if kinds else None
    return build_world(seed=seed, size=size, level=level, spec=spec, name_seed=seed)


def build_world(
    seed: int = 0,
    size: str = "small",
    level: int = 2,
    spec: WorldSpec | None = None,
    name_seed: int | None = None,
) -> World:
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
    if has_forks(spec):
        add_namesakes(rng, orgs, people, cities)
        add_alias_groups(rng, words, people, cities)

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
    kinds = KINDS + tuple(k for k in FORK_KINDS if k in mix)
    exact = {k: n * mix.get(k, 0.0) / total for k in kinds}
    counts = {k: int(v) for k, v in exact.items()}
    for k in sorted(kinds, key=lambda k: counts[k] - exact[k])[: n - sum(counts.values())]:
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
    forky = has_forks(spec)
    rows: list[dict] = []
    seen: set[str] = set()
    for kind, count in _kind_counts(n, mix).items():
        if count == 0:
            continue
        retry, fork = kind == "retry", kind in FORK_KINDS
        pool = [
            t
            for t in (FORK_TEMPLATES if fork else TEMPLATES).values()
            if (fork or t.hops <= spec.max_hops) and (t.retry_ok if retry else t.kind == kind)
        ]
        if not pool:
            raise ValueError(f"no {kind} question fits WorldSpec.max_hops={spec.max_hops}")
        three = [t for t in pool if t.hops == 3 and not fork]
        short = [t for t in pool if t.hops < 3 or fork] or three
        streams = {
            t.key: fork_bindings(rng, world, split, t) if fork else _candidates(rng, world, split, t, retry)
            for t in pool
        }
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
            if forky and not fork and is_ambiguous(world, template, b):
                continue  # off the forks every name a chain looks up is unique
            text = (
                fork_question_text(world, template, b) if fork else _question_text(world, template, b, retry)
            )
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
