"""Who is at the other end of a unix socket: the NBD and control sockets serve only their own user.

Their 0600 mode already keeps other users out; the peer's uid (SO_PEERCRED, set by the kernel at
connect time, not claimed by the client) is a second check, so a socket made reachable by mistake
(a changed mode, a bind mount, an inherited descriptor) still lets no one else in. Root is let in:
it can read the store's files anyway.
"""

from __future__ import annotations

import os
import socket
import struct
from typing import Protocol

_UCRED = struct.Struct("3i")  # pid, uid, gid


class HasSockopt(Protocol):
    def getsockopt(self, level: int, optname: int, buflen: int, /) -> bytes: ...


def peer_uid(sock: HasSockopt) -> int:
    """The uid of the process that connected `sock` (a unix stream socket); OSError if unknown."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    _pid, uid, _gid = _UCRED.unpack(creds)
    return int(uid)


def peer_allowed(sock: HasSockopt) -> bool:
    """True when the peer runs as our own user or as root; False for anyone else or no answer."""
    try:
        uid = peer_uid(sock)
    except (OSError, struct.error):
        return False
    return uid in (os.getuid(), 0)
