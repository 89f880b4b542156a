"""Loading MATH-lighteval from a local copy (the layouts ModelScope and Hugging Face ship) or ModelScope."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

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


def load_raw(local_dir: str | os.PathLike) -> tuple[dict[str, list[Any]], dict[str, str]]:
    """Raw rows per split, and the file names they came from (for error messages)."""
    rows: dict[str, list[Any]] = {}
    names: dict[str, str] = {}
    for split, files in find_split_files(local_dir).items():
        rows[split] = []
        for path in files:
            if path.suffix == ".parquet":
                import pyarrow.parquet as pq

                rows[split].extend(pq.read_table(path).to_pylist())
            else:
                rows[split].extend(_read_json_rows(path))
        names[split] = ", ".join(str(p) for p in files)
    return rows, names


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
