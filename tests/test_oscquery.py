"""OSCQuery: an HTTP client reads the advertised tree of a running bridge and finds every live
parameter with its type, range and current value; HOST_INFO, single attributes, unknown paths."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from typing import Any

import pytest

from bridge.control.oscquery import (
    OscQueryServer,
    announced_addresses,
    build_tree,
    find,
    numbered_name,
    responder_interfaces,
)
from bridge.params import LIVE, Kind, ParamStore
from bridge.runtime import in_background
from tests.conftest import tiny_bridge


def get(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            body = reply.read()
            return reply.status, json.loads(body) if body else None
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_running_bridge_describes_every_parameter(tiny_pipe: Any) -> None:
    osc_port, query_port = free_port(socket.SOCK_DGRAM), free_port(socket.SOCK_STREAM)
    overrides = [
        f"osc.port={osc_port}",
        f"osc.oscquery_port={query_port}",
        "osc.oscquery_advertise=false",  # mDNS has its own test below
        "osc.status_targets=[]",
    ]
    bridge = tiny_bridge(tiny_pipe, [*overrides, "params.guidance=2.5"])
    with in_background(bridge, start_timeout_s=120):
        base = f"http://127.0.0.1:{query_port}"
        code, tree = get(base + "/")
        assert code == 200 and tree["FULL_PATH"] == "/"
        for param in LIVE.values():
            node = find(tree, param.address)
            assert node is not None, param.address
            assert node["FULL_PATH"] == param.address and node["ACCESS"] == 3
            assert node["DESCRIPTION"] == param.doc
            if param.numeric:
                assert node["RANGE"] == [{"MIN": param.minimum, "MAX": param.maximum}]
                assert node["TYPE"] == ("f" if param.kind is Kind.FLOAT else "i")
                assert node["CONTENTS"]["norm"]["RANGE"] == [{"MIN": 0.0, "MAX": 1.0}]
        assert find(tree, "/sd/guidance")["VALUE"] == [2.5]  # the current value, from the config
        assert find(tree, "/sd/prompt")["TYPE"] == "s"
        assert find(tree, "/sd/freeze")["TYPE"] == "F" and find(tree, "/sd/freeze")["VALUE"] == [False]
        assert find(tree, "/sd/t_index_list")["TYPE"] == "ii"
        assert find(tree, "/sd/status/state") == {
            "FULL_PATH": "/sd/status/state", "ACCESS": 1, "TYPE": "s", "VALUE": ["running"]
        }  # fmt: skip
        # a change over OSC shows up in the tree once applied
        bridge.store.submit("guidance", 4.0)
        for _ in range(200):
            if get(base + "/sd/guidance?VALUE")[1] == {"VALUE": [4.0]}:
                break
            time.sleep(0.02)
        assert get(base + "/sd/guidance?VALUE") == (200, {"VALUE": [4.0]})
        assert get(base + "/sd/guidance/norm?VALUE") == (200, {"VALUE": [0.4]})
        code, info = get(base + "/?HOST_INFO")
        assert code == 200 and info["OSC_PORT"] == osc_port and info["OSC_TRANSPORT"] == "UDP"
        assert info["EXTENSIONS"]["RANGE"] is True
        assert get(base + "/sd/nothing") == (404, {"error": "no OSC node at /sd/nothing"})
        assert get(base + "/sd/prompt?RANGE") == (204, None)


def test_the_tree_covers_config_only_parameters_not_at_all() -> None:
    tree = build_tree(ParamStore({}).snapshot(), {})
    assert find(tree, "/sd/model") is None and find(tree, "/sd/width") is None


def test_a_busy_port_names_the_setting() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(
            OSError, match=r"OSCQuery cannot listen on http://127\.0\.0\.1:\d+/: .*set osc\.oscquery_port"
        ):
            OscQueryServer(
                host="127.0.0.1", port=port, osc_port=7000, values=dict, status=dict, advertise=False
            )


def test_two_bridges_of_one_name_in_one_process_get_two_names() -> None:
    """Deterministic: the process's one responder knows which names it holds, so the second
    bridge of a name is "NAME (2)" whatever the network does, and both services are registered
    with their own ports on the bound address."""
    pytest.importorskip("zeroconf")  # in the dev extra, so CI runs it
    name = f"sdbridge-test-{uuid.uuid4().hex[:8]}"
    servers = [
        OscQueryServer(host="127.0.0.1", port=0, osc_port=osc, values=dict, status=dict, name=name)
        for osc in (7100, 7101)
    ]
    try:
        assert [server.announced_name for server in servers] == [name, f"{name} (2)"]
        responder = servers[0]._responder
        assert responder is not None and responder is servers[1]._responder
        for server in servers:
            for kind, port in (("_oscjson._tcp.local.", server.port), ("_osc._udp.local.", server.osc_port)):
                info = responder.zc.registry.async_get_info_name(f"{server.announced_name}.{kind}")
                assert info is not None and info.port == port and info.parsed_addresses() == ["127.0.0.1"]
        servers[0].close()
        again = OscQueryServer(host="127.0.0.1", port=0, osc_port=7102, values=dict, status=dict, name=name)
        servers[0] = again
        assert again.announced_name == name  # a closed bridge's name is free again
    finally:
        for server in servers:
            server.close()


def test_numbered_names() -> None:
    assert numbered_name("a", set()) == "a"
    assert numbered_name("a", {"a", "a (2)"}) == "a (3)"
    assert responder_interfaces("127.0.0.1", ["127.0.0.1"]) == ["127.0.0.1"]
    assert responder_interfaces("0.0.0.0", ["10.0.0.5"]) is None


ANNOUNCE_ONE = """
import sys, time
from bridge.control.oscquery import OscQueryServer
server = OscQueryServer(host="127.0.0.1", port=0, osc_port=7100, values=dict, status=dict, name=sys.argv[1])
print(server.announced_name, server.port, flush=True)
sys.stdin.read()
server.close()
"""


@pytest.mark.skipif(
    os.environ.get("SDBRIDGE_NETWORK_TESTS") != "1",
    reason="real mDNS across processes depends on the machine looping multicast back; "
    "set SDBRIDGE_NETWORK_TESTS=1 to run it (it is not part of CI)",
)
def test_two_bridges_of_one_name_in_two_processes_are_both_announced_over_mdns() -> None:
    """Real mDNS between processes: the second bridge hears the first answer a multicast
    question, takes "NAME (2)", and a separate client resolves both services."""
    zeroconf = pytest.importorskip("zeroconf")
    name = f"sdbridge-test-{uuid.uuid4().hex[:8]}"
    first = subprocess.Popen(
        [sys.executable, "-c", ANNOUNCE_ONE, name], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert first.stdout is not None and first.stdin is not None
    try:
        announced, port = first.stdout.readline().split()
        assert announced == name
        second = OscQueryServer(host="127.0.0.1", port=0, osc_port=7101, values=dict, status=dict, name=name)
        client = zeroconf.Zeroconf(interfaces=["127.0.0.1"])
        try:
            assert second.announced_name == f"{name} (2)"
            for instance, http_port in ((name, int(port)), (second.announced_name, second.port)):
                info = client.get_service_info(
                    "_oscjson._tcp.local.", f"{instance}._oscjson._tcp.local.", 3000
                )
                assert info is not None, instance
                assert info.port == http_port and info.parsed_addresses() == ["127.0.0.1"]
        finally:
            client.close()
            second.close()
    finally:
        first.stdin.close()
        first.wait(timeout=10)


def test_a_wildcard_bind_announces_the_machines_outside_addresses() -> None:
    assert announced_addresses("0.0.0.0", ["127.0.0.1", "10.0.0.5", "192.168.1.9"]) == [
        "10.0.0.5",
        "192.168.1.9",
    ]
    assert announced_addresses("", ["127.0.0.1"]) == ["127.0.0.1"]
    assert announced_addresses("127.0.0.1", ["10.0.0.5"]) == ["127.0.0.1"]
