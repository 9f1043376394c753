"""What the GNS3 front end costs: a node start through a GNS3 controller and ``emu serve``,
against emu's own ``node.start()`` of the same node.

Run from the repository root, after ``./scripts/setup`` (which installs the controller)::

    .venv/bin/python bench/gns3_start.py [--runs 10]

Through GNS3: a real ``gns3-server==3.0.6`` controller with ``emu serve`` registered as its
compute; timed from the controller's ``POST /v3/projects/{p}/nodes/{n}/start`` until the
controller reports the node ``started`` (it learns that only from the compute's
``node.updated`` notification), so the figure holds the controller, the HTTP hop, the front
end, the shared console and the notification. Direct: ``node.start()`` of a node with the
same properties in this process, until it returns. Both are the tiny guest under TCG; they
alternate after one warm-up round each, and each node is stopped after every run, untimed.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import time
import uuid
from pathlib import Path

import benchlib

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.gns3_controller import (
    Controller,
    gns3_controller,
    start_emu_compute,
    stop,
)


def wait_status(controller: Controller, project: str, node: str, status: str) -> None:
    """Poll the controller (every 5 ms) until the node has ``status``."""
    deadline = time.monotonic() + 120
    while controller.api("GET", f"/projects/{project}/nodes/{node}")["status"] != status:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the node did not become {status}")
        time.sleep(0.005)


def main(runs: int) -> None:
    with benchlib.lab_directory("gns3") as root:
        tiny = benchlib.guest()
        with gns3_controller(root / "gns3") as controller:
            compute = start_emu_compute(
                root / "gns3", controller.compute_user, controller.compute_password
            )
            try:
                shutil.copy(tiny.kernel, compute.images / "tiny-vmlinuz")
                shutil.copy(tiny.initrd, compute.images / "tiny-initrd.img")
                compute_id = str(uuid.uuid4())
                registration = {"compute_id": compute_id, "protocol": "http", "host": "127.0.0.1"}
                registration |= {"port": compute.port, "user": compute.user}
                controller.api(
                    "POST", "/computes?connect=true", registration | {"password": compute.password}
                )
                project = controller.api("POST", "/projects", {"name": "bench"})["project_id"]
                properties = {
                    "qemu_path": benchlib.QEMU,
                    "ram": 128,
                    "adapter_type": "virtio-net-pci",
                    "kernel_image": "tiny-vmlinuz",
                    "initrd": "tiny-initrd.img",
                    "kernel_command_line": tiny.kernel_command_line(hostname="bench"),
                }
                body = {"name": "bench", "node_type": "qemu", "compute_id": compute_id}
                node = controller.api(
                    "POST", f"/projects/{project}/nodes", body | {"properties": properties}
                )["node_id"]
                times = asyncio.run(alternate(runs, root, tiny, controller, project, node))
                controller.api("DELETE", f"/projects/{project}")
            finally:
                stop(compute.process)
                compute.remove_projects()
    gns3, direct = benchlib.median(times["gns3"]), benchlib.median(times["direct"])
    print(f"# {runs} alternating runs each; {benchlib.load_note()}")
    benchlib.figure(
        "start_gns3_ms", gns3 * 1000, "median, controller start until it says started", 1
    )
    benchlib.figure("start_direct_ms", direct * 1000, "median, node.start() until it returns", 1)
    benchlib.figure("start_gns3_min_ms", min(times["gns3"]) * 1000, "fastest through GNS3", 1)
    benchlib.figure("start_direct_min_ms", min(times["direct"]) * 1000, "fastest direct", 1)
    benchlib.figure("gns3_start_ratio", gns3 / direct, "through GNS3 / direct, medians")


async def alternate(
    runs: int, root: Path, tiny: benchlib.TinyGuest, controller: Controller, project: str, node: str
) -> dict[str, list[float]]:
    """Time both starts, in alternating order, after one warm-up round."""
    lab = benchlib.session(root, tiny)
    local = benchlib.guest_node(lab, tiny, "bench")
    times: dict[str, list[float]] = {"gns3": [], "direct": []}
    try:
        for round_number in range(runs + 1):
            order = ["gns3", "direct"] if round_number % 2 == 0 else ["direct", "gns3"]
            for kind in order:
                began = benchlib.now()
                if kind == "gns3":
                    await asyncio.to_thread(start_through_gns3, controller, project, node)
                else:
                    await local.start()
                took = benchlib.now() - began
                if kind == "gns3":
                    await asyncio.to_thread(stop_through_gns3, controller, project, node)
                else:
                    await local.stop()
                if round_number:
                    times[kind].append(took)
    finally:
        await lab.close()
    return times


def start_through_gns3(controller: Controller, project: str, node: str) -> None:
    """Start the node through the controller and wait until the controller says started."""
    controller.api("POST", f"/projects/{project}/nodes/{node}/start", {})
    wait_status(controller, project, node, "started")


def stop_through_gns3(controller: Controller, project: str, node: str) -> None:
    """Stop the node through the controller and wait until it says stopped."""
    controller.api("POST", f"/projects/{project}/nodes/{node}/stop", {})
    wait_status(controller, project, node, "stopped")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10, help="timed runs of each (default 10)")
    arguments = parser.parse_args()
    if arguments.runs < 3:
        sys.exit("--runs must be at least 3")
    main(arguments.runs)
