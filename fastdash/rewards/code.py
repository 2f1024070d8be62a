"""Code rewards: run a completion's code against its tests in a sandboxed subprocess.

The reward is pass/fail, as the paper's MBPP+ reward: 1.0 when the code loads and every test ran
and passed, inside the limits, else 0.0; a partial-credit fraction is deliberately not offered.
The harness decides, not the exit status (which a ``sys.exit(0)`` before the tests would forge):
a trusted judge process runs the tests in order and sees the code's results only as plain values
from a separate worker process (``harness.py``), and the run passes only when the judge's
verdict, written after the last test to a pipe the code never holds, carries this run's random
nonce and counts every test as run and passed. Exits, kills, hangs, exceptions, forged output
and values that compare equal to anything all fail (tests/test_code_reward_gaming.py).

Each run (``run_sandboxed``):
  - a fresh scratch directory (``tempfile.mkdtemp``), deleted afterwards; the program is written
    there as ``prog.py`` and is the working directory;
  - ``python -I -B`` (isolated mode: no PYTHON* env, no user site) with a minimal environment;
  - a bootstrap (``_BOOT``) that, before running the code:
      * as root: ``unshare(CLONE_NEWNET | CLONE_NEWNS | CLONE_NEWPID)`` via libc. New network
        namespace = no interfaces but a down loopback, so every connect fails (also 127.0.0.1).
        A minimal root (``pivot_root`` into a tmpfs, ``iso["fs"]``): only /usr, /etc, /bin,
        /lib*, the interpreter's directories (read-only), /dev/null & co, private tmpfs /tmp,
        /var/tmp and /dev/shm and the scratch dir (at its own path), so the code cannot read
        the user's files (a dataset with the expected answers), and writes vanish with the
        sandbox. Where pivot_root fails: the host's tree with the private tmpfs dirs, and closed
        ancestors of the interpreter (e.g. /root, mode 700, under a pyenv install) replaced by a
        tmpfs that exposes only the interpreter's directory. A new pid
        namespace (plus a fresh /proc): when the sandbox's init exits, the kernel kills every
        process left in it, whatever setsid() or double forks the code did;
      * not root: tries the same in a new user namespace; if that is refused, runs without it;
      * rlimits: RLIMIT_AS (memory_mb), RLIMIT_CPU, RLIMIT_FSIZE (file writes), RLIMIT_NOFILE,
        RLIMIT_CORE = 0 and, as root, RLIMIT_NPROC (max_procs) against fork bombs;
      * as root: drops to an unprivileged uid/gid unique to this run (``_sandbox_uid``), so the
        code cannot write root's files, signal other sandboxes, and NPROC counts only this run;
        PR_SET_NO_NEW_PRIVS blocks setuid binaries; PR_SET_PDEATHSIG ties it to the bootstrap;
      * an audit hook that makes ``os.system``, ``subprocess``, ``os.exec*``, ``os.spawn*``,
        ``posix_spawn`` and ``os.fork`` raise (unless ``allow_subprocess``), and socket creation
        raise when no network namespace could be made (best effort: ctypes can bypass a hook);
  - with tests, the judge and the worker (``harness.py``) non-dumpable (and, in a user
    namespace, without capabilities), so the code cannot ptrace the judge or open its
    /proc/<pid>/mem or fd;
  - a wall-clock timeout that SIGKILLs the whole process group (and so the pid namespace);
  - stdout+stderr read through a pipe up to ``max_output_bytes``; past it the run is killed and
    scores 0, so a flood of output never stalls the trainer.

What is NOT contained: reads of world-readable files under the system and interpreter
directories (and, without the minimal root, anywhere: the code runs with "other" permissions);
without root (and without user namespaces) the code runs as the calling user, so it can write
wherever that user can, and only the audit hook stands between it and the network; without a pid
namespace it can also reach the trainer's process, so the judge's verdict is only as safe as
the user's other processes. On this project's machines (root, util-linux present, namespaces
permitted) every isolation is active; ``sandbox_capabilities()`` reports which are.
"""

from __future__ import annotations

import json
import logging
import marshal
import os
import re
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from fastdash.rewards import harness as _harness
from fastdash.rewards import sandbox_codec as _codec
from fastdash.rewards.sandbox_boot import BOOT as _BOOT

logger = logging.getLogger("fastdash")


_FENCE_RE = re.compile(r"```(?:python|py|python3)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)
_UID_BASE = 1_000_000  # sandbox uids: _UID_BASE + pid * 64 + slot, unique among live runs
_MAX_SLOTS = 64
_slots = threading.Semaphore(_MAX_SLOTS)
_slot_lock = threading.Lock()
_free_slots = list(range(_MAX_SLOTS))
_caps: dict | None = None
# exec'd inside the sandbox, which may not see the package; compiled once here (compiling it
# in every sandbox took tens of ms), marshalled for the same interpreter
_HARNESS_CODE = []
for _m in (_codec, _harness):
    with open(_m.__file__, encoding="utf-8") as _f:
        _code = compile(_f.read(), os.path.basename(_m.__file__), "exec")
    _HARNESS_CODE.append(marshal.dumps(_code).hex())
_caps_logged = False


@dataclass
class SandboxResult:
    passed: bool  # with tests: the judge's verdict (see run_sandboxed); else exit status 0
    reason: str  # "ok", "failed", "timeout", "output_limit", "setup_failed"
    returncode: int | None
    output: str  # stdout + stderr, at most max_output_bytes
    elapsed_s: float
    isolation: dict = field(default_factory=dict)
    verdict: dict = field(default_factory=dict)  # the judge's counts (tests runs only)


def extract_code(completion: str) -> str:
    """The first fenced ```python block of a completion, else the raw text."""
    m = _FENCE_RE.search(completion or "")
    return m.group(1) if m else (completion or "")


def _interpreter_paths() -> list[str]:
    paths = {os.path.realpath(sys.executable), os.path.realpath(sys.base_prefix),
             os.path.realpath(sys.prefix)}
    return sorted(os.path.dirname(p) if os.path.isfile(p) else p for p in paths)


def run_sandboxed(
    program: str,
    *,
    tests: list[str] | None = None,
    timeout_s: float = 5.0,
    memory_mb: int = 512,
    max_output_bytes: int = 1_000_000,
    max_file_bytes: int = 16 * 1024 * 1024,
    max_procs: int = 16,
    allow_subprocess: bool = False,
    isolate: bool = True,
) -> SandboxResult:
    """Run ``program`` (Python source) in the sandbox described in this module's docstring.

    Without ``tests`` it passes on exit status 0. With ``tests`` the program is the code under
    test and the harness decides (``harness.py``): it passes only when the judge's verdict
    carries this run's nonce and says the code loaded and every test ran and passed.
    """
    t0 = time.monotonic()
    scratch = tempfile.mkdtemp(prefix="fastdash-sbx-")
    info_r, info_w = os.pipe()
    verdict_r = verdict_w = -1
    job = None
    slot = None
    proc = None
    try:
        prog = os.path.join(scratch, "prog.py")
        with open(prog, "w", encoding="utf-8") as f:
            f.write(program)
        uid = gid = None
        if os.geteuid() == 0:
            _slots.acquire()
            with _slot_lock:
                slot = _free_slots.pop()
            uid = gid = _UID_BASE + (os.getpid() % 4_000_000) * _MAX_SLOTS + slot
            os.chown(scratch, uid, gid)
        cfg = {
            "prog": prog, "scratch": scratch, "isolate": isolate, "info_fd": info_w,
            "memory_mb": int(memory_mb), "cpu_s": int(timeout_s) + 1,
            "fsize_bytes": int(max_file_bytes), "max_procs": int(max_procs),
            "tmpfs_mb": 64, "uid": uid, "gid": gid, "outer_uid": os.getuid(),
            "outer_gid": os.getgid(), "allow_subprocess": allow_subprocess,
            "expose": _interpreter_paths(),
        }
        fds = [info_w]
        if tests is not None:
            # the tests and the nonce reach only the judge: an unlinked file it reads after
            # forking the worker (which closes it first); the verdict pipe only the judge holds
            nonce = secrets.token_hex(16)
            job = tempfile.TemporaryFile()
            job.write(json.dumps({"nonce": nonce, "tests": list(tests)}).encode("utf-8"))
            job.flush()
            verdict_r, verdict_w = os.pipe()
            cfg.update(harness=_HARNESS_CODE, tests_fd=job.fileno(), verdict_fd=verdict_w)
            fds += [job.fileno(), verdict_w]
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": scratch,
               "TMPDIR": scratch, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
               "MKL_NUM_THREADS": "1", "PYTHONIOENCODING": "utf-8"}
        proc = subprocess.Popen(
            [sys.executable, "-I", "-B", "-c", _BOOT, json.dumps(cfg)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            cwd=scratch, env=env, start_new_session=True, pass_fds=tuple(fds),
        )
        os.close(info_w)
        info_w = -1
        if job is not None:
            job.close()
            job = None
            os.close(verdict_w)
            verdict_w = -1
        out, reason = _read_capped(proc, t0 + timeout_s, max_output_bytes)
        if reason is not None:
            _kill_group(proc)
        rc = proc.wait()
        iso = _read_info(info_r)
        verdict = _read_info(verdict_r) if verdict_r >= 0 else {}
        if reason is None:
            if rc == 97 and b"sandbox setup failed" in out:
                reason = "setup_failed"
                logger.warning("sandbox setup failed: %s", out.decode(errors="replace")[-500:])
            elif tests is not None:  # the judge decides, not the exit status
                reason = "ok" if _verdict_ok(verdict, nonce, len(tests)) else "failed"
            else:
                reason = "ok" if rc == 0 else "failed"
        return SandboxResult(reason == "ok", reason, rc, out.decode("utf-8", errors="replace"),
                             time.monotonic() - t0, iso, verdict)
    finally:
        if proc is not None and proc.poll() is None:
            _kill_group(proc)
            proc.wait()
        for fd in (info_w, verdict_w, verdict_r):
            if fd >= 0:
                os.close(fd)
        if job is not None:
            job.close()
        os.close(info_r)
        shutil.rmtree(scratch, ignore_errors=True)
        if slot is not None:
            with _slot_lock:
                _free_slots.append(slot)
            _slots.release()


def _read_capped(proc: subprocess.Popen, deadline: float, cap: int) -> tuple[bytes, str | None]:
    """Read the child's output until EOF; stop at the deadline or past ``cap`` bytes."""
    chunks, n = [], 0
    fd = proc.stdout.fileno()
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return b"".join(chunks), "timeout"
            if not sel.select(timeout=left):
                continue
            data = os.read(fd, 65536)
            if not data:
                return b"".join(chunks), None
            n += len(data)
            if n > cap:
                chunks.append(data[: max(0, cap - (n - len(data)))])
                return b"".join(chunks), "output_limit"
            chunks.append(data)


def _verdict_ok(v: dict, nonce: str, n_tests: int) -> bool:
    """The judge wrote this run's nonce after loading the code and running every test."""
    return (v.get("nonce") == nonce and v.get("loaded") is True
            and v.get("total") == v.get("ran") == v.get("passed") == n_tests)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the bootstrap leads its own session / group
    except (ProcessLookupError, PermissionError):
        pass


def _read_info(fd: int) -> dict:
    try:
        os.set_blocking(fd, False)
        data = os.read(fd, 65536)
        return json.loads(data.decode().splitlines()[0]) if data else {}
    except (OSError, ValueError, IndexError):
        return {}


def sandbox_capabilities() -> dict:
    """Which isolations take effect on this machine (runs one trivial sandbox; cached)."""
    global _caps
    if _caps is None:
        _caps = run_sandboxed("pass", timeout_s=10.0).isolation
    return _caps


def _log_caps_once(iso: dict) -> None:
    global _caps_logged
    if not _caps_logged and iso:
        _caps_logged = True
        missing = [k for k in ("net", "mount", "fs", "pid", "uid", "nproc") if not iso.get(k)]
        if missing:
            logger.warning("code sandbox: running without %s isolation (%s)", ", ".join(missing),
                           "; ".join(iso.get("errors", [])) or "not permitted here")
        else:
            logger.info("code sandbox: net, mount, pid namespaces, minimal root, unprivileged uid "
                        "and rlimits active")


def run_code_tests(
    code: str,
    tests: list[str] | str,
    *,
    timeout_s: float = 5.0,
    memory_mb: int = 512,
    max_output_bytes: int = 1_000_000,
    **sandbox_kwargs,
) -> float:
    """1.0 if ``code`` loads and every one of ``tests`` runs and passes in the sandbox, else 0.0.

    The harness judges (``harness.py``): each test (statements, e.g. ``assert f(1) == 2``, an
    import, an MBPP+ test program) runs in order in the judge, which sees the code's results only
    as plain values; an exit, a hang or an exception counts as failed. Pass/fail, not a fraction
    of tests (the paper's MBPP+ reward is pass/fail).
    """
    if isinstance(tests, str):
        tests = [tests]
    res = run_sandboxed(code, tests=list(tests), timeout_s=timeout_s, memory_mb=memory_mb,
                        max_output_bytes=max_output_bytes, **sandbox_kwargs)
    _log_caps_once(res.isolation)
    return 1.0 if res.passed else 0.0


def code_reward(completion: str, answer: str = "", *, tests=None, **row) -> float:
    """Registry reward for code tasks: extract the code, run it against ``tests`` (the row's)."""
    if not tests:
        raise ValueError("code reward: the row has no 'tests'")
    return run_code_tests(extract_code(completion), tests)


def code_reward_batch(
    completions: list[str], tests_lists: list, *, max_workers: int | None = None, **kwargs
) -> list[float]:
    """``run_code_tests`` for many completions in parallel (threads waiting on subprocesses)."""
    if len(completions) != len(tests_lists):
        raise ValueError(f"code_reward_batch: {len(completions)} completions but "
                         f"{len(tests_lists)} test lists")
    workers = max_workers or min(_MAX_SLOTS // 2, (os.cpu_count() or 2) * 2)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futs = [pool.submit(run_code_tests, extract_code(c), t, **kwargs)
                for c, t in zip(completions, tests_lists)]
        return [f.result() for f in futs]


def _code_batch(completions: list[str], rows: list[dict]) -> list[float]:
    for r in rows:
        if not r.get("tests"):
            raise ValueError("code reward: a row has no 'tests'")
    return code_reward_batch(completions, [r["tests"] for r in rows])


code_reward.batch = _code_batch  # used by score_completions
