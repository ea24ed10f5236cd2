"""NDI for real: the bridge's NDI sink sends to its NDI source on this machine (cyndilib carries
the NDI runtime). This machine has no mDNS, so discovery is pointed at 127.0.0.1 in two ways:
the user's own NDI config (NDI_CONFIG_DIR, DESIGN.md's recipe) with the source found by name,
and `input.address` alone, which writes that config itself. Each runs in its own process,
because NDI reads its config once per process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("cyndilib", reason="the ndi extra is part of the dev install (make test)")

ROOT = Path(__file__).resolve().parents[1]


def ndi_env(tmp_path: Path, *, user_config: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "NDI_CONFIG_DIR"}
    env["HOME"] = str(tmp_path)  # no ~/.ndi config of the machine's user leaks in
    if user_config:
        folder = tmp_path / "ndi"
        folder.mkdir(exist_ok=True)
        (folder / "ndi-config.v1.json").write_text(
            json.dumps({"ndi": {"networks": {"ips": "127.0.0.1", "discovery": ""}}})
        )
        env["NDI_CONFIG_DIR"] = str(folder)
    return env


def loopback(tmp_path: Path, *, address: str = "", user_config: bool = False) -> dict[str, Any]:
    env = ndi_env(tmp_path, user_config=user_config)
    name = f"sdbridge-test-{uuid.uuid4().hex[:6]}"
    args = [sys.executable, "-m", "tests.ndi_loopback", name, *(["--address", address] if address else [])]
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    report: dict[str, Any] = json.loads(done.stdout)
    report["name"] = name
    return report


def check_frames(frames: list[dict[str, Any]], sizes: list[tuple[int, int]], least: list[int]) -> None:
    runs: dict[tuple[int, int], list[int]] = {}
    for frame in frames:
        size = (frame["size"][0], frame["size"][1])
        assert size in sizes, f"a frame of {size} arrived; only {sizes} were sent"
        runs.setdefault(size, []).append(frame["seq"])
        # NDI compresses: close, not equal
        assert frame["mean_error"] <= 4.0 and frame["max_error"] <= 40, frame
        assert frame["frame_rate"] == "25"  # the sink's fps travels with every frame
    assert list(runs) == sizes  # the sizes arrive in the order they were sent
    for size, minimum in zip(sizes, least, strict=True):
        seqs = runs[size]
        assert seqs == sorted(set(seqs)), f"out of order or repeated at {size}: {seqs}"
        assert len(seqs) >= minimum, f"only {len(seqs)} frames of {size} arrived: {seqs}"


def check_report(report: dict[str, Any]) -> None:
    # Before the sender starts, the source is not among those seen (another program on this
    # machine may be sending NDI of its own: a second test run, say).
    waiting = f"waiting for the NDI source {report['name']!r} (seen: "
    assert report["waiting_before"].startswith(waiting)
    assert report["name"] not in report["waiting_before"][len(waiting) :]
    assert report["first_frame_s"] > 0
    # each frame is awaited before the next is sent (tests/ndi_loopback.py), so nearly all
    # arrive however loaded the machine; 90% leaves room for NDI dropping one around a resize
    check_frames(report["frames"], [(64, 48), (96, 64)], [27, 54])
    assert all(report["after_close"])  # the sender vanished: nothing new, the bridge holds
    assert report["waiting_after_close"].endswith(f"({report['name']})' went away; waiting for it")
    assert report["back_after_s"] > 0  # it came back and frames flow again
    check_frames(report["frames_back"], [(64, 48)], [9])


def test_ndi_loopback_by_name_with_the_users_discovery_config(tmp_path: Path) -> None:
    report = loopback(tmp_path, user_config=True)
    check_report(report)
    assert report["config"] == {"ndi": {"networks": {"ips": "127.0.0.1", "discovery": ""}}}


def test_ndi_loopback_by_address_without_any_config(tmp_path: Path) -> None:
    report = loopback(tmp_path, address="127.0.0.1:5961")  # the port is NDI's business: dropped
    check_report(report)
    assert report["config"] == {"ndi": {"networks": {"ips": "127.0.0.1"}}}  # written by the bridge


def test_a_running_bridge_takes_ndi_in_by_address_and_sends_ndi_out(
    tmp_path: Path, model_cache: Path
) -> None:
    """`sdbridge run` with input.kind=ndi (found by address alone) and output.kind=ndi; a second
    process feeds the input and reads the output back."""
    feed, out = f"feed-{uuid.uuid4().hex[:6]}", f"out-{uuid.uuid4().hex[:6]}"
    overrides = [
        f"engine.cache_dir={model_cache}",
        "engine.width=64",
        "engine.height=64",
        "engine.device=cpu",
        "input.kind=ndi",
        f"input.name={feed}",
        "input.address=127.0.0.1",
        "output.kind=ndi",
        f"output.name={out}",
        "extra_outputs=[]",
        "osc.enabled=false",
        "runtime.fps=15",
    ]
    args = [sys.executable, "-m", "bridge.cli", "run"] + [a for item in overrides for a in ("--set", item)]
    bridge = subprocess.Popen(
        args,
        cwd=ROOT,
        env=ndi_env(tmp_path / "bridge", user_config=False),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        helper_home = tmp_path / "helper"
        helper_home.mkdir()
        done = subprocess.run(
            [sys.executable, "-m", "tests.ndi_loopback", feed, "--expect", out],
            cwd=ROOT,
            env=ndi_env(helper_home, user_config=True),
            capture_output=True,
            text=True,
            timeout=150,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        report = json.loads(done.stdout)
        assert len(report["frames"]) == 5, report
        # the 96x72 feed was fitted to the engine's 64x64; the output carries runtime.fps
        assert all(f == {"size": [64, 64], "frame_rate": "15"} for f in report["frames"]), report
    finally:
        bridge.terminate()
        try:
            log, _ = bridge.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            bridge.kill()
            log, _ = bridge.communicate()
    assert bridge.returncode == 0, log[-3000:]
