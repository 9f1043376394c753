"""emu as a GNS3 compute: the compute API v3 of GNS3 3.0, served by ``emu serve``.

A thin front end (see ``docs/gns3-compute.md``): each request body is structured with emu's
strict converter, the handler calls the core's session and node API, and the answer is
rendered as GNS3's JSON. Nothing here knows an emulator's internals: QEMU and VPCS nodes are
whatever the loaded plugins provide under those names.
"""

from __future__ import annotations

GNS3_VERSION = "3.0.6"
"""The controller version this front end speaks to by default (GNS3 demands an exact match)."""

__all__ = ["GNS3_VERSION"]
