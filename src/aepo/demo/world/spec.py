"""The knobs of a demo world (`WorldSpec`) and their size and difficulty presets."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

DATA_SOURCE = "demo_world"
KINDS = ("one_hop", "multi_hop", "arithmetic", "retry")
FORK_KINDS = ("fork", "fork_run", "alias")  # `kinds_spec`; aepo.demo.world.forks
ALL_KINDS = KINDS + FORK_KINDS
SIZES = ("small", "medium")
LEVELS = (1, 2, 3)
FORMAT_VERSION = 1

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
            bad = sorted(set(mix) - set(ALL_KINDS))
            if bad or not mix or any(v < 0 for v in mix.values()) or sum(mix.values()) <= 0:
                raise ValueError(
                    f"WorldSpec.{split}_mix must map some of {', '.join(ALL_KINDS)} to weights >= 0 "
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


# A world with fork kinds is quiet off the forks: few confusable twins, no family pages, fewer
# nicknames, so that the uncertainty left after a tool result is the forks'.
FORK_QUIET: dict = {
    "twins_train": 0.3,
    "twins_test": 0.3,
    "family_docs": 0.0,
    "nickname_share": 0.2,
    "nickname_indexed": 0.0,  # documents name people by nickname only in the alias groups
}


def has_forks(spec: WorldSpec) -> bool:
    """Whether a world of this spec asks fork, fork_run or alias questions."""
    return any(k in FORK_KINDS for k in (*spec.train_mix, *spec.test_mix))


def parse_kinds(text: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """Kinds from "fork,fork_run,alias" (or a list): each one of ALL_KINDS, none twice."""
    kinds = [k.strip() for k in (text.split(",") if isinstance(text, str) else text) if k.strip()]
    bad = [k for k in kinds if k not in ALL_KINDS]
    if bad or not kinds or len(set(kinds)) != len(kinds):
        raise ValueError(
            f"kinds {text!r}: give distinct names from {', '.join(ALL_KINDS)}, comma-separated"
            + (f" ({', '.join(bad)} unknown)" if bad else "")
        )
    return tuple(kinds)


def kinds_spec(spec: WorldSpec, kinds: str | list[str] | tuple[str, ...]) -> WorldSpec:
    """`spec` asking only `kinds`, in equal shares in both splits. With a fork kind among them
    the rest of the world is quiet (FORK_QUIET), and the world has 1.5x the people, 2x the
    organisations and a test share of at least 0.4, and 3/40 of the size's train questions and
    1/4 of its test questions per kind (150 and 75 for "small"), so that every split can hold
    its distinct fork questions."""
    names = parse_kinds(kinds)
    mix = {k: 1.0 for k in names}
    out = replace(spec, train_mix=dict(mix), test_mix=dict(mix))
    if not has_forks(out):
        return out
    return replace(
        out,
        **FORK_QUIET,
        base_people=round(1.5 * spec.base_people),
        orgs=2 * spec.orgs,
        test_share=max(spec.test_share, 0.4),
        train_questions=len(names) * (spec.train_questions * 3 // 40),
        test_questions=len(names) * (spec.test_questions // 4),
    )
