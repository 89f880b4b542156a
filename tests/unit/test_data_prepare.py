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


class WordTokenizer:
    """A stand-in tokenizer: one token per word of the prompt, plus a bos and the generation prompt."""
    name_or_path = "words"

    def __init__(self):
        self.calls = 0

    def apply_chat_template(self, messages, add_generation_prompt=False, tokenize=False):
        assert add_generation_prompt and tokenize  # the call the rollout engine makes
        self.calls += 1
        return {"input_ids": [0] * (1 + sum(len(m["content"].split()) for m in messages) + 1)}


@pytest.fixture(scope="module")
def tok():
    """A real (small) BPE tokenizer with the project's chat template, trained in about a second."""
    from cookbook.data.generate import generate_rows
    from cookbook.models.tokenizer import train_tokenizer

    rows = generate_rows(300, 0)
    return train_tokenizer([r["problem"] + SUFFIX for r in rows] + [r["solution"] for r in rows], 512)


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
    raw, names, _ = load_raw(tmp_path)
    assert len(raw["train"]) == 3 and len(raw["test"]) == 2 and "train-00000" in names["train"]


def test_json_layouts_and_bad_json_line(tmp_path):
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(GOOD) for _ in range(3)) + "\n")
    (tmp_path / "test.json").write_text(json.dumps([GOOD, GOOD]))
    raw, _, _ = load_raw(tmp_path)
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


def test_prepare_generated_is_idempotent_and_local_works(tmp_path, tok):
    cfg = load_config("tiny", ["data.num_train=300", "data.num_test=40", "data.validation_size=0"],
                      values={"runs_dir": str(tmp_path), "run_name": "r"})
    first = prepare_data(cfg, tokenizer=tok)
    assert first.counts == {"train": 300, "test": 40} and not first.reused
    mtime = (first.out_dir / "train.jsonl").stat().st_mtime_ns
    again = prepare_data(cfg, tokenizer=tok)
    assert again.reused and (first.out_dir / "train.jsonl").stat().st_mtime_ns == mtime
    changed = prepare_data(load_config("tiny", ["data.num_train=200", "data.num_test=40", "data.validation_size=0"],
                                       values={"runs_dir": str(tmp_path), "run_name": "r"}), tokenizer=tok)
    assert not changed.reused and changed.counts["train"] == 200

    local = tmp_path / "copy"
    local.mkdir()
    (local / "train.jsonl").write_text("\n".join(json.dumps(GOOD) for _ in range(5)))
    (local / "test.jsonl").write_text(json.dumps(GOOD))
    cfg = load_config("tiny", ["data.source=local", f"data.local_dir={local}", "data.validation_size=0"],
                      values={"runs_dir": str(tmp_path), "run_name": "l"})
    report = prepare_data(cfg, tokenizer=tok)
    assert report.counts == {"train": 5, "test": 1}
    assert report.files == {"train": str(local / "train.jsonl"), "test": str(local / "test.jsonl")}


def test_validation_split_is_held_out_and_test_rows_stay_the_same(tmp_path, tok):
    def prepare(name, *overrides):
        cfg = load_config("tiny", ["data.num_train=100", "data.num_test=30", *overrides],
                          values={"runs_dir": str(tmp_path), "run_name": name})
        report = prepare_data(cfg, tokenizer=tok)
        return report, {s: stats.load_split(report.out_dir, s) for s in report.counts}

    plain, without = prepare("none", "data.validation_size=0")
    held, split = prepare("val", "data.validation_size=20")
    assert plain.counts == {"train": 100, "test": 30} and held.counts == {"train": 100, "validation": 20, "test": 30}
    assert [r["prompt"] for r in split["test"]] == [r["prompt"] for r in without["test"]]  # test unchanged
    problems = {s: {r["prompt"][0]["content"] for r in rows} for s, rows in split.items()}
    assert not problems["validation"] & problems["test"] and not problems["validation"] & problems["train"]
    again, _ = prepare("none", "data.validation_size=0")  # a run folder's data follows its config
    assert again.reused and not (again.out_dir / "validation.jsonl").exists()

    local = tmp_path / "copy"
    local.mkdir()
    rows = [dict(GOOD, problem=f"What is {i}?") for i in range(10)]
    (local / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (local / "test.jsonl").write_text(json.dumps(GOOD))
    cfg = load_config("tiny", ["data.source=local", f"data.local_dir={local}", "data.validation_size=3"],
                      values={"runs_dir": str(tmp_path), "run_name": "lv"})
    report = prepare_data(cfg, tokenizer=tok)
    assert report.counts == {"train": 7, "validation": 3, "test": 1}
    with pytest.raises(ValueError, match="data.validation_size=10 leaves no training problems"):
        prepare_data(load_config("tiny", ["data.source=local", f"data.local_dir={local}", "data.validation_size=10"],
                                 values={"runs_dir": str(tmp_path), "run_name": "lx"}), tokenizer=tok)


def test_stats_tables_and_plot(tmp_path, tok):
    cfg = load_config("tiny", ["data.num_train=200", "data.num_test=20"],
                      values={"runs_dir": str(tmp_path), "run_name": "s"})
    records = stats.load_split(prepare_data(cfg, tokenizer=tok).out_dir, "train")
    table = stats.counts_table(records)
    assert table.loc["total", "total"] == 200 and "Level 5" in table.index
    summary = stats.length_summary(records)
    assert summary["unit"] == "characters" and summary["max"] >= summary["p50"] > 0
    stats.plot_prompt_lengths(records, path=tmp_path / "h.png")
    assert (tmp_path / "h.png").stat().st_size > 1000


# --- prompts over grpo.max_prompt_length are dropped at preprocessing, and counted ----------------

def _long(words):
    return dict(GOOD, problem=" ".join(["word"] * words) + " ?")


def test_over_long_prompts_are_dropped_and_counted(tmp_path):
    # GOOD's prompt is 3 + 12 words (problem + suffix) and 2 template tokens: 17; _long(w)'s is w + 15
    raw = {"train": [GOOD, _long(30), GOOD, {"problem": "p", "solution": "none"}, _long(5)],
           "test": [_long(40), GOOD]}
    report = preprocess(raw, tmp_path, SUFFIX, skip_bad_rows=True, tokenizer=WordTokenizer(),
                        max_prompt_length=19)
    train, test = report.splits["train"], report.splits["test"]
    assert (train.written, train.skipped, train.too_long) == (2, 1, 2)
    assert (test.written, test.skipped, test.too_long) == (1, 0, 1)
    assert train.too_long_examples == [{"split": "train", "row": 2, "tokens": 45},
                                       {"split": "train", "row": 5, "tokens": 20}]
    assert test.too_long_examples == [{"split": "test", "row": 1, "tokens": 55}]
    records = read_records(tmp_path / "train.jsonl")
    assert [r["extra_info"]["index"] for r in records] == [0, 1]
    text = str(report)
    assert "too long" in text and "max_prompt_length" in text and "row 2" in text


def test_the_limit_is_inclusive_with_a_real_tokenizer(tmp_path, tok):
    records = [to_record(GOOD, "train", 0, SUFFIX)]
    (n,) = stats.prompt_lengths(records, tok)
    raw = {"train": [GOOD, GOOD], "test": [GOOD]}
    kept = preprocess(raw, tmp_path, SUFFIX, tokenizer=tok, max_prompt_length=n)
    assert kept.splits["train"].written == 2 and kept.splits["train"].too_long == 0
    dropped = preprocess(raw, tmp_path, SUFFIX, tokenizer=tok, max_prompt_length=n - 1)
    assert (dropped.splits["train"].written, dropped.splits["train"].too_long) == (0, 2)
    assert dropped.splits["train"].too_long_examples[0] == {"split": "train", "row": 1, "tokens": n}


def test_no_tokenizer_no_length_filter_and_a_limit_needs_one(tmp_path):
    raw = {"train": [_long(3000)], "test": [GOOD]}
    assert preprocess(raw, tmp_path, SUFFIX).splits["train"].written == 1
    with pytest.raises(ValueError, match="tokenizer"):
        preprocess(raw, tmp_path, SUFFIX, max_prompt_length=10)


def test_prepare_drops_prompts_over_the_config_limit_and_rebuilds_when_it_changes(tmp_path, monkeypatch):
    local = tmp_path / "copy"
    local.mkdir()
    (local / "train.jsonl").write_text("\n".join(json.dumps(r) for r in [GOOD, _long(100), GOOD]))
    (local / "test.jsonl").write_text(json.dumps(GOOD))
    fake = WordTokenizer()
    monkeypatch.setattr(stats, "tokenizer_for", lambda cfg: fake)  # prepare_data's default tokenizer

    def cfg(limit):
        return load_config("tiny", ["data.source=local", f"data.local_dir={local}", f"grpo.max_prompt_length={limit}",
                                    "data.validation_size=0"],
                           values={"runs_dir": str(tmp_path), "run_name": "l"})

    first = prepare_data(cfg(96))
    assert first.counts == {"train": 2, "test": 1} and first.too_long == {"train": 1, "test": 0}
    assert fake.calls == 4
    manifest = json.loads((first.out_dir / "manifest.json").read_text())
    assert manifest["too_long"] == {"train": 1, "test": 0}
    assert manifest["too_long_examples"]["train"] == [{"split": "train", "row": 2, "tokens": 115}]
    assert manifest["identity"]["max_prompt_length"] == 96 and manifest["identity"]["tokenizer"]["name"] == "words"
    assert manifest["files"]["train"] == str(local / "train.jsonl")
    again = prepare_data(cfg(96))
    assert again.reused and again.too_long == {"train": 1, "test": 0} and again.files == first.files
    wider = prepare_data(cfg(200))
    assert not wider.reused and wider.counts == {"train": 3, "test": 1} and wider.too_long == {"train": 0, "test": 0}
    other = WordTokenizer()
    other.name_or_path = "another/tokenizer"
    assert not prepare_data(cfg(200), tokenizer=other).reused
    text, html = str(first), first._repr_html_()
    assert "too long" in text and "train.jsonl" in text
    assert "too long" in html and "train.jsonl" in html


def test_report_names_an_ignored_identical_copy(tmp_path, tok):
    local = tmp_path / "copy"
    _write_parquet(local / "data" / "train-00000-of-00001.parquet", [GOOD] * 3)
    _write_parquet(local / "data" / "test-00000-of-00001.parquet", [GOOD])
    (local / "train.jsonl").write_text("\n".join(json.dumps(GOOD) for _ in range(3)))
    report = prepare_data(load_config("tiny", ["data.source=local", f"data.local_dir={local}", "data.validation_size=0"],
                                      values={"runs_dir": str(tmp_path), "run_name": "d"}), tokenizer=tok)
    assert report.counts == {"train": 3, "test": 1}
    assert report.ignored == {"train": [str(local / "train.jsonl")]}
    assert "ignored" in str(report) and "train.jsonl" in str(report) and "ignored" in report._repr_html_()
    manifest = json.loads((report.out_dir / "manifest.json").read_text())
    assert manifest["ignored_duplicates"] == {"train": [str(local / "train.jsonl")]}
