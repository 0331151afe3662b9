"""The vLLM backend: an in-process engine, built once per run, behind the `Sampler` protocol.

Like TRL's colocate mode, the engine lives in the trainer's process (vLLM's V1 engine with
`VLLM_ENABLE_V1_MULTIPROCESSING=0`), so a weight sync is a tensor copy, not a transfer:

- rows are token-id lists kept here; `generate` submits each row's whole token list as a
  token-id prompt (through `aepo.rollout.sampler.vllm_batch`, which also gives the continuous
  scheduler a running batch whose rows are submitted as they become ready). A fork, or a row
  continued after a tool result, re-submits tokens the engine has seen, and vLLM's automatic
  prefix caching serves them from its KV cache; the hit rate is reported per step
  (`rollout/prefix_cache_hit_rate`);
- each request has its own seed, derived from (sampler seed, call, row): the sampler seed
  already holds (run seed, step), so a resumed run samples what the uninterrupted one did;
- the engine returns the top-k log-probs of the processed distribution (after temperature,
  and after top-k/top-p when those are on); the probe entropy is estimated from them with
  `aepo.algos.entropy.topk_entropy`, which estimates the missing tail (docs/algorithms.md
  section 1 gives the estimate and its measured error);
- the engine stops a request at EOS and at its budget; stop strings are matched here on the
  token ids as they arrive (`aepo.rollout.sampler.stops`, as the torch sampler does), and a
  matched request is aborted, so the engine detokenizes nothing (decoding the top-k log-prob
  entries' text per token cost more host time than the forward); finish reasons map to eos /
  stop (the stop string in `Generation.stop`) / length.

`sync` loads the trainer's weights into the engine's model and then resets the prefix cache,
so no KV computed with old weights is reused. For a LoRA run (`actor.lora.rank` > 0) the engine
is built with vLLM's LoRA support on the base model, and `sync` sends only the adapter: it is
saved (a few MB) and served as a new `LoRARequest` (a new id, so vLLM loads it rather than
reusing its cached copy), the previous one removed. An adapter directory given to `aepo eval` or
`aepo rollout` is served the same way over its base model. `probe_logprobs` scores a fixed
sequence (vLLM's prompt log-probs) for the trainer's per-step sync check
(`aepo.rollout.sampler.sync_check`). The log-probs the engine returns are never
trained on: the trainer re-scores pi_old with its own forward pass for this backend and logs
the gap as `actor/rollout_logprob_diff`; the entropy-aware advantage also comes from the
trainer's forward pass.
"""
from __future__ import annotations

import gc
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from aepo.algos.entropy import topk_entropy
from aepo.models.lora import ADAPTER_CONFIG, adapter_base, is_adapter_dir, is_peft_model
from aepo.rollout.config import RolloutConfig
from aepo.rollout.sampler.rows import RowTable
from aepo.rollout.sampler.vllm_batch import EngineBatch
from aepo.types import Generation

__all__ = ["VLLMBackend", "VLLMSampler", "vllm_missing_message"]

INSTALL_HINT = ("install the vllm extra into the environment: AEPO_EXTRAS=vllm python3 quickstart.py test "
                "(docs/gpu.md, 'vLLM backend')")


def vllm_missing_message(error: BaseException) -> str:
    return (f"rollout.backend=vllm needs vLLM, which cannot be imported ({type(error).__name__}: {error}); "
            f"{INSTALL_HINT}")


def _saved_config(model_dir: str | Path) -> dict:
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


class _QuietRotaryReload(logging.Filter):
    """vLLM's layerwise reload warns "RotaryEmbedding: Failed to load weights" at every sync: the
    rotary cache is a computed buffer no checkpoint holds, and it is restored as it was."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.msg == "%s: Failed to load weights" and record.args == ("RotaryEmbedding",))


_QUIET_ROTARY_RELOAD = _QuietRotaryReload()  # one instance: addFilter skips one already there


VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The `max_lora_rank` values vLLM accepts."""


def vllm_lora_rank(rank: int) -> int:
    """The smallest `max_lora_rank` vLLM accepts that holds an adapter of `rank`."""
    for r in VLLM_LORA_RANKS:
        if r >= rank:
            return r
    raise ValueError(f"actor.lora.rank={rank} is above vLLM's largest max_lora_rank ({VLLM_LORA_RANKS[-1]})")


def request_seed(seed: int, call: int, row: int) -> int:
    digest = hashlib.blake2b(f"{seed}:{call}:{row}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % (2**31 - 1)


class VLLMBackend:
    """One in-process vLLM engine for a run; hands out `VLLMSampler`s (see the module docstring).

    Engine keywords come from `rollout.engine_options` over these defaults: prefix caching on,
    log-probs of the processed distribution, `max_logprobs = rollout.entropy_top_k`, eager mode
    (no compile or CUDA-graph capture at start), the trainer's dtype, and on a GPU
    `gpu_memory_utilization` 0.4 so the trainer keeps room. On a CPU build,
    `VLLM_CPU_KVCACHE_SPACE` (GiB) defaults to 1."""

    name = "vllm"

    def __init__(self, model_dir: str | Path, cfg: RolloutConfig, *, dtype: str | None = None,
                 lora_rank: int = 0) -> None:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process: syncs are copies
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # its per-request INFO lines drown the run's
        try:
            import vllm
        except Exception as e:  # noqa: BLE001 - any import failure (missing, broken torchvision, ...)
            raise RuntimeError(vllm_missing_message(e)) from None
        self._vllm = vllm
        from vllm.sampling_params import RequestOutputKind

        self.delta_outputs = RequestOutputKind.DELTA  # a request's outputs: each step's new tokens
        logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").addFilter(_QUIET_ROTARY_RELOAD)
        self.cfg = cfg
        self.lora_request: Any = None
        self._adapter_dirs: list[str] = []
        adapter = None
        if is_adapter_dir(model_dir):  # serve a saved adapter over its base model
            adapter, model_dir = Path(model_dir), adapter_base(model_dir)
            lora_rank = int(json.loads((adapter / ADAPTER_CONFIG).read_text(encoding="utf-8")).get("r") or 8)
        saved = _saved_config(model_dir)
        options: dict[str, Any] = {
            "enable_prefix_caching": True,
            "logprobs_mode": "processed_logprobs",
            "max_logprobs": cfg.entropy_top_k,
            "enforce_eager": True,
            "seed": 0,
            # the trainer's precision (else the directory's): vLLM's "auto" turns float32 into
            # bfloat16 on a CPU, and the sampler would then not sample from the policy it trains
            "dtype": dtype or saved.get("dtype") or saved.get("torch_dtype") or "auto",
        }
        if torch.cuda.is_available():
            options["gpu_memory_utilization"] = 0.4
        else:
            options["block_size"] = 32  # the CPU backend's default (128) rarely hits on short prompts
            # whole prompts only: a CPU build cannot rewind a seeded request's generator after a
            # partial (chunked) prefill, which fails a large batch of seeded requests
            options["enable_chunked_prefill"] = False
            options["max_num_batched_tokens"] = max(8192, int(saved.get("max_position_embeddings") or 0))
        if lora_rank > 0:
            options.update(enable_lora=True, max_loras=1, max_lora_rank=vllm_lora_rank(lora_rank))
        options.update(cfg.engine_options)
        self.llm = vllm.LLM(model=str(model_dir), tokenizer=str(model_dir), **options)
        if adapter is not None:
            self.lora_request = self._lora_request(str(adapter), 1)
        self.tokenizer = self.llm.get_tokenizer()  # for the stop strings (`EngineBatch`)
        self.vocab_size = int(self.llm.llm_engine.model_config.get_vocab_size())
        self.max_model_len = int(self.llm.llm_engine.model_config.max_model_len)
        self._prompt_tokens = 0
        self._cached_tokens = 0
        self.syncs = 0

    def sampler(self, seed: int) -> VLLMSampler:
        return VLLMSampler(self, seed)

    def _lora_request(self, path: str, lora_id: int) -> Any:
        from vllm.lora.request import LoRARequest

        return LoRARequest(f"aepo-adapter-{lora_id}", lora_id, path)

    def sync(self, model: torch.nn.Module) -> None:
        """Copy `model`'s weights (a LoRA-wrapped model: only its adapter) into the engine, then
        drop the prefix cache (its KV is stale)."""
        if is_peft_model(model):
            self._sync_adapter(model)
            return
        weights = [(name, p.detach()) for name, p in model.state_dict().items()]
        # vLLM's in-place reload: restores the layers' checkpoint layout, loads, and re-runs the
        # post-load processing (a CPU build repacks linear weights for oneDNN, so a plain
        # `load_weights` into the processed model would not reach them)
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights),
                                                           "is_checkpoint_format": True})
        self.llm.reset_prefix_cache()
        self.syncs += 1

    def _sync_adapter(self, model: torch.nn.Module) -> None:
        """Adapter-only update: save the adapter, serve it under a new id, drop the old one."""
        old = self.lora_request
        path = tempfile.mkdtemp(prefix="aepo-adapter-")
        model.save_pretrained(path)  # adapter_config.json + adapter_model.safetensors only
        self.syncs += 1
        self.lora_request = self._lora_request(path, self.syncs)
        if old is not None:
            try:
                self.llm.llm_engine.remove_lora(old.lora_int_id)
            except Exception as e:  # noqa: BLE001 - an engine without removal keeps it in its LRU cache
                logging.getLogger(__name__).debug("vLLM kept adapter %s: %s", old.lora_int_id, e)
        for stale in self._adapter_dirs:
            shutil.rmtree(stale, ignore_errors=True)
        self._adapter_dirs = [path]
        self.llm.reset_prefix_cache()

    def probe_logprobs(self, ids: list[int]) -> list[float]:
        """The engine's log-probs of `ids[1:]` (prompt log-probs, temperature 1, no top-k/top-p)."""
        from vllm.inputs import TokensPrompt

        params = self._vllm.SamplingParams(temperature=1.0, max_tokens=1, prompt_logprobs=0, seed=0)
        out = self.llm.generate([TokensPrompt(prompt_token_ids=list(ids))], params, use_tqdm=False,
                                lora_request=self.lora_request)[0]
        found = []
        for token, top in zip(ids[1:], (out.prompt_logprobs or [None])[1:]):
            entry = (top or {}).get(int(token))
            found.append(float(entry.logprob) if entry is not None else float("-inf"))
        return found

    def stats(self) -> dict[str, float]:
        """The prefix-cache hit rate (cached / submitted prompt tokens) since the last call."""
        out = {}
        if self._prompt_tokens:
            out = {"prefix_cache_hit_rate": self._cached_tokens / self._prompt_tokens,
                   "prefix_cache_tokens": float(self._cached_tokens)}
        self._prompt_tokens = self._cached_tokens = 0
        return out

    def close(self) -> None:
        for stale in getattr(self, "_adapter_dirs", []):
            shutil.rmtree(stale, ignore_errors=True)
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            shutdown = getattr(llm.llm_engine, "shutdown", None)
            if callable(shutdown):
                shutdown()
            del llm
            gc.collect()


class VLLMSampler(RowTable):
    """`aepo.types.Sampler` over a `VLLMBackend`: rows are token lists, the engine's prefix cache
    is the shared KV (see the module docstring)."""

    def __init__(self, backend: VLLMBackend, seed: int) -> None:
        super().__init__(backend.vocab_size)
        self.backend = backend
        self.seed = int(seed)
        self._calls = 0
        c = backend.cfg
        self.temperature, self.top_p, self.top_k = float(c.temperature), float(c.top_p), int(c.top_k)
        self.batch: EngineBatch | None = None
        self.steps = 0  # engine steps of `generate` calls (a running batch counts its own)
        self.row_steps = 0  # tokens they returned

    can_step = True  # `open_batch`: the continuous scheduler submits rows as they are ready

    def open_batch(self, stop: Sequence[str] = (), max_rows: int = 256) -> EngineBatch:
        """The sampler's running batch on the engine (`EngineBatch`): rows join with
        `start(row, budget, key)` as requests and advance with `step()`. One per sampler."""
        if self.batch is not None:
            raise ValueError("this sampler already has a running batch")
        self.batch = EngineBatch(self, stop, max_rows)
        return self.batch

    def close_batch(self) -> None:
        """End the running batch, aborting any request still in the engine."""
        if self.batch is not None:
            self.batch.close()
        self.batch = None

    def release(self, row: int) -> None:
        """Free a row (and abort its request in a running batch); the handle is invalid afterwards."""
        if self.batch is not None:
            self.batch.drop(row)
        super().release(row)

    def _params(self, budget: int, seed: int) -> Any:
        """A request's sampling parameters. The engine detokenizes nothing: decoding the text of
        every token's top-k log-prob entries cost more host time than the engine's forward on
        the demo (`EngineBatch` matches the stop strings on token ids itself)."""
        return self.backend._vllm.SamplingParams(
            temperature=self.temperature, top_p=self.top_p, top_k=self.top_k if self.top_k > 0 else -1,
            max_tokens=budget, seed=seed, logprobs=self.backend.cfg.entropy_top_k, flat_logprobs=True,
            detokenize=False,
        )

    def generate(
        self, rows: Sequence[int], max_new_tokens: int | Sequence[int], stop: Sequence[str] = ()
    ) -> list[Generation]:
        """Continue each row until a stop string, EOS or its token budget; one Generation per row
        (one request per row, all submitted at once; the engine batches them)."""
        handles, budgets = self._budgets(rows, max_new_tokens)
        call = self._calls
        self._calls += 1
        batch = EngineBatch(self, stop, max_rows=max(1, len(handles)))
        done: dict[int, Generation] = {}
        try:
            for handle, budget in zip(handles, budgets):
                batch.start(handle, budget, seed=request_seed(self.seed, call, handle))
            while batch.active:
                done.update(batch.step())
        finally:
            batch.close()
        self.steps += batch.steps
        self.row_steps += batch.row_steps
        return [done[h] for h in handles]

    def _top_rows(self, tokens: list[int], tops: Any) -> tuple[list[float], list[list[float]]]:
        """Each token's log-prob, and its top-k log-probs (with the sampled token's when it is
        not among them) for `_entropies`. `tops`: the engine's flat log-probs (`FlatLogprobs`,
        as `_params` asks): per token the sampled token first, then the top k."""
        k1 = self.backend.cfg.entropy_top_k + 1
        logprobs, rows = [], []
        ids, values = tops.token_ids, tops.logprobs
        for a, b in zip(tops.start_indices, tops.end_indices):
            logprobs.append(values[a])
            rows.append([values[a]] + [values[j] for j in range(a + 1, b) if ids[j] != ids[a]][:k1 - 1])
        logprobs += [0.0] * (len(tokens) - len(logprobs))
        rows += [[]] * (len(tokens) - len(rows))
        return logprobs, rows

    def _entropies(self, rows: list[list[float]]) -> list[float]:
        """The entropies of `_top_rows`' distributions, estimated in one call (docs/algorithms.md
        section 1)."""
        if not rows:
            return []
        k1 = self.backend.cfg.entropy_top_k + 1
        table = torch.tensor([r + [-math.inf] * (k1 - len(r)) for r in rows])
        return topk_entropy(table, self.vocab_size, k1 - 1).tolist()

    @staticmethod
    def _finish_reason(c: Any) -> tuple[str, str | None]:
        """(finish, stop string) of a finished request's completion `c`."""
        if c.finish_reason not in ("stop", "length"):
            raise RuntimeError(f"vLLM ended a request with finish reason {c.finish_reason!r} "
                               f"(stop reason {c.stop_reason!r}); see the engine's log above")
        if c.finish_reason == "length":
            return ("length", None)
        if isinstance(c.stop_reason, str):
            return ("stop", c.stop_reason)
        return ("eos", None)
