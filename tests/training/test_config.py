"""TrainConfig: the nested preprocessing table, and the older flat keys that still load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from training.config import ConfigError, TrainConfig, load_config
from wastenet.schema import Preprocessing

FLAT = {"input_size": 40, "resize_size": 48, "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.3, 0.4]}
NESTED = Preprocessing(input_size=40, resize_size=48, mean=(0.5, 0.4, 0.3), std=(0.2, 0.3, 0.4))


def test_preprocessing_defaults_come_from_the_shared_schema() -> None:
    assert TrainConfig().preprocessing == Preprocessing()
    assert "input_size" not in TrainConfig.model_fields
    saved = TrainConfig().to_json_dict()
    assert saved["preprocessing"]["input_size"] == 224 and "input_size" not in saved


def test_a_preprocessing_table_in_toml(tmp_path: Path) -> None:
    toml = tmp_path / "c.toml"
    toml.write_text(
        "[preprocessing]\ninput_size = 40\nresize_size = 48\n"
        "mean = [0.5, 0.4, 0.3]\nstd = [0.2, 0.3, 0.4]\n"
    )
    assert load_config(toml).preprocessing == NESTED
    # A flag (a nested override) wins over the file, key by key.
    config = load_config(toml, {"preprocessing": {"input_size": 32}})
    assert config.preprocessing.input_size == 32 and config.preprocessing.resize_size == 48


def test_old_flat_keys_move_into_preprocessing(tmp_path: Path) -> None:
    assert TrainConfig.model_validate(FLAT).preprocessing == NESTED
    # A run directory's config.json from before the table existed: flat keys, no table.
    old = TrainConfig().to_json_dict()
    del old["preprocessing"]
    old.update(FLAT)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(old))
    config = load_config(path)
    assert config.preprocessing == NESTED
    assert config.model_dump(exclude={"preprocessing"}) == TrainConfig().model_dump(
        exclude={"preprocessing"}
    )
    # The flag is nested and the file flat; the flag still wins.
    assert load_config(path, {"preprocessing": {"input_size": 32}}).preprocessing.input_size == 32


def test_a_key_both_flat_and_nested_is_refused(tmp_path: Path) -> None:
    toml = tmp_path / "c.toml"
    toml.write_text("input_size = 40\n[preprocessing]\ninput_size = 32\n")
    with pytest.raises(ConfigError, match=r"c.toml: input_size given both at the top level"):
        load_config(toml)
    with pytest.raises(ValueError, match=r"resize_size given both"):
        TrainConfig.model_validate({"resize_size": 48, "preprocessing": {"resize_size": 48}})


def test_preprocessing_checks_are_the_schema_checks() -> None:
    with pytest.raises(ConfigError, match=r"preprocessing: .*input_size 300 exceeds resize_size"):
        load_config(None, {"preprocessing": {"input_size": 300}})
    with pytest.raises(ConfigError, match=r"preprocessing.std: .*std must be positive"):
        load_config(None, {"input_size": 32, "std": [0.2, 0.0, 0.2]})
    with pytest.raises(ConfigError, match=r"preprocessing.size: Extra inputs"):
        load_config(None, {"preprocessing": {"size": 32}})


def test_training_from_scratch_has_its_own_defaults(tmp_path: Path) -> None:
    # The fine-tuning defaults (three_stage, backbone LR 1e-5) learn almost nothing from
    # random weights; without pretrained weights the whole network trains at 1e-3.
    scratch = TrainConfig(pretrained=False)
    assert scratch.strategy == "differential"
    assert (scratch.lr_backbone, scratch.lr_attention, scratch.lr_head) == (1e-3, 1e-3, 1e-3)
    tuned, fields = TrainConfig(), TrainConfig.model_fields
    assert (tuned.strategy, tuned.lr_backbone) == ("three_stage", 1e-5)
    assert tuned.lr_attention == fields["lr_attention"].default
    # Given values win, from a file or flags.
    toml = tmp_path / "c.toml"
    toml.write_text('pretrained = false\nstrategy = "three_stage"\n')
    chosen = load_config(toml, {"lr_backbone": 2e-4})
    assert (chosen.strategy, chosen.lr_backbone, chosen.lr_attention) == ("three_stage", 2e-4, 1e-3)
    # The saved config says what ran, and loads back to the same.
    saved = tmp_path / "config.json"
    saved.write_text(json.dumps(scratch.to_json_dict()))
    assert load_config(saved) == scratch
