"""The built-in tokenizer: protocol tags as single tokens, frequent words as single tokens.

The tiny demo model is trained from scratch, so its tokenizer is fitted locally with the
`tokenizers` library, no download:

- `<think> </think> <search> </search> <python> </python> <calc> </calc> <answer> </answer>
  <result> </result>` are single added tokens (never split, kept by `decode`), so a stop tag
  is one sampled token and a stop check is an id comparison;
- `<pad> <unk> <bos> <eos>` are the special tokens (dropped by `skip_special_tokens=True`);
- a byte-level BPE is trained with a vocabulary large enough that every frequent word of the
  corpus becomes one token (with its leading space), while any other text still encodes,
  byte by byte at worst, so encode/decode is lossless for every string;
- digits are split one by one by default (so arithmetic generalises across numbers); with
  `split_digits=False` a run of digits is one pre-token, apart from the space before it, so
  every frequent number becomes a single token and the same token wherever it stands (" 1952"
  in a sentence is " " + "1952", as is a calculator's "1952" on its own line). The demo's
  choice: its arithmetic is done by tools, and copying a year out of a search result is
  then one token, like copying a name;
- punctuation never sticks to letters (the byte-level pre-tokenizer separates them).

The result is a `PreTrainedTokenizerFast` that `AutoTokenizer.from_pretrained` loads back.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from aepo.protocol import tag_tokens

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"
SPECIAL_TOKENS: list[str] = [PAD, UNK, BOS, EOS]

# A generic English vocabulary used when no corpus is given: common words, so that a model
# built without a corpus still has word-sized tokens for everyday text.
_COMMON_WORDS = """
the of and to a in is it you that he was for on are with as I his they be at one have this
from or had by not word but what some we can out other were all there when up use your how
said an each she which do their time if will way about many then them write would like so
these her long make thing see him two has look more day could go come did number sound no
most people my over know water than call first who may down side been now find any new work
part take get place made live where after back little only round man year came show every
good me give our under name very through just form sentence great think say help low line
differ turn cause much mean before move right boy old too same tell does set three want air
well also play small end put home read hand port large spell add even land here must big
high such follow act why ask men change went light kind off need house picture try us again
animal point mother world near build self earth father head stand own page should country
found answer school grow study still learn plant cover food sun four between state keep eye
never last let thought city tree cross farm hard start might story saw far sea draw left late
run while press close night real life few north open seem together next white children begin
got walk example ease paper group always music those both mark often letter until mile river
car feet care second book carry took science eat room friend began idea fish mountain stop
once base hear horse cut sure watch color face wood main enough plain girl usual young ready
above ever red list though feel talk bird soon body dog family direct pose leave song measure
door product black short numeral class wind question happen complete ship area half rock order
fire south problem piece told knew pass since top whole king space heard best hour better true
during hundred five remember step early hold west ground interest reach fast verb sing listen
six table travel less morning ten simple several vowel toward war lay against pattern slow
center love person money serve appear road map rain rule govern pull cold notice voice unit
power town fine certain fly fall lead cry dark machine note wait plan figure star box noun
field rest correct able pound done beauty drive stood contain front teach week final gave green
quick develop ocean warm free minute strong special mind behind clear tail produce fact street
inch multiply nothing course stay wheel full force blue object decide surface deep moon island
foot system busy test record boat common gold possible plane stead dry wonder laugh thousand ago
ran check game shape equate hot miss brought heat snow tire bring yes distant fill east paint
language among search python calculate result born located capital population president company
film director author city river founded year which who where when what how many much total sum
"""


def _default_corpus() -> list[str]:
    # Each word in four forms (with/without a leading space, lower/capitalised), since the
    # byte-level BPE learns " word" and "word" as different tokens.
    lines: list[str] = []
    words = _COMMON_WORDS.split()
    for i in range(0, len(words), 12):
        chunk = words[i : i + 12]
        for form in (chunk, [w.capitalize() for w in chunk]):
            text = " ".join(form)
            lines += [text, " " + text]
    lines.append("0 1 2 3 4 5 6 7 8 9 . , ; : ! ? ( ) [ ] { } + - * / = % $ ' \"")
    return lines


def _pre_tokenizer(split_digits: bool = True) -> pre_tokenizers.PreTokenizer:
    # Digits first (one piece each, or one piece per run when not split), then the GPT-2
    # byte-level split, which keeps letters, punctuation runs and whitespace apart and maps
    # every byte to a printable symbol.
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=split_digits), byte_level])


def _lines(texts: Iterable[str]) -> Iterator[str]:
    for text in texts:
        if not isinstance(text, str):
            raise ValueError(f"build_tokenizer: texts must be strings, got {type(text).__name__}")
        yield text


def build_tokenizer(
    texts: Iterable[str] | None = None, out_dir: str | Path | None = None, max_vocab: int = 8000,
    *, split_digits: bool = True,
) -> PreTrainedTokenizerFast:
    """Fit the built-in byte-level BPE tokenizer on `texts` (a generic vocabulary when None).

    `max_vocab` bounds the vocabulary (specials, tags and the 256 byte symbols included); with
    a corpus smaller than that, every word seen at least twice ends up a single token. When
    `out_dir` is given the tokenizer is saved there (tokenizer.json + config files).
    """
    n_fixed = len(SPECIAL_TOKENS) + len(tag_tokens()) + 256
    if max_vocab < n_fixed:
        raise ValueError(f"build_tokenizer: max_vocab={max_vocab} is below the {n_fixed} fixed tokens; "
                         f"use max_vocab >= {n_fixed}")
    corpus = _default_corpus() if texts is None else _lines(texts)
    min_frequency = 1 if texts is None else 2

    core = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    core.pre_tokenizer = _pre_tokenizer(split_digits)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=max_vocab,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS + tag_tokens(),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(corpus, trainer=trainer)
    # The trainer registered the tags as special added tokens; re-register them as plain
    # added tokens so they stay single tokens but survive decode(skip_special_tokens=True).
    core.add_tokens([AddedToken(tag, special=False, normalized=False) for tag in tag_tokens()])
    core.add_special_tokens([AddedToken(tok, special=True, normalized=False) for tok in SPECIAL_TOKENS])

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        unk_token=UNK,
        bos_token=BOS,
        eos_token=EOS,
        clean_up_tokenization_spaces=False,
        model_max_length=1 << 20,
    )
    if out_dir is not None:
        save_tokenizer(tokenizer, out_dir)
    return tokenizer


def save_tokenizer(tokenizer: PreTrainedTokenizerBase, out_dir: str | Path) -> Path:
    """Save so that `AutoTokenizer.from_pretrained(out_dir)` loads it; returns the directory.

    The config names the class `PreTrainedTokenizerFast`, which transformers 4.x and 5.x both
    resolve (5.x writes its own alias, `TokenizersBackend`, unknown to 4.x).
    """
    path = Path(out_dir)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(path))
    config_file = path / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    if config.get("tokenizer_class") == "TokenizersBackend":
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def read_corpus(path: str | Path) -> list[str]:
    """Texts to fit the tokenizer on: JSONL rows' "text" field, else one text per non-empty line."""
    source = Path(path)
    if not source.is_file():
        raise ValueError(f"corpus file {str(source)!r} does not exist; give an existing text or JSONL file")
    lines = [line for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]
    if source.suffix == ".jsonl" or (lines and lines[0].lstrip().startswith("{")):
        texts = []
        for number, line in enumerate(lines, 1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"corpus {str(source)!r} line {number} is not JSON: {err.msg}; fix that line, "
                                 f"or give a plain text file (one document per line)") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise ValueError(f'corpus {str(source)!r} line {number} has no string "text" field; give every '
                                 f'JSONL row a "text" string')
            texts.append(row["text"])
        return texts
    return lines
