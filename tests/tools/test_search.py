"""Search tool: cache replay, BM25 (checked against a hand-written BM25), the HTTP retriever
protocol against a fake loopback server, fall-through, rendering and `aepo tools search`."""

from __future__ import annotations

import json
import logging
import math
import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from repo_paths import SHARED, SRC
from typer.testing import CliRunner

from aepo.cli import app
from aepo.tools.runner import ToolRunner
from aepo.tools.search import (
    BM25Backend,
    CacheBackend,
    HttpBackend,
    RateLimitedWarning,
    SearchBackendError,
    SearchTool,
    build_search_tool,
    normalize_query,
    render_pages,
    split_pages,
    tokenize,
)

SEARCH_CACHE = SHARED / "data" / "search_cache.json"

DOCS = [
    {"id": "a", "title": "Zorvath", "text": "Zorvath is a river city founded by Mirela Quon."},
    {"id": "b", "title": "Mirela Quon", "text": "Mirela Quon was born in Tesk and founded Zorvath."},
    {"id": "c", "title": "Tesk", "text": "Tesk is a mountain town. Tesk makes cheese."},
    {"id": "d", "title": "", "text": "A note without a title about cheese."},
]


# ----------------------------------------------------------------------------- helpers


def test_tokenize_and_normalize_query():
    assert tokenize("Who's Mirela-Quon? (born 1901)") == ["who", "s", "mirela", "quon", "born", "1901"]
    assert normalize_query("search query: Who directed  Love Finds Andy Hardy?") == (
        "who directed love finds andy hardy"
    )
    assert normalize_query("SEARCH QUERY:who directed love finds andy hardy") == (
        "who directed love finds andy hardy"
    )


def test_split_and_render_pages():
    assert split_pages("Page 1: alpha beta\nPage 2: gamma") == ["alpha beta", "gamma"]
    assert split_pages("No search results found.") == []
    assert split_pages("plain text") == ["plain text"]
    assert render_pages(["a  b\nc", "d"], max_chars=100) == "Page 1: a b c\nPage 2: d"
    long = render_pages(["x" * 500, "y" * 500, "z" * 500], max_chars=300)
    assert len(long) <= 300
    lines = long.split("\n")
    assert [line[:8] for line in lines] == ["Page 1: ", "Page 2: ", "Page 3: "]  # every page is seen
    assert all(line.endswith("...[truncated]") for line in lines)


# ----------------------------------------------------------------------------- cache


def test_cache_backend_tolerant_matching_and_topk():
    cache = CacheBackend(
        {
            "search query: Who founded Zorvath?": "Page 1: one\nPage 2: two\nPage 3: three\nPage 4: four",
            "tesk cheese": "No search results found.",
        }
    )
    assert len(cache) == 2
    for query in ("Who founded Zorvath?", "who founded zorvath", "search query:  WHO founded, Zorvath!"):
        assert cache.search(query, 3) == ["one", "two", "three"]
    assert cache.search("Who founded Zorvath", 1) == ["one"]
    assert cache.search("tesk cheese", 3) == []  # recorded "no results" is nothing found
    assert cache.search("unknown", 3) == []


def test_cache_backend_rejects_bad_files(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match="broken.json"):
        CacheBackend(broken)
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        CacheBackend(listed)
    with pytest.raises(ValueError, match="cannot read"):
        CacheBackend(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="string to a string"):
        CacheBackend({"q": 3})


def test_shared_search_cache_replays():
    if not SEARCH_CACHE.exists():
        pytest.skip(f"shared search cache not found at {SEARCH_CACHE}")
    raw = json.loads(SEARCH_CACHE.read_text(encoding="utf-8"))
    tool = SearchTool([CacheBackend(SEARCH_CACHE)], topk=3, max_chars=10_000, page_chars=10_000)
    expected = raw["search query: Who directed the film Love Finds Andy Hardy?"]
    first_three = "\n".join(expected.split("\n")[:3])
    assert expected.count("\nPage ") >= 3  # the recording has more pages than topk
    # Asked without the prefix, in another case and without the question mark.
    assert tool("who directed the film love finds andy hardy") == first_three
    # A key recorded without the prefix, asked with it.
    plain = next(k for k in raw if not k.lower().startswith("search query") and raw[k].startswith("Page 1:"))
    answer = tool("search query: " + plain)
    assert answer.startswith("Page 1: ") and answer.count("\nPage ") <= 2
    assert tool("molecular formula of ascorbic acid") == (
        "No results found for 'molecular formula of ascorbic acid'."
    )


# ----------------------------------------------------------------------------- BM25


def reference_bm25(docs_tokens, query_tokens, k1=1.5, b=0.75):
    """Lucene (>= 8) BM25: sum over query terms of idf * tf / (tf + k1 * (1 - b + b * L / avgL)),
    idf = ln(1 + (N - df + 0.5) / (df + 0.5)); the classic constant factor (k1 + 1) is left out."""
    n = len(docs_tokens)
    avg_len = sum(len(d) for d in docs_tokens) / n
    scores = []
    for doc in docs_tokens:
        counts = Counter(doc)
        total = 0.0
        for term in dict.fromkeys(query_tokens):
            df = sum(term in d for d in docs_tokens)
            if df == 0 or counts[term] == 0:
                continue
            idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
            tf = counts[term]
            total += idf * tf / (tf + k1 * (1 - b + b * len(doc) / avg_len))
        scores.append(total)
    return scores


def test_bm25_scores_match_hand_written_bm25():
    backend = BM25Backend(DOCS)
    docs_tokens = [tokenize(page) for page in backend.pages]
    for query in ("Who founded Zorvath?", "tesk cheese", "cheese cheese river", "mirela"):
        expected = reference_bm25(docs_tokens, tokenize(query))
        assert backend.scores(query) == pytest.approx(expected, rel=1e-5)


def test_bm25_ranking_titles_and_misses():
    backend = BM25Backend(DOCS)
    assert backend.pages[0] == "Zorvath: Zorvath is a river city founded by Mirela Quon."
    assert backend.pages[3] == "A note without a title about cheese."  # no "title: " when untitled
    results = backend.search("Tesk cheese", 3)
    assert results[0].startswith("Tesk: ")
    assert len(results) == 3 and not any(r.startswith("Zorvath") for r in results)
    assert backend.search("Zorvth", 3) == []  # misspelled: shares no token, so nothing
    assert backend.search("", 3) == []
    assert len(backend.search("Tesk cheese", 1)) == 1


def test_bm25_ties_keep_document_order():
    docs = [{"id": str(i), "title": "", "text": f"common word{i}"} for i in range(6)]
    backend = BM25Backend(docs)
    scores = backend.scores("common")
    assert len(set(scores.tolist())) == 1 and scores[0] > 0
    assert backend.search("common", 4) == ["common word0", "common word1", "common word2", "common word3"]


def test_bm25_from_jsonl_and_bad_input(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(json.dumps(d) for d in DOCS) + "\n\n")
    assert BM25Backend.from_jsonl(corpus).pages == BM25Backend(DOCS).pages
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(DOCS[0]) + "\n{oops\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2"):
        BM25Backend.from_jsonl(bad)
    no_text = tmp_path / "no_text.jsonl"
    no_text.write_text(json.dumps({"id": 1, "title": "t"}) + "\n")
    with pytest.raises(ValueError, match=r"no_text\.jsonl:1: .*'text'"):
        BM25Backend.from_jsonl(no_text)
    with pytest.raises(ValueError, match=r"docs\[1\]"):
        BM25Backend([DOCS[0], {"title": "x"}])
    with pytest.raises(ValueError, match="at least one"):
        BM25Backend([])


def test_bm25_indexes_three_thousand_docs_quickly():
    words = [f"w{i}" for i in range(3000)]
    docs = [
        {"id": str(i), "title": f"Entity {i}", "text": " ".join(words[(i * 7 + j) % 3000] for j in range(30))}
        for i in range(3000)
    ]
    BM25Backend(docs[:10])  # import bm25s outside the timing
    start = time.perf_counter()
    backend = BM25Backend(docs)
    elapsed = time.perf_counter() - start
    assert elapsed < 1.0, f"indexing 3000 docs took {elapsed:.2f}s"
    assert backend.search("Entity 1234", 1)[0].startswith("Entity 1234: ")


# ----------------------------------------------------------------------------- HTTP retriever


class FakeRetriever(BaseHTTPRequestHandler):
    """Speaks the Search-R1 /retrieve protocol; `mode` on the server switches to garbage."""

    def do_POST(self):
        length = min(int(self.headers.get("Content-Length", 0)), 1 << 16)
        request = json.loads(self.rfile.read(length))
        self.server.requests.append(request)
        if self.server.mode == "garbage":
            body = b"<html>oops</html>"
        elif self.server.mode == "wrong-shape":
            body = json.dumps({"result": "nope"}).encode()
        else:
            query = request["queries"][0]
            docs = [
                {
                    "document": {"contents": f'"Doc {i} about {query}"\nBody {i} of {query}.'},
                    "score": 10.0 - i,
                }
                for i in range(request["topk"])
            ]
            if query == "nothing":
                docs = []
            body = json.dumps({"result": [docs]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def retriever():
    server = HTTPServer(("127.0.0.1", 0), FakeRetriever)
    server.requests = []
    server.mode = "ok"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server, f"http://127.0.0.1:{server.server_address[1]}/retrieve"
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_http_backend_speaks_the_protocol(retriever):
    server, url = retriever
    backend = HttpBackend(url, timeout=5)
    pages = backend.search("tesk cheese", 2)
    assert server.requests == [{"queries": ["tesk cheese"], "topk": 2, "return_scores": True}]
    assert pages == [
        "Doc 0 about tesk cheese: Body 0 of tesk cheese.",
        "Doc 1 about tesk cheese: Body 1 of tesk cheese.",
    ]
    assert backend.search("nothing", 3) == []
    tool = SearchTool([backend], topk=2)
    assert tool("x").startswith("Page 1: Doc 0 about x: Body 0 of x.\nPage 2: Doc 1 about x")
    assert tool("nothing") == "No results found for 'nothing'."


@pytest.mark.parametrize("mode, message", [("garbage", "invalid reply"), ("wrong-shape", "invalid reply")])
def test_http_backend_garbage_raises(retriever, mode, message):
    server, url = retriever
    server.mode = mode
    with pytest.raises(SearchBackendError, match=message):
        HttpBackend(url).search("q", 3)


def test_http_backend_down_raises_and_runner_reports_it():
    url = f"http://127.0.0.1:{free_port()}/retrieve"
    with pytest.raises(SearchBackendError, match="unreachable"):
        HttpBackend(url, timeout=2).search("q", 3)
    runner = ToolRunner([SearchTool([HttpBackend(url, timeout=2)])], timeout=5)
    (call,) = runner.run([("search", "q")])
    assert not call.ok
    assert call.result.startswith("Error: SearchBackendError: retriever ") and "unreachable" in call.result


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def search_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "aepo.tools.search" and r.levelno == logging.WARNING]


def test_retriever_down_fails_the_call_and_warns_once_a_minute_per_url(caplog):
    first = f"http://127.0.0.1:{free_port()}/retrieve"
    second = f"http://127.0.0.1:{free_port()}/retrieve"
    tool = SearchTool([HttpBackend(first, timeout=2), HttpBackend(second, timeout=2)])
    clock = FakeClock()
    tool.failure_warning.clock = clock
    runner = ToolRunner([tool], timeout=10)
    caplog.set_level(logging.WARNING, logger="aepo.tools.search")

    (call,) = runner.run([("search", "q")])
    assert not call.ok and not call.timed_out
    assert first in call.result and second in call.result and call.result.count("unreachable") == 2
    logged = search_warnings(caplog)
    assert len(logged) == 2  # one per URL
    assert first in logged[0] and "unreachable" in logged[0]
    assert "falling back to the next backend" in logged[0]
    assert second in logged[1] and "search calls it would answer fail" in logged[1]
    assert "at most every 60s" in logged[0]

    caplog.clear()
    for seconds in (1, 30, 59.9):
        clock.now = 1000.0 + seconds
        assert not runner.run([("search", "q")])[0].ok
    assert search_warnings(caplog) == []  # within the minute: held back

    clock.now = 1061.0
    runner.run([("search", "q")])
    logged = search_warnings(caplog)
    assert len(logged) == 2 and all("(3 more since the last warning)" in m for m in logged)


def test_a_failed_backend_is_not_hidden_behind_nothing_found():
    down = HttpBackend(f"http://127.0.0.1:{free_port()}/retrieve", timeout=2)
    runner = ToolRunner([SearchTool([down, CacheBackend({"other": "Page 1: x"})])], timeout=10)
    (call,) = runner.run([("search", "q")])
    assert not call.ok and "unreachable" in call.result
    healthy = SearchTool([CacheBackend({"other": "Page 1: x"}), BM25Backend(DOCS)])
    assert healthy("Zorvthx") == "No results found for 'Zorvthx'."  # every backend looked


def test_rate_limited_warning(caplog):
    clock = FakeClock()
    warn = RateLimitedWarning(10, clock=clock)
    caplog.set_level(logging.WARNING, logger="aepo.tools.search")
    assert warn("a", "a down") and warn("b", "b down") and not warn("a", "a down")
    clock.now += 10
    assert warn("a", "a still down")
    assert search_warnings(caplog) == ["a down", "b down", "a still down (1 more since the last warning)"]
    with pytest.raises(ValueError, match="interval"):
        RateLimitedWarning(-1)


def test_http_backend_rejects_non_http_urls():
    for url in ("file:///etc/passwd", "ftp://host/x", "127.0.0.1:8000/retrieve"):
        with pytest.raises(ValueError, match="http"):
            HttpBackend(url)


def test_failing_backend_falls_through_to_the_next(retriever):
    server, url = retriever
    server.mode = "garbage"
    down = HttpBackend(f"http://127.0.0.1:{free_port()}/retrieve", timeout=2)
    tool = SearchTool([down, HttpBackend(url), CacheBackend({"q": "Page 1: from the cache"})])
    assert tool("q") == "Page 1: from the cache"
    assert len(server.requests) == 1  # the garbage server was asked, then skipped


def test_first_backend_with_results_wins():
    tool = SearchTool([CacheBackend({"other": "Page 1: no"}), BM25Backend(DOCS)], topk=1, max_chars=600)
    assert tool("Tesk cheese") == "Page 1: Tesk: Tesk is a mountain town. Tesk makes cheese."
    tool_cache_first = SearchTool([CacheBackend({"tesk cheese": "Page 1: cached"}), BM25Backend(DOCS)])
    assert tool_cache_first("Tesk cheese!") == "Page 1: cached"
    assert tool("Zorvth") == "No results found for 'Zorvth'."
    assert tool("   ") == "Error: empty search query."


def test_search_tool_and_builder_validate():
    with pytest.raises(ValueError, match="at least one backend"):
        SearchTool([])
    with pytest.raises(ValueError, match="topk"):
        SearchTool([CacheBackend({})], topk=0)
    with pytest.raises(ValueError, match="search"):
        SearchTool([object()])
    with pytest.raises(ValueError, match="at least one of cache, corpus or url"):
        build_search_tool()
    tool = build_search_tool(cache={"a": "Page 1: b"}, corpus=DOCS, url="http://127.0.0.1:9/retrieve", topk=2)
    assert [b.name for b in tool.backends] == ["cache", "bm25", "http"]
    assert tool.topk == 2 and tool.name == "search"


def test_cli_search(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(json.dumps(d) for d in DOCS))
    runner = CliRunner()
    done = runner.invoke(app, ["tools", "search", "Tesk cheese", "--corpus", str(corpus), "--topk", "1"])
    assert done.exit_code == 0, done.output
    assert done.output.strip() == "Page 1: Tesk: Tesk is a mountain town. Tesk makes cheese."
    missing = runner.invoke(app, ["tools", "search", "q"])
    assert missing.exit_code == 2 and "error: no search source" in missing.output and "--cache" in missing.output
    down = runner.invoke(app, ["tools", "search", "q", "--url", f"http://127.0.0.1:{free_port()}/retrieve"])
    assert down.exit_code == 1 and "unreachable" in down.output
    assert runner.invoke(app, ["tools", "search", "--help"]).exit_code == 0


def test_bm25_backend_does_not_start_jax(tmp_path):
    """bm25s runs a JAX op at import when JAX is installed, and JAX then claims most of the GPU's
    memory in every process: BM25Backend hides JAX from that import."""
    import subprocess
    import sys

    fake = tmp_path / "jax"
    fake.mkdir()
    (fake / "__init__.py").write_text(f"open({str(tmp_path / 'imported')!r}, 'w').close()\n")
    (fake / "lax.py").write_text("def top_k(x, k):\n    return x, k\n")
    code = ("from aepo.tools.search import BM25Backend\n"
            "b = BM25Backend([{'text': 'paris is the capital of france'}])\n"
            "assert b.search('capital of france', 1)\n"
            "import sys; assert 'jax' not in sys.modules\n")
    src = SRC
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{tmp_path}:{src}"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not (tmp_path / "imported").exists()
    # the fake is importable, so the check above can fail: importing it directly marks the file
    subprocess.run([sys.executable, "-c", "import jax"], env=env, check=True, timeout=60)
    assert (tmp_path / "imported").exists()
