from pathlib import Path

import pytest

from schemas.config import (
    AutoencoderConfig,
    ConfigError,
    DistillConfig,
    EvaluateConfig,
    PrepConfig,
    SampleConfig,
    ServeConfig,
    TrainConfig,
    dump_config,
    load_config,
)

CONFIGS = Path(__file__).parents[2] / "configs"
# configs/<name>*.yaml -> the config model it must parse as.
MODELS = {
    "prep": PrepConfig,
    "train": TrainConfig,
    "vae": AutoencoderConfig,
    "distill": DistillConfig,
    "evaluate": EvaluateConfig,
    "sample": SampleConfig,
    "serve": ServeConfig,
}


def _example_configs() -> list[Path]:
    return sorted(CONFIGS.glob("*.yaml"))


def test_every_flow_has_an_example_config():
    names = {path.stem.split("-")[0] for path in _example_configs()}
    assert names == set(MODELS)


@pytest.mark.parametrize("path", _example_configs(), ids=lambda p: p.name)
def test_example_configs_load(path: Path):
    config = load_config(MODELS[path.stem.split("-")[0]], path)
    # What we dump loads back to an equal config.
    assert type(config).model_validate(config.model_dump(mode="json")) == config


def test_dump_then_load_is_identity(tmp_path: Path):
    config = load_config(PrepConfig, overrides=["rows_per_file=3", "storage.region=eu-west-1"])
    path = tmp_path / "prep.yaml"
    path.write_text(dump_config(config))
    assert load_config(PrepConfig, path) == config


def test_unknown_key_names_key_and_file(tmp_path: Path):
    path = tmp_path / "prep.yaml"
    path.write_text("input: ./corpus\nstorage:\n  endpoint: http://x\n")
    with pytest.raises(ConfigError) as err:
        load_config(PrepConfig, path)
    assert str(path) in str(err.value)
    assert "unknown key 'storage.endpoint'" in str(err.value)


def test_unknown_override_key_is_an_error():
    with pytest.raises(ConfigError, match="unknown key 'batchsize'"):
        load_config(PrepConfig, overrides=["batchsize=4"])


def test_precedence_defaults_file_flags_set(tmp_path: Path):
    path = tmp_path / "train.yaml"
    path.write_text("max_steps: 7\noptimizer:\n  learning_rate: 0.5\ndata: ./from-file\n")
    config = load_config(
        TrainConfig,
        path,
        overrides=["optimizer.learning_rate=0.25", "ray.num_cpus=2", "bundle.dtype=bfloat16"],
        values={"data": "s3://bucket/shards", "output": None},
    )
    assert config.max_steps == 7  # file
    assert config.data == "s3://bucket/shards"  # flag beats file
    assert config.optimizer.learning_rate == 0.25  # --set beats file
    assert config.output == TrainConfig().output  # a flag left unset changes nothing
    assert config.ray.num_cpus == 2
    assert config.bundle.dtype == "bfloat16"


def test_override_values_are_yaml_scalars():
    config = load_config(TrainConfig, overrides=["use_gpu=true", "seed=12", "ray.address=null"])
    assert config.use_gpu is True and config.seed == 12 and config.ray.address is None


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("caption.resources.batch_size=0", "'caption.resources.batch_size'"),
        ("bundle.dtype=int8", "'bundle.dtype'"),
        ("rows_per_file", "expected key.path=value"),
        ("rows_per_file.x=1", "not a section"),
    ],
)
def test_bad_overrides_name_the_field(override: str, message: str):
    with pytest.raises(ConfigError, match=message):
        load_config(PrepConfig, overrides=["rows_per_file=2", override])


def test_missing_and_malformed_files(tmp_path: Path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(ServeConfig, tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("port: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(ServeConfig, bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("just a string\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(ServeConfig, scalar)


def test_defaults_are_the_embedded_ones():
    config = PrepConfig()
    assert config.ray.address is None
    assert config.bundle.uri.startswith("./raygen-data/bundles/")
    assert config.storage.endpoint_url is None


def test_a_lora_is_set_from_flags_and_refused_on_a_transformer_from_scratch():
    config = load_config(TrainConfig, overrides=["adapter.rank=8", "adapter.alpha=16"])
    assert config.adapter is not None and (config.adapter.rank, config.adapter.alpha) == (8, 16)
    assert config.adapter.target_modules == ["to_k", "to_q", "to_v", "to_out.0"]
    with pytest.raises(ConfigError, match="adapter: a LoRA adapts the bundle's trained weights"):
        load_config(TrainConfig, overrides=["adapter.rank=8", "init=scratch"])
