"""The `rewind` command line (the contract of DESIGN.md "Command line").

Exit status: 0 done, 1 failed or corruption found, 2 bad usage or bad input, 130 interrupted.
Every failure is one line on stderr that says what was wrong and what to do; never a traceback
(set REWIND_DEBUG=1 to see one). While `rewind serve` holds a store, the commands that can run
beside it (mark, log, diff, export, verify, retention, fade) go through its control socket.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import json
import os
import re
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

from .errors import BadInput, RewindError, StoreLocked
from .progress import human_bytes, is_interactive, run_job

PROG = "rewind"


class UsageError(BadInput):
    """The command line itself is wrong (argparse's complaint, made one line)."""


# ---------------------------------------------------------------- argument types

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtpe]?)(i?b?)\s*$", re.IGNORECASE)
_UNITS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4, "p": 5, "e": 6}


def parse_size(text: str) -> int:
    """'256M', '1G', '4096', '10GiB', '512k' -> bytes. Suffixes are binary (as in qemu-img):
    K/M/G/T/P, optionally followed by 'i' and/or 'B'."""
    m = _SIZE_RE.match(text)
    if not m:
        raise BadInput(f"bad size '{text}': give bytes or a number with K, M, G or T (e.g. 256M, 10GiB)")
    num, unit, suffix = m.group(1), m.group(2).lower(), m.group(3).lower()
    if suffix and not unit and suffix != "b":
        raise BadInput(f"bad size '{text}': give bytes or a number with K, M, G or T (e.g. 256M, 10GiB)")
    mult: int = int(1024 ** _UNITS[unit])
    if "." in num:
        whole, frac = num.split(".")
        value: int = int(whole) * mult + (int(frac) * mult) // (10 ** len(frac))
        if (int(frac) * mult) % (10 ** len(frac)):
            raise BadInput(f"bad size '{text}': it is not a whole number of bytes")
    else:
        value = int(num) * mult
    if value <= 0:
        raise BadInput(f"bad size '{text}': it must be more than 0 bytes")
    if value > 1 << 63:
        raise BadInput(f"bad size '{text}': too large")
    return value


def parse_limit(text: str) -> int:
    """A space limit: a size, or 0 / none / off to remove the limit (returned as 0)."""
    if text.strip().lower() in ("0", "none", "off", "unlimited"):
        return 0
    return parse_size(text)


def parse_block_size(text: str) -> int:
    """A block size: a power of two from 512 bytes to 1 MiB ('4096', '4K', '64KiB')."""
    try:
        value = parse_size(text)
    except BadInput:
        raise BadInput(f"bad block size '{text}': give a power of two from 512 to 1M, e.g. 4096") from None
    if value < 512 or value > (1 << 20) or value & (value - 1):
        raise BadInput(f"bad block size '{text}': give a power of two from 512 to 1M, e.g. 4096")
    return value


def parse_nbd_address(text: str) -> str:
    """Check `unix:PATH` or `tcp:HOST:PORT` (HOST may be [v6]) and return it unchanged."""
    if text.startswith("unix:"):
        path = text[5:]
        if not path or "\x00" in path:
            raise BadInput(f"bad --nbd '{text}': give unix:PATH or tcp:HOST:PORT")
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            raise BadInput(f"bad --nbd '{text}': directory {parent} does not exist")
        if len(os.fsencode(os.path.abspath(path))) > 107:
            raise BadInput(f"bad --nbd '{text}': a unix socket path must be under 108 bytes; use a shorter one")
        return f"unix:{os.path.abspath(path)}"
    if text.startswith("tcp:"):
        rest = text[4:]
        host, sep, port = rest.rpartition(":")
        if not sep or not host or not port.isdigit() or not (0 <= int(port) <= 65535):
            raise BadInput(f"bad --nbd '{text}': give tcp:HOST:PORT with PORT 0-65535")
        if host.startswith("[") != host.endswith("]"):
            raise BadInput(f"bad --nbd '{text}': write an IPv6 host in brackets, e.g. tcp:[::1]:10809")
        return text
    raise BadInput(f"bad --nbd '{text}': give unix:PATH or tcp:HOST:PORT")


def parse_connections(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 100_000:
        raise BadInput(f"bad --nbd-max-connections '{text}': give a number from 1 to 100000")
    return int(text)


def _argtype(fn: Callable[[str], Any]) -> Callable[[str], Any]:
    """Wrap a parser so argparse reports our one-line message (argparse hides ValueError text)."""

    def conv(text: str) -> Any:
        try:
            return fn(text)
        except BadInput as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    conv.__name__ = fn.__name__
    return conv


# ---------------------------------------------------------------- parser


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (raised, so main() decides the exit)."""

    def error(self, message: str) -> NoReturn:
        text = " ".join(message.split())
        raise UsageError(f"{text} (see '{self.prog} --help')")


def build_parser() -> ArgumentParser:
    p = ArgumentParser(
        prog=PROG,
        description="Continuous data protection for disk images: every write kept, any moment back. "
        "Without a command, opens the console.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=ArgumentParser)

    c = sub.add_parser("protect", help="start protecting a raw image file or block device")
    c.add_argument("primary", metavar="PRIMARY")
    c.add_argument("--store", metavar="DIR", required=True, help="directory for the journal and maps")
    c.add_argument("--size", type=_argtype(parse_size), help="create PRIMARY (sparse) with this size")
    c.add_argument("--block-size", type=_argtype(parse_block_size), default=4096, metavar="N")
    c.set_defaults(func=cmd_protect)

    c = sub.add_parser("serve", help="run the front ends (NBD, FUSE, watch) until SIGINT/SIGTERM")
    c.add_argument("dir", metavar="DIR")
    c.add_argument("--nbd", action="append", type=_argtype(parse_nbd_address), metavar="ADDR",
                   help="unix:PATH or tcp:HOST:PORT (repeatable; default unix:DIR/nbd.sock); TCP is "
                   "loopback only unless --nbd-allow-remote")
    c.add_argument("--nbd-allow-remote", action="store_true",
                   help="let --nbd tcp: listen on addresses other machines can reach (needs TLS)")
    c.add_argument("--tls-cert", metavar="FILE", help="TLS certificate (PEM) for NBD over TCP; TLS is then required")
    c.add_argument("--tls-key", metavar="FILE", help="its private key (PEM)")
    c.add_argument("--tls-ca", metavar="FILE", help="CA (PEM): NBD clients must show a certificate it signed")
    c.add_argument("--tls-creds", metavar="DIR",
                   help="like qemu: DIR/server-cert.pem, DIR/server-key.pem and, if present, DIR/ca-cert.pem")
    c.add_argument("--nbd-max-connections", type=_argtype(parse_connections), default=None, metavar="N",
                   help="NBD clients at once per address (default 128); more are hung up on")
    c.add_argument("--fuse", metavar="MOUNTPOINT", help="show the volume and past points as files")
    c.add_argument("--watch", action="store_true", help="journal changes other programs make to PRIMARY")
    c.set_defaults(func=cmd_serve)

    c = sub.add_parser("mark", help="name a point (now by default); kept until you remove it")
    c.add_argument("dir", metavar="DIR")
    c.add_argument("name", metavar="NAME")
    c.add_argument("--at", metavar="POINT", help="the point to name (default: now)")
    c.add_argument("--remove", action="store_true", help="remove the mark NAME (its point then follows retention)")
    c.add_argument("--pin", action="store_true", help=argparse.SUPPRESS)  # the default now; still accepted
    c.add_argument("--freeze", metavar="MOUNTPOINT", help="fsfreeze MOUNTPOINT around the mark")
    c.set_defaults(func=cmd_mark)

    c = sub.add_parser("log", help="points, marks, delta maps, horizon, journal size")
    c.add_argument("dir", metavar="DIR")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_log)

    c = sub.add_parser("diff", help="the byte ranges that differ between two points")
    c.add_argument("dir", metavar="DIR")
    c.add_argument("a", metavar="FROM")
    c.add_argument("b", metavar="TO")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_diff)

    c = sub.add_parser("export", help="write a sparse raw image equal to the primary at POINT")
    c.add_argument("dir", metavar="DIR")
    c.add_argument("--at", required=True, metavar="POINT")
    c.add_argument("out", metavar="OUT")
    c.set_defaults(func=cmd_export)

    c = sub.add_parser("rewind", help="make the primary equal to POINT, in place (undoable)")
    c.add_argument("dir", metavar="DIR")
    c.add_argument("--at", required=True, metavar="POINT")
    c.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    c.set_defaults(func=cmd_rewind)

    c = sub.add_parser("verify", help="check every checksum and every map against the journal")
    c.add_argument("dir", metavar="DIR")
    c.add_argument("--repair", action="store_true",
                   help="rebuild a damaged maps.db from the journal (the damaged file is kept aside)")
    c.set_defaults(func=cmd_verify)

    c = sub.add_parser("retention", help="show or set the retention policy")
    c.add_argument("dir", metavar="DIR")
    c.add_argument("--policy", metavar="TIERS", help="e.g. 'all:24h,1h:7d,1d:30d'")
    c.add_argument("--max-size", type=_argtype(parse_limit), metavar="SIZE",
                   help="journal space limit (e.g. 20G; 0 or none removes it)")
    c.add_argument("--on-full", choices=("fade", "refuse"), help="what to do when the limit is reached")
    c.set_defaults(func=cmd_retention)

    c = sub.add_parser("fade", help="apply the retention policy now")
    c.add_argument("dir", metavar="DIR")
    c.set_defaults(func=cmd_fade)
    return p


# A relative time such as -30s looks like an option to argparse; shield it while parsing.
_RELATIVE = re.compile(r"^-\d+(?:\.\d+)?[a-zA-Z]+$")
_SHIELD = "\u2063"


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    """parse_args that accepts POINTs like `-5m` as values (`--at -5m`, `diff s -1h now`)."""
    shielded = [_SHIELD + a if _RELATIVE.match(a) else a for a in argv]
    args = parser.parse_args(shielded)
    for k, v in vars(args).items():
        if isinstance(v, str) and v.startswith(_SHIELD):
            setattr(args, k, v[len(_SHIELD):])
    return args


# ---------------------------------------------------------------- helpers


def _out(line: str = "") -> None:
    sys.stdout.write(line + "\n")


def _err(line: str) -> None:
    text = " ".join(str(line).split())
    sys.stderr.write(f"{PROG}: {text}\n")
    sys.stderr.flush()


def _store_dir(path: str) -> Path:
    """DIR must be an existing directory (whether it holds a store, the engine decides)."""
    p = Path(path)
    if not p.exists():
        raise BadInput(f"{path}: no such directory; give the store directory made by 'rewind protect'")
    if not p.is_dir():
        raise BadInput(f"{path}: not a directory; give the store directory made by 'rewind protect'")
    return p


def _open_local(path: Path) -> Any:
    from .store import Store

    return Store.open(path)


@contextlib.contextmanager
def open_store(path: str, allow_remote: bool = True) -> Iterator[Any]:
    """The store at DIR: opened here, or (when `rewind serve` holds it) reached through its control
    socket. Both answer the same methods; the remote one has `.remote = True`."""
    d = _store_dir(path)
    try:
        store = _open_local(d)
        _report_recovery(store)
    except StoreLocked:
        if not allow_remote:
            raise
        from .control import RemoteStore

        store = RemoteStore(d)
    try:
        yield store
    finally:
        store.close()


def _report_recovery(store: Any) -> None:
    """Say what opening the store repaired (a torn journal tail cut, writes re-applied), and what
    it found damaged and could not repair (a missing journal segment)."""
    for note in getattr(store, "recovery", None) or []:
        _err(f"note: {note}")
    for note in getattr(store, "damage", None) or []:
        _err(f"warning: {note}")


def _fmt_time(ns: Any) -> str:
    if not isinstance(ns, int) or isinstance(ns, bool):
        return "-"
    t = dt.datetime.fromtimestamp(ns / 1e9).astimezone()
    return t.isoformat(timespec="milliseconds")


def _get(obj: Any, key: str, default: Any = None) -> Any:
    if isinstance(obj, dict):
        return obj.get(key, default)
    return getattr(obj, key, default)


def _run(job: Any, label: str) -> Any:
    """Drive a job (local or remote) with a progress bar; a Ctrl-C cancel becomes exit 130."""
    run_job(job, label)
    return getattr(job, "result", None)


# ---------------------------------------------------------------- commands


def cmd_protect(args: argparse.Namespace) -> int:
    from .store import Store

    primary = args.primary
    if not os.path.exists(primary) and args.size is None:
        raise BadInput(f"{primary} does not exist; give --size SIZE to create it as a sparse image")
    if os.path.exists(primary) and os.path.isdir(primary):
        raise BadInput(f"{primary} is a directory; give a raw image file or a block device")
    parent = os.path.dirname(os.path.abspath(primary))
    if not os.path.isdir(parent):
        raise BadInput(f"{parent} does not exist; create it first or choose another place for {primary}")
    store_parent = os.path.dirname(os.path.abspath(args.store))
    if not os.path.isdir(store_parent):
        raise BadInput(f"{store_parent} does not exist; create it first or choose another --store")
    with Store.create(primary, args.store, size=args.size, block_size=args.block_size) as store:
        _report_recovery(store)  # e.g. an existing empty --store directory made private (0700)
        _out(f"protecting {store.primary_path} ({human_bytes(store.size)}, {store.size} bytes, "
             f"block size {store.block_size}) in {store.dir}")
        _out(f"next: rewind serve {args.store}")
    return 0


def cmd_mark(args: argparse.Namespace) -> int:
    """A person's mark: kept until they remove it (`--remove`); retention never deletes it."""
    if not args.name or len(args.name) > 200 or "\n" in args.name:
        raise BadInput("bad mark name: give a short name on one line, e.g. before-upgrade")
    if args.remove and (args.at is not None or args.freeze):
        raise BadInput("--remove takes only the mark's name: rewind mark DIR NAME --remove")
    with open_store(args.dir) as store:
        if args.remove:
            m = store.unmark(args.name)
            _out(f"removed mark {_get(m, 'name')} (seq {_get(m, 'seq')}); its point now follows retention")
            return 0
        if args.freeze:
            from .frontends.freeze import frozen

            with frozen(args.freeze):
                m = store.mark(args.name, pinned=True, at=args.at)
        else:
            m = store.mark(args.name, pinned=True, at=args.at)
        kept = " (kept until removed)" if _get(m, "pinned") else " (follows retention)"
        _out(f"mark {_get(m, 'name')} = seq {_get(m, 'seq')} at {_fmt_time(_get(m, 'time_ns'))}{kept}")
    return 0


def cmd_log(args: argparse.Namespace) -> int:
    with open_store(args.dir) as store:
        info = store.info()
    if args.json:
        from .control import to_json

        _out(json.dumps(to_json(info), indent=2, sort_keys=False))
        return 0
    for line in format_log(info):
        _out(line)
    return 0


def format_log(info: dict[str, Any]) -> list[str]:
    """`rewind log` for people: the store, its horizon and head, marks, then delta maps."""
    lines: list[str] = []
    shown: set[str] = set()

    def field(label: str, key: str, fmt: Callable[[Any], str] = str) -> None:
        if key in info:
            shown.add(key)
            lines.append(f"{label + ':':<15}{fmt(info[key])}")

    def size_fmt(v: Any) -> str:
        return f"{human_bytes(v)} ({v} bytes)" if isinstance(v, int) else str(v)

    field("store", "store")
    field("primary", "primary")
    field("size", "size", size_fmt)
    field("block size", "block_size")
    field("mode", "mode")
    field("records", "records")
    field("versions", "versions")
    field("journal", "journal_bytes", size_fmt)
    field("primary lags", "primary_backlog_bytes", size_fmt)  # journaled, not yet on the primary
    shown.add("primary_full")
    if info.get("primary_full"):
        lines.append(f"{'primary full:':<15}its disk is full: new writes are refused until there is room")
    field("segments", "segments")
    field("maps on disk", "maps_bytes", size_fmt)
    for key in ("horizon", "head"):
        if key in info:
            shown.add(key)
            v = info[key]
            seq = _get(v, "seq", v if isinstance(v, int) else None)
            lines.append(f"{key + ':':<15}seq {seq}  {_fmt_time(_get(v, 'time_ns'))}")
    recovery = info.get("recovery")
    shown.add("recovery")
    if isinstance(recovery, list):
        for note in recovery:
            lines.append(f"{'recovered:':<15}{note}")
    damage = info.get("damage")
    shown.add("damage")
    if isinstance(damage, list):
        for note in damage:
            lines.append(f"{'DAMAGED:':<15}{note}")
    marks = info.get("marks")
    maps = info.get("maps")
    shown.update({"marks", "maps"})
    for k, v in info.items():
        if k not in shown and isinstance(v, str | int | float | bool) and not isinstance(v, dict | list):
            lines.append(f"{k.replace('_', ' ') + ':':<15}{v}")
    if isinstance(marks, list):
        lines.append("")
        lines.append(f"marks ({len(marks)}):")
        if marks:
            lines.append(f"  {'name':<24} {'seq':>10}  {'time':<29} kept")
        for m in marks:
            kept = "until removed" if _get(m, "pinned") else "by retention (made by Rewind)"
            lines.append(f"  {str(_get(m, 'name')):<24} {str(_get(m, 'seq')):>10}  "
                         f"{_fmt_time(_get(m, 'time_ns')):<29} {kept}")
    if isinstance(maps, list):
        lines.append("")
        lines.append(f"delta maps ({len(maps)}):")
        if maps:
            lines.append(f"  {'id':>5} {'seqs':>21}  {'from':<29} {'to':<29} {'kind':<8} {'entries':>9}")
        for mp in maps:
            seqs = f"{_get(mp, 'first_seq')}-{_get(mp, 'last_seq')}"
            lines.append(f"  {str(_get(mp, 'id')):>5} {seqs:>21}  {_fmt_time(_get(mp, 'first_time')):<29} "
                         f"{_fmt_time(_get(mp, 'last_time')):<29} {str(_get(mp, 'kind')):<8} "
                         f"{str(_get(mp, 'entries')):>9}")
    return lines


def cmd_diff(args: argparse.Namespace) -> int:
    with open_store(args.dir) as store:
        a = store.resolve(args.a)
        b = store.resolve(args.b)
        ranges = store.diff(a, b)
    if args.json:
        _out(json.dumps([{"offset": off, "length": n} for off, n in ranges]))
        return 0
    total = 0
    for off, n in ranges:
        total += n
        _out(f"{off} {n}")
    _out(f"# {len(ranges)} range{'s' if len(ranges) != 1 else ''}, {human_bytes(total)} ({total} bytes) "
         f"differ between {args.a} (seq {a}) and {args.b} (seq {b})")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    out = os.path.abspath(args.out)
    parent = os.path.dirname(out)
    if not os.path.isdir(parent):
        raise BadInput(f"{args.out}: directory {parent} does not exist; create it or choose another OUT")
    if os.path.lexists(out):
        raise BadInput(f"{args.out} already exists; remove it or choose another OUT")
    with open_store(args.dir) as store:
        seq = store.resolve(args.at)
        job = store.export(seq, out)
        try:
            _run(job, "export")
        except BaseException:
            if getattr(job, "state", "") != "done":
                # The engine removes OUT itself; this covers a second Ctrl-C that left it mid-way
                # (OUT did not exist before: checked above).
                with contextlib.suppress(OSError):
                    os.unlink(out)
            raise
    _out(f"exported {args.at} (seq {seq}) to {args.out}")
    return 0


def cmd_rewind(args: argparse.Namespace) -> int:
    d = _store_dir(args.dir)
    try:
        store = _open_local(d)
    except StoreLocked:
        raise BadInput(f"{args.dir} is being served: stop 'rewind serve' first, then rewind") from None
    _report_recovery(store)
    with store:
        seq = store.resolve(args.at)
        head = store.resolve("now")
        ranges = store.diff(seq, head) if seq != head else []
        changed = sum(n for _, n in ranges)
        summary = (f"{store.primary_path}: {len(ranges)} range{'s' if len(ranges) != 1 else ''}, "
                   f"{human_bytes(changed)} ({changed} bytes) will change back to {args.at} (seq {seq})")
        if not args.yes:
            if not is_interactive():
                raise BadInput("rewind changes the primary in place: add --yes to confirm")
            sys.stderr.write(summary + "\n")
            for off, n in ranges[:10]:
                sys.stderr.write(f"  {off} {n}\n")
            if len(ranges) > 10:
                sys.stderr.write(f"  ... and {len(ranges) - 10} more ranges\n")
            sys.stderr.write("Rewind now? (a mark is set first so you can undo it) [y/N] ")
            sys.stderr.flush()
            answer = sys.stdin.readline().strip().lower()
            if answer not in ("y", "yes"):
                _err("not rewound")
                return 1
        job = store.rewind(seq)
        result = _run(job, "rewind")
        undo = result if isinstance(result, str) else _get(result, "name", result)
        _out(summary.replace("will change", "changed"))
        _out(f"undo with: rewind rewind {args.dir} --at mark:{undo}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    if args.repair:
        return _verify_repair(args)
    with open_store(args.dir) as store:
        job = store.verify()
        problems = _run(job, "verify")
    return _verify_report(args, problems or [])


def _verify_repair(args: argparse.Namespace) -> int:
    """verify --repair: maps.db is an index of the journal; when it cannot be opened or disagrees
    with the journal, it is set aside (kept) and rebuilt from the journal. Damage in the journal
    itself cannot be repaired and is reported as verify reports it."""
    from .errors import CorruptionError
    from .store import MAPS_DAMAGE, Store

    d = _store_dir(args.dir)
    index = str((d / "maps.db").absolute())
    try:
        with open_store(args.dir, allow_remote=False) as store:
            problems = _run(store.verify(), "verify") or []
        if not any(p.startswith(("maps.db:", index)) for p in problems):
            return _verify_report(args, problems)  # nothing an index rebuild would mend
        why = "it disagrees with the journal"
    except CorruptionError as e:
        if getattr(e, "path", "") != index:
            raise
        why = "it is damaged"
    except MAPS_DAMAGE:  # found while reading it, after open
        why = "it is damaged"
    aside, redo_known = Store.set_aside_index(d)
    _err(f"note: {index}: {why}; moved it aside to {aside.name}; rebuilding it from the journal")
    if not redo_known:
        _err("warning: the damaged index did not say where the last checkpoint was: if the store was not"
             " stopped cleanly, writes since then may be missing from the primary file (the journal has them)")
    with open_store(args.dir, allow_remote=False) as store:
        problems = _run(store.verify(), "verify") or []
    return _verify_report(args, problems)


def _verify_report(args: argparse.Namespace, problems: list[Any]) -> int:
    for p in problems:
        _out(f"{_describe_problem(p)}")
    if problems:
        _err(f"{len(problems)} problem{'s' if len(problems) != 1 else ''} found in {args.dir} (listed above): "
             "points that need the damaged data cannot be read; export the points you need that still can")
        return 1
    _out(f"ok: {args.dir}: every checksum and map entry verified")
    return 0


def _describe_problem(p: Any) -> str:
    if isinstance(p, str):
        return " ".join(p.split())
    path, off, msg = _get(p, "path"), _get(p, "offset"), _get(p, "message", _get(p, "problem"))
    if path is not None or msg is not None:
        where = f"{path}" + (f" offset {off}" if isinstance(off, int) and off >= 0 else "")
        return " ".join(f"{where}: {msg}".split())
    return " ".join(str(p).split())


def cmd_retention(args: argparse.Namespace) -> int:
    with open_store(args.dir) as store:
        if not hasattr(store, "retention"):
            raise BadInput("retention is not available yet in this version of the engine")
        if args.policy is not None or args.max_size is not None or args.on_full is not None:
            if not hasattr(store, "set_retention"):
                raise BadInput("setting retention is not available yet in this version of the engine")
            kwargs: dict[str, Any] = {}
            if args.policy is not None:
                kwargs["policy"] = args.policy
            if args.max_size is not None:
                kwargs["max_size"] = args.max_size
            if args.on_full is not None:
                kwargs["on_full"] = args.on_full
            store.set_retention(**kwargs)
        info = store.retention()
    from .control import to_json

    data = to_json(info)
    if not isinstance(data, dict):
        _out(json.dumps(data))
        return 0
    for line in format_retention(data):
        _out(line)
    return 0


def format_retention(r: dict[str, Any]) -> list[str]:
    """The retention settings for people: tiers, space limit, what happens when full."""
    lines: list[str] = []
    limit = r.get("max_size")
    for k, v in r.items():
        if k == "max_size":
            shown = f"{human_bytes(v)} ({v} bytes)" if isinstance(v, int) and v else "none"
        elif k == "faded_early" and isinstance(v, list):
            if not v:
                continue
            last = v[-1] if isinstance(v[-1], dict) else {}
            shown = (f"{len(v)} time{'s' if len(v) != 1 else ''} recently, last at "
                     f"{_fmt_time(last.get('time_ns'))} (horizon now seq {last.get('horizon')})")
        else:
            shown = json.dumps(v) if isinstance(v, list | dict) else str(v)
        lines.append(f"{k.replace('_', ' ') + ':':<15}{shown}")
    if limit is None and "max_size" not in r:
        lines.append(f"{'max size:':<15}none")
    return lines


def cmd_fade(args: argparse.Namespace) -> int:
    with open_store(args.dir) as store:
        if not hasattr(store, "fade"):
            raise BadInput("fade is not available yet in this version of the engine")
        job = store.fade()
        result = _run(job, "fade") if hasattr(job, "__iter__") and not isinstance(job, dict) else job
    from .control import to_json

    data = to_json(result)
    if isinstance(data, dict):
        parts = [f"{k.replace('_', ' ')} {json.dumps(v) if isinstance(v, list | dict) else v}"
                 for k, v in data.items()]
        _out("faded: " + ", ".join(parts) if parts else "faded")
    else:
        _out("faded" if data is None else f"faded: {json.dumps(data)}")
    return 0


# ---------------------------------------------------------------- serve


def _nbd_options(args: argparse.Namespace) -> dict[str, Any]:
    """NbdServer's keyword arguments from serve's options: TLS, remote access, connection cap.
    TCP is loopback only unless --nbd-allow-remote, and then TLS is required; TLS, once given,
    is required of every TCP client (unix sockets are checked by the peer's uid instead)."""
    from .frontends.nbd.server import check_tcp_policy, parse_address, tcp_is_loopback, tls_context

    cert, key, ca = args.tls_cert, args.tls_key, args.tls_ca
    if args.tls_creds:
        if cert or key:
            raise BadInput("give --tls-creds DIR or --tls-cert/--tls-key, not both")
        creds = Path(args.tls_creds)
        if not creds.is_dir():
            raise BadInput(f"--tls-creds {creds}: no such directory (it holds server-cert.pem and server-key.pem)")
        cert, key = str(creds / "server-cert.pem"), str(creds / "server-key.pem")
        if ca is None and (creds / "ca-cert.pem").exists():
            ca = str(creds / "ca-cert.pem")
    if bool(cert) != bool(key):
        raise BadInput("--tls-cert and --tls-key go together: give both (or --tls-creds DIR)")
    if ca and not cert:
        raise BadInput("--tls-ca needs --tls-cert and --tls-key (or --tls-creds DIR)")
    tls = tls_context(cert, key, ca) if cert else None
    remote = False
    for addr in args.nbd or []:
        kind, host, _port = parse_address(addr)
        if kind == "tcp":
            check_tcp_policy(host, args.nbd_allow_remote, tls is not None)
            remote = remote or not tcp_is_loopback(host)
    if remote and not ca:
        _err("warning: NBD over TLS without --tls-ca: any client that reaches the port can read and write "
             "the volume; give --tls-ca (or ca-cert.pem in --tls-creds) to require client certificates")
    opts: dict[str, Any] = {"allow_remote": bool(args.nbd_allow_remote), "tls": tls}
    if args.nbd_max_connections is not None:
        opts["max_connections"] = args.nbd_max_connections
    return opts


def cmd_serve(args: argparse.Namespace) -> int:
    from .control import ControlServer
    from .store import Store

    d = _store_dir(args.dir)
    if args.fuse and not os.path.isdir(args.fuse):
        raise BadInput(f"--fuse {args.fuse}: no such directory; create the mount point first")
    nbd_options = _nbd_options(args)  # refuses unsafe TCP addresses before the store is opened
    stop = threading.Event()
    got: list[int] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        got.append(signum)
        stop.set()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    started: list[Any] = []
    # a server makes a few small tuples per write and keeps few cycles: collecting every 700
    # allocations (the default) cost it about a tenth of its time
    gc.set_threshold(50_000, 20, 20)
    store = Store.open(d)
    _report_recovery(store)
    try:
        addresses = args.nbd or [f"unix:{os.path.abspath(d / 'nbd.sock')}"]
        uris: list[str] = []
        from .frontends.nbd.server import NbdServer

        for addr in addresses:
            srv = NbdServer(store, addr, **nbd_options)
            srv.start()
            started.append(srv)
            uris.append(str(getattr(srv, "uri", addr)))
        if not args.nbd:
            sock = d / "nbd.sock"
            with contextlib.suppress(OSError):
                os.chmod(sock, 0o600)
        if args.fuse:
            from .frontends.fuse import FuseView

            mnt = os.path.abspath(args.fuse)  # before FUSE starts (libfuse may chdir to /)
            fv = FuseView(store, mnt)
            fv.start()
            started.append(fv)
            uris.append(f"fuse:{mnt}")
        if args.watch:
            from .frontends.watch import Watcher

            w = Watcher(store)
            w.start()
            started.append(w)
            uris.append(f"watch:{store.primary_path}")
        if hasattr(store, "start_retention"):
            store.start_retention()  # the policy is applied in the background while serving
        control = ControlServer(store)
        control.start()
        started.append(control)
        uris.append(f"control:{control.path}")
        sys.stdout.write("ready " + " ".join(uris) + "\n")
        sys.stdout.flush()
        while not stop.is_set():
            stop.wait(0.5)
    finally:
        errs: list[BaseException] = []
        for thing in reversed(started):
            try:
                thing.stop()
            except BaseException as e:  # keep stopping the rest; report the first
                errs.append(e)
        try:
            store.close()
        except BaseException as e:
            errs.append(e)
        for s, h in old.items():
            signal.signal(s, h)
        if errs and sys.exc_info()[0] is None:
            raise errs[0]
    return 0


# ---------------------------------------------------------------- entry point


def _console_paths(args: Sequence[str]) -> list[str] | None:
    """`rewind PATH...` as a file manager runs it (the .desktop entry's Exec=rewind %F): the
    paths to open in the console, or None when these are not paths (a command, an option, a
    bare word for argparse to judge). A path that cannot be opened is a UsageError."""
    if not args or args[0].startswith("-"):
        return None
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    first = args[0]
    if first in sub.choices or ("/" not in first and not os.path.exists(first)):
        return None  # a command name wins over a folder called like it
    for a in args:
        p = Path(a).expanduser()
        if not p.exists():
            raise UsageError(f"{a} does not exist: give a protection's history folder or a disk image")
        if p.is_dir() and not (p / "store.json").is_file():
            raise UsageError(f"{a} is a folder without a Rewind history (no store.json): give the history "
                             "folder made by 'rewind protect', or a disk image")
        if not p.is_dir() and not (p.is_file() or p.is_block_device()):
            raise UsageError(f"{a} is neither a history folder nor a disk image")
    return [str(Path(a).expanduser().absolute()) for a in args]


def _console(paths: Sequence[str] = ()) -> int:
    if sys.platform.startswith("linux") and not any(
        os.environ.get(v) for v in ("DISPLAY", "WAYLAND_DISPLAY", "QT_QPA_PLATFORM")
    ):
        # Qt would print several lines and abort; say it in one, with what to do.
        _err("no display to open the console on (DISPLAY and WAYLAND_DISPLAY are unset): run 'rewind' in a "
             "desktop session, or use a subcommand (see 'rewind --help')")
        return 2
    try:
        from rewind.app.main import main as app_main
    except ImportError as e:
        _err(f"the console needs the GUI extras ({e}); install them with: pip install 'rewind[gui]' "
             "(or use a subcommand, see 'rewind --help')")
        return 2
    rc = app_main(list(paths))
    return rc if isinstance(rc, int) else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run one `rewind` command; returns the exit status (never raises, never prints a traceback)."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    debug = bool(os.environ.get("REWIND_DEBUG"))
    args: argparse.Namespace | None = None
    try:
        if not args_list:
            return _console()
        paths = _console_paths(args_list)
        if paths is not None:
            return _console(paths)
        parser = build_parser()
        args = parse_args(parser, args_list)
        if not getattr(args, "func", None):
            raise UsageError(f"missing command (see '{PROG} --help')")
        rc: int = args.func(args)
        sys.stdout.flush()
        return rc
    except SystemExit as e:  # --help / --version from argparse
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    except KeyboardInterrupt:
        _err("interrupted")
        return 130
    except BrokenPipeError:
        # The reader went away (e.g. `rewind log | head`): stop quietly.
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return 0
    except RewindError as e:
        if debug:
            traceback.print_exc()
        _err(_message(e))
        return int(getattr(e, "exit_code", 1))
    except OSError as e:
        if debug:
            traceback.print_exc()
        where = f"{e.filename}: " if e.filename else ""
        _err(f"{where}{e.strerror or e}")
        bad_path = (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError)
        return 2 if isinstance(e, bad_path) else 1
    except Exception as e:
        if debug:
            traceback.print_exc()
        damaged = _index_damage(e, args)
        if damaged is not None:  # found after open, while reading maps.db
            _err(_message(damaged))
            return 1
        _err(f"internal error: {type(e).__name__}: {e} (run with REWIND_DEBUG=1 for details and report it)")
        return 1


def _index_damage(e: Exception, args: argparse.Namespace | None) -> RewindError | None:
    """An SQLite error that means maps.db is damaged, as the error open gives for it."""
    d = getattr(args, "dir", None)
    if d is None or type(e).__module__ != "apsw":
        return None
    from .store import MAPS_DAMAGE, maps_damage_error

    return maps_damage_error(Path(d).absolute(), e) if isinstance(e, MAPS_DAMAGE) else None


def _message(e: RewindError) -> str:
    text = str(e) or type(e).__name__
    path = getattr(e, "path", "")
    off = getattr(e, "offset", -1)
    if path and path not in text:
        text += f" ({path}" + (f" offset {off}" if isinstance(off, int) and off >= 0 else "") + ")"
    return text


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
