"""The embedded default shows its input: at the default config, on a still image, the output's
luminance follows the input's, and prompt and seed still change the frame visibly. The model
is the one `load_pipeline("tiny")` loads with `from_pretrained` from its generated folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from bridge.config import load_config
from bridge.engine import StreamEngine
from bridge.engine.tiny import tiny_model_dir
from bridge.runtime import initial_values

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = initial_values(load_config(ROOT / "configs" / "default.yaml"))
SIZE = load_config(ROOT / "configs" / "default.yaml").engine.width


def shapes(size: int = SIZE) -> np.ndarray:
    """A still image of flat shapes on a dark ground, (H, W, 4) uint8 RGBA."""
    img = Image.new("RGB", (size, size), (40, 60, 90))
    draw = ImageDraw.Draw(img)
    s = size / 256
    draw.ellipse((30 * s, 40 * s, 130 * s, 140 * s), fill=(230, 200, 40))
    draw.rectangle((140 * s, 120 * s, 230 * s, 220 * s), fill=(200, 40, 60))
    draw.polygon([(60 * s, 230 * s), (120 * s, 160 * s), (180 * s, 240 * s)], fill=(60, 180, 90))
    return np.asarray(img.convert("RGBA"))


def luminance(rgba: np.ndarray) -> np.ndarray:
    """ITU-R BT.601 luma of (H, W, 3|4) uint8 pixels, as float64."""
    return np.asarray(rgba[..., :3], np.float64) @ np.array([0.299, 0.587, 0.114])


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(luminance(a).ravel(), luminance(b).ravel())[0, 1])


def run(pipe: Any, image: np.ndarray, **changes: Any) -> np.ndarray:
    """The default config's engine and live values (with `changes`) on a still `image`; the
    frame once the stream is full (a frame leaves len(t_index_list) - 1 calls after it entered)."""
    values = {**DEFAULT, **changes}
    engine = StreamEngine(pipe, list(values["t_index_list"]), width=SIZE, height=SIZE, cfg_type="self")
    engine.prepare(
        values["prompt"],
        negative_prompt=values["negative_prompt"],
        guidance_scale=values["guidance"],
        delta=values["delta"],
        seed=values["seed"],
    )
    out: np.ndarray = np.zeros(0)
    for _ in range(len(values["t_index_list"]) + 2):
        out = engine(image, output_type="uint8")
    return out


def test_the_default_model_is_loaded_from_its_saved_folder(tiny_pipe: Any, model_cache: Path) -> None:
    folder = tiny_model_dir("tiny", model_cache)
    assert (folder / "model_index.json").is_file() and (folder / "vae" / "config.json").is_file()
    assert type(tiny_pipe.vae).__name__ == "AutoencoderTiny"
    assert Path(tiny_pipe.vae.config._name_or_path) == folder / "vae"


def test_the_autoencoder_keeps_the_picture(tiny_pipe: Any) -> None:
    image = shapes()
    pixels = torch.from_numpy(image[..., :3].copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        latents = tiny_pipe.vae.encode(pixels).latents  # (1, 4, H/8, W/8)
        decoded = tiny_pipe.vae.decode(latents).sample
    assert latents.shape == (1, 4, SIZE // 8, SIZE // 8)
    back = ((decoded[0].permute(1, 2, 0) + 1) * 127.5).clamp(0, 255).round().to(torch.uint8).numpy()
    assert correlation(back, image) >= 0.9
    # Of 255: colours kept too, within the blur of edges at 1/8 resolution.
    assert float(np.abs(back.astype(float) - image[..., :3]).mean()) < 32


def test_the_default_output_shows_its_input(tiny_pipe: Any) -> None:
    image = shapes()
    out = run(tiny_pipe, image)
    # Was -0.12 (random VAE) before the autoencoder was built to pass the picture through.
    assert correlation(out, image) >= 0.7
    assert float(luminance(out).std()) > 10  # not flat
    clamped = ((out[..., :3] == 0) | (out[..., :3] == 255)).mean()
    assert float(clamped) < 0.2


@pytest.mark.parametrize("change", [{"prompt": "neon city at night"}, {"seed": 7}], ids=["prompt", "seed"])
def test_prompt_and_seed_still_change_the_output(tiny_pipe: Any, change: dict[str, Any]) -> None:
    image = shapes()
    base = run(tiny_pipe, image)
    other = run(tiny_pipe, image, **change)
    # 8 of 255 levels on average over the whole frame: plainly visible.
    assert float(np.abs(other[..., :3].astype(float) - base[..., :3]).mean()) > 8
    assert correlation(other, image) >= 0.6  # and the input still shows
