"""Language modelling (paper Sec. 5.2), by words or characters, with an LSTM or a GRU: PTB,
WikiText-2, any train/valid/test folder, a single text file, or an embedded corpus that needs no
download.

A single text file is split by contiguous blocks of lines: the first 90% of its
lines train, the next 5% validate, the last 5% test (``split_text``); the split
is printed when training starts. At the character level every character of a
line is a token and ``<eos>`` closes the line; characters unseen in training
read as ``<unk>``.

Corpus conventions follow PyTorch's word-language-model example, so perplexities
compare with published ones: whitespace tokens, ``<eos>`` at every line end
(an empty line is a lone ``<eos>``), the vocabulary from the training split,
and words unseen in training read as ``<unk>``.

The embedded default is the documentation text that ships with Python itself
(``pydoc_data.topics``: 79 topics, about 65,000 words of English prose about
the language). It is raw text, so it is lower-cased and split into words and
punctuation; empty lines and lines that only underline a heading are dropped;
words seen once in training become ``<unk>``. The topics, sorted by name, are
dealt out in blocks of whole lines, each closed at the first line end after
BLOCK_TOKENS tokens: of every ten blocks in a row the ninth goes to valid, the
tenth to test and the others to train, about 80/10/10 by tokens. Valid and test thus sample the whole corpus
alike: cut alphabetically they were different topics (a model scored
perplexity 47 on valid and 16 on test), and whole topics, from 50 to 17,000
tokens, are too few and too uneven to deal out. A block is a passage of a
dozen lines or so, long enough to be coherent text and short enough that valid and
test hold some 60 blocks each. The split depends only on the text, so it is
the same on every machine with the same Python version (the topics change
between versions).
"""
from __future__ import annotations

import io
import re
from collections import Counter
from pathlib import Path

import torch

from biaskit.errors import InputError

from . import Task, perplexity, read_utf8, recurrent_parameters, require
from .token_model import TokenLSTM

EOS, UNK = "<eos>", "<unk>"
LAYOUTS = [
    ("ptb.train.txt", "ptb.valid.txt", "ptb.test.txt"),
    ("wiki.train.tokens", "wiki.valid.tokens", "wiki.test.tokens"),
    ("train.txt", "valid.txt", "test.txt"),
]
SPLITS = ("train", "valid", "test")
SPLIT_NAMES = {"train": "training", "valid": "validation", "test": "test"}
#: The embedded corpus is dealt out in blocks of about this many tokens, in turn to DEAL's splits.
BLOCK_TOKENS = 200
DEAL = ("train",) * 8 + ("valid", "test")

DEFAULTS = {
    "data_dir": None,   # None: the embedded corpus (or text_file)
    "text_file": None,  # one text file, split into train/valid/test by contiguous blocks of lines
    "tokens": "word",   # word or char tokens
    "cell": "lstm",     # lstm, gru or qrnn
    "embedding": 200,
    "hidden": 200,
    "layers": 1,
    "dropout": 0.0,
    "tie_weights": False,
    "seed": 0,
}

#: The paper's training settings for language modelling (Sec. 5.2). The step is
#: lr·√K, so the base lr 1.0 is the paper's step 10 at K0 = 100.
TRAIN = {"batch_size": 32, "lr": 1.0, "window": 400, "K": 100, "K_min": 10, "K_max": 400, "clip": 0.25}


TOKENS = ("word", "char")
#: A single text file's share of lines for each split, in this order, as contiguous blocks.
TEXT_SHARES = {"train": 0.9, "valid": 0.05, "test": 0.05}


def read_lines(lines, level: str = "word") -> list[str]:
    """Whitespace tokens (or every character, at the char level) with ``<eos>`` closing every line."""
    if level == "char":
        return [char for line in lines for char in (*line.rstrip("\n"), EOS)]
    return [word for line in lines for word in (*line.split(), EOS)]


def split_text(path, level: str) -> tuple[dict[str, list[str]], str]:
    """One text file's tokens split by contiguous blocks of lines (``TEXT_SHARES``), and the split in words."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"--text {path} does not exist")
    if not path.is_file():
        raise InputError(f"--text {path} is not a file")
    lines = io.StringIO(read_utf8(path), newline=None).read().splitlines()
    n = len(lines)
    ends = [round(n * TEXT_SHARES["train"]), round(n * (TEXT_SHARES["train"] + TEXT_SHARES["valid"])), n]
    spans = dict(zip(SPLITS, zip([0, *ends[:2]], ends)))
    tokens = {split: read_lines(lines[a:b], level) for split, (a, b) in spans.items()}
    empty = [split for split, (a, b) in spans.items() if all(t == EOS for t in tokens[split])]
    if empty:
        raise InputError(f"{path} has {n} lines: too few to split 90/5/5 into train, valid and test with text in "
                         f"each (the {' and '.join(SPLIT_NAMES[s] for s in empty)} split would be empty); give a "
                         "longer file or a folder with train/valid/test.txt")
    about = f"{path.name}: " + ", ".join(f"{split} lines {a + 1}-{b} ({len(tokens[split]):,} {level}s)"
                                          for split, (a, b) in spans.items())
    return tokens, about


def find_splits(data_dir) -> dict[str, Path]:
    """The three split files of a PTB, WikiText-2 or train/valid/test folder."""
    root = Path(data_dir)
    if not root.exists():
        raise InputError(f"--data-dir {root} does not exist")
    if not root.is_dir():
        raise InputError(f"--data-dir {root} is not a folder")
    for layout in LAYOUTS:
        found = {split: root / name for split, name in zip(SPLITS, layout)}
        present = [p for p in found.values() if p.is_file()]
        if len(present) == 3:
            return found
        if present:
            missing = ", ".join(p.name for p in found.values() if not p.is_file())
            raise InputError(f"{root} has {present[0].name} but not {missing}")
    names = "; ".join(" ".join(layout) for layout in LAYOUTS)
    raise InputError(f"{root} holds no corpus: expected one of these sets of files: {names}")


def embedded_corpus(level: str = "word") -> dict[str, list[str]]:
    """The pydoc_data topics as word streams (see the module docstring)."""
    from pydoc_data.topics import topics

    token = re.compile(r"[a-z]+(?:'[a-z]+)?|[0-9]+|[^\sa-z0-9]")
    underline = re.compile(r"^\s*([*=\-~^#+])\1+\s*$")
    split_lines: dict[str, list[str]] = {split: [] for split in SPLITS}
    block = size = 0
    for name in sorted(topics):
        for line in topics[name].lower().splitlines():
            if line.strip() and not underline.match(line):
                tokens = token.findall(line)
                split_lines[DEAL[block % len(DEAL)]].append(" ".join(tokens))
                size += len(tokens) + 1  # with its <eos>
                if size >= BLOCK_TOKENS:
                    block, size = block + 1, 0
    words = {split: read_lines(lines, level) for split, lines in split_lines.items()}
    if level == "char":
        return words
    once = {w for w, n in Counter(words["train"]).items() if n == 1}
    words["train"] = [UNK if w in once else w for w in words["train"]]
    return words


def read_split(path: Path, split: str, level: str = "word") -> list[str]:
    """The tokens of one split file: UTF-8 text, at least one besides ``<eos>``."""
    words = read_lines(io.StringIO(read_utf8(path), newline=None), level)  # the lines open() gives in text mode
    if all(word == EOS for word in words):
        raise InputError(f"the {SPLIT_NAMES[split]} split is empty: {path} holds no words, only empty lines or "
                         "none; every split needs text")
    return words


def load_words(data_dir, level: str = "word", text_file=None) -> tuple[dict[str, list[str]], str]:
    """Each split's tokens, from ``data_dir``, ``text_file`` or, if neither, the embedded corpus, and a
    line on how a single file was split ("" otherwise)."""
    if level not in TOKENS:
        raise InputError(f"the tokens must be one of {', '.join(TOKENS)}, got {level!r}")
    if data_dir is not None and text_file is not None:
        raise InputError("give --data-dir or --text, not both")
    if text_file is not None:
        return split_text(text_file, level)
    if data_dir is None:
        return embedded_corpus(level), ""
    return {split: read_split(path, split, level) for split, path in find_splits(data_dir).items()}, ""


def encode(words: dict[str, list[str]]) -> tuple[list[str], dict[str, torch.Tensor]]:
    """Vocabulary from train (``<unk>`` always in it) and each split as token ids."""
    vocab = sorted(set(words["train"]) | {UNK})
    index = {w: i for i, w in enumerate(vocab)}
    unk = index[UNK]
    return vocab, {s: torch.tensor([index.get(w, unk) for w in ws], dtype=torch.long) for s, ws in words.items()}


def build(config: dict) -> Task:
    """The language-modelling task from ``config`` (missing keys take DEFAULTS)."""
    cfg = {**DEFAULTS, **config}
    words, about = load_words(cfg["data_dir"], cfg["tokens"], cfg["text_file"])
    vocab, ids = encode(words)
    tied = cfg["embedding"] * len(vocab) if cfg["tie_weights"] else 0
    gates = 4 if cfg["cell"] == "lstm" else 3  # a QRNN's 3 gates read two inputs and no state: about a GRU's size
    require("language", 0, len(vocab) * (cfg["embedding"] + cfg["hidden"] + 1) - tied
            + recurrent_parameters(cfg["embedding"], cfg["hidden"], cfg["layers"], gates),
            max(len(ids["valid"]), len(ids["test"])) * len(vocab),  # evaluation keeps a split's outputs
            advice=f"the vocabulary has {len(vocab):,} tokens: use a smaller corpus, character tokens or a "
                   "smaller --embedding and --hidden")
    splits = {s: (t[:-1], t[1:]) for s, t in ids.items()}  # predict the next token
    torch.manual_seed(cfg["seed"])
    model = TokenLSTM(len(vocab), cfg["embedding"], cfg["hidden"], cfg["layers"], cfg["dropout"], cfg["tie_weights"],
                      cfg["cell"])
    return Task("language", model, splits, "PPL", perplexity, about=about)
