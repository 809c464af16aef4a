"""The timeline: a slider from the horizon to now with the write density drawn under it and the
marks as ticks you can click. Drag or click anywhere to pick a time; Left/Right (or the wheel)
step one record, PageUp/PageDown (or Ctrl+Left/Right, Ctrl+wheel) jump mark to mark, Home/End go
to the horizon/now.

With retention bands set, the track is tinted by how finely the policy keeps each stretch (every
write, hourly, daily...), and the stretch that the next fade removes is hatched up to where the
horizon will move."""

from __future__ import annotations

import bisect
from typing import Any

import numpy as np
from PySide6.QtCore import QPointF, QRectF, QSize, Qt, Signal
from PySide6.QtGui import QBrush, QColor, QKeyEvent, QMouseEvent, QPainter, QPainterPath, QPaintEvent, QPen
from PySide6.QtWidgets import QSizePolicy, QToolTip, QWidget

from ..format import human_time
from ..theme import colors

MARGIN = 14
TICK_ZONE = 14  # mark ticks live above the track
TRACK_H = 34
LABEL_H = 18  # the horizon's and now's times under the track


class Timeline(QWidget):
    """Picks a point in time. Emits timeRequested(ns) while dragging, seqRequested(seq) for
    keyboard steps and mark clicks; the owner answers with set_point() once it knows the seq."""

    timeRequested = Signal(object)  # ns (int; may exceed 2**31, hence object)
    seqRequested = Signal(object)  # seq
    nowRequested = Signal()

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setFocusPolicy(Qt.FocusPolicy.StrongFocus)
        self.setMouseTracking(True)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        self.setAccessibleName("Timeline")
        self.t_min = 0
        self.t_max = 1
        self.horizon_seq = 0
        self.head_seq = 0
        self.seq = 0
        self.t_point = 0
        self.at_now = True
        self.marks: list[Any] = []
        self._mark_times: list[int] = []
        self.density = np.zeros(0)
        self._density_src: tuple[np.ndarray, np.ndarray] = (np.zeros(0), np.zeros(0))
        self._bucket_s = 1.0
        self._dragging = False
        self._drag_x = -1.0  # where the last drag move was (a release there keeps the point)
        self.bands: list[Any] = []  # link.Band: lo_ns, hi_ns, step_ns, label
        self.new_horizon_ns: int | None = None
        self.interactive = True  # False: a picture (the retention page), no handle, no input

    def sizeHint(self) -> QSize:
        return QSize(600, TRACK_H + TICK_ZONE + LABEL_H)

    def minimumSizeHint(self) -> QSize:
        return QSize(200, TRACK_H + TICK_ZONE + LABEL_H)

    # -- model ----------------------------------------------------------------------------------
    def set_range(self, horizon_seq: int, head_seq: int, t_min: int, t_max: int) -> None:
        self.horizon_seq, self.head_seq = horizon_seq, head_seq
        self.t_min, self.t_max = t_min, max(t_max, t_min + 1)
        if self.at_now:
            self.seq, self.t_point = head_seq, self.t_max
        self._rebin()
        self.update()

    def set_marks(self, marks: list[Any]) -> None:
        self.marks = sorted(marks, key=lambda m: m.seq)
        self._mark_times = [int(m.time_ns) for m in self.marks]
        self.update()

    def set_density(self, t_s: np.ndarray, writes: np.ndarray, bucket_s: float = 1.0) -> None:
        """Write counts per bucket (x: bucket middles in seconds) to draw under the track."""
        self._density_src = (t_s, writes)
        self._bucket_s = bucket_s
        self._rebin()
        self.update()

    def set_retention(self, bands: list[Any], new_horizon_ns: int | None = None) -> None:
        """Tint the track by retention tier; hatch what fades before `new_horizon_ns`."""
        self.bands = list(bands)
        self.new_horizon_ns = new_horizon_ns
        self.update()

    def set_point(self, seq: int, t_ns: int, at_now: bool | None = None) -> None:
        """Where the handle is: the resolved record and its time."""
        self.seq, self.t_point = seq, t_ns
        if at_now is not None:
            self.at_now = at_now
        self.update()

    def _rebin(self) -> None:
        t_s, writes = self._density_src
        span_s = max(1.0, (self.t_max - self.t_min) / 1e9)
        # a bin spans at least two buckets: narrower bins alias into empty stripes between
        # buckets that all had writes
        bins = int(max(1, min((self.width() - 2 * MARGIN) // 3, span_s / (2 * self._bucket_s))))
        if not len(t_s):
            self.density = np.zeros(bins)
            return
        lo, hi = self.t_min / 1e9, self.t_max / 1e9
        if hi <= lo:
            hi = lo + 1
        # t_s are the middles of the buckets; clamp them into the drawn span
        hist, _ = np.histogram(np.clip(t_s, lo, hi), bins=bins, range=(lo, hi), weights=writes)
        peak = hist.max() if hist.size else 0
        self.density = np.sqrt(hist / peak) if peak > 0 else hist

    # -- geometry -------------------------------------------------------------------------------
    def _track(self) -> QRectF:
        return QRectF(MARGIN, TICK_ZONE, self.width() - 2 * MARGIN, TRACK_H)

    def x_of(self, t_ns: int) -> float:
        tr = self._track()
        f = (t_ns - self.t_min) / max(1, self.t_max - self.t_min)
        return tr.left() + max(0.0, min(1.0, f)) * tr.width()

    def t_of(self, x: float) -> int:
        tr = self._track()
        f = (x - tr.left()) / max(1.0, tr.width())
        f = max(0.0, min(1.0, f))
        return int(self.t_min + f * (self.t_max - self.t_min))

    def mark_near(self, x: float, y: float, tol: float = 6.0) -> Any:
        if y > TICK_ZONE + TRACK_H * 0.35:
            return None
        best, best_d = None, tol
        for m in self.marks:
            d = abs(self.x_of(int(m.time_ns)) - x)
            if d <= best_d:
                best, best_d = m, d
        return best

    # -- painting -------------------------------------------------------------------------------
    def resizeEvent(self, event: Any) -> None:
        self._rebin()
        super().resizeEvent(event)

    def paintEvent(self, event: QPaintEvent) -> None:
        c = colors()
        p = QPainter(self)
        p.setRenderHint(QPainter.RenderHint.Antialiasing)
        tr = self._track()
        path = QPainterPath()
        path.addRoundedRect(tr, 6, 6)
        p.fillPath(path, QColor(c.background))
        p.setPen(QPen(self.palette().mid().color(), 1))
        p.drawPath(path)
        self._paint_retention(p, tr)
        # write density
        if self.density.size:
            bw = tr.width() / self.density.size
            color = QColor(c.rate)
            color.setAlpha(150)
            for i, v in enumerate(self.density):
                if v <= 0:
                    continue
                h = max(1.5, float(v) * (tr.height() - 6))
                p.fillRect(QRectF(tr.left() + i * bw, tr.bottom() - 3 - h, max(1.0, bw - 0.5), h), color)
        # marks
        mark_color = QColor(c.mark)
        p.setPen(QPen(mark_color, 1.4))
        for m in self.marks:
            x = self.x_of(int(m.time_ns))
            p.drawLine(QPointF(x, TICK_ZONE - 2), QPointF(x, tr.bottom()))
            tri = QPainterPath()
            tri.moveTo(x - 5, 2)
            tri.lineTo(x + 5, 2)
            tri.lineTo(x, TICK_ZONE - 2)
            tri.closeSubpath()
            p.fillPath(tri, mark_color)
        # handle
        if self.interactive:
            x = self.x_of(self.t_point)
            accent = QColor(c.cursor)
            p.setPen(QPen(accent, 2.5))
            p.drawLine(QPointF(x, tr.top() - 2), QPointF(x, tr.bottom() + 2))
            p.setBrush(accent)
            p.setPen(QPen(QColor(c.background), 2))
            p.drawEllipse(QPointF(x, tr.center().y()), 7, 7)
        # the ends: the horizon (oldest readable point) and now
        p.setPen(QColor(c.muted))
        font = p.font()
        font.setPointSizeF(max(7.0, font.pointSizeF() * 0.85))
        p.setFont(font)
        label_y = tr.bottom() + 3
        p.drawText(QRectF(tr.left(), label_y, 260, LABEL_H - 3), Qt.AlignmentFlag.AlignLeft,
                   f"horizon {human_time(self.t_min)}")
        p.drawText(QRectF(tr.right() - 260, label_y, 260, LABEL_H - 3), Qt.AlignmentFlag.AlignRight, "now")
        if self.hasFocus():
            p.setPen(QPen(QColor(c.accent), 1, Qt.PenStyle.DotLine))
            p.setBrush(Qt.BrushStyle.NoBrush)
            p.drawRoundedRect(tr.adjusted(-3, -3, 3, 3), 8, 8)
        p.end()

    def _paint_retention(self, p: QPainter, tr: QRectF) -> None:
        """Tiers as tinted stretches with their names; the stretch that fades hatched."""
        if not self.bands and self.new_horizon_ns is None:
            return
        c = colors()
        p.save()
        clip = QPainterPath()
        clip.addRoundedRect(tr, 6, 6)
        p.setClipPath(clip)
        font = p.font()
        font.setPointSizeF(max(7.0, font.pointSizeF() * 0.8))
        p.setFont(font)
        for i, b in enumerate(self.bands):
            lo, hi = max(int(b.lo_ns), self.t_min), min(int(b.hi_ns), self.t_max)
            if hi <= self.t_min or lo >= self.t_max or hi <= lo:
                continue
            x0, x1 = self.x_of(lo), self.x_of(hi)
            color = QColor(c.added if b.step_ns == 0 else c.accent)
            color.setAlpha(max(30, 110 - 30 * i) if self.density.size == 0 or not self.density.any()
                           else max(18, 70 - 22 * i))
            p.fillRect(QRectF(x0, tr.top(), x1 - x0, tr.height()), color)
            if i:
                p.setPen(QPen(QColor(c.muted), 1, Qt.PenStyle.DotLine))
                p.drawLine(QPointF(x1, tr.top()), QPointF(x1, tr.bottom()))
            if x1 - x0 > 50:
                p.setPen(QColor(c.text))
                p.drawText(QRectF(x0 + 4, tr.top() + 1, x1 - x0 - 8, 14),
                           Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignVCenter, str(b.label))
        if self.new_horizon_ns is not None and self.new_horizon_ns > self.t_min:
            xh = self.x_of(self.new_horizon_ns)
            hatch = QColor(c.deleted)
            hatch.setAlpha(110)
            p.fillRect(QRectF(tr.left(), tr.top(), xh - tr.left(), tr.height()),
                       QBrush(hatch, Qt.BrushStyle.BDiagPattern))
            if self.bands and int(self.bands[-1].lo_ns) > self.new_horizon_ns:
                # past the last tier but after a pinned mark: those points merge away, history stays
                xe = self.x_of(int(self.bands[-1].lo_ns))
                hatch.setAlpha(50)
                p.fillRect(QRectF(xh, tr.top(), xe - xh, tr.height()), QBrush(hatch, Qt.BrushStyle.BDiagPattern))
            p.setPen(QPen(QColor(c.horizon), 2, Qt.PenStyle.DashLine))
            p.drawLine(QPointF(xh, tr.top()), QPointF(xh, tr.bottom()))
            if xh - tr.left() > 40:
                p.setPen(QColor(c.deleted))
                p.drawText(QRectF(tr.left() + 4, tr.bottom() - 15, xh - tr.left() - 8, 14),
                           Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter, "fades")
        p.restore()

    # -- mouse ----------------------------------------------------------------------------------
    def mousePressEvent(self, event: QMouseEvent) -> None:
        if event.button() != Qt.MouseButton.LeftButton or not self.interactive:
            return
        pos = event.position()
        m = self.mark_near(pos.x(), pos.y())
        if m is not None:
            self.jump_to_mark(m)
            return
        self._dragging = True
        self._drag_to(pos.x())

    def mouseMoveEvent(self, event: QMouseEvent) -> None:
        if not self.interactive:
            return
        pos = event.position()
        if self._dragging:
            self._drag_to(pos.x())
            return
        m = self.mark_near(pos.x(), pos.y())
        if m is not None:
            QToolTip.showText(event.globalPosition().toPoint(), f"mark: {m.name}\nclick to go there", self)
            self.setCursor(Qt.CursorShape.PointingHandCursor)
        else:
            self.unsetCursor()

    def mouseReleaseEvent(self, event: QMouseEvent) -> None:
        if self._dragging:
            self._dragging = False
            # let go where the last move was: the point stays. Asking again would map the same x
            # to a later time (now moved on meanwhile) and the record would move by itself
            if abs(event.position().x() - self._drag_x) >= 0.5:
                self._drag_to(event.position().x())

    def _drag_to(self, x: float) -> None:
        self._drag_x = x
        tr = self._track()
        if x >= tr.right() - 1:
            self.at_now = True
            self.t_point = self.t_max
            self.update()
            self.nowRequested.emit()
            return
        self.at_now = False
        self.t_point = self.t_of(x)
        self.update()
        self.timeRequested.emit(self.t_point)

    def jump_to_mark(self, m: Any) -> None:
        self.at_now = False
        self.seq, self.t_point = int(m.seq), int(m.time_ns)
        self.update()
        self.seqRequested.emit(int(m.seq))

    def wheelEvent(self, event: Any) -> None:
        """The wheel steps one record per notch (Ctrl: mark to mark)."""
        notches = event.angleDelta().y() // 120
        if not notches or not self.interactive:
            return
        if event.modifiers() & Qt.KeyboardModifier.ControlModifier:
            self.step_mark(-1 if notches > 0 else 1)
        else:
            self.step(-notches)
        event.accept()

    # -- keyboard -------------------------------------------------------------------------------
    def step(self, n: int) -> None:
        """Move n records (negative: back)."""
        seq = max(self.horizon_seq, min(self.head_seq, self.seq + n))
        self.at_now = seq >= self.head_seq
        self.seq = seq
        self.seqRequested.emit(seq)

    def step_mark(self, direction: int) -> None:
        """To the previous (-1) or next (+1) mark from the handle."""
        seqs = [int(m.seq) for m in self.marks]
        if direction < 0:
            i = bisect.bisect_left(seqs, self.seq) - 1
            if i >= 0:
                self.jump_to_mark(self.marks[i])
        else:
            i = bisect.bisect_right(seqs, self.seq)
            if i < len(seqs):
                self.jump_to_mark(self.marks[i])
            else:
                self.go_now()

    def go_now(self) -> None:
        self.at_now = True
        self.seq, self.t_point = self.head_seq, self.t_max
        self.update()
        self.nowRequested.emit()

    def keyPressEvent(self, event: QKeyEvent) -> None:
        if not self.interactive:
            super().keyPressEvent(event)
            return
        key = event.key()
        ctrl = bool(event.modifiers() & (Qt.KeyboardModifier.ControlModifier | Qt.KeyboardModifier.ShiftModifier))
        if key in (Qt.Key.Key_Left, Qt.Key.Key_Right):
            d = -1 if key == Qt.Key.Key_Left else 1
            if ctrl:
                self.step_mark(d)
            else:
                self.step(d)
        elif key == Qt.Key.Key_PageUp:
            self.step_mark(-1)
        elif key == Qt.Key.Key_PageDown:
            self.step_mark(1)
        elif key == Qt.Key.Key_Home:
            self.at_now = False
            self.seq = self.horizon_seq
            self.seqRequested.emit(self.horizon_seq)
        elif key == Qt.Key.Key_End:
            self.go_now()
        else:
            super().keyPressEvent(event)
