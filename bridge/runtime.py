"""The one place that wires sources -> engine -> sinks, and parameters -> engine.

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
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np

from bridge.config import BridgeConfig, SinkConfig
from bridge.control.osc import OscControl, OscServer, StatusPublisher, parse_target
from bridge.control.status import RateLimitedLog, Status
from bridge.frames import Frame, fit
from bridge.params import (
    BY_NAME,
    LIVE,
    ParamError,
    ParamStore,
    coerce,
    strength_to_t_index,
    t_index_to_strength,
    table,
    text_args,
)
from bridge.transports.base import MissingExtra, Sink, SinkContext, Source, TransportUnavailable
from bridge.transports.registry import open_sink, open_source, prepare_media

log = logging.getLogger(__name__)
T = TypeVar("T")

# How long the start waits for each output's first open (a virtual camera or an NDI sender
# takes a moment); one still opening after this is reported and keeps trying.
SINK_OPEN_WAIT_S = 10.0


class Mailbox(Generic[T]):
    """A one-slot, latest-wins hand-over between two threads. `put` never blocks; an item
    replaced before anyone took it counts as dropped."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._item: T | None = None
        self._closed = False
        self.dropped = 0

    def put(self, item: T) -> None:
        with self._cond:
            if self._item is not None:
                self.dropped += 1
            self._item = item
            self._cond.notify()

    def get(self, timeout_s: float) -> T | None:
        """The newest item, or None after `timeout_s` seconds or once closed."""
        with self._cond:
            if self._item is None and not self._closed:
                self._cond.wait(timeout_s)
            item, self._item = self._item, None
            return item

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


@dataclass(frozen=True)
class OutputInfo:
    """What the engine loop knows about each output frame (for `on_output` observers)."""

    seq: int  # output counter, 1, 2, 3, ...
    input_seq: int  # seq of the input frame it was made from (held/frozen: the original's)
    kind: str  # engine | skipped | bypass | frozen | held
    t_capture: float  # perf_counter of the input it came from (held/frozen: the original input)
    t_start: float  # perf_counter when the engine loop started on it
    t_emit: float  # perf_counter when it was handed to the sinks
    engine_ms: float  # engine call time, 0 when the engine did not run
    param_version: int  # the newest parameter submission applied before this frame


# Errors that no retry can fix: the config or the machine must change. A sink or source that
# raises one of these when first opened stops the bridge at start with that message.
FINAL_ERRORS: tuple[type[BaseException], ...] = (MissingExtra, TransportUnavailable, ValueError)


class SinkRunner:
    """One sink on its own thread, which opens it, writes to it and closes it, so a medium
    whose state belongs to one thread (Spout's OpenGL context) gets that. A write that raises
    is counted, logged (rate-limited), reported in status, and the next frame is tried again;
    after `reopen_after` failures in a row the sink is closed and opened again, with a growing
    pause between attempts. A write that blocks stalls only this thread: newer frames replace
    the waiting one (counted as dropped) and status says how long the write has been stuck."""

    def __init__(
        self,
        label: str,
        opener: Callable[[], Sink],
        *,
        reopen_after: int = 3,
        backoff_s: Sequence[float] = (0.5, 1.0, 2.0, 5.0),
    ) -> None:
        self.label = label
        self.opener = opener
        self.sink: Sink | None = None
        self.box: Mailbox[Frame] = Mailbox()
        self.state = "opening"  # opening | open | reopening | failed
        self.written = 0
        self.failures = 0
        self.opens = 0
        self.last_error = ""
        self.write_ms: deque[float] = deque(maxlen=120)
        self.busy_since: float | None = None  # perf_counter when the current write began
        self._reopen_after = reopen_after
        self._backoff = tuple(backoff_s)
        self._stop = threading.Event()
        self._first_open = threading.Event()
        self._final: BaseException | None = None
        self._log = RateLimitedLog(log)
        self._thread = threading.Thread(target=self._run, name=f"sink-{label}", daemon=True)
        self._thread.start()

    def wait_open(self, timeout_s: float) -> None:
        """Wait for the first open. Raises its error when it is final (FINAL_ERRORS); any other
        failure leaves the runner retrying in the background, reported in status."""
        self._first_open.wait(timeout_s)
        if self._final is not None:
            raise self._final

    def blocked_s(self) -> float:
        """How long the write in progress has been running (0 when none is)."""
        since = self.busy_since
        return 0.0 if since is None else time.perf_counter() - since

    def _open(self, attempt: int) -> bool:
        try:
            self.sink = self.opener()
        except FINAL_ERRORS as exc:
            if attempt == 0:
                self._final = exc
                self.state = "failed"
                return False
            self._failed(exc, "open")
            return False
        except Exception as exc:
            self._failed(exc, "open")
            return False
        self.opens += 1
        self.state = "open"
        if attempt:
            log.info("output %s is open again", self.label)
        return True

    def _failed(self, exc: BaseException, during: str) -> None:
        self.failures += 1
        self.last_error = f"output {self.label}: {type(exc).__name__}: {exc}"
        self._log.warning(self.label, f"{self.last_error} ({during} failed; retrying)")

    def _close_sink(self) -> None:
        sink, self.sink = self.sink, None
        if sink is not None:
            _close(self.label, sink)

    def _run(self) -> None:
        attempt = 0
        try:
            opened = self._open(attempt)
            self._first_open.set()
            if self._final is not None:
                return
            in_a_row = 0
            while not self._stop.is_set():
                if not opened:
                    pause = self._backoff[min(attempt, len(self._backoff) - 1)]
                    self.state = "reopening"
                    if self._stop.wait(pause):
                        return
                    attempt += 1
                    opened = self._open(attempt)
                    in_a_row = 0
                    continue
                attempt = 0
                frame = self.box.get(0.1)
                if frame is None or self.sink is None:
                    continue
                t0 = self.busy_since = time.perf_counter()
                try:
                    self.sink.write(frame)
                except Exception as exc:
                    self._failed(exc, "write")
                    in_a_row += 1
                    if in_a_row >= self._reopen_after:
                        self._close_sink()
                        opened = False
                    continue
                finally:
                    self.busy_since = None
                in_a_row = 0
                self.write_ms.append(1000 * (time.perf_counter() - t0))
                self.written += 1
        finally:
            self._first_open.set()
            self._close_sink()

    def stop(self, timeout_s: float) -> None:
        """Stop the thread; it closes the sink. A thread stuck in a write past `timeout_s`
        is left behind (daemon) and the sink is closed from here instead."""
        self._stop.set()
        self.box.close()
        self._thread.join(timeout=timeout_s)
        if self._thread.is_alive():
            log.warning(
                "output %s did not finish its write within %.1f s; closing it anyway", self.label, timeout_s
            )
            self._close_sink()


class CaptureRunner:
    """The source on its own thread, feeding the newest frame into `box`. The thread also
    closes the source, so a receiver whose state belongs to one thread (Spout, Syphon) is
    created, used and released there."""

    def __init__(self, source: Source, box: Mailbox[Frame]) -> None:
        self.source = source
        self.box = box
        self.frames = 0
        self.failures = 0
        self.last_error = ""
        self._closed = False
        self._stop = threading.Event()
        self._log = RateLimitedLog(log)
        self._thread = threading.Thread(target=self._run, name="capture", daemon=True)
        self._thread.start()

    def waiting(self) -> str:
        """What the source says it is waiting for ("" when frames flow or it says nothing)."""
        return str(getattr(self.source, "waiting", "") or "")

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    frame = self.source.read(0.1)
                except Exception as exc:
                    self.failures += 1
                    self.last_error = f"input: {type(exc).__name__}: {exc}"
                    self._log.warning("input", f"{self.last_error} (holding the last output, retrying)")
                    self._stop.wait(0.1)
                    continue
                if frame is not None:
                    self.frames += 1
                    self.box.put(frame)
        finally:
            self._close_source()

    def _close_source(self) -> None:
        if not self._closed:
            self._closed = True
            _close("input", self.source)

    def stop(self, timeout_s: float) -> None:
        self._stop.set()
        self._thread.join(timeout=timeout_s)
        if self._thread.is_alive():
            log.warning("the input did not return within %.1f s; closing it anyway", timeout_s)
            self._close_source()


class EngineDriver:
    """Applies live parameters to a `StreamEngine` (built by `load_engine` from the config)."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def prepare(self, values: dict[str, Any]) -> None:
        blend = values.get("prompt_blend") or ()
        self.engine.prepare(
            list(blend) if blend else values["prompt"],
            negative_prompt=values["negative_prompt"],
            guidance_scale=values["guidance"],
            delta=values["delta"],
            seed=values["seed"],
        )
        self.engine.set_t_index_list(list(values["t_index_list"]))
        self.engine.set_similarity_filter(
            enabled=values["ssf/enabled"], threshold=values["ssf/threshold"], max_skip=values["ssf/max_skip"]
        )

    def apply(self, name: str, value: Any) -> dict[str, Any]:
        """Apply one live value; returns every value it changed (strength also moves
        t_index_list and the reverse). Raises ValueError when the engine refuses it."""
        e = self.engine
        if name == "prompt":
            e.set_prompt(value)
            return {"prompt": value, "prompt_blend": ()}
        if name == "prompt_blend":
            e.set_prompt(list(value))
            return {"prompt_blend": value}
        if name == "negative_prompt":
            e.set_negative_prompt(value)
        elif name == "seed":
            e.set_seed(value)
        elif name == "guidance":
            e.set_guidance_scale(value)
        elif name == "delta":
            e.set_delta(value)
        elif name == "strength":
            t_index = strength_to_t_index(value, e.num_steps)
            e.set_t_index_list(list(t_index))
            return {"strength": value, "t_index_list": t_index}
        elif name == "t_index_list":
            e.set_t_index_list(list(value))
            return {"t_index_list": tuple(value), "strength": t_index_to_strength(value)}
        elif name == "ssf/enabled":
            e.set_similarity_filter(enabled=value)
        elif name == "ssf/threshold":
            e.set_similarity_filter(threshold=value)
        elif name == "ssf/max_skip":
            e.set_similarity_filter(max_skip=value)
        return {name: value}


DEFAULT_T_INDEX = LIVE["t_index_list"].default


def load_engine(config: BridgeConfig) -> EngineDriver:
    """Load the model the config names and build the engine (slow: seconds to minutes)."""
    from bridge.engine import StreamEngine
    from bridge.engine.accel import accelerate
    from bridge.engine.loading import LoadOptions, load_pipeline, resolve_device, resolve_dtype_name

    e = config.engine
    device = resolve_device(e.device)
    options = LoadOptions(
        cache_dir=Path(e.cache_dir).expanduser(),
        device=device,
        dtype=resolve_dtype_name(e.dtype),
        offline=e.offline,
        tiny_vae=e.tiny_vae or None,
        lcm_lora=e.lcm_lora or None,
    )
    log.info("loading model %r on %s", e.model, device)
    pipe = load_pipeline(e.model, options)
    accelerate(pipe, e.acceleration)
    engine = StreamEngine(
        pipe,
        list(DEFAULT_T_INDEX),
        width=e.width,
        height=e.height,
        cfg_type=e.cfg_type,
        frame_buffer_size=e.frame_buffer_size,
        use_denoising_batch=e.use_denoising_batch,
        similarity_seed=e.similarity_seed,
    )
    return EngineDriver(engine)


def initial_values(config: BridgeConfig) -> dict[str, Any]:
    """Live values at start: table defaults, then the config's `params`; strength and
    t_index_list are kept consistent with each other."""
    values = {name: p.default for name, p in LIVE.items()}
    values.update(config.params)
    if "strength" in config.params:
        values["t_index_list"] = strength_to_t_index(values["strength"], len(values["t_index_list"]))
    else:
        values["strength"] = t_index_to_strength(values["t_index_list"])
    return values


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
        engine_factory: Callable[[BridgeConfig], EngineDriver] = load_engine,
        sinks: Sequence[tuple[str, Callable[[], Sink]]] = (),
        source: Source | None = None,
    ) -> None:
        self.config = config
        self.store = ParamStore(initial_values(config))
        self._engine_factory = engine_factory
        self._extra_sinks = list(sinks)
        self._source = source
        self._status = Status()
        self._status_lock = threading.Lock()
        self._observers: list[Callable[[Frame, OutputInfo], None]] = []
        self.sinks: list[SinkRunner] = []
        self.capture: CaptureRunner | None = None
        self.driver: EngineDriver | None = None
        self.control: OscControl | None = None
        self.osc: OscServer | None = None
        self.publisher: StatusPublisher | None = None
        self.oscquery: Any = None  # bridge.control.oscquery.OscQueryServer when osc.oscquery_port is set
        self.midi: Any = None  # bridge.control.midi.MidiInput when MIDI is on and a port opened
        self.midi_mapper: Any = None
        self.midi_error = ""
        self.ready = threading.Event()  # set once the state is "running"
        self._freeze = bool(self.store.get("freeze"))
        self._bypass = bool(self.store.get("bypass"))
        self._applied_version = 0
        self._in_box: Mailbox[Frame] = Mailbox()
        self._outputs: deque[OutputInfo] = deque(maxlen=60)
        self._engine_errors = 0
        self._last_error = ""
        self._out_seq = 0

    # ------------------------------------------------------------------ status
    def on_output(self, observer: Callable[[Frame, OutputInfo], None]) -> None:
        """Call `observer(frame, info)` from the engine loop for every output frame."""
        self._observers.append(observer)

    def status(self) -> Status:
        with self._status_lock:
            return self._status

    def _set_status(self, **changes: Any) -> None:
        with self._status_lock:
            self._status = replace(self._status, **changes)
        if self.publisher is not None and ("state" in changes or "mode" in changes or "error" in changes):
            self.publisher.poke()

    def _refresh_status(self) -> None:
        outs = list(self._outputs)
        now = time.perf_counter()
        recent = [o for o in outs if now - o.t_emit <= 1.0]
        fps = 0.0
        if len(recent) >= 2:
            fps = (len(recent) - 1) / max(recent[-1].t_emit - recent[0].t_emit, 1e-6)
        fresh = [o for o in outs if o.kind in ("engine", "skipped", "bypass")]
        latency = statistics.median(1000 * (o.t_emit - o.t_capture) for o in fresh) if fresh else 0.0
        ran = [o.engine_ms for o in fresh if o.kind == "engine"]
        processed = [o for o in fresh if o.kind in ("engine", "skipped")]
        skip_rate = sum(o.kind == "skipped" for o in processed) / len(processed) if processed else 0.0
        dropped = self._in_box.dropped + sum(s.box.dropped for s in self.sinks)
        errors = [_sink_problem(s) for s in self.sinks]
        if self.capture is not None:
            errors += [self.capture.last_error, self.capture.waiting()]
        errors = [e for e in [*errors, self.midi_error] if e]
        error = (
            self._last_error
            or (self.control.last_error if self.control else "")
            or (errors[0] if errors else "")
        )
        self._set_status(
            fps=round(fps, 2),
            latency_ms=round(latency, 2),
            engine_ms=round(statistics.median(ran), 2) if ran else 0.0,
            skip_rate=round(skip_rate, 3),
            dropped=dropped,
            error=error,
        )

    def status_dict(self) -> dict[str, Any]:
        """Status and live values as JSON-able data (the preview page's /status)."""
        data: dict[str, Any] = dict(vars(self.status()))
        values = self.store.snapshot()
        data["params"] = {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}
        if self.control is not None:
            data["osc"] = self.control.counters.as_dict()
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
            mapper = self.midi_mapper
            data["midi"] = {
                "port": self.midi.name if self.midi is not None else "",
                "error": self.midi_error,
                "unmapped_messages": mapper.ignored if mapper is not None else 0,
                "soft_takeover_waiting": dict(mapper.waiting) if mapper is not None else {},
            }
        if self.capture is not None:
            data["input"] = {
                "frames": self.capture.frames,
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
    def _start_control(self) -> None:
        osc = self.config.osc
        if not osc.enabled:
            return
        self.osc = OscServer(osc.host, osc.port)
        targets = [parse_target(t) for t in osc.status_targets]
        self.control = OscControl(
            self.store, send=self.osc.send, error_targets=targets, allowlist=osc.allowlist
        )
        self.osc.start(self.control)
        self.publisher = StatusPublisher(
            send=self.osc.send,
            targets=targets,
            status=self.status,
            store=self.store,
            interval_s=osc.status_interval_s,
        )
        self.publisher.start()
        log.info("OSC on %s:%d, status to %s", *self.osc.address, ", ".join(osc.status_targets))
        if osc.oscquery_port:
            from bridge.control.oscquery import OscQueryServer

            self.oscquery = OscQueryServer(
                host=osc.host,
                port=osc.oscquery_port,
                osc_port=self.osc.address[1],
                values=self.store.snapshot,
                status=lambda: vars(self.status()),
                advertise=osc.oscquery_advertise,
            )
            self.oscquery.start()

    def _start_midi(self) -> None:
        """MIDI is a convenience, never a reason to stop: without a MIDI subsystem, the library
        or the port, the error is logged and shown in status and the bridge runs on."""
        midi = self.config.midi
        if not midi.enabled:
            return
        from bridge.control.midi import MidiInput, MidiMapper

        self.midi_mapper = MidiMapper(midi.mappings, submit=self.store.submit, current=self.store.latest)
        mapper = self.midi_mapper

        def on_message(msg: Any) -> None:
            try:
                mapper.handle(msg)
            except Exception:
                log.exception("MIDI message %r failed", msg)

        try:
            self.midi = MidiInput(midi.port, on_message)
        except (ImportError, OSError) as exc:
            self.midi_error = f"MIDI: {exc}"
            log.error("%s; the bridge runs on without MIDI", self.midi_error)

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
            (_sink_label(i, cfg), functools.partial(open_sink, cfg, ctx))
            for i, cfg in enumerate(self.config.outputs)
        ]
        for label, opener in [*openers, *self._extra_sinks]:
            self.sinks.append(SinkRunner(label, opener))
        for runner in self.sinks:
            runner.wait_open(SINK_OPEN_WAIT_S)

    def run(self, stop: threading.Event) -> None:
        """Run until `stop` is set. Raises (after cleaning up) when the bridge cannot start."""
        try:
            self._set_status(state="loading")
            prepare_media(self.config.input, self.config.outputs)
            self._start_control()
            self._start_midi()
            self._open_sinks()
            driver = self.driver = self._engine_factory(self.config)
            driver.prepare(self.store.snapshot())
            e = self.config.engine
            source = self._source or open_source(self.config.input, width=e.width, height=e.height)
            self.capture = CaptureRunner(source, self._in_box)
            self._set_status(state="warming")
            self._warm_up(driver)
            self._set_status(state="running")
            self.ready.set()
            self._loop(driver, stop)
        except BaseException:
            self._set_status(state="error")
            raise
        finally:
            self._shutdown()

    def _warm_up(self, driver: EngineDriver) -> None:
        e = self.config.engine
        blank = np.zeros((e.height, e.width, 4), np.uint8)
        for _ in range(self.config.runtime.warmup_frames):
            driver.engine(blank, output_type="uint8")
        driver.engine.similarity.reset()

    def _shutdown(self) -> None:
        started = time.perf_counter()
        if self.capture is not None:
            self.capture.stop(0.5)
        self._in_box.close()
        for runner in reversed(self.sinks):
            runner.stop(0.5)
        if self.midi is not None:
            _close("midi", self.midi)
        if self.oscquery is not None:
            _close("oscquery", self.oscquery)
        if self.publisher is not None:
            self.publisher.close()
        if self.osc is not None:
            self.osc.close()
        log.info("shut down in %.2f s", time.perf_counter() - started)

    # ------------------------------------------------------------------ the engine loop
    def _apply_pending(self, driver: EngineDriver) -> None:
        pending = self.store.take_pending()
        for name, item in sorted(pending.items(), key=lambda kv: kv[1].version):
            try:
                if name == "freeze":
                    self._freeze = bool(item.value)
                    changed = {name: item.value}
                elif name == "bypass":
                    self._bypass = bool(item.value)
                    changed = {name: item.value}
                else:
                    changed = driver.apply(name, item.value)
            except (ValueError, TypeError) as exc:
                reason = f"the engine refused {name}={item.value!r}: {exc}"
                if self.control is not None:
                    self.control.reject(BY_NAME[name].address, reason, None)
                else:
                    log.warning("%s", reason)
                continue
            for key, value in changed.items():
                self.store.commit(key, value)
            self._applied_version = max(self._applied_version, item.version)
        if pending and self.publisher is not None:
            self.publisher.poke()

    def _loop(self, driver: EngineDriver, stop: threading.Event) -> None:
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
            self._apply_pending(driver)
            mode = "frozen" if self._freeze else "bypass" if self._bypass else "live"
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
                    self._engine_errors += 1
                    self._last_error = f"engine: {type(exc).__name__}: {exc}"
                    log.exception("engine call failed; repeating the last output")
                    if self._engine_errors >= 3:
                        self._set_status(state="error")
                    if last_out is None:
                        continue
                    out, kind = last_out.pixels, "held"
                else:
                    if self._engine_errors:
                        self._engine_errors, self._last_error = 0, ""
                        self._set_status(state="running", error="")
                    engine_ms = 1000 * (time.perf_counter() - t_start)
                    kind = "skipped" if engine.stats.skipped > skipped_before else "engine"
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
        info = OutputInfo(
            self._out_seq, frame.seq, kind, frame.t_capture, t_start, t_emit, engine_ms, self._applied_version
        )
        self._outputs.append(info)
        self._set_status(frames=self._status.frames + 1)
        for observer in self._observers:
            observer(frame, info)


@contextmanager
def in_background(bridge: Bridge, *, start_timeout_s: float = 300.0) -> Iterator[list[OutputInfo]]:
    """Run `bridge` on a thread of its own (the benchmark and tests drive it from outside).

    Yields the list every output's `OutputInfo` is appended to, once the state is "running".
    On exit: stop, join, and re-raise whatever `run` raised; a bridge that did not start or
    did not stop is a RuntimeError."""
    infos: list[OutputInfo] = []
    bridge.on_output(lambda _frame, info: infos.append(info))
    stop = threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            bridge.run(stop)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, name="bridge")
    thread.start()
    try:
        if not bridge.ready.wait(start_timeout_s):
            raise RuntimeError(f"the bridge did not start within {start_timeout_s:.0f} s: {errors}")
        yield infos
    finally:
        stop.set()
        thread.join(30)
        if errors:
            raise errors[0]
        if thread.is_alive():
            raise RuntimeError("the bridge did not stop within 30 s")


BLOCKED_REPORT_S = 1.0  # a write running longer than this is reported in status


def _sink_problem(runner: SinkRunner) -> str:
    """The sink's current trouble for the status line, "" when it is fine."""
    blocked = runner.blocked_s()
    if blocked >= BLOCKED_REPORT_S:
        return f"output {runner.label}: a write has been blocked for {blocked:.1f} s"
    if runner.state != "open":
        return runner.last_error or f"output {runner.label}: {runner.state}"
    return runner.last_error


def _sink_label(index: int, cfg: SinkConfig) -> str:
    return cfg.kind if index == 0 else f"{cfg.kind}#{index}"


def _close(label: str, closable: Any) -> None:
    try:
        closable.close()
    except Exception:
        log.exception("closing %s failed", label)
