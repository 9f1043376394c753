"""The error hierarchy: every error emu raises on purpose is an :class:`EmuError`.

Messages follow one rule: say what was wrong, where (node, field, file, adapter) and, when
there is one, what to do about it. Hosts may print ``str(error)`` to a user as it is.
"""

from __future__ import annotations

from collections.abc import Sequence


class EmuError(Exception):
    """Root of every error raised on purpose by emu and its plugins."""


class ConfigError(EmuError):
    """A description (node, lab, settings) is invalid.

    ``problems`` lists each bad field as ``"$.path: reason"``; the message holds them all,
    prefixed by where the description came from (a file name, a node name).
    """

    def __init__(self, where: str, problems: Sequence[str]) -> None:
        self.where = where
        self.problems = tuple(problems)
        lines = "; ".join(self.problems)
        super().__init__(f"{where}: {lines}" if where else lines)


class PluginError(EmuError):
    """A plugin is missing, blocked, broken, or two plugins disagree."""


class NodeError(EmuError):
    """An operation on a node failed; the message starts with the node's name."""

    def __init__(self, node: str, message: str) -> None:
        self.node = node
        super().__init__(f"node {node!r}: {message}")


class NodeStateError(NodeError):
    """The operation is not allowed in the node's current status (e.g. suspend a stopped node)."""


class CaptureUnsupportedError(NodeError):
    """No plugin of the node's emulator captures on that adapter (hosts fall back to a relay)."""


class StateUnsupportedError(NodeError):
    """No plugin of the node's emulator saves or restores running states (``emu_save_state``,
    ``emu_restore_state``, ``emu_list_states``): hosts start such a node afresh instead."""


class ImageError(NodeError):
    """A disk or kernel image is missing, unreadable, corrupt or not allowed."""


class EmulatorExitedError(NodeError):
    """The emulator process exited while it was being started or controlled.

    Carries the exit code and the tail of the emulator's log so a user sees why.
    """

    def __init__(self, node: str, message: str, returncode: int | None, log_tail: str) -> None:
        self.returncode = returncode
        self.log_tail = log_tail
        detail = f"{message} (exit code {returncode})" if returncode is not None else message
        if log_tail:
            detail += "\n--- emulator log (last lines) ---\n" + log_tail
        super().__init__(node, detail)


class PortError(EmuError):
    """No free port is left in the configured range, or a port is already taken."""
