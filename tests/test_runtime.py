"""The runtime in-process on the tiny model: holding the last frame when the input stops, a
failing and a blocking sink that stall nothing, refused and failing engine calls, mailboxes,
parameters applied between frames."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bridge.config import load_config
from bridge.frames import Frame
from bridge.runtime import Bridge, Mailbox, OutputInfo, in_background
from bridge.transports.base import MissingExtra
from bridge.transports.synthetic import test_pattern as pattern_frame
from tests.conftest import tiny_bridge

SIZE = 64


class GatedSource:
    """The test pattern while `flowing` is set, nothing while it is clear."""

    def __init__(self) -> None:
        self.flowing = threading.Event()
        self.flowing.set()
        self.seq = 0
        self.closed = 0

    def read(self, timeout_s: float) -> Frame | None:
        if not self.flowing.wait(timeout_s):
            return None
        time.sleep(0.01)
        self.seq += 1
        return Frame(pattern_frame(self.seq, SIZE, SIZE), self.seq)

    def close(self) -> None:
        self.closed += 1


class RecordingSink:
    def __init__(self, *, fail: bool = False, block_s: float = 0.0) -> None:
        self.fail, self.block_s = fail, block_s
        self.unblock = threading.Event()  # ends a blocking write early
        self.frames: list[Frame] = []
        self.closed = 0
        self.opens = 0

    def write(self, frame: Frame) -> None:
        if self.block_s:
            self.unblock.wait(self.block_s)
        if self.fail:
            raise OSError("the receiver went away")
        self.frames.append(frame)

    def close(self) -> None:
        self.closed += 1


def _opener(sink: RecordingSink) -> Callable[[], RecordingSink]:
    def reopen() -> RecordingSink:
        sink.opens += 1
        return sink

    return reopen


@contextmanager
def running(
    tiny_pipe: Any, overrides: list[str], sinks: list[tuple[str, RecordingSink]], source: GatedSource
) -> Iterator[tuple[Bridge, list[OutputInfo]]]:
    openers = [(label, _opener(sink)) for label, sink in sinks]
    bridge = tiny_bridge(tiny_pipe, ["osc.enabled=false", *overrides], SIZE, sinks=openers, source=source)
    with in_background(bridge, start_timeout_s=120) as infos:
        yield bridge, infos


def wait_for(condition: Callable[[], bool], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


CONFIG = [f"engine.width={SIZE}", f"engine.height={SIZE}", "runtime.fps=0", "runtime.hold_after_s=0.2"]


def test_holds_the_last_output_when_the_input_stops_and_resumes(tiny_pipe: Any) -> None:
    source, sink = GatedSource(), RecordingSink()
    with running(tiny_pipe, CONFIG, [("rec", sink)], source) as (bridge, infos):
        wait_for(lambda: len(infos) >= 5)
        source.flowing.clear()
        wait_for(lambda: sum(i.kind == "held" for i in infos) >= 5)
        assert bridge.status().mode == "holding"
        held = [i for i in infos if i.kind == "held"]
        last_live = max(i.seq for i in infos if i.kind == "engine")
        assert all(h.input_seq == infos[last_live - 1].input_seq for h in held)
        wait_for(lambda: len(sink.frames) >= len(infos) - 2)
        assert len({f.pixels.tobytes() for f in sink.frames[-3:]}) == 1  # the same picture, repeated
        source.flowing.set()
        n = len(infos)
        wait_for(lambda: any(i.kind == "engine" for i in infos[n:]))
        wait_for(lambda: bridge.status().mode == "live")
    assert source.closed == 1 and sink.closed == 1


def test_failing_and_blocking_sinks_stall_nothing(tiny_pipe: Any) -> None:
    source = GatedSource()
    # the blocking sink's first write lasts until the test ends it, however slow the machine
    good, failing, blocking = RecordingSink(), RecordingSink(fail=True), RecordingSink(block_s=120.0)
    sinks = [("failing", failing), ("blocking", blocking), ("good", good)]
    with running(tiny_pipe, CONFIG, sinks, source) as (bridge, _infos):
        wait_for(lambda: len(good.frames) >= 20)
        assert len(blocking.frames) == 0  # still in its first write
        wait_for(lambda: bridge.status_dict()["outputs"]["blocking"]["blocked_s"] >= 1.0)
        outputs = bridge.status_dict()["outputs"]
        assert outputs["failing"]["failures"] >= 3 and outputs["failing"]["written"] == 0
        assert outputs["failing"]["last_error"] == "output failing: OSError: the receiver went away"
        assert outputs["blocking"]["dropped"] >= 10  # frames replaced while it was busy
        assert outputs["good"]["state"] == "open" and outputs["good"]["failures"] == 0
        wait_for(lambda: "output failing: OSError: the receiver went away" in bridge.status_dict()["error"])
        # three failed writes in a row: the runner closes the sink and opens it again
        wait_for(lambda: failing.opens >= 2)
        blocking.unblock.set()
    assert failing.closed == failing.opens
    assert blocking.closed == good.closed == 1


class HoldingSink(RecordingSink):
    """Keeps its first frame in hand, as a write that blocks does, and notes what it held."""

    def write(self, frame: Frame) -> None:
        if not self.frames:
            self.held = frame.pixels.copy()
            self.unblock.wait(120.0)
        super().write(frame)


def test_a_frame_an_output_holds_is_never_overwritten(tiny_pipe: Any) -> None:
    """The engine hands out uint8 frames from a small host ring; an output that holds one for
    longer than the ring is deep must still see the pixels it was given."""
    source, good, holding = GatedSource(), RecordingSink(), HoldingSink()
    overrides = [*CONFIG, "params.ssf.enabled=false"]  # every frame a new engine frame
    with running(tiny_pipe, overrides, [("holding", holding), ("good", good)], source) as (_, infos):
        wait_for(lambda: sum(info.kind == "engine" for info in infos) >= 24)  # 3 times the ring
        holding.unblock.set()
        wait_for(lambda: len(holding.frames) >= 1)
    assert np.array_equal(holding.frames[0].pixels, holding.held)


class FlakySink(RecordingSink):
    """Fails to open `open_failures` times, then fails `write_failures` writes, then works."""

    def __init__(self, *, open_failures: int = 0, write_failures: int = 0) -> None:
        super().__init__()
        self.open_failures, self.write_failures = open_failures, write_failures

    def opener(self) -> RecordingSink:
        if self.open_failures:
            self.open_failures -= 1
            raise OSError("no such sender yet")
        self.opens += 1
        return self

    def write(self, frame: Frame) -> None:
        if self.write_failures:
            self.write_failures -= 1
            raise OSError("the receiver went away")
        super().write(frame)


def test_a_sink_that_cannot_open_yet_is_retried_and_recovers(tiny_pipe: Any) -> None:
    late, flaky = FlakySink(open_failures=2), FlakySink(write_failures=4)
    sinks = [("late", late.opener), ("flaky", flaky.opener)]
    bridge = tiny_bridge(tiny_pipe, ["osc.enabled=false", *CONFIG], SIZE, sinks=sinks, source=GatedSource())
    with in_background(bridge, start_timeout_s=120):
        assert bridge.status_dict()["outputs"]["late"]["state"] in ("opening", "reopening")
        wait_for(lambda: len(late.frames) >= 3)
        wait_for(lambda: len(flaky.frames) >= 3)
        outputs = bridge.status_dict()["outputs"]
        assert outputs["late"]["state"] == "open" and outputs["late"]["opens"] == 1
        assert outputs["late"]["failures"] == 2  # the two failed opens
        assert outputs["flaky"]["opens"] == 2  # reopened after 3 failed writes in a row
        assert outputs["flaky"]["failures"] == 4
    assert late.closed == 1 and flaky.closed == 2


def test_a_final_error_at_the_first_open_stops_the_start(tiny_pipe: Any) -> None:
    config = load_config(None, ["output.kind=null", "extra_outputs=[]", "osc.enabled=false", *CONFIG])

    def missing() -> RecordingSink:
        raise MissingExtra("NDI needs the 'cyndilib' module")

    bridge = Bridge(config, engine_factory=lambda _cfg: None, sinks=[("ndi", missing)], source=GatedSource())  # type: ignore[arg-type,return-value]
    with pytest.raises(MissingExtra, match="cyndilib"):
        bridge.run(threading.Event())
    assert bridge.status().state == "error"


def test_parameters_apply_between_frames_and_refusals_are_reported(tiny_pipe: Any) -> None:
    source, sink = GatedSource(), RecordingSink()
    with running(tiny_pipe, CONFIG, [("rec", sink)], source) as (bridge, infos):
        wait_for(lambda: len(infos) >= 3)
        version = bridge.store.submit("strength", 1.0)
        wait_for(lambda: any(i.param_version >= version for i in infos))
        carrying = next(i for i in infos if i.param_version >= version)
        assert bridge.store.get("t_index_list") == (0, 25)
        n = len(infos)
        bridge.store.submit("guidance", -3.0)  # past coercion: only a buggy client gets here
        wait_for(lambda: len(infos) >= n + 3)
        assert bridge.store.get("guidance") == 1.2  # refused, unchanged
        assert bridge.status().state == "running"
        assert carrying.kind == "engine"
        assert bridge.submit_text("t_index_list", ["10, 20, 30"]) == ""
        wait_for(lambda: bridge.store.get("t_index_list") == (10, 20, 30))
        assert bridge.store.get("strength") == pytest.approx(1 - 10 / 49, abs=1e-3)
        assert "ascending" in bridge.submit_text("t_index_list", ["30 20"])


def test_freeze_and_bypass(tiny_pipe: Any) -> None:
    source, sink = GatedSource(), RecordingSink()
    with running(tiny_pipe, CONFIG, [("rec", sink)], source) as (bridge, infos):
        wait_for(lambda: len(infos) >= 3)
        bridge.store.submit("bypass", True)
        wait_for(lambda: any(i.kind == "bypass" for i in infos))
        wait_for(
            lambda: (
                len(sink.frames) >= 1
                and np.array_equal(sink.frames[-1].pixels, pattern_frame(sink.frames[-1].seq, SIZE, SIZE))
            )
        )
        bridge.store.submit("bypass", False)
        bridge.store.submit("freeze", True)
        wait_for(lambda: infos[-1].kind == "frozen")
        n = len(sink.frames)
        wait_for(lambda: len(sink.frames) >= n + 3)
        assert len({f.pixels.tobytes() for f in sink.frames[n:]}) == 1
        assert bridge.status().mode == "frozen"


def test_an_engine_fault_repeats_the_last_output_and_recovers(tiny_pipe: Any) -> None:
    source, sink = GatedSource(), RecordingSink()
    with running(tiny_pipe, CONFIG, [("rec", sink)], source) as (bridge, infos):
        wait_for(lambda: len(infos) >= 3)
        calls = {"n": 0}
        driver_engine = bridge.driver.engine
        original = driver_engine.__class__.__call__

        def flaky(self: Any, *args: Any, **kwargs: Any) -> Any:
            calls["n"] += 1
            if calls["n"] <= 2:
                raise RuntimeError("CUDA error: an illegal memory access")
            return original(self, *args, **kwargs)

        n = len(infos)
        driver_engine.__class__.__call__ = flaky
        try:
            wait_for(lambda: calls["n"] >= 4)
            wait_for(lambda: any(i.kind == "engine" for i in infos[n + 2 :]))
        finally:
            driver_engine.__class__.__call__ = original
        assert sum(i.kind == "held" for i in infos[n:]) >= 2
        assert bridge.status().state == "running"


def test_mailbox_keeps_the_latest_and_counts_drops() -> None:
    box: Mailbox[int] = Mailbox()
    assert box.get(0.0) is None
    for i in range(5):
        box.put(i)
    assert box.get(0.0) == 4 and box.dropped == 4
    got: list[int | None] = []
    t = threading.Thread(target=lambda: got.append(box.get(10.0)))
    t.start()
    box.put(9)
    t.join(5)
    assert got == [9]
    box.close()
    assert box.get(10.0) is None  # closed: no waiting


@pytest.mark.skipif(Path("/dev/snd/seq").exists(), reason="asserts a machine without ALSA MIDI")
def test_midi_without_a_midi_subsystem_leaves_the_bridge_running(tiny_pipe: Any) -> None:
    source, sink = GatedSource(), RecordingSink()
    overrides = [*CONFIG, "midi.enabled=true", "midi.mappings=[{param: guidance, cc: 21}]"]
    with running(tiny_pipe, overrides, [("rec", sink)], source) as (bridge, _infos):
        wait_for(lambda: len(sink.frames) >= 5)
        status = bridge.status_dict()
        assert status["midi"]["port"] == "" and status["midi"]["error"].startswith("MIDI: no MIDI subsystem")
        wait_for(lambda: bridge.status_dict()["error"].startswith("MIDI: no MIDI subsystem"))
        assert bridge.status().state == "running"


# ---------------------------------------------------------------------- what reaches the engine
class StillSource(GatedSource):
    """The same picture every time: the similarity filter sees identical frames."""

    def read(self, timeout_s: float) -> Frame | None:
        if not self.flowing.wait(timeout_s):
            return None
        time.sleep(0.01)
        self.seq += 1
        return Frame(pattern_frame(0, SIZE, SIZE), self.seq)


@contextmanager
def engine_bridge(
    tiny_pipe: Any, source: GatedSource, *, cfg_type: str = "self", overrides: tuple[str, ...] = ()
) -> Iterator[tuple[Bridge, list[OutputInfo], Any]]:
    """A bridge on a StreamEngine of the given cfg_type; yields the bridge, its outputs and the engine."""
    from bridge.engine import StreamEngine
    from bridge.runtime import EngineDriver

    base = ["output.kind=null", "extra_outputs=[]", "osc.enabled=false", *CONFIG, *overrides]
    config = load_config(None, base)
    engine = StreamEngine(tiny_pipe, [32, 45], width=SIZE, height=SIZE, cfg_type=cfg_type, similarity_seed=0)
    bridge = Bridge(config, engine_factory=lambda _cfg: EngineDriver(engine), source=source)
    with in_background(bridge, start_timeout_s=120) as infos:
        yield bridge, infos, engine


def applied(bridge: Bridge, infos: list[OutputInfo], **values: Any) -> None:
    """Submit `values` and wait for an output frame made after all of them were applied."""
    versions = [bridge.store.submit(name.replace("__", "/"), value) for name, value in values.items()]
    wait_for(lambda: any(i.param_version >= max(versions) for i in infos))


def test_live_changes_reach_the_engine_not_only_the_store(tiny_pipe: Any) -> None:
    import torch

    with engine_bridge(tiny_pipe, GatedSource(), cfg_type="full") as (bridge, infos, engine):
        wait_for(lambda: len(infos) >= 3)
        applied(bridge, infos, seed=9)
        # the noise the DESIGN names: randn((n*f, 4, H/8, W/8)) from a CPU generator seeded with it
        expected = torch.randn((2, 4, SIZE // 8, SIZE // 8), generator=torch.Generator().manual_seed(9))
        assert torch.equal(engine.init_noise.cpu(), expected) and bridge.store.get("seed") == 9

        applied(bridge, infos, delta=0.3)
        assert engine.delta == pytest.approx(0.3) and engine.guidance_scale == pytest.approx(1.2)
        applied(bridge, infos, guidance=2.5)
        assert engine.guidance_scale == pytest.approx(2.5) and engine.delta == pytest.approx(0.3)

        # full CFG: the UNet's first rows carry the negative prompt, as diffusers' own encoder makes it
        applied(bridge, infos, negative_prompt="blurry, low quality", prompt="a neon city at night")
        device = engine.init_noise.device
        negative = tiny_pipe.encode_prompt("blurry, low quality", device, 1, False)[0]
        positive = tiny_pipe.encode_prompt("a neon city at night", device, 1, False)[0]
        embeds = engine.prepared_unet_inputs.embeds  # (2 uncond + 2 cond, L, D)
        assert torch.allclose(embeds[:2], negative.expand(2, -1, -1), atol=1e-6)
        assert torch.allclose(embeds[2:], positive.expand(2, -1, -1), atol=1e-6)
        assert bridge.store.get("negative_prompt") == "blurry, low quality"


def skip_runs(infos: list[OutputInfo]) -> list[int]:
    """Lengths of the runs of skipped frames between two engine frames."""
    runs, current, started = [], 0, False
    for info in infos:
        if info.kind == "engine":
            if started:
                runs.append(current)
            started, current = True, 0
        elif info.kind == "skipped" and started:
            current += 1
    return runs


def test_max_skip_is_what_the_engine_skips(tiny_pipe: Any) -> None:
    """Identical frames at threshold 0 are always similar enough: the filter skips exactly
    max_skip in a row, then runs the engine (the paper's bound)."""
    with engine_bridge(tiny_pipe, StillSource()) as (bridge, infos, engine):
        wait_for(lambda: len(infos) >= 3)
        for max_skip in (2, 4):
            applied(bridge, infos, ssf__enabled=True, ssf__threshold=0.0, ssf__max_skip=max_skip)
            n = len(infos)
            wait_for(lambda n=n: len(skip_runs(infos[n:])) >= 3)
            assert skip_runs(infos[n:])[:3] == [max_skip] * 3
            assert bridge.store.get("ssf/max_skip") == engine.similarity.max_skip == max_skip


def test_the_store_records_what_the_engine_applied(tiny_pipe: Any, caplog: pytest.LogCaptureFixture) -> None:
    with engine_bridge(tiny_pipe, GatedSource()) as (bridge, infos, engine):
        wait_for(lambda: len(infos) >= 3)
        engine.set_seed = lambda seed: None  # an engine that keeps its seed whatever it is told
        applied(bridge, infos, seed=7)
        assert bridge.store.get("seed") == 2 == engine.current_seed()
        assert "the engine took seed=7 as 2" in caplog.text
        applied(bridge, infos, strength=1.0)
        assert bridge.store.get("t_index_list") == tuple(engine.t_index_list) == (0, 25)
        assert bridge.store.get("strength") == 1.0


def test_the_output_goes_on_while_a_new_prompt_is_encoded(
    tiny_pipe: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The text encoder is held inside its call (as a 5 MB prompt or a long blend would hold
    it): frames keep coming with the old prompt, and the new one lands once it is encoded."""
    encoding, release = threading.Event(), threading.Event()
    original = tiny_pipe.encode_prompt

    def held_encode(*args: Any, **kwargs: Any) -> Any:
        encoding.set()
        assert release.wait(60), "the test never released the encoder"
        return original(*args, **kwargs)

    with engine_bridge(tiny_pipe, GatedSource()) as (bridge, infos, engine):
        wait_for(lambda: len(infos) >= 3)
        old = engine.current_prompt()
        monkeypatch.setattr(tiny_pipe, "encode_prompt", held_encode)
        try:
            version = bridge.store.submit("prompt", "a watercolour harbour")
            assert encoding.wait(30)
            n = len(infos)
            wait_for(lambda: sum(i.kind == "engine" for i in infos[n:]) >= 5)  # not stopped
            assert engine.current_prompt() == old and bridge.store.get("prompt") == old
            assert all(i.param_version < version for i in infos[n:])  # not reported as applied
        finally:
            release.set()
        wait_for(lambda: any(i.param_version >= version for i in infos))
        assert engine.current_prompt() == "a watercolour harbour" == bridge.store.get("prompt")
        assert engine.prompt_cache.misses >= 2  # the start's prompt, then this one: encoded once


def test_engine_faults_switch_the_state_to_error_and_back(tiny_pipe: Any) -> None:
    source, sink = GatedSource(), RecordingSink()
    with running(tiny_pipe, CONFIG, [("rec", sink)], source) as (bridge, infos):
        wait_for(lambda: len(infos) >= 3)
        engine_class = bridge.driver.engine.__class__  # type: ignore[union-attr]
        original = engine_class.__call__
        failing = threading.Event()
        faults = {"n": 0}

        def flaky(self: Any, *args: Any, **kwargs: Any) -> Any:
            if failing.is_set():
                faults["n"] += 1
                raise RuntimeError("CUDA error: an illegal memory access")
            return original(self, *args, **kwargs)

        engine_class.__call__ = flaky
        try:
            failing.set()
            wait_for(lambda: bridge.status().state == "error")
            assert faults["n"] >= 3
            assert bridge.status().error == "engine: RuntimeError: CUDA error: an illegal memory access"
            n = len(infos)
            wait_for(lambda: len(infos) >= n + 3)  # the last output is repeated meanwhile
            assert {i.kind for i in infos[n:]} == {"held"}
            failing.clear()
            wait_for(lambda: bridge.status().state == "running")
            wait_for(lambda: any(i.kind == "engine" for i in infos[n:]))
        finally:
            engine_class.__call__ = original
        assert bridge.status().error == ""


def test_frame_buffer_size_above_one_is_refused_with_the_reason() -> None:
    from bridge.config import ConfigError

    with pytest.raises(
        ConfigError, match=r"engine.frame_buffer_size must be 1 for the live bridge, got 2: .*latency"
    ):
        load_config(None, ["engine.frame_buffer_size=2"])


def test_a_stop_while_the_model_loads_ends_the_start_at_once() -> None:
    """The loader is held (as a download or a model build holds it); stop must not wait for it."""
    loading, release = threading.Event(), threading.Event()

    def slow_loader(_cfg: Any) -> Any:
        loading.set()
        release.wait(60)
        raise RuntimeError("released")

    config = load_config(None, ["output.kind=null", "extra_outputs=[]", "osc.enabled=false", *CONFIG])
    bridge = Bridge(config, engine_factory=slow_loader, source=GatedSource())
    stop = threading.Event()
    thread = threading.Thread(target=bridge.run, args=(stop,))
    thread.start()
    try:
        assert loading.wait(30)
        stopped = time.monotonic()
        stop.set()
        thread.join(10)
        assert not thread.is_alive() and time.monotonic() - stopped < 5.0  # generous; about 0.1 s here
        assert bridge.driver is None and not bridge.ready.is_set()
    finally:
        release.set()


def test_ctrl_c_while_the_model_loads_stops_the_process(tmp_path: Path) -> None:
    """A real `sdbridge run` building the tiny model into an empty cache (tens of seconds on a
    CPU): SIGINT during the load ends the process within a generous bound (it took 22 s)."""
    import signal
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    command = [
        sys.executable,
        "-m",
        "bridge.cli",
        "run",
        "--set",
        "output.kind=null",
        "--set",
        "extra_outputs=[]",
    ]
    command += ["--set", "osc.enabled=false", "--set", f"engine.cache_dir={tmp_path / 'models'}"]
    command += ["--set", "engine.width=64", "--set", "engine.height=64"]
    proc = subprocess.Popen(command, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if "loading model" in line:
                break
        else:
            pytest.fail(f"the bridge never said it was loading the model: {''.join(lines)}")
        threading.Thread(target=lambda: lines.extend(proc.stdout or []), daemon=True).start()
        signalled = time.monotonic()
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=60)
        took = time.monotonic() - signalled
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = "".join(lines)
    if "stopped while the model was loading" not in text:
        pytest.skip(f"the model loaded before the signal arrived; nothing to stop here: {text[-500:]}")
    assert code == 0 and "stopped after 0 frames" in text
    assert took < 5.0, f"took {took:.1f} s after SIGINT (the contract is 2 s)"


def record_states(bridge: Bridge) -> list[str]:
    """The states `bridge` goes through, each change once, in order."""
    states: list[str] = []
    set_status = bridge._set_status

    def spy(**fields: Any) -> None:
        if "state" in fields and (not states or states[-1] != fields["state"]):
            states.append(fields["state"])
        set_status(**fields)

    bridge._set_status = spy  # type: ignore[method-assign]
    return states


def test_a_step_count_change_warms_the_new_layouts_while_the_status_says_warming(tiny_pipe: Any) -> None:
    """cuda_graph (on the stand-in graph backend): the start captures both guidance layouts; a
    step-count change captures the new count with the state `warming`, between frames."""
    from bridge.engine import StreamEngine
    from bridge.runtime import EngineDriver
    from tests.fake_cudagraph import StandInGraphs

    backend = StandInGraphs()
    config = load_config(None, ["output.kind=null", "extra_outputs=[]", "osc.enabled=false", *CONFIG])
    engine = StreamEngine(
        tiny_pipe, [32, 45], width=SIZE, height=SIZE, acceleration="cuda_graph", graph_backend=backend
    )
    bridge = Bridge(config, engine_factory=lambda _cfg: EngineDriver(engine), source=GatedSource())
    states = record_states(bridge)
    with in_background(bridge, start_timeout_s=120) as infos:
        wait_for(lambda: len(infos) >= 2)
        assert len(backend.graphs) == 2  # captured at warm-up: unguided and guided
        assert states == ["loading", "warming", "running"]
        applied(bridge, infos, t_index_list=(10, 20, 30, 40))
        assert len(backend.graphs) == 4
        assert states == ["loading", "warming", "running", "warming", "running"]
        n = len(infos)
        applied(bridge, infos, guidance=0.5)  # a crossing: captured already
        wait_for(lambda: len(infos) >= n + 3)
        assert len(backend.graphs) == 4
        assert bridge.status().state == "running"


def test_a_mid_show_warm_up_that_fails_does_not_stop_the_show(
    tiny_pipe: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A step-count change whose warm-up raises (the exact path itself failed: out of memory,
    say): the failure is logged and counted as an engine fault, the state goes back to
    `running`, and frames go on."""
    from bridge.engine import StreamEngine
    from bridge.runtime import EngineDriver
    from tests.fake_cudagraph import StandInGraphs

    config = load_config(None, ["output.kind=null", "extra_outputs=[]", "osc.enabled=false", *CONFIG])
    engine = StreamEngine(
        tiny_pipe, [32, 45], width=SIZE, height=SIZE, acceleration="cuda_graph", graph_backend=StandInGraphs()
    )
    bridge = Bridge(config, engine_factory=lambda _cfg: EngineDriver(engine), source=GatedSource())
    with caplog.at_level(logging.ERROR), in_background(bridge, start_timeout_s=120) as infos:
        wait_for(lambda: len(infos) >= 2)
        warm_up = engine.warm_up
        failures: list[int] = []

        def fails_once(*examples: Any, **kwargs: Any) -> int:
            if not failures:
                failures.append(1)
                raise RuntimeError("CUDA out of memory while capturing")
            return warm_up(*examples, **kwargs)

        engine.warm_up = fails_once  # type: ignore[method-assign]
        applied(bridge, infos, t_index_list=(10, 20, 30, 40))
        assert failures == [1]
        assert "warming the new layouts failed; frames go on" in caplog.text
        assert "CUDA out of memory while capturing" in caplog.text
        n = len(infos)
        wait_for(lambda: len(infos) >= n + 3)  # the next turn warms again, and it works
        assert bridge.status().state == "running"
        assert bridge.problems() == []  # a good frame cleared the fault


def test_the_engine_is_built_with_every_step_count_to_warm(model_cache: Path) -> None:
    """load_engine: the counts made ready before the show are the table's default (2), the
    start's (3 here) and the config's warm_steps."""
    from bridge.runtime.driver import load_engine

    config = load_config(
        None,
        [
            *CONFIG,
            f"engine.cache_dir={model_cache}",
            "params.t_index_list=[10, 20, 30]",
            "engine.warm_steps=[1, 4]",
        ],
    )
    assert load_engine(config).engine.warm_steps == (1, 2, 3, 4)


def test_a_warm_up_that_keeps_failing_turns_the_state_to_error_and_is_not_retried_every_frame(
    tiny_pipe: Any,
) -> None:
    """The exact path itself fails at the new step count (out of memory at 4 rows, say): the
    warm-up fails once, the frames then fail on their own, and after ENGINE_ERRORS_FOR_STATE
    faults in a row the state is `error` and stays so; warm-up is not tried again on every frame
    (it would flip the state between `warming` and `running` and re-capture each time)."""
    from bridge.engine import StreamEngine
    from bridge.engine.accel import Networks
    from bridge.runtime import EngineDriver
    from bridge.runtime.loop import ENGINE_ERRORS_FOR_STATE
    from tests.fake_cudagraph import StandInGraphs

    class OutOfMemoryAt4Rows(Networks):
        def unet(self, x: Any, *args: Any) -> Any:
            if x.shape[0] == 4:
                raise RuntimeError("CUDA out of memory at 4 rows")
            return super().unet(x, *args)

    config = load_config(None, ["output.kind=null", "extra_outputs=[]", "osc.enabled=false", *CONFIG])
    engine = StreamEngine(
        tiny_pipe,
        [32, 45],
        width=SIZE,
        height=SIZE,
        acceleration="cuda_graph",
        graph_backend=StandInGraphs(),
        networks=OutOfMemoryAt4Rows(tiny_pipe),
    )
    warm_ups: list[int] = []
    warm_up = engine.warm_up

    def counted(*examples: Any, **kwargs: Any) -> int:
        warm_ups.append(1)
        return warm_up(*examples, **kwargs)

    engine.warm_up = counted  # type: ignore[method-assign]
    bridge = Bridge(config, engine_factory=lambda _cfg: EngineDriver(engine), source=GatedSource())
    states = record_states(bridge)
    with in_background(bridge, start_timeout_s=120) as infos:
        wait_for(lambda: len(infos) >= 2)
        started = len(warm_ups)
        bridge.store.submit("t_index_list", (10, 20, 30, 40))
        wait_for(lambda: bridge.status().state == "error")
        failed_frames = bridge._engine_errors
        wait_for(lambda: bridge._engine_errors >= failed_frames + 5)  # frames go on failing
        assert bridge.status().state == "error" and states[-1] == "error"
        assert states.count("warming") == 2  # the start's warm-up and the one mid-show, not one per frame
        assert len(warm_ups) == started + 1
        assert bridge._engine_errors >= ENGINE_ERRORS_FOR_STATE
        assert "CUDA out of memory at 4 rows" in bridge.status_dict()["error"]


def test_a_stop_during_a_mid_show_warm_up_runs_no_further_frame(tiny_pipe: Any) -> None:
    """Ctrl+C while the new layouts warm up: the loop ends at once; a frame would make the
    remaining layouts ready itself (a capture or a compile, a minute on a GPU)."""
    from bridge.engine import StreamEngine
    from bridge.runtime import EngineDriver
    from tests.fake_cudagraph import StandInGraphs

    config = load_config(None, ["output.kind=null", "extra_outputs=[]", "osc.enabled=false", *CONFIG])
    engine = StreamEngine(
        tiny_pipe, [32, 45], width=SIZE, height=SIZE, acceleration="cuda_graph", graph_backend=StandInGraphs()
    )
    stop = threading.Event()
    warm_up = engine.warm_up
    frames_at_stop: list[int] = []

    def interrupted(*examples: Any, **kwargs: Any) -> int:
        if engine.stats.frames:  # mid-show: the stop arrives while this warm-up runs
            stop.set()
            frames_at_stop.append(engine.stats.frames)
            return 0
        return warm_up(*examples, **kwargs)

    engine.warm_up = interrupted  # type: ignore[method-assign]
    bridge = Bridge(config, engine_factory=lambda _cfg: EngineDriver(engine), source=GatedSource())
    thread = threading.Thread(target=bridge.run, args=(stop,))
    thread.start()
    try:
        assert bridge.ready.wait(120)
        wait_for(lambda: engine.stats.frames >= 2)
        bridge.store.submit("t_index_list", (10, 20, 30, 40))
        thread.join(30)
        assert not thread.is_alive()
    finally:
        stop.set()
        thread.join(30)
    assert frames_at_stop and engine.stats.frames == frames_at_stop[0]
