"""The ``hashim`` command: config check, group show/edit, plugin commands, exit codes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

import shim
from shim import cli
from shim import config as cfg
from tests import softhsm

REPO = str(Path(__file__).resolve().parent.parent)
MODULE = os.path.abspath(softhsm.__file__)      # any existing readable file

CONF = f"""\
# payments group -- comments must survive edits
[group]
label = "payments-ha"  # HA slot label
command_timeout = 20.0

# primary
[[member]]
name = "hsm-a"
module = "{MODULE}"
token_label = "ha-a"
private_instance = true
env = {{ SOFTHSM2_CONF = "/etc/hashim/hsm-a.conf", USER_PIN = "s3cr3t-pin" }}

# secondary
[[member]]
name = "hsm-b"
module = "{MODULE}"
token_serial = "0042"
isolate = true
"""


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path, monkeypatch):
    monkeypatch.delenv("HASHIM_CONF", raising=False)
    monkeypatch.delenv("HASHIM_DEBUG", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(cfg, "SYSTEM_PATH", str(tmp_path / "etc" / "hashim.toml"))


@pytest.fixture
def conf(tmp_path) -> str:
    p = tmp_path / "hashim.toml"
    p.write_text(CONF)
    return str(p)


def run(capsys, *argv):
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def one_line_error(err: str) -> str:
    assert err.endswith("\n") and err.count("\n") == 1, repr(err)
    assert "Traceback" not in err
    return err.strip()


# --------------------------------------------------------------------------- config check

def test_config_check_ok(capsys, conf):
    rc, out, err = run(capsys, "config", "check", conf)
    assert (rc, err) == (0, "")
    assert out == f"ok: {conf}: group 'payments-ha', 2 members (hsm-a, hsm-b)\n"


def test_config_option_before_or_after_and_env(capsys, conf, monkeypatch):
    expect = f"ok: {conf}: group 'payments-ha', 2 members (hsm-a, hsm-b)\n"
    assert run(capsys, "--config", conf, "config", "check")[1] == expect
    assert run(capsys, "config", "check", "--config", conf)[1] == expect
    assert run(capsys, "config", "--config", conf, "check")[1] == expect
    assert run(capsys, f"--config={conf}", "config", "check")[1] == expect
    monkeypatch.setenv("HASHIM_CONF", conf)
    assert run(capsys, "config", "check")[1] == expect


def test_config_check_default_path(capsys, tmp_path):
    user = tmp_path / "home" / ".config" / "hashim" / "hashim.toml"
    rc, out, err = run(capsys, "config", "check")
    assert rc == 2 and one_line_error(err).startswith(f"hashim: {user}: file not found; ")
    user.parent.mkdir(parents=True)
    user.write_text(CONF)
    assert run(capsys, "config", "check")[0] == 0


@pytest.mark.parametrize("edit,expect", [
    (lambda s: s.replace("command_timeout = 20.0", "comand_timeout = 20.0"),
     "[group] comand_timeout: unknown key; did you mean 'command_timeout'?"),
    (lambda s: s.replace('label = "payments-ha"', "label = payments"),
     "line 3: not valid TOML: "),
    (lambda s: s.replace('token_serial = "0042"', ""),
     "member 'hsm-b' token_label: missing: the member's token is not identified"),
    (lambda s: s.replace('name = "hsm-b"', 'name = "hsm-a"'),
     "[[member]] #2 name: 'hsm-a' is already the name of [[member]] #1"),
    (lambda s: s.replace(MODULE, "/nonexistent/lib.so", 1),
     "member 'hsm-a' module: /nonexistent/lib.so does not exist"),
    (lambda s: s.replace("command_timeout = 20.0", "command_timeout = 1.0\nheartbeat_interval = 2"),
     "[group] heartbeat_interval: heartbeat_interval (2 s) must be shorter than "
     "command_timeout (1 s)"),
    (lambda s: s.split("# primary")[0], "[[member]]: no members configured"),
])
def test_config_check_errors(capsys, conf, edit, expect):
    Path(conf).write_text(edit(CONF))
    rc, out, err = run(capsys, "config", "check", conf)
    assert rc == 2 and out == ""
    line = one_line_error(err)
    assert line.startswith(f"hashim: {conf}: ") and expect in line, line
    assert "s3cr3t-pin" not in err


# --------------------------------------------------------------------------- group show

def test_group_show_text(capsys, conf):
    rc, out, err = run(capsys, "--config", conf, "group", "show")
    assert rc == 0 and err == ""
    assert "primary candidate: hsm-a" in out
    assert "'payments-ha'" in out and "command_timeout = 20 s" in out
    assert out.index("1. hsm-a") < out.index("2. hsm-b")
    assert "env SOFTHSM2_CONF=/etc/hashim/hsm-a.conf" in out
    assert "s3cr3t-pin" not in out and "USER_PIN=" + cli.MASK in out


def test_group_show_json(capsys, conf):
    rc, out, err = run(capsys, "group", "show", "--json", "--config", conf)
    assert rc == 0
    d = json.loads(out)
    assert d["config"] == conf and d["primary_candidate"] == "hsm-a"
    assert [m["name"] for m in d["members"]] == ["hsm-a", "hsm-b"]
    g = d["group"]
    assert g["label"] == "payments-ha" and g["ha_only"] is True and g["slot_id"] == 0
    assert g["recovery_attempts"] == 3 and g["serial"] == cfg.derived_serial("payments-ha")
    a, b = d["members"]
    assert a["env"] == {"SOFTHSM2_CONF": "/etc/hashim/hsm-a.conf", "USER_PIN": cli.MASK}
    assert a["private_instance"] is True and b["isolate"] is True
    assert b["token_serial"] == "0042" and b["token_label"] is None
    assert "s3cr3t-pin" not in out


def test_group_show_missing_module_still_shows(capsys, conf):
    Path(conf).write_text(CONF.replace(MODULE, "/gone/lib.so"))
    assert run(capsys, "--config", conf, "group", "show")[0] == 0


# --------------------------------------------------------------------------- add / remove

def test_add_member(capsys, conf, monkeypatch):
    seen = []
    monkeypatch.setattr(cli, "check_new_member", lambda m: seen.append(m) or [])
    rc, out, err = run(capsys, "--config", conf, "group", "add-member", "hsm-c",
                       "--module", MODULE, "--token-label", "ha-c",
                       "--env", "SOFTHSM2_CONF=/etc/c.conf", "--env", "X=a=b",
                       "--private-instance", "--isolate")
    assert (rc, err) == (0, ""), err
    assert "added member 'hsm-c'" in out and "position 3 of 3" in out
    assert seen and seen[0].name == "hsm-c" and seen[0].env == {"SOFTHSM2_CONF": "/etc/c.conf",
                                                                "X": "a=b"}
    c = cfg.load(conf)
    assert c.member_names == ("hsm-a", "hsm-b", "hsm-c")
    assert c.members[2] == cfg.MemberConfig("hsm-c", MODULE, "ha-c", None, True,
                                            {"SOFTHSM2_CONF": "/etc/c.conf", "X": "a=b"}, True)
    text = Path(conf).read_text()
    assert text.startswith(CONF.rstrip("\n"))             # nothing before changed
    assert "# payments group -- comments must survive edits" in text


def test_add_member_token_serial_and_relative_module(capsys, conf, tmp_path, monkeypatch):
    lib = tmp_path / "libx.so"
    lib.write_bytes(b"\x7fELF")
    monkeypatch.chdir(tmp_path)
    rc, out, err = run(capsys, "--config", conf, "group", "add-member", "hsm-c",
                       "--module", "libx.so", "--token-serial", "77", "--no-check")
    assert rc == 0, err
    m = cfg.load(conf).member("hsm-c")
    assert m.module == str(lib) and m.token_serial == "77" and m.token_label is None


def test_add_member_creates_the_file(capsys, tmp_path):
    p = tmp_path / "etc2" / "new.toml"
    rc, out, err = run(capsys, "--config", str(p), "group", "add-member", "a",
                       "--module", MODULE, "--token-label", "a", "--no-check")
    assert rc == 0, err
    c = cfg.load(str(p))
    assert c.member_names == ("a",) and c.group.label == "hashim"
    assert run(capsys, "config", "check", str(p))[1] == \
        f"ok: {p}: group 'hashim', 1 members (a)\n"


def test_add_member_duplicate(capsys, conf):
    rc, out, err = run(capsys, "--config", conf, "group", "add-member", "hsm-a",
                       "--module", MODULE, "--token-label", "zz")
    assert rc == 2
    assert one_line_error(err) == (f"hashim: member 'hsm-a' already exists in {conf}; choose "
                                   "another name, or remove it first (hashim group "
                                   "remove-member hsm-a)")
    assert Path(conf).read_text() == CONF


def test_add_member_missing_module_and_no_check(capsys, conf, monkeypatch):
    called = []
    monkeypatch.setattr(cli, "check_new_member", lambda m: called.append(m) or [])
    args = ["--config", conf, "group", "add-member", "hsm-c", "--module", "/gone/lib.so",
            "--token-label", "c"]
    rc, out, err = run(capsys, *args)
    assert rc == 2 and not called
    assert one_line_error(err) == (f"hashim: {conf}: member 'hsm-c' module: /gone/lib.so does "
                                   "not exist; install the module or correct the path")
    assert Path(conf).read_text() == CONF
    rc, out, err = run(capsys, *args, "--no-check")
    assert rc == 0 and not called
    assert cfg.load(conf, check_files=False).member_names[-1] == "hsm-c"


def test_add_member_check_hook_failure(capsys, conf, monkeypatch):
    monkeypatch.setattr(cli, "check_new_member",
                        lambda m: ["token 'c' not found", "domain key missing"])
    rc, out, err = run(capsys, "--config", conf, "group", "add-member", "hsm-c",
                       "--module", MODULE, "--token-label", "c")
    assert rc == 1
    assert one_line_error(err) == ("hashim: member 'hsm-c' not added: token 'c' not found; "
                                   "domain key missing (fix it, or add it anyway with "
                                   "--no-check)")
    assert Path(conf).read_text() == CONF


def test_check_new_member_reports_an_unusable_module(tmp_path):
    lib = tmp_path / "libnot-pkcs11.so"
    lib.write_bytes(b"\x7fELF")
    problems = cli.check_new_member(cfg.MemberConfig("a", str(lib), "a", None))
    assert problems and any("libnot-pkcs11.so" in p for p in problems), problems


@pytest.mark.parametrize("extra,expect", [
    (["--token-label", "c", "--env", "NOEQUALS"], "--env 'NOEQUALS': expected K=V"),
    (["--token-label", "c", "--env", "A=1", "--env", "A=2"], "--env A: given twice"),
    (["--token-label", "c", "--token-serial", "1"],
     "hashim group add-member: argument --token-serial: not allowed with argument "
     "--token-label; see 'hashim group add-member --help'"),
    ([], "hashim group add-member: one of the arguments --token-label --token-serial is "
         "required"),
    (["--token-label", "x" * 33], "member 'hsm-c' token_label: is 33 bytes"),
])
def test_add_member_usage_errors(capsys, conf, extra, expect):
    rc, out, err = run(capsys, "--config", conf, "group", "add-member", "hsm-c",
                       "--module", MODULE, *extra)
    assert rc == 2 and expect in one_line_error(err)
    assert Path(conf).read_text() == CONF


def test_add_member_bad_name(capsys, conf):
    rc, out, err = run(capsys, "--config", conf, "group", "add-member", "bad name",
                       "--module", MODULE, "--token-label", "c")
    assert rc == 2 and "'bad name' is not a valid member name" in one_line_error(err)


def test_remove_member(capsys, conf):
    rc, out, err = run(capsys, "--config", conf, "group", "remove-member", "hsm-a")
    assert rc == 0, err
    assert "removed member 'hsm-a'" in out and "members: hsm-b" in out
    text = Path(conf).read_text()
    assert "hsm-a" not in text and "s3cr3t-pin" not in text
    assert "# payments group -- comments must survive edits" in text
    assert "# secondary\n[[member]]" in text and "# primary" not in text
    assert cfg.load(conf).member_names == ("hsm-b",)


def test_remove_member_unknown_and_last(capsys, conf):
    rc, out, err = run(capsys, "--config", conf, "group", "remove-member", "hsm-x")
    assert rc == 2
    assert one_line_error(err) == f"hashim: no member 'hsm-x' in {conf}; members are: hsm-a, hsm-b"
    assert run(capsys, "--config", conf, "group", "remove-member", "hsm-b")[0] == 0
    rc, out, err = run(capsys, "--config", conf, "group", "remove-member", "hsm-a")
    assert rc == 2
    assert one_line_error(err) == (f"hashim: {conf}: member 'hsm-a': 'hsm-a' is the last "
                                   "member and a group needs at least one; add the new member "
                                   "first, then remove 'hsm-a'")
    assert cfg.load(conf).member_names == ("hsm-a",)


# --------------------------------------------------------------------------- settings

def test_synchronize_and_ha_only(capsys, conf):
    assert run(capsys, "--config", conf, "group", "synchronize", "--disable")[0] == 0
    assert cfg.load(conf).group.synchronize is False
    assert run(capsys, "--config", conf, "group", "synchronize", "--enable")[0] == 0
    assert cfg.load(conf).group.synchronize is True
    rc, out, err = run(capsys, "--config", conf, "group", "ha-only", "--disable")
    assert rc == 0 and out == f"ha_only = false in group 'payments-ha' ({conf})\n"
    assert cfg.load(conf).group.ha_only is False
    text = Path(conf).read_text()
    assert 'label = "payments-ha"  # HA slot label' in text
    assert "# primary\n[[member]]" in text


def test_group_unset(capsys, conf):
    assert run(capsys, "--config", conf, "group", "set", "command_timeout", "7")[0] == 0
    rc, out, err = run(capsys, "--config", conf, "group", "unset", "command_timeout")
    assert rc == 0 and "now 20.0 (default)" in out
    assert "command_timeout" not in Path(conf).read_text()
    rc, out, err = run(capsys, "--config", conf, "group", "unset", "ha_onyl")
    assert rc == 2 and "did you mean 'ha_only'?" in one_line_error(err)


def test_edit_missing_config(capsys, tmp_path):
    p = tmp_path / "none.toml"
    rc, out, err = run(capsys, "--config", str(p), "group", "set", "label", "x")
    assert rc == 2 and one_line_error(err).startswith(f"hashim: {p}: file not found; ")
    assert not p.exists()


def test_edit_refused_when_changed_concurrently(capsys, conf, monkeypatch):
    real_set = cfg.set_group_key

    def racing(doc, key, value):        # an editor saves the file while hashim edits it
        Path(conf).write_text(CONF + "# saved by an editor\n")
        real_set(doc, key, value)
    monkeypatch.setattr(cfg, "set_group_key", racing)
    rc, out, err = run(capsys, "--config", conf, "group", "set", "label", "x")
    assert rc == 2
    assert one_line_error(err) == (f"hashim: {conf}: changed on disk while hashim was editing "
                                   "it, nothing was written; check the file and run the "
                                   "command again")
    assert Path(conf).read_text() == CONF + "# saved by an editor\n"


# --------------------------------------------------------------------------- module-path

def test_module_path(capsys, monkeypatch):
    monkeypatch.setattr(shim, "module_path", lambda: "/opt/hashim/libhashim.so", raising=False)
    assert run(capsys, "module-path") == (0, "/opt/hashim/libhashim.so\n", "")


def test_module_path_unavailable(capsys, monkeypatch):
    monkeypatch.delattr(shim, "module_path", raising=False)
    rc, out, err = run(capsys, "module-path")
    assert rc == 1 and one_line_error(err) == "hashim: module-path is not available in this build"


def test_module_path_failure(capsys, monkeypatch):
    def fail():
        raise FileNotFoundError("libhashim.so not built; run make")
    monkeypatch.setattr(shim, "module_path", fail, raising=False)
    rc, out, err = run(capsys, "module-path")
    assert rc == 1 and "libhashim.so not built" in one_line_error(err)


# --------------------------------------------------------------------------- plugins

@pytest.mark.parametrize("argv", [
    ["status"], ["status", "--json", "--watch"], ["log", "--member", "a", "--since", "1h"],
    ["recover", "hsm-a"], ["demo"], ["domain", "init"], ["domain", "check"],
    ["domain", "add-member", "n", "--module", MODULE, "--token-label", "x"],
])
def test_plugin_not_available(capsys, monkeypatch, argv):
    for cmd, (mod, _) in cli.PLUGINS.items():
        monkeypatch.setitem(sys.modules, mod, None)      # import fails: not in this build
    rc, out, err = run(capsys, *argv)
    assert rc == 1
    assert one_line_error(err) == f"hashim: {argv[0]} is not available in this build"


def test_plugin_called(capsys, monkeypatch, conf):
    calls = []
    mod = types.ModuleType("shim.status")
    mod.main = lambda args: calls.append(args) or 0
    monkeypatch.setitem(sys.modules, "shim.status", mod)
    rc, out, err = run(capsys, "status", "--json", "--config", conf)
    assert rc == 0 and len(calls) == 1
    a = calls[0]
    assert a.command == "status" and a.json is True and a.watch is False
    assert a.config == conf and a.config_path == conf


def test_plugin_exit_code_and_extra_options(capsys, monkeypatch):
    calls = []
    mod = types.ModuleType("shim.domain")

    def add_arguments(name, parser):
        if name == "domain init":
            parser.add_argument("--force", action="store_true")
    mod.add_arguments = add_arguments
    mod.main = lambda args: calls.append(args) or 1
    monkeypatch.setitem(sys.modules, "shim.domain", mod)
    rc, out, err = run(capsys, "domain", "init", "--force", "--pin-file", "/p")
    assert rc == 1 and calls[0].force is True and calls[0].pin_file == "/p"
    assert calls[0].domain_command == "init"
    rc, out, err = run(capsys, "domain", "add-member", "n", "--module", MODULE,
                       "--token-serial", "9", "--from", "hsm-a", "--env", "A=b")
    assert rc == 1 and calls[1].from_member == "hsm-a" and calls[1].env == ["A=b"]


def test_plugin_config_error_is_exit_2(capsys, monkeypatch):
    mod = types.ModuleType("shim.recover")

    def main(args):
        raise cfg.ConfigError("no such member", "see hashim group show", file="/f",
                              where="member 'x'")
    mod.main = main
    monkeypatch.setitem(sys.modules, "shim.recover", mod)
    rc, out, err = run(capsys, "recover", "x")
    assert rc == 2
    assert one_line_error(err) == "hashim: /f: member 'x': no such member; see hashim group show"


def test_plugin_crash_is_one_line(capsys, monkeypatch):
    mod = types.ModuleType("shim.demo")
    mod.main = lambda args: 1 / 0
    monkeypatch.setitem(sys.modules, "shim.demo", mod)
    rc, out, err = run(capsys, "demo")
    assert rc == 1 and "internal error: ZeroDivisionError" in one_line_error(err)


@pytest.mark.parametrize("argv", [
    [], ["module-path"], ["demo"], ["config"], ["config", "check"], ["status"], ["log"],
    ["recover"], ["domain"], ["domain", "init"], ["domain", "check"],
    ["domain", "add-member"], ["group"], ["group", "show"], ["group", "add-member"],
    ["group", "remove-member"], ["group", "synchronize"], ["group", "ha-only"],
    ["group", "set"], ["group", "unset"],
])
def test_help(capsys, argv):
    rc, out, err = run(capsys, *argv, "--help")
    assert rc == 0 and out.startswith("usage: hashim") and "--config FILE" in out


def test_selected_command():
    S = cli._selected_command
    assert S(["--config", "status", "group", "show"]) == "group"
    assert S(["--config=x", "status"]) == "status"
    assert S(["-h"]) is None


# --------------------------------------------------------------------------- subprocess

def test_python_m_shim_cli(conf, tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("HASHIM_CONF", None)
    r = subprocess.run([sys.executable, "-m", "shim.cli", "config", "check", "--config", conf],
                       env=env, capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stderr) == (0, "")
    assert r.stdout == f"ok: {conf}: group 'payments-ha', 2 members (hsm-a, hsm-b)\n"
    bad = tmp_path / "bad.toml"
    bad.write_text(CONF.replace("ha-a", "x" * 40))
    r = subprocess.run([sys.executable, "-m", "shim.cli", "--config", str(bad), "config",
                        "check"], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert f"{bad}: member 'hsm-a' token_label: is 40 bytes" in r.stderr
    r = subprocess.run([sys.executable, "-m", "shim.cli", "group", "add-member"],
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.count("\n") == 1


def test_real_softhsm_config(capsys, tmp_path):
    import shutil
    if not shutil.which("softhsm2-util") or not os.path.exists(softhsm.SOFTHSM_LIB):
        pytest.skip("SoftHSM2 not installed")
    toks = [softhsm.make_token(tmp_path, "ha-a"), softhsm.make_token(tmp_path, "ha-b")]
    p = softhsm.write_config(tmp_path / "hashim.toml", toks[:1])
    env = dict(os.environ, HASHIM_SO_PIN=softhsm.SO_PIN, HASHIM_PIN=softhsm.PIN)
    for cmd in (["domain", "init"],
                ["domain", "add-member", "ha-b", "--module", toks[1].lib, "--token-label",
                 "ha-b", "--env", f"SOFTHSM2_CONF={toks[1].conf}"]):
        r = subprocess.run([sys.executable, "-m", "shim.cli", "--config", str(p), *cmd],
                           env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 0, r.stderr
    os.environ["HASHIM_PIN"] = softhsm.PIN       # check_new_member logs in with it
    try:
        rc, out, err = run(capsys, "--config", str(p), "group", "add-member", "ha-b",
                           "--module", toks[1].lib, "--token-label", "ha-b",
                           "--env", f"SOFTHSM2_CONF={toks[1].conf}")
    finally:
        del os.environ["HASHIM_PIN"]
    assert rc == 0, err
    rc, out, err = run(capsys, "config", "check", str(p))
    assert out == f"ok: {p}: group 'hashim-test', 2 members (ha-a, ha-b)\n"

