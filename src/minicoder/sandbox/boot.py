"""Startup code of the sandboxed interpreter: runs as the run's uid, before the program, inside its namespaces.

Not imported: the host reads this file and passes its text on the command line (`python -I -S -c BOOT_COMMAND
SOURCE CONFIG LAUNCH`), compiled under the name `<minicoder-sandbox>` so tracebacks can leave its frames out and the
program's `__main__` stays clean (everything lives in one function, deleted before the program runs). It adds the
site directories, installs the socket guard where there is no network namespace, then runs `main.py` as a script,
or, in a PersistentSession worker, runs cells sent as length-prefixed JSON on two private pipes.
"""

BOOT_FILE = "<minicoder-sandbox>"


def _minicoder_boot():
    import json
    import sys

    cfg, launch = json.loads(sys.argv[2]), json.loads(sys.argv[3])
    cwd, network = launch["cwd"], launch["network"]
    import site

    for path in cfg["site_dirs"]:
        site.addsitedir(path)  # also runs the .pth files (editable installs)
    site.setquit()
    site.setcopyright()
    site.sethelper()  # exit(), quit(), help() as usual
    sys.path[0:0] = [cwd] + cfg["paths"]  # -I leaves the working directory off sys.path
    if network == "socket_guard":
        import socket

        real_init = socket.socket.__init__

        def guarded_init(self, family=-1, type=-1, proto=-1, fileno=None):
            if fileno is None:  # wrapping an existing fd (socketpair) is harmless
                raise PermissionError(13, "network access is disabled in this sandbox")
            real_init(self, family, type, proto, fileno)

        socket.socket.__init__ = guarded_init

    def print_exception(exc):
        import traceback

        try:
            report = traceback.TracebackException(type(exc), exc, exc.__traceback__)
            frames = list(report.stack)
            if frames and frames[0].filename == "<string>":
                del frames[0]  # the -c line
            frames = [f for f in frames if f.filename != "<minicoder-sandbox>"]  # this code
            report.stack = traceback.StackSummary.from_list(frames)
            print("".join(report.format()), end="", file=sys.stderr)
        except BaseException:  # e.g. no memory left to format it
            print(type(exc).__name__, file=sys.stderr)

    main = sys.modules["__main__"].__dict__
    for name in ("_minicoder_boot", "BOOT_FILE"):  # what compiling this file defined in __main__
        del main[name]
    main["__doc__"] = None
    if cfg["worker"] is None:
        path = cwd + "/main.py"
        sys.argv = [path]
        main["__file__"] = path
        with open(path, encoding="utf-8") as f:
            code = compile(f.read(), path, "exec")
        try:
            exec(code, main)
        except SystemExit:
            raise
        except BaseException as exc:
            print_exception(exc)
            sys.exit(1)
        return

    import io
    import linecache
    import os
    import signal
    import struct

    req_fd, resp_fd = cfg["worker"]
    sys.argv = [""]

    class CPUTimeExceeded(BaseException):  # not an Exception: `except Exception` must not swallow it
        pass

    CPUTimeExceeded.__qualname__ = "CPUTimeExceeded"  # tracebacks show this, not boot internals

    def on_cpu_timer(signum, frame):
        raise CPUTimeExceeded("CPU time limit of %d s exceeded" % cfg["cpu_s"])

    signal.signal(signal.SIGPROF, on_cpu_timer)

    def read_exact(n):
        data = b""
        while len(data) < n:
            chunk = os.read(req_fd, n - len(data))
            if not chunk:
                raise SystemExit(0)  # host closed the session
            data += chunk
        return data

    cell = 0
    while True:
        request = json.loads(read_exact(struct.unpack(">I", read_exact(4))[0]))
        cell += 1
        filename = "<cell %d>" % cell
        source = request["code"]
        linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)  # tracebacks
        sys.stdin = io.StringIO(request["stdin"])
        # Per-call CPU budget: a profiling timer counts this process's CPU time from now (RLIMIT_CPU would
        # count the worker's whole life, in whole seconds). Raising in the worker keeps its state.
        signal.setitimer(signal.ITIMER_PROF, cfg["cpu_s"])
        status, returncode = "ok", 0
        try:
            exec(compile(source, filename, "exec"), main)
        except SystemExit as exc:
            if exc.code is None or isinstance(exc.code, int):
                returncode = exc.code or 0
            else:
                print(exc.code, file=sys.stderr)
                returncode = 1
            status = "ok" if returncode == 0 else "error"
        except BaseException as exc:
            print_exception(exc)
            returncode = 1
            status = {MemoryError: "memory", CPUTimeExceeded: "cpu"}.get(type(exc), "error")
        finally:
            signal.setitimer(signal.ITIMER_PROF, 0)
        for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
            try:
                stream.flush()
            except Exception:
                pass
        reply = json.dumps({"status": status, "returncode": returncode}).encode()
        os.write(resp_fd, struct.pack(">I", len(reply)) + reply)


if __name__ == "__main__":
    _minicoder_boot()
