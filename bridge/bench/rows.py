"""One (steps, cfg_type) measurement: every contender in rotation on the same frames.

The contenders are one engine per acceleration, the engine's sequential reference, diffusers'
img2img, the bare forward floor (one per set of networks the engines run: eager, compiled), and
the similarity filter's two costs: its work alone, and a skipped frame end to end. Each gets the
same sequence of uint8 frames (frame k of the sequence at its k-th call, warm-up calls included),
so engines that start from the same `prepare` hold the same state at every call and their outputs
can be compared frame by frame; the skipped frame alone keeps to its one still frame.
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from bridge.acceleration import DEFAULT_COMPILE_MODE
from bridge.bench.compare import agreement
from bridge.bench.config import PROMPT, T_INDEX_PRESETS, BenchConfig
from bridge.bench.contenders import (
    Contender,
    bench_frames,
    diffusers_call,
    floor_call,
    screen_call,
    skipped_frame_call,
)
from bridge.bench.timing import Timed, event_clock, time_call
from bridge.engine import StreamEngine
from bridge.engine.accel import Acceleration

REFERENCE = "none"  # the acceleration the others' outputs are compared with
_OWN_PIPES: dict[int, Any] = {}  # a channels_last copy per pipe: the engine converts weights in place


def _pipe_for(pipe: Any, acceleration: str) -> Any:
    """The pipe an acceleration's engine runs on: a copy of its own for `channels_last` (which
    converts the weights in place), so the other contenders keep the default layout."""
    if not Acceleration.parse(acceleration).channels_last:
        return pipe
    if id(pipe) not in _OWN_PIPES:
        _OWN_PIPES[id(pipe)] = copy.deepcopy(pipe)
    return _OWN_PIPES[id(pipe)]


@dataclass(frozen=True)
class Variant:
    """One engine contender: an acceleration, and the inductor mode when it compiles."""

    acceleration: str
    compile_mode: str | None  # None: the acceleration compiles nothing
    label: str  # its name in the loop: the acceleration, then the mode when several are measured


def contender_name(acceleration: str, compile_mode: str | None) -> str:
    """How a row's engine is named in tables and progress lines: the mode after a compile."""
    return acceleration + (f" [{compile_mode}]" if compile_mode else "")


def variants(accelerations: Sequence[str], compile_modes: Sequence[str]) -> list[Variant]:
    """Every acceleration once, each one with `compile` once per compile mode."""
    out = []
    for acc in accelerations:
        if not Acceleration.parse(acc).compile:
            out.append(Variant(acc, None, acc))
            continue
        for mode in compile_modes:
            label = acc if len(compile_modes) == 1 else contender_name(acc, mode)
            out.append(Variant(acc, mode, label))
    return out


@dataclass
class Row:
    """One acceleration's engine at one (steps, cfg_type), with the contenders it ran beside.

    Throughput is ms per call and fps = 1000 / ms. Latency is frames_in_flight x ms: the stream
    batch's output for a frame leaves n - 1 calls after it went in (n = steps), so its frames in
    flight are n; sequential and diffusers return the frame they were given (1). The engine
    figures are None where the acceleration cannot run here (`available` False, `reason`).
    Every `*_ms` time is wall clock; its `*_device_ms` twin is the CUDA events' time of the same
    calls, None without CUDA (bridge.bench.timing). `filter_ms` and `skipped_frame_ms` are the
    same for every acceleration of a (steps, cfg_type): the filter runs eagerly before the frame,
    never captured or compiled."""

    steps: int
    cfg_type: str
    t_index_list: list[int]
    acceleration: str
    compile_mode: str | None  # the inductor mode, for accelerations with compile
    exact: bool  # Acceleration.parse(acceleration).exact: frames should equal `none`'s
    available: bool
    reason: str | None  # why not available
    fallback: str | None  # the engine ran eagerly although asked otherwise (engine.acceleration_fallback)
    # engine.warm_up(first frame), untimed in the loop: compile / capture seconds. Engines on one pipe
    # share dynamo's in-process cache, so shapes an earlier row compiled cost this row about nothing.
    warmup_s: float | None
    engine_ms: float | None
    engine_fps: float | None
    frames_in_flight: int
    latency_ms: float | None
    sequential_ms: float
    sequential_fps: float
    sequential_frames_in_flight: int
    sequential_latency_ms: float
    stream_batch_speedup: float | None  # sequential_ms / engine_ms
    diffusers_ms: float
    diffusers_fps: float
    diffusers_frames_in_flight: int
    diffusers_latency_ms: float
    speedup_vs_diffusers: float | None  # diffusers_ms / engine_ms
    floor_networks: str | None  # the networks the floor ran: the engine's own ("torch", "compile (...)")
    floor_ms: float | None
    overhead_ratio: float | None  # engine_ms / floor_ms
    identical_to_none: bool | None  # every timed output equal to `none`'s on the same frame
    psnr_db_vs_none: float | None  # inexact accelerations; None when identical (infinite) or not run
    compared_frames: int
    skip_rate_static: float
    filter_ms: float  # stage + normalise + score + decision of a frame that passes (FILTER_INCLUDES)
    skipped_frame_ms: float  # a frame the filter skips, end to end (SKIPPED_INCLUDES)
    engine_device_ms: float | None
    sequential_device_ms: float | None
    diffusers_device_ms: float | None
    floor_device_ms: float | None
    filter_device_ms: float | None
    skipped_frame_device_ms: float | None


def _median_ms(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1000.0, 3)


def _median_device_ms(samples: list[float | None]) -> float | None:
    if not samples or any(value is None for value in samples):
        return None
    return round(statistics.median(value for value in samples if value is not None), 3)


def _ratio(num: float | None, den: float | None) -> float | None:
    return None if num is None or den is None else round(num / den, 3)


def measure(
    pipe: Any, config: BenchConfig, steps: int, cfg: str, size: int, progress: Callable[[str], None]
) -> list[Row]:
    """Rows for every acceleration in `config.accelerations` (`none` first) at (steps, cfg), those
    with `compile` once per mode in `config.compile_modes`."""
    t_index = T_INDEX_PRESETS[steps]
    n = len(t_index)
    clock = event_clock(config.device)  # None: no device time here
    frames = bench_frames(size)

    def engine_of(acceleration: str, *, batch: bool = True, mode: str | None = None) -> StreamEngine:
        engine = StreamEngine(
            _pipe_for(pipe, acceleration),
            t_index,
            width=size,
            height=size,
            cfg_type=cfg,
            use_denoising_batch=batch,
            acceleration=acceleration,
            compile_mode=mode or DEFAULT_COMPILE_MODE,
            cache_dir=config.cache_dir,
        )
        torch.backends.cudnn.benchmark = False  # process-wide: set per call below, side by side
        engine.prepare(PROMPT, guidance_scale=1.2, delta=1.0, seed=2)
        return engine

    # 1. One engine per acceleration, made ready (compiled, captured) before any timing.
    engines: dict[str, StreamEngine] = {}
    missing: dict[str, str] = {}
    warmup_s: dict[str, float] = {}
    contending = variants(config.accelerations, config.compile_modes)
    for v in contending:
        try:
            engine = engine_of(v.acceleration, mode=v.compile_mode)
        except ValueError as exc:  # cuda_graph without CUDA: reported with its reason, not run
            missing[v.label] = str(exc)
            continue
        if v.label != REFERENCE:  # eager kernels need no warm-up (warm_up returns at once)
            progress(f"  warming up acceleration {v.label} (compiling, capturing)")
        # cuDNN picks its kernels when a graph is captured: benchmark them then, or a captured
        # cudnn_benchmark contender replays the heuristic ones (the switch is process-wide).
        torch.backends.cudnn.benchmark = Acceleration.parse(v.acceleration).cudnn_benchmark
        start = time.perf_counter()
        try:
            engine.warm_up(frames[0])
            if clock is not None:
                clock.synchronize()  # the warm-up's device work is inside warmup_s
        finally:
            torch.backends.cudnn.benchmark = False
        warmup_s[v.label] = round(time.perf_counter() - start, 3)
        engines[v.label] = engine

    # 2. The other contenders. The floor runs on the UNet inputs an eager engine prepares (the
    #    same for every acceleration), through each engine's own networks.
    sequential = engine_of("none", batch=False)
    floor_source = engine_of("none")
    floor_source(frames[0], output_type="uint8")
    floors: dict[str, Contender] = {}
    floor_of: dict[str, str] = {}
    for acc, engine in engines.items():
        name = engine.nets.name
        if name not in floors:
            floors[name] = floor_call(
                engine.nets,
                floor_source.prepared_unet_inputs,
                size=size,
                device=engine.device,
                dtype=engine.dtype,
            )
        floor_of[acc] = name
    taus = [999 - 20 * i for i in t_index]
    # The similarity filter's work alone, on the moving frames; a skipped frame, on a still one.
    still = engine_of("none")
    contenders: dict[str, Contender] = {
        **{f"engine[{acc}]": _uint8_call(engine) for acc, engine in engines.items()},
        "sequential": _uint8_call(sequential),
        "diffusers": diffusers_call(pipe, PROMPT, steps=steps, timesteps=taus),
        **{f"floor[{name}]": call for name, call in floors.items()},
        "filter": screen_call(engine_of("none"), frames[-1]),
        "skipped_frame": skipped_frame_call(still, frames[0]),
    }

    # 3. All in rotation, each on its own next frame of the same sequence.
    calls = dict.fromkeys(contenders, 0)
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    device_samples: dict[str, list[float | None]] = {name: [] for name in contenders}
    outputs: dict[str, list[np.ndarray]] = {acc: [] for acc in engines}

    # cudnn_benchmark is cuDNN's process-wide switch: on only while its own engine runs.
    cudnn = {name: False for name in contenders}
    cudnn.update(
        {f"engine[{v.label}]": Acceleration.parse(v.acceleration).cudnn_benchmark for v in contending}
    )

    def call(name: str) -> Timed:
        frame = frames[calls[name] % len(frames)]
        calls[name] += 1
        torch.backends.cudnn.benchmark = cudnn[name]
        return time_call(contenders[name], frame, clock=clock)

    for _ in range(config.warmup):
        for name in contenders:
            call(name)
    for _ in range(config.repeats):
        for name in contenders:
            timed = call(name)
            samples[name].append(timed.seconds)
            device_samples[name].append(timed.device_ms)
            if name.startswith("engine["):
                outputs[name[len("engine[") : -1]].append(np.array(timed.output))  # the ring slot is reused
    ms = {name: _median_ms(values) for name, values in samples.items()}
    device_ms = {name: _median_device_ms(values) for name, values in device_samples.items()}
    # Every call timed as a skipped frame must have been one (its first, untimed, was processed).
    processed = still.stats.frames - 1 - still.stats.skipped
    if processed:
        raise RuntimeError(
            f"the skipped-frame timing processed {processed} of its {still.stats.frames - 1} calls "
            "instead of skipping them: skipped_frame_ms would not be a skipped frame's time"
        )

    # 4. The similarity filter on a still input (eager engine).
    static = engine_of("none")
    static.set_similarity_filter(enabled=True, threshold=0.98, max_skip=10)
    for _ in range(44):
        static(frames[0], output_type="uint8")
    skip_rate = round(static.stats.skipped / static.stats.frames, 3)

    rows = []
    for v in contending:
        acc = v.label
        engine_ms = ms.get(f"engine[{acc}]")
        floor_ms = ms[f"floor[{floor_of[acc]}]"] if acc in floor_of else None
        identical = psnr = None
        compared = 0
        if acc in engines and REFERENCE in engines:
            agree = agreement(outputs[REFERENCE], outputs[acc])
            identical, compared = agree.identical, agree.frames
            if not Acceleration.parse(v.acceleration).exact and not math.isinf(agree.psnr_db):
                psnr = round(agree.psnr_db, 2)
        ready = engines.get(acc)
        rows.append(
            Row(
                steps=steps,
                cfg_type=cfg,
                t_index_list=t_index,
                acceleration=v.acceleration,
                compile_mode=v.compile_mode,
                exact=Acceleration.parse(v.acceleration).exact,
                available=acc in engines,
                reason=missing.get(acc),
                fallback=(ready.acceleration_fallback or None) if ready is not None else None,
                warmup_s=warmup_s.get(acc),
                engine_ms=engine_ms,
                engine_fps=None if engine_ms is None else round(1000.0 / engine_ms, 2),
                frames_in_flight=n,
                latency_ms=None if engine_ms is None else round(n * engine_ms, 3),
                sequential_ms=ms["sequential"],
                sequential_fps=round(1000.0 / ms["sequential"], 2),
                sequential_frames_in_flight=1,
                sequential_latency_ms=ms["sequential"],
                stream_batch_speedup=_ratio(ms["sequential"], engine_ms),
                diffusers_ms=ms["diffusers"],
                diffusers_fps=round(1000.0 / ms["diffusers"], 2),
                diffusers_frames_in_flight=1,
                diffusers_latency_ms=ms["diffusers"],
                speedup_vs_diffusers=_ratio(ms["diffusers"], engine_ms),
                floor_networks=floor_of.get(acc),
                floor_ms=floor_ms,
                overhead_ratio=_ratio(engine_ms, floor_ms),
                identical_to_none=identical,
                psnr_db_vs_none=psnr,
                compared_frames=compared,
                skip_rate_static=skip_rate,
                filter_ms=ms["filter"],
                skipped_frame_ms=ms["skipped_frame"],
                engine_device_ms=device_ms.get(f"engine[{acc}]"),
                sequential_device_ms=device_ms["sequential"],
                diffusers_device_ms=device_ms["diffusers"],
                floor_device_ms=device_ms[f"floor[{floor_of[acc]}]"] if acc in floor_of else None,
                filter_device_ms=device_ms["filter"],
                skipped_frame_device_ms=device_ms["skipped_frame"],
            )
        )
    return rows


def _uint8_call(engine: StreamEngine) -> Contender:
    """The runtime's call: a uint8 frame in, the (H, W, 4) uint8 ring slot out."""
    return lambda frame: engine(frame, output_type="uint8")
