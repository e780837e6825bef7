"""Importing qctl is cheap: a web app that only sends tasks loads no CLI, no rich output, no
broker client it does not need, and not the worker runtime (SPEC §1). Each check runs in a
fresh interpreter so that nothing imported by other tests hides a regression."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(30)

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = ["click", "rich", "pika", "redis", "psutil", "qctl_worker"]


def run_python(code: str, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    for name in list(env):
        if name.startswith("QCTL_"):
            del env[name]
    return subprocess.run([sys.executable, *args, "-c", code] if code else [sys.executable, *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=25)


def loaded_after(snippet: str, cwd: Path) -> list[str]:
    code = textwrap.dedent(snippet) + textwrap.dedent(f"""
        import json, sys
        names = {FORBIDDEN!r}
        print("LOADED=" + json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & set(names))))
    """)
    proc = run_python(code, cwd)
    assert proc.returncode == 0, proc.stderr
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("LOADED=")][-1]
    return json.loads(line[len("LOADED="):])


def test_import_qctl_loads_nothing_heavy(tmp_path):
    assert loaded_after("import qctl\n", tmp_path) == []


def test_public_api_imports_load_nothing_heavy(tmp_path):
    snippet = """
        from qctl import App, Task, AsyncResult, GroupResult, states, signature
        from qctl.exceptions import OperationalError, NotRegistered, Retry
        from qctl.log import get_task_logger
        from qctl.routing import Queue, Exchange
    """
    assert loaded_after(snippet, tmp_path) == []


def test_delay_on_memory_broker_loads_nothing_heavy(tmp_path):
    snippet = """
        from qctl import App
        app = App('proj', broker='memory://', backend='memory://')

        @app.task
        def add(x, y):
            return x + y

        result = add.delay(2, 3)
        assert result.state == 'PENDING'
        assert len(app.transport.fetch(['celery'], 10, 0.5)) == 1
        assert add.apply((1, 2)).get() == 3
    """
    assert loaded_after(snippet, tmp_path) == []


def test_delay_on_default_sqlite_broker_loads_nothing_heavy(tmp_path):
    snippet = """
        from qctl import App
        app = App('proj')

        @app.task
        def add(x, y):
            return x + y

        add.delay(2, 3)
        assert app.conf.effective_broker_url == 'sqlite:///qctl.sqlite3'
    """
    assert loaded_after(snippet, tmp_path) == []
    assert (tmp_path / "qctl.sqlite3").exists()  # the embedded default, in the working dir


def test_python_m_qctl_version(tmp_path):
    if not (ROOT / "qctl" / "cli" / "__init__.py").exists():
        pytest.skip("qctl/cli does not exist yet")
    import qctl
    proc = run_python("", tmp_path, "-m", "qctl", "--version")
    assert proc.returncode == 0, proc.stderr
    assert qctl.__version__ in proc.stdout
