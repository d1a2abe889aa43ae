"""Property-based fuzzing of the data loaders: whatever a file holds, a load either succeeds with
data that keeps the loader's invariants or raises an InputError, never any other exception."""
from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from biaskit import InputError
from trainers.tasks import language
from trainers.tasks import point_process as pp

FUZZ = settings(max_examples=100, deadline=None, database=None)  # no example database in the repository
HEADER = "sequence,time,mark"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """One folder for every example (function-scoped tmp_path is not reset between examples)."""
    return tmp_path_factory.mktemp("fuzz")


def check_sequences(splits: dict, marks: int, from_csv: bool) -> int:
    """The invariants of a loaded data set; returns its number of sequences. A CSV's marks are
    dense, its times finite, and its sequences cut 80/10/10 (the pickles come split)."""
    assert set(splits) == set(pp.SPLITS)
    assert 1 <= marks <= pp.MAX_MARKS
    seen = set()
    for sequences in splits.values():
        for times, kinds in sequences:
            assert times.dtype == np.float64 and kinds.dtype == np.int64 and len(times) == len(kinds)
            assert (np.diff(times) >= 0).all()
            assert ((kinds >= 0) & (kinds < marks)).all()
            seen |= set(kinds.tolist())
    n = sum(map(len, splits.values()))
    if from_csv:
        assert seen == set(range(marks))
        assert all(np.isfinite(times).all() for sequences in splits.values() for times, _ in sequences)
        assert [len(splits[split]) for split in pp.SPLITS[:2]] == [int(0.8 * n), int(0.9 * n) - int(0.8 * n)]
    return n


def load_csv_or_input_error(path):
    try:
        return pp.load_csv(path)
    except InputError:
        return None


@FUZZ
@given(st.one_of(st.binary(max_size=400), st.binary(max_size=400).map(lambda b: HEADER.encode() + b"\n" + b)))
def test_load_csv_of_any_bytes_loads_or_raises_input_error(folder, data):
    path = folder / "bytes.csv"
    path.write_bytes(data)
    loaded = load_csv_or_input_error(path)
    if loaded is not None:
        splits, marks = loaded
        assert check_sequences(splits, marks, from_csv=True) >= 1


#: Cells a loader should accept, per column ...
VALID = {
    "sequence": st.one_of(st.integers(0, 12).map(str), st.sampled_from(["a", "b", " 3 ", "03", "٣"])),
    "time": st.one_of(st.floats(-1e6, 1e6).map(repr), st.floats(allow_nan=False, allow_infinity=False).map(repr),
                      st.integers(-10**300, 10**300).map(str), st.sampled_from(["1_0", " 2.5 ", "-0", "1e39"])),
    "mark": st.one_of(st.integers(0, 5).map(str), st.integers(0, 2**63 - 1).map(str),
                      st.sampled_from(["+2", " 4", "٣", "007"])),
}
#: ... and cells of any column, often ones it should refuse.
WILD = st.one_of(*VALID.values(), st.text(max_size=6), st.integers(-10**400, 10**400).map(str),
                 st.floats().map(repr), st.just("9" * 5000),
                 st.sampled_from(["", " ", "nan", "-inf", "1e400", "0x1", "soon", "1.0", "-1", "1e3", "a,b", '"']))


def quote(cell: str) -> str:
    return '"' + cell.replace('"', '""') + '"' if any(c in cell for c in ',"\r\n') else cell


@st.composite
def csv_files(draw):
    """A header naming the three columns (in any order, maybe with another) and rows of valid
    cells, some of them, often none, replaced by wild ones."""
    columns = draw(st.permutations(["sequence", "time", "mark", *draw(st.sampled_from([[], ["note"]]))]))
    row = st.fixed_dictionaries({c: VALID.get(c, st.text(max_size=3)) for c in columns})
    rows = draw(st.lists(row, max_size=30))
    for _ in range(draw(st.integers(0, 2)) if rows else 0):
        rows[draw(st.integers(0, len(rows) - 1))][draw(st.sampled_from(columns))] = draw(WILD)
    lines = [",".join(columns)] + [",".join(quote(row[c]) for c in columns) for row in rows]
    return "\n".join(lines) + draw(st.sampled_from(["", "\n", "\r\n"])), rows


@FUZZ
@given(csv_files())
def test_load_csv_of_random_cells_loads_or_raises_input_error(folder, drawn):
    text, rows = drawn
    path = folder / "cells.csv"
    path.write_text(text, encoding="utf-8", newline="")
    loaded = load_csv_or_input_error(path)
    if loaded is None:
        return
    splits, marks = loaded
    events = [row for row in rows if any(cell.strip() for cell in row.values())]  # blank lines are skipped
    assert check_sequences(splits, marks, from_csv=True) == len({row["sequence"].strip() for row in events})
    assert sum(len(times) for sequences in splits.values() for times, _ in sequences) == len(events)
    assert marks == len({int(row["mark"]) for row in events})
    for row in events:
        assert math.isfinite(float(row["time"])) and 0 <= int(row["mark"]) < 2**63


#: Plain data a pickle may hold, nested: what a malformed data pickle looks like.
PLAIN = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-3, 10**20), st.floats(), st.text(max_size=4),
              st.sampled_from(pp.EVENT_KEYS)),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(pp.EVENT_KEYS), inner)),
    max_leaves=20,
)


def load_pickles_or_input_error(folder, train: bytes):
    for key in ("dev", "test"):
        (folder / f"{key}.pkl").write_bytes(pickle.dumps({key: [], "dim_process": 3}))
    (folder / "train.pkl").write_bytes(train)
    try:
        return pp.load_pickles(folder)
    except InputError:
        return None


@FUZZ
@given(st.one_of(st.binary(max_size=200), st.binary(max_size=200).map(lambda b: b"\x80\x04" + b)))
def test_load_pickles_of_any_bytes_loads_or_raises_input_error(folder, data):
    loaded = load_pickles_or_input_error(folder, data)
    if loaded is not None:
        check_sequences(*loaded, from_csv=False)


@FUZZ
@given(PLAIN, st.one_of(st.integers(-1, 20), PLAIN))
def test_load_pickles_of_any_plain_data_loads_or_raises_input_error(folder, train, dim_process):
    loaded = load_pickles_or_input_error(folder, pickle.dumps({"train": train, "dim_process": dim_process}))
    if loaded is not None:
        check_sequences(*loaded, from_csv=False)


@FUZZ
@given(st.binary(max_size=300))
def test_language_split_of_any_bytes_loads_or_raises_input_error(folder, data):
    (folder / "train.txt").write_text("a b\n")
    (folder / "test.txt").write_text("b a\n")
    (folder / "valid.txt").write_bytes(data)
    try:
        words, _ = language.load_words(folder)
    except InputError:
        return
    assert words["valid"] and words["valid"][-1] == language.EOS
