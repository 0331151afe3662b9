"""A scripted expert that answers demo-world questions with real tool calls: SFT demonstrations.

The expert follows a question's template step by step, writes a short formulaic thought, calls
the search tool (or the calculator) through `tool_fn`, reads the result pages it got back and
continues from what it read. Its mistakes are *decisions*, drawn at fixed rates
(`ExpertNoise`): trusting a distractor page, answering before the last hop, guessing after a
failed search instead of retrying, writing a vague query, making a needless call, doing the
arithmetic in its head. So a policy trained on its demonstrations knows every move but not
when each one pays, which is what RL can then learn.

    segments = expert_trajectory(row, world, tool_fn, random.Random(0), ExpertNoise())
    # [("model", "<think> look up mira velin. </think>\\n<search> mira velin born </search>"),
    #  ("tool", "Page 1: mira velin: ...\\nPage 2: ..."),
    #  ("model", "<think> mira velin was born in tolva. </think>\\n<answer> tolva </answer>")]
"""

from __future__ import annotations

import random
import re
import string
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, fields

from aepo.demo.world import (
    FACT_PAIRS,
    FORK_TEMPLATES,
    RELATIONS,
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
    Calc,
    Lookup,
    Value,
    World,
    apply_calc,
    bind_values,
    calc_expression,
    template_by_key,
)

ToolFn = Callable[[str, str], str]
Segment = tuple[str, str]

_PAGE = re.compile(r"^Page (\d+): (.*?): (.*)$")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


@dataclass(frozen=True)
class ExpertNoise:
    """Rates of the expert's decision mistakes (each a probability per opportunity).

    wrong_trust: the target page is in the results beside other pages of its kind; read a
        random other one instead (the fact is then attributed to the asked entity).
    early_answer: per question, answer with a guess before one of its searches (chosen
        uniformly, so a one-hop question may be answered without searching).
    no_retry: a search did not return the target page; instead of searching again with the
        full name, trust the first page of the right kind, or guess when there is none.
    vague_query: query a person by last name only ("velin born"), which may miss them.
    unnecessary_call: repeat the last tool call before answering.
    skip_calc: do the arithmetic "in the head" instead of calling the calculator; the
        result is then wrong with probability `head_math_error` (off by 1 to 10).
    skip_verify: at a fork (two or three pages of one name; aepo.demo.world.forks), take one
        of them at random instead of searching their birth cities' countries to tell them apart.
    """

    wrong_trust: float = 0.15
    early_answer: float = 0.1
    no_retry: float = 0.5
    vague_query: float = 0.15
    unnecessary_call: float = 0.1
    skip_calc: float = 0.5
    head_math_error: float = 0.5
    skip_verify: float = 0.5

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
                raise ValueError(f"ExpertNoise.{f.name} must be a probability in [0, 1], got {v!r}")

    @classmethod
    def clean(cls) -> ExpertNoise:
        """An expert that never errs on purpose."""
        return cls(**{f.name: 0.0 for f in fields(cls)})

    @classmethod
    def quiet(cls, skip_verify: float = 0.5) -> ExpertNoise:
        """The fork worlds' expert: no mistake but skipping verification at forks (half the
        time), so after an ambiguous result its policy is genuinely split and elsewhere it is
        deterministic (it always searches again after a result without the target)."""
        return cls(**{f.name: 0.0 for f in fields(cls)} | {"skip_verify": skip_verify})


NOISE_KINDS = ("wrong_trust", "early_answer", "no_retry", "vague_query", "unnecessary_call", "skip_calc")
FORK_NOISE_KINDS = ("skip_verify",)  # drawn only at the forks of fork worlds


@dataclass
class ExpertRun:
    """One expert episode: the segments plus what happened, for tests and statistics."""

    segments: list[Segment]
    prediction: str
    gold: list[str]
    chances: Counter = field(default_factory=Counter)  # opportunities for each noise kind
    events: Counter = field(default_factory=Counter)  # how often each one was taken

    @property
    def correct(self) -> bool:
        return is_correct(self.prediction, self.gold)


class _Done(Exception):
    """The episode ended (an answer was written)."""


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (the QA-style normalisation)."""
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    return " ".join(w for w in text.split() if w not in ("a", "an", "the"))


def is_correct(prediction: str, gold: list[str]) -> bool:
    """Exact match of normalised strings against any accepted answer."""
    p = normalize_answer(prediction)
    return any(p == normalize_answer(g) for g in gold)


def parse_search_result(text: str) -> list[tuple[str, str]]:
    """(title, text) of each "Page i: title: text" line; [] for "No results found ..."."""
    pages = []
    for line in text.splitlines():
        m = _PAGE.match(line.strip())
        if m:
            pages.append((m.group(2).strip(), m.group(3).strip()))
    return pages


def parse_number(text: str) -> int | None:
    """The last number in a calculator/python result, as an int when integral."""
    found = _NUMBER.findall(text)
    if not found:
        return None
    value = float(found[-1])
    return int(value) if value.is_integer() else None


class _Episode:
    """The state of one expert run; `run` plays the question's template."""

    def __init__(
        self, row: dict, world: World, tool_fn: ToolFn, rng: random.Random, noise: ExpertNoise, calc_tool: str
    ) -> None:
        key = row.get("template")
        if key not in TEMPLATES and key not in FORK_TEMPLATES:
            raise ValueError(
                f"question row {row.get('id')!r} has template {key!r}; expected one of "
                f"{', '.join([*TEMPLATES, *FORK_TEMPLATES])} (rows must come from build_world)"
            )
        if calc_tool not in ("calc", "python"):
            raise ValueError(f"calc_tool must be 'calc' or 'python', got {calc_tool!r}")
        self.row, self.world, self.tool_fn, self.rng, self.noise = row, world, tool_fn, rng, noise
        self.calc_tool = calc_tool
        self.template = template_by_key(key)
        self.clues = dict(self.template.forks)  # fork entity variable -> its clue variable
        self.env: dict[str, Value] = bind_values(row["bindings"])
        self.answer_type = world.execute(self.template, row["bindings"])[0]
        self.segments: list[Segment] = []
        self.pending: list[str] = []  # thought sentences not yet written
        self.last_call: tuple[str, str] | None = None
        self.chances: Counter = Counter()
        self.events: Counter = Counter()
        self.prediction = ""

    # --- primitives

    def _draw(self, kind: str, rate: float) -> bool:
        self.chances[kind] += 1
        hit = self.rng.random() < rate
        if hit:
            self.events[kind] += 1
        return hit

    def _call(self, name: str, argument: str) -> str:
        thought = " ".join(self.pending)
        self.segments.append(("model", f"<think> {thought} </think>\n<{name}> {argument} </{name}>"))
        self.pending = []
        result = self.tool_fn(name, argument)
        if not isinstance(result, str):
            raise ValueError(
                f"tool_fn({name!r}, {argument!r}) returned {type(result).__name__}, expected str"
            )
        self.segments.append(("tool", result))
        self.last_call = (name, argument)
        return result

    def _answer(self, text: str) -> None:
        thought = " ".join(self.pending)
        self.segments.append(("model", f"<think> {thought} </think>\n<answer> {text} </answer>"))
        self.pending = []
        self.prediction = text
        raise _Done

    def _guess(self) -> None:
        w, rng = self.world, self.rng
        kind = self.answer_type
        if kind == "city":
            text = rng.choice(w.cities).name
        elif kind == "country":
            text = rng.choice(w.countries)
        elif kind == "org":
            text = rng.choice(w.orgs).name
        elif kind == "person":
            text = rng.choice(w.people).name
        elif kind == "year":
            text = str(rng.randint(1850, 2050))
        else:
            text = str(rng.randint(1, 99))
        self.pending.append(THINK_GUESS)
        self._answer(text)

    def _fact_sentence(self, subject: str, rels: tuple[str, ...], values: list[Value]) -> str:
        shown = [self.world.display(v) for v in values]
        if rels in FACT_PAIRS:
            return FACT_PAIRS[rels].format(s=subject, **{f"v{i}": v for i, v in enumerate(shown)}) + "."
        return ". ".join(RELATIONS[r][3].format(s=subject, v=v) for r, v in zip(rels, shown)) + "."

    def _read(self, page: tuple[str, str], kind: str, rels: tuple[str, ...]) -> list[Value] | None:
        """The values of `rels` stated on a page about an entity of `kind`, or None."""
        entity = self.world.entity_by_title(page[0])
        if entity is None or entity[0] != kind:
            return None
        values = [self.world.fact(entity, r) for r in rels]
        if not all(self.world.display(v) in page[1] for v in values):
            return None  # e.g. a truncated page
        return values

    # --- steps

    def _fork_lookup(self, step: Lookup) -> None:
        """A lookup whose name is shared by 2-3 pages: verify which one the question means by
        the country of its birth city (one search for all candidates' cities), or, at rate
        `skip_verify`, take one at random."""
        w = self.world
        entity = self.env[step.src]
        nick = (
            w.person_by_id[entity[1]].nickname if step.src == "p" and "{nick}" in self.template.text else ""
        )
        label = nick or w.display(entity)
        keyword = RELATIONS[step.rels[0]][1]
        self.pending.append(THINK_LOOKUP.format(name=label))
        pages = parse_search_result(self._call("search", f"{label} {keyword}"))
        shown = [p for p in pages if (f"nicknamed {nick}," in p[1] if nick else p[0] == label)]
        cands = [e for p in shown if (e := w.entity_by_page(*p)) is not None]
        if not cands:
            self.pending.append(THINK_NOT_FOUND.format(name=label))
            self._guess()
        pick = cands[0]
        if len(cands) > 1 and self._draw("skip_verify", self.noise.skip_verify):
            pick = self.rng.choice(cands)
        elif len(cands) > 1:
            cities = [w.display(w.fact(e, "born_city")) for e in cands]
            self.pending += [THINK_WHICH.format(name=label), THINK_LOOKUP.format(name=" and ".join(cities))]
            found: dict[str, str] = {}
            for title, text in parse_search_result(self._call("search", " ".join(cities) + " country")):
                city = w.entity_by_title(title)
                if (
                    city
                    and city[0] == "city"
                    and title in cities
                    and (c := w.fact(city, "country")[1]) in text
                ):
                    found[title] = str(c)
                    self.pending.append(RELATIONS["country"][3].format(s=title, v=c) + ".")
            clue = self.env[self.clues[step.src]][1]
            match = [(e, c) for e, c in zip(cands, cities) if found.get(c) == clue]
            if match:
                pick = match[0][0]
                self.pending.append(THINK_PICK.format(name=label, city=match[0][1]))
            else:
                pick = self.rng.choice(cands)
        values = [w.fact(pick, r) for r in step.rels]
        self.env[step.src] = pick
        for out, value in zip(step.outs, values):
            self.env[out] = value
        self.pending.append(self._fact_sentence(w.display(pick), step.rels, values))

    def _lookup(self, index: int, step: Lookup) -> None:
        if step.src in self.clues:
            self._fork_lookup(step)
            return
        w = self.world
        entity = self.env[step.src]
        kind = entity[0]
        name = w.display(entity)
        keyword = RELATIONS[step.rels[0]][1]
        full_query = f"{name} {keyword}"
        label, query = name, full_query
        if index == 0 and self.row["kind"] == "retry":
            label = query = w.person_by_id[entity[1]].nickname
        elif kind == "person" and self._draw("vague_query", self.noise.vague_query):
            query = f"{w.person_by_id[entity[1]].last} {keyword}"
        self.pending.append(THINK_LOOKUP.format(name=label))
        pages = parse_search_result(self._call("search", query))
        values: list[Value] | None = None
        for attempt in range(2):
            target = [p for p in pages if p[0] == name and self._read(p, kind, step.rels)]
            others = [(p, v) for p in pages if p[0] != name and (v := self._read(p, kind, step.rels))]
            if target:
                values = self._read(target[0], kind, step.rels)
                if others and self._draw("wrong_trust", self.noise.wrong_trust):
                    values = self.rng.choice(others)[1]
                break
            if attempt == 0 and self._draw("no_retry", self.noise.no_retry):
                if others:
                    values = others[0][1]  # trusts the first plausible page without noticing
                    break
                self.pending.append(THINK_NOT_FOUND.format(name=label))
                self._guess()
            self.pending.append(THINK_NOT_FOUND.format(name=label))
            if attempt == 1:
                self._guess()
            label = name
            self.pending.append(THINK_LOOKUP.format(name=name))
            pages = parse_search_result(self._call("search", full_query))
        assert values is not None
        for out, value in zip(step.outs, values):
            self.env[out] = value
        self.pending.append(self._fact_sentence(name, step.rels, values))

    def _calc(self, step: Calc) -> None:
        a, b = int(self.env[step.a][1]), int(self.env[step.b][1])
        expr = calc_expression(step.op, a, b)
        out_type = "year" if step.op == "+" else "number"
        if self._draw("skip_calc", self.noise.skip_calc):
            value = apply_calc(step.op, a, b)
            if self.rng.random() < self.noise.head_math_error:
                delta = self.rng.randint(1, 10)
                value = value + delta if (value - delta < 0 or self.rng.random() < 0.5) else value - delta
            self.pending.append(THINK_HEAD_MATH.format(expr=expr, value=value))
        else:
            self.pending.append(THINK_COMPUTE.format(expr=expr))
            argument = expr if self.calc_tool == "calc" else f"print({expr})"
            value = parse_number(self._call(self.calc_tool, argument))
            if value is None:
                self._guess()
            self.pending.append(THINK_RESULT.format(value=value))
        self.env[step.out] = (out_type, value)

    def run(self) -> ExpertRun:
        steps = self.template.steps
        n_lookups = sum(isinstance(s, Lookup) for s in steps)
        early_at = (
            self.rng.randrange(n_lookups) if self._draw("early_answer", self.noise.early_answer) else None
        )
        try:
            lookup_index = 0
            for step in steps:
                if isinstance(step, Lookup):
                    if lookup_index == early_at:
                        self._guess()
                    self._lookup(lookup_index, step)
                    lookup_index += 1
                else:
                    self._calc(step)
            text = self.world.display(self.env[self.template.answer])
            if self.last_call and self._draw("unnecessary_call", self.noise.unnecessary_call):
                self.pending.append(THINK_CHECK)
                self._call(*self.last_call)
                self.pending.append(THINK_ANSWER.format(value=text))
            self._answer(text)
        except _Done:
            pass
        return ExpertRun(self.segments, self.prediction, list(self.row["answer"]), self.chances, self.events)


def run_expert(
    question_row: dict,
    world: World,
    tool_fn: ToolFn,
    rng: random.Random,
    noise: ExpertNoise | None = None,
    calc_tool: str = "calc",
) -> ExpertRun:
    """Play one question; the segments and the record of every noisy decision.

    Choices depend only on `rng` and the tool results, so equal inputs give equal runs.
    """
    return _Episode(question_row, world, tool_fn, rng, noise or ExpertNoise(), calc_tool).run()


def expert_trajectory(
    question_row: dict,
    world: World,
    tool_fn: ToolFn,
    rng: random.Random,
    noise: ExpertNoise | None = None,
    calc_tool: str = "calc",
) -> list[Segment]:
    """Segments [("model", text), ("tool", result), ..., ("model", "... <answer> x </answer>")].

    `tool_fn(name, argument)` is called for every tool call ("search" or `calc_tool`) and its
    return value is the "tool" segment as is; the caller wraps it in <result> tags.
    """
    return run_expert(question_row, world, tool_fn, rng, noise, calc_tool).segments


def demonstrations(
    world: World,
    split: str,
    tool_fn: ToolFn,
    n: int | None = None,
    seed: int = 0,
    noise: ExpertNoise | None = None,
    calc_tool: str = "calc",
) -> list[dict]:
    """`n` expert demonstrations over a split (None: one per question; more than the split
    cycles through reshuffled passes). Rows: {"id", "prompt", "segments", "answer",
    "prediction", "correct", "kind", "events"}."""
    rows = world.split(split)
    if n is None:
        n = len(rows)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if n and not rows:
        raise ValueError(f"the {split} split has no questions")
    rng = random.Random(f"aepo-expert:{seed}")
    order: list[dict] = []
    while len(order) < n:
        batch = list(rows)
        rng.shuffle(batch)
        order += batch
    out = []
    for row in order[:n]:
        run = run_expert(row, world, tool_fn, rng, noise, calc_tool)
        out.append(
            {
                "id": row["id"],
                "prompt": row["question"],
                "segments": run.segments,
                "answer": list(row["answer"]),
                "prediction": run.prediction,
                "correct": run.correct,
                "kind": row["kind"],
                "events": dict(run.events),
            }
        )
    return out


__all__ = [
    "FORK_NOISE_KINDS",
    "NOISE_KINDS",
    "ExpertNoise",
    "ExpertRun",
    "demonstrations",
    "expert_trajectory",
    "is_correct",
    "normalize_answer",
    "parse_number",
    "parse_search_result",
    "run_expert",
]
