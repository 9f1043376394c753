"""A minimal pcap writer (Ethernet frames, microsecond timestamps) and a reader that follows a
capture while it is written.

The classic libpcap format (not pcapng), which Wireshark, tcpdump and dpkt all read::

    global header   magic, version 2.4, zone, sigfigs, snaplen, link type
    per frame       seconds, microseconds, captured length, original length, frame bytes
"""

from __future__ import annotations

import asyncio
import os
import struct
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import TracebackType
from typing import IO

from emucore.files import create_file

MAGIC = 0xA1B2C3D4
LINKTYPE_ETHERNET = 1
SNAPLEN = 65535

# Native byte order, as libpcap writes it; readers tell the order from the magic number.
_GLOBAL_HEADER = struct.Struct("=IHHiIII")
_RECORD_HEADER = struct.Struct("=IIII")


class PcapWriter:
    """Writes Ethernet frames to a pcap file, flushed frame by frame so a reader sees them now.

    :ivar path: the file being written.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        """Create (or truncate) ``path`` and write the global header.

        :param path: the pcap file.
        :raises OSError: the file cannot be created or written.
        """
        self.path = Path(path)
        # Never through a link planted at the path (see emucore.files).
        self._file: IO[bytes] | None = create_file(self.path, "wb")
        try:
            self._file.write(_GLOBAL_HEADER.pack(MAGIC, 2, 4, 0, 0, SNAPLEN, LINKTYPE_ETHERNET))
            self._file.flush()
        except BaseException:
            self.close()
            raise

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._file is None

    def write(self, frame: bytes, timestamp: float) -> None:
        """Append one frame.

        :param frame: the Ethernet frame, from the destination MAC on (no FCS); frames longer
            than the snap length are cut, their original length is kept.
        :param timestamp: when the frame was seen, in seconds since the epoch.
        :raises ValueError: the writer is closed.
        :raises OSError: the file cannot be written (e.g. the disk is full).
        """
        if self._file is None:
            raise ValueError(f"pcap file {self.path} is closed")
        seconds, micros = divmod(round(timestamp * 1_000_000), 1_000_000)
        caplen = min(len(frame), SNAPLEN)
        self._file.write(_RECORD_HEADER.pack(seconds, micros, caplen, len(frame)))
        self._file.write(frame if caplen == len(frame) else frame[:caplen])
        # Header and frame usually leave in one write(2): a reader never waits for a buffer.
        self._file.flush()

    def close(self) -> None:
        """Close the file (idempotent)."""
        file, self._file = self._file, None
        if file is not None:
            file.close()

    def __enter__(self) -> PcapWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def read_frames(path: str | os.PathLike[str]) -> list[bytes]:
    """The frames of a classic pcap file (either byte order; a cut last record is ignored).

    Enough for summaries and sanity checks; tests use a full parser (dpkt).

    :raises ValueError: not a pcap file.
    """
    data = Path(path).read_bytes()
    if len(data) < _GLOBAL_HEADER.size:
        raise ValueError(f"{path}: too short for a pcap file")
    for order in ("<", ">"):
        if struct.unpack_from(order + "I", data)[0] == MAGIC:
            break
    else:
        raise ValueError(f"{path}: not a pcap file (bad magic number)")
    record = struct.Struct(order + "IIII")
    frames, offset = [], _GLOBAL_HEADER.size
    while offset + record.size <= len(data):
        _, _, captured, _ = record.unpack_from(data, offset)
        offset += record.size
        if offset + captured > len(data):
            break
        frames.append(data[offset : offset + captured])
        offset += captured
    return frames


def icmp_echoes(frames: list[bytes]) -> tuple[int, int]:
    """How many ICMP echo requests and replies (IPv4 over Ethernet) the frames hold."""
    requests = replies = 0
    for frame in frames:
        if len(frame) < 34 or frame[12:14] != b"\x08\x00" or frame[23] != 1:
            continue
        header_length = (frame[14] & 0x0F) * 4
        if len(frame) > 14 + header_length:
            kind = frame[14 + header_length]
            requests += kind == 8
            replies += kind == 0
    return requests, replies


async def follow(
    path: str | Path,
    active: Callable[[], bool],
    *,
    chunk_size: int = 65536,
    poll_interval: float = 0.1,
) -> AsyncIterator[bytes]:
    """The bytes of a capture file as they are written, like ``tail -f``.

    Yields what the file holds, then whatever is appended, looking again every
    ``poll_interval`` seconds, until ``active()`` is false and everything written was yielded.
    A writer that flushes frame by frame (``PcapWriter``, QEMU's ``filter-dump``) lets a
    reader see each frame at once, so the stream is itself a valid pcap at any point.

    :param path: the capture file.
    :param active: whether the capture still runs.
    :param chunk_size: the most bytes yielded at once.
    :param poll_interval: seconds between looks at a file that did not grow.
    :raises OSError: the file cannot be opened.
    """
    with open(path, "rb") as capture:  # noqa: ASYNC230 - local file, short reads
        while True:
            running = active()  # read before the file: nothing written before the stop is missed
            data = capture.read(chunk_size)
            if data:
                yield data
                continue
            if not running:
                return
            await asyncio.sleep(poll_interval)
