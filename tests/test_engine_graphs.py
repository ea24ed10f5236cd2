"""`acceleration: cuda_graph` on a machine without CUDA: the engine's capture and replay logic
against `tests/fake_cudagraph.py`, a stand-in that replays the recorded aten calls on the recorded
tensors (so, as a real graph, it never sees a buffer rebound or a float baked after capture).

The bar is the issue's: replay output equals eager output bit for bit, for every cfg_type and
for 1, 2 and 4 steps, through live changes; a guidance crossing after warm-up captures nothing;
a skip replays nothing; a step-count change re-captures. On CUDA the same engine code runs with
`CudaGraphBackend`; that was not run here (no GPU was lent).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from bridge.engine import StreamEngine
from tests.conftest import pattern, pattern_uint8
from tests.fake_cudagraph import CaptureError, StandInGraphs

SIZE = 32
FRAMES = 8


def pair(
    pipe: Any, cfg: str, t_index: list[int], **kwargs: Any
) -> tuple[StreamEngine, StreamEngine, StandInGraphs]:
    """An eager engine and a cuda_graph one (stand-in backend), prepared alike."""
    backend = StandInGraphs()
    eager = StreamEngine(pipe, t_index, width=SIZE, height=SIZE, cfg_type=cfg, **kwargs)
    graph = StreamEngine(
        pipe,
        t_index,
        width=SIZE,
        height=SIZE,
        cfg_type=cfg,
        acceleration="cuda_graph",
        graph_backend=backend,
        **kwargs,
    )
    for engine in (eager, graph):
        engine.prepare("a photo of a cat", negative_prompt="blurry", guidance_scale=1.8, delta=0.7, seed=5)
    return eager, graph, backend


def live_change(engine: StreamEngine, k: int, cfg: str) -> None:
    """The same live change on frame k for both engines: everything a show moves without a reload."""
    if k == 2:
        engine.set_prompt([("a watercolor fox", 0.6), ("neon city", 0.4)])
        engine.set_seed([(11, 1.0), (12, 0.5)])
    elif k == 3:
        engine.set_delta(0.3)
        engine.set_guidance_scale(2.6)  # the same side of 1.0
        engine.set_negative_prompt("noisy")
    elif k == 4:
        values = engine.t_index_list
        engine.set_t_index_list([v - 2 for v in values])  # same count: new values in place
    elif k == 5 and cfg != "none":
        engine.set_guidance_scale(1.0)  # a crossing: the other pre-captured layout
    elif k == 6 and cfg != "none":
        engine.set_guidance_scale(3.0)  # and back


def assert_replays_as_eager(
    eager: StreamEngine, graph: StreamEngine, cfg: str, frames: int, size: int
) -> None:
    """`frames` uint8 frames through both engines, with the same live changes: equal bit for bit."""
    for k in range(frames):
        for engine in (eager, graph):
            live_change(engine, k, cfg)
        frame = pattern_uint8(k, size)
        assert np.array_equal(graph(frame, output_type="uint8"), eager(frame, output_type="uint8")), k


@pytest.mark.parametrize("t_index", [[35], [32, 45], [20, 30, 38, 45]], ids=["1step", "2steps", "4steps"])
@pytest.mark.parametrize("cfg", ["none", "full", "self", "initialize"])
def test_replay_equals_eager_bit_for_bit_through_live_changes(
    tiny_pipe: Any, cfg: str, t_index: list[int]
) -> None:
    eager, graph, backend = pair(tiny_pipe, cfg, t_index)
    captured = graph.warm_up(pattern_uint8(0, SIZE))
    assert captured == (1 if cfg == "none" else 2)  # both sides of guidance 1.0
    assert not graph.needs_warm_up
    for k in range(FRAMES):
        for engine in (eager, graph):
            live_change(engine, k, cfg)
        frame = pattern_uint8(k, SIZE)
        want, got = eager(frame, output_type="uint8"), graph(frame, output_type="uint8")
        assert np.array_equal(got, want), f"frame {k}: replay differs from eager"
    assert len(backend.graphs) == captured, "a guidance crossing or a live change captured again"
    assert sum(g.replays for g in backend.graphs) == FRAMES
    assert graph.stats.unet_calls == eager.stats.unet_calls == FRAMES
    assert graph.stats.vae_encodes == eager.stats.vae_encodes
    # The other output types read the replayed frame too.
    frame = pattern_uint8(FRAMES, SIZE)
    assert torch.equal(graph(frame, output_type="pt"), eager(frame, output_type="pt"))
    assert torch.equal(graph(frame, output_type="latent"), eager(frame, output_type="latent"))


@pytest.mark.parametrize("family", ["tiny_sd21_pipe", "tiny_sdxl_pipe"])
def test_replay_equals_eager_for_the_kl_vae_and_sdxl(request: pytest.FixtureRequest, family: str) -> None:
    """SD 2.1's AutoencoderKL samples with CPU-generator noise drawn before the replay; SDXL adds
    pooled embeddings and time ids."""
    pipe = request.getfixturevalue(family)
    eager, graph, _ = pair(pipe, "initialize", [32, 45])
    graph.warm_up(pattern_uint8(0, SIZE))
    assert_replays_as_eager(eager, graph, "initialize", 6, SIZE)


@torch.no_grad()
def test_the_kl_sample_drawn_before_the_frame_is_diffusers_own(tiny_sd21_pipe: Any) -> None:
    """The engine's KL latent (noise drawn ahead, then mean + std * noise) equals
    `latent_dist.sample(generator)` from diffusers, on the same generator stream."""
    engine = StreamEngine(tiny_sd21_pipe, [35], width=SIZE, height=SIZE, cfg_type="none")
    engine.prepare("a cat", seed=3)
    pixels = pattern(1, SIZE) * 2 - 1
    state = engine._generator.get_state()
    want = tiny_sd21_pipe.vae.encode(pixels).latent_dist.sample(torch.Generator().set_state(state))
    staging = engine._inputs.stage(pattern(1, SIZE))
    staging.normalise()
    engine._draw_noise(staging)
    got = engine._encode(staging.pixels)
    assert torch.equal(got, want * tiny_sd21_pipe.vae.config.scaling_factor)


def test_txt2img_replay_equals_eager(tiny_pipe: Any) -> None:
    eager, graph, _ = pair(tiny_pipe, "self", [32, 45])
    graph.warm_up(None)
    for k in range(5):
        live_change(eager, k, "self")
        live_change(graph, k, "self")
        assert np.array_equal(graph(None, output_type="uint8"), eager(None, output_type="uint8")), k


def test_warm_up_leaves_the_stream_as_it_was(tiny_pipe: Any) -> None:
    """Warm-up after some frames (a new input kind) must not disturb the frames in flight."""
    eager, graph, backend = pair(tiny_pipe, "self", [32, 45])
    for k in range(3):
        frame = pattern_uint8(k, SIZE)
        assert np.array_equal(graph(frame, output_type="uint8"), eager(frame, output_type="uint8"))
    assert len(backend.graphs) == 1  # the first frame captured its own layout, lazily
    assert graph.needs_warm_up  # the guided side of this input kind is not captured yet
    graph.warm_up(pattern(0, SIZE))  # float input: a new kind, both sides
    assert len(backend.graphs) == 4
    for k in range(3, 6):
        frame = pattern(k, SIZE)
        assert torch.equal(graph(frame), eager(frame)), k


def test_a_skip_replays_nothing_and_returns_the_previous_frame(tiny_pipe: Any) -> None:
    _, graph, backend = pair(tiny_pipe, "self", [32, 45], similarity_seed=0)
    graph.warm_up(pattern_uint8(0, SIZE))
    graph.set_similarity_filter(enabled=True, threshold=0.0, max_skip=100)
    still = pattern_uint8(0, SIZE)
    first = graph(still, output_type="uint8").copy()
    replays = sum(g.replays for g in backend.graphs)
    for _ in range(3):
        out = graph(still, output_type="uint8")
        assert np.array_equal(out, first)
    assert graph.stats.skipped == 3
    assert sum(g.replays for g in backend.graphs) == replays


def test_warm_up_ends_between_layouts_when_asked_to_stop(tiny_pipe: Any) -> None:
    """Each layout may compile or capture for a minute on a GPU: a stop (Ctrl+C at start) is
    asked for between layouts, and what was left is made ready by the next warm-up."""
    _eager, graph, backend = pair(tiny_pipe, "full", [32, 45])
    assert graph.warm_up(pattern_uint8(0, SIZE), stop=lambda: len(backend.graphs) >= 1) == 1
    assert len(backend.graphs) == 1 and graph.needs_warm_up
    assert graph.warm_up(stop=lambda: False) == 1
    assert len(backend.graphs) == 2 and not graph.needs_warm_up


def test_a_step_count_change_recaptures_and_stays_exact(tiny_pipe: Any) -> None:
    eager, graph, backend = pair(tiny_pipe, "full", [32, 45])
    graph.warm_up(pattern_uint8(0, SIZE))
    for k in range(3):
        frame = pattern_uint8(k, SIZE)
        assert np.array_equal(graph(frame, output_type="uint8"), eager(frame, output_type="uint8"))
    for engine in (eager, graph):
        engine.set_t_index_list([20, 30, 38, 45])
    assert graph.needs_warm_up
    assert graph.warm_up() == 2
    assert not graph.needs_warm_up
    assert len(backend.graphs) == 4
    for k in range(3, 8):
        frame = pattern_uint8(k, SIZE)
        assert np.array_equal(graph(frame, output_type="uint8"), eager(frame, output_type="uint8")), k


def test_cuda_graph_is_refused_without_cuda(tiny_pipe: Any) -> None:
    with pytest.raises(ValueError, match="cuda_graph' needs an NVIDIA GPU"):
        StreamEngine(tiny_pipe, [32, 45], width=SIZE, height=SIZE, acceleration="cuda_graph")
    with pytest.raises(ValueError, match="use_denoising_batch=False is not captured"):
        StreamEngine(
            tiny_pipe,
            [32, 45],
            width=SIZE,
            height=SIZE,
            acceleration="cuda_graph",
            use_denoising_batch=False,
            graph_backend=StandInGraphs(),
        )


# ------------------------------------------------------------------ the stand-in behaves as a graph
def test_the_stand_in_replays_recorded_memory_not_rebound_names() -> None:
    """What makes the engine tests above mean something: a buffer rebound after capture, or a
    Python float changed after capture, is not seen by the replay, as on CUDA."""
    state = {"x": torch.ones(3), "scale": 2.0}
    out = torch.zeros(3)

    def body() -> None:
        torch.mul(state["x"], state["scale"], out=out)
        out.add_(torch.tanh(out))

    graph = StandInGraphs().capture(body)
    state["x"].fill_(3.0)  # in place: seen
    graph.replay()
    assert torch.equal(out, 6.0 + torch.tanh(torch.full((3,), 6.0)))
    state["x"] = torch.full((3,), 5.0)  # rebound: not seen
    state["scale"] = 10.0  # baked at capture: not seen
    graph.replay()
    assert torch.equal(out, 6.0 + torch.tanh(torch.full((3,), 6.0)))


def test_the_stand_in_refuses_what_capture_refuses() -> None:
    x = torch.ones(2)

    def reads() -> None:
        if x.sum() > 0:
            x.add_(1)

    def draws() -> None:
        x.copy_(torch.randn(2, generator=torch.Generator()))

    with pytest.raises(CaptureError, match="read to the host"):
        StandInGraphs().capture(reads)
    with pytest.raises(CaptureError, match="random numbers"):
        StandInGraphs().capture(draws)


class _FailingGraphs(StandInGraphs):
    def capture(self, body: Any) -> Any:
        raise RuntimeError("operation not permitted when stream is capturing")


def test_a_failed_capture_runs_frames_eagerly_and_says_why(tiny_pipe: Any) -> None:
    backend = _FailingGraphs()
    eager = StreamEngine(tiny_pipe, [32, 45], width=SIZE, height=SIZE)
    graph = StreamEngine(
        tiny_pipe, [32, 45], width=SIZE, height=SIZE, acceleration="cuda_graph", graph_backend=backend
    )
    for engine in (eager, graph):
        engine.prepare("a cat", seed=1)
    graph.warm_up(pattern_uint8(0, SIZE))
    assert (
        "capture failed, frames run eagerly: RuntimeError: operation not permitted"
        in graph.acceleration_fallback
    )
    assert not graph.needs_warm_up
    for k in range(3):
        frame = pattern_uint8(k, SIZE)
        assert np.array_equal(graph(frame, output_type="uint8"), eager(frame, output_type="uint8"))
