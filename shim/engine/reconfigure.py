"""Live reconfiguration: a running module notices that its configuration file changed
(a look at its mtime once a second, on its own thread: no cost per call) and applies
the new one while applications keep their sessions and object handles.

* a removed member (or one whose module, token or environment changed) leaves the
  rotation at once; commands already running on it finish, then it is closed;
* an added member is started, logged in with the group's login, synchronised, and
  joins the rotation (on failure it waits for recovery like any failed member);
* the order of members (which one is primary) and every [group] setting apply to new
  commands.
A configuration that does not validate is logged and ignored (the running one stays).
"""
from __future__ import annotations

import logging
import os
import threading
import time

from .. import config as configmod
from .. import native
from ..errors import P11Error
from ..members.member import TOKEN_NOT_PRESENT, Member

log = logging.getLogger("hashim")
CHECK_EVERY = 1.0       # seconds between two looks at the file's mtime
REMOVED = "removed"


class ConfigWatcher:
    def __init__(self, group):
        self.g = group
        self.path = group.config.path
        self.seen = self._stamp()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.run, name="hashim-config", daemon=True)

    def _stamp(self):
        try:
            st = os.stat(self.path)
            return (st.st_mtime_ns, st.st_size, st.st_ino)
        except OSError:
            return None

    def start(self):
        self.thread.start()

    def stop(self):
        self.stopping.set()

    def run(self):
        while not self.stopping.wait(CHECK_EVERY):
            stamp = self._stamp()
            if stamp is None or stamp == self.seen:
                continue
            self.seen = stamp
            try:
                new = configmod.load(self.path)
            except configmod.ConfigError as e:
                log.error("configuration change ignored: %s", e)
                continue
            try:
                apply(self.g, new)
            except Exception:
                log.exception("applying the new configuration failed")


def apply(g, new):
    old = {m.name: m for m in g.members}
    wanted = {mc.name: mc for mc in new.members}
    removed = [m for m in g.members
               if m.name not in wanted or wanted[m.name] != m.cfg]
    for m in removed:
        retire(g, m)
    added = []
    for mc in new.members:
        if mc.name in old and old[mc.name] not in removed:
            continue
        m = Member(mc, g.cache_dir, g._member_failed)
        m.index = g.next_index()
        native.MEMBERS[m.index] = m
        g.members.append(m)
        added.append(m)
    order = [mc.name for mc in new.members]
    g.members.sort(key=lambda m: order.index(m.name))
    changed = [k for k in new.group.__dataclass_fields__
               if getattr(new.group, k) != getattr(g.settings, k)]
    g.config, g.settings = new, new.group
    if g.supervisor is not None:
        g.supervisor.s = new.group          # timeouts and recovery settings apply now
    g.label, g.serial = new.group.label, new.group.serial
    log.info("configuration reloaded from %s: %s", new.path, "; ".join(filter(None, [
        "added " + ", ".join(m.name for m in added) if added else "",
        "removed " + ", ".join(m.name for m in removed) if removed else "",
        "changed " + ", ".join(changed) if changed else "",
        "members now " + ", ".join(order)])))
    for m in added:
        threading.Thread(target=join, args=(g, m), name=f"hashim-join-{m.name}",
                         daemon=True).start()
    if g.supervisor is not None:
        g.supervisor.wake.set()


def join(g, m):
    try:
        g.bring_up(m)
        log.info("member '%s' joined the group", m.name)
    except Exception as e:
        reason = e.reason if isinstance(e, P11Error) and e.reason else str(e)
        m.set_state(TOKEN_NOT_PRESENT, f"joining: {reason}")
        m.next_recovery = time.monotonic() + g.settings.recovery_interval
        log.error("member '%s' could not join yet: %s", m.name, reason)


def retire(g, m):
    """Out of rotation now; closed once the commands running on it have finished."""
    native.member_up(m.index, False)
    m.set_state(REMOVED, "removed from the configuration")
    g.members.remove(m)
    g.objects.forget_member(m.name)
    for vs in g.sessions.all():
        vs.members.pop(m.name, None)

    def close():
        deadline = time.monotonic() + g.settings.command_timeout
        while (m.calls or native.inflight(m.index)) and time.monotonic() < deadline:
            time.sleep(0.05)
        try:
            m.stop()
        except Exception:
            log.exception("member '%s': closing it failed", m.name)
        log.info("member '%s' left the group", m.name)
    threading.Thread(target=close, name=f"hashim-retire-{m.name}", daemon=True).start()
