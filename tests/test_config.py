from pathlib import Path

import pytest

from common.config import BANKING77, ConfigError, JobConfig, load_config


def test_defaults_are_the_embedded_banking77_job():
    job = load_config()
    assert job.data.train_path == (BANKING77 / "train.csv").resolve()
    assert job.federation.institutions == 4
    assert job.privacy.target_epsilon == 8.0


def test_file_values_overrides_and_relative_paths(tmp_path: Path):
    (tmp_path / "data").mkdir()
    config = tmp_path / "job.toml"
    config.write_text('[data]\ntrain_path = "data/train.jsonl"\n[federation]\nrounds = 7\n')
    job = load_config(config, {"federation.rounds": 3, "privacy.target_epsilon": 2.5, "model.lora_rank": None})
    assert job.data.train_path == tmp_path / "data" / "train.jsonl"
    assert job.federation.rounds == 3  # the flag wins over the file
    assert job.privacy.target_epsilon == 2.5
    assert job.model.lora_rank == JobConfig().model.lora_rank  # None means "not given"


def test_json_round_trip_is_lossless():
    job = load_config(overrides={"federation.alpha": 0.3, "data.labels": ["a", "b"]})
    assert JobConfig.from_json(job.to_json()) == job
    assert JobConfig.from_json("") == JobConfig()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[privacy]\ntarget_epsilon = -1\n", "privacy.target_epsilon: Input should be greater than 0"),
        ("[federation]\nstrategy = 'fedsgd'\n", "federation.strategy: Input should be 'fedavg', 'fedprox' or 'fedadam'"),
        ("[training]\nbatchsize = 3\n", "training.batchsize: Extra inputs are not permitted"),
        ("[model\n", "not valid TOML"),
    ],
)
def test_bad_files_give_one_line_errors_naming_file_and_key(tmp_path: Path, text: str, expected: str):
    config = tmp_path / "job.toml"
    config.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(config)
    message = str(err.value)
    assert message.startswith(f"{config}: ")
    assert expected in message
    assert "\n" not in message


def test_missing_config_file_is_named(tmp_path: Path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "absent.toml")
