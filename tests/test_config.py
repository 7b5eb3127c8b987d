"""Every file in conf/ composes into typed configs (as litgpt checks its config hub), and config mistakes are named."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hydra.errors import ConfigCompositionException, MissingConfigException

from raytrain.cli import CONF_DIR
from raytrain.commands.compress import codec_configs
from raytrain.commands.generate import sampling_params
from raytrain.commands.train import typed_parts
from raytrain.config import ConfigError
from raytrain.models.registry import build_model, model_config
from tests.conftest import compose

GROUPS = sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir())
OPTIONS = [(g, f.stem) for g in GROUPS for f in sorted((CONF_DIR / g).glob("*.yaml"))]
PRIMARY = sorted(f.stem for f in CONF_DIR.glob("*.yaml") if f.stem != "base")


def test_every_config_file_is_covered() -> None:
    assert GROUPS == ["data", "experiment", "model", "optim", "schedule", "tracking", "trainer"]
    assert PRIMARY == ["compress", "generate", "model_info", "train"]


@pytest.mark.parametrize("group, option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_train_composes_with_each_option(group: str, option: str) -> None:
    overrides = [f"{group}={option}"]
    if (group, option) == ("data", "text"):
        overrides += ["model=openelm_270m", "data.path=/corpus"]
    if group == "experiment":
        overrides.append("data.path=/corpus")
    parts = typed_parts(compose("train", overrides))
    build_model(parts["model"], "meta")
    if group == "experiment":
        assert parts["model"].name == option and parts["trainer"].use_gpu


@pytest.mark.parametrize("option", [o for g, o in OPTIONS if g == "model"])
def test_model_info_composes_each_model(option: str) -> None:
    build_model(model_config(compose("model_info", [f"model={option}"]).model), "meta")


def test_generate_and_sample_configs_compose() -> None:
    assert sampling_params(compose("generate"), "generate").top_k == 40
    assert sampling_params(compose("train").sample, "sample").max_new_tokens == 48


def test_compress_config_composes_into_both_codecs() -> None:
    for bits, (C, P) in ((4, (8, 3)), (3, (12, 4))):
        configs = codec_configs(compose("compress", [f"bits={bits}"]))
        assert (configs["seedlm"].C, configs["seedlm"].P, configs["seedlm"].K, configs["rtn"].bits) == (C, P, 16, bits)


def test_misspelt_key_and_group_are_named_by_hydra() -> None:
    with pytest.raises(ConfigCompositionException, match="num_wokers"):
        compose("train", ["trainer.num_wokers=2"])
    with pytest.raises(MissingConfigException, match="openelm_2b"):
        compose("train", ["model=openelm_2b"])


@pytest.mark.parametrize("override, message", [
    ("trainer.num_workers=many", "trainer.num_workers: Value 'many'"),
    ("trainer.zero_stage=5", "zero_stage=5"),
    ("data.seq_len=4096", "exceeds model.max_seq_len=256"),
    ("tracking.mode=cloud", "mode='cloud'"),
    ("data=text", "data.path: Missing mandatory value"),
])
def test_wrong_values_are_named(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        typed_parts(compose("train", [override]))


def test_cli_prints_the_composed_config_and_rejects_unknown_commands() -> None:
    out = subprocess.run([sys.executable, "-m", "raytrain", "train", "--cfg", "job", "model=openelm_270m"],
                         capture_output=True, text=True, check=True, timeout=120).stdout
    assert "name: openelm_270m" in out and "zero_stage: 2" in out
    bad = subprocess.run([sys.executable, "-m", "raytrain", "trian"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown command 'trian'" in bad.stderr
