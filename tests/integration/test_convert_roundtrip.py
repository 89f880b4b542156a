"""HF -> Megatron-Core -> HF on the tiny architecture: bit-exact round trip, logits that agree, resume
after an interruption, a job split in parts, and the weight-sync generator."""
import json

import pytest
import torch

from cookbook.config import load_config
from cookbook.convert import hf_to_mcore as h2m
from cookbook.convert.hf_io import read_index
from cookbook.convert.names import megatron_to_hf_tensors
from cookbook.convert.pipeline import compare_logits, convert, round_trip_check
from cookbook.convert.synthetic import write_random_hf_checkpoint

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("convert")
    cfg = load_config("tiny")
    src = write_random_hf_checkpoint(cfg.model, root / "hf", max_shard_bytes=1 << 20, seed=3)
    (src / "tokenizer.json").write_text("{}")
    ckpt = convert(cfg, "hf_to_mcore", src, root / "mcore", part=(0, 1), progress=False)
    return cfg, src, ckpt, root


def test_round_trip_is_bit_exact(converted):
    cfg, src, ckpt, root = converted
    back = convert(cfg, "mcore_to_hf", ckpt, root / "hf_back", part=(0, 1), progress=False)
    report = round_trip_check(src, back)
    assert report["bit_exact"], report
    assert report["tensors"] == len(read_index(src))
    assert (back / "tokenizer.json").is_file()
    assert json.loads((back / "config.json").read_text())["n_routed_experts"] == cfg.model.num_experts


def test_logits_agree(converted):
    cfg, src, ckpt, _ = converted
    result = compare_logits(cfg, src, ckpt)
    # fp32 on both sides; the only differences are summation order (SDPA vs eager attention, fused fc1)
    assert result["max_abs_diff"] < 1e-5, result
    assert result["same_argmax"] == 1.0


def test_interrupted_run_resumes(converted, monkeypatch):
    cfg, src, _, root = converted
    calls = []
    real_save = h2m.save_unit

    def save_then_die(entries, unit_dir):
        if len(calls) == 3:
            raise KeyboardInterrupt("simulated kill")
        calls.append(unit_dir.name)
        real_save(entries, unit_dir)

    monkeypatch.setattr(h2m, "save_unit", save_then_die)
    out = root / "mcore_resumed"
    with pytest.raises(KeyboardInterrupt):
        h2m.hf_to_mcore(cfg, src, out, max_unit_bytes=100_000, progress=False)
    assert not out.exists() and out.with_name(f".tmp-{out.name}").is_dir()
    done = list(calls)
    calls.clear()
    monkeypatch.setattr(h2m, "save_unit", lambda e, d: (calls.append(d.name), real_save(e, d)))
    h2m.hf_to_mcore(cfg, src, out, max_unit_bytes=100_000, progress=False)
    assert not set(done) & set(calls)  # finished units were not redone
    assert compare_logits(cfg, src, out)["max_abs_diff"] < 1e-5


def test_split_in_parts(converted):
    cfg, src, _, root = converted
    out = root / "mcore_parts"
    assert h2m.hf_to_mcore(cfg, src, out, part=(1, 2), progress=False) is None  # writes its units, no finalize
    assert not out.exists()
    h2m.hf_to_mcore(cfg, src, out, part=(0, 2), progress=False)  # converts its layers, then finalizes
    assert compare_logits(cfg, src, out)["max_abs_diff"] < 1e-5


def test_weight_sync_names_reproduce_the_hf_checkpoint(converted):
    from safetensors import safe_open

    from cookbook.convert.hf_to_mcore import load_megatron_checkpoint
    from cookbook.megatron.model import build_model, init_parallel

    cfg, src, ckpt, _ = converted
    init_parallel(cfg)
    model = build_model(cfg)
    load_megatron_checkpoint(model, ckpt)
    index = read_index(src)
    got = dict(megatron_to_hf_tensors(list(model.state_dict().items())))
    assert set(got) == set(index)
    for name, tensor in got.items():
        with safe_open(src / index[name], "pt") as f:
            assert torch.equal(tensor, f.get_tensor(name)), name


def test_trainer_without_the_expert_bias_loads_and_exports_with_the_rollouts_bias(converted):
    """moe.trainer_expert_bias=false: the converted checkpoint (which keeps the bias) loads into routers without
    one, and the HF export of what that trainer saves writes the source checkpoint's bias, the one the rollout
    engine kept; every other tensor comes back bit for bit."""
    from megatron.core import dist_checkpointing

    from cookbook.convert.hf_to_mcore import load_megatron_checkpoint
    from cookbook.convert.mcore_to_hf import mcore_to_hf
    from cookbook.megatron.model import build_model, init_parallel

    cfg, src, ckpt, root = converted
    bias_free = load_config("tiny", ["moe.trainer_expert_bias=false", "parallel.sync_expert_bias=false"])
    init_parallel(bias_free)
    model = build_model(bias_free)
    load_megatron_checkpoint(model, ckpt)
    assert "decoder.layers.1.mlp.router.expert_bias" not in model.state_dict()
    saved = root / "bias_free_save"
    saved.mkdir()
    dist_checkpointing.save(model.sharded_state_dict(), str(saved))
    with pytest.raises(KeyError, match="lacks"):  # the usual export: a checkpoint without the bias is refused
        mcore_to_hf(cfg, saved, root / "hf_refused", tokenizer_dir=src, progress=False)
    back = mcore_to_hf(bias_free, saved, root / "hf_bias_free", tokenizer_dir=src, progress=False)
    report = round_trip_check(src, back)
    assert report["bit_exact"], report


def test_tiny_deepseek_v3_converts_in_two_parts_and_agrees_past_the_yarn_context(tmp_path):
    """q_lora_rank, 3 dense layers, grouped routing and YaRN: split in two parts as two nodes would convert it,
    bit-exact back, and Megatron's logits equal HF's on sequences longer than YaRN's original context (64)."""
    torch.set_num_threads(1)
    cfg = load_config("tiny-deepseek-v3")
    src = write_random_hf_checkpoint(cfg.model, tmp_path / "hf", max_shard_bytes=1 << 20, seed=5)
    (src / "tokenizer.json").write_text("{}")
    assert convert(cfg, "hf_to_mcore", src, tmp_path / "mcore", part=(1, 2), progress=False) is None
    ckpt = convert(cfg, "hf_to_mcore", src, tmp_path / "mcore", part=(0, 2), progress=False)
    back = convert(cfg, "mcore_to_hf", ckpt, tmp_path / "back", part=(0, 1), progress=False)
    assert round_trip_check(src, back)["bit_exact"]
    result = compare_logits(cfg, src, ckpt, seq_len=100)
    assert result["max_abs_diff"] < 1e-5 and result["same_argmax"] == 1.0, result
