"""Random-weight HF checkpoints in the exact DeepSeek-V3 on-disk layout (sharded safetensors + index +
config), for tests and the conversion benchmark. Written tensor by tensor, so a multi-GB checkpoint
needs only one shard of memory; optionally fp8 e4m3 with 128x128 ``weight_scale_inv`` blocks, as
DeepSeek-V3 ships."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import save_file

from cookbook.atomic import write_json
from cookbook.config import ModelConfig
from cookbook.convert.fp8 import BLOCK, is_fp8_quantized_name
from cookbook.convert.names import all_mappings, hf_shape
from cookbook.models.hf_config import hf_config_dict

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _random_tensor(name: str, shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    if name.endswith("e_score_correction_bias"):
        return (torch.rand(shape, generator=gen) * 0.1).float()  # fp32 on disk, as in the real checkpoints
    if len(shape) == 1:  # norms: around 1
        return (1.0 + 0.1 * torch.randn(shape, generator=gen)).to(dtype)
    return (0.02 * torch.randn(shape, generator=gen)).to(dtype)


def _random_fp8(shape: tuple[int, ...], gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 codes of N(0, 64) and a scale_inv per 128x128 block near 0.02 / 64: weights of about N(0, 0.02), drawn
    straight in the stored form (quantizing fp32 weights would cost ~4x the time on a multi-GB checkpoint)."""
    q = (64 * torch.randn(shape, generator=gen)).to(torch.float8_e4m3fn)
    blocks = (-(-shape[0] // BLOCK), -(-shape[1] // BLOCK))
    return q, (0.02 / 64) * (1 + 0.1 * torch.rand(blocks, generator=gen))


def write_random_hf_checkpoint(m: ModelConfig, out_dir: str | os.PathLike, max_shard_bytes: int = 64 << 20,
                               dtype: Optional[str] = None, fp8: bool = False, seed: int = 0,
                               extra_config: Optional[dict] = None) -> Path:
    """Write ``model-0000i-of-0000n.safetensors``, ``model.safetensors.index.json`` and ``config.json``.

    With ``fp8``, every 2-D projection except embeddings, router and lm_head is stored as e4m3 with a
    float32 ``<name>_scale_inv`` (DeepSeek-V3's layout) and config.json gets its ``quantization_config``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch_dtype = DTYPES[dtype or m.params_dtype]
    gen = torch.Generator().manual_seed(seed)
    names = [name for mp in all_mappings(m) for name in mp.hf]
    shards: list[dict[str, torch.Tensor]] = [{}]
    sizes = [0]
    files: list[str] = []
    weight_map: dict[str, int] = {}

    def add(name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if sizes[-1] and sizes[-1] + nbytes > max_shard_bytes:
            flush()
        shards[-1][name] = tensor
        sizes[-1] += nbytes
        weight_map[name] = len(files)

    def flush() -> None:
        files.append(f"part-{len(files):05d}.safetensors")
        save_file(shards[-1], str(out / files[-1]), metadata={"format": "pt"})
        shards[-1] = {}
        sizes.append(0)

    for name in names:
        if fp8 and is_fp8_quantized_name(name):
            q, scale_inv = _random_fp8(hf_shape(m, name), gen)
            add(name, q)
            add(name + "_scale_inv", scale_inv)
        else:
            add(name, _random_tensor(name, hf_shape(m, name), torch_dtype, gen))
    if shards[-1]:
        flush()
    n = len(files)
    final = {}
    for i, tmp in enumerate(files):
        final[i] = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        os.replace(out / tmp, out / final[i])
    total = sum((out / f).stat().st_size for f in final.values())
    write_json(out / "model.safetensors.index.json",
               {"metadata": {"total_size": total}, "weight_map": {k: final[v] for k, v in weight_map.items()}})
    config = hf_config_dict(m)
    config["torch_dtype"] = str(torch_dtype).removeprefix("torch.")
    if fp8:
        config["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                         "weight_block_size": [BLOCK, BLOCK]}
    config.update(extra_config or {})
    write_json(out / "config.json", config)
    return out

