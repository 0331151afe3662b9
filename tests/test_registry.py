"""`aepo.registry.Registry`, the helper every registry uses: register, get, names, and errors
that name the bad input and the valid names."""
from __future__ import annotations

import pytest

from aepo import algos, formats
from aepo.errors import ConfigError
from aepo.registry import Registry
from aepo.tools import registry as tools_registry


def test_register_get_names_in_order_or_sorted():
    r: Registry[int] = Registry("widget")
    assert r.register("b", 2) == 2 and r.register("a", 1) == 1
    assert r.names() == ["b", "a"] and list(r) == ["b", "a"] and "a" in r and r["a"] == 1 and len(r) == 2
    assert r.get("b") == 2 and r.get("zz", None) is None
    assert Registry("widget", sort=True).names() == []
    s: Registry[int] = Registry("widget", sort=True)
    s.register("b", 2), s.register("a", 1)
    assert s.names() == ["a", "b"]


def test_unknown_and_taken_names_are_refused_by_name():
    r: Registry[object] = Registry("widget")
    one = object()
    r.register("one", one)
    r.register("one", one)  # the same object again: a no-op
    with pytest.raises(ValueError, match="widget 'one' is already registered"):
        r.register("one", object())
    with pytest.raises(ValueError, match=r"unknown widget 'two'; valid: one"):
        r.get("two")
    c: Registry[int] = Registry("knob", error=ConfigError, unknown="knob={name!r}? registered: {names}")
    c.register("x", 1), c.register("y", 2, same=lambda a, b: a == b), c.register("y", 2, same=lambda a, b: a == b)
    with pytest.raises(ConfigError, match=r"knob='z'\? registered: x, y"):
        c.get("z")


def test_the_five_registries_are_registries():
    from aepo.rollout import strategies

    for reg in (algos.POLICY_LOSS_REGISTRY, algos.ADVANTAGE_REGISTRY, tools_registry._TOOLS, formats._FORMATS):
        assert isinstance(reg, Registry), reg
    with pytest.raises(ValueError, match="unknown policy loss 'nope'; valid: .*aepo.*ppo"):
        algos.get_policy_loss_fn("nope")
    with pytest.raises(ValueError, match="unknown advantage estimator 'nope'; valid: .*grpo"):
        algos.get_advantage_fn("nope")
    with pytest.raises(ConfigError, match="unknown tool 'nope'; registered: search, python, calc"):
        tools_registry.get_tool_spec("nope")
    with pytest.raises(ConfigError, match="rollout.tool_format='nope' is not a registered tool format"):
        formats.get_format("nope")
    with pytest.raises(ValueError, match="unknown rollout strategy 'nope'; valid: independent"):
        strategies.get_strategy("nope")
