"""Object-level helpers over one member session: read attributes, search, create,
destroy, wrap and unwrap. Values are Python bytes; templates are lists of
(type, bytes) or (type, nested template)."""
from __future__ import annotations

from ..errors import P11Error
from ..spec.attributes import TEMPLATE_ATTRS
from ..spec.constants import CK_UNAVAILABLE_INFORMATION, CKR, CKR_OK
from .module import ffi

OK = CKR_OK
ATTR_SIZE = ffi.sizeof("CK_ATTRIBUTE")


def c_template(items):
    """(type, value) pairs -> (CK_ATTRIBUTE array, keep-alive list)."""
    arr = ffi.new("CK_ATTRIBUTE[]", max(len(items), 1))
    keep = [arr]
    for i, (t, v) in enumerate(items):
        arr[i].type = t
        if isinstance(v, list):
            sub, k = c_template(v)
            keep += k
            arr[i].pValue = sub
            arr[i].ulValueLen = ATTR_SIZE * len(v)
        else:
            buf = ffi.new("CK_BYTE[]", bytes(v)) if v else ffi.NULL
            keep.append(buf)
            arr[i].pValue = buf
            arr[i].ulValueLen = len(v)
    return arr, keep


def get_attributes(m, session, handle, types) -> dict:
    """The readable ones among ``types`` (absent: sensitive, invalid or unavailable)."""
    types = list(types)
    arr = ffi.new("CK_ATTRIBUTE[]", len(types))
    for i, t in enumerate(types):
        arr[i].type = t
    rv = m.call("C_GetAttributeValue", session, handle, arr, len(types))
    if rv not in (OK, CKR.ATTRIBUTE_SENSITIVE, CKR.ATTRIBUTE_TYPE_INVALID):
        raise P11Error(rv, f"member '{m.name}': reading attributes failed")
    bufs = {}
    for i, t in enumerate(types):
        n = arr[i].ulValueLen
        if n == CK_UNAVAILABLE_INFORMATION:
            arr[i].pValue = ffi.NULL
            arr[i].ulValueLen = 0
            continue
        if t in TEMPLATE_ATTRS:
            b = ffi.new("CK_ATTRIBUTE[]", max(n // ATTR_SIZE, 1))
        else:
            b = ffi.new("CK_BYTE[]", max(n, 1))
        bufs[t] = b
        arr[i].pValue = b
    if not bufs:
        return {}
    rv = m.call("C_GetAttributeValue", session, handle, arr, len(types))
    if rv not in (OK, CKR.ATTRIBUTE_SENSITIVE, CKR.ATTRIBUTE_TYPE_INVALID):
        raise P11Error(rv, f"member '{m.name}': reading attributes failed")
    out = {}
    for i, t in enumerate(types):
        if t not in bufs or arr[i].ulValueLen == CK_UNAVAILABLE_INFORMATION:
            continue
        if t in TEMPLATE_ATTRS:
            # nested templates: read each inner attribute's value as bytes
            inner = ffi.cast("CK_ATTRIBUTE *", arr[i].pValue)
            count = arr[i].ulValueLen // ATTR_SIZE
            out[t] = _read_nested(m, session, handle, t, inner, count)
        else:
            out[t] = bytes(ffi.buffer(bufs[t], arr[i].ulValueLen))
    return out


def _read_nested(m, session, handle, t, inner, count):
    # second pass for the inner values (their lengths are known now)
    outer = ffi.new("CK_ATTRIBUTE[1]")
    sub = ffi.new("CK_ATTRIBUTE[]", max(count, 1))
    keep = []
    for j in range(count):
        sub[j].type = inner[j].type
        n = inner[j].ulValueLen
        b = ffi.new("CK_BYTE[]", max(n, 1))
        keep.append(b)
        sub[j].pValue = b
        sub[j].ulValueLen = n
    outer[0].type = t
    outer[0].pValue = sub
    outer[0].ulValueLen = count * ATTR_SIZE
    if m.call("C_GetAttributeValue", session, handle, outer, 1) != OK:
        return []
    return [(int(sub[j].type), bytes(ffi.buffer(keep[j], sub[j].ulValueLen)))
            for j in range(count)]


def find(m, session, items, limit=None) -> list[int]:
    arr, keep = c_template(items)
    rv = m.call("C_FindObjectsInit", session, arr, len(items))
    if rv != OK:
        raise P11Error(rv, f"member '{m.name}': search failed")
    found = []
    try:
        out = ffi.new("CK_OBJECT_HANDLE[]", 64)
        n = ffi.new("CK_ULONG *")
        while True:
            rv = m.call("C_FindObjects", session, out, 64, n)
            if rv != OK:
                raise P11Error(rv, f"member '{m.name}': search failed")
            found += [int(out[i]) for i in range(n[0])]
            if n[0] < 64 or (limit and len(found) >= limit):
                break
    finally:
        m.call("C_FindObjectsFinal", session)
    return found


def create(m, session, items) -> int:
    arr, keep = c_template(items)
    h = ffi.new("CK_OBJECT_HANDLE *")
    rv = m.call("C_CreateObject", session, arr, len(items), h)
    if rv != OK:
        raise P11Error(rv, f"member '{m.name}': creating an object failed")
    return int(h[0])


def destroy(m, session, handle) -> int:
    return m.call("C_DestroyObject", session, handle)


def mechanism(mech_type, param: bytes | None = None):
    mm = ffi.new("CK_MECHANISM *")
    mm.mechanism = mech_type
    if param:
        buf = ffi.new("CK_BYTE[]", param)
        mm.pParameter = buf
        mm.ulParameterLen = len(param)
        mm._keep = buf
    return mm


def wrap(m, session, mech, wrapping_key, key) -> bytes:
    n = ffi.new("CK_ULONG *")
    rv = m.call("C_WrapKey", session, mech, wrapping_key, key, ffi.NULL, n)
    if rv != OK:
        raise P11Error(rv, f"member '{m.name}': wrapping for replication failed")
    buf = ffi.new("CK_BYTE[]", n[0])
    rv = m.call("C_WrapKey", session, mech, wrapping_key, key, buf, n)
    if rv != OK:
        raise P11Error(rv, f"member '{m.name}': wrapping for replication failed")
    return bytes(ffi.buffer(buf, n[0]))


def unwrap(m, session, mech, unwrapping_key, blob: bytes, items) -> int:
    arr, keep = c_template(items)
    h = ffi.new("CK_OBJECT_HANDLE *")
    rv = m.call("C_UnwrapKey", session, mech, unwrapping_key, blob, len(blob), arr,
                len(items), h)
    if rv != OK:
        raise P11Error(rv, f"member '{m.name}': unwrapping a replicated key failed")
    return int(h[0])
