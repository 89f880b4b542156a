"""Bad input stops HF -> Megatron with a clear error before anything is written."""
import json

import pytest
from safetensors.torch import load_file, save_file

from cookbook.config import ConfigError, load_config
from cookbook.convert.hf_io import CheckpointMismatch
from cookbook.convert.hf_to_mcore import hf_to_mcore, part_layers
from cookbook.convert.synthetic import write_random_hf_checkpoint


@pytest.fixture()
def setup(tmp_path):
    cfg = load_config("tiny")
    src = write_random_hf_checkpoint(cfg.model, tmp_path / "hf", max_shard_bytes=1 << 20)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    return cfg, src, index, tmp_path / "out"


def _rewrite(src, index, shard, change):
    tensors = load_file(src / shard)
    change(tensors)
    save_file(tensors, src / shard)
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != shard}
    index["weight_map"].update({k: shard for k in tensors})
    (src / "model.safetensors.index.json").write_text(json.dumps(index))


def _nothing_written(out):
    return not out.exists() and not out.with_name(f".tmp-{out.name}").exists()


def test_wrong_preset(setup):
    cfg, src, _, out = setup
    wrong = load_config("tiny", overrides=["model.hidden_size=64"])
    with pytest.raises(ConfigError, match=f"hidden_size={cfg.model.hidden_size} but the preset has model.hidden_size=64"):
        hf_to_mcore(wrong, src, out, progress=False)
    assert _nothing_written(out)


def test_missing_shard(setup):
    cfg, src, index, out = setup
    shard = sorted(set(index["weight_map"].values()))[1]
    (src / shard).unlink()
    with pytest.raises(CheckpointMismatch, match=f"shard {shard} is listed in the index but missing"):
        hf_to_mcore(cfg, src, out, progress=False)
    assert _nothing_written(out)


def test_unexpected_missing_and_misshapen_tensors(setup):
    cfg, src, index, out = setup
    name = "model.layers.1.mlp.experts.2.up_proj.weight"
    shard = index["weight_map"][name]

    def change(t):
        t["model.layers.1.mlp.extra.weight"] = t[name][:2].clone()
        del t[name]
        key = next(k for k in t if k.endswith("o_proj.weight"))
        t[key] = t[key][:, :-1].clone()

    _rewrite(src, index, shard, change)
    with pytest.raises(CheckpointMismatch) as err:
        hf_to_mcore(cfg, src, out, progress=False)
    msg = str(err.value)
    assert f"tensor '{name}' is missing" in msg
    assert "unexpected tensor 'model.layers.1.mlp.extra.weight'" in msg
    assert "o_proj.weight' has shape" in msg
    assert _nothing_written(out)


def test_fp8_source_asks_for_the_cast_and_existing_output_is_kept(setup, tmp_path):
    cfg, src, _, out = setup
    fp8 = write_random_hf_checkpoint(cfg.model, tmp_path / "fp8", fp8=True)
    with pytest.raises(ConfigError, match="cast to bf16 first"):
        hf_to_mcore(cfg, fp8, out, progress=False)
    out.mkdir()
    (out / "keep").write_text("x")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        hf_to_mcore(cfg, src, out, progress=False)
    assert (out / "keep").read_text() == "x"


def test_part_layers_split_evenly():
    assert [part_layers(61, (i, 4)) for i in range(4)] == [range(0, 15), range(15, 30), range(30, 45), range(45, 61)]
    with pytest.raises(ConfigError):
        part_layers(3, (3, 3))
