"""The checkpoint a conversion starts from: the tiny build, or a user's download made ready as the
tutorial does (fp8 cast to bf16 for DeepSeek-V3, then the config fixes).

``prepare_source`` finds the preset's checkpoint; ``prepare_hf_dir`` makes any HF directory ready, so
``cookbook convert --direction hf_to_mcore --src DIR`` converts what notebook 20 would convert from ``DIR``.
Both are idempotent: a complete bf16 copy is reused and fixes already applied change nothing.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Optional

from cookbook.config import CookbookConfig


def _wait_for(path: Path, poll_s: float = 10.0, timeout_s: float = 24 * 3600) -> None:
    """Nodes of a batch job wait for node 0's finalized output (it appears atomically, complete)."""
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout_s:.0f} s; did node 0 fail?")
        time.sleep(poll_s)


def prepare_hf_dir(cfg: CookbookConfig, hf_dir: str | os.PathLike, overwrite: bool = False,
                   part: Optional[tuple[int, int]] = None, progress: bool = True,
                   bf16_dir: Optional[str | os.PathLike] = None) -> tuple[Path, list[str]]:
    """Make ``hf_dir`` ready to convert under ``cfg``'s preset; return the directory to convert and what was done.

    An fp8 checkpoint (``quantization_config`` in config.json) is cast to a bf16 copy, ``bf16_dir`` or next to it,
    ``<dir>-BF16`` (each part casts its share of the shards, node 0 finalizes and the others wait for it; a
    complete copy is reused unless ``overwrite``); the
    preset's config fixes (``cookbook.models.fixes``) are applied to the directory that will be converted, the
    original config kept as a backup; then its config must match the preset.
    """
    from cookbook.convert.pipeline import convert, needs_fp8_cast
    from cookbook.models.fixes import FIXERS, apply_config_fixes
    from cookbook.models.hf_config import check_hf_config, read_hf_config

    hf_dir = Path(hf_dir)
    steps: list[str] = []
    if needs_fp8_cast(hf_dir):
        steps.append(f"fp8 source detected: {fp8_description(hf_dir)}")
        bf16 = Path(bf16_dir) if bf16_dir else hf_dir.with_name(hf_dir.name + "-BF16")
        if not (bf16 / "config.json").is_file() or overwrite:
            convert(cfg, "fp8_to_bf16", hf_dir, bf16, overwrite=overwrite, part=part, progress=progress)
            _wait_for(bf16 / "config.json")
            steps.append(f"fp8 -> bf16: cast into {bf16}")
        else:
            steps.append(f"fp8 -> bf16: {bf16} (a complete cast from before, reused)")
        hf_dir = bf16
    if cfg.preset in FIXERS:
        steps.append(str(apply_config_fixes(hf_dir, cfg.preset)))
    check_hf_config(read_hf_config(hf_dir), cfg.model, str(hf_dir / "config.json"))
    return hf_dir, steps


def tiny_bf16_dir(cfg: CookbookConfig) -> Path:
    """Where ``tiny-deepseek-v3``'s fp8 source is cast: into the run folder (``<run>/source-bf16``), so every run
    goes through the cast (under a second for the tiny model) while the fp8 build itself stays cached."""
    return cfg.run_dir / "source-bf16"


def fp8_description(hf_dir: str | os.PathLike) -> str:
    """What marks ``hf_dir`` as DeepSeek-V3's fp8 layout: its quantization_config and its block scales."""
    from cookbook.convert.hf_io import read_index
    from cookbook.models.hf_config import read_hf_config

    q = read_hf_config(hf_dir).get("quantization_config") or {}
    index = read_index(hf_dir)
    scales = sum(name.endswith("_scale_inv") for name in index)
    return (f"quantization_config {q.get('quant_method', '?')} {q.get('fmt', '?')}, blocks "
            f"{'x'.join(str(b) for b in q.get('weight_block_size', []))}; {scales} weight_scale_inv tensors of "
            f"{len(index)}")


def prepare_source(cfg: CookbookConfig, overwrite: bool = False, part: Optional[tuple[int, int]] = None,
                   progress: bool = True) -> tuple[Path, list[str]]:
    """Return the preset's bf16/fp32 HF directory to convert and what was done to get it: the tiny build
    (cached); for ``tiny-deepseek-v3`` its fp8 source (cached) prepared as a DeepSeek-V3 download is; or
    ``model.hf_dir`` through ``prepare_hf_dir`` (``model.hf_dir`` then names the prepared copy)."""
    from cookbook.models.tiny import resolve_hf_dir

    if cfg.preset == "tiny-deepseek-v3" and not cfg.model.hf_dir:
        from cookbook.models.fp8_source import build_fp8_source

        fp8 = build_fp8_source(cfg, progress=progress)
        report = json.loads((fp8 / "fp8_report.json").read_text())
        hf_dir, steps = prepare_hf_dir(cfg, fp8, overwrite=overwrite, part=part, progress=progress,
                                       bf16_dir=tiny_bf16_dir(cfg))
        return hf_dir, [f"tiny DeepSeek-V3 in DeepSeek-V3's fp8 layout (built once, cached): {fp8}",
                        f"  its fp8 blocks: {report['quantized_tensors']} projections, largest relative error "
                        f"{report['max_relative_error']:.3f}; greedy accuracy {report['greedy_accuracy_after_fp8']:.3f} "
                        f"after the cast, {report['greedy_accuracy_warmed_up']:.3f} before rounding to fp8"] + steps
    if not cfg.model.hf_dir:
        hf_dir = resolve_hf_dir(cfg)  # builds the tiny model; for a real preset, says where to download it
        return hf_dir, [f"tiny model (built once, cached): {hf_dir}"]
    hf_dir, steps = prepare_hf_dir(cfg, cfg.model.hf_dir, overwrite=overwrite, part=part, progress=progress)
    cfg.model.hf_dir = str(hf_dir)
    return hf_dir, steps
