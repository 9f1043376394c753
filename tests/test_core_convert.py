"""The models and the converter: good input builds models, bad input names every bad field."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from emucore.convert import make_converter, structure
from emucore.errors import ConfigError
from emucore.models import HostSettings, LinkFilters, Nio, Project, TapNio, UdpNio

NIOS: Any = Mapping[int, Nio]


def problems(data: Any, cls: Any) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        structure(data, cls, "thing.toml")
    assert str(caught.value).startswith("thing.toml: ")
    return list(caught.value.problems)


def test_link_filters_defaults_are_off() -> None:
    filters = structure({}, LinkFilters)
    assert filters == LinkFilters()
    assert not filters.active
    assert structure({"loss": 30, "delay": 100}, LinkFilters).active


def test_every_bad_field_is_listed_with_its_reason() -> None:
    found = problems({"loss": 130, "delay": -1, "jitter": 5, "corruption": 101}, LinkFilters)
    assert found == [
        "$.loss: must be 0..100, got 130.0",
        "$.delay: must be 0..60000, got -1",
        "$.corruption: must be 0..100, got 101.0",
    ]


def test_unknown_keys_are_refused_with_a_suggestion() -> None:
    assert problems({"los": 3}, LinkFilters) == ["$.los: unknown key (did you mean 'loss'?)"]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("12", "must be an integer, got str '12'"),
        (12.5, "must be an integer, got float 12.5"),
        (True, "must be an integer, got bool True"),
    ],
)
def test_integers_are_strict(value: Any, message: str) -> None:
    assert problems({"delay": value}, LinkFilters) == [f"$.delay: {message}"]


def test_booleans_are_strict() -> None:
    assert problems({"allow_unsafe_options": "false"}, HostSettings) == [
        "$.allow_unsafe_options: must be true or false, got str 'false'"
    ]


def test_nios_in_gns3_and_emu_spelling() -> None:
    nios = structure(
        {
            "0": {"type": "nio_udp", "lport": 20000, "rhost": "127.0.0.1", "rport": 20001},
            "1": {"type": "tap", "device": "tap0"},
            "2": {"type": "udp", "local_port": 1, "remote_host": "::1", "remote_port": 2},
            "3": {"type": "nio_tap", "tap_device": "tap1"},
        },
        NIOS,
    )
    assert nios == {
        0: UdpNio(20000, "127.0.0.1", 20001),
        1: TapNio("tap0"),
        2: UdpNio(1, "::1", 2),
        3: TapNio("tap1"),
    }


def test_bad_nios_name_their_adapter_and_field() -> None:
    found = problems(
        {
            "0": {"type": "nio_udp", "lport": 70000, "rhost": "a,b", "rport": 1},
            "1": {"type": "nio_ethernet"},
            "x": {"type": "tap", "device": "tap0"},
            "2": {"type": "tap", "device": "tap0,script=/bin/sh"},
        },
        NIOS,
    )
    assert found == [
        "$['0'].local_port: must be 1..65535, got 70000",
        "$['0'].remote_host: must be a host name or IP address; got 'a,b'",
        "$['1']: NIO 'type' must be one of nio_tap, nio_udp, tap, udp; got 'nio_ethernet'",
        "$.x: adapter numbers must be non-negative integers, got 'x'",
        "$['2'].device: must be a network interface name (1-15 of A-Z a-z 0-9 _ . -);"
        " got 'tap0,script=/bin/sh'",
    ]


def test_a_nio_must_say_its_type() -> None:
    assert "must be a table" in problems({"0": 5}, NIOS)[0]


def test_host_settings_ports_range() -> None:
    assert structure({"udp_ports": [30000, 30010]}, HostSettings).udp_ports == (30000, 30010)
    assert problems({"udp_ports": [30010, 30000]}, HostSettings) == [
        "$.udp_ports: must be a range LOW, HIGH within 1024..65535; got (30010, 30000)"
    ]


def test_paths_and_uuids() -> None:
    settings = structure({"image_dirs": ["/a", "b"]}, HostSettings)
    assert settings.image_dirs == (Path("/a"), Path("b"))
    assert problems({"image_dirs": [""]}, HostSettings)[0].startswith("$.image_dirs[0]:")
    project = Project.for_directory(Path("relative"))
    assert project.directory.is_absolute()
    assert project.id == Project.for_directory(Path("relative").absolute()).id
    assert isinstance(project.id, uuid.UUID)


def test_each_call_builds_its_own_converter() -> None:
    assert make_converter() is not make_converter()


def test_a_top_level_that_is_not_a_table() -> None:
    assert problems([1, 2], LinkFilters)
