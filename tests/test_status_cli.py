"""``hashim status``, ``hashim recover`` and ``hashim log`` on their own: merging the status
files of several processes (dead ones ignored), probing the members when no module runs,
the table, --watch, the recover request and its answers, and the log filters.

A running module publishing its real status is exercised in tests/test_failover.py."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import softhsm

REPO = Path(__file__).resolve().parent.parent
KEYS = {"name", "state", "in_flight", "served", "failed_over", "recovery", "last_error",
        "last_change"}


def hashim(conf, *args, timeout=60, env=None):
    e = {k: v for k, v in os.environ.items() if k not in ("HASHIM_CONF",)}
    e["PYTHONPATH"] = str(REPO) + os.pathsep + e.get("PYTHONPATH", "")
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "shim.cli", "--config", str(conf), *args],
                          capture_output=True, text=True, timeout=timeout, env=e,
                          cwd=str(REPO))


@pytest.fixture
def group(tmp_path):
    """Three SoftHSM2 tokens; the config's third member names a token that is not there."""
    toks = [softhsm.make_token(tmp_path / "tokens", f"st{i}") for i in range(3)]
    conf = softhsm.write_config(tmp_path / "hashim.toml", toks, label="status-test",
                                log=str(tmp_path / "ha.log"),
                                state_dir=str(tmp_path / "state"))
    text = conf.read_text().replace('token_label = "st2"', 'token_label = "missing"')
    conf.write_text(text)
    (tmp_path / "state").mkdir()
    return conf, tmp_path / "state", tmp_path / "ha.log"


def _pstart(pid):
    from shim.engine.status import process_start
    return process_start(pid)


def view(pid, members, primary="st0", requests=None, started=None):
    """A status file as a running module writes it (shim/engine/status.py)."""
    now = time.time()
    out = []
    for name, state, served, extra in members:
        m = {"name": name, "state": state, "in_flight": 1, "served": served, "failed_over": 2,
             "recovery": None, "last_error": None, "last_change": "2026-01-01T00:00:00Z",
             "last_change_ts": now - 30, "kind": "in process", "module": "/x.so",
             "heartbeat_rtt_ms": 0.1, "transitions": []}
        m.update(extra)
        out.append(m)
    return {"format": 1, "group": "status-test", "primary": primary, "pid": pid,
            "pid_start": _pstart(pid), "started": "2026-01-01T00:00:00Z",
            "started_ts": started if started is not None else now - 60,
            "updated": "x", "updated_ts": now, "members": out,
            "recover_requests": requests or {}, "unreplicable": [], "last_sync": None}


def write_view(state, v):
    (state / f"status-{v['pid']}.json").write_text(json.dumps(v))


@pytest.fixture
def sleeper():
    p = subprocess.Popen(["sleep", "60"])
    yield p
    p.kill()
    p.wait()


def dead_pid():
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


# ------------------------------------------------------------------------------ status

def test_status_without_a_running_module_probes_the_members(group):
    conf, state, _ = group
    r = hashim(conf, "status", "--json")
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    assert st["processes"] == 0 and st["pids"] == [] and st["group"] == "status-test"
    assert st["primary"] == "st0"
    by = {m["name"]: m for m in st["members"]}
    assert by["st0"]["state"] == by["st1"]["state"] == "online"
    assert by["st2"]["state"] == "token not present"
    assert "no token with label 'missing'" in by["st2"]["last_error"]
    assert "tokens present: 'st2'" in by["st2"]["last_error"]
    for m in st["members"]:
        assert KEYS <= set(m) and m["probed"] is True
    t = hashim(conf, "status")
    assert t.returncode == 0
    assert "0 processes: no module running, members probed directly" in t.stdout
    assert "token not present" in t.stdout and "st0 *" in t.stdout
    n = hashim(conf, "status", "--json", "--no-probe")
    assert {m["state"] for m in json.loads(n.stdout)["members"]} == {"unknown"}


def test_status_merges_live_processes_and_ignores_dead_ones(group, sleeper):
    conf, state, _ = group
    me, other, gone = os.getpid(), sleeper.pid, dead_pid()
    rec1 = {"recovery": {"attempt": 1, "of": 3, "next_in_s": 40.0},
            "last_error": "C_Sign returned CKR_DEVICE_ERROR", "last_change_ts": time.time() - 5,
            "transitions": [{"at": "a", "ts": 10.0, "state": "device error", "reason": "x"},
                            {"at": "b", "ts": 30.0, "state": "token not present",
                             "reason": None}]}
    rec2 = {"recovery": {"attempt": 2, "of": 3, "next_in_s": 12.5},
            "last_error": "older", "last_change_ts": time.time() - 20,
            "transitions": [{"at": "c", "ts": 20.0, "state": "recovering", "reason": None}]}
    write_view(state, view(me, [("st0", "online", 100, {}), ("st1", "token not present", 5, rec1),
                                ("st2", "online", 1, {})]))
    write_view(state, view(other, [("st0", "online", 50, {}), ("st1", "recovering", 7, rec2),
                                   ("st2", "given up", 0, {})]))
    write_view(state, view(gone, [("st0", "given up", 1000, {})]))
    (state / f"status-{2 ** 22 + 7}.json").write_text("{not json")    # no such pid
    r = hashim(conf, "status", "--json")
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    assert st["processes"] == 2 and st["pids"] == sorted([me, other])
    by = {m["name"]: m for m in st["members"]}
    assert by["st0"] == {**by["st0"], "state": "online", "served": 150, "in_flight": 2,
                         "failed_over": 4, "recovery": None}
    assert by["st1"]["state"] == "token not present"          # the worse of the two
    assert by["st1"]["served"] == 12
    assert by["st1"]["recovery"] == {"attempt": 2, "of": 3, "next_in_s": 12.5}
    assert by["st1"]["last_error"] == "C_Sign returned CKR_DEVICE_ERROR"     # the latest
    assert by["st1"]["by_process"] == {str(me): "token not present", str(other): "recovering"}
    assert [t["state"] for t in by["st1"]["transitions"]] == \
        ["device error", "recovering", "token not present"]
    assert by["st1"]["transitions"][1]["pid"] == other
    assert by["st2"]["state"] == "given up"
    assert not (state / f"status-{gone}.json").exists()        # cleaned up
    table = hashim(conf, "status").stdout
    assert f"2 processes (pid {', '.join(map(str, sorted([me, other])))})" in table
    for col in ("MEMBER", "STATE", "KIND", "IN FLIGHT", "SERVED", "FAILED OVER", "RECOVERY",
                "LAST ERROR", "LAST CHANGE"):
        assert col in table
    assert "attempt 2/3, next in 12.5 s" in table
    assert "commands served" in table and "#" * 30 + "  150" in table


def test_status_a_reused_pid_is_not_a_live_module(group):
    conf, state, _ = group
    v = view(os.getpid(), [("st0", "given up", 1, {})])
    v["pid_start"] = (v["pid_start"] or 0) + 12345          # another process, same pid
    write_view(state, v)
    st = json.loads(hashim(conf, "status", "--json").stdout)
    assert st["processes"] == 0


def test_status_flags_a_stale_view(group):
    conf, state, _ = group
    v = view(os.getpid(), [("st0", "online", 1, {})])
    v["updated_ts"] = time.time() - 120
    write_view(state, v)
    st = json.loads(hashim(conf, "status", "--json").stdout)
    assert st["processes"] == 1 and st["stale_pids"] == [os.getpid()]
    assert f"no update for more than 30 s from pid {os.getpid()}" in hashim(conf, "status").stdout


def test_status_watch(group):
    conf, state, _ = group
    write_view(state, view(os.getpid(), [("st0", "online", 1, {}), ("st1", "online", 2, {}),
                                         ("st2", "online", 3, {})]))
    env = dict(os.environ, PYTHONPATH=str(REPO))
    for extra, check in ((["--json"], lambda out: [json.loads(x) for x in out.splitlines()]),
                         ([], lambda out: out.split("group 'status-test'")[1:])):
        p = subprocess.Popen([sys.executable, "-m", "shim.cli", "--config", str(conf), "status",
                              "--watch", "--interval", "0.3", *extra],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=env, cwd=str(REPO))
        time.sleep(2.0)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=10)
        assert p.returncode == 0, err
        frames = check(out)
        assert len(frames) >= 3, out
        if extra:
            assert all(f["processes"] == 1 for f in frames)


# ------------------------------------------------------------------------------ recover

def test_recover_usage_and_no_running_module(group):
    conf, state, _ = group
    r = hashim(conf, "recover", "nosuch")
    assert r.returncode == 2
    assert r.stderr.strip() == (f"hashim: no member 'nosuch' in group 'status-test' ({conf}); "
                                "members: st0, st1, st2")
    r = hashim(conf, "recover", "st1")
    assert r.returncode == 1
    assert "no running module uses" in r.stderr and "probed directly, it is online" in r.stderr
    assert r.stdout.strip() == "st1: probed directly: online"
    r = hashim(conf, "recover", "st2")
    assert r.returncode == 1 and "token not present" in r.stdout
    assert not (state / "recover-st1").exists()
    assert hashim(conf, "recover", "--help").returncode == 0


def test_recover_writes_the_request_and_reads_the_answers(group, sleeper):
    conf, state, _ = group
    write_view(state, view(sleeper.pid, [("st0", "online", 1, {}), ("st1", "given up", 1, {}),
                                         ("st2", "online", 1, {})]))
    r = hashim(conf, "recover", "st1", "--wait", "0")
    assert r.returncode == 0, r.stderr
    assert f"asked 1 running process (pid {sleeper.pid}) to recover member 'st1'" in r.stdout
    req = state / "recover-st1"
    assert req.exists()
    mtime = req.stat().st_mtime
    # a process that never takes the request: the wait runs out
    r = hashim(conf, "recover", "st1", "--wait", "1")
    assert r.returncode == 1 and "still recovering after 1 s" in r.stderr
    assert req.stat().st_mtime >= mtime

    # a process that took it: its view answers (online -> 0, failed -> 1)
    def answer(state_name, error=None):
        import threading

        def later():
            time.sleep(0.5)
            m = req.stat().st_mtime
            write_view(state, view(sleeper.pid, [
                ("st0", "online", 1, {}), ("st1", state_name, 1, {"last_error": error}),
                ("st2", "online", 1, {})], requests={"st1": m}))
        t = threading.Thread(target=later)
        t.start()
        return t
    t = answer("online")
    r = hashim(conf, "recover", "st1", "--wait", "10")
    t.join()
    assert r.returncode == 0, r.stderr
    assert f"pid {sleeper.pid}: member 'st1' is online" in r.stdout
    t = answer("token not present", "recovery attempt 1: C_Initialize failed")
    r = hashim(conf, "recover", "st1", "--wait", "10")
    t.join()
    assert r.returncode == 1
    assert "recovery attempt 1: C_Initialize failed" in r.stderr


# ------------------------------------------------------------------------------ log

LOG = """\
{t0} 100 INFO member 'st0': token not present -> recovering
{t0} 100 INFO initialised: group 'status-test', members st0 (online), st1 (online), pid 100
{t1} 100 INFO member 'st1': online -> device error (C_Sign returned CKR_DEVICE_ERROR)
{t1} 100 ERROR C_Sign: internal error (answered CKR_GENERAL_ERROR)
Traceback (most recent call last):
  File "x.py", line 1, in <module>
ValueError: st1
{t2} 100 INFO member 'st1': recovering -> online
{t2} 100 INFO member 'st10': online -> device error (x)
"""


def _fmt(t):
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t))


def test_log_filters(group):
    conf, state, log = group
    now = time.time()
    log.write_text(LOG.format(t0=_fmt(now - 7200), t1=_fmt(now - 1200), t2=_fmt(now - 60)))
    r = hashim(conf, "log")
    assert r.returncode == 0 and r.stdout == log.read_text()
    r = hashim(conf, "log", "--member", "st1")
    lines = r.stdout.splitlines()
    assert len(lines) == 3, r.stdout
    assert "st10" not in r.stdout and "initialised" in r.stdout
    assert "ValueError: st1" not in r.stdout     # that entry does not name the member
    r = hashim(conf, "log", "--since", "30m")
    assert r.stdout.splitlines()[0].endswith("(C_Sign returned CKR_DEVICE_ERROR)")
    assert "Traceback" in r.stdout and "token not present" not in r.stdout
    r = hashim(conf, "log", "--since", "30m", "--member", "st1", "-n", "1")
    assert r.stdout.strip().endswith("member 'st1': recovering -> online")
    iso = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(now - 600))
    r = hashim(conf, "log", "--since", iso)
    assert r.stdout.splitlines()[0].endswith("member 'st1': recovering -> online")
    utc = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now - 600))
    assert hashim(conf, "log", "--since", utc).stdout == r.stdout
    bad = hashim(conf, "log", "--since", "yesterday")
    assert bad.returncode == 2 and "--since 'yesterday'" in bad.stderr
    log.unlink()
    r = hashim(conf, "log")
    assert r.returncode == 0 and r.stdout == "" and "no HA log yet" in r.stderr


def test_log_without_a_log_file_configured(tmp_path):
    tok = softhsm.make_token(tmp_path / "tokens", "nolog")
    conf = softhsm.write_config(tmp_path / "hashim.toml", [tok], label="nolog")
    r = hashim(conf, "log")
    assert r.returncode == 2 and "has no HA log" in r.stderr and "hashim group set log" in \
        r.stderr


def test_parse_since():
    from shim.logs import parse_since
    now = 1_800_000_000.0
    assert parse_since("10m", now) == now - 600
    assert parse_since("2h", now) == now - 7200
    assert parse_since("1.5d", now) == now - 1.5 * 86400
    assert parse_since("45s", now) == now - 45
    assert parse_since("2026-11-26T12:00:00Z") == 1795694400.0
    assert parse_since("2026-11-26T13:00:00+01:00") == 1795694400.0
    with pytest.raises(ValueError):
        parse_since("soon")
