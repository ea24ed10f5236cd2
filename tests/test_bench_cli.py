"""`sdbridge bench --json` and the demo run end to end (structure only: no timing is asserted)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bridge.cli import main


def rounded(expected: float, digits: int) -> Any:
    """`expected` as the report gives it, rounded to `digits` decimals: within half a step
    whatever the figure's size (a relative bound fails a small ratio, 0.014 for 0.0137)."""
    return pytest.approx(expected, abs=0.5 * 10**-digits + 1e-9)


def test_bench_json_reports_every_figure(model_cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    code = main(
        [
            "bench",
            "--json",
            "--size",
            "64",
            "--steps",
            "1",
            "2",
            "--cfg",
            "none",
            "self",
            "--repeats",
            "1",
            "--warmup",
            "1",
            "--acceleration",
            "none",
            "cuda_graph",
            "--live-sizes",
            "64",
            "96",
            "--cache-dir",
            str(model_cache),
        ]
    )
    assert code == 0
    printed = capsys.readouterr()
    report = json.loads(printed.out)
    assert report["arch"] == "tiny" and report["resolution"] == [64, 64]
    # Each row is also said as it is measured (stderr), so a run cut short keeps its figures.
    first = report["engine"][0]
    assert (
        f"[bench]   1 step(s) none none: {first['engine_ms']} ms ({first['engine_fps']} fps), "
        f"floor {first['floor_ms']} ms, diffusers {first['diffusers_ms']} ms" in printed.err
    )
    if not report["engine"][1]["available"]:
        assert (
            "[bench]   1 step(s) none cuda_graph: not available (acceleration 'cuda_graph' needs"
            in printed.err
        )
    assert report["accelerations"] == ["none", "cuda_graph"] and report["compile_modes"] == ["default"]
    assert "output_type='uint8'" in report["path"] and "device-to-host" in report["floor"]
    assert "prompt_embeds" in report["diffusers_io"] and "output_type='pil'" in report["diffusers_io"]
    assert "stage_and_screen" in report["filter"] and ".item()" in report["filter"]
    assert "skips every time" in report["skipped_frame"]
    assert report["device_timing"].startswith("not taken: device 'cpu' has no CUDA events")
    assert report["device_ms_taken"] is False
    rows = report["engine"]
    assert [(r["steps"], r["cfg_type"], r["acceleration"]) for r in rows] == [
        (steps, cfg, acc) for steps in (1, 2) for cfg in ("none", "self") for acc in ("none", "cuda_graph")
    ]
    for row in rows:
        # The contenders the engines ran beside: measured once per (steps, cfg), on every row.
        assert row["diffusers_ms"] > 0 and row["sequential_ms"] > 0
        assert row["sequential_frames_in_flight"] == row["diffusers_frames_in_flight"] == 1
        assert row["sequential_latency_ms"] == row["sequential_ms"]
        assert row["diffusers_latency_ms"] == row["diffusers_ms"]
        assert row["diffusers_fps"] == rounded(1000 / row["diffusers_ms"], 2)
        # The stream batch's output for a frame leaves n - 1 calls later: n frames in flight.
        assert row["frames_in_flight"] == row["steps"] == len(row["t_index_list"])
        # Identical frames with max_skip=10: exactly 10 of every 11 frames after the first skip.
        assert row["skip_rate_static"] == pytest.approx(40 / 44, abs=1e-3)
        assert row["exact"] is True
        # The filter's figures, measured once per (steps, cfg) on the host: on every row.
        assert row["filter_ms"] > 0 and row["skipped_frame_ms"] > 0
        # No CUDA events on the CPU: every device time is null, never a number.
        device_keys = [key for key in row if key.endswith("_device_ms")]
        assert sorted(device_keys) == sorted(
            f"{c}_device_ms"
            for c in ("engine", "sequential", "diffusers", "floor", "filter", "skipped_frame")
        )
        assert all(row[key] is None for key in device_keys)
    for row in (r for r in rows if r["acceleration"] == "none"):
        assert row["available"] is True and row["reason"] is None and row["fallback"] is None
        assert row["engine_ms"] > 0 and row["floor_ms"] > 0
        assert row["warmup_s"] == 0.0  # eager kernels need no warm-up
        assert row["latency_ms"] == rounded(row["steps"] * row["engine_ms"], 3)
        assert row["engine_fps"] == rounded(1000 / row["engine_ms"], 2)
        assert row["speedup_vs_diffusers"] == rounded(row["diffusers_ms"] / row["engine_ms"], 3)
        assert row["stream_batch_speedup"] == rounded(row["sequential_ms"] / row["engine_ms"], 3)
        assert row["overhead_ratio"] == rounded(row["engine_ms"] / row["floor_ms"], 3)
        assert row["floor_networks"] == "torch"
        # The reference against itself: one timed frame per repeat, compared bit for bit.
        assert row["identical_to_none"] is True and row["compared_frames"] == 1
        assert row["psnr_db_vs_none"] is None
    if not torch.cuda.is_available():
        for row in (r for r in rows if r["acceleration"] == "cuda_graph"):
            assert row["available"] is False
            assert "'cuda_graph' needs an NVIDIA GPU" in row["reason"]
            for key in ("engine_ms", "engine_fps", "latency_ms", "floor_ms", "overhead_ratio", "warmup_s"):
                assert row[key] is None
            assert row["identical_to_none"] is None and row["psnr_db_vs_none"] is None
            assert row["compared_frames"] == 0
    assert report["targets"]["overhead_ratio_max"] == 1.10
    assert report["targets"]["speedup_vs_diffusers_min"] == {"2": 1.3, "4": 2.0}
    assert (
        "timesteps=[the engine's taus]" in report["matching"]
        and "only for cfg none and self" in report["matching"]
    )
    live = report["live"]
    assert [row["size"] for row in live["shm"]] == [[64, 64], [96, 96]]
    for row in live["shm"]:
        assert row["ratio_vs_copy"] == rounded(row["shm_round_trip_ms"] / row["numpy_copy_ms"], 2)
    measured = [(row["kind"], row["size"][0]) for row in live["sinks"] if row["available"]]
    assert measured == [(k, px) for k in ("shm", "ndi", "preview", "null") for px in (64, 96)]
    for row in live["sinks"]:
        if row["available"]:
            assert row["write_ms"] > 0 and row["numpy_copy_ms"] > 0
            assert row["ratio_vs_copy"] == rounded(row["write_ms"] / row["numpy_copy_ms"], 2)
        else:
            assert row["kind"] in ("spout", "syphon") and "works only on" in row["reason"]
    osc = live["osc"]
    assert osc["size"] == [64, 64] and osc["messages"] == 15 and osc["osc_to_applied_ms"] > 0
    assert isinstance(osc["frames_in_between_max"], int) and osc["frames_in_between_max"] >= 0
    overhead = live["overhead"]
    assert overhead["size"] == [64, 64] and overhead["frames"] >= 12
    assert overhead["latency_ms"] >= overhead["engine_ms"] > 0
    assert live["targets"] == {
        "shm_vs_copy_max": 3.0,
        "osc_frames_in_between_max": 1,
        "bridge_overhead_ms_max": 1.0,
    }


@pytest.mark.parametrize("offset", [0.0, 0.02])
def test_an_inexact_acceleration_is_compared_by_psnr(
    model_cache: Path, monkeypatch: pytest.MonkeyPatch, offset: float
) -> None:
    """`compile` beside `none` in one loop, its frames compared with none's on the same inputs. A
    stand-in for inductor (whose compile takes a minute here): the pipe's own networks with a
    decoder off by `offset`, as compiled kernels are off by rounding; it records the compile mode
    the engine was built under. With offset 0 the frames must come out identical: both engines
    got the same frame sequence from the same state."""
    import bridge.engine.accel.compile as compile_module
    from bridge.bench import BenchConfig, format_table, run_bench
    from bridge.engine.accel import Networks

    seen_modes = []

    def off_by_a_little(pipe: Any, *, mode: str, cache_dir: Path | None = None, **_kw: Any) -> Networks:
        seen_modes.append(mode)
        decoder = pipe.vae.decoder
        return Networks(pipe, decoder=lambda z: decoder(z) + offset, name="stand-in compile")

    monkeypatch.setattr(compile_module, "compiled_networks", off_by_a_little)
    config = BenchConfig(
        size=64,
        steps=(2,),
        cfg_types=("none",),
        repeats=3,
        warmup=0,
        live=False,
        accelerations=("compile",),
        compile_modes=("max-autotune-no-cudagraphs",),
        cache_dir=model_cache,
    )
    report = run_bench(config)
    assert seen_modes == ["max-autotune-no-cudagraphs"]
    assert report["accelerations"] == ["none", "compile"]  # none added: the reference
    assert report["compile_modes"] == ["max-autotune-no-cudagraphs"]
    none, compiled = report["engine"]
    assert compiled["acceleration"] == "compile" and compiled["exact"] is False
    assert compiled["compile_mode"] == "max-autotune-no-cudagraphs" and none["compile_mode"] is None
    assert compiled["available"] is True and compiled["engine_ms"] > 0
    assert compiled["latency_ms"] == rounded(2 * compiled["engine_ms"], 3)
    assert compiled["floor_networks"] == "stand-in compile" and none["floor_networks"] == "torch"
    assert compiled["overhead_ratio"] == rounded(compiled["engine_ms"] / compiled["floor_ms"], 3)
    assert compiled["compared_frames"] == 3
    if offset == 0.0:
        assert compiled["identical_to_none"] is True and compiled["psnr_db_vs_none"] is None
    else:
        # 0.02 in [-1, 1] is 2.55 levels before rounding and clamping: about 40 dB, far from identical.
        assert compiled["identical_to_none"] is False
        assert isinstance(compiled["psnr_db_vs_none"], float) and 30.0 < compiled["psnr_db_vs_none"] < 60.0
    assert isinstance(compiled["warmup_s"], float) and compiled["warmup_s"] >= 0.0
    table = format_table(report)
    assert "device_ms: not taken: device 'cpu' has no CUDA events" in table
    assert ("identical" if offset == 0.0 else f"{compiled['psnr_db_vs_none']} dB") in table


def test_compile_modes_run_side_by_side(
    model_cache: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--compile-mode default max-autotune-no-cudagraphs`: every acceleration with compile is
    an engine of its own per mode in the same loop, each on its own compiled networks and floor;
    the others once. The stand-in's decoder is off by a mode's own offset, so each row's
    agreement shows that its frames came from its own mode's networks."""
    import bridge.engine.accel.compile as compile_module
    from bridge.engine.accel import Networks

    offsets = {"default": 0.0, "max-autotune-no-cudagraphs": 0.02}
    seen_modes = []

    def off_by_mode(pipe: Any, *, mode: str, cache_dir: Path | None = None, **_kw: Any) -> Networks:
        seen_modes.append(mode)
        decoder, offset = pipe.vae.decoder, offsets[mode]
        return Networks(pipe, decoder=lambda z: decoder(z) + offset, name=f"stand-in {mode}")

    monkeypatch.setattr(compile_module, "compiled_networks", off_by_mode)
    code = main(
        ["bench", "--size", "64", "--steps", "1", "--cfg", "none", "--repeats", "2", "--warmup", "0",
         "--no-live", "--acceleration", "compile", "cuda_graph", "--compile-mode", "default",
         "max-autotune-no-cudagraphs", "default", "--json", "--cache-dir", str(model_cache)]
    )  # fmt: skip
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["compile_modes"] == ["default", "max-autotune-no-cudagraphs"]  # each once
    assert seen_modes == ["default", "max-autotune-no-cudagraphs"]
    rows = {(r["acceleration"], r["compile_mode"]): r for r in report["engine"]}
    assert list(rows) == [
        ("none", None),
        ("compile", "default"),
        ("compile", "max-autotune-no-cudagraphs"),
        ("cuda_graph", None),
    ]
    default, autotuned = rows["compile", "default"], rows["compile", "max-autotune-no-cudagraphs"]
    assert default["floor_networks"] == "stand-in default"
    assert autotuned["floor_networks"] == "stand-in max-autotune-no-cudagraphs"
    assert default["identical_to_none"] is True and default["psnr_db_vs_none"] is None
    assert autotuned["identical_to_none"] is False and 30.0 < autotuned["psnr_db_vs_none"] < 60.0
    assert default["engine_ms"] > 0 and autotuned["engine_ms"] > 0
    if not __import__("torch").cuda.is_available():
        assert rows["cuda_graph", None]["available"] is False
    with pytest.raises(SystemExit) as refused:  # inductor's own CUDA graphs: refused by argparse
        main(["bench", "--compile-mode", "reduce-overhead"])
    assert refused.value.code == 2
    assert "invalid choice: 'reduce-overhead'" in capsys.readouterr().err


def test_cudnn_benchmark_is_on_while_its_engine_warms_up_and_runs(
    model_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """cuDNN chooses kernels when a layout is captured or first run: a cudnn_benchmark engine
    must warm up (capture) with the switch on, and every other contender with it off."""
    import torch

    from bridge.bench import BenchConfig, run_bench
    from bridge.engine import StreamEngine

    seen: dict[str, list[bool]] = {}
    warm_up, call = StreamEngine.warm_up, StreamEngine.__call__

    def recording_warm_up(self: StreamEngine, *examples: Any) -> int:
        seen.setdefault(f"warm_up {self.acceleration}", []).append(torch.backends.cudnn.benchmark)
        return warm_up(self, *examples)

    def recording_call(self: StreamEngine, *args: Any, **kwargs: Any) -> Any:
        seen.setdefault(f"call {self.acceleration}", []).append(torch.backends.cudnn.benchmark)
        return call(self, *args, **kwargs)

    monkeypatch.setattr(StreamEngine, "warm_up", recording_warm_up)
    monkeypatch.setattr(StreamEngine, "__call__", recording_call)
    config = BenchConfig(
        size=64,
        steps=(1,),
        cfg_types=("none",),
        repeats=2,
        warmup=0,
        live=False,
        accelerations=("cudnn_benchmark",),
        cache_dir=model_cache,
    )
    run_bench(config)
    assert seen["warm_up cudnn_benchmark"] == [True] and seen["warm_up none"] == [False]
    assert set(seen["call cudnn_benchmark"]) == {True}
    assert set(seen["call none"]) == {False}  # the none engine, the sequential one, the skip-rate one
    assert torch.backends.cudnn.benchmark is False


def test_agreement_is_bit_for_bit_and_psnr_from_its_definition() -> None:
    from bridge.bench.compare import agreement, psnr_db

    rng = np.random.default_rng(0)
    frames = [rng.integers(1, 255, (8, 8, 4), dtype=np.uint8) for _ in range(3)]
    same = agreement(frames, [f.copy() for f in frames])
    assert same.identical is True and same.psnr_db == math.inf and same.frames == 3
    # Every RGB value one level up: MSE 1, so PSNR = 10 log10(255^2 / 1) = 48.13 dB.
    up = [np.concatenate([f[..., :3] + 1, f[..., 3:]], axis=-1) for f in frames]
    assert agreement(frames, up).identical is False
    assert agreement(frames, up).psnr_db == pytest.approx(48.1308, abs=1e-4)
    # Alpha is not compared (the engine writes 255 there; other contenders have none).
    alpha = [np.concatenate([f[..., :3], 255 - f[..., 3:]], axis=-1) for f in frames]
    assert agreement(frames, alpha).identical is True
    # One value off by 255 in 3*8*8*3 values: MSE = 255^2 / 576, PSNR = 10 log10(576).
    one = [f.copy() for f in frames]
    one[1][2, 3, 0] = 0 if one[1][2, 3, 0] == 255 else 255
    diff = abs(int(one[1][2, 3, 0]) - int(frames[1][2, 3, 0]))
    assert psnr_db(np.stack(frames)[..., :3], np.stack(one)[..., :3]) == pytest.approx(
        10 * math.log10(255**2 / (diff**2 / 576))
    )
    with pytest.raises(ValueError, match="same non-zero number of frames"):
        agreement(frames, frames[:2])


def test_bench_acceleration_choices_are_the_engines() -> None:
    """The CLI spells the choices itself (building the parser imports no torch): they must agree."""
    import argparse

    from bridge.acceleration import COMPILE_MODES
    from bridge.cli import build_parser
    from bridge.engine.accel import ACCELERATIONS

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    bench = {a.dest: a for a in sub.choices["bench"]._actions}
    assert bench["acceleration"].default == ["none"] and bench["acceleration"].nargs == "+"
    spell = bench["acceleration"].type
    assert [spell(a) for a in ACCELERATIONS] == list(ACCELERATIONS)
    assert spell("channels_last+cuda_graph") == "cuda_graph+channels_last"
    with pytest.raises(argparse.ArgumentTypeError, match="'graphs' is not one of"):
        spell("graphs")
    assert tuple(bench["compile_mode"].choices) == COMPILE_MODES


def test_bench_refuses_cuda_without_a_gpu(model_cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["bench", "--device", "cuda", "--cache-dir", str(model_cache)]) == 2
    assert "torch sees no CUDA device on this machine" in capsys.readouterr().err


def test_python_m_bridge_bench_is_the_same_command(model_cache: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "bridge.bench",
            "--size",
            "64",
            "--steps",
            "1",
            "--cfg",
            "none",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--no-live",
            "--cache-dir",
            str(model_cache),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    assert json.loads(out.stdout)["engine"][0]["steps"] == 1


def test_demo_writes_a_contact_sheet(
    model_cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from PIL import Image

    code = main(
        [
            "demo",
            "--size",
            "64",
            "--frames",
            "6",
            "--out",
            str(tmp_path),
            "--cache-dir",
            str(model_cache),
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "frame 2: prompt -> 'neon city at night'" in out and "fps" in out
    sheet = Image.open(tmp_path / "demo.png")
    assert sheet.size == (64 * 6, 128)


def test_bench_steps_are_refused_by_the_parser_unless_a_preset_exists(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from bridge.bench.config import T_INDEX_PRESETS
    from bridge.cli import BENCH_STEPS

    assert tuple(sorted(T_INDEX_PRESETS)) == BENCH_STEPS
    with pytest.raises(SystemExit) as info:
        main(["bench", "--steps", "5"])
    assert info.value.code == 2
    assert "argument --steps: invalid choice: 5 (choose from 1, 2, 3, 4)" in capsys.readouterr().err
