"""Status that tells the truth: fps below 1 frame/s, latency from engine frames only, where
frames were dropped, and errors that belong to their source and clear when it recovers."""

from __future__ import annotations

import socket
import statistics
import time
from typing import Any

import pytest

from bridge.control.osc import encode
from bridge.frames import Frame
from bridge.runtime import in_background
from bridge.runtime.status import output_fps
from bridge.transports.synthetic import test_pattern as pattern_frame
from tests.conftest import tiny_bridge
from tests.test_runtime import CONFIG, SIZE, FlakySink, GatedSource, RecordingSink, running, wait_for


def test_fps_is_right_from_a_tenth_of_a_frame_per_second() -> None:
    # a frame every 10 s: any window shorter than 10 s holds one frame, and a 1 s one read 0
    tenth = [0.0, 10.0, 20.0, 30.0]
    assert output_fps(tenth, now=35.0) == pytest.approx(0.1)
    assert output_fps([0.0, 2.0, 4.0], now=4.5) == pytest.approx(0.5)
    thirty = [i / 30 for i in range(90)]
    assert output_fps(thirty, now=thirty[-1] + 0.01) == pytest.approx(30.0)
    # the output stops: the figure falls with the silence, and reads 0 once it is 20 s old
    assert output_fps(thirty, now=thirty[-1] + 1.0) == pytest.approx(1.0)
    assert output_fps(tenth, now=30.0 + 40.0) == 0.0
    assert output_fps([5.0], now=6.0) == 0.0


class SlowSource(GatedSource):
    """A frame every `period_s` (a slideshow, a stalled camera)."""

    def __init__(self, period_s: float) -> None:
        super().__init__()
        self.period_s = period_s
        self._next = 0.0

    def read(self, timeout_s: float) -> Frame | None:
        wait = self._next - time.monotonic()
        if wait > timeout_s:
            time.sleep(timeout_s)
            return None
        time.sleep(max(wait, 0.0))
        self._next = time.monotonic() + self.period_s
        self.seq += 1
        return Frame(pattern_frame(self.seq, SIZE, SIZE), self.seq)


def test_fps_below_one_frame_per_second_in_a_running_bridge(tiny_pipe: Any) -> None:
    overrides = [*CONFIG, "runtime.hold_after_s=30"]  # no held frames: only the slow input's own
    with running(tiny_pipe, overrides, [("rec", RecordingSink())], SlowSource(1.5)) as (bridge, infos):
        wait_for(lambda: len(infos) >= 4)
        fps = bridge.status().fps
        assert 0.4 <= fps <= 0.9, fps  # about 0.67; a 1 s window reads 0.0


def engine_latency(infos: list[Any]) -> float:
    """The median capture-to-output time of the last 60 engine frames, from the frames' own times."""
    engine = [i for i in infos if i.kind == "engine"][-60:]
    return round(statistics.median(1000 * (i.t_emit - i.t_capture) for i in engine), 2)


@pytest.mark.parametrize("switch", ["bypass", "freeze"])
def test_latency_comes_from_engine_frames_only(tiny_pipe: Any, switch: str) -> None:
    with running(tiny_pipe, CONFIG, [("rec", RecordingSink())], GatedSource()) as (bridge, infos):
        wait_for(lambda: len(infos) >= 10)
        bridge.store.submit(switch, True)
        other = "bypass" if switch == "bypass" else "frozen"
        wait_for(lambda: sum(i.kind == other for i in infos) >= 70)  # more than the old 60-frame window
        wait_for(lambda: bridge.status().latency_age_s >= 0.5)
        status = bridge.status()
        assert status.latency_ms == engine_latency(infos) > 0.0  # not the cost of no work, nor 0.0
        age = status.latency_age_s
        wait_for(lambda: bridge.status().latency_age_s >= age + 0.5)  # it says how old the figure is
        bridge.store.submit(switch, False)
        wait_for(lambda: bridge.status().latency_age_s < 0.5)


def _dropped_counts(status: Any) -> dict[str, int]:
    if not status.dropped_at:
        return {}
    return {label: int(n) for label, n in (part.rsplit(" ", 1) for part in status.dropped_at.split(", "))}


def test_dropped_says_which_slot_dropped(tiny_pipe: Any) -> None:
    good, blocking = RecordingSink(), RecordingSink(block_s=2.0)
    with running(tiny_pipe, CONFIG, [("good", good), ("blocking", blocking)], GatedSource()) as (bridge, _):
        wait_for(lambda: bridge.status_dict()["outputs"]["blocking"]["dropped"] >= 5)
        # The status is a snapshot refreshed by the loop, behind the sinks' live counters: wait
        # for a snapshot that has seen the drops, then read everything from that one snapshot.
        wait_for(lambda: _dropped_counts(bridge.status()).get("blocking", 0) >= 5)
        status = bridge.status()  # one snapshot: the slots and the total agree
        counts = _dropped_counts(status)
        assert counts["blocking"] >= 5 and set(counts) <= {"input", "good", "blocking"}
        assert sum(counts.values()) == status.dropped


def test_a_reopened_output_drops_its_old_error(tiny_pipe: Any) -> None:
    late = FlakySink(open_failures=2)
    bridge = tiny_bridge(
        tiny_pipe, ["osc.enabled=false", *CONFIG], SIZE, sinks=[("late", late.opener)], source=GatedSource()
    )
    with in_background(bridge, start_timeout_s=120):
        wait_for(lambda: bridge.status().error.startswith("output late: OSError: no such sender yet"))
        wait_for(lambda: len(late.frames) >= 3)
        wait_for(lambda: bridge.status().error == "")
        assert bridge.status_dict()["outputs"]["late"]["last_error"] == ""
        assert bridge.status_dict()["outputs"]["late"]["failures"] == 2  # the count is kept
        assert bridge.status_dict()["problems"] == []


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_an_osc_mistake_is_shown_briefly_and_never_hides_a_down_output(tiny_pipe: Any) -> None:
    port = free_udp_port()
    overrides = [*CONFIG, "osc.enabled=true", f"osc.port={port}", "osc.status_targets=[]"]
    failing = RecordingSink(fail=True)
    with running(tiny_pipe, overrides, [("failing", failing), ("ok", RecordingSink())], GatedSource()) as (
        bridge,
        _,
    ):
        wait_for(lambda: bridge.status().error.startswith("output failing: OSError"))
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.sendto(encode("/sd/get", ["nosuch"]), ("127.0.0.1", port))
            client.settimeout(5)
            reply = client.recvfrom(65536)[0]
        assert reply.startswith(b"/sd/error")  # the sender hears of it
        wait_for(lambda: "no parameter 'nosuch'" in bridge.status().control_error)
        status = bridge.status()
        assert status.error.startswith("output failing: OSError")  # the down output stays in front
        assert status.state == "running"
        assert {p["source"] for p in bridge.status_dict()["problems"]} == {"output failing"}
        wait_for(lambda: bridge.status().control_error == "", timeout_s=15)  # shown for a few seconds


def test_an_osc_mistake_alone_is_the_error_for_a_few_seconds(tiny_pipe: Any) -> None:
    port = free_udp_port()
    overrides = [*CONFIG, "osc.enabled=true", f"osc.port={port}", "osc.status_targets=[]"]
    with running(tiny_pipe, overrides, [("ok", RecordingSink())], GatedSource()) as (bridge, _):
        wait_for(lambda: bridge.status().frames >= 3)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.sendto(encode("/sd/get", ["nosuch"]), ("127.0.0.1", port))
            shown = time.monotonic()
            wait_for(lambda: "/sd/get: no parameter 'nosuch'" in bridge.status().error)
            client.sendto(encode("/sd/guidance", [2.0]), ("127.0.0.1", port))  # valid traffic
        wait_for(lambda: bridge.status().error == "", timeout_s=15)
        assert time.monotonic() - shown >= 4.0  # shown for its few seconds, not cleared by chance
        assert bridge.status().state == "running" and bridge.status().control_error == ""


def test_rate_limited_log_keeps_a_bounded_table(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from bridge.control.status import RateLimitedLog

    limited = RateLimitedLog(logging.getLogger("test.ratelimit"), interval_s=60.0, max_keys=8)
    with caplog.at_level(logging.WARNING, logger="test.ratelimit"):
        for i in range(20_000):
            limited.warning(f"unknown:/x/{i}", f"OSC to unknown address '/x/{i}'")
    assert len(caplog.records) == 9  # 8 keys of their own, then one line for all the others
    assert len(limited._last) == 9 and len(limited._held) <= 9
