"""`acceleration: compile`: inductor kernels for the UNet and the VAE, compiled at warm-up, cached on disk.

Two rules hold whatever the mode:
- No compile mid-show. Each module is compiled with static shapes (`dynamic=False`); the engine's
  `warm_up` runs every layout the config can reach (both sides of guidance 1.0), so every
  reachable batch size is compiled before the show starts, and a guidance crossing hits a
  compiled entry. A step-count change compiles the new batch while the status says `warming`.
  The recompile limit is raised above the layouts a show can reach, so dynamo never silently
  falls back to eager (its default limit is 8).
- A persistent cache. Inductor's caches (FX graphs, autotuning, Triton kernels) live under the
  model cache, `<cache_dir>/compile/torch-<version>/`, so a second start of the same config
  reuses them.

The mode (`engine.compile_mode`) defaults to inductor's `default`. `max-autotune-no-cudagraphs`
(autotuned GEMM and convolution kernels, no CUDA graphs of inductor's own: the engine captures
the frame itself) takes longer to compile; which one measures best on a given GPU is for
`sdbridge bench --compile-mode default max-autotune-no-cudagraphs` to say, both side by side in
one run (docs/benchmarks.md).

Compiled frames are fast, not exact: inductor fuses elementwise ops without rounding to fp16
between them. Compare them with the exact path by PSNR, not `torch.equal`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from bridge.acceleration import COMPILE_MODES, DEFAULT_COMPILE_MODE
from bridge.engine.accel.networks import Networks

log = logging.getLogger(__name__)

RECOMPILE_LIMIT = 64  # > the entries a show reaches: 3 modules x (up to 2 layouts) x step counts


def compile_cache_dir(cache_dir: Path) -> Path:
    """Where this torch's compile caches live under the model cache."""
    return Path(cache_dir).expanduser() / "compile" / f"torch-{torch.__version__}"


def use_compile_cache(cache_dir: Path) -> Path:
    """Point inductor's and Triton's on-disk caches under the model cache, with the FX-graph and
    AOTAutograd caches on. A TORCHINDUCTOR_CACHE_DIR set by the user wins. Call it before the
    first compile of the process: inductor fixes its directory then."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    root = compile_cache_dir(cache_dir)
    chosen = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    # torch writes its default into the environment once it has used it: that is no user's choice.
    if chosen is None or os.path.abspath(chosen) == os.path.abspath(default_cache_dir()):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(root / "inductor")
    inductor = Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
    os.environ.setdefault("TRITON_CACHE_DIR", str(inductor / "triton"))
    inductor.mkdir(parents=True, exist_ok=True)
    import torch._functorch.config
    import torch._inductor.config

    torch._inductor.config.fx_graph_cache = True
    torch._functorch.config.enable_autograd_cache = True
    return inductor


def compiled_networks(
    pipe: Any, *, mode: str = DEFAULT_COMPILE_MODE, cache_dir: Path | None = None, backend: str = "inductor"
) -> Networks:
    """`Networks` whose UNet, VAE encoder and VAE decoder are torch.compile'd (lazily: each
    compiles at its first call per batch size, which `StreamEngine.warm_up` makes happen before
    the show). The pipe's modules are not changed. `backend` other than inductor is for tests of
    the recompile rules (dynamo's guards are the backend's concern-free part)."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode must be one of {', '.join(COMPILE_MODES)}, got {mode!r}")
    if cache_dir is not None:
        where = use_compile_cache(cache_dir)
        log.info("torch.compile mode %s, cache %s", mode, where)
    import torch._dynamo.config

    limit = torch._dynamo.config
    limit.recompile_limit = max(limit.recompile_limit, RECOMPILE_LIMIT)
    limit.accumulated_recompile_limit = max(limit.accumulated_recompile_limit, 4 * RECOMPILE_LIMIT)

    def wrap(module: Any) -> Any:
        if backend == "inductor":
            return torch.compile(module, mode=mode, dynamic=False)
        return torch.compile(module, backend=backend, dynamic=False)

    vae = pipe.vae
    return Networks(
        pipe,
        unet=wrap(pipe.unet),
        encoder=wrap(vae.encoder),
        decoder=wrap(vae.decoder),
        name=f"compile ({mode})" if backend == "inductor" else f"compile ({backend})",
    )
