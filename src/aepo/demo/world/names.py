"""Name and word generation: pronounceable fictional words that never clash with the wording."""

from __future__ import annotations

import random

from aepo.demo.world.templates import (
    DOC_CITY,
    DOC_FAMILY,
    DOC_FAMILY_TITLE,
    DOC_ORG,
    DOC_PERSON,
    DOC_PERSON_NICK,
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
    THINK_RESULT,
)


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
