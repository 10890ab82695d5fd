"""Enter a network namespace for the duration of a block (the calling thread only).

The daemon itself runs inside its namespace; tools, tests and the demo use
this to open sockets in a namespace they made. A socket keeps the
namespace it was created in, so a socket created inside the block stays
there after the block ends.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Iterator

CLONE_NEWNET = 0x40000000
NETNS_RUN_DIR = "/run/netns"

# setns/unshare from the C library the interpreter is linked with
# (find_library("c") runs `ldconfig -p` in a subprocess: 4 ms at every start).
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def netns_path(name: str) -> str:
    """``/run/netns/NAME`` for a name, or the path itself when given one."""
    return name if "/" in name else os.path.join(NETNS_RUN_DIR, name)


@contextlib.contextmanager
def in_netns(name: str | None) -> Iterator[None]:
    """Run the block with this thread in network namespace ``name`` (None: stay)."""
    if name is None:
        yield
        return
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        target = os.open(netns_path(name), os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(target)
        finally:
            os.close(target)
        try:
            yield
        finally:
            _setns(own)
    finally:
        os.close(own)
