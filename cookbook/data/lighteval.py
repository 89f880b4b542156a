"""Loading MATH-lighteval from a local copy (the layouts ModelScope and Hugging Face ship) or ModelScope."""
from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any, NamedTuple

from cookbook.atomic import read_jsonl
from cookbook.data.preprocess import SPLITS, BadRowError

PLACE_HINT = ("download it with `modelscope download --dataset AI-ModelScope/MATH-lighteval --local_dir DIR` "
              "(or copy the Hugging Face dataset DigitalLearningGmbH/MATH-lighteval) and set data.local_dir=DIR")


def find_split_files(root: str | os.PathLike) -> dict[str, list[Path]]:
    """``{split: [files]}``: parquet, json or jsonl files whose name starts with the split, at the top or one
    folder down (``data/train-00000-of-00001.parquet``, ``train.jsonl``, ``test.json``...)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data.local_dir={str(root)!r} is not a directory; {PLACE_HINT}")
    found: dict[str, list[Path]] = {}
    candidates = [p for pattern in ("*", "*/*") for p in root.glob(pattern) if p.is_file()]
    for split in SPLITS:
        files = sorted(p for p in candidates if p.name.startswith(split) and
                       p.suffix in (".parquet", ".json", ".jsonl"))
        if files:
            found[split] = files
    missing = [s for s in SPLITS if s not in found]
    if missing:
        raise FileNotFoundError(
            f"no {' / '.join(missing)} files in {root} (looked for {{train,test}}*.parquet|.json|.jsonl at the top "
            f"and one folder down); {PLACE_HINT}")
    return found


def _read_json_rows(path: Path) -> list[Any]:
    text = path.read_text()
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise BadRowError(f"{path}, line {e.lineno}: invalid JSON ({e.msg})") from None
    return read_jsonl(path, BadRowError, unit="row")


FORMATS = (".parquet", ".jsonl", ".json")  # the order in which a split's copies are preferred
SHARD = re.compile(r"-(\d+)-of-(\d+)$")


class DuplicateCopyError(ValueError):
    """A split is in the folder twice (two formats or two folders) and the copies differ."""


def split_copies(files: list[Path]) -> list[list[Path]]:
    """A split's files grouped into copies, one per (format, folder, shard count), the preferred copy first: the
    dataset's own parquet, then jsonl, then json. The shards of one copy (``train-00000-of-00002``,
    ``train-00001-of-00002``) stay together, and a missing shard is named."""
    groups: dict[tuple[str, str, str], list[Path]] = {}
    for path in files:  # shards "-of-00002" and "-of-00001" side by side are two downloads, so two copies
        shard = SHARD.search(path.stem)
        groups.setdefault((path.suffix, str(path.parent), shard.group(2) if shard else ""), []).append(path)
    copies = [sorted(groups[key]) for key in sorted(groups, key=lambda k: (FORMATS.index(k[0]), k[1], k[2]))]
    for copy in copies:
        shards = [m for m in (SHARD.search(p.stem) for p in copy) if m]
        if not shards:
            continue
        total = int(shards[0].group(2))
        have = {int(m.group(1)) for m in shards}
        missing = [i for i in range(total) if i not in have]
        if missing:
            stem = copy[0].stem[:shards[0].start()]
            width = len(shards[0].group(1))
            names = ", ".join(f"{stem}-{i:0{width}d}-of-{shards[0].group(2)}{copy[0].suffix}" for i in missing)
            raise FileNotFoundError(f"{copy[0].parent} holds {len(have)} of the {total} shards of "
                                    f"'{stem}'; missing: {names}. Download the copy again; {PLACE_HINT}")
    return copies


def _read_copy(copy: list[Path]) -> list[Any]:
    rows: list[Any] = []
    for path in copy:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            rows.extend(pq.read_table(path).to_pylist())
        else:
            rows.extend(_read_json_rows(path))
    return rows


def _row_key(row: Any) -> Any:
    if isinstance(row, dict):
        return row.get("problem"), row.get("solution")
    return repr(row)


def _names(copy: list[Path]) -> str:
    return ", ".join(str(p) for p in copy)


def _check_same_rows(split: str, chosen: list[Path], rows: list[Any], other: list[Path]) -> None:
    """Refuse when another copy of the split holds other rows than the one read."""
    advice = (f"the {split} split is in {_names(chosen)} and again in {_names(other)}, and {{why}}; remove one "
              f"of them (the loader reads parquet first, then jsonl, then json)")
    try:
        other_rows = _read_copy(other)
    except (BadRowError, OSError, ValueError) as e:
        raise DuplicateCopyError(advice.format(why=f"the second copy cannot be read to compare ({e})")) from None
    if len(other_rows) != len(rows):
        raise DuplicateCopyError(advice.format(why=f"they differ: {len(rows)} rows against {len(other_rows)}"))
    mine, theirs = Counter(map(_row_key, rows)), Counter(map(_row_key, other_rows))
    if mine != theirs:
        differ = sum((mine - theirs).values())
        raise DuplicateCopyError(advice.format(
            why=f"they differ: {differ} of the {len(rows)} (problem, solution) pairs of the first are not in the "
                "second"))


class RawData(NamedTuple):
    rows: dict[str, list[Any]]  # per split, from one copy
    names: dict[str, str]  # per split: the files read, comma-separated (error messages name them)
    ignored: dict[str, list[str]]  # per split: other copies holding the same rows, not read again


def load_raw(local_dir: str | os.PathLike) -> RawData:
    """Raw rows per split, read from ONE copy of each split (parquet, else jsonl, else json), the files
    read, and the identical copies in other formats that were ignored. A second copy with other rows is
    refused (DuplicateCopyError names both files)."""
    rows: dict[str, list[Any]] = {}
    names: dict[str, str] = {}
    ignored: dict[str, list[str]] = {}
    for split, files in find_split_files(local_dir).items():
        chosen, *others = split_copies(files)
        rows[split] = _read_copy(chosen)
        for other in others:
            _check_same_rows(split, chosen, rows[split], other)
            ignored.setdefault(split, []).extend(str(p) for p in other)
        names[split] = _names(chosen)
    return RawData(rows, names, ignored)


def download(dataset_id: str, dest: str | os.PathLike) -> Path:
    """Fetch the dataset with ModelScope into ``dest``.

    With ``COOKBOOK_OFFLINE=1`` (air-gapped clusters, CI) it refuses at once instead of waiting on the
    network; any download failure is reported with how to place a local copy instead.
    """
    dest = Path(dest)
    if os.environ.get("COOKBOOK_OFFLINE") == "1":
        raise ConnectionError(f"COOKBOOK_OFFLINE=1: not downloading {dataset_id}; {PLACE_HINT}, and use "
                              "data.source=local")
    from modelscope.hub.snapshot_download import dataset_snapshot_download

    dest.mkdir(parents=True, exist_ok=True)
    try:
        return Path(dataset_snapshot_download(dataset_id, local_dir=str(dest)))
    except Exception as e:  # noqa: BLE001 - network, auth and hub errors all get the same advice
        raise ConnectionError(f"downloading {dataset_id} from ModelScope failed ({type(e).__name__}: {e}); "
                              f"{PLACE_HINT}, and use data.source=local") from None
