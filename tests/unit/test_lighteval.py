"""A local MATH-lighteval folder: one copy per split is read, even when the split is there in two formats."""
import json

import pytest

from cookbook.data.lighteval import DuplicateCopyError, load_raw

ROWS = [{"problem": f"What is {i}+1?", "level": "Level 1", "type": "Prealgebra",
         "solution": f"It is $\\boxed{{{i + 1}}}$."} for i in range(6)]


def _parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def _jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _both_formats(root, train_jsonl_rows):
    _parquet(root / "data" / "train-00000-of-00001.parquet", ROWS)
    _parquet(root / "data" / "test-00000-of-00001.parquet", ROWS[:2])
    _jsonl(root / "train.jsonl", train_jsonl_rows)


def test_a_split_in_two_formats_is_read_once_from_parquet(tmp_path):
    _both_formats(tmp_path, list(reversed(ROWS)))  # the same rows, in another order
    raw, names, ignored = load_raw(tmp_path)
    assert len(raw["train"]) == len(ROWS) and raw["train"][0]["problem"] == ROWS[0]["problem"]
    assert names["train"].endswith("train-00000-of-00001.parquet") and "train.jsonl" not in names["train"]
    assert [p.rsplit("/", 1)[-1] for p in ignored["train"]] == ["train.jsonl"] and not ignored.get("test")


@pytest.mark.parametrize("other", [ROWS[:-1], ROWS[:-1] + [dict(ROWS[0], problem="What is 9+9?")],
                                   ROWS + [ROWS[0]]])
def test_copies_that_differ_are_refused_with_both_names(tmp_path, other):
    _both_formats(tmp_path, other)
    with pytest.raises(DuplicateCopyError, match=r"train-00000-of-00001\.parquet.*train\.jsonl.*remove one"):
        load_raw(tmp_path)


def test_an_unreadable_second_copy_is_refused(tmp_path):
    _both_formats(tmp_path, ROWS)
    (tmp_path / "train.jsonl").write_text("{broken\n")
    with pytest.raises(DuplicateCopyError, match=r"train\.jsonl.*remove one"):
        load_raw(tmp_path)


def test_parquet_shards_are_one_copy(tmp_path):
    _parquet(tmp_path / "data" / "train-00000-of-00002.parquet", ROWS[:4])
    _parquet(tmp_path / "data" / "train-00001-of-00002.parquet", ROWS[4:])
    _parquet(tmp_path / "data" / "test-00000-of-00001.parquet", ROWS[:2])
    _jsonl(tmp_path / "train.jsonl", ROWS)
    raw, names, ignored = load_raw(tmp_path)
    assert [r["problem"] for r in raw["train"]] == [r["problem"] for r in ROWS]
    assert "train-00000-of-00002" in names["train"] and "train-00001-of-00002" in names["train"]
    assert len(ignored["train"]) == 1


def test_shards_of_two_downloads_are_two_copies(tmp_path):
    _parquet(tmp_path / "data" / "train-00000-of-00001.parquet", ROWS)
    _parquet(tmp_path / "data" / "train-00000-of-00002.parquet", ROWS[:3])
    _parquet(tmp_path / "data" / "train-00001-of-00002.parquet", ROWS[3:])
    _parquet(tmp_path / "data" / "test-00000-of-00001.parquet", ROWS[:2])
    raw, names, ignored = load_raw(tmp_path)
    assert len(raw["train"]) == len(ROWS) and len(ignored["train"]) == 2
    _parquet(tmp_path / "data" / "train-00001-of-00002.parquet", ROWS[3:5])
    with pytest.raises(DuplicateCopyError, match="remove one"):
        load_raw(tmp_path)


def test_a_missing_shard_is_named(tmp_path):
    _parquet(tmp_path / "data" / "train-00000-of-00002.parquet", ROWS[:4])
    _parquet(tmp_path / "data" / "test-00000-of-00001.parquet", ROWS[:2])
    with pytest.raises(FileNotFoundError, match="train-00001-of-00002"):
        load_raw(tmp_path)


def test_jsonl_before_json(tmp_path):
    _jsonl(tmp_path / "train.jsonl", ROWS)
    (tmp_path / "train.json").write_text(json.dumps(ROWS))
    _jsonl(tmp_path / "test.jsonl", ROWS[:1])
    raw, names, ignored = load_raw(tmp_path)
    assert len(raw["train"]) == len(ROWS) and names["train"].endswith("train.jsonl")
    assert ignored["train"][0].endswith("train.json")
