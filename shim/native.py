"""The stub's own C helpers, when running inside the module: the worker pool for
supervised member calls and the routes of the C fast path (native/fastpath.c,
shim/spec/fastpath.py). ``lib`` stays None in other processes (the CLI): member calls
then run on the calling thread and nothing is routed."""
from .spec.fastpath import KINDS

ffi = None
lib = None
KIND = {k: i for i, k in enumerate(KINDS)}


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
    fl = member.__dict__.get("fl_void")
    if fl is None or member.__dict__.get("fl_of") is not member.module:
        from .members.module import ffi as mffi
        fl = member.fl_void = ffi.cast("void *", int(mffi.cast("uintptr_t", member.module.fl)))
        member.fl_of = member.module
    lib.hashim_route_set(vh, KIND[kind], fl, mh, member.index)


def route_init(vh: int, kind: str, mech, vkey, mkey):
    """How the routed operation was started, so the stub may start it again by itself
    (only mechanisms whose parameter holds no pointers or handles)."""
    from .spec.fastpath import INIT_PARAM_MAX
    from .spec.mechanisms import HANDLE_PARAMS
    raw = mech.raw or b""
    if lib is None or mech.struct is not None or mech.type in HANDLE_PARAMS \
            or len(raw) > INIT_PARAM_MAX:
        return
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


def reset():
    if lib is not None:
        lib.hashim_routes_reset()
