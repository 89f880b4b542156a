"""The tutorial's config fixes: applied once, idempotent, backed up, fp8 refused."""
import json

import pytest

from cookbook.config import ConfigError
from cookbook.models.fixes import apply_config_fixes


def _write(d, cfg, weight_map=None):
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(cfg))
    if weight_map is not None:
        (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return d


def test_deepseek_v3_fixes_are_idempotent_with_a_backup(tmp_path):
    d = _write(tmp_path / "ds", {"model_type": "deepseek_v3", "quantization_config": {"fmt": "e4m3"},
                                 "num_nextn_predict_layers": 1}, {"model.embed_tokens.weight": "a.safetensors"})
    first = apply_config_fixes(d, "deepseek-v3-671b")
    assert first.changes == ["removed quantization_config", "num_nextn_predict_layers 1 -> 0"]
    cfg = json.loads((d / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["num_nextn_predict_layers"] == 0
    assert json.loads((d / "config.json.orig").read_text())["num_nextn_predict_layers"] == 1
    again = apply_config_fixes(d, "deepseek-v3-671b")
    assert again.changes == [] and "already has" in str(again)


def test_fp8_weights_are_refused_before_any_change(tmp_path):
    d = _write(tmp_path / "fp8", {"quantization_config": {}, "num_nextn_predict_layers": 1},
               {"model.layers.0.mlp.down_proj.weight_scale_inv": "a.safetensors"})
    with pytest.raises(ConfigError, match="fp8_to_bf16"):
        apply_config_fixes(d, "deepseek-v3-671b")
    assert "quantization_config" in json.loads((d / "config.json").read_text())
    assert not (d / "config.json.orig").exists()


def test_moonlight_auto_map_removed(tmp_path):
    d = _write(tmp_path / "moon", {"model_type": "kimi", "auto_map": {"AutoModel": "modeling_deepseek.X"}})
    report = apply_config_fixes(d, "moonlight-16b-a3b")
    assert len(report.changes) == 2 and "auto_map" in report.changes[0]
    cfg = json.loads((d / "config.json").read_text())
    assert "auto_map" not in cfg and cfg["model_type"] == "deepseek_v3"


def test_unknown_preset_and_missing_config(tmp_path):
    with pytest.raises(ConfigError, match="no config fixes"):
        apply_config_fixes(tmp_path, "tiny")
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        apply_config_fixes(tmp_path, "moonlight-16b-a3b")
