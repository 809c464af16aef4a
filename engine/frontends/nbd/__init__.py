"""NBD front end: the live volume (export "") and every past point in time (export "at=POINT",
read-only) served over the Network Block Device protocol, for QEMU, nbdfuse, nbdcopy, qemu-img, fio.

`NbdServer(store, "unix:PATH" | "tcp:HOST:PORT").start()` / `.stop()`; wire format in `protocol`.
"""

from .server import NbdServer

__all__ = ["NbdServer"]
