"""StreamEngine: StreamDiffusion's Stream Batch, residual CFG and similarity filter.

One call per frame. With n = len(t_index_list) steps and f = frame_buffer_size, the UNet sees
the n denoising steps of n frames in flight as one batch (rows ordered by step, f rows each);
a frame entering now leaves n - 1 calls later. `use_denoising_batch=False` is the sequential
reference: n UNet calls on one frame. Both share the step math in `guidance.py`.

Threading: an engine belongs to one thread (the runtime's engine loop). Live setters are called
from that thread between frames. Nothing here sleeps, times, or syncs with the device except
the documented ones: the similarity score (one scalar) and the final copy for `output_type="uint8"`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from bridge.engine.accel import Acceleration, Networks, accelerated_networks
from bridge.engine.accel.graphs import CudaGraphBackend, FrameGraphs, GraphBackend, cuda_graph_unavailable
from bridge.engine.checks import (
    SeedSpec,
    check_delta,
    check_frame_buffer_size,
    check_guidance,
    check_seed,
    check_warm_steps,
    validate_t_index_list,
)
from bridge.engine.guidance import (
    CfgType,
    StepCoefs,
    boundary_scalings,
    guide,
    guide_,
    lcm_x0,
    lcm_x0_,
    residual_stock,
    residual_stock_,
    scalar,
    scale_,
)
from bridge.engine.noise import SeedNoise
from bridge.engine.prompts import PromptCache, PromptSpec
from bridge.engine.similarity import SimilarityFilter
from bridge.engine.staging import HostToDevice, InputStages, InputStaging, OutputRing

log = logging.getLogger(__name__)

OutputType = Literal["pt", "uint8", "latent"]
TXT2IMG = "txt2img"  # the source kind of a frame without an input image
LayoutKey = tuple[Hashable, int, bool]
"""(input kind, step count, guided): what fixes a frame's kernels and buffer addresses."""
OUTPUT_RING_DEPTH = 8
"""Host slots for uint8 outputs: deeper than the runtime's one-slot mailboxes (see OutputRing)."""


@dataclass
class EngineStats:
    """Counters since construction; read them from the engine's thread."""

    frames: int = 0  # calls to __call__
    skipped: int = 0  # frames the similarity filter skipped
    unet_calls: int = 0
    vae_encodes: int = 0
    vae_decodes: int = 0


@dataclass(frozen=True)
class _UNetInputs:
    """Prepared per-call UNet arguments for one row layout (rebuilt on changes, not per frame)."""

    timesteps: Tensor  # (rows,)
    embeds: Tensor  # (rows, L, D)
    added: dict[str, Tensor] | None  # SDXL: text_embeds (rows, P), time_ids (rows, 6)


class StreamEngine:
    """Real-time img2img / txt2img over a loaded diffusers SD 1.5, SD 2.1 or SDXL pipeline.

    Build it, call `prepare()` once, then call it once per frame. Between frames, the `set_*`
    methods change prompt, negative prompt, seed, guidance, delta, t_index values and the
    similarity filter without a reload; each takes effect on the next frame.
    """

    def __init__(
        self,
        pipe: Any,
        t_index_list: Sequence[int],
        *,
        width: int,
        height: int,
        cfg_type: str | CfgType = "self",
        frame_buffer_size: int = 1,
        use_denoising_batch: bool = True,
        dtype: torch.dtype | None = None,
        do_add_noise: bool = True,
        similarity_seed: int | None = None,
        output_ring_depth: int = OUTPUT_RING_DEPTH,
        acceleration: str | Acceleration = "none",
        compile_mode: str = "default",
        cache_dir: Path | None = None,
        networks: Networks | None = None,
        graph_backend: GraphBackend | None = None,
        warm_steps: Sequence[int] = (),
    ) -> None:
        """`acceleration`: see bridge/acceleration.py (`compile` runs inductor in `compile_mode`
        and keeps its caches under `cache_dir`).
        `networks` replaces the modules a frame calls (TensorRT engines, tests); `graph_backend`
        replaces torch.cuda's capture (tests on machines without CUDA).
        `warm_steps`: other step counts the show may switch to live. `compile` compiles their
        batch sizes in the first `warm_up` and `tensorrt` builds their profiles, so a change to
        one of them compiles nothing mid-show."""
        # 1. Check inputs: everything the per-frame path relies on is validated here, once.
        if width % 8 or height % 8 or width <= 0 or height <= 0:
            raise ValueError(f"width and height must be positive multiples of 8, got {width}x{height}")
        check_frame_buffer_size(frame_buffer_size)
        prediction = getattr(pipe.scheduler.config, "prediction_type", "epsilon")
        if prediction != "epsilon":
            raise ValueError(
                f"the model predicts {prediction!r}; StreamEngine needs an epsilon-prediction model "
                "(SD 1.5, sd-turbo, SDXL, sdxl-turbo), not a v-prediction one such as SD 2.1-768"
            )
        self.acceleration = Acceleration.parse(acceleration)
        if self.acceleration.cuda_graph:
            reason = None if graph_backend is not None else cuda_graph_unavailable(pipe.unet.device)
            if reason is None and not use_denoising_batch:
                reason = "acceleration 'cuda_graph' captures the stream batch; use_denoising_batch=False is not captured"
            if reason is not None:
                raise ValueError(reason)
        self.pipe = pipe
        self.cfg_type = CfgType.parse(cfg_type)
        self.width, self.height = width, height
        self.frame_buffer_size = frame_buffer_size
        self.use_denoising_batch = use_denoising_batch
        self.do_add_noise = do_add_noise
        self.device: torch.device = pipe.unet.device
        self.dtype: torch.dtype = dtype if dtype is not None else pipe.unet.dtype
        self._t_index_list = validate_t_index_list(t_index_list, None)
        self.warm_steps = check_warm_steps(warm_steps)
        self._latent_shape = (4, height // 8, width // 8)
        self._vae_scale = float(pipe.vae.config.scaling_factor)
        # 2. The networks a frame calls: eager modules, compiled ones or TensorRT engines.
        self.nets = accelerated_networks(
            pipe,
            self.acceleration,
            networks=networks,
            compile_mode=compile_mode,
            cache_dir=cache_dir,
            width=width,
            height=height,
            cfg_type=self.cfg_type.value,
            step_counts=sorted({len(self._t_index_list), *self.warm_steps}),
            frame_buffer_size=frame_buffer_size,
        )
        self._vae_is_kl = self.nets.is_kl  # AutoencoderKL samples; AutoencoderTiny does not
        self._prompts = PromptCache(pipe, device=self.device, dtype=self.dtype)
        self.similarity = SimilarityFilter(seed=similarity_seed)
        self.stats = EngineStats()
        self._prepared = False
        self._has_output = False  # whether _last_x0 holds a processed frame
        self._last_x0: Tensor  # a view of the x0 buffer's last f rows, set per layout
        # Live faders as 0-dim fp32 device tensors, written in place (a captured kernel keeps
        # reading them); the Python floats guidance_scale/delta only choose the row layout.
        self._g = scalar(1.0, self.device)
        self._delta = scalar(1.0, self.device)
        # Buffers that depend only on (f, H, W): the decoded image and the uint8 way out.
        f, (h, w) = frame_buffer_size, (height, width)
        self._image = torch.zeros((f, 3, h, w), device=self.device, dtype=self.dtype)  # [0, 1]
        self._image32 = torch.zeros((f, 3, h, w), device=self.device)
        self._image32_nhwc = self._image32.permute(0, 2, 3, 1)
        self._dec_in = torch.zeros((f, *self._latent_shape), device=self.device, dtype=self.dtype)
        self._z = torch.zeros_like(self._dec_in)  # the newest frame's clean latent
        # Noise from the CPU generator (the original's stream, for seed compatibility), drawn on
        # the host before the frame and copied into static device buffers: the txt2img latent,
        # and the KL VAE's sampling noise (diffusers draws it in the VAE's dtype).
        self._txt2img_noise = HostToDevice((f, *self._latent_shape), torch.float32, self.device)
        self._vae_noise = HostToDevice((f, *self._latent_shape), pipe.vae.dtype, self.device)
        self._ring = OutputRing(depth=output_ring_depth, f=f, height=h, width=w, device=self.device)
        self._inputs = InputStages(f=f, height=h, width=w, device=self.device, dtype=self.dtype)
        self._seed_noise = SeedNoise()
        # Which processed frame (a count) the image, the device uint8 frame and the newest ring
        # slot hold.
        self._version = self._image_version = self._rgba_version = self._ring_version = 0
        # Warm-up: the layouts made ready (compiled, captured) and the source kinds seen.
        self._graphs = None
        if self.acceleration.cuda_graph:
            self._graphs = FrameGraphs(graph_backend or CudaGraphBackend(self.device))
        self._warmed: set[LayoutKey] = set()
        self._sources: set[Hashable] = set()
        self._graph_fallback = ""  # why frames run eagerly although cuda_graph was asked
        self._nets_fallback = ""  # why frames run on the exact torch networks although more was asked
        from diffusers import LCMScheduler

        self.scheduler = LCMScheduler.from_config(pipe.scheduler.config)

    # ------------------------------------------------------------------ properties
    @property
    def t_index_list(self) -> list[int]:
        return list(self._t_index_list)

    @property
    def num_steps(self) -> int:
        return len(self._t_index_list)

    @property
    def init_noise(self) -> Tensor:
        """The fixed noise (n*f, 4, H/8, W/8) in effect, one slot per step (read-only)."""
        self._require_prepared()
        return self._init_noise

    @property
    def prepared_unet_inputs(self) -> _UNetInputs:
        """The stream batch's prepared UNet arguments (timesteps, embeds, added) in effect;
        the benchmark times a bare UNet call with them."""
        self._require_prepared()
        return self._batch_inputs

    @property
    def prompt_cache(self) -> PromptCache:
        """The text-embedding cache; `.misses` counts text-encoder calls, `.hits` reuses."""
        return self._prompts

    # ------------------------------------------------------------------ preparation
    @torch.no_grad()
    def prepare(
        self,
        prompt: PromptSpec,
        negative_prompt: PromptSpec = "",
        num_inference_steps: int = 50,
        guidance_scale: float = 1.2,
        delta: float = 1.0,
        seed: SeedSpec = 2,
    ) -> None:
        """(Re)start the stream: timesteps, fixed noise from `seed`, prompts, empty buffers.

        The noise is drawn exactly as the original StreamDiffusion does (a CPU generator seeded
        with `seed`, then moved), so the same inputs give the same frames.
        """
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int):
            raise ValueError(f"num_inference_steps must be an int, got {num_inference_steps!r}")
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        self._t_index_list = validate_t_index_list(self._t_index_list, num_inference_steps)
        self.scheduler.set_timesteps(num_inference_steps)
        self._all_timesteps = [int(t) for t in self.scheduler.timesteps]
        self._num_inference_steps = num_inference_steps
        self.guidance_scale = check_guidance(guidance_scale)
        self.delta = check_delta(delta)
        self._g.fill_(self.guidance_scale)
        self._delta.fill_(self.delta)
        self._seed_spec = check_seed(seed)
        self._cond = self._prompts.blend(prompt)
        self._uncond = self._prompts.blend(negative_prompt, what="negative_prompt")
        self._prompt, self._negative_prompt = prompt, negative_prompt
        self._resize_state(keep_last=False)
        self.similarity.reset()
        self._prepared = True

    def _resize_state(self, *, keep_last: bool) -> None:
        """Allocate every buffer whose shape depends on n = len(t_index_list): once per layout.

        The stream batch lives in `_unet_x` = [E extra rows | n*f rows by step]: E is the most
        negative rows the mode can run (n*f for `full`, f for `initialize`, else 0), so a
        guidance crossing only moves the slice the UNet reads. `_batch` is the n*f rows; its
        first f rows take the newest frame, `_buffer` (rows f:) the frames in flight.
        """
        n, f = self.num_steps, self.frame_buffer_size
        rows = n * f
        last = self._last_x0.clone() if keep_last and self._has_output else None
        if self._graphs is not None:
            self._graphs.clear()  # they hold the old buffers' addresses
        self._warmed.clear()
        self._make_noise()
        self._set_coefs()
        self._extra_rows = 0
        if self.use_denoising_batch:
            self._extra_rows = {CfgType.FULL: rows, CfgType.INITIALIZE: f}.get(self.cfg_type, 0)

        def latents(count: int, dtype: torch.dtype | None = None) -> Tensor:
            return torch.zeros((count, *self._latent_shape), device=self.device, dtype=dtype or self.dtype)

        self._stock, self._seq_stock = latents(rows), latents(f)
        self._unet_x = latents(self._extra_rows + rows)
        self._batch = self._unet_x[self._extra_rows :]
        self._newest = self._batch[:f] if self.use_denoising_batch else latents(f)
        self._buffer = self._batch[f:]  # (n-1)*f latents in flight (zeros after a start)
        self._x0, self._eps, self._t1, self._t2 = (latents(rows) for _ in range(4))
        self._t32 = latents(rows, torch.float32)
        self._last_x0 = self._x0[-f:]  # the x0 latent of the last processed frame (a view)
        self._embeds: Tensor | None = None
        self._added: dict[str, Tensor] | None = None
        self._has_output = last is not None
        if last is not None:
            self._last_x0.copy_(last)
            if self.use_denoising_batch and n > 1:
                # A live change of the step count: fill the new in-flight slots from the last
                # output, noised to each slot's timestep, instead of n-1 brown frames.
                c = self._coefs
                torch.mul(c.alpha[f:], last.repeat(n - 1, 1, 1, 1), out=self._buffer)
                torch.mul(c.beta[f:], self._init_noise[f:], out=self._t1[f:])
                self._buffer.add_(self._t1[f:])
        self._refresh_unet_inputs()

    def _make_noise(self) -> None:
        """init_noise (n*f, 4, H/8, W/8) from the seed spec; the CPU generator continues for
        VAE sampling and txt2img latents, as in the original."""
        shape = (self.num_steps * self.frame_buffer_size, *self._latent_shape)
        noise, gen = self._seed_noise.draw(self._seed_spec, shape)
        self._generator = gen
        current = getattr(self, "_init_noise", None)
        if current is None or tuple(current.shape) != shape:
            self._init_noise = torch.empty(shape, device=self.device, dtype=self.dtype)
            self._next_noise = torch.empty_like(self._init_noise)
        self._init_noise.copy_(noise)
        # Residual memory: row i moves on to slot i+1's fixed noise; the last wraps to slot 0.
        f = self.frame_buffer_size
        self._next_noise[:-f].copy_(self._init_noise[f:])
        self._next_noise[-f:].copy_(self._init_noise[:f])

    def _set_coefs(self) -> None:
        """Per-row alpha, beta, c_skip, c_out for the current t_index values."""
        f = self.frame_buffer_size
        taus = [self._all_timesteps[i] for i in self._t_index_list]
        acp = self.scheduler.alphas_cumprod
        alpha = torch.stack([acp[t].sqrt() for t in taus]).float()
        beta = torch.stack([(1 - acp[t]).sqrt() for t in taus]).float()
        c_skip, c_out = boundary_scalings(self.scheduler, taus)
        one = torch.ones(1)

        def rows(v: Tensor) -> Tensor:  # (n,) -> (n*f, 1, 1, 1)
            return v.repeat_interleave(f).view(-1, 1, 1, 1).to(device=self.device, dtype=self.dtype)

        coefs = StepCoefs(
            alpha=rows(alpha),
            beta=rows(beta),
            c_skip=rows(c_skip),
            c_out=rows(c_out),
            alpha_next=rows(torch.cat([alpha[1:], one])),
            beta_next=rows(torch.cat([beta[1:], one])),
        )
        timesteps = torch.tensor(taus, dtype=torch.long).repeat_interleave(f).to(self.device)
        current = getattr(self, "_coefs", None)
        if current is None or current.alpha.shape != coefs.alpha.shape:
            self._coefs, self._sub_timesteps = coefs, timesteps
        else:  # same count: new values into the same buffers
            for old, new in zip(current.as_tuple(), coefs.as_tuple(), strict=True):
                old.copy_(new)
            self._sub_timesteps.copy_(timesteps)

    # ------------------------------------------------------------------ conditioning
    @property
    def _guided(self) -> bool:
        return self.cfg_type is not CfgType.NONE and self.guidance_scale > 1.0

    def _unet_inputs(
        self, timesteps: Tensor, *, holds_newest: bool, force_guided: bool = False
    ) -> _UNetInputs:
        """UNet arguments for rows at `timesteps`, with the negative rows the mode needs now
        (or, `force_guided`, those it needs when guided). `holds_newest`: the first f rows are
        the newest frame (where `initialize` adds its row)."""
        f, rows = self.frame_buffer_size, timesteps.shape[0]
        cond, uncond = self._cond.repeat(rows), self._uncond
        guided = self._guided or (force_guided and self.cfg_type is not CfgType.NONE)
        if guided and self.cfg_type is CfgType.FULL:
            parts, ts = [uncond.repeat(rows), cond], torch.cat([timesteps, timesteps])
        elif guided and self.cfg_type is CfgType.INITIALIZE and holds_newest:
            parts, ts = [uncond.repeat(f), cond], torch.cat([timesteps[:f], timesteps])
        else:
            parts, ts = [cond], timesteps
        embeds = torch.cat([p.embeds for p in parts])
        added = None
        if self._prompts.is_sdxl:
            pooled = torch.cat([p.pooled for p in parts if p.pooled is not None])
            size = [self.height, self.width, 0, 0, self.height, self.width]
            time_ids = torch.tensor([size], device=self.device, dtype=self.dtype).expand(ts.shape[0], -1)
            added = {"text_embeds": pooled, "time_ids": time_ids}
        return _UNetInputs(ts, embeds, added)

    def _refresh_unet_inputs(self) -> None:
        """Write the prepared UNet arguments after a change of prompt, guidance or steps.

        Stream batch: timesteps, embeddings (and SDXL's pooled/time_ids) sit in buffers laid
        out as `_unet_x` is, negative rows first; they are written in place, and the UNet reads
        the slice for the current guidance (all rows, or the n*f conditional ones)."""
        f = self.frame_buffer_size
        if self.use_denoising_batch:
            full = self._unet_inputs(self._sub_timesteps, holds_newest=True, force_guided=True)
            if self._embeds is None or self._embeds.shape != full.embeds.shape:
                self._timesteps = full.timesteps.clone()
                self._embeds = full.embeds.clone()
                self._added = None if full.added is None else {k: v.clone() for k, v in full.added.items()}
            else:
                self._timesteps.copy_(full.timesteps)
                self._embeds.copy_(full.embeds)
                if self._added is not None and full.added is not None:
                    for key, value in full.added.items():
                        self._added[key].copy_(value)
            skip = self._extra_rows if not self._guided else 0
            added = None if self._added is None else {k: v[skip:] for k, v in self._added.items()}
            self._batch_inputs = _UNetInputs(self._timesteps[skip:], self._embeds[skip:], added)
        else:
            self._step_inputs = [
                self._unet_inputs(self._sub_timesteps[i * f : (i + 1) * f], holds_newest=i == 0)
                for i in range(self.num_steps)
            ]

    # ------------------------------------------------------------------ live updates
    def set_prompt(self, prompt: PromptSpec) -> None:
        """A new prompt or weighted blend [(text, weight), ...]; cached texts cost no encode."""
        self._require_prepared()
        self._cond = self._prompts.blend(prompt)
        self._prompt = prompt
        self._refresh_unet_inputs()

    def set_negative_prompt(self, negative_prompt: PromptSpec) -> None:
        """A new negative prompt; used by the `full` and `initialize` modes."""
        self._require_prepared()
        self._uncond = self._prompts.blend(negative_prompt, what="negative_prompt")
        self._negative_prompt = negative_prompt
        self._refresh_unet_inputs()

    def set_seed(self, seed: SeedSpec) -> None:
        """A new seed, or a blend [(seed, weight), ...]; regenerates the fixed noise only."""
        self._require_prepared()
        self._seed_spec = check_seed(seed)
        self._make_noise()

    def set_guidance_scale(self, guidance_scale: float) -> None:
        """New guidance; crossing 1.0 adds or drops the negative rows of `full`/`initialize`."""
        self._require_prepared()
        self.guidance_scale = check_guidance(guidance_scale)
        self._g.fill_(self.guidance_scale)
        self._refresh_unet_inputs()

    def set_delta(self, delta: float) -> None:
        """New residual-CFG delta (the weight of the virtual negative)."""
        self._require_prepared()
        self.delta = check_delta(delta)
        self._delta.fill_(self.delta)

    def set_t_index_list(self, t_index_list: Sequence[int]) -> None:
        """New t_index values; a different count resizes the in-flight buffers."""
        self._require_prepared()
        values = validate_t_index_list(t_index_list, self._num_inference_steps)
        resized = len(values) != self.num_steps
        self._t_index_list = values
        if resized:
            self._resize_state(keep_last=True)
        else:
            self._set_coefs()
            self._refresh_unet_inputs()

    def set_similarity_filter(
        self, *, enabled: bool | None = None, threshold: float | None = None, max_skip: int | None = None
    ) -> None:
        """Switch the stochastic similarity filter and set its threshold (eta) and max_skip."""
        self.similarity.configure(enabled=enabled, threshold=threshold, max_skip=max_skip)

    def _require_prepared(self) -> None:
        if not self._prepared:
            raise RuntimeError("StreamEngine.prepare(prompt, ...) must be called before frames or updates")

    # ------------------------------------------------------------------ per frame
    @torch.no_grad()
    def __call__(self, image: Tensor | np.ndarray | None = None, output_type: OutputType = "pt") -> Any:
        """Process one frame and return the output that has left the pipeline.

        `image`: (f, 3, H, W) float tensor in [0, 1], or uint8 array (H, W, 3|4) / (f, H, W, 3|4);
        None means txt2img. Returns, per `output_type`: "pt" a (f, 3, H, W) float tensor in
        [0, 1]; "uint8" an (H, W, 4) uint8 array on the host ((f, H, W, 4) when f > 1), a slot
        of the output ring (valid until `output_ring_depth - 1` more frames, see OutputRing);
        "latent" the (f, 4, H/8, W/8) x0 latent before decoding. "pt" and "latent" are copies.

        The exact path (stream batch, model-size input, TAESD-like VAE, uint8 out) allocates no
        tensor outside the UNet and VAE, rebinds no state, reads one scalar (the similarity
        score, when the filter is on) and copies to the host once.
        """
        self._require_prepared()
        if output_type not in ("pt", "uint8", "latent"):
            raise ValueError(f"output_type must be 'pt', 'uint8' or 'latent', got {output_type!r}")
        self.stats.frames += 1

        # 1. Before the frame proper (eager, driven from the host): stage and normalise the input;
        #    the similarity filter may end the frame here (a skip replays nothing); draw the
        #    CPU-generator noise the frame needs.
        staging = None
        if image is not None:
            staging, skip = self.stage_and_screen(image)
            if skip:
                self.stats.skipped += 1
                return self._output(output_type)
        self._draw_noise(staging)
        source = self._source_kind(staging)
        self._sources.add(source)

        # 2.-7. On the device: the frame (`_frame`), replayed as one CUDA graph or run eagerly.
        key = self._layout_key(source)
        if self._graphs is not None and key not in self._graphs:
            self._warm_layout(key, staging)  # a new input kind (warm_up() captures ahead); may fall back
        self._has_output = True
        self._version += 1
        if self._graphs is not None:
            self._graphs.replay(key)
            self.stats.unet_calls += 1
            self.stats.vae_encodes += staging is not None
            self.stats.vae_decodes += 1
            self._image_version = self._rgba_version = self._version  # the graph did both
        else:
            self._frame(staging, finish=False)  # decoded and converted by _output, as asked

        # 8. Out: the ring's next host slot (the one device-to-host copy), or a copy.
        return self._output(output_type)

    def stage_and_screen(self, image: Tensor | np.ndarray) -> tuple[InputStaging, bool]:
        """Step 1 of a frame with an input, before the frame proper (eager, never captured):
        stage `image` (as `__call__` takes it; its host-to-device copy), normalise it to the
        encoder's pixels, then ask the similarity filter whether the frame is skipped (never
        before a first output exists). Returns the staging and the decision.

        `__call__` runs exactly this; `sdbridge bench` times it alone. With the filter on, it
        reads one scalar (the score), and a frame that passes becomes the filter's reference."""
        staging = self._inputs.stage(image)
        staging.normalise()  # pixels in [-1, 1]; flat32 holds the same in fp32
        return staging, self.similarity.should_skip(staging.flat32) and self._has_output

    def _frame(self, staging: InputStaging | None, *, finish: bool) -> None:
        """The device side of one frame: what a captured graph holds. Reads the staged pixels
        (or the txt2img noise) and the state buffers, writes them in place; `finish` also
        decodes and converts to uint8 (a captured frame always does)."""
        f, c, newest = self.frame_buffer_size, self._coefs, self._newest
        # 2. Encode, and noise the new latent to the first timestep with the fixed noise.
        if staging is not None:
            z = self._encode(staging.pixels)
            torch.mul(c.alpha[:f], z, out=newest)
            torch.mul(c.beta[:f], self._init_noise[:f], out=self._t1[:f])
            newest.add_(self._t1[:f])
        else:
            # txt2img: a fresh seeded latent per frame (reproducible from prepare()).
            newest.copy_(self._txt2img_noise.device)
        # 3.-6. Denoise: all in-flight steps in one UNet call, or the sequential reference.
        if self.use_denoising_batch:
            self._denoise_batch()
        else:
            self._denoise_sequential()
        # 7. Decode the frame leaving now, and convert it to uint8 on the device.
        if finish:
            self._decode()
            self._to_uint8()

    def _draw_noise(self, staging: InputStaging | None) -> None:
        """The CPU generator's draws for this frame, in the original's order, sent to the device."""
        if staging is None:
            noise = self._txt2img_noise
            torch.randn(noise.device.shape, generator=self._generator, out=noise.host())
            noise.send()
        elif self._vae_is_kl:
            noise = self._vae_noise
            host = noise.host()
            # diffusers' DiagonalGaussianDistribution.sample(generator): randn in the VAE's dtype.
            torch.randn(host.shape, generator=self._generator, dtype=host.dtype, out=host)
            noise.send()

    def _source_kind(self, staging: InputStaging | None) -> Hashable:
        return TXT2IMG if staging is None else (staging.kind, staging.channels)

    def _layout_key(self, source: Hashable) -> LayoutKey:
        """What fixes a frame's kernels and addresses: input kind, step count, guided or not."""
        return (source, self.num_steps, self._guided)

    def _encode(self, pixels: Tensor) -> Tensor:
        self.stats.vae_encodes += 1
        encoded = self.nets.encode(pixels)
        if self._vae_is_kl:
            # As DiagonalGaussianDistribution.sample does, with its noise drawn before the frame.
            from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

            dist = DiagonalGaussianDistribution(encoded)
            encoded = dist.mean + dist.std * self._vae_noise.device
        return torch.mul(encoded, self._vae_scale, out=self._z)  # (f, 4, H/8, W/8)

    def _unet(self, x: Tensor, inputs: _UNetInputs) -> Tensor:
        self.stats.unet_calls += 1
        return self.nets.unet(x, inputs.timesteps, inputs.embeds, inputs.added)

    def _denoise_batch(self) -> None:
        """Steps 3-6 on the stream batch, in place: `_batch` (rows by step, the newest frame's
        latent in rows :f) -> `_x0`, the next `_buffer` and the next `_stock`."""
        f, n, c = self.frame_buffer_size, self.num_steps, self._coefs
        batch, stock, noise, t1, t2, t32 = (
            self._batch,
            self._stock,
            self._init_noise,
            self._t1,
            self._t2,
            self._t32,
        )
        # 3. Shift the residual memory: the newest rows start from slot 0's fixed noise.
        if n > 1:
            t1[:-f].copy_(stock[:-f])
            stock[f:].copy_(t1[:-f])
            stock[:f].copy_(noise[:f])
        # 4. One UNet call: the negative rows the guidance needs run in front (the same latents).
        inputs = self._batch_inputs
        extra = inputs.timesteps.shape[0] - batch.shape[0]  # 0, f (initialize) or n*f (full)
        model_in = self._unet_x[self._extra_rows - extra :]
        if extra:
            model_in[:extra].copy_(batch[:extra])
        pred = self._unet(model_in, inputs)
        eps_c = pred[extra:]
        eps = eps_c
        if self._guided:
            if self.cfg_type is CfgType.FULL:
                eps_u = pred[:extra]
            else:
                if self.cfg_type is CfgType.INITIALIZE:
                    stock[:f].copy_(pred[:f])  # the real negative of the newest frame
                eps_u = scale_(stock, self._delta, out=t2, tmp32=t32)  # the virtual negative
            eps = guide_(eps_c, eps_u, self._g, out=self._eps, tmp=t1, tmp32=t32)
        # 5. The LCM step for every row; the last f rows are the frames leaving now.
        lcm_x0_(eps, batch, c, out=self._x0, tmp=t1)
        if self.cfg_type.residual:
            residual_stock_(eps, stock, c, self._next_noise, tmp=t1, tmp2=t2)
        # 6. The frames in flight move on one step, re-noised with the next slot's fixed noise.
        if n > 1:
            torch.mul(c.alpha[f:], self._x0[:-f], out=self._buffer)
            if self.do_add_noise:
                torch.mul(c.beta[f:], noise[f:], out=t1[f:])
                self._buffer.add_(t1[f:])

    def _step(
        self, x: Tensor, inputs: _UNetInputs, coefs: StepCoefs, stock: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Sequential reference: one UNet call with guidance and the LCM step. Returns
        (x0, eps, stock), where stock has its first f rows replaced by the real negative in
        `initialize` mode."""
        f, rows = self.frame_buffer_size, x.shape[0]
        extra = inputs.timesteps.shape[0] - rows  # negative rows run in front: 0 or f
        model_in = x if extra == 0 else torch.cat([x[:extra], x]) if extra == f else torch.cat([x, x])
        pred = self._unet(model_in, inputs)
        eps_c = pred[extra:]
        eps = eps_c
        if self._guided:
            if self.cfg_type is CfgType.FULL:
                eps = guide(eps_c, pred[:extra], self._g)
            else:
                if self.cfg_type is CfgType.INITIALIZE and extra:
                    stock = torch.cat([pred[:extra], stock[extra:]])
                virtual = scale_(stock, self._delta, out=torch.empty_like(stock), tmp32=stock.float().clone())
                eps = guide(eps_c, virtual, self._g)
        return lcm_x0(eps, x, coefs), eps, stock

    def _denoise_sequential(self) -> None:
        f, n = self.frame_buffer_size, self.num_steps
        # The residual memory follows the frame, as it does through the batch rows.
        stock = self._init_noise[:f] if n > 1 else self._seq_stock
        x = x0 = self._newest.clone()
        for i in range(n):
            coefs = self._coefs.rows(i * f, (i + 1) * f)
            x0, eps, stock = self._step(x, self._step_inputs[i], coefs, stock)
            nxt = ((i + 1) % n) * f
            if self.cfg_type.residual:
                stock = residual_stock(eps, stock, coefs, self._init_noise[nxt : nxt + f])
            if i < n - 1:
                kept = coefs.alpha_next * x0
                x = (
                    kept + self._coefs.beta[nxt : nxt + f] * self._init_noise[nxt : nxt + f]
                    if self.do_add_noise
                    else kept
                )
        self._seq_stock = stock
        self._last_x0.copy_(x0)

    def _decode(self) -> None:
        """x0 of the frame leaving now -> `_image` in [0, 1]."""
        self.stats.vae_decodes += 1
        torch.div(self._last_x0, self._vae_scale, out=self._dec_in)
        decoded = self.nets.decode(self._dec_in)
        torch.div(decoded, 2, out=self._image).add_(0.5).clamp_(0, 1)  # (f, 3, H, W)

    def _to_uint8(self) -> None:
        """`_image` -> the ring's device uint8 frame, rounded in fp32 (diffusers' postprocess does
        it in numpy float32; in fp16 about 4% of the pixels would land one level off)."""
        self._image32.copy_(self._image).mul_(255).round_()
        self._ring.device_rgb.copy_(self._image32_nhwc)

    def _output(self, output_type: OutputType) -> Any:
        """The last processed frame as `output_type`, decoded and converted at most once."""
        if output_type == "latent":
            return self._last_x0.clone()
        if self._image_version != self._version:
            self._decode()
            self._image_version = self._version
        if output_type == "pt":
            return self._image.clone()
        if self._rgba_version != self._version:
            self._to_uint8()
            self._rgba_version = self._version
        if self._ring_version != self._version:
            self._ring.publish()  # the one copy to the host, into the next ring slot
            self._ring_version = self._version
        return self._ring.current()

    # ------------------------------------------------------------------ warm-up
    @property
    def acceleration_fallback(self) -> str:
        """Why part of the asked acceleration runs on the exact eager path instead ("" when
        none does): a failed capture, or engines that failed to build or have no profile."""
        reasons = [why for why in (self._graph_fallback, self._nets_fallback) if why]
        # A copy: the status thread reads this while the engine thread may add a reason.
        reasons += [f"{part}: {why}" for part, why in dict(getattr(self.nets, "fallbacks", {})).items()]
        return "; ".join(reasons)[:600]

    @property
    def needs_warm_up(self) -> bool:
        """Whether a layout the show can reach next is not ready (compiled or captured): after
        a step-count change, for instance. The runtime then calls `warm_up` with the status
        `warming`; a frame would otherwise make it ready itself, and stall."""
        if self.acceleration == Acceleration():
            return False
        return any(key not in self._warmed for key in self._reachable_keys(self._sources))

    @torch.no_grad()
    def warm_up(self, *examples: Tensor | np.ndarray | None, stop: Callable[[], bool] | None = None) -> int:
        """Make every layout the show can reach ready before it needs it: capture its frame
        graph (`cuda_graph`) or compile its batch sizes (`compile`), on both sides of guidance
        1.0 (`full`, `initialize`, `self`). For the input kinds of `examples` (an image as
        `__call__` takes it; None for txt2img) and every kind seen before. Before the first
        frame, `compile` also compiles the batch sizes of `warm_steps`. The stream's state is
        left as it was. `stop` is asked between layouts (each may compile for a minute): when it
        says True, warm-up ends there. Returns how many layouts it made ready (always 0 for
        `none`: eager kernels need nothing). A layout that fails to compile or capture runs on
        the exact path from then on, and `acceleration_fallback` says why; only a failure of
        the exact path itself raises."""
        self._require_prepared()
        if self.acceleration == Acceleration():
            return 0
        stopped = stop if stop is not None else lambda: False
        for image in examples:
            staging = None if image is None else self._inputs.stage(image)
            if staging is not None:
                staging.normalise()
            self._sources.add(self._source_kind(staging))
        done = 0
        if self.acceleration.compile and not self._has_output:
            done += self._compile_other_step_counts(stopped)
        for key in self._reachable_keys(self._sources):
            if stopped():
                break
            if key not in self._warmed:
                self._warm_key(key)
                done += 1
        return done

    def _warm_key(self, key: LayoutKey) -> None:
        source, _n, guided = key
        stagings = {self._source_kind(s): s for s in self._inputs.by_kind.values()}
        with self._guided_as(guided):
            self._warm_layout(key, None if source == TXT2IMG else stagings[source])

    def _compile_other_step_counts(self, stopped: Callable[[], bool]) -> int:
        """Run each layout of every other count in `warm_steps` once, eagerly (never captured:
        a frame graph holds one count's buffers, captured when the show gets there), so that
        its batch sizes are compiled. Only before the first frame: the stream is then prepared
        again at its own count, as `prepare` left it."""
        # A count above num_inference_steps cannot be reached (t_index values are distinct, below it).
        counts = [n for n in self.warm_steps if n != self.num_steps and n <= self._num_inference_steps]
        if not counts:
            return 0
        kept, graphs, done = self._t_index_list, self._graphs, 0
        self._graphs = None
        try:
            for n in counts:
                if stopped():
                    break
                # Any n values: the batch sizes, not the timesteps, are what compiles.
                self._t_index_list = list(range(n))
                self._resize_state(keep_last=False)
                for key in self._reachable_keys(self._sources):
                    if stopped():
                        break
                    self._warm_key(key)
                    done += 1
        finally:
            self._graphs, self._t_index_list = graphs, kept
            self._resize_state(keep_last=False)
        return done

    def _reachable_keys(self, sources: set[Hashable]) -> list[LayoutKey]:
        sides = [False] if self.cfg_type is CfgType.NONE else [False, True]
        return [(source, self.num_steps, guided) for source in sorted(sources, key=str) for guided in sides]

    @contextmanager
    def _guided_as(self, guided: bool) -> Iterator[None]:
        """Lay the UNet rows out as for guidance above 1.0 (or not) meanwhile. The fader's own
        value stays in `_g`: a captured kernel reads it at replay."""
        kept = self.guidance_scale
        if guided != self._guided:
            self.guidance_scale = 2.0 if guided else 1.0
        self._refresh_unet_inputs()
        try:
            yield
        finally:
            self.guidance_scale = kept
            self._refresh_unet_inputs()

    def _warm_layout(self, key: LayoutKey, staging: InputStaging | None) -> None:
        """Capture (or, without graphs, run once to compile) one layout's frame; the state the
        frame writes, the counters and the CPU generator are restored afterwards."""
        state = [self._unet_x, self._stock, self._x0, self._eps, self._z, self._dec_in]
        state += [self._image, self._image32, self._ring.device_rgba]
        saved = [t.clone() for t in state]
        seq_stock = self._seq_stock  # the sequential reference rebinds it
        stats = dataclasses.replace(self.stats)
        generator = self._generator.get_state()
        try:
            # Compiled or engine networks run once eagerly first: a compile (or engine) failure
            # then falls back to the exact networks, which the graph captures, instead of
            # costing the graphs.
            ran = False
            if self._graphs is None or self.acceleration.replaces_networks:
                self._run_or_fall_back(key, staging)
                ran = True
            if self._graphs is not None:
                try:
                    self._graphs.capture(key, lambda: self._frame(staging, finish=True))
                except Exception as exc:  # the show goes on, eagerly, and says why
                    self._graph_fallback = (
                        f"cuda_graph capture failed, frames run eagerly: {type(exc).__name__}: {exc}"[:400]
                    )
                    log.exception("capturing the frame graph for %s failed; running frames eagerly", key)
                    self._graphs = None
            if not ran and self._graphs is None:
                self._run_or_fall_back(key, staging)  # whether the frame runs at all without its graph
        finally:
            for tensor, copy in zip(state, saved, strict=True):
                tensor.copy_(copy)
            self.stats = stats
            self._seq_stock = seq_stock
            self._generator.set_state(generator)
        self._warmed.add(key)

    def _run_or_fall_back(self, key: LayoutKey, staging: InputStaging | None) -> None:
        """One eager frame of `key` (it compiles, or binds engine buffers). Where the networks
        fail at it, frames run on the exact torch networks from then on, and the status says
        why; a failure of the exact networks themselves is raised."""
        try:
            self._frame(staging, finish=True)
        except Exception as exc:
            if not self.acceleration.replaces_networks or self._nets_fallback:
                raise
            self._nets_fallback = (
                f"{self.nets.name} failed while warming up, frames run on the exact torch path: "
                f"{type(exc).__name__}: {exc}"
            )[:400]
            log.exception("warming %s with %s failed; running on the exact torch path", key, self.nets.name)
            self.nets = Networks(self.pipe)

    def current_prompt(self) -> PromptSpec:
        """The prompt (or blend) in effect."""
        return self._prompt

    def current_negative_prompt(self) -> PromptSpec:
        """The negative prompt (or blend) in effect."""
        return self._negative_prompt

    def current_seed(self) -> SeedSpec:
        """The seed (or blend) in effect."""
        spec = self._seed_spec
        return spec[0][0] if len(spec) == 1 else list(spec)
