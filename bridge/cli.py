"""`sdbridge`: the command line. The only module that prints, configures logging or exits."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bridge.acceleration import COMPILE_MODES, DEFAULT_COMPILE_MODE, Acceleration
from bridge.config import DEFAULT_CACHE_DIR

# The step counts `sdbridge bench` has a t_index_list preset for: bridge.bench.config's
# T_INDEX_PRESETS, which imports torch (test_bench_cli keeps the two equal).
BENCH_STEPS = (1, 2, 3, 4)

DEFAULT_CACHE = Path(DEFAULT_CACHE_DIR).expanduser()


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
        live=not args.no_live,
        live_sizes=tuple(args.live_sizes),
        accelerations=tuple(args.acceleration),
        compile_modes=tuple(args.compile_mode),
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


def _doctor(args: argparse.Namespace) -> int:
    from bridge.config import load_config
    from bridge.doctor import format_report, gather

    config = load_config(args.config, args.set)
    label = str(args.config) if args.config else "the built-in defaults"
    if args.set:
        label += " with " + " ".join(args.set)
    report = gather(config, label)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0 if report["config"]["can_run"] else 1


def _midi_learn(args: argparse.Namespace) -> int:
    from bridge.config import add_midi_mapping
    from bridge.control.midi import learn, listen, mapping_yaml

    print(f"move the fader, knob or pad for {args.param!r} (listening {args.timeout:g} s)...", flush=True)
    mapping = learn(listen(args.port, args.timeout), args.param, timeout_hint=f" within {args.timeout:g} s")
    print(f"  - {mapping_yaml(mapping)}")
    if args.config:
        print(add_midi_mapping(args.config, mapping))
    return 0


def _run(args: argparse.Namespace) -> int:
    import signal
    import threading

    from bridge.config import load_config
    from bridge.runtime import Bridge

    config = load_config(args.config, args.set)
    problems = _start_problems(config)
    if problems:
        print("sdbridge run: cannot start:", *(f"  - {p}" for p in problems), sep="\n", file=sys.stderr)
        return 2
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    print(
        f"sdbridge: loading model {config.engine.model!r} at {config.engine.width}x{config.engine.height}, "
        f"input {config.input.kind}. Ctrl+C stops.",
        flush=True,
    )
    bridge = Bridge(config)

    def announce() -> None:
        # The banner lists what this process really serves, once it serves it.
        while not bridge.ready.wait(0.2):
            if stop.is_set():
                return
        print(f"sdbridge: running. {served(bridge)}", flush=True)

    threading.Thread(target=announce, name="banner", daemon=True).start()
    bridge.run(stop)
    print(f"sdbridge: stopped after {bridge.status().frames} frames", flush=True)
    return 0


def _acceleration_value(text: str) -> str:
    """An `--acceleration` value, checked and spelled as the engine spells it."""
    try:
        return str(Acceleration.parse(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _start_problems(config: Any) -> list[str]:
    """What stops `config` from starting that can be found before the model loads: the input
    and outputs checked without opening them, and the ports it listens on."""
    from bridge.config import acceleration_problem
    from bridge.ports import port_problems
    from bridge.transports.registry import precheck_sink, precheck_source

    problems = [precheck_source(config.input)]
    if Acceleration.parse(config.engine.acceleration).cuda_graph:
        import torch

        problems.append(acceleration_problem(config.engine, cuda=torch.cuda.is_available()))
    for i, sink in enumerate(config.outputs):
        problems.append(precheck_sink(sink, "output" if i == 0 else f"extra_outputs.{i - 1}"))
    return [p for p in problems if p] + port_problems(config)


def served(bridge: Any) -> str:
    """What a started bridge serves, from its open parts (not from its config): each output
    that is open (the preview by the address it bound), outputs still retrying, OSC and
    OSCQuery."""
    outputs, retrying = [], []
    for runner in bridge.sinks:
        sink = runner.sink if runner.state == "open" else None
        if sink is None:
            retrying.append(runner.label)
        elif isinstance(getattr(sink, "url", None), str):
            outputs.append(f"preview {sink.url}")
        else:
            name = getattr(sink, "name", "")
            outputs.append(f"{runner.label} {name}" if isinstance(name, str) and name else runner.label)
    parts = [f"Outputs: {', '.join(outputs) or 'none'}"]
    if retrying:
        parts.append(f"not open yet (retrying): {', '.join(retrying)}")
    controls = getattr(bridge, "controls", bridge)  # where the runtime keeps its OSC servers
    osc, oscquery = getattr(controls, "osc", None), getattr(controls, "oscquery", None)
    if osc is not None:
        host, port = osc.address[:2]
        status = ", ".join(bridge.config.osc.status_targets)
        parts.append(f"OSC {host}:{port}" + (f" (status to {status})" if status else ""))
    if oscquery is not None:
        parts.append(f"OSCQuery http://{bridge.config.osc.host}:{bridge.config.osc.oscquery_port}/")
    return "; ".join(parts) + "."


def format_value(value: Any) -> str:
    """An OSC reply value as a person typed it: a float that is a float32 (OSC's `f`) in its
    shortest form that reads back as the same float32 (1.2, not 1.2000000476837158)."""
    if isinstance(value, float):
        import numpy as np

        single = np.float32(value)
        if float(single) == value or value != value:
            return np.format_float_positional(single, unique=True, trim="0")
        return repr(value)
    return str(value)


def _send(args: argparse.Namespace) -> int:
    import socket

    from bridge.control.osc import encode
    from bridge.control.wire import decode_reply, param_for_address, typed_args

    datagrams = [encode(args.address, typed_args(args.address, args.args))]
    found = param_for_address(args.address)
    if found is not None and found[0].live and args.wait > 0:
        # A set has no reply of its own: ask for the value back, which also shows that a
        # bridge is listening (and what it made of the value: clamped, mapped from /norm).
        datagrams.append(encode("/sd/get", [found[0].name]))
    replies = 0
    failed = False
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for datagram in datagrams:
            sock.sendto(datagram, (args.host, args.port))
        if args.wait <= 0:
            return 0
        sock.settimeout(args.wait)
        while True:
            try:
                data, _ = sock.recvfrom(65536)
            except TimeoutError:
                break
            except ConnectionRefusedError:  # Linux: ICMP port unreachable, nobody listens there
                break
            address, values = decode_reply(data)
            print(address, *(format_value(v) for v in values), flush=True)
            replies += 1
            failed |= address == "/sd/error"
    if not replies:
        print(
            f"sdbridge send: error: no bridge answered at {args.host}:{args.port} within {args.wait:g} s. "
            "Is it running (`make run` or `sdbridge run`)? If it listens elsewhere, give --host/--port "
            "as its osc.host/osc.port; a slow machine may need a longer --wait",
            file=sys.stderr,
        )
        return 1
    return 1 if failed else 0


def _params(args: argparse.Namespace) -> int:
    from bridge.params import table

    rows = table()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        rng = f"[{row['min']:g}, {row['max']:g}]" if row["min"] is not None else ""
        if row["choices"]:
            rng = "|".join(row["choices"])
        where = row["address"] if row["live"] else "config: engine." + row["name"]
        extra = ("  also " + " ".join(row["aliases"])) if row["aliases"] else ""
        norm = "  + /norm" if row["norm_address"] else ""
        print(f"{where:<22} {row['type']:<9} {rng:<16} default {row['default']!r}{norm}{extra}")
        print(f"{'':<22} {row['doc']}")
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
        "--steps",
        type=int,
        nargs="+",
        default=[1, 2, 4],
        choices=BENCH_STEPS,
        help="denoising step counts, each with a fixed t_index_list preset (default 1 2 4)",
    )
    bench.add_argument(
        "--cfg", nargs="+", default=["none", "self"], choices=["none", "full", "self", "initialize"]
    )
    bench.add_argument(
        "--repeats", type=int, default=31, help="timed repeats per contender (median reported)"
    )
    bench.add_argument("--warmup", type=int, default=3, help="untimed warm-up calls per contender")
    bench.add_argument(
        "--acceleration",
        nargs="+",
        default=["none"],
        type=_acceleration_value,
        help="engine.acceleration values (such as cuda_graph, compile+cuda_graph, "
        "cuda_graph+channels_last+cudnn_benchmark), each an engine contender of its own in the same "
        "loop; none is always measured, as the reference the others' frames are compared with",
    )
    bench.add_argument(
        "--compile-mode",
        nargs="+",
        default=[DEFAULT_COMPILE_MODE],
        choices=COMPILE_MODES,
        help="inductor modes (engine.compile_mode) for the accelerations with compile: each such "
        f"acceleration is measured once per mode, side by side (default {DEFAULT_COMPILE_MODE})",
    )
    bench.add_argument(
        "--no-live", action="store_true", help="skip the live-bridge figures (shm, OSC to applied, overhead)"
    )
    bench.add_argument(
        "--live-sizes",
        type=int,
        nargs="+",
        default=[512, 1024],
        help="frame sizes of the shm and sink figures, in pixels; the overhead runs at the first (default 512 1024)",
    )
    bench.add_argument(
        "--cache-dir", type=Path, default=DEFAULT_CACHE, help=f"model cache (default {DEFAULT_CACHE})"
    )
    bench.set_defaults(func=_bench)

    run = sub.add_parser("run", help="run the live bridge")
    run.add_argument("-c", "--config", type=Path, help="YAML config (default: the built-in defaults)")
    run.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a config value, e.g. --set params.prompt='neon city' --set output.kind=null",
    )
    run.set_defaults(func=_run)

    send = sub.add_parser("send", help="send one OSC message to a running bridge and print its replies")
    send.add_argument("address", help="e.g. /sd/prompt, /sd/guidance/norm, /sd/get")
    send.add_argument("args", nargs="*", help="values; typed from the parameter table")
    send.add_argument("--host", default="127.0.0.1")
    send.add_argument("--port", type=int, default=7000)
    send.add_argument(
        "--wait",
        type=float,
        default=1.0,
        help="seconds to wait for replies (default 1; 0: send and do not wait, nor check)",
    )
    send.set_defaults(func=_send)

    params = sub.add_parser("params", help="print the parameter table")
    params.add_argument("--json", action="store_true", help="as JSON (the source of the TouchDesigner spec)")
    params.set_defaults(func=_params)

    doctor = sub.add_parser(
        "doctor", help="what this machine can do (GPU, TensorRT, each transport) and whether a config can run"
    )
    doctor.add_argument(
        "-c", "--config", type=Path, help="the config to judge (default: the built-in defaults)"
    )
    doctor.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="as for run")
    doctor.add_argument("--json", action="store_true", help="as JSON")
    doctor.set_defaults(func=_doctor)

    midi = sub.add_parser("midi-learn", help="map the next MIDI control you move to a parameter")
    midi.add_argument("param", help="a live numeric or on/off parameter, e.g. guidance, freeze")
    midi.add_argument("-c", "--config", type=Path, help="also write the mapping into this config file")
    midi.add_argument("--port", default="", help="MIDI input port name or part of it (default: the first)")
    midi.add_argument("--timeout", type=float, default=30.0, help="seconds to wait (default 30)")
    midi.set_defaults(func=_midi_learn)

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
    logging.getLogger("bridge").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    from bridge.transports.base import MissingExtra

    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130
    except (MissingExtra, OSError, ValueError, RuntimeError, TimeoutError) as exc:
        # ConfigError, ParamError (ValueError) and ModelLoadError (RuntimeError) carry messages
        # that say what to do; a traceback would only hide them. -v shows it anyway.
        if args.verbose:
            logging.getLogger(__name__).exception("%s failed", args.command)
        print(f"sdbridge {args.command}: error: {exc}", file=sys.stderr)
        return 2


def entry() -> None:
    """The `sdbridge` console script: `main`, then a prompt exit.

    When `main` returns, everything the bridge owned is released (shared memory unlinked, ports
    and cameras closed). The interpreter's own teardown of torch and diffusers takes over a second
    on top, which would break the contract that SIGTERM stops the bridge within 2 s, so the
    process leaves with os._exit once the output is flushed."""
    code = main()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    entry()
