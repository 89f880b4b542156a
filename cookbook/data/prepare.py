"""One call from config to preprocessed train/test JSONL: what notebook 10 and `cookbook data` run."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from cookbook.atomic import write_json
from cookbook.config import CookbookConfig
from cookbook.data.preprocess import PreprocessReport, preprocess

MANIFEST = "manifest.json"


@dataclass
class DataReport:
    out_dir: Path
    source: str
    counts: dict[str, int]
    skipped: dict[str, int]
    reused: bool

    def __str__(self) -> str:
        how = "reused" if self.reused else "written"
        skipped = f", skipped {self.skipped}" if any(self.skipped.values()) else ""
        return f"{self.source} data {how} in {self.out_dir}: {self.counts}{skipped}"

    def _repr_html_(self) -> str:
        rows = "".join(f"<tr><td>{k}</td><td>{v}</td><td>{self.skipped.get(k, 0)}</td></tr>"
                       for k, v in self.counts.items())
        return (f"<p>{self.source} data {'reused' if self.reused else 'written'} in <code>{self.out_dir}</code></p>"
                f"<table><tr><th>split</th><th>records</th><th>skipped</th></tr>{rows}</table>")


def output_dir(cfg: CookbookConfig, out_dir: Optional[str | Path] = None) -> Path:
    if out_dir:
        return Path(out_dir)
    return Path(cfg.data.processed_dir) if cfg.data.processed_dir else cfg.run_dir / "data"


def _identity(cfg: CookbookConfig) -> dict[str, Any]:
    """What the outputs depend on; a matching manifest means they can be reused as they are."""
    d = cfg.data
    ident: dict[str, Any] = {"source": d.source, "skip_bad_rows": d.skip_bad_rows,
                             "suffix": hashlib.sha256(d.prompt_suffix.encode()).hexdigest()[:12]}
    if d.source == "generated":
        ident.update(seed=cfg.seed, num_train=d.num_train, num_test=d.num_test)
    else:
        ident.update(local_dir=str(Path(d.local_dir).resolve()) if d.local_dir else "", dataset_id=d.dataset_id)
    return ident


def _raw_rows(cfg: CookbookConfig, out: Path) -> tuple[dict[str, list], dict[str, str]]:
    d = cfg.data
    if d.source == "generated":
        from cookbook.data.generate import generate_rows

        return ({"train": generate_rows(d.num_train, cfg.seed, "train"),
                 "test": generate_rows(d.num_test, cfg.seed, "test")},
                {"train": "generated train split", "test": "generated test split"})
    from cookbook.data.lighteval import download, load_raw

    local = Path(d.local_dir) if d.local_dir else out.parent / "raw"
    if d.source == "modelscope" and not (local.is_dir() and any(local.iterdir())):
        download(d.dataset_id, local)
    return load_raw(local)


def prepare_data(cfg: CookbookConfig, out_dir: Optional[str | Path] = None, force: bool = False) -> DataReport:
    """Generate or load MATH-lighteval, preprocess it, and write train/test JSONL plus a manifest.

    Outputs whose manifest matches the config are reused; anything else is rebuilt atomically.
    """
    out = output_dir(cfg, out_dir)
    ident = _identity(cfg)
    manifest_path = out / MANIFEST
    if not force and manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("identity") == ident and all((out / f"{s}.jsonl").is_file() for s in ("train", "test")):
            return DataReport(out, cfg.data.source, manifest["counts"], manifest["skipped"], reused=True)
    raw, names = _raw_rows(cfg, out)
    report: PreprocessReport = preprocess(raw, out, cfg.data.prompt_suffix, cfg.data.skip_bad_rows, names)
    counts = {k: v.written for k, v in report.splits.items()}
    skipped = {k: v.skipped for k, v in report.splits.items()}
    write_json(manifest_path, {"identity": ident, "counts": counts, "skipped": skipped,
                               "skip_reasons": {k: dict(v.reasons) for k, v in report.splits.items()}})
    return DataReport(out, cfg.data.source, counts, skipped, reused=False)
