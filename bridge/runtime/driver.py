"""The engine driver: loads the model the config names, and applies live parameters to it."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from bridge.config import BridgeConfig
from bridge.params import LIVE, strength_to_t_index, t_index_to_strength

log = logging.getLogger(__name__)


class EngineDriver:
    """Applies live parameters to a `StreamEngine` (built by `load_engine` from the config)."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def prepare(self, values: dict[str, Any]) -> None:
        blend = values.get("prompt_blend") or ()
        self.engine.prepare(
            list(blend) if blend else values["prompt"],
            negative_prompt=values["negative_prompt"],
            guidance_scale=values["guidance"],
            delta=values["delta"],
            seed=values["seed"],
        )
        self.engine.set_t_index_list(list(values["t_index_list"]))
        self.engine.set_similarity_filter(
            enabled=values["ssf/enabled"], threshold=values["ssf/threshold"], max_skip=values["ssf/max_skip"]
        )

    def apply(self, name: str, value: Any) -> dict[str, Any]:
        """Apply one live value; returns every value it changed (strength also moves
        t_index_list and the reverse). Raises ValueError when the engine refuses it."""
        e = self.engine
        if name == "prompt":
            e.set_prompt(value)
            return {"prompt": value, "prompt_blend": ()}
        if name == "prompt_blend":
            e.set_prompt(list(value))
            return {"prompt_blend": value}
        if name == "negative_prompt":
            e.set_negative_prompt(value)
        elif name == "seed":
            e.set_seed(value)
        elif name == "guidance":
            e.set_guidance_scale(value)
        elif name == "delta":
            e.set_delta(value)
        elif name == "strength":
            t_index = strength_to_t_index(value, e.num_steps)
            e.set_t_index_list(list(t_index))
            return {"strength": value, "t_index_list": t_index}
        elif name == "t_index_list":
            e.set_t_index_list(list(value))
            return {"t_index_list": tuple(value), "strength": t_index_to_strength(value)}
        elif name == "ssf/enabled":
            e.set_similarity_filter(enabled=value)
        elif name == "ssf/threshold":
            e.set_similarity_filter(threshold=value)
        elif name == "ssf/max_skip":
            e.set_similarity_filter(max_skip=value)
        return {name: value}


DEFAULT_T_INDEX = LIVE["t_index_list"].default


def load_engine(config: BridgeConfig) -> EngineDriver:
    """Load the model the config names and build the engine (slow: seconds to minutes)."""
    from bridge.engine import StreamEngine
    from bridge.engine.accel import accelerate
    from bridge.engine.loading import LoadOptions, load_pipeline, resolve_device, resolve_dtype_name

    e = config.engine
    device = resolve_device(e.device)
    options = LoadOptions(
        cache_dir=Path(e.cache_dir).expanduser(),
        device=device,
        dtype=resolve_dtype_name(e.dtype),
        offline=e.offline,
        tiny_vae=e.tiny_vae or None,
        lcm_lora=e.lcm_lora or None,
    )
    log.info("loading model %r on %s", e.model, device)
    pipe = load_pipeline(e.model, options)
    accelerate(pipe, e.acceleration)
    engine = StreamEngine(
        pipe,
        list(DEFAULT_T_INDEX),
        width=e.width,
        height=e.height,
        cfg_type=e.cfg_type,
        frame_buffer_size=e.frame_buffer_size,
        use_denoising_batch=e.use_denoising_batch,
        similarity_seed=e.similarity_seed,
    )
    return EngineDriver(engine)


def initial_values(config: BridgeConfig) -> dict[str, Any]:
    """Live values at start: table defaults, then the config's `params`; strength and
    t_index_list are kept consistent with each other."""
    values = {name: p.default for name, p in LIVE.items()}
    values.update(config.params)
    if "strength" in config.params:
        values["t_index_list"] = strength_to_t_index(values["strength"], len(values["t_index_list"]))
    else:
        values["strength"] = t_index_to_strength(values["t_index_list"])
    return values
