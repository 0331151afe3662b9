"""aepo's tree rollouts (ARPO, AEPO; docs/algorithms.md section 3) as a verl agent loop, "aepo_tree".

verl (0.9.1) runs one agent-loop *session* per sample. Its V1 trainer (the default, and the
one aepo's trainer modes extend) hands each prompt to one agent-loop worker
(`AgentLoopWorkerTQ`), which starts the prompt's n sessions (`rollout.n`, or `val_kwargs.n` in
validation), numbered by `session_id`, as asyncio tasks before any of them awaits. (The legacy
trainer instead repeats every prompt n times next to each other, all copies sharing the
prompt's `uid`, and splits the batch into `agent.num_workers` equal contiguous chunks.) aepo's
strategies need the k rows of a prompt to come from one coordinated tree, so:

- **Per-prompt coordinator.** Sessions join a group keyed by `uid` in their worker process. The
  first one (the leader) yields to the event loop until k sessions have joined (or none joined
  for `group_wait_s`), then runs the whole tree, `aepo.rollout.strategies.rollout` with one prompt
  and n = k, in a thread (the strategies are synchronous); every session then takes the row whose
  row_id is its arrival index. An error in the tree, a timeout (`tree_timeout_s`) or a cancelled
  leader reaches every session of the group as `TreeRolloutError`.
- **Split groups (legacy trainer only).** Under the V1 worker every group is whole, whatever n
  it gave the prompt (a batch's `__rollout_n__` too). Under the legacy trainer a group whose size
  is neither `rollout.n` nor `rollout.val_kwargs.n` means the prompt's sessions were split
  (chunks not aligned with groups: `data.train_batch_size` not divisible by `agent.num_workers`,
  or validation padding). That raises `GroupSizeError` in every session of it; `partial_groups:
  tree` instead rolls out a smaller tree from the sessions that arrived (then one `uid` holds
  rows of two trees, each with fewer branches).
- **Tree size.** A tree has one row per session verl started for the prompt: `rollout.n` in
  training, `rollout.val_kwargs.n` (often 1) in validation. Settings that must not exceed n
  (`initial_rollouts`) are clamped to it for that tree, with a warning logged once.
- **Sampler.** `ServerSampler` is aepo's `Sampler` over verl's `LLMServerClient.generate`: rows
  are token lists, and each `generate` call submits every row to the event loop at once
  (`run_coroutine_threadsafe`), so the rows of one turn are generated concurrently. All requests
  of a tree carry one `request_id`, so verl's router sends every branch to the same replica, whose
  prefix cache then serves the shared prefixes (under `full_determinism`, where vLLM sees the
  request id itself, each request gets its own id and seed instead, derived from the step, the
  prompt's dataset index and the request's place in the tree). Stop strings go to the
  server (vLLM / SGLang) and are applied again here, and each row's token budget is enforced here.
- **Faults.** A request that fails or does not answer within `request_timeout_s` is sent again
  up to `request_retries` times, after `retry_backoff_s` * 2**i; then the tree fails, every
  session of the prompt raises, verl marks the prompt failed and aepo's trainer mode drops it
  from the step (`aepo.integrations.verl.trainer`). The tools are built when the loop is
  constructed, so a Python sandbox this node cannot hold refuses there, with the fix.

**Branch entropy.** verl's server returns only the sampled token's log-prob, not the
distribution, so each token's entropy entry is its surprisal `-log p(token)`, whose expectation
under the sampler is the token entropy H_t. The probe (docs/algorithms.md section 1) is then the
length-rescaled mean surprisal of a segment's first n_probe tokens, on the same log|V| scale as
the exact H_seg: its expectation equals the exact value, but it is a one-sample estimate per
token (noisier; it is large when the sampled token was unlikely, not when the distribution was
flat), so dH, the branch decisions and AEPO's m are noisier than with the torch sampler. The
log-probs are those of verl's `rollout.logprobs_mode` (default `processed_logprobs`: after
temperature, and after top-p / top-k when those are on). The trainer still computes exact
entropies in its own forward pass.

**Configuration.** Keys come from `actor_rollout_ref.rollout.custom.aepo` (a mapping), then from
the agent-loop YAML entry (`actor_rollout_ref.rollout.agent.agent_loop_config_path`), which wins:

    - name: aepo_tree
      _target_: aepo.integrations.verl.agent_loop.AepoTreeAgentLoop
      strategy: aepo            # any rollout.* key of aepo (docs/algorithms.md), without "rollout."
      max_tool_calls: 6
      n_probe: 20
      tool_config: {enabled: [search, calc], search_cache: /data/search_cache.json}   # tools.* keys
      tree_timeout_s: 3600      # and the adapter's own keys (LoopSettings)

Unset keys keep aepo's defaults, except `max_response_tokens` (verl's
`rollout.response_length`, which it may not exceed) and the tools (calc and python, plus search
when a search backend is given). Sampling (temperature, top_p, top_k) is verl's, so those keys
are refused here; `n` is the number of sessions verl starts (`actor_rollout_ref.rollout.n`).
Select the loop with `actor_rollout_ref.rollout.agent.default_agent_loop=aepo_tree` (or an
`agent_name` column). Importing this module registers the loop when verl is installed; in Ray
worker processes use `+ray_kwargs.ray_init.runtime_env.worker_process_setup_hook=
aepo.integrations.verl.trainer.register`, which also registers aepo's losses, estimators and
trainer modes (`aepo.integrations.verl.main` checks the hook before Ray starts).

Each session's `AgentLoopOutput` carries the row's prompt, response, `response_mask` (0 on tool
results), the sampler's log-probs (0.0 on tool results) and, in `extra_fields`, `row_id`,
`parent_row_id`, `branch_position`, `m`, `decisions`, `finish_reason` and `n_tool_calls`, plus
what verl's own loops pass on from its LLM servers (`request_fields`), computed from the
requests that made the row's tokens (its own, and its ancestors' before its branch point):
`min_global_steps` / `max_global_steps` (the oldest / newest policy version among them; verl's
V1 trainer reads them as sample tags), `global_steps` and `num_cached_tokens` (the first
request's), `spec_num_*` (summed) and, in `metrics`, `num_preempted` (summed).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import json
import logging
import random
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from aepo.config import Config, apply_mapping, validate
from aepo.errors import ConfigError
from aepo.integrations.verl import _cfg_get
from aepo.integrations.verl.server_sampler import ServerSampler, TreeRolloutError, _Answer, request_fields
from aepo.rollout.config import RolloutConfig
from aepo.rollout.strategies import get_strategy
from aepo.tools import ToolRunner, ToolsConfig, build_tool_runner
from aepo.types import ToolCall, Trajectory

try:  # verl is optional: without it the module imports, and register() says what to install
    from verl.experimental.agent_loop.agent_loop import AgentLoopBase as _LoopBase
    from verl.experimental.agent_loop.agent_loop import AgentLoopMetrics, AgentLoopOutput
    from verl.experimental.agent_loop.agent_loop import register as _verl_register

    _VERL_ERROR: ImportError | None = None
except ImportError as _e:  # pragma: no cover - exercised in environments without verl
    _LoopBase = object  # type: ignore[assignment,misc]
    AgentLoopMetrics = AgentLoopOutput = _verl_register = None  # type: ignore[assignment,misc]
    _VERL_ERROR = _e

__all__ = [
    "AGENT_LOOP_NAME",
    "AepoTreeAgentLoop",
    "GroupSizeError",
    "LoopSettings",
    "ServerSampler",
    "TreeRolloutError",
    "check_tools",
    "loop_settings",
    "register",
    "request_fields",
    "row_fields",
    "tree_config",
]

AGENT_LOOP_NAME = "aepo_tree"
logger = logging.getLogger(__name__)

_INSTALL_HINT = ("aepo.integrations.verl.agent_loop needs verl, which cannot be imported: `pip install aepo[verl]` "
                 "(docs/verl.md), then register() again")
# rollout.* keys that belong to the sampling engine, which is verl's here -> where to set them
_SAMPLER_KEYS = {
    "backend": "actor_rollout_ref.rollout.name",
    "temperature": "actor_rollout_ref.rollout.temperature",
    "top_p": "actor_rollout_ref.rollout.top_p",
    "top_k": "actor_rollout_ref.rollout.top_k",
    "entropy_top_k": "nothing: verl's server returns only the sampled token's log-prob",
    "engine_options": "actor_rollout_ref.rollout.* (verl's engine settings)",
    "decode_graphs": "actor_rollout_ref.rollout.enforce_eager",
    "pause_below": "nothing: verl's server schedules requests itself",
}
_SPIN_PASSES = 8  # event-loop passes a leader yields before it starts polling on a timer


class GroupSizeError(TreeRolloutError):
    """A prompt's sessions did not all reach one agent-loop worker (see the module docstring)."""


# ----------------------------------------------------------------------------- settings


@dataclass
class LoopSettings:
    """What one "aepo_tree" loop runs with: aepo's rollout and tools settings, and the adapter's."""

    rollout: RolloutConfig
    tools: ToolsConfig
    seed: int = 0  # seeds the branch rule's draws (rollout.branch_decision released | sample)
    group_wait_s: float = 1.0  # how long a leader waits after the last arrival when < n sessions came
    tree_timeout_s: float = 3600.0  # a tree (all its turns and tools) must finish within this
    request_timeout_s: float = 600.0  # one attempt of one request (a row's turn)
    request_retries: int = 2  # a failed or timed-out request is sent again this many times
    retry_backoff_s: float = 1.0  # before retry i (0-based) wait retry_backoff_s * 2**i
    # read by aepo's trainer modes, not the loop (aepo.integrations.verl.trainer): the step stops
    # when fewer than this fraction of its prompts' trees survived (failed trees are dropped)
    min_tree_fraction: float = 0.5
    # alpha_H of the aepo_entropy advantage (docs/algorithms.md section 4); None: aepo's default
    entropy_alpha: float | None = None
    partial_groups: Literal["error", "tree"] = "error"  # a group of unexpected size: raise, or roll it out
    server_stop: Literal["auto", "vllm", "sglang", "none"] = "auto"  # how stop strings reach the server
    eos_token_ids: list[int] = field(default_factory=list)  # ends a row besides tokenizer.eos_token_id
    val_n: int = 1  # sessions per prompt in validation (verl's rollout.val_kwargs.n)


_ADAPTER_KEYS = tuple(f.name for f in dataclasses.fields(LoopSettings) if f.name not in ("rollout", "tools", "val_n"))


def _plain(value: Any) -> Any:
    """omegaconf containers (what hydra hands the loop) -> plain dicts and lists."""
    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(value):
            return OmegaConf.to_container(value, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf comes with verl
        pass
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def loop_settings(options: Mapping[str, Any], trainer_config: Any) -> LoopSettings:
    """Settings from `actor_rollout_ref.rollout.custom.aepo` and the agent-loop `options` (which win),
    over aepo's defaults and verl's `response_length` / `n` / `val_kwargs.n` (module docstring).
    ConfigError names a wrong key or value and where to set it instead."""
    verl_rollout = _cfg_get(trainer_config, "actor_rollout_ref.rollout")
    custom = _plain(_cfg_get(verl_rollout, "custom.aepo", {}))
    if not isinstance(custom, Mapping):
        raise ConfigError(f"actor_rollout_ref.rollout.custom.aepo must be a mapping of aepo_tree keys, got {custom!r}")
    merged = {**custom, **_plain(dict(options))}
    merged.pop("name", None)  # the YAML entry's own name, handed over by hydra
    n = int(_cfg_get(verl_rollout, "n", 1))
    response_length = _cfg_get(verl_rollout, "response_length")

    rollout_keys = {f.name for f in dataclasses.fields(RolloutConfig)}
    for key in merged:
        if key in _SAMPLER_KEYS:
            raise ConfigError(f"aepo_tree: {key!r} is the sampling engine's, which is verl's here; set {_SAMPLER_KEYS[key]}")
        if key not in rollout_keys and key not in _ADAPTER_KEYS and key != "tool_config":
            valid = sorted((rollout_keys - set(_SAMPLER_KEYS)) | set(_ADAPTER_KEYS) | {"tool_config"})
            raise ConfigError(f"aepo_tree: unknown key {key!r}; valid keys: {', '.join(valid)}")
    if "n" in merged and int(merged["n"]) != n:
        raise ConfigError(f"aepo_tree: n={merged['n']} but verl starts actor_rollout_ref.rollout.n={n} sessions per "
                          "prompt and the tree has one row per session; set actor_rollout_ref.rollout.n instead")
    tool_opts = merged.pop("tool_config", None) or {}
    if not isinstance(tool_opts, Mapping):
        raise ConfigError(f"aepo_tree: tool_config must be a mapping of tools.* keys, got {tool_opts!r}")

    cfg = Config()
    cfg.rollout.n = n
    if response_length:
        cfg.rollout.max_response_tokens = int(response_length)
    tool_opts = dict(tool_opts)
    if "enabled" not in tool_opts:
        search = any(tool_opts.get(k) for k in ("search_cache", "search_corpus", "search_url"))
        tool_opts["enabled"] = (["search"] if search else []) + ["calc", "python"]
    settings = LoopSettings(rollout=cfg.rollout, tools=cfg.tools, val_n=int(_cfg_get(verl_rollout, "val_kwargs.n", 1)))
    try:
        apply_mapping(cfg.rollout, {k: v for k, v in merged.items() if k in rollout_keys}, "")
        apply_mapping(cfg.tools, tool_opts, "tool_config.")
        apply_mapping(settings, {k: v for k, v in merged.items() if k in _ADAPTER_KEYS}, "")
        validate(cfg)
    except ConfigError as e:
        raise ConfigError(f"aepo_tree agent loop: {e} (keys go in the agent-loop YAML entry or "
                          "actor_rollout_ref.rollout.custom.aepo, without the 'rollout.' prefix)") from None
    if cfg.rollout.tool_format != "tags":
        raise ConfigError(f"aepo_tree: tool_format={cfg.rollout.tool_format!r}: verl renders the prompt from the parquet's "
                          "messages, which `aepo data to-verl` writes for the tags format; only tool_format=tags runs "
                          "in verl so far")
    if response_length and cfg.rollout.max_response_tokens > int(response_length):
        raise ConfigError(f"aepo_tree: max_response_tokens={cfg.rollout.max_response_tokens} exceeds verl's "
                          f"actor_rollout_ref.rollout.response_length={response_length}; lower it or raise that")
    for key in ("tree_timeout_s", "request_timeout_s"):
        if not getattr(settings, key) > 0:
            raise ConfigError(f"aepo_tree: {key} must be > 0 seconds, got {getattr(settings, key)!r}")
    for key in ("group_wait_s", "retry_backoff_s", "request_retries"):
        if getattr(settings, key) < 0:
            raise ConfigError(f"aepo_tree: {key} must be >= 0, got {getattr(settings, key)!r}")
    if not 0.0 <= settings.min_tree_fraction <= 1.0:
        raise ConfigError(f"aepo_tree: min_tree_fraction must be in [0, 1], got {settings.min_tree_fraction!r}")
    return settings



# ----------------------------------------------------------------------------- per-prompt groups


@dataclass
class _TreeResult:
    trajectories: list[Trajectory]
    generate_seconds: float
    tool_seconds: float
    answers: list[list[_Answer]]  # per row: the requests that made its tokens


@dataclass
class _Group:
    """The sessions of one prompt in one worker's event loop."""

    key: tuple[int, str]
    result: asyncio.Future
    size: int = 1
    open: bool = True


_GROUPS: dict[tuple[int, str], _Group] = {}  # only touched from the event loop that owns the group


def _join(uid: str, loop: asyncio.AbstractEventLoop) -> tuple[_Group, int]:
    """The open group of `uid` in `loop` and this session's index in it (0: the leader)."""
    key = (id(loop), uid)
    group = _GROUPS.get(key)
    if group is None or not group.open:
        group = _Group(key=key, result=loop.create_future())
        _GROUPS[key] = group
        return group, 0
    group.size += 1
    return group, group.size - 1


async def _settle(group: _Group, expected: int, wait_s: float) -> None:
    """Let the prompt's other sessions join: until `expected` have, or none joined for `wait_s`
    (after a few bare event-loop passes, in which verl's already-started tasks all arrive)."""
    loop = asyncio.get_running_loop()
    last_size, last_change, passes = group.size, loop.time(), 0
    while group.size < expected:
        await asyncio.sleep(0 if passes < _SPIN_PASSES else min(0.005, wait_s))
        passes += 1
        if group.size != last_size:
            last_size, last_change = group.size, loop.time()
        elif passes >= _SPIN_PASSES and loop.time() - last_change >= wait_s:
            break
    group.open = False
    if _GROUPS.get(group.key) is group:
        del _GROUPS[group.key]


def _fail(group: _Group, error: BaseException) -> None:
    """Close the group and hand `error` to every session of it."""
    group.open = False
    if _GROUPS.get(group.key) is group:
        del _GROUPS[group.key]
    if not group.result.done():
        group.result.set_exception(error)
        group.result.exception()  # retrieved: a group without followers logs nothing at exit


# ----------------------------------------------------------------------------- tools and output

_RUNNERS: dict[str, ToolRunner] = {}
_RUNNERS_LOCK = threading.Lock()
_EXECUTOR: concurrent.futures.ThreadPoolExecutor | None = None


def _tool_runner(tools: ToolsConfig) -> ToolRunner:
    """One ToolRunner per tools config and process (a BM25 index is built once, not per session)."""
    key = json.dumps(dataclasses.asdict(tools), sort_keys=True, default=str)
    with _RUNNERS_LOCK:
        if key not in _RUNNERS:
            _RUNNERS[key] = build_tool_runner(tools)
        return _RUNNERS[key]


def check_tools(tools: ToolsConfig) -> None:
    """Build the loop's tools in this process now (the Python sandbox probes this node's
    isolation); ConfigError says where in verl's config to change them."""
    try:
        _tool_runner(tools)
    except ConfigError as e:
        raise ConfigError(f"aepo_tree's tools (actor_rollout_ref.rollout.custom.aepo.tool_config, which takes "
                          f"aepo's tools.* keys): {e}") from None


def _tree_executor() -> concurrent.futures.ThreadPoolExecutor:
    """Threads for the trees, apart from the loop's default executor (verl tokenises there, and a
    worker's trees could otherwise fill it)."""
    global _EXECUTOR
    if _EXECUTOR is None:
        _EXECUTOR = concurrent.futures.ThreadPoolExecutor(max_workers=512, thread_name_prefix="aepo-tree")
    return _EXECUTOR


class _TimedTools:
    """A tool_fn that sums the wall time of its calls."""

    def __init__(self, fn: Callable[[list[tuple[str, str]]], list[ToolCall]]) -> None:
        self.fn, self.seconds = fn, 0.0

    def __call__(self, calls: list[tuple[str, str]]) -> list[ToolCall]:
        start = time.monotonic()
        try:
            return self.fn(calls)
        finally:
            self.seconds += time.monotonic() - start


def row_fields(traj: Trajectory) -> dict[str, Any]:
    """The row's tree bookkeeping for verl's `extra_fields` (plus tool_agent's schema keys)."""
    return {
        "row_id": traj.row_id, "parent_row_id": traj.parent_row_id, "branch_position": traj.branch_position,
        "m": traj.m, "decisions": [dict(d) for d in traj.decisions], "finish_reason": traj.finish_reason,
        "n_tool_calls": traj.n_tool_calls, "turn_scores": [], "tool_rewards": [],
    }


_CLAMP_WARNED: set[tuple[str, int, int]] = set()


def tree_config(rollout_cfg: RolloutConfig, size: int) -> RolloutConfig:
    """The rollout settings of a tree of `size` rows: n = the sessions verl started for the prompt
    (rollout.n in training, val_kwargs.n in validation, or a batch's __rollout_n__), and the
    settings that must not exceed n (initial_rollouts) clamped to it, with a warning logged once
    per setting, value and size."""
    changes: dict[str, Any] = {"n": size}
    if rollout_cfg.initial_rollouts > size:
        changes["initial_rollouts"] = size
        key = ("initial_rollouts", rollout_cfg.initial_rollouts, size)
        if key not in _CLAMP_WARNED:
            _CLAMP_WARNED.add(key)
            logger.warning("aepo_tree: verl started %d session(s) for a prompt (validation's val_kwargs.n, or a "
                           "per-prompt n), fewer than initial_rollouts=%d; such trees use initial_rollouts=%d "
                           "(logged once)", size, rollout_cfg.initial_rollouts, size)
    return dataclasses.replace(rollout_cfg, **changes)


_DETERMINISTIC_IDS: dict[str, int] = {}


def _deterministic_tree_id(kwargs: Mapping[str, Any]) -> str:
    """A tree's request id under verl's `full_determinism`, from what is the same in every run
    (verl's uids are random): the step, the prompt's dataset index, and how many trees of that
    (step, index) this process started before, so two trees never share an id or a seed."""
    base = f"aepo-det-{kwargs.get('global_steps', 0)}-{kwargs.get('index', 'x')}"
    count = _DETERMINISTIC_IDS.get(base, 0)
    _DETERMINISTIC_IDS[base] = count + 1
    return f"{base}-{count}"


# ----------------------------------------------------------------------------- the agent loop


class AepoTreeAgentLoop(_LoopBase):  # type: ignore[misc,valid-type]
    """verl agent loop "aepo_tree": each session returns one row of its prompt's ARPO / AEPO tree."""

    def __init__(self, trainer_config: Any, server_manager: Any, tokenizer: Any, processor: Any, dataset_cls: Any,
                 data_config: Any, hf_model_type: str | None = None, tools: Any = None, name: str | None = None,
                 **options: Any) -> None:
        if _VERL_ERROR is not None:
            raise ImportError(f"{_INSTALL_HINT} ({_VERL_ERROR})")
        super().__init__(trainer_config, server_manager, tokenizer, processor, dataset_cls, data_config,
                         hf_model_type=hf_model_type)
        del tools, name  # verl's own tool list (aepo runs its own tools) and the YAML entry's name
        self.settings = loop_settings(options, self.config)
        check_tools(self.settings.tools)  # built once per process: a sandbox that cannot hold refuses here

    async def run(self, sampling_params: dict[str, Any], **kwargs: Any) -> Any:
        if "uid" not in kwargs:
            raise TreeRolloutError("aepo_tree groups a prompt's sessions by the batch's 'uid' column, which verl's "
                                   "trainer adds; this batch has none (add one id per prompt, repeated n times)")
        uid = str(kwargs["uid"])
        group, index = _join(uid, asyncio.get_running_loop())
        if index == 0:
            try:
                await self._lead(group, uid, sampling_params, kwargs)
            except asyncio.CancelledError:
                _fail(group, TreeRolloutError(f"the session running the tree of prompt uid={uid} was cancelled"))
                raise
            except BaseException as e:  # every session of the prompt gets it
                _fail(group, e if isinstance(e, TreeRolloutError)
                      else TreeRolloutError(f"the tree of prompt uid={uid} failed: {type(e).__name__}: {e}"))
                if not isinstance(e, Exception):
                    raise
        limit = self.settings.tree_timeout_s + self.settings.group_wait_s + 60.0  # the leader times out first
        done, _ = await asyncio.wait({group.result}, timeout=limit)
        if not done:
            raise TreeRolloutError(f"session {index} of prompt uid={uid} waited {limit:g}s for its tree")
        error = group.result.exception()
        if error is not None:
            raise type(error)(str(error)) from error  # a fresh exception (and traceback) per session
        result: _TreeResult = group.result.result()
        traj = result.trajectories[index]
        versions, num_preempted = request_fields(result.answers[index])
        metrics = AgentLoopMetrics(generate_sequences=result.generate_seconds, tool_calls=result.tool_seconds,
                                   num_preempted=num_preempted)
        return AgentLoopOutput(
            prompt_ids=list(traj.prompt_ids), response_ids=list(traj.response_ids),
            response_mask=list(traj.response_mask), response_logprobs=list(traj.logprobs),
            num_turns=1 + len(traj.segments),  # the user turn, then every model and tool segment
            metrics=metrics, extra_fields={**versions, **row_fields(traj)},
        )

    def _check_group_size(self, size: int, uid: str, whole: bool) -> None:
        n, val_n = self.settings.rollout.n, self.settings.val_n
        if whole or size in (n, val_n):
            return
        workers = _cfg_get(self.config, "actor_rollout_ref.rollout.agent.num_workers")
        batch = _cfg_get(self.config, "data.train_batch_size")
        message = (f"{size} session(s) of prompt uid={uid} reached this agent-loop worker, expected "
                   f"actor_rollout_ref.rollout.n={n} (or val_kwargs.n={val_n} in validation): verl split the "
                   f"prompt's sessions over workers. verl cuts a batch into agent.num_workers={workers} equal "
                   f"chunks, so keep data.train_batch_size ({batch}) and the validation batch a multiple of it, "
                   "or set partial_groups: tree in the aepo_tree config to roll out a smaller tree per part")
        if self.settings.partial_groups == "tree":
            logger.warning("aepo_tree: %s; rolling out a tree of %d rows", message.split(":")[0], size)
            return
        raise GroupSizeError(message)

    async def _lead(self, group: _Group, uid: str, sampling_params: dict[str, Any], kwargs: dict[str, Any]) -> None:
        s = self.settings
        await _settle(group, s.rollout.n, s.group_wait_s)
        # verl's V1 worker (sessions numbered by session_id) starts all of a prompt's sessions in
        # one worker, so its group is whole whatever n it gave (rollout.n, val_kwargs.n, __rollout_n__)
        self._check_group_size(group.size, uid, whole="session_id" in kwargs)
        prompt_ids = await self.ct_build_initial_tokens(list(kwargs["raw_prompt"]))
        loop = asyncio.get_running_loop()
        priority = int(kwargs.get("priority", 0))
        deterministic = bool(_cfg_get(self.rollout_config, "full_determinism", False))
        tree_id = _deterministic_tree_id(kwargs) if deterministic else f"aepo-{uuid.uuid4().hex}"
        style = s.server_stop
        if style == "auto":
            name = str(_cfg_get(self.rollout_config, "name", ""))
            style = name if name in ("vllm", "sglang") else "none"
        sampler = ServerSampler(self.server_manager, loop, self.tokenizer, sampling_params, request_id=tree_id,
                                stop_style=style, eos_token_ids=s.eos_token_ids, timeout_s=s.request_timeout_s,
                                priority=priority, deterministic=deterministic, retries=s.request_retries,
                                backoff_s=s.retry_backoff_s)
        cfg = tree_config(s.rollout, group.size)

        def run_tree() -> _TreeResult:
            tools = _TimedTools(_tool_runner(s.tools).run)
            rng = random.Random(f"{s.seed}:{tree_id}")
            strategy = get_strategy(cfg.strategy)(sampler, self.tokenizer, tools, cfg, rng)
            trajectories, _ = strategy.run([(uid, prompt_ids)])
            states = [state for g in strategy.groups for state in g.rows]  # in the trajectories' order
            if len(states) != len(trajectories) or any(a.traj is not b for a, b in zip(states, trajectories)):
                raise TreeRolloutError("the rollout strategy's rows do not match its trajectories")
            answers = [sampler.row_answers(state.row) for state in states]
            return _TreeResult(trajectories, sampler.seconds, tools.seconds, answers)

        tree = loop.run_in_executor(_tree_executor(), run_tree)
        try:
            done, _ = await asyncio.wait({tree}, timeout=s.tree_timeout_s)  # the tree's own errors stay apart
        finally:
            sampler.cancel()  # a thread still running stops at its next generate call
        if not done:
            raise TreeRolloutError(f"the tree of prompt uid={uid} did not finish within tree_timeout_s="
                                   f"{s.tree_timeout_s:g}s; raise it in the aepo_tree config")
        result = tree.result()
        if not group.result.done():
            group.result.set_result(result)


def register(*, losses: bool = True) -> str:
    """Register the loop in verl's agent-loop registry as "aepo_tree" (idempotent) and, with
    `losses`, aepo's policy losses and advantage estimators (`aepo.integrations.verl.register`), so
    one Ray `worker_process_setup_hook` covers both. Returns the loop's name; ImportError with an
    install hint without verl."""
    if _VERL_ERROR is not None:
        raise ImportError(f"{_INSTALL_HINT} ({_VERL_ERROR})")
    _verl_register(AGENT_LOOP_NAME)(AepoTreeAgentLoop)
    if losses:
        from aepo.integrations.verl import register as register_losses

        register_losses()
    return AGENT_LOOP_NAME


if _VERL_ERROR is None:
    _verl_register(AGENT_LOOP_NAME)(AepoTreeAgentLoop)
