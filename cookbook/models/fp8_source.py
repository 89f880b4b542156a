"""The ``tiny-deepseek-v3`` preset's source checkpoint: the warmed-up tiny build written the way DeepSeek-V3 ships.

DeepSeek-V3 is downloaded as fp8: every projection inside the layers is float8 e4m3 with a float32
``<name>_scale_inv`` per 128 x 128 block, the rest (embeddings, norms, router, head) is bf16, the router's
``e_score_correction_bias`` fp32, ``config.json`` carries a ``quantization_config`` and
``num_nextn_predict_layers: 1``, and the index lists one multi-token-prediction (MTP) layer after the last decoder
layer. Notebook 31 starts from such a directory so that the tutorial's preparation runs on it for real: detect the
fp8 source, cast it to bf16 (``cookbook.convert.fp8``), apply the config fixes, convert.

The weights are the warmed-up tiny model's (``cookbook.models.tiny``), rounded to fp8 blocks: the cast therefore
gives back a model close to, not equal to, the warmed-up one (``fp8_report.json`` records how close and its greedy
accuracy after the round trip). The MTP layer is an untrained stand-in (a copy of the last decoder layer, the
embedding and the head, with random ``eh_proj`` and unit norms): nothing here trains or runs it, and the cast drops
it, as the tutorial does. Built once per machine and architecture, then reused from the cache.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from cookbook.atomic import atomic_dir, write_json
from cookbook.config import CookbookConfig
from cookbook.convert.fp8 import BLOCK, dequantize_fp8_blocks, is_fp8_quantized_name, quantize_fp8_blocks
from cookbook.convert.hf_io import ShardReader, copy_tokenizer_files, read_index

VERSION = 1  # bump when the layout below changes: it invalidates cached sources
QUANTIZATION_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                       "weight_block_size": [BLOCK, BLOCK]}  # DeepSeek-V3's config.json
SHARDS = 4  # several shards, as a download has, so the cast and the conversion stream shard by shard


def fp8_source_dir(cfg: CookbookConfig) -> Path:
    """Where the cached fp8 source of ``cfg``'s tiny build lives (its bf16 cast goes next to it, ``-BF16``)."""
    from cookbook.models.tiny import build_key, cache_root

    return cache_root() / "models" / f"{cfg.preset}-{build_key(cfg)}-v{VERSION}-FP8"


def _read_all(hf_dir: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(set(read_index(hf_dir).values())):
        tensors.update(load_file(str(hf_dir / shard)))
    return tensors


def _mtp_layer(tensors: dict[str, torch.Tensor], num_layers: int, index: int, seed: int) -> dict[str, torch.Tensor]:
    """DeepSeek-V3's MTP layer names at ``index`` (>= ``num_layers``): the last decoder layer's tensors copied, plus
    the embedding and head it shares, the two input norms and the ``eh_proj`` that joins them (random)."""
    last, mtp = f"model.layers.{num_layers - 1}.", f"model.layers.{index}."
    out = {mtp + k[len(last):]: v.clone() for k, v in tensors.items() if k.startswith(last)}
    hidden = tensors["model.norm.weight"].shape[0]
    gen = torch.Generator().manual_seed(seed)
    out[mtp + "enorm.weight"] = torch.ones(hidden)
    out[mtp + "hnorm.weight"] = torch.ones(hidden)
    out[mtp + "eh_proj.weight"] = 0.02 * torch.randn(hidden, 2 * hidden, generator=gen)
    out[mtp + "embed_tokens.weight"] = tensors["model.embed_tokens.weight"].clone()
    out[mtp + "shared_head.norm.weight"] = tensors["model.norm.weight"].clone()
    out[mtp + "shared_head.head.weight"] = tensors["lm_head.weight"].clone()
    return out


def write_fp8_checkpoint(src_dir: str | Path, out_dir: str | Path, mtp_layers: int = 1, shards: int = SHARDS,
                         seed: int = 0) -> Path:
    """Write ``src_dir`` (an HF DeepSeek-V3 directory in fp32 or bf16) into ``out_dir`` in DeepSeek-V3's fp8
    layout: quantized projections with ``weight_scale_inv``, bf16 elsewhere (fp32 expert bias), ``mtp_layers``
    MTP layers, ``shards`` safetensors shards with an index, the fp8 ``quantization_config``, the tokenizer."""
    src, out = Path(src_dir), Path(out_dir)
    config = json.loads((src / "config.json").read_text())
    tensors = _read_all(src)
    num_layers = config["num_hidden_layers"]
    tensors.update({k: v for i in range(mtp_layers) for k, v in _mtp_layer(tensors, num_layers, num_layers + i,
                                                                                seed + i).items()})
    stored: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if is_fp8_quantized_name(name):
            stored[name], stored[name + "_scale_inv"] = quantize_fp8_blocks(tensor.float(), BLOCK)
        elif name.endswith("e_score_correction_bias"):
            stored[name] = tensor.float()
        else:
            stored[name] = tensor.to(torch.bfloat16)
    names = sorted(stored, key=_layer_order)  # whole layers per shard, in order, as the download is
    per = -(-len(names) // shards)
    out.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for i in range(shards):
        chunk = names[i * per:(i + 1) * per]
        if not chunk:
            continue
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: stored[n].contiguous() for n in chunk}, str(out / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in chunk})
    total = sum((out / f).stat().st_size for f in set(weight_map.values()))
    write_json(out / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})
    config.update(quantization_config=QUANTIZATION_CONFIG, num_nextn_predict_layers=mtp_layers,
                  torch_dtype="bfloat16")
    write_json(out / "config.json", config)
    copy_tokenizer_files(src, out)
    return out


def _layer_order(name: str) -> tuple[int, str]:
    parts = name.split(".")
    if name.startswith("model.layers."):
        return int(parts[2]) + 1, name
    return (0 if "embed_tokens" in name else 10**6), name


def fp8_round_trip_error(src_dir: str | Path, fp8_dir: str | Path) -> dict[str, float]:
    """How far the fp8 blocks are from the weights they were made of: relative error of the dequantized
    projections (max over tensors of ||w - dq(q(w))|| / ||w||), and how many tensors were quantized."""
    original, reader = _read_all(Path(src_dir)), ShardReader(fp8_dir)
    worst, count = 0.0, 0
    for name in reader.index:
        if not name.endswith("_scale_inv") or name.removesuffix("_scale_inv") not in original:
            continue
        weight = name.removesuffix("_scale_inv")
        w = original[weight].float()
        dq = dequantize_fp8_blocks(reader.get(weight), reader.get(name), torch.float32)
        worst = max(worst, float((dq - w).norm() / w.norm()))
        count += 1
    return {"quantized_tensors": count, "max_relative_error": worst}


def build_fp8_source(cfg: CookbookConfig, progress: bool = True) -> Path:
    """The cached fp8 source of ``cfg``'s tiny build (building the tiny model first when missing), with
    ``fp8_report.json``: the block rounding's error and the greedy accuracy of the bf16 cast, next to the
    warmed-up model's."""
    from cookbook.models.tiny import build_tiny_model

    out = fp8_source_dir(cfg)
    if (out / "fp8_report.json").is_file():
        return out
    base = build_tiny_model(cfg, progress=progress)
    t0 = time.perf_counter()
    with atomic_dir(out, overwrite=True) as tmp:
        write_fp8_checkpoint(base, tmp)
        report = {"source": str(base), **fp8_round_trip_error(base, tmp),
                  "greedy_accuracy_warmed_up": json.loads((base / "warmup_report.json").read_text())["greedy_accuracy"],
                  "greedy_accuracy_after_fp8": _cast_accuracy(tmp, cfg.data.prompt_suffix), "build_seconds": 0.0, "version": VERSION}
        report["build_seconds"] = round(time.perf_counter() - t0, 1)
        (tmp / "fp8_report.json").write_text(json.dumps(report, indent=2))
    return out


def _cast_accuracy(fp8_dir: Path, suffix: str) -> float:
    """Greedy accuracy of the fp8 source cast back to bf16 (in fp32 arithmetic), on the warm-up's held-out rows."""
    import tempfile

    from transformers import AutoTokenizer, DeepseekV3ForCausalLM

    from cookbook.convert.fp8 import cast_fp8_to_bf16
    from cookbook.data.generate import generate_rows
    from cookbook.models.tiny import BUILD_SEED, EVAL_ROWS, _accuracy, greedy_answers

    with tempfile.TemporaryDirectory() as tmp:
        cast = cast_fp8_to_bf16(fp8_dir, Path(tmp) / "bf16", progress=False)
        model = DeepseekV3ForCausalLM.from_pretrained(cast, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(cast)
        rows = generate_rows(EVAL_ROWS, BUILD_SEED + 7919, "test")
        return _accuracy(greedy_answers(model, tokenizer, [r["problem"] + suffix for r in rows]), rows)
