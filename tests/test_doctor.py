"""`sdbridge doctor` on this Linux machine (no GPU, no TensorRT, no pyvirtualcam, cyndilib from
the dev install), run as a user runs it, and its judgement of configs."""

from __future__ import annotations

import json
import platform
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
    done = doctor("--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["system"]["os"] == "Linux"
    assert report["system"]["python"] == platform.python_version()
    assert report["torch"]["version"] == torch.__version__ and report["torch"]["cuda"] is False
    assert (
        report["torch"]["note"]
        == "this torch is a CPU-only build; for a GPU install the CUDA build from pytorch.org"
    )
    assert report["tensorrt"]["installed"] is False
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
    assert available == {"synthetic", "image", "video", "camera", "shm", "ndi", "preview", "null"}
    assert rows["spout"]["reason"] == SPOUT and rows["spout"]["roles"] == ["input", "output"]
    assert rows["syphon"]["reason"] == SYPHON
    assert rows["virtualcam"]["reason"] == VIRTUALCAM and rows["virtualcam"]["roles"] == ["output"]
    assert rows["ndi"]["note"].startswith("NDI runtime ")
    midi, query = report["controls"]  # the dev extra has mido, python-rtmidi and zeroconf
    assert midi["name"] == "midi" and midi["enabled"] is False and midi["available"] is False
    assert midi["reason"].startswith("no MIDI subsystem on this machine (SystemError: ")
    assert query == {
        "name": "oscquery",
        "enabled": False,
        "available": True,
        "note": "served over HTTP and announced over mDNS",
    }
    assert report["config"] == {
        "source": "the built-in defaults",
        "can_run": True,
        "problems": [],
        "input": "synthetic",
        "outputs": ["shm", "preview"],
        "model": "tiny",
        "model_note": "embedded, generated locally on first use",
        "device": "cpu",
    }


@pytest.mark.skipif(sys.platform != "linux", reason="Spout is unavailable on Linux")
def test_doctor_exits_non_zero_only_when_the_config_cannot_run() -> None:
    done = doctor("-c", "configs/default.yaml", "--set", "output.kind=spout")
    assert done.returncode == 1
    assert "configs/default.yaml with output.kind=spout: CANNOT run" in done.stdout
    assert f"  - output.kind=spout: {SPOUT}" in done.stdout
    assert "  ndi         input+output  ok (NDI runtime" in done.stdout
    ok = doctor("-c", "configs/td-shm.yaml")
    assert ok.returncode == 0 and "configs/td-shm.yaml: can run" in ok.stdout
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
