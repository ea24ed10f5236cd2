"""ONNX export of the UNet, the VAE encoder and the VAE decoder, for the `tensorrt` acceleration.

Each component is described by an `ExportSpec`: a declared list of named inputs and outputs
(`TensorSpec`), the batch sizes ("rows") it must serve, and the latent size. The UNet's inputs are
read from its config and mirror its real call signature: `sample`, `timestep` (float32),
`encoder_hidden_states`, and for SDXL the `added_cond_kwargs` `text_embeds` and `time_ids`. Each
input carries a `route`, the place in the UNet call it feeds, so a new conditioning input
(ControlNet's `down_block_additional_residuals`, later) is one more `TensorSpec`, not a redesign.

The export runs the TorchScript exporter (`torch.onnx.export(..., dynamo=False)`: seconds on the
tiny models where the dynamo exporter took minutes), with a dynamic batch axis that covers every
row count in `spec.rows`. The ONNX is exported in the module's own dtype: fp16 on the GPU path
(TensorRT builds it strongly typed), fp32 on the CPU for the parity tests. Past protobuf's 2 GB
(sd-turbo's UNet is 1.7 GB in fp16, SDXL's about 5 GB) the weights go into one external data file.
Nothing here changes the pipeline's modules.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from bridge.engine.guidance import CfgType

log = logging.getLogger(__name__)

BATCH = "B"  # the symbolic batch (rows) axis in a TensorSpec's shape
DEFAULT_OPSET = 17
EXTERNAL_DATA_THRESHOLD_BYTES = 2_000_000_000  # protobuf refuses a message of 2 GiB or more
TEXT_LENGTH = 77  # CLIP's token count, the sequence axis of encoder_hidden_states


class Component(str, Enum):
    """The exported parts of a pipeline."""

    UNET = "unet"
    VAE_ENCODER = "vae_encoder"
    VAE_DECODER = "vae_decoder"


@dataclass(frozen=True)
class TensorSpec:
    """One named input or output. `shape` holds ints and `BATCH` for the rows axis; `dtype` None
    means the module's own dtype (fp16 on the GPU path). `route` is where the module's call takes
    the tensor: ("sample",) is a keyword argument, ("added_cond_kwargs", "text_embeds") a key of a
    dict argument, ("down_block_additional_residuals", 0) an item of a list argument."""

    name: str
    shape: tuple[int | str, ...]
    dtype: torch.dtype | None = None
    route: tuple[str | int, ...] = ()

    def concrete(self, rows: int) -> tuple[int, ...]:
        """The shape with the batch axis set to `rows`."""
        return tuple(rows if d == BATCH else int(d) for d in self.shape)

    def resolved_dtype(self, module_dtype: torch.dtype) -> torch.dtype:
        return self.dtype if self.dtype is not None else module_dtype


@dataclass(frozen=True)
class ExportSpec:
    """What one exported component takes and gives, and the batch sizes it serves."""

    component: Component
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    rows: tuple[int, ...]  # every batch size the config can reach, ascending
    latent_hw: tuple[int, int]  # (H/8, W/8)
    config: dict[str, Any] = field(default_factory=dict, compare=False)  # the module's config, for cache keys

    def __post_init__(self) -> None:
        if not self.rows or any(r < 1 for r in self.rows) or list(self.rows) != sorted(set(self.rows)):
            raise ValueError(
                f"{self.component.value}: rows must be ascending distinct batch sizes >= 1, got {self.rows}"
            )


def reachable_unet_rows(
    cfg_type: str | CfgType, num_steps: int, frame_buffer_size: int, *, denoising_batch: bool = True
) -> tuple[int, ...]:
    """Every UNet batch size an engine with this layout can call, whatever the guidance fader does.

    Stream batch (n steps, f frames): `none`/`self` always run n*f rows; `full` runs n*f unguided
    and 2n*f guided (g > 1); `initialize` n*f unguided and (n+1)*f guided. The sequential
    reference runs f rows per call, 2f for the guided calls of `full` and the first of `initialize`.
    """
    cfg = CfgType.parse(cfg_type)
    n, f = num_steps, frame_buffer_size
    if n < 1 or f < 1:
        raise ValueError(f"num_steps and frame_buffer_size must be >= 1, got {n} and {f}")
    base = n * f if denoising_batch else f
    if cfg in (CfgType.NONE, CfgType.SELF):
        return (base,)
    if not denoising_batch:
        return (f, 2 * f)
    guided = 2 * n * f if cfg is CfgType.FULL else (n + 1) * f
    return tuple(sorted({base, guided}))


def reachable_unet_rows_for_steps(
    cfg_type: str | CfgType, step_counts: Sequence[int], frame_buffer_size: int
) -> tuple[int, ...]:
    """The union of `reachable_unet_rows` over every step count a show may switch to live."""
    rows: set[int] = set()
    for n in step_counts:
        rows.update(reachable_unet_rows(cfg_type, n, frame_buffer_size))
    return tuple(sorted(rows))


def unet_spec(
    unet: Any,
    *,
    width: int,
    height: int,
    rows: Sequence[int],
    text_length: int = TEXT_LENGTH,
    extra_inputs: Sequence[TensorSpec] = (),
) -> ExportSpec:
    """The UNet's inputs as the engine calls it (`unet(sample, timestep, encoder_hidden_states=...,
    added_cond_kwargs=...)`), read from its config. `extra_inputs` appends conditioning inputs
    (ControlNet residuals) with their own routes."""
    cfg = unet.config
    h, w = height // 8, width // 8
    inputs = [
        TensorSpec("sample", (BATCH, int(cfg.in_channels), h, w), route=("sample",)),
        # float32 whatever the module dtype: diffusers' time projection casts it, and fp16 could not
        # hold every timestep exactly.
        TensorSpec("timestep", (BATCH,), torch.float32, route=("timestep",)),
        TensorSpec(
            "encoder_hidden_states",
            (BATCH, text_length, int(cfg.cross_attention_dim)),
            route=("encoder_hidden_states",),
        ),
    ]
    if getattr(cfg, "addition_embed_type", None) == "text_time":
        time_dims = 6 * int(cfg.addition_time_embed_dim)  # 6 micro-conditioning ids, each embedded
        pooled = int(cfg.projection_class_embeddings_input_dim) - time_dims
        inputs += [
            TensorSpec("text_embeds", (BATCH, pooled), route=("added_cond_kwargs", "text_embeds")),
            TensorSpec("time_ids", (BATCH, 6), route=("added_cond_kwargs", "time_ids")),
        ]
    names = [s.name for s in [*inputs, *extra_inputs]]
    if len(set(names)) != len(names):
        raise ValueError(f"unet inputs must have distinct names, got {names}")
    outputs = (TensorSpec("eps", (BATCH, int(cfg.out_channels), h, w)),)
    return ExportSpec(Component.UNET, (*inputs, *extra_inputs), outputs, tuple(rows), (h, w), dict(cfg))


def vae_encoder_spec(vae: Any, *, width: int, height: int, rows: Sequence[int]) -> ExportSpec:
    """pixels (B, 3, H, W) in [-1, 1] -> `latents` (TAESD) or `moments` (KL: mean and log-variance,
    sampled in torch with the engine's generator, for exactness). Unscaled by scaling_factor."""
    h, w = height // 8, width // 8
    is_kl = hasattr(vae, "quant_conv")
    latent = int(vae.config.latent_channels)
    out = (
        TensorSpec("moments", (BATCH, 2 * latent, h, w))
        if is_kl
        else TensorSpec("latents", (BATCH, latent, h, w))
    )
    pixels = TensorSpec("pixels", (BATCH, int(vae.config.in_channels), height, width))
    return ExportSpec(Component.VAE_ENCODER, (pixels,), (out,), tuple(rows), (h, w), dict(vae.config))


def vae_decoder_spec(vae: Any, *, width: int, height: int, rows: Sequence[int]) -> ExportSpec:
    """latents (B, 4, H/8, W/8), already divided by scaling_factor -> image (B, 3, H, W) in about
    [-1, 1]; the engine's post-processing stays in torch."""
    h, w = height // 8, width // 8
    latents = TensorSpec("latents", (BATCH, int(vae.config.latent_channels), h, w))
    image = TensorSpec("image", (BATCH, int(vae.config.out_channels), height, width))
    return ExportSpec(Component.VAE_DECODER, (latents,), (image,), tuple(rows), (h, w), dict(vae.config))


def _place(call: dict[str, Any], route: tuple[str | int, ...], value: Tensor) -> None:
    """Put `value` at `route` inside the keyword arguments `call` (dicts and lists made on the way)."""
    container: Any = call
    for key, nxt in itertools.pairwise(route):
        if isinstance(container, list):
            assert isinstance(key, int)
            while len(container) <= key:
                container.append(None)
        elif key not in container:
            container[key] = [] if isinstance(nxt, int) else {}
        container = container[key]
    last = route[-1]
    if isinstance(container, list):
        assert isinstance(last, int)
        while len(container) <= last:
            container.append(None)
    container[last] = value


class ExportModule(nn.Module):
    """A component as a module of positional tensors in `spec.inputs` order, returning its one
    output: what the exporter traces, and the torch reference the parity checks compare with."""

    def __init__(self, pipe: Any, spec: ExportSpec) -> None:
        super().__init__()
        self.spec = spec
        self.inner: Any = pipe.unet if spec.component is Component.UNET else pipe.vae
        self._is_kl = hasattr(self.inner, "quant_conv")
        calls: dict[Component, Callable[[dict[str, Any]], Tensor]] = {
            Component.UNET: self._unet,
            Component.VAE_ENCODER: self._encode,
            Component.VAE_DECODER: self._decode,
        }
        self._call = calls[spec.component]

    def forward(self, *tensors: Tensor) -> Tensor:
        kwargs: dict[str, Any] = {}
        for tspec, tensor in zip(self.spec.inputs, tensors, strict=True):
            _place(kwargs, tspec.route or (tspec.name,), tensor)
        return self._call(kwargs)

    def _unet(self, kwargs: dict[str, Any]) -> Tensor:
        for key, value in kwargs.items():
            if isinstance(value, list):
                kwargs[key] = tuple(value)  # diffusers takes the residuals as a tuple
        out: Tensor = self.inner(**kwargs, return_dict=False)[0]
        return out

    def _encode(self, kwargs: dict[str, Any]) -> Tensor:
        encoded = self.inner.encode(kwargs["pixels"])
        out: Tensor = encoded.latent_dist.parameters if self._is_kl else encoded.latents
        return out

    def _decode(self, kwargs: dict[str, Any]) -> Tensor:
        out: Tensor = self.inner.decode(kwargs["latents"], return_dict=False)[0]
        return out


def component_dtype(pipe: Any, spec: ExportSpec) -> torch.dtype:
    module = pipe.unet if spec.component is Component.UNET else pipe.vae
    dtype: torch.dtype = module.dtype
    return dtype


def sample_inputs(
    spec: ExportSpec, rows: int, *, dtype: torch.dtype, device: torch.device | str = "cpu", seed: int = 0
) -> list[Tensor]:
    """Fixed, seeded inputs in `spec.inputs` order: what an export traces with and what a built
    engine is validated on. Values sit where the engine's do: timesteps in [0, 1000), time_ids the
    engine's (H, W, 0, 0, H, W) micro-conditioning, everything else standard normal."""
    gen = torch.Generator().manual_seed(seed)
    h, w = spec.latent_hw
    tensors = []
    for tspec in spec.inputs:
        shape = tspec.concrete(rows)
        if tspec.name == "timestep":
            value = torch.randint(0, 1000, shape, generator=gen).float()
        elif tspec.name == "time_ids":
            value = torch.tensor([[8 * h, 8 * w, 0, 0, 8 * h, 8 * w]], dtype=torch.float32).expand(rows, 6)
        elif tspec.name == "pixels":
            value = torch.rand(shape, generator=gen) * 2 - 1
        else:
            value = torch.randn(shape, generator=gen)
        tensors.append(value.to(device=device, dtype=tspec.resolved_dtype(dtype)).contiguous())
    return tensors


def _weight_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters()) + sum(
        b.numel() * b.element_size() for b in module.buffers()
    )


@torch.no_grad()
def export_onnx(
    pipe: Any,
    spec: ExportSpec,
    path: Path,
    *,
    opset: int = DEFAULT_OPSET,
    external_data_threshold_bytes: int = EXTERNAL_DATA_THRESHOLD_BYTES,
) -> Path:
    """Export `spec.component` of `pipe` to `path` (a `.onnx` file; its folder is created).
    Returns `path`.

    The batch axis of every input and output is dynamic, traced at the largest row count. Weights
    past `external_data_threshold_bytes` go into `<name>.data` next to the model."""
    import onnx

    module = ExportModule(pipe, spec).eval()
    dtype = component_dtype(pipe, spec)
    device = next(module.inner.parameters()).device
    args = tuple(sample_inputs(spec, spec.rows[-1], dtype=dtype, device=device))
    path.parent.mkdir(parents=True, exist_ok=True)
    names_in = [s.name for s in spec.inputs]
    names_out = [s.name for s in spec.outputs]
    dynamic: dict[str, dict[int, str]] = {
        s.name: {s.shape.index(BATCH): BATCH} for s in (*spec.inputs, *spec.outputs) if BATCH in s.shape
    }
    log.info("exporting %s to ONNX (opset %d, %s, rows %s)", spec.component.value, opset, dtype, spec.rows)
    torch.onnx.export(
        module,
        args,
        str(path),
        input_names=names_in,
        output_names=names_out,
        dynamic_axes=dynamic,
        opset_version=opset,
        do_constant_folding=True,
        dynamo=False,
    )
    if _weight_bytes(module.inner) > external_data_threshold_bytes:
        _to_one_external_file(onnx, path)
    return path


def _to_one_external_file(onnx: Any, path: Path) -> None:
    """Gather the weights into one `<name>.data` file beside the model (the TorchScript exporter
    writes one file per tensor past 2 GB), so an export is two files that move together."""
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    header = onnx.load(str(path), load_external_data=False)
    strays = {ExternalDataInfo(t).location for t in header.graph.initializer if uses_external_data(t)}
    model = onnx.load(str(path), load_external_data=True)
    location = path.name + ".data"
    tmp = path.with_name(path.name + ".tmp")
    onnx.save_model(
        model,
        str(tmp),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=location,
        size_threshold=1024,
    )
    os.replace(tmp, path)
    for name in strays - {location}:
        (path.parent / name).unlink(missing_ok=True)
