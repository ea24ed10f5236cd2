"""Shared fixtures: the embedded tiny models, generated once and kept across runs in pytest's
cache, and helpers for driving the engine and the bridge."""

from __future__ import annotations

import hashlib
import importlib.metadata
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from bridge.engine import tiny
from bridge.engine.loading import LoadOptions, load_pipeline

# What the generated models depend on besides tiny.py's own source (hashed whole, so a change
# to any weight, calibration or layout there builds them afresh even without a version bump).
_MODEL_LIBRARIES = ("torch", "diffusers", "transformers", "tokenizers", "safetensors")


def tiny_models_key() -> str:
    """Names one generation of the tiny models: the generator's format version, a hash of its
    source and the versions of the libraries that build and save them."""
    digest = hashlib.sha256(Path(tiny.__file__).read_bytes())
    for library in _MODEL_LIBRARIES:
        digest.update(f"{library}={importlib.metadata.version(library)};".encode())
    return f"v{tiny.TINY_FORMAT_VERSION}-{digest.hexdigest()[:16]}"


@pytest.fixture(scope="session")
def model_cache(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The engine's cache folder, holding the tiny models. Generating them takes about 100 s, so
    they are kept across runs under `.pytest_cache/d/sdbridge-models-<key>` (`tiny_models_key`);
    a new key removes the folders of older ones. One test
    (test_engine_loading::test_tiny_models_are_identical_across_generations) builds a model
    afresh and compares it with this copy. Without pytest's cache (`-p no:cacheprovider`), a
    temporary folder per session."""
    cache = getattr(request.config, "cache", None)
    if cache is None:
        return tmp_path_factory.mktemp("sdbridge-cache")
    folder = Path(cache.mkdir(f"sdbridge-models-{tiny_models_key()}"))
    for old in folder.parent.glob("sdbridge-models-*"):
        if old != folder:
            shutil.rmtree(old, ignore_errors=True)
    return folder


@pytest.fixture(scope="session")
def tiny_pipe(model_cache: Path) -> Any:
    return load_pipeline("tiny", LoadOptions(cache_dir=model_cache))


@pytest.fixture(scope="session")
def tiny_sd21_pipe(model_cache: Path) -> Any:
    return load_pipeline("tiny-sd21", LoadOptions(cache_dir=model_cache))


@pytest.fixture(scope="session")
def tiny_sdxl_pipe(model_cache: Path) -> Any:
    return load_pipeline("tiny-sdxl", LoadOptions(cache_dir=model_cache))


def tiny_bridge(tiny_pipe: Any, overrides: list[str], size: int = 64, **kwargs: Any) -> Any:
    """A `Bridge` on the tiny model at `size`, with no outputs but the ones `kwargs` brings
    (`sinks=`, `source=`), configured by `--set`-style `overrides`."""
    from bridge.config import load_config
    from bridge.engine import StreamEngine
    from bridge.runtime import Bridge, EngineDriver

    base = ["output.kind=null", "extra_outputs=[]", f"engine.width={size}", f"engine.height={size}"]
    config = load_config(None, [*base, *overrides])

    def factory(cfg: Any) -> EngineDriver:
        return EngineDriver(StreamEngine(tiny_pipe, [32, 45], width=size, height=size, cfg_type="self"))

    return Bridge(config, engine_factory=factory, **kwargs)


def pattern(k: int, size: int = 64) -> torch.Tensor:
    """A smooth moving test frame k, (1, 3, size, size) float in [0, 1]."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    t = 0.7 * k
    rgb = [
        0.5 + 0.5 * torch.sin(6 * xx + t),
        0.5 + 0.5 * torch.cos(5 * yy - t),
        ((xx - 0.5) ** 2 + yy**2 < 0.3).float(),
    ]
    return torch.stack(rgb)[None]


def pattern_uint8(k: int, size: int = 64) -> np.ndarray:
    """pattern(k) as an (H, W, 4) uint8 RGBA array."""
    rgb = (pattern(k, size)[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    return np.concatenate([rgb, np.full((size, size, 1), 255, np.uint8)], axis=2)


class UNetSpy:
    """Records every UNet call: the batch it saw, its inputs and its output."""

    def __init__(self) -> None:
        self.batches: list[int] = []
        self.inputs: list[torch.Tensor] = []
        self.timesteps: list[torch.Tensor] = []
        self.outputs: list[torch.Tensor] = []
        self.kwargs: list[dict[str, Any]] = []


@contextmanager
def spy_unet(pipe: Any) -> Iterator[UNetSpy]:
    spy = UNetSpy()

    def pre(_module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        spy.batches.append(int(args[0].shape[0]))
        spy.inputs.append(args[0].clone())
        spy.timesteps.append(args[1].clone())
        spy.kwargs.append(kwargs)

    def post(_module: Any, _args: Any, _kwargs: Any, output: Any) -> None:
        spy.outputs.append((output[0] if isinstance(output, tuple) else output.sample).clone())

    h1 = pipe.unet.register_forward_pre_hook(pre, with_kwargs=True)
    h2 = pipe.unet.register_forward_hook(post, with_kwargs=True)
    try:
        yield spy
    finally:
        h1.remove()
        h2.remove()


@contextmanager
def count_calls(module: torch.nn.Module) -> Iterator[list[int]]:
    """Counts forward calls of `module` (the list's length)."""
    calls: list[int] = []
    handle = module.register_forward_hook(lambda *_: calls.append(1))
    try:
        yield calls
    finally:
        handle.remove()
