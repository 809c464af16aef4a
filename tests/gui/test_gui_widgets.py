"""The console's pieces on their own: the timeline's keys and mark clicks, the per-second series
the charts draw, the hover read-out, hex dumps, and the words error dialogs use."""

from __future__ import annotations

import errno
from dataclasses import dataclass
from typing import Any

from PySide6.QtCore import QPoint, Qt
from rewind.engine.errors import CorruptionError, NoSpace, StoreLocked


@dataclass
class FakeMark:  # only the fields the timeline reads (a value, not an engine stand-in)
    name: str
    seq: int
    time_ns: int


@dataclass
class Row:
    t: int
    writes: int
    bytes: int
    journal_bytes: int


def test_timeline_keys_and_mark_clicks(app: Any, qtbot: Any) -> None:
    from rewind.app.views.timeline import Timeline

    tl = Timeline()
    tl.resize(800, 80)
    qtbot.addWidget(tl)
    tl.show()
    s = 10**9
    tl.set_range(100, 1000, 1000 * s, 1100 * s)
    marks = [FakeMark("a", 300, 1020 * s), FakeMark("b", 700, 1070 * s)]
    tl.set_marks(marks)
    seqs: list[int] = []
    times: list[int] = []
    tl.seqRequested.connect(seqs.append)
    tl.timeRequested.connect(times.append)
    tl.set_point(500, 1050 * s, at_now=False)
    qtbot.keyClick(tl, Qt.Key.Key_Left)
    assert seqs[-1] == 499
    tl.set_point(499, 1049 * s, at_now=False)
    qtbot.keyClick(tl, Qt.Key.Key_PageDown)
    assert seqs[-1] == 700
    qtbot.keyClick(tl, Qt.Key.Key_PageUp)
    assert seqs[-1] == 300
    qtbot.keyClick(tl, Qt.Key.Key_Home)
    assert seqs[-1] == 100
    # a click on a mark's tick goes to the mark; a click on the track asks for that time
    x = int(tl.x_of(marks[1].time_ns))
    qtbot.mouseClick(tl, Qt.MouseButton.LeftButton, pos=QPoint(x, 4))
    assert seqs[-1] == 700
    x = int(tl.x_of(1030 * s))
    qtbot.mouseClick(tl, Qt.MouseButton.LeftButton, pos=QPoint(x, 40))
    assert abs(times[-1] - 1030 * s) < 0.5 * s
    ends: list[bool] = []
    tl.nowRequested.connect(lambda: ends.append(True))
    qtbot.keyClick(tl, Qt.Key.Key_End)
    assert ends and tl.at_now


def test_series_steps_buckets_and_readout(app: Any) -> None:
    from rewind.app.stats import StatSeries
    from rewind.app.views.charts import Charts

    s = StatSeries()
    s.merge([Row(10, 1, 10**6, 1 << 20), Row(11, 2, 2 * 10**6, 2 << 20)], reset=True)
    s.merge([Row(11, 3, 3 * 10**6, 3 << 20), Row(15, 1, 10**6, 4 << 20)])  # second 11 grew
    assert s.t == [10, 11, 15] and s.writes == [1, 3, 1] and s.total_writes == 5
    ch = s.chart(until=20)
    assert list(ch.x[:5]) == [10, 10, 11, 11, 12]
    assert list(ch.mb[:6]) == [0, 1, 1, 3, 3, 0]  # zero again after the burst (quiet 12..15)
    assert ch.x[-1] == 20 and ch.ops[-1] == 0 and ch.journal[-1] == 4
    # a long history is bucketed: a week of seconds becomes at most MAX_BUCKETS buckets
    long = StatSeries()
    week = 7 * 86400
    long.merge([Row(t, 2, 4096 * 2, t) for t in range(0, week, 3)], reset=True)
    lc = long.chart(max_buckets=5000)
    assert lc.bucket_s == 300 and len(lc.t) <= 5000
    assert abs(float(lc.ops.max()) - 2 / 3) < 0.01  # 100 rows of 2 writes per 300 s bucket
    assert lc.total_writes == 2 * len(range(0, week, 3))
    c = Charts()
    one = StatSeries()
    one.merge([Row(10, 5, 5 * 10**6, 1 << 20)], reset=True)
    c.update_chart(one.chart(until=10.5), 9.5, 10.5)
    assert "5.00 MB/s" in c.readout_at(10.4) and "5 writes/s" in c.readout_at(10.4)
    assert "idle" in c.readout_at(13)


def test_hexdump_and_text_detection() -> None:
    from rewind.app.views.preview import hexdump, looks_like_text

    dump = hexdump(b"ABC\x00\xff" + bytes(20), base=0x1000)
    assert dump.splitlines()[0].startswith("00001000  41 42 43 00 ff") and "ABC.." in dump
    assert looks_like_text("héllo\n".encode()) and not looks_like_text(b"\x00\x01binary")


def test_error_words_say_what_to_do() -> None:
    from rewind.app.dialogs.errors import explain

    what, todo = explain(CorruptionError("record 7 failed its checksum", "/s/journal/0001", 4096))
    assert "damaged" in what and "offset 4096" in what and "Verify" in todo
    what, todo = explain(OSError(errno.ENOSPC, "No space left on device", "/x/out.img"))
    assert "disk is full" in what.lower() and "free" in todo.lower()
    what, todo = explain(FileNotFoundError(errno.ENOENT, "No such file", "/x/disk.img"))
    assert "/x/disk.img is missing" in what
    assert "Stop the other" in explain(StoreLocked("held by pid 7"))[1]
    assert "retention" in explain(NoSpace("journal full"))[1]
    assert "kept running" in explain(ValueError("boom"))[1]


def test_chart_mark_line_click(app: Any, qtbot: Any) -> None:
    from PySide6.QtCore import QPointF
    from rewind.app.views.charts import Charts

    c = Charts()
    c.resize(900, 400)
    qtbot.addWidget(c)
    c.show()
    qtbot.waitExposed(c)
    from rewind.app.stats import StatSeries

    series = StatSeries()
    series.merge([Row(1000, 5, 10**6, 1 << 20), Row(1010, 5, 10**6, 2 << 20)], reset=True)
    c.update_chart(series.chart(until=1011.0), 999.0, 1011.0)
    c.set_marks([FakeMark("m", 42, 1005 * 10**9)])
    app.processEvents()
    got: list[int] = []
    c.markClicked.connect(got.append)
    vb = c.journal_plot.vb
    y = vb.viewRange()[1][0] + 0.5 * (vb.viewRange()[1][1] - vb.viewRange()[1][0])
    scene_pt = vb.mapViewToScene(QPointF(1005.0, y))
    pt = c.glw.mapFromScene(scene_pt)
    qtbot.mouseClick(c.glw.viewport(), Qt.MouseButton.LeftButton, pos=pt)
    assert got == [42]
