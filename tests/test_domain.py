"""``hashim domain init | check | add-member`` and the new-member check, on real SoftHSM2
tokens, through the ``hashim`` command in subprocesses.

The tokens use distinctive PINs so that a leak into any output is caught."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from shim import cli
from shim import domain
from shim.config import MemberConfig
from tests import softhsm

PIN = "97531864"
SO_PIN = "86420975"
REPO = str(Path(__file__).resolve().parent.parent)

pytestmark = pytest.mark.skipif(
    not shutil.which("softhsm2-util") or not os.path.exists(softhsm.SOFTHSM_LIB),
    reason="SoftHSM2 not installed")

# every output of every command run here, checked for PINs at the end of each test
OUTPUTS: list[str] = []


def _env(conf: Path | None = None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("HASHIM_") and k not in ("SOFTHSM2_CONF",)}
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH")
                                else "")
    if conf is not None:
        env["HASHIM_CONF"] = str(conf)
    env.update(extra)
    return env


def hashim(conf: Path | None, *args: str, so_pin: str | None = SO_PIN,
           pin: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    extra = {}
    if so_pin is not None:
        extra["HASHIM_SO_PIN"] = so_pin
    if pin is not None:
        extra["HASHIM_PIN"] = pin
    r = subprocess.run([sys.executable, "-m", "shim.cli", *args], env=_env(conf, **extra),
                       stdin=subprocess.DEVNULL, capture_output=True, text=True,
                       timeout=timeout, cwd=REPO)
    OUTPUTS.extend([r.stdout, r.stderr])
    return r


@pytest.fixture(autouse=True)
def _no_pin_leaks(tmp_path):
    OUTPUTS.clear()
    yield
    texts = list(OUTPUTS)
    for p in tmp_path.rglob("*.log"):
        texts.append(p.read_text(errors="replace"))
    for t in texts:
        assert PIN not in t and SO_PIN not in t, "a PIN appeared in the output:\n" + t


def make(tmp_path: Path, *labels: str, private_lib: bool = True) -> list[softhsm.Token]:
    return [softhsm.make_token(tmp_path / "tokens", l, pin=PIN, so_pin=SO_PIN,
                               private_lib=private_lib) for l in labels]


def config(tmp_path: Path, name: str, tokens: list[softhsm.Token]) -> Path:
    return softhsm.write_config(tmp_path / f"{name}.toml", tokens, label="domain-test",
                                log=str(tmp_path / "ha.log"))


def member_args(t: softhsm.Token) -> list[str]:
    args = ["--module", t.lib, "--token-label", t.label, "--env", f"SOFTHSM2_CONF={t.conf}"]
    if t.lib == softhsm.SOFTHSM_LIB:
        args.append("--private-instance")
    return args


def key_info(t: softhsm.Token) -> dict | None:
    """The domain key's attributes on a token, read straight through its module."""
    code = textwrap.dedent("""
        import json, sys, tempfile
        from shim import p11util as u, domain
        from shim.config import MemberConfig
        from shim.spec.constants import CKA_CLASS, CKA_ID, CKO_SECRET_KEY
        a = json.loads(sys.argv[1])
        with tempfile.TemporaryDirectory() as d, u.MemberLoader(d) as L:
            m, slot = L.load(MemberConfig(a["label"], a["lib"], a["label"], None, True,
                                          {"SOFTHSM2_CONF": a["conf"]}))
            with u.session(m, slot, rw=False) as s:
                h = domain.find_domain_key(m, s.h)
                info = None if h is None else domain.domain_key_info(m, s.h, h)
                n = len(s.find({CKA_CLASS: CKO_SECRET_KEY, CKA_ID: domain.DOMAIN_ID}))
        print(json.dumps({"info": info, "count": n}))
    """)
    r = subprocess.run([sys.executable, "-c", code,
                        json.dumps({"label": t.label, "lib": t.lib, "conf": str(t.conf)})],
                       env=_env(), capture_output=True, text=True, timeout=60, cwd=REPO)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["count"] <= 1, "more than one domain key on the token"
    return out["info"]


def created_kcvs(stdout: str) -> dict[str, str]:
    out = {}
    for line in stdout.splitlines():
        if ": domain key created (check value " in line:
            name, _, rest = line.partition(": domain key created (check value ")
            out[name] = rest.rstrip(")")
    return out


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


# --------------------------------------------------------------------------- init / check

def test_init_then_check(tmp_path):
    toks = make(tmp_path, "hsm-a", "hsm-b", "hsm-c")
    conf = config(tmp_path, "g", toks)
    r = hashim(conf, "domain", "init")
    assert r.returncode == 0, r.stderr
    kcvs = created_kcvs(r.stdout)
    assert list(kcvs) == ["hsm-a", "hsm-b", "hsm-c"]
    assert len(set(kcvs.values())) == 1 and len(kcvs["hsm-a"]) == 6
    int(kcvs["hsm-a"], 16)

    for t in toks:
        info = key_info(t)
        assert info is not None
        assert info["check_value"] == kcvs["hsm-a"]
        assert info["key_type_aes"] and info["value_len"] == 32
        assert info["token"] is True and info["private"] is False
        assert info["trusted"] is True
        assert info["wrap"] is True and info["unwrap"] is True
        for k in ("encrypt", "decrypt", "sign", "verify", "derive"):
            assert info[k] is False, k
        assert info["sensitive"] is True and info["extractable"] is True
        assert info["wrap_with_trusted"] is True
        assert info["modifiable"] is False and info["destroyable"] is False
        assert info["copyable"] is False

    r = hashim(conf, "domain", "check", so_pin=None)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    for t in toks:
        assert f"{t.label}: domain key present, trusted (check value {kcvs['hsm-a']})" in lines
    assert lines[-1].startswith("ok: all 3 members")


def test_init_with_shared_library_private_instance(tmp_path):
    """Members on one library file (private_instance = true) each see their own token."""
    toks = make(tmp_path, "hsm-a", "hsm-b", private_lib=False)
    conf = config(tmp_path, "g", toks)
    assert "private_instance = true" in conf.read_text()
    r = hashim(conf, "domain", "init")
    assert r.returncode == 0, r.stderr
    assert list(created_kcvs(r.stdout)) == ["hsm-a", "hsm-b"]
    assert hashim(conf, "domain", "check").returncode == 0


def test_init_so_pin_file(tmp_path):
    toks = make(tmp_path, "hsm-a")
    conf = config(tmp_path, "g", toks)
    f = tmp_path / "so-pin"
    f.write_text(SO_PIN + "\n")
    r = hashim(conf, "domain", "init", "--so-pin-file", str(f), so_pin=None)
    assert r.returncode == 0, r.stderr
    assert key_info(toks[0]) is not None


def test_init_without_so_pin_is_a_usage_error(tmp_path):
    toks = make(tmp_path, "hsm-a")
    conf = config(tmp_path, "g", toks)
    r = hashim(conf, "domain", "init", so_pin=None)
    assert r.returncode == 2
    assert "HASHIM_SO_PIN" in one_line(r.stderr)
    assert key_info(toks[0]) is None


def test_init_wrong_so_pin_writes_nothing(tmp_path):
    toks = make(tmp_path, "hsm-a", "hsm-b")
    conf = config(tmp_path, "g", toks)
    r = hashim(conf, "domain", "init", so_pin="11112222")
    assert r.returncode == 1
    assert "security officer login refused (CKR_PIN_INCORRECT)" in one_line(r.stderr)
    assert key_info(toks[0]) is None and key_info(toks[1]) is None


def test_init_refuses_when_a_key_exists(tmp_path):
    toks = make(tmp_path, "hsm-a", "hsm-b")
    assert hashim(config(tmp_path, "one", toks[:1]), "domain", "init").returncode == 0
    before = key_info(toks[0])
    conf = config(tmp_path, "two", toks)
    r = hashim(conf, "domain", "init")
    assert r.returncode == 1
    err = one_line(r.stderr)
    assert "member 'hsm-a' already holds a domain key" in err
    assert "nothing written" in err and "hashim domain check" in err
    assert "hashim domain add-member" in err
    assert r.stdout == ""
    assert key_info(toks[1]) is None            # nothing written anywhere
    assert key_info(toks[0]) == before


def test_check_member_without_key(tmp_path):
    toks = make(tmp_path, "hsm-a", "hsm-b", "hsm-c")
    assert hashim(config(tmp_path, "ab", toks[:2]), "domain", "init").returncode == 0
    conf = config(tmp_path, "abc", toks)
    r = hashim(conf, "domain", "check", so_pin=None)
    assert r.returncode == 1
    assert "hsm-c: no domain key" in r.stdout.splitlines()
    err = one_line(r.stderr)
    assert err.startswith("hashim: member 'hsm-c' has no domain key: run 'hashim domain "
                          "add-member hsm-c --module ")
    assert f"--token-label hsm-c --env SOFTHSM2_CONF={toks[2].conf} --from hsm-a'" in err


def test_check_member_with_different_key(tmp_path):
    toks = make(tmp_path, "hsm-a", "hsm-b", "hsm-c")
    r1 = hashim(config(tmp_path, "ab", toks[:2]), "domain", "init")
    r2 = hashim(config(tmp_path, "c", toks[2:]), "domain", "init")
    assert r1.returncode == 0 and r2.returncode == 0
    k1, k2 = created_kcvs(r1.stdout)["hsm-a"], created_kcvs(r2.stdout)["hsm-c"]
    assert k1 != k2
    r = hashim(config(tmp_path, "abc", toks), "domain", "check", so_pin=None)
    assert r.returncode == 1
    assert any(l.startswith("hsm-c: DIFFERENT domain key") for l in r.stdout.splitlines())
    err = one_line(r.stderr)
    assert (f"member 'hsm-c' holds a different domain key (check value {k2}, expected {k1} "
            "as on 'hsm-a')") in err


def test_check_unreachable_member(tmp_path):
    toks = make(tmp_path, "hsm-a", "hsm-b")
    assert hashim(config(tmp_path, "g", toks), "domain", "init").returncode == 0
    gone = softhsm.Token("hsm-x", toks[1].dir, toks[1].conf, toks[1].lib)
    r = hashim(config(tmp_path, "bad", [toks[0], gone]), "domain", "check")
    assert r.returncode == 1
    assert "member 'hsm-x' cannot be checked" in one_line(r.stderr)
    assert "no token with label 'hsm-x'" in r.stderr


# --------------------------------------------------------------------------- add-member

def test_add_member_copies_the_key(tmp_path):
    toks = make(tmp_path, "hsm-a", "hsm-b", "hsm-c")
    conf = config(tmp_path, "g", toks[:2])
    r = hashim(conf, "domain", "init")
    assert r.returncode == 0, r.stderr
    kcv = created_kcvs(r.stdout)["hsm-a"]

    r = hashim(conf, "domain", "add-member", "hsm-c", *member_args(toks[2]))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == f"hsm-c: domain key copied from hsm-a (check value {kcv})"
    assert lines[1].startswith("next: hashim group add-member hsm-c --module ")
    info = key_info(toks[2])
    assert info["check_value"] == kcv
    assert info["trusted"] is True and info["private"] is False and info["token"] is True
    assert info["wrap"] and info["unwrap"] and info["sensitive"] and info["extractable"]
    assert info["wrap_with_trusted"] is True
    assert not any(info[k] for k in ("encrypt", "decrypt", "sign", "verify", "derive"))
    assert info["modifiable"] is False and info["destroyable"] is False
    # the config is not touched by domain add-member
    assert "hsm-c" not in conf.read_text()

    # again: nothing to do
    r = hashim(conf, "domain", "add-member", "hsm-c", *member_args(toks[2]))
    assert r.returncode == 0 and "already holds the group's domain key" in r.stdout

    # now group add-member's checks pass, and the whole group agrees
    r = hashim(conf, "group", "add-member", "hsm-c", *member_args(toks[2]), so_pin=None,
               pin=PIN)
    assert r.returncode == 0, r.stderr
    r = hashim(conf, "domain", "check", so_pin=None)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1].startswith("ok: all 3 members")


def test_add_member_from_and_shared_library(tmp_path):
    toks = make(tmp_path, "hsm-a", "hsm-b", "hsm-c", private_lib=False)
    conf = config(tmp_path, "g", toks[:2])
    kcv = created_kcvs(hashim(conf, "domain", "init").stdout)["hsm-b"]
    r = hashim(conf, "domain", "add-member", "hsm-c", *member_args(toks[2]),
               "--from", "hsm-b")
    assert r.returncode == 0, r.stderr
    assert f"hsm-c: domain key copied from hsm-b (check value {kcv})" in r.stdout
    assert key_info(toks[2])["check_value"] == kcv


def test_add_member_existing_member_lacking_the_key(tmp_path):
    """The fix 'domain check' suggests for a configured member without the key works."""
    toks = make(tmp_path, "hsm-a", "hsm-b")
    assert hashim(config(tmp_path, "a", toks[:1]), "domain", "init").returncode == 0
    conf = config(tmp_path, "ab", toks)
    r = hashim(conf, "domain", "check")
    fix = one_line(r.stderr).split("run '", 1)[1].rstrip("'")
    assert fix.startswith("hashim domain add-member hsm-b ")
    import shlex
    r = hashim(conf, *shlex.split(fix)[1:])
    assert r.returncode == 0, r.stderr
    assert "next:" not in r.stdout                 # already in the config
    assert hashim(conf, "domain", "check").returncode == 0


def test_add_member_refusals(tmp_path):
    toks = make(tmp_path, "hsm-a", "hsm-b", "hsm-c")
    conf = config(tmp_path, "a", toks[:1])
    # no member holds a key yet
    r = hashim(conf, "domain", "add-member", "hsm-b", *member_args(toks[1]))
    assert r.returncode == 1 and "run 'hashim domain init' first" in one_line(r.stderr)
    assert hashim(conf, "domain", "init").returncode == 0
    # wrong SO PIN: nothing written
    r = hashim(conf, "domain", "add-member", "hsm-b", *member_args(toks[1]),
               so_pin="11112222")
    assert r.returncode == 1 and "CKR_PIN_INCORRECT" in one_line(r.stderr)
    assert key_info(toks[1]) is None
    # unknown --from
    r = hashim(conf, "domain", "add-member", "hsm-b", *member_args(toks[1]), "--from", "zz")
    assert r.returncode == 2 and "--from zz: no such member" in one_line(r.stderr)
    # a token holding another domain key
    assert hashim(config(tmp_path, "c", toks[2:]), "domain", "init").returncode == 0
    r = hashim(conf, "domain", "add-member", "hsm-c", *member_args(toks[2]))
    assert r.returncode == 1 and "already holds a different domain key" in one_line(r.stderr)


# --------------------------------------------------------------------------- new member check

def _check(m: MemberConfig, pin: str | None, monkeypatch, **kw) -> list[str]:
    if pin is None:
        monkeypatch.delenv("HASHIM_PIN", raising=False)
    else:
        monkeypatch.setenv("HASHIM_PIN", pin)
    monkeypatch.setattr(sys, "stdin", open(os.devnull))
    return domain.check_new_member(m, **kw)


def mconf(t: softhsm.Token, name: str | None = None, label: str | None = None):
    return MemberConfig(name or t.label, t.lib, label or t.label, None,
                        t.lib == softhsm.SOFTHSM_LIB, {"SOFTHSM2_CONF": str(t.conf)})


def test_check_new_member(tmp_path, monkeypatch):
    toks = make(tmp_path, "hsm-a", "hsm-b")
    assert hashim(config(tmp_path, "a", toks[:1]), "domain", "init").returncode == 0
    good, bare = mconf(toks[0]), mconf(toks[1])
    assert _check(good, PIN, monkeypatch) == []
    assert cli.check_new_member(good) == []          # the hook group add-member calls

    problems = _check(good, "00000000", monkeypatch)
    assert problems == ["the user PIN does not log in to the token with label 'hsm-a' "
                        "(CKR_PIN_INCORRECT)"]
    OUTPUTS.extend(problems)

    problems = _check(good, None, monkeypatch)
    assert len(problems) == 1 and "no user PIN" in problems[0] and "HASHIM_PIN" in problems[0]

    problems = _check(bare, PIN, monkeypatch)
    assert len(problems) == 1
    assert problems[0].startswith("no domain key on the token with label 'hsm-b': run "
                                  "'hashim domain add-member hsm-b --module ")
    OUTPUTS.extend(problems)

    problems = _check(mconf(toks[1], label="nope"), PIN, monkeypatch)
    assert len(problems) == 1 and "no token with label 'nope'" in problems[0]

    problems = _check(MemberConfig("x", "/nonexistent/lib.so", "a", None), PIN, monkeypatch)
    assert len(problems) == 1 and "cannot load module /nonexistent/lib.so" in problems[0]


def test_group_add_member_runs_the_check(tmp_path):
    toks = make(tmp_path, "hsm-a", "hsm-b")
    conf = config(tmp_path, "a", toks[:1])
    assert hashim(conf, "domain", "init").returncode == 0
    r = hashim(conf, "group", "add-member", "hsm-b", *member_args(toks[1]), pin=PIN)
    assert r.returncode == 1
    err = one_line(r.stderr)
    assert "member 'hsm-b' not added: no domain key on the token" in err
    assert "hsm-b" not in conf.read_text()
    r = hashim(conf, "group", "add-member", "hsm-b", *member_args(toks[1]),
               pin="00000000")
    assert r.returncode == 1 and "CKR_PIN_INCORRECT" in r.stderr


BAD_MODULES = r"""
#include <signal.h>
#include <unistd.h>
#ifdef HANG
int C_GetFunctionList(void **pp) { for (;;) pause(); return 0; }
#else
int C_GetFunctionList(void **pp) { raise(SIGSEGV); return 0; }
#endif
"""


@pytest.mark.parametrize("kind", ["crash", "hang"])
def test_check_new_member_contains_crash_and_hang(tmp_path, monkeypatch, kind):
    cc = shutil.which("cc") or shutil.which("gcc")
    if not cc:
        pytest.skip("no C compiler")
    src = tmp_path / "bad.c"
    src.write_text(BAD_MODULES)
    lib = tmp_path / f"lib{kind}.so"
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(lib), str(src)]
                   + (["-DHANG"] if kind == "hang" else []), check=True)
    m = MemberConfig("bad", str(lib), "a", None)
    problems = _check(m, PIN, monkeypatch, timeout=3)
    assert len(problems) == 1, problems
    if kind == "crash":
        assert "crashed while being checked (killed by signal 11)" in problems[0]
    else:
        assert "did not answer within 3 s" in problems[0]
