"""Measurements behind `sdbridge bench`: ratios taken side by side in one run.

Every contender is timed on the runtime's path: an (H, W, 4) uint8 frame on the host in, uint8
pixels on the host out, so the host-to-device and device-to-host copies are inside the time. For
each step count and cfg mode, these run in rotation (so machine noise hits them alike), each
after warm-up, on the same sequence of frames, and the median of the repeats is reported:

- the engine (stream batch, `output_type="uint8"`), once per acceleration asked for (`none`
  always among them): compiled or captured by `engine.warm_up(first frame)` before the loop,
  untimed, its seconds reported as `warmup_s`;
- the engine's sequential reference (`use_denoising_batch=False`, acceleration `none`);
- diffusers' own img2img pipeline on the same components, prompt embeddings computed once with
  its `encode_prompt`. Its steps are matched exactly: it is given the engine's timesteps
  (`timesteps=[tau_0..tau_{n-1}]`, `strength=1.0`), so it runs n UNet calls of batch 1 at the
  very timesteps of the engine's one call of batch n, with `guidance_scale=1.0`: no extra UNet
  work, as in the engine's `none` and `self` modes. PIL image in, `output_type="pil"` out;
- the bare forward floor (contenders.FLOOR_INCLUDES), through each engine's own networks;
- the similarity filter's work alone, `engine.stage_and_screen` on a frame that is scored and
  passes (contenders.FILTER_INCLUDES), and a frame it skips, end to end, on a still input
  (contenders.SKIPPED_INCLUDES).

Throughput (ms per frame, fps) and latency (frames in flight x ms: n for the stream batch, whose
output for a frame leaves n - 1 calls later; 1 for sequential and diffusers) are both reported.
Accelerated engines' frames are compared with `none`'s on the same inputs: bit for bit for exact
accelerations, by PSNR for inexact ones. Also the similarity filter's skip rate on a static
input. Every time is wall clock; on CUDA each also has the device's time of the same calls from
CUDA events (`*_device_ms`, bridge.bench.timing), null elsewhere. No figure is asserted anywhere;
targets are reported next to the measurements.
"""

from __future__ import annotations

import platform
from collections.abc import Callable
from dataclasses import asdict, replace
from typing import Any

import torch

from bridge.acceleration import COMPILE_MODES
from bridge.bench.config import T_INDEX_PRESETS, TARGETS, TINY_BENCH_SIZE, BenchConfig
from bridge.bench.contenders import DIFFUSERS_IO, FILTER_INCLUDES, FLOOR_INCLUDES, SKIPPED_INCLUDES
from bridge.bench.rows import REFERENCE, Row, contender_name, measure
from bridge.bench.table import format_table
from bridge.bench.timing import device_timing, event_clock
from bridge.engine import StreamEngine
from bridge.engine.accel import ACCELERATIONS, Acceleration
from bridge.engine.fullsize import FULLSIZE_ARCHS, build_fullsize_pipeline
from bridge.engine.loading import LoadOptions, load_pipeline

__all__ = [
    "TARGETS",
    "TINY_BENCH_SIZE",
    "T_INDEX_PRESETS",
    "BenchConfig",
    "Row",
    "accelerations_of",
    "format_table",
    "measure",
    "run_bench",
]


def accelerations_of(asked: Any) -> list[str]:
    """The accelerations to measure, spelled canonically, each once, `none` first (the reference)."""
    spelled = []
    for text in [REFERENCE, *asked]:
        name = str(Acceleration.parse(text))
        if name not in spelled:
            spelled.append(name)
    return spelled


def _row_line(row: Row) -> str:
    name = contender_name(row.acceleration, row.compile_mode)
    if not row.available:
        return f"  {row.steps} step(s) {row.cfg_type} {name}: not available ({row.reason})"
    agree = "identical" if row.identical_to_none else f"{row.psnr_db_vs_none} dB vs none"
    device = "" if row.engine_device_ms is None else f" (device {row.engine_device_ms} ms)"
    return (
        f"  {row.steps} step(s) {row.cfg_type} {name}: {row.engine_ms} ms{device} ({row.engine_fps} fps), "
        f"floor {row.floor_ms} ms, diffusers {row.diffusers_ms} ms, warm-up {row.warmup_s} s, {agree}, "
        f"filter {row.filter_ms} ms, skipped frame {row.skipped_frame_ms} ms"
    )


def run_bench(config: BenchConfig, progress: Callable[[str], None] = lambda _msg: None) -> dict[str, Any]:
    """Run every (steps, cfg) row, each acceleration side by side, and return the JSON-ready report."""
    import diffusers

    for n in config.steps:
        if n not in T_INDEX_PRESETS:
            raise ValueError(f"steps must be among {sorted(T_INDEX_PRESETS)}, got {n}")
    accelerations = accelerations_of(config.accelerations)  # ValueError names the valid spellings
    modes = tuple(dict.fromkeys(config.compile_modes))  # each once, in the order asked
    for mode in modes:
        if mode not in COMPILE_MODES:
            raise ValueError(f"compile mode must be one of {', '.join(COMPILE_MODES)}, got {mode!r}")
    if not modes:
        raise ValueError(f"at least one compile mode is needed ({', '.join(COMPILE_MODES)})")
    config = replace(config, accelerations=tuple(accelerations), compile_modes=modes)
    if config.device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(
            f"device {config.device!r} asked for, but torch sees no CUDA device on this machine"
        )
    dtype = torch.float16 if config.device.startswith("cuda") else torch.float32
    progress(f"loading {config.arch} on {config.device}")
    if config.arch in FULLSIZE_ARCHS:
        pipe = build_fullsize_pipeline(config.arch, device=config.device, dtype=dtype)
        size = config.size or 512
    elif config.arch == "tiny":
        pipe = load_pipeline(
            "tiny", LoadOptions(cache_dir=config.cache_dir, device=config.device, dtype=dtype)
        )
        size = config.size or TINY_BENCH_SIZE
    else:
        raise ValueError(f"arch must be 'tiny' or one of {', '.join(FULLSIZE_ARCHS)}, got {config.arch!r}")
    rows = []
    # diffusers warns on every call that the engine's matched timesteps do not start at 999.
    verbosity = diffusers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity_error()
    try:
        for steps in config.steps:
            for cfg in config.cfg_types:
                progress(
                    f"measuring {steps} step(s), cfg_type={cfg}, accelerations {' '.join(accelerations)}"
                )
                for row in measure(pipe, config, steps, cfg, size, progress):
                    rows.append(asdict(row))
                    progress(_row_line(row))  # each figure also as it comes (a run cut short keeps them)
    finally:
        diffusers.utils.logging.set_verbosity(verbosity)
    live = None
    if config.live:
        from bridge.bench_live import run_live_bench
        from bridge.runtime import EngineDriver

        def factory_for(px: int) -> Callable[[Any], EngineDriver]:
            return lambda _cfg: EngineDriver(
                StreamEngine(pipe, [32, 45], width=px, height=px, cfg_type="self")
            )

        live = run_live_bench(factory_for, progress, osc_size=size, sizes=tuple(config.live_sizes))
    cuda = config.device.startswith("cuda")
    clock = event_clock(config.device)
    device_name = torch.cuda.get_device_name(0) if cuda else platform.processor() or platform.machine()
    return {
        "device": config.device,
        "device_name": device_name,
        "arch": config.arch,
        "dtype": str(dtype).removeprefix("torch."),
        "accelerations": accelerations,
        "compile_modes": list(modes),
        "resolution": [size, size],
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "threads": torch.get_num_threads(),
        "repeats": config.repeats,
        "warmup": config.warmup,
        "timing": "wall clock per call"
        + (", torch.cuda.synchronize() before the clock stops" if cuda else " (time.perf_counter)"),
        "device_ms_taken": clock is not None,
        "device_timing": device_timing(config.device, clock),
        "path": "uint8 (H, W, 4) host frames in, output_type='uint8' out: the runtime's path, "
        "host-to-device and device-to-host copies included",
        "latency": "latency_ms = frames_in_flight x ms: the stream batch's output for a frame leaves "
        "n - 1 calls after it went in (frames_in_flight = n); sequential and diffusers return the "
        "frame they were given (1)",
        "floor": FLOOR_INCLUDES,
        "filter": FILTER_INCLUDES,
        "skipped_frame": SKIPPED_INCLUDES,
        "diffusers_io": DIFFUSERS_IO,
        "matching": "diffusers img2img gets timesteps=[the engine's taus], strength=1.0, guidance_scale=1.0: "
        "n UNet calls of batch 1 at the engine's timesteps vs the engine's one call of batch n. The "
        "engines run at guidance 1.2: for cfg full and initialize that adds their negative rows (2n "
        "or n+1), which diffusers (no negatives) does not run, so vs_diffusers is like for like only "
        "for cfg none and self",
        "comparison": "each acceleration's timed outputs against acceleration none's on the same input "
        "sequence: identical_to_none (bit for bit); psnr_db_vs_none for inexact accelerations "
        "(null when identical)",
        "known_accelerations": list(ACCELERATIONS),
        "engine": rows,
        "targets": TARGETS,
        "live": live,
    }
