"""Everything around the TensorRT builder, on the CPU: cache keys, hits and misses, the negative
cache, the timing cache, progress and cancellation, binding by address, validation and the
fallback's reasons. TensorRT is the recording fake in tests/fake_tensorrt.py (its behaviour cites
TensorRT's own docstrings); the onnxruntime backend runs the same path end to end for real."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import shutil
import sys
import threading
import types
from pathlib import Path
from typing import Any

import pytest
import torch

from bridge.engine.accel import prepare as prepare_module
from bridge.engine.accel.backend import BuildCancelled, BuildProgress, LoadFailed, aligned_empty
from bridge.engine.accel.engine_cache import (
    MODEL_NOTE,
    BuilderSettings,
    DeviceInfo,
    EngineCache,
    EngineKey,
    weights_digest,
)
from bridge.engine.accel.onnx_export import (
    Component,
    export_onnx,
    unet_spec,
    vae_decoder_spec,
    vae_encoder_spec,
)
from bridge.engine.accel.onnxruntime_backend import OnnxRuntimeBackend
from bridge.engine.accel.prepare import prepare_engines
from bridge.engine.accel.streams import DEFAULT_STREAM, TorchStreams, enqueue
from bridge.engine.accel.tensorrt import TensorRTBackend, _progress_monitor, import_tensorrt
from tests.fake_tensorrt import TIMING_MAGIC, FakeStreams, make_fake_tensorrt

SIZE = 64
GPU = DeviceInfo("NVIDIA H200", (9, 0))
STREAM = 0xC0FFEE  # torch's current stream when it is not the default one (a capture stream, say)


def _names(fake: Any) -> list[str]:
    return [c[0] for c in fake.calls]


def _decoder(pipe: Any, rows: tuple[int, ...] = (1, 2)) -> Any:
    return vae_decoder_spec(pipe.vae, width=SIZE, height=SIZE, rows=rows)


def _aligned(*shape: int, like: torch.Tensor | None = None) -> torch.Tensor:
    """A float32 CPU buffer on a 256-byte boundary, as TensorRT wants its buffers (torch's CPU
    allocator aligns to 64 bytes only; its CUDA one to 512)."""
    buffer = aligned_empty(shape, dtype=torch.float32, device="cpu")
    return buffer.copy_(like) if like is not None else buffer.normal_()


def _decoder_runner(pipe: Any, root: Path, fake: Any, rows: tuple[int, ...] = (1, 2)) -> Any:
    return _prepare(pipe, [_decoder(pipe, rows=rows)], root, fake).ready[Component.VAE_DECODER].runner


def _prepare(pipe: Any, specs: list[Any], root: Path, fake: Any, backend: Any = None, **kwargs: Any) -> Any:
    """prepare_engines with TensorRTBackend on `fake` (or `backend`, made on it)."""
    backend = backend if backend is not None else TensorRTBackend(fake, streams=FakeStreams(STREAM))
    return prepare_engines(
        pipe, specs, model="tiny", cache_root=root, backend=backend, device=GPU, bars=False, **kwargs
    )


# ------------------------------------------------------------------ cache keys
def test_every_key_field_changes_the_key(tiny_pipe: Any) -> None:
    spec = _decoder(tiny_pipe)
    base = EngineKey("tiny", "w" * 64, spec, "tensorrt", "11.1.0", GPU, BuilderSettings())
    variants = {
        "weights": dataclasses.replace(base, weights="x" * 64),
        "component": dataclasses.replace(
            base, spec=vae_encoder_spec(tiny_pipe.vae, width=SIZE, height=SIZE, rows=(1, 2))
        ),
        "profiles": dataclasses.replace(base, spec=_decoder(tiny_pipe, rows=(1, 2, 3))),
        "latent size": dataclasses.replace(
            base, spec=vae_decoder_spec(tiny_pipe.vae, width=SIZE, height=2 * SIZE, rows=(1, 2))
        ),
        "module config": dataclasses.replace(
            base, spec=dataclasses.replace(spec, config={**spec.config, "scaling_factor": 0.5})
        ),
        "backend": dataclasses.replace(base, backend="onnxruntime"),
        "version": dataclasses.replace(base, backend_version="10.13.0"),
        "gpu name": dataclasses.replace(base, device=DeviceInfo("NVIDIA H100", (9, 0))),
        "capability": dataclasses.replace(base, device=DeviceInfo("NVIDIA H200", (8, 9))),
        "opt level": dataclasses.replace(base, settings=BuilderSettings(optimization_level=5)),
        "workspace": dataclasses.replace(base, settings=BuilderSettings(workspace_bytes=2**30)),
        "opset": dataclasses.replace(base, settings=BuilderSettings(opset=18)),
    }
    digests = {name: key.digest() for name, key in variants.items()}
    assert base.digest() not in digests.values(), [n for n, d in digests.items() if d == base.digest()]
    assert len(set(digests.values())) == len(digests)
    same = EngineKey("tiny", "w" * 64, _decoder(tiny_pipe), "tensorrt", "11.1.0", GPU, BuilderSettings())
    assert same.digest() == base.digest()
    cache = EngineCache(Path("/cache"))
    assert cache.folder(base).name == f"vae_decoder-{base.digest()}"
    assert "sm90" in cache.timing_cache_path(base).name and "11.1.0" in cache.timing_cache_path(base).name


def test_one_model_s_weights_are_one_engine_whatever_the_model_is_called(
    tiny_pipe: Any, tmp_path: Path
) -> None:
    """StreamEngine names the model by the pipe's `name_or_path`, the runtime by the config's
    spelling: the same weights must find the same engine, not build it again (minutes)."""
    spec = _decoder(tiny_pipe, rows=(1,))
    hub = EngineKey("stabilityai/sd-turbo", "w" * 64, spec, "tensorrt", "11.1.0", GPU, BuilderSettings())
    folder = dataclasses.replace(hub, model="/home/show/models/sd-turbo")
    cache = EngineCache(tmp_path)
    assert cache.folder(hub) == cache.folder(folder)
    assert cache.folder(dataclasses.replace(hub, weights="x" * 64)) != cache.folder(hub)

    def prepare(pipe: Any, model: str) -> Any:
        backend = TensorRTBackend(make_fake_tensorrt(), streams=FakeStreams(STREAM))
        report = prepare_engines(
            pipe, [spec], model=model, cache_root=tmp_path, backend=backend, device=GPU, bars=False
        )
        assert report.ok, report.fallbacks
        return report.ready[Component.VAE_DECODER]

    first = prepare(tiny_pipe, "stabilityai/sd-turbo")
    again = prepare(tiny_pipe, "/home/show/models/sd-turbo")
    assert first.built and not again.built and again.plan_path == first.plan_path
    described = json.loads((first.plan_path.parent / "key.json").read_text())
    assert "model" not in described and described[MODEL_NOTE] == "stabilityai/sd-turbo"
    # Other weights under the same name: another engine.
    vae = copy.deepcopy(tiny_pipe.vae)
    with torch.no_grad():
        next(vae.decoder.parameters()).add_(0.01)
    other = prepare(types.SimpleNamespace(unet=tiny_pipe.unet, vae=vae), "stabilityai/sd-turbo")
    assert other.built and other.plan_path != first.plan_path


def test_the_same_weights_loaded_from_two_folders_are_one_engine(tiny_pipe: Any, tmp_path: Path) -> None:
    """diffusers writes where a module was loaded from into its config (`_name_or_path`), and
    its own version (`_diffusers_version`): a hub id and a local copy of the same weights, or
    a new diffusers, must not build the engine again."""
    vae_class = type(tiny_pipe.vae)
    tiny_pipe.vae.save_pretrained(tmp_path / "hub-snapshot")
    shutil.copytree(tmp_path / "hub-snapshot", tmp_path / "show-copy")
    loaded = [vae_class.from_pretrained(tmp_path / folder) for folder in ("hub-snapshot", "show-copy")]
    loaded[1].register_to_config(_diffusers_version="0.99.0")
    specs = [_decoder(types.SimpleNamespace(unet=tiny_pipe.unet, vae=vae), rows=(1,)) for vae in loaded]
    assert specs[0].config["_name_or_path"] != specs[1].config["_name_or_path"]  # what the test is about
    keys = [
        EngineKey("sd-turbo", weights_digest(vae), spec, "tensorrt", "11.1.0", GPU, BuilderSettings())
        for vae, spec in zip(loaded, specs, strict=True)
    ]
    assert keys[0].weights == keys[1].weights
    assert keys[0].digest() == keys[1].digest()
    # The architecture is still in the key: another latent size is another engine.
    wider = dataclasses.replace(specs[0], config={**specs[0].config, "latent_channels": 16})
    assert dataclasses.replace(keys[0], spec=wider).digest() != keys[0].digest()


# ------------------------------------------------------------------ build, hit, miss
def test_build_then_hit_follows_the_documented_api(tiny_pipe: Any, tmp_path: Path) -> None:
    fake = make_fake_tensorrt()
    report = _prepare(tiny_pipe, [_decoder(tiny_pipe)], tmp_path, fake)
    assert report.ok, report.fallbacks
    ready = report.ready[Component.VAE_DECODER]
    assert ready.built and ready.plan_path.is_file() and (ready.plan_path.parent / "key.json").is_file()
    assert all(c >= 0.999 for c in ready.cosine.values()) and set(ready.cosine) == {1, 2}
    calls = fake.calls
    assert ("create_network", 1 << int(fake.NetworkDefinitionCreationFlag.STRONGLY_TYPED)) in calls
    assert [c for c in calls if c[0] == "set_shape"] == [
        ("set_shape", "latents", (r, 4, 8, 8), (r, 4, 8, 8), (r, 4, 8, 8)) for r in (1, 2)
    ]  # one static profile per row count
    order = _names(fake)
    assert (
        order.index("parse_from_file")
        < order.index("set_timing_cache")
        < order.index("build_serialized_network")
    )
    assert not (ready.plan_path.parent / "onnx").exists()  # the ONNX is dropped after the build
    assert list(tmp_path.glob("timing-tensorrt-11.1.0-NVIDIA-H200-sm90.cache"))

    # A second start: a hit, nothing built, the plan deserialized and validated again.
    again = make_fake_tensorrt()
    report2 = _prepare(tiny_pipe, [_decoder(tiny_pipe)], tmp_path, again)
    assert report2.ok and not report2.ready[Component.VAE_DECODER].built
    assert "build_serialized_network" not in _names(again) and "parse_from_file" not in _names(again)
    assert "deserialize_cuda_engine" in _names(again)

    # Another TensorRT version is another key: a miss, built again.
    other = make_fake_tensorrt(version="10.13.0")
    assert _prepare(tiny_pipe, [_decoder(tiny_pipe)], tmp_path, other).ready[Component.VAE_DECODER].built


def test_the_timing_cache_persists_across_builds(tiny_pipe: Any, tmp_path: Path) -> None:
    fake = make_fake_tensorrt()
    _prepare(tiny_pipe, [_decoder(tiny_pipe, rows=(1,))], tmp_path, fake)
    _prepare(tiny_pipe, [_decoder(tiny_pipe, rows=(1, 2))], tmp_path, fake)  # a new key, the same layers
    assert fake.timing_hits[0] == 0 and fake.timing_hits[1] > 0


def _timing_keys(data: bytes) -> set[str]:
    """The layer timings in a timing cache, as the fake serialises them."""
    return set(json.loads(data.removeprefix(TIMING_MAGIC))["keys"])


def _timing_cache(version: str, device: str, *keys: str) -> bytes:
    return TIMING_MAGIC + json.dumps({"version": version, "device": device, "keys": list(keys)}).encode()


def test_builds_that_overlap_keep_each_other_s_timings(tiny_pipe: Any, tmp_path: Path) -> None:
    """Two builds of different keys (two processes, or the UNet and the VAE by two bridges) both
    read the shared timing cache before either writes it back: neither's timings are lost."""
    fake = make_fake_tensorrt()
    encoder = vae_encoder_spec(tiny_pipe.vae, width=SIZE, height=SIZE, rows=(1,))

    class Overlapped(TensorRTBackend):
        """While this build runs, another builds the encoder from its read to its write."""

        def build(self, *args: Any, **kwargs: Any) -> tuple[bytes, bytes]:
            built = super().build(*args, **kwargs)
            assert _prepare(tiny_pipe, [encoder], tmp_path, fake).ok
            return built

    backend = Overlapped(fake, streams=FakeStreams(STREAM))
    report = _prepare(tiny_pipe, [_decoder(tiny_pipe, rows=(1,))], tmp_path, fake, backend)
    assert report.ok, report.fallbacks
    (path,) = tmp_path.glob("timing-tensorrt-11.1.0-NVIDIA-H200-sm90.cache")
    keys = _timing_keys(path.read_bytes())
    assert any("latents" in k for k in keys), keys  # the decoder's layers
    assert any("pixels" in k for k in keys), keys  # the encoder's, written while the decoder built
    assert ("combine", "11.1.0", "NVIDIA H200", False) in fake.calls


def test_the_timing_cache_is_read_merged_and_written_under_its_lock(tiny_pipe: Any, tmp_path: Path) -> None:
    """A second writer that comes while the first is between its read and its write waits for
    it, then merges with what the first wrote."""
    cache = EngineCache(tmp_path)
    key = EngineKey("tiny", "w" * 64, _decoder(tiny_pipe), "tensorrt", "11.1.0", GPU, BuilderSettings())

    def union(ours: bytes, theirs: bytes) -> bytes:
        return json.dumps(sorted(set(json.loads(ours)) | set(json.loads(theirs)))).encode()

    def write(data: bytes, merge: Any) -> None:
        cache.write_timing_cache(key, data, merge=merge, timeout_s=30)

    write(b'["old"]', union)
    second = threading.Thread(target=write, args=(b'["second"]', union))

    def first_merge(ours: bytes, theirs: bytes) -> bytes:
        second.start()  # between the first's read and its write
        second.join(2.0)  # without the lock, the second would read, merge and write meanwhile
        return union(ours, theirs)

    write(b'["first"]', first_merge)
    second.join()
    assert json.loads(cache.timing_cache_path(key).read_bytes()) == ["first", "old", "second"]


def test_a_timing_cache_from_another_tensorrt_or_gpu_is_not_merged(caplog: pytest.LogCaptureFixture) -> None:
    fake = make_fake_tensorrt()
    backend = TensorRTBackend(fake, streams=FakeStreams(STREAM))
    ours = _timing_cache("11.1.0", "NVIDIA H200", "a")
    assert _timing_keys(backend.merge_timing_caches(ours, _timing_cache("11.1.0", "NVIDIA H200", "b"))) == {
        "a",
        "b",
    }
    with caplog.at_level(logging.WARNING):
        assert backend.merge_timing_caches(ours, _timing_cache("10.13.0", "NVIDIA H200", "b")) == ours
        assert backend.merge_timing_caches(ours, _timing_cache("11.1.0", "NVIDIA H100", "b")) == ours
        assert backend.merge_timing_caches(ours, b"\x00 a file cut short") == ours  # TensorRT: None
    assert "the timing cache on disk is damaged or does not fit this TensorRT/GPU" in caplog.text
    # The fake combines as TensorRT does: another GPU with ignore_mismatch, another version never.
    config = fake.Builder(fake.ILogger()).create_builder_config()
    merged = config.create_timing_cache(ours)
    assert merged.combine(config.create_timing_cache(_timing_cache("11.1.0", "NVIDIA H100", "c")), True)
    assert not merged.combine(config.create_timing_cache(_timing_cache("10.13.0", "NVIDIA H200", "d")), True)
    assert merged.keys == {"a", "c"}


TIMING_FILE = "timing-tensorrt-11.1.0-NVIDIA-H200-sm90.cache"  # GPU's, TensorRT 11.1.0's


def test_a_damaged_timing_cache_on_disk_costs_no_engine(
    tiny_pipe: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Bytes that are no timing cache (a file cut short): TensorRT's create_timing_cache gives
    None for them. The build starts a new cache, the engine is ready, and the file then holds
    this build's timings alone."""
    fake = make_fake_tensorrt()
    path = tmp_path / TIMING_FILE
    path.write_bytes(b"\x00 a file cut short")
    with caplog.at_level(logging.WARNING):
        report = _prepare(tiny_pipe, [_decoder(tiny_pipe, rows=(1,))], tmp_path, fake)
    assert report.ok, report.fallbacks
    assert "the stored timing cache is damaged or does not fit this TensorRT/GPU" in caplog.text
    assert "Magic tag does not match" in caplog.text  # TensorRT's own error, through our logger
    assert fake.timing_hits == [0]
    assert any("latents" in k for k in _timing_keys(path.read_bytes()))


def test_timings_that_cannot_be_stored_cost_no_engine(
    tiny_pipe: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The timing cache only speeds up later builds. Its lock held past the wait, or a merge
    that raises, is logged; the engine just built is ready, and its ONNX is cleaned up."""
    from filelock import FileLock

    fake = make_fake_tensorrt()
    held = FileLock(str(tmp_path / (TIMING_FILE + ".lock")))
    held.acquire()
    try:
        with caplog.at_level(logging.WARNING):
            report = _prepare(tiny_pipe, [_decoder(tiny_pipe, rows=(1,))], tmp_path, fake, lock_timeout_s=1.0)
    finally:
        held.release()
    assert report.ok, report.fallbacks
    assert "timings were not stored (CacheLockTimeout" in caplog.text
    assert not (tmp_path / TIMING_FILE).exists()
    assert not [p for p in tmp_path.glob("vae_decoder-*/onnx/*")]  # the ONNX is gone all the same

    class MergeFails(TensorRTBackend):
        def merge_timing_caches(self, ours: bytes, theirs: bytes) -> bytes:
            raise RuntimeError("the builder could not be made")

    (tmp_path / TIMING_FILE).write_bytes(_timing_cache("11.1.0", "NVIDIA H200", "an older build's"))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        encoder = vae_encoder_spec(tiny_pipe.vae, width=SIZE, height=SIZE, rows=(1,))
        report = _prepare(tiny_pipe, [encoder], tmp_path, fake, MergeFails(fake, streams=FakeStreams(STREAM)))
    assert report.ok, report.fallbacks
    assert "merging into the timing cache" in caplog.text and "the builder could not be made" in caplog.text
    assert any("pixels" in k for k in _timing_keys((tmp_path / TIMING_FILE).read_bytes()))  # ours, alone


def test_binding_is_by_address_on_the_static_buffers(tiny_pipe: Any, tmp_path: Path) -> None:
    fake = make_fake_tensorrt()
    runner = _decoder_runner(tiny_pipe, tmp_path, fake)
    latents = _aligned(2, 4, 8, 8)
    image = _aligned(2, 3, SIZE, SIZE)
    fake.calls.clear()
    runner.bind(2, [latents], [image])
    assert ("set_tensor_address", "latents", latents.data_ptr()) in fake.calls
    assert ("set_tensor_address", "image", image.data_ptr()) in fake.calls
    fake.calls.clear()
    for _ in range(2):
        runner.run(2)  # per frame: one enqueue on torch's stream, nothing else
    assert fake.calls == [("execute_async_v3", STREAM)] * 2
    with torch.no_grad():
        want = tiny_pipe.vae.decode(latents, return_dict=False)[0]
    torch.testing.assert_close(image, want, rtol=1e-4, atol=5e-5)
    with pytest.raises(LoadFailed, match=r"no optimization profile for 3 rows; the engine has \[1, 2\]"):
        runner.bind(3, [_aligned(3, 4, 8, 8)], [_aligned(3, 3, SIZE, SIZE)])
    doubles = aligned_empty((1, 4, 8, 8), dtype=torch.float64, device="cpu")
    with pytest.raises(LoadFailed, match=r"'latents' is torch\.float64, the engine wants torch\.float32"):
        runner.bind(1, [doubles], [_aligned(1, 3, SIZE, SIZE)])


def test_on_the_default_stream_the_engine_runs_on_a_private_stream_joined_back(
    tiny_pipe: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Outside a captured graph torch's current stream is usually the legacy default one (0), on
    which TensorRT adds device synchronisations: each enqueue goes to a private stream that waits
    for torch's first and that torch's waits for after. Any other stream takes it directly."""
    fake = make_fake_tensorrt()
    streams = FakeStreams(DEFAULT_STREAM, calls=fake.calls)
    backend = TensorRTBackend(fake, streams=streams)
    private, fork, join = (
        FakeStreams.PRIVATE,
        ("fork", 0, FakeStreams.PRIVATE),
        ("join", 0, FakeStreams.PRIVATE),
    )
    with caplog.at_level(logging.WARNING):
        report = _prepare(tiny_pipe, [_decoder(tiny_pipe)], tmp_path, fake, backend)
    assert report.ok, report.fallbacks
    assert "Using default stream in enqueueV3()" not in caplog.text
    # Validation bound and ran both profiles: each stream call between its own fork and join.
    calls = fake.calls
    enqueued = [
        i for i, c in enumerate(calls) if c[0] in ("set_optimization_profile_async", "execute_async_v3")
    ]
    assert len(enqueued) == 4
    for i in enqueued:
        assert calls[i][-1] == private and calls[i - 1] == fork and calls[i + 1] == join, calls[i - 1 : i + 2]
    runner = report.ready[Component.VAE_DECODER].runner
    fake.calls.clear()
    runner.run(2)
    assert fake.calls == [fork, ("execute_async_v3", private), join]
    # During a graph capture torch's current stream is the capture stream: enqueued on it, no fork.
    streams.handle = STREAM
    fake.calls.clear()
    runner.run(2)
    assert fake.calls == [("execute_async_v3", STREAM)]
    # The reference the test leans on: the fake warns as TensorRT does when given the default stream.
    streams.handle = DEFAULT_STREAM
    with caplog.at_level(logging.WARNING):
        runner._contexts[2].execute_async_v3(DEFAULT_STREAM)
    assert "Using default stream in enqueueV3() may lead to performance issues" in caplog.text

    def refused(stream: int) -> bool:
        raise RuntimeError("Error in set optimization profile async.")

    fake.calls.clear()
    with pytest.raises(RuntimeError):
        enqueue(streams, refused)
    assert fake.calls == [fork, join]  # torch's stream is joined back even when the call raises


@pytest.mark.parametrize(("handle", "forked"), [(0, True), (1, True), (2, True), (3, False), (STREAM, False)])
def test_every_default_stream_handle_forks_and_a_stream_of_its_own_does_not(
    handle: int, forked: bool
) -> None:
    """CUDA reserves three handles for default streams: 0 (the null stream), 1
    (cudaStreamLegacy, the same one) and 2 (cudaStreamPerThread). Each goes to the private
    stream; any other handle, such as a graph's capture stream, takes the call itself."""
    streams = FakeStreams(handle)
    taken = enqueue(streams, lambda stream: stream)
    if forked:
        assert taken == FakeStreams.PRIVATE
        assert streams.calls == [("fork", handle, FakeStreams.PRIVATE), ("join", handle, FakeStreams.PRIVATE)]
    else:
        assert taken == handle and streams.calls == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none here)")
def test_torch_streams_order_the_private_stream_between_torch_s_work() -> None:
    """TorchStreams on a GPU: work enqueued by handle on the forked stream (as TensorRT's) sees
    what torch wrote before the fork, and torch's work after the join sees its result."""
    device = torch.device("cuda", torch.cuda.current_device())
    streams = TorchStreams(device)
    assert streams.current() == DEFAULT_STREAM  # torch's stream outside any stream context
    x = torch.empty(1 << 24, device=device)
    y = torch.empty_like(x)
    # A GPU-side sleep (about 25 ms) in front of the work on each side makes the race certain:
    # without the fork's wait the private stream reads x before fill_ ran, and without the
    # join's wait the sum reads y before mul ran.
    spin = 50_000_000  # clock cycles
    for k in range(1, 4):
        torch.cuda._sleep(spin)
        x.fill_(float(k))  # on the default stream
        with torch.cuda.stream(torch.cuda.ExternalStream(streams.fork())):
            torch.cuda._sleep(spin)
            torch.mul(x, 2.0, out=y)  # on the private stream, as the engine's enqueue
        streams.join()
        assert float(y.sum()) == 2.0 * k * x.numel()  # read back on the default stream
    side = torch.cuda.Stream(device)
    with torch.cuda.stream(side):  # as while a frame graph is captured
        assert streams.current() == side.cuda_stream != DEFAULT_STREAM


def test_a_buffer_off_a_256_byte_boundary_is_refused_with_the_reason(tiny_pipe: Any, tmp_path: Path) -> None:
    runner = _decoder_runner(tiny_pipe, tmp_path, make_fake_tensorrt())
    storage = _aligned(1 * 4 * 8 * 8 + 16)
    latents = storage[16:].view(1, 4, 8, 8)  # a view 64 bytes into another tensor
    with pytest.raises(
        LoadFailed,
        match=r"input 'latents' starts at 0x[0-9a-f]+, 64 bytes past a 256-byte boundary; "
        r"TensorRT needs 256-byte aligned buffers",
    ):
        runner.bind(1, [latents], [_aligned(1, 3, SIZE, SIZE)])


# ------------------------------------------------------------------ working memory and binding checks
def test_the_contexts_share_one_working_memory_sized_for_the_largest_profile(
    tiny_pipe: Any, tmp_path: Path
) -> None:
    fake = make_fake_tensorrt()
    runner = _decoder_runner(tiny_pipe, tmp_path, fake, rows=(1, 2, 3))  # validation bound all three
    strategies = [c[1] for c in fake.calls if c[0] == "create_execution_context"]
    assert strategies == [fake.ExecutionContextAllocationStrategy.USER_MANAGED] * 3
    assert fake.context_bytes == 0  # TensorRT allocated no working memory of its own
    largest = 4 * 3 * 4 * 8 * 8  # the fake's figure for the 3-row profile
    memory = [c[1:] for c in fake.calls if c[0] == "set_device_memory"]
    assert len(memory) == 3 and len(set(memory)) == 1 and memory[0][1] == largest
    assert memory[0][0] % 256 == 0

    # A profile that needs more later (a weight-streaming budget change): one new block, and
    # every context, bound before or now, runs on it.
    fake.extra_device_memory = 4096
    fake.calls.clear()
    latents, image = _aligned(1, 4, 8, 8), _aligned(1, 3, SIZE, SIZE)
    runner.bind(1, [latents], [image])
    moved = [c[1:] for c in fake.calls if c[0] == "set_device_memory"]
    assert len(moved) == 3 and len(set(moved)) == 1 and moved[0][1] == largest + 4096
    for rows in (1, 2, 3):
        runner.run(rows)  # the fake refuses a context whose memory is smaller than its profile needs


def test_the_default_strategy_would_give_each_context_its_own_memory() -> None:
    # The reference the test above compares with: the fake's STATIC contexts allocate themselves.
    fake = make_fake_tensorrt()
    engine = fake.ICudaEngine(
        {"version": "11.1.0", "onnx": "", "io": [["x", [-1, 4], 0, 1]], "profiles": [{"x": [[1, 4]] * 3}]},
        fake.ILogger(),
    )
    engine.create_execution_context()
    engine.create_execution_context()
    assert fake.context_bytes == 2 * 4 * 4


def test_bound_tensors_must_share_the_working_memory_s_device(tiny_pipe: Any, tmp_path: Path) -> None:
    runner = _decoder_runner(tiny_pipe, tmp_path, make_fake_tensorrt())  # bound on the CPU
    meta = torch.empty(1, 3, SIZE, SIZE, device="meta")
    with pytest.raises(
        LoadFailed, match=r"the bound tensors are on \['cpu', 'meta'\]; an engine runs on one"
    ):
        runner.bind(1, [_aligned(1, 4, 8, 8)], [meta])
    with pytest.raises(LoadFailed, match="the tensors are on meta, the engine's working memory on cpu"):
        runner.bind(1, [torch.empty(1, 4, 8, 8, device="meta")], [meta])


def test_a_context_tensorrt_cannot_create_falls_back_with_its_error(tiny_pipe: Any, tmp_path: Path) -> None:
    fake = make_fake_tensorrt()
    fake.fail_context = "Requested amount of GPU memory (8589934592 bytes) could not be allocated"
    reason = _prepare(tiny_pipe, [_decoder(tiny_pipe)], tmp_path, fake).fallbacks[Component.VAE_DECODER]
    assert "LoadFailed: TensorRT could not create a vae_decoder context: Requested amount" in reason


@pytest.mark.parametrize("lost", ["infer_shapes", "all_binding_shapes_specified"])
def test_a_shape_tensorrt_lacks_after_binding_is_named_at_bind(
    tiny_pipe: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, lost: str
) -> None:
    fake = make_fake_tensorrt()
    runner = _decoder_runner(tiny_pipe, tmp_path, fake)
    if lost == "infer_shapes":
        monkeypatch.setattr(fake.IExecutionContext, "infer_shapes", lambda self: ["latents"])
        want = r"after binding 2 rows TensorRT still lacks the shapes of \['latents'\]"
    else:
        monkeypatch.setattr(fake.IExecutionContext, "all_binding_shapes_specified", False)
        want = r"still lacks the shapes of some inputs \(all_binding_shapes_specified is False\)"
    with pytest.raises(LoadFailed, match=want):
        runner.bind(2, [_aligned(2, 4, 8, 8)], [_aligned(2, 3, SIZE, SIZE)])

    def fails(self: Any) -> list[str]:
        raise RuntimeError("infer_shapes error code: -1")  # pyCore.cpp infer_shapes

    monkeypatch.setattr(fake.IExecutionContext, "infer_shapes", fails)
    with pytest.raises(LoadFailed, match="could not infer the shapes at 1 rows: infer_shapes error code: -1"):
        runner.bind(1, [_aligned(1, 4, 8, 8)], [_aligned(1, 3, SIZE, SIZE)])


# ------------------------------------------------------------------ failures and the negative cache
def test_a_failed_build_falls_back_with_its_reason_and_is_not_retried(
    tiny_pipe: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fake = make_fake_tensorrt()
    fake.fail_build = "Error Code 10: Internal Error (Could not find any implementation for node /Conv_3)"
    with caplog.at_level(logging.WARNING):
        report = _prepare(tiny_pipe, [_decoder(tiny_pipe)], tmp_path, fake)
    reason = report.fallbacks[Component.VAE_DECODER]
    assert not report.ok and Component.VAE_DECODER not in report.ready
    assert (
        "could not build the vae_decoder engine" in reason and "Could not find any implementation" in reason
    )
    assert "running it on the exact torch path" in caplog.text and "/Conv_3" in caplog.text
    failed = list(tmp_path.glob("vae_decoder-*/failed.json"))
    assert len(failed) == 1
    # The exported ONNX is not left behind for a key that is never built again (GBs for a UNet).
    assert not (failed[0].parent / "onnx").exists()

    retry = make_fake_tensorrt()  # would build fine now, but the failure is remembered
    reason2 = _prepare(tiny_pipe, [_decoder(tiny_pipe)], tmp_path, retry).fallbacks[Component.VAE_DECODER]
    assert "an earlier build failed" in reason2 and "Could not find any implementation" in reason2
    assert f"delete {str(failed[0])!r} to try again" in reason2
    assert "build_serialized_network" not in _names(retry)

    failed[0].unlink()
    assert _prepare(tiny_pipe, [_decoder(tiny_pipe)], tmp_path, retry).ok


@pytest.mark.parametrize(
    "message", ["Error Code 2: OutOfMemory (no further information)", "CUDA out of memory"]
)
def test_a_temporary_failure_is_retried_a_few_starts_then_remembered(
    tiny_pipe: Any, tmp_path: Path, message: str
) -> None:
    """Out of memory is worth a retry (another program may have held the GPU): each start builds
    again, TRANSIENT_ATTEMPTS in a row; then the key is remembered like any failure. doctor's
    list says which kind each one is."""
    from bridge.engine.accel.engine_cache import TRANSIENT_ATTEMPTS

    builds = []
    for attempt in range(1, TRANSIENT_ATTEMPTS + 1):
        fake = make_fake_tensorrt()
        fake.fail_build = message
        reason = _prepare(tiny_pipe, [_decoder(tiny_pipe)], tmp_path, fake).fallbacks[Component.VAE_DECODER]
        assert message in reason and "an earlier build failed" not in reason
        builds.append(_names(fake).count("build_serialized_network"))
        ((_folder, noted, retried),) = EngineCache(tmp_path).recorded_failures()
        assert retried is (attempt < TRANSIENT_ATTEMPTS)
        if attempt < TRANSIENT_ATTEMPTS:
            assert f"retried at the next start, attempt {attempt} of {TRANSIENT_ATTEMPTS}" in noted
    assert builds == [1] * TRANSIENT_ATTEMPTS
    assert f"{TRANSIENT_ATTEMPTS} attempts in a row; not retried again" in noted
    fine = make_fake_tensorrt()
    reason = _prepare(tiny_pipe, [_decoder(tiny_pipe)], tmp_path, fine).fallbacks[Component.VAE_DECODER]
    assert "an earlier build failed" in reason and "build_serialized_network" not in _names(fine)


def test_a_build_that_succeeds_after_a_temporary_failure_forgets_it(tiny_pipe: Any, tmp_path: Path) -> None:
    fake = make_fake_tensorrt()
    fake.fail_build = "Error Code 2: OutOfMemory"
    assert not _prepare(tiny_pipe, [_decoder(tiny_pipe)], tmp_path, fake).ok
    assert list(tmp_path.glob("vae_decoder-*/failed.json"))
    assert _prepare(tiny_pipe, [_decoder(tiny_pipe)], tmp_path, make_fake_tensorrt()).ok
    assert not list(tmp_path.glob("vae_decoder-*/failed.json"))
    assert EngineCache(tmp_path).recorded_failures() == []


def test_one_failing_component_leaves_the_others_ready(tiny_pipe: Any, tmp_path: Path) -> None:
    fake = make_fake_tensorrt()
    enc = vae_encoder_spec(tiny_pipe.vae, width=SIZE, height=SIZE, rows=(1,))
    report = _prepare(tiny_pipe, [enc, _decoder(tiny_pipe)], tmp_path, fake)
    assert report.ok and set(report.ready) == {Component.VAE_ENCODER, Component.VAE_DECODER}
    fake.fail_build = "Error Code 2: OutOfMemory"  # the encoder is a hit; the decoder (new rows) builds
    report = _prepare(tiny_pipe, [enc, _decoder(tiny_pipe, rows=(2,))], tmp_path, fake)
    assert set(report.ready) == {Component.VAE_ENCODER} and set(report.fallbacks) == {Component.VAE_DECODER}


def test_wrong_or_nan_output_or_an_unloadable_plan_falls_back(tiny_pipe: Any, tmp_path: Path) -> None:
    fake = make_fake_tensorrt()
    fake.corrupt_output = "negate"  # an engine that computes garbage
    reason = _prepare(tiny_pipe, [_decoder(tiny_pipe)], tmp_path, fake).fallbacks[Component.VAE_DECODER]
    assert "differs from torch at 1 rows: cosine -1.00000 < 0.999" in reason
    fake.corrupt_output = "nan"
    reason = _prepare(tiny_pipe, [_decoder(tiny_pipe, rows=(2,))], tmp_path, fake).fallbacks[
        Component.VAE_DECODER
    ]
    assert "vae_decoder engine gave NaN or Inf at 2 rows" in reason

    spec = _decoder(tiny_pipe, rows=(3,))
    plan = _prepare(tiny_pipe, [spec], tmp_path, make_fake_tensorrt()).ready[Component.VAE_DECODER].plan_path
    plan.write_bytes(b"\x00garbage")  # a truncated or foreign plan on disk
    reason = _prepare(tiny_pipe, [spec], tmp_path, make_fake_tensorrt()).fallbacks[Component.VAE_DECODER]
    assert "TensorRT could not load the vae_decoder engine: IRuntime::deserializeCudaEngine" in reason


def test_an_unparsable_onnx_falls_back_with_the_parser_error(
    tiny_pipe: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def truncated_export(pipe: Any, spec: Any, path: Path, **kwargs: Any) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"\x08\x07truncated")
        return path

    monkeypatch.setattr(prepare_module, "export_onnx", truncated_export)
    fake = make_fake_tensorrt()
    reason = _prepare(tiny_pipe, [_decoder(tiny_pipe)], tmp_path, fake).fallbacks[Component.VAE_DECODER]
    assert "BuildFailed: TensorRT could not parse" in reason
    assert "(parseFromFile): MODEL_DESERIALIZE_FAILED: Failed to parse ONNX model" in reason
    assert "build_serialized_network" not in _names(fake)


def test_missing_tensorrt_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # as if not installed
    with pytest.raises(ImportError, match=r'pip install "streamdiffusion-bridge\[tensorrt\]".*compile'):
        import_tensorrt()
    fake = make_fake_tensorrt()
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    assert TensorRTBackend().version == "11.1.0"
    monkeypatch.setitem(sys.modules, "tensorrt", make_fake_tensorrt(version="10.0.1"))
    with pytest.raises(ImportError, match=r"needs NVIDIA TensorRT 10\.1 to 11\.x, found TensorRT 10\.0\.1"):
        import_tensorrt()
    monkeypatch.setitem(sys.modules, "tensorrt", make_fake_tensorrt(version="10.1.0"))
    assert import_tensorrt().__version__ == "10.1.0"


# ------------------------------------------------------------------ progress and cancellation
def test_progress_is_reported_per_phase_as_a_bar(
    tiny_pipe: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake = make_fake_tensorrt()
    backend = TensorRTBackend(fake, streams=FakeStreams(STREAM))
    report = prepare_engines(
        tiny_pipe, [_decoder(tiny_pipe)], model="tiny", cache_root=tmp_path, backend=backend, device=GPU
    )
    assert report.ok
    err = capsys.readouterr().err
    assert "tensorrt vae_decoder: Building engine" in err and "tensorrt vae_decoder: Timing layers" in err


def test_a_stop_request_cancels_the_build_and_records_nothing(tiny_pipe: Any, tmp_path: Path) -> None:
    fake = make_fake_tensorrt()
    cancel = threading.Event()
    cancel.set()  # SIGINT arrived: the runtime's stop Event
    with pytest.raises(BuildCancelled, match="vae_decoder engine build was stopped"):
        _prepare(tiny_pipe, [_decoder(tiny_pipe)], tmp_path, fake, cancel=cancel)
    steps = [c for c in fake.calls if c[0] == "build_serialized_network"]
    assert len(steps) == 1 and fake.timing_hits == []  # the build ended at its first step
    assert not list(tmp_path.glob("*/failed.json")) and not list(tmp_path.glob("*/engine.plan"))
    assert not list(tmp_path.glob("*/onnx"))  # the export is not left behind either
    assert _prepare(tiny_pipe, [_decoder(tiny_pipe)], tmp_path, make_fake_tensorrt()).ok  # next start builds


def test_the_monitor_is_called_from_the_builder_s_thread_not_the_caller_s(
    tiny_pipe: Any, tmp_path: Path
) -> None:
    class Recording(BuildProgress):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.threads: set[int] = set()

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            self.threads.add(threading.get_ident())
            super().phase_start(phase_name, parent_phase, num_steps)

    spec = _decoder(tiny_pipe)
    onnx_path = export_onnx(tiny_pipe, spec, tmp_path / "onnx" / "model.onnx", opset=17)
    backend = TensorRTBackend(make_fake_tensorrt(), streams=FakeStreams(STREAM))
    progress = Recording("tensorrt vae_decoder", bars=False)
    plan, _ = backend.build(onnx_path, spec, settings=BuilderSettings(), timing_cache=b"", progress=progress)
    assert plan and progress.threads and threading.get_ident() not in progress.threads
    assert progress.phases[0] == ("Building engine", 2) and not progress.cancelled

    progress = Recording("tensorrt vae_decoder", cancel=threading.Event(), bars=False)
    progress.cancel.set()  # set on the caller's thread, seen on the builder's
    with pytest.raises(BuildCancelled):
        backend.build(onnx_path, spec, settings=BuilderSettings(), timing_cache=b"", progress=progress)


def test_the_fake_is_as_strict_as_tensorrt_where_it_could_be_kinder(
    capsys: pytest.CaptureFixture[str],
) -> None:
    fake = make_fake_tensorrt()
    # pyCore.cpp opt_profile_set_shape: a RuntimeError naming the selector.
    profile = fake.IOptimizationProfile()
    with pytest.raises(RuntimeError, match=r"Shape provided for max is inconsistent with other shapes\."):
        profile.set_shape("x", (1, 4), (2, 4), (1, 4))
    # NvInferRuntime.h setInputShape: a static input needs no profile, only matching dimensions.
    plan = {
        "version": "11.1.0",
        "onnx": "",
        "io": [["ids", [1, 6], 0, 1], ["x", [-1, 4], 0, 1], ["y", [-1, 4], 0, 2]],
        "profiles": [{"x": [[1, 4], [2, 4], [2, 4]]}],
    }
    context = fake.ICudaEngine(plan, fake.ILogger()).create_execution_context()
    assert context.set_input_shape("ids", (1, 6)) and not context.set_input_shape("ids", (2, 6))
    assert context.infer_shapes() == ["x"] and not context.all_binding_shapes_specified
    assert context.set_input_shape("x", (2, 4)) and not context.set_input_shape("x", (3, 4))
    assert context.infer_shapes() == [] and context.all_binding_shapes_specified
    # NvInferRuntime.h setTensorAddress: at least 256-byte alignment, else False.
    assert context.set_tensor_address("x", 0x1000) and not context.set_tensor_address("x", 0x1040)
    # A USER_MANAGED context runs only on memory it was given, aligned and large enough.
    user = fake.ICudaEngine(plan, fake.ILogger()).create_execution_context(
        fake.ExecutionContextAllocationStrategy.USER_MANAGED
    )
    for name, address in (("ids", 0x1000), ("x", 0x2000), ("y", 0x3000)):
        assert user.set_tensor_address(name, address)
    assert user.set_input_shape("x", (2, 4))
    assert not user.execute_async_v3(0)  # no memory
    user.set_device_memory(0x4000, 4 * 2 * 4 - 1)
    assert not user.execute_async_v3(0)  # one byte short of the profile's
    user.set_device_memory(0x4040, 4 * 2 * 4)
    assert not user.execute_async_v3(0) and user.device_memory == (0x4000, 4 * 2 * 4 - 1)  # misaligned
    # pyCore.cpp PyLogger, PyProgressMonitor: what an override raises is printed, never raised.

    class Broken(fake.ILogger):  # type: ignore[misc, name-defined]
        def log(self, severity: Any, msg: str) -> None:
            raise ValueError("a logging handler broke")

    class Interrupted(fake.IProgressMonitor):  # type: ignore[misc, name-defined]
        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            raise ValueError("no terminal")

        def step_complete(self, phase_name: str, step: int) -> bool:
            raise KeyboardInterrupt

        def phase_finish(self, phase_name: str) -> None:
            raise ValueError("no bar")

    network = fake.NetworkDefinition(0)
    network.onnx_path, network.num_layers = "model.onnx", 1
    config = fake.Builder(Broken()).create_builder_config()
    config.progress_monitor = Interrupted()
    config.profiles.append(fake.IOptimizationProfile())
    assert fake.Builder(Broken()).build_serialized_network(network, config) is None  # cancelled
    err = capsys.readouterr().err
    assert "[ERROR] Exception caught in phase_start(): ValueError: no terminal" in err
    assert "[ERROR] Exception caught in step_complete(): KeyboardInterrupt" in err
    assert "[ERROR] Exception caught in phase_finish(): ValueError: no bar" in err
    assert "[ERROR] Exception caught in log(): ValueError: a logging handler broke" in err


def test_keyboard_interrupt_inside_a_callback_cancels() -> None:
    fake = make_fake_tensorrt()
    progress = BuildProgress("tensorrt unet", bars=False)
    monitor = _progress_monitor(fake, progress)
    monitor.phase_start("Building engine", None, 3)
    assert monitor.step_complete("Building engine", 0) is True

    def interrupted(phase: str, step: int) -> bool:
        raise KeyboardInterrupt

    progress.step_complete = interrupted  # type: ignore[method-assign]
    assert monitor.step_complete("Building engine", 1) is False
    assert progress.cancel.is_set() and progress.cancelled
    assert progress.phases == [("Building engine", 3)]


def test_a_broken_progress_display_neither_cancels_nor_fails_the_build(
    tiny_pipe: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bar that cannot draw (the terminal went away) is not a failed build of many minutes."""

    def no_terminal(self: Any, *args: Any) -> Any:
        raise OSError("[Errno 5] Input/output error")

    monkeypatch.setattr(BuildProgress, "step_complete", no_terminal)
    monkeypatch.setattr(BuildProgress, "phase_start", no_terminal)
    fake = make_fake_tensorrt()
    with caplog.at_level(logging.WARNING):
        report = _prepare(tiny_pipe, [_decoder(tiny_pipe)], tmp_path, fake)
    assert report.ok, report.fallbacks
    assert "the build's progress display failed (OSError: [Errno 5] Input/output error)" in caplog.text
    assert EngineCache(tmp_path).recorded_failures() == []


# ------------------------------------------------------------------ end to end on the CPU
def test_onnxruntime_backend_runs_the_whole_path(tiny_sdxl_pipe: Any, tmp_path: Path) -> None:
    pipe = tiny_sdxl_pipe
    specs = [
        unet_spec(pipe.unet, width=SIZE, height=SIZE, rows=(2, 3)),
        vae_encoder_spec(pipe.vae, width=SIZE, height=SIZE, rows=(1,)),
        _decoder(pipe, rows=(1,)),
    ]
    backend = OnnxRuntimeBackend()
    report = prepare_engines(
        pipe, specs, model="tiny-sdxl", cache_root=tmp_path, backend=backend, device=GPU, bars=False
    )
    assert report.ok, report.fallbacks
    unet = report.ready[Component.UNET].runner
    gen = torch.Generator().manual_seed(3)
    sample, emb = torch.randn(3, 4, 8, 8, generator=gen), torch.randn(3, 77, 64, generator=gen)
    t = torch.tensor([999.0, 500.0, 250.0])
    pooled = torch.randn(3, 32, generator=gen)
    ids = torch.tensor([[SIZE, SIZE, 0, 0, SIZE, SIZE]], dtype=torch.float32).expand(3, 6).contiguous()
    eps = torch.empty(3, 4, 8, 8)
    unet.bind(3, [sample, t, emb, pooled, ids], [eps])
    for k in range(2):  # the static buffers are rewritten in place between runs
        sample.copy_(torch.randn(3, 4, 8, 8, generator=gen))
        unet.run(3)
        with torch.no_grad():
            want = pipe.unet(
                sample,
                t.long(),
                encoder_hidden_states=emb,
                added_cond_kwargs={"text_embeds": pooled, "time_ids": ids},
                return_dict=False,
            )[0]
        torch.testing.assert_close(eps, want, rtol=1e-4, atol=5e-5, msg=f"run {k}")
    with pytest.raises(LoadFailed, match=r"no optimization profile for 4 rows; the engine has \[2, 3\]"):
        unet.bind(4, [torch.zeros(4, 4, 8, 8)], [torch.zeros(4, 4, 8, 8)])
    again = prepare_engines(pipe, specs, model="tiny-sdxl", cache_root=tmp_path, backend=backend, device=GPU)
    assert again.ok and not any(p.built for p in again.ready.values())
