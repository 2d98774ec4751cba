"""The HA group: one virtual slot over the configured members.

Sessions, object handles and logins are virtual (sessions.py, objects.py); every
call is routed to a member and its handles translated:
  * key management goes to the primary (the first online member) and is replicated
    to every other online member before the call returns (replication.py);
  * a cryptographic operation goes to the least busy online member holding its key
    and stays there from *Init to completion; a single-part operation whose member
    fails is replayed (*Init + operation) on another member; a multi-part one ends
    with CKR_DEVICE_ERROR;
  * logins are fanned out to every member and replayed on members that come back.
"""
from __future__ import annotations

import itertools
import logging
import os
import threading
import time

from .. import native
from ..errors import P11Error
from ..members import objects as mo
from ..members.member import (DEVICE_ERROR, ONLINE, RECOVERING,
                              TOKEN_NOT_PRESENT, Member, MemberDown)
from ..members.module import ffi
from ..spec.constants import (CKF_RW_SESSION, CKF_SERIAL_SESSION, CKR, CKR_OK,
                              CKU_CONTEXT_SPECIFIC, CKU_SO, CKU_USER, CK_INVALID_HANDLE)
from .identity import describe
from .objects import HandleMap
from .sessions import Op, SessionTable

log = logging.getLogger("hashim")

OK = CKR_OK
VERSION = (0, 1)
# "least-busy" (default) or "round-robin" (for comparison in bench/group.py)
ROUND_ROBIN = os.environ.get("HASHIM_SCHEDULER", "least-busy") == "round-robin"


class Group:
    def __init__(self, config):
        self.config = config
        self.settings = config.group
        self.label = config.group.label
        self.slot_id = config.group.slot_id
        self.serial = config.group.serial
        self.members = [Member(m, self.cache_dir, self._member_failed)
                        for m in config.members]
        for i, m in enumerate(self.members):
            m.index = i
            native.MEMBERS[i] = m
        native.login(None)
        self.sessions = SessionTable()
        self.objects = HandleMap()
        self.info = {}                  # vh -> ObjectInfo
        self.absent = set()             # (vh, member name): searched, not there
        self.hidden = set()             # vhs of hashim's own objects
        self.login = None               # CKU_USER / CKU_SO while logged in
        self._pin = None                # bytearray, wiped on logout/finalize
        self._rotation = itertools.count()
        self.lock = threading.RLock()
        self.events = threading.Condition()
        self.pending_event = False
        self.finalized = False
        self.supervisor = None
        self.replicator = None
        self.watcher = None
        self.started_at = time.time()

    @property
    def cache_dir(self) -> str:
        import os
        return os.path.join(self.config.group.state_dir, "lib")

    # ---- life cycle ---------------------------------------------------------
    def start(self):
        from .replication import Replicator
        from .supervisor import Supervisor
        self.replicator = Replicator(self)
        problems, unusable = [], False
        for m in self.members:
            try:
                self.bring_up(m)
            except P11Error as e:
                # one member down is what the group is for: it waits for recovery
                unusable = unusable or e.rv == CKR.GENERAL_ERROR
                m.set_state(TOKEN_NOT_PRESENT, e.reason or str(e))
                m.next_recovery = time.monotonic() + self.settings.recovery_interval
                problems.append(e.reason or str(e))
                log.error("%s", e.reason or e)
        if not self.online:
            self.stop()
            # no member at all: a module that cannot be used is a configuration error
            raise P11Error(CKR.GENERAL_ERROR if unusable else CKR.FUNCTION_FAILED,
                           "no member could be started: " + "; ".join(problems))
        self.supervisor = Supervisor(self)
        self.supervisor.start()
        from .reconfigure import ConfigWatcher
        self.watcher = ConfigWatcher(self)
        self.watcher.start()

    def bring_up(self, m):
        """Start (or restart) a member and put it into rotation: log it in when the
        group is logged in, synchronise it, then mark it online."""
        m.set_state(RECOVERING)
        m.start()
        m.domain_key = self.replicator.find_domain_key(m)
        if self.login is not None and self._pin is not None:
            rv = m.raw("C_Login", m.anchor, self.login, bytes(self._pin), len(self._pin))
            if rv not in (OK, CKR.USER_ALREADY_LOGGED_IN):
                raise P11Error(rv, f"member '{m.name}': the group's login is refused")
        was_present = self.token_present()
        m.recovery_attempt = 0
        m.next_recovery = None
        m.receiving = True
        try:
            if self.login is not None:
                self.replicator.sync_member(m)
        finally:
            m.receiving = False
        m.set_state(ONLINE)
        native.member_up(m.index, True)
        native.expire()
        if not was_present and self.supervisor is not None:
            self.post_event()

    def stop(self):
        self.finalized = True
        if self.watcher:
            self.watcher.stop()
        if self.supervisor:
            self.supervisor.stop()
        with self.events:
            self.events.notify_all()
        self._wipe_pin()
        for m in self.members:
            native.member_up(m.index, False)
            if m.state != DEVICE_ERROR:        # a wedged module is not waited for
                m.stop()

    def _member_failed(self, m):
        """Called once when a member fails: forget its sessions and handles."""
        native.member_up(m.index, False)
        self.objects.forget_member(m.name)
        self.absent = {k for k in self.absent if k[1] != m.name}
        for vs in self.sessions.all():
            vs.members.pop(m.name, None)
        if self.supervisor:
            self.supervisor.member_failed(m)
        if not self.token_present():
            self.post_event()

    # ---- members ------------------------------------------------------------
    @property
    def online(self):
        return [m for m in self.members if m.state == ONLINE]

    @property
    def primary(self) -> Member:
        for m in self.members:
            if m.state == ONLINE:
                return m
        raise P11Error(CKR.DEVICE_ERROR, "no member of the group is online")

    def lead(self, vs) -> Member:
        """Where a session's key management goes: the primary, or the member whose
        own slot the session is on."""
        if vs.direct is None:
            return self.primary
        if vs.direct.state != ONLINE:
            raise P11Error(CKR.DEVICE_ERROR, f"member '{vs.direct.name}' is not online")
        return vs.direct

    @property
    def receivers(self):
        """Members that receive copies: online ones, and a member synchronising on its
        way back (what is made during its sync must reach it too)."""
        return [m for m in self.members
                if m.state == ONLINE or (m.state == RECOVERING and getattr(m, "receiving", False))]

    def others(self, vs, p):
        """Members that receive a copy of what ``p`` did for session ``vs``."""
        if vs.direct is not None:
            return []
        return [m for m in self.receivers if m is not p]

    def targets(self, vs):
        return [self.lead(vs)] if vs.direct is not None else self.online

    def member_slot(self, slot):
        """The member whose own slot ``slot`` is (ha_only = false), else None."""
        if self.settings.ha_only:
            return None
        for i, m in enumerate(self.members):
            if slot == self.slot_id + 1 + i:
                return m
        return None

    def holds(self, m, vh) -> bool:
        """Does member ``m`` hold object ``vh``? Resolved by a search on first use."""
        holders = self.objects.to_member.get(vh)
        if holders is None:
            return True               # unknown handle: any member answers "invalid"
        if m.name in holders:
            return True
        if (vh, m.name) in self.absent:
            return False
        return self.resolve(vh, m) != CK_INVALID_HANDLE

    def resolve(self, vh, m, session=None) -> int:
        info = self.describe(vh)
        if info is None:
            return CK_INVALID_HANDLE
        if session is None:
            with m.lock:
                found = mo.find(m, m.anchor, info.search)
        else:
            found = mo.find(m, session, info.search)
        taken = self.objects.to_virtual.get(m.name, {})
        free = [mh for mh in found if taken.get(mh, vh) == vh]   # ours, or nobody's
        if not free or (len(free) > 1 and not info.strong):
            self.absent.add((vh, m.name))
            return CK_INVALID_HANDLE
        self.objects.link(vh, m.name, free[0])
        return free[0]

    def describe(self, vh):
        info = self.info.get(vh)
        if info is None:
            for name, mh in list(self.objects.holders(vh).items()):
                m = self.member(name)
                if m is not None and m.online:
                    try:
                        info = describe(m, m.anchor, mh)
                    except P11Error:
                        continue
                    self.info[vh] = info
                    break
        return info

    def member(self, name):
        for m in self.members:
            if m.name == name:
                return m
        return None

    def pick(self, vs, handles=(), exclude=()) -> Member:
        """The member for a new operation: the member of an operation already active
        in the session, else the least busy online member holding every object
        (ties rotate)."""
        if vs.direct is not None:
            return self.lead(vs)
        vs.sync()
        for op in vs.ops.values():
            if op.member.state == ONLINE and op.member not in exclude:
                return op.member
        cands = [m for m in self.members if m.state == ONLINE and m not in exclude]
        if not cands:
            raise P11Error(CKR.DEVICE_ERROR, "no member of the group is online")
        if handles:
            cands = [m for m in cands if all(self.holds(m, h) for h in handles)] or cands
        n = len(cands)
        if n == 1:
            return cands[0]
        start = next(self._rotation) % n
        if ROUND_ROBIN:
            return cands[start]
        best = None
        for i in range(n):
            m = cands[(start + i) % n]
            if best is None or self.busy(m) < self.busy(best):
                best = m
        return best

    def next_index(self) -> int:
        """A fast-path member id never used in this process."""
        self._last_index = max([m.index for m in self.members if m.index is not None]
                               + [getattr(self, "_last_index", -1)]) + 1
        return self._last_index

    def alternatives(self, vs, key):
        """(member, member session, member key) of every online member that could run
        an operation of ``vs`` on ``key``, for the stub's own scheduling."""
        out = []
        for m in ([self.lead(vs)] if vs.direct is not None else self.online):
            if m.handoff or (key is not None and not self.holds(m, key)):
                continue
            try:
                out.append((m, self.member_session(vs, m),
                            0 if key is None else self.handle(key, m)))
            except P11Error:
                continue
        return out

    @staticmethod
    def busy(m) -> int:
        """Commands in flight on ``m``: through the engine and through the fast path."""
        return len(m.calls) + native.inflight(m.index)

    def member_session(self, vs, m) -> int:
        h = vs.members.get(m.name)
        if h is None:
            h = m.open_session(vs.flags)
            vs.members[m.name] = h
        return h

    def handle(self, vh, m) -> int:
        mh = self.objects.member(vh, m.name)
        if mh == CK_INVALID_HANDLE and vh in self.objects.to_member \
                and (vh, m.name) not in self.absent:
            mh = self.resolve(vh, m)
        return mh

    def run(self, vs, fname, args, handles=(), member=None):
        """A stateless call on the least busy member holding ``handles`` (or on
        ``member``); re-run elsewhere when that member fails. ``args(m)`` builds the
        member's arguments (after the session)."""
        tried = []
        while True:
            m = member or self.pick(vs, handles, exclude=tried)
            member = None
            try:
                return m, m.call(fname, self.member_session(vs, m), *args(m))
            except MemberDown:
                m.failed_over += 1
                tried.append(m)

    def on_primary(self, vs, fname, args):
        """A call on the primary; if the primary fails, on the next one."""
        while True:
            p = self.lead(vs)
            try:
                return p, p.call(fname, self.member_session(vs, p), *args(p))
            except MemberDown:
                p.failed_over += 1

    # ---- slot and token -----------------------------------------------------
    def check_slot(self, slot):
        if slot != self.slot_id:
            raise P11Error(CKR.SLOT_ID_INVALID, f"slot {slot} is not the HA slot {self.slot_id}")

    def token_present(self) -> bool:
        return any(m.state == ONLINE for m in self.members)

    def slot_list(self, token_present: bool):
        slots = [] if token_present and not self.token_present() else [self.slot_id]
        if not self.settings.ha_only:
            slots += [self.slot_id + 1 + i for i, m in enumerate(self.members)
                      if m.state == ONLINE or not token_present]
        return slots

    def fill_token_info(self, info):
        """The primary's token info under the group's identity; session counts are
        the application's own virtual sessions; limits are the group's minimum."""
        while True:
            p = self.primary
            try:
                rv = p.call("C_GetTokenInfo", p.slot, info)
                break
            except MemberDown:
                continue
        if rv != OK:
            raise P11Error(rv, f"member '{p.name}': C_GetTokenInfo failed")
        ffi.memmove(info.label, pad(self.label, 32), 32)
        ffi.memmove(info.manufacturerID, pad("hashim", 32), 32)
        ffi.memmove(info.model, pad("HA group", 16), 16)
        ffi.memmove(info.serialNumber, pad(self.serial, 16), 16)
        sessions = [s for s in self.sessions.all() if s.direct is None]
        info.ulSessionCount = len(sessions)
        info.ulRwSessionCount = sum(1 for s in sessions if s.rw)

    def mechanisms(self) -> dict:
        """What every online member can do: the intersection of their mechanisms, with
        the narrowest key sizes and the common flags."""
        common = None
        for m in self.online:
            if m.mechanisms is None:
                try:
                    m.mechanisms = self._read_mechanisms(m)
                except MemberDown:
                    continue
            if common is None:
                common = dict(m.mechanisms)
                continue
            for t in list(common):
                if t not in m.mechanisms:
                    del common[t]
                else:
                    a, b = common[t], m.mechanisms[t]
                    common[t] = (max(a[0], b[0]), min(a[1], b[1]), a[2] & b[2])
        if common is None:
            raise P11Error(CKR.TOKEN_NOT_PRESENT, "no member of the group is online")
        return common

    def _read_mechanisms(self, m) -> dict:
        count = ffi.new("CK_ULONG *")
        rv = m.call("C_GetMechanismList", m.slot, ffi.NULL, count)
        if rv != OK:
            raise P11Error(rv)
        arr = ffi.new("CK_MECHANISM_TYPE[]", max(count[0], 1))
        rv = m.call("C_GetMechanismList", m.slot, arr, count)
        if rv != OK:
            raise P11Error(rv)
        out = {}
        for i in range(count[0]):
            info = ffi.new("CK_MECHANISM_INFO *")   # some modules only OR flags in
            if m.call("C_GetMechanismInfo", m.slot, arr[i], info) == OK:
                out[int(arr[i])] = (info.ulMinKeySize, info.ulMaxKeySize, info.flags)
        return out

    # ---- sessions -----------------------------------------------------------
    def session(self, h):
        vs = self.sessions.get(h)
        if vs is None:
            raise P11Error(CKR.SESSION_HANDLE_INVALID)
        return vs

    def open_session(self, slot, flags) -> int:
        direct = self.member_slot(slot)
        if direct is None:
            self.check_slot(slot)
        if not flags & CKF_SERIAL_SESSION:
            raise P11Error(CKR.SESSION_PARALLEL_NOT_SUPPORTED)
        if direct is not None:
            if direct.state != ONLINE:
                raise P11Error(CKR.TOKEN_NOT_PRESENT, f"member '{direct.name}' is not online")
            mh = direct.open_session(flags)
            vs = self.sessions.new(flags, direct)
            vs.members[direct.name] = mh
            vs.route_random(direct, mh)
            return vs.handle
        if not self.token_present():
            raise P11Error(CKR.TOKEN_NOT_PRESENT, "no member of the group is online")
        if self.login == CKU_SO and not flags & CKF_RW_SESSION:
            raise P11Error(CKR.SESSION_READ_WRITE_SO_EXISTS)
        while True:
            p = self.primary
            try:
                mh = p.open_session(flags)   # eager on the primary: its answer is the answer
                break
            except MemberDown:
                continue
        vs = self.sessions.new(flags)
        vs.members[p.name] = mh
        vs.route_random(p, mh)
        if vs.fast:
            native.session(vs.handle, flags, self.slot_id)
        return vs.handle

    def close_session(self, h):
        with self.lock:
            vs = self.sessions.remove(h)
            if vs is None:
                raise P11Error(CKR.SESSION_HANDLE_INVALID)
            self._close_member_sessions(vs)
            if vs.direct is None and not any(s.direct is None for s in self.sessions.all()):
                self._logged_out()

    def close_all_sessions(self, slot):
        direct = self.member_slot(slot)
        if direct is None:
            self.check_slot(slot)
        with self.lock:
            for vs in self.sessions.all():
                if vs.direct is direct:
                    self.sessions.remove(vs.handle)
                    self._close_member_sessions(vs)
            if direct is None:
                self._logged_out()

    def _close_member_sessions(self, vs):
        for m in self.members:
            mh = vs.members.pop(m.name, None)
            if mh is not None and m.state == ONLINE:
                try:
                    m.call("C_CloseSession", mh)
                except MemberDown:
                    pass
        self.objects.forget_session_objects(vs.handle)

    # ---- login --------------------------------------------------------------
    def do_login(self, vs, user, pin, pin_ptr, pin_len) -> int:
        if vs.direct is not None:
            m = self.lead(vs)
            return m.call("C_Login", self.member_session(vs, m), user, pin_ptr, pin_len)
        if user == CKU_CONTEXT_SPECIFIC:
            vs.sync()
            op = next(iter(vs.ops.values()), None)
            m = op.member if op else self.primary
            return m.call("C_Login", self.member_session(vs, m), user, pin_ptr, pin_len)
        while True:
            p = self.primary
            try:
                rv = p.call("C_Login", self.member_session(vs, p), user, pin_ptr, pin_len)
                break
            except MemberDown:
                continue
        if rv != OK:
            return rv
        self.objects.forget_member_handles()    # private objects get new handles
        self.absent.clear()
        with self.lock:
            self.login = user
            native.login(user)
            self._wipe_pin()
            self._pin = bytearray(pin) if pin is not None else None
            for m in self.online:
                if m is p:
                    continue
                try:
                    r = m.call("C_Login", m.anchor, user, pin_ptr, pin_len)
                except MemberDown:
                    continue
                if r not in (OK, CKR.USER_ALREADY_LOGGED_IN):
                    m.fail(f"refuses the login the primary accepted ({r:#x})")
        if user == CKU_USER:
            self.replicator.sync_all()
        return OK

    def do_logout(self, vs) -> int:
        if vs.direct is not None:
            m = self.lead(vs)
            return m.call("C_Logout", self.member_session(vs, m))
        while True:
            p = self.primary
            try:
                rv = p.call("C_Logout", self.member_session(vs, p))
                break
            except MemberDown:
                continue
        if rv == OK:
            self._logged_out(skip=p)
        return rv

    def _logged_out(self, skip=None):
        if self.login is not None:
            for m in self.online:
                if m is not skip:
                    try:
                        m.call("C_Logout", m.anchor)
                    except MemberDown:
                        pass
        self.login = None
        native.login(None)
        self._wipe_pin()
        self.objects.forget_member_handles()
        self.absent.clear()

    def _wipe_pin(self):
        if self._pin is not None:
            for i in range(len(self._pin)):
                self._pin[i] = 0
            self._pin = None

    def set_pin(self, pin: bytes):
        self._wipe_pin()
        self._pin = bytearray(pin)

    def fanout(self, vs, fname, args) -> int:
        """On the primary, then (if it succeeded) on every other online member."""
        p, rv = self.on_primary(vs, fname, args)
        if rv == OK:
            for m in self.others(vs, p):
                if m is not p:
                    try:
                        r = m.call(fname, self.member_session(vs, m), *args(m))
                    except MemberDown:
                        continue
                    if r != OK:
                        log.error("member '%s': %s failed (%#x) after the primary "
                                  "succeeded", m.name, fname, r)
        return rv

    # ---- objects: first sight, creation everywhere, operations replayed ----------
    def map_found(self, m, mh, session, claimed):
        """The virtual handle of an object a member returned in a search (None:
        hashim's own, hidden). Objects are matched across members by identity; within
        one search each virtual handle is given to one object of a member
        (``claimed``), so identical objects stay distinct."""
        vh = self.objects.to_virtual.get(m.name, {}).get(mh)
        if vh is None or vh in claimed:
            info = describe(m, session, mh)
            vh = next((v for v in self.objects.same_identity(info.fingerprint)
                       if v not in claimed), None)
            if vh is None:
                vh = self.objects.new(m.name, mh, info.fingerprint)
            else:
                self.objects.link(vh, m.name, mh)
            self.info.setdefault(vh, info)
            if info.internal:
                self.hidden.add(vh)
        claimed.add(vh)
        return None if vh in self.hidden else vh

    def adopt(self, vs, m, mh):
        """A new object made through the HA slot on member ``m``."""
        info = describe(m, self.member_session(vs, m), mh)
        vh = self.objects.new(m.name, mh, info.fingerprint)
        self.info[vh] = info
        if not info.token:
            self.objects.mark_session_object(vs.handle, vh)
        self.replicator.tombstones.discard(info.fingerprint)
        return vh

    def replay_create(self, vs, fname, args, count=1):
        """A deterministic object-making call (create, copy, unwrap, derive) on the
        primary, then the same call on every other online member."""
        out = ffi.new("CK_OBJECT_HANDLE[2]")
        p, rv = self.on_primary(vs, fname, lambda m: args(m, out))
        if rv != OK:
            return rv, None
        vhs = [self.adopt(vs, p, out[i]) for i in range(count)]
        for m in self.others(vs, p):
            o = ffi.new("CK_OBJECT_HANDLE[2]")
            try:
                r = m.call(fname, self.member_session(vs, m), *args(m, o))
            except MemberDown:
                continue
            if r != OK:
                log.error("member '%s': %s answered %#x where the primary succeeded; the "
                          "object stays on the other members", m.name, fname, r)
                continue
            for i, vh in enumerate(vhs):
                self.objects.link(vh, m.name, o[i])
        return OK, vhs

    def on_holders(self, vs, vh, fname, args) -> int:
        """A change to one object (set attribute, destroy): on the primary first, then
        on every other online member holding it."""
        p, rv = self.on_primary(vs, fname, lambda m: (self.handle(vh, m),) + args(m))
        if rv == OK:
            for m in self.others(vs, p):
                if not self.holds(m, vh):
                    continue
                try:
                    r = m.call(fname, self.member_session(vs, m), self.handle(vh, m), *args(m))
                except MemberDown:
                    continue
                if r != OK:
                    log.error("member '%s': %s answered %#x where the primary succeeded",
                              m.name, fname, r)
        return rv

    def start_op(self, vs, kind, init, mech, key, p_mech=None) -> int:
        """*Init on the least busy member holding the key; recorded for replay."""
        handles = (key,) if key is not None else ()
        tried = []
        while True:
            m = self.pick(vs, handles, exclude=tried)
            try:            # the member may fail between pick() and the call
                ms = self.member_session(vs, m)
                cm, keep = (p_mech, None) if p_mech is not None else \
                    mech.build(lambda vh: self.handle(vh, m))
                mkey = None if key is None else self.handle(key, m)
                args = (cm,) if key is None else (cm, mkey)
                rv = m.call(init, ms, *args)
            except MemberDown:
                m.failed_over += 1
                tried.append(m)
                p_mech = None
                continue
            if rv == OK:
                alts = self.alternatives(vs, key) if vs.fast and mech.repeatable else ()
                vs.begin(kind, Op(m, init, mech, key), mkey, alts)
                if alts and kind != "random":
                    vs.route_random(m, vs.members.get(m.name, 0), [a[:2] + (0,) for a in alts])
            return rv

    def replay_op(self, vs, kind, op):
        """Move a single-part operation whose member failed to another member."""
        failed = op.member
        failed.failed_over += 1
        vs.end(kind)
        try:
            rv = self.start_op(vs, kind, op.init, op.mech, op.key)
        except P11Error:
            vs.end(kind)
            raise
        if rv != OK:
            vs.end(kind)
            raise P11Error(rv, f"replaying {op.init} on another member after "
                           f"'{failed.name}' failed")
        log.info("operation moved from failed member '%s' to '%s'", failed.name,
                 vs.ops[kind].member.name)
        return vs.ops[kind]

    # ---- slot events --------------------------------------------------------
    def wait_for_event(self, block: bool):
        with self.events:
            while not self.pending_event:
                if self.finalized:
                    raise P11Error(CKR.CRYPTOKI_NOT_INITIALIZED)
                if not block:
                    raise P11Error(CKR.NO_EVENT)
                self.events.wait(1.0)
            self.pending_event = False
            if self.finalized:
                raise P11Error(CKR.CRYPTOKI_NOT_INITIALIZED)
            return self.slot_id

    def post_event(self):
        with self.events:
            self.pending_event = True
            self.events.notify_all()


def pad(text: str, n: int) -> bytes:
    b = text.encode()[:n]
    return b + b" " * (n - len(b))
