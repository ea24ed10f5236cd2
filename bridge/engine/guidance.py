"""The per-step math of StreamDiffusion: the LCM boundary step, guidance and residual CFG.

Pure functions of tensors, shared by the stream-batched and the sequential paths, so the
formulas live in one place and can be checked by hand on small tensors. Notation follows
PAPER-NOTES.md: alpha = sqrt(alphas_cumprod[tau]), beta = sqrt(1 - alphas_cumprod[tau]).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch
from torch import Tensor


class CfgType(str, Enum):
    """How guidance gets its negative (unconditional) noise prediction; UNet batch for n steps."""

    NONE = "none"  # n rows: no guidance at all (guidance_scale is ignored)
    FULL = "full"  # 2n rows: a real unconditional prediction for every row
    SELF = "self"  # n rows: virtual negative = delta * stock noise (residual CFG)
    INITIALIZE = "initialize"  # n+1 rows: one real unconditional row seeds the stock noise

    @classmethod
    def parse(cls, value: str | CfgType) -> CfgType:
        """The member for `value`, with an error that lists the valid names."""
        try:
            return cls(value)
        except ValueError:
            valid = ", ".join(repr(m.value) for m in cls)
            raise ValueError(f"cfg_type must be one of {valid}, got {value!r}") from None

    @property
    def residual(self) -> bool:
        """Whether this mode keeps a stock-noise memory (residual CFG)."""
        return self in (CfgType.SELF, CfgType.INITIALIZE)


@dataclass(frozen=True)
class StepCoefs:
    """Per-row scalings, each (rows, 1, 1, 1), for the rows of one UNet call (or one step)."""

    alpha: Tensor
    beta: Tensor
    c_skip: Tensor
    c_out: Tensor
    alpha_next: Tensor  # alpha of the slot each row moves to next; 1 for the last step
    beta_next: Tensor  # beta likewise; 1 for the last step

    def rows(self, start: int, stop: int) -> StepCoefs:
        """The coefficients of rows [start, stop)."""
        return StepCoefs(*(t[start:stop] for t in self.as_tuple()))

    def as_tuple(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        return (self.alpha, self.beta, self.c_skip, self.c_out, self.alpha_next, self.beta_next)


def lcm_x0_(eps: Tensor, x: Tensor, coefs: StepCoefs, *, out: Tensor, tmp: Tensor) -> Tensor:
    """LCM boundary-condition step into `out`: F = (x - beta*eps)/alpha, x0 = c_out*F + c_skip*x.

    One kernel per operation, each rounding to the dtype as the plain expression does (no fused
    multiply-add), so the result is bit for bit that of the expression. `out` and `tmp` are
    buffers shaped like `x`, distinct from `x`, `eps` and each other.
    """
    torch.mul(coefs.beta, eps, out=tmp)
    torch.sub(x, tmp, out=tmp)
    tmp.div_(coefs.alpha)  # F
    torch.mul(coefs.c_out, tmp, out=out)
    torch.mul(coefs.c_skip, x, out=tmp)
    return out.add_(tmp)


def scale_(src: Tensor, scale: Tensor, *, out: Tensor, tmp32: Tensor) -> Tensor:
    """out = src * scale, with `scale` a 0-dim float32 tensor (a live fader on the device).

    Rounded as a Python-float scalar kernel rounds: the product of the fp32 values, cast once to
    `out`'s dtype. (A plain fp16 * fp32-0-dim product would first cast the scale to fp16.)
    `tmp32` is a float32 buffer shaped like `src`.
    """
    tmp32.copy_(src)
    tmp32.mul_(scale)
    return out.copy_(tmp32)


def guide_(
    eps_cond: Tensor, eps_uncond: Tensor, guidance: Tensor, *, out: Tensor, tmp: Tensor, tmp32: Tensor
) -> Tensor:
    """Classifier-free guidance into `out`: eps_u + g * (eps_c - eps_u); `guidance` 0-dim fp32."""
    torch.sub(eps_cond, eps_uncond, out=tmp)
    scale_(tmp, guidance, out=tmp, tmp32=tmp32)
    return torch.add(eps_uncond, tmp, out=out)


def residual_stock_(
    eps: Tensor, stock: Tensor, coefs: StepCoefs, next_noise: Tensor, *, tmp: Tensor, tmp2: Tensor
) -> Tensor:
    """The residual-CFG memory for the next call, written over `stock`.

    dx = lcm_x0(eps, beta*stock) treats the scaled stored noise as a latent; it is rescaled to
    the slot each row moves to (alpha_next/beta_next) and added to that slot's fixed noise.
    `next_noise` is the fixed noise of the next slot per row (init_noise rolled by one step).
    """
    torch.mul(coefs.beta, stock, out=tmp2)
    lcm_x0_(eps, tmp2, coefs, out=stock, tmp=tmp)  # dx
    stock.mul_(coefs.alpha_next).div_(coefs.beta_next)
    return stock.add_(next_noise)


def scalar(value: float, device: torch.device) -> Tensor:
    """A 0-dim float32 device tensor holding `value` (guidance, delta), written in place later."""
    return torch.tensor(float(value), dtype=torch.float32, device=device)


# Allocating forms of the same kernels, for the sequential reference path and small checks.
def lcm_x0(eps: Tensor, x: Tensor, coefs: StepCoefs) -> Tensor:
    """LCM boundary-condition step: F = (x - beta*eps)/alpha, x0 = c_out*F + c_skip*x."""
    out = torch.empty_like(x)
    return lcm_x0_(eps, x, coefs, out=out, tmp=torch.empty_like(out))


def guide(eps_cond: Tensor, eps_uncond: Tensor, guidance_scale: float | Tensor) -> Tensor:
    """Classifier-free guidance: eps_u + g * (eps_c - eps_u)."""
    g = guidance_scale if isinstance(guidance_scale, Tensor) else scalar(guidance_scale, eps_cond.device)
    out = torch.empty_like(eps_cond)
    tmp32 = torch.empty_like(out, dtype=torch.float32)
    return guide_(eps_cond, eps_uncond, g, out=out, tmp=torch.empty_like(out), tmp32=tmp32)


def residual_stock(eps: Tensor, stock: Tensor, coefs: StepCoefs, next_noise: Tensor) -> Tensor:
    """The residual-CFG memory for the next call (see `residual_stock_`), as a new tensor."""
    out = stock.clone()
    return residual_stock_(eps, out, coefs, next_noise, tmp=torch.empty_like(out), tmp2=torch.empty_like(out))


def boundary_scalings(scheduler: object, timesteps: list[int]) -> tuple[Tensor, Tensor]:
    """(c_skip, c_out), each (len(timesteps),), from the LCM scheduler's own formula."""
    pairs = [scheduler.get_scalings_for_boundary_condition_discrete(t) for t in timesteps]  # type: ignore[attr-defined]
    c_skip = torch.tensor([float(p[0]) for p in pairs])
    c_out = torch.tensor([float(p[1]) for p in pairs])
    return c_skip, c_out
