"""The sandbox bootstrap: runs in the child interpreter before the untrusted code (see code.py)."""

# Bootstrap run by the sandbox interpreter. argv[1] is a JSON config; fd cfg["info_fd"] gets one
# JSON line saying which isolations took effect. With cfg["harness"] (sandbox_codec.py and
# harness.py, compiled) the code is not run as a program: the judge in harness.py loads it in a
# worker and runs the tests.
BOOT = r'''
import ctypes, json, os, resource, signal, sys
cfg = json.loads(sys.argv[1])
with open(cfg["prog"], encoding="utf-8") as f:
    src = f.read()
scratch = cfg["scratch"]
libc = ctypes.CDLL(None, use_errno=True)
NEWNS, NEWPID, NEWNET, NEWUSER = 0x00020000, 0x20000000, 0x40000000, 0x10000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_BIND, MS_REC, MS_PRIVATE = 4096, 16384, 1 << 18
iso = {"root": os.geteuid() == 0, "net": False, "mount": False, "pid": False, "uid": False,
       "nproc": False, "fs": False, "errors": []}

def mount(source, target, fstype, flags, data):
    enc = lambda s: None if s is None else s.encode()
    if libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), target)

def expose(path):
    # Make `path` searchable by "others": a closed ancestor (e.g. /root 700) gets a tmpfs that
    # holds only the next component, bind-mounted back from the real directory.
    cur = "/"
    for comp in [c for c in path.split("/") if c]:
        parent, cur = cur, os.path.join(cur, comp)
        if os.stat(parent).st_mode & 0o001:
            continue
        fd = os.open(cur, os.O_RDONLY)
        mount("tmpfs", parent, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=755")
        if os.path.isdir("/proc/self/fd/%d" % fd):
            os.mkdir(cur)
        else:
            open(cur, "w").close()
        mount("/proc/self/fd/%d" % fd, cur, None, MS_BIND | MS_REC, None)
        os.close(fd)

SYSTEM = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc")
PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}.get(os.uname().machine)

def minimal_root(sfd):
    # A new root holding only the system directories, the interpreter's (read-only), a few
    # devices, private /tmp and the scratch dir, so the code cannot read the user's data
    # (a dataset with the expected answers, say) even where it is world-readable.
    if PIVOT_ROOT is None:
        raise OSError("pivot_root: unknown syscall number on %s" % os.uname().machine)
    new = "/tmp/.fastdash-root"
    os.mkdir(new)
    mount("tmpfs", new, "tmpfs", MS_NOSUID | MS_NODEV, "size=%dm,mode=755" % cfg["tmpfs_mb"])
    done = []
    for p in sorted(set(SYSTEM) | set(cfg["expose"]), key=len):
        if any(p == d or p.startswith(d + "/") for d in done) or not os.path.lexists(p):
            continue
        if os.path.islink(p):  # /bin -> usr/bin
            os.makedirs(os.path.dirname(new + p), exist_ok=True)
            os.symlink(os.readlink(p), new + p)
            continue
        os.makedirs(new + p)
        mount(p, new + p, None, MS_BIND | MS_REC, None)
        try:
            mount(None, new + p, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID, None)
        except OSError:
            pass  # in a user namespace a locked mount may refuse; its files stay root's anyway
        done.append(p)
    os.makedirs(new + "/dev")
    for d in ("null", "zero", "full", "random", "urandom"):
        open(new + "/dev/" + d, "w").close()
        mount("/dev/" + d, new + "/dev/" + d, None, MS_BIND, None)
    for d in ("/tmp", "/var/tmp", "/dev/shm"):
        os.makedirs(new + d)
        mount("tmpfs", new + d, "tmpfs", MS_NOSUID | MS_NODEV, "size=%dm,mode=1777" % cfg["tmpfs_mb"])
    os.makedirs(new + scratch)
    mount("/proc/self/fd/%d" % sfd, new + scratch, None, MS_BIND, None)
    os.makedirs(new + "/proc")
    os.mkdir(new + "/.old")
    if libc.syscall(PIVOT_ROOT, new.encode(), (new + "/.old").encode()) != 0:
        raise OSError(ctypes.get_errno(), "pivot_root: " + os.strerror(ctypes.get_errno()))
    os.chdir("/")
    if libc.umount2(b"/.old", 2) != 0:  # MNT_DETACH
        raise OSError(ctypes.get_errno(), "umount old root")
    os.rmdir("/.old")

if cfg["isolate"]:
    if iso["root"]:
        for flag, key in ((NEWNET, "net"), (NEWNS, "mount"), (NEWPID, "pid")):
            iso[key] = libc.unshare(flag) == 0
    elif libc.unshare(NEWUSER | NEWNET | NEWNS | NEWPID) == 0:
        uid, gid = cfg["outer_uid"], cfg["outer_gid"]
        for name, text in (("setgroups", "deny"), ("uid_map", "0 %d 1" % uid), ("gid_map", "0 %d 1" % gid)):
            with open("/proc/self/" + name, "w") as f:
                f.write(text)
        iso.update(net=True, mount=True, pid=True)
    if iso["mount"]:
        try:
            mount(None, "/", None, MS_REC | MS_PRIVATE, None)
            sfd = os.open(scratch, os.O_RDONLY)
            for d in ("/tmp", "/var/tmp", "/dev/shm"):
                if os.path.isdir(d):
                    mount("tmpfs", d, "tmpfs", MS_NOSUID | MS_NODEV, "size=%dm,mode=1777" % cfg["tmpfs_mb"])
            try:
                minimal_root(sfd)
                iso["fs"] = True
            except OSError as e:  # keep the host's tree, with the private /tmp and hidden /root
                iso["errors"].append("minimal root: %s" % e)
            os.makedirs(scratch, exist_ok=True)
            if not iso["fs"]:
                mount("/proc/self/fd/%d" % sfd, scratch, None, MS_BIND, None)
            os.close(sfd)
            if iso["root"] and not iso["fs"]:
                # a path under a now-hidden /tmp (a venv there, say) is gone: the code needs only the
                # stdlib, which lives under the base prefix
                cfg["expose"] = [p for p in cfg["expose"] if os.path.exists(p)]
                for p in cfg["expose"]:
                    expose(p)
        except OSError as e:
            iso["mount"] = False
            iso["errors"].append("mount: %s" % e)
    os.chdir(scratch)

def limits():
    mb = 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (cfg["memory_mb"] * mb, cfg["memory_mb"] * mb))
    resource.setrlimit(resource.RLIMIT_CPU, (cfg["cpu_s"], cfg["cpu_s"] + 1))
    resource.setrlimit(resource.RLIMIT_FSIZE, (cfg["fsize_bytes"], cfg["fsize_bytes"]))
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if iso["root"] and cfg["uid"] is not None:
        resource.setrlimit(resource.RLIMIT_NPROC, (cfg["max_procs"], cfg["max_procs"]))
        iso["nproc"] = True

def reachable(path):
    cur = "/"
    for comp in [c for c in path.split("/") if c]:
        if not os.stat(cur).st_mode & 0o001:
            return False
        cur = os.path.join(cur, comp)
    return True

def drop():
    if iso["root"] and cfg["uid"] is not None:
        os.setgroups([])
        os.setgid(cfg["gid"])
        os.setuid(cfg["uid"])
        iso["uid"] = True
    elif iso["pid"]:
        # root of a user namespace: drop every capability (CAP_SYS_PTRACE would let the code read
        # the judge's memory); header v3, empty effective/permitted/inheritable sets
        hdr, data = (ctypes.c_uint32 * 2)(0x20080522, 0), (ctypes.c_uint32 * 6)()
        if libc.capset(hdr, data) != 0:
            iso["errors"].append("capset: %s" % os.strerror(ctypes.get_errno()))
    libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS
    libc.prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0: no ptrace, /proc/<pid>/mem or fd of a sibling
    libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG (cleared by setuid, so after it)

def hook(event, args):
    if event in BLOCKED or (event.startswith("socket.") and BLOCK_SOCKETS):
        raise PermissionError("sandbox: %s is not allowed" % event)

def close_harness_fds():
    for key in ("tests_fd", "verdict_fd"):
        if cfg.get(key) is not None:
            os.close(cfg[key])

def wait_exit(pid):
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    os._exit(code if code >= 0 else 128 - code)

pid = os.fork()
if pid:
    close_harness_fds()  # only the judge holds the tests and the verdict pipe
    wait_exit(pid)  # bootstrap (outside the pid namespace): relay the sandbox's exit status
# here: init of the new pid namespace (or a plain child without one)
try:
    if iso["pid"] and iso["mount"]:
        try:
            mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None)
        except OSError as e:
            iso["errors"].append("proc: %s" % e)
    if iso["root"] and cfg["uid"] is not None and not all(map(reachable, filter(os.path.exists, cfg["expose"]))):
        iso["errors"].append("interpreter not reachable by an unprivileged uid: kept root")
        cfg["uid"] = None
    limits()
    drop()
    os.write(cfg["info_fd"], (json.dumps(iso) + "\n").encode())
    os.close(cfg["info_fd"])
except BaseException as e:
    os.write(2, ("sandbox setup failed: %r\n" % (e,)).encode())
    os._exit(97)
pid = os.fork()  # keep init a bare reaper, so the code gets normal signal semantics
if pid:
    close_harness_fds()
    wait_exit(pid)
BLOCKED = set() if cfg["allow_subprocess"] else {
    "os.system", "os.exec", "os.posix_spawn", "os.spawn", "subprocess.Popen", "os.fork",
    "os.forkpty", "pty.spawn"}
BLOCK_SOCKETS = not iso["net"]
del libc
if cfg.get("harness"):  # the judge and its worker: see harness.py
    H = {"__name__": "fastdash_harness", "__builtins__": __builtins__}
    import marshal
    for code in cfg.pop("harness"):
        exec(marshal.loads(bytes.fromhex(code)), H)
    H["evaluate"](cfg, src, lambda: sys.addaudithook(hook))
sys.addaudithook(hook)
sys.argv = ["prog.py"]
sys.path.insert(0, scratch)
code = compile(src, "prog.py", "exec")
del src
exec(code, {"__name__": "__main__", "__builtins__": __builtins__})
'''
