"""The worker → parent event pipe, read without blocking (see FrameReader)."""

from __future__ import annotations

import os
import pickle
import struct
from collections.abc import Callable
from typing import Any


class FrameReader:
    """Reads a worker's event pipe without blocking: every message waiting, in one system call.

    The frames are multiprocessing.Connection's (a 4-byte big-endian length, or -1 then an
    8-byte length, then a pickle). A frame cut short by the worker's death is dropped at EOF;
    it never blocks the event loop, as Connection.recv() would. Each unpickled frame is passed
    through `decode` (service.engine.protocol.decode: tagged tuples to typed messages).
    """

    def __init__(self, fd: int, decode: Callable[[Any], Any]) -> None:
        self.fd = fd
        os.set_blocking(fd, False)
        self.buf = bytearray()
        self.decode = decode

    def read(self) -> list[Any]:
        """Messages complete so far; EOFError once the worker's end is closed."""
        while True:
            try:
                chunk = os.read(self.fd, 1 << 20)
            except BlockingIOError:
                break
            except OSError:
                raise EOFError from None
            if not chunk:
                raise EOFError
            self.buf += chunk
            if len(chunk) < 1 << 20:
                break
        return self.messages()

    def messages(self) -> list[Any]:
        out = []
        decode = self.decode
        buf, pos, end = self.buf, 0, len(self.buf)
        while end - pos >= 4:
            (n,) = _INT.unpack_from(buf, pos)
            head = 4
            if n == -1:
                if end - pos < 12:
                    break
                (n,) = _LONG.unpack_from(buf, pos + 4)
                head = 12
            if end - pos - head < n:
                break
            out.append(decode(pickle.loads(memoryview(buf)[pos + head:pos + head + n])))
            pos += head + n
        del buf[:pos]
        return out


_INT, _LONG = struct.Struct("!i"), struct.Struct("!Q")
