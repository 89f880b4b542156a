"""`cookbook convert` does what notebook 20 does (source preparation included, through the same functions),
and `cookbook convert --verify` / `cookbook verify-convert` run and print its checks; on random tiny checkpoints."""
import dataclasses
import json
import re

import pytest
import torch

from cookbook.cli import main
from cookbook.config import load_config
from cookbook.convert.hf_io import read_index
from cookbook.convert.synthetic import write_random_hf_checkpoint

pytestmark = pytest.mark.slow  # each test converts a checkpoint with Megatron-Core (seconds, not minutes)

AUTO_MAP = {"AutoConfig": "configuration_deepseek.DeepseekV3Config",
            "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"}


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


def tiny_shaped(preset: str) -> list[str]:
    """Overrides giving a real preset the tiny architecture and a layout that validates, so that its source
    preparation (fp8 cast, config fixes) runs on a checkpoint that converts in seconds."""
    keep = {"name", "hf_dir", "mcore_dir", "max_position_embeddings", "params_dtype"}
    yaml = {None: "null", True: "true", False: "false"}
    model = [f"model.{k}={yaml.get(v, v) if isinstance(v, (bool, type(None))) else v}"
             for k, v in dataclasses.asdict(load_config("tiny").model).items() if k not in keep]
    return model + ["parallel.tensor=1", "parallel.pipeline=1", "parallel.first_pipeline_stage_layers=null",
                    "parallel.last_pipeline_stage_layers=null", "parallel.rollout_tensor=1"]


def _run_args(tmp_path, name):
    return ["--run-name", name, "--runs-dir", str(tmp_path / "runs")]


def test_convert_prepares_the_presets_fp8_source(tmp_path, capsys):
    """No --direction: notebook 20 for the run's preset. DeepSeek-V3's fp8 download is cast to bf16 next to
    it and the tutorial's config fixes are checked on the copy before the conversion into the run folder."""
    over = tiny_shaped("deepseek-v3-671b")
    cfg = load_config("deepseek-v3-671b", overrides=over)
    fp8 = write_random_hf_checkpoint(cfg.model, tmp_path / "DeepSeek-V3", fp8=True,
                                     extra_config={"num_nextn_predict_layers": 1})
    rc = main(["convert", "--preset", "deepseek-v3-671b", *_run_args(tmp_path, "ds"), *over, f"model.hf_dir={fp8}"])
    assert rc == 0
    out = capsys.readouterr().out
    bf16 = tmp_path / "DeepSeek-V3-BF16"
    assert f"fp8 -> bf16: cast into {bf16}" in out and "already has the tutorial's fixes" in out
    assert not any(name.endswith("_scale_inv") for name in read_index(bf16))
    config = json.loads((bf16 / "config.json").read_text())
    assert "quantization_config" not in config and config["num_nextn_predict_layers"] == 0
    assert "quantization_config" in json.loads((fp8 / "config.json").read_text())  # the download is left alone
    ckpt = tmp_path / "runs" / "ds" / "mcore"
    assert f"converted: {ckpt}" in out
    assert json.loads((ckpt / "cookbook_convert.json").read_text())["source"] == str(bf16.resolve())


def test_hf_to_mcore_direction_casts_an_fp8_src(tmp_path, capsys):
    """The low-level step prepares its --src the same way (before: "cast to bf16 first", exit 2)."""
    cfg = load_config("tiny")
    fp8 = write_random_hf_checkpoint(cfg.model, tmp_path / "fp8", fp8=True)
    out_dir = tmp_path / "mcore"
    rc = main(["convert", *_run_args(tmp_path, "t"), "--direction", "hf_to_mcore", "--src", str(fp8),
               "--out", str(out_dir)])
    assert rc == 0, capsys.readouterr().err
    bf16 = tmp_path / "fp8-BF16"
    assert f"fp8 -> bf16: cast into {bf16}" in capsys.readouterr().out
    assert json.loads((out_dir / "cookbook_convert.json").read_text())["source"] == str(bf16.resolve())


def test_hf_to_mcore_direction_applies_the_presets_config_fixes(tmp_path, capsys):
    """Moonlight's download points auto_map at a patched modeling file: the fix is applied (with a backup)
    before the conversion, so the checkpoint's hf_config.json (the way back to HF) is the fixed one."""
    over = tiny_shaped("moonlight-16b-a3b")
    cfg = load_config("moonlight-16b-a3b", overrides=over)
    src = write_random_hf_checkpoint(cfg.model, tmp_path / "Moonlight", extra_config={"auto_map": AUTO_MAP})
    out_dir = tmp_path / "mcore"
    rc = main(["convert", "--preset", "moonlight-16b-a3b", *_run_args(tmp_path, "moon"), *over,
               "--direction", "hf_to_mcore", "--src", str(src), "--out", str(out_dir)])
    assert rc == 0
    assert "removed auto_map" in capsys.readouterr().out
    assert "auto_map" not in json.loads((src / "config.json").read_text())
    assert json.loads((src / "config.json.orig").read_text())["auto_map"] == AUTO_MAP
    assert "auto_map" not in json.loads((out_dir / "hf_config.json").read_text())


def _reported(out: str, key: str) -> str:
    match = re.search(rf"^\s*{key}: (\S+)$", out, re.M)
    assert match, f"'{key}' not in:\n{out}"
    return match.group(1)


def test_verify_reports_bit_exact_and_the_logit_difference(tmp_path, capsys):
    cfg = load_config("tiny")
    src = write_random_hf_checkpoint(cfg.model, tmp_path / "hf", seed=3)
    (src / "tokenizer.json").write_text("{}")
    args = [*_run_args(tmp_path, "v"), f"model.hf_dir={src}"]
    assert main(["convert", "--verify", *args]) == 0  # notebook 20 with verify=True
    out = capsys.readouterr().out
    assert _reported(out, "bit_exact") == "True"
    assert float(_reported(out, "max_abs_diff")) < 1e-5 and float(_reported(out, "same_argmax")) == 1.0
    assert (tmp_path / "runs" / "v" / "hf_roundtrip" / "tokenizer.json").is_file()

    assert main(["verify-convert", *args]) == 0  # the run's existing checkpoint, checked again
    again = capsys.readouterr().out
    assert _reported(again, "bit_exact") == "True" and float(_reported(again, "max_abs_diff")) < 1e-5

    other = write_random_hf_checkpoint(cfg.model, tmp_path / "other", seed=4)
    assert main(["verify-convert", *args, "--src", str(other)]) == 1  # not what was converted: exit 1
    wrong = capsys.readouterr().out
    assert _reported(wrong, "bit_exact") == "False" and float(_reported(wrong, "max_abs_diff")) > 1e-3


def test_argument_errors(tmp_path, capsys):
    assert main(["convert", *_run_args(tmp_path, "e"), "--src", str(tmp_path)]) == 2
    assert "--direction" in capsys.readouterr().err
    assert main(["convert", *_run_args(tmp_path, "e"), "--direction", "mcore_to_hf", "--src", str(tmp_path),
                 "--out", str(tmp_path / "o"), "--verify"]) == 2
    assert "--verify" in capsys.readouterr().err
    assert main(["verify-convert", *_run_args(tmp_path, "empty")]) == 2
    assert "cookbook convert" in capsys.readouterr().err
