"""`sdbridge doctor` on this machine, run as a user runs it, and its judgement of configs. What
the report must say about each optional medium follows from what this machine really has (the
library importable, a camera device, the v4l2loopback module, a MIDI subsystem), looked up here
independently of the code under test."""

from __future__ import annotations

import importlib.util
import json
import platform
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from bridge.config import load_config
from bridge.doctor import check_config

ROOT = Path(__file__).resolve().parents[1]
SPOUT = (
    "Spout works only on Windows (this machine runs Linux). Use ndi, virtualcam (v4l2loopback) or shm "
    'here; on Windows: pip install "streamdiffusion-bridge[spout]"'
)
SYPHON = SPOUT.replace("Spout", "Syphon").replace("Windows", "macOS").replace("[spout]", "[syphon]")
VIRTUALCAM = (
    "The virtual camera needs the 'pyvirtualcam' module, which is not installed. Install it with: "
    'pip install "streamdiffusion-bridge[virtualcam]". Alternatives here: ndi or shm'
)


def has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


HAS_CV2 = has("cv2")
HAS_CAMERA = any(p.name[5:].isdigit() for p in Path("/dev").glob("video*"))
HAS_NDI = has("cyndilib")
HAS_VIRTUALCAM = has("pyvirtualcam") and Path("/sys/module/v4l2loopback").exists()
HAS_MIDI = has("mido") and has("rtmidi") and Path("/dev/snd/seq").exists()


def free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def free_ports() -> list[str]:
    """--set arguments that move the default config's listeners onto free ports, so the
    verdict does not depend on what else runs on this machine."""
    osc, preview = free_port(socket.SOCK_DGRAM), free_port(socket.SOCK_STREAM)
    return ["--set", f"osc.port={osc}", "--set", f"extra_outputs.0.port={preview}"]


def doctor(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bridge.cli", "doctor", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.skipif(
    sys.platform != "linux" or torch.cuda.is_available(), reason="asserts this CPU Linux machine"
)
def test_doctor_reports_this_linux_machine() -> None:
    sets = free_ports()
    done = doctor("--json", *sets)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["system"]["os"] == "Linux"
    assert report["system"]["python"] == platform.python_version()
    assert report["torch"]["version"] == torch.__version__ and report["torch"]["cuda"] is False
    if torch.version.cuda is None:
        assert (
            report["torch"]["note"]
            == "this torch is a CPU-only build; for a GPU install the CUDA build from pytorch.org"
        )
    assert report["tensorrt"]["installed"] is has("tensorrt")
    rows = {row["kind"]: row for row in report["transports"]}
    order = [
        "synthetic",
        "image",
        "video",
        "camera",
        "shm",
        "spout",
        "syphon",
        "ndi",
        "preview",
        "null",
        "virtualcam",
    ]
    assert list(rows) == order
    available = {kind for kind, row in rows.items() if row["available"]}
    expected = {"synthetic", "image", "shm", "preview", "null"}
    expected |= {"video"} if HAS_CV2 else set()
    expected |= {"camera"} if HAS_CV2 and HAS_CAMERA else set()
    expected |= {"ndi"} if HAS_NDI else set()
    expected |= {"virtualcam"} if HAS_VIRTUALCAM else set()
    assert available == expected
    assert rows["spout"]["reason"] == SPOUT and rows["spout"]["roles"] == ["input", "output"]
    assert rows["syphon"]["reason"] == SYPHON
    assert rows["virtualcam"]["roles"] == ["output"]
    if not has("pyvirtualcam"):
        assert rows["virtualcam"]["reason"] == VIRTUALCAM
    elif not HAS_VIRTUALCAM:
        assert rows["virtualcam"]["reason"].startswith("the v4l2loopback kernel module is not loaded")
    if HAS_CV2 and not HAS_CAMERA:
        assert rows["camera"]["reason"].startswith(
            "no camera device was found (no /dev/video* on this machine): plug a camera in"
        )
    if HAS_NDI:
        assert rows["ndi"]["note"].startswith("NDI runtime ")
    else:
        assert 'pip install "streamdiffusion-bridge[ndi]"' in rows["ndi"]["reason"]
    midi, query = report["controls"]
    assert midi["name"] == "midi" and midi["enabled"] is False and midi["available"] is HAS_MIDI
    if has("mido") and has("rtmidi") and not Path("/dev/snd/seq").exists():
        assert midi["reason"].startswith("no MIDI subsystem on this machine (SystemError: ")
    assert query == {
        "name": "oscquery",
        "enabled": False,
        **(
            {"available": True, "note": "served over HTTP and announced over mDNS"}
            if has("zeroconf")
            else {"available": False, "reason": query.get("reason")}
        ),
    }
    osc_port, preview_port = sets[1].split("=")[1], sets[3].split("=")[1]
    assert report["ports"] == [
        {
            "key": "extra_outputs.0.port",
            "what": "preview",
            "address": f"TCP 127.0.0.1:{preview_port}",
            "free": True,
        },
        {"key": "osc.port", "what": "OSC", "address": f"UDP 127.0.0.1:{osc_port}", "free": True},
    ]
    assert report["config"] == {
        "source": f"the built-in defaults with osc.port={osc_port} extra_outputs.0.port={preview_port}",
        "can_run": True,
        "problems": [],
        "input": "synthetic",
        "outputs": ["shm", "preview"],
        "model": "tiny",
        "model_note": "embedded, generated locally on first use",
        "device": "cpu",
        "acceleration": "none",
        "acceleration_notes": [],
    }


def test_doctor_says_which_ports_are_taken() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as other:
        other.bind(("127.0.0.1", 0))
        port = other.getsockname()[1]
        done = doctor(
            "--set", f"osc.port={port}", "--set", f"extra_outputs.0.port={free_port(socket.SOCK_STREAM)}"
        )
    assert done.returncode == 1
    assert (
        f"  osc.port               OSC       {f'UDP 127.0.0.1:{port}':<22} TAKEN by another process"
        in done.stdout
    )
    assert f"  - osc.port: the OSC port UDP 127.0.0.1:{port} is taken by another process" in done.stdout


def test_doctor_checks_the_input_without_opening_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope.png"
    done = doctor("--set", "input.kind=image", "--set", f"input.path={missing}", *free_ports())
    assert done.returncode == 1
    assert f"  - input.path '{missing}': no such file; give the image file's path" in done.stdout
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    done = doctor("--set", "input.kind=image", "--set", f"input.path={broken}", *free_ports())
    assert done.returncode == 1
    assert f"  - input.path '{broken}' is not an image Pillow can read" in done.stdout
    done = doctor("--set", "output.name=no/slashes", *free_ports())
    assert done.returncode == 1
    assert "  - output.name 'no/slashes' is not a usable shared memory name" in done.stdout


@pytest.mark.skipif(sys.platform != "linux", reason="Spout is unavailable on Linux")
def test_doctor_exits_non_zero_only_when_the_config_cannot_run() -> None:
    done = doctor("-c", "configs/default.yaml", "--set", "output.kind=spout", *free_ports())
    assert done.returncode == 1
    assert "configs/default.yaml with output.kind=spout osc.port=" in done.stdout
    assert ": CANNOT run" in done.stdout
    assert f"  - output.kind=spout: {SPOUT}" in done.stdout
    if HAS_NDI:
        assert "  ndi         input+output  ok (NDI runtime" in done.stdout
    ok = doctor("-c", "configs/td-shm.yaml", *free_ports()[:2])  # td-shm has no preview
    assert (
        ok.returncode == 0 and "configs/td-shm.yaml with osc.port=" in ok.stdout and ": can run" in ok.stdout
    )
    graphs = doctor("-c", "configs/td-shm.yaml", "--set", "engine.acceleration=cuda_graph", *free_ports()[:2])
    assert graphs.returncode == 1 and ": CANNOT run" in graphs.stdout
    assert (
        "  - engine.acceleration=cuda_graph needs an NVIDIA GPU with a CUDA build of torch" in graphs.stdout
    )
    assert "acceleration cuda_graph" in graphs.stdout
    bad = doctor("--set", "output.kind=hdmi")
    assert bad.returncode == 2
    assert "sdbridge doctor: error:" in bad.stderr and "output.kind 'hdmi' is not a known kind" in bad.stderr


def _rows(**unavailable: str) -> list[dict[str, Any]]:
    kinds = ["synthetic", "shm", "preview", "ndi", "spout", "virtualcam"]
    return [
        {
            "kind": k,
            "available": k not in unavailable,
            **({"reason": unavailable[k]} if k in unavailable else {}),
        }
        for k in kinds
    ]


def test_check_config_names_every_problem() -> None:
    cpu = {"cuda": False, "note": "no GPU here"}
    config = load_config(
        None,
        [
            "input.kind=ndi",
            "input.name=STAGE",
            "output.kind=virtualcam",
            "extra_outputs.0.kind=spout",
            "engine.device=cuda",
            "engine.model=someone/uncached-model-xyz",
            "engine.offline=true",
        ],
    )
    verdict = check_config(config, cpu, _rows(ndi="no NDI", spout="not here", virtualcam="no driver"))
    assert verdict["can_run"] is False
    assert verdict["problems"] == [
        "input.kind=ndi: no NDI",
        "output.kind=virtualcam: no driver",
        "extra_outputs.0.kind=spout: not here",
        "engine.device=cuda, but torch sees no CUDA device: no GPU here",
        "engine.model 'someone/uncached-model-xyz' is not in the Hugging Face cache and engine.offline is set",
    ]
    online = load_config(None, ["engine.model=someone/uncached-model-xyz"])
    verdict = check_config(online, {"cuda": True}, _rows())
    assert verdict["can_run"] is True and verdict["device"] == "cuda"
    assert verdict["model_note"] == "not cached yet: the first run downloads it (needs the network)"
