"""Test and benchmark scaffolding: the scripts run as real subprocesses (torchrun for several ranks, or as
several nodes on this machine), and killed.

Shared by test_kd.py, faults.py, bench.py and gpu_check.py.
"""

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent


def command(script, args, ranks=1, file_limit_kib=None, torchrun=False):
    """argv of `script` on `ranks` processes (torchrun when more than one, or when asked), under bash's
    `ulimit -f` when given."""
    launcher = (["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
                if ranks > 1 or torchrun else [])
    cmd = [sys.executable, *launcher, str(script), *map(str, args)]
    if file_limit_kib is None:
        return cmd
    return ["bash", "-c", f'ulimit -f {file_limit_kib} && exec "$@"', "bash", *cmd]


def node_commands(script, args, nodes, rendezvous="c10d"):
    """argv of `script` as `nodes` torchrun nodes of one process each on this machine, started as a multi-node
    job is: c10d rendezvous (ranks in order of arrival) or static (--node_rank, --master_addr/port)."""
    port = free_port()
    cmds = []
    for node in range(nodes):
        if rendezvous == "c10d":
            meeting = ["--rdzv_backend=c10d", f"--rdzv_endpoint=localhost:{port}", f"--rdzv_id=job{port}"]
        else:
            meeting = [f"--node_rank={node}", "--master_addr=localhost", f"--master_port={port}"]
        cmds.append([sys.executable, "-m", "torch.distributed.run", f"--nnodes={nodes}", "--nproc_per_node=1",
                     *meeting, str(script), *map(str, args)])
    return cmds


def free_port():
    """A TCP port on localhost that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def environment(**extra):
    """One thread per process, as the subprocess ranks and the in-process references must compute the same
    floats; `extra` variables on top."""
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)


def run(cmd, timeout=600):
    """subprocess.run of `cmd` in the repository, output captured as text."""
    return subprocess.run(cmd, cwd=REPO, env=environment(), capture_output=True, text=True, timeout=timeout)


def run_script(script, *args, ranks=1, check=True):
    """Run a script of this repository on `ranks` processes; with `check`, a failure raises with its output.
    """
    cmd = command(script, args, ranks)
    proc = run(cmd)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def run_together(cmds, timeout=600, env=None):
    """Start `cmds` at once (the nodes of one job) and wait for all: [CompletedProcess], output as text.

    When one fails, or `timeout` seconds pass, every process tree still running is killed (a node left alone
    would wait for its peers until the rendezvous timeout); past `timeout` it raises TimeoutError."""
    started = [start_captured(cmd, env) for cmd in cmds]
    procs = [proc for proc, _ in started]
    deadline = time.time() + timeout
    while any(proc.poll() is None for proc in procs):
        failed = any(proc.poll() not in (None, 0) for proc in procs)
        if failed or time.time() > deadline:
            for proc in procs:
                if proc.poll() is None:
                    kill(proc)
            if not failed:
                script = next((arg for arg in map(str, cmds[0]) if arg.endswith(".py")), cmds[0][0])
                raise TimeoutError(f"{script} ran past {timeout} s")
        time.sleep(0.05)
    return [collect(process) for process in started]


def start_captured(cmd, env=None):
    """(Popen of `cmd` in the repository, its output files): stdout and stderr kept for `collect`."""
    out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env or environment(), stdout=out, stderr=err, text=True)
    return proc, (out, err)


def collect(started, timeout=None):
    """Wait for a start_captured process: its CompletedProcess, output as text."""
    proc, (out, err) = started
    proc.wait(timeout)
    with out, err:
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out.read(), err.read())


def start(cmd):
    """Popen of `cmd` in the repository, output discarded."""
    return subprocess.Popen(cmd, cwd=REPO, env=environment(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def wait_for(path, proc, timeout=300):
    """Poll until `path` exists; False if the process ended or `timeout` seconds passed first."""
    deadline = time.time() + timeout
    while not Path(path).exists():
        if proc.poll() is not None or time.time() > deadline:
            return False
        time.sleep(0.002)
    return True


def process_tree(pid):
    """`pid` and every process below it (torchrun starts its ranks in new sessions, out of reach of killpg).
    """
    children = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:  # ended meanwhile
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])  # the command name in parentheses may hold spaces
        children.setdefault(parent, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    return tree


def signal_all(pids, sig):
    """Send `sig` to each of `pids` that still exists."""
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def kill(proc):
    """SIGKILL the process and all its descendants at one moment, as a pre-empted node does.

    The tree is stopped first, so that no process can start a child between listing and killing; an orphaned
    rank would otherwise go on writing into the run being resumed.
    """
    signal_all(process_tree(proc.pid), signal.SIGSTOP)
    signal_all(process_tree(proc.pid), signal.SIGKILL)
    proc.wait()
