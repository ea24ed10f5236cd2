"""Measurements behind `sdbridge bench`: ratios taken side by side in one run.

For each step count and cfg mode, four contenders run in rotation (so machine noise hits them
alike), each after warm-up, and the median of the repeats is reported:

- the engine (stream batch);
- the engine's sequential reference (`use_denoising_batch=False`);
- diffusers' own img2img pipeline on the same components. Its steps are matched exactly: it is
  given the engine's timesteps (`timesteps=[tau_0..tau_{n-1}]`, `strength=1.0`), so it runs n
  UNet calls of batch 1 at the very timesteps of the engine's one call of batch n, with
  `guidance_scale=1.0`: no extra UNet work, as in the engine's `none` and `self` modes;
- the bare forward floor: the same UNet batch + VAE encode + VAE decode, timed alone.

Also the similarity filter's skip rate on a static input. No figure is asserted anywhere;
targets are reported next to the measurements.
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from bridge.engine import StreamEngine
from bridge.engine.fullsize import FULLSIZE_ARCHS, build_fullsize_pipeline
from bridge.engine.loading import LoadOptions, load_pipeline

# The tiny model is benchmarked at 128 px: there its UNet is ~77% of a frame's forward work, as a
# real sd-turbo frame's is at 512 px (804 of 1,068 GFLOP). At its native 256 px the unbatchable
# VAE is ~45% instead. `--size` measures any other size.
TINY_BENCH_SIZE = 128

# t_index presets per step count (ascending; the first is, in effect, the img2img strength).
T_INDEX_PRESETS: dict[int, list[int]] = {1: [35], 2: [32, 45], 3: [20, 32, 45], 4: [20, 30, 38, 45]}
TARGETS = {
    "speedup_vs_diffusers_min": 1.5,
    "overhead_ratio_max": 1.10,
    "note": "CPU tiny-model targets: overhead <= 1.10 at every step count; >= 1.5x diffusers at 2 and 4 "
    "steps; at 1 step the UNet+VAE floor bounds the ratio, so 1 step only has to beat diffusers.",
}


@dataclass
class BenchConfig:
    """What to measure. Built by the CLI; the defaults are the CPU tiny-model run."""

    device: str = "cpu"
    arch: str = "tiny"  # "tiny" or a full-size random-weight architecture (FULLSIZE_ARCHS)
    size: int = 0  # pixels; 0 = the architecture's native size
    steps: Sequence[int] = (1, 2, 4)
    cfg_types: Sequence[str] = ("none", "self")
    repeats: int = 31
    warmup: int = 3
    cache_dir: Path = field(default_factory=lambda: Path.home() / ".cache" / "sdbridge")
    live: bool = True  # also measure the live bridge: shm round trip, OSC to applied, overhead
    live_sizes: Sequence[int] = (512, 1024)  # shm and sink frame sizes, pixels; overhead at the first
    acceleration: str = "none"  # engine.acceleration applied to the shared components (none|compile)


@dataclass
class Row:
    steps: int
    cfg_type: str
    t_index_list: list[int]
    engine_ms: float
    engine_fps: float
    sequential_ms: float
    stream_batch_speedup: float
    diffusers_ms: float
    speedup_vs_diffusers: float
    floor_ms: float
    overhead_ratio: float
    skip_rate_static: float


def _sync(device: str) -> Callable[[], None]:
    if device.startswith("cuda"):
        return torch.cuda.synchronize
    return lambda: None


def _median_ms(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1000.0, 3)


def _pipeline_reference(pipe: Any) -> Any:
    from diffusers import LCMScheduler, StableDiffusionImg2ImgPipeline, StableDiffusionXLImg2ImgPipeline

    cls = (
        StableDiffusionXLImg2ImgPipeline
        if getattr(pipe, "text_encoder_2", None) is not None
        else StableDiffusionImg2ImgPipeline
    )
    ref = cls(**pipe.components)
    ref.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    return ref


@torch.no_grad()
def _floor_call(engine: StreamEngine, pixels: torch.Tensor) -> Callable[[], Any]:
    """The bare forward work of one engine frame: VAE encode, one UNet call on the engine's own
    prepared batch, VAE decode. Nothing else."""
    pipe = engine.pipe
    engine(pixels)  # builds the engine's prepared UNet inputs
    inputs = engine.prepared_unet_inputs
    rows = inputs.timesteps.shape[0]
    latents = torch.randn(
        (rows, 4, engine.height // 8, engine.width // 8), device=engine.device, dtype=engine.dtype
    )
    scaled = pixels.to(engine.device, engine.dtype) * 2 - 1
    is_kl = hasattr(pipe.vae, "quant_conv")

    def run() -> Any:
        with torch.no_grad():
            enc = pipe.vae.encode(scaled)
            _ = enc.latent_dist.mean if is_kl else enc.latents
            pipe.unet(
                latents,
                inputs.timesteps,
                encoder_hidden_states=inputs.embeds,
                added_cond_kwargs=inputs.added,
                return_dict=False,
            )
            return pipe.vae.decode(latents[-1:], return_dict=False)[0]

    return run


def measure(pipe: Any, config: BenchConfig, steps: int, cfg: str, size: int) -> Row:
    """One row of the benchmark: four contenders in rotation, medians of `config.repeats`."""
    t_index = T_INDEX_PRESETS[steps]
    sync = _sync(config.device)
    gen = torch.Generator().manual_seed(0)
    frames = [torch.rand((1, 3, size, size), generator=gen) for _ in range(4)]
    prompt = "a photo of a cat, oil painting"

    def engine_of(batch: bool) -> StreamEngine:
        engine = StreamEngine(
            pipe,
            t_index,
            width=size,
            height=size,
            cfg_type=cfg,
            use_denoising_batch=batch,
            acceleration=config.acceleration if batch else "none",
            cache_dir=config.cache_dir,
        )
        engine.prepare(prompt, guidance_scale=1.2, delta=1.0, seed=2)
        return engine

    stream, sequential = engine_of(True), engine_of(False)
    reference = _pipeline_reference(pipe)
    taus = [999 - 20 * i for i in t_index]
    floor = _floor_call(engine_of(True), frames[0])
    counter = {"k": 0}

    def next_frame() -> torch.Tensor:
        counter["k"] += 1
        return frames[counter["k"] % len(frames)]

    contenders: dict[str, Callable[[], Any]] = {
        "engine": lambda: stream(next_frame()),
        "sequential": lambda: sequential(next_frame()),
        "diffusers": lambda: reference(
            prompt=prompt,
            image=next_frame(),
            strength=1.0,
            num_inference_steps=steps,
            timesteps=taus,
            guidance_scale=1.0,
            output_type="pt",
        ),
        "floor": floor,
    }
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(config.warmup):
        for call in contenders.values():
            call()
    sync()
    for _ in range(config.repeats):
        for name, call in contenders.items():
            start = time.perf_counter()
            call()
            sync()
            samples[name].append(time.perf_counter() - start)
    ms = {name: _median_ms(values) for name, values in samples.items()}

    static = engine_of(True)
    static.set_similarity_filter(enabled=True, threshold=0.98, max_skip=10)
    still = frames[0]
    for _ in range(44):
        static(still)
    skip_rate = static.stats.skipped / static.stats.frames

    return Row(
        steps=steps,
        cfg_type=cfg,
        t_index_list=t_index,
        engine_ms=ms["engine"],
        engine_fps=round(1000.0 / ms["engine"], 2),
        sequential_ms=ms["sequential"],
        stream_batch_speedup=round(ms["sequential"] / ms["engine"], 3),
        diffusers_ms=ms["diffusers"],
        speedup_vs_diffusers=round(ms["diffusers"] / ms["engine"], 3),
        floor_ms=ms["floor"],
        overhead_ratio=round(ms["engine"] / ms["floor"], 3),
        skip_rate_static=round(skip_rate, 3),
    )


def run_bench(config: BenchConfig, progress: Callable[[str], None] = lambda _msg: None) -> dict[str, Any]:
    """Run every (steps, cfg) row and return the JSON-ready report."""
    import diffusers

    for n in config.steps:
        if n not in T_INDEX_PRESETS:
            raise ValueError(f"steps must be among {sorted(T_INDEX_PRESETS)}, got {n}")
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
    for steps in config.steps:
        for cfg in config.cfg_types:
            progress(f"measuring {steps} step(s), cfg_type={cfg}")
            rows.append(asdict(measure(pipe, config, steps, cfg, size)))
    live = None
    if config.live:
        from bridge.bench_live import run_live_bench
        from bridge.runtime import EngineDriver

        def factory_for(px: int) -> Callable[[Any], EngineDriver]:
            return lambda _cfg: EngineDriver(
                StreamEngine(pipe, [32, 45], width=px, height=px, cfg_type="self")
            )

        live = run_live_bench(factory_for, progress, osc_size=size, sizes=tuple(config.live_sizes))
    device_name = (
        torch.cuda.get_device_name(0)
        if config.device.startswith("cuda")
        else platform.processor() or platform.machine()
    )
    return {
        "device": config.device,
        "device_name": device_name,
        "arch": config.arch,
        "dtype": str(dtype).removeprefix("torch."),
        "acceleration": config.acceleration,
        "resolution": [size, size],
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "threads": torch.get_num_threads(),
        "repeats": config.repeats,
        "warmup": config.warmup,
        "matching": "diffusers img2img gets timesteps=[the engine's taus], strength=1.0, guidance_scale=1.0: "
        "n UNet calls of batch 1 at the engine's timesteps vs the engine's one call of batch n",
        "engine": rows,
        "targets": TARGETS,
        "live": live,
    }


def format_table(report: dict[str, Any]) -> str:
    """A human-readable table of `run_bench`'s report."""
    head = (
        f"{report['arch']} on {report['device']} ({report['device_name']}), {report['resolution'][0]}px, "
        f"{report['dtype']}, acceleration {report['acceleration']}"
    )
    cols = (
        "steps",
        "cfg_type",
        "engine_ms",
        "engine_fps",
        "diffusers_ms",
        "speedup_vs_diffusers",
        "stream_batch_speedup",
        "floor_ms",
        "overhead_ratio",
        "skip_rate_static",
    )
    lines = [head, "  ".join(cols)]
    for row in report["engine"]:
        lines.append("  ".join(str(row[c]).rjust(len(c)) for c in cols))
    live = report.get("live")
    if live:
        for row in live["shm"]:
            lines.append(
                f"shm round trip {row['size'][0]}px: {row['shm_round_trip_ms']} ms vs numpy copy "
                f"{row['numpy_copy_ms']} ms ({row['ratio_vs_copy']}x)"
            )
        for row in live["sinks"]:
            if not row["available"]:
                lines.append(f"sink {row['kind']}: not measured here ({row['reason']})")
                continue
            lines.append(
                f"sink {row['kind']} write {row['size'][0]}px: {row['write_ms']} ms vs numpy copy "
                f"{row['numpy_copy_ms']} ms ({row['ratio_vs_copy']}x)"
            )
        osc = live["osc"]
        lines.append(
            f"OSC to applied {osc['size'][0]}px: {osc['osc_to_applied_ms']} ms (frame {osc['frame_ms']} ms), "
            f"at most {osc['frames_in_between_max']} frame(s) in between"
        )
        ov = live["overhead"]
        lines.append(
            f"bridge overhead {ov['size'][0]}px: latency {ov['latency_ms']} ms - engine {ov['engine_ms']} ms "
            f"= {ov['overhead_ms']} ms"
        )
    return "\n".join(lines)
