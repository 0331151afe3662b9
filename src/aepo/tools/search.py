"""The "search" tool: a query in, "Page 1: ...\\nPage 2: ..." out, from a chain of backends.

Backends are tried in order until one finds something:

- `CacheBackend` replays recorded search results (a JSON object query -> rendered result text,
  e.g. a cache of real web-search results recorded for offline runs), with tolerant query matching.
- `BM25Backend` ranks a local corpus of {"id", "title", "text"} documents with BM25 (`bm25s`).
- `HttpBackend` asks a Search-R1 style retriever server (`POST /retrieve`).

A backend returns a list of page texts (best first), an empty list for "nothing found", or
raises `SearchBackendError` when it cannot answer (server down, garbage reply). An error falls
through to the next backend. When no backend found anything and one of them failed, the error
propagates ("nothing found" is only said when every backend could look), and the tool runner
turns it into an `ok=False` call, which the trainer counts in its per-tool error rate. Each
failure is logged as a warning the first time, then at most once a minute per backend (per URL
for a retriever server), so a retriever that is down is seen without flooding the log.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from aepo.errors import ConfigError
from aepo.tools.registry import ToolSpec, register_tool
from aepo.tools.runner import truncate_result

logger = logging.getLogger(__name__)

_QUERY_PREFIX = re.compile(r"^\s*search\s+query\s*:\s*", re.IGNORECASE)
_PAGE_SPLIT = re.compile(r"(?:^|\n)Page \d+:[ \t]*")
_NON_ALNUM = re.compile(r"[^0-9a-z]+")
_NO_RESULTS_TEXTS = {"no search results found.", "no results found.", ""}
_MAX_RESPONSE_BYTES = 16 * 1024 * 1024


class SearchBackendError(RuntimeError):
    """A backend could not answer (as opposed to answering "nothing found")."""


class SearchBackend(Protocol):
    """Something that maps a query to up to `topk` page texts, best first."""

    name: str

    def search(self, query: str, topk: int) -> list[str]: ...


def tokenize(text: str) -> list[str]:
    """Lower-case and split on anything that is not a letter or digit (ASCII), dropping empties.

    Deliberately simple: no stemming and no stop-word removal, so that retrieval over the
    generated world is exact and deterministic (entity names are invented words that a stemmer
    would only mangle), and a misspelled name matches nothing.
    """
    return [token for token in _NON_ALNUM.split(text.lower()) if token]


def normalize_query(query: str) -> str:
    """Key for tolerant cache lookup: no "search query:" prefix, case, punctuation or extra spaces."""
    return " ".join(tokenize(_QUERY_PREFIX.sub("", query)))


def split_pages(rendered: str) -> list[str]:
    """Split a rendered "Page 1: a\\nPage 2: b" result into page texts; [] for a no-result text."""
    text = rendered.strip()
    if text.lower() in _NO_RESULTS_TEXTS:
        return []
    if not _PAGE_SPLIT.match(text):
        return [text]
    return [page.strip() for page in _PAGE_SPLIT.split(text) if page.strip()]


def render_pages(pages: Sequence[str], max_chars: int, page_chars: int | None = None) -> str:
    """ "Page 1: ...\\nPage 2: ..." with each page's text cut to `page_chars` (default: an equal
    share of `max_chars`) and the whole text cut to `max_chars`. Whitespace runs become one space."""
    if page_chars is None:
        page_chars = max(1, max_chars // max(1, len(pages)) - len("Page 1: \n"))
    rendered = "\n".join(
        f"Page {i}: {truncate_result(' '.join(page.split()), page_chars)}" for i, page in enumerate(pages, 1)
    )
    return truncate_result(rendered, max_chars)


def _check_positive(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


class CacheBackend:
    """Replays recorded results: a dict or JSON file mapping query -> rendered result text.

    Lookup ignores case, whitespace, punctuation and a "search query:" prefix on either the
    recorded or the asked query. Recorded "No search results found." counts as nothing found.
    """

    name = "cache"

    def __init__(self, path_or_dict: str | Path | Mapping[str, str]) -> None:
        if isinstance(path_or_dict, Mapping):
            entries, source = dict(path_or_dict), "the cache dict"
        else:
            path = Path(path_or_dict)
            try:
                entries = json.loads(path.read_text(encoding="utf-8"))
            except OSError as exc:
                raise ValueError(f"cannot read search cache {path}: {exc}") from exc
            except json.JSONDecodeError as exc:
                raise ValueError(f"search cache {path} is not valid JSON: {exc}") from exc
            source = str(path)
            if not isinstance(entries, dict):
                raise ValueError(f"search cache {path} must hold a JSON object, got {type(entries).__name__}")
        self._pages: dict[str, list[str]] = {}
        for query, result in entries.items():
            if not isinstance(query, str) or not isinstance(result, str):
                raise ValueError(f"{source}: entry {query!r} must map a string to a string")
            key = normalize_query(query)
            pages = split_pages(result)
            if key and (key not in self._pages or (pages and not self._pages[key])):
                self._pages[key] = pages  # first recording wins, unless it found nothing
        logger.debug("search cache %s: %d queries", source, len(self._pages))

    def __len__(self) -> int:
        return len(self._pages)

    def search(self, query: str, topk: int) -> list[str]:
        return list(self._pages.get(normalize_query(query), [])[:topk])


class BM25Backend:
    """BM25 over {"id", "title", "text"} documents, via `bm25s`: Lucene's variant (k1=1.5, b=0.75,
    idf = ln(1 + (N - df + 0.5) / (df + 0.5)), no constant (k1 + 1) factor).

    Only documents sharing at least one query token (score > 0) are returned; equal scores keep
    the corpus order. A page reads "title: text" when the title is set. Query tokens are
    de-duplicated, so repeating a word does not change the ranking.
    """

    name = "bm25"

    def __init__(self, docs: Sequence[Mapping[str, object]], k1: float = 1.5, b: float = 0.75) -> None:
        bm25s = _import_bm25s()

        pages: list[str] = []
        for i, doc in enumerate(docs):
            if not isinstance(doc, Mapping):
                raise ValueError(f"docs[{i}] must be a dict with 'text' (and optional 'title', 'id')")
            text, title = doc.get("text"), doc.get("title") or ""
            if not isinstance(text, str):
                raise ValueError(f"docs[{i}] needs a string 'text' field, got {type(text).__name__}")
            if not isinstance(title, str):
                raise ValueError(f"docs[{i}] 'title' must be a string, got {type(title).__name__}")
            pages.append(f"{title}: {text}" if title else text)
        if not pages:
            raise ValueError("BM25Backend needs at least one document")
        self.pages = pages
        self.ids = [str(doc.get("id", i)) for i, doc in enumerate(docs)]
        vocabulary: dict[str, int] = {}
        token_ids = [[vocabulary.setdefault(t, len(vocabulary)) for t in tokenize(page)] for page in pages]
        self._vocabulary = vocabulary
        self._index = bm25s.BM25(k1=k1, b=b, method="lucene")
        self._index.index((token_ids, vocabulary), create_empty_token=False, show_progress=False)

    @classmethod
    def from_jsonl(cls, path: str | Path, **kwargs: float) -> BM25Backend:
        """Load documents from a JSON-lines file, one {"id","title","text"} object per line."""
        path = Path(path)
        docs = []
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise ValueError(f"cannot read corpus {path}: {exc}") from exc
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
            if not isinstance(doc, dict) or not isinstance(doc.get("text"), str):
                raise ValueError(f"{path}:{number}: expected an object with a string 'text' field")
            docs.append(doc)
        if not docs:
            raise ValueError(f"corpus {path} holds no documents")
        return cls(docs, **kwargs)

    def scores(self, query: str) -> np.ndarray:
        """BM25 score of every document for `query` (zeros when no query token is indexed)."""
        ids = list(dict.fromkeys(self._vocabulary[t] for t in tokenize(query) if t in self._vocabulary))
        if not ids:
            return np.zeros(len(self.pages), dtype=np.float64)
        return np.asarray(self._index.get_scores_from_ids(ids), dtype=np.float64)

    def search(self, query: str, topk: int) -> list[str]:
        scores = self.scores(query)
        order = np.argsort(-scores, kind="stable")[:topk]
        return [self.pages[i] for i in order if scores[i] > 0]


class HttpBackend:
    """A Search-R1 retriever server: POST {"queries": [q], "topk": k, "return_scores": true} to `url`.

    The reply is {"result": [[{"document": {"contents": "\\"Title\\"\\nText"}, "score": s}, ...]]};
    each document becomes the page "Title: Text". A server that is down or answers garbage
    raises `SearchBackendError`.
    """

    name = "http"

    def __init__(self, url: str, timeout: float = 5.0) -> None:
        scheme = urllib.parse.urlparse(url).scheme if isinstance(url, str) else None
        if scheme not in ("http", "https"):
            raise ValueError(f"retriever url must start with http:// or https://, got {url!r}")
        if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        self.url = url
        self.timeout = float(timeout)

    def search(self, query: str, topk: int) -> list[str]:
        body = json.dumps({"queries": [query], "topk": topk, "return_scores": True}).encode()
        request = urllib.request.Request(
            self.url, data=body, headers={"Content-Type": "application/json"}, method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                raw = response.read(_MAX_RESPONSE_BYTES + 1)
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise SearchBackendError(f"retriever {self.url} unreachable: {reason}") from None
        if len(raw) > _MAX_RESPONSE_BYTES:
            raise SearchBackendError(f"retriever {self.url} reply is larger than {_MAX_RESPONSE_BYTES} bytes")
        try:
            reply = json.loads(raw)
            documents = reply["result"][0]
            contents = [item["document"]["contents"] for item in documents]
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise SearchBackendError(
                f"retriever {self.url} sent an invalid reply ({type(exc).__name__}: {exc}): {raw[:200]!r}"
            ) from None
        if not all(isinstance(c, str) for c in contents):
            raise SearchBackendError(f"retriever {self.url} sent non-text document contents")
        return [_page_from_contents(c) for c in contents[:topk]]


def check_reachable(url: str, what: str = "--search-url", *, timeout: float = 3.0) -> None:
    """Preflight for a retriever server: one test query (topk 1, at most `timeout` seconds).
    Raises ValueError naming `what` (the option or key that gave the URL), the URL, the error
    and what to do when it is not an http(s) URL, nothing answers there, or the reply is not a
    retriever's, so that a run whose every search would fail does not start."""
    try:
        backend = HttpBackend(url, timeout=timeout)
    except ValueError as e:
        raise ValueError(f"{what} {url!r}: {e}") from None
    try:
        backend.search("test", 1)
    except SearchBackendError as e:
        raise ValueError(f"{what} {url}: no retriever answers there ({e}; one test query, at most {timeout:g} s); start "
                         f"the retriever server (a Search-R1 style server answering POST /retrieve), check the "
                         f"host, port and path, or leave out {what}") from None


def _page_from_contents(contents: str) -> str:
    """'"Title"\\nText' (the retriever's document format) -> "Title: Text"."""
    title, _, text = contents.partition("\n")
    title = title.strip().strip('"').strip()
    text = text.strip()
    if not text:
        return title
    return f"{title}: {text}" if title else text


class RateLimitedWarning:
    """Logs a warning per key the first time, then at most once per `interval` seconds, saying
    how many were held back in between. Thread-safe: tool calls run on several threads."""

    def __init__(self, interval: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        if not isinstance(interval, (int, float)) or isinstance(interval, bool) or interval < 0:
            raise ValueError(f"warning interval must be a number of seconds >= 0, got {interval!r}")
        self.interval = float(interval)
        self.clock = clock
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}
        self._lock = threading.Lock()

    def __call__(self, key: str, message: str) -> bool:
        """Log `message` unless `key` was logged less than `interval` ago; True when logged."""
        with self._lock:
            now = self.clock()
            last = self._last.get(key)
            if last is not None and now - last < self.interval:
                self._held[key] = self._held.get(key, 0) + 1
                return False
            self._last[key] = now
            held = self._held.pop(key, 0)
        if held:
            message += f" ({held} more since the last warning)"
        logger.warning("%s", message)
        return True


def _import_bm25s() -> Any:
    """`bm25s`, imported without JAX. When JAX is installed, importing bm25s runs a JAX op at
    import time, which makes JAX claim most of the GPU's memory in every process that builds a
    BM25 index; this backend only scores with numpy, so JAX is hidden from that import (unless
    the program imported JAX itself)."""
    import sys

    if "bm25s" in sys.modules or "jax" in sys.modules:
        import bm25s

        return bm25s
    sys.modules["jax"] = None  # type: ignore[assignment]  # "import jax" raises ImportError
    try:
        import bm25s
    finally:
        if sys.modules.get("jax", 0) is None:
            del sys.modules["jax"]
    return bm25s


def _backend_label(backend: SearchBackend) -> str:
    """How logs name a backend: its URL when it has one, else its name."""
    url = getattr(backend, "url", None)
    return f"{backend.name} {url}" if isinstance(url, str) else str(getattr(backend, "name", backend))


class SearchTool:
    """The "search" tool: try `backends` in order; render the first non-empty answer as pages.

    At most `topk` pages; the result text is at most `max_chars` long, and each page's text at
    most `page_chars` (default: an equal share of `max_chars`, so every page is seen). A failing
    backend is logged at most once per `warn_interval` seconds.
    """

    name = "search"

    def __init__(
        self,
        backends: Sequence[SearchBackend],
        topk: int = 3,
        max_chars: int = 600,
        page_chars: int | None = None,
        warn_interval: float = 60.0,
    ) -> None:
        _check_positive("topk", topk)
        _check_positive("max_chars", max_chars)
        if page_chars is not None:
            _check_positive("page_chars", page_chars)
        backends = list(backends)
        if not backends:
            raise ValueError("SearchTool needs at least one backend (cache, corpus or url)")
        for i, backend in enumerate(backends):
            if not callable(getattr(backend, "search", None)):
                raise ValueError(f"backends[{i}] ({backend!r}) has no search(query, topk) method")
        self.backends = backends
        self.topk = topk
        self.max_chars = max_chars
        self.page_chars = page_chars
        self.failure_warning = RateLimitedWarning(warn_interval)

    def __call__(self, query: str) -> str:
        """Result text for `query`; raises `SearchBackendError` when no backend found anything
        and at least one could not answer."""
        query = query.strip() if isinstance(query, str) else ""
        if not query:
            return "Error: empty search query."
        failures: list[SearchBackendError] = []
        for position, backend in enumerate(self.backends):
            try:
                pages = backend.search(query, self.topk)
            except SearchBackendError as exc:
                self._warn_failure(backend, exc, last=position == len(self.backends) - 1)
                failures.append(exc)
                continue
            if pages:
                return render_pages(pages[: self.topk], self.max_chars, self.page_chars)
        if len(failures) == 1:
            raise failures[0]
        if failures:
            raise SearchBackendError("; ".join(str(e) for e in failures))
        return f"No results found for '{query}'."

    def _warn_failure(self, backend: SearchBackend, exc: SearchBackendError, last: bool) -> None:
        then = ("search calls it would answer fail until it is back" if last
                else "falling back to the next backend")
        self.failure_warning(
            _backend_label(backend),
            f"search backend {_backend_label(backend)} failed, {then}: {exc} "
            f"(logged at most every {self.failure_warning.interval:g}s)",
        )


def build_search_tool(
    cache: str | Path | Mapping[str, str] | None = None,
    corpus: str | Path | Sequence[Mapping[str, object]] | None = None,
    url: str | None = None,
    topk: int = 3,
    max_chars: int = 600,
) -> SearchTool:
    """A SearchTool over whichever sources are given, tried in the order cache, corpus, url."""
    backends: list[SearchBackend] = []
    if cache is not None:
        backends.append(CacheBackend(cache))
    if corpus is not None:
        is_path = isinstance(corpus, (str, Path))
        backends.append(BM25Backend.from_jsonl(corpus) if is_path else BM25Backend(corpus))
    if url is not None:
        backends.append(HttpBackend(url))
    if not backends:
        raise ValueError("build_search_tool needs at least one of cache, corpus or url")
    return SearchTool(backends, topk=topk, max_chars=max_chars)


def _build(cfg: Any, *, corpus_docs: Sequence[Mapping[str, object]] | None = None, **_: Any) -> SearchTool:
    """search from `tools.*`: backends tried in the order cache, BM25 corpus (a file, else the
    run's own documents), HTTP retriever."""
    corpus = cfg.search_corpus or (list(corpus_docs) if corpus_docs else None)
    if not (cfg.search_cache or corpus or cfg.search_url):
        raise ConfigError("tools.enabled has 'search' but no backend is set: give tools.search_cache, "
                          "tools.search_corpus or tools.search_url")
    return build_search_tool(cache=cfg.search_cache or None, corpus=corpus, url=cfg.search_url or None,
                             topk=cfg.search_topk, max_chars=cfg.search_max_chars)


register_tool(ToolSpec("search", usage="to search the web write <search> query </search>", argument="query",
                       description="Search the web; returns the top pages as text.", build=_build))
