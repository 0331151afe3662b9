"""LoRA (`actor.lora`, aepo.models.lora): the reference policy is the base model, only adapter
parameters change, the sampler samples from the adapted model, checkpoints hold the adapter,
a stale engine fails the per-step sync check, and the commands train, evaluate and merge adapters."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from repo_paths import SRC
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config
from typer.testing import CliRunner

from aepo.cli import app
from aepo.config import ConfigError, LoraConfig, load_config
from aepo.data.datasets import TaskRow
from aepo.models.lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    LoraError,
    adapters_disabled,
    apply_lora,
    check_lora,
    is_peft_model,
    policy_module,
)
from aepo.rollout.sampler import TorchBackend, TorchSampler
from aepo.rollout.sampler.sync_check import SyncError, check_sync, probe_logprobs, sync_gap
from aepo.train.rl import RLTrainer

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
runner = CliRunner()
VOCAB = 40


def tiny_model(seed: int = 0, arch: str = "qwen3") -> torch.nn.Module:
    kw = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        tie_word_embeddings=True,
        pad_token_id=0,
        eos_token_id=1,
        initializer_range=0.2,
    )
    cfg = Qwen3Config(**kw) if arch == "qwen3" else LlamaConfig(**kw)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(cfg).eval()


def randomize_adapters(model: torch.nn.Module, seed: int = 1, scale: float = 0.3) -> None:
    """Non-zero B matrices, so the adapted model differs from its base (fresh adapters do not)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def trainer_for(model, tmp_path, backend=None, **over):
    ov = [
        "algo=grpo",
        "trainer.ppo_mini_batch_size=4",
        "trainer.ppo_micro_batch_size=4",
        "trainer.lr=0.05",
        "trainer.grad_clip=1e9",
        "trainer.total_steps=10",
        "actor.lora.rank=4",
    ]
    cfg = load_config(None, ov + [f"{k}={v}" for k, v in over.items()])
    tasks = [TaskRow("t", "q?", ["a"], "demo")]
    tok = SimpleNamespace(pad_token_id=0)
    trainer = RLTrainer(cfg, model, tok, tasks, lambda calls: [], tmp_path, backend=backend)
    trainer._prompt_ids = lambda task: [2, 5, 7, 9, 11, 13, 4, 8]  # no tokenizer needed for the probe
    return trainer


def make_trajs(rewards, seed=0):
    from aepo.types import Trajectory

    g = torch.Generator().manual_seed(seed)
    out = []
    for i, r in enumerate(rewards):
        resp = torch.randint(2, VOCAB, (6 + i,), generator=g).tolist()
        t = Trajectory("p", i, [5, 6, 7], resp, [1] * len(resp), [-3.0] * len(resp), [0.5] * len(resp))
        t.reward = r
        out.append(t)
    return out


def forward_logprobs(model, ids):
    x = torch.tensor([ids])
    with torch.no_grad():
        lp = F.log_softmax(model(input_ids=x).logits[0, :-1].float(), -1)
    return lp.gather(-1, x[0, 1:, None])[:, 0]


# ----------------------------------------------------------------------------- config and bad input


def test_config_keys_and_validation():
    cfg = load_config(
        None, ["actor.lora.rank=8", "actor.lora.alpha=32", "actor.lora.target_modules=q_proj,v_proj"]
    )
    assert cfg.actor.lora == LoraConfig(rank=8, alpha=32.0, dropout=0.0, target_modules=["q_proj", "v_proj"])
    assert load_config(None).actor.lora.rank == 0  # off by default
    for bad, key in (
        ("actor.lora.rank=-1", "actor.lora.rank"),
        ("actor.lora.dropout=1.0", "actor.lora.dropout"),
        ("actor.lora.alpha=0", "actor.lora.alpha"),
    ):
        with pytest.raises(ConfigError, match=key):
            load_config(None, [bad])


def test_check_lora_names_what_does_not_fit():
    model = tiny_model()
    names = check_lora(model, LoraConfig(rank=4))
    assert len(names) == 2 * 7 and all(n.rsplit(".", 1)[-1].endswith("proj") for n in names)
    with pytest.raises(LoraError, match="none of attn_qkv is a module") as e:
        check_lora(model, LoraConfig(rank=4, target_modules=["attn_qkv"]))
    assert "q_proj" in str(e.value) and "\n" not in str(e.value)
    # k_proj maps 32 -> 16 (one kv head of 16): rank 17 is above its width
    with pytest.raises(LoraError, match=r"actor.lora.rank=17 is above the width of .*k_proj \(16\)"):
        check_lora(model, LoraConfig(rank=17))
    model.config.model_type = "unknown_arch"
    with pytest.raises(LoraError, match="no default target modules for architecture 'unknown_arch'"):
        check_lora(model, LoraConfig(rank=4))


def test_layers_to_transform_adapts_only_those_layers_and_stops_the_backward_there():
    model = tiny_model()
    names = check_lora(model, LoraConfig(rank=4, layers_to_transform=[1]))
    assert len(names) == 7 and all(".layers.1." in n for n in names)
    with pytest.raises(LoraError, match=r"layers_to_transform: \[2\] are not decoder layers .*has 2"):
        check_lora(model, LoraConfig(rank=4, layers_to_transform=[1, 2]))
    wrapped = apply_lora(tiny_model(), LoraConfig(rank=4, layers_to_transform=[1]))
    trainable = [n for n, p in wrapped.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * 7 and all(".layers.1." in n for n in trainable)
    # layer 0 holds no trainable parameter, so the backward pass never reaches it
    reached = []
    layer0 = policy_module(wrapped).model.layers[0]
    layer0.register_full_backward_hook(lambda *a: reached.append(0))
    layer1 = policy_module(wrapped).model.layers[1]
    layer1.register_full_backward_hook(lambda *a: reached.append(1))
    for p in wrapped.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.1)
    wrapped(input_ids=torch.tensor([[2, 3, 4]])).logits.sum().backward()
    assert reached == [1]
    assert load_config(None, ["actor.lora.layers_to_transform=[1]"]).actor.lora.layers_to_transform == [1]


# ----------------------------------------------------------------------------- training


def test_reference_is_the_base_model_and_no_copy(tmp_path):
    base = tiny_model()
    independent = copy.deepcopy(base)  # the base weights, held apart from the trainer
    trainer = trainer_for(base, tmp_path, **{"actor.kl_coef": 0.1})
    assert is_peft_model(trainer.model) and trainer.ref_model is None  # no second copy of the model
    randomize_adapters(trainer.model)
    trajs = make_trajs([1.0, 0.0, 1.0, 0.0])
    batch = trainer.make_batch(trajs)
    want, _ = trainer._score(independent, batch)
    assert torch.allclose(batch.ref_log_prob, want, atol=1e-5)
    # and the policy itself (adapters on) is another distribution
    assert (trainer._score(trainer.model, batch)[0] - want).abs().max() > 1e-2
    with adapters_disabled(trainer.model):  # the context restores the adapters afterwards
        pass
    assert (trainer._score(trainer.model, batch)[0] - want).abs().max() > 1e-2


def test_only_adapter_parameters_change_in_a_step(tmp_path):
    trainer = trainer_for(tiny_model(), tmp_path, **{"actor.kl_coef": 0.1, "actor.lora.rank": 2})
    model = trainer.model
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # rank 2 on 7 projections x 2 layers: (in + out) * 2 per projection
    shapes = [(32, 32), (32, 16), (32, 16), (32, 32), (32, 64), (32, 64), (64, 32)]
    assert n_trainable == 2 * sum(2 * (i + o) for i, o in shapes)
    opt_params = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert opt_params == {id(p) for n, p in model.named_parameters() if "lora_" in n}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = trainer.make_batch(make_trajs([1.0, 0.0, 1.0, 0.0]))
    trainer.update(batch, 0)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)
    assert any("lora_B" in n for n in changed)  # B starts at zero: it is what the first step moves


def test_sampler_samples_from_the_adapted_model(tmp_path):
    model = apply_lora(tiny_model(arch="llama"), LoraConfig(rank=4))
    randomize_adapters(model)
    backend = TorchBackend(model, None, load_config(None).rollout)
    assert backend.model is policy_module(model)
    tok = SimpleNamespace(
        pad_token_id=0, eos_token_id=1, convert_ids_to_tokens=lambda i: [], decode=lambda ids: ""
    )
    s = TorchSampler(policy_module(model), tok, temperature=1.0, seed=3, eos_token_ids=[1], pack_weights=True)
    prompt = [2, 5, 7, 9]
    gen = s.generate([s.new_row(prompt)], 6)[0]
    assert s._packed is not None  # the packed path, with the adapters merged into its copies
    want = forward_logprobs(model, prompt + gen.token_ids)[len(prompt) - 1 :]
    assert torch.allclose(torch.tensor(gen.logprobs), want, atol=1e-4)
    with adapters_disabled(model):
        base = forward_logprobs(model, prompt + gen.token_ids)[len(prompt) - 1 :]
        # the same sampler, adapters off: its packed copies are rebuilt from the base weights
        gen_base = s.generate([s.new_row(prompt)], 6)[0]
        want_base = forward_logprobs(model, prompt + gen_base.token_ids)[len(prompt) - 1 :]
    assert (base - want).abs().max() > 1e-2  # the adapters matter, and the sampler used them
    assert torch.allclose(torch.tensor(gen_base.logprobs), want_base, atol=1e-4)
    # the module path (no packing) samples from the adapted model too
    s2 = TorchSampler(
        policy_module(model), tok, temperature=1.0, seed=3, eos_token_ids=[1], pack_weights=False
    )
    gen2 = s2.generate([s2.new_row(prompt)], 6)[0]
    want2 = forward_logprobs(model, prompt + gen2.token_ids)[len(prompt) - 1 :]
    assert torch.allclose(torch.tensor(gen2.logprobs), want2, atol=1e-4)


def test_layer_graphs_are_not_replayed_across_adapters_on_and_off():
    """The running batch's layer graphs (`TorchSampler.layer_graphs`) of an unpacked LoRA model
    call its LoRA layers: captured with the adapters on, they would replay them under
    `adapters_disabled` too, so the flag is part of what keeps them."""
    model = apply_lora(tiny_model(arch="llama"), LoraConfig(rank=4))
    tok = SimpleNamespace(pad_token_id=0, eos_token_id=1)
    s = TorchSampler(policy_module(model), tok, temperature=1.0, seed=3, eos_token_ids=[1],
                     pack_weights=False, decode_graphs=True)
    graphs = s.layer_graphs()
    assert s.layer_graphs() is graphs
    with adapters_disabled(model):
        off = s.layer_graphs()
        assert off is not graphs and s.layer_graphs() is off
    assert s.layer_graphs() is not off


# ----------------------------------------------------------------------------- sync check


def test_sync_check_pure_function():
    assert sync_gap([-1.0, -2.0], [-1.0, -2.5]) == pytest.approx(0.25)
    assert sync_gap([-1.0], [-1.0, -2.0]) == float("inf")
    assert check_sync([-1.0, -2.0], [-1.01, -2.0], 0.05) == pytest.approx(0.005)
    with pytest.raises(SyncError, match="not serving the trained policy after step 3"):
        check_sync([-1.0, -2.0], [-1.0, -2.5], 0.05, step=3)


class StaleBackend(TorchBackend):
    """A torch engine that never receives updates: it keeps the adapter it was built with."""

    def sync(self, model):
        pass


def test_stale_adapter_in_the_sampler_fails_the_sync_check(tmp_path):
    model = apply_lora(tiny_model(), LoraConfig(rank=4))
    stale = copy.deepcopy(model)
    trainer = trainer_for(model, tmp_path, backend=StaleBackend(stale, None, load_config(None).rollout))
    assert trainer.check_engine(0) == pytest.approx(0.0, abs=1e-6)  # identical so far: passes
    trainer.update(trainer.make_batch(make_trajs([1.0, 0.0, 1.0, 0.0])), 0)
    with pytest.raises(
        SyncError, match="torch sampler engine is not serving the trained policy after step 1"
    ):
        trainer.check_engine(1)
    # an engine that received the adapter passes; the live torch backend is not checked at all
    fresh = StaleBackend(copy.deepcopy(trainer.model), None, load_config(None).rollout)
    trainer.backend = fresh
    assert trainer.check_engine(1) < 1e-5
    trainer.backend = TorchBackend(trainer.model, None, load_config(None).rollout)
    assert trainer.check_engine(1) is None
    assert probe_logprobs(trainer.model, [2, 5, 7]) == pytest.approx(
        fresh.probe_logprobs([2, 5, 7]), abs=1e-6
    )


# ----------------------------------------------------------------------------- checkpoints


def test_checkpoint_holds_the_adapter_and_resume_restores_it(tmp_path):
    from aepo.models.tokenizer import build_tokenizer
    from aepo.train.checkpoint import save_checkpoint

    tok = build_tokenizer(["a b c"])
    trainer = trainer_for(tiny_model(), tmp_path)
    randomize_adapters(trainer.model)
    ck = save_checkpoint(
        tmp_path / "checkpoints", 1, trainer.model, tok, trainer.optimizer, trainer.scheduler, {}
    )
    assert (ck / ADAPTER_CONFIG).is_file() and (ck / ADAPTER_WEIGHTS).is_file()
    assert not (ck / "model.safetensors").exists()
    other = trainer_for(tiny_model(), tmp_path)
    assert other.resume() == 1
    a = {n: p for n, p in trainer.model.named_parameters() if "lora_" in n}
    b = {n: p for n, p in other.model.named_parameters() if "lora_" in n}
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    wrong = trainer_for(tiny_model(), tmp_path, **{"actor.lora.rank": 2})
    from aepo.train.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="does not fit the model"):
        wrong.resume()


# ----------------------------------------------------------------------------- commands


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from aepo.models.tokenizer import build_tokenizer

    d = tmp_path_factory.mktemp("base") / "model"
    tok = build_tokenizer(
        ["question: who founded molto press? <search> molto press </search> <answer> x </answer>"]
    )
    cfg = Qwen3Config(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def _questions(tmp_path: Path) -> Path:
    data = tmp_path / "q.jsonl"
    data.write_text(
        "".join(
            json.dumps({"question": f"what is {i} + {i}?", "answer": [str(2 * i)]}) + "\n" for i in range(4)
        )
    )
    return data


CONFIG = SRC / "aepo" / "configs" / "demo.yaml"
SMALL = [
    "tools.enabled=[calc]",
    "rollout.n=2",
    "trainer.prompts_per_step=2",
    "rollout.max_response_tokens=12",
    "rollout.max_tool_calls=1",
    "trainer.total_steps=2",
    "trainer.save_every=1",
    "trainer.logger=[jsonl]",
    "model.device=cpu",
    "trainer.threads=1",
]


def test_train_writes_an_adapter_that_eval_and_merge_load(model_dir, tmp_path):
    data = _questions(tmp_path)
    out = tmp_path / "run"
    train = ["train", str(CONFIG), f"model.path={model_dir}", f"data.train={data}", f"out_dir={out}",
             "actor.lora.rank=8", *SMALL]
    res = runner.invoke(app, train)
    assert res.exit_code == 0, res.output
    final = out / "final"
    assert (final / ADAPTER_CONFIG).is_file() and (final / "aepo_run.yaml").is_file()
    adapter_size = (final / ADAPTER_WEIGHTS).stat().st_size
    assert adapter_size * 3 < (model_dir / "model.safetensors").stat().st_size  # far smaller than the model
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_1", "step_2"]
    assert (out / "checkpoints" / "step_2" / ADAPTER_WEIGHTS).is_file()
    # eval loads the adapter (its base model from its run config) and scores it
    res = runner.invoke(
        app,
        [
            "eval",
            str(final),
            "--data",
            str(data),
            "--n",
            "1",
            "--limit",
            "2",
            "--out",
            str(tmp_path / "eval"),
            "--device",
            "cpu",
        ],
    )
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["q"]["n_questions"] == 2
    res = runner.invoke(
        app,
        [
            "rollout",
            "--model",
            str(final),
            "--data",
            str(data),
            "--limit",
            "1",
            "--k",
            "2",
            "--out",
            str(tmp_path / "rows.jsonl"),
            "--device",
            "cpu",
        ],
    )
    assert res.exit_code == 0 and len((tmp_path / "rows.jsonl").read_text().splitlines()) == 2, res.output
    res = runner.invoke(app, ["model", "info", str(final)])
    assert res.exit_code == 0 and "qwen3" in res.output, res.output
    # resume from the adapter checkpoints: nothing left to train, and it says so
    res = runner.invoke(app, [*train, "--resume"])
    assert res.exit_code == 0 and "resuming from step 2" in res.output, res.output
    # merge: a plain HF model computing what base + adapter computes
    from aepo.models.loading import load_model

    randomized = tmp_path / "adapter"
    adapted, _ = load_model(final, device="cpu")
    randomize_adapters(adapted)
    adapted.save_pretrained(randomized)
    (randomized / "aepo_run.yaml").write_text((final / "aepo_run.yaml").read_text())
    res = runner.invoke(app, ["model", "merge", str(randomized), str(tmp_path / "merged")])
    assert res.exit_code == 0, res.output
    merged, _ = load_model(tmp_path / "merged", device="cpu")
    assert not is_peft_model(merged)
    adapted2, _ = load_model(randomized, device="cpu")
    ids = [2, 5, 7, 9, 11]
    assert torch.allclose(forward_logprobs(merged, ids), forward_logprobs(adapted2, ids), atol=1e-5)
    base, _ = load_model(model_dir, device="cpu")
    assert (forward_logprobs(base, ids) - forward_logprobs(merged, ids)).abs().max() > 1e-3


def test_bad_lora_input_fails_before_work(model_dir, tmp_path):
    data = _questions(tmp_path)
    base = ["train", str(CONFIG), f"model.path={model_dir}", f"data.train={data}", *SMALL]
    res = runner.invoke(
        app, [*base, f"out_dir={tmp_path / 'a'}", "actor.lora.rank=8", "actor.lora.target_modules=attn_qkv"]
    )
    assert res.exit_code == 2 and "none of attn_qkv is a module" in res.output, res.output
    res = runner.invoke(app, [*base, f"out_dir={tmp_path / 'b'}", "actor.lora.rank=64"])
    assert res.exit_code == 2 and "actor.lora.rank=64 is above the width" in res.output, res.output
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    # an adapter whose base model is gone
    adapter = tmp_path / "orphan"
    model = apply_lora(tiny_model(), LoraConfig(rank=2))
    model.peft_config["default"].base_model_name_or_path = str(tmp_path / "gone")
    model.save_pretrained(adapter)
    res = runner.invoke(app, ["eval", str(adapter), "--data", str(data), "--out", str(tmp_path / "e")])
    assert res.exit_code == 2, res.output
    assert f"its base model {tmp_path / 'gone'} is missing" in " ".join(res.output.split())
    assert not (tmp_path / "e").exists()
    res = runner.invoke(app, ["model", "merge", str(adapter), str(tmp_path / "m")])
    assert res.exit_code == 2 and "is missing" in res.output


def test_verl_receives_its_own_lora_settings():
    from aepo.integrations.verl_lora import verl_lora_overrides

    assert verl_lora_overrides(LoraConfig()) == []
    assert verl_lora_overrides(LoraConfig(rank=32, alpha=32.0)) == [
        "actor_rollout_ref.model.lora_rank=32",
        "actor_rollout_ref.model.lora_alpha=32",
        "actor_rollout_ref.model.target_modules=all-linear",
        "actor_rollout_ref.rollout.load_format=safetensors",
    ]
    assert "actor_rollout_ref.model.target_modules=[q_proj,v_proj]" in verl_lora_overrides(
        LoraConfig(rank=8, target_modules=["q_proj", "v_proj"])
    )


def test_sft_with_lora_trains_only_an_adapter(model_dir, tmp_path):
    from safetensors.torch import load_file

    data = tmp_path / "rows.jsonl"
    data.write_text(
        "".join(
            json.dumps({"input_ids": [2, 5, 7, 9, 11, 4], "loss_mask": [0, 0, 1, 1, 1, 1]}) + "\n"
            for _ in range(4)
        )
    )
    out = tmp_path / "sft"
    res = runner.invoke(
        app,
        [
            "sft",
            "--model",
            str(model_dir),
            "--data",
            str(data),
            "--out",
            str(out),
            "--device",
            "cpu",
            "--batch-size",
            "2",
            "actor.lora.rank=4",
            "sft.warmup_steps=0",
        ],
    )
    assert res.exit_code == 0, res.output
    assert (out / ADAPTER_CONFIG).is_file() and not (out / "model.safetensors").exists()
    weights = load_file(str(out / ADAPTER_WEIGHTS))
    assert weights and all("lora_" in k for k in weights)
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in weights.items())  # B left zero: it trained
    assert str(model_dir.resolve()) in (out / "aepo_run.yaml").read_text()  # the base model, for eval
