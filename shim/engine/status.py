"""What a running module publishes for ``hashim status``, and the operator requests
it picks up (``hashim recover NAME``), through the state directory of its config:

    <state_dir>/status-<pid>.json    this process's view (rewritten on every change,
                                     at most every MIN_PERIOD seconds, every 5 s
                                     when nothing changes; removed at C_Finalize and
                                     at exit; a dead process's file is ignored and
                                     removed by ``hashim status``)
    <state_dir>/recover-<name>       a request to retry member <name> now: its mtime
                                     is the request (a file older than the process is
                                     not a request to it)

The file is one JSON object (``snapshot`` below); ``shim/status.py`` merges the files
of every live process and documents the keys it prints.
"""
from __future__ import annotations

import json
import os
import tempfile
import time

from ..members import isolated
from ..members.member import GIVEN_UP, ONLINE, RECOVERING

MIN_PERIOD = 0.25      # seconds between two writes of the status file
DIRTY_PERIOD = 0.05    # ... when a member changed state (a transition shows at once)
FORMAT = 1             # bumped when a key changes meaning


def iso(t: float) -> str:
    """UTC, to the second: ``2026-11-26T12:00:00Z`` (``*_ts`` keys carry the float)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def process_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22):
    with the pid, it names a process even after the pid is reused."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        return int(data[data.rindex(b")") + 2:].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def recovery(m, limit, now_m) -> dict | None:
    """``{"attempt": k, "of": n or None, "next_in_s": s or None}`` while a member is
    down: k attempts made since it failed (or since ``hashim recover``); the next one
    in s seconds (0 while one runs, None when given up)."""
    if m.state == ONLINE:
        return None
    if m.state == GIVEN_UP or m.next_recovery is None:
        nxt = None
    elif m.state == RECOVERING:
        nxt = 0.0
    else:
        nxt = round(max(0.0, m.next_recovery - now_m), 1)
    return {"attempt": m.recovery_attempt, "of": limit, "next_in_s": nxt}


def fast_stats(m):
    """(calls in flight, calls served, seconds since its last completion or None) of the
    stub's fast path for member ``m`` (repeated operations the stub runs without Python:
    they are not in ``m.calls`` / ``m.served``)."""
    try:
        from .. import native
        return native.member_stats(getattr(m, "index", None))
    except Exception:                                        # noqa: BLE001
        return 0, 0, None


def snapshot(g, rtt=None, seen=None) -> dict:
    now_m = time.monotonic()
    try:
        primary = g.primary.name
    except Exception:
        primary = None
    members = []
    limit = g.settings.recovery_attempts
    for m in g.members:
        hist = list(getattr(m, "history", ()) or ())
        fin, fserved, _ = fast_stats(m)
        members.append({
            "name": m.name, "state": m.state, "in_flight": m.in_flight + fin,
            "served": m.served + fserved, "failed_over": m.failed_over,
            "recovery": recovery(m, limit, now_m),
            "last_error": m.last_error, "last_change": iso(m.last_change),
            "last_change_ts": m.last_change,
            "kind": m.kind, "module": m.cfg.module,
            # isolated: the p11-kit server child's pid and socket; remote: its address
            "endpoint": None if m.kind == "in process" else isolated.endpoint(m),
            "heartbeat_rtt_ms": round(rtt[m.name] * 1000, 3) if rtt and m.name in rtt else None,
            "transitions": [{"at": iso(t), "ts": t, "state": s, "reason": r}
                            for t, s, r in hist],
        })
    rep = g.replicator
    pid = os.getpid()
    return {"format": FORMAT, "group": g.label, "primary": primary, "pid": pid,
            "pid_start": process_start(pid), "started": iso(g.started_at),
            "started_ts": g.started_at,
            "updated": iso(time.time()), "updated_ts": time.time(), "members": members,
            "recover_requests": dict(seen or {}),
            "unreplicable": [{"fingerprint": fp, "label": lbl, "reason": why}
                             for fp, (lbl, why) in (rep.unreplicable.items() if rep else [])],
            "last_sync": rep.last_sync if rep else None}


class Publisher:
    def __init__(self, group):
        self.g = group
        self.dir = group.settings.state_dir
        self.path = os.path.join(self.dir, f"status-{os.getpid()}.json")
        self.last_write = 0.0
        self.last_body = None
        self.dirty = True
        self.removed = False
        self.seen_requests = {}     # request file name -> mtime acted upon

    def changed(self):
        self.dirty = True

    def publish(self, force=False):
        """Write the snapshot when it changed (counters included), at most every
        MIN_PERIOD seconds; unchanged, every 5 s (the file's age tells a reader that
        the process still runs its supervisor)."""
        if self.removed:
            return
        now = time.monotonic()
        if not force and now - self.last_write < (DIRTY_PERIOD if self.dirty else MIN_PERIOD):
            return
        sup = self.g.supervisor
        snap = snapshot(self.g, sup.rtt if sup else None,
                        {n[len("recover-"):]: t for n, t in self.seen_requests.items()})
        key = json.dumps({k: v for k, v in snap.items() if k not in ("updated", "updated_ts")},
                         sort_keys=True)
        if not force and not self.dirty and key == self.last_body and now - self.last_write < 5:
            return
        self.dirty = False
        self.last_body = key
        self.last_write = now
        try:
            os.makedirs(self.dir, mode=0o700, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".status-")
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(snap, sort_keys=True))
            os.replace(tmp, self.path)
        except OSError:
            pass

    def remove(self):
        self.removed = True
        try:
            os.unlink(self.path)
        except OSError:
            pass

    def read_requests(self, supervisor):
        try:
            names = os.listdir(self.dir)
        except OSError:
            return
        for n in names:
            if not n.startswith("recover-"):
                continue
            try:
                mtime = os.stat(os.path.join(self.dir, n)).st_mtime
            except OSError:
                continue
            if self.seen_requests.get(n) is None:
                self.seen_requests[n] = mtime     # requests older than us are not ours
                if mtime < self.g.started_at:
                    continue
            elif mtime <= self.seen_requests[n]:
                continue
            self.seen_requests[n] = mtime
            supervisor.recover_now(n[len("recover-"):])
            self.dirty = True
