"""`sdbridge bench --json` and the demo run end to end (structure only: no timing is asserted)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bridge.cli import main


def test_bench_json_reports_every_figure(model_cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
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
            "--live-sizes",
            "64",
            "96",
            "--cache-dir",
            str(model_cache),
        ]
    )
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["arch"] == "tiny" and report["resolution"] == [64, 64]
    rows = report["engine"]
    assert [(r["steps"], r["cfg_type"]) for r in rows] == [(1, "none"), (1, "self"), (2, "none"), (2, "self")]
    for row in rows:
        for key in ("engine_ms", "diffusers_ms", "sequential_ms", "floor_ms"):
            assert row[key] > 0
        assert row["speedup_vs_diffusers"] == pytest.approx(row["diffusers_ms"] / row["engine_ms"], rel=1e-2)
        assert row["overhead_ratio"] == pytest.approx(row["engine_ms"] / row["floor_ms"], rel=1e-2)
        # Identical frames with max_skip=10: exactly 10 of every 11 frames after the first skip.
        assert row["skip_rate_static"] == pytest.approx(40 / 44, abs=1e-3)
    assert "timesteps=[the engine's taus]" in report["matching"]
    live = report["live"]
    assert [row["size"] for row in live["shm"]] == [[64, 64], [96, 96]]
    for row in live["shm"]:
        assert row["ratio_vs_copy"] == pytest.approx(
            row["shm_round_trip_ms"] / row["numpy_copy_ms"], rel=2e-2
        )
    measured = [(row["kind"], row["size"][0]) for row in live["sinks"] if row["available"]]
    assert measured == [(k, px) for k in ("shm", "ndi", "preview", "null") for px in (64, 96)]
    for row in live["sinks"]:
        if row["available"]:
            assert row["write_ms"] > 0 and row["numpy_copy_ms"] > 0
            assert row["ratio_vs_copy"] == pytest.approx(
                row["write_ms"] / row["numpy_copy_ms"], rel=2e-2, abs=0.006
            )
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
