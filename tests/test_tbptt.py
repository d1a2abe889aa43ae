"""Streaming BPTT(K1, K2) against naive per-loss computations, and the copy task's data."""
from __future__ import annotations

import pytest
import torch

from trainers.tasks import copy
from trainers.tasks.token_model import TokenLSTM
from trainers.tbptt import Stream, batchify


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return TokenLSTM(vocab=5, embedding=3, hidden=4, layers=2).double()


def naive_window_gradient(model, x, y, loss_positions, cut):
    """Σ over loss positions t of ∂loss_t/∂θ, each back-propagated from t to ``cut`` only,
    the state at ``cut`` computed by running the model from the start; /(S·K2)."""
    total = [torch.zeros_like(p) for p in model.parameters()]
    with torch.no_grad():
        _, state = model(x[:, :cut]) if cut > 0 else (None, None)
    for t in loss_positions:
        out, _ = model(x[:, cut:t + 1], state)
        loss = model.loss(out[:, -1:], y[:, t:t + 1]).sum() / (x.shape[0] * len(loss_positions))
        for acc, g in zip(total, torch.autograd.grad(loss, list(model.parameters()))):
            acc += g
    return total


@pytest.mark.parametrize("K1, K2", [(6, 3), (5, 5), (7, 2), (4, 3)])
def test_streaming_gradient_equals_naive_per_loss_truncation(K1, K2):
    model = tiny_model()
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, 5, (3, 20), generator=gen), torch.randint(0, 5, (3, 20), generator=gen)
    stream = Stream(x, y)
    while not stream.done:
        start, cut = stream.pos, stream.carry_pos
        loss, n = stream.window_loss(model, K1, K2)
        positions = list(range(start, start + n))
        assert n == min(K2, 20 - start)
        assert cut == max(0, start - (K1 - K2))  # each window reaches K1 steps back from its end
        got = torch.autograd.grad(loss, list(model.parameters()))
        want = naive_window_gradient(model, x, y, positions, cut)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w)


def test_burn_in_reaches_K1_back_in_steady_state():
    model = tiny_model()
    x = torch.randint(0, 5, (2, 30))
    stream = Stream(x, x)
    cuts = []
    while not stream.done:
        cuts.append((stream.pos, stream.carry_pos))
        stream.window_loss(model, 8, 3)
    assert all(start - cut == 5 for start, cut in cuts if start >= 5)


def test_hidden_state_is_carried_across_windows():
    """The state carried into each window equals the one a single pass over the stream reaches."""
    model = tiny_model()
    x = torch.randint(0, 5, (2, 25))
    stream = Stream(x, x)
    with torch.no_grad():
        while not stream.done:
            stream.window_loss(model, 6, 4)
            if stream.carry_pos > 0:
                _, (h, c) = model(x[:, :stream.carry_pos])
                torch.testing.assert_close(stream.carry[0], h)
                torch.testing.assert_close(stream.carry[1], c)


def test_batchify_makes_contiguous_streams():
    data = torch.arange(23)
    streams = batchify(data, 4)
    assert streams.shape == (4, 5)
    assert streams[1].tolist() == [5, 6, 7, 8, 9]
    with pytest.raises(ValueError, match="cannot feed"):
        batchify(torch.arange(3), 4)


@pytest.mark.parametrize("m", [4, (2, 5)])
def test_copy_stream_recalls_each_example(m):
    x, y = copy.generate(500, m, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (500,)
    pos = 0
    while pos < 480:
        length = int((x[pos:] == copy.RECALL).nonzero()[0])  # m data symbols before the recall
        assert (x[pos:pos + length] < copy.SYMBOLS).all()
        assert (x[pos + length + 1:pos + 2 * length] == copy.BLANK).all()
        assert (y[pos:pos + length] == copy.BLANK).all()
        assert torch.equal(y[pos + length:pos + 2 * length], x[pos:pos + length])
        if isinstance(m, int):
            assert length == m
        else:
            assert m[0] <= length <= m[1]
        pos += 2 * length


def test_copy_task_is_deterministic_given_its_seed():
    a = copy.build({"train_tokens": 300, "valid_tokens": 100, "test_tokens": 100, "seed": 3})
    b = copy.build({"train_tokens": 300, "valid_tokens": 100, "test_tokens": 100, "seed": 3})
    c = copy.build({"train_tokens": 300, "valid_tokens": 100, "test_tokens": 100, "seed": 4})
    assert all(torch.equal(a.splits[s][0], b.splits[s][0]) for s in a.splits)
    assert not torch.equal(a.splits["train"][0], c.splits["train"][0])
    for pa, pb in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(pa, pb)
