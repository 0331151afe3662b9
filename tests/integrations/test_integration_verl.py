"""aepo.integrations.verl against a small fake `verl` package (a real verl, if installed, is put back after).

The fake mimics `verl.trainer.ppo.core_algos`: the two registries with verl's decorators, and
a `compute_policy_loss_vanilla` written from verl's PPO formula (dual clip, rollout weights,
global-batch aggregation with dp_size) in either return convention. Since the AEPO loss has
PPO's forward value, the fake vanilla loss is an independent reference for the adapter's
value, metrics, aggregation and rollout weighting.
"""
from __future__ import annotations

import importlib
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field, replace
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch

import aepo.integrations.verl as v
from aepo.algos import AGG_MODES, compute_advantages, policy_loss

torch.set_num_threads(1)

_ANNOTATIONS = {
    "dict": "-> tuple[torch.Tensor, dict[str, Any]]",
    "tuple": "-> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]",
}

_CORE_ALGOS = '''
from typing import Any

import torch

STYLE = {style!r}
POLICY_LOSS_REGISTRY = {{}}
ADV_ESTIMATOR_REGISTRY = {{}}


def register_policy_loss(name):
    def decorator(fn):
        POLICY_LOSS_REGISTRY[name] = fn
        return fn
    return decorator


def get_policy_loss_fn(name):
    if name not in POLICY_LOSS_REGISTRY:
        raise ValueError(f"Unsupported loss mode: {{name}}")
    return POLICY_LOSS_REGISTRY[name]


def register_adv_est(name):
    def decorator(fn):
        if name in ADV_ESTIMATOR_REGISTRY and ADV_ESTIMATOR_REGISTRY[name] != fn:
            raise ValueError(f"Adv estimator {{name}} has already been registered")
        ADV_ESTIMATOR_REGISTRY[name] = fn
        return fn
    return decorator


def get_adv_estimator_fn(name):
    if name not in ADV_ESTIMATOR_REGISTRY:
        raise ValueError(f"Unknown advantage estimator simply: {{name}}")
    return ADV_ESTIMATOR_REGISTRY[name]


def _masked_mean(x, mask):
    return (x * mask).sum() / mask.sum()


def agg_loss(loss_mat, loss_mask, loss_agg_mode, dp_size=1, batch_num_tokens=None,
             global_batch_size=None, loss_scale_factor=None):
    m = loss_mask.float()
    if loss_agg_mode == "token-mean":
        n = m.sum() if batch_num_tokens is None else batch_num_tokens
        return (loss_mat * m).sum() / n * dp_size
    row_tokens = m.sum(-1)
    rows = (loss_mat * m).sum(-1)
    if loss_agg_mode == "seq-mean-token-mean":
        rows = rows / (row_tokens + 1e-8)
    has_tokens = (row_tokens > 0).float()
    n_rows = has_tokens.sum() if global_batch_size is None else global_batch_size
    loss = (rows * has_tokens).sum() / n_rows * dp_size
    if loss_agg_mode == "seq-mean-token-sum-norm":
        loss = loss / (m.shape[-1] if loss_scale_factor is None else loss_scale_factor)
    return loss


def compute_policy_loss_vanilla(old_log_prob, log_prob, advantages, response_mask,
                                loss_agg_mode="token-mean", config=None, rollout_log_probs=None,
                                rollout_is_weights=None) {annotation}:
    base = config.clip_ratio
    lo = config.clip_ratio_low if config.clip_ratio_low is not None else base
    hi = config.clip_ratio_high if config.clip_ratio_high is not None else base
    c = config.get("clip_ratio_c", 3.0)
    mask = response_mask.float()
    log_ratio = torch.clamp(log_prob - old_log_prob, -20.0, 20.0)
    ratio = torch.exp(log_ratio)
    ppo_kl = _masked_mean(-log_ratio, mask)
    plain = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - lo, 1 + hi)
    pessimistic = torch.maximum(plain, clipped)
    clipfrac = _masked_mean((clipped > plain).float(), mask)
    dual_bound = -advantages * c
    clipfrac_lower = _masked_mean(((pessimistic > dual_bound) & (advantages < 0)).float(), mask)
    losses = torch.where(advantages < 0, torch.minimum(pessimistic, dual_bound), pessimistic)
    if rollout_is_weights is not None:
        losses = losses * rollout_is_weights
    cap = config.get("tis_imp_ratio_cap", -1.0)
    if rollout_log_probs is not None and cap > 0:
        losses = losses * torch.clamp(torch.exp(old_log_prob - rollout_log_probs), max=cap)
    loss = agg_loss(losses, mask, loss_agg_mode, **config.get("global_batch_info", {{}}))
    if STYLE == "tuple":
        return loss, clipfrac, ppo_kl, clipfrac_lower
    return loss, {{"actor/pg_clipfrac": clipfrac.item(), "actor/ppo_kl": ppo_kl.item(),
                  "actor/pg_clipfrac_lower": clipfrac_lower.item()}}
'''


def _drop_verl_modules() -> None:
    for name in [m for m in sys.modules if m == "verl" or m.startswith("verl.")]:
        del sys.modules[name]


@pytest.fixture
def make_verl(tmp_path, monkeypatch):
    """Factory: write a fake verl package ("dict"/"tuple" convention, annotated or not),
    put it on sys.path and return its core_algos module."""
    counter = iter(range(100))
    # a real verl imported by other test files in this process comes back afterwards, registries intact
    saved = {m: mod for m, mod in sys.modules.items() if m == "verl" or m.startswith("verl.")}

    def make(style: str = "dict", annotated: bool = True) -> ModuleType:
        root = tmp_path / f"site{next(counter)}"
        pkg = root / "verl" / "trainer" / "ppo"
        pkg.mkdir(parents=True)
        for d in (root / "verl", root / "verl" / "trainer", pkg):
            (d / "__init__.py").write_text("")
        annotation = _ANNOTATIONS[style] if annotated else ""
        (pkg / "core_algos.py").write_text(textwrap.dedent(_CORE_ALGOS.format(style=style, annotation=annotation)))
        _drop_verl_modules()
        monkeypatch.syspath_prepend(str(root))
        return importlib.import_module("verl.trainer.ppo.core_algos")

    yield make
    _drop_verl_modules()
    sys.modules.update(saved)


@pytest.fixture(autouse=True)
def _restore_settings():
    saved = replace(v._SETTINGS)
    yield
    v._SETTINGS.return_style = saved.return_style
    v._SETTINGS.entropy_alpha = saved.entropy_alpha


@dataclass
class ActorConfig:
    """The fields of verl's ActorConfig the losses read, with its dict-like `get`."""

    clip_ratio: float = 0.2
    clip_ratio_low: float | None = None
    clip_ratio_high: float | None = None
    clip_ratio_c: float = 3.0
    tis_imp_ratio_cap: float = -1.0
    global_batch_info: dict[str, Any] = field(default_factory=dict)

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key, default)


def loss_batch(seed: int = 0, B: int = 4, T: int = 6) -> dict[str, torch.Tensor]:
    """Ratios spread over [0.3, 4] (every clip region), mixed-sign advantages, padded rows."""
    g = torch.Generator().manual_seed(seed)
    old = -1.0 - 0.5 * torch.rand(B, T, generator=g)
    log_prob = old + (-1.2 + 2.6 * torch.rand(B, T, generator=g))
    advantages = torch.randn(B, 1, generator=g) + 0.3 * torch.randn(B, T, generator=g)
    lengths = torch.tensor([T, T - 2, 3, 1][:B])
    mask = (torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)).float()
    return {"old_log_prob": old, "log_prob": log_prob, "advantages": advantages, "response_mask": mask}


def call_registered(core: ModuleType, name: str, batch: dict[str, torch.Tensor], **kwargs: Any):
    """Call a loss through the fake registry as verl's actor does; returns (result, grad)."""
    lp = batch["log_prob"].clone().requires_grad_(True)
    out = core.get_policy_loss_fn(name)(
        old_log_prob=batch["old_log_prob"], log_prob=lp, advantages=batch["advantages"],
        response_mask=batch["response_mask"], **kwargs,
    )
    out[0].backward()
    return out, lp.grad


def call_direct(aepo_name: str, batch: dict[str, torch.Tensor], **kwargs: Any):
    lp = batch["log_prob"].clone().requires_grad_(True)
    loss, metrics = policy_loss(
        aepo_name, lp, batch["old_log_prob"], batch["advantages"], batch["response_mask"], **kwargs
    )
    loss.backward()
    return loss, metrics, lp.grad


# ----------------------------------------------------------------------------- import / register


def test_import_without_verl_and_register_gives_install_hint(monkeypatch):
    for name in [m for m in sys.modules if m.startswith("verl.")]:  # a real verl may be imported already
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "verl", None)  # `import verl` now fails like a missing package
    monkeypatch.delitem(sys.modules, "aepo.integrations.verl")
    fresh = importlib.import_module("aepo.integrations.verl")
    assert fresh is not v and sys.modules["verl"] is None
    with pytest.raises(ImportError, match="pip install verl"):
        fresh.register()


@pytest.mark.parametrize("style", ["dict", "tuple"])
def test_register_adds_names_and_is_idempotent(make_verl, style):
    core = make_verl(style)
    names = v.register(core)
    assert names == ["aepo", "gppo", "aepo_cispo", "aepo_grpo", "aepo_entropy"]
    assert {"aepo", "gppo", "aepo_cispo"} <= set(core.POLICY_LOSS_REGISTRY)
    assert {"aepo_grpo", "aepo_entropy"} <= set(core.ADV_ESTIMATOR_REGISTRY)
    first = dict(core.ADV_ESTIMATOR_REGISTRY)
    assert v.register(core) == names  # verl's register_adv_est would raise on a different fn
    assert core.ADV_ESTIMATOR_REGISTRY == first
    assert v._SETTINGS.return_style == style


def test_register_refuses_a_name_taken_by_someone_else(make_verl):
    core = make_verl("dict")
    core.register_policy_loss("aepo")(lambda *a, **k: None)
    with pytest.raises(ValueError, match="'aepo' is already registered"):
        v.register(core)


def test_register_rejects_bad_options(make_verl):
    core = make_verl("dict")
    with pytest.raises(ValueError, match="return_style"):
        v.register(core, return_style="list")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="entropy_alpha"):
        v.register(core, entropy_alpha=-1.0)


# ----------------------------------------------------------------------------- policy losses


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("verl_name,aepo_name", [("aepo", "aepo"), ("gppo", "gppo"), ("aepo_cispo", "cispo")])
def test_registered_loss_equals_policy_loss(make_verl, verl_name, aepo_name, agg):
    core = make_verl("dict")
    v.register(core)
    batch = loss_batch(seed=1)
    cfg = ActorConfig(clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0)
    (loss, metrics), grad = call_registered(core, verl_name, batch, loss_agg_mode=agg, config=cfg)
    ref_loss, ref_metrics, ref_grad = call_direct(aepo_name, batch, clip_low=0.2, clip_high=0.28, clip_c=3.0, agg=agg)
    assert torch.equal(loss, ref_loss)
    assert torch.equal(grad, ref_grad)
    assert grad.abs().sum() > 0
    assert {f"actor/aepo/{k}": x for k, x in ref_metrics.items()}.items() <= metrics.items()


def test_clip_widths_come_from_the_config(make_verl):
    core = make_verl("dict")
    v.register(core)
    batch = loss_batch(seed=2)
    # clip_ratio_low/high None fall back to clip_ratio, as in verl
    (loss_fb, _), grad_fb = call_registered(core, "aepo", batch, config=ActorConfig(clip_ratio=0.1))
    ref_fb, _, ref_grad_fb = call_direct("aepo", batch, clip_low=0.1, clip_high=0.1)
    assert torch.equal(loss_fb, ref_fb) and torch.equal(grad_fb, ref_grad_fb)
    # the widths change the result (the batch has ratios between the candidate bounds)
    default, _, _ = call_direct("aepo", batch, clip_low=0.2, clip_high=0.2)
    assert not torch.allclose(loss_fb, default)
    # dual-clip constant: a token with A < 0 and r = 2.5 is capped only when c = 2
    one = {
        "old_log_prob": torch.zeros(1, 1), "log_prob": torch.full((1, 1), float(np.log(2.5))),
        "advantages": -torch.ones(1, 1), "response_mask": torch.ones(1, 1),
    }
    (capped, _), _ = call_registered(core, "aepo", one, config=ActorConfig(clip_ratio_c=2.0))
    (uncapped, _), _ = call_registered(core, "aepo", one, config=ActorConfig(clip_ratio_c=3.0))
    assert capped.item() == pytest.approx(2.0) and uncapped.item() == pytest.approx(2.5)


@pytest.mark.parametrize("annotated", [True, False], ids=["annotation", "probe"])
@pytest.mark.parametrize("style", ["dict", "tuple"])
def test_return_convention_detected_and_matches_verl_vanilla(make_verl, style, annotated):
    core = make_verl(style, annotated=annotated)
    assert v.detect_return_style(core) == style
    v.register(core)
    batch = loss_batch(seed=3)
    cfg = ActorConfig(clip_ratio_low=0.2, clip_ratio_high=0.28)
    out, _ = call_registered(core, "aepo", batch, loss_agg_mode="token-mean", config=cfg)
    vanilla = core.compute_policy_loss_vanilla(
        batch["old_log_prob"], batch["log_prob"], batch["advantages"], batch["response_mask"], "token-mean", cfg
    )
    torch.testing.assert_close(out[0], vanilla[0])  # AEPO's forward value is PPO's
    if style == "tuple":
        assert len(out) == 4 and all(isinstance(t, torch.Tensor) for t in out)
        for mine, theirs in zip(out[1:], vanilla[1:]):
            assert mine.item() == pytest.approx(theirs.item(), abs=1e-6)
    else:
        assert len(out) == 2 and isinstance(out[1], dict)
        for key, value in vanilla[1].items():
            assert out[1][key] == pytest.approx(value, abs=1e-6)
        assert all(isinstance(x, float) for x in out[1].values())


def test_detection_fails_clearly_without_vanilla(make_verl):
    core = make_verl("dict")
    del core.compute_policy_loss_vanilla
    with pytest.raises(RuntimeError, match="return_style"):
        v.register(core)
    assert v.register(core, return_style="tuple")[0] == "aepo"


@pytest.mark.parametrize(
    "agg,info",
    [
        ("token-mean", {"dp_size": 2, "batch_num_tokens": 31}),
        ("seq-mean-token-sum", {"dp_size": 4, "global_batch_size": 13}),
        ("seq-mean-token-mean", {"dp_size": 2, "global_batch_size": 9}),
        ("seq-mean-token-sum-norm", {"dp_size": 2, "global_batch_size": 11, "loss_scale_factor": 48}),
    ],
)
def test_global_batch_info_aggregates_like_verl(make_verl, agg, info):
    core = make_verl("dict")
    v.register(core)
    batch = loss_batch(seed=4)
    cfg = ActorConfig(global_batch_info=info)
    (loss, _), _ = call_registered(core, "aepo", batch, loss_agg_mode=agg, config=cfg)
    vanilla, _ = core.compute_policy_loss_vanilla(
        batch["old_log_prob"], batch["log_prob"], batch["advantages"], batch["response_mask"], agg, cfg
    )
    torch.testing.assert_close(loss, vanilla)
    (local, _), _ = call_registered(core, "aepo", batch, loss_agg_mode=agg, config=ActorConfig())
    assert not torch.allclose(loss, local)


def test_rollout_is_weights_scale_each_token(make_verl):
    core = make_verl("dict")
    v.register(core)
    batch = loss_batch(seed=5)
    w = torch.rand(batch["log_prob"].shape, generator=torch.Generator().manual_seed(9)) * 2.0
    w[0, 0] = 0.0
    cfg = ActorConfig(clip_ratio_high=0.28, clip_ratio_low=0.2)
    (loss, _), grad = call_registered(core, "aepo", batch, config=cfg, rollout_is_weights=w)
    (_, _), plain_grad = call_registered(core, "aepo", batch, config=cfg)
    vanilla, _ = core.compute_policy_loss_vanilla(
        batch["old_log_prob"], batch["log_prob"], batch["advantages"], batch["response_mask"],
        "token-mean", cfg, rollout_is_weights=w,
    )
    torch.testing.assert_close(loss, vanilla)
    torch.testing.assert_close(grad, plain_grad * w)  # token-mean: d/dlogp of sum w_t L_t / N


def test_truncated_is_from_rollout_log_probs(make_verl):
    core = make_verl("tuple")
    v.register(core)
    batch = loss_batch(seed=6)
    rollout = batch["old_log_prob"] + 0.4 * torch.randn(batch["old_log_prob"].shape, generator=torch.Generator())
    cfg = ActorConfig(tis_imp_ratio_cap=1.5)
    out, _ = call_registered(core, "aepo", batch, config=cfg, rollout_log_probs=rollout)
    vanilla = core.compute_policy_loss_vanilla(
        batch["old_log_prob"], batch["log_prob"], batch["advantages"], batch["response_mask"],
        "token-mean", cfg, rollout_log_probs=rollout,
    )
    torch.testing.assert_close(out[0], vanilla[0])
    (off, *_), _ = call_registered(core, "aepo", batch, config=ActorConfig(), rollout_log_probs=rollout)
    assert not torch.allclose(off, out[0])  # cap <= 0 (verl's default) leaves the loss alone


def test_negative_rollout_weights_are_rejected(make_verl):
    core = make_verl("dict")
    v.register(core)
    batch = loss_batch(seed=7)
    w = torch.ones_like(batch["log_prob"])
    w[0, 0] = -0.5
    with pytest.raises(ValueError, match=">= 0"):
        call_registered(core, "gppo", batch, config=ActorConfig(), rollout_is_weights=w)


# ----------------------------------------------------------------------------- advantages


def outcome_batch() -> dict[str, Any]:
    """verl-style outcome rewards: the score sits on the last valid token of each row."""
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 0]], dtype=torch.float32)
    scores = torch.tensor([1.0, 0.0, 0.5, 2.0, 3.0])
    rewards = torch.zeros_like(mask)
    rewards[torch.arange(5), mask.sum(-1).long() - 1] = scores
    index = np.array(["u1", "u1", "u2", "u2", "u3"], dtype=object)
    return {"token_level_rewards": rewards, "response_mask": mask, "index": index, "scores": scores}


def test_grpo_advantage_matches_compute_advantages_and_hand_values(make_verl):
    core = make_verl("dict")
    v.register(core)
    b = outcome_batch()
    fn = core.get_adv_estimator_fn("aepo_grpo")
    adv, ret = fn(token_level_rewards=b["token_level_rewards"], response_mask=b["response_mask"],
                  index=b["index"], config={"norm_adv_by_std_in_grpo": True})
    expected = compute_advantages("grpo", b["scores"], list(b["index"]), b["response_mask"])
    assert torch.equal(adv, expected) and torch.equal(ret, adv)
    # group u1 = {1, 0}: mean 0.5, unbiased std 1/sqrt(2) -> A = +-1/sqrt(2); lone u3 -> 0
    s = 0.5 / (2**-0.5 + 1e-6)
    assert adv[0, :3].tolist() == pytest.approx([s] * 3) and adv[0, 3] == 0
    assert adv[1, :2].tolist() == pytest.approx([-s] * 2)
    assert torch.all(adv[4] == 0)
    dr, _ = fn(token_level_rewards=b["token_level_rewards"], response_mask=b["response_mask"],
               index=b["index"], config={"norm_adv_by_std_in_grpo": False})
    assert dr[0, 0].item() == pytest.approx(0.5) and dr[2, 0].item() == pytest.approx(-0.75)


def test_entropy_advantage_matches_compute_advantages(make_verl, monkeypatch):
    core = make_verl("dict")
    v.register(core)
    b = outcome_batch()
    h = torch.rand(b["response_mask"].shape, generator=torch.Generator().manual_seed(3)) * 2
    fn = core.get_adv_estimator_fn("aepo_entropy")
    common = {"token_level_rewards": b["token_level_rewards"], "response_mask": b["response_mask"], "index": b["index"]}

    def expected(alpha: float) -> torch.Tensor:
        return compute_advantages("aepo", b["scores"], list(b["index"]), b["response_mask"], entropy=h, alpha=alpha)

    adv, ret = fn(**common, config={}, entropys=h)
    assert torch.equal(adv, expected(0.2)) and torch.equal(ret, adv)
    assert not torch.equal(adv, compute_advantages("grpo", b["scores"], list(b["index"]), b["response_mask"]))
    adv_cfg, _ = fn(**common, config={"aepo_entropy_alpha": 0.5}, batch={"entropys": h})
    assert torch.equal(adv_cfg, expected(0.5))
    monkeypatch.setenv(v.ENTROPY_ALPHA_ENV, "0.3")
    assert torch.equal(fn(**common, config={}, entropy=h)[0], expected(0.3))
    v.register(core, entropy_alpha=0.1)  # the process setting beats the environment
    assert torch.equal(fn(**common, config={}, entropys=h)[0], expected(0.1))


def test_entropy_advantage_without_entropy_explains_how_to_enable(make_verl):
    core = make_verl("dict")
    v.register(core)
    b = outcome_batch()
    fn = core.get_adv_estimator_fn("aepo_entropy")
    with pytest.raises(ValueError, match=r"trainer_mode=aepo_sync.*verl.trainer.register") as err:
        fn(token_level_rewards=b["token_level_rewards"], response_mask=b["response_mask"],
           index=b["index"], config={}, reward_baselines=None)
    assert "reward_baselines" in str(err.value) and "aepo_grpo" in str(err.value)


def test_advantage_without_index_is_a_clear_error(make_verl):
    core = make_verl("dict")
    v.register(core)
    b = outcome_batch()
    with pytest.raises(ValueError, match="needs `index`"):
        core.get_adv_estimator_fn("aepo_grpo")(
            token_level_rewards=b["token_level_rewards"], response_mask=b["response_mask"], config={}
        )


@pytest.mark.parametrize("module, function", [("verl_agent_loop", "register"), ("verl_trainer", "register_trainers")])
def test_verl_modules_import_without_verl(module, function):
    """The agent loop and trainer modules import without verl; registering then says what to install."""
    code = ("import sys; sys.modules['verl'] = None\n"
            f"import aepo.integrations.{module} as m\n"
            f"try:\n    m.{function}()\nexcept ImportError as e:\n    print('hint:', e)\n")
    done = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "hint:" in done.stdout and "pip install aepo[verl]" in done.stdout
