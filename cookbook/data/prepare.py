"""One call from config to preprocessed train/test JSONL: what notebook 10 and `cookbook data` run."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from html import escape
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
    skipped: dict[str, int]  # bad rows skipped (data.skip_bad_rows)
    reused: bool
    too_long: dict[str, int] = field(default_factory=dict)  # prompts over max_prompt_length tokens, dropped
    max_prompt_length: Optional[int] = None
    files: dict[str, str] = field(default_factory=dict)  # per split: the files read
    ignored: dict[str, list[str]] = field(default_factory=dict)  # per split: identical copies not read
    too_long_examples: dict[str, list[dict]] = field(default_factory=dict)

    def __str__(self) -> str:
        how = "reused" if self.reused else "written"
        skipped = f", skipped {self.skipped}" if any(self.skipped.values()) else ""
        lines = [f"{self.source} data {how} in {self.out_dir}: {self.counts}{skipped}"]
        if self.max_prompt_length is not None:
            examples = "; ".join(f"{e['split']} row {e['row']}: {e['tokens']} tokens"
                                 for group in self.too_long_examples.values() for e in group)
            lines.append(f"  too long (prompt over grpo.max_prompt_length={self.max_prompt_length} tokens, dropped): "
                         f"{self.too_long}" + (f" e.g. {examples}" if examples else ""))
        if self.files:
            lines.append("  files read: " + "; ".join(f"{k}: {v}" for k, v in self.files.items()))
        for split, paths in self.ignored.items():
            lines.append(f"  ignored, an identical second copy of the {split} split: {', '.join(paths)}")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        limit = f" (&gt; {self.max_prompt_length} tokens, dropped)" if self.max_prompt_length is not None else ""
        rows = "".join(f"<tr><td>{k}</td><td>{v}</td><td>{self.skipped.get(k, 0)}</td>"
                       f"<td>{self.too_long.get(k, 0)}</td><td><code>{escape(self.files.get(k, ''))}</code></td></tr>"
                       for k, v in self.counts.items())
        ignored = "".join(f"<p>ignored, an identical second copy of the {k} split: <code>{escape(', '.join(v))}</code>"
                          "</p>" for k, v in self.ignored.items())
        examples = ", ".join(f"{e['split']} row {e['row']} ({e['tokens']} tokens)"
                             for group in self.too_long_examples.values() for e in group)
        examples = f"<p>too long, e.g.: {examples}</p>" if examples else ""
        return (f"<p>{self.source} data {'reused' if self.reused else 'written'} in <code>{self.out_dir}</code></p>"
                f"<table><tr><th>split</th><th>records</th><th>skipped (bad rows)</th><th>too long{limit}</th>"
                f"<th>files read</th></tr>{rows}</table>{examples}{ignored}")


def output_dir(cfg: CookbookConfig, out_dir: Optional[str | Path] = None) -> Path:
    if out_dir:
        return Path(out_dir)
    return Path(cfg.data.processed_dir) if cfg.data.processed_dir else cfg.run_dir / "data"


def tokenizer_identity(tokenizer: Any) -> dict[str, Any]:
    """What names the tokenizer that counted prompt tokens: its directory (or name), chat template and size."""
    name = str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)
    if Path(name).is_dir():
        name = str(Path(name).resolve())
    ident: dict[str, Any] = {"name": name}
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        ident["chat_template"] = hashlib.sha256(template.encode()).hexdigest()[:12]
    if hasattr(tokenizer, "__len__"):
        ident["vocab"] = len(tokenizer)
    return ident


def _identity(cfg: CookbookConfig, tokenizer: Any) -> dict[str, Any]:
    """What the outputs depend on; a matching manifest means they can be reused as they are."""
    d = cfg.data
    ident: dict[str, Any] = {"source": d.source, "skip_bad_rows": d.skip_bad_rows,
                             "suffix": hashlib.sha256(d.prompt_suffix.encode()).hexdigest()[:12],
                             "max_prompt_length": cfg.grpo.max_prompt_length,
                             "tokenizer": tokenizer_identity(tokenizer)}
    ident["validation_size"] = d.validation_size
    if d.source == "generated":
        ident.update(seed=cfg.seed, num_train=d.num_train, num_test=d.num_test)
    else:
        ident.update(local_dir=str(Path(d.local_dir).resolve()) if d.local_dir else "", dataset_id=d.dataset_id)
    return ident


def _raw_rows(cfg: CookbookConfig, out: Path) -> tuple[dict[str, list], dict[str, str], dict[str, list[str]]]:
    """(rows per split, the files or generator they came from, identical copies ignored)."""
    d = cfg.data
    if d.source == "generated":
        from cookbook.data.generate import generate_rows

        # validation comes from the test split's problem space (the tiny model's warm-up drew from the train
        # space), after the test problems, which stay the same rows whatever its size
        test = generate_rows(d.num_test + d.validation_size, cfg.seed, "test")
        rows = {"train": generate_rows(d.num_train, cfg.seed, "train"), "test": test[:d.num_test]}
        names = {"train": "generated train split", "test": "generated test split"}
        if d.validation_size:
            rows["validation"], names["validation"] = test[d.num_test:], "generated validation split"
        return rows, names, {}
    from cookbook.data.lighteval import download, load_raw

    local = Path(d.local_dir) if d.local_dir else out.parent / "raw"
    if d.source == "modelscope" and not (local.is_dir() and any(local.iterdir())):
        download(d.dataset_id, local)
    rows, names, ignored = load_raw(local)
    if d.validation_size:  # MATH-lighteval has no validation split: hold out train problems, seeded
        rows, names = hold_out_validation(rows, names, d.validation_size, cfg.seed)
    return rows, names, ignored


def hold_out_validation(rows: dict[str, list], names: dict[str, str], size: int, seed: int
                        ) -> tuple[dict[str, list], dict[str, str]]:
    """Move ``size`` train rows, drawn under ``seed``, into a validation split."""
    import random

    train = rows["train"]
    if size >= len(train):
        raise ValueError(f"data.validation_size={size} leaves no training problems ({len(train)} train rows in "
                         f"{names.get('train', 'the train split')}); choose fewer")
    held = set(random.Random(seed).sample(range(len(train)), size))
    rows = dict(rows, train=[r for i, r in enumerate(train) if i not in held],
                validation=[r for i, r in enumerate(train) if i in held])
    return rows, dict(names, validation=f"{size} rows held out of {names.get('train', 'train')}")


def _report(out: Path, cfg: CookbookConfig, manifest: dict[str, Any], reused: bool) -> DataReport:
    return DataReport(out, cfg.data.source, manifest["counts"], manifest["skipped"], reused,
                      too_long=manifest.get("too_long", {}), max_prompt_length=cfg.grpo.max_prompt_length,
                      files=manifest.get("files", {}), ignored=manifest.get("ignored_duplicates", {}),
                      too_long_examples=manifest.get("too_long_examples", {}))


def prepare_data(cfg: CookbookConfig, out_dir: Optional[str | Path] = None, force: bool = False,
                 tokenizer: Any = None) -> DataReport:
    """Generate or load MATH-lighteval, preprocess it, and write train / (validation) / test JSONL plus a manifest.

    Prompts longer than ``grpo.max_prompt_length`` tokens (chat template applied, with ``tokenizer``; by
    default the policy's, ``stats.tokenizer_for(cfg)``) are dropped and counted, as the reference does.
    Outputs whose manifest matches the config and the tokenizer are reused; anything else is rebuilt atomically.
    """
    if tokenizer is None:
        from cookbook.data import stats

        tokenizer = stats.tokenizer_for(cfg)
    out = output_dir(cfg, out_dir)
    ident = _identity(cfg, tokenizer)
    manifest_path = out / MANIFEST
    if not force and manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("identity") == ident and all((out / f"{s}.jsonl").is_file() for s in manifest["counts"]):
            return _report(out, cfg, manifest, reused=True)
    raw, names, ignored = _raw_rows(cfg, out)
    report: PreprocessReport = preprocess(raw, out, cfg.data.prompt_suffix, cfg.data.skip_bad_rows, names,
                                          tokenizer=tokenizer, max_prompt_length=cfg.grpo.max_prompt_length)
    splits = report.splits
    manifest = {"identity": ident, "counts": {k: v.written for k, v in splits.items()},
                "skipped": {k: v.skipped for k, v in splits.items()},
                "skip_reasons": {k: dict(v.reasons) for k, v in splits.items()},
                "too_long": {k: v.too_long for k, v in splits.items()},
                "too_long_examples": {k: v.too_long_examples for k, v in splits.items()},
                "files": names, "ignored_duplicates": ignored}
    write_json(manifest_path, manifest)
    return _report(out, cfg, manifest, reused=False)
