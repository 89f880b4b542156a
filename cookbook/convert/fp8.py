"""DeepSeek-V3's fp8 checkpoint -> bf16, shard by shard.

DeepSeek-V3 stores its projection weights as float8 e4m3 with one float32 ``<name>_scale_inv`` per
128 x 128 block (edge blocks cover what is left where a dimension is not a multiple of 128); the weight
is ``q * scale_inv`` block-wise. The tutorial casts to bf16 before conversion, drops
``quantization_config`` from config.json and sets ``num_nextn_predict_layers`` to 0; the MTP layer's
tensors (layers numbered >= ``num_hidden_layers``) are dropped with it.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from cookbook.atomic import write_json
from cookbook.convert.hf_io import ShardReader, copy_tokenizer_files, read_index
from cookbook.convert.staging import Staging

BLOCK = 128
E4M3_MAX = 448.0
_QUANTIZED = re.compile(r"model\.layers\.\d+\..*_proj(_with_mqa)?\.weight$")


def is_fp8_quantized_name(name: str) -> bool:
    """The tensors DeepSeek-V3 quantizes: every projection inside the layers (not embeddings, norms,
    router or lm_head)."""
    return bool(_QUANTIZED.match(name))


def _expand(scale: torch.Tensor, shape: tuple[int, int], block: int) -> torch.Tensor:
    return scale.repeat_interleave(block, 0).repeat_interleave(block, 1)[: shape[0], : shape[1]]


def quantize_fp8_blocks(w: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """float weight -> (e4m3 weight, float32 scale_inv per block); the inverse of ``dequantize_fp8_blocks``."""
    rows, cols = -(-w.shape[0] // block), -(-w.shape[1] // block)
    padded = torch.zeros(rows * block, cols * block, dtype=torch.float32)
    padded[: w.shape[0], : w.shape[1]] = w.float()
    amax = padded.view(rows, block, cols, block).abs().amax(dim=(1, 3)).clamp(min=1e-12)
    scale_inv = (amax / E4M3_MAX).float()
    q = (w.float() / _expand(scale_inv, tuple(w.shape), block)).to(torch.float8_e4m3fn)
    return q, scale_inv


def dequantize_fp8_blocks(q: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype = torch.bfloat16,
                          block: int = BLOCK) -> torch.Tensor:
    """e4m3 weight and its per-block scale_inv -> ``dtype``; checks that the scale grid covers the weight."""
    want = (-(-q.shape[0] // block), -(-q.shape[1] // block))
    if tuple(scale_inv.shape) != want:
        raise ValueError(f"scale_inv shape {list(scale_inv.shape)} does not match weight {list(q.shape)} "
                         f"in {block}x{block} blocks (expected {list(want)})")
    return (q.float() * _expand(scale_inv.float(), tuple(q.shape), block)).to(dtype)


def _layer_of(name: str) -> int | None:
    match = re.match(r"model\.layers\.(\d+)\.", name)
    return int(match.group(1)) if match else None


def cast_fp8_to_bf16(src_dir: str | os.PathLike, out_dir: str | os.PathLike, overwrite: bool = False,
                     progress: bool = True) -> Path:
    """Write a bf16 copy of an fp8 DeepSeek-V3 checkpoint: same shard files without the scale tensors,
    a new index, config without ``quantization_config`` and with ``num_nextn_predict_layers`` 0, and the
    tokenizer files. Peak memory is about one shard (fp8) plus its bf16 output. Resumable."""
    src = Path(src_dir)
    config = json.loads((src / "config.json").read_text())
    index = read_index(src)
    missing = sorted({s for s in index.values() if not (src / s).is_file()})
    if missing:
        raise FileNotFoundError(f"{src}: shards listed in the index are missing: {', '.join(missing)}")
    for name in index:
        if name.endswith("_scale_inv") and name.removesuffix("_scale_inv") not in index:
            raise ValueError(f"{src}: '{name}' has no weight '{name.removesuffix('_scale_inv')}'")
    num_layers = config["num_hidden_layers"]
    staging = Staging(out_dir, {"job": "fp8_to_bf16", "src": str(src.resolve())}, overwrite).open()
    reader = ShardReader(src, index)
    shards = sorted(set(index.values()))
    by_shard: dict[str, list[str]] = {s: [] for s in shards}
    for name, shard in index.items():
        by_shard[shard].append(name)
    weight_map: dict[str, str] = {}
    total = sum((src / s).stat().st_size for s in shards)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="fp8 -> bf16", disable=not progress)
    for shard in shards:
        keep = [n for n in by_shard[shard] if not n.endswith("_scale_inv")
                and (_layer_of(n) is None or _layer_of(n) < num_layers)]
        for name in keep:
            weight_map[name] = shard
        if not staging.done(shard):
            out: dict[str, torch.Tensor] = {}
            for name in keep:
                tensor = reader.get(name)
                if name + "_scale_inv" in index:
                    tensor = dequantize_fp8_blocks(tensor, reader.get(name + "_scale_inv"))
                elif tensor.dtype == torch.float8_e4m3fn:
                    raise ValueError(f"{src / shard}: fp8 tensor '{name}' has no '{name}_scale_inv'")
                out[name] = tensor
            tmp = staging.dir / f".part-{shard}"
            save_file(out, str(tmp), metadata={"format": "pt"})
            os.replace(tmp, staging.dir / shard)
            del out
            staging.mark(shard)
        bar.update((src / shard).stat().st_size)
    bar.close()
    written = sorted(set(weight_map.values()))
    for shard in shards:  # shards that held only scales or MTP tensors
        if shard not in written and (staging.dir / shard).is_file():
            (staging.dir / shard).unlink()
    total_size = sum((staging.dir / s).stat().st_size for s in written)
    write_json(staging.dir / "model.safetensors.index.json",
               {"metadata": {"total_size": total_size}, "weight_map": weight_map})
    config.pop("quantization_config", None)
    config["num_nextn_predict_layers"] = 0
    config["torch_dtype"] = "bfloat16"
    write_json(staging.dir / "config.json", config)
    copy_tokenizer_files(src, staging.dir)
    return staging.finish()
