"""Config loading: presets, YAML, dotted overrides and the errors for bad input."""

import pytest
from repo_paths import ROOT

from aepo.algos.presets import ALGO_PRESETS
from aepo.config import ConfigError, load_config, parse_override, save_config


def test_defaults_are_the_aepo_preset():
    cfg = load_config()
    assert cfg.algo == "aepo"
    assert cfg.rollout.strategy == "aepo"
    assert cfg.actor.policy_loss == "aepo" and cfg.actor.adv_estimator == "aepo"


@pytest.mark.parametrize("name", sorted(ALGO_PRESETS))
def test_every_preset_loads(name):
    cfg = load_config(None, [f"algo={name}"])
    assert cfg.algo == name
    assert cfg.rollout.strategy == ALGO_PRESETS[name]["rollout"]["strategy"]
    for k, v in ALGO_PRESETS[name]["actor"].items():
        assert getattr(cfg.actor, k) == v


def test_dapo_preset_is_clip_higher_with_dynamic_sampling():
    cfg = load_config(None, ["algo=dapo"])
    assert (cfg.actor.clip_ratio_low, cfg.actor.clip_ratio_high) == (0.2, 0.28)
    assert cfg.actor.dynamic_sampling and cfg.actor.kl_coef == 0


def test_overrides_beat_yaml_and_preset(tmp_path, monkeypatch):
    monkeypatch.setattr("aepo.config.loading.check_loggers", lambda names: None)  # tensorboard need not be installed
    p = tmp_path / "c.yaml"
    p.write_text("algo: grpo\nrollout:\n  n: 4\ntrainer:\n  lr: 0.001\n")
    cfg = load_config(p, ["rollout.n=6", "actor.clip_ratio_high=0.3", "trainer.logger=jsonl,tensorboard"])
    assert cfg.algo == "grpo" and cfg.rollout.n == 6 and cfg.trainer.lr == 0.001
    assert cfg.actor.clip_ratio_high == 0.3
    assert cfg.trainer.logger == ["jsonl", "tensorboard"]


def test_tools_max_workers_reaches_the_runner():
    from aepo.tools import build_tool_runner

    cfg = load_config(None, ["tools.enabled=calc", "tools.max_workers=3"])
    assert build_tool_runner(cfg.tools).max_workers == 3


def test_ablation_component_switch():
    cfg = load_config(None, ["algo=aepo", "rollout.strategy=independent"])
    assert cfg.rollout.strategy == "independent" and cfg.actor.policy_loss == "aepo"


@pytest.mark.parametrize("override, words", [
    (["rollout.nn=3"], ["rollout.nn", "valid keys", "n,"]),
    (["rollout.strategy=foo"], ["rollout.strategy", "'aepo'"]),
    (["algo=ppo2"], ["ppo2", "grpo"]),
    (["rollout.n=abc"], ["rollout.n", "integer"]),
    (["rollout.n=0"], ["rollout.n"]),
    (["trainer.lr"], ["key=value"]),
    (["actor.epo=maybe"], ["actor.epo", "true/false"]),
    (["tools.max_workers=0"], ["tools.max_workers", ">= 1"]),
    (["rollout.pause_below=1.0"], ["rollout.pause_below", "in [0, 1)"]),
])
def test_bad_values_name_the_key(override, words):
    with pytest.raises((ConfigError, ValueError)) as e:
        load_config(None, override)
    for w in words:
        assert w in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_round_trip(tmp_path):
    cfg = load_config(None, ["algo=gppo", "rollout.n=5"])
    save_config(cfg, tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml")
    assert again == cfg


def test_parse_override_types():
    assert parse_override("a.b=3") == ("a.b", 3)
    assert parse_override("a=1e-4") == ("a", 1e-4) or parse_override("a=1e-4")[1] == "1e-4"
    assert parse_override("a=true") == ("a", True)


def test_shipped_configs_load():
    for p in (ROOT / "src" / "aepo" / "configs").glob("*.yaml"):
        load_config(p)
    smol = load_config(ROOT / "examples" / "smollm2_hermes.yaml", ["model.path=x"])
    assert (smol.rollout.tool_format, smol.model.chat_template, smol.actor.lora.layers_to_transform[0]) == ("hermes", True, 22)


def test_the_config_reference_is_the_schema():
    """docs/config.md is generated from the dataclasses: a new key without its doc line shows."""

    from aepo.config import config_reference

    doc = ROOT / "docs" / "config.md"
    assert doc.read_text() == config_reference(), (
        "docs/config.md is stale; regenerate it: python -c \"from aepo.config import config_reference; "
        "print(config_reference(), end='')\" > docs/config.md")
    assert "| `eval.n` | int | `1` | samples per question (pass@k for k <= n) |" in config_reference()


def test_every_config_field_is_documented():
    """Each schema field has a doc comment, so the reference has no empty description; a field
    without one is named (the check itself fails on an undocumented dataclass)."""
    import dataclasses

    from aepo.config import undocumented_fields

    assert undocumented_fields() == []

    @dataclasses.dataclass
    class Probe:
        documented: int = 1  # says what it is
        bare: int = 2

    assert undocumented_fields(Probe(), "probe.") == ["probe.bare"]


def test_every_flag_is_an_alias_of_a_schema_key():
    from aepo.cli.common import FLAGS, flag_overrides
    from aepo.config import Config, config_value, load_config

    for param, (key, _) in FLAGS.items():
        config_value(Config(), key)  # AttributeError for a flag whose key is not in the schema
    cfg = load_config(None, flag_overrides({"samples": 3, "chat_template": True, "search_corpus": "c.jsonl",
                                            "temperature": None}))
    assert (cfg.eval.n, cfg.model.chat_template, cfg.tools.search_corpus) == (3, True, "c.jsonl")
    assert cfg.rollout.temperature == Config().rollout.temperature  # a flag not given changes nothing
