"""`Registry`: the one way aepo keeps named parts (policy losses, advantage estimators, tools,
rollout strategies, tool formats), so an extension is one file with one `register` call
(docs/algorithms.md section 6) and an unknown name fails with the valid ones listed."""
from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Generic, TypeVar

__all__ = ["Registry"]

T = TypeVar("T")
_MISSING = object()


class Registry(Mapping[str, T], Generic[T]):
    """Name -> object, in registration order; read like a dict (`name in r`, `r[name]`, `list(r)`).

    `kind` names the entries in errors ("policy loss"); `error` is the exception type of an
    unknown name (ValueError, or ConfigError where the name comes from a config); `sort` lists
    names sorted rather than in registration order; `unknown`, when given, is the error's text
    with `{name}` and `{names}` filled in.
    """

    def __init__(self, kind: str, *, error: type[Exception] = ValueError, sort: bool = False,
                 unknown: str | None = None) -> None:
        self.kind, self.error, self.sort = kind, error, sort
        self.unknown = unknown or f"unknown {kind} {{name!r}}; valid: {{names}}"
        self._entries: dict[str, T] = {}

    def register(self, name: str, obj: T, *, same: Callable[[T, T], bool] | None = None) -> T:
        """Add `obj` as `name` and return it. Registering again is a no-op when `same(old, obj)`
        (default: the same object); anything else under a taken name is refused, naming it."""
        old = self._entries.get(name, _MISSING)
        if old is not _MISSING and not (same or (lambda a, b: a is b))(old, obj):  # type: ignore[arg-type]
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = obj
        return obj

    def names(self) -> list[str]:
        """The registered names (sorted when the registry sorts, else in registration order)."""
        return sorted(self._entries) if self.sort else list(self._entries)

    def get(self, name: str, default: object = _MISSING) -> T:  # type: ignore[override]
        """The entry `name`; an unknown name raises `error` listing the valid names (or, with a
        `default`, returns it, as a dict's get would)."""
        if name in self._entries:
            return self._entries[name]
        if default is not _MISSING:
            return default  # type: ignore[return-value]
        raise self.error(self.unknown.format(name=name, names=", ".join(self.names())))

    def __getitem__(self, name: str) -> T:
        return self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self.names())})"
