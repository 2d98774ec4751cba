"""The stub's own C helpers, when running inside the module: the worker pool for
supervised member calls and the routes of the C fast path (native/fastpath.c,
shim/spec/fastpath.py). ``lib`` stays None in other processes (the CLI): member calls
then run on the calling thread and nothing is routed."""
from .spec.fastpath import KINDS

ffi = None
lib = None
KIND = {k: i for i, k in enumerate(KINDS)}
MEMBERS = {}          # fast-path member id -> Member (kept by the group)


def attach(stub_ffi, stub_lib):
    global ffi, lib
    ffi, lib = stub_ffi, stub_lib


def claim(vh: int) -> bool:
    return bool(lib is not None and lib.hashim_route_claim(vh))


def release(vh: int):
    if lib is not None:
        lib.hashim_route_release(vh)


def route(vh: int, kind: str, member, mh: int):
    """Calls of ``kind`` on virtual session ``vh`` may now go straight to ``member``."""
    if lib is None or getattr(member, "index", None) is None or member.module is None \
            or member.handoff:      # calls handed to the worker pool stay supervised there
        return
    lib.hashim_route_set(vh, KIND[kind], _fl(member), mh, member.index)


def _fl(member):
    """The member's function list as the stub takes it (cached per module instance)."""
    fl = member.__dict__.get("fl_void")
    if fl is None or member.__dict__.get("fl_of") is not member.module:
        from .members.module import ffi as mffi
        fl = member.fl_void = ffi.cast("void *", int(mffi.cast("uintptr_t", member.module.fl)))
        member.fl_of = member.module
    return fl


def alternatives(vh: int, kind: str, alts):
    """Members (with the session's member session and the key's member handle) on
    which the stub may start the routed operation again: the least busy one is taken
    each time. ``alts``: [(member, member session, member key handle)]."""
    alts = [a for a in alts if not a[0].handoff and a[0].index is not None][:8]
    if lib is None or not alts:
        return
    n = len(alts)
    lib.hashim_route_alternatives(
        vh, KIND[kind], n, ffi.new("int[]", [a[0].index for a in alts]),
        ffi.new("void *[]", [_fl(a[0]) for a in alts]),
        ffi.new("CK_SESSION_HANDLE[]", [a[1] for a in alts]),
        ffi.new("CK_OBJECT_HANDLE[]", [a[2] or 0 for a in alts]))


def route_member(vh: int, kind: str) -> int:
    return lib.hashim_route_member(vh, KIND[kind]) if lib is not None else -1


def route_init(vh: int, kind: str, mech, vkey, mkey):
    """How the routed operation was started, so the stub may start it again by itself
    (only mechanisms whose parameter holds no pointers or handles)."""
    if lib is None or not mech.repeatable:
        return
    raw = mech.raw or b""
    lib.hashim_route_set_init(vh, KIND[kind], mech.type, raw, len(raw), vkey or 0, mkey or 0)


def state(vh: int, kind: str) -> int:
    return lib.hashim_route_state(vh, KIND[kind]) if lib is not None else -1


def multipart(vh: int, kind: str):
    if lib is not None:
        lib.hashim_route_multipart(vh, KIND[kind])


def end(vh: int, kind: str):
    if lib is not None:
        lib.hashim_route_end(vh, KIND[kind])


def member_up(index, up: bool):
    if lib is not None and index is not None:
        lib.hashim_member_set_up(index, 1 if up else 0)


def member_stats(index):
    """(calls in flight, calls served, seconds since the last completion or None) of
    the fast path for member ``index``."""
    if lib is None or index is None:
        return 0, 0, None
    inflight = ffi.new("long *")
    served = ffi.new("unsigned long *")
    idle = ffi.new("long long *")
    lib.hashim_member_stats(index, inflight, served, idle)
    return inflight[0], served[0], (idle[0] / 1e9 if idle[0] >= 0 else None)


def inflight(index) -> int:
    if lib is None or index is None:
        return 0
    return lib.hashim_member_inflight(index)


def expire():
    """A member joined the rotation: every session's next operation is scheduled by
    the engine again (so it can go there)."""
    if lib is not None:
        lib.hashim_routes_expire()


def session(vh: int, flags: int, slot: int):
    """An HA slot session: the stub may answer its C_GetSessionInfo."""
    if lib is not None:
        lib.hashim_session_publish(vh, flags, slot)


def login(user):
    """The group's login (None: public), for the stub's C_GetSessionInfo."""
    if lib is not None:
        lib.hashim_login_publish(-1 if user is None else int(user))


def reset():
    if lib is not None:
        lib.hashim_routes_reset()
