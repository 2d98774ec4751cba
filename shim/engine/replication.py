"""Keeping every member's objects the same.

* Objects made through the HA slot by deterministic calls (create, copy, unwrap,
  derive, set-attribute, destroy) are made by the same call on every member.
* Generated keys are cloned from the primary: public objects by their attributes,
  secret and private keys wrapped under the group's domain key (CKM_AES_KEY_WRAP_PAD)
  and unwrapped on the other member with a template read from the source object.
  Keys the application asked to be non-extractable are generated extractable only
  under trusted keys (CKA_WRAP_WITH_TRUSTED) and the application's wish is kept as an
  *intent* record on the members, which the HA slot reports and enforces.
* A destroyed token object leaves a *tombstone* on every member, so a member that was
  away has it destroyed on return rather than copied back.
* Synchronisation (at login and when a member returns) copies what is missing.
"""
from __future__ import annotations

import json
import logging

from ..errors import P11Error
from ..members import objects as mo
from ..members.member import MemberDown
from ..spec.attributes import COPY, NOT_SETTABLE, TEMPLATE_ATTRS, pack, pack_bool
from ..spec.constants import CKA, CKM, CKO, CKR, CKR_OK
from .identity import (DOMAIN_LABEL, INTENT_LABEL, INTERNAL_APPLICATION, TOMBSTONE_LABEL,
                       describe)

log = logging.getLogger("hashim")
OK = CKR_OK
WRAP_MECHANISM = CKM.AES_KEY_WRAP_PAD
SECRET_CLASSES = (CKO.PRIVATE_KEY, CKO.SECRET_KEY)
# never part of a re-creation template (read-only, or only the SO may set them)
SKIP_ON_CLONE = set(NOT_SETTABLE) | {CKA.TRUSTED, CKA.VALUE_LEN}
# an empty value is the default and some modules refuse it explicitly
DROP_WHEN_EMPTY = set(TEMPLATE_ATTRS) | {CKA.ALLOWED_MECHANISMS, CKA.START_DATE, CKA.END_DATE}


class NotReplicable(Exception):
    pass


class Replicator:
    def __init__(self, group):
        self.g = group
        self.intents = {}          # fingerprint -> {"extractable": bool, "wwt": bool}
        self.tombstones = set()    # fingerprints of destroyed token objects
        self.unreplicable = {}     # fingerprint -> (label, reason)
        self.last_sync = None

    # ---- domain key ----------------------------------------------------------
    def find_domain_key(self, m):
        with m.lock:
            found = mo.find(m, m.anchor, [(CKA.CLASS, pack(CKA.CLASS, CKO.SECRET_KEY)),
                                          (CKA.LABEL, DOMAIN_LABEL)], limit=2)
        if len(found) != 1:
            if len(self.g.members) > 1:
                log.warning("member '%s': %s domain key: secret and private keys cannot be "
                            "replicated to or from it (run 'hashim domain check')", m.name,
                            "no" if not found else "more than one")
            return None
        return found[0]

    # ---- cloning ---------------------------------------------------------------
    def session(self, vs, m):
        return self.g.member_session(vs, m) if vs is not None else m.anchor

    def clone(self, vs, src, smh, dst, info) -> int:
        """Re-create object ``smh`` of ``src`` on ``dst``; returns the new handle."""
        ss, ds = self.session(vs, src), self.session(vs, dst)
        attrs = mo.get_attributes(src, ss, smh, (CKA.CLASS,) + COPY.get(info.cls, ()))
        template = [(t, v) for t, v in attrs.items() if t not in SKIP_ON_CLONE
                    and not (t in DROP_WHEN_EMPTY and not v)]
        if info.key_type is not None:
            template.append((CKA.KEY_TYPE, pack(CKA.KEY_TYPE, info.key_type)))
        if info.cls in SECRET_CLASSES:
            if src.domain_key is None or dst.domain_key is None:
                raise NotReplicable("a member lacks the domain key")
            mech = mo.mechanism(WRAP_MECHANISM)
            try:
                blob = mo.wrap(src, ss, mech, src.domain_key, smh)
            except P11Error as e:
                raise NotReplicable(transport_refusal(src, e) or
                                    f"not wrappable under the domain key ({e})")
            template = [(t, v) for t, v in template
                        if t not in (CKA.VALUE, CKA.MODULUS, CKA.PUBLIC_EXPONENT)]
            try:
                return mo.unwrap(dst, ds, mech, dst.domain_key, blob, template)
            except P11Error as e:
                reason = transport_refusal(dst, e)
                if reason:
                    raise NotReplicable(reason)
                raise
            finally:
                blob = None
        return mo.create(dst, ds, template)

    def replicate(self, vs, src, vh, smh, targets=None):
        """Copy a new object from ``src`` to every other online member (or ``targets``)."""
        g = self.g
        info = g.describe(vh)
        if info is None:
            return
        for m in targets or g.receivers:
            if m is src or m.name in g.objects.holders(vh):
                continue
            try:
                mh = self.clone(vs, src, smh, m, info)
            except NotReplicable as e:
                self._unreplicable(info, src, str(e))
                return
            except MemberDown:
                continue
            except P11Error as e:
                log.error("member '%s': copying an object failed (%s)", m.name, e)
                continue
            g.objects.link(vh, m.name, mh)
            g.absent.discard((vh, m.name))

    def _unreplicable(self, info, src, reason):
        label = dict(info.search).get(CKA.LABEL, b"").decode("utf-8", "replace")
        if info.fingerprint not in self.unreplicable:
            log.warning("object '%s' stays on member '%s' only: %s", label, src.name, reason)
        self.unreplicable[info.fingerprint] = (label, reason)

    # ---- generation with the application's intent -----------------------------
    @staticmethod
    def generation_template(items):
        """The template a secret or private key is generated with so it can be
        replicated, and the application's intent to remember (None: nothing to keep)."""
        wanted = dict(items)
        extractable = wanted.get(CKA.EXTRACTABLE, b"\x00") not in (b"\x00", b"")
        if extractable:
            return items, None
        wwt = wanted.get(CKA.WRAP_WITH_TRUSTED, b"\x00") not in (b"\x00", b"")
        forced = [(t, v) for t, v in items if t not in (CKA.EXTRACTABLE, CKA.WRAP_WITH_TRUSTED)]
        forced += [(CKA.EXTRACTABLE, pack_bool(True)), (CKA.WRAP_WITH_TRUSTED, pack_bool(True))]
        return forced, {"extractable": False, "wwt": wwt}

    def record_intent(self, vs, vh, intent):
        info = self.g.describe(vh)
        if info is None or intent is None:
            return
        self.intents[info.fingerprint] = intent
        if info.token:
            value = json.dumps({"fp": info.fingerprint, **intent}).encode()
            self._internal_object(vs, INTENT_LABEL, value)

    def intent(self, vh):
        if not self.intents:
            return None
        info = self.g.describe(vh)
        return self.intents.get(info.fingerprint) if info else None

    # ---- destruction and tombstones -------------------------------------------
    def destroyed(self, vs, info):
        if info is None or not info.token:
            return
        self.tombstones.add(info.fingerprint)
        self._internal_object(vs, TOMBSTONE_LABEL, info.fingerprint.encode())

    def _internal_object(self, vs, label, value):
        template = [(CKA.CLASS, pack(CKA.CLASS, CKO.DATA)), (CKA.TOKEN, pack_bool(True)),
                    (CKA.PRIVATE, pack_bool(True)), (CKA.APPLICATION, INTERNAL_APPLICATION),
                    (CKA.LABEL, label), (CKA.VALUE, value)]
        for m in self.g.receivers:
            try:
                mo.create(m, self.session(vs, m), template)
            except (P11Error, MemberDown) as e:
                log.error("member '%s': cannot record %s (%s)", m.name, label.decode(), e)

    # ---- synchronisation -------------------------------------------------------
    def inventory(self, m):
        """{fingerprint: (handle, info)} of the member's token objects (logged in)."""
        out = {}
        with m.lock:
            handles = mo.find(m, m.anchor, [(CKA.TOKEN, pack_bool(True))])
        for mh in handles:
            try:
                info = describe(m, m.anchor, mh)
            except P11Error:
                continue
            if info.cls == CKO.SECRET_KEY and dict(info.search).get(CKA.LABEL) == DOMAIN_LABEL:
                continue
            out.setdefault(info.fingerprint, (mh, info))
            self._note_internal(m, mh, info)
        return out

    def _note_internal(self, m, mh, info):
        if not info.internal:
            return
        label = dict(info.search).get(CKA.LABEL)
        value = mo.get_attributes(m, m.anchor, mh, (CKA.VALUE,)).get(CKA.VALUE, b"")
        if label == TOMBSTONE_LABEL:
            self.tombstones.add(value.decode(errors="replace"))
        elif label == INTENT_LABEL:
            try:
                rec = json.loads(value)
                self.intents[rec.pop("fp")] = rec
            except (ValueError, KeyError):
                pass

    def sync_all(self):
        self.sync(self.g.online)

    def sync_member(self, m):
        self.sync(self.g.online + [m], only=m)

    def sync(self, members, only=None):
        """Bring ``only`` (or every member) in line with the union of the members'
        token objects, minus tombstoned ones. With synchronize = false: report only."""
        g = self.g
        if len(members) < 2 and only is None:
            if members:
                self.inventory(members[0])
            return
        inv = {}
        for m in members:
            try:
                inv[m.name] = self.inventory(m)
            except (P11Error, MemberDown) as e:
                log.error("member '%s': inventory failed (%s)", m.name, e)
        union = {}
        for name, objs in inv.items():
            for fp, (mh, info) in objs.items():
                union.setdefault(fp, (name, mh, info))
        copied, removed, differences = [], [], []
        for m in members:
            if only is not None and m is not only or m.name not in inv:
                continue
            have = inv[m.name]
            for fp, (mh, info) in list(have.items()):
                if fp in self.tombstones and info.strong and not info.internal:
                    if g.settings.synchronize:
                        if mo.destroy(m, m.anchor, mh) == OK:
                            removed.append((m.name, info))
                    else:
                        differences.append(f"{m.name} holds a destroyed object")
            for fp, (src_name, smh, info) in union.items():
                if fp in have or (fp in self.tombstones and not info.internal):
                    continue
                if not g.settings.synchronize:
                    differences.append(f"{m.name} lacks {describe_label(info)}")
                    continue
                src = g.member(src_name)
                try:
                    mh = self.clone(None, src, smh, m, info)
                except NotReplicable as e:
                    self._unreplicable(info, src, str(e))
                    continue
                except (P11Error, MemberDown) as e:
                    log.error("sync: copying %s to '%s' failed (%s)", describe_label(info),
                              m.name, e)
                    continue
                copied.append((m.name, info))
        for name, info in copied:
            log.info("sync: copied %s to member '%s'", describe_label(info), name)
        for name, info in removed:
            log.info("sync: destroyed %s on member '%s' (destroyed while it was away)",
                     describe_label(info), name)
        for d in differences:
            log.warning("sync disabled: %s", d)
        self.last_sync = {"copied": len(copied), "removed": len(removed),
                          "differences": len(differences)}
        return copied, removed, differences


def transport_refusal(m, e):
    """Why a member reached over p11-kit's RPC cannot take part in key copies."""
    if e.rv == CKR.MECHANISM_INVALID and m.kind != "in process":
        return (f"member '{m.name}' ({m.kind}) is reached over p11-kit's RPC, which does "
                "not carry CKM_AES_KEY_WRAP_PAD (p11-kit 0.24): secret and private keys "
                "cannot be copied to or from it; provision them on its token directly")
    return None


def describe_label(info) -> str:
    d = dict(info.search)
    kind = {CKO.DATA: "data object", CKO.CERTIFICATE: "certificate",
            CKO.PUBLIC_KEY: "public key", CKO.PRIVATE_KEY: "private key",
            CKO.SECRET_KEY: "secret key"}.get(info.cls, "object")
    if info.internal:
        kind = "hashim " + d.get(CKA.LABEL, b"").decode(errors="replace").split(":")[-1]
        return kind
    return f"{kind} '{d.get(CKA.LABEL, b'').decode(errors='replace')}'"
