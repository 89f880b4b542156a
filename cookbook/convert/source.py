"""The checkpoint a conversion starts from: the tiny build, or a user's download made ready as the
tutorial does (fp8 cast to bf16 for DeepSeek-V3, then the config fixes)."""
from __future__ import annotations

import time
from pathlib import Path

from cookbook.config import CookbookConfig


def _wait_for(path: Path, poll_s: float = 10.0, timeout_s: float = 24 * 3600) -> None:
    """Other nodes of a batch job wait for node 0's output (it appears atomically, complete)."""
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout_s:.0f} s; did node 0 fail?")
        time.sleep(poll_s)


def prepare_source(cfg: CookbookConfig, overwrite: bool = False) -> tuple[Path, list[str]]:
    """Return the bf16/fp32 HF directory to convert and what was done to get it."""
    from cookbook.convert.pipeline import convert, needs_fp8_cast
    from cookbook.models.fixes import FIXERS, apply_config_fixes
    from cookbook.models.tiny import resolve_hf_dir

    steps: list[str] = []
    if cfg.preset == "tiny" and not cfg.model.hf_dir:
        hf_dir = resolve_hf_dir(cfg)
        return hf_dir, [f"tiny model (built once, cached): {hf_dir}"]
    hf_dir = Path(cfg.model.hf_dir)
    if needs_fp8_cast(hf_dir):
        bf16 = hf_dir.with_name(hf_dir.name + "-BF16")
        if not (bf16 / "config.json").is_file() or overwrite:
            convert(cfg, "fp8_to_bf16", hf_dir, bf16, overwrite=overwrite)  # node 0 casts, the others wait
            _wait_for(bf16 / "config.json")
        steps.append(f"fp8 -> bf16: {bf16}")
        hf_dir = bf16
    if cfg.preset in FIXERS:
        steps.append(str(apply_config_fixes(hf_dir, cfg.preset)))
    cfg.model.hf_dir = str(hf_dir)
    resolve_hf_dir(cfg)  # the (fixed) config must match the preset
    return hf_dir, steps
