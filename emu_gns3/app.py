"""The HTTP and WebSocket routes of GNS3's compute API v3, on aiohttp.

Each handler reads the path and the body, calls :mod:`emu_gns3.compute`, and renders JSON.
Two middlewares do the rest for every route, WebSocket upgrades included: HTTP Basic
authentication, and the error mapping of :mod:`emu_gns3.errors`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import os
import secrets
import sys
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import WSCloseCode, web

from emu_gns3 import console, images
from emu_gns3.bodies import (
    CaptureStart,
    ProjectCreate,
    ProjectUpdate,
    UdpNioBody,
    parse_body,
    parse_json,
)
from emu_gns3.compute import Compute, ComputeProject, NodeEntry
from emu_gns3.errors import BadRequest, Conflict, Unauthorized, error_response
from emu_gns3.hostload import HostLoad, disk_size, memory_bytes
from emu_gns3.interfaces import interfaces
from emu_gns3.settings import ServeSettings
from emucore.convert import structure

log = logging.getLogger("emu.gns3")

PREFIX = "/v3/compute"
PCAP_TYPE = "application/vnd.tcpdump.pcap"

COMPUTE = web.AppKey("compute", Compute)
SETTINGS = web.AppKey("settings", ServeSettings)
# The open WebSockets: closed first when emu serve stops (a client would hold its handler,
# and the server's shutdown would wait for it).
WEBSOCKETS = web.AppKey("websockets", set[web.WebSocketResponse])

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Answer every error as ``{"message": ...}`` with its status (see ``errors``)."""
    try:
        return await handler(request)
    except web.HTTPException as exc:  # aiohttp's own: unknown route, wrong method
        if exc.status < 400:
            raise
        reason = f"{request.method} {request.path}: {exc.reason}"
        return web.json_response({"message": reason}, status=exc.status)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        status, body = error_response(exc)
        if status >= 500:
            log.error("%s %s failed", request.method, request.path, exc_info=exc)
        return web.json_response(body, status=status, headers=_challenge(status))


def _challenge(status: int) -> dict[str, str]:
    return {"WWW-Authenticate": 'Basic realm="emu"'} if status == 401 else {}


def authentication(settings: ServeSettings) -> Any:
    """A middleware admitting only the configured HTTP Basic user (WebSocket upgrades too)."""
    user, password = settings.user.encode(), settings.password.encode()

    @web.middleware
    async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        try:
            given_user, _, given_password = base64.b64decode(token, validate=True).partition(b":")
        except (binascii.Error, ValueError):
            given_user = given_password = b""
        # Both compared, always: the time taken says nothing about which one was wrong.
        user_ok = secrets.compare_digest(given_user, user)
        password_ok = secrets.compare_digest(given_password, password)
        if scheme.lower() != "basic" or not (user_ok and password_ok):
            raise Unauthorized("invalid compute user name or password (HTTP Basic)")
        return await handler(request)

    return authenticate


# -- helpers ---------------------------------------------------------------------------------


def _compute(request: web.Request) -> Compute:
    return request.app[COMPUTE]


def _project(request: web.Request) -> ComputeProject:
    project_id = structure(request.match_info["project_id"], uuid.UUID, "project_id")
    return _compute(request).project(str(project_id))


def _node(request: web.Request) -> tuple[ComputeProject, NodeEntry]:
    project = _project(request)
    node_id = structure(request.match_info["node_id"], uuid.UUID, "node_id")
    return project, project.node(str(node_id), request.match_info["kind"])


def _port(request: web.Request) -> tuple[int, int]:
    return int(request.match_info["adapter"]), int(request.match_info["port"])


def _no_content() -> web.Response:
    return web.Response(status=204)


async def _json_body(request: web.Request) -> dict[str, Any]:
    """The request's body, which must be a JSON object.

    :raises BadRequest: it is not JSON, or not an object.
    """
    body = parse_json(await request.read(), f"{request.method} {request.path}")
    if not isinstance(body, dict):
        raise BadRequest(f"{request.method} {request.path}: the body must be a JSON object")
    return body


# -- compute ---------------------------------------------------------------------------------


async def capabilities(request: web.Request) -> web.Response:
    """``GET /capabilities``: the version the controller checks, the node types served."""
    compute = _compute(request)
    settings = request.app[SETTINGS]
    return web.json_response(
        {
            "version": settings.version,
            "platform": sys.platform,
            "cpus": os.cpu_count() or 1,
            "memory": memory_bytes(),
            "disk_size": disk_size(compute.projects_dir),
            "node_types": compute.node_types(),
        }
    )


async def version(request: web.Request) -> web.Response:
    """``GET /version``."""
    return web.json_response({"version": request.app[SETTINGS].version})


async def network_interfaces(request: web.Request) -> web.Response:
    """``GET /network/interfaces``: for links between computes on loopback hosts."""
    return web.json_response(interfaces())


async def notifications(request: web.Request) -> web.StreamResponse:
    """``WS /notifications/ws``: ``ping`` now and every ``ping_interval`` s, then every
    message the compute publishes (see :mod:`emu_gns3.notifications`)."""
    ws = web.WebSocketResponse(heartbeat=10)
    await ws.prepare(request)
    request.app[WEBSOCKETS].add(ws)
    interval = request.app[SETTINGS].ping_interval
    load = HostLoad(_compute(request).projects_dir)  # its own: CPU use since its last ping

    async def send() -> None:
        with _compute(request).notifier.listen() as queue:
            await ws.send_json({"action": "ping", "event": load.sample()})
            while True:
                try:
                    message = await asyncio.wait_for(queue.get(), interval)
                except TimeoutError:
                    await ws.send_json({"action": "ping", "event": load.sample()})
                    continue
                if message is None:
                    return  # fell behind: the controller reconnects
                await ws.send_json(message)

    sender = asyncio.create_task(send())
    try:
        async for _ in ws:  # the controller sends nothing; this ends when it leaves
            pass
    finally:
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            await sender
        request.app[WEBSOCKETS].discard(ws)
        await ws.close()
    return ws


# -- projects --------------------------------------------------------------------------------


async def list_projects(request: web.Request) -> web.Response:
    """``GET /projects``."""
    return web.json_response([p.as_dict() for p in _compute(request).projects.values()])


async def create_project(request: web.Request) -> web.Response:
    """``POST /projects``: open a project (answered as it is when open already)."""
    body = parse_body(await request.read(), ProjectCreate, "project")
    project_id = body.project_id or uuid.uuid4()
    project = _compute(request).open_project(project_id, body.name)
    return web.json_response(project.as_dict(), status=201)


async def get_project(request: web.Request) -> web.Response:
    """``GET /projects/{project_id}``."""
    return web.json_response(_project(request).as_dict())


async def update_project(request: web.Request) -> web.Response:
    """``PUT /projects/{project_id}``: only variables, which emu nodes do not use."""
    project = _project(request)
    parse_body(await request.read(), ProjectUpdate, "project")
    return web.json_response(project.as_dict())


async def close_project(request: web.Request) -> web.Response:
    """``POST /projects/{project_id}/close``: stop its nodes; the files stay."""
    await _compute(request).close_project(_project(request).id)
    return _no_content()


async def delete_project(request: web.Request) -> web.Response:
    """``DELETE /projects/{project_id}``: stop its nodes and delete its files."""
    await _compute(request).delete_project(_project(request).id)
    return _no_content()


async def allocate_udp_port(request: web.Request) -> web.Response:
    """``POST /projects/{project_id}/ports/udp``: a port for one end of a link."""
    port = _project(request).session.ports.allocate()
    return web.json_response({"udp_port": port}, status=201)


# -- nodes -----------------------------------------------------------------------------------


async def create_node(request: web.Request) -> web.Response:
    """``POST /projects/{project_id}/{kind}/nodes``."""
    project = _project(request)
    entry = project.add_node(request.match_info["kind"], await _json_body(request))
    return web.json_response(project.render(entry), status=201)


async def get_node(request: web.Request) -> web.Response:
    """``GET .../nodes/{node_id}``."""
    project, entry = _node(request)
    return web.json_response(project.render(entry))


async def update_node(request: web.Request) -> web.Response:
    """``PUT .../nodes/{node_id}``: a stopped node takes any change; a running one only
    what it has already (the controller replays the whole node)."""
    project, entry = _node(request)
    await project.update_node(entry, await _json_body(request))
    answer = project.render(entry)
    project.compute.notifier.publish("node.updated", answer)
    return web.json_response(answer)


async def delete_node(request: web.Request) -> web.Response:
    """``DELETE .../nodes/{node_id}``."""
    project, entry = _node(request)
    await project.delete_node(entry)
    return _no_content()


def _action(name: str) -> Handler:
    async def act(request: web.Request) -> web.Response:
        project, entry = _node(request)
        await project.act(entry, name)
        return _no_content()

    act.__doc__ = f"``POST .../nodes/{{node_id}}/{name}``."
    return act


async def create_disk_image(request: web.Request) -> web.Response:
    """``POST .../nodes/{node_id}/disk_image/{disk_name}``: an empty image in the node's
    directory (GNS3's ``format``, ``size`` and the format's options, checked by the
    emulator's plugins)."""
    _, entry = _node(request)
    body = await _json_body(request)
    await entry.node.create_disk_image(request.match_info["disk_name"], body)
    return _no_content()


async def update_disk_image(request: web.Request) -> web.Response:
    """``PUT .../disk_image/{disk_name}``: ``{"extend": MiB}`` grows a stopped node's image."""
    _, entry = _node(request)
    body = await _json_body(request)
    extend = body.get("extend")
    if extend is not None:
        await entry.node.resize_disk_image(request.match_info["disk_name"], extend)
    return _no_content()


async def delete_disk_image(request: web.Request) -> web.Response:
    """``DELETE .../disk_image/{disk_name}``: a stopped node's image goes."""
    _, entry = _node(request)
    await entry.node.delete_disk_image(request.match_info["disk_name"])
    return _no_content()


async def duplicate_node(request: web.Request) -> web.Response:
    """``POST .../nodes/{node_id}/duplicate``: refused."""
    raise Conflict("the emu compute does not duplicate nodes; create a new node instead")


async def reset_console(request: web.Request) -> web.Response:
    """``POST .../nodes/{node_id}/console/reset``: restart the node's console server."""
    _, entry = _node(request)
    await console.reset(entry.node)
    return _no_content()


async def console_ws(request: web.Request) -> web.StreamResponse:
    """``WS .../nodes/{node_id}/console/ws``: text in, the console's bytes out (binary)."""
    _, entry = _node(request)
    console.telnet_address(entry.node)  # refused before the upgrade when there is none
    ws = web.WebSocketResponse(heartbeat=30)
    await ws.prepare(request)
    request.app[WEBSOCKETS].add(ws)
    try:
        await console.bridge(ws, entry.node)
    finally:
        request.app[WEBSOCKETS].discard(ws)
        await ws.close()
    return ws


# -- NIOs and captures -----------------------------------------------------------------------


async def add_nio(request: web.Request) -> web.Response:
    """``POST .../adapters/{a}/ports/{p}/nio``."""
    project, entry = _node(request)
    body = parse_body(await request.read(), UdpNioBody, "nio")
    await project.add_nio(entry, *_port(request), body)
    return web.json_response(await _json_body(request), status=201)


async def update_nio(request: web.Request) -> web.Response:
    """``PUT .../adapters/{a}/ports/{p}/nio``: filters and suspension, live."""
    project, entry = _node(request)
    body = parse_body(await request.read(), UdpNioBody, "nio")
    await project.update_nio(entry, *_port(request), body)
    return web.json_response(await _json_body(request), status=201)


async def delete_nio(request: web.Request) -> web.Response:
    """``DELETE .../adapters/{a}/ports/{p}/nio``."""
    project, entry = _node(request)
    await project.delete_nio(entry, *_port(request))
    return _no_content()


async def start_capture(request: web.Request) -> web.Response:
    """``POST .../capture/start``: ``{"pcap_file_path": ...}``."""
    project, entry = _node(request)
    body = parse_body(await request.read(), CaptureStart, "capture")
    path = await project.start_capture(entry, *_port(request), body)
    return web.json_response({"pcap_file_path": str(path)})


async def stop_capture(request: web.Request) -> web.Response:
    """``POST .../capture/stop``."""
    project, entry = _node(request)
    await project.stop_capture(entry, *_port(request))
    return _no_content()


async def stream_capture(request: web.Request) -> web.StreamResponse:
    """``GET .../capture/stream``: the pcap as it is written, until the capture stops or the
    client leaves."""
    project, entry = _node(request)

    def listening() -> bool:
        return request.transport is not None and not request.transport.is_closing()

    chunks = project.stream_capture(entry, *_port(request), listening)
    response = web.StreamResponse(headers={"Content-Type": PCAP_TYPE})
    await response.prepare(request)
    with contextlib.suppress(ConnectionError):
        async for chunk in chunks:
            await response.write(chunk)
        await response.write_eof()
    return response


# -- images ----------------------------------------------------------------------------------


async def list_images(request: web.Request) -> web.Response:
    """``GET /qemu/images``."""
    return web.json_response(images.listing(_compute(request).settings))


async def upload_image(request: web.Request) -> web.Response:
    """``POST /qemu/images/{filename}``: the body is the file."""
    settings = _compute(request).settings
    await images.receive(settings, request.match_info["filename"], request.content.iter_any())
    return _no_content()


# -- the application -------------------------------------------------------------------------


async def close_websockets(app: web.Application) -> None:
    """Close every open WebSocket (notifications, consoles): ``emu serve`` is stopping."""
    sockets = app[WEBSOCKETS]
    for ws in list(sockets):
        await ws.close(code=WSCloseCode.GOING_AWAY, message=b"emu serve is stopping")


def make_app(compute: Compute, settings: ServeSettings) -> web.Application:
    """The aiohttp application serving ``compute`` under ``/v3/compute``."""
    app = web.Application(middlewares=[errors, authentication(settings)])
    app[COMPUTE] = compute
    app[SETTINGS] = settings
    app[WEBSOCKETS] = set()
    app.on_shutdown.append(close_websockets)
    project = PREFIX + "/projects/{project_id}"
    node = project + "/{kind:[a-z_]+}/nodes/{node_id}"
    port = node + r"/adapters/{adapter:\d{1,4}}/ports/{port:\d{1,4}}"
    app.add_routes(
        [
            web.get(PREFIX + "/capabilities", capabilities),
            web.get(PREFIX + "/version", version),
            web.get(PREFIX + "/network/interfaces", network_interfaces),
            web.get(PREFIX + "/notifications/ws", notifications),
            web.get(PREFIX + "/projects", list_projects),
            web.post(PREFIX + "/projects", create_project),
            web.get(project, get_project),
            web.put(project, update_project),
            web.delete(project, delete_project),
            web.post(project + "/close", close_project),
            web.post(project + "/ports/udp", allocate_udp_port),
            web.post(project + "/{kind:[a-z_]+}/nodes", create_node),
            web.get(node, get_node),
            web.put(node, update_node),
            web.delete(node, delete_node),
            *(web.post(f"{node}/{name}", _action(name)) for name in _ACTIONS),
            web.post(node + "/duplicate", duplicate_node),
            web.post(node + "/disk_image/{disk_name}", create_disk_image),
            web.put(node + "/disk_image/{disk_name}", update_disk_image),
            web.delete(node + "/disk_image/{disk_name}", delete_disk_image),
            web.post(node + "/console/reset", reset_console),
            web.get(node + "/console/ws", console_ws),
            web.post(port + "/nio", add_nio),
            web.put(port + "/nio", update_nio),
            web.delete(port + "/nio", delete_nio),
            web.post(port + "/capture/start", start_capture),
            web.post(port + "/capture/stop", stop_capture),
            web.get(port + "/capture/stream", stream_capture),
            web.get(PREFIX + "/qemu/images", list_images),
            web.post(PREFIX + "/qemu/images/{filename}", upload_image),
        ]
    )
    return app


_ACTIONS = ("start", "stop", "suspend", "resume", "reload")
