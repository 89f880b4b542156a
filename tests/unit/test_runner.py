"""The papermill runner validates parameters before a kernel starts."""
import pytest

from cookbook.config import ConfigError
from cookbook.runner import file_parameters, find_notebook, notebook_parameters, parse_cli_value, run_notebook


def test_find_notebook_by_stem_and_suggests():
    assert find_notebook("00_environment").name == "00_environment.ipynb"
    with pytest.raises(FileNotFoundError, match="did you mean '00_environment'"):
        find_notebook("00_enviroment")


def test_every_notebook_has_the_common_parameters():
    for name in ("00_environment", "31_grpo_deepseek_v3"):
        params = notebook_parameters(find_notebook(name))
        assert {"preset", "run_name", "runs_dir", "overrides"} <= set(params)


def test_cli_values_are_yaml():
    assert parse_cli_value("3") == 3 and parse_cli_value("true") is True and parse_cli_value("tiny") == "tiny"
    assert parse_cli_value("{grpo.lr: 1.0e-6}") == {"grpo.lr": 1e-6}


def test_unknown_parameter_is_refused_before_running(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'preset'"):
        run_notebook("00_environment", {"presett": "tiny"}, runs_dir=str(tmp_path))
    assert not any(tmp_path.iterdir())


def test_bad_config_value_is_refused_before_running(tmp_path):
    with pytest.raises(ConfigError, match="grpo.lr"):
        run_notebook("00_environment", {"overrides": {"grpo.lrr": 1}}, runs_dir=str(tmp_path))


def test_params_file_typo_is_an_error_but_other_notebooks_keys_are_skipped(tmp_path):
    nb = find_notebook("00_environment")
    good = tmp_path / "good.yaml"
    good.write_text("preset: tiny\nstrict: true\n")
    assert file_parameters(nb, good) == {"preset": "tiny", "strict": True}
    bad = tmp_path / "bad.yaml"
    bad.write_text("preset: tiny\nstrictt: true\n")
    with pytest.raises(ConfigError, match="bad.yaml.*did you mean 'strict'"):
        file_parameters(nb, bad)
    broken = tmp_path / "broken.yaml"
    broken.write_text("preset: [tiny\n")
    with pytest.raises(ConfigError, match="broken.yaml line"):
        file_parameters(nb, broken)


def test_the_demo_runs_notebook_31_on_the_deepseek_v3_counterpart_in_its_own_folder(tmp_path):
    from cookbook.runner import DEMO_NOTEBOOKS, demo_target, notebooks_dir, prepare_run

    assert DEMO_NOTEBOOKS[-1] == "31_grpo_deepseek_v3"
    assert demo_target("30_grpo_moonlight", "tiny", "d") == ("tiny", "d")
    assert demo_target("31_grpo_deepseek_v3", "tiny", "d") == ("tiny-deepseek-v3", "d-deepseek-v3")
    assert demo_target("31_grpo_deepseek_v3", "moonlight-1gpu", "d") is None  # skipped, said so
    run = prepare_run("31_grpo_deepseek_v3", {"preset": "tiny-deepseek-v3"},
                      params_file=notebooks_dir() / "params" / "tiny-deepseek-v3.yaml", run_name="d-deepseek-v3",
                      runs_dir=str(tmp_path))
    assert run.cfg.preset == "tiny-deepseek-v3" and run.cfg.run_name == "d-deepseek-v3"
    assert run.cfg.model.q_lora_rank and run.cfg.grpo.eval_every == 5
