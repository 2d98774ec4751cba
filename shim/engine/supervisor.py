"""Supervision of the members, on one background thread per process.

Failure detection (see also ``Member.call``, which fails a member on a device-level
answer, and DESIGN.md "Failure detection"):

* a command running longer than ``heartbeat_interval`` makes the supervisor probe its
  member (C_GetSessionInfo on the member's anchor session, on a probe thread), then
  again every ``heartbeat_interval`` while the command runs; every answer is a sign of
  life and extends the command's deadline: a member fails over only when it has given
  no sign of life for ``command_timeout`` while a command (or a probe) was running on
  it. A slow but healthy command (large key generation) therefore never fails over;
* idle members are probed every ``heartbeat_interval`` too, so a dead link is found
  before an application command meets it (a probe that hangs for ``command_timeout``
  fails the member like a hung command);
* a probe answered with a device-level code fails the member at once.

Recovery (DESIGN.md "Recovery"):

* a failed member shows "device error" until its first recovery attempt, made
  ``min(recovery_interval, FIRST_RETRY)`` seconds after the failure (a member that was
  only restarted comes back at once), then "recovering" during each attempt and "token
  not present" between attempts, which follow every ``recovery_interval``; after
  ``recovery_attempts`` failed attempts it is "given up" and left alone until
  ``hashim recover NAME`` (a request file in the state directory) asks for a new round;
* an attempt waits (at most ``command_timeout``) for the calls still running on the
  member to drain (abandoned ones included: member.abandoned), finalises its module,
  then ``Group.bring_up``: initialise, find the token, log in with the group's PIN,
  synchronise, back into rotation. An in-process module with calls still inside is not
  finalised (undefined behaviour under a running call, and the late calls would land on
  the next instance's sessions, which reuse the handle numbers): it is initialised again
  as it is (CKR_CRYPTOKI_ALREADY_INITIALIZED) and new sessions are opened beside the old
  ones, which are left open;
* a new attempt never starts while an earlier one is still running (a module wedged in
  C_Finalize or C_Initialize keeps its member "recovering"; isolate such modules).

Publishing: the group's status is written to the state directory for ``hashim
status`` (engine/status.py) on every transition, at most every ``status.MIN_PERIOD``.
"""
from __future__ import annotations

import atexit
import logging
import threading
import time

from ..errors import P11Error
from ..members.member import (DEVICE_ERROR, DEVICE_LEVEL, GIVEN_UP, ONLINE, RECOVERING,
                              TOKEN_NOT_PRESENT, abandoned)
from ..members.module import ffi
from ..errors import rv_name
from . import status

log = logging.getLogger("hashim")

FIRST_RETRY = 1.0      # seconds from a failure to the first recovery attempt (at most)


class Probe:
    __slots__ = ("thread", "generation", "started", "done")

    def __init__(self, generation, started):
        self.thread = None
        self.generation = generation
        self.started = started
        self.done = False


class Supervisor:
    def __init__(self, group):
        self.g = group
        self.s = group.settings
        self.stopping = threading.Event()
        self.wake = threading.Event()
        self.thread = None
        self.probes = {}            # member name -> Probe (the latest one)
        self.alive_at = {}          # member name -> monotonic time of last sign of life
        self.rtt = {}               # member name -> seconds of the last probe
        self.recoveries = {}        # member name -> thread of the running attempt
        self.publisher = status.Publisher(group)

    @property
    def tick(self) -> float:
        """Seconds between two looks (``s`` may be replaced by a live reconfiguration)."""
        return max(0.02, min(0.25, self.s.heartbeat_interval / 4))

    def start(self):
        self.thread = threading.Thread(target=self.run, name="hashim-supervisor", daemon=True)
        self.thread.start()
        atexit.register(self.publisher.remove)

    def stop(self):
        self.stopping.set()
        self.wake.set()
        t = self.thread
        if t is not None and t is not threading.current_thread():
            t.join(2.0)            # its last publish must not outlive the removal
        self.publisher.remove()
        try:
            atexit.unregister(self.publisher.remove)
        except Exception:
            pass

    def member_failed(self, m):
        """Called (on whatever thread noticed) once when a member fails. An isolated
        member's server child is killed at once (every call stuck in it returns, and
        the recovery starts it afresh); a remote member's connection is shut."""
        term = getattr(m, "terminate_child", None)
        if term is not None:
            try:
                term()
            except Exception:                      # noqa: BLE001
                log.exception("member '%s': stopping its server failed", m.name)
        m.next_recovery = time.monotonic() + min(self.s.recovery_interval, FIRST_RETRY)
        m.recovery_attempt = 0
        self.alive_at.pop(m.name, None)
        self.publisher.changed()
        self.wake.set()

    # ---- the loop --------------------------------------------------------------
    def run(self):
        while not self.stopping.is_set():
            self.wake.clear()             # before the work: a wake-up during it counts
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
            self.wake.wait(self.tick)
        self.publisher.remove()

    def watch(self, m, now):
        hb, timeout = self.s.heartbeat_interval, self.s.command_timeout
        calls = list(m.calls.values())
        oldest = min((t for _, t in calls), default=None)
        what = None
        if oldest is not None:
            what = min(calls, key=lambda c: c[1])[0]
        # the stub's fast path: its completions are signs of life; calls in flight with
        # no completion since count as running since that last completion
        fin, _, fidle = status.fast_stats(m)
        if fidle is not None:
            done_at = now - fidle
            if done_at > self.alive_at.get(m.name, 0.0):
                self.alive_at[m.name] = done_at
            if fin > 0 and (oldest is None or done_at < oldest):
                oldest, what = done_at, f"{fin} call(s) on the fast path"
        p = self.probes.get(m.name)
        if p is not None and (p.generation != m.generation):
            p = None
        if p is not None and not p.done and (oldest is None or p.started < oldest):
            oldest, what = p.started, "C_GetSessionInfo (heartbeat)"
        last_life = self.alive_at.setdefault(m.name, now)
        if oldest is not None:
            life = max(last_life, oldest)
            if now - life > timeout:
                m.fail(f"no answer for {timeout:g} s ({what} running "
                       f"{now - oldest:.1f} s; command timeout)")
                return
        busy_long = oldest is not None and now - oldest >= hb
        if (busy_long or now - last_life >= hb) and \
                (p is None or p.done and now - p.started >= hb):
            self.probe(m, now)

    def probe(self, m, now):
        """One C_GetSessionInfo on the member's anchor session, on its own thread."""
        pr = Probe(m.generation, now)
        anchor = m.anchor

        def run():
            info = ffi.new("CK_SESSION_INFO *")
            t0 = time.monotonic()
            try:
                rv = m.raw("C_GetSessionInfo", anchor, info)
                why = None
            except Exception as e:     # noqa: BLE001 - a broken module or a hung probe
                rv, why = None, str(e)
            pr.done = True
            if m.generation != pr.generation or m.state != ONLINE:
                return
            t1 = time.monotonic()
            if rv is None:
                m.fail(f"heartbeat failed: {why}")
            elif rv in DEVICE_LEVEL:
                m.fail(f"heartbeat: C_GetSessionInfo returned {rv_name(rv)}")
            else:                      # any other answer is a sign of life
                self.alive_at[m.name] = max(self.alive_at.get(m.name, 0.0), t1)
                self.rtt[m.name] = t1 - t0
        t = threading.Thread(target=run, name=f"hashim-probe-{m.name}", daemon=True)
        pr.thread = t
        self.probes[m.name] = pr
        t.start()

    # ---- recovery ----------------------------------------------------------------
    def maybe_recover(self, m, now, forced=False):
        t = self.recoveries.get(m.name)
        if t is not None and t.is_alive():
            return                                 # never two attempts at once
        if not forced and (m.next_recovery is None or now < m.next_recovery):
            return
        limit = self.s.recovery_attempts
        if not forced and limit is not None and m.recovery_attempt >= limit:
            self._give_up(m)
            return
        m.recovery_attempt += 1
        m.set_state(RECOVERING)
        self.publisher.changed()
        t = threading.Thread(target=self._recover, args=(m,), name=f"hashim-recover-{m.name}",
                             daemon=True)
        self.recoveries[m.name] = t
        t.start()

    def _give_up(self, m):
        limit = self.s.recovery_attempts
        m.set_state(GIVEN_UP, m.last_error)
        log.error("member '%s': given up after %d recovery attempts; "
                  "'hashim recover %s' tries again", m.name, limit, m.name)
        self.publisher.changed()

    def _recover(self, m):
        attempt = m.recovery_attempt
        limit = self.s.recovery_attempts
        log.info("member '%s': recovery attempt %d%s", m.name, attempt,
                 f" of {limit}" if limit is not None else "")
        try:
            def inside():                          # engine, abandoned, fast path
                return len(m.calls) + abandoned(m) + status.fast_stats(m)[0]
            deadline = time.monotonic() + self.s.command_timeout
            while inside() and time.monotonic() < deadline:
                time.sleep(0.01)                   # let calls still inside drain
            inside = inside()
            if inside and m.kind == "in process":
                # Calls are still inside the module (hung, or abandoned after a
                # timeout): finalising it under them is undefined behaviour, and a new
                # instance would hand out the same session handles, on which those
                # calls would land when they return. Restart without finalising: the
                # old sessions stay open (and theirs), new ones are opened beside them.
                log.warning("member '%s': %d call(s) still inside its module: restarting "
                            "it without finalising it (their sessions are left open)",
                            m.name, inside)
            else:
                try:
                    m.stop()
                except Exception:                  # noqa: BLE001
                    pass
            self.g.bring_up(m)
            self.alive_at[m.name] = time.monotonic()
            log.info("member '%s': recovered (attempt %d)", m.name, attempt)
        except Exception as e:                     # noqa: BLE001
            reason = e.reason if isinstance(e, P11Error) and e.reason else str(e)
            if isinstance(e, P11Error) and reason and rv_name(e.rv) not in reason:
                reason = f"{reason} ({rv_name(e.rv)})"
            m.next_recovery = time.monotonic() + self.s.recovery_interval
            m.set_state(TOKEN_NOT_PRESENT, f"recovery attempt {attempt}: {reason}")
            if limit is not None and attempt >= limit:
                self._give_up(m)
        self.publisher.changed()
        self.wake.set()

    def recover_now(self, name):
        """An operator's request (``hashim recover NAME``): a new round of attempts."""
        m = self.g.member(name)
        if m is None:
            log.warning("recovery requested for unknown member '%s'", name)
            return
        if m.state in (ONLINE, RECOVERING):
            log.info("member '%s': recovery requested by the operator; it is %s", name,
                     m.state)
            return
        log.info("member '%s': recovery requested by the operator", name)
        m.recovery_attempt = 0
        self.maybe_recover(m, time.monotonic(), forced=True)
