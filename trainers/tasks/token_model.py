"""Embedding → LSTM, GRU or QRNN → linear over tokens: the copy task's and the language model's network."""
from __future__ import annotations

import torch
from torch import nn

import biaskit

from .qrnn import QRNN, QRNNStep

#: The recurrent cells a token model can have, by name: each is stored under its name (``lstm.*``).
CELLS = {"lstm": nn.LSTM, "gru": nn.GRU, "qrnn": QRNN}


class TokenLSTM(nn.Module):
    """Next-token model; ``forward`` runs the fused ``nn.LSTM`` (or ``nn.GRU``, or the QRNN) over a whole chunk."""

    def __init__(self, vocab: int, embedding: int, hidden: int, layers: int, dropout: float = 0.0,
                 tie_weights: bool = False, cell: str = "lstm"):
        super().__init__()
        if cell not in CELLS:
            raise biaskit.InputError(f"the cell must be one of {', '.join(CELLS)}, got {cell!r}")
        self.cell = cell
        self.embedding = nn.Embedding(vocab, embedding)
        self.add_module(cell, CELLS[cell](embedding, hidden, layers, batch_first=True,
                                          dropout=dropout if layers > 1 else 0.0))
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, vocab)
        if tie_weights:
            if embedding != hidden:
                raise biaskit.InputError(f"tied weights need embedding size = hidden size ({embedding} != {hidden})")
            self.head.weight = self.embedding.weight

    @property
    def rnn(self) -> nn.Module:
        """The recurrent module, whichever cell it is."""
        return getattr(self, self.cell)

    def forward(self, tokens: torch.Tensor, state=None):
        out, state = self.rnn(self.drop(self.embedding(tokens)), state)
        return self.head(self.drop(out)), state

    def advance(self, tokens: torch.Tensor, state=None):
        """The state ``forward`` would return, without the logits (the probes' burn-in)."""
        return self.rnn(self.drop(self.embedding(tokens)), state)[1]

    @staticmethod
    def loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-position cross-entropy, shaped like ``targets``."""
        return nn.functional.cross_entropy(logits.flatten(0, -2), targets.flatten(), reduction="none").view_as(targets)

    def system(self) -> biaskit.RecurrentSystem:
        """The recurrence as biaskit sees it: embedding → the cell's step (a QRNN's one step at a time)."""
        step = QRNNStep(self.rnn) if isinstance(self.rnn, QRNN) else self.rnn
        return biaskit.wrap(step, readout=self.head, loss_fn=nn.CrossEntropyLoss(reduction="none"),
                            encoder=self.embedding)
