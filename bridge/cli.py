"""`sdbridge`: the command line. The only module that prints, configures logging or exits."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

DEFAULT_CACHE = Path.home() / ".cache" / "sdbridge"


def _bench(args: argparse.Namespace) -> int:
    from bridge.bench import BenchConfig, format_table, run_bench

    config = BenchConfig(
        device=args.device,
        arch=args.arch,
        size=args.size,
        steps=tuple(args.steps),
        cfg_types=tuple(args.cfg),
        repeats=args.repeats,
        warmup=args.warmup,
        cache_dir=args.cache_dir,
    )

    def progress(message: str) -> None:
        print(f"[bench] {message}", file=sys.stderr, flush=True)

    report = run_bench(config, progress)
    print(json.dumps(report, indent=2) if args.json else format_table(report))
    return 0


def _demo(args: argparse.Namespace) -> int:
    """Run the engine on the synthetic pattern, change the prompt and seed midway, print the
    frame rate and save a contact sheet of input and output frames."""
    import numpy as np
    from PIL import Image

    from bridge.engine import StreamEngine
    from bridge.engine.loading import LoadOptions, load_pipeline
    from bridge.transports.synthetic import test_pattern

    device = (
        "cuda" if args.device == "auto" and _cuda() else ("cpu" if args.device == "auto" else args.device)
    )
    print(f"loading model {args.model!r} on {device} ...", flush=True)
    pipe = load_pipeline(args.model, LoadOptions(cache_dir=args.cache_dir, device=device))
    size = args.size
    engine = StreamEngine(pipe, args.t_index, width=size, height=size, cfg_type=args.cfg)
    engine.prepare(args.prompt, seed=args.seed)
    changes = {args.frames // 3: ("prompt", args.prompt2), 2 * args.frames // 3: ("seed", args.seed + 1)}
    sheet: list[np.ndarray] = []
    start = time.perf_counter()
    for seq in range(args.frames):
        if seq in changes:
            what, value = changes[seq]
            engine.set_prompt(str(value)) if what == "prompt" else engine.set_seed(int(value))
            print(f"frame {seq}: {what} -> {value!r}", flush=True)
        frame = test_pattern(seq, size, size)
        out = engine(frame, output_type="uint8")
        if seq % max(1, args.frames // 6) == 0:
            sheet.append(np.concatenate([frame[..., :3], out[..., :3]], axis=0))
    elapsed = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "demo.png"
    Image.fromarray(np.concatenate(sheet, axis=1)).save(path)
    print(
        f"{args.frames} frames in {elapsed:.2f} s: {args.frames / elapsed:.1f} fps "
        f"({1000 * elapsed / args.frames:.1f} ms/frame, {size}px, {len(args.t_index)} step(s), cfg {args.cfg})"
    )
    print(f"contact sheet (input above, output below): {path}")
    return 0


def _cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sdbridge", description="StreamDiffusion Bridge: real-time diffusion for live performance."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True)

    bench = sub.add_parser("bench", help="measure the engine against diffusers and the bare forward floor")
    bench.add_argument("--json", action="store_true", help="print one JSON document instead of a table")
    bench.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    bench.add_argument(
        "--arch",
        default="tiny",
        choices=["tiny", "sd-turbo", "sdxl-turbo"],
        help="tiny (embedded) or a full-size random-weight architecture (use with --device cuda)",
    )
    bench.add_argument(
        "--size",
        type=int,
        default=0,
        help="frame size in pixels (default: 128 for tiny, 512 for the full-size architectures)",
    )
    bench.add_argument(
        "--steps", type=int, nargs="+", default=[1, 2, 4], help="denoising step counts (default 1 2 4)"
    )
    bench.add_argument(
        "--cfg", nargs="+", default=["none", "self"], choices=["none", "full", "self", "initialize"]
    )
    bench.add_argument(
        "--repeats", type=int, default=31, help="timed repeats per contender (median reported)"
    )
    bench.add_argument("--warmup", type=int, default=3, help="untimed warm-up calls per contender")
    bench.add_argument(
        "--cache-dir", type=Path, default=DEFAULT_CACHE, help=f"model cache (default {DEFAULT_CACHE})"
    )
    bench.set_defaults(func=_bench)

    demo = sub.add_parser("demo", help="run the engine on the synthetic pattern and save a contact sheet")
    demo.add_argument(
        "--model", default="tiny", help="embedded name, local folder, .safetensors file or hub id"
    )
    demo.add_argument("--device", default="auto", help="auto, cpu or cuda")
    demo.add_argument("--size", type=int, default=256)
    demo.add_argument("--t-index", type=int, nargs="+", default=[32, 45])
    demo.add_argument("--cfg", default="self", choices=["none", "full", "self", "initialize"])
    demo.add_argument("--prompt", default="a photo of a cat")
    demo.add_argument("--prompt2", default="neon city at night")
    demo.add_argument("--seed", type=int, default=2)
    demo.add_argument("--frames", type=int, default=60)
    demo.add_argument("--out", type=Path, default=Path("out"))
    demo.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    demo.set_defaults(func=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `sdbridge`; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130
    except (ValueError, RuntimeError) as exc:
        # ModelLoadError is a RuntimeError: its message already says what to do.
        print(f"sdbridge {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
