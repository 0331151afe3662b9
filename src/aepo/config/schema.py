"""The run configuration's schema: one dataclass per section, every field documented by its
comment (docs/config.md is generated from them, `aepo.config.reference`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from aepo.rollout.config import RolloutConfig
from aepo.tools.config import ToolsConfig

__all__ = ["QUICK_DEMO", "AlgoConfig", "Config", "DataConfig", "DemoConfig", "EvalConfig", "LoraConfig",
           "ModelConfig", "RewardConfig", "RolloutConfig", "SFTConfig", "ToolsConfig", "TrainerConfig"]


@dataclass
class ModelConfig:
    path: str = ""  # local HF directory; empty: the demo builds its own tiny model
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # weights and compute
    device: str = "auto"  # auto (CUDA when there is one) | cpu | cuda | cuda:N
    gradient_checkpointing: bool = False  # recompute activations in the update: less memory, more time
    chat_template: bool = False  # wrap prompts with the tokenizer's chat template


@dataclass
class LoraConfig:
    """LoRA adapters on the policy (`actor.lora`, built with peft): with rank > 0, training (RL
    and SFT) updates only the adapters, the KL reference is the same model with its adapters
    disabled, and saved models are adapter directories (docs/usage.md, "LoRA")."""

    rank: int = 0  # adapter rank r; 0: off (full fine-tuning)
    alpha: float = 16.0  # scaling numerator: the update is (alpha / rank) B A
    dropout: float = 0.0  # dropout on the adapters' input while training
    # module names (or name suffixes) to adapt; empty: the architecture's default
    # (aepo.models.lora.DEFAULT_TARGETS: attention and MLP projections of Llama/Qwen/Mistral/...)
    target_modules: list[str] = field(default_factory=list)
    # decoder-layer indices to adapt (peft's layers_to_transform); empty: every layer. The top
    # few layers only, e.g. [24,25,26,27,28,29] of 30, also cut the backward pass to those layers
    layers_to_transform: list[int] = field(default_factory=list)


@dataclass
class AlgoConfig:
    """Advantage, policy loss and regularisers. `algo=NAME` fills these from a preset."""

    # names are the registries' (`aepo.algos`): adv_estimator grpo | rloo | reinforce_pp | aepo;
    # policy_loss ppo | dapo | gppo | cispo | aepo | clip_cov | kl_cov, plus any registered later
    adv_estimator: str = "grpo"
    # GRPO: divide (R - group mean) by the group std (false: Dr. GRPO, mean only)
    norm_adv_by_std_in_grpo: bool = True
    # alpha_H of the aepo estimator (A_i (1 + alpha_H z(H_t)), docs/algorithms.md section 4)
    entropy_adv_alpha: float = 0.2
    # where z(H_t) of that estimator is taken: "batch" over the whole step's batch, with the
    # entropies of the policy before the update (one extra no-grad forward pass; the memory
    # setting ppo_micro_batch_size no longer changes the algorithm), or "micro" over each
    # micro-batch of the training pass (the released actor)
    adv_entropy_scope: Literal["batch", "micro"] = "batch"
    # tree rollouts (ARPO/AEPO branching): "soft" trains a shared prefix once per row that holds
    # it; "hard" trains it once, with the mean advantage of those rows (docs/algorithms.md section 4)
    tree_attribution: Literal["soft", "hard"] = "soft"
    policy_loss: str = "ppo"  # the policy loss, a registered name (see adv_estimator above)
    clip_ratio_low: float = 0.2  # eps_l: the ratio is clipped below at 1 - eps_l
    clip_ratio_high: float = 0.2  # eps_h: the ratio is clipped above at 1 + eps_h (DAPO clip-higher: 0.28)
    clip_ratio_c: float = 3.0  # c of the dual clip: a negative-advantage token's loss is at most c x |A|
    loss_agg_mode: str = "token-mean"  # token-mean | seq-mean-token-mean | seq-mean-token-sum(-norm)
    cispo_clip_low: float = 1.0  # CISPO importance-weight clip (eps_l_is, eps_h_is)
    cispo_clip_high: float = 0.28  # upper width of the CISPO importance-weight clip
    clip_cov_ratio: float = 0.0002  # Clip-Cov: share of the valid tokens whose gradient is cut
    clip_cov_lb: float = 1.0  # Clip-Cov: lower bound of the covariance window the cut tokens are drawn from
    clip_cov_ub: float = 5.0  # Clip-Cov: upper bound of that window
    kl_cov_ratio: float = 0.002  # KL-Cov: share of the valid tokens (largest covariance) that get the KL term
    kl_cov_coef: float = 1.0  # KL-Cov: coefficient of that KL term
    epo: bool = False  # EPO entropy regulariser on the loss (docs/algorithms.md section 5)
    epo_entropy_coef: float = 0.001  # lambda_H
    epo_band_low: float = 0.5  # kappa_l
    epo_band_high: float = 1.5  # kappa_r
    # weight of the EPO band penalty (entropy outside [kappa_l, kappa_r] x its history)
    epo_band_coef: float = 1.0
    # the first training step (0-based) whose loss gets the EPO regulariser; the entropy history
    # is kept from step 0 either way. 0: from the start (the paper); the released code waits
    # until step 25 (docs/algorithms.md section 5)
    epo_start_step: int = 0
    # re-score each rollout with the trainer's model before the update (verl's old_log_prob):
    # needed when the sampler is not the trainer's own fp32 model (vLLM, bf16 kernels)
    recompute_old_log_prob: bool = False
    kl_coef: float = 0.0  # KL to the reference policy; 0 = no reference model
    kl_type: str = "k3"  # k1 | k2 | k3
    dynamic_sampling: bool = False  # DAPO: drop groups whose rewards are all equal
    # DAPO overlong reward shaping, 0 = off (the dapo preset: 64): a row whose generated tokens L
    # (tool results not counted) exceed rollout.max_response_tokens - buffer loses
    # overlong_penalty * min(1, (L - (max - buffer)) / buffer) reward
    overlong_buffer: int = 0
    overlong_penalty: float = 1.0  # the penalty at the budget itself (the ramp above starts at max - buffer)
    # options of a registered loss / estimator that have no field above: {option: value}
    # (each function's keyword-only parameters; checked against them before any work)
    policy_loss_options: dict[str, Any] = field(default_factory=dict)
    # the same for the advantage estimator
    adv_estimator_options: dict[str, Any] = field(default_factory=dict)
    lora: LoraConfig = field(default_factory=LoraConfig)  # LoRA adapters instead of full fine-tuning


@dataclass
class TrainerConfig:
    total_steps: int = 60  # RL steps (one rollout batch and one update each)
    prompts_per_step: int = 16  # prompts per step; each gets rollout.n rows
    ppo_mini_batch_size: int = 64  # rows per optimizer step
    ppo_micro_batch_size: int = 64  # rows per forward/backward (gradient accumulation)
    ppo_epochs: int = 1  # passes over the step's rows
    lr: float = 1e-4  # AdamW learning rate (peak, after warmup)
    weight_decay: float = 0.0  # AdamW weight decay
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW betas
    grad_clip: float = 1.0  # gradient norm clip per optimizer step
    warmup_steps: int = 0  # linear LR warmup, in optimizer steps
    # after warmup: constant, or cosine decay to 0.1 x lr at total_steps
    lr_schedule: Literal["constant", "cosine"] = "constant"
    seed: int = 0  # seed of the prompt order, sampling and the update (per step: aepo.train.schedule)
    save_every: int = 20  # checkpoint every this many steps and at the end (0: none)
    keep_last: int = 2  # checkpoints kept; older ones are deleted
    # torch threads; 0: OMP_NUM_THREADS when set, else the cores this process may use (aepo.train.threads.set_threads)
    threads: int = 0
    # console | jsonl | tensorboard | wandb (the last two need the tracking extra)
    logger: list[str] = field(default_factory=lambda: ["console", "jsonl"])


@dataclass
class DataConfig:
    train: str = ""  # JSONL/parquet; empty: the demo world's train split
    prompt_key: str = ""  # empty: auto-detect (question, problem, prompt, query)
    answer_key: str = ""  # empty: auto-detect (answer, answers, golden_answers, target)
    world_seed: int = 0  # data.train empty: seed of the demo world trained on
    world_level: int = 2  # data.train empty: difficulty level of that world (1-3)


@dataclass
class RewardConfig:
    multi_tool_bonus: float = 0.0  # added to a positive reward when a row used more than one kind of tool
    format_penalty: float = -1.0  # the reward of a row whose tool-use format is invalid
    # QA reward: token F1 (the paper's; pays 0.67 for "Paris London" against gold "Paris") or
    # exact match (em: 1 only for a committed correct answer); docs/algorithms.md section 7
    qa_metric: Literal["f1", "em"] = "f1"


@dataclass
class SFTConfig:
    """`aepo sft` and the demo's SFT stage. The defaults are the demo's: small batches, one pass
    (a small model learns to copy from search results only after enough optimizer steps;
    benchmarks/RESULTS.md, "SFT batch size")."""

    epochs: int = 1  # passes over the demonstrations
    lr: float = 2e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # cosine decay to lr * min_lr_ratio
    batch_size: int = 8  # examples per optimizer step
    warmup_steps: int = 20  # linear warmup, in optimizer steps
    weight_decay: float = 0.01  # AdamW weight decay
    grad_clip: float = 1.0  # gradient norm clip
    max_len: int = 512  # tokens per example; longer ones are cut
    seed: int = 0  # seed of the example order


@dataclass
class EvalConfig:
    """`aepo eval` and the demo's evaluations: samples per question and which questions."""

    n: int = 1  # samples per question (pass@k for k <= n)
    limit: int = 0  # the first `limit` questions of each file; 0: all of them
    seed: int = 0  # seed of the sampling
    batch_prompts: int = 32  # questions rolled out together


@dataclass
class DemoConfig:
    """The demo's sizes (`aepo demo`, `aepo compare`); `aepo demo --quick` is the about-a-minute
    variant (QUICK_DEMO). Its SFT, RL and evaluation settings are the `sft`, `trainer` and
    `eval` sections."""

    world_size: str = "small"  # demo world size: small | medium
    world_level: int = 2  # the demo world's difficulty level (1-3)
    world_kinds: str = ""  # e.g. "fork,fork_run,alias,multi_hop": only these kinds (aepo.demo.world.kinds_spec)
    # Two layers: SFT steps 2.2x cheaper than "tiny"'s four, and a better SFT model after the same
    # 1,600 steps (29% held-out pass@1 against 24%; benchmarks/RESULTS.md, "Demo: learning status").
    model_preset: str = "micro"
    n_demos: int = 10400  # expert demonstrations, from `demo_worlds` sample worlds
    vocab_size: int = 2400  # the demo tokenizer's vocabulary cap
    demo_worlds: int = 40  # sample worlds the demonstrations come from
    tokenizer_worlds: int = 4  # sample worlds whose text trains the tokenizer
    recall_drills: int = 2400  # name -> number recall drills mixed into SFT (aepo.train.sft.recall_drills)


QUICK_DEMO = ["demo.n_demos=200", "demo.tokenizer_worlds=2", "demo.demo_worlds=2", "demo.recall_drills=50",
              "trainer.total_steps=2", "eval.n=2", "eval.limit=16"]
"""What `--quick` changes (before the command line's own overrides): about a minute in all."""


@dataclass
class Config:
    algo: str = "aepo"  # a preset (aepo.algos.presets) that fills rollout.strategy and the actor section first
    model: ModelConfig = field(default_factory=ModelConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    actor: AlgoConfig = field(default_factory=AlgoConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tools: ToolsConfig = field(default_factory=ToolsConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)
    out_dir: str = "runs/default"  # aepo train: checkpoints, metrics.jsonl, config.yaml and final/
    # modules (dotted names or .py paths) imported before the config is checked, so the losses,
    # estimators, tools and strategies they register can be named in it (examples/extend/)
    plugins: list[str] = field(default_factory=list)
