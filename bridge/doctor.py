"""`sdbridge doctor`: what this machine can do, and whether the chosen config can run on it.

It reports the OS and Python; torch, CUDA and the GPU; whether TensorRT is installed; for
every transport whether it is available, or why not and the fix; and the same for the control
surfaces that need a library (MIDI, the OSCQuery mDNS announcement), which never stop a
config. Nothing is opened: no camera is grabbed, no sender started. The config is judged
unable to run when a medium it uses is unavailable, when its input or an output fails the
checks that need no opening (a missing image file, no such camera device, a bad shm name),
when a port it listens on is taken, when it asks for CUDA that torch cannot see, or when an
offline hub model is not cached.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import platform
import re
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from bridge.acceleration import Acceleration
from bridge.config import BridgeConfig, acceleration_problem
from bridge.ports import listeners, port_problem
from bridge.transports.registry import (
    SINK_KINDS,
    SOURCE_KINDS,
    availability,
    describe,
    precheck_sink,
    precheck_source,
)


def _torch() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"version": torch.__version__, "cuda": torch.cuda.is_available()}
    if info["cuda"]:
        props = torch.cuda.get_device_properties(0)
        info.update(
            cuda_version=torch.version.cuda,
            gpu=props.name,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            gpu_count=torch.cuda.device_count(),
        )
    else:
        built = torch.version.cuda
        info["note"] = (
            f"this torch is built for CUDA {built} but sees no GPU (driver missing or no NVIDIA card)"
            if built
            else "this torch is a CPU-only build; for a GPU install the CUDA build from pytorch.org"
        )
    return info


def _tensorrt() -> dict[str, Any]:
    try:
        trt = importlib.import_module("tensorrt")
    except ImportError:
        return {
            "installed": False,
            "note": 'not installed; optional (pip install "streamdiffusion-bridge[tensorrt]", '
            "Windows and Linux with an NVIDIA GPU)",
        }
    except Exception as exc:  # a broken TensorRT install raises anything from its loader
        return {"installed": False, "note": f"present but fails to import: {type(exc).__name__}: {exc}"}
    info: dict[str, Any] = {"installed": True, "version": str(getattr(trt, "__version__", "unknown"))}
    try:
        cuda = tensorrt_cuda_major(d.metadata["Name"] or "" for d in importlib.metadata.distributions())
    except ValueError as exc:
        info["conflict"] = f"{exc}; uninstall the ones that do not match torch's CUDA"
        return info
    if cuda is not None:
        info["cuda_major"] = cuda
    return info


def tensorrt_cuda_major(distributions: Iterable[str]) -> int | None:
    """The CUDA major version the installed TensorRT wheels are built for, from their names
    (tensorrt-cu12, tensorrt_cu13_libs, ...); None when no such wheel is among them."""
    majors = set()
    for name in distributions:
        found = re.fullmatch(r"tensorrt[-_]cu(\d+)(?:[-_](?:libs|bindings))?", name.lower())
        if found:
            majors.add(int(found.group(1)))
    if len(majors) > 1:  # wheels for two CUDAs side by side: which one loads is not ours to know
        raise ValueError(
            f"TensorRT wheels for CUDA {' and '.join(map(str, sorted(majors)))} are both installed"
        )
    return majors.pop() if majors else None


def _transports() -> list[dict[str, Any]]:
    rows = []
    for kind in dict.fromkeys(SOURCE_KINDS + SINK_KINDS):
        roles = [r for r, kinds in (("input", SOURCE_KINDS), ("output", SINK_KINDS)) if kind in kinds]
        reason = availability(kind)
        row: dict[str, Any] = {"kind": kind, "roles": roles, "available": not reason}
        if reason:
            row["reason"] = reason
        elif note := describe(kind):
            row["note"] = note
        rows.append(row)
    return rows


def _controls(config: BridgeConfig) -> list[dict[str, Any]]:
    """MIDI and the OSCQuery announcement: conveniences, so never a reason the config cannot run
    (the bridge runs on without them), but worth knowing before the show."""
    from bridge.control.midi import input_names
    from bridge.control.oscquery import NOT_ANNOUNCED

    midi: dict[str, Any] = {"name": "midi", "enabled": config.midi.enabled}
    try:
        ports = input_names()
    except (ImportError, OSError) as exc:  # the missing extra (MissingExtra), or no MIDI subsystem
        midi.update(available=False, reason=str(exc))
    else:
        midi.update(available=True, note=f"input ports: {', '.join(ports)}" if ports else "no input ports")
    query: dict[str, Any] = {"name": "oscquery", "enabled": bool(config.osc.oscquery_port)}
    if importlib.util.find_spec("zeroconf") is None:
        query.update(available=False, reason=f"served over HTTP, but {NOT_ANNOUNCED}")
    else:
        query.update(available=True, note="served over HTTP and announced over mDNS")
    return [midi, query]


def _ports(config: BridgeConfig) -> list[dict[str, Any]]:
    """Each port the config listens on, and whether another process holds it now."""
    rows = []
    for listener in listeners(config):
        problem = port_problem(listener)
        row: dict[str, Any] = {
            "key": listener.key,
            "what": listener.what,
            "address": listener.where,
            "free": not problem,
        }
        if problem:
            row["reason"] = problem
        rows.append(row)
    return rows


def _model_problem(config: BridgeConfig) -> tuple[str, str]:
    """(problem, note) about the model: a problem stops the config, a note does not."""
    e = config.engine
    from bridge.engine.tiny import TINY_VARIANTS

    if e.model in TINY_VARIANTS:
        return "", "embedded, generated locally on first use"
    path = Path(e.model).expanduser()
    if path.exists():
        return "", "a local file"
    if e.model.count("/") != 1:
        return f"engine.model {e.model!r} is not an embedded model, a local path or a hub id", ""
    from huggingface_hub import try_to_load_from_cache

    cached = isinstance(try_to_load_from_cache(e.model, "model_index.json"), str)
    if cached:
        return "", "in the Hugging Face cache"
    if e.offline:
        return f"engine.model {e.model!r} is not in the Hugging Face cache and engine.offline is set", ""
    return "", "not cached yet: the first run downloads it (needs the network)"


def acceleration_notes(
    config: BridgeConfig, torch_info: dict[str, Any], trt_info: dict[str, Any]
) -> list[str]:
    """What the asked acceleration will do here, where it is not plain: engines that will fall
    back to the exact path (TensorRT missing, builds that failed before), so it is never silent."""
    e = config.engine
    notes = []
    if Acceleration.parse(e.acceleration).tensorrt:
        if not trt_info.get("installed"):
            notes.append(
                f"tensorrt: {trt_info.get('note', 'not installed')}; frames will run on the exact torch path"
            )
        elif not torch_info["cuda"]:
            notes.append("tensorrt: torch sees no CUDA device; frames will run on the exact torch path")
        elif "conflict" in trt_info:
            notes.append(f"tensorrt: {trt_info['conflict']}")
        elif "cuda_major" in trt_info and torch_info.get("cuda_version"):
            torch_major = int(str(torch_info["cuda_version"]).split(".")[0])
            if torch_major != trt_info["cuda_major"]:
                notes.append(
                    f"tensorrt: TensorRT is built for CUDA {trt_info['cuda_major']} and torch for CUDA "
                    f"{torch_info['cuda_version']}; they must share one CUDA: "
                    f'pip install "streamdiffusion-bridge[tensorrt-cu{torch_major}]" (engines that fail to '
                    f"build or load run on the exact torch path)"
                )
        from bridge.engine.accel.engine_cache import EngineCache
        from bridge.engine.accel.engine_networks import ENGINE_CACHE

        root = Path(e.cache_dir).expanduser() / ENGINE_CACHE
        cache = EngineCache(root)
        stale = cache.stale_folders()
        if stale:
            size = sum(f.stat().st_size for folder in stale for f in folder.rglob("*") if f.is_file())
            notes.append(
                f"tensorrt: {len(stale)} engine folder(s) under {root} were written by an older version of "
                f"the engine cache and are never read again ({size / 2**20:.0f} MiB); delete them to free "
                f"the space: {', '.join(f.name for f in stale[:3])}{', ...' if len(stale) > 3 else ''}"
            )
        for folder, reason, retried in cache.recorded_failures():
            until = (
                "for now; the next start builds it again" if retried else f"until {root / folder} is deleted"
            )
            notes.append(
                f"tensorrt: an earlier build failed ({folder}: {reason}); that component runs on the exact "
                f"torch path {until}"
            )
    return notes


def check_config(
    config: BridgeConfig,
    torch_info: dict[str, Any],
    transports: list[dict[str, Any]],
    ports: Sequence[dict[str, Any]] = (),
    trt_info: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Whether `config` can run, given what `gather` found: the media it uses, CUDA, the model,
    its input and outputs as far as they can be checked unopened (`precheck_source`,
    `precheck_sink`) and the `ports` rows (`_ports`) it listens on."""
    by_kind = {row["kind"]: row for row in transports}
    problems = []
    sink_keys = ["output" if i == 0 else f"extra_outputs.{i - 1}" for i in range(len(config.outputs))]
    used = [("input", config.input.kind)] + [
        (key, sink.kind) for key, sink in zip(sink_keys, config.outputs, strict=True)
    ]
    for key, kind in used:
        row = by_kind[kind]
        if not row["available"]:
            problems.append(f"{key}.kind={kind}: {row['reason']}")
        elif key == "input" and (problem := precheck_source(config.input)):
            problems.append(problem)
    for key, sink in zip(sink_keys, config.outputs, strict=True):
        if by_kind[sink.kind]["available"] and (problem := precheck_sink(sink, key)):
            problems.append(problem)
    problems += [row["reason"] for row in ports if not row["free"]]
    device = config.engine.device
    if device.startswith("cuda") and not torch_info["cuda"]:
        problems.append(f"engine.device={device}, but torch sees no CUDA device: {torch_info['note']}")
    if problem := acceleration_problem(config.engine, cuda=torch_info["cuda"]):
        problems.append(problem)
    model_problem, model_note = _model_problem(config)
    if model_problem:
        problems.append(model_problem)
    runs_on = device if device != "auto" else ("cuda" if torch_info["cuda"] else "cpu")
    return {
        "acceleration": config.engine.acceleration,
        "acceleration_notes": acceleration_notes(config, torch_info, trt_info or {}),
        "can_run": not problems,
        "problems": problems,
        "input": config.input.kind,
        "outputs": [sink.kind for sink in config.outputs],
        "model": config.engine.model,
        "model_note": model_note,
        "device": runs_on,
    }


def gather(config: BridgeConfig, config_label: str) -> dict[str, Any]:
    torch_info = _torch()
    trt_info = _tensorrt()
    transports = _transports()
    ports = _ports(config)
    return {
        "system": {
            "os": platform.system(),
            "os_release": platform.release(),
            "machine": platform.machine(),
            "python": platform.python_version(),
            "executable": sys.executable,
        },
        "torch": torch_info,
        "tensorrt": trt_info,
        "transports": transports,
        "controls": _controls(config),
        "ports": ports,
        "config": {"source": config_label, **check_config(config, torch_info, transports, ports, trt_info)},
    }


def _state(row: dict[str, Any]) -> str:
    """A transport's or a control's row: "ok (note)" or "unavailable: reason"."""
    state = "ok" if row["available"] else f"unavailable: {row['reason']}"
    return f"{state} ({row['note']})" if row.get("note") else state


def format_report(report: dict[str, Any]) -> str:
    s, t, trt, cfg = report["system"], report["torch"], report["tensorrt"], report["config"]
    lines = [f"system     {s['os']} {s['os_release']} ({s['machine']}), Python {s['python']}"]
    if t["cuda"]:
        gpu = f"CUDA {t['cuda_version']}, {t['gpu']} ({t['gpu_memory_gib']} GiB)"
    else:
        gpu = f"no CUDA: {t['note']}"
    lines.append(f"torch      {t['version']}; {gpu}")
    lines.append(f"tensorrt   {trt['version'] if trt['installed'] else trt['note']}")
    lines.append("transports")
    for row in report["transports"]:
        lines.append(f"  {row['kind']:<11} {'+'.join(row['roles']):<13} {_state(row)}")
    lines.append("controls")
    for row in report["controls"]:
        lines.append(f"  {row['name']:<11} {'in use' if row['enabled'] else 'off':<13} {_state(row)}")
    lines.append("ports")
    for row in report["ports"]:
        state = "free" if row["free"] else "TAKEN by another process"
        lines.append(f"  {row['key']:<22} {row['what']:<9} {row['address']:<22} {state}")
    verdict = "can run" if cfg["can_run"] else "CANNOT run"
    lines.append(
        f"config     {cfg['source']}: {verdict} (input {cfg['input']}, outputs {', '.join(cfg['outputs'])}; "
        f"model {cfg['model']} [{cfg['model_note'] or 'see below'}] on {cfg['device']})"
    )
    lines += [f"  - {problem}" for problem in cfg["problems"]]
    lines.append(f"acceleration {cfg['acceleration']}")
    lines += [f"  - {note}" for note in cfg["acceleration_notes"]]
    return "\n".join(lines)
