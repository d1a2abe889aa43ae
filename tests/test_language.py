"""The language-modelling task: corpus loaders on fixture files, the embedded corpus, a short run."""
from __future__ import annotations

import pytest
import torch

from biaskit import InputError
from trainers import config as configs
from trainers import loop
from trainers.tasks import language


def write(folder, names, texts):
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in zip(names, texts):
        (folder / name).write_text(text)
    return folder


TEXTS = ("the cat sat\nthe dog sat\n", "the cat ran\n\n", "a dog sat\n")


@pytest.mark.parametrize("layout", language.LAYOUTS)
def test_each_layout_loads_with_eos_unk_and_empty_lines(tmp_path, layout):
    task = language.build({"data_dir": str(write(tmp_path, layout, TEXTS)), "embedding": 4, "hidden": 4})
    vocab = sorted({"the", "cat", "sat", "dog", "<eos>", "<unk>"})
    assert task.model.head.out_features == len(vocab)

    def words(split):
        inputs, targets = task.splits[split]
        ids = torch.cat([inputs[:1], targets]).tolist()
        return [vocab[i] for i in ids]

    assert words("train") == "the cat sat <eos> the dog sat <eos>".split()
    assert words("valid") == "the cat <unk> <eos> <eos>".split()  # "ran" is unseen; the empty line is a lone <eos>
    assert words("test") == "<unk> dog sat <eos>".split()
    inputs, targets = task.splits["train"]
    assert torch.equal(inputs[1:], targets[:-1])  # the target is the next word


def test_missing_split_and_empty_folder_are_refused_clearly(tmp_path):
    write(tmp_path / "ptb", ("ptb.train.txt", "ptb.valid.txt"), TEXTS[:2])
    with pytest.raises(InputError, match="has ptb.train.txt but not ptb.test.txt"):
        language.build({"data_dir": str(tmp_path / "ptb")})
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="holds no corpus"):
        language.build({"data_dir": str(tmp_path / "empty")})
    with pytest.raises(InputError, match="nope does not exist"):
        language.build({"data_dir": str(tmp_path / "nope")})
    with pytest.raises(InputError, match="is not a folder"):
        language.build({"data_dir": str(tmp_path / "ptb" / "ptb.train.txt")})
    write(tmp_path / "blank", ("train.txt", "valid.txt", "test.txt"), ("", "a\n", "b\n"))
    with pytest.raises(InputError, match="training split is empty"):
        language.build({"data_dir": str(tmp_path / "blank")})


def test_a_missing_data_dir_is_said_to_not_exist_on_the_command_line(run_cli, tmp_path):
    res = run_cli("train", "language", "--data-dir", tmp_path / "nodata", "--out", tmp_path / "x")
    assert res.code == 2 and len(res.err.strip().splitlines()) == 1
    assert f"--data-dir {tmp_path / 'nodata'} does not exist" in res.err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("split", [1, 2])
@pytest.mark.parametrize("text", ["", "\n\n \n"])
def test_an_empty_valid_or_test_split_is_refused_clearly(tmp_path, split, text):
    texts = list(TEXTS)
    texts[split] = text
    write(tmp_path, language.LAYOUTS[2], texts)
    name = ("validation", "test")[split - 1]
    with pytest.raises(InputError, match=f"the {name} split is empty: .*{language.LAYOUTS[2][split]} holds no words"):
        language.build({"data_dir": str(tmp_path)})


def test_a_split_that_is_not_utf8_is_refused_at_its_first_bad_byte(tmp_path):
    write(tmp_path, language.LAYOUTS[0], TEXTS)
    (tmp_path / "ptb.valid.txt").write_bytes("the cat\nsat on a café\n".encode("latin1"))
    with pytest.raises(InputError, match=r"ptb.valid.txt is not UTF-8 text: byte 20 \(line 2\) is b'\\xe9'"):
        language.build({"data_dir": str(tmp_path)})


def test_embedded_corpus_is_deterministic_and_split_80_10_10():
    a, b = language.embedded_corpus(), language.embedded_corpus()
    assert a == b
    sizes = {split: len(words) for split, words in a.items()}
    total = sum(sizes.values())
    assert total > 100_000
    assert sizes["train"] / total == pytest.approx(0.8, abs=0.01)
    assert sizes["valid"] / total == pytest.approx(0.1, abs=0.01)
    assert sizes["test"] / total == pytest.approx(0.1, abs=0.01)
    assert "<unk>" in a["train"] and all(w.islower() or not w.isalpha() for w in a["train"][:1000])


def unigram_perplexities(words):
    """Per split: the perplexity of add-one unigram frequencies of train, on the ids the model sees."""
    vocab, ids = language.encode(words)
    counts = torch.bincount(ids["train"], minlength=len(vocab)).double()
    log_p = ((counts + 1) / (counts.sum() + len(vocab))).log()
    return {split: (-log_p[t].mean()).exp().item() for split, t in ids.items()}


def test_embedded_valid_and_test_score_alike_under_a_unigram_model():
    ppl = unigram_perplexities(language.embedded_corpus())
    assert ppl["valid"] == pytest.approx(ppl["test"], rel=0.25)  # cut alphabetically they were 171 and 92


def test_a_short_language_run_trains(tmp_path):
    gen = torch.Generator().manual_seed(0)
    words = [f"w{i}" for i in range(30)]

    def text(lines):  # each line counts up from a random word: learnable, not memorisable
        starts = torch.randint(0, 20, (lines,), generator=gen).tolist()
        return "".join(" ".join(words[s:s + 8]) + "\n" for s in starts)

    data = write(tmp_path / "corpus", ("train.txt", "valid.txt", "test.txt"), (text(600), text(60), text(60)))
    cfg = configs.full_config("language", {"data_dir": str(data), "embedding": 8, "hidden": 16},
                              {"epochs": 2, "batch_size": 16, "K": 5, "window": 20, "windows": 8, "K_min": 2,
                            "K_max": 20, "delta": 0.5})
    lines = loop.Run(cfg, tmp_path / "run", quiet=True).fit()
    vocab = len(words) + 2  # <eos> and <unk>
    assert lines[-1]["valid_loss"] < 0.5 * torch.log(torch.tensor(float(vocab))).item()  # far below a uniform guess
    assert lines[-1]["valid_ppl"] == pytest.approx(torch.tensor(lines[-1]["valid_loss"]).exp().item(), rel=1e-6)


def test_a_single_text_file_is_split_by_contiguous_blocks_of_lines(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text("".join(f"line {i}\n" for i in range(1, 41)))  # 40 lines: 36 / 2 / 2
    words, about = language.load_words(None, "word", path)
    assert words["train"][:3] == ["line", "1", "<eos>"] and words["train"][-3:] == ["line", "36", "<eos>"]
    assert words["valid"] == "line 37 <eos> line 38 <eos>".split()
    assert words["test"] == "line 39 <eos> line 40 <eos>".split()
    assert about == "book.txt: train lines 1-36 (108 words), valid lines 37-38 (6 words), test lines 39-40 (6 words)"
    task = language.build({"text_file": str(path), "embedding": 4, "hidden": 4})
    assert task.about == about


def test_characters_are_tokens_at_the_char_level(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text("ab c\n" * 40)
    words, about = language.load_words(None, "char", path)
    assert words["valid"] == ["a", "b", " ", "c", "<eos>"] * 2 and "chars" in about
    folder = write(tmp_path / "corpus", ("train.txt", "valid.txt", "test.txt"), TEXTS)
    chars, _ = language.load_words(folder, "char")
    assert chars["test"] == list("a dog sat") + ["<eos>"]


@pytest.mark.parametrize("make, message", [
    (lambda p: language.load_words(None, "word", p / "missing.txt"), "missing.txt does not exist"),
    (lambda p: language.load_words(None, "word", p), "is not a file"),
    (lambda p: language.load_words(None, "word", (p / "two.txt", (p / "two.txt").write_text("a\nb\n"))[0]),
     "too few to split"),
    (lambda p: language.load_words(p, "word", p / "x.txt"), "not both"),
    (lambda p: language.load_words(None, "bytes"), "tokens must be one of"),
    (lambda p: language.build({"cell": "transformer"}), "cell must be one of"),
])
def test_bad_text_options_are_refused_clearly(tmp_path, make, message):
    with pytest.raises(InputError, match=message):
        make(tmp_path)


def test_a_char_level_gru_trains_and_its_every_step_bias_is_measured(tmp_path):
    """The GRU model's fused forward is the step biaskit audits: its every-step bias matches truncation."""
    from helpers import flat_norm, naive_every
    from torch import nn

    path = tmp_path / "book.txt"
    path.write_text("".join(f"{'abcdefgh'[i % 8:]}{'abcdefgh'[:i % 8]}\n" for i in range(400)))
    cfg = configs.full_config("language", {"text_file": str(path), "tokens": "char", "cell": "gru", "embedding": 6,
                                           "hidden": 8},
                              {"epochs": 1, "batch_size": 8, "K": 4, "window": 10, "windows": 6, "groups": 3,
                               "K_min": 2, "K_max": 10, "delta": 0.5, "loss_at": "every"})
    run = loop.Run(cfg, tmp_path / "run", quiet=True)
    lines = run.fit()
    model = run.model.eval()
    assert isinstance(model.rnn, nn.GRU) and "gru.weight_hh_l0" in model.state_dict()
    assert lines[-1]["valid_loss"] < torch.log(torch.tensor(10.0)).item()
    gen = torch.Generator().manual_seed(1)
    tokens, targets = torch.randint(0, 9, (4, 7), generator=gen), torch.randint(0, 9, (4, 7), generator=gen)
    import biaskit
    ds = biaskit.decompose(model.system(), tokens, targets, loss_at="every", groups=2)
    args = (model.rnn, model.head, nn.CrossEntropyLoss(reduction="none"), tokens, targets)
    full, trunc = naive_every(*args, encoder=model.embedding), naive_every(*args, 2, encoder=model.embedding)
    want = flat_norm([trunc[n] - full[n] for n in full]) / flat_norm(full.values())
    assert ds["rel_bias"].sel(K=2).item() == pytest.approx(want, abs=3e-6)


def qrnn_truncated(model, tokens, targets, K=None, every=False):
    """ĝ_K of the QRNN language model by its own chunk forward: the state entering step s − K detached
    (tuple of (c, last input) per layer), the losses at the last step or at every step."""
    from trainers.tbptt import detach

    params = [p for p in model.parameters() if p.requires_grad]
    R, total = tokens.shape[1], [torch.zeros_like(p) for p in params]
    for s in range(R) if every else [R - 1]:
        x = model.embedding(tokens[:, :s + 1])
        split = None if K is None or K >= s else s - K
        if split is None:
            out, _ = model.rnn(x)
        else:
            _, state = model.rnn(x[:, :split])
            out, _ = model.rnn(x[:, split:], detach(state))
        y = targets[:, s] if every else targets
        loss = torch.nn.functional.cross_entropy(model.head(out[:, -1]), y)
        total = [t + g for t, g in zip(total, torch.autograd.grad(loss, params))]
    return [t / (R if every else 1) for t in total]


@pytest.mark.parametrize("every", [False, True], ids=["last step", "every step"])
def test_a_qrnn_language_model_steps_as_it_runs_and_its_bias_is_truncations(every):
    """The QRNN's chunk forward and its one-step view agree, and biaskit's bias of the step view is the
    detach-based truncation of the chunk forward, float64."""
    from helpers import flat_norm

    import biaskit
    from trainers.tasks.token_model import TokenLSTM

    torch.manual_seed(0)
    model = TokenLSTM(9, 5, 6, 2, cell="qrnn").double().eval()
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 9, (4, 8), generator=gen)
    targets = torch.randint(0, 9, (4, 8) if every else (4,), generator=gen)
    x = model.embedding(tokens)
    out, state = model.rnn(x)
    step_state, outs = model.rnn.initial_state(4), []
    for t in range(8):
        h, step_state = model.rnn.step(x[:, t], step_state)
        outs.append(h)
    torch.testing.assert_close(torch.stack(outs, 1), out, rtol=1e-12, atol=1e-12)
    ds = biaskit.decompose(model.system(), tokens, targets, loss_at="every" if every else "last", groups=2)
    full = qrnn_truncated(model, tokens, targets, every=every)
    assert ds.attrs["grad_norm"] == pytest.approx(flat_norm(full), rel=1e-10)
    for K in (0, 2, 5):
        trunc = qrnn_truncated(model, tokens, targets, K, every)
        want = flat_norm([a - b for a, b in zip(trunc, full)]) / flat_norm(full)
        assert ds["rel_bias"].sel(K=K).item() == pytest.approx(want, rel=1e-9, abs=1e-12)


def test_a_qrnn_language_model_trains(tmp_path):
    cfg = configs.full_config("language", {"cell": "qrnn", "embedding": 8, "hidden": 8, "layers": 2},
                              {"epochs": 1, "batch_size": 8, "K": 4, "window": 10, "windows": 6, "groups": 3,
                               "K_min": 2, "K_max": 10, "delta": 0.5})
    (line,) = loop.Run(cfg, tmp_path / "run", quiet=True).fit()
    assert line["valid_ppl"] < 2207 and line["rel_bias_exact"] >= 0  # below a uniform guess over the vocabulary
