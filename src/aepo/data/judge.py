"""LLM-as-judge: ask any OpenAI-compatible chat endpoint whether a prediction matches the gold.

Used where string matching is too strict (deep-search benchmarks such as GAIA/HLE grade
free-form answers this way). Standard library only (urllib), so it works wherever aepo does.

    judge = LLMJudge("http://127.0.0.1:8000", model="Qwen2.5-72B-Instruct")
    v = judge.judge("Who wrote Hamlet?", "Shakespeare", ["William Shakespeare"])
    v.correct  # True, False, or None when the call failed or the reply had no verdict

Failures (connection refused, timeout, HTTP error, malformed reply) never raise from
`judge` by default: the verdict is None and `error` says what went wrong. Pass
`raise_on_error=True` to get a `JudgeError` instead.
"""

from __future__ import annotations

import json
import re
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

__all__ = [
    "JUDGE_SYSTEM_PROMPT",
    "JUDGE_USER_TEMPLATE",
    "JudgeError",
    "JudgeVerdict",
    "LLMJudge",
    "check_reachable",
    "parse_verdict",
]

JUDGE_SYSTEM_PROMPT = (
    "You are a strict grader. Decide whether a predicted answer to a question means the same "
    "as any of the gold answers. Ignore differences in formatting, capitalisation, units "
    "written out or abbreviated, and extra words that do not change the meaning. Reply with "
    "exactly one word: Correct or Incorrect."
)
JUDGE_USER_TEMPLATE = (
    "Question: {question}\n"
    "Gold answers: {golds}\n"
    "Predicted answer: {prediction}\n"
    "Is the predicted answer correct? Reply Correct or Incorrect."
)

_THINK_RE = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)
_VERDICT_RE = re.compile(r"\b(not\s+correct|incorrect|correct)\b", re.IGNORECASE)
_YES_NO_RE = re.compile(r"^\W*(yes|no)\b", re.IGNORECASE)


class JudgeError(RuntimeError):
    """The judge endpoint could not be reached or gave no usable verdict."""

    def __init__(self, message: str, *, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable  # worth another try (timeouts, 5xx, 429)


@dataclass
class JudgeVerdict:
    """Outcome of one judgement: correct is None when no verdict could be had."""

    correct: bool | None
    raw: str = ""  # the model's reply text
    error: str | None = None


def parse_verdict(reply: str) -> bool | None:
    """True for "Correct", False for "Incorrect"/"not correct", None when there is no verdict.

    Reasoning inside <think>...</think> is ignored and the first verdict word after it
    counts; a reply that starts with "Yes"/"No" and names no verdict word is read as such.
    """
    text = _THINK_RE.sub(" ", reply)
    if "<think>" in text.lower():  # an unfinished reasoning block has no verdict yet
        return None
    m = _VERDICT_RE.search(text)
    if m:
        return m.group(1).lower() == "correct"
    m = _YES_NO_RE.match(text)
    return m.group(1).lower() == "yes" if m else None


def _endpoint(url: str) -> str:
    base = url.rstrip("/")
    if not base.startswith(("http://", "https://")):
        raise ValueError(f"judge url must start with http:// or https://, got {url!r}")
    if base.endswith("/chat/completions"):
        return base
    if base.endswith("/v1"):
        return base + "/chat/completions"
    return base + "/v1/chat/completions"


def check_reachable(url: str, what: str = "--judge", *, model: str | None = None, api_key: str | None = None,
                    timeout: float = 3.0) -> None:
    """Preflight for a judge endpoint: one GET of its OpenAI-compatible model list
    (`<base>/v1/models`, at most `timeout` seconds), no generation. Raises ValueError naming
    `what` (the option that gave the URL), the URL, the error and what to do when nothing
    answers, the key is refused (HTTP 401/403), or, given `model`, the list does not hold it.
    Any other reply (a server without the list) counts as reachable."""
    endpoint = _endpoint(url) if url.rstrip("/").startswith(("http://", "https://")) else None
    if endpoint is None:
        raise ValueError(f"{what} {url!r}: the judge URL must start with http:// or https://")
    models_url = endpoint.removesuffix("/chat/completions") + "/models"
    headers = {"Accept": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    fix = (f"start the judge server (an OpenAI-compatible endpoint, e.g. `vllm serve MODEL`), check the host and "
           f"port, or leave out {what}")
    try:
        with urllib.request.urlopen(urllib.request.Request(models_url, headers=headers), timeout=timeout) as resp:
            payload = resp.read(1 << 20)
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):
            raise ValueError(f"{what} {url}: the judge refused the API key (HTTP {e.code} from {models_url}); "
                             f"set the key's environment variable (--judge-key-env)") from None
        return  # it answers; a server without the model list still grades
    except TimeoutError:
        raise ValueError(f"{what} {url}: the judge did not answer {models_url} within {timeout:g} s; {fix}") from None
    except urllib.error.URLError as e:
        reason = e.reason
        if isinstance(reason, TimeoutError):
            reason = f"no answer within {timeout:g} s"
        raise ValueError(f"{what} {url}: the judge is unreachable ({models_url}: {reason}); {fix}") from None
    except OSError as e:
        raise ValueError(f"{what} {url}: the judge is unreachable ({models_url}: {e}); {fix}") from None
    if model:
        try:
            served = [str(m["id"]) for m in json.loads(payload)["data"]]
        except (ValueError, KeyError, TypeError):
            return  # no standard model list to check the name against
        if served and model not in served:
            raise ValueError(f"{what} {url} does not serve the model {model!r} (it serves "
                             f"{', '.join(map(repr, served[:5]))}); give one of them with --judge-model")


class LLMJudge:
    """Client for an OpenAI-compatible `/v1/chat/completions` endpoint used as a grader.

    `url` may be the server root, the `/v1` base or the full completions URL.
    """

    def __init__(
        self,
        url: str,
        model: str,
        api_key: str | None = None,
        timeout: float = 30,
        *,
        max_tokens: int = 256,
        retries: int = 0,
        retry_wait: float = 1.0,
    ) -> None:
        if not model:
            raise ValueError("model must name the model served at the judge endpoint")
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries}")
        self.endpoint = _endpoint(url)
        self.model = model
        self.api_key = api_key
        self.timeout = float(timeout)
        self.max_tokens = max_tokens
        self.retries = retries
        self.retry_wait = retry_wait

    def messages(self, question: str, prediction: str, golds: Sequence[str] | str) -> list[dict[str, str]]:
        """The chat messages sent for one judgement."""
        gold_list = [golds] if isinstance(golds, str) else [str(g) for g in golds]
        user = JUDGE_USER_TEMPLATE.format(
            question=question.strip(), golds=" | ".join(gold_list), prediction=str(prediction).strip()
        )
        return [{"role": "system", "content": JUDGE_SYSTEM_PROMPT}, {"role": "user", "content": user}]

    def complete(self, messages: list[dict[str, str]]) -> str:
        """POST the messages and return the first choice's text; raises JudgeError on failure."""
        body = json.dumps(
            {"model": self.model, "messages": messages, "temperature": 0.0, "max_tokens": self.max_tokens}
        ).encode("utf-8")
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last: JudgeError | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.retry_wait * attempt)
            try:
                return self._post(body, headers)
            except JudgeError as e:
                last = e
                if not e.retryable:
                    break
        assert last is not None
        raise last

    def _post(self, body: bytes, headers: dict[str, str]) -> str:
        req = urllib.request.Request(self.endpoint, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                payload = resp.read()
        except urllib.error.HTTPError as e:
            detail = e.read()[:300].decode("utf-8", "replace") if e.fp else ""
            raise JudgeError(
                f"judge endpoint {self.endpoint} answered HTTP {e.code}: {detail}".strip(),
                retryable=e.code >= 500 or e.code == 429,
            ) from None
        except TimeoutError:
            raise JudgeError(f"judge endpoint {self.endpoint} timed out after {self.timeout:g}s") from None
        except urllib.error.URLError as e:
            reason = e.reason
            if isinstance(reason, (socket.timeout, TimeoutError)):
                raise JudgeError(
                    f"judge endpoint {self.endpoint} timed out after {self.timeout:g}s"
                ) from None
            raise JudgeError(f"judge endpoint {self.endpoint} unreachable: {reason}") from None
        except OSError as e:
            raise JudgeError(f"judge endpoint {self.endpoint} failed: {e}") from None
        try:
            data = json.loads(payload)
            content = data["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise JudgeError(
                f"judge endpoint {self.endpoint} sent no choices[0].message.content: {payload[:200]!r}",
                retryable=False,
            ) from None
        return content if isinstance(content, str) else ""

    def judge(
        self,
        question: str,
        prediction: str | None,
        golds: Sequence[str] | str,
        *,
        raise_on_error: bool = False,
    ) -> JudgeVerdict:
        """Whether `prediction` answers `question` like one of `golds`.

        An empty prediction is judged incorrect without a call.
        """
        if prediction is None or not str(prediction).strip():
            return JudgeVerdict(correct=False, raw="", error=None)
        try:
            reply = self.complete(self.messages(question, prediction, golds))
        except JudgeError as e:
            if raise_on_error:
                raise
            return JudgeVerdict(correct=None, raw="", error=str(e))
        verdict = parse_verdict(reply)
        if verdict is None:
            msg = f"no Correct/Incorrect verdict in the judge's reply: {reply[:200]!r}"
            if raise_on_error:
                raise JudgeError(msg)
            return JudgeVerdict(correct=None, raw=reply, error=msg)
        return JudgeVerdict(correct=verdict, raw=reply)

    def judge_many(
        self, items: Sequence[tuple[str, str | None, Sequence[str] | str]], *, max_workers: int = 8
    ) -> list[JudgeVerdict]:
        """Judge (question, prediction, golds) triples concurrently; results keep the input order."""
        if max_workers < 1:
            raise ValueError(f"max_workers must be >= 1, got {max_workers}")
        if not items:
            return []
        with ThreadPoolExecutor(max_workers=min(max_workers, len(items))) as pool:
            return list(pool.map(lambda it: self.judge(*it), items))

    def __repr__(self) -> str:
        return f"LLMJudge(endpoint={self.endpoint!r}, model={self.model!r})"
