"""The engine driver: loads the model the config names, and applies live parameters to it."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

from bridge.acceleration import Acceleration
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

    def encode(self, name: str, value: Any) -> None:
        """Put the texts of a prompt value (`prompt`, `prompt_blend` or `negative_prompt`) into
        the engine's prompt cache, so that applying it later costs no text-encoder call. Runs on
        the prompt encoder's thread, alongside frames. Raises ValueError for a bad blend."""
        what = "negative_prompt" if name == "negative_prompt" else "prompt"
        self.engine.prompt_cache.blend(list(value) if name == "prompt_blend" else value, what=what)

    def apply(self, name: str, value: Any) -> dict[str, Any]:
        """Apply one live value; returns what the engine now holds for every value it touched,
        read back from the engine (strength also moves t_index_list and the reverse), so the
        store records what was applied, not what was asked. Raises ValueError or TypeError when
        the engine refuses it."""
        e = self.engine
        if name in ("prompt", "prompt_blend"):
            e.set_prompt(value if name == "prompt" else list(value))
        elif name == "negative_prompt":
            e.set_negative_prompt(value)
        elif name == "seed":
            e.set_seed(value)
        elif name == "guidance":
            e.set_guidance_scale(value)
        elif name == "delta":
            e.set_delta(value)
        elif name == "strength":
            e.set_t_index_list(list(strength_to_t_index(value, e.num_steps)))
        elif name == "t_index_list":
            e.set_t_index_list(list(value))
        elif name == "ssf/enabled":
            e.set_similarity_filter(enabled=value)
        elif name == "ssf/threshold":
            e.set_similarity_filter(threshold=value)
        elif name == "ssf/max_skip":
            e.set_similarity_filter(max_skip=value)
        else:
            raise ValueError(f"{name} is not a value the engine takes")
        return self.applied(name, value)

    def applied(self, name: str, asked: Any) -> dict[str, Any]:
        """The engine's own values for `name` and the ones that move with it. `asked` is only
        used for strength, which the engine does not keep: it stands while the engine's
        t_index_list is the one that strength maps to."""
        e = self.engine
        if name in ("prompt", "prompt_blend"):
            current = e.current_prompt()
            if isinstance(current, str):
                return {"prompt": current, "prompt_blend": ()}
            return {"prompt_blend": tuple((str(text), float(weight)) for text, weight in current)}
        if name == "negative_prompt":
            return {name: e.current_negative_prompt()}
        if name == "seed":
            return {name: e.current_seed()}
        if name == "guidance":
            return {name: e.guidance_scale}
        if name == "delta":
            return {name: e.delta}
        if name in ("strength", "t_index_list"):
            t_index = tuple(int(t) for t in e.t_index_list)
            kept = name == "strength" and t_index == strength_to_t_index(asked, len(t_index))
            return {"t_index_list": t_index, "strength": asked if kept else t_index_to_strength(t_index)}
        ssf = e.similarity
        if name == "ssf/enabled":
            return {name: bool(ssf.enabled)}
        if name == "ssf/threshold":
            return {name: float(ssf.threshold)}
        return {name: int(ssf.max_skip)}


DEFAULT_T_INDEX = LIVE["t_index_list"].default


def load_engine(config: BridgeConfig, *, cancel: threading.Event | None = None) -> EngineDriver:
    """Load the model the config names and build the engine (slow: seconds to minutes; with
    TensorRT's first build, many minutes). Setting `cancel` stops an engine build within about
    2 s (it raises BuildCancelled)."""
    from bridge.engine import StreamEngine
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
    networks = None
    # The step counts made ready before the show: the table's default, the config's and the
    # config's warm_steps (compile compiles them at warm-up; tensorrt builds their profiles).
    counts = sorted({len(DEFAULT_T_INDEX), len(initial_values(config)["t_index_list"]), *e.warm_steps})
    if Acceleration.parse(e.acceleration).tensorrt:
        from bridge.engine.accel.engine_networks import engine_networks

        networks = engine_networks(
            pipe,
            model=e.model,
            width=e.width,
            height=e.height,
            cfg_type=e.cfg_type,
            step_counts=counts,
            frame_buffer_size=e.frame_buffer_size,
            cache_dir=options.cache_dir,
            cancel=cancel,
        )
    engine = StreamEngine(
        pipe,
        list(DEFAULT_T_INDEX),
        width=e.width,
        height=e.height,
        cfg_type=e.cfg_type,
        frame_buffer_size=e.frame_buffer_size,
        use_denoising_batch=e.use_denoising_batch,
        similarity_seed=e.similarity_seed,
        acceleration=e.acceleration,
        compile_mode=e.compile_mode,
        cache_dir=options.cache_dir,
        networks=networks,
        warm_steps=counts,
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
