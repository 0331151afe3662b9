"""SFT: tool results and prompts are masked out of the loss; JSONL formats and their errors."""
import json

import pytest
import torch
from tiny_models import tiny_qwen3

from aepo.models.tokenizer import build_tokenizer
from aepo.protocol import format_result
from aepo.train.sft import SFTConfig, encode_demonstration, load_sft_jsonl, sft_loss, sft_train

SEGS = [("model", "<think> look up ana. </think> <search> ana born </search>"),
        ("tool", "Page 1: ana: ana was born in tolmere."),
        ("model", "<think> ana was born in tolmere. </think> <answer> tolmere </answer>")]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(["question: where was ana born?", *[t for _, t in SEGS], format_result("x")])


def model_for(tok):
    return tiny_qwen3(len(tok), layers=1, pad_token_id=tok.pad_token_id)


def test_mask_covers_exactly_the_model_segments(tok):
    ex = encode_demonstration("where was ana born?", SEGS, tok)
    assert len(ex.input_ids) == len(ex.loss_mask)
    model_ids = [tok.encode(t, add_special_tokens=False) for r, t in SEGS if r == "model"]
    tool_ids = tok.encode(format_result(SEGS[1][1]), add_special_tokens=False)
    assert sum(ex.loss_mask) == sum(len(m) for m in model_ids)
    # the tool result sits between the two model segments, all masked
    start = ex.loss_mask.index(1) + len(model_ids[0])
    assert ex.input_ids[start : start + len(tool_ids)] == tool_ids
    assert set(ex.loss_mask[start : start + len(tool_ids)]) == {0}
    assert tok.decode(ex.input_ids).count("<result>") == 1


def test_masked_targets_do_not_change_the_loss(tok):
    model = model_for(tok)
    ex = encode_demonstration("where was ana born?", SEGS, tok)
    ids = torch.tensor([ex.input_ids])
    mask = torch.tensor([ex.loss_mask], dtype=torch.float)
    attn = torch.ones_like(ids)
    base = sft_loss(model, ids, attn, mask)
    # reference: mean NLL over exactly the masked-in targets
    logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
    tgt = ids[0, 1:]
    sel = mask[0, 1:] > 0
    ref = -logp[torch.arange(len(tgt)), tgt][sel].mean()
    assert base.item() == pytest.approx(ref.item(), abs=1e-5)
    # a masked trailing token (e.g. padding or a tool result at the end) adds nothing
    ids2 = torch.cat([ids, torch.tensor([[5]])], 1)
    mask2 = torch.cat([mask, torch.tensor([[0.0]])], 1)
    assert sft_loss(model, ids2, torch.ones_like(ids2), mask2).item() == pytest.approx(base.item(), abs=1e-6)


def test_sft_learns_a_demonstration(tok):
    model = model_for(tok)
    ex = [encode_demonstration("where was ana born?", SEGS, tok)] * 8
    hist = sft_train(model, tok, ex, SFTConfig(epochs=30, batch_size=8, lr=1e-2, warmup_steps=2), progress=False)
    assert hist[-1]["loss"] < 0.3 * hist[0]["loss"]


def test_jsonl_formats_and_errors(tok, tmp_path):
    p = tmp_path / "d.jsonl"
    rows = [{"prompt": "where was ana born?", "segments": [list(s) for s in SEGS]},
            {"messages": [{"role": "user", "content": "where was ana born?"},
                          {"role": "assistant", "content": SEGS[0][1]}, {"role": "tool", "content": SEGS[1][1]},
                          {"role": "assistant", "content": SEGS[2][1]}]}]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    a, b = load_sft_jsonl(p, tok)
    assert a.input_ids == b.input_ids and a.loss_mask == b.loss_mask
    p.write_text(json.dumps({"segments": []}) + "\n")
    with pytest.raises(ValueError, match=r"d\.jsonl:1: .*prompt"):
        load_sft_jsonl(p, tok)
    p.write_text(json.dumps({"prompt": "x", "segments": [["user", "hi"]]}) + "\n")
    with pytest.raises(ValueError, match="'model' or 'tool'"):
        load_sft_jsonl(p, tok)
    p.write_text(json.dumps({"text": "x"}) + "\n")
    with pytest.raises(ValueError, match="segments"):
        load_sft_jsonl(p, tok)


def test_loss_of_a_right_padded_batch_needs_no_attention_mask(tok):
    from aepo.train.sft import _collate

    model = model_for(tok)
    short = encode_demonstration("where was ana born?", SEGS[:1], tok)
    long = encode_demonstration("where was ana born?", SEGS, tok)
    ids, attn, mask = _collate([short, long], tok.pad_token_id, 512)
    assert attn[0].sum() < attn[1].sum()  # the short row is padded on the right
    logp = torch.log_softmax(model(input_ids=ids, attention_mask=attn).logits[:, :-1].float(), -1)
    nll = -logp.gather(-1, ids[:, 1:, None])[..., 0]
    ref = (nll * mask[:, 1:]).sum() / mask[:, 1:].sum()
    assert sft_loss(model, ids, None, mask).item() == pytest.approx(ref.item(), abs=1e-5)
    assert sft_loss(model, ids, attn, mask).item() == pytest.approx(ref.item(), abs=1e-5)


def test_recall_drills_score_only_the_value_recalled_for_each_key():
    from aepo.train.sft import recall_drills

    keys = ["mira", "velin", "tolva", "gara", "rope", "durik"]
    values = ["1956", "1902", "24", "7"]
    tok = build_tokenizer(["recall: |", " ".join(keys), " ".join(values)] * 3, split_digits=False)
    drills = recall_drills(tok, keys, values, n=50, seed=3)
    assert len(drills) == 50
    assert [d.input_ids for d in drills] == [d.input_ids for d in recall_drills(tok, keys, values, 50, seed=3)]
    assert [d.input_ids for d in drills] != [d.input_ids for d in recall_drills(tok, keys, values, 50, seed=4)]
    for d in drills:
        words = tok.decode(d.input_ids).split()
        assert words[0] == "recall:"
        cut = words.index("|")
        given = dict(zip(words[1:cut:2], words[2:cut:2]))
        recalled = list(zip(words[cut + 1 :: 2], words[cut + 2 :: 2]))
        assert 3 <= len(given) <= 6 and sorted(k for k, _ in recalled) == sorted(given)
        assert all(given[k] == v for k, v in recalled)  # every recalled value is the one given
        scored = tok.decode([i for i, m in zip(d.input_ids, d.loss_mask) if m]).split()
        assert scored == [v for _, v in recalled]  # only the recalled values carry loss
    with pytest.raises(ValueError, match="pairs"):
        recall_drills(tok, keys[:2], values, n=1)
    with pytest.raises(ValueError, match="n must be"):
        recall_drills(tok, keys, values, n=-1)


def test_length_bucketed_batches_cover_every_example_once_with_little_padding():
    import random

    from aepo.train.sft import SFTExample, _length_bucketed_batches

    rng = random.Random(1)
    examples = [SFTExample([1] * n, [1] * n) for n in (rng.randint(5, 500) for _ in range(5000))]
    batches = _length_bucketed_batches(examples, 32, random.Random(0))
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(examples)))
    assert all(1 <= len(b) <= 32 for b in batches)
    lengths = [len(e.input_ids) for e in examples]
    padded = sum(max(lengths[i] for i in b) * len(b) for b in batches)
    assert padded / sum(lengths) < 1.10  # unsorted batches of these lengths pad about 1.9x
    assert batches == _length_bucketed_batches(examples, 32, random.Random(0))  # one seed, one order
    assert batches != _length_bucketed_batches(examples, 32, random.Random(1))
