"""MIDI: sequences of real mido messages through the mapper into the parameter store (ranges,
curves, soft takeover, toggles, channels), the learn flow on a message stream, config errors,
and a machine with no MIDI subsystem (this one: no /dev/snd/seq)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import mido
import pytest

from bridge.config import ConfigError, MidiMapping, add_midi_mapping, load_config
from bridge.control.midi import MidiMapper, learn, mapping_yaml
from bridge.params import ParamStore

ROOT = Path(__file__).resolve().parents[1]


def cc(control: int, value: int, channel: int = 0) -> Any:
    return mido.Message("control_change", control=control, value=value, channel=channel)


def note(n: int, velocity: int = 100, channel: int = 0) -> Any:
    return mido.Message("note_on", note=n, velocity=velocity, channel=channel)


def note_off(n: int, channel: int = 0) -> Any:
    return mido.Message("note_off", note=n, velocity=0, channel=channel)


class Applied:
    """A ParamStore whose submissions are applied at once, as the runtime does between frames."""

    def __init__(self) -> None:
        self.store = ParamStore({})
        self.log: list[tuple[str, Any]] = []

    def submit(self, name: str, value: Any) -> None:
        self.store.submit(name, value)
        for key, item in self.store.take_pending().items():
            self.store.commit(key, item.value)
        self.log.append((name, value))

    def mapper(self, *mappings: MidiMapping) -> MidiMapper:
        return MidiMapper(mappings, submit=self.submit, current=self.store.latest)


def test_fader_sweeps_the_range_through_the_curve() -> None:
    s = Applied()
    m = s.mapper(
        MidiMapping(param="guidance", cc=21, min=1.0, max=3.0, takeover="jump"),
        MidiMapping(param="delta", cc=22, curve="exp", takeover="jump"),
        MidiMapping(param="ssf/threshold", cc=23, curve="log", takeover="jump"),
        MidiMapping(param="ssf/max_skip", cc=24, takeover="jump"),
    )
    for value in (0, 127):
        m.handle(cc(21, value))
    assert s.log == [("guidance", 1.0), ("guidance", 3.0)]
    m.handle(cc(22, 64))  # exp: (64/127)^2 of 0..5
    assert s.store.get("delta") == pytest.approx(5 * (64 / 127) ** 2)
    m.handle(cc(23, 32))  # log: sqrt(32/127) of 0..1
    assert s.store.get("ssf/threshold") == pytest.approx((32 / 127) ** 0.5)
    m.handle(cc(24, 64))  # an int parameter gets a whole number
    assert s.store.get("ssf/max_skip") == 50
    assert m.handle(cc(99, 1)) == [] and m.ignored == 1  # an unmapped control


def test_soft_takeover_waits_for_the_fader_to_reach_the_value() -> None:
    s = Applied()
    m = s.mapper(MidiMapping(param="guidance", cc=7))  # 0..10, soft by default; the value is 1.2
    assert m.handle(cc(7, 127)) == []  # the fader is at the top: no jump to 10
    assert m.waiting == {"guidance": 1.2}
    assert m.handle(cc(7, 30)) == []  # 2.36: still above, not crossed
    ((name, value),) = m.handle(cc(7, 10))  # 0.79: crossed 1.2 on the way down, picked up
    assert name == "guidance" and value == pytest.approx(10 * 10 / 127) and m.waiting == {}
    m.handle(cc(7, 20))
    assert s.store.get("guidance") == pytest.approx(10 * 20 / 127)  # now it follows
    s.submit("guidance", 6.0)  # OSC moves the value away from the fader
    assert m.handle(cc(7, 21)) == []  # the fader lets go
    assert m.handle(cc(7, 60)) == []  # 4.72: below 6, not there yet
    assert m.handle(cc(7, 80)) != []  # 6.30: crossed 6.0, picked up again
    assert s.store.get("guidance") == pytest.approx(10 * 80 / 127)


def test_soft_takeover_picks_up_near_the_value() -> None:
    s = Applied()
    m = s.mapper(MidiMapping(param="delta", cc=1))  # delta 1.0 of 0..5: cc 25 is 0.98, within 2 %
    assert m.handle(cc(1, 25)) == [("delta", pytest.approx(5 * 25 / 127))]


def test_pads_toggle_and_momentary_and_cc_buttons() -> None:
    s = Applied()
    m = s.mapper(
        MidiMapping(param="freeze", note=36),
        MidiMapping(param="bypass", note=37, mode="momentary"),
        MidiMapping(param="ssf/enabled", cc=64),  # a sustain pedal or a CC button
    )
    m.handle(note(36))
    m.handle(note_off(36))
    assert s.store.get("freeze") is True
    m.handle(note(36))
    m.handle(note(36, velocity=0))  # note_on with velocity 0 is a release
    assert s.store.get("freeze") is False
    m.handle(note(37))
    assert s.store.get("bypass") is True
    m.handle(note_off(37))
    assert s.store.get("bypass") is False
    enabled = s.store.get("ssf/enabled")
    m.handle(cc(64, 127))
    m.handle(cc(64, 127))  # held: no second toggle
    m.handle(cc(64, 0))
    assert s.store.get("ssf/enabled") is (not enabled)


def test_channels() -> None:
    s = Applied()
    m = s.mapper(MidiMapping(param="guidance", cc=7, channel=2, takeover="jump"))
    assert m.handle(cc(7, 127, channel=0)) == []  # channel 1 on the controller
    assert m.handle(cc(7, 127, channel=1)) == [("guidance", 10.0)]  # channel 2


@pytest.mark.parametrize(
    "entry,message",
    [
        (
            "{param: prompt, cc: 1}",
            "midi.mappings.0.param 'prompt' is a string; MIDI drives numbers and on/off",
        ),
        (
            "{param: guidance, note: 36}",
            "midi.mappings.0: a note cannot sweep 'guidance'; map a fader or knob (cc) to it",
        ),
        ("{param: guidance, cc: 1, note: 2}", "midi.mappings.0 needs exactly one of cc or note (0..127)"),
        (
            "{param: guidance, cc: 1, curve: expo}",
            "midi.mappings.0.curve must be one of linear, exp, log, got 'expo'",
        ),
        ("{param: guidance, cc: 200}", "midi.mappings.0.cc must be within 0..127, got 200"),
        ("{param: guidance, cc: 1, min: 3, max: 1}", "midi.mappings.0: min must be below max, got 3..1"),
        (
            "{param: guidanse, cc: 1}",
            "midi.mappings.0.param 'guidanse' is not a live numeric or on/off parameter",
        ),
        ("{cc: 1}", "midi.mappings.0 needs 'param'"),
    ],
)
def test_bad_mappings_name_the_key(entry: str, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_config(None, [f"midi.mappings=[{entry}]"])
    assert message in str(error.value)


def test_learn_takes_the_first_control_that_moves() -> None:
    stream = [
        mido.Message("clock"),
        mido.Message("active_sensing") if hasattr(mido, "Message") else None,
        note(40, channel=2),  # a pad: guidance needs a fader, so it is skipped
        cc(21, 90, channel=2),
        cc(22, 10),
    ]
    mapping = learn([m for m in stream if m is not None], "guidance")
    assert mapping == MidiMapping(param="guidance", cc=21, channel=3)
    assert mapping_yaml(mapping) == "{param: guidance, cc: 21, channel: 3}"
    assert learn([mido.Message("clock"), note(36, channel=9)], "freeze") == MidiMapping(
        param="freeze", note=36, channel=10
    )
    with pytest.raises(TimeoutError, match="no control moved within 5 s"):
        learn([mido.Message("clock")], "guidance", timeout_hint=" within 5 s")
    with pytest.raises(ValueError, match="'prompt' cannot be mapped to MIDI"):
        learn([], "prompt")


def test_learned_mappings_are_written_into_the_config(tmp_path: Path) -> None:
    path = tmp_path / "show.yaml"
    path.write_text("# my show\nparams:\n  prompt: neon city  # opening look\n")
    said = add_midi_mapping(path, MidiMapping(param="guidance", cc=21, channel=3))
    assert said == f"added a midi section to {path}"
    text = path.read_text()
    assert text.startswith("# my show\nparams:\n  prompt: neon city  # opening look\n")  # kept
    config = load_config(path)
    assert config.midi.enabled and config.midi.mappings == (MidiMapping(param="guidance", cc=21, channel=3),)
    said = add_midi_mapping(path, MidiMapping(param="freeze", note=36))
    assert "rewritten" in said
    add_midi_mapping(path, MidiMapping(param="guidance", cc=7))  # re-learning replaces
    mappings = load_config(path).midi.mappings
    assert mappings == (MidiMapping(param="freeze", note=36), MidiMapping(param="guidance", cc=7))
    assert load_config(path).params["prompt"] == "neon city"


HEADLESS = not Path("/dev/snd/seq").exists()


@pytest.mark.skipif(not (HEADLESS and sys.platform == "linux"), reason="asserts a machine without ALSA MIDI")
def test_midi_learn_without_a_midi_subsystem_says_so() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bridge.cli", "midi-learn", "guidance", "--timeout", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "sdbridge midi-learn: error: no MIDI subsystem on this machine (SystemError: " in done.stderr
    assert "the ALSA sequencer (/dev/snd/seq) is needed" in done.stderr
