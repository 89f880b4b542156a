"""FP8 (DeepSeek-V3 block-quantized e4m3) -> BF16, on a generated checkpoint in the real layout."""
import json

import pytest
import torch
from safetensors import safe_open

from cookbook.config import load_config
from cookbook.convert.fp8 import cast_fp8_to_bf16, dequantize_fp8_blocks, quantize_fp8_blocks
from cookbook.convert.hf_io import read_index
from cookbook.convert.synthetic import write_random_hf_checkpoint


def test_block_dequantization_covers_edge_blocks():
    w = torch.randn(200, 300) * 0.05  # neither dimension a multiple of 128
    q, scale_inv = quantize_fp8_blocks(w)
    assert q.dtype == torch.float8_e4m3fn and scale_inv.shape == (2, 3)
    back = dequantize_fp8_blocks(q, scale_inv, torch.float32)
    assert back.shape == w.shape
    rel = ((back - w).abs() / w.abs().clamp(min=1e-3)).median()
    assert rel < 0.05  # e4m3 keeps 3 mantissa bits
    # each block uses its own scale: scaling one edge block changes only that block
    scale_inv2 = scale_inv.clone()
    scale_inv2[1, 2] *= 2
    back2 = dequantize_fp8_blocks(q, scale_inv2, torch.float32)
    assert torch.equal(back2[:128], back[:128]) and torch.allclose(back2[128:, 256:], 2 * back[128:, 256:])
    with pytest.raises(ValueError, match="scale_inv shape"):
        dequantize_fp8_blocks(q, scale_inv[:, :2])


def test_cast_checkpoint(tmp_path):
    m = load_config("tiny").model
    src = write_random_hf_checkpoint(m, tmp_path / "fp8", max_shard_bytes=1 << 20, dtype="bfloat16", fp8=True,
                                     extra_config={"num_nextn_predict_layers": 1})
    src_index = read_index(src)
    assert any(n.endswith("_scale_inv") for n in src_index)
    out = cast_fp8_to_bf16(src, tmp_path / "bf16", progress=False)
    index = read_index(out)
    assert not any(n.endswith("_scale_inv") for n in index)
    assert set(index) == {n for n in src_index if not n.endswith("_scale_inv")}
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["num_nextn_predict_layers"] == 0
    name = "model.layers.1.mlp.experts.3.down_proj.weight"
    with safe_open(src / src_index[name], "pt") as f:
        q = f.get_tensor(name)
    with safe_open(src / src_index[name + "_scale_inv"], "pt") as f:
        s = f.get_tensor(name + "_scale_inv")
    with safe_open(out / index[name], "pt") as f:
        got = f.get_tensor(name)
    assert got.dtype == torch.bfloat16 and torch.equal(got, dequantize_fp8_blocks(q, s))
    with pytest.raises(FileExistsError):
        cast_fp8_to_bf16(src, out, progress=False)
