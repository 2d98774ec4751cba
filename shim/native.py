"""The stub's own C helpers (the supervised-call worker pool), when running inside
the module; ``lib`` stays None in other processes (the CLI), where member calls run
on the calling thread."""
ffi = None
lib = None


def attach(stub_ffi, stub_lib):
    global ffi, lib
    ffi, lib = stub_ffi, stub_lib
