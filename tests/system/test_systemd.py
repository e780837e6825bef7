"""The files in systemd/: units that systemd accepts, qctl's templates escaped from systemd's
specifiers, settings the units actually read, an unprivileged sandboxed user, and the
tmpfiles/sysusers entries applied for real under a temporary root."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(60)

SYSTEMD = Path(__file__).resolve().parents[2] / "systemd"
UNITS = ["qctl.service", "qctl-worker@.service", "qctl-beat.service"]
WORKER_UNITS = ["qctl.service", "qctl-worker@.service"]
QCTL_BIN = "/usr/local/bin/qctl"
ENV_FILE = "/etc/qctl/qctl.env"

#: systemd specifiers each unit is meant to use itself; any other bare %x is a qctl template
#: that systemd would expand first.
OWN_SPECIFIERS = {"qctl.service": set(), "qctl-beat.service": set(),
                  "qctl-worker@.service": {"i", "H"}}

HARDENING = {
    "NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
    "PrivateTmp": "yes", "PrivateDevices": "yes", "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes", "ProtectControlGroups": "yes", "RestrictSUIDSGID": "yes",
    "LockPersonality": "yes", "RestrictRealtime": "yes", "SystemCallArchitectures": "native",
    "CapabilityBoundingSet": "", "RuntimeDirectory": "qctl", "StateDirectory": "qctl",
    "LogsDirectory": "qctl",
}


def tool(name: str) -> str:
    """The path of a systemd tool; skipped when absent, except in CI where it must exist."""
    path = shutil.which(name) or next(
        (p for p in (f"/usr/bin/{name}", f"/bin/{name}") if os.access(p, os.X_OK)), None)
    if path is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{name} is required in CI (install the systemd package)")
        pytest.skip(f"{name} is not installed")
    return path


# -- a small unit-file reader ------------------------------------------------------------


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """Sections -> key -> values in order, after systemd's comment and continuation rules."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    logical, pending = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line[0] in "#;"):
            continue
        if pending and line and line[0] in "#;":
            continue  # comment lines inside a continuation are skipped
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    for line in logical:
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"assignment outside a section: {line!r}"
        key, sep, value = line.partition("=")
        assert sep, f"not an assignment: {line!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def unit(name: str) -> dict[str, dict[str, list[str]]]:
    return parse_unit((SYSTEMD / name).read_text())


def service(name: str) -> dict[str, str]:
    """The [Service] section, last assignment wins (as for single-valued settings)."""
    return {key: values[-1] for key, values in unit(name)["Service"].items()}


def environment(name: str) -> dict[str, str]:
    """Variables from the unit's Environment= lines."""
    env: dict[str, str] = {}
    for line in unit(name)["Service"].get("Environment", []):
        for item in line.split():
            key, _, value = item.partition("=")
            env[key] = value
    return env


def env_file() -> dict[str, str]:
    """qctl.env read as systemd's EnvironmentFile= reads it."""
    values = {}
    for raw in (SYSTEMD / "qctl.env").read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        key, sep, value = line.partition("=")
        assert sep and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key), f"bad line {raw!r}"
        values[key] = value.strip().strip('"')
    return values


def expand_specifiers(text: str, unit_name: str, instance: str = "", host: str = "") -> str:
    """systemd's specifier expansion for the letters the units use; unknown ones are an error."""
    table = {"%": "%", "n": unit_name, "N": unit_name.rsplit(".", 1)[0], "i": instance,
             "I": instance, "H": host, "p": unit_name.split("@")[0].rsplit(".", 1)[0]}

    def one(match: re.Match) -> str:
        letter = match.group(1)
        assert letter in table, f"specifier %{letter} not covered by this test"
        return table[letter]
    return re.sub(r"%(.)", one, text)


def bare_specifiers(text: str) -> set[str]:
    """Letters of the specifiers systemd will expand in ``text`` (``%%`` excluded)."""
    return {m.group(1) for m in re.finditer(r"%(.)", text) if m.group(1) != "%"}


def exec_start_argv(name: str, instance: str = "w1", host: str = "node.example.com") -> list[str]:
    """ExecStart= as the process would receive it (specifiers expanded, variables kept)."""
    unit_name = name.replace("@.", f"@{instance}.") if "@." in name else name
    line = expand_specifiers(service(name)["ExecStart"], unit_name, instance, host)
    return line.split()


# -- systemd-analyze verify -----------------------------------------------------------------


def verify(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([tool("systemd-analyze"), "verify", "--man=no", str(path)],
                          capture_output=True, text=True, timeout=45,
                          env={**os.environ, "SYSTEMD_LOG_COLOR": "0", "SYSTEMD_PAGER": ""})


def unit_problems(proc: subprocess.CompletedProcess, name: str) -> list[str]:
    """Lines about the unit itself (the file name, or a template's instance 'qctl-worker@i')."""
    stem = name.split("@")[0] + "@" if "@" in name else name
    return [line for line in (proc.stdout + proc.stderr).splitlines() if stem in line]


@pytest.fixture
def unit_dir(tmp_path):
    """A copy of systemd/ whose ExecStart= binary exists on this machine.

    verify insists on an executable at the absolute path; when qctl is not installed at
    /usr/local/bin/qctl, the copy points at the qctl found on PATH (or the Python running
    the tests), with every other byte unchanged.
    """
    binary = QCTL_BIN if os.access(QCTL_BIN, os.X_OK) else (
        shutil.which("qctl") or os.path.realpath(shutil.which("python3") or "/usr/bin/python3"))
    for path in SYSTEMD.iterdir():
        text = path.read_text()
        (tmp_path / path.name).write_text(text.replace(QCTL_BIN, binary))
    return tmp_path


@pytest.mark.parametrize("name", UNITS)
def test_unit_passes_systemd_analyze_verify(unit_dir, name):
    proc = verify(unit_dir / name)
    assert proc.returncode == 0 and not unit_problems(proc, name), proc.stdout + proc.stderr


def test_verify_reports_a_broken_unit(unit_dir):
    """The check above is not vacuous here: a unit with a typo and a wrong value is reported
    with its name (systemd-analyze still exits 0 for those)."""
    broken = unit_dir / "qctl.service"
    broken.write_text(broken.read_text().replace("[Service]\n",
                                                 "[Service]\nKilMode=x\nRestart=sometimes\n"))
    proc = verify(broken)
    problems = unit_problems(proc, "qctl.service")
    assert any("KilMode" in line for line in problems), proc.stdout + proc.stderr
    assert any("sometimes" in line for line in problems), proc.stdout + proc.stderr


def test_verify_reports_a_missing_binary(tmp_path):
    text = (SYSTEMD / "qctl-beat.service").read_text()
    path = tmp_path / "qctl-beat.service"
    path.write_text(text.replace(QCTL_BIN, str(tmp_path / "no-such-qctl")))
    proc = verify(path)
    assert proc.returncode != 0 and unit_problems(proc, "qctl-beat.service")


# -- the %n pitfall ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", UNITS)
def test_only_systemd_specifiers_are_left_bare(name):
    """Every qctl template (%n, %I, %h...) is written %%n, %%I...; a bare one would be
    replaced by systemd with the unit name, the instance and so on."""
    for section in unit(name).values():
        for key, values in section.items():
            for value in values:
                extra = bare_specifiers(value) - OWN_SPECIFIERS[name]
                assert not extra, f"{name}: {key}={value} uses systemd specifier(s) {extra}"


def test_multi_unit_passes_qctl_its_templates():
    argv = exec_start_argv("qctl.service")
    assert argv[:3] == [QCTL_BIN, "multi", "run"]
    assert "--pidfile=/run/qctl/%n.pid" in argv
    assert "--logfile=/var/log/qctl/%n%I.log" in argv


def test_worker_template_names_the_node_after_the_instance():
    argv = exec_start_argv("qctl-worker@.service", instance="w2", host="node.example.com")
    assert argv[:2] == [QCTL_BIN, "worker"]
    assert "--hostname=w2@node.example.com" in argv
    assert not any(a.startswith(("--pidfile", "--logfile", "-f")) for a in argv), argv


def command_line(name: str, **expand: str) -> list[str]:
    """ExecStart= as systemd would run it with the shipped settings: specifiers expanded,
    ``$VAR`` split into words (none when empty), ``${VAR}`` replaced inside its word."""
    env = {**environment(name), **env_file()}
    argv: list[str] = []
    for word in exec_start_argv(name, **expand):
        whole = re.fullmatch(r"\$([A-Za-z_][A-Za-z0-9_]*)", word)
        if whole:
            argv.extend(env.get(whole.group(1), "").split())
        else:
            argv.append(re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}",
                               lambda m: env.get(m.group(1), ""), word))
    return argv


def test_multi_gives_each_node_its_own_files(tmp_path):
    """The unit's own command line, with `show` for `run`: qctl multi must see distinct
    per-node pidfiles and pass %I on to the worker."""
    argv = command_line("qctl.service")
    nodes = env_file()["QCTL_NODES"].split()
    assert argv[1:3 + len(nodes)] == ["multi", "run", *nodes]
    options = argv[3 + len(nodes):]
    env = {k: v for k, v in os.environ.items() if not k.startswith("QCTL_")}
    def qctl(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "qctl", *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=30)
    if "under construction" in qctl("multi", "--help").stdout:
        pytest.skip("qctl multi is not available yet")
    proc = qctl("multi", "show", "w1", "w2", *options)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for node in ("w1", "w2"):
        assert f"/run/qctl/{node}.pid" in proc.stdout, proc.stdout
        assert f"/var/log/qctl/{node}%I.log" in proc.stdout, proc.stdout
    assert "qctl.service" not in proc.stdout


def test_specifier_check_catches_the_pitfall():
    """The reader sees what systemd would do to an unescaped template."""
    text = "[Service]\nExecStart=/usr/local/bin/qctl multi run w1 --pidfile=/run/qctl/%n.pid\n"
    value = parse_unit(text)["Service"]["ExecStart"][0]
    assert bare_specifiers(value) == {"n"}
    assert expand_specifiers(value, "qctl.service").endswith("--pidfile=/run/qctl/qctl.service.pid")


def test_continuation_lines_are_joined():
    text = "[Service]\nExecStart=/bin/a \\\n    b \\\n# note\n    c\nUser=x\n"
    assert parse_unit(text)["Service"] == {"ExecStart": ["/bin/a  b  c"], "User": ["x"]}


# -- settings ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", UNITS)
def test_unit_reads_the_env_file(name):
    files = unit(name)["Service"]["EnvironmentFile"]
    assert f"-{ENV_FILE}" in files
    if name == "qctl-worker@.service":
        assert files[-1] == "-/etc/qctl/worker-%i.env"  # per node, read last so it wins


@pytest.mark.parametrize("name", UNITS)
def test_every_variable_a_command_uses_is_defined(name):
    """A variable missing from both the unit and qctl.env would expand to nothing, or to an
    empty argument that qctl rejects."""
    known = set(environment(name)) | set(env_file()) | {"MAINPID"}
    settings = service(name)
    for key in ("ExecStart", "ExecReload"):
        used = set(re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", settings.get(key, "")))
        assert used <= known, f"{name}: {key} uses undefined {used - known}"


@pytest.mark.parametrize("name", UNITS)
def test_braced_variables_have_a_default_in_the_unit(name):
    """${VAR} becomes one argument even when empty, so the unit itself must give it a value."""
    braced = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", service(name)["ExecStart"]))
    assert braced and braced <= {k for k, v in environment(name).items() if v}


def test_env_file_documents_every_setting():
    values = env_file()
    for key in ("QCTL_APP", "QCTL_LOG_LEVEL", "QCTL_WORKER_OPTS", "QCTL_NODES", "QCTL_MULTI_OPTS",
                "QCTL_BEAT_OPTS", "QCTL_WORKER_SHUTDOWN_TIMEOUT"):
        assert key in values, key
    text = (SYSTEMD / "qctl.env").read_text()
    assert "#QCTL_BROKER_URL=" in text and "#QCTL_RESULT_BACKEND=" in text
    assert "%%" in text  # the note that unit files, not this file, need the doubled %


def test_log_level_default_is_one_qctl_accepts():
    from qctl.cli.worker import LOGLEVELS
    for name in UNITS:
        assert environment(name)["QCTL_LOG_LEVEL"] in LOGLEVELS
    assert env_file()["QCTL_LOG_LEVEL"] in LOGLEVELS


# -- process management and sandbox ------------------------------------------------------------


@pytest.mark.parametrize("name", UNITS)
def test_unit_runs_unprivileged(name):
    settings = service(name)
    assert settings.get("User") == "qctl" and settings.get("Group") == "qctl"
    assert settings.get("AmbientCapabilities", "") == ""


@pytest.mark.parametrize("name", UNITS)
def test_unit_is_sandboxed(name):
    settings = service(name)
    missing = {k: v for k, v in HARDENING.items() if settings.get(k) != v}
    assert not missing, f"{name}: expected {missing}"
    # shared with the other units: one stopping must not delete the others' pidfiles
    assert settings.get("RuntimeDirectoryPreserve") == "yes"
    assert settings["WorkingDirectory"] == "/var/lib/qctl"


@pytest.mark.parametrize("name", UNITS)
def test_unit_runs_qctl_directly_from_the_documented_path(name):
    """No shell in between, so signals reach qctl itself."""
    argv = exec_start_argv(name)
    assert argv[0] == QCTL_BIN


@pytest.mark.parametrize("name", WORKER_UNITS)
def test_worker_units_stop_warmly(name):
    settings = service(name)
    assert settings["KillMode"] == "mixed" and settings["KillSignal"] == "SIGTERM"
    assert settings["Restart"] == "on-failure"
    assert settings["ExecReload"] == "/bin/kill -HUP $MAINPID"
    stop_after = int(settings["TimeoutStopSec"])
    assert stop_after > int(environment(name)["QCTL_WORKER_SHUTDOWN_TIMEOUT"])
    assert stop_after > int(env_file()["QCTL_WORKER_SHUTDOWN_TIMEOUT"])


def test_worker_template_uses_readiness_and_watchdog():
    settings = service("qctl-worker@.service")
    assert settings["Type"] == "notify" and settings["NotifyAccess"] == "main"
    seconds = settings["WatchdogSec"].removesuffix("s")
    assert seconds.isdigit() and int(seconds) > 0


def test_multi_and_beat_units_stay_in_the_foreground():
    assert service("qctl.service")["Type"] == "exec"
    beat = service("qctl-beat.service")
    assert beat["Type"] == "exec"
    assert "--pidfile" not in beat["ExecStart"] and "--detach" not in beat["ExecStart"]
    argv = exec_start_argv("qctl-beat.service")
    assert argv[1:4] == ["beat", "-s", "/var/lib/qctl/beat-schedule"]


@pytest.mark.parametrize("name", UNITS)
def test_unit_is_installable(name):
    assert unit(name)["Install"]["WantedBy"] == ["multi-user.target"]


# -- tmpfiles and sysusers, applied under a temporary root -------------------------------------


def test_sysusers_and_tmpfiles_create_the_user_and_folders(tmp_path):
    sysusers, tmpfiles = tool("systemd-sysusers"), tool("systemd-tmpfiles")
    if os.geteuid() != 0:
        pytest.skip("creating files owned by another user needs root")
    (tmp_path / "etc").mkdir()
    for command in ([sysusers, f"--root={tmp_path}", str(SYSTEMD / "qctl.sysusers.conf")],
                    [tmpfiles, "--create", f"--root={tmp_path}",
                     str(SYSTEMD / "qctl.tmpfiles.conf")]):
        proc = subprocess.run(command, capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    passwd = {line.split(":")[0]: line.split(":") for line in
              (tmp_path / "etc" / "passwd").read_text().splitlines()}
    assert "qctl" in passwd
    uid, gid, home, shell = int(passwd["qctl"][2]), int(passwd["qctl"][3]), passwd["qctl"][5], \
        passwd["qctl"][6]
    assert 0 < uid < 1000 and home == "/var/lib/qctl" and shell.endswith("nologin")
    for folder in ("run/qctl", "var/log/qctl"):
        info = (tmp_path / folder).stat()
        assert (info.st_uid, info.st_gid) == (uid, gid), folder
        assert info.st_mode & 0o777 == 0o755, folder


def test_tmpfiles_folders_are_the_ones_the_units_use():
    lines = [line.split() for line in (SYSTEMD / "qctl.tmpfiles.conf").read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    entries = {fields[1]: fields for fields in lines}
    assert set(entries) == {"/run/qctl", "/var/log/qctl"}
    for fields in entries.values():
        assert fields[0] == "d" and fields[3:5] == ["qctl", "qctl"]
    argv = exec_start_argv("qctl.service")
    assert any(a.startswith("--pidfile=/run/qctl/") for a in argv)
    assert any(a.startswith("--logfile=/var/log/qctl/") for a in argv)

