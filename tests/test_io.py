"""giblet.io across processes and faults: a kill inside a write, a full disk under np.save and torch.save, two
processes racing for one run folder, and a lock released on exit."""
import errno
import json
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import giblet.io as gio
from giblet.io import DiskFullError, FolderLockedError, RunLock, atomic_write, clean_leftovers


def _python(code, **kw):
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE, text=True, **kw)


def test_a_kill_inside_a_write_keeps_the_old_file_and_the_leftover_goes(tmp_path):
    p = tmp_path / "last.pt"
    atomic_write(p, lambda f: torch.save({"epoch": 2}, f))
    child = _python(f"""
        import time
        from giblet.io import atomic_write
        def slow(f):
            f.write(b"x" * 1_000_000); print("writing", flush=True); time.sleep(60)
        atomic_write({str(p)!r}, slow)
    """)
    assert child.stdout.readline().strip() == "writing"
    child.send_signal(signal.SIGKILL); child.wait(); child.stdout.close()
    assert torch.load(p, weights_only=True) == {"epoch": 2}
    (left,) = [q for q in tmp_path.iterdir() if q.name != "last.pt"]
    assert left.name.startswith(f".last.pt.{child.pid}-") and left.stat().st_size == 1_000_000
    assert clean_leftovers(tmp_path) == [left] and [q.name for q in tmp_path.iterdir()] == ["last.pt"]


@pytest.mark.parametrize("writer", ["numpy", "torch"])
def test_a_full_disk_is_one_line_and_the_old_file_stays(tmp_path, monkeypatch, writer):
    p = tmp_path / "weights.bin"
    p.write_bytes(b"old")
    class FillsUp:                                          # a file on a device with 100 kB left
        def __init__(self, f): self.f, self.n = f, 0
        def write(self, b):
            self.n += memoryview(b).nbytes
            if self.n > 100_000: raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(b)
    real = gio.HashingWriter.__init__
    monkeypatch.setattr(gio.HashingWriter, "__init__", lambda self, f: real(self, FillsUp(f)))
    big = np.zeros(1_000_000, np.float32)
    save = (lambda f: np.save(f, big)) if writer == "numpy" else (lambda f: torch.save(torch.from_numpy(big), f))
    with pytest.raises(DiskFullError) as e: atomic_write(p, save)
    msg = str(e.value)
    assert "\n" not in msg and f"no space left in {tmp_path} for weights.bin" in msg and "enforce" not in msg, msg
    assert p.read_bytes() == b"old" and [q.name for q in tmp_path.iterdir()] == ["weights.bin"]
    with pytest.raises(DiskFullError, match="it needs 4.0 MB"): atomic_write(p, save, need=4_000_128)


def test_two_processes_racing_for_one_run_folder(tmp_path):
    code = f"""
        import sys
        from giblet.io import RunLock, FolderLockedError
        print("ready", flush=True); sys.stdin.readline()                  # both start together
        try:
            lock = RunLock({str(tmp_path / 'run')!r}).acquire(); print("got", flush=True)
        except FolderLockedError as e: print("refused", e, flush=True)
        sys.stdin.readline()                                              # hold until told to exit
    """
    kids = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True) for _ in range(2)]
    assert [k.stdout.readline().strip() for k in kids] == ["ready", "ready"]
    for k in kids: k.stdin.write("go\n"); k.stdin.flush()
    outs = [k.stdout.readline() for k in kids]
    for k in kids: k.stdin.write("exit\n"); k.stdin.flush(); k.wait(timeout=60); k.stdin.close(); k.stdout.close()
    assert sorted(o.split()[0] for o in outs) == ["got", "refused"], outs
    winner = kids[[o.startswith("got") for o in outs].index(True)].pid
    assert f"in use by process {winner}" in [o for o in outs if o.startswith("refused")][0]
    assert not (tmp_path / "run" / ".lock").exists()            # released when the winner exited


def test_a_lock_of_a_killed_process_is_taken_over(tmp_path, caplog):
    child = _python(f"""
        import time
        from giblet.io import RunLock
        RunLock({str(tmp_path)!r}).acquire(); print("ok", flush=True); time.sleep(60)
    """)
    assert child.stdout.readline().strip() == "ok"
    with pytest.raises(FolderLockedError, match=f"process {child.pid}"): RunLock(tmp_path).acquire()
    child.kill(); child.wait(); child.stdout.close()
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == child.pid
    with RunLock(tmp_path) as lock: assert lock.held
    assert f"taking over the lock of process {child.pid}" in caplog.text
