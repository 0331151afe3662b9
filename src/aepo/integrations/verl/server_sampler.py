"""`ServerSampler`: aepo's `Sampler` over verl's LLM servers (`LLMServerClient.generate`), for the
`aepo_tree` agent loop (`aepo.integrations.verl.agent_loop`, whose docstring describes it), and
`request_fields`, what verl's own loops pass on from the servers' answers."""
from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from aepo.rollout.sampler.rows import RowTable
from aepo.types import Generation

__all__ = ["ServerSampler", "TreeRolloutError", "request_fields"]

logger = logging.getLogger("aepo.integrations.verl.agent_loop")  # the loop's log, where users look


class TreeRolloutError(RuntimeError):
    """The tree of a prompt failed; raised in every session of the prompt."""


_SPEC_DECODE_KEYS = ("spec_num_draft_tokens", "spec_num_accepted_tokens", "spec_num_verify_steps")


@dataclass(frozen=True)
class _Answer:
    """What verl stamped on one answered request: `TokenOutput.extra_fields` (the server's
    global_steps, num_cached_tokens, spec_num_*; the client's min/max_global_steps) and
    `TokenOutput.num_preempted`."""

    extra: dict[str, Any]
    num_preempted: int | None

    @classmethod
    def of(cls, output: Any) -> _Answer:
        extra = getattr(output, "extra_fields", None) or {}
        return cls(extra=dict(extra), num_preempted=getattr(output, "num_preempted", None))


def _present(values: Sequence[Any]) -> list[Any]:
    return [v for v in values if v is not None]


def request_fields(answers: Sequence[_Answer]) -> tuple[dict[str, Any], int]:
    """(extra_fields, num_preempted) of a row from the requests that made its tokens, in order,
    as verl's own loops aggregate a session's requests (tool_agent_loop, single_turn_agent_loop):
    min_global_steps / max_global_steps the oldest / newest policy version among them (always
    present, None when no request carried one, like verl's client); global_steps and
    num_cached_tokens the first request's (the prompt's prefill); spec_num_* summed when every
    request reports them; num_preempted the sum, -1 when no request reports it."""
    fields: dict[str, Any] = {}
    lows = _present([a.extra.get("min_global_steps", a.extra.get("global_steps")) for a in answers])
    highs = _present([a.extra.get("max_global_steps", a.extra.get("global_steps")) for a in answers])
    fields["min_global_steps"] = min(lows) if lows else None
    fields["max_global_steps"] = max(highs) if highs else None
    for key in ("global_steps", "num_cached_tokens"):
        carrying = [a for a in answers if key in a.extra]
        if carrying:
            fields[key] = carrying[0].extra[key]
    for key in _SPEC_DECODE_KEYS:
        if answers and all(a.extra.get(key) is not None for a in answers):
            fields[key] = sum(int(a.extra[key]) for a in answers)
    preempted = [a.num_preempted for a in answers]
    num_preempted = sum(_present(preempted)) if _present(preempted) else -1
    return fields, num_preempted


def _request_seed(request_id: str, row: int, call: int) -> int:
    digest = hashlib.blake2b(f"{request_id}:{row}:{call}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % (2**31 - 1)


class ServerSampler(RowTable):
    """aepo's `Sampler` over verl's LLM server client, for one tree (module docstring).

    Called from the tree's thread; the requests run on `loop`. `sampling_params` are verl's
    (temperature, top_p, top_k, ...); each request adds max_tokens, logprobs and the stop strings.
    Entropies are surprisals, -logprob. `seconds` sums the wall time spent in generate calls."""

    def __init__(
        self, client: Any, loop: asyncio.AbstractEventLoop, tokenizer: Any, sampling_params: Mapping[str, Any], *,
        request_id: str, stop_style: str = "none", eos_token_ids: Sequence[int] = (), timeout_s: float = 600.0,
        priority: int = 0, deterministic: bool = False, retries: int = 0, backoff_s: float = 1.0,
    ) -> None:
        super().__init__(len(tokenizer))
        self.client, self.loop, self.tokenizer = client, loop, tokenizer
        self.sampling_params = dict(sampling_params)
        self.request_id, self.stop_style, self.priority = request_id, stop_style, int(priority)
        self.eos_ids = {int(t) for t in eos_token_ids}
        if getattr(tokenizer, "eos_token_id", None) is not None:
            self.eos_ids.add(int(tokenizer.eos_token_id))
        self.timeout_s, self.deterministic = float(timeout_s), deterministic
        self.retries, self.backoff_s = int(retries), float(backoff_s)
        self.seconds = 0.0
        self.requests = 0
        self.retried = 0  # attempts sent again after a failure or a timeout
        self._cancelled = threading.Event()
        # what verl's server / client stamped on each answered request, and per row (live or
        # released) the (row offset where its tokens start, request index) of every request its
        # chain made before its branch point: a fork keeps the requests whose tokens it keeps
        self.answers: list[_Answer] = []
        self._chains: dict[int, list[tuple[int, int]]] = {}
        self._released: dict[int, list[tuple[int, int]]] = {}

    def new_row(self, prompt_ids: Sequence[int]) -> int:
        handle = super().new_row(prompt_ids)
        self._chains[handle] = []
        return handle

    def fork(self, row: int, position: int | None = None) -> int:
        _, n = self._fork_length(row, position)
        handle = super().fork(row, position)
        self._chains[handle] = [(start, i) for start, i in self._chains[row] if start < n]
        return handle

    def release(self, row: int) -> None:
        super().release(row)
        self._released[row] = self._chains.pop(row)

    def row_answers(self, row: int) -> list[_Answer]:
        """The answered requests that made the tokens of `row` (live or released), in order."""
        chain = self._chains[row] if row in self._chains else self._released[row]
        return [self.answers[i] for _, i in chain]

    def cancel(self) -> None:
        """Make the next generate call raise (the tree's thread then unwinds)."""
        self._cancelled.set()

    def generate(
        self, rows: Sequence[int], max_new_tokens: int | Sequence[int], stop: Sequence[str] = ()
    ) -> list[Generation]:
        """Continue every row at once; one Generation per row, cut at the first stop string and
        at the row's budget."""
        handles, budgets = self._budgets(rows, max_new_tokens)
        if self._cancelled.is_set():
            raise TreeRolloutError("the tree was cancelled (timeout or a failed session); no more requests")
        start = time.monotonic()
        futures: list[concurrent.futures.Future | None] = []
        for handle, budget in zip(handles, budgets):
            if budget <= 0:
                futures.append(None)
                continue
            coro = self._request(list(self._rows[handle].ids), budget, tuple(stop), handle, self.requests)
            self.requests += 1
            futures.append(asyncio.run_coroutine_threadsafe(coro, self.loop))
        live = [f for f in futures if f is not None]
        # every attempt has its own timeout inside _request; this bounds the whole call as a backstop
        limit = (self.retries + 1) * self.timeout_s + self.backoff_s * (2 ** self.retries - 1) + 5.0
        try:
            done, pending = concurrent.futures.wait(live, timeout=limit, return_when=concurrent.futures.FIRST_EXCEPTION)
            for f in done:
                if f.exception() is not None:
                    raise f.exception()  # type: ignore[misc]
            if pending:
                raise TimeoutError(f"the LLM server did not answer {len(pending)} of {len(live)} requests within "
                                   f"{limit:g}s; raise request_timeout_s in the aepo_tree config or check the "
                                   "rollout servers")
        finally:
            for f in live:
                f.cancel()
            self.seconds += time.monotonic() - start
        out = []
        for handle, budget, f in zip(handles, budgets, futures):
            if f is None:
                out.append(Generation(token_ids=[], logprobs=[], entropies=[], finish="length"))
                continue
            result = f.result()
            gen = self._generation(result, budget, stop)
            self._chains[handle].append((len(self._rows[handle].ids), len(self.answers)))
            self.answers.append(_Answer.of(result))
            self._rows[handle].ids.extend(gen.token_ids)
            out.append(gen)
        return out

    async def _request(self, prompt_ids: list[int], budget: int, stop: tuple[str, ...], row: int, call: int) -> Any:
        params = dict(self.sampling_params)  # the server pops keys from it: a fresh dict per request
        params.update(max_tokens=budget, logprobs=True)
        if stop and self.stop_style == "vllm":
            params.update(stop=list(stop), include_stop_str_in_output=True)
        elif stop and self.stop_style == "sglang":
            params.update(stop=list(stop), no_stop_trim=True)
        request_id = self.request_id
        if self.deterministic:  # vLLM sees this id itself: one per request, with its own seed
            request_id = f"{self.request_id}-{row}-{call}"
            params.setdefault("seed", _request_seed(self.request_id, row, call))
        for attempt in range(self.retries + 1):
            if self._cancelled.is_set():
                raise TreeRolloutError("the tree was cancelled (timeout or a failed session); no more requests")
            try:
                return await asyncio.wait_for(
                    self.client.generate(request_id=request_id, prompt_ids=prompt_ids, sampling_params=dict(params),
                                         priority=self.priority),
                    timeout=self.timeout_s)
            except asyncio.TimeoutError:
                error: Exception = TimeoutError(f"the LLM server did not answer a request within request_timeout_s="
                                                f"{self.timeout_s:g}s; raise it in the aepo_tree config or check "
                                                "the rollout servers")
            except Exception as e:  # noqa: BLE001 - any server error is retried, then raised
                error = e
            if attempt == self.retries:
                if attempt:
                    raise TreeRolloutError(f"{error} (after {attempt + 1} attempts)") from error
                raise error
            self.retried += 1
            logger.warning("aepo_tree: request %s failed (%s: %s); attempt %d of %d in %.1fs", request_id,
                           type(error).__name__, error, attempt + 2, self.retries + 1, self.backoff_s * 2**attempt)
            await asyncio.sleep(self.backoff_s * 2**attempt)
        raise AssertionError("unreachable")

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def _stop_cut(self, tokens: list[int], stop: Sequence[str]) -> tuple[int, str | None]:
        """(length of the shortest prefix whose text contains a stop string, that string), or
        (len(tokens), None). Binary search: a prefix that contains a stop string stays so."""
        if not stop or not any(s in self._decode(tokens) for s in stop):
            return len(tokens), None
        lo, hi = 1, len(tokens)
        while lo < hi:
            mid = (lo + hi) // 2
            if any(s in self._decode(tokens[:mid]) for s in stop):
                hi = mid
            else:
                lo = mid + 1
        text = self._decode(tokens[:lo])
        return lo, min((s for s in stop if s in text), key=text.index)

    def _generation(self, out: Any, budget: int, stop: Sequence[str]) -> Generation:
        if getattr(out, "stop_reason", None) == "aborted":
            raise TreeRolloutError("the LLM server aborted a request of the tree (a paused or resized rollout "
                                   "server); aepo_tree needs whole answers")
        tokens = [int(t) for t in out.token_ids][:budget]
        logprobs = out.log_probs
        if tokens and (logprobs is None or len(logprobs) < len(tokens)):
            raise TreeRolloutError(f"the LLM server returned {len(tokens)} tokens but "
                                   f"{0 if logprobs is None else len(logprobs)} log-probs; aepo_tree asks for "
                                   "logprobs=True and needs one per token (a server that ignores it is not supported)")
        logprobs = [float(x) for x in (logprobs or [])[: len(tokens)]]
        cut, matched = self._stop_cut(tokens, stop)
        tokens, logprobs = tokens[:cut], logprobs[:cut]
        if matched is not None:
            finish = "stop"
        elif len(tokens) < budget or (tokens and tokens[-1] in self.eos_ids):
            finish = "eos"  # the server ended it early: EOS or another stop token of the model
        else:
            finish = "length"
        return Generation(token_ids=tokens, logprobs=logprobs, entropies=[-lp for lp in logprobs],
                          finish=finish, stop=matched)  # type: ignore[arg-type]
