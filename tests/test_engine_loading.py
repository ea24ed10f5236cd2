"""Model loading: the embedded tiny models, local folders, errors that say what to do."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from bridge.engine import StreamEngine
from bridge.engine.loading import (
    Family,
    LoadOptions,
    ModelLoadError,
    detect_single_file_family,
    load_pipeline,
)
from bridge.engine.tiny import ensure_tiny_model, tiny_model_dir
from tests.conftest import pattern


def test_tiny_is_generated_once_and_loaded_through_from_pretrained(model_cache: Path, tiny_pipe: Any) -> None:
    folder = tiny_model_dir("tiny", model_cache)
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["vae"] == ["diffusers", "AutoencoderTiny"]
    assert index["tokenizer"] == ["transformers", "CLIPTokenizer"]
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert ensure_tiny_model("tiny", model_cache) == folder
    assert weights.stat().st_mtime_ns == stamp  # not regenerated


def test_tiny_models_are_identical_across_generations(
    tmp_path: Path, model_cache: Path, tiny_pipe: Any
) -> None:
    """The one test that builds a tiny model afresh: it must equal, file for file and byte for
    byte, the copy every other test loads (which the model_cache fixture keeps across runs)."""
    fresh, shared = ensure_tiny_model("tiny", tmp_path), tiny_model_dir("tiny", model_cache)
    files = sorted(p.relative_to(fresh) for p in fresh.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(shared) for p in shared.rglob("*") if p.is_file())
    assert [f for f in files if (fresh / f).read_bytes() != (shared / f).read_bytes()] == []


def test_the_model_cache_key_follows_the_generator_and_the_libraries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cached models (tests/conftest.py) are rebuilt when anything that shapes them changes:
    tiny.py's source (even without a format bump), its format version, or a library version."""
    import importlib.metadata

    from bridge.engine import tiny
    from tests.conftest import tiny_models_key

    key = tiny_models_key()
    assert tiny_models_key() == key  # stable
    edited = tmp_path / "tiny.py"
    edited.write_bytes(Path(tiny.__file__).read_bytes() + b"\n# a new autoencoder\n")
    with monkeypatch.context() as m:
        m.setattr(tiny, "__file__", str(edited))
        assert tiny_models_key() != key
    with monkeypatch.context() as m:
        m.setattr(tiny, "TINY_FORMAT_VERSION", tiny.TINY_FORMAT_VERSION + 1)
        assert tiny_models_key() != key
    real = importlib.metadata.version
    for library in ("torch", "diffusers", "transformers"):
        with monkeypatch.context() as m:
            m.setattr(
                importlib.metadata, "version", lambda n, lib=library: "0+other" if n == lib else real(n)
            )
            assert tiny_models_key() != key, library


def test_tiny_frames_are_worth_looking_at(tiny_pipe: Any) -> None:
    """In range and not clamped flat; visibly different per input, prompt and seed."""

    def run(prompt: str, seed: int, k: int) -> torch.Tensor:
        engine = StreamEngine(tiny_pipe, [32, 45], width=256, height=256)
        engine.prepare(prompt, seed=seed)
        return [engine(pattern(k, 256)) for _ in range(3)][-1]

    base = run("a photo of a cat", 2, 0)
    clamped = ((base <= 0.0) | (base >= 1.0)).float().mean()
    assert float(clamped) < 0.2
    assert float(base.std()) > 0.1
    for other in (
        run("neon city at night", 2, 0),
        run("a photo of a cat", 7, 0),
        run("a photo of a cat", 2, 4),
    ):
        # 0.03 is a mean change of ~8 of 255 levels over the whole frame: plainly visible.
        assert float((other - base).abs().mean()) > 0.03


def test_sdxl_tiny_has_two_text_encoders(tiny_sdxl_pipe: Any) -> None:
    assert tiny_sdxl_pipe.text_encoder_2 is not None
    assert tiny_sdxl_pipe.unet.config.addition_embed_type == "text_time"


def test_unknown_model_name(model_cache: Path) -> None:
    with pytest.raises(ModelLoadError) as err:
        load_pipeline("no-such-model", LoadOptions(cache_dir=model_cache))
    assert str(err.value) == (
        "model 'no-such-model' not found: it is not an embedded model (tiny, tiny-sd21, tiny-sdxl), "
        "not an existing diffusers folder or .safetensors file, and not a Hugging Face id (owner/name)"
    )


def test_offline_hub_id_says_what_to_do(model_cache: Path) -> None:
    with pytest.raises(ModelLoadError) as err:
        load_pipeline("nobody-here/not-a-model", LoadOptions(cache_dir=model_cache, offline=True))
    assert (
        "model 'nobody-here/not-a-model' is not in the local Hugging Face cache and the hub cannot be reached"
        in str(err.value)
    )
    assert "run once with a network connection" in str(err.value)


def test_folder_without_model_index(tmp_path: Path, model_cache: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"is not a diffusers pipeline \(no model_index\.json\)"):
        load_pipeline(str(tmp_path), LoadOptions(cache_dir=model_cache))


def test_unknown_architecture_folder(tmp_path: Path, model_cache: Path) -> None:
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(ModelLoadError) as err:
        load_pipeline(str(tmp_path), LoadOptions(cache_dir=model_cache))
    assert f"model {str(tmp_path)!r} is a FluxPipeline, an architecture the bridge does not run" in str(
        err.value
    )


def test_pickle_checkpoints_are_refused(tmp_path: Path, model_cache: Path) -> None:
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"not really")
    with pytest.raises(ModelLoadError, match=r"is a pickle \(\.ckpt\), which can run code when loaded"):
        load_pipeline(str(ckpt), LoadOptions(cache_dir=model_cache))


@pytest.mark.parametrize(
    "key,family",
    [
        ("cond_stage_model.transformer.text_model.embeddings.position_ids", Family.SD15),
        ("cond_stage_model.model.token_embedding.weight", Family.SD21),
        ("conditioner.embedders.1.model.token_embedding.weight", Family.SDXL),
    ],
)
def test_single_file_family_detection(tmp_path: Path, key: str, family: Family) -> None:
    path = tmp_path / "model.safetensors"
    save_file(
        {key: torch.zeros(1), "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}, str(path)
    )
    assert detect_single_file_family(path) is family


def test_single_file_of_unknown_architecture(tmp_path: Path, model_cache: Path) -> None:
    path = tmp_path / "flux.safetensors"
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(1)}, str(path))
    with pytest.raises(ModelLoadError) as err:
        load_pipeline(str(path), LoadOptions(cache_dir=model_cache))
    assert "has an unknown architecture: none of its 1 tensors belongs to an SD 1.5" in str(err.value)


def test_single_file_offline_without_config_says_what_to_do(tmp_path: Path, model_cache: Path) -> None:
    path = tmp_path / "sd15.safetensors"
    save_file({"cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.zeros(4)}, str(path))
    with pytest.raises(ModelLoadError) as err:
        load_pipeline(str(path), LoadOptions(cache_dir=model_cache, offline=True))
    assert f"could not load checkpoint {str(path)!r} as sd15" in str(err.value)
    assert "set model.config to a local diffusers folder" in str(err.value)


def test_tiny_vae_swap(model_cache: Path) -> None:
    from diffusers import AutoencoderKL, AutoencoderTiny

    base = load_pipeline("tiny-sd21", LoadOptions(cache_dir=model_cache))
    assert isinstance(base.vae, AutoencoderKL)
    swapped = load_pipeline(
        "tiny-sd21", LoadOptions(cache_dir=model_cache, tiny_vae=str(tiny_model_dir("tiny", model_cache)))
    )
    assert isinstance(swapped.vae, AutoencoderTiny)
    engine = StreamEngine(swapped, [32, 45], width=64, height=64)
    engine.prepare("a cat")
    assert engine(pattern(0, 64)).shape == (1, 3, 64, 64)


def test_lcm_lora_is_fused(tmp_path: Path, model_cache: Path, tiny_pipe: Any) -> None:
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    donor = load_pipeline("tiny", LoadOptions(cache_dir=model_cache))
    donor.unet.add_adapter(
        LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_q", "to_k", "to_v"])
    )
    with torch.no_grad():  # peft starts lora_B at zero (a no-op adapter): make it a real one
        for n, p in donor.unet.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.2)
    StableDiffusionPipeline.save_lora_weights(
        tmp_path, unet_lora_layers=get_peft_model_state_dict(donor.unet)
    )
    fused = load_pipeline("tiny", LoadOptions(cache_dir=model_cache, lcm_lora=str(tmp_path)))
    name = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    base_weight = dict(tiny_pipe.unet.named_parameters())[name]
    fused_weight = dict(fused.unet.named_parameters())[name]
    assert not torch.allclose(base_weight, fused_weight)
    assert not any("lora" in n for n, _ in fused.unet.named_parameters())  # adapters unloaded, weights kept


def test_every_part_defaults_to_the_same_model_cache() -> None:
    """The engine imports no other part, so the default model cache is spelled twice: once in the
    engine, once as the config value. The CLI, the benchmark and the config must all land on the
    engine's folder, or a second start would rebuild what the first one cached."""
    from bridge import config
    from bridge.bench import BenchConfig
    from bridge.cli import build_parser
    from bridge.engine import loading

    expected = Path.home() / ".cache" / "sdbridge"
    assert expected == loading.DEFAULT_CACHE_DIR
    assert Path(config.EngineConfig().cache_dir).expanduser() == expected
    assert BenchConfig().cache_dir == expected
    assert build_parser().parse_args(["bench"]).cache_dir == expected
