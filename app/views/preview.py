"""The preview of the volume at the timeline's point: its file tree with what changed since marked,
and the selected file as text, image or hex (with Save as... to restore it). Where no
filesystem is recognised: a map of the blocks changed since the point, and a hex view."""

from __future__ import annotations

import bisect
from typing import Any

from PySide6.QtCore import QEvent, QRectF, QSize, Qt, Signal
from PySide6.QtGui import QColor, QFont, QFontDatabase, QImage, QPainter, QPixmap
from PySide6.QtWidgets import (
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QPlainTextEdit,
    QPushButton,
    QScrollArea,
    QSplitter,
    QStackedWidget,
    QTreeWidget,
    QTreeWidgetItem,
    QVBoxLayout,
    QWidget,
)

from ..format import human_bytes, human_time
from ..preview import FileEntry, Preview
from ..theme import colors

SHOW_LIMIT = 1 << 20  # bytes of a file read for display
STATUS_TEXT = {"added": "added since", "changed": "changed since", "deleted": "deleted since", "": ""}


def hexdump(data: bytes, base: int = 0, limit: int = 64 * 1024) -> str:
    """Classic 16-bytes-per-line hex dump with an ASCII column."""
    lines = []
    for i in range(0, min(len(data), limit), 16):
        row = data[i:i + 16]
        hx = " ".join(f"{b:02x}" for b in row)
        asc = "".join(chr(b) if 32 <= b < 127 else "." for b in row)
        lines.append(f"{base + i:08x}  {hx:<47}  {asc}")
    if len(data) > limit:
        lines.append(f"... {human_bytes(len(data) - limit)} more")
    return "\n".join(lines)


def looks_like_text(data: bytes) -> bool:
    if not data:
        return True
    sample = data[:4096]
    if b"\0" in sample:
        return False
    try:
        sample.decode("utf-8")
        return True
    except UnicodeDecodeError as e:
        return e.start > len(sample) - 4  # cut in the middle of a character


class BlockMap(QWidget):
    """Blocks changed since the point, drawn as a grid of cells (each cell a run of blocks).
    Click a cell to see its first changed block (or its first block) in hex."""

    blockClicked = Signal(int)

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.blocks: list[int] = []
        self.nblocks = 1
        self.setMinimumHeight(120)

    def set_blocks(self, blocks: list[int], nblocks: int) -> None:
        self.blocks, self.nblocks = sorted(blocks), max(1, nblocks)
        self.update()

    def sizeHint(self) -> QSize:
        return QSize(400, 200)

    def _grid(self) -> tuple[int, int, int, int]:
        cell = 8
        cols = max(1, (self.width() - 8) // cell)
        rows = max(1, (self.height() - 8) // cell)
        return cell, cols, rows, max(1, -(-self.nblocks // (cols * rows)))

    def block_at(self, x: float, y: float) -> int | None:
        """The block a click at (x, y) stands for: the cell's first changed block, else its first."""
        cell, cols, rows, per = self._grid()
        cx, cy = int((x - 4) // cell), int((y - 4) // cell)
        if not (0 <= cx < cols and 0 <= cy < rows):
            return None
        first = (cy * cols + cx) * per
        if first >= self.nblocks:
            return None
        i = bisect.bisect_left(self.blocks, first)
        if i < len(self.blocks) and self.blocks[i] < first + per:
            return self.blocks[i]
        return first

    def mousePressEvent(self, event: Any) -> None:
        b = self.block_at(event.position().x(), event.position().y())
        if b is not None:
            self.blockClicked.emit(b)

    def paintEvent(self, event: Any) -> None:
        c = colors()
        p = QPainter(self)
        cell, cols, rows, per = self._grid()
        cells = cols * rows
        hit = [0] * cells
        for b in self.blocks:
            i = b // per
            if i < cells:
                hit[i] += 1
        empty = QColor(c.muted)
        empty.setAlpha(40)
        changed = QColor(c.changed)
        for i in range(min(cells, -(-self.nblocks // per))):
            x, y = 4 + (i % cols) * cell, 4 + (i // cols) * cell
            if hit[i]:
                col = QColor(changed)
                col.setAlpha(110 + min(145, int(145 * hit[i] / per)))
            else:
                col = empty
            p.fillRect(QRectF(x, y, cell - 1, cell - 1), col)
        p.end()


class PreviewPane(QWidget):
    """Shows a Preview. Asks its owner for file contents through the signals below."""

    fileRequested = Signal(int, str)  # seq, path: show it
    saveRequested = Signal(int, str)  # seq, path: restore it (owner asks where)
    blockRequested = Signal(object, object)  # seq, block: show it in hex

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.preview: Preview | None = None
        self._items: dict[str, QTreeWidgetItem] = {}
        self._paths: list[str] = []
        self._selected = ""
        self.header = QLabel("Move the timeline to see the volume at that point.")
        self.header.setObjectName("muted")
        self.header.setWordWrap(True)

        self.tree = QTreeWidget()
        self.tree.setHeaderLabels(["Name", "Size", "Modified", "Since this point"])
        self.tree.setUniformRowHeights(True)
        self.tree.setAlternatingRowColors(True)
        self.tree.header().setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
        self.tree.header().setStretchLastSection(False)
        for col, width in ((1, 80), (2, 150), (3, 110)):
            # fixed widths: ResizeToContents re-measures every row on every preview
            self.tree.header().setSectionResizeMode(col, QHeaderView.ResizeMode.Interactive)
            self.tree.setColumnWidth(col, width)
        self.tree.itemSelectionChanged.connect(self._on_select)

        mono = QFontDatabase.systemFont(QFontDatabase.SystemFont.FixedFont)
        self.text = QPlainTextEdit()
        self.text.setReadOnly(True)
        self.hex = QPlainTextEdit()
        self.hex.setReadOnly(True)
        self.hex.setFont(mono)
        self.hex.setLineWrapMode(QPlainTextEdit.LineWrapMode.NoWrap)
        self.image = QLabel()
        self.image.setAlignment(Qt.AlignmentFlag.AlignCenter)
        image_scroll = QScrollArea()
        image_scroll.setWidget(self.image)
        image_scroll.setWidgetResizable(True)
        self.placeholder = QLabel("Select a file to see it as it was.")
        self.placeholder.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.placeholder.setObjectName("muted")
        self.content = QStackedWidget()
        for w in (self.placeholder, self.text, image_scroll, self.hex):
            self.content.addWidget(w)
        self.file_label = QLabel("")
        self.file_label.setObjectName("muted")
        self.save_button = QPushButton("Save as...")
        self.save_button.setToolTip("Restore this file, as it was at this point, to a place you choose")
        self.save_button.setEnabled(False)
        self.save_button.clicked.connect(self._on_save)
        right = QWidget()
        rl = QVBoxLayout(right)
        rl.setContentsMargins(0, 0, 0, 0)
        bar = QHBoxLayout()
        bar.addWidget(self.file_label, 1)
        bar.addWidget(self.save_button)
        rl.addLayout(bar)
        rl.addWidget(self.content, 1)
        self.files_split = QSplitter(Qt.Orientation.Horizontal)
        self.files_split.addWidget(self.tree)
        self.files_split.addWidget(right)
        self.files_split.setStretchFactor(0, 3)
        self.files_split.setStretchFactor(1, 2)

        # no filesystem: block map + hex
        self.block_map = BlockMap()
        self.block_map.blockClicked.connect(
            lambda b: self.blockRequested.emit(self.preview.seq, b) if self.preview is not None else None)
        self.block_label = QLabel("")
        self.block_label.setWordWrap(True)
        self.block_hex = QPlainTextEdit()
        self.block_hex.setReadOnly(True)
        self.block_hex.setFont(mono)
        self.block_hex.setLineWrapMode(QPlainTextEdit.LineWrapMode.NoWrap)
        blocks = QWidget()
        bl = QVBoxLayout(blocks)
        bl.setContentsMargins(0, 0, 0, 0)
        bl.addWidget(self.block_label)
        split = QSplitter(Qt.Orientation.Horizontal)
        split.addWidget(self.block_map)
        split.addWidget(self.block_hex)
        bl.addWidget(split, 1)

        self.modes = QStackedWidget()
        self.modes.addWidget(self.files_split)
        self.modes.addWidget(blocks)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(self.header)
        lay.addWidget(self.modes, 1)

    # -- showing a preview ------------------------------------------------------------------------
    def show_preview(self, p: Preview) -> None:
        self.preview = p
        if p.fs_type is None:
            self._show_blocks(p)
            return
        self.modes.setCurrentIndex(0)
        n = p.counts()
        # the time written as the heading above writes it (the same moment reads the same)
        at = "now" if p.seq >= p.head else f"record {p.seq:,} ({human_time(p.time_ns, with_date=True)})"
        files = sum(1 for e in p.entries if not e.is_dir and e.status != "added")
        if p.seq >= p.head:
            summary = f"{p.fs_type}: {files} files now."
        elif not p.now_fs:
            summary = (f"{p.fs_type} at {at}: {files} files.  Since then the filesystem was wiped or replaced: "
                       f"none is recognised now, so all {files} files are gone (Save as... restores one).")
        else:
            summary = (f"{p.fs_type} at {at}: {files} files.  Since then: {n['added']} added, "
                       f"{n['changed']} changed, {n['deleted']} deleted.")
        if p.truncated:
            summary += "  (Only the first entries are listed.)"
        self.header.setText(summary)
        self._fill_tree(p.entries)

    def _style(self, item: QTreeWidgetItem, e: FileEntry) -> None:
        """Texts, colours and fonts of one row for entry `e`."""
        c = colors()
        mtime = human_time(e.mtime * 10**9, with_date=True) if e.mtime else ""
        item.setText(0, e.name + ("/" if e.is_dir else ""))
        item.setText(1, "" if e.is_dir else human_bytes(e.size))
        item.setText(2, mtime)
        item.setText(3, STATUS_TEXT.get(e.status, e.status))
        item.setData(0, Qt.ItemDataRole.UserRole, e.path)
        item.setData(1, Qt.ItemDataRole.UserRole, e.status)
        font = QFont(self.tree.font())
        tip = ""
        if e.status == "changed" and not e.is_dir:
            font.setBold(True)
        elif e.status == "added":
            font.setItalic(True)
            tip = "Not in this point: written after it"
        elif e.status == "deleted":
            font.setStrikeOut(True)
            tip = "Deleted since this point: Save as... restores it"
        item.setFont(0, font)
        item.setToolTip(0, tip)
        color = {"added": c.added, "changed": c.changed, "deleted": c.deleted}.get(e.status)
        for col in range(4):  # unchanged: no colour of its own, so it follows the palette live
            item.setData(col, Qt.ItemDataRole.ForegroundRole, QColor(color) if color else None)

    def changeEvent(self, event: QEvent) -> None:
        """View > Light/Dark while running: the status colours of the rows follow."""
        if event.type() == QEvent.Type.PaletteChange and self.preview is not None:
            for e in self.preview.entries:
                if e.path in self._items:
                    self._style(self._items[e.path], e)
        super().changeEvent(event)

    def _fill_tree(self, entries: list[FileEntry]) -> None:
        keep = self._selected
        paths = [e.path for e in entries]
        self.tree.setUpdatesEnabled(False)
        self.tree.blockSignals(True)
        try:
            if paths == self._paths:
                # same files as the last preview (the usual case while dragging): restyle in place
                for e in entries:
                    self._style(self._items[e.path], e)
            else:
                self.tree.clear()
                self._items = {}
                for e in entries:
                    parent = self._items.get(e.path.rsplit("/", 1)[0])
                    item = QTreeWidgetItem()
                    item.setTextAlignment(1, Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
                    self._style(item, e)
                    if parent is None:
                        self.tree.addTopLevelItem(item)
                    else:
                        parent.addChild(item)
                    self._items[e.path] = item
                self.tree.expandAll()
                self._paths = paths
                if keep in self._items:
                    self._items[keep].setSelected(True)
                    self.tree.setCurrentItem(self._items[keep])
        finally:
            self.tree.blockSignals(False)
            self.tree.setUpdatesEnabled(True)
        if keep and keep in self._items:
            self._request_selected()
        elif keep:
            self._selected = ""
            self.file_label.setText("")  # the header of a file no longer shown would go stale
            self.save_button.setEnabled(False)
            self._clear_content("That file does not exist at this point.")

    def _show_blocks(self, p: Preview) -> None:
        self.modes.setCurrentIndex(1)
        nblocks = max(1, p.volume_size // max(1, p.block_size))
        self.block_map.set_blocks(p.changed_blocks, nblocks)
        if p.seq >= p.head:
            self.header.setText("No filesystem recognised: the volume is shown as blocks.")
        else:
            self.header.setText(
                f"No filesystem recognised at record {p.seq:,} ({human_time(p.time_ns, with_date=True)}). "
                f"{len(p.changed_blocks):,} blocks ({human_bytes(len(p.changed_blocks) * p.block_size)}) "
                "changed since then (highlighted).")
        first = p.changed_blocks[0] * p.block_size if p.changed_blocks else 0
        self.block_label.setText(f"Hex of the first changed block (offset {first:#x}) as it was at this point:"
                                 if p.changed_blocks else "Hex of the first block:")
        self.block_hex.setPlainText(hexdump(p.first_bytes, first))

    def show_block(self, block: int, data: bytes) -> None:
        if self.preview is None:
            return
        off = block * self.preview.block_size
        changed = "changed since this point" if block in set(self.preview.changed_blocks) else "unchanged since"
        self.block_label.setText(f"Block {block:,} (offset {off:#x}), {changed}, as it was at this point:")
        self.block_hex.setPlainText(hexdump(data, off))

    # -- file contents ----------------------------------------------------------------------------
    def selected_entry(self) -> FileEntry | None:
        if self.preview is None or not self._selected:
            return None
        for e in self.preview.entries:
            if e.path == self._selected:
                return e
        return None

    def _entry_seq(self, e: FileEntry) -> int:
        assert self.preview is not None
        return self.preview.head if e.status == "added" else self.preview.seq

    def _on_select(self) -> None:
        items = self.tree.selectedItems()
        if not items:
            return
        self._selected = str(items[0].data(0, Qt.ItemDataRole.UserRole))
        self._request_selected()

    def _request_selected(self) -> None:
        e = self.selected_entry()
        if e is None:
            return
        if e.is_dir:
            self.save_button.setEnabled(False)
            self.file_label.setText(f"{e.path}/  a folder")
            self._clear_content(f"{e.path}: a folder.")
            return
        self.save_button.setEnabled(True)
        where = "now (added after this point)" if e.status == "added" else "at this point"
        self.file_label.setText(f"{e.path}  {human_bytes(e.size)}  {where}")
        self.fileRequested.emit(self._entry_seq(e), e.path)

    def _clear_content(self, text: str) -> None:
        self.placeholder.setText(text)
        self.content.setCurrentWidget(self.placeholder)

    def show_file(self, path: str, data: bytes) -> None:
        if path != self._selected:
            return  # an answer for a file no longer selected
        lower = path.lower()
        if lower.endswith((".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp")):
            img = QImage.fromData(data)
            if not img.isNull():
                pix = QPixmap.fromImage(img)
                if pix.width() < 240:
                    pix = pix.scaledToWidth(240, Qt.TransformationMode.FastTransformation)
                self.image.setPixmap(pix)
                self.content.setCurrentIndex(2)
                return
        if looks_like_text(data):
            self.text.setPlainText(data.decode("utf-8", "replace"))
            self.content.setCurrentIndex(1)
        else:
            self.hex.setPlainText(hexdump(data))
            self.content.setCurrentIndex(3)

    def _on_save(self) -> None:
        e = self.selected_entry()
        if e is not None and not e.is_dir:
            self.saveRequested.emit(self._entry_seq(e), e.path)

    # -- for tests -------------------------------------------------------------------------------
    def listed_files(self) -> dict[str, str]:
        return {} if self.preview is None else self.preview.files()

    def select_path(self, path: str) -> None:
        item = self._items.get(path)
        if item is not None:
            self.tree.setCurrentItem(item)
            item.setSelected(True)
