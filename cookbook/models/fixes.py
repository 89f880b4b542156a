"""The tutorial's config.json fixes for the real checkpoints, applied idempotently with a backup.

- DeepSeek-V3: delete ``quantization_config`` and set ``num_nextn_predict_layers`` to 0 (no MTP layer in
  training). Only valid on the bf16 copy: fp8 weights still carry ``*_scale_inv`` tensors, and without the
  quantization config they would load as garbage, so that case is refused.
- Moonlight: the tutorial points ``auto_map`` at a patched modeling file from Pai-Megatron-Patch; this
  project uses transformers' native DeepseekV3 instead, so ``auto_map`` is removed and ``model_type`` set
  to ``deepseek_v3``.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from cookbook.atomic import write_json
from cookbook.config import ConfigError
from cookbook.models.hf_config import read_hf_config

BACKUP = "config.json.orig"


@dataclass
class FixReport:
    hf_dir: Path
    changes: list[str] = field(default_factory=list)
    backup: Path | None = None

    def __str__(self) -> str:
        if not self.changes:
            return f"{self.hf_dir}/config.json already has the tutorial's fixes"
        return f"{self.hf_dir}/config.json: " + "; ".join(self.changes) + f" (original kept as {self.backup})"


def _has_fp8_scales(hf_dir: Path) -> bool:
    index = hf_dir / "model.safetensors.index.json"
    if not index.is_file():
        return False
    return any(name.endswith("_scale_inv") for name in json.loads(index.read_text()).get("weight_map", {}))


def _deepseek_v3(cfg: dict, hf_dir: Path) -> list[str]:
    changes = []
    if "quantization_config" in cfg:
        if _has_fp8_scales(hf_dir):
            raise ConfigError(
                f"{hf_dir} still holds fp8 weights (*_scale_inv tensors): cast them to bf16 first "
                "(notebook 20, or `cookbook convert --direction fp8_to_bf16`), then fix the bf16 copy's config")
        del cfg["quantization_config"]
        changes.append("removed quantization_config")
    if cfg.get("num_nextn_predict_layers", 0) != 0:
        changes.append(f"num_nextn_predict_layers {cfg['num_nextn_predict_layers']} -> 0")
        cfg["num_nextn_predict_layers"] = 0
    return changes


def _moonlight(cfg: dict, hf_dir: Path) -> list[str]:
    changes = []
    if "auto_map" in cfg:
        del cfg["auto_map"]
        changes.append("removed auto_map (transformers' native DeepseekV3 replaces the patched modeling file)")
    if cfg.get("model_type") != "deepseek_v3":
        changes.append(f"model_type {cfg.get('model_type')!r} -> 'deepseek_v3'")
        cfg["model_type"] = "deepseek_v3"
    return changes


FIXERS = {"deepseek-v3-671b": _deepseek_v3, "tiny-deepseek-v3": _deepseek_v3, "moonlight-16b-a3b": _moonlight}


def apply_config_fixes(hf_dir: str | os.PathLike, preset: str) -> FixReport:
    """Apply the preset's fixes to ``hf_dir/config.json``; the first change keeps the original as a backup."""
    if preset not in FIXERS:
        raise ConfigError(f"no config fixes for preset '{preset}' (only {', '.join(FIXERS)} need them)")
    hf_dir = Path(hf_dir)
    cfg = read_hf_config(hf_dir)
    report = FixReport(hf_dir, FIXERS[preset](cfg, hf_dir))
    if report.changes:
        backup = hf_dir / BACKUP
        if not backup.exists():
            shutil.copy2(hf_dir / "config.json", backup)
        write_json(hf_dir / "config.json", cfg)
        report.backup = backup
    return report
