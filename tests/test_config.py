"""Config loading: every shipped config and profile loads; unknown keys and wrong types name the key."""
import json
import subprocess
import sys

import pytest

from sitlib.config import DEFAULT_CONFIG, REPO_ROOT, Config, ConfigError, load_config, parse_value
from sitlib.hardware import PROFILES


def shipped_configs():
    return sorted({DEFAULT_CONFIG, *REPO_ROOT.glob("configs/*.json")})


@pytest.mark.parametrize("path", shipped_configs(), ids=lambda p: p.name)
@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_every_shipped_config_loads_with_every_profile(path, profile):
    cfg = load_config(path, PROFILES[profile].overrides)
    assert isinstance(cfg, Config)
    for key, value in PROFILES[profile].overrides.items():
        section, leaf = key.split(".")
        assert getattr(getattr(cfg, section), leaf) == value


def test_shipped_config_matches_defaults_keys():
    data = json.loads(DEFAULT_CONFIG.read_text())
    assert set(data) == set(Config().to_dict())


def test_unknown_key_is_named(tmp_path):
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"sft": {"epochz": 3}}))
    with pytest.raises(ConfigError, match=r"unknown config key 'sft\.epochz'"):
        load_config(p)


def test_wrong_type_is_named_with_expected_form(tmp_path):
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"generation": {"batch_size": "big"}}))
    with pytest.raises(ConfigError, match=r"'generation\.batch_size': expected int, got str 'big'"):
        load_config(p)


def test_bool_is_not_an_int_and_int_widens_to_float():
    with pytest.raises(ConfigError, match="sft.batch_size"):
        load_config(None, None, {"sft.batch_size": True})
    assert load_config(None, None, {"sft.learning_rate": 1}).sft.learning_rate == 1.0


def test_optional_field_accepts_null_and_string():
    assert load_config(None, None, {"generation.system_prompt": None}).generation.system_prompt is None
    assert load_config(None, None, {"generation.system_prompt": "Be brief."}).generation.system_prompt == "Be brief."


def test_overrides_beat_profile_beat_file():
    cfg = load_config(None, {"sft.epochs": 2.0}, {"sft.epochs": 1.0})
    assert cfg.sft.epochs == 1.0


def test_invalid_json_names_file_and_line(tmp_path):
    p = tmp_path / "c.json"
    p.write_text('{"seed": 1,\n oops}')
    with pytest.raises(ConfigError, match=r"c\.json: not valid JSON \(line 2"):
        load_config(p)


def test_parse_value():
    assert parse_value("3") == 3 and parse_value("0.5") == 0.5 and parse_value("True") is True
    assert parse_value("[1, 2]") == [1, 2] and parse_value("hello") == "hello" and parse_value("None") is None


@pytest.mark.parametrize("bad", [{"sft": {"epochz": 3}}, {"sft": {"epochs": "three"}}])
def test_cli_rejects_bad_config_and_writes_nothing(tmp_path, bad):
    cfg = tmp_path / "bad.json"
    cfg.write_text(json.dumps(bad))
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "sitlib", "pipeline", "--stages", "01", "--config", str(cfg),
                        "--output-dir", str(out)], capture_output=True, text=True, cwd=REPO_ROOT)
    assert r.returncode == 2
    assert "sft.epoch" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()


def test_explain_names_the_layer_that_set_each_key(tmp_path):
    from sitlib.config import explain

    p = tmp_path / "c.json"
    p.write_text(json.dumps({"sft": {"epochs": 5.0, "learning_rate": 1e-4}}))
    rows = {r["key"]: r for r in explain(p, "cpu", {"sft.epochs": 2.0, "sft.batch_size": 4},
                                         {"sft.batch_size": 2}, ["sft"])}
    assert rows["sft.learning_rate"] == {"key": "sft.learning_rate", "value": 1e-4, "source": "c.json"}
    assert rows["sft.epochs"] == {"key": "sft.epochs", "value": 2.0, "source": "profile cpu"}
    assert rows["sft.batch_size"] == {"key": "sft.batch_size", "value": 2, "source": "parameter"}
    assert rows["sft.save_steps"]["source"] == "default" and all(k.startswith("sft.") for k in rows)
    shipped = {r["key"]: r["source"] for r in explain(None, "t4", {}, {}, None)}
    assert shipped["lora.r"] == "config.json" and shipped["cost.units_per_hour"] == "config.json"


def test_error_types_are_the_projects():
    from sitlib import artifacts, config, errors

    assert config.ConfigError is errors.ConfigError and artifacts.MissingInputError is errors.MissingInputError


@pytest.mark.parametrize("key, value, allowed", [
    ("lora.r", 0, "≥ 1"), ("sft.learning_rate", 0, "> 0"), ("dpo.learning_rate", -1e-6, "> 0"),
    ("prompt_tuning.learning_rate", 0.0, "> 0"), ("filter.val_fraction", 1.0, "in (0, 1)"),
    ("preference.val_fraction", 0, "in (0, 1)"), ("models.max_seq_length", 15, "≥ 16"),
    ("sft.batch_size", 0, "≥ 1"), ("dpo.gradient_accumulation", 0, "≥ 1"), ("sft.max_steps", 0, "-1"),
    ("models.scorer", "rm", "one of 'reward_model', 'offline'"), ("generation.response_top_p", 1.5, "in (0, 1]"),
])
def test_out_of_range_values_name_key_and_range(key, value, allowed):
    with pytest.raises(ConfigError) as err:
        load_config(None, None, {key: value})
    msg = str(err.value)
    assert f"config key '{key}'" in msg and allowed in msg and "\n" not in msg


def test_boundaries_that_are_allowed():
    cfg = load_config(None, None, {"lora.r": 1, "models.max_seq_length": 16, "filter.val_fraction": 0.5,
                                   "sft.max_steps": -1, "dpo.max_steps": 3})
    assert cfg.lora.r == 1 and cfg.models.max_seq_length == 16


def test_preference_temperatures_allow_greedy_zero_but_not_negative():
    assert load_config(None, None, {"preference.temperatures": [0, 0.8]}).preference.temperatures == [0, 0.8]
    for bad in ([-0.1, 0.8], [], [True]):
        with pytest.raises(ConfigError, match=r"'preference.temperatures'.*numbers ≥ 0; 0 is greedy"):
            load_config(None, None, {"preference.temperatures": bad})


def test_min_above_max_words_is_rejected():
    with pytest.raises(ConfigError, match="filter.min_response_words.*must not exceed"):
        load_config(None, None, {"filter.min_response_words": 50, "filter.max_response_words": 10})


def test_a_bad_value_names_the_layer_that_set_it(tmp_path):
    f = tmp_path / "mine.json"
    f.write_text(json.dumps({"sft": {"rows": "bogus"}}))
    with pytest.raises(ConfigError, match=r"^\S*mine\.json: config key 'sft\.rows': 'bogus' is out of range"):
        load_config(f)
    with pytest.raises(ConfigError, match=r"^overrides: config key 'dpo\.pairs': 'x' is out of range"):
        load_config(None, {}, {"dpo.pairs": "x"})
    with pytest.raises(ConfigError, match=r"^overrides: config key 'preference\.pairs_per_prompt': 0 is out"):
        load_config(None, {}, {"preference.pairs_per_prompt": 0})
    with pytest.raises(ConfigError, match=r"^the profile's settings: config key 'lora\.r'"):
        load_config(None, {"lora.r": 0})
    f.write_text(json.dumps({"sft": {"rowz": "all"}}))
    with pytest.raises(ConfigError, match=r"^\S*mine\.json: unknown config key 'sft\.rowz'"):
        load_config(f)


def test_repetition_penalty_follows_the_model_unless_set():
    from sitlib.config import EMBEDDED_REPETITION_PENALTY as EMB

    hub = load_config(None, None, {})
    assert hub.generation.repetition_penalty == 1.0 and hub.preference.repetition_penalty == 1.0
    emb = load_config(None, None, {"models.teacher": "embedded"})
    assert emb.generation.repetition_penalty == EMB != 1.0 and emb.preference.repetition_penalty == EMB
    # candidates from the SFT adapter: the student's model decides
    sft = load_config(None, None, {"models.teacher": "embedded", "preference.candidate_source": "sft"})
    assert sft.preference.repetition_penalty == 1.0
    own = load_config(None, None, {"models.teacher": "embedded", "generation.repetition_penalty": 1.05})
    assert own.generation.repetition_penalty == 1.05


def test_repetition_penalty_out_of_range_names_the_key():
    with pytest.raises(ConfigError, match=r"generation.repetition_penalty.*out of range"):
        load_config(None, None, {"generation.repetition_penalty": 0})


def test_explain_says_when_the_model_decided():
    from sitlib.config import explain

    rows = {r["key"]: r for r in explain(None, "cpu", PROFILES["cpu"].overrides, {}, sections=["generation"])}
    assert rows["generation.repetition_penalty"]["source"] == "config.json: null, by model"
    rows = {r["key"]: r for r in explain(None, "cpu", PROFILES["cpu"].overrides,
                                         {"generation.repetition_penalty": 1.1}, sections=["generation"])}
    assert rows["generation.repetition_penalty"] == {"key": "generation.repetition_penalty", "value": 1.1,
                                                     "source": "parameter"}
