"""What ``emu run --controller`` decides before it talks to a controller: where each node
goes, and what a GNS3 link cannot carry. The controller's answers here are plain data in the
shape of its ``GET /v3/computes``; ``tests/test_gns3_hosts.py`` runs labs on a real one.
The client's time limits are checked against a stand-in HTTP server on 127.0.0.1 that answers
late or not at all (a real controller cannot be made to stall on purpose)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from emu_gns3 import controller
from emu_gns3.controller import Controller, ControllerAccess, ControllerError, base_url
from emu_gns3.labrun import (
    ControllerLabRunner,
    RemoteNode,
    link_problems,
    place,
    split_placement,
)
from emucore.errors import ConfigError
from emucore.lab import load_lab
from emucore.models import NodeEvent, NodeStatus
from tests.conftest import run


def computes(*names: str) -> list[dict[str, Any]]:
    """Computes as the controller lists them (its stored registrations)."""
    return [{"compute_id": f"id-{n}", "name": n, "host": "192.0.2.1", "port": 3080} for n in names]


def test_nodes_without_a_compute_spread_over_the_reachable_computes() -> None:
    chosen, bad, unavailable = place(
        ["a", "b", "c", "d", "e"], {"b": "host-b"}, computes("host-b", "host-a", "host-c"), {}
    )
    assert (bad, unavailable) == ([], [])
    where = {node: compute["name"] for node, compute in chosen.items()}
    # b is pinned; the others go to the least loaded so far, ties by name.
    assert where == {"b": "host-b", "a": "host-a", "c": "host-c", "d": "host-a", "e": "host-b"}


def test_an_unreachable_compute_takes_no_node() -> None:
    listed = computes("host-a", "host-b")
    chosen, _, unavailable = place(["a", "b"], {}, listed, {"id-host-a": "connection refused"})
    assert {c["name"] for c in chosen.values()} == {"host-b"}
    assert unavailable == []
    _, _, unavailable = place(["a"], {"a": "id-host-a"}, listed, {"id-host-a": "refused"})
    assert unavailable == ["node 'a': compute 'id-host-a' is unreachable: refused"]
    _, _, unavailable = place(["a"], {}, [], {})
    assert unavailable == ["node 'a': no compute to run it on (computes: none)"]


def test_an_unknown_compute_is_bad_input_naming_the_known_ones() -> None:
    listed = computes("host-a", "host-b")
    _, bad, _ = place(["pc"], {"pc": "host-z"}, listed, {"id-host-b": "timeout"})
    assert bad == [
        "$.nodes.pc.compute: the controller has no compute 'host-z'"
        " (computes: host-a (connected), host-b (unreachable))"
    ]


def test_the_compute_key_is_read_and_removed() -> None:
    lab = load_lab(
        {"name": "l", "nodes": {"a": {"emulator": "vpcs", "compute": "host-a"}, "b": {}}}, "l"
    )
    local, wanted, problems = split_placement(lab)
    assert wanted == {"a": "host-a"}
    assert problems == []
    assert "compute" not in local.nodes["a"]
    bad = load_lab({"name": "l", "nodes": {"a": {"compute": 7}, "b": {"compute": ""}}}, "l")
    _, _, problems = split_placement(bad)
    assert problems[0].startswith("$.nodes.a.compute: must be a string")
    assert problems[1] == "$.nodes.b.compute: must not be empty"


def test_what_a_gns3_link_cannot_carry_is_refused() -> None:
    lab = load_lab(
        {
            "name": "l",
            "nodes": {"a": {}, "b": {}, "c": {}},
            "links": [
                {"endpoints": ["a", "b"], "filters": {"rate": 1000, "loss": 2.5}},
                {"endpoints": ["b:1", "c"], "filters": {"direction": "a_to_b", "delay": 5}},
            ],
            "captures": [{"endpoint": "a:0"}, {"endpoint": "c:1"}],
        },
        "l",
    )
    assert link_problems(lab) == [
        "$.links[0].filters.rate: GNS3 links have no rate limit; run the lab locally",
        "$.links[0].filters.loss: GNS3 takes whole percents, got 2.5",
        "$.links[1].filters.direction: GNS3 filters act in both directions",
        "$.captures[1].endpoint: c:1 has no link; a GNS3 controller captures links only",
    ]


@pytest.mark.parametrize(
    ("given", "base"),
    [
        ("http://ctl:3080", "http://ctl:3080"),
        ("http://ctl:3080/", "http://ctl:3080"),
        ("https://ctl/v3/", "https://ctl"),
        (" http://10.0.0.1:3080/v3 ", "http://10.0.0.1:3080"),
    ],
)
def test_the_controller_url_is_its_base(given: str, base: str) -> None:
    assert base_url(given) == base


@pytest.mark.parametrize("given", ["ctl:3080", "ftp://ctl", "http://", "http://ctl/?x=1"])
def test_a_bad_controller_url_is_bad_input(given: str) -> None:
    with pytest.raises(ConfigError, match="--controller"):
        base_url(given)


@asynccontextmanager
async def stalling_server(answer_after: asyncio.Event) -> AsyncIterator[str]:
    """A server whose every answer waits for ``answer_after``; its base URL."""

    async def answer(request: web.Request) -> web.Response:
        await request.read()
        await answer_after.wait()
        return web.json_response({"access_token": "t", "filename": "f"})

    app = web.Application()
    app.router.add_route("POST", "/{tail:.*}", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        answer_after.set()
        await runner.cleanup()


def test_a_login_without_an_answer_is_an_error_saying_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(controller, "REQUEST_TIMEOUT", 0.5)

    async def login() -> None:
        async with stalling_server(asyncio.Event()) as url:
            await Controller.connect(ControllerAccess(url, "admin", "pw"))

    with pytest.raises(ControllerError, match="did not answer the login in time"):
        run(login())


def test_an_upload_may_take_longer_than_the_sessions_time_limit(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(b"x" * 100_000)

    async def upload() -> Any:
        answer_after = asyncio.Event()
        async with stalling_server(answer_after) as url:
            http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=0.5))
            client = Controller(ControllerAccess(url, "admin", "pw"), http, "t")
            try:
                asyncio.get_running_loop().call_later(2.0, answer_after.set)
                return await client.upload("/images/upload/disk.img", image)
            finally:
                await client.close()

    assert run(upload()) == {"access_token": "t", "filename": "f"}


def test_an_upload_without_an_answer_is_an_error_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(controller, "UPLOAD_READ_TIMEOUT", 0.5)
    image = tmp_path / "disk.img"
    image.write_bytes(b"x" * 1000)

    async def upload() -> None:
        async with stalling_server(asyncio.Event()) as url:
            client = Controller(ControllerAccess(url, "admin", "pw"), aiohttp.ClientSession(), "t")
            try:
                await client.upload("/images/upload/disk.img", image)
            finally:
                await client.close()

    with pytest.raises(ControllerError, match=r"upload of .*disk\.img"):
        run(upload())


def test_every_status_change_the_controller_reports_is_published(tmp_path: Path) -> None:
    lab = load_lab({"name": "l", "nodes": {"pc": {"emulator": "vpcs"}}}, "l")
    access = ControllerAccess("http://127.0.0.1:1", "admin", "pw")
    runner = ControllerLabRunner(lab, tmp_path / "l.toml", access=access, project_dir=tmp_path)
    session = runner.build()
    runner.remote["pc"] = RemoteNode("id-pc", "host-a", {"status": "stopped"})
    events: list[NodeEvent] = []
    session.events.subscribe(events.append)

    def update(status: str) -> None:
        answer = {"status": status, "console": 5000, "console_type": "telnet"}
        runner._node_updated("pc", answer | {"console_host": "127.0.0.1"})

    runner._starting.add("pc")  # the runner's own start publishes by itself
    update("started")
    runner._starting.discard("pc")
    for status in ("started", "suspended", "started", "suspended", "stopped", "started"):
        update(status)
    assert [(e.status, e.message) for e in events] == [
        (NodeStatus.SUSPENDED, "suspended on host-a"),
        (NodeStatus.STARTED, "resumed on host-a"),
        (NodeStatus.SUSPENDED, "suspended on host-a"),
        (NodeStatus.STOPPED, "stopped on host-a"),
        (NodeStatus.STARTED, "started on host-a"),
    ]
    assert session.nodes["pc"].console is not None
    assert session.nodes["pc"].console.port == 5000
