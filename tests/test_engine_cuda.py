"""The CUDA paths themselves, for a machine with a GPU (skipped elsewhere, with the reason).

`pytest tests/test_engine_cuda.py` on a CUDA machine checks what the CPU suite can only check on
stand-ins: a real whole-frame capture replays bit for bit what the eager fp16 frame gives, for
every cfg_type at 1, 2 and 4 steps, through live changes and a guidance crossing; the crossing
captures nothing new; compile inside the frame graph stays close to the exact path and compiles
nothing after warm-up. Never run in this project's sessions so far (no GPU was lent when it was
written); the device-check script `docs/device-check.sh` runs it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from bridge.engine import StreamEngine
from bridge.engine.accel.graphs import CudaGraphBackend
from bridge.engine.loading import LoadOptions, load_pipeline
from tests.conftest import pattern_uint8
from tests.test_engine_graphs import FRAMES, assert_replays_as_eager, live_change

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none here)")

SIZE = 64


@pytest.fixture(scope="module")
def cuda_pipe(model_cache: Path) -> Any:
    return load_pipeline("tiny", LoadOptions(cache_dir=model_cache, device="cuda", dtype=torch.float16))


def _engines(pipe: Any, cfg: str, t_index: list[int], acceleration: str) -> tuple[StreamEngine, StreamEngine]:
    eager = StreamEngine(pipe, t_index, width=SIZE, height=SIZE, cfg_type=cfg)
    fast = StreamEngine(pipe, t_index, width=SIZE, height=SIZE, cfg_type=cfg, acceleration=acceleration)
    for engine in (eager, fast):
        engine.prepare("a photo of a cat", negative_prompt="blurry", guidance_scale=1.8, delta=0.7, seed=5)
    return eager, fast


@pytest.mark.parametrize("t_index", [[35], [32, 45], [20, 30, 38, 45]], ids=["1step", "2steps", "4steps"])
@pytest.mark.parametrize("cfg", ["none", "full", "self", "initialize"])
def test_a_captured_frame_replays_bit_for_bit(cuda_pipe: Any, cfg: str, t_index: list[int]) -> None:
    eager, graph = _engines(cuda_pipe, cfg, t_index, "cuda_graph")
    assert isinstance(graph._graphs.backend, CudaGraphBackend)  # type: ignore[union-attr]
    captured = graph.warm_up(pattern_uint8(0, SIZE))
    for k in range(FRAMES):
        for engine in (eager, graph):
            live_change(engine, k, cfg)
        frame = pattern_uint8(k, SIZE)
        assert np.array_equal(graph(frame, output_type="uint8"), eager(frame, output_type="uint8")), k
    assert graph.acceleration_fallback == ""
    assert graph._graphs.captures == captured  # type: ignore[union-attr]


def test_compile_inside_the_frame_graph_is_close_and_compiles_nothing_after_warm_up(cuda_pipe: Any) -> None:
    eager, fast = _engines(cuda_pipe, "full", [32, 45], "compile+cuda_graph")
    fast.warm_up(pattern_uint8(0, SIZE))
    from torch._dynamo.utils import counters

    # Every frame below replays a graph captured at warm-up: a layout missed there would be
    # captured (and compiled) mid-show, which the capture and dynamo frame counts would show.
    captures, compiled = fast._graphs.captures, counters["frames"]["total"]
    with torch._dynamo.config.patch(error_on_recompile=True):
        for k in range(FRAMES):
            for engine in (eager, fast):
                live_change(engine, k, "full")
            frame = pattern_uint8(k, SIZE)
            got = fast(frame, output_type="uint8").astype(np.float64)
            want = eager(frame, output_type="uint8").astype(np.float64)
            mse = float(np.mean((got - want) ** 2))
            assert mse == 0 or 10 * np.log10(255**2 / mse) > 30, k
    assert fast.acceleration_fallback == ""
    assert fast._graphs.captures == captures and counters["frames"]["total"] == compiled


@pytest.mark.parametrize("family", ["tiny-sd21", "tiny-sdxl"])
def test_the_kl_vae_and_sdxl_replay_bit_for_bit(model_cache: Path, family: str) -> None:
    pipe = load_pipeline(family, LoadOptions(cache_dir=model_cache, device="cuda", dtype=torch.float16))
    eager, graph = _engines(pipe, "initialize", [32, 45], "cuda_graph")
    graph.warm_up(pattern_uint8(0, SIZE))
    assert_replays_as_eager(eager, graph, "initialize", 6, SIZE)


def test_txt2img_a_new_input_kind_and_a_step_change_replay_bit_for_bit(cuda_pipe: Any) -> None:
    """Captures made on demand (a new input kind inside a frame) and again after a step-count
    change, into the same memory pool, still replay what eager gives."""
    eager, graph = _engines(cuda_pipe, "full", [32, 45], "cuda_graph")
    graph.warm_up(None)
    for k in range(3):
        assert np.array_equal(graph(None, output_type="uint8"), eager(None, output_type="uint8")), k
    for k in range(3, 6):  # uint8 input: captured inside the first such frame
        frame = pattern_uint8(k, SIZE)
        assert np.array_equal(graph(frame, output_type="uint8"), eager(frame, output_type="uint8")), k
    for engine in (eager, graph):
        engine.set_t_index_list([20, 30, 38, 45])
    assert graph.needs_warm_up
    graph.warm_up()
    for k in range(6, 10):
        frame = pattern_uint8(k, SIZE)
        assert np.array_equal(graph(frame, output_type="uint8"), eager(frame, output_type="uint8")), k
    assert graph.acceleration_fallback == ""
