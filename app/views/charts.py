"""Charts of one volume's whole history (pyqtgraph, time on DateAxisItem): write rate in MB/s and
writes/s, and the journal's size; the horizon, the marks and the slider's point as vertical
lines; downsampling and clip-to-view so long histories stay cheap; a hover read-out."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import QEvent, Qt, Signal
from PySide6.QtGui import QColor
from PySide6.QtWidgets import QLabel, QVBoxLayout, QWidget

from ..format import human_bytes, human_time
from ..stats import ChartData
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


class Charts(QWidget):
    """Write rate (MB/s with writes/s on a right axis) above journal size, sharing the time axis."""

    markClicked = Signal(object)  # seq

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        configure_charts()
        c = colors()
        self.chart: ChartData | None = None
        self.journal_xy: tuple[np.ndarray, np.ndarray] | None = None
        self.glw = pg.GraphicsLayoutWidget()
        self.glw.setMinimumHeight(220)
        self.glw.ci.setContentsMargins(4, 4, 4, 4)
        self.glw.ci.setSpacing(2)
        self.rate_plot = self.glw.addPlot(row=0, col=0, axisItems={"bottom": TimeAxis()}, enableMenu=False)
        self.journal_plot = self.glw.addPlot(row=1, col=0, axisItems={"bottom": TimeAxis()}, enableMenu=False)
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
        self.rate_plot.addLegend(offset=(-8, 4), labelTextSize="8pt", brush=pg.mkBrush(with_alpha(c.background, 0xcc)))
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
        self.horizon_lines = [self._vline(p, c.horizon, "horizon" if i == 0 else "", Qt.PenStyle.DashLine)
                              for i, p in enumerate(self._plots())]
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
        self._horizon_t: float | None = None
        self._colors = c

    def changeEvent(self, event: QEvent) -> None:
        """View > Light/Dark while running: the charts take the new colours at once."""
        if event.type() == QEvent.Type.PaletteChange and colors() is not self._colors:
            self.restyle()
        super().changeEvent(event)

    def restyle(self) -> None:
        """Every pen, brush and text of the charts in the palette in use now."""
        c = self._colors = colors()
        self.glw.setBackground(c.background)
        for plot in self._plots():
            for name in ("left", "right", "bottom"):
                axis = plot.getAxis(name)
                axis.setPen(pg.mkPen(c.text))
                axis.setTextPen(pg.mkPen(c.text))
        unit = "" if self.chart is None or self.chart.bucket_s == 1 else f" (per {self.chart.bucket_s} s)"
        self.rate_plot.setTitle(f"Writes{unit}", color=c.muted, size="9pt")
        self.rate_plot.legend.setBrush(pg.mkBrush(with_alpha(c.background, 0xcc)))
        self.rate_plot.legend.setLabelTextColor(c.text)
        for _sample, label in self.rate_plot.legend.items:
            label.setText(label.text)  # the colour applies when the text is set
        self.rate_curve.setPen(pg.mkPen(c.rate, width=2))
        self.rate_curve.setBrush(pg.mkBrush(with_alpha(c.rate, 0x40)))
        self.ops_curve.setPen(pg.mkPen(c.ops, width=1))
        self.journal_curve.setPen(pg.mkPen(c.journal, width=2))
        self.journal_curve.setBrush(pg.mkBrush(with_alpha(c.journal, 0x30)))
        for lines, color in ((self.horizon_lines, c.horizon), (self.cursor_lines, c.cursor)):
            for line in lines:
                pen = pg.mkPen(line.pen)
                pen.setColor(QColor(color))
                line.setPen(pen)
                if getattr(line, "label", None) is not None:
                    line.label.setColor(color)
        marks, self._marks = self._marks, []
        self.set_marks(marks)  # made again in the new colours

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
    def update_chart(self, chart: ChartData | None, horizon_t: float, head_t: float,
                     journal_xy: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        """Show new arrays (None: unchanged since the last call), and move the ranges only in
        steps: axis labels are re-rendered whenever a range moves, most of a repaint's cost.
        `journal_xy`: the journal curve with the sizes measured after fades (drops) spliced in."""
        now = max(time.time(), head_t)
        if chart is not None:
            self.chart = chart
            self.journal_xy = journal_xy
            jx, jy = journal_xy if journal_xy is not None else (chart.x, chart.journal)
            self.rate_curve.setData(chart.x, chart.mb)
            self.ops_curve.setData(chart.x, chart.ops)
            self.journal_curve.setData(jx, jy)
            # both y axes start at zero so the two rate curves share a baseline; headroom keeps
            # the ranges (and their labels) still while the values wander
            self._grow_y(self.rate_plot.vb, float(chart.mb.max()) if len(chart.mb) else 0.0, 0.1)
            self._grow_y(self.ops_view, float(chart.ops.max()) if len(chart.ops) else 0.0, 1.0)
            self._grow_y(self.journal_plot.vb, float(jy.max()) if len(jy) else 0.0, 0.1)
            unit = "" if chart.bucket_s == 1 else f" (per {chart.bucket_s} s)"
            self.rate_plot.setTitle(f"Writes{unit}", color=colors().muted, size="9pt")
        first = float(self.chart.x[0]) if self.chart is not None and len(self.chart.x) else horizon_t
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
        shown = marks[-200:]  # the newest 200 marks as lines; all of them stay on the timeline
        for k, m in enumerate(shown):
            for i, plot in enumerate(self._plots()):
                line = pg.InfiniteLine(pos=m.time_ns / 1e9, angle=90, movable=False,
                                       pen=pg.mkPen(c.mark, width=1, style=Qt.PenStyle.DashLine))
                if i == 1 and len(shown) <= 16:
                    # names along the top of the journal chart, staggered so neighbours do not collide
                    pg.InfLineLabel(line, text=m.name, position=0.93 - 0.14 * (k % 4), anchor=(0, 0.5),
                                    color=c.mark, fill=with_alpha(c.background, 0xc0))
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
        r = self.chart.readout(x) if self.chart is not None else None
        if r is None:
            return "no writes yet"
        start, mbs, ops, journal = r
        if self.journal_xy is not None:
            jx, jy = self.journal_xy
            k = int(np.searchsorted(jx, x, "right")) - 1
            if k >= 0:
                journal = int(float(jy[k]) * 2**20)
        when = human_time(int(x * 1e9))
        if mbs == 0 and ops == 0:
            return f"{when}   idle   journal {human_bytes(journal)}"
        return f"{when}   {mbs:.2f} MB/s   {ops:.0f} writes/s   journal {human_bytes(journal)}"
