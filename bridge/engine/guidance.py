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


def lcm_x0(eps: Tensor, x: Tensor, coefs: StepCoefs) -> Tensor:
    """LCM boundary-condition step: F = (x - beta*eps)/alpha, x0 = c_out*F + c_skip*x."""
    f_theta = (x - coefs.beta * eps) / coefs.alpha
    return coefs.c_out * f_theta + coefs.c_skip * x


def guide(eps_cond: Tensor, eps_uncond: Tensor, guidance_scale: float) -> Tensor:
    """Classifier-free guidance: eps_u + g * (eps_c - eps_u)."""
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)


def residual_stock(eps: Tensor, stock: Tensor, coefs: StepCoefs, next_noise: Tensor) -> Tensor:
    """The residual-CFG memory for the next call.

    dx = lcm_x0(eps, beta*stock) treats the scaled stored noise as a latent; it is rescaled to
    the slot each row moves to (alpha_next/beta_next) and added to that slot's fixed noise.
    `next_noise` is the fixed noise of the next slot per row (init_noise rolled by one step).
    """
    dx = lcm_x0(eps, coefs.beta * stock, coefs)
    return next_noise + coefs.alpha_next * dx / coefs.beta_next


def boundary_scalings(scheduler: object, timesteps: list[int]) -> tuple[Tensor, Tensor]:
    """(c_skip, c_out), each (len(timesteps),), from the LCM scheduler's own formula."""
    pairs = [scheduler.get_scalings_for_boundary_condition_discrete(t) for t in timesteps]  # type: ignore[attr-defined]
    c_skip = torch.tensor([float(p[0]) for p in pairs])
    c_out = torch.tensor([float(p[1]) for p in pairs])
    return c_skip, c_out
