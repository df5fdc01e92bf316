"""The sandbox against the attacks a user would fear; each must be contained and the host unaffected.

Timeouts are small (1-2 s) so the file stays fast on two shared cores. Tests that rely on the uid drop
(only possible when the tests run as root) are skipped elsewhere.
"""

import os
import signal
import socket
import stat
import tempfile
import threading
import time

import pytest

from minicoder.sandbox import (
    Limits,
    PersistentSession,
    SandboxResult,
    busiest_sandbox_uid,
    isolation_info,
    run_many,
    run_python,
    stray_processes,
)

AS_ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not AS_ROOT, reason="the uid drop that contains this needs a root host")

FAST = Limits(timeout_s=2, cpu_s=2, memory_mb=512, max_processes=16, max_output_bytes=100_000)


@pytest.fixture(autouse=True)
def nothing_left_behind():
    yield
    assert stray_processes() == []  # runs of other host processes (an evaluation beside the tests) may be live


# ---------------------------------------------------------------------------------------------- normal use


def test_stdout_stderr_and_exit_code():
    r = run_python("import sys\nprint('out')\nprint('err', file=sys.stderr)\nsys.exit(3)", limits=FAST)
    assert isinstance(r, SandboxResult)
    assert (r.status, r.returncode, r.stdout, r.stderr) == ("error", 3, "out\n", "err\n")
    assert not r.truncated and r.duration_s < 2

    ok = run_python("print(__name__)", limits=FAST)
    assert (ok.status, ok.returncode, ok.stdout, ok.ok) == ("ok", 0, "__main__\n", True)


def test_stdin_is_passed():
    r = run_python("import sys\nprint(sys.stdin.read().upper())", stdin="hello\nworld", limits=FAST)
    assert r.stdout == "HELLO\nWORLD\n"


def test_exception_is_an_error_with_traceback():
    r = run_python("def f():\n    raise ValueError('boom')\nf()", limits=FAST)
    assert r.status == "error" and r.returncode == 1
    assert "Traceback" in r.stderr and "ValueError: boom" in r.stderr
    assert "line 2, in f" in r.stderr
    assert "minicoder-sandbox>" not in r.stderr  # the sandbox's own frames are left out


def test_files_are_readable_and_importable():
    files = {"data/input.txt": "42\n", "helper.py": "def double(x):\n    return 2 * x\n"}
    r = run_python("import helper\nprint(helper.double(int(open('data/input.txt').read())))", files=files, limits=FAST)
    assert (r.status, r.stdout) == ("ok", "84\n")
    with pytest.raises(ValueError):
        run_python("pass", files={"../escape.txt": "x"})
    with pytest.raises(ValueError):
        run_python("pass", files={"/etc/evil": "x"})


def test_working_directory_is_fresh_and_deleted():
    code = "import os\nprint(os.getcwd())\nprint(os.listdir('.'))\nopen('made.txt', 'w').write('x')"
    r = run_python(code, limits=FAST)
    workdir, listing = r.stdout.splitlines()
    assert r.status == "ok" and listing == "['main.py']"
    assert not os.path.exists(workdir)


def test_site_packages_optional():
    assert run_python("import numpy", limits=FAST).status == "ok"
    r = run_python("import numpy", limits=FAST, allow_site_packages=False)
    assert r.status == "error" and "ModuleNotFoundError" in r.stderr


def test_isolation_info_reports_the_active_layers():
    info = isolation_info()
    assert info["works"] and info["uid_drop"] == AS_ROOT
    assert info["network_isolation"] in ("namespace", "socket_guard")


def test_run_many_keeps_order():
    programs = [f"print({i} * {i})" for i in range(5)] + ["raise SystemExit(2)"]
    results = run_many(programs, FAST, workers=3)
    assert [r.stdout for r in results[:5]] == [f"{i * i}\n" for i in range(5)]
    assert results[5].status == "error" and results[5].returncode == 2


# ---------------------------------------------------------------------------------------------- attacks


def test_infinite_loop_times_out():
    limits = Limits(timeout_s=1, cpu_s=30)
    started = time.monotonic()
    r = run_python("print('started', flush=True)\nwhile True:\n    pass", limits=limits)
    assert r.status == "timeout" and r.returncode == -signal.SIGKILL
    assert r.duration_s < limits.timeout_s + 1  # launch to everything dead
    assert time.monotonic() - started < limits.timeout_s + 2  # with setup and cleanup, on a busy machine
    assert r.stdout == "started\n"  # what it printed before being killed is kept


def test_sleeping_program_times_out():
    r = run_python("import time\ntime.sleep(60)", limits=Limits(timeout_s=1))
    assert r.status == "timeout" and r.duration_s < 2


def test_cpu_burn_hits_the_cpu_limit():
    r = run_python("while True:\n    pass", limits=Limits(timeout_s=10, cpu_s=1))
    assert r.status == "cpu" and r.returncode == -signal.SIGXCPU
    assert r.duration_s < 9


@needs_root
def test_fork_bomb_is_contained():
    limits = Limits(timeout_s=2, max_processes=16)
    # Children also leave the process group (setsid), as a bomb that wants to survive a group kill would.
    bomb = (
        "import os\n"
        "while True:\n"
        "    try:\n"
        "        if os.fork() == 0:\n"
        "            os.setsid()\n"
        "    except OSError:\n"
        "        pass\n"
    )
    peak, gaps, done = [0], [0.0], threading.Event()

    def watch():  # the host keeps running while the bomb goes off, and counts the bomb's processes
        last = time.monotonic()
        while not done.is_set():
            peak[0] = max(peak[0], busiest_sandbox_uid())
            now = time.monotonic()
            gaps[0], last = max(gaps[0], now - last), now
            time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    started = time.monotonic()
    r = run_python(bomb, limits=limits)
    done.set()
    watcher.join()
    assert r.status == "timeout"
    assert r.duration_s < limits.timeout_s + 1
    assert time.monotonic() - started < limits.timeout_s + 2
    # RLIMIT_NPROC holds: it forked, but only so far (+1: the launcher's helper that kills them as their uid)
    assert 1 < peak[0] <= limits.max_processes + 1
    assert gaps[0] < 1.0  # the host stayed responsive
    assert stray_processes() == []  # every child is gone, including the ones that called setsid
    assert run_python("print('fine')", limits=FAST).stdout == "fine\n"


def test_background_processes_die_with_the_program():
    code = "import subprocess\nsubprocess.Popen(['sleep', '60'], start_new_session=True)\nprint('spawned')"
    r = run_python(code, limits=FAST)
    assert (r.status, r.stdout) == ("ok", "spawned\n") and r.duration_s < 2
    assert stray_processes() == []


def test_memory_bomb_is_stopped():
    code = "chunks = []\nwhile True:\n    chunks.append(bytearray(10 * 1024 * 1024))"
    r = run_python(code, limits=Limits(timeout_s=5, memory_mb=256))
    assert r.status == "memory" and "MemoryError" in r.stderr
    one_shot = run_python("x = bytearray(4 * 1024 ** 3)", limits=Limits(timeout_s=5, memory_mb=256))
    assert one_shot.status == "memory"


@needs_root
def test_cannot_write_outside_the_working_directory(tmp_path):
    outside = tempfile.mkdtemp(prefix="minicoder-test-outside-")  # in /tmp, reachable by anyone
    try:
        os.chmod(outside, 0o755)  # not world-writable
        kept = os.path.join(outside, "kept.txt")
        host_file = tmp_path / "host.txt"
        for path in (kept, host_file):
            with open(path, "w") as f:
                f.write("original")
            os.chmod(path, 0o644)
        code = (
            "import sys\n"
            "for path, mode in sys.argv_paths:\n"
            "    try:\n"
            "        open(path, mode).write('pwned')\n"
            "        print('WROTE', path)\n"
            "    except OSError as e:\n"
            "        print('denied', type(e).__name__)\n"
        ).replace(
            "sys.argv_paths",
            repr([(os.path.join(outside, "new.txt"), "w"), (kept, "w"), (kept, "a"), (str(host_file), "w")]),
        )
        r = run_python(code, limits=FAST)
        assert r.status == "ok" and "WROTE" not in r.stdout
        assert r.stdout.count("denied") == 4
        assert open(kept).read() == "original" and host_file.read_text() == "original"
        assert os.listdir(outside) == ["kept.txt"]
        assert stat.S_IMODE(os.stat(outside).st_mode) == 0o755
    finally:
        for name in os.listdir(outside):
            os.unlink(os.path.join(outside, name))
        os.rmdir(outside)


@pytest.fixture
def tcp_server():
    """A server on the host's 127.0.0.1 that records whether anyone connected."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.2)
    connections, stop = [], threading.Event()

    def accept():
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except (socket.timeout, OSError):
                continue
            connections.append(conn)

    thread = threading.Thread(target=accept)
    thread.start()
    yield server.getsockname()[1], connections
    stop.set()
    thread.join()
    server.close()
    for conn in connections:
        conn.close()


CONNECT = (
    "import socket\n"
    "for family, address in ((socket.AF_INET, ('127.0.0.1', PORT)), (socket.AF_INET6, ('::1', PORT))):\n"
    "    try:\n"
    "        s = socket.socket(family)\n"
    "        s.settimeout(1)\n"
    "        s.connect(address)\n"
    "        print('CONNECTED')\n"
    "    except OSError as e:\n"
    "        print('refused', e)\n"
)


@pytest.mark.parametrize("mode", ["namespace", "socket_guard"])
def test_network_is_blocked(tcp_server, monkeypatch, mode):
    port, connections = tcp_server
    if mode == "socket_guard":
        monkeypatch.setenv("MINICODER_SANDBOX_NO_NETNS", "1")  # as on a kernel that refuses namespaces
    r = run_python(CONNECT.replace("PORT", str(port)), limits=FAST)
    if mode == "namespace" and r.network_isolation != "namespace":
        pytest.skip(f"no network namespace on this machine ({r.network_isolation})")
    assert r.network_isolation == mode
    assert r.status == "ok" and "CONNECTED" not in r.stdout and r.stdout.count("refused") == 2
    time.sleep(0.3)
    assert connections == []


def test_network_when_allowed(tcp_server):
    port, connections = tcp_server
    r = run_python(CONNECT.replace("PORT", str(port)), limits=Limits(timeout_s=5, network=True))
    assert r.network_isolation == "none" and r.stdout.startswith("CONNECTED")


@needs_root
def test_killing_the_parent_fails_and_the_host_survives():
    code = (
        "import os, signal\n"
        f"for pid in (os.getppid(), {os.getpid()}, 1):\n"
        "    try:\n"
        "        os.kill(pid, signal.SIGKILL)\n"
        "        print('KILLED', pid)\n"
        "    except OSError as e:\n"
        "        print('denied', type(e).__name__)\n"
        "os.kill(-1, signal.SIGKILL)  # everything it may signal: nothing but its own processes\n"
        "print('still here')\n"
    )
    r = run_python(code, limits=FAST)
    assert "KILLED" not in r.stdout and r.stdout.count("denied PermissionError") == 3
    assert r.stdout.endswith("still here\n") and r.status == "ok"
    assert run_python("print('launcher fine')", limits=FAST).status == "ok"


def test_huge_output_is_capped():
    limits = Limits(timeout_s=5, max_output_bytes=50_000)
    r = run_python("while True:\n    print('x' * 1000)", limits=limits)
    assert r.status == "output_limit" and r.truncated
    assert 0 < len(r.stdout) + len(r.stderr) <= limits.max_output_bytes
    assert r.duration_s < 3


def test_environment_has_no_secrets(monkeypatch):
    monkeypatch.setenv("MINICODER_SECRET", "hunter2")
    monkeypatch.setenv("PYTHONPATH", "/somewhere/secret")
    code = (
        "import os\n"
        "print(sorted(os.environ))\n"
        f"for pid in (os.getppid(), {os.getpid()}):\n"
        "    try:\n"
        "        print(open(f'/proc/{pid}/environ', 'rb').read())\n"
        "    except OSError as e:\n"
        "        print('denied', type(e).__name__)\n"
    )
    r = run_python(code, limits=FAST)
    assert r.status == "ok"
    assert "hunter2" not in r.stdout and "MINICODER_SECRET" not in r.stdout and "/somewhere" not in r.stdout
    env = eval(r.stdout.splitlines()[0])
    assert "PYTHONPATH" not in env and "HOME" in env and "PATH" in env


# ---------------------------------------------------------------------------------------------- sessions


def test_session_keeps_state_and_survives_errors():
    with PersistentSession(limits=FAST) as session:
        assert session.run("x = 41").status == "ok"
        assert session.run("print(x + 1)").stdout == "42\n"
        failed = session.run("1 / 0")
        assert failed.status == "error" and "ZeroDivisionError" in failed.stderr and "<cell" in failed.stderr
        assert session.run("print(x)").stdout == "41\n"  # an exception does not lose the state
        assert session.run("print(input())", stdin="typed\n").stdout == "typed\n"
        assert session.run("import sys\nsys.exit(4)").returncode == 4
        assert session.run("print(x)").stdout == "41\n"


def test_session_timeout_restarts_the_worker():
    setup = "def derivative(f, x, h=1e-5):\n    return (f(x + h) - f(x - h)) / (2 * h)\n"
    with PersistentSession(limits=Limits(timeout_s=1, cpu_s=30), setup=setup) as session:
        session.run("x = 1")
        started = time.monotonic()
        r = session.run("while True:\n    pass")
        assert r.status == "timeout" and r.state_lost and "state is lost" in r.stderr
        assert time.monotonic() - started < 2.5
        assert stray_processes() == []
        after = session.run("print('x' in globals(), round(derivative(lambda t: t * t, 3.0), 3))")
        assert after.status == "ok" and not after.state_lost
        assert after.stdout == "False 6.0\n"  # fresh globals, but the setup (the tools) is back


def test_session_cpu_limit_keeps_state():
    with PersistentSession(limits=Limits(timeout_s=10, cpu_s=1)) as session:
        session.run("x = 'kept'")
        r = session.run("while True:\n    pass")
        assert r.status == "cpu" and not r.state_lost
        assert session.run("print(x)").stdout == "kept\n"


def test_session_output_flood_and_worker_exit():
    with PersistentSession(limits=Limits(timeout_s=5, max_output_bytes=10_000)) as session:
        flood = session.run("while True:\n    print('y' * 100)")
        assert flood.status == "output_limit" and flood.truncated and flood.state_lost
        assert session.run("print('back')").stdout == "back\n"
        died = session.run("import os\nos._exit(7)")
        assert died.returncode == 7 and died.state_lost
        assert session.run("print('again')").stdout == "again\n"
