"""The on-disk cache of built engines (TensorRT plans) under the model cache.

An engine is only valid for the exact weights, shapes, builder and GPU it was built for, so its
key holds all of them: weights digest, component and module config, exporter (torch version and
opset), profiles (row counts) and latent size, backend name and version, GPU name and compute
capability, and the builder settings. The original StreamDiffusion keyed engines without the
resolution, a known source of its users' bugs. The model's name is not in the key: the weights
digest names the weights, and one model has many spellings (a hub id, a local folder, the pipe's
`name_or_path`); keyed by the name, the same weights were built twice, minutes each.

Layout, one folder per key under `<model cache>/engines/`:
    <component>-<digest>/engine.plan   the serialized engine, written atomically
    <component>-<digest>/key.json      the key's fields and the model's name (not keyed), for people
    <component>-<digest>/failed.json   a failed build: not retried until deleted (negative cache);
                                       a temporary one (out of memory, a killed build process)
                                       is retried at the next starts, TRANSIENT_ATTEMPTS in all
    <component>-<digest>/.lock         held while building or loading, across processes
    timing-<backend>-<version>-<gpu>.cache   the builder's timing cache, shared by all builds:
                                       each build's is merged into it (`write_timing_cache`)
    timing-<backend>-<version>-<gpu>.cache.lock   held while merging into it, across processes
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bridge.engine.accel.onnx_export import ExportSpec

log = logging.getLogger(__name__)

KEY_FORMAT = 3  # bump when the key's fields change meaning (2: the model's name left the key;
# 3: so did the module config's private entries, `_name_or_path` (the folder) among them)
MODEL_NOTE = "model (for people; not part of the key)"  # its entry in key.json and failed.json
TRANSIENT_ATTEMPTS = 3  # temporary failures in a row before a key is no longer retried


class CacheLockTimeout(RuntimeError):
    """Another process holds the engine's lock for longer than we may wait."""


@dataclass(frozen=True)
class DeviceInfo:
    """The GPU an engine is built for: plans do not move between compute capabilities."""

    name: str
    capability: tuple[int, int]

    @classmethod
    def current(cls) -> DeviceInfo:
        """The current CUDA device (raises RuntimeError where there is none)."""
        if not torch.cuda.is_available():
            raise RuntimeError("torch sees no CUDA device")
        index = torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        return cls(torch.cuda.get_device_name(index), (major, minor))


@dataclass(frozen=True)
class BuilderSettings:
    """Everything about a build besides its inputs; part of the key."""

    optimization_level: int = 3  # TensorRT's default; 0..5
    workspace_bytes: int | None = None  # None: TensorRT's default (the device's memory)
    strongly_typed: bool = True  # always: TensorRT 11 has no weak typing and no FP16 flag
    opset: int = 17


def weights_digest(module: nn.Module) -> str:
    """sha256 over every parameter and buffer (name, dtype, shape, bytes), after any LoRA fuse:
    two models with one config but different weights must not share an engine."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        data = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}|{data.dtype}|{tuple(data.shape)}|".encode())
        h.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def architecture(config: dict[str, Any]) -> dict[str, Any]:
    """A diffusers module config without its private entries: `_name_or_path` (where it was
    loaded from), `_diffusers_version`, `_class_name` and the like say nothing of the network."""
    return {key: value for key, value in config.items() if not str(key).startswith("_")}


@dataclass(frozen=True)
class EngineKey:
    """What an engine depends on. `digest()` names its cache folder. `model` (the name it was
    loaded by) is recorded for people, but not hashed: `weights` identifies the weights."""

    model: str
    weights: str  # weights_digest of the component's module
    spec: ExportSpec
    backend: str
    backend_version: str
    device: DeviceInfo
    settings: BuilderSettings

    def fields(self) -> dict[str, Any]:
        """What `digest()` hashes."""
        spec = self.spec
        return {
            "format": KEY_FORMAT,
            "weights": self.weights,
            "component": spec.component.value,
            "module_config": json.dumps(architecture(spec.config), sort_keys=True, default=str),
            "inputs": [[t.name, list(t.shape), str(t.dtype), list(t.route)] for t in spec.inputs],
            "outputs": [[t.name, list(t.shape), str(t.dtype)] for t in spec.outputs],
            "profiles": list(spec.rows),
            "latent_hw": list(spec.latent_hw),
            "exporter": f"torch {torch.__version__} torchscript",
            "backend": self.backend,
            "backend_version": self.backend_version,
            "gpu": self.device.name,
            "compute_capability": list(self.device.capability),
            "settings": asdict(self.settings),
        }

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.fields(), sort_keys=True).encode()).hexdigest()[:24]

    def described(self) -> dict[str, Any]:
        """The key's fields and, marked as not part of it, the model's name: for people."""
        return {**self.fields(), MODEL_NOTE: self.model}


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-")[:60]


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that a reader sees the old file or the whole new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class FailureRecord:
    """What `failed.json` says: the reason, whether the failure was temporary, and how many
    temporary failures came in a row."""

    reason: str
    transient: bool = False
    attempts: int = 1

    @classmethod
    def read(cls, path: Path) -> FailureRecord | None:
        if not path.is_file():
            return None
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            return cls(
                str(record["reason"]), bool(record.get("transient", False)), int(record.get("attempts", 1))
            )
        except (OSError, ValueError, KeyError, TypeError):
            return cls(f"unreadable failure record {str(path)!r}")

    @property
    def retried(self) -> bool:
        """Whether the next start builds this key again."""
        return self.transient and self.attempts < TRANSIENT_ATTEMPTS

    def describe(self) -> str:
        if not self.transient:
            return self.reason
        if not self.retried:
            return f"{self.reason} ({self.attempts} attempts in a row; not retried again)"
        return f"{self.reason} (temporary: retried at the next start, attempt {self.attempts} of {TRANSIENT_ATTEMPTS})"


class EngineCache:
    """Plans, negative entries and timing caches under `root` (`<model cache>/engines`)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def folder(self, key: EngineKey) -> Path:
        return self.root / f"{key.spec.component.value}-{key.digest()}"

    def plan_path(self, key: EngineKey) -> Path:
        return self.folder(key) / "engine.plan"

    def failure_path(self, key: EngineKey) -> Path:
        return self.folder(key) / "failed.json"

    def onnx_path(self, key: EngineKey) -> Path:
        return self.folder(key) / "onnx" / "model.onnx"

    def timing_cache_path(self, key: EngineKey) -> Path:
        device = f"{_slug(key.device.name)}-sm{key.device.capability[0]}{key.device.capability[1]}"
        return self.root / f"timing-{key.backend}-{_slug(key.backend_version)}-{device}.cache"

    def read_plan(self, key: EngineKey) -> bytes | None:
        path = self.plan_path(key)
        return path.read_bytes() if path.is_file() else None

    def write_plan(self, key: EngineKey, plan: bytes) -> Path:
        folder = self.folder(key)
        write_atomic(folder / "key.json", json.dumps(key.described(), indent=1, sort_keys=True).encode())
        write_atomic(self.plan_path(key), plan)
        return self.plan_path(key)

    def drop_plan(self, key: EngineKey) -> None:
        self.plan_path(key).unlink(missing_ok=True)

    def failure(self, key: EngineKey) -> str | None:
        """Why this key must not be built again, or None. A temporary failure (out of memory, a
        killed build process) stops the retries only after TRANSIENT_ATTEMPTS in a row."""
        record = FailureRecord.read(self.failure_path(key))
        return None if record is None or record.retried else record.describe()

    def stale_folders(self) -> list[Path]:
        """Engine folders written under another KEY_FORMAT: no key of this version names them,
        so nothing reads them again (a plan is GBs for a real UNet; `doctor` says so)."""
        stale = []
        for folder in sorted(self.root.iterdir()) if self.root.is_dir() else []:
            written = _key_format(folder)
            if written is not None and written != KEY_FORMAT:
                stale.append(folder)
        return stale

    def recorded_failures(self) -> list[tuple[str, str, bool]]:
        """(folder name, reason, retried) of every failed build or load recorded here (for
        `doctor`); `retried`: a temporary failure the next start builds again. Records in
        `stale_folders` are left out: no key reads them."""
        found = []
        stale = set(self.stale_folders())
        for path in sorted(self.root.glob("*/failed.json")) if self.root.is_dir() else []:
            if path.parent in stale:
                continue
            record = FailureRecord.read(path)
            if record is not None:
                found.append((path.parent.name, record.describe(), record.retried))
        return found

    def record_failure(self, key: EngineKey, reason: str, *, transient: bool = False) -> None:
        """Record a failed build or load. A temporary one counts its attempts in a row."""
        attempts = 1
        earlier = FailureRecord.read(self.failure_path(key))
        if transient and earlier is not None and earlier.transient:
            attempts = earlier.attempts + 1
        record = {
            "reason": reason,
            "transient": transient,
            "attempts": attempts,
            "time": time.time(),
            "key": key.described(),
        }
        write_atomic(self.failure_path(key), json.dumps(record, indent=1).encode())

    def clear_failure(self, key: EngineKey) -> None:
        """A build that succeeded after temporary failures: forget them."""
        self.failure_path(key).unlink(missing_ok=True)

    def read_timing_cache(self, key: EngineKey) -> bytes:
        path = self.timing_cache_path(key)
        return path.read_bytes() if path.is_file() else b""

    def write_timing_cache(
        self,
        key: EngineKey,
        data: bytes,
        *,
        merge: Callable[[bytes, bytes], bytes],
        timeout_s: float,
        cancel: threading.Event | None = None,
    ) -> None:
        """Store a build's timing cache `data`, merged with the file as it is now by `merge(ours,
        theirs)` (the backend's: it knows the format). Every build shares the file, and another
        (another process, or another component) may have written it since this one read it;
        writing `data` alone would drop that build's timings. The read, merge and write hold the
        file's lock (`<file>.lock`, across processes), so no other merge comes between."""
        if not data:
            return
        path = self.timing_cache_path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = path.with_name(path.name + ".lock")
        with _held(lock, "timing cache", "a build storing its timings?", timeout_s=timeout_s, cancel=cancel):
            theirs = path.read_bytes() if path.is_file() else b""
            merged = data
            if theirs:
                try:
                    merged = merge(data, theirs)
                except Exception as exc:  # the backend could not read or combine them: ours alone
                    log.warning(
                        "merging into the timing cache %s failed (%s: %s); writing this build's alone",
                        path,
                        type(exc).__name__,
                        exc,
                    )
            write_atomic(path, merged)

    @contextmanager
    def lock(
        self, key: EngineKey, *, timeout_s: float, cancel: threading.Event | None = None
    ) -> Iterator[None]:
        """Hold the key's lock across processes, polling so a stop request is seen within a second."""
        folder = self.folder(key)
        folder.mkdir(parents=True, exist_ok=True)
        with _held(folder / ".lock", "engine", "a build in progress?", timeout_s=timeout_s, cancel=cancel):
            yield


def _key_format(folder: Path) -> int | None:
    """The KEY_FORMAT an engine folder was written under (from key.json, else failed.json's
    key), None where neither says."""
    for name, inner in (("key.json", False), ("failed.json", True)):
        try:
            record = json.loads((folder / name).read_text(encoding="utf-8"))
            fields = record["key"] if inner else record
            return int(fields["format"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


@contextmanager
def _held(
    path: Path, what: str, why: str, *, timeout_s: float, cancel: threading.Event | None
) -> Iterator[None]:
    """Hold the file lock `path` across processes (and threads), polling so a stop request is
    seen within a second; `what` and `why` name it in the timeout's message."""
    from filelock import FileLock, Timeout

    lock = FileLock(str(path))
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            lock.acquire(timeout=min(1.0, max(0.0, deadline - time.monotonic())))
            break
        except Timeout:
            if cancel is not None and cancel.is_set():
                raise CacheLockTimeout(f"stopped while waiting for the lock {str(path)!r}") from None
            if time.monotonic() >= deadline:
                raise CacheLockTimeout(
                    f"another process has held the {what} lock {str(path)!r} for more than "
                    f"{timeout_s:.0f} s ({why}); wait for it, or stop it and retry"
                ) from None
    try:
        yield
    finally:
        lock.release()
