"""VPCS nodes for emu: one small plugin per concern, registered through ``emucore.plugins``.

Installed as its own distribution (``emu-vpcs``); emu's core does not import it. Each module
below is a plugin of its own, so any one can be blocked (``EMU_BLOCK_PLUGINS=vpcs.console``)
and replaced:

================  ===================  =====================================================
plugin name       module               concern
================  ===================  =====================================================
``vpcs``          ``emu_vpcs.emulator``  the ``vpcs`` kind, its properties and settings
``vpcs.binary``   ``emu_vpcs.binary``    the VPCS binary and its version; ``emu check``
``vpcs.mac``      ``emu_vpcs.mac``       the MAC address (``-m``), unique per project
``vpcs.network``  ``emu_vpcs.network``   the UDP tunnel (``vpcs.process`` restarts VPCS on a relink)
``vpcs.startup``  ``emu_vpcs.startup``   ``startup.vpc`` from ``startup_script`` or ``ip``
``vpcs.process``  ``emu_vpcs.process``   launch on a pty, confined; stop, suspend, reload
``vpcs.console``  ``emu_vpcs.console``   the telnet console, served by the host
================  ===================  =====================================================

Helpers that are not plugins: :mod:`emu_vpcs.properties`, :mod:`emu_vpcs.positions`,
:mod:`emu_vpcs.terminal` (the pty) and :mod:`emu_vpcs.confine` (the launcher that confines
VPCS and execs it). The telnet server is the core's (:mod:`emucore.telnetd`).
"""
