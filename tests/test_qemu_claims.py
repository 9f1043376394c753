"""Per-project and per-host claims of the QEMU plugin: MAC ranges and exclusive images."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from emucore.errors import ConfigError, ImageError
from emucore.models import HostSettings, Project
from emucore.session import Session


@pytest.fixture
def session(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Session:
    monkeypatch.setenv("EMU_QEMU_KVM", "off")
    images = tmp_path / "images"
    images.mkdir()
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", str(images / "own.qcow2"), "16M"], check=True
    )
    return Session(
        Project.for_directory(tmp_path / "p"), settings=HostSettings(image_dirs=(images,))
    )


def test_overlapping_mac_ranges_are_refused(session: Session) -> None:
    session.add_node(
        {"name": "a", "emulator": "qemu", "mac_address": "02:00:00:00:01:00", "adapters": 4}
    )
    with pytest.raises(
        ConfigError,
        match=r"\$.mac_address: MAC addresses 02:00:00:00:00:fe..02:00:00:00:01:01 overlap",
    ):
        session.add_node(
            {"name": "b", "emulator": "qemu", "mac_address": "02:00:00:00:00:fe", "adapters": 4}
        )
    session.add_node(
        {"name": "c", "emulator": "qemu", "mac_address": "02:00:00:00:01:04", "adapters": 4}
    )


def test_a_refused_node_claims_no_image(session: Session) -> None:
    unsafe = {"name": "x", "emulator": "qemu", "hda_disk_image": "own.qcow2", "linked_clone": False}
    with pytest.raises(ConfigError, match="options"):
        session.add_node({**unsafe, "options": "-drive file=/etc/shadow"})
    session.add_node({**unsafe, "name": "y"})  # the image was not claimed by the refused node
    with pytest.raises(ImageError, match="already used by node 'y'"):
        session.add_node({**unsafe, "name": "z"})
