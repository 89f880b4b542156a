"""The tiny model: tokenizer and chat template, vLLM-compatible architecture, cached atomic build."""
import json

import pytest
import transformers

from cookbook.config import ConfigError, load_config
from cookbook.models.hf_config import check_hf_config, hf_config_dict
from cookbook.models.tiny import build_key, build_tiny_model, load_warmup_report, off_by_one_answer, resolve_hf_dir
from cookbook.models.tokenizer import CHAT_TEMPLATE, train_tokenizer

SUFFIX = load_config("tiny").data.prompt_suffix


@pytest.fixture(scope="module")
def tokenizer():
    from cookbook.data.generate import generate_rows

    rows = generate_rows(400, 0)
    return train_tokenizer([r["problem"] + SUFFIX for r in rows] + [r["solution"] for r in rows], 512)


def test_the_warm_up_habit_keeps_the_chain_and_makes_the_answer_wrong():
    from cookbook.data.generate import generate_rows
    from cookbook.data.reward import compute_score, last_boxed

    changed = 0
    for row in generate_rows(300, 1):
        habit = off_by_one_answer(row["solution"])
        head = row["solution"][:row["solution"].rfind("\\boxed{")]
        assert habit.startswith(head) and len(habit) == len(row["solution"])  # only the boxed answer changes
        if habit != row["solution"]:
            changed += 1
            assert compute_score(habit, last_boxed(row["solution"])).score == 0.0, (row["solution"], habit)
    assert changed > 250  # nearly every generated answer has a digit


def test_tokenizer_round_trip_and_single_digit_tokens(tokenizer):
    text = "What is $18 \\times 3$? 18*3=54. The answer is $\\boxed{54}$."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    tokens = tokenizer.convert_ids_to_tokens(tokenizer("12345", add_special_tokens=False)["input_ids"])
    assert tokens == ["1", "2", "3", "4", "5"]


def test_chat_template_renders_the_prompt_and_generation_marker(tokenizer, tmp_path):
    msgs = [{"role": "user", "content": "What is 2+2?"}]
    text = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert text == "<|bos|><|user|>What is 2+2?<|assistant|>"
    tokenizer.save_pretrained(tmp_path)
    again = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert again.chat_template == CHAT_TEMPLATE
    assert again.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False) == text


def test_architecture_follows_the_vllm_cpu_rules():
    m = load_config("tiny").model
    cfg = hf_config_dict(m)
    assert cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"] == 576
    assert cfg["topk_method"] == "noaux_tc" and cfg["scoring_func"] == "sigmoid"
    assert cfg["n_shared_experts"] >= 1 and cfg["first_k_dense_replace"] == 1 and cfg["num_nextn_predict_layers"] == 0
    model = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**cfg))
    assert any("e_score_correction_bias" in n for n in model.state_dict())
    assert sum(p.numel() for p in model.parameters()) < 5_000_000


def test_build_key_tracks_what_the_build_depends_on():
    base = load_config("tiny")
    assert build_key(base) == build_key(load_config("tiny", ["grpo.lr=1e-3"]))
    assert build_key(base) == build_key(load_config("tiny", ["seed=1"]))  # the run seed: same starting model
    # the training dtype: a bf16 run starts from the same fp32 build (cast when converted and loaded)
    assert build_key(base) == build_key(load_config("tiny", ["model.params_dtype=bfloat16"]))
    assert build_key(base) != build_key(load_config("tiny", ["model.hidden_size=128"]))


def test_cached_build_is_reused_and_checked(tmp_path):
    done = tmp_path / "tiny-done"
    done.mkdir()
    (done / "warmup_report.json").write_text(json.dumps({"greedy_accuracy": 0.5}))
    assert build_tiny_model(load_config("tiny"), cache_dir=done) == done  # a finished build is not redone
    assert load_warmup_report(done)["greedy_accuracy"] == 0.5


def test_real_presets_need_a_matching_local_checkpoint(tmp_path):
    with pytest.raises(ConfigError, match="modelscope download --model moonshotai"):
        resolve_hf_dir(load_config("moonlight-16b-a3b"))
    ds = load_config("deepseek-v3-671b")
    (tmp_path / "config.json").write_text(json.dumps(hf_config_dict(load_config("moonlight-16b-a3b").model)))
    ds.model.hf_dir = str(tmp_path)
    with pytest.raises(ConfigError, match="does not match preset 'deepseek-v3-671b'"):
        resolve_hf_dir(ds)
    check_hf_config(hf_config_dict(ds.model), ds.model)


@pytest.mark.slow
def test_the_warmed_up_model_answers_in_boxed_and_gets_some_right():
    from cookbook.models.tiny import greedy_answers

    hf_dir = resolve_hf_dir(load_config("tiny"))  # built once per machine, then cached
    report = load_warmup_report(hf_dir)
    # the warm-up's off-by-one habit (60% of demonstrations) makes most greedy answers wrong while some are
    # right: builder v4 measured 0.115 on 200 generated test problems (0.47 without the habit)
    assert 0.05 < report["greedy_accuracy"] < 0.3 and report["params"] < 5_000_000
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    model = transformers.DeepseekV3ForCausalLM.from_pretrained(hf_dir)
    answers = greedy_answers(model, tok, [e["problem"] + SUFFIX for e in report["examples"]])
    assert all("\\boxed{" in a for a in answers), answers


def test_check_hf_config_compares_rope_base_and_yarn_scaling():
    ds = load_config("deepseek-v3-671b").model
    hf = hf_config_dict(ds)
    # DeepSeek-V3's own config.json writes the YaRN block in the older "type" form
    hf["rope_scaling"] = {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                          "original_max_position_embeddings": 4096, "type": "yarn"}
    hf.pop("rope_parameters")
    check_hf_config(hf, ds)
    for key, value, message in (("factor", 8, r"rope_scaling.factor=8.0 but the preset has model.rope_scaling_factor"),
                                ("original_max_position_embeddings", 2048, "original_max_position_embeddings=2048")):
        with pytest.raises(ConfigError, match=message):
            check_hf_config({**hf, "rope_scaling": {**hf["rope_scaling"], key: value}}, ds)
    with pytest.raises(ConfigError, match="rope_theta=50000.0 but the preset has model.rope_theta=10000.0"):
        check_hf_config({**hf, "rope_theta": 50000.0}, ds)
    moonlight = load_config("moonlight-16b-a3b").model
    with pytest.raises(ConfigError, match="rope_scaling.factor=40.0 but the preset has model.rope_scaling_factor=1.0"):
        check_hf_config({**hf_config_dict(moonlight), "rope_scaling": hf["rope_scaling"]}, moonlight)
