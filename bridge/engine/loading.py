"""Model loading: embedded `tiny` names, local diffusers folders, Hugging Face ids and single
`.safetensors` checkpoints, for the SD 1.5, SD 2.1/sd-turbo and SDXL/sdxl-turbo families, with an
optional tiny VAE (TAESD/TAESDXL) and an optional fused LCM-LoRA.

Every failure is a `ModelLoadError` that names the model, says what went wrong and what to do.
Downloads show huggingface_hub's progress bars; a local load shows none, and the notices that
diffusers and transformers print on every load of a model like ours, known to be harmless, are
dropped (only those exact messages, only while we load: `quiet_load`).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import torch

from bridge.engine.tiny import TINY_VARIANTS, ensure_tiny_model

log = logging.getLogger(__name__)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
TINY_VAE_SHORTCUTS = {"taesd": "madebyollin/taesd", "taesdxl": "madebyollin/taesdxl"}
LCM_LORA_SHORTCUTS = {
    "sd15": "latent-consistency/lcm-lora-sdv1-5",
    "sdxl": "latent-consistency/lcm-lora-sdxl",
}


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says why and what to do."""


class Family(str, Enum):
    """The architecture families the engine supports."""

    SD15 = "sd15"
    SD21 = "sd21"  # also sd-turbo
    SDXL = "sdxl"  # also sdxl-turbo


_SD_PIPELINES = {
    "StableDiffusionPipeline",
    "StableDiffusionImg2ImgPipeline",
    "LatentConsistencyModelPipeline",
    "StableDiffusionControlNetPipeline",
}
# The model cache: models, compile caches and TensorRT engines live under it (bridge.config has the
# same default as a config value).
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "sdbridge"

_SDXL_PIPELINES = {"StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline"}
_SUPPORTED = (
    "StableDiffusionPipeline (SD 1.5, SD 2.1, sd-turbo) or StableDiffusionXLPipeline (SDXL, sdxl-turbo)"
)


@dataclass(frozen=True)
class LoadOptions:
    """How to load a model. `cache_dir` holds the embedded models (and is passed to the hub)."""

    cache_dir: Path
    device: str = "cpu"
    dtype: torch.dtype | None = None  # None: float16 on CUDA, float32 elsewhere
    offline: bool = False  # never touch the network (the hub cache must hold the model)
    tiny_vae: str | None = None  # "taesd", "taesdxl", a hub id or a local folder
    lcm_lora: str | None = None  # "lcm" (by family), a hub id or a local folder/file
    config: str | None = None  # a local diffusers folder with the configs for a single-file checkpoint


def resolve_dtype(options: LoadOptions) -> torch.dtype:
    """The dtype to load with: the explicit one, else fp16 on CUDA and fp32 on the CPU."""
    if options.dtype is not None:
        return options.dtype
    return torch.float16 if options.device.startswith("cuda") else torch.float32


def resolve_device(name: str) -> str:
    """`auto` is CUDA when torch sees a GPU, else the CPU; anything else is checked and returned."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"device {name!r} was asked for, but torch sees no CUDA device; use cpu or auto")
    return name


def resolve_dtype_name(name: str) -> torch.dtype | None:
    """A config dtype name as a torch dtype; `auto` is None (float16 on CUDA, float32 elsewhere)."""
    names = {"auto": None, "float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}
    if name not in names:
        raise ModelLoadError(f"dtype must be one of {', '.join(names)}, got {name!r}")
    return names[name]


def family_of_pipeline(class_name: str, model: str) -> Family:
    """The family of a diffusers pipeline class name, or a clear error for anything else."""
    if class_name in _SDXL_PIPELINES:
        return Family.SDXL
    if class_name in _SD_PIPELINES:
        return Family.SD15
    raise ModelLoadError(
        f"model {model!r} is a {class_name}, an architecture the bridge does not run; use a {_SUPPORTED}"
    )


def detect_single_file_family(path: Path) -> Family:
    """The family of an original-format (LDM) checkpoint, from its tensor names."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = list(handle.keys())
    except Exception as exc:  # safetensors raises its own error types for bad headers
        raise ModelLoadError(f"checkpoint {str(path)!r} is not a readable .safetensors file: {exc}") from exc
    if any(k.startswith("conditioner.embedders.1.") for k in keys):
        return Family.SDXL
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return Family.SD21
    if any(k.startswith("cond_stage_model.transformer.") for k in keys):
        return Family.SD15
    raise ModelLoadError(
        f"checkpoint {str(path)!r} has an unknown architecture: none of its {len(keys)} tensors belongs to an "
        "SD 1.5 (cond_stage_model.transformer.*), SD 2.x (cond_stage_model.model.*) or SDXL "
        "(conditioner.embedders.1.*) text encoder; use a Stable Diffusion 1.5, 2.1 or SDXL checkpoint"
    )


def _pipeline_class(family: Family) -> Any:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline if family is Family.SDXL else StableDiffusionPipeline


def _hub_error(model: str, exc: Exception) -> ModelLoadError:
    """Translate a hub or file error into what the user should do."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    if isinstance(exc, GatedRepoError):
        return ModelLoadError(
            f"model {model!r} is gated on the Hugging Face hub: accept its licence on the model page, "
            "then log in with `hf auth login`"
        )
    if isinstance(exc, RepositoryNotFoundError):
        return ModelLoadError(
            f"no model {model!r} on the Hugging Face hub: check the spelling (owner/name), "
            "or log in with `hf auth login` if it is private"
        )
    if isinstance(exc, LocalEntryNotFoundError):
        return ModelLoadError(
            f"model {model!r} is not in the local Hugging Face cache and the hub cannot be reached "
            "(offline, or HF_HUB_OFFLINE=1). Fix: run once with a network connection to download it, "
            "or set model to a local diffusers folder or .safetensors file, or use the embedded 'tiny' model"
        )
    if isinstance(exc, EntryNotFoundError):
        return ModelLoadError(
            f"model {model!r} on the hub has no model_index.json: it is not a diffusers pipeline"
        )
    return ModelLoadError(f"could not load model {model!r}: {type(exc).__name__}: {exc}")


# (logger, what the message contains): notices printed on every load that say nothing wrong.
_KNOWN_NOTICES = (
    # transformers without torchvision falls back to the PIL image processors, which the
    # pipelines' (unused) feature extractors are; nothing of ours needs torchvision.
    ("transformers.utils.import_utils", "requires torchvision (not installed); falling back to"),
    # AutoencoderTiny's saved config carries block_out_channels, which its __init__ does not take.
    ("diffusers.configuration_utils", "{'block_out_channels': "),
    # StableDiffusionPipeline's type hint says AutoencoderKL; AutoencoderTiny (TAESD) works there.
    ("diffusers.pipelines.pipeline_utils", "Expected types for vae: "),
)


class _DropKnown(logging.Filter):
    def __init__(self, text: str, also: str = "") -> None:
        super().__init__()
        self.text, self.also = text, also

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (self.text in message and self.also in message)


@contextmanager
def quiet_load() -> Iterator[None]:
    """While loading: no progress bars from diffusers and transformers (a local load is quick;
    hub downloads keep huggingface_hub's own bars), and the `_KNOWN_NOTICES` dropped. Every
    other warning still shows. Restores both on exit."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    bars = (diffusers_logging.is_progress_bar_enabled(), transformers_logging.is_progress_bar_enabled())
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    filters = []
    for name, text in _KNOWN_NOTICES:
        also = "AutoencoderTiny" if name != "transformers.utils.import_utils" else ""
        flt = _DropKnown(text, also)
        logging.getLogger(name).addFilter(flt)
        filters.append((name, flt))
    try:
        yield
    finally:
        for name, flt in filters:
            logging.getLogger(name).removeFilter(flt)
        if bars[0]:
            diffusers_logging.enable_progress_bar()
        if bars[1]:
            transformers_logging.enable_progress_bar()


def load_pipeline(model: str, options: LoadOptions) -> Any:
    """Load `model` as a diffusers pipeline on `options.device`, ready for `StreamEngine`.

    `model` is an embedded name (`tiny`, `tiny-sd21`, `tiny-sdxl`), a local diffusers folder, a
    single `.safetensors` checkpoint, or a Hugging Face id (`stabilityai/sd-turbo`).
    """
    with quiet_load():
        return _load_pipeline(model, options)


def _load_pipeline(model: str, options: LoadOptions) -> Any:
    dtype = resolve_dtype(options)
    path = Path(model).expanduser()
    if model in TINY_VARIANTS:
        pipe = _from_folder(ensure_tiny_model(model, options.cache_dir), model, dtype)
    elif path.is_dir():
        pipe = _from_folder(path, model, dtype)
    elif path.suffix in (".safetensors", ".ckpt"):
        pipe = _from_single_file(path, model, dtype, options)
    elif _HUB_ID.match(model) and not path.exists():
        pipe = _from_hub(model, dtype, options)
    else:
        raise ModelLoadError(
            f"model {model!r} not found: it is not an embedded model ({', '.join(sorted(TINY_VARIANTS))}), "
            "not an existing diffusers folder or .safetensors file, and not a Hugging Face id (owner/name)"
        )
    if options.tiny_vae:
        _swap_tiny_vae(pipe, options, dtype)
    if options.lcm_lora:
        _fuse_lcm_lora(pipe, options)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(options.device)


def _from_folder(folder: Path, model: str, dtype: torch.dtype) -> Any:
    index = folder / "model_index.json"
    if not index.is_file():
        raise ModelLoadError(
            f"folder {str(folder)!r} is not a diffusers pipeline (no model_index.json); "
            "save one with pipe.save_pretrained(folder), or pass a .safetensors checkpoint instead"
        )
    try:
        class_name = json.loads(index.read_text(encoding="utf-8"))["_class_name"]
    except (json.JSONDecodeError, KeyError) as exc:
        raise ModelLoadError(f"{str(index)!r} is not a valid model_index.json: {exc}") from exc
    family = family_of_pipeline(class_name, model)
    return _pipeline_class(family).from_pretrained(str(folder), dtype=dtype, local_files_only=True)


def _from_hub(model: str, dtype: torch.dtype, options: LoadOptions) -> Any:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import enable_progress_bars

    enable_progress_bars()  # a multi-GB download must show progress
    try:
        # Read the class first, so an unsupported architecture fails before a big download.
        index = hf_hub_download(model, "model_index.json", local_files_only=options.offline)
        class_name = json.loads(Path(index).read_text(encoding="utf-8"))["_class_name"]
    except Exception as exc:
        raise _hub_error(model, exc) from exc
    cls = _pipeline_class(family_of_pipeline(class_name, model))
    log.info("loading %s (%s) from the Hugging Face hub", model, class_name)
    try:
        try:
            return cls.from_pretrained(
                model, dtype=dtype, local_files_only=options.offline, variant=_variant(dtype)
            )
        except ValueError as exc:
            if _variant(dtype) is None or "variant" not in str(exc):
                raise
            # No fp16 files published: take the full-precision ones and cast.
            return cls.from_pretrained(model, dtype=dtype, local_files_only=options.offline)
    except Exception as exc:
        raise _hub_error(model, exc) from exc


def _variant(dtype: torch.dtype) -> str | None:
    """Ask for the fp16 weight files when loading in fp16 (half the download)."""
    return "fp16" if dtype == torch.float16 else None


def _from_single_file(path: Path, model: str, dtype: torch.dtype, options: LoadOptions) -> Any:
    if not path.is_file():
        raise ModelLoadError(f"checkpoint {model!r} does not exist")
    if path.suffix != ".safetensors":
        raise ModelLoadError(
            f"checkpoint {model!r} is a pickle (.ckpt), which can run code when loaded; "
            "convert it to .safetensors first"
        )
    family = detect_single_file_family(path)
    kwargs: dict[str, Any] = {"dtype": dtype, "local_files_only": options.offline}
    if options.config:
        kwargs["config"] = options.config
    try:
        return _pipeline_class(family).from_single_file(str(path), **kwargs)
    except Exception as exc:
        raise ModelLoadError(
            f"could not load checkpoint {model!r} as {family.value}: {type(exc).__name__}: {exc}. "
            "A single-file checkpoint needs its component configs: run once online, or set "
            "model.config to a local diffusers folder of the same architecture"
        ) from exc


def _swap_tiny_vae(pipe: Any, options: LoadOptions, dtype: torch.dtype) -> None:
    from diffusers import AutoencoderTiny

    assert options.tiny_vae is not None
    source = TINY_VAE_SHORTCUTS.get(options.tiny_vae, options.tiny_vae)
    folder = Path(source).expanduser()
    if (folder / "vae" / "config.json").is_file():
        folder = folder / "vae"  # a whole pipeline folder: take its VAE
    try:
        if folder.is_dir():
            vae = AutoencoderTiny.from_pretrained(str(folder), dtype=dtype, local_files_only=True)
        else:
            vae = AutoencoderTiny.from_pretrained(source, dtype=dtype, local_files_only=options.offline)
    except Exception as exc:
        raise _hub_error(source, exc) from exc
    pipe.vae = vae
    pipe.register_modules(vae=vae)


def _fuse_lcm_lora(pipe: Any, options: LoadOptions) -> None:
    assert options.lcm_lora is not None
    try:
        import peft  # noqa: F401  (diffusers needs it for LoRA)
    except ImportError:
        raise ModelLoadError(
            'LCM-LoRA needs peft: pip install "streamdiffusion-bridge[lora]"; or use a model distilled '
            "for few steps (sd-turbo, sdxl-turbo) without a LoRA"
        ) from None
    family = Family.SDXL if getattr(pipe, "text_encoder_2", None) is not None else Family.SD15
    source = LCM_LORA_SHORTCUTS[family.value] if options.lcm_lora == "lcm" else options.lcm_lora
    try:
        pipe.load_lora_weights(source, adapter_name="lcm", local_files_only=options.offline)
        pipe.fuse_lora(adapter_names=["lcm"], lora_scale=1.0)
        pipe.unload_lora_weights()  # keeps the fused weights, frees the adapter layers
    except Exception as exc:
        raise _hub_error(source, exc) from exc
