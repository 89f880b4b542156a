"""Loading, preprocessing and preparing MATH-lighteval: schema, bad rows, layouts, idempotence, offline errors."""
import json

import pytest

from cookbook.config import load_config
from cookbook.data.lighteval import download, find_split_files, load_raw
from cookbook.data.prepare import prepare_data
from cookbook.data.preprocess import BadRowError, preprocess, read_records, to_record
from cookbook.data import stats

SUFFIX = " Let's think step by step and output the final answer within \\boxed{}."
GOOD = {"problem": "What is 1+1?", "level": "Level 1", "type": "Prealgebra",
        "solution": "1+1=2, so the answer is $\\boxed{2}$."}


def test_record_schema_matches_the_tutorial():
    rec = to_record(GOOD, "train", 7, SUFFIX)
    assert rec == {
        "data_source": "DigitalLearningGmbH/MATH-lighteval",
        "prompt": [{"role": "user", "content": "What is 1+1?" + SUFFIX}],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": "2"},
        "extra_info": {"split": "train", "index": 7, "level": "Level 1", "type": "Prealgebra"},
    }


@pytest.mark.parametrize("row, reason", [
    ({"solution": "\\boxed{1}"}, "missing field 'problem'"),
    ({"problem": "p", "solution": "no box here"}, "no \\\\boxed"),
    ({"problem": 3, "solution": "\\boxed{1}"}, "not a non-empty string"),
    ("just a string", "expected an object"),
])
def test_bad_row_stops_before_writing_and_names_the_row(tmp_path, row, reason):
    raw = {"train": [GOOD, GOOD, row], "test": [GOOD]}
    with pytest.raises(BadRowError, match=rf"train.jsonl, row 3: .*{reason}"):
        preprocess(raw, tmp_path, SUFFIX, source_names={"train": "train.jsonl"})
    assert not list(tmp_path.iterdir())


def test_skip_bad_rows_counts_them(tmp_path):
    raw = {"train": [GOOD, {"problem": "p", "solution": "none"}, GOOD], "test": [GOOD, {}]}
    report = preprocess(raw, tmp_path, SUFFIX, skip_bad_rows=True)
    assert report.splits["train"].written == 2 and report.splits["train"].skipped == 1
    assert report.splits["test"].reasons == {"missing field 'problem'": 1}
    assert [r["extra_info"]["index"] for r in read_records(tmp_path / "train.jsonl")] == [0, 1]


def test_read_records_names_a_broken_line(tmp_path):
    (tmp_path / "x.jsonl").write_text('{"a": 1}\n{"a": \n')
    with pytest.raises(BadRowError, match="x.jsonl, line 2: invalid JSON"):
        read_records(tmp_path / "x.jsonl")


def _write_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def test_huggingface_parquet_layout(tmp_path):
    _write_parquet(tmp_path / "data" / "train-00000-of-00001.parquet", [GOOD] * 3)
    _write_parquet(tmp_path / "data" / "test-00000-of-00001.parquet", [GOOD] * 2)
    raw, names = load_raw(tmp_path)
    assert len(raw["train"]) == 3 and len(raw["test"]) == 2 and "train-00000" in names["train"]


def test_json_layouts_and_bad_json_line(tmp_path):
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(GOOD) for _ in range(3)) + "\n")
    (tmp_path / "test.json").write_text(json.dumps([GOOD, GOOD]))
    raw, _ = load_raw(tmp_path)
    assert (len(raw["train"]), len(raw["test"])) == (3, 2)
    (tmp_path / "train.jsonl").write_text(json.dumps(GOOD) + "\n{broken\n")
    with pytest.raises(BadRowError, match="train.jsonl, row 2: invalid JSON"):
        load_raw(tmp_path)


def test_missing_local_copy_says_how_to_place_it(tmp_path):
    (tmp_path / "train.jsonl").write_text(json.dumps(GOOD) + "\n")
    with pytest.raises(FileNotFoundError, match="no test files.*modelscope download --dataset"):
        find_split_files(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        find_split_files(tmp_path / "nope")


def test_offline_download_refuses_at_once(tmp_path, monkeypatch):
    monkeypatch.setenv("COOKBOOK_OFFLINE", "1")
    with pytest.raises(ConnectionError, match="data.source=local"):
        download("AI-ModelScope/MATH-lighteval", tmp_path / "raw")


def test_prepare_generated_is_idempotent_and_local_works(tmp_path):
    cfg = load_config("tiny", ["data.num_train=300", "data.num_test=40"],
                      values={"runs_dir": str(tmp_path), "run_name": "r"})
    first = prepare_data(cfg)
    assert first.counts == {"train": 300, "test": 40} and not first.reused
    mtime = (first.out_dir / "train.jsonl").stat().st_mtime_ns
    again = prepare_data(cfg)
    assert again.reused and (first.out_dir / "train.jsonl").stat().st_mtime_ns == mtime
    changed = prepare_data(load_config("tiny", ["data.num_train=200", "data.num_test=40"],
                                       values={"runs_dir": str(tmp_path), "run_name": "r"}))
    assert not changed.reused and changed.counts["train"] == 200

    local = tmp_path / "copy"
    local.mkdir()
    (local / "train.jsonl").write_text("\n".join(json.dumps(GOOD) for _ in range(5)))
    (local / "test.jsonl").write_text(json.dumps(GOOD))
    cfg = load_config("tiny", ["data.source=local", f"data.local_dir={local}"],
                      values={"runs_dir": str(tmp_path), "run_name": "l"})
    assert prepare_data(cfg).counts == {"train": 5, "test": 1}


def test_stats_tables_and_plot(tmp_path):
    cfg = load_config("tiny", ["data.num_train=200", "data.num_test=20"],
                      values={"runs_dir": str(tmp_path), "run_name": "s"})
    records = stats.load_split(prepare_data(cfg).out_dir, "train")
    table = stats.counts_table(records)
    assert table.loc["total", "total"] == 200 and "Level 5" in table.index
    summary = stats.length_summary(records)
    assert summary["unit"] == "characters" and summary["max"] >= summary["p50"] > 0
    stats.plot_prompt_lengths(records, path=tmp_path / "h.png")
    assert (tmp_path / "h.png").stat().st_size > 1000
