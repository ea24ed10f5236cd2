"""`sdbridge bench` without `--json`: the report as a table."""

from __future__ import annotations

from typing import Any

from bridge.bench.rows import contender_name

_COLUMNS = (
    ("steps", "steps"),
    ("cfg_type", "cfg"),
    ("acceleration", "acceleration"),
    ("compile_mode", "compile_mode"),
    ("engine_ms", "engine_ms"),
    ("engine_device_ms", "device_ms"),
    ("engine_fps", "fps"),
    ("frames_in_flight", "in_flight"),
    ("latency_ms", "latency_ms"),
    ("diffusers_ms", "diffusers_ms"),
    ("speedup_vs_diffusers", "vs_diffusers"),
    ("stream_batch_speedup", "vs_sequential"),
    ("floor_ms", "floor_ms"),
    ("overhead_ratio", "engine/floor"),
    ("warmup_s", "warmup_s"),
    ("agreement", "vs_none"),
    ("skip_rate_static", "skip_static"),
    ("filter_ms", "filter_ms"),
    ("skipped_frame_ms", "skipped_ms"),
)


def _agreement(row: dict[str, Any]) -> str:
    if not row["available"] or row["identical_to_none"] is None:
        return "-"
    if row["identical_to_none"]:
        return "identical"
    if row["psnr_db_vs_none"] is not None:
        return f"{row['psnr_db_vs_none']} dB"
    return "DIFFERENT"  # an exact acceleration whose frames are not the eager ones


def _engine_lines(report: dict[str, Any]) -> list[str]:
    table = [[title for _key, title in _COLUMNS]]
    for row in report["engine"]:
        values = [_agreement(row) if key == "agreement" else row[key] for key, _title in _COLUMNS]
        table.append(["-" if value is None else str(value) for value in values])
    widths = [max(len(cells[i]) for cells in table) for i in range(len(_COLUMNS))]
    lines = [
        "  ".join(cell.rjust(width) for cell, width in zip(cells, widths, strict=True)) for cells in table
    ]
    notes: dict[str, None] = {}  # each reason once, in order
    for row in report["engine"]:
        name = contender_name(row["acceleration"], row["compile_mode"])
        where = f"{row['steps']} step(s) {row['cfg_type']}, {name}"
        if not row["available"]:
            notes[f"{name}: not available ({row['reason']})"] = None
        elif row["fallback"]:
            notes[f"{where}: {row['fallback']}"] = None
    lines += list(notes)
    return lines


def _live_lines(live: dict[str, Any]) -> list[str]:
    lines = []
    for row in live["shm"]:
        lines.append(
            f"shm round trip {row['size'][0]}px: {row['shm_round_trip_ms']} ms vs numpy copy "
            f"{row['numpy_copy_ms']} ms ({row['ratio_vs_copy']}x)"
        )
    for row in live["sinks"]:
        if not row["available"]:
            lines.append(f"sink {row['kind']}: not measured here ({row['reason']})")
            continue
        lines.append(
            f"sink {row['kind']} write {row['size'][0]}px: {row['write_ms']} ms vs numpy copy "
            f"{row['numpy_copy_ms']} ms ({row['ratio_vs_copy']}x)"
        )
    osc = live["osc"]
    lines.append(
        f"OSC to applied {osc['size'][0]}px: {osc['osc_to_applied_ms']} ms (frame {osc['frame_ms']} ms), "
        f"at most {osc['frames_in_between_max']} frame(s) in between"
    )
    ov = live["overhead"]
    lines.append(
        f"bridge overhead {ov['size'][0]}px: latency {ov['latency_ms']} ms - engine {ov['engine_ms']} ms "
        f"= {ov['overhead_ms']} ms"
    )
    return lines


def format_table(report: dict[str, Any]) -> str:
    """A human-readable table of `run_bench`'s report: one line per (steps, cfg, acceleration)."""
    head = (
        f"{report['arch']} on {report['device']} ({report['device_name']}), {report['resolution'][0]}px, "
        f"{report['dtype']}, uint8 in and out; accelerations {' '.join(report['accelerations'])} "
        f"(compile modes {' '.join(report['compile_modes'])}); latency = frames in flight x ms"
    )
    lines = [head, *_engine_lines(report)]
    lines.append(
        "filter_ms: the similarity filter's work on a frame that passes (stage, normalise, score, "
        "decision, reference copy); skipped_ms: a frame it skips, end to end (a still input)"
    )
    if report["device_ms_taken"]:
        lines.append("device_ms: CUDA events around each engine call, beside its wall-clock engine_ms")
    else:
        lines.append(f"device_ms: {report['device_timing']}")
    targets = report["targets"]
    steps_min = ", ".join(f"{v}x at {k} steps" for k, v in targets["speedup_vs_diffusers_min"].items())
    lines.append(
        f"targets: engine/floor <= {targets['overhead_ratio_max']} (exact path); vs_diffusers >= {steps_min}"
    )
    if report.get("live"):
        lines += _live_lines(report["live"])
    return "\n".join(lines)
