"""The retention page: tiers edited as rows and applied through the engine (a bad tier is refused
inline, the store's policy untouched), a preview of what the policy keeps, Fade now as a job that
shrinks the journal while kept points still read; the notice when history faded early; and a
console attached to a separate `rewind serve` hearing a failed write through the event stream."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import shot, wait_until
from helpers import rewind_serve, tiny_tmpfs

BS = 4096
NBLK = 16
DAY = 86400


class Clock:
    """Controllable: starts `days` ago and is advanced by the test."""

    def __init__(self, days: float) -> None:
        self.t = time.time_ns() - int(days * DAY * 10**9)

    def __call__(self) -> int:
        return self.t

    def advance(self, s: float) -> None:
        self.t += int(s * 10**9)


@pytest.fixture
def small_segments(monkeypatch: pytest.MonkeyPatch) -> None:
    """Small journal segments, so a fade of a small history frees whole files."""
    from rewind.engine.journal.segments import Journal

    monkeypatch.setattr(Journal, "SEGMENT_LIMIT", 64 << 10)


def make_history(tmp: Path, days: float = 3, every_s: int = 420) -> tuple[Path, dict[str, tuple[int, bytes]]]:
    """Writes every 7 minutes for `days`, ending now; marks (one pinned, days old). Returns the
    store and, per mark, (seq, the first NBLK blocks as they were)."""
    from rewind.engine.store import Store

    clock = Clock(days)
    cur = bytearray(NBLK * BS)
    marks: dict[str, tuple[int, bytes]] = {}
    s = Store.create(tmp / "disk.img", tmp / "store", size=1 << 20, clock=clock)
    try:
        s.set_retention(policy="1h:all,1d:1h,2d:1d")
        n = int(days * DAY / every_s)
        for i in range(n):
            blk = i % NBLK
            data = bytes([i % 251 + 1]) * BS
            s.live.write(blk * BS, data)
            cur[blk * BS:(blk + 1) * BS] = data
            if i == n // 6:
                marks["keep-me"] = (s.mark("keep-me", pinned=True).seq, bytes(cur))
            if i == n - 3:
                marks["recent"] = (s.mark("recent").seq, bytes(cur))
            clock.advance(every_s)
        s.live.flush()
        marks["last"] = (s.head, bytes(cur))
    finally:
        s.close()
    return tmp / "store", marks


def agree_to_fade(app: Any, view: Any) -> None:
    """The console says what a fade (or a policy that fades) removes and asks: press its Fade/Apply."""
    dlg = wait_until(app, lambda: view.fade_dialog, 20, "the fade confirmation")
    assert dlg.defaultButton() is dlg.cancel_button
    dlg.fade_button.click()


def open_view(window: Any, app: Any, store_dir: Path) -> Any:
    view = window.open_store(str(store_dir))
    wait_until(app, lambda: view.snap is not None or view.error is not None, 30, "the store to open")
    assert view.error is None, view.error
    return view


def test_edit_tiers_and_apply(window: Any, app: Any, tmp_path: Path) -> None:
    from rewind.app.dialogs import errors as errdlg
    from rewind.engine.store import Store

    with Store.create(tmp_path / "disk.img", tmp_path / "store", size=1 << 20) as s:
        s.live.write(0, b"x" * BS)
    view = open_view(window, app, tmp_path / "store")
    view.show_retention()
    page = view.retention_page
    wait_until(app, lambda: page.table.rowCount() == 3, 10, "the default tiers as rows")
    assert [page.table.item(r, 1).text() for r in range(3)] == ["every write", "hourly", "daily"]
    store = view.worker.link.store
    before = store.retention()["policy"]

    # a bad tier: refused inline in one line, nothing saved, no dialog
    page.set_row(0, age="soon")
    page.apply_button.click()
    wait_until(app, lambda: page.error_label.isVisible(), 5, "the inline error")
    assert "row 1" in page.error_label.text() and "bad duration" in page.error_label.text()
    assert "\n" not in page.error_label.text() and "Traceback" not in page.error_label.text()
    assert store.retention()["policy"] == before
    # well-formed rows, but the tiers do not get older: the engine's Policy.parse says why
    page.set_row(0, age="30d")
    page.apply_button.click()
    assert "older left to right" in page.error_label.text()
    assert store.retention()["policy"] == before
    # refused by the engine itself (store.set_retention in the worker): still one line, inline
    page.error_label.hide()
    view.worker.apply_retention("1h:bogus", None, None)
    wait_until(app, lambda: page.error_label.isVisible(), 10, "the engine's refusal inline")
    assert "bad duration" in page.error_label.text()
    assert store.retention()["policy"] == before
    assert not [b for b in errdlg.OPEN_DIALOGS if b.isVisible()]

    # good edits: rows, a space limit, refuse when full
    page.set_row(0, age="2h")
    page.set_row(1, keep="one per 10m")
    page.add_tier()
    page.limit_check.setChecked(True)
    page.limit_edit.setText("64M")
    page.refuse_radio.setChecked(True)
    assert page.policy_text.text() == "2h:all,1w:10m,30d:1d,120d:1d"
    page.apply_button.click()
    wait_until(app, lambda: store.retention()["policy"] == "2h:all,1w:10m,30d:1d,120d:1d", 10, "the new policy")
    r = store.retention()
    assert r["max_size"] == 64 << 20 and r["on_full"] == "refuse"
    wait_until(app, lambda: "Applied" in page.status_label.text(), 10, "the page to say so")
    assert not page.error_label.isVisible() and not page.dirty
    assert page.limit_edit.text() == "64M" and page.refuse_radio.isChecked()
    # no limit again
    page.limit_check.setChecked(False)
    page.fade_radio.setChecked(True)
    page.apply_button.click()
    wait_until(app, lambda: store.retention()["max_size"] is None, 10, "the limit removed")
    assert store.retention()["on_full"] == "fade"


def test_preview_and_fade_now(window: Any, app: Any, tmp_path: Path, small_segments: None) -> None:
    store_dir, marks = make_history(tmp_path)
    view = open_view(window, app, store_dir)
    page = view.retention_page
    view.show_retention()
    wait_until(app, lambda: page.preview is not None and page.preview.policy == "1h:all,1d:1h,2d:1d", 20,
               "the preview of what is kept")
    p = page.preview
    assert [b.label for b in p.bands] == ["every write", "hourly", "daily"]
    assert 5 <= p.bands[0].points <= 12  # a write every 7 minutes in the last hour (and a mark)
    assert 20 <= p.bands[1].points <= 24  # one per hour for the 23 hours before
    assert 1 <= p.bands[2].points <= 2  # one per day
    assert p.new_horizon_ns is not None and p.new_horizon_ns > p.horizon_ns
    assert "keep-me" in p.pinned
    assert "points" in page.summary.text() and "horizon" in page.summary.text()
    assert page.timeline.bands and page.timeline.new_horizon_ns == p.new_horizon_ns
    # the history's timeline shows the tiers too (and where the horizon goes)
    wait_until(app, lambda: view.timeline.bands and view.timeline.new_horizon_ns == p.new_horizon_ns, 10,
               "the tiers on the volume's timeline")
    shot(window, "retention")  # test-artifacts/screenshots/; the README's copy is refreshed by hand

    store = view.worker.link.store
    journal_before = store.journal.size_bytes()
    wait_until(app, lambda: view.snap.journal_bytes > 0, 10, "the journal size")
    page.fade_button.click()
    agree_to_fade(app, view)
    dlg = wait_until(app, lambda: view.job_dialog if view.job_dialog and view.job_dialog.finished_state else None,
                     60, "the fade to finish")
    assert dlg.finished_state == "done", dlg.detail.text()
    assert "journal went from" in dlg.detail.text()
    journal_after = store.journal.size_bytes()
    assert journal_after < journal_before * 0.6, (journal_before, journal_after)
    # the console's numbers and its journal chart drop with it
    wait_until(app, lambda: view.snap.journal_bytes == journal_after, 10, "the smaller journal in the status")
    wait_until(app, lambda: view.charts.journal_xy is not None, 10, "the journal curve measured after the fade")
    jx, jy = view.charts.journal_xy
    assert float(jy[-1]) * 2**20 == pytest.approx(journal_after, rel=0.01)
    assert float(jy.max()) * 2**20 > journal_after * 1.5
    dlg.accept()
    view.tabs.setCurrentIndex(0)
    app.processEvents()
    shot(window, "retention-history-after-fade")  # the journal chart's drop (test-artifacts only)
    # kept points still read exactly (the pinned mark from days ago, a recent one, now)
    for name, (seq, data) in marks.items():
        assert bytes(view.worker.link.at(seq).read(0, NBLK * BS)) == data, name
    assert store.horizon > 0


def test_faded_early_notice(window: Any, app: Any, tmp_path: Path, small_segments: None) -> None:
    from rewind.engine.store import Store

    store_dir, _marks = make_history(tmp_path, days=1, every_s=300)
    with Store.open(store_dir) as s:  # while the console is closed, the space limit fades early
        s.set_retention(policy="2d:all", max_size=s.journal.size_bytes() // 2)
        s.fade().run()
        assert s.retention()["faded_early"]
    view = open_view(window, app, store_dir)
    wait_until(app, lambda: any(n[0] == "History faded early" for n in window.notifications), 15,
               "the faded-early notice for a fade while the console was closed")
    note = next(n for n in window.notifications if n[0] == "History faded early")
    assert note[2] == "warning" and "While the console was closed" in note[1]
    assert view.info_bar.isVisible() and "faded early" in view.info_bar.label.text()
    view.info_bar.button.click()  # "Retention..." opens the page, which lists it too
    assert view.tabs.currentWidget() is view.retention_page
    wait_until(app, lambda: view.retention_page.faded_label.isVisible(), 10, "the page's note")
    n_before = sum(1 for n in window.notifications if n[0] == "History faded early")

    # live: more writes past the limit, Fade now -> the engine's faded-early event -> a new notice
    store = view.worker.link.store
    for i in range(64):
        store.live.write((i % 128) * BS, bytes([i + 7]) * BS)
    store.live.flush()
    view.fade_now()
    agree_to_fade(app, view)
    wait_until(app, lambda: sum(1 for n in window.notifications if n[0] == "History faded early") > n_before,
               30, "the live faded-early notice")
    last = [n for n in window.notifications if n[0] == "History faded early"][-1]
    assert "While the console was closed" not in last[1]


@pytest.fixture
def tiny_serve(tmp_path: Path) -> Iterator[tuple[Path, Path, subprocess.Popen[str]]]:
    """`rewind serve` of a store on a 1 MiB tmpfs: its journal fills up (needs root to mount)."""
    from rewind.engine.store import Store

    with tiny_tmpfs(tmp_path / "tiny") as mnt:
        Store.create(tmp_path / "disk.img", mnt / "store", size=8 << 20).close()
        sock = tmp_path / "nbd.sock"
        with rewind_serve(mnt / "store", sock) as proc:
            yield mnt / "store", sock, proc


def test_attached_console_hears_write_failed(window: Any, app: Any, tiny_serve: Any) -> None:
    store_dir, sock, proc = tiny_serve
    if shutil.which("qemu-io") is None:
        pytest.skip("qemu-io is not installed: no NBD client to write with")
    view = open_view(window, app, store_dir)
    assert view.snap.remote
    wait_until(app, lambda: view.worker.link.store._ev_thread is not None
               and view.worker.link.store._stream is not None, 10, "the event subscription")
    r = subprocess.run(["qemu-io", "-f", "raw", f"nbd+unix:///?socket={sock}", "-c", "write -P 0x5a 0 3M",
                        "-c", "flush"], capture_output=True, text=True, timeout=60)
    assert "error" in (r.stdout + r.stderr).lower() or r.returncode != 0, r.stdout + r.stderr
    wait_until(app, lambda: any(n[0] == "A write failed" for n in window.notifications), 20,
               "the failed write, streamed from serve")
    note = next(n for n in window.notifications if n[0] == "A write failed")
    assert note[2] == "critical" and "full" in note[1].lower(), note
    assert view.info_bar.isVisible() and "failed" in view.info_bar.label.text()
    assert proc.poll() is None, "serve keeps running"


def test_preview_counts_match_plan_over_every_point() -> None:
    """The preview's shortcut (one point per gcd(steps) stretch) gives plan()'s own counts."""
    import random

    from rewind.app.link import preview_retention
    from rewind.engine.retention import Policy, plan

    now = time.time_ns()
    rnd = random.Random(3)
    for pol in ("1h:all,1d:10m,3d:7h", "24h:all,7d:1h,30d:1d", "2h:1m,2d:1h"):
        for _ in range(5):
            secs = sorted(rnd.sample(range(now // 10**9 - 40 * DAY, now // 10**9), 3000))
            h = secs[0] * 10**9
            p = preview_retention(pol, secs, [1] * len(secs), [], h, now)
            full = plan([(i, x * 10**9) for i, x in enumerate(secs)], now, Policy.parse(pol))
            assert [b.points for b in p.bands] == full.per_tier
            nh = secs[full.horizon] * 10**9 if full.horizon is not None else None
            assert p.new_horizon_ns == (nh if nh is not None and nh > h else None)


def test_attached_console_applies_and_fades_through_serve(window: Any, app: Any, tmp_path: Path) -> None:
    """Retention of a store a separate `rewind serve` holds: Apply and Fade now go over its control
    socket (set_retention, a remote fade job whose "fade" event comes back on the event stream)."""
    from rewind.engine.control import RemoteStore

    store_dir, _marks = make_history(tmp_path, days=1, every_s=900)
    with rewind_serve(store_dir, tmp_path / "nbd.sock"):
        view = open_view(window, app, store_dir)
        assert view.snap.remote
        page = view.retention_page
        view.show_retention()
        wait_until(app, lambda: page.table.rowCount() == 3 and page.preview is not None, 20, "the remote policy")
        page.set_row(0, age="30m")
        page.set_row(2, age="12h", keep="one per 3h")
        page.apply_button.click()
        with RemoteStore(store_dir) as remote:
            wait_until(app, lambda: page.error_label.isVisible(), 10, "the inline error")
            assert page.error_label.isVisible() and "older left to right" in page.error_label.text()
            assert remote.retention()["policy"] == "1h:all,1d:1h,2d:1d", "serve's policy is untouched"
            page.set_row(1, age="6h")
            page.apply_button.click()
            agree_to_fade(app, view)
            wait_until(app, lambda: remote.retention()["policy"] == "30m:all,6h:1h,12h:3h", 10, "the policy in serve")
            horizon = view.snap.horizon
            page.fade_button.click()
            agree_to_fade(app, view)
            dlg = wait_until(app, lambda: view.job_dialog if view.job_dialog and view.job_dialog.finished_state
                             else None, 60, "the remote fade")
            assert dlg.finished_state == "done", dlg.detail.text()
            wait_until(app, lambda: view.snap.horizon > horizon, 10, "the horizon moving in the console")
            wait_until(app, lambda: view.worker.journal_samples, 10, "the fade event streamed from serve")
            dlg.accept()
