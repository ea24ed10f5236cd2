"""One NDI loopback, run in its own process by tests/test_ndi.py (NDI reads its config once per
process). Sends numbered frames from the bridge's NDI sink to its NDI source on this machine
and prints what arrived as JSON.

    python -m tests.ndi_loopback NAME [--address HOST]
    python -m tests.ndi_loopback FEED --expect OUTPUT     # feed a running bridge, read its output
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bridge.config import SinkConfig, SourceConfig
from bridge.frames import Frame
from bridge.transports.registry import open_sink, open_source, prepare_media

BLOCK, BITS = 8, 6  # the frame number, in binary: six 8x8 black or white blocks survive compression


def numbered(seq: int, width: int, height: int) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    rgba = np.empty((height, width, 4), np.uint8)
    rgba[..., 0] = (x * 4) % 256
    rgba[..., 1] = (y * 4) % 256
    rgba[..., 2] = 128
    rgba[..., 3] = 255
    for bit in range(BITS):  # seq <= 63
        rgba[:BLOCK, bit * BLOCK : (bit + 1) * BLOCK, :3] = 255 if seq >> bit & 1 else 0
    return rgba


def decode(pixels: np.ndarray) -> int:
    blocks = [
        pixels[2 : BLOCK - 2, bit * BLOCK + 2 : (bit + 1) * BLOCK - 2, :3].mean() for bit in range(BITS)
    ]
    return sum(1 << bit for bit, level in enumerate(blocks) if level > 128)


def send_and_receive(
    sink: Any, source: Any, seqs: range, size: tuple[int, int], wait_s: float = 2.0
) -> list[dict[str, Any]]:
    """Send each numbered frame and wait for it to come back (up to `wait_s`, generous: a loaded
    machine delays it, and a fixed window would count it as lost) before sending the next."""
    got = []
    for seq in seqs:
        sink.write(Frame(numbered(seq, *size), seq))
        deadline = time.perf_counter() + wait_s
        while time.perf_counter() < deadline:
            frame = source.read(0.005)
            if frame is None:
                continue
            n = decode(frame.pixels)
            if n != seq:
                continue  # a late copy of the warm-up frame, or of one given up on
            expected = numbered(n, frame.pixels.shape[1], frame.pixels.shape[0])
            error = np.abs(frame.pixels[..., :3].astype(int) - expected[..., :3].astype(int))
            got.append(
                {
                    "seq": n,
                    "size": [frame.pixels.shape[1], frame.pixels.shape[0]],
                    "mean_error": float(error.mean()),
                    "max_error": int(error.max()),
                    "frame_rate": str(source.frame_rate),
                }
            )
            break
    return got


def wait_for_frame(sink: Any, source: Any, size: tuple[int, int], timeout_s: float) -> float:
    start = time.perf_counter()
    seq = 0
    while time.perf_counter() - start < timeout_s:
        seq += 1
        sink.write(Frame(numbered(0, *size), seq))  # block 0: not counted as a numbered frame
        if source.read(0.05) is not None:
            return time.perf_counter() - start
    return -1.0


def feed_and_watch(feed: str, output: str, timeout_s: float) -> dict[str, Any]:
    """Send the NDI source `feed` to a bridge and receive its NDI output `output` until five
    frames came back (or `timeout_s`)."""
    sink = open_sink(SinkConfig(kind="ndi", name=feed, fps=15.0))
    source = open_source(SourceConfig(kind="ndi", name=output), width=64, height=64)
    got: list[dict[str, Any]] = []
    start = time.perf_counter()
    seq = 0
    while len(got) < 5 and time.perf_counter() - start < timeout_s:
        seq += 1
        sink.write(Frame(numbered(seq % 64, 96, 72), seq))
        frame = source.read(0.06)
        if frame is not None:
            got.append({"size": [frame.width, frame.height], "frame_rate": str(source.frame_rate)})
    sink.close()
    source.close()
    return {"frames": got, "after_s": round(time.perf_counter() - start, 2)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("name")
    parser.add_argument("--address", default="")
    parser.add_argument("--expect", default="", help="the bridge's NDI output to read back")
    parser.add_argument("--timeout", type=float, default=90.0)
    args = parser.parse_args()
    if args.expect:
        json.dump(feed_and_watch(args.name, args.expect, args.timeout), sys.stdout)
        return
    source_cfg = SourceConfig(kind="ndi", name=args.name, address=args.address)
    sink_cfg = SinkConfig(kind="ndi", name=args.name, fps=25.0)
    prepare_media(source_cfg, [sink_cfg])  # as the runtime does, before any NDI object exists
    source = open_source(source_cfg, width=64, height=64)
    sink = open_sink(sink_cfg)
    report: dict[str, Any] = {"waiting_before": source.read(0.01) is None and source.waiting}  # type: ignore[attr-defined]
    report["first_frame_s"] = wait_for_frame(sink, source, (64, 48), 10.0)
    report["frames"] = send_and_receive(sink, source, range(1, 31), (64, 48))
    report["frames"] += send_and_receive(sink, source, range(1, 61), (96, 64))  # resized
    sink.close()  # the sender vanishes
    time.sleep(0.5)
    report["after_close"] = [source.read(0.05) is None for _ in range(5)]
    report["waiting_after_close"] = source.waiting  # type: ignore[attr-defined]
    sink = open_sink(sink_cfg)  # and comes back
    report["back_after_s"] = wait_for_frame(sink, source, (64, 48), 15.0)
    report["frames_back"] = send_and_receive(sink, source, range(1, 11), (64, 48))
    sink.close()
    source.close()
    config_dir = os.environ.get("NDI_CONFIG_DIR", "")
    report["config"] = (
        json.loads((Path(config_dir) / "ndi-config.v1.json").read_text()) if config_dir else None
    )
    json.dump(report, sys.stdout)


if __name__ == "__main__":
    main()
