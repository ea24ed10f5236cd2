"""The parameter table, coercion, strength mapping and the store."""

from __future__ import annotations

import math

import pytest

from bridge.params import (
    BY_NAME,
    LIVE,
    MAX_BLEND_ENTRIES,
    MAX_PROMPT_CHARS,
    PARAMS,
    Kind,
    ParamError,
    ParamStore,
    coerce,
    coerce_norm,
    strength_to_t_index,
    t_index_to_strength,
    table,
    text_args,
)


def test_table_holds_every_required_parameter() -> None:
    required = {
        "prompt", "negative_prompt", "prompt_blend", "seed", "guidance", "delta", "strength",
        "t_index_list", "ssf/enabled", "ssf/threshold", "ssf/max_skip", "freeze", "bypass",
    }  # fmt: skip
    assert required <= set(LIVE)
    assert {"model", "width", "height", "cfg_type", "acceleration"} <= {p.name for p in PARAMS if not p.live}


def test_rows_are_complete_and_defaults_valid() -> None:
    for p in PARAMS:
        assert p.doc, p.name
        if p.numeric:
            assert p.minimum is not None and p.maximum is not None and p.minimum < p.maximum, p.name
            assert p.minimum <= p.default <= p.maximum, p.name
        if p.live and p.kind is not Kind.BLEND:
            args = list(p.default) if isinstance(p.default, tuple) else [p.default]
            assert coerce(p, args).value == p.default, p.name
        if not p.live:
            assert p.reload_reason, p.name


def test_every_parameter_has_a_human_label() -> None:
    labels = {p.name: p.label for p in PARAMS}
    assert all(labels.values()), [name for name, label in labels.items() if not label]
    assert len(set(labels.values())) == len(labels), "two parameters share a label"
    assert labels["ssf/enabled"] == "Similarity filter"
    assert labels["ssf/threshold"] == "Skip threshold"
    assert labels["ssf/max_skip"] == "Max skipped frames"
    assert [row["label"] for row in table()] == list(labels.values())


def test_td_names_and_aliases() -> None:
    assert BY_NAME["ssf/threshold"].td_name == "Ssfthreshold"
    assert BY_NAME["negative_prompt"].td_name == "Negativeprompt"
    assert BY_NAME["guidance"].aliases == ("/guidance_scale",)
    assert BY_NAME["t_index_list"].aliases == ("/t_list",)
    names = [row["td_name"] for row in table()]
    assert len(names) == len(set(names)), "TouchDesigner names must be unique"


@pytest.mark.parametrize(
    ("name", "args", "value", "warned"),
    [
        ("guidance", [2.5], 2.5, False),
        ("guidance", [3], 3.0, False),  # int for float
        ("guidance", ["1.5"], 1.5, False),  # text from a form
        ("guidance", [99.0], 10.0, True),  # clamped
        ("seed", [7.0], 7, False),  # TouchDesigner sends ints as floats
        ("seed", [7.4], 7, True),  # not integral: rounded, with a warning
        ("seed", [-5], 0, True),
        ("ssf/max_skip", [1000], 100, True),
        ("ssf/enabled", [1.0], True, False),
        ("ssf/enabled", ["off"], False, False),
        ("freeze", [True], True, False),
        ("t_index_list", [20.0, 30, 40], (20, 30, 40), False),
        ("t_index_list", [10, 70], (10, 49), True),
        ("prompt_blend", ["a cat", 0.7, "a dog", 1], (("a cat", 0.7), ("a dog", 1.0)), False),
        ("prompt", ["neon city"], "neon city", False),
    ],
)
def test_coerce(name: str, args: list[object], value: object, warned: bool) -> None:
    got = coerce(BY_NAME[name], args)
    assert got.value == value
    assert bool(got.warning) == warned


@pytest.mark.parametrize(
    ("name", "args", "reason"),
    [
        ("guidance", ["abc"], "guidance expects a number, got the string 'abc'"),
        ("guidance", [], "guidance expects one value, got 0"),
        ("guidance", [math.nan], "guidance expects a finite number"),
        ("prompt", [3], "prompt expects a string, got int 3"),
        ("ssf/enabled", ["maybe"], "ssf/enabled expects true/false"),
        ("t_index_list", [30, 20], "t_index_list must be strictly ascending, got [30, 20]"),
        ("t_index_list", list(range(11)), "t_index_list expects 1 to 10 ints, got 11"),
        ("prompt_blend", ["a cat"], "prompt_blend expects pairs of text and weight"),
        ("prompt_blend", ["a", -1.0], "weights must be >= 0"),
        ("prompt_blend", ["a", 0.0, "b", 0.0], "the weights sum to 0"),
        ("model", ["sd-turbo"], "model is config-only"),
        ("cfg_type", ["full"], "cfg_type is config-only (it changes the UNet batch layout)"),
    ],
)
def test_coerce_rejects_with_reason(name: str, args: list[object], reason: str) -> None:
    with pytest.raises(ParamError) as info:
        coerce(BY_NAME[name], args)
    assert reason in str(info.value)


@pytest.mark.parametrize("name", ["prompt", "negative_prompt"])
def test_a_prompt_longer_than_the_cap_is_refused_with_a_short_reason(name: str) -> None:
    assert coerce(BY_NAME[name], ["x" * MAX_PROMPT_CHARS]).value == "x" * MAX_PROMPT_CHARS
    with pytest.raises(ParamError) as info:
        coerce(BY_NAME[name], ["x" * 5_000_000])
    reason = str(info.value)
    assert reason.startswith(f"{name} is 5000000 characters long ('xxx")
    assert f"the most is {MAX_PROMPT_CHARS}" in reason
    assert len(reason) < 400  # the 5 MB value is not quoted whole


def test_blends_are_capped_in_entries_and_text_length() -> None:
    blend = BY_NAME["prompt_blend"]
    most = [x for i in range(MAX_BLEND_ENTRIES) for x in (f"p{i}", 1.0)]
    assert len(coerce(blend, most).value) == MAX_BLEND_ENTRIES
    with pytest.raises(ParamError, match=rf"prompt_blend has 1000 entries; the most is {MAX_BLEND_ENTRIES}"):
        coerce(blend, [x for i in range(1000) for x in (f"p{i}", 1.0)])
    with pytest.raises(ParamError, match="prompt_blend is 3000 characters long"):
        coerce(blend, ["y" * 3000, 1.0])


def test_values_quoted_in_reasons_are_cut() -> None:
    with pytest.raises(ParamError) as info:
        coerce(BY_NAME["guidance"], ["z" * 100_000])
    assert len(str(info.value)) < 300 and "100002 characters" in str(info.value)
    with pytest.raises(ParamError) as info:
        coerce(BY_NAME["seed"], list(range(50_000)))
    assert len(str(info.value)) < 300


def test_norm_maps_onto_the_range() -> None:
    assert coerce_norm(BY_NAME["guidance"], [0.5]).value == pytest.approx(5.0)
    assert coerce_norm(BY_NAME["ssf/max_skip"], [0.25]).value == 25
    clamped = coerce_norm(BY_NAME["delta"], [1.5])
    assert clamped.value == 5.0 and "outside [0, 1]" in clamped.warning
    with pytest.raises(ParamError, match="no /norm variant"):
        coerce_norm(BY_NAME["prompt"], [0.5])


def test_strength_mapping() -> None:
    assert strength_to_t_index(0.35, 2) == (32, 41)
    assert strength_to_t_index(1.0, 4) == (0, 12, 25, 37)
    assert strength_to_t_index(0.0, 1) == (49,)
    assert strength_to_t_index(0.0, 3) == (47, 48, 49)  # capped so three distinct steps fit
    for steps in range(1, 11):
        for s in (0.0, 0.2, 0.5, 0.9, 1.0):
            t = strength_to_t_index(s, steps)
            assert len(t) == steps and list(t) == sorted(set(t)) and t[0] >= 0 and t[-1] <= 49
    # more strength never means less noise
    firsts = [strength_to_t_index(s / 20, 2)[0] for s in range(21)]
    assert firsts == sorted(firsts, reverse=True)
    assert t_index_to_strength((32, 45)) == pytest.approx(1 - 32 / 49, abs=1e-4)


def test_text_args() -> None:
    assert text_args(BY_NAME["t_index_list"], "20, 30 40") == ["20", "30", "40"]
    assert text_args(BY_NAME["prompt_blend"], "a cat:0.7 | a dog: 0.3") == ["a cat", "0.7", "a dog", "0.3"]
    assert text_args(BY_NAME["prompt"], "a: b | c") == ["a: b | c"]
    with pytest.raises(ParamError, match="text:weight"):
        text_args(BY_NAME["prompt_blend"], "no weight")


def test_store_latest_wins_and_reports_changes() -> None:
    store = ParamStore({"guidance": 2.0})
    assert store.get("guidance") == 2.0 and store.get("delta") == 1.0
    for g in (1.0, 3.0, 4.0):
        store.submit("guidance", g)
    v = store.submit("seed", 9)
    pending = store.take_pending()
    assert {k: p.value for k, p in pending.items()} == {"guidance": 4.0, "seed": 9}
    assert pending["seed"].version == v == 4
    assert store.take_pending() == {}
    store.commit("guidance", 4.0)
    store.commit("delta", 1.0)  # unchanged: not reported
    assert store.take_changed() == {"guidance": 4.0}
    assert store.take_changed() == {}
    with pytest.raises(KeyError):
        ParamStore({"model": "x"})


def test_newest_says_pending_until_the_runtime_commits() -> None:
    store = ParamStore({})
    store.submit("guidance", 3.0)
    assert store.newest("guidance") == (3.0, True)
    store.take_pending()  # the runtime is applying it
    assert store.newest("guidance") == (3.0, True) and store.get("guidance") == 1.2
    store.commit("guidance", 3.0)
    assert store.newest("guidance") == (3.0, False)
    store.submit("seed", 5)
    store.take_pending()  # the engine refuses it: never committed
    assert store.latest("seed") == 5
    store.take_pending()  # the next frame boundary
    assert store.newest("seed") == (2, False)
