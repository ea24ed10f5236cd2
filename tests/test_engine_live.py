"""Live updates between frames: each takes effect on the next frame, with no reload."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from bridge.engine import StreamEngine
from tests.conftest import count_calls, pattern, spy_unet

SIZE = 64


def pair(pipe: Any, t_index: list[int], cfg: str = "self", **prep: Any) -> tuple[StreamEngine, StreamEngine]:
    """Two identical engines, warmed with the same three frames."""
    engines = []
    for _ in range(2):
        engine = StreamEngine(pipe, t_index, width=SIZE, height=SIZE, cfg_type=cfg)
        engine.prepare(
            prep.get("prompt", "a photo of a cat"), **{k: v for k, v in prep.items() if k != "prompt"}
        )
        for k in range(3):
            engine(pattern(k, SIZE))
        engines.append(engine)
    return engines[0], engines[1]


def next_differs(changed: StreamEngine, control: StreamEngine) -> bool:
    frame = pattern(3, SIZE)
    return not torch.allclose(changed(frame), control(frame), atol=1e-3)


def takes_effect(pipe: Any, changed: StreamEngine, control: StreamEngine) -> None:
    """The next UNet call already sees the change, and the output shows it within n frames:
    a change that acts on the newest frame only (seed noise, the first t_index) leaves the
    stream with that frame, n - 1 calls later."""
    with spy_unet(pipe) as spy_changed:
        changed_out = [changed(pattern(3 + k, SIZE)) for k in range(changed.num_steps)]
    with spy_unet(pipe) as spy_control:
        control_out = [control(pattern(3 + k, SIZE)) for k in range(control.num_steps)]
    first_a, first_b = spy_changed, spy_control
    same_call = (
        torch.equal(first_a.inputs[0], first_b.inputs[0])
        and torch.equal(first_a.timesteps[0], first_b.timesteps[0])
        and torch.equal(
            first_a.kwargs[0]["encoder_hidden_states"], first_b.kwargs[0]["encoder_hidden_states"]
        )
        and torch.equal(first_a.outputs[0], first_b.outputs[0])
        and torch.allclose(changed_out[0], control_out[0], atol=1e-3)
    )
    assert not same_call, "the next call did not see the change"
    assert not all(torch.allclose(a, b, atol=1e-3) for a, b in zip(changed_out, control_out, strict=True))


@pytest.mark.parametrize(
    "cfg,change",
    [
        ("self", lambda e: e.set_prompt("neon city at night")),
        ("self", lambda e: e.set_prompt([("neon city at night", 0.5), ("a photo of a cat", 0.5)])),
        ("full", lambda e: e.set_negative_prompt("dark blurry")),
        ("self", lambda e: e.set_seed(7)),
        ("self", lambda e: e.set_seed([(2, 0.5), (7, 0.5)])),
        ("self", lambda e: e.set_guidance_scale(3.0)),
        ("self", lambda e: e.set_delta(0.3)),
        ("full", lambda e: e.set_guidance_scale(3.0)),
        ("self", lambda e: e.set_t_index_list([28, 45])),
        ("self", lambda e: e.set_t_index_list([32, 42])),
    ],
)
def test_every_update_takes_effect_on_the_next_frame(tiny_pipe: Any, cfg: str, change: Any) -> None:
    changed, control = pair(tiny_pipe, [32, 45], cfg, guidance_scale=1.6)
    change(changed)
    takes_effect(tiny_pipe, changed, control)


def test_initialize_negative_is_used_on_the_next_call_and_shows_when_that_frame_leaves(
    tiny_pipe: Any,
) -> None:
    # In `initialize` the negative enters through the newest frame's first step only, so the
    # output moves once that frame has gone through all n steps (n - 1 frames later).
    changed, control = pair(tiny_pipe, [32, 45], "initialize", guidance_scale=1.6)
    changed.set_negative_prompt("dark blurry")
    with spy_unet(tiny_pipe) as spy:
        changed(pattern(3, SIZE))
    negative, _ = tiny_pipe.encode_prompt("dark blurry", "cpu", 1, False)
    torch.testing.assert_close(spy.kwargs[0]["encoder_hidden_states"][:1], negative)
    control(pattern(3, SIZE))
    assert next_differs(changed, control)


def test_prompt_cache_counts_and_skips_the_text_encoder(tiny_pipe: Any) -> None:
    engine = StreamEngine(tiny_pipe, [32, 45], width=SIZE, height=SIZE)
    with count_calls(tiny_pipe.text_encoder) as encodes:
        engine.prepare("a photo of a cat", negative_prompt="")
        engine.set_prompt("neon city at night")
        engine.set_prompt("a photo of a cat")
        engine.set_prompt("neon city at night")
        engine.set_prompt([("a photo of a cat", 1.0), ("neon city at night", 2.0)])
    assert len(encodes) == 3  # cat, "", neon city: each once
    assert engine.prompt_cache.misses == 3
    assert engine.prompt_cache.hits == 4


def test_blend_weights_are_a_weighted_mean(tiny_pipe: Any) -> None:
    a, b = pair(tiny_pipe, [35], "none")
    a.set_prompt([("neon city at night", 1.0), ("a photo of a cat", 0.0)])
    b.set_prompt("neon city at night")
    frame = pattern(4, SIZE)
    torch.testing.assert_close(a(frame), b(frame))
    with spy_unet(tiny_pipe) as spy:
        a.set_prompt([("neon city at night", 3.0), ("a photo of a cat", 1.0)])
        a(frame)
    e1, _ = tiny_pipe.encode_prompt("neon city at night", "cpu", 1, False)
    e2, _ = tiny_pipe.encode_prompt("a photo of a cat", "cpu", 1, False)
    torch.testing.assert_close(spy.kwargs[0]["encoder_hidden_states"], 0.75 * e1 + 0.25 * e2)


def test_seed_change_matches_a_fresh_engine_and_blends_preserve_variance(tiny_pipe: Any) -> None:
    live, _ = pair(tiny_pipe, [35], "none")
    fresh = StreamEngine(tiny_pipe, [35], width=SIZE, height=SIZE, cfg_type="none")
    fresh.prepare("a photo of a cat", seed=7)
    live.set_seed(7)
    frame = pattern(5, SIZE)
    torch.testing.assert_close(live(frame), fresh(frame))
    live.set_seed([(7, 1.0), (9, 0.0)])
    torch.testing.assert_close(live(frame), fresh(frame))
    big = StreamEngine(tiny_pipe, [35], width=512, height=512, cfg_type="none")
    big.prepare("x", seed=[(7, 0.5), (9, 0.5)])
    assert float(big.init_noise.std()) == pytest.approx(1.0, abs=0.02)


def test_changing_the_step_count_live_resizes_the_buffers(tiny_pipe: Any) -> None:
    for cfg in ("none", "full", "self", "initialize"):
        engine = StreamEngine(tiny_pipe, [32, 45], width=SIZE, height=SIZE, cfg_type=cfg)
        engine.prepare("a photo of a cat", guidance_scale=1.5)
        engine(pattern(0, SIZE))
        with spy_unet(tiny_pipe) as spy:
            for t_index in ([20, 32, 45], [45], [10, 20, 30, 40], [32, 45]):
                engine.set_t_index_list(t_index)
                for k in range(2):
                    out = engine(pattern(k, SIZE))
                    assert out.shape == (1, 3, SIZE, SIZE)
                    assert torch.isfinite(out).all()
        rows = {"none": 1, "self": 1, "full": 2, "initialize": None}[cfg]
        want = [
            (len(t) + 1) if rows is None else rows * len(t)
            for t in ([20, 32, 45], [45], [10, 20, 30, 40], [32, 45])
            for _ in range(2)
        ]
        assert spy.batches == want
        assert engine.num_steps == 2


def test_step_count_change_refills_the_buffer_from_the_last_output(tiny_pipe: Any) -> None:
    engine = StreamEngine(tiny_pipe, [35], width=SIZE, height=SIZE, cfg_type="none")
    engine.prepare("a photo of a cat")
    before = [engine(pattern(2, SIZE)) for _ in range(2)][-1]
    engine.set_t_index_list([20, 35, 45])
    after = engine(pattern(2, SIZE))
    # A cold start decodes zero latents for n - 1 frames; the refilled buffer continues the picture.
    cold = StreamEngine(tiny_pipe, [20, 35, 45], width=SIZE, height=SIZE, cfg_type="none")
    cold.prepare("a photo of a cat")
    cold_first = cold(pattern(2, SIZE))
    assert float((after - before).abs().mean()) < 0.5 * float((cold_first - before).abs().mean())


def test_invalid_updates_are_rejected_and_nothing_changes(tiny_pipe: Any) -> None:
    engine, control = pair(tiny_pipe, [32, 45])
    cases = [
        (lambda: engine.set_guidance_scale(float("nan")), "guidance_scale must be within [0, 50], got nan"),
        (lambda: engine.set_delta(-1), "delta must be within [0, 10], got -1"),
        (lambda: engine.set_seed(-5), "seed must be within [0, 2**63), got -5"),
        (lambda: engine.set_seed("abc"), "seed must be an int or a list of (seed, weight) pairs, got 'abc'"),
        (lambda: engine.set_prompt([]), "prompt blend must name at least one prompt, got an empty list"),
        (lambda: engine.set_prompt([("a", -1.0)]), "prompt blend weight for 'a' must be >= 0, got -1.0"),
        (lambda: engine.set_t_index_list([32, 60]), "t_index_list entries must be within [0, 49]"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError) as err:
            call()
        assert message in str(err.value)
    frame = pattern(3, SIZE)
    torch.testing.assert_close(engine(frame), control(frame))
