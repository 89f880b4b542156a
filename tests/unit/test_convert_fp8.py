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


def _expanded_reference(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The definition, written the slow way: every element times its block's scale, in fp32, then bf16."""
    full = s.repeat_interleave(128, 0).repeat_interleave(128, 1)[: q.shape[0], : q.shape[1]]
    return (q.float() * full).to(torch.bfloat16)


@pytest.mark.parametrize("shape", [(256, 384), (576, 200)])  # block-aligned, and DeepSeek-V3's kv_a 576 rows
def test_table_dequantization_is_bit_exact(shape):
    q, s = quantize_fp8_blocks(torch.randn(shape) * 0.05)
    assert torch.equal(dequantize_fp8_blocks(q, s).view(torch.int16), _expanded_reference(q, s).view(torch.int16))


def test_cast_split_across_two_parts(tmp_path):
    """Part 1 casts its shards and returns; part 0 casts the rest, finalizes, and the result equals one part's."""
    m = load_config("tiny").model
    src = write_random_hf_checkpoint(m, tmp_path / "fp8", max_shard_bytes=1 << 19, dtype="bfloat16", fp8=True)
    assert cast_fp8_to_bf16(src, tmp_path / "split", progress=False, part=(1, 2)) is None
    assert not (tmp_path / "split").exists()  # nothing that looks complete before part 0 finalizes
    split = cast_fp8_to_bf16(src, tmp_path / "split", progress=False, part=(0, 2))
    whole = cast_fp8_to_bf16(src, tmp_path / "whole", progress=False)
    index = read_index(whole)
    assert read_index(split) == index
    for name, shard in index.items():
        with safe_open(split / shard, "pt") as a, safe_open(whole / shard, "pt") as b:
            assert torch.equal(a.get_tensor(name), b.get_tensor(name)), name
    name = "model.layers.1.self_attn.kv_a_proj_with_mqa.weight"  # 576 x hidden: edge blocks
    src_index = read_index(src)
    with safe_open(src / src_index[name], "pt") as f:
        q = f.get_tensor(name)
    with safe_open(src / src_index[name + "_scale_inv"], "pt") as f:
        s = f.get_tensor(name + "_scale_inv")
    with safe_open(split / index[name], "pt") as f:
        assert torch.equal(f.get_tensor(name).view(torch.int16), _expanded_reference(q, s).view(torch.int16))


def test_fp8_weight_without_scale_stops_before_writing(tmp_path):
    m = load_config("tiny").model
    src = write_random_hf_checkpoint(m, tmp_path / "fp8", max_shard_bytes=1 << 20, dtype="bfloat16", fp8=True)
    index_file = src / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    dropped = "model.layers.0.self_attn.o_proj.weight_scale_inv"
    del index["weight_map"][dropped]
    index_file.write_text(json.dumps(index))
    with pytest.raises(ValueError, match="o_proj.weight' has no 'model.layers.0.self_attn.o_proj.weight_scale_inv"):
        cast_fp8_to_bf16(src, tmp_path / "bf16", progress=False)
    assert not (tmp_path / "bf16").exists() and not (tmp_path / ".tmp-bf16").exists()
