"""Built-in tokenizer, model factory, loading, and `aepo model init`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from aepo.cli import app
from aepo.models.factory import MODEL_PRESETS, count_parameters, init_model, model_config
from aepo.models.loading import check_model_dir, load_model, resolve_device, resolve_dtype
from aepo.models.tokenizer import build_tokenizer, read_corpus
from aepo.protocol import tag_tokens

PROTOCOL_TAGS = tag_tokens()

torch.set_num_threads(1)

CORPUS = [
    "Zorblax was born in Quenton in 1874 and founded the Quenton Rowing Club.",
    "The capital of Marovia is Quenton; Zorblax lived there until 1921.",
    "Zorblax wrote 3 books about rivers, mountains and the sea.",
] * 5
PROTOCOL_TEXT = (
    "<think>I should look up Zorblax's birthplace.</think>\n<search>Zorblax birthplace</search>"
    "<result>\nPage 1: Zorblax was born in Quenton in 1874.\n</result>"
    "<think>Now compute 1921 - 1874.</think><calc>1921 - 1874</calc><result>\n47\n</result>"
    "<python>print(sum([1, 2]))</python><result>\n3\n</result><answer>\\boxed{Quenton}</answer>"
)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(CORPUS)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tok) -> Path:
    out = tmp_path_factory.mktemp("tiny")
    init_model(out, tok, preset="tiny", seed=0)
    return out


def pieces(tok, text: str) -> list[str]:
    return [tok.decode([i]) for i in tok.encode(text, add_special_tokens=False)]


# ---------------------------------------------------------------------------- tokenizer


def test_protocol_text_round_trips(tok):
    ids = tok.encode(PROTOCOL_TEXT, add_special_tokens=False)
    assert tok.decode(ids) == PROTOCOL_TEXT
    assert tok.decode(ids + [tok.eos_token_id], skip_special_tokens=True) == PROTOCOL_TEXT


def test_tags_are_single_tokens_kept_by_decode(tok):
    ids = [tok.convert_tokens_to_ids(tag) for tag in PROTOCOL_TAGS]
    assert len(set(ids)) == len(PROTOCOL_TAGS)
    for tag, tag_id in zip(PROTOCOL_TAGS, ids):
        assert tok.encode(tag, add_special_tokens=False) == [tag_id]
        assert tok.encode(f"x{tag}y", add_special_tokens=False)[1:-1] == [tag_id]
        assert tok.decode([tag_id], skip_special_tokens=True) == tag
    assert {tok.pad_token, tok.unk_token, tok.eos_token} == {"<pad>", "<unk>", "<eos>"}
    assert len({tok.pad_token_id, tok.unk_token_id, tok.eos_token_id, tok.bos_token_id, *ids}) == 16


def test_digits_split_and_punctuation_separate(tok):
    assert pieces(tok, "1921") == ["1", "9", "2", "1"]
    assert pieces(tok, "x=40512;")[-6:] == ["4", "0", "5", "1", "2", ";"]
    assert pieces(tok, "Quenton;")[-1] == ";"
    assert pieces(tok, "(Zorblax)") == ["(", "Zorblax", ")"]


def test_whole_numbers_when_digits_are_not_split():
    nums = " ".join(str(n) for n in range(1900, 2000))
    tok = build_tokenizer([nums, nums, "\n".join(nums.split()), "\n".join(nums.split()), "born in", "born in"],
                          max_vocab=800, split_digits=False)
    # a number is the same single token in a sentence and alone on a line
    assert pieces(tok, " 1952") == [" ", "1952"]
    assert pieces(tok, "\n1952\n") == ["\n", "1952", "\n"]
    assert pieces(tok, "born in 1952.") == ["born", " in", " ", "1952", "."]
    # numbers never seen still encode losslessly, in pieces
    for text in ["x=40512;", "in 123456789 years", "1952"]:
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_frequent_words_are_single_tokens(tok):
    for word in ["Zorblax", " Zorblax", " Quenton", " born", " the"]:
        assert len(tok.encode(word, add_special_tokens=False)) == 1, word


def test_unknown_words_encode_losslessly(tok):
    for text in ["Qwxyzzy frobnicates", "naïve café — 日本語 😀", "tabs\tand\n\nnewlines  double"]:
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.unk_token_id not in ids
        assert tok.decode(ids) == text


def test_decoded_text_is_readable(tok):
    ids = tok.encode("The capital of Marovia is Quenton.", add_special_tokens=False)
    assert [tok.decode([i]) for i in ids] == ["The", " capital", " of", " Marovia", " is", " Quenton", "."]


def test_default_vocabulary_and_size_bound():
    generic = build_tokenizer(None)
    assert len(generic.encode(" the river", add_special_tokens=False)) == 2
    small = build_tokenizer(CORPUS, max_vocab=300)
    assert len(small) <= 300
    assert small.decode(small.encode(PROTOCOL_TEXT, add_special_tokens=False)) == PROTOCOL_TEXT
    with pytest.raises(ValueError, match="max_vocab=100"):
        build_tokenizer(CORPUS, max_vocab=100)
    with pytest.raises(ValueError, match="must be strings"):
        build_tokenizer([1, 2])


def test_saved_tokenizer_loads_with_autotokenizer(tok, tmp_path):
    build_tokenizer(CORPUS, out_dir=tmp_path)
    # a class name transformers 4.x resolves too
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    loaded = AutoTokenizer.from_pretrained(str(tmp_path))
    assert loaded.encode(PROTOCOL_TEXT, add_special_tokens=False) == tok.encode(
        PROTOCOL_TEXT, add_special_tokens=False
    )
    assert (loaded.pad_token_id, loaded.eos_token_id, loaded.unk_token_id) == (
        tok.pad_token_id,
        tok.eos_token_id,
        tok.unk_token_id,
    )
    assert loaded.decode(loaded.encode(PROTOCOL_TEXT, add_special_tokens=False)) == PROTOCOL_TEXT


def test_read_corpus_text_and_jsonl(tmp_path):
    text = tmp_path / "c.txt"
    text.write_text("first line\n\nsecond line\n")
    assert read_corpus(text) == ["first line", "second line"]
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text('{"text": "a b"}\n{"text": "c", "id": 2}\n')
    assert read_corpus(jsonl) == ["a b", "c"]
    jsonl.write_text('{"title": "no text"}\n')
    with pytest.raises(ValueError, match='line 1 has no string "text"'):
        read_corpus(jsonl)
    with pytest.raises(ValueError, match="does not exist"):
        read_corpus(tmp_path / "missing.txt")


# ---------------------------------------------------------------------------- factory


def test_presets_have_the_documented_sizes(tok):
    model = init_model(None, tok, preset="tiny")
    embedding = model.get_input_embeddings().weight.numel()
    assert 0.7e6 < count_parameters(model) - embedding < 0.9e6
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.get_input_embeddings().weight
    assert model.config.vocab_size == len(tok)
    small = model_config(tok, "small")
    per_layer = 4 * small.hidden_size**2 * 3 // 4 + 3 * small.hidden_size * small.intermediate_size
    assert 4e6 < per_layer * small.num_hidden_layers < 6e6
    micro = init_model(None, tok, preset="micro")
    assert micro.config.num_hidden_layers == 2 and micro.config.hidden_size == 128
    assert 0.35e6 < count_parameters(micro) - micro.get_input_embeddings().weight.numel() < 0.45e6
    assert set(MODEL_PRESETS) == {"micro", "tiny", "small"}


def test_same_seed_same_weights_and_global_rng_untouched(tok):
    state = torch.random.get_rng_state()
    a, b, c = init_model(None, tok, seed=1), init_model(None, tok, seed=1), init_model(None, tok, seed=2)
    assert torch.equal(torch.random.get_rng_state(), state)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.model.layers[0].mlp.up_proj.weight, c.model.layers[0].mlp.up_proj.weight)


@pytest.mark.parametrize("arch,model_type", [("llama", "llama"), ("qwen2", "qwen2")])
def test_other_architectures(tok, tmp_path, arch, model_type):
    model = init_model(tmp_path, tok, arch=arch)
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path))
    assert loaded.config.model_type == model_type
    ids = torch.tensor([tok.encode("Zorblax was born")])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


def test_saved_model_reloads_with_same_logits(tok, model_dir):
    assert (model_dir / "model.safetensors").is_file() and (model_dir / "tokenizer.json").is_file()
    reference = init_model(None, tok, preset="tiny", seed=0)
    loaded = AutoModelForCausalLM.from_pretrained(str(model_dir))
    ids = torch.tensor([tok.encode(PROTOCOL_TEXT)])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, reference(ids).logits)
    assert loaded.generation_config.eos_token_id == tok.eos_token_id


def test_factory_rejects_unknown_names(tok):
    with pytest.raises(ValueError, match="unknown model preset 'huge'.*micro.*small.*tiny"):
        init_model(None, tok, preset="huge")
    with pytest.raises(ValueError, match="unknown model arch 'gpt9'"):
        init_model(None, tok, arch="gpt9")


# ---------------------------------------------------------------------------- loading


def test_load_model_returns_eval_model_and_tokenizer(tok, model_dir):
    model, tokenizer = load_model(model_dir, device="cpu", dtype="float32")
    assert not model.training and model.dtype == torch.float32
    assert tokenizer.encode(PROTOCOL_TEXT, add_special_tokens=False) == tok.encode(
        PROTOCOL_TEXT, add_special_tokens=False
    )
    model16, _ = load_model(model_dir, device="cpu", dtype="bf16")
    assert model16.dtype == torch.bfloat16


def test_load_model_errors_name_what_is_missing(model_dir, tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_model(tmp_path / "nope")
    with pytest.raises(ValueError, match="lacks config.json"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text((model_dir / "config.json").read_text())
    with pytest.raises(ValueError, match="lacks weights"):
        check_model_dir(tmp_path)
    (tmp_path / "model.safetensors").write_bytes((model_dir / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="lacks tokenizer files"):
        check_model_dir(tmp_path)
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        load_model(model_dir, dtype="float8")


def test_device_and_dtype_resolution():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_dtype("bfloat16") is torch.bfloat16
    with pytest.raises(ValueError, match="unknown device 'tpu7'"):
        resolve_device("tpu7")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")


# ---------------------------------------------------------------------------- CLI


def test_cli_model_init_with_jsonl_corpus(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in CORPUS))
    out = tmp_path / "model"
    result = CliRunner().invoke(
        app, ["model", "init", str(out), "--preset", "tiny", "--corpus", str(corpus), "--seed", "3"]
    )
    assert result.exit_code == 0, result.output
    model, tokenizer = load_model(out, device="cpu")
    assert f"{count_parameters(model):,} parameters" in result.output and str(out) in result.output
    assert len(tokenizer.encode(" Zorblax", add_special_tokens=False)) == 1


def test_cli_model_init_without_corpus_and_bad_preset(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["model", "init", str(tmp_path / "m"), "--arch", "llama"])
    assert result.exit_code == 0, result.output
    assert "llama tiny" in result.output
    assert load_model(tmp_path / "m", device="cpu")[0].config.model_type == "llama"
    bad = runner.invoke(app, ["model", "init", str(tmp_path / "x"), "--preset", "huge"])
    assert bad.exit_code == 2 and "unknown model preset" in bad.output
