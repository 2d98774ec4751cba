"""The HA log: transitions and refusals with their reasons, never a PIN or key
material. Written to [group] log (when set) and errors also to stderr."""
from __future__ import annotations

import logging
import os
import sys
import time

log = logging.getLogger("hashim")
_configured = None


def setup_logging(config):
    global _configured
    path = config.group.log
    if _configured == path:
        return
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()
    log.setLevel(logging.INFO)
    log.propagate = False
    fmt = logging.Formatter("%(asctime)s %(process)d %(levelname)s %(message)s",
                            "%Y-%m-%dT%H:%M:%S")
    err = logging.StreamHandler(sys.stderr)
    err.setLevel(os.environ.get("HASHIM_STDERR_LEVEL", "ERROR").upper())
    err.setFormatter(logging.Formatter("hashim: %(message)s"))
    log.addHandler(err)
    if path:
        try:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            fh = logging.FileHandler(path)
            fh.setFormatter(fmt)
            log.addHandler(fh)
        except OSError as e:
            log.error("cannot write the HA log %s: %s", path, e)
    _configured = path


# --------------------------------------------------------------------------- hashim log

ENTRY_TIME = "%Y-%m-%dT%H:%M:%S"      # the file handler's datefmt above (local time)
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def add_arguments(name, parser):
    if name != "log":
        return
    parser.add_argument("-n", "--lines", type=int, metavar="N",
                        help="only the last N entries (after the other filters)")
    parser.add_argument("-f", "--follow", action="store_true",
                        help="keep printing new entries until interrupted")


def parse_since(text: str, now: float | None = None) -> float:
    """``--since T``: an ISO 8601 time (local time unless it names its offset, e.g.
    ``2026-11-26T12:00``, ``2026-11-26 12:00:00Z``, ``12:00`` today) or a duration
    back from now: ``90s``, ``10m``, ``2h``, ``1d`` (also ``1.5h``). Returns seconds
    since the epoch; ValueError with what is accepted."""
    import datetime as dt
    import re
    now = time.time() if now is None else now
    t = text.strip()
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([smhd])", t)
    if m:
        return now - float(m.group(1)) * UNITS[m.group(2)]
    try:
        if re.fullmatch(r"\d{1,2}:\d{2}(:\d{2})?", t):
            d = dt.datetime.combine(dt.date.today(), dt.time.fromisoformat(t))
        else:
            d = dt.datetime.fromisoformat(t.replace("Z", "+00:00") if t.endswith("Z") else t)
    except ValueError:
        raise ValueError(f"--since {text!r}: expected an ISO time (2026-11-26T12:00, "
                         "12:00) or a duration back from now (30s, 10m, 2h, 1d)")
    return d.timestamp()       # naive: local time


def entries(lines):
    """(time or None, text) per entry; continuation lines (tracebacks) stay with
    the entry they follow."""
    cur = None
    for line in lines:
        line = line.rstrip("\n")
        t = _entry_time(line)
        if t is not None or cur is None:
            if cur is not None:
                yield cur
            cur = [t, line]
        else:
            cur[1] += "\n" + line
    if cur is not None:
        yield cur


def _entry_time(line: str):
    if len(line) < 19 or line[4] != "-" or line[10] != "T":
        return None
    try:
        return time.mktime(time.strptime(line[:19], ENTRY_TIME))
    except ValueError:
        return None


def about(text: str, member: str) -> bool:
    """Is this entry about ``member``? (names appear quoted: member 'hsm-a', or in
    the start-up line: members hsm-a (online), ...)"""
    import re
    return f"'{member}'" in text or re.search(
        r"(?<![\w.@+-])" + re.escape(member) + r" \(", text) is not None


def main(args) -> int:
    from . import config as cfg
    config = cfg.load(args.config_path, check_files=False)
    path = config.group.log
    if not path:
        return _fail(2, f"group '{config.group.label}' has no HA log: set one with "
                         f"'hashim group set log /var/log/hashim/ha.log' ({config.path})")
    if args.member is not None and args.member not in config.member_names:
        print(f"hashim: note: '{args.member}' is not a member now; showing its past entries",
              file=sys.stderr)
    since = None
    if args.since:
        try:
            since = parse_since(args.since)
        except ValueError as e:
            return _fail(2, str(e))
        since = float(int(since))           # entries have whole seconds

    def keep(t, text):
        if since is not None and (t is None or t < since):
            return False
        return args.member is None or about(text, args.member)

    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        if not args.follow:
            print(f"hashim: no HA log yet at {path}", file=sys.stderr)
            return 0
        data = b""
    except OSError as e:
        return _fail(1, f"cannot read the HA log {path}: {e.strerror}")
    out = sys.stdout
    pos = len(data)
    chosen = [text for t, text in entries(data.decode("utf-8", "replace").splitlines())
              if keep(t, text)]
    if args.lines is not None:
        chosen = chosen[-args.lines:] if args.lines > 0 else []
    for text in chosen:
        out.write(text + "\n")
    out.flush()
    if not args.follow:
        return 0
    try:
        while True:                          # follow: poll for new whole lines
            time.sleep(0.5)
            try:
                size = os.stat(path).st_size
            except FileNotFoundError:
                continue
            if size < pos:
                pos = 0                      # rotated or truncated
            if size == pos:
                continue
            with open(path, "rb") as f:
                f.seek(pos)
                data = f.read()
            cut = data.rfind(b"\n") + 1
            pos += cut
            for t, text in entries(data[:cut].decode("utf-8", "replace").splitlines()):
                if keep(t, text):
                    out.write(text + "\n")
            out.flush()
    except KeyboardInterrupt:
        return 0


def _fail(code: int, msg: str) -> int:
    """One line on stderr naming what to fix; the exit code (1 failed, 2 usage/config)."""
    sys.stderr.write("hashim: " + " ".join(str(msg).split()) + "\n")
    sys.stderr.flush()
    return code
