"""`prepare_engines`: export, cache, build, load and validate an engine per component.

Every failure of a component, whatever raised it, becomes a reason: logged as a warning, returned
to the caller for status and `doctor`, and the component stays on the exact torch path. Only a
stop request (`BuildCancelled`) propagates. Failures are remembered in the cache (not retried),
except temporary ones (`is_transient`: out of memory, a full disk, a build process killed by
SIGKILL), which the next starts retry, `TRANSIENT_ATTEMPTS` in a row. An engine is validated
against torch on fixed inputs at every profile (cosine >= MIN_COSINE, all finite) before use.
"""

from __future__ import annotations

import logging
import shutil
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bridge.engine.accel.backend import (
    Backend,
    BuildCancelled,
    BuildFailed,
    BuildProgress,
    Runner,
    ValidationFailed,
    aligned_empty,
    is_transient,
)
from bridge.engine.accel.engine_cache import (
    BuilderSettings,
    DeviceInfo,
    EngineCache,
    EngineKey,
    weights_digest,
)
from bridge.engine.accel.onnx_export import (
    Component,
    ExportModule,
    ExportSpec,
    component_dtype,
    export_onnx,
    sample_inputs,
)

log = logging.getLogger(__name__)

MIN_COSINE = 0.999


@dataclass
class Prepared:
    """A component ready to run: bind its static buffers, then run it per frame."""

    spec: ExportSpec
    runner: Runner
    plan_path: Path
    built: bool  # built now (False: loaded from the cache)
    cosine: dict[int, float]  # validation per row count


@dataclass
class EngineReport:
    """What `prepare_engines` achieved: ready components, and a reason per fallen-back one."""

    ready: dict[Component, Prepared] = field(default_factory=dict)
    fallbacks: dict[Component, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.fallbacks


def _record(cache: EngineCache, key: EngineKey, exc: BaseException) -> None:
    cache.record_failure(key, f"{type(exc).__name__}: {exc}"[:600], transient=is_transient(exc))


def validate(
    runner: Runner, reference: ExportModule, spec: ExportSpec, *, device: torch.device, dtype: torch.dtype
) -> dict[int, float]:
    """Run the engine and torch on fixed inputs at every profile; cosine >= MIN_COSINE, all finite."""
    scores: dict[int, float] = {}
    for rows in spec.rows:
        samples = sample_inputs(spec, rows, dtype=dtype, device=device, seed=1234 + rows)
        # Buffers of their own, aligned as TensorRT wants them whatever the allocator gives.
        inputs = [aligned_empty(t.shape, dtype=t.dtype, device=t.device).copy_(t) for t in samples]
        with torch.no_grad():
            want = reference(*inputs)
        got = aligned_empty(want.shape, dtype=want.dtype, device=want.device)
        runner.bind(rows, inputs, [got])
        runner.run(rows)
        got_cpu, want_cpu = got.detach().to("cpu", torch.float64), want.detach().to("cpu", torch.float64)
        if not torch.isfinite(got_cpu).all():
            raise ValidationFailed(f"{spec.component.value} engine gave NaN or Inf at {rows} rows")
        cos = float(torch.nn.functional.cosine_similarity(got_cpu.flatten(), want_cpu.flatten(), dim=0))
        if not cos >= MIN_COSINE:
            raise ValidationFailed(
                f"{spec.component.value} engine differs from torch at {rows} rows: cosine {cos:.5f} < {MIN_COSINE}"
            )
        scores[rows] = cos
    return scores


def prepare_engines(
    pipe: Any,
    specs: Sequence[ExportSpec],
    *,
    model: str,
    cache_root: Path,
    backend: Backend,
    device: DeviceInfo,
    settings: BuilderSettings | None = None,
    cancel: threading.Event | None = None,
    lock_timeout_s: float = 3600.0,
    bars: bool = True,
) -> EngineReport:
    """Build or load an engine per spec. A component that fails keeps the exact torch path; its
    reason is logged and returned. A stop request (`cancel` set) raises BuildCancelled. `model`
    is recorded beside each engine for people; the weights themselves key it."""
    settings = settings if settings is not None else BuilderSettings()
    report = EngineReport()
    cache = EngineCache(cache_root)
    digests: dict[int, str] = {}
    for spec in specs:
        module = pipe.unet if spec.component is Component.UNET else pipe.vae
        try:
            if id(module) not in digests:
                digests[id(module)] = weights_digest(module)
            key = EngineKey(model, digests[id(module)], spec, backend.name, backend.version, device, settings)
            report.ready[spec.component] = _prepare_one(
                pipe, key, cache, backend, cancel=cancel, lock_timeout_s=lock_timeout_s, bars=bars
            )
        except BuildCancelled:
            raise
        except Exception as exc:  # any failure of an optional backend keeps the show on the exact path
            if cancel is not None and cancel.is_set():  # a stop while waiting for the lock, say
                raise BuildCancelled(f"stopped while preparing the {spec.component.value} engine") from exc
            reason = f"{spec.component.value}: {type(exc).__name__}: {exc}"[:600]
            log.warning("%s engine unavailable, running it on the exact torch path: %s", backend.name, reason)
            report.fallbacks[spec.component] = reason
    return report


def _store_timings(
    cache: EngineCache,
    key: EngineKey,
    timing: bytes,
    backend: Backend,
    *,
    timeout_s: float,
    cancel: threading.Event | None,
) -> None:
    """Merge a build's timings into the shared timing cache. They only speed up later builds:
    a failure here (the file's lock held too long, a full disk) is logged, never the failure of
    the engine just built. A stop request while waiting for the lock is a stop."""
    try:
        cache.write_timing_cache(
            key, timing, merge=backend.merge_timing_caches, timeout_s=timeout_s, cancel=cancel
        )
    except Exception as exc:
        if cancel is not None and cancel.is_set():
            raise BuildCancelled(
                f"stopped while storing the {key.spec.component.value} build's timings"
            ) from exc
        log.warning(
            "the %s build's timings were not stored (%s: %s); later builds time those layers again",
            key.spec.component.value,
            type(exc).__name__,
            exc,
        )


def _prepare_one(
    pipe: Any,
    key: EngineKey,
    cache: EngineCache,
    backend: Backend,
    *,
    cancel: threading.Event | None,
    lock_timeout_s: float,
    bars: bool,
) -> Prepared:
    spec, title = key.spec, key.spec.component.value
    with cache.lock(key, timeout_s=lock_timeout_s, cancel=cancel):
        earlier = cache.failure(key)
        if earlier is not None:
            raise BuildFailed(
                f"an earlier build failed ({earlier}); delete {str(cache.failure_path(key))!r} to try again"
            )
        plan = cache.read_plan(key)
        built = plan is None
        if plan is None:
            log.info("building the %s %s engine (not in %s)", backend.name, title, cache.folder(key))
            progress = BuildProgress(f"{backend.name} {title}", cancel=cancel, bars=bars)
            try:
                onnx_path = export_onnx(pipe, spec, cache.onnx_path(key), opset=key.settings.opset)
                plan, timing = backend.build(
                    onnx_path,
                    spec,
                    settings=key.settings,
                    timing_cache=cache.read_timing_cache(key),
                    progress=progress,
                )
            except BuildCancelled:
                raise
            except Exception as exc:
                if cancel is not None and cancel.is_set():  # stopped: the next start builds again
                    raise BuildCancelled(f"the {title} engine build was stopped ({exc})") from exc
                _record(cache, key, exc)
                raise
            finally:
                # The ONNX (GBs for a real UNet) is exported again if a build ever needs it: built,
                # failed (remembered, never retried) or stopped, it is not kept.
                shutil.rmtree(cache.onnx_path(key).parent, ignore_errors=True)
            cache.write_plan(key, plan)
            _store_timings(cache, key, timing, backend, timeout_s=lock_timeout_s, cancel=cancel)
        else:
            log.info("loading the %s %s engine from %s", backend.name, title, cache.plan_path(key))
        try:
            runner = backend.load(plan, spec)
            reference = ExportModule(pipe, spec).eval()
            module = pipe.unet if spec.component is Component.UNET else pipe.vae
            device = next(module.parameters()).device
            cosine = validate(runner, reference, spec, device=device, dtype=component_dtype(pipe, spec))
        except Exception as exc:
            # A plan that loads wrong is as bad as a failed build: never retried until deleted
            # (out of memory while loading or validating is retried, TRANSIENT_ATTEMPTS in all).
            _record(cache, key, exc)
            raise
        cache.clear_failure(key)  # earlier temporary failures are forgotten
    return Prepared(spec, runner, cache.plan_path(key), built, cosine)
