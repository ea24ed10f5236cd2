"""`acceleration: tensorrt` wired into the engine, on the CPU: the onnxruntime backend (which runs
the whole engine path as TensorRT would: static profiles, I/O bound by address) stands in for
TensorRT, whose runtime cannot exist here. Also what happens where TensorRT is missing, in the
engine, the runtime's status and `doctor`."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from bridge.config import load_config
from bridge.doctor import check_config
from bridge.engine import StreamEngine
from bridge.engine.accel.backend import BuildCancelled
from bridge.engine.accel.engine_cache import DeviceInfo
from bridge.engine.accel.engine_networks import ENGINE_CACHE, EngineNetworks, engine_networks
from bridge.engine.accel.onnx_export import Component
from bridge.engine.accel.onnxruntime_backend import OnnxRuntimeBackend
from tests.conftest import pattern_uint8
from tests.test_doctor import _rows

SIZE = 32
GPU = DeviceInfo("NVIDIA H200", (9, 0))


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


@pytest.fixture(scope="module")
def ort_networks(tiny_pipe: Any, tmp_path_factory: pytest.TempPathFactory) -> EngineNetworks:
    cache = tmp_path_factory.mktemp("engines")
    return engine_networks(
        tiny_pipe,
        model="tiny",
        width=SIZE,
        height=SIZE,
        cfg_type="full",
        step_counts=(2,),
        frame_buffer_size=1,
        cache_dir=cache,
        backend=OnnxRuntimeBackend(),
        device=GPU,
        bars=False,
    )


def test_engines_run_the_frame_through_static_buffers(tiny_pipe: Any, ort_networks: EngineNetworks) -> None:
    nets = ort_networks
    assert nets.report.ok, nets.report.fallbacks
    assert nets.report.ready[Component.UNET].spec.rows == (2, 4)  # full, 2 steps: n and 2n rows
    engine = StreamEngine(
        tiny_pipe, [32, 45], width=SIZE, height=SIZE, cfg_type="full", acceleration="tensorrt", networks=nets
    )
    eager = StreamEngine(tiny_pipe, [32, 45], width=SIZE, height=SIZE, cfg_type="full")
    for e in (engine, eager):
        e.prepare("a cat", negative_prompt="blurry", guidance_scale=1.8, seed=2)
    scores = []
    for k in range(6):
        if k == 3:
            for e in (engine, eager):
                e.set_guidance_scale(1.0)  # the other profile
        frame = pattern_uint8(k, SIZE)
        scores.append(_psnr(engine(frame, output_type="uint8"), eager(frame, output_type="uint8")))
    assert min(scores) > 40, scores  # fast, not exact: within float rounding of torch
    assert set(nets._slots) == {
        (Component.UNET, 2),
        (Component.UNET, 4),
        (Component.VAE_ENCODER, 1),
        (Component.VAE_DECODER, 1),
    }
    assert engine.acceleration_fallback == ""
    # The buffers are bound once: the same addresses every frame.
    pointers = {key: out.data_ptr() for key, (_ins, out) in nets._slots.items()}
    engine(pattern_uint8(7, SIZE), output_type="uint8")
    assert pointers == {key: out.data_ptr() for key, (_ins, out) in nets._slots.items()}


def test_each_engine_call_binds_and_runs_with_the_engine_s_device_current(
    tiny_pipe: Any, ort_networks: EngineNetworks, monkeypatch: pytest.MonkeyPatch
) -> None:
    """TensorRT runs on the thread's current CUDA device, torch's ops on their tensors' one: an
    engine on cuda:1 called with cuda:0 current must be switched to cuda:1 around every bind and
    run (eager frames too, not only a graph's replay)."""
    events: list[tuple[str, Any]] = []
    current: list[Any] = []

    @contextlib.contextmanager
    def guard(device: torch.device) -> Iterator[None]:
        current.append(device)
        try:
            yield
        finally:
            current.pop()

    nets = EngineNetworks(tiny_pipe, ort_networks.report, name="guarded", device_guard=guard)
    for component in (Component.UNET, Component.VAE_ENCODER, Component.VAE_DECODER):
        runner = nets.report.ready[component].runner
        for method in ("bind", "run"):
            original = getattr(runner, method)

            def recorded(*args: Any, _original: Any = original, _name: str = method) -> Any:
                events.append((_name, current[-1] if current else None))
                return _original(*args)

            monkeypatch.setattr(runner, method, recorded)
    engine = StreamEngine(
        tiny_pipe, [32, 45], width=SIZE, height=SIZE, cfg_type="full", acceleration="tensorrt", networks=nets
    )
    engine.prepare("a cat", negative_prompt="blurry", guidance_scale=1.8, seed=2)
    for k in range(2):
        engine(pattern_uint8(k, SIZE), output_type="uint8")
    assert [name for name, _ in events].count("run") == 2 * 3  # encoder, UNet, decoder per frame
    assert {name for name, _ in events} == {"bind", "run"}
    assert all(device == tiny_pipe.unet.device for _, device in events), events


def test_a_step_count_without_a_profile_runs_the_unet_in_torch_and_says_so(
    tiny_pipe: Any, ort_networks: EngineNetworks
) -> None:
    engine = StreamEngine(
        tiny_pipe,
        [32, 45],
        width=SIZE,
        height=SIZE,
        cfg_type="full",
        acceleration="tensorrt",
        networks=ort_networks,
    )
    engine.prepare("a cat", guidance_scale=1.8, seed=2)
    engine(pattern_uint8(0, SIZE), output_type="uint8")
    engine.set_t_index_list([20, 30, 38, 45])  # 4 and 8 rows: no profile
    out = engine(pattern_uint8(1, SIZE), output_type="uint8")
    assert out.shape == (SIZE, SIZE, 4)
    assert (
        "no engine profile for 8 rows (built for [2, 4]): the unet runs in torch"
        in engine.acceleration_fallback
    )
    engine.set_guidance_scale(1.0)  # 4 rows: a profile again, and the status says so
    engine(pattern_uint8(2, SIZE), output_type="uint8")
    assert engine.acceleration_fallback == ""
    engine.set_t_index_list([10, 20, 30])  # 6 rows: one reason at a time, the current one
    engine(pattern_uint8(3, SIZE), output_type="uint8")
    assert engine.acceleration_fallback == (
        "unet at 3 rows: no engine profile for 3 rows (built for [2, 4]): the unet runs in torch at this step count"
    )
    engine.set_t_index_list([32, 45])
    engine(pattern_uint8(4, SIZE), output_type="uint8")
    assert engine.acceleration_fallback == ""


def test_without_tensorrt_every_component_runs_exactly_in_torch_and_the_status_says_why(
    tiny_pipe: Any, tmp_path: Path
) -> None:
    try:
        import tensorrt  # noqa: F401

        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    engine = StreamEngine(
        tiny_pipe, [32, 45], width=SIZE, height=SIZE, acceleration="tensorrt", cache_dir=tmp_path
    )
    eager = StreamEngine(tiny_pipe, [32, 45], width=SIZE, height=SIZE)
    for e in (engine, eager):
        e.prepare("a cat", seed=2)
    assert 'pip install "streamdiffusion-bridge[tensorrt]"' in engine.acceleration_fallback
    for k in range(3):
        frame = pattern_uint8(k, SIZE)
        assert np.array_equal(engine(frame, output_type="uint8"), eager(frame, output_type="uint8"))

    from bridge.runtime import Bridge, EngineDriver
    from tests.test_runtime import GatedSource, in_background, wait_for

    config = load_config(
        None,
        ["output.kind=null", "extra_outputs=[]", "osc.enabled=false", "engine.width=64", "engine.height=64"],
    )
    shown = StreamEngine(
        tiny_pipe, [32, 45], width=64, height=64, acceleration="tensorrt", cache_dir=tmp_path
    )
    bridge = Bridge(config, engine_factory=lambda _cfg: EngineDriver(shown), source=GatedSource())
    with in_background(bridge, start_timeout_s=120) as infos:
        wait_for(lambda: len(infos) >= 2)
        wait_for(lambda: "streamdiffusion-bridge[tensorrt]" in bridge.status().error)
        assert bridge.status().state == "running"  # a fallback is reported, and the show goes on


def test_a_stop_during_the_engine_build_cancels_it(
    model_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The runtime's own loader (no engine_factory given) hands the build its stop: Ctrl+C during
    a TensorRT build (minutes, in a child process) ends the build, not only the wait for it."""
    import bridge.engine.accel.engine_networks as module
    from bridge.runtime import Bridge
    from tests.test_runtime import GatedSource

    building, seen = threading.Event(), []

    def held_build(pipe: Any, *, cancel: threading.Event | None = None, **_kw: Any) -> Any:
        seen.append(cancel)
        building.set()
        assert cancel is not None and cancel.wait(30), "the build was never told to stop"
        raise BuildCancelled("the unet engine build was stopped")

    monkeypatch.setattr(module, "engine_networks", held_build)
    config = load_config(
        None,
        [
            "output.kind=null",
            "extra_outputs=[]",
            "osc.enabled=false",
            "engine.model=tiny",
            "engine.device=cpu",
            "engine.acceleration=tensorrt",
            f"engine.cache_dir={model_cache}",
            "engine.width=64",
            "engine.height=64",
        ],
    )
    bridge = Bridge(config, source=GatedSource())
    stop = threading.Event()
    thread = threading.Thread(target=bridge.run, args=(stop,))
    thread.start()
    try:
        assert building.wait(120)
        stopped = time.monotonic()
        stop.set()
        thread.join(10)
        assert not thread.is_alive() and time.monotonic() - stopped < 2.0
        assert seen[0].is_set()
    finally:
        stop.set()
        if seen:
            seen[0].set()


def test_doctor_compares_tensorrt_s_cuda_with_torch_s(tmp_path: Path) -> None:
    """NVIDIA's `tensorrt` metapackage brings CUDA 13 wheels; a torch built for CUDA 12 cannot
    load engines beside them. doctor names the extra that matches torch."""
    from bridge.doctor import tensorrt_cuda_major

    assert tensorrt_cuda_major(["numpy", "tensorrt_cu13_libs", "tensorrt"]) == 13
    assert tensorrt_cuda_major(["tensorrt-cu12"]) == 12
    assert tensorrt_cuda_major(["tensorrt_cu12_bindings"]) == 12
    assert tensorrt_cuda_major(["tensorrt", "tensorrt_cu12_libsx", "pytensorrt-cu12"]) is None
    with pytest.raises(ValueError, match="TensorRT wheels for CUDA 12 and 13 are both installed"):
        tensorrt_cuda_major(["tensorrt_cu13_libs", "tensorrt_cu12_libs"])
    conflict = {"installed": True, "version": "11.4", "conflict": "TensorRT wheels for CUDA 12 and 13 ..."}
    config = load_config(None, ["engine.acceleration=tensorrt", f"engine.cache_dir={tmp_path}"])
    notes = check_config(config, {"cuda": True, "cuda_version": "12.8"}, _rows(), trt_info=conflict)
    assert notes["acceleration_notes"] == ["tensorrt: TensorRT wheels for CUDA 12 and 13 ..."]
    config = load_config(None, ["engine.acceleration=tensorrt", f"engine.cache_dir={tmp_path}"])
    torch12 = {"cuda": True, "cuda_version": "12.8"}
    trt13 = {"installed": True, "version": "11.4.0.106", "cuda_major": 13}
    assert check_config(config, torch12, _rows(), trt_info=trt13)["acceleration_notes"] == [
        "tensorrt: TensorRT is built for CUDA 13 and torch for CUDA 12.8; they must share one CUDA: "
        'pip install "streamdiffusion-bridge[tensorrt-cu12]" (engines that fail to build or load run on '
        "the exact torch path)"
    ]
    same = {"cuda": True, "cuda_version": "13.0"}
    assert check_config(config, same, _rows(), trt_info=trt13)["acceleration_notes"] == []
    unknown = {"installed": True, "version": "11.4.0.106"}  # installed some other way: not judged
    assert check_config(config, torch12, _rows(), trt_info=unknown)["acceleration_notes"] == []


def test_the_tensorrt_extras_pin_the_cuda_doctor_names() -> None:
    import tomllib

    extras = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    for cuda in (12, 13):
        assert extras[f"tensorrt-cu{cuda}"][0].startswith(f"tensorrt-cu{cuda}>=")
        assert extras[f"tensorrt-cu{cuda}"][1:] == extras["tensorrt"][1:]


def test_doctor_says_where_tensorrt_will_fall_back(tmp_path: Path) -> None:
    failed = tmp_path / ENGINE_CACHE / "unet-0123abcd"
    failed.mkdir(parents=True)
    (failed / "failed.json").write_text(json.dumps({"reason": "BuildFailed: out of memory"}))
    config = load_config(None, ["engine.acceleration=tensorrt", f"engine.cache_dir={tmp_path}"])
    verdict = check_config(config, {"cuda": True}, _rows(), trt_info={"installed": True, "version": "10.9"})
    assert verdict["can_run"] and verdict["acceleration"] == "tensorrt"
    assert verdict["acceleration_notes"] == [
        f"tensorrt: an earlier build failed (unet-0123abcd: BuildFailed: out of memory); that component runs "
        f"on the exact torch path until {failed} is deleted"
    ]
    temporary = tmp_path / ENGINE_CACHE / "vae_decoder-4567cdef"
    temporary.mkdir(parents=True)
    (temporary / "failed.json").write_text(
        json.dumps({"reason": "BuildFailed: Error Code 2: OutOfMemory", "transient": True, "attempts": 1})
    )
    verdict = check_config(config, {"cuda": True}, _rows(), trt_info={"installed": True, "version": "10.9"})
    assert verdict["acceleration_notes"][1] == (
        "tensorrt: an earlier build failed (vae_decoder-4567cdef: BuildFailed: Error Code 2: OutOfMemory "
        "(temporary: retried at the next start, attempt 1 of 3)); that component runs on the exact torch "
        "path for now; the next start builds it again"
    )
    missing = check_config(
        config, {"cuda": True}, _rows(), trt_info={"installed": False, "note": "not installed"}
    )
    assert (
        missing["acceleration_notes"][0] == "tensorrt: not installed; frames will run on the exact torch path"
    )


def test_doctor_names_engine_folders_of_an_older_cache_format(tmp_path: Path) -> None:
    """A KEY_FORMAT change leaves the old folders behind: no key reads them again, so their
    failure records no longer speak for any component, and doctor says they can go."""
    from bridge.engine.accel.engine_cache import KEY_FORMAT

    old_plan = tmp_path / ENGINE_CACHE / "unet-00000000old"
    old_plan.mkdir(parents=True)
    (old_plan / "key.json").write_text(json.dumps({"format": KEY_FORMAT - 1, "component": "unet"}))
    (old_plan / "engine.plan").write_bytes(b"\0" * 3 * 2**20)
    old_failure = tmp_path / ENGINE_CACHE / "vae_encoder-0000000old"
    old_failure.mkdir(parents=True)
    (old_failure / "failed.json").write_text(
        json.dumps({"reason": "BuildFailed: old", "key": {"format": KEY_FORMAT - 1}})
    )
    current = tmp_path / ENGINE_CACHE / "vae_decoder-0000000new"
    current.mkdir(parents=True)
    (current / "failed.json").write_text(
        json.dumps({"reason": "BuildFailed: new", "key": {"format": KEY_FORMAT}})
    )
    config = load_config(None, ["engine.acceleration=tensorrt", f"engine.cache_dir={tmp_path}"])
    verdict = check_config(config, {"cuda": True}, _rows(), trt_info={"installed": True, "version": "10.9"})
    assert verdict["acceleration_notes"] == [
        f"tensorrt: 2 engine folder(s) under {tmp_path / ENGINE_CACHE} were written by an older version of "
        "the engine cache and are never read again (3 MiB); delete them to free the space: "
        "unet-00000000old, vae_encoder-0000000old",
        "tensorrt: an earlier build failed (vae_decoder-0000000new: BuildFailed: new); that component runs "
        f"on the exact torch path until {current} is deleted",
    ]


def test_cuda_graph_is_refused_before_the_model_loads_and_by_doctor() -> None:
    from bridge.config import ConfigError, acceleration_problem

    config = load_config(None, ["engine.acceleration=cuda_graph"])
    assert "needs an NVIDIA GPU with a CUDA build of torch" in acceleration_problem(config.engine, cuda=False)
    assert acceleration_problem(config.engine, cuda=True) == ""
    on_cpu = load_config(None, ["engine.acceleration=tensorrt+cuda_graph", "engine.device=cpu"])
    assert "engine.device is cpu" in acceleration_problem(on_cpu.engine, cuda=True)
    verdict = check_config(config, {"cuda": False, "note": "none"}, _rows())
    assert not verdict["can_run"]
    assert any("engine.acceleration=cuda_graph needs an NVIDIA GPU" in p for p in verdict["problems"])
    with pytest.raises(ConfigError, match="use_denoising_batch: true"):
        load_config(None, ["engine.acceleration=cuda_graph", "engine.use_denoising_batch=false"])
    with pytest.raises(
        ConfigError, match=r"engine\.acceleration must be none or parts joined by '\+'.*choose one"
    ):
        load_config(None, ["engine.acceleration=compile+tensorrt"])
    with pytest.raises(
        ConfigError, match=r"engine\.compile_mode must be one of default, max-autotune-no-cudagraphs"
    ):
        load_config(None, ["engine.compile_mode=reduce-overhead"])
