"""The engine against an independent multi-step reference, frame by frame.

`Reference` is written here from the algorithm (PAPER-NOTES.md) with diffusers' own pieces only:
`LCMScheduler` (timesteps, alphas_cumprod, the boundary scalings), the pipe's tokenizer, text
encoder, UNet and VAE, and `VaeImageProcessor` for the pixel conversions. It imports nothing from
`bridge.engine` but the class under test. Its bookkeeping is per frame, not per row: each frame in
flight is a `_Packet` that carries its own latent and residual noise from step to step, so a
wrong row, a wrong slot of the fixed noise or a wrong shift in the engine's row-major buffers
shows up as a different frame. The UNet still sees one batch per call, ordered as the paper's
stream batch (extra negative rows first, then the in-flight frames newest first), so the
comparison can be tight.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import LCMScheduler
from diffusers.image_processor import VaeImageProcessor
from torch import Tensor

from bridge.engine import StreamEngine
from tests.conftest import pattern, pattern_uint8

SIZE = 32  # latent 4x4: the machine is small
FRAMES = 6


@dataclass
class _Packet:
    """f frames in flight: their latent at step `step`'s timestep and their residual noise."""

    x: Tensor  # (f, 4, h, w)
    stock: Tensor  # (f, 4, h, w)
    step: int


def _embed(pipe: Any, text: str, dtype: torch.dtype) -> Tensor:
    """The CLIP last hidden state for `text`, straight from the tokenizer and text encoder."""
    tok = pipe.tokenizer
    ids = tok(
        text, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt"
    )
    with torch.no_grad():
        hidden: Tensor = pipe.text_encoder(ids.input_ids)[0]
    return hidden.to(dtype)


class Reference:
    """StreamDiffusion img2img, written from the paper's notes (SD 1.5 family, TAESD-like VAE)."""

    def __init__(
        self,
        pipe: Any,
        t_index: list[int],
        *,
        cfg: str,
        f: int = 1,
        prompt: str = "a photo of a cat",
        negative_prompt: str = "",
        guidance_scale: float = 1.2,
        delta: float = 1.0,
        seed: int = 2,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.pipe, self.cfg, self.f, self.n, self.dtype = pipe, cfg, f, len(t_index), dtype
        self.g, self.delta = guidance_scale, delta
        sched = LCMScheduler.from_config(pipe.scheduler.config)
        sched.set_timesteps(50)
        self.taus = [int(sched.timesteps[t]) for t in t_index]
        acp = sched.alphas_cumprod  # fp32; square roots in fp32, then one cast, as the original
        self.alpha = [acp[t].sqrt().to(dtype) for t in self.taus]
        self.beta = [(1 - acp[t]).sqrt().to(dtype) for t in self.taus]
        scalings = [sched.get_scalings_for_boundary_condition_discrete(t) for t in self.taus]
        self.c_skip = [torch.tensor(float(c[0])).to(dtype) for c in scalings]
        self.c_out = [torch.tensor(float(c[1])).to(dtype) for c in scalings]
        h, w = SIZE // 8, SIZE // 8
        noise = torch.randn((self.n * f, 4, h, w), generator=torch.Generator().manual_seed(seed)).to(dtype)
        self.noise = [noise[i * f : (i + 1) * f] for i in range(self.n)]  # the fixed noise of slot i
        self.cond = _embed(pipe, prompt, dtype)
        self.uncond = _embed(pipe, negative_prompt, dtype)
        zeros = torch.zeros((f, 4, h, w), dtype=dtype)
        # A (re)start: n - 1 zero latents in flight at steps 1..n-1, with zero residual noise.
        self.flight = [_Packet(zeros, zeros, step) for step in range(1, self.n)]
        self.wrapped = zeros  # the residual noise the last step hands on (used only when n == 1)
        self.processor = VaeImageProcessor(vae_scale_factor=8)

    @property
    def guided(self) -> bool:
        return self.cfg != "none" and self.g > 1.0

    def preprocess(self, image: Tensor | np.ndarray) -> Tensor:
        """diffusers' own pre-processing in fp32 ([0, 1] -> [-1, 1]), then one cast."""
        if isinstance(image, np.ndarray):
            frames = image[None] if image.ndim == 3 else image
            images: Any = [PIL.Image.fromarray(np.ascontiguousarray(fr[..., :3])) for fr in frames]
        else:
            images = image.float()
        pixels: Tensor = self.processor.preprocess(images, height=SIZE, width=SIZE)
        return pixels.to(self.dtype)

    def postprocess(self, latent: Tensor) -> tuple[Tensor, np.ndarray]:
        """Decode; diffusers' post-processing to a [0, 1] tensor and to uint8 RGBA."""
        with torch.no_grad():
            latent = (latent / self.pipe.vae.config.scaling_factor).contiguous()  # NCHW, as the UNet's
            decoded = self.pipe.vae.decode(latent).sample
        pt: Tensor = self.processor.postprocess(decoded, output_type="pt")
        rgb = np.stack([np.asarray(im) for im in self.processor.postprocess(decoded, output_type="pil")])
        rgba = np.concatenate([rgb, np.full((*rgb.shape[:3], 1), 255, np.uint8)], axis=3)
        return pt, rgba

    def __call__(self, image: Tensor | np.ndarray) -> Tensor:
        """One call: the new frame enters at step 0; returns the x0 latent of the frame leaving."""
        f, n = self.f, self.n
        with torch.no_grad():
            z = self.pipe.vae.encode(self.preprocess(image)).latents * self.pipe.vae.config.scaling_factor
        newest_stock = self.noise[0] if n > 1 else self.wrapped
        new = _Packet(self.alpha[0] * z + self.beta[0] * self.noise[0], newest_stock, 0)
        flight = [new, *self.flight]  # newest first: step 0, 1, ..., n-1

        # One UNet call: [negative rows], then every frame in flight with the prompt.
        xs, ts, embeds = [], [], []
        if self.guided and self.cfg == "full":
            for p in flight:
                xs.append(p.x), ts.append(self.taus[p.step]), embeds.append(self.uncond)
        if self.guided and self.cfg == "initialize":
            xs.append(new.x), ts.append(self.taus[0]), embeds.append(self.uncond)
        for p in flight:
            xs.append(p.x), ts.append(self.taus[p.step]), embeds.append(self.cond)
        timesteps = torch.tensor(ts, dtype=torch.long).repeat_interleave(f)
        hidden = torch.cat([e.expand(f, -1, -1) for e in embeds])
        with torch.no_grad():
            # NCHW, whatever layout the latents came in: fp16 kernels round differently per layout.
            batch = torch.cat(xs).contiguous()
            pred = self.pipe.unet(batch, timesteps, encoder_hidden_states=hidden).sample
        chunks = list(pred.split(f))
        extra = len(chunks) - n
        uncond_preds, cond_preds = chunks[:extra], chunks[extra:]

        advanced, out = [], None
        for k, p in enumerate(flight):
            j = p.step
            eps_c = cond_preds[k]
            stock = p.stock
            if self.cfg == "initialize" and self.guided and j == 0:
                stock = uncond_preds[0]  # the real negative of the newest frame seeds its memory
            if not self.guided:
                eps = eps_c
            elif self.cfg == "full":
                eps_u = uncond_preds[k]
                eps = eps_u + self.g * (eps_c - eps_u)
            else:
                eps_u = self.delta * stock
                eps = eps_u + self.g * (eps_c - eps_u)
            alpha, beta, c_skip, c_out = self.alpha[j], self.beta[j], self.c_skip[j], self.c_out[j]
            x0 = c_out * ((p.x - beta * eps) / alpha) + c_skip * p.x
            last = j == n - 1
            nxt = stock
            if self.cfg in ("self", "initialize"):
                scaled = beta * stock
                dx = c_out * ((scaled - beta * eps) / alpha) + c_skip * scaled
                a_next = torch.ones((), dtype=self.dtype) if last else self.alpha[j + 1]
                b_next = torch.ones((), dtype=self.dtype) if last else self.beta[j + 1]
                nxt = self.noise[(j + 1) % n] + a_next * dx / b_next
            if last:
                out, self.wrapped = x0, nxt
            else:
                x = self.alpha[j + 1] * x0 + self.beta[j + 1] * self.noise[j + 1]
                advanced.append(_Packet(x, nxt, j + 1))
        self.flight = advanced
        assert out is not None
        return out


CFGS = ["none", "full", "self", "initialize"]


def frames_for(f: int, count: int = FRAMES) -> list[Tensor]:
    return [torch.cat([pattern(k * f + j, SIZE) for j in range(f)]) for k in range(count)]


def engine_for(pipe: Any, t_index: list[int], cfg: str, f: int = 1, **prep: Any) -> StreamEngine:
    dtype = prep.pop("dtype", None)
    engine = StreamEngine(
        pipe, t_index, width=SIZE, height=SIZE, cfg_type=cfg, frame_buffer_size=f, dtype=dtype
    )
    engine.prepare(prep.pop("prompt", "a photo of a cat"), **prep)
    return engine


PREP = {"negative_prompt": "blurry, dark", "guidance_scale": 1.8, "delta": 0.7, "seed": 5}


@pytest.mark.parametrize("cfg", CFGS)
@pytest.mark.parametrize("t_index", [[32, 45], [0, 16, 32, 45]])
@pytest.mark.parametrize("f", [1, 2])
def test_engine_matches_the_reference_frame_by_frame(
    tiny_pipe: Any, cfg: str, t_index: list[int], f: int
) -> None:
    engine = engine_for(tiny_pipe, t_index, cfg, f, **PREP)
    ref = Reference(tiny_pipe, t_index, cfg=cfg, f=f, **PREP)
    for k, image in enumerate(frames_for(f)):
        got = engine(image, output_type="latent")
        want = ref(image)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=lambda m, k=k: f"call {k}: {m}")


@pytest.mark.parametrize("cfg", ["full", "self"])
def test_one_step_and_decoded_outputs_match_the_reference(tiny_pipe: Any, cfg: str) -> None:
    """n = 1 (the residual memory wraps around to the next frame) and the decoded outputs."""
    for t_index in ([35], [32, 45]):
        engine = engine_for(tiny_pipe, t_index, cfg, **PREP)
        ref = Reference(tiny_pipe, t_index, cfg=cfg, **PREP)
        for k in range(FRAMES):
            image = pattern_uint8(k, SIZE)
            got = engine(image, output_type="uint8" if k % 2 else "pt")
            want_pt, want_rgba = ref.postprocess(ref(image))
            if k % 2:
                assert np.array_equal(got, want_rgba[0])
            else:
                torch.testing.assert_close(got, want_pt, rtol=1e-5, atol=1e-5)


def test_guidance_at_or_below_one_runs_no_negative_rows_and_matches(tiny_pipe: Any) -> None:
    for cfg in ("full", "initialize"):
        prep = {**PREP, "guidance_scale": 1.0}
        engine = engine_for(tiny_pipe, [32, 45], cfg, **prep)
        ref = Reference(tiny_pipe, [32, 45], cfg=cfg, **prep)
        for image in frames_for(1, 4):
            torch.testing.assert_close(engine(image, output_type="latent"), ref(image), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- similarity skips
@pytest.mark.parametrize("output_type", ["pt", "uint8", "latent"])
def test_a_skipped_frame_is_exactly_the_previous_output(tiny_pipe: Any, output_type: Any) -> None:
    engine = engine_for(tiny_pipe, [32, 45], "self", **PREP)
    control = engine_for(tiny_pipe, [32, 45], "self", **PREP)
    outs, control_outs = [], []
    for k in range(4):
        if k == 3:  # the first frame after switching on passes; the same frame again always skips
            engine.set_similarity_filter(enabled=True, threshold=0.0, max_skip=2)
        outs.append(engine(pattern(k, SIZE), output_type=output_type))
        control_outs.append(control(pattern(k, SIZE), output_type=output_type))
    for _ in range(2):  # pattern(3) again, twice: both skipped
        skipped = engine(pattern(3, SIZE), output_type=output_type)
        if isinstance(skipped, np.ndarray):
            assert np.array_equal(skipped, outs[-1])
        else:
            assert torch.equal(skipped, outs[-1])
    assert engine.stats.skipped == 2
    # Nothing advanced during the skips: the next frames equal those of an engine that never saw them.
    engine.set_similarity_filter(enabled=False)
    for k in range(4, 6):
        got, want = (
            engine(pattern(k, SIZE), output_type=output_type),
            control(pattern(k, SIZE), output_type=output_type),
        )
        if isinstance(got, np.ndarray):
            assert np.array_equal(got, want)
        else:
            assert torch.equal(got, want)
    assert engine.stats.skipped == 2


# ---------------------------------------------------------------------------- live setters
# Each change is made after CHANGE_AT calls. From then on the engine must give what a fresh engine,
# prepared with the new value and fed the same frames from the start, gives, once the frames that
# were in flight at the change have left: n - 1 calls later.
CHANGE_AT = 2
BASE = {
    "prompt": "a photo of a cat",
    "negative_prompt": "blurry",
    "guidance_scale": 1.6,
    "delta": 0.8,
    "seed": 2,
}

LIVE = [
    ("self", "set_prompt", "prompt", "neon city at night", [32, 45]),
    ("full", "set_prompt", "prompt", "neon city at night", [32, 45]),
    ("self", "set_prompt", "prompt", [("neon city at night", 0.3), ("a photo of a cat", 0.7)], [32, 45]),
    ("full", "set_negative_prompt", "negative_prompt", "dark, grainy", [32, 45]),
    ("initialize", "set_negative_prompt", "negative_prompt", "dark, grainy", [32, 45]),
    ("self", "set_seed", "seed", 7, [32, 45]),
    ("self", "set_seed", "seed", [(2, 0.5), (7, 0.5)], [32, 45]),
    ("self", "set_guidance_scale", "guidance_scale", 3.0, [32, 45]),
    ("full", "set_guidance_scale", "guidance_scale", 0.8, [32, 45]),  # crossing 1.0 downwards
    ("initialize", "set_guidance_scale", "guidance_scale", 0.8, [32, 45]),
    ("self", "set_delta", "delta", 0.3, [32, 45]),
    ("initialize", "set_delta", "delta", 0.3, [0, 16, 32, 45]),
]


def _compare_after_change(
    pipe: Any, cfg: str, t_index: list[int], change: Any, fresh_prep: dict[str, Any], fresh_t_index: list[int]
) -> None:
    frames = frames_for(1, CHANGE_AT + 5)
    changed = engine_for(pipe, t_index, cfg, **BASE)
    fresh = engine_for(pipe, fresh_t_index, cfg, **fresh_prep)
    untouched = engine_for(pipe, t_index, cfg, **BASE)
    got, want, old = [], [], []
    for k, image in enumerate(frames):
        if k == CHANGE_AT:
            change(changed)
        got.append(changed(image, output_type="latent"))
        want.append(fresh(image, output_type="latent"))
        old.append(untouched(image, output_type="latent"))
    settled = CHANGE_AT + len(fresh_t_index) - 1
    for k in range(settled, len(frames)):
        assert torch.equal(got[k], want[k]), f"call {k}: differs from a fresh engine given the new value"
    assert not torch.allclose(want[-1], old[-1], atol=1e-4), "the new value makes no difference"


@pytest.mark.parametrize("cfg,setter,key,value,t_index", LIVE)
def test_live_setter_equals_a_fresh_engine(
    tiny_pipe: Any, cfg: str, setter: str, key: str, value: Any, t_index: list[int]
) -> None:
    _compare_after_change(
        tiny_pipe, cfg, t_index, lambda e: getattr(e, setter)(value), {**BASE, key: value}, t_index
    )


@pytest.mark.parametrize("cfg", ["full", "initialize", "self"])
def test_guidance_crossing_one_upwards_equals_a_fresh_engine(tiny_pipe: Any, cfg: str) -> None:
    base = {**BASE, "guidance_scale": 1.0}

    def change(e: StreamEngine) -> None:
        e.set_guidance_scale(2.5)

    frames = frames_for(1, CHANGE_AT + 5)
    changed, fresh = (
        engine_for(tiny_pipe, [32, 45], cfg, **base),
        engine_for(tiny_pipe, [32, 45], cfg, **{**base, "guidance_scale": 2.5}),
    )
    for k, image in enumerate(frames):
        if k == CHANGE_AT:
            change(changed)
        got, want = changed(image, output_type="latent"), fresh(image, output_type="latent")
        if k >= CHANGE_AT + 1:
            assert torch.equal(got, want), f"call {k}"


@pytest.mark.parametrize("new", [[28, 45], [32, 40], [20, 32, 45]])
def test_t_index_change_equals_a_fresh_engine(tiny_pipe: Any, new: list[int]) -> None:
    """Same count (values only) and a different count (the buffers resize)."""
    _compare_after_change(tiny_pipe, "self", [32, 45], lambda e: e.set_t_index_list(new), dict(BASE), new)
