"""Typed config: YAML files, overrides, and clear errors naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from selfspec.config import CONFIG_DIR, ConfigError, RunConfig, dump_config, load_config, parse_overrides

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    config = load_config(str(path))
    assert isinstance(config, RunConfig)


def test_overrides_parse_yaml_values():
    tree = parse_overrides(["generate.target=12", "eval.shots=[0, 3]", "name=x", "model.num_threads=null"])
    assert tree == {"generate": {"target": 12}, "eval": {"shots": [0, 3]}, "name": "x", "model": {"num_threads": None}}
    config = load_config("default", ["generate.target=12", "eval.shots=[0,3]"])
    assert config.generate.target == 12 and config.eval.shots == [0, 3]


def test_unknown_key_is_rejected_with_its_name():
    with pytest.raises(ConfigError, match="unknown config key 'generate.targte'"):
        load_config("default", ["generate.targte=3"])
    with pytest.raises(ConfigError, match="unknown config key 'modle'"):
        load_config("default", ["modle.ref=x"])


def test_bad_value_is_rejected_with_its_name():
    with pytest.raises(ConfigError, match="bad value for 'train.lr'"):
        load_config("default", ["train.lr=-1"])
    with pytest.raises(ConfigError, match="bad value for 'model.backend'"):
        load_config("default", ["model.backend=tpu"])
    with pytest.raises(ConfigError, match="min_words"):
        load_config("default", ["generate.min_words=200"])


def test_bad_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="key=value"):
        load_config("default", ["generate.target"])
    with pytest.raises(ConfigError, match="neither a file nor a shipped config"):
        load_config(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(str(bad))


def test_resolved_config_round_trips(tmp_path):
    config = load_config("default", ["generate.target=5"])
    path = tmp_path / "config.yaml"
    path.write_text(dump_config(config))
    assert load_config(str(path)) == config


def test_configs_are_frozen():
    config = load_config("default")
    with pytest.raises(Exception):
        config.generate.target = 3  # type: ignore[misc]


def test_scale_only_keys_leave_the_resume_hash_alone():
    base = load_config("default")
    bigger = load_config("default", ["generate.replicas=8", "generate.num_gpus_per_replica=1", "eval.replicas=4", "train.cpus_per_worker=8"])
    assert base.section_hash("model", "generate", "retrieval") == bigger.section_hash("model", "generate", "retrieval")
    assert base.section_hash("model", "eval") == bigger.section_hash("model", "eval")
    changed = load_config("default", ["generate.temperature=0.5"])
    assert base.section_hash("model", "generate") != changed.section_hash("model", "generate")


def test_selection_keys_keep_the_generated_shards_but_not_the_final_set():
    from selfspec.stages.generate import generation_hash

    base = load_config("default")
    reselected = load_config("default", ["generate.target=500", "generate.label_tolerance=1.0"])
    assert generation_hash(base) == generation_hash(reselected)  # the shards resume
    assert base.section_hash("generate") != reselected.section_hash("generate")  # the pipeline reselects
    assert generation_hash(base) != generation_hash(load_config("default", ["generate.temperature=0.5"]))
