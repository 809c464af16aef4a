"""Charts of one volume's whole history (pyqtgraph, time on DateAxisItem): write rate in MB/s and
writes/s, and the journal's size; the horizon, the marks and the slider's point as vertical
lines; downsampling and clip-to-view so long histories stay cheap; a hover read-out."""

from __future__ import annotations

import bisect
import time
from typing import Any

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QColor
from PySide6.QtWidgets import QLabel, QVBoxLayout, QWidget

from ..format import human_bytes, human_time
from ..theme import colors, configure_charts


def with_alpha(color: str | QColor, alpha: int) -> QColor:
    """A colour with transparency (Qt reads 8-digit hex as #AARRGGBB, not #RRGGBBAA)."""
    c = QColor(color)
    c.setAlpha(alpha)
    return c


class TimeAxis(pg.DateAxisItem):
    """DateAxisItem that labels whole seconds as wall-clock times (12:42:49), not as '49.000'."""

    def tickStrings(self, values: list[float], scale: float, spacing: float) -> list[str]:
        if spacing >= 86400:
            fmt = "%b %d"
        elif spacing >= 60:
            fmt = "%H:%M"
        elif spacing >= 1 or all(float(v).is_integer() for v in values):
            fmt = "%H:%M:%S"
        else:
            fmt = "%H:%M:%S.ms"
        out = []
        for v in values:
            try:
                if fmt.endswith(".ms") and not float(v).is_integer():
                    out.append(f".{int(round((v % 1) * 1000)):03d}")  # short: the whole seconds carry the time
                else:
                    out.append(time.strftime(fmt.replace(".ms", ""), time.localtime(v)))
            except (OverflowError, ValueError, OSError):
                out.append("")
        return out


class StatSeries:
    """Per-second rows, merged as snapshots arrive (the newest second is replaced as it grows)."""

    def __init__(self) -> None:
        self.t: list[int] = []
        self.writes: list[int] = []
        self.bytes: list[int] = []
        self.journal: list[int] = []

    def merge(self, rows: list[Any], reset: bool) -> None:
        if reset:
            self.__init__()  # type: ignore[misc]
        for r in rows:
            t = int(r.t)
            if self.t and t <= self.t[-1]:
                i = bisect.bisect_left(self.t, t)
                if i < len(self.t) and self.t[i] == t:
                    self.writes[i], self.bytes[i], self.journal[i] = int(r.writes), int(r.bytes), int(r.journal_bytes)
                    continue
                continue  # older than what we have and not a known second: ignore
            self.t.append(t)
            self.writes.append(int(r.writes))
            self.bytes.append(int(r.bytes))
            self.journal.append(int(r.journal_bytes))

    def arrays(self, until: float | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """x (s), MB/s, writes/s, journal MiB as steps: each row covers its second [t, t+1), and
        the rates drop to zero over quiet gaps (rows exist only for seconds with writes), so a
        burst inside one second still shows as a bar."""
        if not self.t:
            return (np.zeros(0),) * 4  # type: ignore[return-value]
        t = np.asarray(self.t, dtype=np.float64)
        w = np.asarray(self.writes, dtype=np.float64)
        b = np.asarray(self.bytes, dtype=np.float64) / 1e6
        j = np.asarray(self.journal, dtype=np.float64) / 2**20
        n = len(t)
        gap = np.append(t[1:] > t[:-1] + 1, True)  # a quiet stretch (or the end) after row i
        # per row: (t, v), (t+1, v), and after a gap (t+1, 0) for the rates
        x = np.column_stack([t, t + 1, t + 1]).ravel()
        keep = np.column_stack([np.ones(n, bool), np.ones(n, bool), gap]).ravel()

        def rate(v: np.ndarray) -> np.ndarray:
            return np.column_stack([v, v, np.zeros(n)]).ravel()[keep]

        x = x[keep]
        mb, ops = rate(b), rate(w)
        jr = np.column_stack([j, j, j]).ravel()[keep]
        # the zero of a gap starts the next burst from zero as well
        starts = np.concatenate([[True], gap[:-1]])
        sx = t[starts]
        x = np.concatenate([x, sx])
        mb = np.concatenate([mb, np.zeros(len(sx))])
        ops = np.concatenate([ops, np.zeros(len(sx))])
        prev_j = np.concatenate([[0.0], j[:-1]])[starts]
        jr = np.concatenate([jr, prev_j])
        order = np.lexsort((np.concatenate([np.ones(len(x) - len(sx)), np.zeros(len(sx))]), x))
        x, mb, ops, jr = x[order], mb[order], ops[order], jr[order]
        if until is not None and until > x[-1]:
            x = np.append(x, until)
            mb = np.append(mb, 0.0)
            ops = np.append(ops, 0.0)
            jr = np.append(jr, jr[-1])
        return x, mb, ops, jr


class Charts(QWidget):
    """Write rate (MB/s with writes/s on a right axis) above journal size, sharing the time axis."""

    markClicked = Signal(object)  # seq

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        configure_charts()
        c = colors()
        self.series = StatSeries()
        self.glw = pg.GraphicsLayoutWidget()
        self.glw.setMinimumHeight(220)
        self.glw.ci.setContentsMargins(4, 4, 4, 4)
        self.glw.ci.setSpacing(2)
        self.rate_plot = self.glw.addPlot(row=0, col=0, axisItems={"bottom": TimeAxis()})
        self.journal_plot = self.glw.addPlot(row=1, col=0, axisItems={"bottom": TimeAxis()})
        self.glw.ci.layout.setRowStretchFactor(0, 3)
        self.glw.ci.layout.setRowStretchFactor(1, 2)
        for p in (self.rate_plot, self.journal_plot):
            p.setDownsampling(auto=True, mode="peak")
            p.setClipToView(True)
            p.showGrid(x=True, y=True, alpha=0.15)
            p.setMenuEnabled(False)
            p.getAxis("left").setWidth(52)
            p.getAxis("left").enableAutoSIPrefix(False)
            p.setMouseEnabled(x=True, y=False)
            p.vb.sigRangeChangedManually.connect(self._user_zoomed)
        self.journal_plot.setXLink(self.rate_plot)
        self.rate_plot.hideAxis("bottom")
        self.rate_plot.setLabel("left", "MB/s")
        self.journal_plot.setLabel("left", "journal MiB")
        self.rate_plot.setTitle("Writes", color=c.muted, size="9pt")
        self.rate_plot.addLegend(offset=(8, 4), labelTextSize="8pt", brush=pg.mkBrush(with_alpha(c.background, 0xcc)))
        self.rate_curve = self.rate_plot.plot(
            pen=pg.mkPen(c.rate, width=2), fillLevel=0, brush=pg.mkBrush(with_alpha(c.rate, 0x40)),
            name="MB/s")
        # writes/s on its own right-hand axis (a second ViewBox linked in x)
        self.ops_view = pg.ViewBox()
        self.rate_plot.showAxis("right")
        self.rate_plot.scene().addItem(self.ops_view)
        self.rate_plot.getAxis("right").linkToView(self.ops_view)
        self.rate_plot.getAxis("right").setLabel("writes/s")
        self.rate_plot.getAxis("right").enableAutoSIPrefix(False)
        self.ops_view.setXLink(self.rate_plot)
        self.ops_view.setMouseEnabled(x=False, y=False)
        self.ops_curve = pg.PlotDataItem(pen=pg.mkPen(c.ops, width=1))
        self.ops_curve.setDownsampling(auto=True, method="peak")
        self.ops_curve.setClipToView(True)
        self.ops_view.addItem(self.ops_curve)
        self.rate_plot.legend.addItem(self.ops_curve, "writes/s")
        self.rate_plot.vb.sigResized.connect(self._sync_views)
        self.journal_plot.getAxis("right").setWidth(52)
        self.journal_plot.showAxis("right")
        self.journal_plot.getAxis("right").setStyle(showValues=False)
        self.journal_curve = self.journal_plot.plot(pen=pg.mkPen(c.journal, width=2), fillLevel=0,
                                                    brush=pg.mkBrush(with_alpha(c.journal, 0x30)))
        self.horizon_lines = [self._vline(p, c.horizon, "horizon", Qt.PenStyle.DashLine) for p in self._plots()]
        self.cursor_lines = [self._vline(p, c.cursor, "", Qt.PenStyle.SolidLine, width=2) for p in self._plots()]
        self.mark_lines: list[pg.InfiniteLine] = []
        self._marks: list[Any] = []
        self.readout = QLabel(" ")
        self.readout.setObjectName("muted")
        self.readout.setAlignment(Qt.AlignmentFlag.AlignRight)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.setSpacing(0)
        lay.addWidget(self.glw)
        lay.addWidget(self.readout)
        self._hover = pg.SignalProxy(self.glw.scene().sigMouseMoved, rateLimit=30, slot=self._on_hover)
        self.glw.scene().sigMouseClicked.connect(self._on_click)
        self._follow = True
        self._span: tuple[float, float] | None = None
        self._data_until: float | None = None
        self._horizon_t: float | None = None

    def _user_zoomed(self, *args: Any) -> None:
        """The user zoomed or panned: stop following the whole history until a double click."""
        self._follow = False

    def mouseDoubleClickEvent(self, event: Any) -> None:
        self._follow = True
        if self._span is not None:
            self.rate_plot.setXRange(*self._span, padding=0.02)
        super().mouseDoubleClickEvent(event)

    def _plots(self) -> list[Any]:
        return [self.rate_plot, self.journal_plot]

    def _vline(self, plot: Any, color: str, label: str, style: Qt.PenStyle, width: float = 1.2) -> pg.InfiniteLine:
        line = pg.InfiniteLine(angle=90, movable=False, pen=pg.mkPen(color, width=width, style=style))
        if label:
            line.label = pg.InfLineLabel(line, text=label, position=0.92, color=color, anchors=[(0, 0), (0, 0)])
        line.setVisible(False)
        plot.addItem(line, ignoreBounds=True)
        return line

    def _sync_views(self) -> None:
        self.ops_view.setGeometry(self.rate_plot.vb.sceneBoundingRect())
        self.ops_view.linkedViewChanged(self.rate_plot.vb, self.ops_view.XAxis)

    # -- data ----------------------------------------------------------------------------------
    def update_stats(self, rows: list[Any], reset: bool, horizon_t: float, head_t: float) -> None:
        """Merge new rows and redraw, but only what changed: axis labels are re-rendered whenever
        a range moves, and that is most of a repaint's cost, so the ranges move in steps."""
        self.series.merge(rows, reset)
        now = max(time.time(), head_t)
        if rows or reset or self._data_until is None:
            x, mb, ops, journal = self.series.arrays(until=now)
            self.rate_curve.setData(x, mb)
            self.ops_curve.setData(x, ops)
            self.journal_curve.setData(x, journal)
            self._data_until = now
            # both y axes start at zero so the two rate curves share a baseline; headroom keeps
            # the ranges (and their labels) still while the values wander
            self._grow_y(self.rate_plot.vb, float(mb.max()) if len(mb) else 0.0, 0.1)
            self._grow_y(self.ops_view, float(ops.max()) if len(ops) else 0.0, 1.0)
            self._grow_y(self.journal_plot.vb, float(journal.max()) if len(journal) else 0.0, 0.1)
            first = float(x[0]) if len(x) else horizon_t
        else:
            first = float(self.series.t[0]) if self.series.t else horizon_t
        if horizon_t != self._horizon_t:
            self._horizon_t = horizon_t
            for line in self.horizon_lines:
                line.setPos(horizon_t)
                line.setVisible(True)
        lo = min(horizon_t, first) - 1
        if self._follow:
            cur_lo, cur_hi = self._span or (None, None)
            if cur_lo != lo or cur_hi is None or now + 1 > cur_hi:
                headroom = max(5.0, 0.15 * (now - lo))
                self._span = (lo, now + headroom)
                self.rate_plot.setXRange(*self._span, padding=0)

    def _grow_y(self, vb: Any, peak: float, floor: float) -> None:
        """Set the y range to [0, peak*1.25] when the peak leaves [40%, 100%] of the range."""
        top = vb.viewRange()[1][1]
        if peak > top or peak < 0.4 * top or top <= floor * 1.01 and peak > floor:
            vb.setYRange(0, max(floor, peak * 1.25), padding=0)

    def set_marks(self, marks: list[Any]) -> None:
        key = [(m.name, m.seq) for m in marks]
        if key == [(m.name, m.seq) for m in self._marks]:
            return
        self._marks = list(marks)
        for line in self.mark_lines:
            line.getViewBox() and line.getViewBox().removeItem(line)
        self.mark_lines.clear()
        c = colors()
        for m in marks[-200:]:  # the newest 200 marks as lines; all of them stay on the timeline
            for i, plot in enumerate(self._plots()):
                line = pg.InfiniteLine(pos=m.time_ns / 1e9, angle=90, movable=False,
                                       pen=pg.mkPen(c.mark, width=1, style=Qt.PenStyle.DashLine))
                if i == 0 and len(marks) <= 40:
                    pg.InfLineLabel(line, text=m.name, position=0.78, rotateAxis=(1, 0), anchor=(1, 1),
                                    color=c.mark)
                plot.addItem(line, ignoreBounds=True)
                self.mark_lines.append(line)

    def set_cursor(self, t_s: float | None) -> None:
        for line in self.cursor_lines:
            if t_s is None:
                line.setVisible(False)
            else:
                line.setPos(t_s)
                line.setVisible(True)

    # -- hover read-out --------------------------------------------------------------------------
    def _on_hover(self, evt: tuple[Any, ...]) -> None:
        pos = evt[0]
        for plot in self._plots():
            if plot.sceneBoundingRect().contains(pos):
                x = plot.vb.mapSceneToView(pos).x()
                self.readout.setText(self.readout_at(x))
                return

    def _on_click(self, event: Any) -> None:
        """A click near a mark's line goes to that mark (same as its tick on the timeline)."""
        pos = event.scenePos()
        for plot in self._plots():
            if not plot.sceneBoundingRect().contains(pos) or not self._marks:
                continue
            vb = plot.vb
            x = vb.mapSceneToView(pos).x()
            px_per_s = vb.width() / max(1e-9, vb.viewRange()[0][1] - vb.viewRange()[0][0])
            m = min(self._marks, key=lambda m: abs(m.time_ns / 1e9 - x))
            if abs(m.time_ns / 1e9 - x) * px_per_s <= 6:
                self.markClicked.emit(int(m.seq))
            return

    def readout_at(self, x: float) -> str:
        s = self.series
        if not s.t:
            return "no writes yet"
        sec = int(x)
        i = bisect.bisect_left(s.t, sec)
        when = human_time(sec * 10**9)
        if i < len(s.t) and s.t[i] == sec:
            return (f"{when}   {s.bytes[i] / 1e6:.2f} MB/s   {s.writes[i]} writes/s   "
                    f"journal {human_bytes(s.journal[i])}")
        journal = s.journal[i - 1] if i > 0 else 0
        return f"{when}   idle   journal {human_bytes(journal)}"
