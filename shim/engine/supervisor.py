"""Supervision of the members, on one background thread per process:

* commands in flight: a command running longer than ``heartbeat_interval`` makes
  the supervisor probe its member (a cheap call on a probe thread); each answer
  extends the command's deadline by ``command_timeout``; a member that gives no sign
  of life for ``command_timeout`` fails over;
* idle members are probed every ``heartbeat_interval`` so a dead link is found before
  an application command meets it;
* failed members are retried every ``recovery_interval`` for ``recovery_attempts``
  attempts, then left alone until ``hashim recover NAME``;
* the group's status is published to the state directory for ``hashim status``.
"""
from __future__ import annotations

import logging
import threading
import time

from ..errors import P11Error
from ..members.member import (DEVICE_ERROR, GIVEN_UP, ONLINE, RECOVERING,
                              TOKEN_NOT_PRESENT)
from ..members.module import ffi
from . import status

log = logging.getLogger("hashim")


class Supervisor:
    def __init__(self, group):
        self.g = group
        self.s = group.settings
        self.stopping = threading.Event()
        self.wake = threading.Event()
        self.thread = None
        self.probes = {}            # member name -> (thread, started, answered)
        self.alive_at = {}          # member name -> monotonic time of last sign of life
        self.rtt = {}               # member name -> seconds of the last probe
        self.publisher = status.Publisher(group)

    def start(self):
        self.thread = threading.Thread(target=self.run, name="hashim-supervisor", daemon=True)
        self.thread.start()

    def stop(self):
        self.stopping.set()
        self.wake.set()
        self.publisher.remove()

    def member_failed(self, m):
        m.next_recovery = time.monotonic() + min(self.s.recovery_interval, 1.0)
        m.recovery_attempt = 0
        self.publisher.changed()
        self.wake.set()

    # ---- the loop --------------------------------------------------------------
    def run(self):
        tick = min(0.25, self.s.heartbeat_interval / 4)
        while not self.stopping.is_set():
            now = time.monotonic()
            try:
                for m in self.g.members:
                    if m.state == ONLINE:
                        self.watch(m, now)
                    elif m.state in (DEVICE_ERROR, TOKEN_NOT_PRESENT):
                        self.maybe_recover(m, now)
                self.publisher.read_requests(self)
                self.publisher.publish()
            except Exception:
                log.exception("supervisor: unexpected error")
            self.wake.wait(tick)
            self.wake.clear()

    def watch(self, m, now):
        hb, timeout = self.s.heartbeat_interval, self.s.command_timeout
        last_life = self.alive_at.get(m.name, now)
        oldest = min((t for _, t in list(m.calls.values())), default=None)
        busy_long = oldest is not None and now - oldest > hb
        if busy_long or now - last_life > hb:
            self.probe(m, now)
        if oldest is not None:
            life = max(self.alive_at.get(m.name, oldest), oldest)
            if now - life > timeout:
                m.fail(f"no answer for {timeout:g} s (command timeout)")

    def probe(self, m, now):
        p = self.probes.get(m.name)
        if p is not None and p.is_alive():
            return                                  # one probe at a time
        def run(gen=m.generation):
            info = ffi.new("CK_SESSION_INFO *")
            t0 = time.monotonic()
            try:
                rv = m.raw("C_GetSessionInfo", m.anchor, info)
            except Exception as e:
                rv = None
            if m.generation != gen or m.state != ONLINE:
                return
            if rv == 0:
                self.alive_at[m.name] = time.monotonic()
                self.rtt[m.name] = time.monotonic() - t0
            else:
                from ..members.member import DEVICE_LEVEL
                if rv is None or rv in DEVICE_LEVEL:
                    m.fail(f"heartbeat failed ({rv if rv is None else hex(rv)})")
        t = threading.Thread(target=run, name=f"hashim-probe-{m.name}", daemon=True)
        self.probes[m.name] = t
        self.alive_at.setdefault(m.name, now)
        t.start()

    # ---- recovery ----------------------------------------------------------------
    def maybe_recover(self, m, now, forced=False):
        if m.state == DEVICE_ERROR:
            m.set_state(TOKEN_NOT_PRESENT)
        if not forced and (m.next_recovery is None or now < m.next_recovery):
            return
        limit = self.s.recovery_attempts
        if not forced and limit is not None and m.recovery_attempt >= limit:
            m.set_state(GIVEN_UP, m.last_error)
            log.error("member '%s': given up after %d recovery attempts; "
                      "'hashim recover %s' tries again", m.name, limit, m.name)
            self.publisher.changed()
            return
        m.recovery_attempt += 1
        m.set_state(RECOVERING)
        self.publisher.changed()
        threading.Thread(target=self._recover, args=(m,), name=f"hashim-recover-{m.name}",
                         daemon=True).start()

    def _recover(self, m):
        try:
            try:
                m.stop()
            except Exception:
                pass
            self.g.bring_up(m)
            self.alive_at[m.name] = time.monotonic()
            log.info("member '%s': recovered (attempt %d)", m.name, m.recovery_attempt)
        except Exception as e:
            reason = e.reason if isinstance(e, P11Error) and e.reason else str(e)
            m.set_state(TOKEN_NOT_PRESENT, f"recovery attempt {m.recovery_attempt}: {reason}")
            m.next_recovery = time.monotonic() + self.s.recovery_interval
            limit = self.s.recovery_attempts
            if limit is not None and m.recovery_attempt >= limit:
                m.set_state(GIVEN_UP, m.last_error)
        self.publisher.changed()
        self.wake.set()

    def recover_now(self, name):
        m = self.g.member(name)
        if m is None or m.state in (ONLINE, RECOVERING):
            return
        log.info("member '%s': recovery requested by the operator", name)
        m.recovery_attempt = 0
        self.maybe_recover(m, time.monotonic(), forced=True)
