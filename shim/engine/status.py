"""What a running module publishes for ``hashim status``, and the operator requests
it picks up (``hashim recover NAME``), through the state directory of its config:

    <state_dir>/status-<pid>.json    this process's view (rewritten on every change,
                                     at most a few times a second; removed at exit)
    <state_dir>/recover-<name>       a request to retry member <name> now (mtime)
"""
from __future__ import annotations

import json
import os
import tempfile
import time

from ..members.member import ONLINE

MIN_PERIOD = 0.25      # seconds between two writes of the status file


def iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def snapshot(g, rtt=None) -> dict:
    now_m = time.monotonic()
    try:
        primary = g.primary.name
    except Exception:
        primary = None
    members = []
    limit = g.settings.recovery_attempts
    for m in g.members:
        rec = None
        if m.state != ONLINE and m.next_recovery is not None:
            rec = {"attempt": m.recovery_attempt, "of": limit,
                   "next_in_s": round(max(0.0, m.next_recovery - now_m), 1)}
        members.append({
            "name": m.name, "state": m.state, "in_flight": m.in_flight,
            "served": m.served, "failed_over": m.failed_over, "recovery": rec,
            "last_error": m.last_error, "last_change": iso(m.last_change),
            "kind": m.kind, "module": m.cfg.module,
            "heartbeat_rtt_ms": round(rtt[m.name] * 1000, 3) if rtt and m.name in rtt else None,
        })
    rep = g.replicator
    return {"group": g.label, "primary": primary, "pid": os.getpid(),
            "updated": iso(time.time()), "members": members,
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
        self.seen_requests = {}

    def changed(self):
        self.dirty = True

    def publish(self, force=False):
        now = time.monotonic()
        if not force and now - self.last_write < MIN_PERIOD:
            return
        sup = self.g.supervisor
        snap = snapshot(self.g, sup.rtt if sup else None)
        body = json.dumps(snap, sort_keys=True)
        self.last_write = now
        if body == self.last_body and not self.dirty and now - self.last_write < 5:
            return
        self.dirty = False
        self.last_body = body
        try:
            os.makedirs(self.dir, mode=0o700, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".status-")
            with os.fdopen(fd, "w") as f:
                f.write(body)
            os.replace(tmp, self.path)
        except OSError:
            pass

    def remove(self):
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
