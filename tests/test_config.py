"""Config loading: every shipped file validates, the default file is the built-in default, and
errors name the key and the nearest valid one."""

from __future__ import annotations

from pathlib import Path

import pytest

from bridge.config import BridgeConfig, ConfigError, load_config
from bridge.runtime import initial_values

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_there_are_presets() -> None:
    names = {p.stem for p in CONFIGS}
    assert {"default", "td-shm", "preview", "sd-turbo", "sdxl-turbo", "sd15-lcm"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_loads(path: Path) -> None:
    config = load_config(path)
    assert config.outputs
    values = initial_values(config)
    assert len(values["t_index_list"]) >= 1


def test_default_file_is_the_built_in_default() -> None:
    from_file = load_config(CONFIGS[[p.stem for p in CONFIGS].index("default")])
    assert from_file.engine == BridgeConfig().engine
    assert from_file.outputs == BridgeConfig().outputs
    assert from_file.input == BridgeConfig().input
    assert from_file.osc == BridgeConfig().osc and from_file.runtime == BridgeConfig().runtime
    assert initial_values(from_file) == initial_values(load_config(None))


def test_real_model_presets() -> None:
    by_name = {p.stem: load_config(p) for p in CONFIGS}
    turbo = by_name["sd-turbo"]
    assert turbo.engine.model == "stabilityai/sd-turbo" and (turbo.engine.width, turbo.engine.height) == (
        512,
        512,
    )
    assert len(turbo.params["t_index_list"]) == 1
    lcm = by_name["sd15-lcm"]
    assert lcm.engine.lcm_lora and len(lcm.params["t_index_list"]) == 4
    assert by_name["sdxl-turbo"].engine.model == "stabilityai/sdxl-turbo"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["engine.modle=x"], "unknown key 'engine.modle'; did you mean 'engine.model'?"),
        (["egnine.model=x"], "unknown key 'egnine'; did you mean 'engine'?"),
        (["params.guidence=2"], "unknown key 'params.guidence'; did you mean 'params.guidance'?"),
        (
            ["params.ssf.treshold=0.9"],
            "unknown key 'params.ssf.treshold'; did you mean 'params.ssf.threshold'?",
        ),
        (["params.guidance=loud"], "params.guidance: guidance expects a number, got the string 'loud'"),
        (["params.guidance=99"], "params.guidance: guidance=99 is outside [0, 10]"),
        (["params.model=x"], "params.model is not live; it belongs in the engine section (engine.model)"),
        (["engine.width=100"], "engine.width must be a multiple of 8 within [64, 2048], got 100"),
        (["engine.cfg_type=half"], "engine.cfg_type must be one of none, full, self, initialize, got 'half'"),
        (["engine.width=wide"], "engine.width must be an integer, got 'wide'"),
        (["output.kind=spuot"], "output.kind 'spuot' is not a known kind"),
        (["input.kind=webcam"], "input.kind 'webcam' is not a known kind"),
        (["osc.port=0"], "osc.port must be within [1, 65535], got 0"),
        (["osc.status_targets=localhost"], "osc.status_targets entries must be host:port"),
        (
            ["params.strength=0.5", "params.t_index_list=[10, 20]"],
            "params.strength and params.t_index_list both set",
        ),
        (["engine"], "--set expects section.key=value, got 'engine'"),
    ],
)
def test_errors_name_the_key(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert message in str(info.value)


def test_overrides(tmp_path: Path) -> None:
    config = load_config(
        None,
        [
            "params.prompt=neon city",
            "params.t_index_list=[20, 30, 40]",
            "params.ssf.enabled=true",
            "extra_outputs.0.port=7870",
            "extra_outputs.1.kind=null",
            "output.kind=null",
            "osc.allowlist=[10.0.0.2]",
        ],
    )
    assert config.params["prompt"] == "neon city" and config.params["t_index_list"] == (20, 30, 40)
    assert config.params["ssf/enabled"] is True
    assert [o.kind for o in config.outputs] == ["null", "preview", "null"]
    assert config.extra_outputs[0].port == 7870
    assert config.osc.allowlist == ("10.0.0.2",)
    strength = load_config(None, ["params.strength=1.0"])
    assert initial_values(strength)["t_index_list"] == (0, 25)


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("engine: [unclosed\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="the top level must be a mapping"):
        load_config(bad)
    bad.write_text("engine:\n  width: 512\n  model: 3\n")
    assert load_config(bad).engine.model == "3"  # a number where a string goes is read as text
