"""The three networks a frame runs, called as `StreamEngine` calls them.

By default the pipe's own torch modules; `compile` swaps in compiled ones (accel/compile.py).
Calling the inner modules (encoder, quant_conv; post_quant_conv, decoder) rather than
`vae.encode`/`vae.decode` keeps the pipe untouched: several engines (the benchmark's contenders)
can share one pipe with different backends. tests/test_accel_compile.py checks these calls
against diffusers' `encode`/`decode` bit for bit. A VAE set to slice or tile, or one with an
accelerate offload hook, is called through its own `encode`/`decode`, which honour those.
"""

from __future__ import annotations

import logging
from typing import Any

from torch import Tensor, nn

log = logging.getLogger(__name__)


class Networks:
    """UNet, VAE encoder and VAE decoder of `pipe`, or replacements for any of them."""

    def __init__(
        self,
        pipe: Any,
        *,
        unet: nn.Module | None = None,
        encoder: nn.Module | None = None,
        decoder: nn.Module | None = None,
        name: str = "torch",
    ) -> None:
        vae = pipe.vae
        self.name = name
        self.unet_module: Any = unet if unet is not None else pipe.unet
        self.encoder: Any = encoder if encoder is not None else vae.encoder
        self.decoder: Any = decoder if decoder is not None else vae.decoder
        # AutoencoderKL has (possibly None) quant convs; AutoencoderTiny has none.
        self.is_kl = hasattr(vae, "quant_conv")
        self._quant = getattr(vae, "quant_conv", None)
        self._post_quant = getattr(vae, "post_quant_conv", None)
        self._vae = vae
        self._through_vae = bool(
            getattr(vae, "use_slicing", False)
            or getattr(vae, "use_tiling", False)
            or hasattr(vae, "_hf_hook")
        )
        if self._through_vae and (encoder is not None or decoder is not None):
            log.warning(
                "the VAE slices, tiles or is offloaded: it runs through vae.encode/decode, not %s", name
            )

    def unet(self, x: Tensor, timesteps: Tensor, embeds: Tensor, added: dict[str, Tensor] | None) -> Tensor:
        """The noise prediction for the rows of `x`."""
        pred: Tensor = self.unet_module(
            x, timesteps, encoder_hidden_states=embeds, added_cond_kwargs=added, return_dict=False
        )[0]
        return pred

    def encode(self, pixels: Tensor) -> Tensor:
        """Pixels in [-1, 1] -> the latents (TAESD), or the moments (KL: mean and log-variance,
        which the engine samples with noise drawn before the frame)."""
        if self._through_vae:
            encoded = self._vae.encode(pixels)
            out: Tensor = encoded.latent_dist.parameters if self.is_kl else encoded.latents
            return out
        h: Tensor = self.encoder(pixels)
        return self._quant(h) if self._quant is not None else h

    def decode(self, latents: Tensor) -> Tensor:
        """Unscaled latents -> pixels in about [-1, 1]."""
        if self._through_vae:
            image: Tensor = self._vae.decode(latents, return_dict=False)[0]
            return image
        z = self._post_quant(latents) if self._post_quant is not None else latents
        out: Tensor = self.decoder(z)
        return out
