"""OSC arguments typed from the parameter table, for one-line clients (`sdbridge send`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pythonosc.osc_message import OscMessage
from pythonosc.osc_packet import OscPacket, ParseError

from bridge.params import BY_NAME, Kind, Param, text_args


def param_for_address(address: str) -> tuple[Param, bool] | None:
    """The parameter an address sets, and whether it is the /norm variant."""
    for param in BY_NAME.values():
        if address == param.address or address in param.aliases:
            return param, False
        if address == f"{param.address}/norm" and param.live:
            return param, True
    return None


def _guess(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def typed_args(address: str, raw: Sequence[str]) -> list[Any]:
    """Command-line words as OSC arguments: typed by the parameter the address sets (a prompt's
    words are joined into one string), guessed (int, float, else string) for other addresses."""
    found = param_for_address(address)
    if found is None:
        if address == "/sd/get":
            return list(raw)
        return [_guess(word) for word in raw]
    param, norm = found
    if norm or param.kind is Kind.FLOAT:
        return [float(word) for word in raw] if all(_is_number(w) for w in raw) else list(raw)
    if param.kind in (Kind.STRING, Kind.CHOICE):
        return [" ".join(raw)]
    if param.kind is Kind.BOOL:
        return [word.lower() in ("1", "true", "on", "yes") for word in raw]
    if param.kind is Kind.BLEND:
        args = text_args(param, " ".join(raw))
        return [a if i % 2 == 0 else float(a) for i, a in enumerate(args)]
    words = text_args(param, " ".join(raw)) if param.kind is Kind.INT_LIST else list(raw)
    return [int(float(w)) if _is_number(w) else w for w in words]


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def decode_reply(data: bytes) -> tuple[str, list[Any]]:
    """(address, args) of the first message in a datagram; ("<malformed>", []) if unparsable."""
    try:
        packet = OscPacket(data)
    except ParseError:
        return "<malformed>", []
    messages = packet.messages
    if not messages:
        return "<empty>", []
    message: OscMessage = messages[0].message
    return message.address, list(message.params)


__all__ = ["decode_reply", "param_for_address", "typed_args"]
