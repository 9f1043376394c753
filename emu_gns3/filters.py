"""GNS3 link filters → :class:`~emucore.models.LinkFilters`, or a refusal that says why.

The controller sends a link's filters to one end only, each as a list of integers (or of one
string for ``bpf``), and sends only filters whose first value is not 0:

========================  ==============================================================
``frequency_drop [n]``    ``n > 0``: drop one frame in ``n`` (``drop_every``); ``-1``:
                          drop everything, which emu does as a link down (also how the
                          controller suspends a link)
``packet_loss [p]``       ``loss`` = ``p`` percent
``delay [ms, jitter]``    ``delay`` and ``jitter`` in milliseconds
``corrupt [p]``           ``corruption`` = ``p`` percent
``bpf ["expr"]``          refused (409): emu has no BPF matcher
========================  ==============================================================
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

from emu_gns3.errors import Conflict
from emucore.convert import structure
from emucore.errors import ConfigError
from emucore.models import LinkFilters

KNOWN = ("frequency_drop", "packet_loss", "delay", "corrupt", "bpf")


def _integers(name: str, values: tuple[Any, ...], count: int) -> list[int]:
    wanted = f"a list of {count} integer{'s' if count > 1 else ''}"
    if not 1 <= len(values) <= count or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in values
    ):
        raise ConfigError("filters", [f"$.filters.{name}: must be {wanted}, got {list(values)!r}"])
    return [*values, *[0] * (count - len(values))]


def translate(filters: Mapping[str, tuple[Any, ...]], where: str) -> tuple[LinkFilters, bool]:
    """The impairments, and whether the filters take the link down.

    :raises ConfigError: an unknown filter or a bad value (422), naming it.
    :raises Conflict: a filter emu refuses (``bpf``).
    """
    unknown = [name for name in filters if name not in KNOWN]
    if unknown:
        known = ", ".join(KNOWN)
        raise ConfigError(
            where, [f"$.filters.{n}: unknown filter (known: {known})" for n in unknown]
        )
    fields: dict[str, Any] = {}
    down = False
    for name, values in filters.items():
        if name == "bpf":
            if any(str(v).strip() for v in values):
                raise Conflict(
                    f"{where}: the bpf filter is not supported by the emu compute (it has no BPF"
                    " matcher); remove it, or use frequency_drop, packet_loss, delay or corrupt"
                )
        elif name == "frequency_drop":
            (every,) = _integers(name, values, 1)
            if every == -1:
                down = True
            elif every < -1:
                problem = f"$.filters.frequency_drop: must be -1, 0 or more, got {every}"
                raise ConfigError(where, [problem])
            else:
                fields["drop_every"] = every
        elif name == "packet_loss":
            (fields["loss"],) = _integers(name, values, 1)
        elif name == "delay":
            fields["delay"], fields["jitter"] = _integers(name, values, 2)
        elif name == "corrupt":
            (fields["corruption"],) = _integers(name, values, 1)
    renamed = {"drop_every": "frequency_drop", "loss": "packet_loss", "corruption": "corrupt"}
    try:
        return structure(fields, LinkFilters, where), down
    except ConfigError as exc:
        problems = [_rename(problem, renamed) for problem in exc.problems]
        raise ConfigError(where, problems) from None


def _rename(problem: str, renamed: dict[str, str]) -> str:
    field = problem.removeprefix("$.").partition(":")[0]
    gns3 = renamed.get(field, "delay" if field in ("delay", "jitter") else field)
    return problem.replace(f"$.{field}:", f"$.filters.{gns3}:", 1)


def describe(filters: LinkFilters) -> dict[str, list[int]]:
    """The GNS3 form of ``filters`` (for answers and logs)."""
    values = attrs.asdict(filters)
    out = {
        "frequency_drop": [values["drop_every"]],
        "packet_loss": [round(values["loss"])],
        "delay": [values["delay"], values["jitter"]],
        "corrupt": [round(values["corruption"])],
    }
    return {name: value for name, value in out.items() if any(value)}
