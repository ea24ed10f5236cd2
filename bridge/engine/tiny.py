"""The embedded `tiny` models: seeded random-weight pipelines of each supported family.

Each variant is built once with a fixed seed, calibrated so its frames are worth looking at,
written with `save_pretrained` into a local cache folder, and from then on loaded through the
same `from_pretrained` path as any real model. Nothing is downloaded.

| name        | family | text encoders                     | VAE                 |
|-------------|--------|-----------------------------------|---------------------|
| `tiny`      | SD 1.5 | one CLIP (last hidden state)      | AutoencoderTiny     |
| `tiny-sd21` | SD 2.1 | one CLIP, linear-projection UNet  | AutoencoderKL       |
| `tiny-sdxl` | SDXL   | CLIP + CLIP-with-projection       | AutoencoderTiny     |

Calibration. `tiny` and `tiny-sdxl` (TAESD-like VAE) are built to show their input: the VAE is
not random but close to an identity at 1/8 resolution (2x2 averages down, luminance twice and
two colour differences as latents of spread `_LATENT_STD` as the UNet sees them, 1/8 of that
inside the VAE, where its decoder's 3 * tanh(z / 3) is linear; a least-squares colour estimate
and smoothed upsampling back), and the UNet's prediction is a real, if crude, noise estimate: a
high-pass of its input, normalised by the output norm and fitted in closed form to the noise
actually added, plus the random deep path (blind to the picture's levels, its cross-attention
strengthened until a change of prompt moves it by 90% of its spread) scaled to `_EPS_STD`, which
carries prompt and seed. At the default config an image input's luminance then correlates with
the output's at 0.75 to 0.92 on still images of shapes, patterns, scenes and gradients, dark,
light or mid-grey (it was -0.14 to 0.02 with a random VAE). `tiny-sd21` keeps a random
AutoencoderKL whose kernels are made smooth, a UNet and decoder whose last layers are rescaled
so latents and noise predictions have unit spread and pixels sit inside [0, 1].
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

# Bump when the generated weights or layout change, so stale caches are rebuilt, not reused.
TINY_FORMAT_VERSION = 5
TINY_VARIANTS: dict[str, str] = {"tiny": "sd15", "tiny-sd21": "sd21", "tiny-sdxl": "sdxl"}
TINY_RESOLUTION = 256  # the native size of the tiny models, in pixels (latent 32x32)
_SEED = 20231220  # StreamDiffusion's arXiv date; any fixed value would do
# How much a change of prompt moves the (deep part of the) noise prediction, relative to its
# spread: the SD 2.1-like model, and the TAESD-like ones, whose deep part is only a share of it.
_PROMPT_SHARE = 0.5
_PROMPT_SHARE_TINY_VAE = 0.9
# The spread of the tiny (TAESD-like) models' noise prediction: large enough that prompt and seed
# change the frame visibly, small enough that the input still shows through.
_EPS_STD = 1.0
# The spread of the tiny (TAESD-like) models' latents, as the UNet sees them. A trained UNet
# removes nearly all the noise an img2img step adds; ours removes only its high-frequency part,
# so a wider latent spread (SD's is about 1) keeps the picture ahead of the noise at the default
# strength, as in a real model: at 3, shapes on a light ground correlate at 0.75 (0.69 at 2).
_LATENT_STD = 3.0
# AutoencoderTiny's decoder squashes its latents with 3 * tanh(z / 3) before anything else, so
# latents of spread 2 or more lose up to a third of a bright (or dark) region's level, and the
# output's brightness stops following the input's. The tiny VAE's own latents are kept small, spread
# _LATENT_STD / _TINY_VAE_SCALE, where 3 * tanh(z / 3) = z within 1%; its scaling factor, which
# the engine multiplies in after encoding and divides out before decoding, brings the UNet's
# latents to _LATENT_STD.
_TINY_VAE_SCALE = 8.0
# The noise variance a denoising step leaves in the latents, as the tiny decoder assumes it.
_DECODE_NOISE = 1.0
_VOCAB_WORDS = [
    "a",
    "the",
    "of",
    "in",
    "on",
    "at",
    "and",
    "with",
    "by",
    "photo",
    "painting",
    "portrait",
    "drawing",
    "city",
    "forest",
    "ocean",
    "neon",
    "light",
    "cat",
    "dog",
    "bird",
    "face",
    "person",
    "street",
    "night",
    "day",
    "sky",
    "red",
    "blue",
    "green",
    "gold",
    "dark",
    "bright",
    "oil",
    "watercolor",
    "style",
    "cyberpunk",
    "anime",
    "abstract",
]


def _byte_alphabet() -> list[str]:
    """The 256 printable stand-ins for bytes used by CLIP's byte-level BPE."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def _write_tokenizer_files(folder: Path) -> tuple[Path, Path]:
    """Write a small CLIP BPE vocabulary: every byte, with and without the word end, plus a few
    whole-word merges so common prompt words become single tokens."""
    alphabet = _byte_alphabet()
    vocab: dict[str, int] = {}
    for ch in alphabet:
        vocab[ch] = len(vocab)
    for ch in alphabet:
        vocab[ch + "</w>"] = len(vocab)
    merges: list[str] = []
    for word in _VOCAB_WORDS:
        # Merge left to right: "cat" -> ("c","a") -> ("ca","t</w>").
        pieces = [*word[:-1], word[-1] + "</w>"]
        while len(pieces) > 1:
            merged = pieces[0] + pieces[1]
            rule = f"{pieces[0]} {pieces[1]}"
            if rule not in merges:
                merges.append(rule)
            if merged not in vocab:
                vocab[merged] = len(vocab)
            pieces = [merged, *pieces[2:]]
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    vocab_file = folder / "vocab.json"
    merges_file = folder / "merges.txt"
    vocab_file.write_text(json.dumps(vocab), encoding="utf-8")
    merges_file.write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return vocab_file, merges_file


def tiny_tokenizer(work: Path) -> Any:
    """The tiny CLIP tokenizer, its files written into `work`."""
    from transformers import CLIPTokenizer

    vocab_file, merges_file = _write_tokenizer_files(work)
    return CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=77)


def _text_config(vocab_size: int, *, hidden_act: str = "quick_gelu", projection_dim: int = 32) -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act=hidden_act,
        projection_dim=projection_dim,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )


def _unet(family: str) -> Any:
    from diffusers import UNet2DConditionModel

    common: dict[str, Any] = {
        "sample_size": TINY_RESOLUTION // 8,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": (32, 64),
        "layers_per_block": 1,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
        "norm_num_groups": 8,
    }
    if family == "sd15":
        return UNet2DConditionModel(**common, cross_attention_dim=32, attention_head_dim=4)
    if family == "sd21":
        return UNet2DConditionModel(
            **common, cross_attention_dim=32, attention_head_dim=(2, 4), use_linear_projection=True
        )
    # SDXL: text_time conditioning; 6 time ids * 8 + pooled text (32) = 80.
    return UNet2DConditionModel(
        **common,
        cross_attention_dim=64,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=80,
        transformer_layers_per_block=(1, 1),
    )


def _vae(family: str) -> Any:
    from diffusers import AutoencoderKL, AutoencoderTiny

    if family == "sd21":
        return AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 16, 16, 16),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=8,
            sample_size=TINY_RESOLUTION,
            scaling_factor=0.18215,
        )
    return AutoencoderTiny(
        # 8 channels: the UNet, not the VAE, should dominate a frame's cost, as in the real
        # models (sd-turbo + TAESD at 512px: UNet 804 of 1,068 GFLOP).
        encoder_block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        # No residual blocks at full resolution (one conv in, two out): small-channel convs are
        # slow per FLOP on CPUs, and the full-resolution ones would otherwise dominate.
        num_encoder_blocks=(0, 1, 1, 1),
        num_decoder_blocks=(1, 1, 1, 0),
        scaling_factor=_TINY_VAE_SCALE,
    )


def _scheduler() -> Any:
    from diffusers import LCMScheduler

    return LCMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        original_inference_steps=50,
        timestep_spacing="leading",
        steps_offset=1,
        set_alpha_to_one=True,
    )


def _last_conv(module: nn.Module) -> nn.Conv2d:
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    return convs[-1]


@torch.no_grad()
def _affine_calibrate(conv: nn.Conv2d, outputs: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> None:
    """Rescale `conv` so the per-channel statistics of `outputs` (N, C, H, W) it produced become
    `mean` and `std` (C,). Exact, because `outputs` is an affine function of the conv's weights."""
    got_mean = outputs.mean(dim=(0, 2, 3))
    got_std = outputs.std(dim=(0, 2, 3)).clamp_min(1e-6)
    gain = std / got_std
    conv.weight.mul_(gain.view(-1, 1, 1, 1))
    if conv.bias is None:
        raise RuntimeError("tiny model calibration needs a biased last conv layer")
    conv.bias.copy_(conv.bias * gain + mean - got_mean * gain)


def _calibration_images(generator: torch.Generator) -> torch.Tensor:
    """Smooth gradients and shapes in [0, 1], (4, 3, R, R): what a camera or pattern looks like."""
    r = TINY_RESOLUTION
    yy, xx = torch.meshgrid(torch.linspace(0, 1, r), torch.linspace(0, 1, r), indexing="ij")
    images = []
    for k in range(4):
        phase = torch.rand(3, generator=generator) * 6.28
        freq = 1.0 + k
        rgb = [
            0.5 + 0.5 * torch.sin(freq * 6.28 * (xx * (c + 1) / 3 + yy * k / 4) + phase[c]) for c in range(3)
        ]
        images.append(torch.stack(rgb))
    return torch.stack(images)


@torch.no_grad()
def _calibrate(pipe: Any, family: str) -> None:
    gen = torch.Generator().manual_seed(_SEED + 1)
    images = _calibration_images(gen) * 2 - 1  # the VAE takes [-1, 1]
    vae = pipe.vae
    tiny_vae = family != "sd21"
    scale = float(vae.config.scaling_factor)

    # 1. VAE. TAESD-like: built as a near-identity at 1/8 resolution (`_pass_through_vae`), so
    #    the input shows through. AutoencoderKL (tiny-sd21): smooth random kernels, unit-variance
    #    latents (after the scaling factor), zero mean.
    if tiny_vae:
        _pass_through_vae(vae, images)
    else:
        _shape_vae(vae)
        # AutoencoderKL's last encoder conv emits (mean, logvar); calibrate the mean half and
        # make the log-variance small so sampling adds little noise.
        moments = vae.encoder(images)
        conv = _last_conv(vae.encoder)
        target_mean = torch.cat([torch.zeros(4), torch.full((4,), -6.0)])
        target_std = torch.cat([torch.full((4,), 1.0 / scale), torch.full((4,), 0.1)])
        _affine_calibrate(conv, moments, target_mean, target_std)
        if vae.quant_conv is not None:
            vae.quant_conv.weight.copy_(torch.eye(8).view(8, 8, 1, 1))
            vae.quant_conv.bias.zero_()

    # 2. UNet: strengthen cross-attention until the prompt moves the prediction by a set share
    #    of its spread, then give the noise prediction a set spread. The samples are the
    #    calibration images' latents noised as the engine noises them.
    from diffusers import LCMScheduler

    unet = pipe.unet
    sched = LCMScheduler.from_config(pipe.scheduler.config)
    clean = (vae.encode(images).latents if tiny_vae else vae.encode(images).latent_dist.mean) * scale
    timesteps = torch.tensor([999, 659, 359, 99])
    acp = sched.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    noise = torch.randn(clean.shape, generator=gen)
    sample = acp.sqrt() * clean + (1 - acp).sqrt() * noise
    embeds, added = _calibration_conditioning(pipe, family, batch=4)
    swapped = embeds.roll(1, dims=0)  # the same samples under other prompts
    if tiny_vae:
        _high_pass_input(unet)
    attn_out = [
        m for n, m in unet.named_modules() if n.endswith("attn2.to_out.0") and isinstance(m, nn.Linear)
    ]
    for _ in range(24):
        eps = unet(sample, timesteps, encoder_hidden_states=embeds, added_cond_kwargs=added).sample
        other = unet(sample, timesteps, encoder_hidden_states=swapped, added_cond_kwargs=added).sample
        if float((eps - other).std() / eps.std()) >= (_PROMPT_SHARE_TINY_VAE if tiny_vae else _PROMPT_SHARE):
            break
        for module in attn_out:
            module.weight.mul_(1.2)
    _affine_calibrate(unet.conv_out, eps, torch.zeros(4), torch.full((4,), 0.7))
    if tiny_vae:
        # The pass-through decoder needs no calibration (it inverts the encoder); the UNet
        # learns, in closed form, to predict the noise it is given.
        _denoising_head(unet, sample, timesteps, noise, embeds, added)
        return

    # 3. Decoder (AutoencoderKL): calibrated on what the engine decodes, x0 after one LCM step
    #    at the usual img2img timesteps: pixels around mid-grey (a slight tint per channel)
    #    with a spread that keeps nearly all of them inside [0, 1].
    eps = unet(sample, timesteps, encoder_hidden_states=embeds, added_cond_kwargs=added).sample
    x0 = (sample - (1 - acp).sqrt() * eps) / acp.sqrt()
    x0 = x0[2:]  # the img2img timesteps (359, 99); 999 and 659 are txt2img territory
    raw = vae.decode(x0 / scale).sample
    _affine_calibrate(_last_conv(vae.decoder), raw, torch.tensor([0.04, -0.06, 0.0]), torch.full((3,), 0.3))


def _kernel(conv: nn.Conv2d, taps: torch.Tensor, pairs: list[tuple[int, int]]) -> None:
    """Set `conv` to `taps` (3, 3) from input channel i to output channel o for each (o, i) of
    `pairs`, zero elsewhere (bias too)."""
    conv.weight.zero_()
    for o, i in pairs:
        conv.weight[o, i] = taps
    if conv.bias is not None:
        conv.bias.zero_()


_SKIP = 16  # channels of the UNet's last feature map given over to the closed-form noise estimate


@torch.no_grad()
def _high_pass_input(unet: Any) -> None:
    """The UNet's first conv: its first `_SKIP` channels become copies of a 3x3 high-pass of the
    latent channels (channel j sees latent j % 4); the rest stay random, less their mean, and
    feed the deep path. White noise is mostly high-frequency and a picture's latents mostly not, so these
    channels carry the noise to predict."""
    high_pass = -torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 16
    high_pass[1, 1] += 1.0
    conv = unet.conv_in
    conv.weight[:_SKIP] = 0.0
    for j in range(_SKIP):
        conv.weight[j, j % 4] = high_pass
    conv.bias[:_SKIP] = 0.0
    # The deep path's kernels sum to zero, so it sees edges and noise but not the picture's
    # levels: otherwise its random response to brightness and smooth gradients is added to the
    # prediction and takes them out of the frame (a bare gradient correlated at 0.43, 0.81 now).
    conv.weight[_SKIP:] -= conv.weight[_SKIP:].mean(dim=(2, 3), keepdim=True)


@torch.no_grad()
def _denoising_head(
    unet: Any,
    sample: torch.Tensor,
    timesteps: torch.Tensor,
    noise: torch.Tensor,
    embeds: torch.Tensor,
    added: dict[str, Any] | None,
) -> None:
    """Make the UNet's prediction a real (if crude) noise estimate plus its deep, prompt-driven
    part. The last resnet passes the high-pass channels of the first conv (its skip input)
    straight through in its first `_SKIP` channels; the output norm divides them by their
    spread, which takes out the noise level of the timestep; a large norm bias keeps SiLU
    linear on them; and the output conv's weights on them are fitted by least squares to the
    noise actually added to `sample`. The other channels keep the random deep path, scaled so
    its part of the prediction has spread `_EPS_STD`: that part carries prompt and seed."""
    last = unet.up_blocks[-1].resnets[-1]
    width = last.conv_shortcut.in_channels - unet.conv_in.out_channels  # the deep input's channels
    last.conv_shortcut.weight[:_SKIP] = 0.0
    for j in range(_SKIP):
        last.conv_shortcut.weight[j, width + j, 0, 0] = 1.0
    if last.conv_shortcut.bias is not None:
        last.conv_shortcut.bias[:_SKIP] = 0.0
    last.conv2.weight[:_SKIP] = 0.0
    last.conv2.bias[:_SKIP] = 0.0
    unet.conv_norm_out.weight[:_SKIP] = 1.0
    unet.conv_norm_out.bias[:_SKIP] = 10.0  # SiLU(10 + z) = 10 + z within 0.1% for |z| < 3
    conv = unet.conv_out
    features: list[torch.Tensor] = []
    hook = conv.register_forward_pre_hook(lambda _m, args: features.append(args[0]))
    try:
        unet(sample, timesteps, encoder_hidden_states=embeds, added_cond_kwargs=added)
    finally:
        hook.remove()
    x = features[0]  # (N, C, h, w): what the output conv sees
    conv.weight[:, :_SKIP] = 0.0
    conv.bias.zero_()
    deep = nn.functional.conv2d(x, conv.weight, padding=1)  # (N, 4, h, w)
    conv.weight.mul_(_EPS_STD / deep.std(dim=(0, 2, 3)).clamp_min(1e-6).view(-1, 1, 1, 1))
    deep = nn.functional.conv2d(x, conv.weight, padding=1)
    for k in range(4):
        # The copies of latent k's high-pass are equal: fit one 3x3 kernel and an intercept by
        # least squares (float64) and share it out over the copies. The design is what the
        # conv sees, zero padding included: at the frame's edge the missing taps would
        # otherwise turn the norm bias's +10 into a wrong prediction along the border.
        copies = list(range(k, _SKIP, 4))
        feature = x[:, copies].mean(dim=1, keepdim=True).double()  # (N, 1, h, w)
        taps = nn.functional.unfold(feature, 3, padding=1).permute(0, 2, 1).reshape(-1, 9)
        design = torch.cat([taps, torch.ones(taps.shape[0], 1, dtype=torch.float64)], dim=1)
        target = (noise[:, k] - deep[:, k]).double().flatten()
        solution = torch.linalg.solve(design.T @ design, design.T @ target)
        conv.weight[k, copies] = (solution[:9] / len(copies)).view(3, 3).float()
        conv.bias[k] = float(solution[9])


@torch.no_grad()
def _pass_through_vae(vae: Any, images: torch.Tensor) -> None:
    """Make an AutoencoderTiny encode and decode close to an identity at 1/8 resolution.

    Encoder: RGB in the first three channels, each downsampling conv an exact 2x2 average, the
    residual blocks identities (their conv branch zeroed; ReLU passes the non-negative pixels),
    and the last conv mixes RGB into four latents: luminance twice, and two colour differences,
    calibrated to zero mean and unit variance on `images` (N, 3, H, W) in [-1, 1]. Decoder:
    the least-squares inverse of that mix (which averages the two luminance latents, halving
    the noise the UNet leaves on brightness), then nearest-neighbour upsampling smoothed by a
    binomial 3x3 kernel at each scale. Everything is linear but the ReLUs, which clip below
    black as the final clamp would. The weights stay plain Conv2d weights, so the model saves
    and loads like any diffusers AutoencoderTiny."""
    centre = torch.zeros(3, 3)
    centre[1, 1] = 1.0
    pool = torch.zeros(3, 3)
    pool[1:, 1:] = 0.25  # taps at (0, 0), (0, +1), (+1, 0), (+1, +1): a 2x2 average at stride 2
    smooth = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 16
    rgb = [(c, c) for c in range(3)]
    enc: list[Any] = list(vae.encoder.layers)
    dec: list[Any] = list(vae.decoder.layers)
    for module in [*enc, *dec]:
        if hasattr(module, "fuse"):  # AutoencoderTinyBlock
            _kernel(module.conv[-1], centre, [])  # conv branch off: the block is ReLU(x) = x
    enc_convs: list[Any] = [m for m in enc if isinstance(m, nn.Conv2d)]
    _kernel(enc_convs[0], centre, rgb)
    for conv in enc_convs[1:-1]:
        _kernel(conv, pool, rgb)
    mix = torch.tensor(
        [[0.299, 0.587, 0.114], [0.299, 0.587, 0.114], [1.0, -1.0, 0.0], [-0.5, -0.5, 1.0]]
    )  # (4 latents, 3 colours)
    last = enc_convs[-1]
    last.weight.zero_()
    last.weight[:, :3, 1, 1] = mix
    last.bias.zero_()
    scale = float(vae.config.scaling_factor)  # the engine's latents are the VAE's times this
    _affine_calibrate(last, vae.encode(images).latents, torch.zeros(4), torch.full((4,), _LATENT_STD / scale))
    gain = last.weight[:, :3, 1, 1].clone()  # (4, 3): latent = gain @ rgb01 + bias, on a flat colour
    # The decoder's first conv: the linear least-squares (Wiener) estimate of the colour from the
    # latents, smoothed over 3x3 latent pixels, given the pixels' spread on `images` and the
    # noise a denoising step leaves in the latents (_DECODE_NOISE, latent units, after the 3x3
    # smoothing). It shrinks what the latents carry badly (colour differences) towards the mean
    # colour instead of amplifying noise into it.
    rgb01 = (images + 1) / 2
    pixels = rgb01.permute(1, 0, 2, 3).reshape(3, -1)  # (3, N*H*W)
    mean = pixels.mean(dim=1)
    spread = torch.cov(pixels)  # (3, 3)
    noise = _DECODE_NOISE / scale**2 * torch.eye(4)  # in the VAE's own latent units
    inverse = spread @ gain.T @ torch.linalg.inv(gain @ spread @ gain.T + noise)
    dec_convs: list[Any] = [m for m in dec if isinstance(m, nn.Conv2d)]
    first = dec_convs[0]
    first.weight.zero_()
    first.weight[:3] = inverse[:, :, None, None] * smooth
    first.bias.zero_()
    first.bias[:3] = mean - inverse @ (gain @ mean + last.bias)
    # Upsampling: nearest neighbour, then the binomial kernel at 4x and 8x; not at 2x, whose
    # zero padding would darken a 4-pixel frame (pixels here are >= 0, not centred).
    _kernel(dec_convs[1], centre, rgb)
    for conv in dec_convs[2:]:
        _kernel(conv, smooth, rgb)


@torch.no_grad()
def _shape_vae(vae: nn.Module) -> None:
    """Turn the VAE's random 3x3 kernels into random gains times one smooth kernel, and damp
    the residual branches of TAESD blocks. Zero-mean random kernels act as edge detectors and
    shred the picture; smooth ones keep its layout, so the input shows through the output."""
    smooth = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]])
    smooth = smooth / smooth.norm()
    for name, module in vae.named_modules():
        if isinstance(module, nn.Conv2d) and module.kernel_size == (3, 3):
            gain = module.weight.sum(dim=(2, 3), keepdim=True)  # (out, in, 1, 1), random
            module.weight.copy_(gain / 3.0 * smooth)
        if name.endswith(".conv") and isinstance(module, nn.Sequential):
            last = module[-1]
            if isinstance(last, nn.Conv2d):
                last.weight.mul_(0.3)


def _calibration_conditioning(
    pipe: Any, family: str, batch: int
) -> tuple[torch.Tensor, dict[str, Any] | None]:
    prompts = ["a photo of a cat", "neon city at night", "oil painting of a forest", "blue ocean"][:batch]
    if family == "sdxl":
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompt=prompts, device="cpu", do_classifier_free_guidance=False
        )
        r = TINY_RESOLUTION
        time_ids = torch.tensor([[r, r, 0, 0, r, r]] * batch, dtype=embeds.dtype)
        return embeds, {"text_embeds": pooled, "time_ids": time_ids}
    embeds, _ = pipe.encode_prompt(prompts, "cpu", 1, False)
    return embeds, None


def assemble_pipeline(
    *, unet: Any, vae: Any, text_encoder: Any, tokenizer: Any, scheduler: Any, text_encoder_2: Any = None
) -> Any:
    """A StableDiffusionPipeline from components, or an SDXL one when `text_encoder_2` is given
    (both tokenizers are `tokenizer`; an empty SDXL negative prompt is zeros, as in sdxl-turbo)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if text_encoder_2 is not None:
        return StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer,
            unet=unet,
            scheduler=scheduler,
            force_zeros_for_empty_prompt=True,
        )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_tiny_pipeline(family: str) -> Any:
    """Build and calibrate a tiny random-weight pipeline of `family` ("sd15", "sd21", "sdxl")."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    if family not in {"sd15", "sd21", "sdxl"}:
        raise ValueError(f"unknown tiny model family {family!r}; expected one of 'sd15', 'sd21', 'sdxl'")
    with tempfile.TemporaryDirectory() as work:
        tokenizer = tiny_tokenizer(Path(work))
    vocab = len(tokenizer)
    torch.manual_seed(_SEED)
    act = "gelu" if family == "sd21" else "quick_gelu"
    text_encoder = CLIPTextModel(_text_config(vocab, hidden_act=act))
    unet = _unet(family)
    vae = _vae(family)
    text_encoder_2 = None
    if family == "sdxl":
        text_encoder_2 = CLIPTextModelWithProjection(_text_config(vocab, hidden_act="gelu"))
    pipe = assemble_pipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=_scheduler(),
        text_encoder_2=text_encoder_2,
    )
    pipe.set_progress_bar_config(disable=True)
    _calibrate(pipe, family)
    return pipe


def tiny_model_dir(name: str, cache_dir: Path) -> Path:
    """The cache folder of embedded model `name` (it may not exist yet)."""
    if name not in TINY_VARIANTS:
        raise ValueError(f"unknown embedded model {name!r}; expected one of {sorted(TINY_VARIANTS)}")
    return cache_dir / "models" / f"{name}-v{TINY_FORMAT_VERSION}"


def ensure_tiny_model(name: str, cache_dir: Path) -> Path:
    """Generate embedded model `name` into `cache_dir` unless it is there; return its folder.

    The folder appears atomically (built in a sibling temporary folder, then renamed), so a
    crash halfway or two processes at once never leave a half-written model behind.
    """
    target = tiny_model_dir(name, cache_dir)
    if (target / "model_index.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("generating embedded model %r into %s (one time, a few seconds)", name, target)
    pipe = build_tiny_pipeline(TINY_VARIANTS[name])
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        pipe.save_pretrained(staging, safe_serialization=True)
        try:
            os.replace(staging, target)
        except OSError:
            # Another process finished first: its copy is identical (same seed), keep it.
            if not (target / "model_index.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
