"""StreamEngine semantics on the tiny models: stream batch, guidance modes, outputs, seeds."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from diffusers import LCMScheduler, StableDiffusionImg2ImgPipeline, StableDiffusionXLImg2ImgPipeline

from bridge.engine import StreamEngine
from bridge.engine.guidance import guide, lcm_x0
from tests.conftest import pattern, pattern_uint8, spy_unet

SIZE = 64  # latent 8x8: small tensors, fast tests


def make(pipe: Any, t_index: list[int], cfg: str = "none", **kw: Any) -> StreamEngine:
    prep = {k: kw.pop(k) for k in ("prompt", "negative_prompt", "guidance_scale", "delta", "seed") if k in kw}
    engine = StreamEngine(pipe, t_index, width=SIZE, height=SIZE, cfg_type=cfg, **kw)
    engine.prepare(prep.pop("prompt", "a photo of a cat"), **prep)
    return engine


@pytest.mark.parametrize("cfg", ["none", "full", "self", "initialize"])
@pytest.mark.parametrize("fbs", [1, 2])
def test_stream_batch_equals_sequential_after_the_delay(tiny_pipe: Any, cfg: str, fbs: int) -> None:
    t_index = [20, 32, 45]
    n = len(t_index)
    kw = {
        "cfg": cfg,
        "guidance_scale": 1.8,
        "delta": 0.7,
        "negative_prompt": "blurry",
        "frame_buffer_size": fbs,
    }
    batch = make(tiny_pipe, t_index, **kw)
    seq = make(tiny_pipe, t_index, use_denoising_batch=False, **kw)
    frames = [torch.cat([pattern(k + j, SIZE) for j in range(fbs)]) for k in range(5)]
    batch_out = [batch(f, output_type="latent") for f in frames]
    seq_out = [seq(f, output_type="latent") for f in frames]
    for k in range(len(frames) - (n - 1)):
        # Frame k leaves the stream batch n-1 calls after it entered.
        torch.testing.assert_close(batch_out[k + n - 1], seq_out[k], rtol=1e-4, atol=1e-4)
    assert batch.stats.unet_calls == len(frames)
    assert seq.stats.unet_calls == n * len(frames)


@pytest.mark.parametrize(
    "cfg,g,expected",
    [
        ("none", 3.0, 1),
        ("full", 3.0, 2),
        ("self", 3.0, 1),
        ("initialize", 3.0, None),
        ("full", 1.0, 1),
        ("initialize", 1.0, 1),
    ],
)
@pytest.mark.parametrize("fbs", [1, 2])
def test_unet_batch_size_per_cfg_type(
    tiny_pipe: Any, cfg: str, g: float, expected: int | None, fbs: int
) -> None:
    n = 3
    engine = make(tiny_pipe, [20, 32, 45], cfg, guidance_scale=g, frame_buffer_size=fbs)
    with spy_unet(tiny_pipe) as spy:
        engine(torch.cat([pattern(0, SIZE)] * fbs))
    want = (n + 1) * fbs if expected is None else expected * n * fbs
    assert spy.batches == [want]


def _img2img_reference(
    cls: Any, pipe: Any, tau: int, seed: int, image: torch.Tensor, prompt: str
) -> torch.Tensor:
    ref = cls(**pipe.components)
    ref.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    out = ref(
        prompt=prompt,
        image=image,
        strength=1.0,
        num_inference_steps=1,
        timesteps=[tau],
        guidance_scale=1.0,
        generator=torch.Generator().manual_seed(seed),
        output_type="pt",
    )
    return out.images


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_one_step_equals_diffusers_img2img(tiny_pipe: Any, tiny_sdxl_pipe: Any, family: str) -> None:
    pipe, cls = (
        (tiny_pipe, StableDiffusionImg2ImgPipeline)
        if family == "sd15"
        else (tiny_sdxl_pipe, StableDiffusionXLImg2ImgPipeline)
    )
    engine = make(pipe, [35], "none", seed=5, prompt="neon city at night")
    image = pattern(3, SIZE)
    tau = 999 - 20 * 35
    expected = _img2img_reference(cls, pipe, tau, 5, image, "neon city at night")
    torch.testing.assert_close(engine(image), expected, rtol=1e-4, atol=1e-4)


def test_full_mode_equals_textbook_cfg_from_two_passes(tiny_pipe: Any) -> None:
    g = 4.0
    engine = make(tiny_pipe, [30], "full", guidance_scale=g, seed=9, prompt="a cat", negative_prompt="blurry")
    # The original drops the negative embeddings on a prompt update: change both live first.
    engine.set_prompt("oil painting of a forest")
    engine.set_negative_prompt("dark")
    image = pattern(1, SIZE)
    out = engine(image, output_type="latent")

    tau = 999 - 20 * 30
    sched = LCMScheduler.from_config(tiny_pipe.scheduler.config)
    acp = sched.alphas_cumprod[tau]
    alpha, beta = acp.sqrt(), (1 - acp).sqrt()
    c_skip, c_out = sched.get_scalings_for_boundary_condition_discrete(tau)
    with torch.no_grad():
        z = tiny_pipe.vae.encode(image * 2 - 1).latents * tiny_pipe.vae.config.scaling_factor
        noise = torch.randn((1, 4, SIZE // 8, SIZE // 8), generator=torch.Generator().manual_seed(9))
        x = alpha * z + beta * noise
        cond, _ = tiny_pipe.encode_prompt("oil painting of a forest", "cpu", 1, False)
        uncond, _ = tiny_pipe.encode_prompt("dark", "cpu", 1, False)
        t = torch.tensor([tau])
        eps_c = tiny_pipe.unet(x, t, encoder_hidden_states=cond).sample
        eps_u = tiny_pipe.unet(x, t, encoder_hidden_states=uncond).sample
    eps = eps_u + g * (eps_c - eps_u)
    expected = c_out * (x - beta * eps) / alpha + c_skip * x
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


def test_raising_guidance_live_above_one_uses_the_negative(tiny_pipe: Any) -> None:
    engine = make(tiny_pipe, [30], "full", guidance_scale=1.0, negative_prompt="blurry")
    with spy_unet(tiny_pipe) as spy:
        engine(pattern(0, SIZE))
        engine.set_guidance_scale(3.0)
        engine(pattern(0, SIZE))
    assert spy.batches == [1, 2]
    uncond, _ = tiny_pipe.encode_prompt("blurry", "cpu", 1, False)
    torch.testing.assert_close(spy.kwargs[1]["encoder_hidden_states"][:1], uncond)


@pytest.mark.parametrize("cfg", ["self", "initialize"])
def test_residual_cfg_follows_the_formula_by_hand(tiny_pipe: Any, cfg: str) -> None:
    """Rebuild two stream-batched calls from the UNet's own predictions with the paper's
    formulas written out here, and compare every output."""
    g, delta, t_index = 2.5, 0.6, [32, 45]
    engine = make(tiny_pipe, t_index, cfg, guidance_scale=g, delta=delta, seed=4)
    with spy_unet(tiny_pipe) as spy:
        outs = [engine(pattern(k, SIZE), output_type="latent") for k in range(3)]
    sched = LCMScheduler.from_config(tiny_pipe.scheduler.config)
    taus = [999 - 20 * i for i in t_index]
    acp = sched.alphas_cumprod
    alpha = torch.stack([acp[t].sqrt() for t in taus]).view(-1, 1, 1, 1)
    beta = torch.stack([(1 - acp[t]).sqrt() for t in taus]).view(-1, 1, 1, 1)
    cs = [sched.get_scalings_for_boundary_condition_discrete(t) for t in taus]
    c_skip = torch.tensor([c[0] for c in cs]).view(-1, 1, 1, 1)
    c_out = torch.tensor([c[1] for c in cs]).view(-1, 1, 1, 1)
    noise = torch.randn((2, 4, SIZE // 8, SIZE // 8), generator=torch.Generator().manual_seed(4))
    stock = torch.zeros_like(noise)
    extra = 1 if cfg == "initialize" else 0
    for call in range(3):
        x_in = spy.inputs[call][extra:]  # the UNet sees [newest (uncond), newest, older]
        pred = spy.outputs[call]
        stock = torch.cat([noise[:1], stock[:1]])  # shift: newest row gets the fixed noise
        if extra:
            stock = torch.cat([pred[:1], stock[1:]])  # the real negative of the newest frame
        eps_c = pred[extra:]
        eps = delta * stock + g * (eps_c - delta * stock)
        x0 = c_out * (x_in - beta * eps) / alpha + c_skip * x_in
        torch.testing.assert_close(outs[call], x0[-1:], rtol=1e-4, atol=1e-4)
        scaled = beta * stock
        dx = c_out * (scaled - beta * eps) / alpha + c_skip * scaled
        alpha_next = torch.cat([alpha[1:], torch.ones(1, 1, 1, 1)])
        beta_next = torch.cat([beta[1:], torch.ones(1, 1, 1, 1)])
        stock = torch.cat([noise[1:], noise[:1]]) + alpha_next * dx / beta_next


def test_step_math_on_scalars() -> None:
    """lcm_x0 and guide against numbers worked out by hand."""
    from bridge.engine.guidance import StepCoefs, residual_stock

    one = lambda v: torch.tensor([[[[v]]]])  # noqa: E731
    coefs = StepCoefs(one(0.6), one(0.8), one(0.1), one(0.9), one(0.7), one(0.5))
    # F = (1.0 - 0.8*0.5)/0.6 = 1.0; x0 = 0.9*1.0 + 0.1*1.0 = 1.0
    assert lcm_x0(one(0.5), one(1.0), coefs).item() == pytest.approx(1.0)
    # eps_u + g*(eps_c - eps_u) = 0.2 + 3*(0.5-0.2) = 1.1
    assert guide(one(0.5), one(0.2), 3.0).item() == pytest.approx(1.1)
    # dx = lcm_x0(eps=0.5, x=0.8*0.25=0.2): F=(0.2-0.4)/0.6=-1/3; x0=0.9*(-1/3)+0.1*0.2=-0.28
    # stock' = next_noise + 0.7*(-0.28)/0.5 = 0.3 - 0.392 = -0.092
    assert residual_stock(one(0.5), one(0.25), coefs, one(0.3)).item() == pytest.approx(-0.092)


def test_seed_compatible_initial_noise(tiny_pipe: Any) -> None:
    engine = make(tiny_pipe, [20, 32, 45], "self", seed=123, frame_buffer_size=2)
    expected = torch.randn((6, 4, SIZE // 8, SIZE // 8), generator=torch.Generator().manual_seed(123))
    torch.testing.assert_close(engine.init_noise, expected)


def test_output_types(tiny_pipe: Any) -> None:
    engine = make(tiny_pipe, [32, 45], "self")
    image = pattern(0, SIZE)
    engine(image)
    latent = engine(image, output_type="latent")
    assert latent.shape == (1, 4, SIZE // 8, SIZE // 8)
    pt = engine(image)
    assert pt.shape == (1, 3, SIZE, SIZE) and pt.dtype == torch.float32
    assert float(pt.min()) >= 0.0 and float(pt.max()) <= 1.0
    rgba = engine(image, output_type="uint8")
    assert isinstance(rgba, np.ndarray) and rgba.shape == (SIZE, SIZE, 4) and rgba.dtype == np.uint8
    assert (rgba[..., 3] == 255).all()
    # uint8 is the same frame as pt, converted on the device: compare one engine's frame both ways.
    twin = make(tiny_pipe, [32, 45], "self")
    for _ in range(3):
        twin(image)
    expected = (twin(image)[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    np.testing.assert_array_equal(rgba[..., :3], expected)


def test_frame_buffer_outputs_and_uint8_input(tiny_pipe: Any) -> None:
    engine = make(tiny_pipe, [32, 45], "self", frame_buffer_size=2)
    frames = np.stack([pattern_uint8(0, SIZE), pattern_uint8(1, SIZE)])
    out = engine(frames, output_type="uint8")
    assert out.shape == (2, SIZE, SIZE, 4)
    assert engine(frames, output_type="latent").shape == (2, 4, SIZE // 8, SIZE // 8)


def test_uint8_input_matches_float_input(tiny_pipe: Any) -> None:
    a, b = make(tiny_pipe, [35]), make(tiny_pipe, [35])
    rgba = pattern_uint8(2, SIZE)
    as_float = torch.from_numpy(rgba[..., :3]).permute(2, 0, 1)[None].float() / 255
    torch.testing.assert_close(a(rgba), b(as_float))


def test_input_is_resized_to_model_size(tiny_pipe: Any) -> None:
    engine = make(tiny_pipe, [35])
    assert engine(pattern(0, 96)).shape == (1, 3, SIZE, SIZE)


def test_txt2img_is_reproducible_and_moves(tiny_pipe: Any) -> None:
    a = make(tiny_pipe, [0, 16, 32, 45], "none", seed=11)
    b = make(tiny_pipe, [0, 16, 32, 45], "none", seed=11)
    out_a = [a(None) for _ in range(5)]
    out_b = [b(None) for _ in range(5)]
    for x, y in zip(out_a, out_b, strict=True):
        torch.testing.assert_close(x, y)
    assert not torch.allclose(out_a[-1], out_a[-2])


def test_sdxl_conditioning_reaches_the_unet(tiny_sdxl_pipe: Any) -> None:
    engine = make(tiny_sdxl_pipe, [32, 45], "full", guidance_scale=2.0)
    with spy_unet(tiny_sdxl_pipe) as spy:
        out = engine(pattern(0, SIZE))
    added = spy.kwargs[0]["added_cond_kwargs"]
    assert added["text_embeds"].shape == (4, 32)
    assert added["time_ids"].tolist()[0] == [SIZE, SIZE, 0, 0, SIZE, SIZE]
    # sdxl-turbo style force_zeros_for_empty_prompt: the empty negative is zeros.
    assert torch.count_nonzero(added["text_embeds"][:2]) == 0
    assert out.shape == (1, 3, SIZE, SIZE)


def test_kl_vae_family_is_deterministic(tiny_sd21_pipe: Any) -> None:
    outs = []
    for _ in range(2):
        engine = make(tiny_sd21_pipe, [32, 45], "self", seed=3)
        outs.append([engine(pattern(k, SIZE)) for k in range(3)][-1])
    torch.testing.assert_close(outs[0], outs[1])
    assert float(outs[0].std()) > 0.02


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"cfg_type": "half"}, "cfg_type must be one of 'none', 'full', 'self', 'initialize', got 'half'"),
        ({"width": 100}, "width and height must be positive multiples of 8, got 100x64"),
        ({"frame_buffer_size": 0}, "frame_buffer_size must be an int >= 1, got 0"),
    ],
)
def test_construction_errors(tiny_pipe: Any, kwargs: dict[str, Any], message: str) -> None:
    args: dict[str, Any] = {"width": SIZE, "height": SIZE, **kwargs}
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        StreamEngine(tiny_pipe, [32, 45], **args)


@pytest.mark.parametrize(
    "t_index,message",
    [
        ([], "t_index_list must hold 1 to 10 entries, got 0"),
        ([45, 32], "t_index_list must be strictly ascending, got [45, 32]"),
        ([32, 50], "t_index_list entries must be within [0, 49] (num_inference_steps=50), got [32, 50]"),
        ([32.5], "t_index_list entries must be ints, got 32.5"),
    ],
)
def test_t_index_errors(tiny_pipe: Any, t_index: list[Any], message: str) -> None:
    engine = make(tiny_pipe, [32, 45])
    with pytest.raises(ValueError) as err:
        engine.set_t_index_list(t_index)
    assert message in str(err.value)


def test_input_errors(tiny_pipe: Any) -> None:
    engine = make(tiny_pipe, [32, 45])
    with pytest.raises(
        ValueError,
        match=r"image array must be uint8 \(H, W, 3\|4\) or \(f, H, W, 3\|4\), got float64 \(8, 8\)",
    ):
        engine(np.zeros((8, 8)))
    with pytest.raises(ValueError, match=r"image batch must hold frame_buffer_size=1 frames, got 2"):
        engine(torch.rand(2, 3, SIZE, SIZE))
    with pytest.raises(ValueError, match="output_type must be 'pt', 'uint8' or 'latent', got 'pil'"):
        engine(pattern(0, SIZE), output_type="pil")  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match=r"prepare\(prompt, ...\) must be called"):
        StreamEngine(tiny_pipe, [32], width=SIZE, height=SIZE)(pattern(0, SIZE))


def test_v_prediction_model_is_refused(tiny_pipe: Any) -> None:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(**{**tiny_pipe.components})
    pipe.scheduler = LCMScheduler.from_config(tiny_pipe.scheduler.config, prediction_type="v_prediction")
    with pytest.raises(ValueError, match="needs an epsilon-prediction model"):
        StreamEngine(pipe, [32], width=SIZE, height=SIZE)
