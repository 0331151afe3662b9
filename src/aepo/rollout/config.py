"""The rollout's settings (`rollout.*` in a run config): budget, sampling, branching."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["SCHEDULERS", "RolloutConfig"]

SCHEDULERS = ("turns", "continuous")


@dataclass
class RolloutConfig:
    # the engine behind the sampler (`aepo.rollout.sampler.backend`): "torch" (built in) or "vllm"
    # (in-process vLLM, the `vllm` extra; pi_old is then always re-scored by the trainer)
    backend: Literal["torch", "vllm"] = "torch"
    # torch backend on CUDA: replay each decode step as a CUDA graph (`DecodeGraphs`; under the
    # continuous scheduler the running batch's steps without joining rows, `SlotGraphs`, and the
    # layers' dense parts of the others, `LayerGraphs`); false decodes eagerly (the same tokens,
    # slower at real model sizes)
    decode_graphs: bool = True
    # torch backend: once a turn's generate call is down to this fraction of its rows and some
    # row stopped for a tool, the others pause and continue in the next turn's batch, so rows
    # waiting on a tool result need not wait for the turn's longest row (0 = off). Try 0.25 on
    # a GPU, where a decode step costs about the same at 8 rows as at 64; on the CPU demo it
    # saves nothing (benchmarks/RESULTS.md, "GPU, second session")
    pause_below: float = 0.0
    # how rows are scheduled (docs/algorithms.md section 3.5): "turns" one generate call per turn
    # of all rows; "continuous" one running batch that rows join and leave at any step (a row
    # waiting on a tool leaves, a branch joins at once; the vllm backend, or the torch backend on a
    # Llama-family model).
    # "turns" is the default: on the CPU demo's tiny model a step costs about in proportion to
    # its rows, so fewer steps do not pay (benchmarks/RESULTS.md, "Continuous batching")
    scheduler: Literal["turns", "continuous"] = "turns"
    max_active_rows: int = 256  # continuous scheduler: rows decoding at once; the others wait
    # continuous scheduler: start the rows a pending decision may make before it is taken (a
    # branch at its fork point, AEPO's global rows beside its probe, the fills beside the rows
    # they fill for) and drop those it does not make. The same trees; fewer steps (with quick
    # tools, the critical path's) for more tokens, given room: with max_active_rows far below
    # the rows a rollout holds it can take more steps than without (docs/algorithms.md section 3.5)
    speculate: bool = False
    # how the model calls tools (`aepo.formats`): "tags" the paper's <search> ... </search> protocol
    # (aepo's own models), "hermes" JSON in <tool_call> ... </tool_call> with results as `tool`
    # messages of the chat template (Qwen and most pretrained chat models; docs/algorithms.md 2.1)
    tool_format: str = "tags"
    strategy: str = "aepo"  # a registered strategy (`aepo.rollout.strategies`): independent | arpo | aepo | random
    n: int = 8  # k: rows per prompt, one group
    temperature: float = 1.0  # sampling temperature
    top_p: float = 1.0  # nucleus sampling (1.0: off)
    top_k: int = 0  # top-k sampling (0: off)
    max_response_tokens: int = 256  # the budget of a row's whole response, tool-result tokens included
    max_tool_calls: int = 6  # tool calls per row; the system prompt of chat models states it
    max_result_tokens: int = 128  # a tool result is cut to this many tokens (its closing tag kept)
    # a segment's entropy: the sum of its first n_probe token entropies / log|V|, rescaled by
    # n_probe / n when it has n < n_probe tokens (docs/algorithms.md section 1)
    n_probe: int = 20
    # ARPO entropy-based adaptive branching
    initial_rollouts: int = 0  # m; 0 means n // 2
    # alpha, the base of the branch score alpha + beta dH. Kept apart from branch_tau: with the
    # threshold rule a chain branches when beta dH > tau - alpha, i.e. dH > 0.5 at the defaults,
    # so beta (and AEPO's gamma) sets the bar; alpha = tau would make it "dH > 0" whatever beta
    # is (docs/algorithms.md section 3.2). `released` does not use alpha (its base is U(0, 1))
    branch_alpha: float = 0.4
    branch_beta: float = 0.2  # ARPO beta; AEPO's gamma below
    branch_children: int = 1  # Z
    # strategy "random" (the control): the probability that a decision branches, whatever dH is
    random_branch_p: float = 0.5
    # AEPO dynamic entropy-balanced rollout
    premonitor: bool = True
    beta_pm: float = 0.5  # beta_pm of pre-monitoring: m = round(n sigmoid(beta_pm (H_root - H_tool)))
    reuse_probe: bool = True  # keep the pre-monitoring probe row as one of the m global rows
    branch_gamma: float = 0.2  # AEPO gamma: the weight of dH in the branch score
    branch_penalty: float = 0.05  # lambda_pen
    branch_tau: float = 0.5  # tau, the bar of the threshold and released rules (0.5 in the released code)
    # ARPO and AEPO branch rule (docs/algorithms.md section 3.3): "threshold" the paper, "released" the
    # authors' code (random base U), "sample" Bernoulli(P); the default is chosen from demo
    # measurements given in rollout.strategies.branch_decision
    branch_decision: Literal["threshold", "released", "sample"] = "threshold"
    # l of the penalty: "chain" one per chain (the paper); "prompt" the released counter, one per
    # prompt, updated once per round, fills counted (docs/algorithms.md section 3.3 item 2)
    penalty_scope: Literal["chain", "prompt"] = "chain"
    m_compat: bool = False  # released code: int(k * sigmoid) + 1
    segment_entropy_compat: bool = False  # released code: plain sum over n_probe, no length rescale
    # vllm backend: top-k log-probs per token for the probe entropy (vLLM returns no full
    # distribution; docs/algorithms.md section 1 gives the tail correction), and engine keywords
    # passed to vllm.LLM as they are (e.g. {gpu_memory_utilization: 0.4, enforce_eager: true})
    entropy_top_k: int = 20
    engine_options: dict[str, Any] = field(default_factory=dict)  # vllm.LLM keywords, as above
    # a sampler engine other than the trainer's own model (vllm): after every weight sync, the
    # mean |log-prob difference| per token of a fixed probe sequence between the trainer and the
    # engine must be at most this, else the run stops (aepo.rollout.sampler.sync_check); 0: off
    sync_tolerance: float = 0.05
