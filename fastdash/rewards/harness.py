"""The test harness of the code sandbox: the tests judge values the completion cannot tamper with.

This file's source is also exec'd inside the sandbox (by ``sandbox_boot.BOOT``), so it uses only
the standard library. Two processes, forked from the sandbox's init:

  - the judge (``evaluate``, trusted): forks the worker *before* it reads the tests, so the tests
    and the run's nonce never exist in the worker's memory; it reads them from a file descriptor
    the worker closed (both are non-dumpable: no ptrace, no /proc/<pid>/mem or fd), runs each
    test in its own namespace with pristine builtins, counts them, and only after the last test
    writes ``{"nonce", "loaded", "total", "ran", "passed"}`` to a pipe the worker never held;
  - the worker (``_worker``, untrusted): runs the completion's code as module ``solution`` (so an
    ``if __name__ == "__main__":`` block does not run), then answers calls. The
    completion's functions are ``Remote`` proxies in the judge: arguments go to the worker and
    results come back as data (``encode``/``decode``: exact builtin types only, rebuilt as the
    judge's own objects), never as objects the worker made. So a value whose ``__eq__`` always
    says True, an ``int``/``str`` subclass, patched builtins, exit hooks, threads, signal handlers
    or a patched copy of this harness act only inside the worker, whose worst is to answer with
    a wrong value, exit or hang: the test then fails (or the run times out) and scores 0.

What the judge binds for the tests (names the completion defines, except builtins and dunders):
a module under its own name (``import math``) is the judge's import of it (standard library or
numpy only), an object of a common module (``from math import isclose``, ``_OBJ_OK``) the
judge's own object,
plain data its decoded value, anything else a ``Remote``. A ``Remote`` returned by a call (an
instance of the completion's class, say) can be passed back to the completion; it equals only
itself and has no truth value, so it never satisfies ``==`` or a bare ``assert``.

Not supported (such a test fails even for honest code): a completion function named like a
builtin (the tests see the builtin), passing a function the test defines to the completion, ``isinstance`` against the completion's classes, attributes of a completion
object named like a stdlib module. Not prevented: code that returns the visible test's answer
for its input, or reads expected values from a world-readable file (see code.py).
"""

import builtins
import importlib
import json
import os
import sys
import types

if __name__ != "fastdash_harness":  # in the sandbox BOOT exec'd sandbox_codec.py in here (and
    # importing the fastdash package there would cost ~0.3 s of start-up)
    from fastdash.rewards.sandbox_codec import decode, encode, encode_more

MAX_LINE = 64 * 1024 * 1024  # bytes of one message
_STD_OK = set(sys.stdlib_module_names) | {"numpy"}
# modules whose objects (functions, classes) the judge binds itself when the code imported them by
# name: the usual tools of a solution, none of which makes values that equal anything
# (unittest.mock.ANY and test.support.ALWAYS_EQ do, so "any stdlib object" would be a hole)
_OBJ_OK = {"builtins", "math", "cmath", "collections", "_collections", "itertools", "functools",
           "_functools", "operator", "_operator", "heapq", "_heapq", "bisect", "_bisect", "re",
           "string", "statistics", "decimal", "_decimal", "fractions", "random", "datetime",
           "copy", "array", "numpy"}


class RemoteError(Exception):
    """The sandboxed code raised something that is not a builtin ``Exception``, or died."""


# ---- the worker (untrusted): runs the completion, answers calls


def _worker_other(refs):
    def other(x, d):
        j = encode_more(x, other, d)
        if j is None:
            refs.append(x)
            j = ["ref", len(refs) - 1]
        return j

    return other


def _describe(ns, other):
    out = {}
    for name, v in list(ns.items()):
        if not isinstance(name, str) or name.startswith("__"):
            continue
        if isinstance(v, types.ModuleType):
            out[name] = ["mod", v.__name__]
            continue
        mod, qual = getattr(v, "__module__", None), getattr(v, "__qualname__", None)
        if isinstance(mod, str) and isinstance(qual, str) and mod.split(".")[0] in _OBJ_OK:
            try:
                if _resolve(mod, qual) is v:
                    out[name] = ["obj", mod, qual]
                    continue
            except Exception:
                pass
        try:
            out[name] = ["val", encode(v, _no_refs)]
        except Exception:
            out[name] = ["remote"]
    return out


def _no_refs(x, d):
    raise TypeError("cannot transfer a %s" % type(x).__name__)


def _resolve(mod, qual):
    obj = importlib.import_module(mod)
    for part in qual.split("."):
        obj = getattr(obj, part)
    return obj


def _error(e):
    return {"e": [type(e).__name__, str(e)[:2000]]}


def _worker(src, req_fd, resp_fd):
    rf, wf = os.fdopen(req_fd, "rb"), os.fdopen(resp_fd, "wb")
    refs = []
    other = _worker_other(refs)
    mod = types.ModuleType("solution")
    ns = mod.__dict__
    ns["__builtins__"] = builtins
    sys.modules["solution"] = mod
    sys.stdout.reconfigure(line_buffering=True)  # the judge SIGKILLs the worker when done

    def send(msg):
        wf.write(json.dumps(msg).encode() + b"\n")
        wf.flush()

    def ref(j):
        if j[0] == "name" and type(j[1]) is str:
            return ns[j[1]]
        if j[0] == "ref" and type(j[1]) is int:
            return refs[j[1]]
        raise ValueError("unknown reference")

    try:
        exec(compile(src, "solution.py", "exec"), ns)
        send({"names": _describe(ns, other)})
    except BaseException as e:  # SystemExit included: exiting while loading is a failure
        import traceback  # only here: its import costs start-up time

        traceback.print_exc(limit=5)
        send(_error(e))
        os._exit(1)
    while True:
        line = rf.readline()
        if not line:
            os._exit(0)
        try:
            req = json.loads(line)
            obj = ref(req["t"])
            if req["op"] == "getattr":
                send({"r": encode(getattr(obj, req["n"]), other)})
                continue
            args = [decode(a, ref) for a in req["a"]]
            kwargs = {k: decode(v, ref) for k, v in req["k"]}
            res = obj(*args, **kwargs)
            back = [encode(a, other) if type(a) in _MUTABLE else None for a in args]
            send({"r": encode(res, other), "w": back})
        except BaseException as e:
            send(_error(e))


_MUTABLE = (list, dict, set, bytearray)


# ---- the judge (trusted)


class Remote:
    """The judge's stand-in for an object that lives in the worker (see the module docstring)."""

    __slots__ = ("_conn", "_key", "_attrs")

    def __init__(self, conn, key, attrs=True):
        self._conn, self._key, self._attrs = conn, key, attrs

    def __call__(self, *args, **kwargs):
        return self._conn.call(self, args, kwargs)

    def __getattr__(self, name):
        if name.startswith("__") or not self._attrs:
            raise AttributeError(name)
        return self._conn.request({"op": "getattr", "t": self._key, "n": name})

    def __bool__(self):
        raise TypeError("a value the sandboxed code returned that the judge cannot inspect "
                        "has no truth value")

    def __repr__(self):
        return "<sandboxed %s>" % (self._key,)


class Conn:
    def __init__(self, req_fd, resp_fd):
        self.w, self.r = os.fdopen(req_fd, "wb"), os.fdopen(resp_fd, "rb")

    def recv(self):
        line = self.r.readline(MAX_LINE)
        if not line.endswith(b"\n"):
            raise RemoteError("the sandboxed code exited or sent a malformed message")
        return json.loads(line)

    def request(self, msg):
        self.w.write(json.dumps(msg).encode() + b"\n")
        self.w.flush()
        return self.result(self.recv())

    def result(self, resp):
        if "e" in resp:
            name, text = str(resp["e"][0]), str(resp["e"][1])
            cls = getattr(builtins, name, None)
            if isinstance(cls, type) and issubclass(cls, Exception) and cls is not StopIteration:
                raise cls(text)
            raise RemoteError("%s: %s" % (name, text))
        return decode(resp["r"], self.remote)

    def remote(self, j):
        if j[0] == "ref" and type(j[1]) is int:
            return Remote(self, ["ref", j[1]])
        raise ValueError("malformed reference from the sandbox")

    def call(self, target, args, kwargs):
        other = self.arg_ref
        msg = {"op": "call", "t": target._key, "a": [encode(a, other) for a in args],
               "k": [[str(k), encode(v, other)] for k, v in kwargs.items()]}
        self.w.write(json.dumps(msg).encode() + b"\n")
        self.w.flush()
        resp = self.recv()
        res = self.result(resp)
        for a, new in zip(args, resp.get("w") or ()):
            if new is not None and type(a) in _MUTABLE:
                _write_back(a, decode(new, self.remote))
        return res

    @classmethod
    def arg_ref(cls, x, d):
        j = x._key if type(x) is Remote else encode_more(x, cls.arg_ref, d)
        if j is None:
            raise TypeError("cannot pass a %s to the sandboxed code" % type(x).__name__)
        return j


def _write_back(a, new):
    """The worker may mutate an argument in place (Python semantics); mirror that."""
    if type(new) is not type(a):
        return
    if type(a) in (list, bytearray):
        a[:] = new
    else:
        a.clear()
        a.update(new)


def _bind(names, conn):
    ns = {"__name__": "__main__", "__builtins__": builtins}
    for name, d in names.items():
        if not (type(name) is str and name.isidentifier()) or name.startswith("__") \
                or hasattr(builtins, name) or type(d) is not list or not d:
            continue
        try:
            if d[0] == "mod" and name in sys.stdlib_module_names:
                ns[name] = importlib.import_module(name)
            elif d[0] == "mod" and str(d[1]).split(".")[0] in _STD_OK:
                ns[name] = importlib.import_module(str(d[1]))
            elif d[0] == "obj" and str(d[1]).split(".")[0] in _OBJ_OK:
                ns[name] = _resolve(str(d[1]), str(d[2]))
            elif d[0] == "val":
                ns[name] = decode(d[1], _no_refs)
            else:  # a function named like a module is callable, but is no module (math.isclose)
                ns[name] = Remote(conn, ["name", name], attrs=name not in sys.stdlib_module_names)
        except Exception:
            continue
    return ns


def evaluate(cfg, src, install_hook):
    """The judge: see the module docstring. Never returns."""
    req_r, req_w = os.pipe()
    resp_r, resp_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        for fd in (cfg["tests_fd"], cfg["verdict_fd"], req_w, resp_r):
            os.close(fd)
        install_hook()
        sys.path.insert(0, cfg["scratch"])
        _worker(src, req_r, resp_w)
        os._exit(1)
    os.close(req_r)
    os.close(resp_w)
    install_hook()
    verdict = {"nonce": None, "loaded": False, "total": None, "ran": 0, "passed": 0}
    try:
        size = os.fstat(cfg["tests_fd"]).st_size
        job = json.loads(os.pread(cfg["tests_fd"], size, 0).decode("utf-8"))
        os.close(cfg["tests_fd"])
        tests = job["tests"]
        verdict.update(nonce=job["nonce"], total=len(tests))
        conn = Conn(req_w, resp_r)
        first = conn.recv()
        if "names" not in first:
            raise RemoteError("the code failed to load: %s" % (first.get("e"),))
        ns = _bind(first["names"], conn)
        verdict["loaded"] = True
        for i, test in enumerate(tests):
            verdict["ran"] += 1
            exec(compile(test, "<test %d>" % i, "exec"), ns)
            verdict["passed"] += 1
    except BaseException:
        import traceback

        what = "test %d" % verdict["ran"] if verdict["loaded"] else "loading the code"
        sys.stderr.write("%s failed:\n%s" % (what, traceback.format_exc(limit=4)))
    try:
        os.kill(pid, 9)
    except OSError:
        pass
    os.write(cfg["verdict_fd"], (json.dumps(verdict) + "\n").encode())
    os._exit(0)
