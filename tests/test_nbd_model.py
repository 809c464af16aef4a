"""Model-based test through NBD: random histories of writes (overlapping, unaligned), zeroes,
trims, flushes, marks, pipelined bursts and reopens go through a real NBD connection; then every
recorded point, read back through its own `at=seq:N` (and `at=mark:NAME`) export, must equal a
plain bytearray model copied at that moment."""

from __future__ import annotations

import random
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rewind.engine.frontends.nbd import protocol as P
from rewind.engine.frontends.nbd.protocol import NbdClient
from rewind.engine.frontends.nbd.server import NbdServer
from rewind.engine.store import Store

SIZE = 128 * 1024

offsets = st.one_of(st.integers(0, SIZE - 1), st.sampled_from([0, 4096, 4095, 8192, SIZE - 4096, SIZE - 1]))
lengths = st.one_of(st.integers(1, 20000), st.sampled_from([1, 511, 4096, 8192, 65536]))
write_op = st.tuples(st.just("write"), offsets, lengths, st.integers(0, 2**32), st.booleans())
zero_op = st.tuples(st.just("zero"), offsets, lengths, st.booleans(), st.booleans())
trim_op = st.tuples(st.just("trim"), offsets, lengths, st.booleans(), st.just(False))
wtype = st.one_of(write_op, write_op, zero_op, trim_op)
ops = st.lists(
    st.one_of(
        wtype, wtype, wtype,
        st.tuples(st.just("burst"), st.lists(wtype, min_size=2, max_size=8)),
        st.tuples(st.just("flush")),
        st.tuples(st.just("mark")),
        st.tuples(st.just("reopen")),
    ),
    min_size=1,
    max_size=25,
)


def payload(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


def request(op: tuple[Any, ...], model: bytearray) -> tuple[int, int, int, bytes]:
    """(cmd, offset, length, data) for a write-type op, applied to the model as well."""
    kind, off, n, a, b = op
    n = min(n, SIZE - off)
    if kind == "write":
        data = payload(a, n)
        model[off : off + n] = data
        return P.CMD_WRITE, off, n, data
    model[off : off + n] = bytes(n)
    if kind == "zero":
        return P.CMD_WRITE_ZEROES, off, n, b""
    return P.CMD_TRIM, off, n, b""


def flags_of(op: tuple[Any, ...]) -> int:
    kind, _off, _n, a, b = op
    fua = (b if kind == "write" else a) and P.CMD_FLAG_FUA
    no_hole = kind == "zero" and b and P.CMD_FLAG_NO_HOLE
    return int(fua or 0) | int(no_hole or 0)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(history=ops)
def test_every_point_reads_back_through_nbd(history: list[tuple[Any, ...]]) -> None:
    check_history(history)


def check_history(history: list[tuple[Any, ...]]) -> None:
    with tempfile.TemporaryDirectory(prefix="nbdmodel-") as tmp:
        d = Path(tmp)
        store = Store.create(d / "disk.img", d / "store", size=SIZE)
        srv = NbdServer(store, f"unix:{d / 's'}").start()
        c = NbdClient.connect(srv.address, "")
        model = bytearray(SIZE)
        points: dict[int, bytes] = {store.head: bytes(model)}
        marks: dict[str, bytes] = {}
        try:
            for op in history:
                kind = op[0]
                if kind in ("write", "zero", "trim"):
                    cmd, off, n, data = request(op, model)
                    c._call(cmd, off, n, data, flags_of(op))
                elif kind == "burst":
                    # all requests sent before any reply is read: the server batches them, and the
                    # trailing read must see every write queued before it
                    blob = bytearray()
                    for i, sub in enumerate(op[1]):
                        cmd, off, n, data = request(sub, model)
                        blob += P.S_REQUEST.pack(P.REQUEST_MAGIC, flags_of(sub), cmd, i, off, n) + data
                    blob += P.S_REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_READ, 999, 0, SIZE)
                    c.sock.sendall(blob)
                    for _ in op[1]:
                        _cookie, err, _ = c.recv_reply()
                        assert err == 0
                    cookie, err, got = c.recv_reply(SIZE)
                    assert (cookie, err) == (999, 0) and got == model
                elif kind == "flush":
                    c.flush()
                elif kind == "mark":
                    name = f"m{len(marks)}"
                    store.mark(name)
                    marks[name] = bytes(model)
                elif kind == "reopen":
                    c.disconnect()
                    srv.stop()
                    store.close()
                    store = Store.open(d / "store")
                    srv = NbdServer(store, f"unix:{d / 's'}").start()
                    c = NbdClient.connect(srv.address, "")
                points[store.head] = bytes(model)
            assert c.read(0, SIZE) == model
            c.disconnect()
            for seq, want in points.items():
                with NbdClient.connect(srv.address, f"at=seq:{seq}") as past:
                    assert past.flags & P.TF_READ_ONLY
                    assert past.read(0, SIZE) == want, f"seq:{seq}"
            for name, want in marks.items():
                with NbdClient.connect(srv.address, f"at=mark:{name}") as past:
                    assert past.read(0, SIZE) == want, f"mark:{name}"
        finally:
            srv.stop()
            store.close()
