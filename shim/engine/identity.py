"""Object identity across members: a fingerprint of the identifying public attributes
(class, key type, id, label, and the key's public material or check value), so an
object found on one member can be found on another by a search."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

from ..members import objects as mo
from ..spec.attributes import IDENTITY, material_attrs, unpack_ulong
from ..spec.constants import CKA, CKO

INTERNAL_APPLICATION = b"hashim"
DOMAIN_LABEL = b"hashim-domain"
TOMBSTONE_LABEL = b"hashim:tombstone"
INTENT_LABEL = b"hashim:intent"


# Secret keys and EC private keys carry no public value that survives a copy (SoftHSM
# computes no CKA_CHECK_VALUE for an unwrapped key): where they can be wrapped under
# the domain key, that wrapping (AES key wrap with padding is deterministic) is hashed.
WRAP_IDENTIFIED = (CKO.SECRET_KEY, CKO.PRIVATE_KEY)
WRAPPED_DIGEST = -1


def wrapped_digest(m, session, handle) -> bytes | None:
    from ..spec.constants import CKM
    if handle == m.domain_key:
        return None
    try:
        blob = mo.wrap(m, session, mo.mechanism(CKM.AES_KEY_WRAP_PAD), m.domain_key, handle)
    except Exception:
        return None
    return hashlib.sha256(b"hashim-identity" + blob).digest()


@dataclass
class ObjectInfo:
    fingerprint: str
    cls: int
    key_type: int | None
    token: bool
    search: list          # (type, bytes) template that finds it on another member
    strong: bool          # the fingerprint includes key material (safe for tombstones)
    internal: bool        # hashim's own object: hidden from applications


def describe(m, session, handle) -> ObjectInfo:
    first = mo.get_attributes(m, session, handle, IDENTITY + (CKA.TOKEN,))
    cls = unpack_ulong(first[CKA.CLASS]) if CKA.CLASS in first else None
    kt = unpack_ulong(first[CKA.KEY_TYPE]) if CKA.KEY_TYPE in first else None
    material = mo.get_attributes(m, session, handle, material_attrs(cls, kt)) \
        if cls is not None else {}
    material = {t: v for t, v in material.items() if v}
    if cls in WRAP_IDENTIFIED and getattr(m, "domain_key", None):
        digest = wrapped_digest(m, session, handle)
        if digest:
            material = {WRAPPED_DIGEST: digest}
    search = [(t, first[t]) for t in IDENTITY if t in first]
    h = hashlib.sha256()
    for t, v in search + sorted(material.items()):
        h.update(t.to_bytes(8, "little", signed=True) + len(v).to_bytes(8, "little") + v)
    search += [(t, v) for t, v in sorted(material.items()) if t != WRAPPED_DIGEST]
    label = first.get(CKA.LABEL, b"")
    internal = (label == DOMAIN_LABEL and cls == CKO.SECRET_KEY) or (
        cls == CKO.DATA and first.get(CKA.APPLICATION) == INTERNAL_APPLICATION)
    strong = bool(material) and not (cls == CKO.PRIVATE_KEY and CKA.MODULUS not in material
                                     and WRAPPED_DIGEST not in material)
    return ObjectInfo(h.hexdigest()[:32], cls, kt, first.get(CKA.TOKEN) == b"\x01",
                      search, strong, internal)
