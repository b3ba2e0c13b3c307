"""One run per output tree: a lock file naming the holder's pid, taken over when that run is gone."""
from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Iterator, Optional

from .errors import RunLockedError

LOCK_NAME = ".sit-run.lock"
# set for the processes a locked run starts (its notebook kernels): they work inside their parent's lock
HOLDER_ENV = "SIT_LOCK_HOLDER"
HEARTBEAT_S = 30
# a lock from another machine (Drive shared by two Colab runtimes) is stale when its heartbeat is this old
STALE_AFTER_S = 4 * HEARTBEAT_S


def _start_time(pid: int) -> Optional[float]:
    """The process's start time, so a recycled pid is not mistaken for the run that held the lock."""
    try:
        import psutil

        return psutil.Process(pid).create_time()
    except Exception:   # no such process, or no psutil: fall back to the pid alone
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # exists, owned by someone else
        return True
    try:
        import psutil

        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except Exception:
        return True


def _read(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}   # cut off while being written: treated as stale below


def is_stale(info: dict, path: Path) -> bool:
    if not info or "pid" not in info:
        return True
    if info.get("host") != socket.gethostname():
        try:
            return time.time() - path.stat().st_mtime > STALE_AFTER_S
        except FileNotFoundError:
            return True
    pid = int(info["pid"])
    if not _alive(pid):
        return True
    started = _start_time(pid)
    return started is not None and info.get("started") is not None and abs(started - info["started"]) > 1


def _inherited(info: dict) -> bool:
    """This process was started by the run that holds the lock (a notebook kernel of `python -m sitlib`)."""
    return bool(info) and os.environ.get(HOLDER_ENV) == f"{info.get('host')}:{info.get('pid')}"


def acquire(tree: str | os.PathLike, command: str = "") -> Optional[Path]:
    """Take the tree's lock; None when this process already works under it (inherited). Raises RunLockedError
    naming the tree and the holder's pid while another live run holds it; a dead run's lock is taken over."""
    tree = Path(tree).resolve()
    tree.mkdir(parents=True, exist_ok=True)
    path = tree / LOCK_NAME
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": _start_time(os.getpid()),
          "command": command, "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(5):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            info = _read(path)
            if info is None:
                continue   # released meanwhile
            if _inherited(info):
                return None
            if not is_stale(info, path):
                raise RunLockedError(
                    f"output tree {tree} is in use by another run (pid {info['pid']} on {info.get('host')}, since "
                    f"{info.get('since')}: {info.get('command') or 'a notebook'}); wait for it to finish or stop it")
            print(f"taking over the lock of run pid {info.get('pid')} on {tree} (that run is gone)")
            # rename first: of two runs taking over at once only one rename succeeds, the other retries
            moved = path.with_name(f"{LOCK_NAME}.stale-{os.getpid()}")
            try:
                os.replace(path, moved)
            except FileNotFoundError:
                continue
            if _read(moved) != info:   # another run took it over in between: put its fresh lock back
                with contextlib.suppress(FileExistsError):
                    os.link(moved, path)
            moved.unlink()
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        os.environ[HOLDER_ENV] = f"{me['host']}:{me['pid']}"
        return path
    raise RunLockedError(f"output tree {tree}: could not take the run lock {path} (it keeps changing hands)")


def release(path: Optional[Path]) -> None:
    if path is None:
        return
    info = _read(path)
    if info and info.get("pid") == os.getpid():
        path.unlink(missing_ok=True)
    if os.environ.get(HOLDER_ENV, "").endswith(f":{os.getpid()}"):
        del os.environ[HOLDER_ENV]


@contextlib.contextmanager
def hold(tree: str | os.PathLike, command: str = "") -> Iterator[Optional[Path]]:
    """Hold the tree's lock for a block, refreshing its heartbeat (mtime) so other machines see it is alive."""
    path = acquire(tree, command)
    stop = threading.Event()

    def beat():
        while not stop.wait(HEARTBEAT_S):
            with contextlib.suppress(OSError):
                os.utime(path)

    thread = threading.Thread(target=beat, daemon=True) if path else None
    if thread:
        thread.start()
    try:
        yield path
    finally:
        stop.set()
        release(path)
