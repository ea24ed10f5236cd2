"""The ports a config listens on, and whether each is free: checked before the model loads
(`sdbridge run`) and reported by `sdbridge doctor`. Binding for real happens later, in the
servers themselves; this only tries each address once and lets it go."""

from __future__ import annotations

import errno
import socket
from dataclasses import dataclass

from bridge.config import BridgeConfig


@dataclass(frozen=True)
class Listener:
    """One port the config asks to listen on."""

    key: str  # the config key that sets the port, e.g. "extra_outputs.0.port"
    what: str  # "preview", "OSC", "OSCQuery"
    host: str
    port: int
    udp: bool

    @property
    def where(self) -> str:
        return f"{'UDP' if self.udp else 'TCP'} {self.host}:{self.port}"


def listeners(config: BridgeConfig) -> list[Listener]:
    """Every port `config` listens on (port 0, "any free port", is left out)."""
    found = []
    for i, sink in enumerate(config.outputs):
        if sink.kind == "preview" and sink.port:
            key = "output.port" if i == 0 else f"extra_outputs.{i - 1}.port"
            found.append(Listener(key, "preview", sink.host, sink.port, udp=False))
    osc = config.osc
    if osc.enabled:
        found.append(Listener("osc.port", "OSC", osc.host, osc.port, udp=True))
        if osc.oscquery_port:
            found.append(Listener("osc.oscquery_port", "OSCQuery", osc.host, osc.oscquery_port, udp=False))
    return found


def port_problem(listener: Listener) -> str:
    """ "" when `listener`'s address can be bound now; otherwise what is wrong and the fix. The
    probe binds as the real server does (TCP with SO_REUSEADDR, as http.server does; UDP
    without, as the OSC server does) and closes at once."""
    kind = socket.SOCK_DGRAM if listener.udp else socket.SOCK_STREAM
    with socket.socket(socket.AF_INET, kind) as probe:
        if not listener.udp:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((listener.host, listener.port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return (
                    f"{listener.key}: the {listener.what} port {listener.where} is taken by another "
                    f"process (another bridge?). Stop it, or pick another port with "
                    f"--set {listener.key}={_other(listener.port)}"
                )
            if exc.errno == errno.EADDRNOTAVAIL or isinstance(exc, socket.gaierror):
                return (
                    f"{listener.key}: the {listener.what} address {listener.host!r} is not an address "
                    "of this machine; use 127.0.0.1 (this machine only) or 0.0.0.0 (every network)"
                )
            return f"{listener.key}: cannot listen on {listener.where} for {listener.what}: {exc.strerror or exc}"
    return ""


def _other(port: int) -> int:
    return port + 100 if port + 100 < 65536 else port - 100


def port_problems(config: BridgeConfig) -> list[str]:
    """What is wrong with each port `config` listens on, in config order ([] when all are free).
    Two listeners of this config on one port count as a clash too."""
    problems = []
    seen: dict[tuple[bool, int], Listener] = {}
    for listener in listeners(config):
        earlier = seen.get((listener.udp, listener.port))
        if earlier is not None and (
            earlier.host == listener.host or "0.0.0.0" in (earlier.host, listener.host)
        ):
            problems.append(
                f"{listener.key}: {listener.where} is also {earlier.key} ({earlier.what}); "
                f"give one of them another port (--set {listener.key}={_other(listener.port)})"
            )
            continue
        seen[(listener.udp, listener.port)] = listener
        problem = port_problem(listener)
        if problem:
            problems.append(problem)
    return problems
