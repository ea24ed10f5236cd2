"""The benchmark's timing plumbing: CUDA events beside the wall clock, and the similarity filter's
two figures. No time is asserted: the stand-in device's clock is advanced by known amounts, and
the filter's figures are checked for what they ran, not how long it took."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from bridge.bench import timing
from bridge.bench.contenders import bench_frames, screen_call, skipped_frame_call
from bridge.engine import StreamEngine
from tests.fake_cuda_events import FakeDevice, FakeEvent


def test_the_stand_in_refuses_what_torch_refuses() -> None:
    device = FakeDevice()
    start, end = device.event(), device.event()
    with pytest.raises(ValueError, match="must be recorded"):
        start.elapsed_time(end)
    start.record()
    device.work(3.0)
    end.record()
    with pytest.raises(RuntimeError, match="must be completed"):
        start.elapsed_time(end)
    device.synchronize()
    assert start.elapsed_time(end) == 3.0 and end.elapsed_time(start) == -3.0
    untimed = FakeEvent(device)
    untimed.record()
    device.synchronize()
    with pytest.raises(ValueError, match="enable_timing=True"):
        start.elapsed_time(untimed)


def test_a_timed_call_reads_the_events_around_it_after_the_sync() -> None:
    device = FakeDevice()
    device.work(100.0)  # work queued before the call is not the call's
    frame = object()

    def call(arg: Any) -> str:
        assert arg is frame
        device.work(7.25)
        return "out"

    timed = timing.time_call(call, frame, clock=device)
    assert timed.output == "out" and timed.device_ms == 7.25 and timed.seconds > 0
    assert device.synchronizes == 1  # one wait per call: the wall clock's and the events'
    # Without a clock: the wall clock only, and no device time.
    plain = timing.time_call(lambda _arg: "out", frame, clock=None)
    assert plain.device_ms is None and plain.output == "out" and device.synchronizes == 1


def test_the_clock_is_cuda_events_on_cuda_only() -> None:
    assert timing.event_clock("cpu") is None
    assert isinstance(timing.event_clock("cuda"), timing.CudaEvents)
    assert isinstance(timing.event_clock("cuda:1"), timing.CudaEvents)
    assert timing.device_timing("cpu", None).startswith("not taken: device 'cpu' has no CUDA events")
    assert "torch.cuda.Event(enable_timing=True)" in timing.device_timing("cuda", timing.CudaEvents())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_real_cuda_events_time_a_call() -> None:
    x = torch.randn(2048, 2048, device="cuda")
    clock = timing.CudaEvents()
    for _ in range(3):
        timed = timing.time_call(lambda a: a @ a, x, clock=clock)
    assert timed.device_ms is not None and 0.0 < timed.device_ms <= timed.seconds * 1000.0 + 0.5
    assert timed.output.shape == (2048, 2048)


def test_run_bench_reports_each_contenders_device_time(
    model_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bench's events go through the same code as on CUDA, on the stand-in device. Each
    engine call queues 7 ms of device work, each stage_and_screen 0.25 ms (inside the engine's
    call too): every figure must be its own contender's, read after the wait."""
    import bridge.bench as bench_module
    import bridge.bench.rows as rows_module
    from bridge.bench import BenchConfig, format_table, run_bench

    device = FakeDevice()
    for module in (rows_module, bench_module):  # where the bench asks for its clock
        monkeypatch.setattr(module, "event_clock", lambda _device: device)
    call, screen = StreamEngine.__call__, StreamEngine.stage_and_screen

    def engine_call(self: StreamEngine, *args: Any, **kwargs: Any) -> Any:
        device.work(7.0)
        return call(self, *args, **kwargs)

    def screen_work(self: StreamEngine, image: Any) -> Any:
        device.work(0.25)
        return screen(self, image)

    monkeypatch.setattr(StreamEngine, "__call__", engine_call)
    monkeypatch.setattr(StreamEngine, "stage_and_screen", screen_work)
    config = BenchConfig(
        size=64, steps=(1, 2), cfg_types=("self",), repeats=3, warmup=1, live=False, cache_dir=model_cache
    )
    report = run_bench(config)
    assert "torch.cuda.Event(enable_timing=True)" in report["device_timing"]
    assert report["device_ms_taken"] is True
    for row in report["engine"]:
        assert row["engine_device_ms"] == row["sequential_device_ms"] == 7.25
        assert row["skipped_frame_device_ms"] == 7.25
        assert row["filter_device_ms"] == 0.25
        assert row["floor_device_ms"] == row["diffusers_device_ms"] == 0.0  # no engine call in them
    assert "CUDA events around each engine call" in format_table(report)


# ----------------------------------------------------------------------- the similarity filter
def _engine(pipe: Any) -> StreamEngine:
    engine = StreamEngine(pipe, [32, 45], width=64, height=64, cfg_type="self")
    engine.prepare("a photo of a cat", guidance_scale=1.2, delta=1.0, seed=2)
    return engine


def _normalised(frame: np.ndarray) -> np.ndarray:
    """The encoder's pixels of a uint8 frame, from the algorithm: x / 255 * 2 - 1 in fp32, RGB."""
    return frame[..., :3].astype(np.float32) / np.float32(255.0) * np.float32(2.0) - np.float32(1.0)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a64 @ b64 / (np.linalg.norm(a64) * np.linalg.norm(b64)))


def test_the_filter_figure_scores_every_frame_against_the_last_and_runs_no_frame(tiny_pipe: Any) -> None:
    """filter_ms times stage + normalise + score + decision of a frame that passes: each timed
    frame is staged and normalised, scored against the frame before it (which passed and became
    the reference), and not skipped; nothing runs on the models."""
    engine = _engine(tiny_pipe)
    frames = bench_frames(64)
    screened = screen_call(engine, frames[-1])
    previous = frames[-1]
    for frame in [*frames, *frames]:
        engine.similarity.last_similarity = None
        staging, skip = screened(frame)
        assert skip is False
        got = staging.pixels[0].permute(1, 2, 0).numpy()  # (H, W, 3)
        np.testing.assert_allclose(got, _normalised(frame), atol=1e-6)
        assert engine.similarity.last_similarity == pytest.approx(
            _cosine(_normalised(frame), _normalised(previous)), abs=1e-5
        )
        previous = frame
    assert engine.stats.unet_calls == engine.stats.vae_encodes == engine.stats.frames == 0


def test_the_skipped_frame_figure_times_only_skipped_frames(tiny_pipe: Any) -> None:
    """skipped_frame_ms times a frame the filter skips, whatever frames the rotation hands it
    (here: nothing like the still frame), and more than max_skip's default of them in a row.
    Each call returns the still frame's output again without running a model."""
    engine = _engine(tiny_pipe)
    still = bench_frames(64)[0]
    skipped = skipped_frame_call(engine, still)
    assert engine.stats.frames == 1 and engine.stats.skipped == 0  # processed once, untimed
    first = np.array(engine(still, output_type="uint8"))  # a skip: the processed frame again
    unet_calls = engine.stats.unet_calls
    rng = np.random.default_rng(0)
    others = [255 - still, rng.integers(0, 256, still.shape, dtype=np.uint8)]
    for k in range(14):
        before = engine.stats.skipped
        out = skipped(others[k % 2])
        assert engine.stats.skipped == before + 1, f"call {k} was processed, not skipped"
        np.testing.assert_array_equal(out, first)
    assert engine.stats.unet_calls == unet_calls


def test_a_processed_frame_is_never_reported_as_a_skipped_one(
    model_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If the skipped-frame timing ever ran a frame, the bench says so rather than report it."""
    import bridge.bench.rows as rows_module
    from bridge.bench import BenchConfig, run_bench

    def moving(engine: StreamEngine, still: np.ndarray) -> Any:
        engine.set_similarity_filter(enabled=True, threshold=0.0)
        engine(still, output_type="uint8")
        return lambda frame: engine(255 - frame, output_type="uint8")  # not the frame it skips

    monkeypatch.setattr(rows_module, "skipped_frame_call", moving)
    config = BenchConfig(
        size=64, steps=(1,), cfg_types=("none",), repeats=2, warmup=0, live=False, cache_dir=model_cache
    )
    with pytest.raises(RuntimeError, match=r"the skipped-frame timing processed \d+ of its 2 calls"):
        run_bench(config)
