"""The acceleration seam and `acceleration: compile` on the CPU.

- `Networks` calls the inner modules; it must give exactly what diffusers' `encode`/`decode` give.
- No compile mid-show: after `warm_up`, a guidance crossing and further frames trigger no
  recompilation (checked with dynamo's `error_on_recompile`, on its `eager` backend: guards and
  recompiles are dynamo's, whatever backend runs the graph, and inductor takes minutes here).
- The persistent cache: two processes compile the same module with inductor; the second finds
  the first's compiled graph under the model cache.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from bridge.engine import StreamEngine
from bridge.engine.accel import ACCELERATIONS, Acceleration, Networks
from bridge.engine.accel.compile import compile_cache_dir, compiled_networks
from bridge.params import BY_NAME
from tests.conftest import pattern, pattern_uint8
from tests.fake_cudagraph import StandInGraphs

SIZE = 32


def test_the_config_offers_every_acceleration_the_engine_takes() -> None:
    assert BY_NAME["acceleration"].choices == ACCELERATIONS
    for spelling in ACCELERATIONS:
        assert str(Acceleration.parse(spelling)) == spelling
    assert Acceleration.parse("cuda_graph+compile") == Acceleration(compile=True, cuda_graph=True)
    for bad in ("tensor", "compile+compile", "", "none+compile", "compile+tensorrt"):
        with pytest.raises(ValueError, match="acceleration must be none or parts joined by"):
            Acceleration.parse(bad)
    assert Acceleration.parse("cuda_graph").exact and not Acceleration.parse("compile").exact
    assert (
        Acceleration.parse("compile+cuda_graph").replaces_networks
        and Acceleration.parse("tensorrt").replaces_networks
    )
    assert not Acceleration.parse("cuda_graph+channels_last+cudnn_benchmark").replaces_networks
    tuned = Acceleration.parse("cudnn_benchmark+cuda_graph+channels_last")
    assert str(tuned) == "cuda_graph+channels_last+cudnn_benchmark" and not tuned.exact


@pytest.mark.parametrize("family", ["tiny_pipe", "tiny_sd21_pipe", "tiny_sdxl_pipe"])
@torch.no_grad()
def test_networks_give_exactly_what_diffusers_gives(request: pytest.FixtureRequest, family: str) -> None:
    pipe = request.getfixturevalue(family)
    nets = Networks(pipe)
    pixels = pattern(2, SIZE) * 2 - 1
    encoded = pipe.vae.encode(pixels)
    if nets.is_kl:
        assert torch.equal(nets.encode(pixels), encoded.latent_dist.parameters)
    else:
        assert torch.equal(nets.encode(pixels), encoded.latents)
    latents = torch.randn((2, 4, SIZE // 8, SIZE // 8), generator=torch.Generator().manual_seed(0))
    assert torch.equal(nets.decode(latents), pipe.vae.decode(latents, return_dict=False)[0])


def _frames(engine: StreamEngine, start: int, count: int) -> list[Any]:
    return [engine(pattern_uint8(k, SIZE), output_type="uint8").copy() for k in range(start, start + count)]


@pytest.mark.parametrize("cfg", ["full", "initialize"])
def test_after_warm_up_a_guidance_crossing_compiles_nothing(tiny_pipe: Any, cfg: str) -> None:
    torch._dynamo.reset()
    nets = compiled_networks(tiny_pipe, backend="eager")
    engine = StreamEngine(
        tiny_pipe, [32, 45], width=SIZE, height=SIZE, cfg_type=cfg, networks=nets, acceleration="compile"
    )
    eager = StreamEngine(tiny_pipe, [32, 45], width=SIZE, height=SIZE, cfg_type=cfg)
    for e in (engine, eager):
        e.prepare("a cat", negative_prompt="blurry", guidance_scale=1.8, seed=4)
    assert engine.needs_warm_up is False  # no input kind seen yet: nothing to know of
    assert engine.warm_up(pattern_uint8(0, SIZE)) == 2
    with torch._dynamo.config.patch(error_on_recompile=True):
        got = _frames(engine, 0, 2)
        engine.set_guidance_scale(1.0)
        got += _frames(engine, 2, 2)
        engine.set_guidance_scale(2.5)
        got += _frames(engine, 4, 2)
    want = _frames(eager, 0, 2)
    eager.set_guidance_scale(1.0)
    want += _frames(eager, 2, 2)
    eager.set_guidance_scale(2.5)
    want += _frames(eager, 4, 2)
    assert all((g == w).all() for g, w in zip(got, want, strict=True))  # the eager backend is exact

    # A step-count change: the new batch sizes compile in warm_up, not in a frame.
    engine.set_t_index_list([20, 30, 38, 45])
    assert engine.needs_warm_up
    assert engine.warm_up() == 2
    with torch._dynamo.config.patch(error_on_recompile=True):
        _frames(engine, 6, 2)
        engine.set_guidance_scale(1.0)
        _frames(engine, 8, 2)


def test_warm_steps_are_compiled_before_the_show_so_a_step_change_compiles_nothing(tiny_pipe: Any) -> None:
    """`warm_steps`: the other step counts a show may switch to (a MIDI knob on steps). The
    first warm-up compiles their batch sizes too, on both sides of guidance 1.0, and leaves the
    stream as `prepare` did: its frames are still exactly the eager engine's."""
    torch._dynamo.reset()
    nets = compiled_networks(tiny_pipe, backend="eager")
    kwargs: dict[str, Any] = {"width": SIZE, "height": SIZE, "cfg_type": "full"}
    engine = StreamEngine(
        tiny_pipe, [32, 45], networks=nets, acceleration="compile", warm_steps=[1, 1], **kwargs
    )
    eager = StreamEngine(tiny_pipe, [32, 45], **kwargs)
    assert engine.warm_steps == (1,)
    for e in (engine, eager):
        e.prepare("a cat", negative_prompt="blurry", guidance_scale=1.8, seed=4)
    assert engine.warm_up(pattern_uint8(0, SIZE)) == 2 * 2  # 1 and 2 steps, each guided or not
    assert engine.t_index_list == [32, 45] and engine.stats.frames == 0
    got, want = [], []
    with torch._dynamo.config.patch(error_on_recompile=True):
        for values, guidance in (([32, 45], 1.8), ([35], 1.8), ([35], 1.0), ([32, 45], 1.0)):
            for e in (engine, eager):
                e.set_t_index_list(values)
                e.set_guidance_scale(guidance)
            if engine.needs_warm_up:
                engine.warm_up()  # the runtime's `warming`: a frame per layout, nothing compiled
            start = len(got)
            got += _frames(engine, start, 2)
            want += _frames(eager, start, 2)
    assert engine.acceleration_fallback == ""
    assert all((g == w).all() for g, w in zip(got, want, strict=True))
    # A count outside warm_steps compiles in warm_up (while the status says `warming`): here
    # dynamo refuses that recompile, and the engine goes on on the exact path, saying why.
    engine.set_t_index_list([20, 30, 38, 45])
    engine.set_guidance_scale(1.8)  # 8 rows: never compiled
    with torch._dynamo.config.patch(error_on_recompile=True):
        engine.warm_up()
    assert "RecompileError" in engine.acceleration_fallback


def test_a_layout_that_fails_to_compile_runs_on_the_exact_path_and_says_why(tiny_pipe: Any) -> None:
    """A compile that fails at warm-up (a backend error, out of memory while autotuning) must
    not end the show: frames run on the exact torch networks from then on, and the status
    (`acceleration_fallback`) says why."""
    torch._dynamo.reset()

    def broken(graph: Any, example_inputs: Any) -> Any:
        raise RuntimeError("no kernel for aten.convolution on this GPU")

    nets = compiled_networks(tiny_pipe, backend=broken)
    kwargs: dict[str, Any] = {"width": SIZE, "height": SIZE, "cfg_type": "self"}
    engine = StreamEngine(tiny_pipe, [32, 45], networks=nets, acceleration="compile", **kwargs)
    eager = StreamEngine(tiny_pipe, [32, 45], **kwargs)
    for e in (engine, eager):
        e.prepare("a cat", guidance_scale=1.4, seed=4)
    assert engine.acceleration_fallback == ""
    engine.warm_up(pattern_uint8(0, SIZE))
    reason = engine.acceleration_fallback
    assert reason.startswith("compile (")
    assert "failed while warming up, frames run on the exact torch path" in reason
    assert "no kernel for aten.convolution on this GPU" in reason
    got, want = _frames(engine, 0, 3), _frames(eager, 0, 3)
    assert all((g == w).all() for g, w in zip(got, want, strict=True))


def test_with_graphs_a_compile_failure_keeps_the_graphs_over_the_exact_networks(tiny_pipe: Any) -> None:
    """compile+cuda_graph: the compiled networks run once eagerly before the capture, so a
    compile failure falls back to the exact networks and the graph captures those, instead of
    the failure being taken for a capture failure that costs the graphs."""
    torch._dynamo.reset()

    def broken(graph: Any, example_inputs: Any) -> Any:
        raise RuntimeError("no kernel for aten.convolution on this GPU")

    backend = StandInGraphs()
    kwargs: dict[str, Any] = {"width": SIZE, "height": SIZE, "cfg_type": "self"}
    engine = StreamEngine(
        tiny_pipe,
        [32, 45],
        networks=compiled_networks(tiny_pipe, backend=broken),
        acceleration="compile+cuda_graph",
        graph_backend=backend,
        **kwargs,
    )
    eager = StreamEngine(tiny_pipe, [32, 45], **kwargs)
    for e in (engine, eager):
        e.prepare("a cat", guidance_scale=1.4, seed=4)
    assert engine.warm_up(pattern_uint8(0, SIZE)) == 2
    assert "cuda_graph capture failed" not in engine.acceleration_fallback
    assert "failed while warming up, frames run on the exact torch path" in engine.acceleration_fallback
    assert len(backend.graphs) == 2
    got, want = _frames(engine, 0, 3), _frames(eager, 0, 3)
    assert all((g == w).all() for g, w in zip(got, want, strict=True))
    assert sum(g.replays for g in backend.graphs) == 3


def test_warm_steps_beyond_the_schedule_are_left_out(tiny_pipe: Any) -> None:
    """With num_inference_steps=2 no t_index_list holds more than 2 values: warm_steps=[4]
    has nothing to compile (it would index past the schedule)."""
    engine = StreamEngine(
        tiny_pipe,
        [0],
        width=SIZE,
        height=SIZE,
        acceleration="compile",
        networks=Networks(tiny_pipe),
        warm_steps=[2, 4],
    )
    engine.prepare("a cat", num_inference_steps=2, seed=4)
    assert engine.warm_up(pattern_uint8(0, SIZE)) == 2 * 2  # 1 and 2 steps, each guided or not
    assert engine.t_index_list == [0]


def test_a_failure_of_the_exact_path_itself_is_raised(tiny_pipe: Any) -> None:
    """Nothing to fall back to: the caller (the runtime) hears of it."""

    class Broken(Networks):
        def unet(self, *args: Any) -> Any:
            raise RuntimeError("CUDA out of memory")

    engine = StreamEngine(
        tiny_pipe,
        [32, 45],
        width=SIZE,
        height=SIZE,
        networks=Broken(tiny_pipe),
        acceleration="cuda_graph",
        graph_backend=StandInGraphs(),
    )
    engine.prepare("a cat", seed=4)
    with pytest.raises(RuntimeError, match="CUDA out of memory"):
        engine.warm_up(pattern_uint8(0, SIZE))
    assert "cuda_graph capture failed, frames run eagerly" in engine.acceleration_fallback


def test_without_warm_up_a_guidance_crossing_would_recompile(tiny_pipe: Any) -> None:
    """The check above can fail: skip the warm-up and the crossing compiles mid-show."""
    torch._dynamo.reset()
    nets = compiled_networks(tiny_pipe, backend="eager")
    engine = StreamEngine(
        tiny_pipe, [32, 45], width=SIZE, height=SIZE, cfg_type="full", networks=nets, acceleration="compile"
    )
    engine.prepare("a cat", guidance_scale=1.8, seed=4)
    _frames(engine, 0, 2)
    engine.set_guidance_scale(1.0)
    with torch._dynamo.config.patch(error_on_recompile=True), pytest.raises(Exception, match=r"[Rr]ecompil"):
        _frames(engine, 2, 1)


_CHILD = r"""
import json, sys, torch
from pathlib import Path
from torch._dynamo.utils import counters
from bridge.engine.accel.compile import compiled_networks
from bridge.engine.loading import LoadOptions, load_pipeline
pipe = load_pipeline("tiny", LoadOptions(cache_dir=Path(sys.argv[1])))
nets = compiled_networks(pipe, cache_dir=Path(sys.argv[2]))
latents = torch.randn((1, 4, 4, 4), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    got = nets.decode(latents)
    want = pipe.vae.decode(latents, return_dict=False)[0]
print(json.dumps({"hit": counters["inductor"]["fxgraph_cache_hit"], "miss": counters["inductor"]["fxgraph_cache_miss"],
                  "max_diff": float((got - want).abs().max())}))
"""


def test_a_second_start_reuses_the_compile_cache_under_the_model_cache(
    model_cache: Path, tmp_path: Path
) -> None:
    """Inductor for real (the VAE decoder only: the UNet takes a minute to compile here)."""
    env_keep = {
        k: v for k, v in __import__("os").environ.items() if not k.startswith(("TORCHINDUCTOR", "TRITON"))
    }

    def start() -> dict[str, Any]:
        done = subprocess.run(
            [sys.executable, "-c", _CHILD, str(model_cache), str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=600,
            env=env_keep,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
        return result

    first, second = start(), start()
    assert first["miss"] >= 1 and first["hit"] == 0
    assert second["hit"] >= 1 and second["miss"] == 0
    assert first["max_diff"] < 1e-4 and second["max_diff"] < 1e-4  # fast, not exact: close
    assert any((compile_cache_dir(tmp_path) / "inductor").rglob("*.py")), (
        "no compiled code under the model cache"
    )


def test_the_tuning_switches_do_what_they_say(model_cache: Path, tiny_pipe: Any) -> None:
    """channels_last converts the weights in place (on a pipe of its own here: the session's is
    shared) and stays close to the exact path; cudnn_benchmark turns cuDNN's switch on."""
    from bridge.engine.loading import LoadOptions, load_pipeline

    own = load_pipeline("tiny", LoadOptions(cache_dir=model_cache))
    kept = torch.backends.cudnn.benchmark
    try:
        tuned = StreamEngine(
            own, [32, 45], width=SIZE, height=SIZE, acceleration="channels_last+cudnn_benchmark"
        )
        assert torch.backends.cudnn.benchmark is True
    finally:
        torch.backends.cudnn.benchmark = kept
    conv = own.unet.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    eager = StreamEngine(tiny_pipe, [32, 45], width=SIZE, height=SIZE)
    for e in (tuned, eager):
        e.prepare("a cat", seed=3)
    for k in range(3):
        got = tuned(pattern_uint8(k, SIZE), output_type="uint8").astype(int)
        want = eager(pattern_uint8(k, SIZE), output_type="uint8").astype(int)
        assert abs(got - want).max() <= 2, k


def test_warm_up_leaves_the_sequential_reference_as_it_was(tiny_pipe: Any) -> None:
    """The sequential path rebinds its residual memory; warm-up (any acceleration but none) must
    put it back. Networks given as they are: the warm-up logic, without a compile."""
    kwargs = {"width": SIZE, "height": SIZE, "cfg_type": "self", "use_denoising_batch": False}
    warmed = StreamEngine(tiny_pipe, [35], acceleration="compile", networks=Networks(tiny_pipe), **kwargs)
    eager = StreamEngine(tiny_pipe, [35], **kwargs)
    for e in (warmed, eager):
        e.prepare("a cat", guidance_scale=1.8, delta=0.7, seed=2)
    got, want = _frames(warmed, 0, 2), _frames(eager, 0, 2)
    assert warmed.warm_up(pattern_uint8(0, SIZE)) == 2
    got += _frames(warmed, 2, 3)
    want += _frames(eager, 2, 3)
    assert all((g == w).all() for g, w in zip(got, want, strict=True))


def test_a_slicing_or_offloaded_vae_runs_through_its_own_methods(
    tiny_pipe: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    vae = tiny_pipe.vae
    calls: list[str] = []
    encode, decode = vae.encode, vae.decode
    monkeypatch.setattr(vae, "encode", lambda *a, **k: calls.append("encode") or encode(*a, **k))
    monkeypatch.setattr(vae, "decode", lambda *a, **k: calls.append("decode") or decode(*a, **k))
    pixels = pattern(1, SIZE) * 2 - 1
    with torch.no_grad():
        Networks(tiny_pipe).encode(pixels)
        assert calls == []  # the inner modules, as compile and TensorRT replace them
        monkeypatch.setattr(vae, "use_slicing", True)
        nets = Networks(tiny_pipe)
        latents = nets.encode(pixels)
        nets.decode(latents)
    assert calls == ["encode", "decode"]
