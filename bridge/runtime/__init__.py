"""The one place that wires sources -> engine -> sinks, and parameters -> engine.

One module per role: `mailbox` (the latest-wins hand-over), `sinks` and `capture` (the runners
that own an output or the input on their own thread), `driver` (the engine: loading it and
applying live values), `live` (submitted values applied between frames, committed as the
engine holds them), `encoding` (new prompts encoded off the loop), `status` (what each output
frame was and the figures made from it), `controls` (OSC, OSCQuery and MIDI start-up), `loop`
(the `Bridge` and its engine loop) and `background` (a bridge on a thread of its own).
"""

from bridge.runtime.background import in_background
from bridge.runtime.capture import CaptureRunner
from bridge.runtime.controls import Controls
from bridge.runtime.driver import DEFAULT_T_INDEX, EngineDriver, initial_values, load_engine
from bridge.runtime.loop import Bridge
from bridge.runtime.mailbox import Mailbox
from bridge.runtime.sinks import FINAL_ERRORS, SINK_OPEN_WAIT_S, SinkRunner
from bridge.runtime.status import OutputInfo

__all__ = [
    "DEFAULT_T_INDEX",
    "FINAL_ERRORS",
    "SINK_OPEN_WAIT_S",
    "Bridge",
    "CaptureRunner",
    "Controls",
    "EngineDriver",
    "Mailbox",
    "OutputInfo",
    "SinkRunner",
    "in_background",
    "initial_values",
    "load_engine",
]
