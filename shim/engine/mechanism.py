"""A mechanism recorded at *Init, so the operation can be replayed on another member
(single-part re-run after a failover). Parameters are deep-copied following the
table in shim/spec/mechanisms.py; object handles in parameters are translated for
the member the mechanism is rebuilt for."""
from __future__ import annotations

from ..members.module import ffi
from ..spec.mechanisms import HANDLE_PARAMS, POINTER_PARAMS

NULL = ffi.NULL
HANDLE_SIZE = ffi.sizeof("CK_OBJECT_HANDLE")


def _copy_struct(struct, ptr, size):
    """(raw bytes, {field: copy}) of a parameter struct and what its pointers hold."""
    raw = bytes(ffi.buffer(ptr, size))
    fields = {}
    s = ffi.cast(struct + " *", ptr)
    for field, length in _POINTERS.get(struct, ()):
        p = getattr(s, field)
        if p == NULL:
            fields[field] = None
        elif length.startswith("CK_"):           # a nested parameter struct
            fields[field] = (length, _copy_struct(length, p, ffi.sizeof(length)))
        else:
            fields[field] = bytes(ffi.buffer(p, getattr(s, length)))
    return raw, fields


def _build_struct(struct, raw, fields, keep):
    buf = ffi.new("CK_BYTE[]", raw)
    keep.append(buf)
    s = ffi.cast(struct + " *", buf)
    for field, value in fields.items():
        if value is None:
            setattr(s, field, NULL)
        elif isinstance(value, tuple):
            inner, (iraw, ifields) = value
            setattr(s, field, ffi.cast(inner + " *", _build_struct(inner, iraw, ifields, keep)))
        else:
            b = ffi.new("CK_BYTE[]", value or b"\0")
            keep.append(b)
            setattr(s, field, b)
    return buf


_POINTERS = {struct: fields for struct, fields in POINTER_PARAMS.values()}


class Mechanism:
    __slots__ = ("type", "raw", "fields", "struct", "_alive")

    def __init__(self, p):
        """Copy the mechanism at ``p`` (a CK_MECHANISM pointer, any FFI)."""
        p = ffi.cast("CK_MECHANISM *", p)
        self.type = int(p.mechanism)
        self.raw = None
        self.fields = None
        self.struct = None
        self._alive = None
        n = p.ulParameterLen
        if p.pParameter != NULL and n:
            spec = POINTER_PARAMS.get(self.type)
            if spec and n == ffi.sizeof(spec[0]):
                self.struct = spec[0]
                self.raw, self.fields = _copy_struct(spec[0], p.pParameter, n)
            else:
                self.raw = bytes(ffi.buffer(p.pParameter, n))

    @property
    def repeatable(self) -> bool:
        """Can the stub start it again by itself (shim/spec/fastpath.py INIT_FAST)?"""
        from ..spec.fastpath import INIT_PARAM_MAX
        return self.struct is None and self.type not in HANDLE_PARAMS \
            and len(self.raw or b"") <= INIT_PARAM_MAX

    def build(self, translate=None):
        """A CK_MECHANISM for a member (``translate``: virtual -> member handle). It
        stays valid until the next build of this mechanism."""
        mm = ffi.new("CK_MECHANISM *")
        mm.mechanism = self.type
        keep = []
        if self.raw is not None:
            if self.struct:
                buf = _build_struct(self.struct, self.raw, self.fields, keep)
            elif self.type in HANDLE_PARAMS and translate and len(self.raw) == HANDLE_SIZE:
                vh = ffi.cast("CK_OBJECT_HANDLE *", ffi.from_buffer(self.raw))[0]
                buf = ffi.new("CK_OBJECT_HANDLE *", translate(vh))
            else:
                buf = ffi.new("CK_BYTE[]", self.raw)
            keep.append(buf)
            mm.pParameter = buf
            mm.ulParameterLen = len(self.raw)
        self._alive = (mm, keep)
        return mm, keep
