"""SlotBatch, the torch sampler's running batch: rows of different lengths that join, leave,
take tool results and fork mid-run give exactly what a fresh full forward gives; draws come
from per-row streams, so a row's tokens do not depend on its neighbours."""
from __future__ import annotations

import pytest
import torch
from test_torch_sampler import check_against_full, make_model

from aepo.rollout.sampler import TorchSampler, capture, continuous, slot_graphs
from aepo.rollout.sampler.continuous import _join_groups, decode_segments
from aepo.rollout.sampler.slot_graphs import bucket
from aepo.rollout.sampler.streams import RowKey, row_uniform, stream_state, uniform_at

torch.set_num_threads(1)


@pytest.fixture(scope="module", params=["qwen3", "llama", "qwen2"])
def model(request, tok):
    return make_model(request.param, len(tok))


TEXTS = ["The capital of", "Where is the river near the old town, said the man", "a", "one two three four five"]


def run_all(batch, budgets_left: dict[int, int]) -> dict[int, list]:
    """Step until every started row ended; the Generations per row in order."""
    out: dict[int, list] = {}
    while batch.active:
        for row, gen in batch.step():
            out.setdefault(row, []).append(gen)
    return out


@pytest.mark.parametrize("pack", [True, False])
def test_rows_joining_late_tool_results_and_forks_match_a_full_forward(model, tok, pack):
    s = TorchSampler(model, tok, temperature=1.0, seed=3, pack_weights=pack)
    batch = s.open_batch(max_rows=8)
    rows = [s.new_row(tok.encode(t)) for t in TEXTS]
    starts = {r: len(s.tokens(r)) for r in rows}
    batch.start(rows[0], 9, RowKey(0, 0, 0))
    batch.start(rows[1], 5, RowKey(0, 1, 0))
    ended: dict[int, object] = {}
    forked = None
    for step in range(40):
        if step == 2:  # a row joins while others decode
            batch.start(rows[2], 7, RowKey(0, 2, 0))
        if step == 3:  # fork a running row mid-segment: the child shares its cached prefix
            forked = s.fork(rows[0], starts[rows[0]] + 2)
            starts[forked] = starts[rows[0]] + 2
            batch.start(forked, 6, RowKey(0, 0, 1))
        for row, gen in batch.step():
            ended[row] = gen
        if not batch.active and step > 4:
            break
    assert set(ended) == {rows[0], rows[1], rows[2], forked}
    for row, gen in ended.items():
        assert gen.finish == "length"
        check_against_full(model, s.tokens(row), starts[row], gen, 1.0)
    # a tool result appended to an ended row, then a second segment beside a new row
    s.append(rows[1], tok.encode(" result: Paris."))
    second = len(s.tokens(rows[1]))
    batch.start(rows[1], 6, RowKey(0, 1, 0))
    batch.start(rows[3], 4, RowKey(0, 3, 0))
    out = run_all(batch, {})
    check_against_full(model, s.tokens(rows[1]), second, out[rows[1]][0], 1.0)
    check_against_full(model, s.tokens(rows[3]), starts[rows[3]], out[rows[3]][0], 1.0)
    for r in list(s._rows):
        s.release(r)
    assert s.n_rows == 0 and batch.active == 0


def test_a_rows_tokens_do_not_depend_on_its_neighbours(model, tok):
    """The same row (same key, same seed) alone, beside others, or joining later samples the
    same tokens: its draws come from row_uniform(seed, key, position)."""
    def sample(others: int, delay: int) -> list[int]:
        s = TorchSampler(model, tok, temperature=1.0, seed=11)
        batch = s.open_batch(max_rows=8)
        for k in range(others):
            batch.start(s.new_row(tok.encode(TEXTS[k % len(TEXTS)])), 12, RowKey(0, 5, k))
        target = s.new_row(tok.encode("The capital of"))
        got = None
        for step in range(60):
            if step == delay:
                batch.start(target, 10, RowKey(0, 0, 0))
            for row, gen in batch.step():
                if row == target:
                    got = gen.token_ids
            if got is not None:
                break
        return got

    alone = sample(0, 0)
    assert len(alone) == 10
    assert sample(3, 0) == alone
    assert sample(3, 4) == alone
    # another key samples differently (the streams are not shared)
    s = TorchSampler(model, tok, temperature=1.0, seed=11)
    batch = s.open_batch()
    row = s.new_row(tok.encode("The capital of"))
    batch.start(row, 10, RowKey(0, 0, 1))
    assert run_all(batch, {})[row][0].token_ids != alone


def test_many_rows_joining_in_one_step_match_a_full_forward(model, tok):
    """Rows of different pending lengths joining in the same step beside a decoding row run
    their attention in padded groups (`_join_groups`); each still matches a full forward."""
    s = TorchSampler(model, tok, temperature=1.0, seed=4)
    batch = s.open_batch(max_rows=8)
    texts = TEXTS + ["x y", "the the the the the the the the the the the the the the"]
    rows = [s.new_row(tok.encode(t)) for t in texts]
    starts = {r: len(s.tokens(r)) for r in rows}
    batch.start(rows[0], 8, RowKey(0, 0, 0))
    batch.step()  # rows[0] decodes while the others join together
    for i, r in enumerate(rows[1:], 1):
        batch.start(r, 5, RowKey(0, i, 0))
    out = run_all(batch, {})
    assert set(out) == set(rows)
    for r in rows[1:]:
        check_against_full(model, s.tokens(r), starts[r], out[r][0], 1.0)
    for r in rows:
        s.release(r)


def test_join_groups_bound_the_padding():
    assert _join_groups([]) == []
    assert _join_groups([5]) == [(0, 1)]
    assert _join_groups([10, 9, 8, 7]) == [(0, 4)]  # 40 padded for 34 real
    assert _join_groups([100, 10, 9, 1]) == [(0, 1), (1, 4)]  # 30 padded for 20 real
    assert _join_groups([6, 2, 2, 2]) == [(0, 2), (2, 4)]  # 12 for 8 (the bound); a third: 18 for 10
    assert _join_groups([3, 3, 1]) == [(0, 3)]  # 9 for 7


def test_decode_segments_cut_where_the_rest_reads_enough_fewer_cells(monkeypatch):
    monkeypatch.setattr(continuous, "SEGMENT_MIN_SAVING", 100)
    # sorted: the 3 rows after the first two would read 3 x (100 - 20) = 240 fewer cells
    assert decode_segments([100, 90, 20, 10, 5]) == [(0, 2, 100), (2, 5, 20)]
    # the last row alone would save 1 x (20 - 5) = 15 < 100: no cut before it
    assert decode_segments([100, 90, 20, 20, 5]) == [(0, 2, 100), (2, 5, 20)]
    # unsorted: a long row late in the order keeps the ranges before it wide
    assert decode_segments([20, 100, 10, 10, 10, 90]) == [(0, 6, 100)]
    assert decode_segments([100, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 60]) == [(0, 1, 100), (1, 12, 60)]
    assert decode_segments([7]) == [(0, 1, 7)] and decode_segments([]) == []
    monkeypatch.setattr(continuous, "SEGMENT_MIN_SAVING", 10**9)
    assert decode_segments([100, 90, 20, 10, 5]) == [(0, 5, 100)]


def test_ragged_decode_and_sorted_slots_give_the_same_rows(model, tok, monkeypatch):
    """Rows of very different lengths: attention split into ranges of similar lengths, and the
    slots sorted by length mid-run, sample what one padded attention over all slots samples,
    reading fewer cells; each row still matches a full forward."""
    long_text = " ".join(["the river near the old town"] * 12)

    def run(split: bool):
        monkeypatch.setattr(continuous, "SEGMENT_MIN_SAVING", 8 if split else 10**9)
        monkeypatch.setattr(continuous, "REORDER_EVERY", 4 if split else 10**9)
        s = TorchSampler(model, tok, temperature=1.0, seed=5)
        batch = s.open_batch(max_rows=8)
        # the longest row starts in slot 1: sorting moves it, and the short rows after it
        rows = [s.new_row(tok.encode(t)) for t in ("a", long_text, "The capital of", long_text[:40], "b c")]
        starts = {r: len(s.tokens(r)) for r in rows}
        for i, r in enumerate(rows[:3]):
            batch.start(r, 10, RowKey(0, i, 0))
        moved = set()
        out = {}
        for step in range(30):
            if step == 3:  # joins after the first rows: the order by length is lost
                batch.start(rows[3], 8, RowKey(0, 3, 0))
                batch.start(rows[4], 8, RowKey(0, 4, 0))
            slots = {r: run.slot for r, run in batch.rows.items()}
            out.update(batch.step())
            moved |= {r for r, slot in slots.items() if r in batch.rows and batch.rows[r].slot not in (slot, -1)}
            if not batch.active:
                break
        return s, out, starts, batch, moved

    s, split, starts, batch, moved = run(True)
    _, whole, _, whole_batch, _ = run(False)
    assert batch.read_cells < 0.8 * batch.decode_cells and whole_batch.read_cells == whole_batch.decode_cells
    assert batch.reorders > 0 and moved, "the slots were never sorted"
    for row, gen in split.items():
        assert gen.token_ids == whole[row].token_ids
        assert max(abs(a - b) for a, b in zip(gen.logprobs, whole[row].logprobs)) < 1e-5
        check_against_full(model, s.tokens(row), starts[row], gen, 1.0)


def test_the_cache_grows_by_a_quarter_and_reports_its_peak(model, tok):
    s = TorchSampler(model, tok, temperature=1.0, seed=0)
    batch = s.open_batch(max_rows=4)
    row = s.new_row(tok.encode("a"))
    batch.start(row, 300, RowKey(0, 0, 0))
    widths = set()
    while batch.active:
        batch.step()
        widths.add(batch.keys[0].shape[2] - 1)
    # 128-column blocks, each growth at most a quarter (rounded up to a block) above the last
    assert sorted(widths) == [128, 256, 384]
    per_column = sum(2 * k[:, :, :1].numel() * k.element_size() for k in batch.keys)
    assert batch.peak_cache_bytes == batch.cache_bytes == per_column * (384 + 1)


def test_a_row_that_left_rejoins_in_its_own_slot_or_from_its_chunks_when_evicted(model, tok):
    """A row that ends a segment parks in its slot (no copy); after a tool result it continues
    there. A fork of a parked row copies its positions out and the row stays parked. A parked
    row whose slot another row needs is evicted: its positions go to its chunks, and it rejoins
    from them. Every segment matches a full forward; closing the batch leaves every row's
    positions in its chunks."""
    s = TorchSampler(model, tok, temperature=1.0, seed=4)
    batch = s.open_batch(max_rows=2)
    a, b = s.new_row(tok.encode(TEXTS[0])), s.new_row(tok.encode(TEXTS[1]))
    batch.start(a, 3, RowKey(0, 0, 0))
    batch.start(b, 9, RowKey(0, 1, 0))
    batch.step()
    slot_a = batch.rows[a].slot
    chunks_a = list(s._row(a).chunks)
    while a in batch.rows:
        batch.step()
    assert batch.parked[a][0] == slot_a and s._row(a).chunks == chunks_a  # parked: nothing copied
    s.append(a, tok.encode(" result: Paris."))
    start = len(s.tokens(a))
    batch.start(a, 4, RowKey(0, 0, 0))
    batch.step()
    assert batch.rows[a].slot == slot_a and s._row(a).chunks == chunks_a  # continued in place
    out = run_all(batch, {})
    check_against_full(model, s.tokens(a), start, out[a][0], 1.0)

    # a fork of the parked row: its positions are copied out, it stays parked
    fork_at = len(s.tokens(a)) - 2
    child = s.fork(a, fork_at)
    assert a in batch.parked and s.cached_length(a) == len(s.tokens(a)) - 1
    s.append(a, tok.encode(" more."))
    start_a = len(s.tokens(a))
    batch.start(child, 5, RowKey(0, 0, 1))
    batch.start(a, 5, RowKey(0, 0, 0))
    out = run_all(batch, {})
    check_against_full(model, s.tokens(child), fork_at, out[child][0], 1.0)
    check_against_full(model, s.tokens(a), start_a, out[a][0], 1.0)

    # a third row needs a slot: the oldest parked row is evicted into its chunks
    parked_before = dict(batch.parked)
    c = s.new_row(tok.encode(TEXTS[3]))
    batch.start(c, 3, RowKey(0, 3, 0))
    batch.step()
    evicted = [r for r in parked_before if r not in batch.parked]
    assert evicted and len(batch.keys[0]) == 2  # no slot added beyond max_rows=2
    for r in evicted:
        assert s.cached_length(r) == len(s.tokens(r)) - 1
    r = evicted[0]
    s.append(r, tok.encode(" again"))
    start_r = len(s.tokens(r))
    batch.start(r, 4, RowKey(0, 9, 0))
    out = run_all(batch, {})
    check_against_full(model, s.tokens(r), start_r, out[r][0], 1.0)
    s.close_batch()
    for row in (a, b, child, c):
        assert s.cached_length(row) == len(s.tokens(row)) - 1


def test_stop_strings_and_zero_budget(model, tok):
    def run(stop: list[str]):
        s = TorchSampler(model, tok, temperature=1.0, seed=5)
        batch = s.open_batch(stop=stop)
        row = s.new_row(tok.encode("The capital of"))
        other = s.new_row(tok.encode("a"))
        batch.start(row, 12, RowKey(0, 0, 0))
        batch.start(other, 0, RowKey(0, 1, 0))
        out = run_all(batch, {})
        return out[row][0], out[other][0]

    free, empty = run([])
    assert empty.finish == "length" and empty.token_ids == []
    assert free.finish == "length" and len(free.token_ids) == 12
    texts = [tok.decode(free.token_ids[:j]) for j in range(13)]
    j = next(j for j in range(2, 12) if (t := tok.decode(free.token_ids[j - 1:j]).strip())
             and t not in texts[j - 1])
    stop = tok.decode(free.token_ids[j - 1:j]).strip()
    gen, _ = run([stop])
    assert gen.finish == "stop" and gen.stop == stop
    assert gen.token_ids == free.token_ids[:j]
    s = TorchSampler(model, tok, temperature=1.0, seed=5)
    batch = s.open_batch()
    with pytest.raises(ValueError, match="budget"):
        batch.start(s.new_row([5]), -1, RowKey(0, 0, 0))
    # a row started with no budget and released before the next step is gone, so the batch can
    # close (a rollout that fails releases its rows, then closes the batch)
    empty_row = s.new_row([5])
    batch.start(empty_row, 0, RowKey(0, 2, 0))
    assert batch.active == 1
    s.release(empty_row)
    assert batch.active == 0
    s.close_batch()


def test_row_uniform_is_a_fixed_function():
    a = row_uniform(7, (0, 1, 2), 5)
    assert a == row_uniform(7, (0, 1, 2), 5)
    assert 0.0 <= a < 1.0 and (a * (1 << 24)).is_integer()
    values = {row_uniform(7, (0, 1, 2), p) for p in range(2000)}
    assert len(values) > 1990  # distinct positions, distinct numbers
    assert row_uniform(8, (0, 1, 2), 5) != a and row_uniform(7, (0, 1, 3), 5) != a
    mean = sum(values) / len(values)
    assert abs(mean - 0.5) < 0.03


def _splitmix_chain(seed, parts):
    """splitmix64's mixer chained over the seed and each part, written out independently
    (docs/algorithms.md section 3.5): the numbers every continuous rollout's tokens come from."""
    mask = (1 << 64) - 1

    def mix(z):
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % (1 << 64)
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % (1 << 64)
        return z ^ (z >> 31)

    z = mix((seed * 0x9E3779B97F4A7C15 + 1) & mask)
    for part in parts:
        z = mix((z + (part & mask) * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) & mask)
    return (z >> 40) / 2**24


def test_a_running_row_draws_the_numbers_of_its_stream():
    """The running batch hashes a row's seed and key once (`stream_state`) and its position
    each token (`uniform_at`): the same numbers as the whole chain, so a rollout is the same as
    before the split."""
    for seed, key in ((0, (0, 0, 0)), (7, (4, 3, 1025)), (2**61, (1, 23, 7))):
        state = stream_state(seed, key)
        for position in (0, 1, 17, 4095):
            want = _splitmix_chain(seed, (*key, position))
            assert row_uniform(seed, key, position) == want
            assert uniform_at(state, position) == want


def test_warmed_prompt_rows_fork_into_the_decode_step(model, tok):
    """`warm` caches a prompt once; its forks start with one token to feed (no prefill pass)
    and still match a full forward."""
    s = TorchSampler(model, tok, temperature=1.0, seed=2)
    batch = s.open_batch()
    base = s.new_row(tok.encode(TEXTS[1]))
    batch.warm([base])
    assert s.cached_length(base) == len(s.tokens(base))
    kids = [s.fork(base) for _ in range(3)]
    for k, row in enumerate(kids):
        batch.start(row, 6, RowKey(0, 0, k))
    out = run_all(batch, {})
    assert len({tuple(out[r][0].token_ids) for r in kids}) > 1  # own streams
    for row in kids:
        check_against_full(model, s.tokens(row), len(s.tokens(base)), out[row][0], 1.0)


def test_buckets_are_powers_of_two_and_one_and_a_half_times_them():
    assert [bucket(n) for n in (1, 2, 3, 4, 5, 6, 7, 9, 13, 17, 25, 33, 97, 256, 257)] == \
        [1, 2, 3, 4, 6, 6, 8, 12, 16, 24, 32, 48, 128, 256, 384]
    assert [bucket(n, 64) for n in (1, 64, 65, 129, 193, 257, 385, 1000)] == [64, 64, 128, 192, 256, 384, 512, 1024]
    for n in range(2, 600):
        assert n <= bucket(n) <= 1.5 * n
    with pytest.raises(ValueError, match="n >= 1"):
        bucket(0)


class _ReplayGraph:
    """A stand-in for a CUDA graph on the CPU: `replay` reruns the captured step on the cache
    tensors and forward it was captured with (a graph's addresses are fixed at capture), reading
    the static inputs as they are now, into the same output buffer."""

    def __init__(self, run, out, batch):
        self.run, self.out, self.batch = run, out, batch
        self.bound = (list(batch.keys), list(batch.values), batch.decoder)
        self.static: set[int] = set()  # outputs that are static inputs (a layer piece's hidden states)

    def written(self):
        """The output buffers the graph writes (not those that are its own static inputs)."""
        return [t for t in (self.out if isinstance(self.out, tuple) else (self.out,)) if t.data_ptr() not in self.static]

    def replay(self):
        b = self.batch
        now = (b.keys, b.values, b.decoder)
        b.keys, b.values, b.decoder = self.bound
        try:
            result = self.run()
            for out, new in zip(*((self.out, result) if isinstance(result, tuple) else ((self.out,), (result,)))):
                out.copy_(new)
        finally:
            b.keys, b.values, b.decoder = now


def _stand_in_capture(monkeypatch, batch, graph=_ReplayGraph):
    """Capture with `graph` (a _ReplayGraph class) in place of CUDA's: `capture.capture_graph`
    still replays it once and checks the replay against the eager warm-up."""
    if graph is True:
        graph = _ReplayGraph

    def record(run, device, pool=None):
        eager = run()
        out = run()  # the graph's own output buffers: unwritten until a replay, as on CUDA
        g = graph(run, out, batch())
        g.static = {t.data_ptr() for t in (eager if isinstance(eager, tuple) else (eager,))}
        for t in g.written():
            t.fill_(float("nan"))
        return g, out, eager

    monkeypatch.setattr(capture, "record_graph", record)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)


def _graph_rollout(model, tok, graphs, monkeypatch, fake_capture=False):
    """Rows whose decode steps use a bucket of slots with parked and free slots inside it, rows
    that park and rejoin after a tool result, a fork of a parked row, and one row long enough
    to grow the cache; -> (sampler, {row: [Generations]}, {row: [segment starts]}, batch,
    (slot count, slots without a decode row) of each static step)."""
    sizes = []
    original = slot_graphs.SlotGraphs.step

    def step(self, inputs, longest):
        padded = int((inputs[2] == self.batch.columns).sum())  # slots writing the scratch column
        sizes.append((inputs.shape[1], padded))
        return original(self, inputs, longest)

    monkeypatch.setattr(slot_graphs.SlotGraphs, "step", step)
    s = TorchSampler(model, tok, temperature=1.0, seed=7, decode_graphs=graphs)
    if fake_capture:
        _stand_in_capture(monkeypatch, lambda: s.batch, fake_capture)
    batch = s.open_batch(max_rows=6)
    if fake_capture:
        batch.graphs.capture = batch.layer_graphs.capture = True
    texts = TEXTS + ["I think", " ".join(["the river near the old town"] * 4)]
    rows = [s.new_row(tok.encode(t)) for t in texts]
    starts = {r: [len(s.tokens(r))] for r in rows}
    out: dict[int, list] = {}
    budgets = [3, 4, 150, 6, 9, 5]  # row 2 runs past the cache's first 128 columns
    for i, r in enumerate(rows[:3]):
        batch.start(r, budgets[i], RowKey(0, i, 0))
    resumed = forked = False
    for step in range(400):
        if step == 2:
            for i, r in enumerate(rows[3:], start=3):
                batch.start(r, budgets[i], RowKey(0, i, 0))
        for row, gen in batch.step():
            out.setdefault(row, []).append(gen)
        if step > 12 and not resumed:  # rows 0 and 1 parked long ago: a tool result each, and a fork
            resumed = True
            for i in (0, 1):
                s.append(rows[i], tok.encode(" result: Paris."))
                starts[rows[i]].append(len(s.tokens(rows[i])))
                batch.start(rows[i], 5, RowKey(0, i, 0))
            child = s.fork(rows[3])
            starts[child] = [len(s.tokens(child))]
            batch.start(child, 4, RowKey(0, 3, 1))
            forked = True
        if not batch.active and resumed:
            break
    assert forked and len(out[rows[0]]) == 2
    return s, out, starts, batch, sizes


def test_static_decode_steps_sample_what_the_eager_step_samples(model, tok, monkeypatch):
    """Decode graphs (`SlotGraphs`; their static step runs uncaptured on the CPU): steps without
    joining rows run over a bucket of slots, with parked and free slots inside it writing the
    scratch column, and a window of columns; each row samples the same tokens as the eager step,
    matches a full forward, and a parked row inside the bucket rejoins intact."""
    s, graphed, starts, batch, sizes = _graph_rollout(model, tok, True, monkeypatch)
    _, eager, _, eager_batch, eager_sizes = _graph_rollout(model, tok, False, monkeypatch)
    assert eager_sizes == [] and eager_batch.graphs is None
    stats = batch.stats()
    assert 0 < stats["graph_steps"] == len(sizes) < batch.steps  # steps with joining rows: not whole
    assert stats["layer_graph_steps"] > 0  # ... but their layers' dense parts through LayerGraphs
    assert stats["graph_captures"] == 0  # no capture on a CPU
    assert len({n for n, _ in sizes}) >= 2 and any(padded for _, padded in sizes)
    assert batch.cache_version > 1  # the cache grew while steps ran as graphs
    assert graphed.keys() == eager.keys()
    for row, gens in graphed.items():
        for gen, again, start in zip(gens, eager[row], starts[row]):
            assert gen.token_ids == again.token_ids
            assert max(abs(a - b) for a, b in zip(gen.logprobs, again.logprobs)) < 1e-5
            check_against_full(model, s.tokens(row), start, gen, 1.0)


def test_graph_replays_read_the_refilled_inputs_and_recapture_when_needed(model, tok, monkeypatch):
    """With a stand-in graph whose replay reruns the step captured on the static inputs: the
    replays give the eager step's tokens, one graph is captured per (cache, slot bucket, wider
    window), and replays outnumber captures."""
    keys = []
    original = slot_graphs.SlotGraphs.step

    def step(self, inputs, longest):
        logits, window = original(self, inputs, longest)
        keys.append((self.batch.cache_version, inputs.shape[1], window))
        return logits, window

    monkeypatch.setattr(slot_graphs.SlotGraphs, "step", step)
    _, replayed, _, batch, _ = _graph_rollout(model, tok, True, monkeypatch, fake_capture=True)
    monkeypatch.setattr(slot_graphs.SlotGraphs, "step", original)
    _, eager, _, _, _ = _graph_rollout(model, tok, False, monkeypatch)
    for row, gens in replayed.items():
        for gen, again in zip(gens, eager[row]):
            assert gen.token_ids == again.token_ids
    captures = batch.graphs.captures
    assert captures <= len(set(keys)) and captures < len(keys)
    layers = batch.layer_graphs
    # a token bucket's pieces (one per layer and one more) are captured once and replayed after
    pieces_per_bucket = model.config.num_hidden_layers + 1
    assert layers.captures == pieces_per_bucket * sum(1 for p in layers.buckets.values() if p.graphs) > 0
    assert layers.steps > layers.captures // pieces_per_bucket
    assert batch.stats()["graph_captures"] == captures + layers.captures and batch.stats()["graph_capture_s"] > 0
    assert len({version for version, _, _ in keys}) >= 2  # recaptured after the cache grew


class _StaleGraph(_ReplayGraph):
    """A graph whose replay computes nothing: its output buffers keep what the capture left."""

    def replay(self):
        pass


class _DriftingGraph(_ReplayGraph):
    """A graph whose replay is 5% off the eager step (a kernel reading the wrong memory)."""

    def replay(self):
        super().replay()
        for out in self.written():
            out.mul_(1.05)


@pytest.mark.parametrize("graph", [_StaleGraph, _DriftingGraph])
def test_a_graph_whose_first_replay_differs_from_the_eager_step_is_not_used(model, tok, monkeypatch, graph):
    """`capture_graph` replays each graph once and compares it with the eager warm-up: a replay
    that computes nothing or drifts is caught at capture, both kinds of graph fall back to eager
    steps with a warning, and the rollout samples what it samples eagerly."""
    with pytest.warns(UserWarning, match="first replay") as caught:
        s, graphed, starts, batch, _ = _graph_rollout(model, tok, True, monkeypatch, fake_capture=graph)
    said = " ".join(str(w.message) for w in caught)
    assert "running batch's decode step failed" in said and "running batch's layers failed" in said
    assert batch.graphs.capture is False and batch.layer_graphs.capture is False
    assert batch.stats()["graph_captures"] == 0
    _, eager, _, _, _ = _graph_rollout(model, tok, False, monkeypatch)
    for row, gens in graphed.items():
        for gen, again, start in zip(gens, eager[row], starts[row]):
            assert gen.token_ids == again.token_ids
            check_against_full(model, s.tokens(row), start, gen, 1.0)


def test_check_replay_compares_shapes_non_finite_entries_and_values():
    torch.manual_seed(0)
    logits = torch.randn(6, 50) * 10
    logits[5] = float("nan")  # a free slot of a bucket may give non-finite logits: the same ones
    q = torch.randn(1, 8, 2, 4)
    capture.check_replay(logits.clone(), logits)
    capture.check_replay((logits.clone(), q.clone()), [logits, q])
    capture.check_replay(logits + 1e-4 * logits.nan_to_num().abs().max(), logits)  # rounding
    capture.check_replay(torch.zeros(3), torch.zeros(3))
    half = logits.to(torch.bfloat16)  # compared in their own dtype
    capture.check_replay(half.clone(), half)
    with pytest.raises(capture.ReplayMismatch, match="by 0.05"):
        capture.check_replay(half * 1.05, half)
    bad = {
        "differs from the eager step by": logits * 1.05,
        "non-finite": logits.nan_to_num(),
        "shape": logits[:5],
        "outputs": (logits.clone(),),
    }
    for match, replayed in bad.items():
        with pytest.raises(capture.ReplayMismatch, match=match):
            capture.check_replay(replayed, (logits, q) if match == "outputs" else logits)
    with pytest.raises(capture.ReplayMismatch, match="non-finite"):
        capture.check_replay(torch.full((3,), float("nan")), torch.zeros(3))
    assert issubclass(capture.ReplayMismatch, RuntimeError)  # capture_or_warn turns it into a warning
    capture.check_replay(logits * 1.05, logits, tolerance=0.06)


def test_graphs_captured_on_a_cache_that_grew_are_not_replayed(model, tok, monkeypatch):
    """A row decodes alone long enough for its bucket's graph to be captured; a second row joins
    (the cache grows a slot) and leaves at once; the first row's bucket is the same again but
    its graph, bound to the old cache, must be captured anew: the tokens match the eager step's
    and a full forward."""
    def rollout(graphs):
        nonlocal s
        s = TorchSampler(model, tok, temperature=1.0, seed=2, decode_graphs=graphs)
        batch = s.open_batch(max_rows=4)
        if graphs:
            batch.graphs.capture = True
        a, b = s.new_row(tok.encode(TEXTS[1])), s.new_row(tok.encode(TEXTS[0]))
        batch.start(a, 20, RowKey(0, 0, 0))
        out = {}
        for step in range(30):
            if step == 8:
                batch.start(b, 1, RowKey(0, 1, 0))
            out.update(batch.step())
            if not batch.active:
                break
        return a, out, batch

    s = None
    _stand_in_capture(monkeypatch, lambda: s.batch)
    a, graphed, batch = rollout(True)
    assert batch.cache_version >= 2 and batch.graphs.captures >= 2
    start = len(s.tokens(a)) - len(graphed[a].token_ids)
    _, eager, _ = rollout(False)
    assert graphed[a].token_ids == eager[a].token_ids
    check_against_full(model, s.tokens(a), start, graphed[a], 1.0)


def test_layer_graphs_serve_the_samplers_later_batches_while_the_weights_stay(model, tok, monkeypatch):
    """The layers' graphs read only the weights: a second running batch of the same sampler
    replays the graphs the first captured (no new capture) and samples what eager steps sample;
    its stats count its own steps. New graphs come when the weights are repacked, a parameter
    tensor is replaced or the model's train/eval mode changes."""
    _stand_in_capture(monkeypatch, lambda: s.batch)

    def two_batches(graphs):
        nonlocal s
        s = TorchSampler(model, tok, temperature=1.0, seed=8, decode_graphs=graphs, pack_weights=False)
        outs, stats, captured = [], [], []
        for round_ in range(2):
            batch = s.open_batch(max_rows=4)
            if graphs:
                batch.layer_graphs.capture = True
            rows = [s.new_row(tok.encode(t)) for t in TEXTS]
            for i, r in enumerate(rows):  # a row joins at each of the first steps
                batch.start(r, 9, RowKey(round_, i, 0))
                batch.step()
            run_all(batch, {})
            outs.append([s.tokens(r) for r in rows])
            stats.append(batch.stats())
            captured.append((batch.layer_graphs.captures, batch.layer_graphs.steps) if graphs else (0, 0))
            for r in rows:
                s.release(r)
            s.close_batch()
        return outs, stats, captured

    s = None
    graphed, stats, captured = two_batches(True)
    eager, _, _ = two_batches(False)
    assert graphed == eager
    (captures, steps), (captures_after, steps_after) = captured
    assert captures > 0 and captures_after == captures  # the second batch captured nothing
    assert stats[0]["layer_graph_steps"] == steps and stats[1]["layer_graph_steps"] == steps_after - steps
    # the second batch's buckets need no first steps eagerly: more of its steps are graphs
    assert stats[1]["graph_captures"] == 0 and stats[1]["layer_graph_steps"] > stats[0]["layer_graph_steps"]
    graphs = s.layer_graphs()
    assert s.layer_graphs() is graphs
    with torch.no_grad():  # an optimizer step updates the weights in place: the graphs stay
        next(model.parameters()).add_(0.0)
    assert s.layer_graphs() is graphs
    model.train()
    try:
        assert s.layer_graphs() is not graphs
    finally:
        model.eval()
    graphs = s.layer_graphs()
    weight = next(model.parameters())
    original = weight.data
    weight.data = original.clone()  # the weights moved: graphs would read freed memory
    try:
        assert s.layer_graphs() is not graphs
    finally:
        weight.data = original
    packed = TorchSampler(model, tok, temperature=1.0, seed=8, decode_graphs=True)
    if packed._packed_weights() is not None:  # packed copies are rebuilt after an update
        first = packed.layer_graphs()
        with torch.no_grad():
            next(model.parameters()).add_(0.0)
        assert packed.layer_graphs() is not first


def test_a_backends_samplers_share_their_layer_graphs(tok):
    """A fresh sampler each rollout, one graph cache per backend: the layer graphs captured in
    one rollout serve the next (a bfloat16 model: no packed copies, the weights stay in place)."""
    import copy

    from aepo.config import RolloutConfig
    from aepo.rollout.sampler import TorchBackend

    model = copy.deepcopy(make_model("qwen3", len(tok))).to(torch.bfloat16)
    backend = TorchBackend(model, tok, RolloutConfig(decode_graphs=True))
    first, second = backend.sampler(0), backend.sampler(1)
    first.decode_graphs = second.decode_graphs = True  # (on a CPU: the uncaptured pieces)
    assert first._packed_weights() is None
    assert first.layer_graphs() is second.layer_graphs()
    alone = TorchSampler(model, tok, decode_graphs=True)
    assert alone.layer_graphs() is not first.layer_graphs()


def test_a_bucket_runs_as_a_graph_from_its_nth_step_on_one_cache():
    """A capture costs a few eager steps: a slot bucket runs as a graph only from its
    GRAPH_AFTER_STEPS-th step on the same cache, counted per bucket and again after a grow."""
    class Batch:
        cache_version = 0

    batch = Batch()
    graphs = slot_graphs.SlotGraphs(batch, capture=False)
    n = slot_graphs.GRAPH_AFTER_STEPS
    assert [graphs.ready(8) for _ in range(n + 1)] == [False] * (n - 1) + [True, True]
    assert graphs.ready(4) is False
    batch.cache_version = 1  # the cache grew: its graphs and counts are gone
    assert [graphs.ready(8) for _ in range(n)] == [False] * (n - 1) + [True]


def test_a_failed_capture_of_the_layer_pieces_runs_them_eagerly(model, tok, monkeypatch):
    def refuse(run, device, pool=None):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(capture, "record_graph", refuse)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    s = TorchSampler(model, tok, temperature=1.0, seed=1, decode_graphs=True)
    batch = s.open_batch(max_rows=4)
    batch.layer_graphs.capture = True
    rows = [s.new_row(tok.encode(t)) for t in TEXTS]
    starts = {r: len(s.tokens(r)) for r in rows}
    out = {}

    def run() -> None:
        for i, r in enumerate(rows):  # a row joins at each of four steps: steps with joins
            batch.start(r, 8, RowKey(0, i, 0))
            out.update(batch.step())
        out.update({r: g[0] for r, g in run_all(batch, {}).items()})

    with pytest.warns(UserWarning, match="running batch's layers failed"):
        run()
    assert batch.layer_graphs.capture is False and batch.layer_graphs.steps > 0
    for r in rows:
        check_against_full(model, s.tokens(r), starts[r], out[r], 1.0)


def test_a_failed_capture_of_the_slot_step_decodes_eagerly(model, tok, monkeypatch):
    def refuse(run, device, pool=None):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(capture, "record_graph", refuse)
    s = TorchSampler(model, tok, temperature=1.0, seed=1, decode_graphs=True)
    batch = s.open_batch(max_rows=4)
    batch.graphs.capture = True
    row = s.new_row(tok.encode(TEXTS[1]))
    start = len(s.tokens(row))
    batch.start(row, 12, RowKey(0, 0, 0))
    with pytest.warns(UserWarning, match="running batch's decode step failed"):
        out = run_all(batch, {})
    # a join, GRAPH_AFTER_STEPS - 1 eager decode steps, then the rest through SlotGraphs: the
    # first's capture failed, so they ran the static step uncaptured
    assert batch.graphs.capture is False and batch.graphs.steps == 11 - (slot_graphs.GRAPH_AFTER_STEPS - 1)
    check_against_full(model, s.tokens(row), start, out[row][0], 1.0)


def test_a_real_model_rollout_is_the_same_under_any_batch_limit(tok):
    """Rows of an ARPO rollout with a (random) Qwen3 keep their tokens when at most 2 rows decode
    at once instead of all: per-row streams, decisions in logical order, and float results that
    do not move with the batch's composition here."""
    import random

    from scripted_sampler import FakeTools

    from aepo.config import RolloutConfig
    from aepo.rollout import rollout
    from aepo.rollout.metrics import rollout_metrics

    model = make_model("qwen3", len(tok), seed=4)
    prompts = [(f"p{i}", tok.encode(t)) for i, t in enumerate(TEXTS[:2])]

    def run(max_rows):
        cfg = RolloutConfig(n=4, max_response_tokens=16, n_probe=4, scheduler="continuous",
                            max_active_rows=max_rows, temperature=1.0)
        s = TorchSampler(model, tok, temperature=1.0, seed=9)
        trajs, stats = rollout("aepo", prompts, s, tok, FakeTools(), cfg, random.Random(1))
        assert s.n_rows == 0 and s.batch is None  # the batch is closed: the sampler takes another rollout
        again, _ = rollout("independent", prompts[:1], s, tok, FakeTools(), cfg, random.Random(1))
        assert len(again) == 4 and s.n_rows == 0
        stats["metrics"] = rollout_metrics(trajs, stats)
        return [(t.row_id, t.response_ids, t.logprobs) for t in trajs], stats

    wide, stats = run(64)
    narrow, narrow_stats = run(2)
    assert [r[:2] for r in narrow] == [r[:2] for r in wide]
    for (_, _, a), (_, _, b) in zip(narrow, wide):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=1e-5, rtol=0)
    assert narrow_stats["decode_steps"] > stats["decode_steps"]
    # the running batch's peak cache, logged: a batch of at most 2 rows holds fewer slots
    assert 0 < narrow_stats["batch_cache_gib"] < stats["batch_cache_gib"]
    assert stats["metrics"]["rollout/batch_cache_gib"] == stats["batch_cache_gib"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("graphs", [False, True])
def test_cuda_running_batch_matches_a_full_forward(tok, monkeypatch, graphs):
    """SlotBatch on CUDA (float32): rows joining late, a tool result, a fork of a parked row,
    attention split into ranges and the slots sorted mid-run (eager), or decode steps replayed
    as CUDA graphs; every segment matches a fresh full forward of the CPU model."""
    import copy

    monkeypatch.setattr(continuous, "SEGMENT_MIN_SAVING", 8)
    monkeypatch.setattr(continuous, "REORDER_EVERY", 4)
    cpu_model = make_model("qwen3", len(tok))
    s = TorchSampler(copy.deepcopy(cpu_model).cuda(), tok, temperature=1.0, seed=6, decode_graphs=graphs)
    assert s.device.type == "cuda"
    batch = s.open_batch(max_rows=4)
    long_text = " ".join(["the river near the old town"] * 12)
    rows = [s.new_row(tok.encode(t)) for t in ("a", long_text, "The capital of", "b c")]
    starts = {r: len(s.tokens(r)) for r in rows}
    batch.start(rows[0], 5, RowKey(0, 0, 0))
    batch.start(rows[1], 12, RowKey(0, 1, 0))
    out: dict[int, list] = {}
    for step in range(40):
        if step == 2:
            batch.start(rows[2], 10, RowKey(0, 2, 0))
            batch.start(rows[3], 10, RowKey(0, 3, 0))
        for row, gen in batch.step():
            out.setdefault(row, []).append(gen)
        if not batch.active:
            break
    for row in rows:
        check_against_full(cpu_model, s.tokens(row), starts[row], out[row][0], 1.0)
    if graphs:
        assert batch.graphs.capture and batch.stats()["graph_captures"] > 0
    else:
        assert batch.reorders > 0 and batch.read_cells < batch.decode_cells
    s.append(rows[0], tok.encode(" result: Paris."))
    child = s.fork(rows[0])  # a fork of a parked row
    again = {rows[0]: len(s.tokens(rows[0])), child: len(s.tokens(child))}
    batch.start(rows[0], 6, RowKey(0, 0, 0))
    batch.start(child, 6, RowKey(0, 0, 1))
    for row, gens in run_all(batch, {}).items():
        check_against_full(cpu_model, s.tokens(row), again[row], gens[0], 1.0)
    for r in list(s._rows):
        s.release(r)
    s.close_batch()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_replays_sample_what_the_eager_step_samples(tok, monkeypatch):
    """Captured CUDA graphs of the running batch's decode step (several slot buckets, parked
    slots inside a bucket, recaptures after the cache grew) and of the layers' dense parts in
    steps with joining rows give the eager CUDA step's tokens, and every segment matches a full
    forward of the CPU model."""
    import copy

    cpu_model = make_model("qwen3", len(tok))
    cuda_model = copy.deepcopy(cpu_model).cuda()
    s, graphed, starts, batch, sizes = _graph_rollout(cuda_model, tok, True, monkeypatch)
    _, eager, _, _, _ = _graph_rollout(cuda_model, tok, False, monkeypatch)
    stats = batch.stats()
    assert batch.graphs.capture and 0 < batch.graphs.captures < stats["graph_steps"]
    assert batch.layer_graphs.capture and batch.layer_graphs.captures > 0 and stats["layer_graph_steps"] > 0
    assert len({n for n, _ in sizes}) >= 2 and any(padded for _, padded in sizes)
    for row, gens in graphed.items():
        for gen, again, start in zip(gens, eager[row], starts[row]):
            assert gen.token_ids == again.token_ids
            check_against_full(cpu_model, s.tokens(row), start, gen, 1.0)
