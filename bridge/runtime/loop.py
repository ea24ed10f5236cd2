"""The loop: the `Bridge` that wires source -> engine -> sinks and parameters -> engine, and
runs the engine loop in the calling thread.

Threads: one capture thread per source, the engine loop (the caller of `Bridge.run`), one
thread per sink, and the OSC server and status threads. Frames cross threads through one-slot
latest-wins `Mailbox`es, so a slow stage drops stale frames (counted) instead of queueing them.
"""

from __future__ import annotations

import functools
import logging
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from bridge.config import BridgeConfig
from bridge.control.osc import OscControl
from bridge.control.status import Status
from bridge.frames import Frame, fit
from bridge.params import BY_NAME, ParamError, ParamStore, coerce, cut, table, text_args
from bridge.runtime.capture import CaptureRunner
from bridge.runtime.controls import Controls
from bridge.runtime.driver import EngineDriver, initial_values, load_engine
from bridge.runtime.live import LiveValues
from bridge.runtime.mailbox import Mailbox
from bridge.runtime.sinks import SINK_OPEN_WAIT_S, SinkRunner, sink_label, sink_problem
from bridge.runtime.status import OutputInfo, OutputRecord, dropped_at
from bridge.transports.base import Sink, SinkContext, Source
from bridge.transports.registry import open_sink, open_source, prepare_media

log = logging.getLogger(__name__)

ENGINE_ERRORS_FOR_STATE = 3  # failed engine calls in a row before the state turns "error"
LOAD_CANCEL_WAIT_S = 1.0  # how long a stop during the load waits for a cancelled engine build to end


class Bridge:
    """The live bridge. `run(stop)` blocks in the calling thread (the engine loop) until `stop`
    is set, then shuts everything down in order: source, sinks (reverse open order), status,
    OSC. `engine_factory`, `sinks` and `source` let tests and the benchmark bring a prepared
    engine, extra sinks as (label, opener) pairs, and their own source (then `input` in the
    config is not opened)."""

    def __init__(
        self,
        config: BridgeConfig,
        *,
        engine_factory: Callable[[BridgeConfig], EngineDriver] | None = None,
        sinks: Sequence[tuple[str, Callable[[], Sink]]] = (),
        source: Source | None = None,
    ) -> None:
        self.config = config
        self.store = ParamStore(initial_values(config))
        # Set when a stop comes during the load: it ends an engine build (a TensorRT build
        # runs for minutes in a child process) instead of leaving it running.
        self._load_cancel = threading.Event()
        self._engine_factory = engine_factory or functools.partial(load_engine, cancel=self._load_cancel)
        self._extra_sinks = list(sinks)
        self._source = source
        self._status = Status()
        self._status_lock = threading.Lock()
        self._observers: list[Callable[[Frame, OutputInfo], None]] = []
        self.sinks: list[SinkRunner] = []
        self.capture: CaptureRunner | None = None
        self.driver: EngineDriver | None = None
        self.controls = Controls(config, self.store, status=self.status)
        self.ready = threading.Event()  # set once the state is "running"
        self.live: LiveValues | None = None  # made once the engine is prepared
        self._in_box: Mailbox[Frame] = Mailbox()
        self._record = OutputRecord()
        self._engine_errors = 0  # engine calls failed in a row
        self._engine_error = ""  # the last one's message, "" once a call succeeds again
        self._out_seq = 0

    @property
    def control(self) -> OscControl | None:
        """The OSC router (its counters), None while OSC is off or not started."""
        return self.controls.control

    @property
    def midi_error(self) -> str:
        """Why MIDI is not running, "" when it is (or is off)."""
        return self.controls.midi_error

    # ------------------------------------------------------------------ status
    def on_output(self, observer: Callable[[Frame, OutputInfo], None]) -> None:
        """Call `observer(frame, info)` from the engine loop for every output frame."""
        self._observers.append(observer)

    def status(self) -> Status:
        with self._status_lock:
            return self._status

    def _set_status(self, **changes: Any) -> None:
        with self._status_lock:
            before, self._status = self._status, replace(self._status, **changes)
        if any(getattr(before, key) != getattr(self._status, key) for key in ("state", "mode", "error")):
            self.controls.poke()  # news a show needs at once, not at the next interval

    def problems(self) -> list[tuple[str, str]]:
        """Every current problem as (source, message), the most serious first: the engine,
        then each output, the input, MIDI. Each source's message is cleared by that source
        when it recovers (a write that works, a read that works, an engine call that works)."""
        found = [("engine", self._engine_error)]
        if self.driver is not None:
            found.append(("engine", self.driver.engine.acceleration_fallback))
        found += [(f"output {s.label}", sink_problem(s)) for s in self.sinks]
        if self.capture is not None:
            found += [("input", self.capture.last_error), ("input", self.capture.waiting())]
        found.append(("midi", self.controls.midi_error))
        return [(source, message) for source, message in found if message]

    def _refresh_status(self) -> None:
        problems = self.problems()
        control_error = self.controls.recent_error()
        slots = [("input", self._in_box.dropped), *((s.label, s.box.dropped) for s in self.sinks)]
        self._set_status(
            **self._record.figures(time.perf_counter()),
            dropped=sum(count for _, count in slots),
            dropped_at=dropped_at(slots),
            error=problems[0][1] if problems else control_error,
            control_error=control_error,
        )

    def status_dict(self) -> dict[str, Any]:
        """Status and live values as JSON-able data (the preview page's /status)."""
        data: dict[str, Any] = dict(vars(self.status()))
        values = self.store.snapshot()
        data["params"] = {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}
        data["problems"] = [{"source": source, "error": message} for source, message in self.problems()]
        if self.controls.control is not None:
            data["osc"] = self.controls.control.counters.as_dict()
        data["outputs"] = {
            s.label: {
                "state": s.state,
                "written": s.written,
                "failures": s.failures,
                "dropped": s.box.dropped,
                "opens": s.opens,
                "write_ms": round(statistics.median(s.write_ms), 3) if s.write_ms else 0.0,
                "blocked_s": round(s.blocked_s(), 2),
                "last_error": s.last_error,
            }
            for s in self.sinks
        }
        if self.config.midi.enabled:
            data["midi"] = self.controls.midi_dict()
        if self.capture is not None:
            data["input"] = {
                "frames": self.capture.frames,
                "dropped": self._in_box.dropped,
                "failures": self.capture.failures,
                "waiting": self.capture.waiting(),
                "last_error": self.capture.last_error,
            }
        return data

    def submit_text(self, name: str, raw: Sequence[str]) -> str:
        """A parameter change from a form: "" when queued, else the reason it was refused."""
        param = BY_NAME.get(name)
        if param is None:
            return f"no parameter {name!r}"
        try:
            args: list[Any] = []
            for item in raw:
                args += text_args(param, item)
            coerced = coerce(param, args)
        except ParamError as exc:
            return str(exc)
        self.store.submit(name, coerced.value)
        return ""

    # ------------------------------------------------------------------ lifecycle
    def _open_sinks(self) -> None:
        """Open every output on its own thread; a final error (a missing library, the wrong
        OS, a bad setting) stops the start, any other failure is retried in the background."""
        e = self.config.engine
        ctx = SinkContext(
            width=e.width,
            height=e.height,
            fps=self.config.runtime.fps,
            status=self.status_dict,
            submit=self.submit_text,
            params=table(),
        )
        openers: list[tuple[str, Callable[[], Sink]]] = [
            (sink_label(i, cfg), functools.partial(open_sink, cfg, ctx))
            for i, cfg in enumerate(self.config.outputs)
        ]
        for label, opener in [*openers, *self._extra_sinks]:
            self.sinks.append(SinkRunner(label, opener))
        for runner in self.sinks:
            runner.wait_open(SINK_OPEN_WAIT_S)

    def check_media(self) -> None:
        """Runs before the outputs open and the engine loads: the place for every check of the
        input and outputs that needs no open, so that a mistake (a missing image file or camera)
        fails in a second rather than after a model load of a minute. Today it applies the
        process-wide media settings (`registry.prepare_media`). Raises with the reason when the
        bridge cannot run this config."""
        prepare_media(self.config.input, self.config.outputs)

    def run(self, stop: threading.Event) -> None:
        """Run until `stop` is set. Raises (after cleaning up) when the bridge cannot start.
        A stop while the model loads ends the start at once (see `_load`)."""
        self._load_cancel.clear()  # a stop of an earlier run does not cancel this one's load
        try:
            self._set_status(state="loading")
            self.check_media()
            self.controls.start()
            self._open_sinks()
            driver = self._load(stop)
            if driver is None:
                return
            self.driver = driver
            live = self.live = LiveValues(self.store, self.controls, driver)
            e = self.config.engine
            source = self._source or open_source(self.config.input, width=e.width, height=e.height)
            self.capture = CaptureRunner(source, self._in_box)
            self._set_status(state="warming")
            if not self._warm_up(driver, stop):
                return
            self._set_status(state="running")
            self.ready.set()
            self._loop(driver, live, stop)
        except BaseException:
            self._set_status(state="error")
            raise
        finally:
            self._shutdown()

    def _load(self, stop: threading.Event) -> EngineDriver | None:
        """Build and prepare the engine on a thread of its own while this one watches `stop`:
        a load takes seconds to minutes, mostly inside libraries that never look at a stop
        flag, and Ctrl+C must end the bridge within 2 s. Returns None when stopped first. An
        engine build is told to stop (`_load_cancel`: its child process is terminated) and given
        LOAD_CANCEL_WAIT_S to end; any other abandoned load runs on to its end on its daemon
        thread (the CLI's process exits without waiting for it)."""
        done = threading.Event()
        result: list[EngineDriver] = []
        errors: list[BaseException] = []

        def load() -> None:
            try:
                driver = self._engine_factory(self.config)
                driver.prepare(self.store.snapshot())
                result.append(driver)
            except BaseException as exc:
                errors.append(exc)
            finally:
                done.set()

        threading.Thread(target=load, name="engine-load", daemon=True).start()
        while not done.wait(0.05):
            if stop.is_set():
                log.warning("stopped while the model was loading")
                self._load_cancel.set()
                done.wait(LOAD_CANCEL_WAIT_S)
                return None
        if errors:
            raise errors[0]
        return result[0]

    def _warm_up(self, driver: EngineDriver, stop: threading.Event) -> bool:
        """The warm-up frames; False when `stop` came first."""
        e = self.config.engine
        blank = np.zeros((e.height, e.width, 4), np.uint8)
        ready = driver.engine.warm_up(blank, stop=stop.is_set)  # captures or compiles every reachable layout
        if stop.is_set():
            return False
        if ready:
            log.info("warm-up made %d layout(s) ready (acceleration %s)", ready, e.acceleration)
        for _ in range(self.config.runtime.warmup_frames):
            if stop.is_set():
                return False
            driver.engine(blank, output_type="uint8")
        driver.engine.similarity.reset()
        return True

    def _warm_mid_show(self, engine: Any, stop: threading.Event) -> None:
        """New layouts after a live step-count change, while the status says `warming`. A layout
        that fails falls back inside the engine; a failure of the exact path is reported as a
        frame's would be, and the show goes on (the frames then say whether it still fails)."""
        self._set_status(state="warming")
        started = time.perf_counter()
        try:
            engine.warm_up(stop=stop.is_set)
        except Exception as exc:  # counted as a failed engine call: the next good frame clears it
            log.exception("warming the new layouts failed; frames go on")
            self._engine_fault(f"engine: warming the new layouts failed: {type(exc).__name__}: {exc}")
        else:
            log.info("warmed the new layouts in %.1f s", time.perf_counter() - started)
        self._set_status(state="error" if self._engine_errors >= ENGINE_ERRORS_FOR_STATE else "running")
        self._refresh_status()

    def _engine_fault(self, message: str) -> None:
        """One more failed engine call (a frame or a warm-up) in a row; the state turns `error`
        at ENGINE_ERRORS_FOR_STATE of them in a row, until a frame works again."""
        self._engine_errors += 1
        self._engine_error = cut(message, 300)
        if self._engine_errors >= ENGINE_ERRORS_FOR_STATE and self.status().state != "error":
            self._set_status(state="error")
            self._refresh_status()

    def _shutdown(self) -> None:
        started = time.perf_counter()
        if self.capture is not None:
            self.capture.stop(0.5)
        self._in_box.close()
        if self.live is not None:
            self.live.close()
        for runner in reversed(self.sinks):
            runner.stop(0.5)
        self.controls.close()
        log.info("shut down in %.2f s", time.perf_counter() - started)

    # ------------------------------------------------------------------ the engine loop
    def _loop(self, driver: EngineDriver, live: LiveValues, stop: threading.Event) -> None:
        from bridge.transports.synthetic import Pacer

        rt = self.config.runtime
        e = self.config.engine
        pacer = Pacer(rt.fps)
        hold_period_s = 1.0 / (rt.fps or 30.0)
        last_out: Frame | None = None
        last_input_t = time.perf_counter()
        next_status = 0.0
        engine = driver.engine
        while not stop.is_set():
            frame = self._in_box.get(min(hold_period_s, 0.1))
            now = time.perf_counter()
            if frame is None:
                held = last_out is not None and now - last_input_t >= rt.hold_after_s
                if self.status().mode != "holding" and held:
                    log.warning("the input stopped delivering; holding the last output")
                if held and last_out is not None and pacer.wait(0.0):
                    self._set_status(mode="holding")
                    self._emit(last_out, "held", now, 0.0)
                if now >= next_status:
                    self._refresh_status()
                    next_status = now + 0.25
                continue
            if self.status().mode == "holding":
                log.warning("the input is back")
            last_input_t = now
            live.apply_pending()
            # A step-count change: new layouts to capture or compile. Not while engine calls
            # fail: a failed warm-up is not retried every frame; the frames are tried as they are.
            if engine.needs_warm_up and not self._engine_errors:
                self._warm_mid_show(engine, stop)
                if stop.is_set():
                    break  # Ctrl+C during the warm-up: no frame that would make the rest ready itself
            mode = "frozen" if live.freeze else "bypass" if live.bypass else "live"
            if mode != self.status().mode:
                self._set_status(mode=mode)
            t_start = time.perf_counter()
            engine_ms = 0.0
            if mode == "frozen" and last_out is not None:
                out, kind = last_out.pixels, "frozen"
            elif mode == "bypass":
                out, kind = fit(frame.pixels, e.width, e.height), "bypass"
            else:
                skipped_before = engine.stats.skipped
                try:
                    out = engine(fit(frame.pixels, e.width, e.height), output_type="uint8")
                except Exception as exc:  # the show goes on: keep the last output, report the fault
                    log.exception("engine call failed; repeating the last output")
                    self._engine_fault(f"engine: {type(exc).__name__}: {exc}")
                    if last_out is None:
                        continue
                    out, kind = last_out.pixels, "held"
                else:
                    if self._engine_errors:
                        self._engine_errors, self._engine_error = 0, ""
                        self._set_status(state="running")
                        self._refresh_status()
                    engine_ms = 1000 * (time.perf_counter() - t_start)
                    kind = "skipped" if engine.stats.skipped > skipped_before else "engine"
                    # The engine's uint8 frame is a slot of its host ring, written again a few
                    # frames later; an output may hold a frame longer than that (a write that
                    # blocks), so the outputs get the bridge's own copy.
                    out = out.copy()
            # an output frame keeps the seq and capture time of the input it was made from
            last_out = Frame(out, frame.seq, frame.t_capture)
            pacer.wait(hold_period_s * 4)  # pace the output, never waiting unboundedly
            self._emit(last_out, kind, t_start, engine_ms)
            if time.perf_counter() >= next_status:
                self._refresh_status()
                next_status = time.perf_counter() + 0.25

    def _emit(self, frame: Frame, kind: str, t_start: float, engine_ms: float) -> None:
        t_emit = time.perf_counter()
        for runner in self.sinks:
            runner.box.put(frame)
        self._out_seq += 1
        version = self.live.version_applied() if self.live is not None else 0
        info = OutputInfo(
            self._out_seq, frame.seq, kind, frame.t_capture, t_start, t_emit, engine_ms, version
        )
        self._record.add(info)
        self._set_status(frames=self._status.frames + 1)
        for observer in self._observers:
            observer(frame, info)
