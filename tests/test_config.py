"""Config loading: every shipped file validates, the default file is the built-in default, and
errors name the key and the nearest valid one."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from bridge.config import MAX_CONFIG_BYTES, BridgeConfig, ConfigError, load_config
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
        (["engine"], "--set engine: expects section.key=value, got 'engine'"),
        (
            ["engine.warm_steps=[1, 11]"],
            "engine.warm_steps must list step counts within [1, 10], got [1, 11]",
        ),
        (["engine.warm_steps=[0]"], "engine.warm_steps must list step counts within [1, 10], got [0]"),
        (["engine.warm_steps=[3, three]"], "engine.warm_steps.1 must be an integer, got 'three'"),
        (
            [f"engine.warm_steps={[*range(1, 11), 4]}"],
            "engine.warm_steps must list step counts within [1, 10], got [1, 2, 3",
        ),
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
    assert load_config(None, ["engine.warm_steps=[1, 3, 4]"]).engine.warm_steps == (1, 3, 4)
    assert load_config(None, []).engine.warm_steps == ()
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


def _alias_bomb(levels: int, width: int) -> str:
    """A 'billion laughs' YAML document: each level lists the previous one `width` times."""
    names = "abcdefghijklmnop"
    lines = ["a: &a [lol]"]
    for i in range(1, levels):
        refs = ",".join([f"*{names[i - 1]}"] * width)
        lines.append(f"{names[i]}: &{names[i]} [{refs}]")
    lines.append(f"engine:\n  model: *{names[levels - 1]}")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize(
    ("levels", "width", "message"),
    [
        (10, 12, "uses more than 100 YAML aliases"),  # 109 aliases: the count stops it
        (9, 11, "expands to more than 100000 values through its YAML aliases"),  # 89, 11**8 values
    ],
)
def test_a_yaml_alias_bomb_is_refused_at_once(tmp_path: Path, levels: int, width: int, message: str) -> None:
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(_alias_bomb(levels, width))
    assert bomb.stat().st_size <= 600  # the size of the attack that took 80 s and 1.8 GB
    start = time.perf_counter()
    with pytest.raises(ConfigError) as info:
        load_config(bomb)
    assert time.perf_counter() - start < 5.0  # generous: it takes milliseconds
    assert str(info.value).startswith(f"{bomb} {message}")
    assert len(str(info.value)) < 300


def test_a_few_aliases_still_work(tmp_path: Path) -> None:
    config = tmp_path / "anchors.yaml"
    config.write_text(
        "output: &shm {kind: shm, name: one}\nextra_outputs:\n  - *shm\n  - {<<: *shm, name: two}\n"
    )
    assert [o.name for o in load_config(config).outputs] == ["one", "one", "two"]


def test_an_alias_bomb_in_a_set_value_is_refused() -> None:
    value = "[" + ", ".join(["&x [1, 2]"] + ["*x"] * 101) + "]"
    with pytest.raises(ConfigError, match=r"^--set params.prompt=.*: the value uses more than 100 YAML"):
        load_config(None, [f"params.prompt={value}"])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("engine:\n  width: " + "9" * 50_000 + "x\n", "engine.width must be an integer, got '" + "9" * 199),
        ("engine:\n  ? " + "k" * 50_000 + "\n  : 1\n", "unknown key 'engine." + "k" * 190),
        ("output:\n  kind: " + "s" * 50_000 + "\n", "output.kind '" + "s" * 199),
        ("params:\n  prompt: [" + "1, " * 20_000 + "1]\n", "params.prompt: "),
    ],
    ids=["value", "key", "kind", "param"],
)
def test_error_messages_cut_long_values(tmp_path: Path, text: str, expected: str) -> None:
    config = tmp_path / "long.yaml"
    config.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(config)
    message = str(info.value)
    assert expected in message
    assert len(message) < 700, message[:1000]
    assert "characters in all)" in message


def test_an_oversized_config_is_refused_unread(tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    big.write_text("# padding\n" * (MAX_CONFIG_BYTES // 10) + "engine: {}\n")
    assert big.stat().st_size > MAX_CONFIG_BYTES
    with pytest.raises(ConfigError) as info:
        load_config(big)
    assert str(info.value) == (
        f"config {big} is larger than 1024 KB; a config is a few KB of settings: check that this is the right file"
    )
    just = tmp_path / "just.yaml"
    just.write_text("engine: {width: 64}\n" + "#" * (MAX_CONFIG_BYTES - 30) + "\n")
    assert just.stat().st_size <= MAX_CONFIG_BYTES
    assert load_config(just).engine.width == 64


def test_a_set_mistake_names_the_set_not_the_file() -> None:
    default = CONFIGS[[p.stem for p in CONFIGS].index("default")]
    with pytest.raises(ConfigError) as info:
        load_config(default, ["params.prompt=ok", "params.guidence=2"])
    assert str(info.value) == (
        "--set params.guidence=2: unknown key 'params.guidence'; did you mean 'params.guidance'? "
        "(valid: " + str(info.value).split("(valid: ")[1]
    )
    with pytest.raises(ConfigError, match=r"^--set osc.port=0: osc.port must be within \[1, 65535\], got 0$"):
        load_config(default, ["osc.port=0"])
    with pytest.raises(ConfigError, match=r"^--set engine.width=wide: engine.width must be an integer"):
        load_config(None, ["engine.width=wide"])


def test_a_file_mistake_names_the_file_even_with_sets(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("params:\n  guidence: 2\n")
    with pytest.raises(ConfigError, match=rf"^{bad}: unknown key 'params.guidence'"):
        load_config(bad, ["params.prompt=ok"])
    fixed = tmp_path / "fixable.yaml"
    fixed.write_text("osc:\n  port: 0\n")
    assert load_config(fixed, ["osc.port=7100"]).osc.port == 7100  # a --set may mend the file
    with pytest.raises(ConfigError, match=rf"^{fixed}: osc.port must be within"):
        load_config(fixed)
