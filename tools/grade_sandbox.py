"""Where tools/grade.py runs a student's code, and how the grader talks to it; not for direct use.

The grader never runs a student's code in its own process. For each student and exercise it starts
a *worker*: a fresh Python process that imports the student's spliced `train.py` and does nothing
else. The grading process (tools/grade_plugin.py, inside pytest) runs the tests with the reference
`train.py`; only the functions that hold the exercise's solution region are replaced by stubs that
send their arguments to the worker and return what comes back. Every comparison a test makes runs
in the grading process, on values it decoded itself, so whatever the student's code does in its
own process (write a report, exit early, patch pytest) cannot turn a failed test into a pass.

Trust runs one way:

* grader -> worker: pickles (the worker is the untrusted side; it may unpickle what it is sent);
* worker -> grader: plain data only -- None, booleans, numbers, strings, bytes, lists, tuples,
  dicts, sets, numpy arrays and torch tensors of numeric dtypes -- as JSON plus raw bytes, which
  the grader decodes without running any code of the worker's choosing (never pickle). An object
  that "equals everything" cannot come back; a gradient through a returned tensor is asked of the
  worker in the same way (`torch.autograd.Function`).

On Linux with bubblewrap (`bwrap`) the worker runs in a sandbox: no network, its own PID, IPC and
UTS namespaces, a read-only view of the Python installation and of its copy of the folder and
nothing else of the machine (not the repository, not TEACHER.md, not other submissions), a small
tmpfs for /tmp and its scratch folder, and when the grader runs as root, an unprivileged uid.
Everywhere it has limits on CPU time, address space (memory), processes, file size and open
files, and a wall-clock budget per exercise; when the budget runs out the whole sandbox is killed.
Without bubblewrap the worker is still a separate, limited process, but it can read and write
what the teacher can: `isolation()` says so in one line.

The worker half is this same file run as `python grade_sandbox.py worker CONFIG` (see
`worker_main`); it imports nothing but the standard library before the student's module.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import queue
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
import types
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve()
MAX_REPLY = 256 << 20  # bytes: a worker that sends more is stopped
IMPORT_SECONDS = 120.0  # the least a worker gets to import train.py and its libraries
NUMPY_KINDS = set("biufcUS")  # numpy dtype kinds that hold no Python objects
TORCH_DTYPES = {"float16": "<f2", "bfloat16": "<i2", "float32": "<f4", "float64": "<f8",
                "complex64": "<c8", "complex128": "<c16", "int8": "i1", "int16": "<i2",
                "int32": "<i4", "int64": "<i8", "uint8": "u1", "bool": "?"}


@dataclass
class Limits:
    """What one worker may use. `timeout` is wall-clock seconds for one exercise of one student."""

    timeout: float = 300.0
    memory_mb: int = 2048  # address space (RLIMIT_AS): torch maps ~600 MB; the folders need <1 GB
    processes: int = 64  # processes and threads (RLIMIT_NPROC), on top of what the uid runs
    file_mb: int = 64  # largest file it may write (RLIMIT_FSIZE); also the size of its tmpfs
    open_files: int = 256


class GradingError(Exception):
    """A test failed because of how the student's code behaved as a process (not a wrong value).

    The message is the gradebook's reason. `whole` marks the failures that fail the exercise as a
    whole (a file that does not import, a timeout)."""

    whole = False


class StudentImportError(GradingError):
    whole = True


class GradingTimeout(GradingError):
    whole = True


class StudentCodeError(Exception):
    """An exception of the student's code whose type the grader does not rebuild."""


# ------------------------------------------------------------------------------------------------
# framing: an 8-byte length, then the message
# ------------------------------------------------------------------------------------------------
def _read_exact(fd: int, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        b = os.read(fd, min(n - got, 1 << 20))
        if not b:
            raise EOFError
        chunks.append(b)
        got += len(b)
    return b"".join(chunks)


def read_message(fd: int, limit: int = MAX_REPLY) -> bytes:
    n = int.from_bytes(_read_exact(fd, 8), "big")
    if n > limit:
        raise ValueError(f"a message of {n} bytes (the limit is {limit})")
    return _read_exact(fd, n)


def write_message(fd: int, data: bytes, deadline: float | None = None) -> None:
    view = memoryview(len(data).to_bytes(8, "big") + data)
    while view:
        if os.name == "posix" and not os.get_blocking(fd):
            import select
            left = 3600.0 if deadline is None else deadline - time.monotonic()
            if left <= 0 or not select.select([], [fd], [], left)[1]:
                raise TimeoutError
        try:
            view = view[os.write(fd, view[:1 << 16]):]
        except BlockingIOError:
            continue


# ------------------------------------------------------------------------------------------------
# worker -> grader: plain data as JSON + raw buffers (encode runs in the worker, decode in the
# grader; decode builds only the types listed in the module docstring)
# ------------------------------------------------------------------------------------------------
def encode(obj) -> bytes:
    bufs: list[bytes] = []
    np, torch = sys.modules.get("numpy"), sys.modules.get("torch")

    def buf(b: bytes) -> int:
        bufs.append(bytes(b))
        return len(bufs) - 1

    def enc(x, depth=0):
        if depth > 64:
            raise TypeError("a value nested more than 64 levels deep")
        if x is None or type(x) in (bool, str):
            return x
        if np is not None and isinstance(x, np.generic):
            a = np.asarray(x)
            if a.dtype.kind not in NUMPY_KINDS:
                raise TypeError(f"a numpy scalar of dtype {a.dtype}")
            return {"~": "npscalar", "dtype": a.dtype.str, "b": buf(a.tobytes())}
        if isinstance(x, bool):
            return bool(x)
        if isinstance(x, int):
            return int(x)
        if isinstance(x, float):
            return float(x)
        if isinstance(x, str):
            return str(x)
        if isinstance(x, complex):
            return {"~": "complex", "v": [x.real, x.imag]}
        if isinstance(x, (bytes, bytearray)):
            return {"~": "bytes", "b": buf(x)}
        if isinstance(x, list):
            return [enc(v, depth + 1) for v in x]
        if torch is not None and isinstance(x, torch.Size):
            return {"~": "size", "v": [int(v) for v in x]}
        if isinstance(x, tuple):
            return {"~": "tuple", "v": [enc(v, depth + 1) for v in x]}
        if isinstance(x, dict):
            return {"~": "dict", "v": [[enc(k, depth + 1), enc(v, depth + 1)]
                                       for k, v in x.items()]}
        if isinstance(x, (set, frozenset)):
            return {"~": type(x).__name__ if type(x) in (set, frozenset) else "set",
                    "v": [enc(v, depth + 1) for v in x]}
        if np is not None and isinstance(x, np.ndarray):
            a = np.ascontiguousarray(x)
            if a.dtype.kind not in NUMPY_KINDS or a.dtype.fields is not None:
                raise TypeError(f"a numpy array of dtype {a.dtype}")
            return {"~": "ndarray", "dtype": a.dtype.str, "shape": list(a.shape),
                    "b": buf(a.tobytes())}
        if torch is not None and isinstance(x, torch.Tensor):
            t = x.detach().cpu().resolve_conj().resolve_neg().contiguous()
            name = str(t.dtype).removeprefix("torch.")
            if name not in TORCH_DTYPES:
                raise TypeError(f"a tensor of dtype {t.dtype}")
            raw = t.view(torch.int16) if name == "bfloat16" else t
            return {"~": "tensor", "dtype": name, "shape": list(t.shape),
                    "b": buf(raw.numpy().tobytes()), "rg": bool(x.requires_grad)}
        if torch is not None and isinstance(x, torch.dtype):
            return {"~": "dtype", "v": str(x).removeprefix("torch.")}
        raise TypeError(f"a {type(x).__qualname__} (only numbers, strings, lists, tuples, dicts, "
                        "numpy arrays and torch tensors come back)")

    body = enc(obj)
    header = json.dumps({"body": body, "bufs": [len(b) for b in bufs]}).encode()
    return len(header).to_bytes(4, "big") + header + b"".join(bufs)


class Decoded:
    """What `decode` read: the value and the tensors the worker said require grad."""

    def __init__(self, value, grad_tensors):
        self.value, self.grad_tensors = value, grad_tensors


def decode(msg: bytes) -> Decoded:
    """Read a worker's message. Raises ValueError on anything but the plain data of `encode`."""
    import numpy as np

    if len(msg) < 4:
        raise ValueError("a message shorter than its header")
    n = int.from_bytes(msg[:4], "big")
    header = json.loads(msg[4:4 + n].decode())
    if not isinstance(header, dict) or not isinstance(header.get("bufs"), list):
        raise ValueError("a message without its buffer table")
    bufs, at = [], 4 + n
    for size in header["bufs"]:
        if type(size) is not int or size < 0 or at + size > len(msg):
            raise ValueError("a buffer outside the message")
        bufs.append(msg[at:at + size])
        at += size
    grad_tensors = []

    def shape_of(v):
        if not isinstance(v, list) or len(v) > 32 or any(type(d) is not int or d < 0 for d in v):
            raise ValueError("a bad shape")
        count = 1
        for d in v:
            count *= d
        return tuple(v), count

    def array(dtype, shape, b):
        shape, count = shape_of(shape)
        raw = bufs[b] if type(b) is int and 0 <= b < len(bufs) else None
        if raw is None or count * dtype.itemsize != len(raw):
            raise ValueError("an array whose bytes do not match its shape")
        return np.frombuffer(raw, dtype=dtype).reshape(shape).copy()

    def np_dtype(s):
        if not isinstance(s, str) or len(s) > 16:
            raise ValueError("a bad dtype")
        dt = np.dtype(s)
        if dt.kind not in NUMPY_KINDS or dt.fields is not None or dt.subdtype is not None:
            raise ValueError(f"a refused dtype {s}")
        return dt

    def dec(x, depth=0):
        if depth > 100:
            raise ValueError("a value nested too deeply")
        if x is None or type(x) in (bool, int, float, str):
            return x
        if type(x) is list:
            return [dec(v, depth + 1) for v in x]
        if type(x) is not dict:
            raise ValueError("an unknown value")
        tag, v = x.get("~"), x.get("v")
        if tag in ("tuple", "set", "frozenset", "size"):
            if type(v) is not list:
                raise ValueError(f"a bad {tag}")
            items = [dec(e, depth + 1) for e in v]
            if tag == "size":
                import torch
                if any(type(e) is not int for e in items):
                    raise ValueError("a bad torch.Size")
                return torch.Size(items)
            return {"tuple": tuple, "set": set, "frozenset": frozenset}[tag](items)
        if tag == "dict":
            if type(v) is not list:
                raise ValueError("a bad dict")
            out = {}
            for pair in v:
                if type(pair) is not list or len(pair) != 2:
                    raise ValueError("a bad dict item")
                out[dec(pair[0], depth + 1)] = dec(pair[1], depth + 1)  # TypeError if unhashable
            return out
        if tag == "complex":
            if type(v) is not list or len(v) != 2 or any(type(e) not in (int, float) for e in v):
                raise ValueError("a bad complex")
            return complex(v[0], v[1])
        if tag == "bytes":
            b = x.get("b")
            if type(b) is not int or not 0 <= b < len(bufs):
                raise ValueError("a bad bytes")
            return bytes(bufs[b])
        if tag == "ndarray":
            return array(np_dtype(x.get("dtype")), x.get("shape"), x.get("b"))
        if tag == "npscalar":
            return array(np_dtype(x.get("dtype")), [], x.get("b"))[()]
        if tag == "tensor":
            import torch
            name = x.get("dtype")
            if name not in TORCH_DTYPES:
                raise ValueError("a refused tensor dtype")
            a = array(np.dtype(TORCH_DTYPES[name]), x.get("shape"), x.get("b"))
            t = torch.from_numpy(a)
            if name == "bfloat16":
                t = t.view(torch.bfloat16)
            if x.get("rg") is True and (t.is_floating_point() or t.is_complex()):
                grad_tensors.append(t)
            return t
        if tag == "dtype":
            import torch
            if v not in TORCH_DTYPES:
                raise ValueError("a refused dtype")
            return getattr(torch, v)
        raise ValueError("an unknown tag")

    try:
        return Decoded(dec(header.get("body")), grad_tensors)
    except (TypeError, RecursionError, OverflowError) as e:
        raise ValueError(str(e)) from None


# ------------------------------------------------------------------------------------------------
# grader -> worker: the arguments, with every tensor, array and random generator sent on the side,
# so the worker can send back what the call changed in them and ask for gradients
# ------------------------------------------------------------------------------------------------
def _kind(x, stays_here) -> str | None:
    np, torch = sys.modules.get("numpy"), sys.modules.get("torch")
    if torch is not None:
        if isinstance(x, torch.nn.Parameter):
            return "param"
        if isinstance(x, torch.Tensor):
            return "tensor"
        if isinstance(x, torch.Generator):
            return "tgen"
    if np is not None:
        if type(x) is np.ndarray:
            return "array"
        if isinstance(x, np.random.Generator):
            return "npgen"
    if isinstance(x, types.FunctionType) and stays_here(x):
        return "callback"
    return None


def pack(obj, stays_here=lambda f: False) -> tuple[list, list[str], bytes, list]:
    """(the objects sent on the side, their kinds, the pickle of obj, their values).

    A function for which stays_here(f) is true (a lambda or a helper of the tests, which the
    worker cannot import) is not sent: the worker gets a stub that calls it back here."""
    flat: list = []
    kinds: list[str] = []
    index: dict[int, int] = {}

    class Pickler(pickle.Pickler):
        def persistent_id(self, x):
            kind = _kind(x, stays_here)
            if kind is None:
                return None
            i = index.get(id(x))
            if i is None:
                i = index[id(x)] = len(flat)
                flat.append(x)
                kinds.append(kind)
            return i

    out = io.BytesIO()
    Pickler(out, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    values = []
    for x, kind in zip(flat, kinds):
        if kind in ("tensor", "param"):
            values.append((x.detach().cpu().clone(), bool(x.requires_grad)))
        elif kind == "array":
            values.append(x)
        elif kind == "tgen":
            values.append((x.get_state(), x.device.type))
        elif kind == "npgen":
            values.append((type(x.bit_generator).__name__, x.bit_generator.state))
        else:
            values.append(x.__qualname__)
    return flat, kinds, out.getvalue(), values


def global_state() -> dict:
    """The random states and torch settings a call should see (sent, and read back after)."""
    state = {"py_rng": random.getstate()}
    np, torch = sys.modules.get("numpy"), sys.modules.get("torch")
    if np is not None:
        state["np_rng"] = np.random.get_state()
    if torch is not None:
        state["torch_rng"] = torch.get_rng_state()
        state["dtype"] = str(torch.get_default_dtype()).removeprefix("torch.")
        state["grad"] = torch.is_grad_enabled()
    return state


def set_global_state(state: dict) -> None:
    """Set what `global_state` read; each part is checked by the library that takes it."""
    if "py_rng" in state:
        v = state["py_rng"]
        random.setstate((v[0], tuple(v[1]), v[2]))
    np, torch = sys.modules.get("numpy"), sys.modules.get("torch")
    if np is not None and "np_rng" in state:
        np.random.set_state(tuple(state["np_rng"]))
    if torch is not None and "torch_rng" in state:
        t = state["torch_rng"]
        if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8:
            raise ValueError("a bad torch random state")
        torch.set_rng_state(t)


def resolve_function(module, qualname: str) -> types.FunctionType:
    """The plain function `qualname` names in module: through classes, static/class methods,
    properties and decorators (`__wrapped__`), down to the function whose body holds the code."""
    obj = module
    for part in qualname.split("."):
        d = getattr(obj, "__dict__", {})
        obj = d[part] if part in d else getattr(obj, part)
    for _ in range(20):
        if isinstance(obj, (staticmethod, classmethod)):
            obj = obj.__func__
        elif isinstance(obj, property):
            obj = obj.fget
        elif hasattr(obj, "__wrapped__"):
            obj = obj.__wrapped__
        else:
            break
    if not isinstance(obj, types.FunctionType):
        raise TypeError(f"{qualname} is a {type(obj).__name__}, not a function")
    return obj


# ------------------------------------------------------------------------------------------------
# finding bubblewrap, and what the sandbox holds
# ------------------------------------------------------------------------------------------------
_ISOLATION: tuple[str | None, set, str] | None = None


def _inside(p: Path, base: Path) -> bool:
    return p == base or base in p.parents


def python_roots(hide: list[Path]) -> list[Path]:
    """The folders of the Python installation a worker needs to see (read-only): the prefixes
    and every sys.path entry, except entries inside `hide` (the repository, the submissions)
    that are not part of the installation (a virtual environment inside the repository is)."""
    prefixes = {Path(p).resolve() for p in (sys.base_prefix, sys.prefix, sys.exec_prefix)}
    found = []
    for p in [*prefixes, *(Path(s).resolve() for s in sys.path if s)]:
        if not p.exists():
            continue
        if p.is_file():  # a zip on sys.path
            p = p.parent
        if any(_inside(p, h) for h in hide) and not any(_inside(p, q) for q in prefixes):
            continue
        found.append(p)
    roots: list[Path] = []
    for r in sorted(set(found), key=lambda r: len(r.parts)):
        if not any(_inside(r, o) for o in roots):
            roots.append(r)
    return roots


def worker_path(hide: list[Path]) -> list[str]:
    """sys.path for a worker: this interpreter's, less the repository and the submissions."""
    roots = [*python_roots(hide), Path("/usr")]
    out = []
    for s in sys.path[1:]:
        p = Path(s).resolve() if s else None
        if p is not None and any(_inside(p, r) for r in roots) and str(p) not in out:
            out.append(str(p))
    return out


def _dirs_to(path: Path, made: set) -> list[str]:
    """`--dir` for each parent of path not made yet, world-readable (bwrap makes them 0700)."""
    args = []
    for parent in reversed(path.parents):
        if parent == Path("/") or _inside(parent, Path("/usr")) or str(parent) in made:
            continue
        made.add(str(parent))
        args += ["--perms", "0755", "--dir", str(parent)]
    return args


def bwrap_command(bwrap: str, features: set, hide: list[Path], binds: list[tuple[Path, str]],
                  tmpfs_bytes: int, env: dict, argv: list[str]) -> list[str]:
    """The bwrap command line: nothing shared with the machine but what is listed here."""
    args = [bwrap, "--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts",
            "--unshare-cgroup-try", "--die-with-parent", "--new-session", "--hostname", "sandbox"]
    if os.geteuid() != 0:
        args += ["--unshare-user"]
    args += ["--ro-bind", "/usr", "/usr"]
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        p = Path("/") / name
        if p.is_symlink():
            args += ["--symlink", os.readlink(p), str(p)]
        elif p.is_dir():
            args += ["--ro-bind", str(p), str(p)]
    args += ["--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache"]
    made = {"/tmp", "/scratch", "/scratch/papers", "/etc"}
    roots = python_roots(hide)
    for root in roots:
        if not _inside(root, Path("/usr")):
            args += _dirs_to(root, made) + ["--ro-bind", str(root), str(root)]
    for h in hide:  # the repository or the submissions, should they sit in a folder bound above
        if any(_inside(h, r) for r in [Path("/usr"), *roots]):
            args += ["--tmpfs", str(h)]
    args += ["--proc", "/proc", "--dev", "/dev"]
    for dest in ("/tmp", "/scratch"):  # small, writable by the worker
        args += (["--perms", "1777"] if "perms" in features else []) + \
            (["--size", str(tmpfs_bytes)] if "size" in features else []) + ["--tmpfs", dest]
    args += ["--dir", "/scratch/papers"]
    for src, dest in binds:
        args += _dirs_to(Path(dest), made) + ["--ro-bind", str(src), dest]
    args += ["--remount-ro", "/", "--chdir", "/scratch", "--clearenv"]
    for k, v in env.items():
        args += ["--setenv", k, v]
    return args + ["--", *argv]


def isolation(hide: list[Path] | None = None, known: list | None = None
              ) -> tuple[str | None, set, str]:
    """(path of a working bwrap or None, the bwrap features it takes, one line saying how
    grading is isolated). Found once per process, by starting this Python in a sandbox, or
    `known`: what another process found (grade.py tells its pytest process)."""
    global _ISOLATION
    if known is not None:
        _ISOLATION = (known[0], set(known[1]), known[2])
    if _ISOLATION is not None:
        return _ISOLATION
    linux = sys.platform.startswith("linux")
    bwrap = shutil.which("bwrap") if linux else None
    why = "bubblewrap (bwrap) is not installed" if linux else \
        f"the sandbox is for Linux only (this is {sys.platform})"
    if os.environ.get("GRADE_NO_SANDBOX"):
        bwrap, why = None, "GRADE_NO_SANDBOX is set"
    for features in ({"perms", "size"}, {"perms"}, set()) if bwrap else ():
        probe = bwrap_command(bwrap, features, hide or [], [], 1 << 20, {"PATH": "/usr/bin"},
                              [sys.executable, "-I", "-c", "pass"])
        try:
            r = subprocess.run(probe, capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as e:
            why = f"bwrap does not start here ({e})"
            break
        if r.returncode == 0:
            _ISOLATION = (bwrap, features, "student code runs in a bubblewrap sandbox")
            return _ISOLATION
        why = f"bwrap does not start here ({(r.stderr.strip() or 'no message')[:120]})"
    _ISOLATION = (None, set(), f"grading is NOT isolated: {why}; student code runs as you, "
                               "with only time, memory and process limits (install bubblewrap: "
                               "see the README)")
    return _ISOLATION


# ------------------------------------------------------------------------------------------------
# the grader's half: one worker for one student's copy of one exercise
# ------------------------------------------------------------------------------------------------
def _count_processes(uid: int) -> int:
    n = 0
    for d in Path("/proc").glob("[0-9]*"):
        try:
            if d.stat().st_uid == uid:
                n += 1
        except OSError:
            pass
    return n


def _remote_function():
    import torch

    class RemoteCall(torch.autograd.Function):
        """The student's function as one autograd node: its backward asks the worker."""

        @staticmethod
        def forward(ctx, worker, call_id, outputs, *inputs):
            ctx.worker, ctx.call_id = worker, call_id
            ctx.shapes = [(t.shape, t.dtype) for t in inputs]
            return tuple(outputs)

        @staticmethod
        def backward(ctx, *grads):
            got = ctx.worker.backward(ctx.call_id, grads, ctx.shapes)
            return (None, None, None, *got)

    return RemoteCall


_REMOTE = None


class Worker:
    """A student's spliced train.py in its own (sandboxed) process; `call` runs one function."""

    def __init__(self, *, module: str, folder: Path, work: Path, limits: Limits,
                 hide: list[Path], uid: int = 65534, where=None):
        """module: e.g. 'mico.train'; folder: the student's copy of the folder (its train.py
        spliced), which the worker sees read-only; work: a private folder for this worker."""
        self.module, self.folder, self.work, self.limits = module, folder, work, limits
        self.hide = hide
        self.where = where or (lambda line: f" (train.py, line {line})")
        self.bwrap, self.features, _ = isolation(hide)
        # Root is exempt from the process limit, and may read anything: in the sandbox the worker
        # drops to an unprivileged uid (outside it, it could not read the Python installation).
        root = os.name == "posix" and os.geteuid() == 0
        self.uid = uid if root and self.bwrap else None
        self.proc: subprocess.Popen | None = None
        self.deadline: float | None = None
        self.failure: GradingError | None = None  # once set, every call raises it
        self.ready = False
        self.calls = 0
        self._q: queue.Queue = queue.Queue()
        self._released: list[int] = []
        self._roots: list[Path] | None = None

    # -- life ------------------------------------------------------------------------------
    def start(self) -> None:
        package = self.module.split(".")[0]
        if self.bwrap:
            scratch, papers = Path("/scratch"), Path("/scratch/papers")
            tmp = Path("/tmp")
        else:
            scratch, papers, tmp = self.work / "scratch", self.folder.parent, self.work / "tmp"
            scratch.mkdir(exist_ok=True)
            tmp.mkdir(exist_ok=True)
        cfg = {"module": self.module, "package": package, "papers": str(papers),
               "cwd": str(scratch), "uid": self.uid, "path": worker_path(self.hide),
               "rlimits": {"RLIMIT_AS": self.limits.memory_mb << 20,
                           "RLIMIT_CPU": int(self.limits.timeout) + 10,
                           "RLIMIT_FSIZE": self.limits.file_mb << 20,
                           "RLIMIT_NOFILE": self.limits.open_files, "RLIMIT_CORE": 0}}
        if os.name == "posix":  # counted per uid: allow what that uid already runs, plus ours
            who = self.uid if self.uid is not None else os.getuid()
            cfg["rlimits"]["RLIMIT_NPROC"] = self.limits.processes + _count_processes(who)
        env = {"PATH": "/usr/bin:/bin", "HOME": str(scratch), "TMPDIR": str(tmp),
               "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
               "MKL_NUM_THREADS": "1", "MPLBACKEND": "Agg", "MPLCONFIGDIR": str(tmp),
               "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TQDM_DISABLE": "1",
               "PYTHONDONTWRITEBYTECODE": "1"}
        if self.bwrap:
            cmd = bwrap_command(
                self.bwrap, self.features, self.hide,
                binds=[(HERE, "/grader/grade_sandbox.py"),
                       (self.folder, f"/scratch/papers/{package}")],
                tmpfs_bytes=self.limits.file_mb << 20, env=env,
                argv=[sys.executable, "-I", "/grader/grade_sandbox.py", "worker",
                      json.dumps(cfg)])
            env = None
        else:
            cmd = [sys.executable, "-I", str(HERE), "worker", json.dumps(cfg)]
        self.log_path = self.work / "worker.log"
        with open(self.log_path, "wb") as log:
            self.started = time.monotonic()
            self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=log, env=env, cwd=self.work,
                                         start_new_session=(os.name == "posix"))
        if os.name == "posix":
            os.set_blocking(self.proc.stdin.fileno(), False)
        threading.Thread(target=self._read_loop, args=(self.proc.stdout,), daemon=True).start()

    def _read_loop(self, stream) -> None:
        """Reads the worker's messages into a queue (so a wait can time out); closes the pipe
        itself at the end, so its descriptor is never reused under a running read."""
        try:
            while True:
                self._q.put(("msg", read_message(stream.fileno())))
        except EOFError:
            self._q.put(("eof", None))
        except (OSError, ValueError) as e:
            self._q.put(("bad", str(e)))
        finally:
            stream.close()

    def activate(self) -> None:
        """Start the clock of this exercise (once), when its first call is made: importing the
        libraries is not the student's time, and on a busy machine it can take a while."""
        if self.deadline is None:
            self.deadline = time.monotonic() + self.limits.timeout

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                if os.name == "posix":
                    os.killpg(self.proc.pid, signal.SIGKILL)
                else:
                    self.proc.kill()
            except (ProcessLookupError, PermissionError):
                pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        try:
            self.proc.stdin.close()
        except OSError:
            pass

    # -- talking ---------------------------------------------------------------------------
    def _fail(self, err: GradingError) -> GradingError:
        self.failure = err
        self.stop()
        return err

    def _send(self, req: dict) -> None:
        try:
            data = pickle.dumps(req, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as e:  # noqa: BLE001 -- the test's own arguments do not pickle
            raise GradingError(f"the grader could not send the arguments to the student's "
                               f"code ({type(e).__name__}: {e})") from None
        try:
            write_message(self.proc.stdin.fileno(), data, self.deadline)
        except TimeoutError:
            raise self._timeout() from None
        except OSError:
            raise self._died("a call") from None

    def _receive(self, what: str) -> Decoded:
        left = (self.deadline or time.monotonic() + self.limits.timeout) - time.monotonic()
        try:
            kind, data = self._q.get(timeout=max(left, 0.001))
        except queue.Empty:
            raise self._timeout() from None
        if kind == "eof":
            raise self._died(what)
        if kind == "bad":
            raise self._fail(GradingError(f"the student's process sent something the grader "
                                          f"does not read during {what} ({data})"))
        try:
            return decode(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise self._fail(GradingError(f"the student's process sent something the grader "
                                          f"does not read during {what} ({e})")) from None

    def _timeout(self) -> GradingError:
        if not self.ready:
            return self._fail(GradingTimeout(
                f"timed out importing train.py (after "
                f"{max(self.limits.timeout, IMPORT_SECONDS):.0f} s)"))
        return self._fail(GradingTimeout(f"timed out after {self.limits.timeout:.0f} s"))

    def _died(self, what: str) -> GradingError:
        try:
            rc = self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            rc = None
        if rc is not None and self.bwrap and rc > 128:
            rc = -(rc - 128)  # bwrap reports a signal as 128 + its number
        if rc is not None and rc < 0:
            try:
                how = f"killed by {signal.Signals(-rc).name}"
            except ValueError:
                how = f"killed by signal {-rc}"
            how += {signal.SIGXCPU: " (CPU time limit)", signal.SIGXFSZ: " (file size limit)",
                    signal.SIGKILL: " (a limit, or out of memory)"}.get(-rc, "") \
                if os.name == "posix" else ""
        else:
            how = f"exit status {rc}"
        return self._fail(GradingError(f"the student's code ended its process during {what} "
                                       f"({how})"))

    def wait_ready(self) -> None:
        """Wait until the spliced file has been imported; raise why it was not."""
        if self.failure is not None:
            raise self.failure
        if self.ready:
            return
        if self.proc is None:
            self.start()
        # the import has its own allowance (module-level code that never ends still stops)
        self.deadline = self.started + max(self.limits.timeout, IMPORT_SECONDS)
        reply = self._receive("the import of train.py").value
        self.deadline = None
        if not isinstance(reply, dict):
            raise self._fail(GradingError("the student's process sent a bad greeting"))
        if reply.get("ready") is not True:
            err = reply.get("error")
            raise self._fail(StudentImportError("does not import: " + _describe(err, self.where)))
        self.ready = True
        self.activate()

    def call(self, key: str, args: tuple, kwargs: dict):
        """Call the student's function `key` with these arguments; return its result here."""
        self.wait_ready()
        torch = sys.modules.get("torch")
        flat, kinds, payload, values = pack((args, kwargs), self._stays_here)
        self.calls += 1
        cid = self.calls
        released, self._released = self._released, []
        self._send({"op": "call", "id": cid, "key": key, "payload": payload, "kinds": kinds,
                    "values": values, "state": global_state(), "release": released})
        what = f"{key.split('.')[-1]}()"
        while True:
            got = self._receive(what)
            reply = got.value
            if not (isinstance(reply, dict) and reply.get("id") == cid and "callback" in reply):
                break
            self._callback(flat, kinds, reply)
        if not isinstance(reply, dict) or reply.get("id") != cid:
            raise self._fail(GradingError("the student's process answered out of turn"))
        try:
            set_global_state(reply.get("state") or {})
            self._apply_updates(flat, kinds, reply.get("updates") or [])
        except (ValueError, TypeError, IndexError, KeyError, RuntimeError) as e:
            raise GradingError(f"the student's code left an argument or random state the "
                               f"grader cannot take back ({e})") from None
        if "error" in reply:
            raise _rebuild(reply["error"], sys.modules.get(self.module))
        value = reply.get("value")
        if got.grad_tensors and torch is not None and torch.is_grad_enabled():
            inputs = [x for x, k, v in zip(flat, kinds, values)
                      if k in ("tensor", "param") and v[1]]
            if inputs:
                global _REMOTE
                _REMOTE = _REMOTE or _remote_function()
                outs = _REMOTE.apply(self, cid, got.grad_tensors, *inputs)
                import weakref
                weakref.finalize(outs[0].grad_fn, self._released.append, cid)
            else:
                for t in got.grad_tensors:
                    t.requires_grad_(True)
        return value

    def _stays_here(self, f: types.FunctionType) -> bool:
        """A function the worker could not import by name: a lambda, a local function, or one
        from a module outside the Python installation (the tests' helpers)."""
        if "<" in f.__qualname__:
            return True
        if f.__module__.split(".")[0] == self.module.split(".")[0]:
            return False
        path = getattr(sys.modules.get(f.__module__), "__file__", None)
        if path is None:
            return True
        if self._roots is None:
            self._roots = python_roots(self.hide)
        return not any(_inside(Path(path).resolve(), r) for r in self._roots)

    def _callback(self, flat, kinds, request) -> None:
        """The student's code called a function of the test: run it here, send back its value."""
        i, args, kwargs = request.get("callback"), request.get("args"), request.get("kwargs")
        if not (type(i) is int and 0 <= i < len(flat) and kinds[i] == "callback"
                and isinstance(args, list) and isinstance(kwargs, dict)
                and all(type(k) is str for k in kwargs)):
            raise self._fail(GradingError("the student's process made a bad callback"))
        try:
            reply = {"op": "reply", "value": flat[i](*args, **kwargs)}
            pickle.dumps(reply)
        except Exception as e:  # noqa: BLE001 -- the test's function, or its value, failed
            reply = {"op": "reply", "error": f"{type(e).__name__}: {e}"}
        self._send(reply)

    def backward(self, cid: int, grads, shapes) -> list:
        if self.failure is not None:
            raise self.failure
        self._send({"op": "backward", "id": cid,
                    "grads": [g.detach().cpu().clone() for g in grads]})
        reply = self._receive("a backward pass").value
        if not isinstance(reply, dict) or reply.get("id") != cid:
            raise self._fail(GradingError("the student's process answered out of turn"))
        if "error" in reply:
            raise _rebuild(reply["error"], sys.modules.get(self.module))
        got = reply.get("grads")
        import torch
        if not isinstance(got, list) or len(got) != len(shapes):
            raise GradingError("the student's process sent the wrong number of gradients")
        out = []
        for g, (shape, dtype) in zip(got, shapes):
            if g is not None and (not isinstance(g, torch.Tensor) or g.shape != shape):
                raise GradingError("the student's process sent a gradient of the wrong shape")
            out.append(None if g is None else g.to(dtype))
        return out

    @staticmethod
    def _apply_updates(flat, kinds, updates) -> None:
        np, torch = sys.modules.get("numpy"), sys.modules.get("torch")
        if not isinstance(updates, list):
            raise ValueError("a bad update list")
        for item in updates:
            i, new = item
            if type(i) is not int or not 0 <= i < len(flat):
                raise ValueError("an update of nothing")
            x, kind = flat[i], kinds[i]
            if kind in ("tensor", "param"):
                if not (isinstance(new, torch.Tensor) and new.shape == x.shape
                        and new.dtype == x.dtype):
                    raise ValueError("a changed tensor came back in another shape or dtype")
                with torch.no_grad():
                    x.copy_(new)
            elif kind == "array":
                if not (isinstance(new, np.ndarray) and new.shape == x.shape
                        and new.dtype == x.dtype):
                    raise ValueError("a changed array came back in another shape or dtype")
                x[...] = new
            elif kind == "tgen":
                x.set_state(new)
            else:
                x.bit_generator.state = new


def _describe(err, where) -> str:
    """'TypeError: message (train.py, line N)' from a worker's error record."""
    if not isinstance(err, dict):
        return "an unknown error"
    text = f"{str(err.get('type'))[:60]}: {str(err.get('msg'))[:300]}"
    if type(err.get("line")) is int:
        text += where(err["line"])
    return text


def _rebuild(err, module) -> BaseException:
    """The exception the student's code raised, rebuilt here from its name and message: a
    built-in type or one defined in the paper's own module (so `pytest.raises` works), or else a
    StudentCodeError carrying the name."""
    if not isinstance(err, dict):
        return GradingError("the student's process sent a bad error")
    name, msg = str(err.get("type"))[:60], str(err.get("msg"))[:2000]
    import builtins
    cls = getattr(builtins, name, None) if err.get("module") == "builtins" else \
        getattr(module, name, None) if err.get("module") == getattr(module, "__name__", "") \
        else None
    exc = None
    if isinstance(cls, type) and issubclass(cls, Exception) and not issubclass(cls, GradingError):
        try:
            exc = cls(msg)
        except Exception:  # noqa: BLE001 -- a constructor that wants other arguments
            exc = None
    if exc is None:
        exc = StudentCodeError(f"{name}: {msg}")
    if type(err.get("line")) is int:
        exc.__grade_where__ = err["line"]
    return exc


# ------------------------------------------------------------------------------------------------
# the worker's half (runs inside the sandbox; everything below is the student's process)
# ------------------------------------------------------------------------------------------------
def _error_record(e: BaseException, filename: str | None) -> dict:
    line = None
    if isinstance(e, SyntaxError) and e.filename == filename:
        line = e.lineno
    for frame, lineno in traceback.walk_tb(e.__traceback__):
        if frame.f_code.co_filename == filename:
            line = lineno
    try:
        msg = e.msg if isinstance(e, SyntaxError) else str(e)
    except Exception:  # noqa: BLE001 -- a __str__ that raises
        msg = "(no message)"
    return {"type": type(e).__name__, "module": type(e).__module__, "msg": str(msg)[:2000],
            "line": line}


def worker_main(cfg: dict) -> int:
    rfd, wfd = os.dup(0), os.dup(1)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(2, 1)  # the student's prints go to the log, never into the channel
    if cfg.get("uid") is not None:  # root: become an unprivileged user before anything else
        os.setgroups([])
        os.setresgid(cfg["uid"], cfg["uid"], cfg["uid"])
        os.setresuid(cfg["uid"], cfg["uid"], cfg["uid"])
    try:
        import resource
        for name, value in cfg["rlimits"].items():
            hard = value + 5 if name == "RLIMIT_CPU" else value
            resource.setrlimit(getattr(resource, name), (value, hard))
    except ImportError:
        pass
    os.chdir(cfg["cwd"])
    sys.dont_write_bytecode = True  # -I ignores PYTHONDONTWRITEBYTECODE
    sys.path[:] = [cfg["papers"], *cfg["path"]]
    sys.argv = ["train.py"]

    filename = str(Path(cfg["papers"]) / cfg["package"] / "train.py")
    channel = _Channel(rfd, wfd, filename)
    try:
        import importlib
        channel.module = importlib.import_module(cfg["module"])
    except BaseException as e:  # noqa: BLE001 -- the student's file, whatever it raises
        channel.send({"ready": False, "error": _error_record(e, filename)})
        return 0
    channel.send({"ready": True})
    try:
        channel.serve()
    except EOFError:
        pass
    return 0


class _Channel:
    """The worker's end: serves calls and backward passes; calls the tests' functions back."""

    def __init__(self, rfd: int, wfd: int, filename: str):
        self.rfd, self.wfd, self.filename = rfd, wfd, filename
        self.module = None
        self.graphs: dict[int, tuple] = {}

    def send(self, obj) -> None:
        try:
            data = encode(obj)
        except Exception as e:  # noqa: BLE001 -- what the student's function returned
            data = encode({"id": obj.get("id"), "error": {
                "type": "TypeError", "module": "builtins", "line": None,
                "msg": f"the function returned {e}"}})
        write_message(self.wfd, data)

    def serve(self, until_reply: bool = False):
        while True:
            req = pickle.loads(read_message(self.rfd, limit=1 << 40))
            for cid in req.get("release", []):
                self.graphs.pop(cid, None)
            if req["op"] == "call":
                self.send(_serve_call(self, req))
            elif req["op"] == "backward":
                self.send(_serve_backward(self, req))
            elif req["op"] == "reply" and until_reply:
                return req

    def stub(self, cid: int, i: int, name: str):
        """Stands for function i of call cid, which stayed in the grader."""
        def call_back(*args, **kwargs):
            data = encode({"id": cid, "callback": i, "args": list(args), "kwargs": kwargs})
            write_message(self.wfd, data)
            reply = self.serve(until_reply=True)
            if "error" in reply:
                raise RuntimeError(f"a function of the test raised {reply['error']}")
            return reply["value"]

        call_back.__name__ = call_back.__qualname__ = name
        return call_back


def _unpack(channel: _Channel, req: dict):
    np, torch = sys.modules.get("numpy"), sys.modules.get("torch")
    objs = []
    for i, (kind, v) in enumerate(zip(req["kinds"], req["values"])):
        if kind in ("tensor", "param"):
            t, rg = v
            if kind == "param":
                t = torch.nn.Parameter(t, requires_grad=rg)
            elif rg:
                t.requires_grad_(True)
            objs.append(t)
        elif kind == "array":
            objs.append(v)
        elif kind == "tgen":
            g = torch.Generator(device=v[1])
            g.set_state(v[0])
            objs.append(g)
        elif kind == "npgen":
            g = np.random.Generator(getattr(np.random, v[0])())
            g.bit_generator.state = v[1]
            objs.append(g)
        else:  # a function of the test: calling it asks the grader
            objs.append(channel.stub(req["id"], i, v))

    class Unpickler(pickle.Unpickler):
        def persistent_load(self, pid):
            return objs[pid]

    args, kwargs = Unpickler(io.BytesIO(req["payload"])).load()
    return objs, args, kwargs


def _snapshot(x, kind):
    if kind == "callback":
        return None
    if kind in ("tensor", "param"):
        return x.detach().clone()
    if kind == "array":
        return x.copy()
    return None


def _changed(before, x, kind) -> bool:
    if kind == "callback":
        return False
    if kind in ("tgen", "npgen"):
        return True
    if kind == "array":
        import numpy as np
        try:
            return before.shape != x.shape or not np.array_equal(before, x, equal_nan=True)
        except TypeError:
            return not np.array_equal(before, x)
    import torch
    return before.shape != x.shape or not torch.equal(before, x.detach())


def _current(x, kind):
    if kind == "tgen":
        return x.get_state()
    if kind == "npgen":
        return x.bit_generator.state
    return x.detach() if kind in ("tensor", "param") else x


def _serve_call(channel: _Channel, req: dict) -> dict:
    torch = sys.modules.get("torch")
    cid, module, filename = req["id"], channel.module, channel.filename
    try:
        objs, args, kwargs = _unpack(channel, req)
        set_global_state(req["state"])
        if torch is not None and "dtype" in req["state"]:
            torch.set_default_dtype(getattr(torch, req["state"]["dtype"]))
        before = [_snapshot(x, k) for x, k in zip(objs, req["kinds"])]
        leaves = [x for x, k in zip(objs, req["kinds"])
                  if k in ("tensor", "param") and x.requires_grad]
        func = resolve_function(module, req["key"])
    except BaseException as e:  # noqa: BLE001
        return {"id": cid, "error": _error_record(e, filename)}
    reply: dict = {"id": cid}
    try:
        if torch is not None:
            with torch.set_grad_enabled(bool(req["state"].get("grad", True))):
                reply["value"] = func(*args, **kwargs)
        else:
            reply["value"] = func(*args, **kwargs)
    except BaseException as e:  # noqa: BLE001 -- SystemExit and KeyboardInterrupt too
        reply["error"] = _error_record(e, filename)
    reply["state"] = {k: v for k, v in global_state().items() if k in ("py_rng", "np_rng",
                                                                         "torch_rng")}
    reply["updates"] = [[i, _current(x, k)] for i, (x, k, b) in
                        enumerate(zip(objs, req["kinds"], before)) if _changed(b, x, k)]
    if "value" in reply and torch is not None:
        outs = [t for t in _tensors(reply["value"]) if t.requires_grad]
        if outs and leaves:
            channel.graphs[cid] = (outs, leaves)
    return reply


def _tensors(x, depth=0):
    torch = sys.modules.get("torch")
    if depth > 64:
        return
    if torch is not None and isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (list, tuple, set, frozenset)):
        for v in x:
            yield from _tensors(v, depth + 1)
    elif isinstance(x, dict):
        for k, v in x.items():
            yield from _tensors(k, depth + 1)
            yield from _tensors(v, depth + 1)


def _serve_backward(channel: _Channel, req: dict) -> dict:
    import torch
    cid, filename = req["id"], channel.filename
    try:
        outs, leaves = channel.graphs[cid]
        # the grader's outputs are the floating tensors that required grad, in the same order
        outs = [t for t in outs if t.is_floating_point() or t.is_complex()]
        grads = torch.autograd.grad(outs, leaves, req["grads"], allow_unused=True,
                                    retain_graph=True)
        return {"id": cid, "grads": [None if g is None else g.detach() for g in grads]}
    except BaseException as e:  # noqa: BLE001
        return {"id": cid, "error": _error_record(e, filename)}


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "worker":
        sys.exit(worker_main(json.loads(sys.argv[2])))
    print(__doc__.splitlines()[0], file=sys.stderr)
    sys.exit(2)
