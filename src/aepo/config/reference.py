"""docs/config.md, generated from the schema's field comments (`aepo.config.schema`)."""
from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

from aepo.config.loading import _hints
from aepo.config.schema import Config

__all__ = ["config_reference", "field_docs", "undocumented_fields"]

_FIELD_RE = re.compile(r"^    (\w+): [^=]+?(?:= (.*?))?(?:\s+#\s?(.*))?$")


def field_docs(cls: type) -> dict[str, str]:
    """{field: its comment} from the dataclass's source: the comment at the end of the field's
    line, after the comment lines just above it (the schema documents itself in one place)."""
    import inspect
    import textwrap

    docs: dict[str, str] = {}
    above: list[str] = []
    for line in textwrap.dedent(inspect.getsource(cls)).splitlines()[1:]:
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(stripped.lstrip("#").strip())
            continue
        m = _FIELD_RE.match(line)
        if m and m.group(1) in {f.name for f in dataclasses.fields(cls)}:
            docs[m.group(1)] = " ".join([*above, m.group(3) or ""]).strip()
        above = []
    return docs


def config_reference() -> str:
    """docs/config.md: every key of the schema with its type, default and description."""
    lines = ["# Configuration reference", "",
             "Every command reads this one schema (`aepo.config.Config`): YAML files and dotted",
             "overrides (`rollout.n=8`) set its keys, and a command's flags are aliases of them",
             "(`aepo.cli.common.FLAGS`). Generated from the dataclasses by",
             "`python -c \"from aepo.config import config_reference; print(config_reference(), end='')\" > docs/config.md`.",
             ""]
    cfg = Config()
    top = [f for f in dataclasses.fields(Config) if not dataclasses.is_dataclass(getattr(cfg, f.name))]
    lines += ["## Top level", "", "| key | default | description |", "|---|---|---|"]
    docs = field_docs(Config)
    for f in top:
        lines.append(f"| `{f.name}` | `{_default_text(getattr(cfg, f.name))}` | {docs.get(f.name, '')} |")
    for f in dataclasses.fields(Config):
        section = getattr(cfg, f.name)
        if not dataclasses.is_dataclass(section):
            continue
        cls = type(section)
        lines += ["", f"## `{f.name}` ({cls.__name__})", ""]
        if cls.__doc__ and not cls.__doc__.startswith(cls.__name__ + "("):
            lines += [" ".join(cls.__doc__.split()), ""]
        lines += ["| key | type | default | description |", "|---|---|---|---|"]
        lines += _reference_rows(section, f.name)
    return "\n".join(lines) + "\n"


def _reference_rows(section: Any, prefix: str) -> list[str]:
    """The reference table's rows for the fields of dataclass `section`, keys under `prefix`;
    a nested section (actor.lora) gets one row per field of its own."""
    cls = type(section)
    docs = field_docs(cls)
    hints = _hints(cls)
    rows = []
    for sub in dataclasses.fields(cls):
        value = getattr(section, sub.name)
        if dataclasses.is_dataclass(value):
            rows += _reference_rows(value, f"{prefix}.{sub.name}")
            continue
        kind = str(hints[sub.name]).replace("typing.", "").replace("<class '", "").replace("'>", "")
        rows.append(f"| `{prefix}.{sub.name}` | {kind.replace('|', '&#124;')} | "
                    f"`{_default_text(value)}` | {docs.get(sub.name, '').replace('|', '&#124;')} |")
    return rows


def _default_text(value: Any) -> str:
    if isinstance(value, tuple):
        value = list(value)
    if isinstance(value, (list, dict, bool)) or value is None or value == "":
        return json.dumps(value)
    return str(value)


def undocumented_fields(section: Any = None, prefix: str = "") -> list[str]:
    """The dotted keys of the schema whose field has no doc comment (the reference would show an
    empty description); [] when every field is documented."""
    section = Config() if section is None else section
    docs = field_docs(type(section))
    missing = []
    for f in dataclasses.fields(section):
        key = f"{prefix}{f.name}"
        value = getattr(section, f.name)
        if dataclasses.is_dataclass(value):
            missing += undocumented_fields(value, key + ".")
        elif not docs.get(f.name):
            missing.append(key)
    return missing
