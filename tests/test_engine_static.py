"""A static frame: after warm-up, a frame of the exact path allocates no tensor outside the UNet
and the VAE, rebinds no state, reads one scalar and copies to the host once, and live updates
write into the same buffers. Counted with a TorchDispatchMode, which sees every aten call.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bridge.engine import StreamEngine
from bridge.engine.guidance import scalar, scale_
from tests.conftest import pattern, pattern_uint8

SIZE = 32


class Counter(TorchDispatchMode):
    """Counts aten calls that return a fresh tensor (no alias annotation on the return), except
    inside the modules named in `models` (their activations are theirs), plus `.item()` reads and
    copies into `watch` (data pointers)."""

    def __init__(self) -> None:
        super().__init__()
        self.inside = 0
        self.allocations: list[str] = []
        self.items = 0
        self.watch: set[int] = set()
        self.watched_copies = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten._local_scalar_dense.default:
            self.items += 1
        if self.inside:
            return out
        if func is torch.ops.aten.copy_.default and args[0].data_ptr() in self.watch:
            self.watched_copies += 1
        for ret in func._schema.returns:
            if ret.alias_info is None and isinstance(ret.type, torch._C.TensorType):
                self.allocations.append(str(func))
        return out


@contextmanager
def counting(pipe: Any) -> Iterator[Counter]:
    counter = Counter()
    modules = [pipe.unet, pipe.vae.encoder, pipe.vae.decoder]

    def enter(*_: Any) -> None:
        counter.inside += 1

    def leave(*_: Any) -> None:
        counter.inside -= 1

    handles = [m.register_forward_pre_hook(enter) for m in modules]
    handles += [m.register_forward_hook(leave) for m in modules]
    try:
        with counter:
            yield counter
    finally:
        for h in handles:
            h.remove()


def make(pipe: Any, cfg: str, t_index: list[int], f: int = 1, **prep: Any) -> StreamEngine:
    engine = StreamEngine(pipe, t_index, width=SIZE, height=SIZE, cfg_type=cfg, frame_buffer_size=f)
    engine.prepare("a photo of a cat", negative_prompt="blurry", guidance_scale=1.8, delta=0.7, **prep)
    return engine


def inputs(kind: str, k: int, f: int) -> Any:
    if kind == "uint8":
        frames = [pattern_uint8(k * f + j, SIZE) for j in range(f)]
        return frames[0] if f == 1 else np.stack(frames)
    return torch.cat([pattern(k * f + j, SIZE) for j in range(f)])


def tensors(engine: StreamEngine) -> dict[str, Tensor]:
    """Every tensor the engine keeps across frames, by a name."""
    found: dict[str, Tensor] = {}
    for name, value in vars(engine).items():
        if isinstance(value, torch.Tensor):
            found[name] = value
    for i, t in enumerate(engine._coefs.as_tuple()):
        found[f"coefs[{i}]"] = t
    for i, slot in enumerate(engine._ring.slots):
        found[f"ring[{i}]"] = slot
    found["ring.device"] = engine._ring.device_rgba
    for key, staging in engine._inputs.by_kind.items():
        found[f"staging{key}.pix32"], found[f"staging{key}.pixels"] = staging.pix32, staging.pixels
    if engine.similarity._reference is not None:
        found["similarity.reference"] = engine.similarity._reference
    return found


Tensor = torch.Tensor


@pytest.mark.parametrize("cfg", ["none", "full", "self", "initialize"])
@pytest.mark.parametrize("kind", ["uint8", "float"])
@pytest.mark.parametrize("t_index,f", [([32, 45], 1), ([35], 1), ([20, 32, 45], 2)])
def test_a_frame_allocates_nothing_and_copies_to_the_host_once(
    tiny_pipe: Any, cfg: str, kind: str, t_index: list[int], f: int
) -> None:
    engine = make(tiny_pipe, cfg, t_index, f)
    engine.set_similarity_filter(enabled=True, threshold=0.999999)  # scores every frame, skips none
    for k in range(3):  # warm-up: the staging buffers and the filter's reference appear here
        engine(inputs(kind, k, f), output_type="uint8")
    before = {name: (id(t), t.data_ptr()) for name, t in tensors(engine).items()}
    ids = {name: id(v) for name, v in vars(engine).items() if not isinstance(v, int | float | bool)}
    for k in range(3, 6):
        image = inputs(kind, k, f)
        with counting(tiny_pipe) as counter:
            counter.watch = {slot.data_ptr() for slot in engine._ring.slots}
            engine(image, output_type="uint8")
        assert counter.allocations == [], f"frame {k} allocated: {counter.allocations}"
        assert counter.items == 1, "one .item(): the similarity score"
        assert counter.watched_copies == 1, "one copy into the host ring"
    assert engine.stats.skipped == 0
    assert {name: (id(t), t.data_ptr()) for name, t in tensors(engine).items()} == before
    assert {name: id(v) for name, v in vars(engine).items() if not isinstance(v, int | float | bool)} == ids


def test_a_skip_allocates_nothing_and_copies_nothing(tiny_pipe: Any) -> None:
    engine = make(tiny_pipe, "self", [32, 45])
    engine.set_similarity_filter(enabled=True, threshold=0.0, max_skip=5)
    image = pattern_uint8(0, SIZE)
    first = engine(image, output_type="uint8")
    with counting(tiny_pipe) as counter:
        counter.watch = {slot.data_ptr() for slot in engine._ring.slots}
        again = engine(image, output_type="uint8")
    assert engine.stats.skipped == 1 and again is first
    assert counter.allocations == [] and counter.items == 1 and counter.watched_copies == 0


LIVE = [
    ("set_prompt", "neon city at night"),
    ("set_prompt", [("neon city at night", 0.3), ("a photo of a cat", 0.7)]),
    ("set_negative_prompt", "dark"),
    ("set_seed", 7),
    ("set_seed", [(2, 0.5), (7, 0.5)]),
    ("set_guidance_scale", 3.0),
    ("set_guidance_scale", 0.9),  # crossing 1.0: another slice of the same buffers
    ("set_delta", 0.3),
    ("set_t_index_list", [28, 40]),
]


@pytest.mark.parametrize("cfg", ["full", "initialize", "self"])
def test_live_updates_write_into_the_same_buffers(tiny_pipe: Any, cfg: str) -> None:
    engine = make(tiny_pipe, cfg, [32, 45])
    for k in range(2):
        engine(pattern_uint8(k, SIZE), output_type="uint8")
    storage = {name: t.data_ptr() for name, t in tensors(engine).items()}
    for k, (setter, value) in enumerate(LIVE):
        getattr(engine, setter)(value)
        image = pattern_uint8(k, SIZE)
        with counting(tiny_pipe) as counter:
            engine(image, output_type="uint8")
        assert counter.allocations == [], f"after {setter}({value!r}): {counter.allocations}"
        assert {name: t.data_ptr() for name, t in tensors(engine).items()} == storage, setter
    # The UNet reads slices of the fixed argument buffers, whatever the guidance.
    base = engine._embeds
    assert base is not None and engine.prepared_unet_inputs.embeds.untyped_storage().data_ptr() == (
        base.untyped_storage().data_ptr()
    )


def test_ring_slots_stay_untouched_for_depth_minus_one_frames(tiny_pipe: Any) -> None:
    engine = StreamEngine(tiny_pipe, [32, 45], width=SIZE, height=SIZE, cfg_type="self", output_ring_depth=3)
    engine.prepare("a photo of a cat")
    held = []
    for k in range(7):
        out = engine(pattern_uint8(k, SIZE), output_type="uint8")
        held.append((out, out.copy()))
        for back, (array, snapshot) in enumerate(reversed(held[-3:])):
            assert np.array_equal(array, snapshot), f"frame {k - back} was overwritten"
    assert held[0][0] is held[3][0], "the ring has 3 slots, used in turn"
    with pytest.raises(ValueError, match="output ring depth must be an int >= 2, got 1"):
        StreamEngine(tiny_pipe, [32], width=SIZE, height=SIZE, output_ring_depth=1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_device_scalars_round_as_python_scalars(dtype: torch.dtype) -> None:
    """guidance/delta as 0-dim fp32 tensors give the bits of today's Python-float kernels."""
    values = torch.randn(4096, generator=torch.Generator().manual_seed(0)).mul(3).to(dtype)
    for g in (0.3, 0.7, 1.05, 1.2, 1.8, 2.5, 3.3, 7.77, 12.345):
        out = torch.empty_like(values)
        got = scale_(
            values, scalar(g, values.device), out=out, tmp32=torch.empty_like(values, dtype=torch.float32)
        )
        assert torch.equal(got, values * g), g


def test_flipped_and_read_only_frames_give_the_same_output(tiny_pipe: Any) -> None:
    flipped = pattern_uint8(1, SIZE)[::-1]  # negative strides: torch.from_numpy takes none
    read_only = np.ascontiguousarray(flipped)
    read_only.flags.writeable = False
    a, b = make(tiny_pipe, "self", [35]), make(tiny_pipe, "self", [35])
    assert np.array_equal(a(flipped, output_type="uint8"), b(read_only, output_type="uint8"))


def test_the_filter_scores_the_normalised_pixels(tiny_pipe: Any) -> None:
    engine = make(tiny_pipe, "self", [32, 45])
    engine.set_similarity_filter(enabled=True, threshold=1.0)  # scores, never skips
    first, second = pattern(0, SIZE), pattern(1, SIZE)
    engine(first)
    engine(second)
    want = torch.nn.functional.cosine_similarity(
        (first * 2 - 1).reshape(1, -1), (second * 2 - 1).reshape(1, -1)
    )
    assert engine.similarity.last_similarity == pytest.approx(float(want), abs=1e-6)
