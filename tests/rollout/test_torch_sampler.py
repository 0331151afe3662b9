"""TorchSampler: cached sampling equals full recomputation, forks, greedy vs HF generate,
stop strings, EOS, budgets, seeds, the sampling distribution, and bad input."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import GPT2Config, LlamaConfig, Qwen2Config, Qwen3Config

from aepo.rollout.sampler import TorchSampler, lean, supports_lean_forward, torch_sampler
from aepo.rollout.sampler.layout import chunk_length, padded_ranges, put_chunks, take_spans, truncate_chunks
from aepo.types import Generation, Sampler

torch.set_num_threads(1)

ARCHS = ("qwen3", "llama", "qwen2", "gpt2")
# the three forward paths: packed weights (small Llama-family models), the lean path calling
# the HF submodules, and the HF model's own forward
PATHS = {
    "packed": {"lean": True, "pack_weights": True},
    "modules": {"lean": True, "pack_weights": False},
    "hf": {"lean": False},
}


def sampler(model, tok, path: str = "packed", **kwargs) -> TorchSampler:
    s = TorchSampler(model, tok, **PATHS[path], **kwargs)
    assert s.lean == PATHS[path]["lean"]
    return s


# tok: the built-in tokenizer of tests/conftest.py


def make_model(arch: str, vocab: int, seed: int = 0) -> torch.nn.Module:
    """A 2-layer, hidden-64 model with 4 query heads over 2 kv heads (GQA)."""
    common = dict(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    if arch == "qwen3":
        config = Qwen3Config(head_dim=16, **common)
    elif arch == "llama":
        config = LlamaConfig(head_dim=16, **common)
    elif arch == "qwen2":
        config = Qwen2Config(**common)
    else:
        config = GPT2Config(
            vocab_size=vocab,
            n_embd=64,
            n_layer=2,
            n_head=4,
            n_positions=512,
            bos_token_id=None,
            eos_token_id=None,
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_config(config)
    model.generation_config.eos_token_id = None
    return model.eval()


@pytest.fixture(scope="module")
def models(tok):
    return {arch: make_model(arch, len(tok)) for arch in ARCHS}


def full_scores(model, ids: list[int], temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs [n, V] and entropies [n] of the next token after each prefix, one plain forward."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    logp = torch.log_softmax(logits / temperature, dim=-1)
    return logp, -(logp.exp() * logp).sum(-1)


def check_against_full(model, ids: list[int], start: int, gen: Generation, temperature: float) -> None:
    """`gen` sits at ids[start:start+n]; its logprobs/entropies match a fresh full forward."""
    n = len(gen.token_ids)
    assert ids[start : start + n] == gen.token_ids
    logp, entropy = full_scores(model, ids, temperature)
    expected_lp = logp[start - 1 : start + n - 1].gather(-1, torch.tensor(gen.token_ids)[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(gen.logprobs), expected_lp, atol=1e-4, rtol=0)
    torch.testing.assert_close(
        torch.tensor(gen.entropies), entropy[start - 1 : start + n - 1], atol=1e-4, rtol=0
    )


def prompts(tok) -> list[list[int]]:
    texts = [
        "The capital of",
        "Where is the river near the old town, said the man",
        "a",
        "<search>capital of France</search>",
        "one two three four five",
        "I think",
    ]
    return [tok.encode(t) for t in texts]


# ---------------------------------------------------------------------------- correctness


@pytest.mark.parametrize(
    "arch,path,block",
    [
        ("qwen3", "packed", 128),
        ("qwen3", "packed-graphs", 128),
        ("qwen3", "modules-graphs", 2),
        ("llama", "modules-graphs", 128),
        ("qwen3", "packed", 2),
        ("qwen3", "packed", -1),
        ("qwen3", "modules", 128),
        ("qwen3", "modules", 2),
        ("qwen3", "modules", -1),
        ("qwen3", "hf", 128),
        ("llama", "packed", 128),
        ("llama", "modules", 128),
        ("qwen2", "packed", 128),
        ("qwen2", "modules", 128),
        ("gpt2", "hf", 128),
    ],
)
def test_cached_sampling_equals_full_recomputation(tok, models, monkeypatch, arch, path, block):
    """`-graphs`: decode steps through `DecodeGraphs`' static-shape step (run without capture on
    the CPU), in windows of 4 columns so the calls cross several windows."""
    graphs = path.endswith("-graphs")
    path = path.removesuffix("-graphs")
    monkeypatch.setattr(lean, "GRAPH_COLUMNS", 4)
    if block < 0:  # each run of equal pending lengths prefilled in a pass of its own
        monkeypatch.setattr(lean, "PREFILL_PASS_OVERHEAD_TOKENS", 0)
        block = 128
    monkeypatch.setattr(torch_sampler, "DECODE_BLOCK", block)  # 2: the batch cache grows while decoding
    model = models[arch]
    temperature = 0.7
    # top-k/top-p only restrict what is sampled; logprobs are those of the plain tempered softmax
    s = sampler(model, tok, path, temperature=temperature, top_k=50, top_p=0.95, seed=3, decode_graphs=graphs)
    static_steps = []
    run_static = lean.DecodeGraphs._run
    monkeypatch.setattr(lean.DecodeGraphs, "_run", lambda self: static_steps.append(self.key) or run_static(self))
    ps = prompts(tok)
    rows = [s.new_row(p) for p in ps]
    spans: dict[int, list[tuple[int, Generation]]] = {r: [] for r in rows}

    def run(handles, budget):
        starts = [len(s.tokens(h)) for h in handles]
        for h, start, gen in zip(handles, starts, s.generate(handles, budget)):
            spans[h].append((start, gen))

    # rows of different lengths; the short budgets finish early so the batch gets compacted
    run(rows, [3, 9, 2, 2, 2, 2])
    s.append(rows[0], tok.encode("<result>\nPage 1: hello world\n</result>"))
    s.append(rows[3], tok.encode(" 12"))
    fork_mid = s.fork(rows[1], len(ps[1]) + 4)  # inside the generated part: truncates
    fork_all = s.fork(rows[2])
    spans[fork_mid], spans[fork_all] = [], []
    run(rows + [fork_mid, fork_all], [5, 6, 7, 4, 5, 6, 8, 3])
    run([rows[1], fork_mid], 4)  # a third turn: multi-chunk caches
    assert (s._packed is not None) == (path == "packed")
    # every decode step went through the static step when asked, in several windows
    assert len(static_steps) == (0 if not graphs else 8 + 7 + 3)  # max budget - 1 per call and len(set(static_steps)) > (3 if graphs else -1)

    for handle, items in spans.items():
        ids = s.tokens(handle)
        for start, gen in items:
            check_against_full(model, ids, start, gen, temperature)
            assert gen.finish == "length"
    assert s.tokens(fork_mid)[: len(ps[1]) + 4] == s.tokens(rows[1])[: len(ps[1]) + 4]


def test_padded_ranges_are_the_cheapest_cut():
    # Brute force over every way to cut the sorted rows where their length changes.
    import itertools
    import random

    rng = random.Random(0)
    for _ in range(200):
        lengths = sorted((rng.choice([1, 1, 3, 10, 40, 41, 90]) for _ in range(rng.randint(1, 9))), reverse=True)
        overhead = rng.choice([0, 30, 200, 10_000])
        ranges = padded_ranges(lengths, overhead)
        assert ranges[0][0] == 0 and ranges[-1][1] == len(lengths)
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))

        def cost(rs):
            return sum((r1 - r0) * lengths[r0] + overhead for r0, r1 in rs)

        cuts = [i for i in range(1, len(lengths)) if lengths[i] != lengths[i - 1]]
        best = min(
            cost(list(zip((0, *chosen), (*chosen, len(lengths)))))
            for k in range(len(cuts) + 1) for chosen in itertools.combinations(cuts, k)
        )
        assert cost(ranges) == best
    assert padded_ranges([5, 9, 7], 0) == [(0, 3)]  # not sorted: one range
    assert padded_ranges([9, 9, 1], 0) == [(0, 2), (2, 3)]
    assert padded_ranges([], 0) == []


@pytest.mark.parametrize("path", list(PATHS))
def test_fork_equals_generation_from_scratch(tok, models, path):
    model = models["qwen3"]
    s = sampler(model, tok, path, temperature=0.0)
    prompt = tok.encode("The capital of the country is")
    parent = s.new_row(prompt)
    s.generate([parent], 10)
    position = len(prompt) + 6
    child = s.fork(parent, position)
    assert s.tokens(child) == s.tokens(parent)[:position]
    assert s.cached_length(child) == position  # shares the parent's cache, nothing recomputed yet
    branch = s.generate([child], 7)[0]

    fresh = sampler(model, tok, path, temperature=0.0)
    scratch = fresh.generate([fresh.new_row(s.tokens(parent)[:position])], 7)[0]
    assert branch.token_ids == scratch.token_ids
    torch.testing.assert_close(
        torch.tensor(branch.logprobs), torch.tensor(scratch.logprobs), atol=1e-5, rtol=0
    )
    torch.testing.assert_close(
        torch.tensor(branch.entropies), torch.tensor(scratch.entropies), atol=1e-5, rtol=0
    )
    # the parent is untouched by its child's generation
    assert len(s.tokens(parent)) == len(prompt) + 10


def test_packed_weights_follow_parameter_updates(tok):
    model = make_model("qwen3", len(tok))
    s = sampler(model, tok, "packed", temperature=1.0, seed=0)
    s.generate([s.new_row(prompts(tok)[0])], 3)
    with torch.no_grad():  # what an optimizer step does: in-place updates
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    row = s.new_row(prompts(tok)[1])
    gen = s.generate([row], 6)[0]
    check_against_full(model, s.tokens(row), len(prompts(tok)[1]), gen, 1.0)


def test_fork_never_recomputes_the_shared_prefix(tok, models):
    model = models["qwen3"]
    s = TorchSampler(model, tok, temperature=1.0, seed=0)
    parent = s.new_row(tok.encode("a long shared prefix with many words in it , and then some more words"))
    s.generate([parent], 20)
    embedded: list[int] = []
    hook = model.model.embed_tokens.register_forward_hook(lambda m, inp, out: embedded.append(inp[0].numel()))
    try:
        branches = [s.fork(parent) for _ in range(3)]
        s.generate(branches, 5)
    finally:
        hook.remove()
    # one prefill of each branch's single uncached token (the parent's last sample), then 4 steps
    assert embedded == [3, 3, 3, 3, 3]


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("mode", ["temperature0", "top_k1"])
def test_greedy_equals_hf_generate(tok, models, path, mode):
    model = models["llama"]
    kwargs = dict(temperature=0.0) if mode == "temperature0" else dict(temperature=1.0, top_k=1, seed=5)
    s = sampler(model, tok, path, eos_token_ids=[], **kwargs)
    ps = prompts(tok)[:4]
    gens = s.generate([s.new_row(p) for p in ps], 12)

    width = max(map(len, ps))
    input_ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in ps])
    attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ps])
    with torch.no_grad():
        out = model.generate(
            input_ids,
            attention_mask=attention,
            do_sample=False,
            max_new_tokens=12,
            pad_token_id=tok.pad_token_id,
        )
    assert [g.token_ids for g in gens] == out[:, width:].tolist()


# ---------------------------------------------------------------------------- stopping


def greedy_run(tok, model, prompt, n, eos_token_ids=()):
    s = TorchSampler(model, tok, temperature=0.0, eos_token_ids=eos_token_ids)
    return s.generate([s.new_row(prompt)], n)[0]


def test_single_token_stop_eos_and_length(tok, models):
    model = models["qwen3"]
    prompt = tok.encode("The old man said")
    free = greedy_run(tok, model, prompt, 24)
    assert free.finish == "length" and len(free.token_ids) == 24
    target = free.token_ids[5]
    first = free.token_ids.index(target)

    s = TorchSampler(model, tok, temperature=0.0, eos_token_ids=[])
    stop_text = tok.decode([target])
    assert tok.encode(stop_text, add_special_tokens=False) == [target]  # a single-token stop
    stopped = s.generate([s.new_row(prompt)], 24, stop=["</answer>", stop_text])[0]
    assert stopped.token_ids == free.token_ids[: first + 1]
    assert (stopped.finish, stopped.stop) == ("stop", stop_text)

    eos = TorchSampler(model, tok, temperature=0.0, eos_token_ids=[target])
    ended = eos.generate([eos.new_row(prompt)], 24)[0]
    assert ended.token_ids == free.token_ids[: first + 1]
    assert (ended.finish, ended.stop) == ("eos", None)


def test_multi_token_stop_string(tok, models):
    model = models["qwen3"]
    prompt = tok.encode("Where is the")
    free = greedy_run(tok, model, prompt, 30)
    # a stop string spanning two generated tokens that is not itself one token
    for j in range(len(free.token_ids) - 1):
        stop_text = tok.decode(free.token_ids[j : j + 2])
        if len(tok.encode(stop_text, add_special_tokens=False)) > 1 and stop_text.strip():
            break
    else:
        pytest.skip("no two-token stop string in this greedy sample")
    expected = next(m for m in range(1, 31) if stop_text in tok.decode(free.token_ids[:m]))

    s = TorchSampler(model, tok, temperature=0.0, eos_token_ids=[])
    row = s.new_row(prompt)
    gen = s.generate([row], 30, stop=[stop_text])[0]
    assert gen.token_ids == free.token_ids[:expected]
    assert (gen.finish, gen.stop) == ("stop", stop_text)
    assert s.tokens(row)[len(prompt) :] == gen.token_ids  # stop tokens are part of the row


def test_per_row_budgets_and_zero_budget(tok, models):
    s = TorchSampler(models["qwen3"], tok, seed=1, eos_token_ids=[])
    rows = [s.new_row(p) for p in prompts(tok)[:3]]
    gens = s.generate(rows, [0, 1, 6])
    assert [len(g.token_ids) for g in gens] == [0, 1, 6]
    assert [g.finish for g in gens] == ["length"] * 3
    assert gens[0] == Generation([], [], [], "length")
    assert all(lp <= 0 for g in gens for lp in g.logprobs)
    assert all(
        0 <= h <= torch.log(torch.tensor(float(len(tok)))).item() + 1e-4 for g in gens for h in g.entropies
    )


def test_same_seed_same_samples(tok, models):
    def sample(seed):
        s = TorchSampler(models["qwen3"], tok, temperature=1.0, seed=seed, eos_token_ids=[])
        rows = [s.new_row(p) for p in prompts(tok)]
        return [g.token_ids for g in s.generate(rows, 16)]

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)


def test_max_batch_rows_splits_without_changing_results(tok, models):
    def run(max_rows):
        s = TorchSampler(models["qwen3"], tok, temperature=0.0, max_batch_rows=max_rows, eos_token_ids=[])
        return s.generate([s.new_row(p) for p in prompts(tok)], 6)

    small, large = run(2), run(64)
    assert [g.token_ids for g in small] == [g.token_ids for g in large]
    for a, b in zip(small, large):
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------- sampling distribution


def test_draw_follows_the_filtered_distribution(tok, models):
    s = TorchSampler(models["qwen3"], tok, temperature=1.0, seed=0)
    weights = torch.tensor([[0.1, 0.0, 0.6, 0.3]]).repeat(40000, 1)
    counts = torch.bincount(s._draw(weights), minlength=4).float() / 40000
    torch.testing.assert_close(counts, torch.tensor([0.1, 0.0, 0.6, 0.3]), atol=0.01, rtol=0)


def test_top_k_and_top_p_restrict_samples_but_not_logprobs(tok, models):
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]]).repeat(2000, 1)
    full = torch.log_softmax(logits[0] / 0.5, -1)
    for kwargs, allowed in [(dict(top_k=2), {0, 1}), (dict(top_p=0.9), {0, 1})]:
        # softmax(logits / 0.5) = [.84, .11, .04, .02, .00]: the 0.9 nucleus is {0, 1}
        s = TorchSampler(models["qwen3"], tok, temperature=0.5, seed=0, **kwargs)
        tokens, logp, entropy = s._sample(logits)
        assert set(tokens.tolist()) == allowed
        torch.testing.assert_close(logp, full[tokens], atol=1e-6, rtol=0)
        torch.testing.assert_close(entropy[0], -(full.exp() * full).sum(), atol=1e-6, rtol=0)


def test_masked_logits_give_finite_entropy_and_are_never_sampled(tok, models):
    s = TorchSampler(models["qwen3"], tok, temperature=1.0, seed=0)
    logits = torch.tensor([[1.0, float("-inf"), 0.0, float("-inf")]]).repeat(500, 1)
    tokens, logp, entropy = s._sample(logits)
    p = torch.softmax(torch.tensor([1.0, 0.0]), -1)
    torch.testing.assert_close(entropy, torch.full((500,), float(-(p * p.log()).sum())), atol=1e-6, rtol=0)
    assert set(tokens.tolist()) == {0, 2}
    assert torch.isfinite(logp).all()


# ---------------------------------------------------------------------------- interface and errors


def test_implements_the_sampler_protocol_and_release(tok, models):
    s: Sampler = TorchSampler(models["qwen3"], tok, seed=0)
    row = s.new_row([5, 6, 7])
    s.append(row, [8])
    assert s.tokens(row) == [5, 6, 7, 8]
    s.release(row)
    with pytest.raises(ValueError, match="unknown row"):
        s.tokens(row)


def test_bad_input_raises_clear_errors(tok, models):
    s = TorchSampler(models["qwen3"], tok, seed=0)
    row = s.new_row([5, 6, 7])
    with pytest.raises(ValueError, match="prompt_ids is empty"):
        s.new_row([])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        s.append(row, [len(tok) + 5])
    with pytest.raises(ValueError, match="position 0 outside"):
        s.fork(row, 0)
    with pytest.raises(ValueError, match="position 9 outside"):
        s.fork(row, 9)
    with pytest.raises(ValueError, match="unknown row"):
        s.generate([row, 99], 3)
    with pytest.raises(ValueError, match="distinct"):
        s.generate([row, row], 3)
    with pytest.raises(ValueError, match="max_new_tokens"):
        s.generate([row], [1, 2])
    with pytest.raises(ValueError, match=">= 0"):
        s.generate([row], -1)
    with pytest.raises(ValueError, match="stop strings"):
        s.generate([row], 2, stop=[""])
    with pytest.raises(ValueError, match="temperature"):
        TorchSampler(models["qwen3"], tok, temperature=-1.0)
    with pytest.raises(ValueError, match="top_p"):
        TorchSampler(models["qwen3"], tok, top_p=0.0)
    with pytest.raises(ValueError, match="lean=True"):
        TorchSampler(models["gpt2"], tok, lean=True)
    assert supports_lean_forward(models["qwen2"]) and not supports_lean_forward(models["gpt2"])


def test_pause_splits_a_call_without_changing_the_generation(tok, models):
    """generate(..., pause) ends the still-running rows "paused" once a row stopped; continuing
    them gives the generation of one unpaused call: the same greedy tokens and scores, and a
    multi-token stop string spanning the pause is still found."""
    model, budget = models["qwen3"], 20
    ps = prompts(tok)

    def fresh():
        s = TorchSampler(model, tok, temperature=0.0, eos_token_ids=[])
        return s, [s.new_row(p) for p in ps]

    s, rows = fresh()
    greedy = [g.token_ids for g in s.generate(rows, budget)]
    spec = s._stop_spec
    found = None
    for pos in range(1, 4):  # a one-token stop that ends row 0 early
        t0 = greedy[0][pos]
        stop0 = tok.decode([t0])
        if not spec((stop0,)).token_stops:
            continue
        p = min(g.index(t0) if t0 in g else budget for g in greedy) + 1  # where the call pauses
        for r in range(1, len(ps)):
            g = greedy[r]
            if t0 in g[: p + 1] or p + 1 > len(g):
                continue
            stop1 = tok.decode(g[p - 1 : p + 1])  # the last paused token and the next one
            if stop1 and not spec((stop1,)).token_stops and stop1 not in tok.decode(g[:p]):
                found = (stop0, stop1, p, r)
                break
        if found:
            break
    assert found, "no stop strings to build the test from"
    stop0, stop1, p, r = found

    s, rows = fresh()
    expected = s.generate(rows, budget, stop=(stop0, stop1))
    s, rows = fresh()
    first = s.generate(rows, budget, stop=(stop0, stop1), pause=0.99)
    paused = [i for i, g in enumerate(first) if g.finish == "paused"]
    assert paused and r in paused and all(len(first[i].token_ids) == p for i in paused)
    paused_row = s._rows[rows[r]]
    assert paused_row.open == first[r].token_ids  # kept for stops across the pause
    assert s._rows[s.fork(rows[r])].open == paused_row.open
    assert s._rows[s.fork(rows[r], len(paused_row.ids) - 1)].open == paused_row.open[:-1]
    second = s.generate([rows[i] for i in paused], [budget - p] * len(paused), stop=(stop0, stop1))
    assert all(not s._rows[rows[i]].open for i in range(len(rows)))  # cleared once a row finished
    assert second[paused.index(r)].finish == "stop" and second[paused.index(r)].stop == stop1
    assert len(second[paused.index(r)].token_ids) == 1  # found across the pause
    rest = dict(zip(paused, second))
    for i, (one, want) in enumerate(zip(first, expected)):
        tail = rest.get(i)
        tokens = one.token_ids + (tail.token_ids if tail else [])
        assert tokens == want.token_ids and (tail or one).finish == want.finish
        assert (tail or one).stop == want.stop
        got_lp = one.logprobs + (tail.logprobs if tail else [])
        torch.testing.assert_close(torch.tensor(got_lp), torch.tensor(want.logprobs), atol=1e-5, rtol=0)
        check_against_full(model, s.tokens(rows[i]), len(ps[i]), Generation(tokens, got_lp, one.entropies + (
            tail.entropies if tail else []), want.finish, want.stop), 1.0)
    with pytest.raises(ValueError, match="pause must be in"):
        s.generate(rows, 2, pause=1.0)


def test_failed_graph_capture_falls_back_to_eager_decoding(tok, models, monkeypatch):
    """A torch build that cannot capture the step warns once per batch and decodes eagerly."""
    def refuse(self):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(lean.DecodeGraphs, "_capture", refuse)
    model = models["qwen3"]
    expected = greedy_run(tok, model, tok.encode("The capital of"), 12)
    s = TorchSampler(model, tok, temperature=0.0, eos_token_ids=[], decode_graphs=True)
    original = lean.LeanBatch.use_decode_graphs
    monkeypatch.setattr(lean.LeanBatch, "use_decode_graphs", lambda self, capture=True: original(self, True))
    with pytest.warns(UserWarning, match="CUDA graph capture of the decode step failed"):
        gen = s.generate([s.new_row(tok.encode("The capital of"))], 12)[0]
    assert gen.token_ids == expected.token_ids


def test_rollout_decode_graphs_setting_reaches_the_sampler(tok, models):
    """rollout.decode_graphs=true means "on CUDA" (the CPU decodes eagerly); false is off."""
    from aepo.rollout.config import RolloutConfig
    from aepo.rollout.sampler.backend import TorchBackend

    on = TorchBackend(models["qwen3"], tok, RolloutConfig()).sampler(0)
    off = TorchBackend(models["qwen3"], tok, RolloutConfig(decode_graphs=False)).sampler(0)
    assert on.decode_graphs == (on.device.type == "cuda") and off.decode_graphs is False


# ---------------------------------------------------------------------------- CUDA


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("lean", [True, False])
def test_cuda_cached_sampling_equals_full_recomputation(tok, lean):
    cpu_model = make_model("qwen3", len(tok))
    model = copy.deepcopy(cpu_model).cuda()
    s = TorchSampler(model, tok, temperature=1.0, seed=0, lean=lean)
    assert s.device.type == "cuda"
    ps = prompts(tok)
    rows = [s.new_row(p) for p in ps]
    first = s.generate(rows, [4, 8, 2, 2, 2, 2])
    s.append(rows[0], tok.encode("<result> ok </result>"))
    child = s.fork(rows[1], len(ps[1]) + 2)
    second = s.generate(rows + [child], 6)
    for handle, gen in zip(rows + [child], second):
        ids = s.tokens(handle)
        check_against_full(cpu_model, ids, len(ids) - len(gen.token_ids), gen, 1.0)
    for handle, gen, prompt in zip(rows, first, ps):
        check_against_full(cpu_model, s.tokens(handle), len(prompt), gen, 1.0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bfloat16_greedy_matches_hf_generate(tok):
    model = make_model("qwen3", len(tok)).cuda().to(torch.bfloat16)
    s = TorchSampler(model, tok, temperature=0.0, eos_token_ids=[])
    prompt = tok.encode("The capital of")
    gen = s.generate([s.new_row(prompt)], 10)[0]
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt], device="cuda"),
            do_sample=False,
            max_new_tokens=10,
            pad_token_id=tok.pad_token_id,
        )
    assert gen.token_ids == out[0, len(prompt) :].tolist()
    assert all(torch.isfinite(torch.tensor(gen.logprobs)))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_decode_equals_eager_decode(tok, monkeypatch):
    """Decode steps replayed as CUDA graphs give the eager steps' tokens and scores (float32),
    across several column windows, a cache grow and a batch compaction."""
    model = make_model("qwen3", len(tok)).cuda()
    captures = []
    capture = lean.DecodeGraphs._capture
    monkeypatch.setattr(lean.DecodeGraphs, "_capture", lambda self: captures.append(self.key) or capture(self))
    budgets = [150, 90, 4, 4, 4, 4, 4, 4]
    outs = {}
    for graphs in (True, False):
        s = TorchSampler(model, tok, temperature=0.0, eos_token_ids=[], decode_graphs=graphs)
        rows = [s.new_row(p) for p in prompts(tok) + prompts(tok)[:2]]
        outs[graphs] = s.generate(rows, budgets)
    assert len(captures) >= 4 and len({key[0] for key in captures}) >= 2  # windows; grow/compaction
    for with_graph, eager in zip(outs[True], outs[False]):
        assert with_graph.token_ids == eager.token_ids
        torch.testing.assert_close(torch.tensor(with_graph.logprobs), torch.tensor(eager.logprobs), atol=1e-4, rtol=0)
        torch.testing.assert_close(torch.tensor(with_graph.entropies), torch.tensor(eager.entropies), atol=1e-4, rtol=0)


@pytest.mark.parametrize("pack", [True, False])
def test_a_generate_call_frees_its_batch_cache_when_it_returns(tok, models, pack):
    """A LeanBatch and its ops (and decode graphs) hold no reference cycle, so the batch cache of
    a `generate` call is freed as the call returns, not at some later gc pass; a running batch
    that grows keeps only its current forward."""
    import gc

    from aepo.rollout.sampler.lean import LeanBatch
    from aepo.rollout.sampler.streams import RowKey

    def alive() -> int:
        return sum(type(o) is LeanBatch for o in gc.get_objects())  # not the ops' weak proxies

    gc.collect()
    gc.disable()
    try:
        before = alive()
        s = TorchSampler(models["qwen3"], tok, temperature=1.0, seed=0, pack_weights=pack, eos_token_ids=[])
        s.generate([s.new_row(tok.encode(t)) for t in ("The capital of", "a b")], 12)
        assert alive() == before
        batch = s.open_batch(max_rows=4)
        for i in range(3):
            batch.start(s.new_row(tok.encode("one two three " * (i + 1))), 140, RowKey(0, 0, i))
        while batch.active:
            batch.step()
        assert batch.keys[0].shape[2] > 129  # it grew at least once
        assert alive() == before + 1  # batch.decoder only
    finally:
        gc.enable()


def test_take_spans_copies_each_span_and_frees_the_cache_layer_by_layer():
    """Chunks of (slot, start, end) spans equal the cache's columns, share no memory with the
    cache (they do not keep it alive), and with `free` each layer of the cache is dropped once
    its spans are copied out (the end of a generate call holds one extra layer, not a copy);
    `put_chunks` writes chunks back at any slot and column."""
    g = torch.Generator().manual_seed(0)
    keys = [torch.randn(3, 2, 9, 4, generator=g) for _ in range(3)]
    values = [torch.randn(3, 2, 9, 4, generator=g) for _ in range(3)]
    spans = [(2, 1, 6), (0, 4, 9), (1, 0, 1), (2, 6, 8)]
    original = ([k.clone() for k in keys], [v.clone() for v in values])
    seen = []

    class Watched(list):  # records which layers are still held when the next one is read
        def __getitem__(self, index):
            seen.append((index, [layer.numel() > 0 for layer in self]))
            return list.__getitem__(self, index)

    chunks = take_spans(Watched(keys), Watched(values), spans, free=False)
    assert len(chunks) == 4
    for (slot, a, b), chunk in zip(spans, chunks):
        assert chunk_length(chunk) == b - a
        for layer in range(3):
            torch.testing.assert_close(chunk[0][layer], original[0][layer][slot, :, a:b], rtol=0, atol=0)
            torch.testing.assert_close(chunk[1][layer], original[1][layer][slot, :, a:b], rtol=0, atol=0)
            cache_ptr = keys[layer].untyped_storage().data_ptr()
            assert chunk[0][layer].untyped_storage().data_ptr() != cache_ptr
    # a partial chunk is a view of the same positions
    (part,) = truncate_chunks([chunks[0]], 3)
    torch.testing.assert_close(part[0][1], original[0][1][2, :, 1:4], rtol=0, atol=0)
    seen.clear()
    watched_keys, watched_values = Watched(keys), Watched(values)
    freed = take_spans(watched_keys, watched_values, spans, free=True)
    for chunk, again in zip(freed, chunks):
        for layer in range(3):
            assert torch.equal(chunk[0][layer], again[0][layer]) and torch.equal(chunk[1][layer], again[1][layer])
    assert all(layer.numel() == 0 for layer in list(watched_keys) + list(watched_values))
    # when a layer is read, the layers before it are already freed (keys, then values)
    assert {index for index, _ in seen} == {0, 1, 2}
    assert all(held[index:] == [True] * (3 - index) and not any(held[:index]) for index, held in seen)
    assert take_spans(keys, values, []) == []
    # put_chunks places them back: two chunks after each other in one slot, one elsewhere, an
    # empty one ignored
    empty = take_spans(original[0], original[1], [(0, 3, 3)])[0]
    out_k = [torch.zeros(2, 2, 12, 4) for _ in range(3)]
    out_v = [torch.zeros(2, 2, 12, 4) for _ in range(3)]
    put_chunks(out_k, out_v, [(1, 2, chunks[0]), (1, 7, chunks[3]), (0, 0, chunks[1]), (0, 5, empty)])
    for layer in range(3):
        for side, out in enumerate((out_k, out_v)):
            want = torch.zeros(2, 2, 12, 4)
            want[1, :, 2:7] = original[side][layer][2, :, 1:6]
            want[1, :, 7:9] = original[side][layer][2, :, 6:8]
            want[0, :, 0:5] = original[side][layer][0, :, 4:9]
            assert torch.equal(out[layer], want)


def test_a_generate_calls_chunks_do_not_keep_its_batch_cache(tok, models):
    """After `generate`, every row's new chunk is a copy: the batch cache's tensors are gone
    (checked with gc off), so the rows hold only the positions they filled."""
    import gc
    import weakref

    caches = []
    init = lean.LeanBatch.__init__

    def spy(self, model, layout, keys, values, *args, **kwargs):
        caches.extend(weakref.ref(t) for t in keys + values)
        init(self, model, layout, keys, values, *args, **kwargs)

    gc.collect()
    gc.disable()
    try:
        s = TorchSampler(models["qwen3"], tok, temperature=1.0, seed=0, eos_token_ids=[])
        lean.LeanBatch.__init__ = spy
        try:
            rows = [s.new_row(tok.encode(t)) for t in ("The capital of", "a b", "one two three four five six")]
            s.generate(rows, 20)
        finally:
            lean.LeanBatch.__init__ = init
        assert caches and all(ref() is None for ref in caches)
        for r in rows:
            assert sum(chunk_length(c) for c in s._row(r).chunks) == s.cached_length(r) == len(s.tokens(r)) - 1
    finally:
        gc.enable()
