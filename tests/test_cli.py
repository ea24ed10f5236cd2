"""The command line as a person meets it: `sdbridge send` against a real OSC server over UDP
(and against nothing), replies printed as typed, `--set` mistakes blamed on the `--set`, and a
bridge that refuses to start on a taken port or a missing input before it loads a model."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bridge.cli import format_value
from bridge.control.osc import OscControl, OscServer
from bridge.params import LIVE, ParamStore
from bridge.transports.registry import camera_devices

ROOT = Path(__file__).resolve().parents[1]


def sdbridge(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bridge.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def free_port(kind: int = socket.SOCK_DGRAM) -> int:
    with socket.socket(socket.AF_INET, kind) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def osc_bridge() -> Iterator[tuple[int, ParamStore]]:
    """The bridge's real OSC server and control on a free port, over a parameter store whose
    submissions are committed at once (the runtime commits them at the next frame)."""
    store = ParamStore({name: p.default for name, p in LIVE.items()})

    def apply() -> None:
        for name, item in store.take_pending().items():
            store.commit(name, item.value)

    server = OscServer("127.0.0.1", 0)
    control = OscControl(store, send=server.send, error_targets=[], on_submit=apply)
    server.start(control)
    try:
        yield server.address[1], store
    finally:
        server.close()


def test_replies_print_what_a_person_typed(osc_bridge: tuple[int, ParamStore]) -> None:
    port, store = osc_bridge
    done = sdbridge("send", "--port", str(port), "/sd/guidance", "1.2")
    assert (done.returncode, done.stdout, done.stderr) == (0, "/sd/guidance 1.2\n", "")
    assert store.get("guidance") == pytest.approx(1.2)
    # The README's example: 0.3 of guidance's 0..10 range.
    done = sdbridge("send", "--port", str(port), "/sd/guidance/norm", "0.3")
    assert (done.returncode, done.stdout) == (0, "/sd/guidance 3.0\n")
    done = sdbridge("send", "--port", str(port), "/sd/get", "guidance", "seed", "prompt")
    assert done.returncode == 0
    assert done.stdout.splitlines() == [
        "/sd/guidance 3.0",
        "/sd/seed 2",
        f"/sd/prompt {LIVE['prompt'].default}",
    ]
    done = sdbridge("send", "--port", str(port), "/sd/get", "guidence")
    assert done.returncode == 1
    assert done.stdout == "/sd/error /sd/get no parameter 'guidence'; did you mean 'guidance'?\n"


@pytest.mark.parametrize("message", [["/sd/get", "guidance"], ["/sd/guidance", "2"]], ids=["get", "set"])
def test_send_with_no_bridge_says_so(message: list[str]) -> None:
    # Nothing on the port (Linux answers with ICMP port unreachable), then a socket that holds
    # the port and never answers (a hung process, or a firewall that drops).
    port = free_port()
    done = sdbridge("send", "--port", str(port), "--wait", "0.5", *message)
    assert done.returncode == 1 and done.stdout == ""
    assert f"no bridge answered at 127.0.0.1:{port} within 0.5 s" in done.stderr
    assert "Is it running (`make run` or `sdbridge run`)?" in done.stderr
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        port = silent.getsockname()[1]
        start = time.perf_counter()
        done = sdbridge("send", "--port", str(port), "--wait", "0.5", *message)
        assert time.perf_counter() - start >= 0.5
        assert silent.recv(1024)  # it was sent
    assert done.returncode == 1
    assert f"no bridge answered at 127.0.0.1:{port} within 0.5 s" in done.stderr


def test_send_without_waiting_does_not_check() -> None:
    done = sdbridge("send", "--port", str(free_port()), "--wait", "0", "/sd/guidance", "2")
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (1.2000000476837158, "1.2"),  # float32(1.2) as python-osc decodes it
        (3.0, "3.0"),
        (0.30000001192092896, "0.3"),
        (0.1, "0.1"),  # a double that is no float32: its own repr
        (2147483647, "2147483647"),
        ("neon city", "neon city"),
        (True, "True"),
    ],
)
def test_format_value(value: object, text: str) -> None:
    assert format_value(value) == text


def test_a_set_typo_is_blamed_on_the_set() -> None:
    done = sdbridge("run", "-c", "configs/default.yaml", "--set", "params.guidence=2")
    assert done.returncode == 2
    assert done.stderr.startswith(
        "sdbridge run: error: --set params.guidence=2: unknown key 'params.guidence'; "
        "did you mean 'params.guidance'?"
    )
    assert "configs/default.yaml" not in done.stderr


def _run_quick(*overrides: str) -> subprocess.CompletedProcess[str]:
    """`sdbridge run` on ports of its own; these runs must stop before any model loads."""
    base = [
        "output.kind=null",
        f"osc.port={free_port()}",
        f"extra_outputs.0.port={free_port(socket.SOCK_STREAM)}",
    ]
    args = [x for item in (*base, *overrides) for x in ("--set", item)]
    start = time.perf_counter()
    done = sdbridge("run", *args, "--set", "engine.model=/nonexistent/model")
    assert time.perf_counter() - start < 30.0
    assert "loading model" not in done.stdout  # refused before the load
    return done


def test_a_taken_preview_port_stops_the_start() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        done = _run_quick(f"extra_outputs.0.port={port}")
    assert done.returncode == 2
    assert (
        f"extra_outputs.0.port: the preview port TCP 127.0.0.1:{port} is taken by another process "
        f"(another bridge?). Stop it, or pick another port with --set extra_outputs.0.port={port + 100}"
    ) in done.stderr


def test_a_taken_osc_port_stops_the_start() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as other:
        other.bind(("127.0.0.1", 0))
        port = other.getsockname()[1]
        done = _run_quick(f"osc.port={port}", f"osc.oscquery_port={port}")
    assert done.returncode == 2
    assert f"osc.port: the OSC port UDP 127.0.0.1:{port} is taken by another process" in done.stderr
    assert "osc.oscquery_port" not in done.stderr  # TCP: the same number is free there


def test_a_missing_image_stops_the_start() -> None:
    done = _run_quick("input.kind=image", "input.path=/nonexistent/show.png")
    assert done.returncode == 2
    assert "input.path '/nonexistent/show.png': no such file; give the image file's path" in done.stderr


@pytest.mark.skipif(sys.platform != "linux", reason="only Linux can tell without opening the camera")
def test_a_missing_camera_stops_the_start() -> None:
    done = _run_quick("input.kind=camera", "input.device=63")
    assert done.returncode == 2
    if camera_devices():
        assert "input.device 63: there is no /dev/video63; the cameras here are" in done.stderr
    else:
        assert "input.kind=camera: no camera device was found (no /dev/video* on this machine)" in done.stderr


def test_the_banner_lists_what_the_bridge_serves(tiny_pipe: object, model_cache: Path) -> None:
    """A real `sdbridge run` on the tiny model (from this session's cache): the banner names the
    preview and OSC addresses it bound, and a local load prints none of the known notices."""
    osc, preview = free_port(), free_port(socket.SOCK_STREAM)
    sets = [
        f"engine.cache_dir={model_cache}",
        "engine.width=64",
        "engine.height=64",
        "output.kind=null",
        f"osc.port={osc}",
        f"extra_outputs.0.port={preview}",
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "bridge.cli", "run", *(x for s in sets for x in ("--set", s))],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")))  # type: ignore[union-attr]
    reader.start()
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not any(
            line.startswith("sdbridge: running.") for line in lines
        ):
            assert proc.poll() is None, proc.stderr.read()  # type: ignore[union-attr]
            time.sleep(0.1)
    finally:
        proc.send_signal(2)
        _, err = proc.communicate(timeout=30)
        reader.join(5)
    running = next(line for line in lines if line.startswith("sdbridge: running."))
    assert running.strip() == (
        f"sdbridge: running. Outputs: null, preview http://127.0.0.1:{preview}/; "
        f"OSC 127.0.0.1:{osc} (status to 127.0.0.1:7001)."
    )
    assert proc.returncode == 0
    for noise in (
        "requires torchvision",
        "will be ignored",
        "Expected types for vae",
        "torch_dtype",
        "it/s]",
    ):
        assert noise not in err, err


def test_cuda_graph_without_cuda_stops_the_start_before_the_model_loads() -> None:
    done = _run_quick("engine.acceleration=cuda_graph")
    assert done.returncode == 2
    assert (
        "engine.acceleration=cuda_graph needs an NVIDIA GPU with a CUDA build of torch, and torch sees no "
        "CUDA device here; use acceleration none or compile on this machine"
    ) in done.stderr
