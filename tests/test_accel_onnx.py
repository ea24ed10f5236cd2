"""ONNX export parity: each tiny family's UNet, VAE encoder and decoder, exported with a dynamic
batch and run in onnxruntime on the CPU, matches the diffusers modules called directly at every
reachable batch size. The references call `pipe.unet` / `pipe.vae` as the engine does, not the
export wrapper."""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from bridge.engine import StreamEngine
from bridge.engine.accel.onnx_export import (
    BATCH,
    TensorSpec,
    export_onnx,
    reachable_unet_rows,
    reachable_unet_rows_for_steps,
    sample_inputs,
    unet_spec,
    vae_decoder_spec,
    vae_encoder_spec,
)
from tests.conftest import pattern, spy_unet

SIZE = 64  # latent 8x8: the tiny models at their cheapest
FAMILIES = ["tiny_pipe", "tiny_sd21_pipe", "tiny_sdxl_pipe"]
# The UNet rows of full (n=2: 2 and 4) and initialize (n=2: 2 and 3) at f=1, all in one export.
UNET_ROWS = (2, 3, 4)


def _session(path: Path) -> Any:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _run(session: Any, names: list[str], tensors: list[torch.Tensor]) -> np.ndarray:
    out: np.ndarray = session.run(None, {n: t.numpy() for n, t in zip(names, tensors, strict=True)})[0]
    return out


# ------------------------------------------------------------------ reachable rows
@pytest.mark.parametrize("n", [1, 2, 4])
@pytest.mark.parametrize("f", [1, 2])
def test_reachable_rows_follow_the_paper_table(n: int, f: int) -> None:
    # ACCELERATION.md: none/self n*f; full n*f and 2n*f; initialize n*f and (n+1)*f.
    assert reachable_unet_rows("none", n, f) == (n * f,)
    assert reachable_unet_rows("self", n, f) == (n * f,)
    assert reachable_unet_rows("full", n, f) == (n * f, 2 * n * f)
    assert reachable_unet_rows("initialize", n, f) == (n * f, (n + 1) * f)
    assert reachable_unet_rows("full", n, f, denoising_batch=False) == (f, 2 * f)


def test_reachable_rows_over_live_step_changes() -> None:
    assert reachable_unet_rows_for_steps("initialize", [1, 2, 4], 1) == (1, 2, 3, 4, 5)
    with pytest.raises(ValueError, match="cfg_type must be one of"):
        reachable_unet_rows("bogus", 2, 1)


@pytest.mark.parametrize("cfg_type", ["none", "self", "full", "initialize"])
@pytest.mark.parametrize("f", [1, 2])
def test_reachable_rows_are_the_batches_the_engine_calls(tiny_pipe: Any, cfg_type: str, f: int) -> None:
    """The engine itself, with the guidance fader on both sides of 1.0, calls the UNet with
    exactly the row counts the function promises."""
    engine = StreamEngine(
        tiny_pipe, [20, 35], width=SIZE, height=SIZE, cfg_type=cfg_type, frame_buffer_size=f
    )
    engine.prepare("a cat", "a dog", guidance_scale=1.0)
    frames = pattern(0, SIZE).repeat(f, 1, 1, 1)
    with spy_unet(tiny_pipe) as spy:
        engine(frames)
        engine.set_guidance_scale(1.8)
        engine(frames)
        engine.set_guidance_scale(0.5)
        engine(frames)
    assert set(spy.batches) == set(reachable_unet_rows(cfg_type, 2, f))


# ------------------------------------------------------------------ parity
@pytest.mark.parametrize("family", FAMILIES)
def test_unet_export_matches_torch_at_every_reachable_batch(
    request: pytest.FixtureRequest, tmp_path: Path, family: str
) -> None:
    pipe = request.getfixturevalue(family)
    spec = unet_spec(pipe.unet, width=SIZE, height=SIZE, rows=UNET_ROWS)
    names = [s.name for s in spec.inputs]
    if family == "tiny_sdxl_pipe":
        assert names == ["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"]
        assert spec.inputs[3].shape == (BATCH, 32)  # the tiny SDXL's pooled projection
    else:
        assert names == ["sample", "timestep", "encoder_hidden_states"]
    # SD 1.5 also goes through the >2 GB route: weights gathered into one external file.
    threshold = 0 if family == "tiny_pipe" else 2**40
    path = export_onnx(pipe, spec, tmp_path / "unet" / "model.onnx", external_data_threshold_bytes=threshold)
    expected_files = {"model.onnx", "model.onnx.data"} if threshold == 0 else {"model.onnx"}
    assert {p.name for p in path.parent.iterdir()} == expected_files
    session = _session(path)
    for rows in UNET_ROWS:
        x = sample_inputs(spec, rows, dtype=torch.float32, seed=rows)
        added = {"text_embeds": x[3], "time_ids": x[4]} if len(x) == 5 else None
        with torch.no_grad():  # as the engine calls it: integer timesteps
            want = pipe.unet(
                x[0], x[1].long(), encoder_hidden_states=x[2], added_cond_kwargs=added, return_dict=False
            )[0]
        got = _run(session, names, x)
        assert got.shape == (rows, 4, SIZE // 8, SIZE // 8)
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=5e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_vae_exports_match_torch(request: pytest.FixtureRequest, tmp_path: Path, family: str) -> None:
    pipe = request.getfixturevalue(family)
    rows = (1, 2)
    enc = vae_encoder_spec(pipe.vae, width=SIZE, height=SIZE, rows=rows)
    dec = vae_decoder_spec(pipe.vae, width=SIZE, height=SIZE, rows=rows)
    is_kl = family == "tiny_sd21_pipe"
    assert enc.outputs[0].name == ("moments" if is_kl else "latents")
    enc_session = _session(export_onnx(pipe, enc, tmp_path / "enc" / "model.onnx"))
    dec_session = _session(export_onnx(pipe, dec, tmp_path / "dec" / "model.onnx"))
    for b in rows:
        pixels = pattern(b, SIZE).repeat(b, 1, 1, 1) * 2 - 1
        latents = torch.randn((b, 4, SIZE // 8, SIZE // 8), generator=torch.Generator().manual_seed(b))
        with torch.no_grad():
            encoded = pipe.vae.encode(pixels)
            want_enc = encoded.latent_dist.parameters if is_kl else encoded.latents
            want_dec = pipe.vae.decode(latents, return_dict=False)[0]
        np.testing.assert_allclose(
            _run(enc_session, ["pixels"], [pixels]), want_enc.numpy(), rtol=1e-4, atol=5e-5
        )
        np.testing.assert_allclose(
            _run(dec_session, ["latents"], [latents]), want_dec.numpy(), rtol=1e-4, atol=5e-5
        )


def test_a_new_conditioning_input_is_one_more_routed_spec(tiny_pipe: Any, tmp_path: Path) -> None:
    """ControlNet's residuals join the export as declared inputs (list items and a keyword),
    no redesign. The tiny UNet's down path yields 32@8x8, 32@8x8, 32@4x4, 64@4x4; its mid 64@4x4."""
    h = SIZE // 8
    down = [(32, h), (32, h), (32, h // 2), (64, h // 2)]
    extra = [
        TensorSpec(f"down_residual_{i}", (BATCH, c, s, s), route=("down_block_additional_residuals", i))
        for i, (c, s) in enumerate(down)
    ] + [TensorSpec("mid_residual", (BATCH, 64, h // 2, h // 2), route=("mid_block_additional_residual",))]
    spec = unet_spec(tiny_pipe.unet, width=SIZE, height=SIZE, rows=(1, 2), extra_inputs=extra)
    session = _session(export_onnx(tiny_pipe, spec, tmp_path / "model.onnx"))
    for rows in spec.rows:
        x = sample_inputs(spec, rows, dtype=torch.float32, seed=7)
        with torch.no_grad():
            want = tiny_pipe.unet(
                x[0],
                x[1],
                encoder_hidden_states=x[2],
                down_block_additional_residuals=tuple(x[3:7]),
                mid_block_additional_residual=x[7],
                return_dict=False,
            )[0]
            plain = tiny_pipe.unet(x[0], x[1], encoder_hidden_states=x[2], return_dict=False)[0]
        assert not torch.allclose(want, plain, atol=1e-3)  # the residuals really reach the UNet
        got = _run(session, [s.name for s in spec.inputs], x)
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=5e-5)


def test_fp16_export_keeps_fp16_io_and_a_float32_timestep(tiny_sdxl_pipe: Any, tmp_path: Path) -> None:
    """The GPU path's ONNX: fp16 tensors, float32 timestep, as a strongly typed build needs."""
    half = SimpleNamespace(unet=copy.deepcopy(tiny_sdxl_pipe.unet).half())
    spec = unet_spec(half.unet, width=SIZE, height=SIZE, rows=(1, 2))
    path = export_onnx(half, spec, tmp_path / "model.onnx")
    model = onnx.load(str(path))
    types = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.output]}
    f16, f32 = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT
    assert types == {
        "sample": f16,
        "timestep": f32,
        "encoder_hidden_states": f16,
        "text_embeds": f16,
        "time_ids": f16,
        "eps": f16,
    }
    dims = {v.name: v.type.tensor_type.shape.dim[0].dim_param for v in model.graph.input}
    assert set(dims.values()) == {BATCH}  # one dynamic batch axis on every input
