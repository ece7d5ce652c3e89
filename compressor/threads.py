"""How many intra-op threads a CPU run uses: the cores this process can really use, and no more
threads than the work per op can keep busy.

Why: PyTorch's default is one thread per core, and every parallel region ends at a barrier where
each thread waits for the others. When another process takes one of the cores, the thread that was
put off it holds every barrier for a scheduler time slice (milliseconds) while its partner spins,
so a step of thousands of small ops slows down 20-30x instead of 2x (measured here, 2 cores: the
digits ResNet-110 fell from 208 to 6-11 img/s at 2 threads under load, while 1 thread kept its
speed; ResNet-20 at 32x32 from 145-190 to 13-16 img/s; issue 17 saw 11 -> 2 img/s). One thread
per op is never that fragile, and for small ops it loses little when the machine is quiet: an op
of a few million multiply-adds takes a few hundred microseconds, where a barrier's wake-up is a
visible share. So:

  * usable cores = the smallest of: the CPUs online, the affinity mask, the cgroup CPU quota
    (cpu.max, or cfs_quota_us/cfs_period_us), ``OMP_NUM_THREADS``, and the thread count the
    process already runs at (a test suite or a user who set 1 keeps 1);
  * minus the other runnable tasks that must share those cores (``/proc/stat`` procs_running less
    this process's own running threads; tasks beyond the cores we cannot use are assumed to sit on
    those), re-checked while training, so a competitor that starts mid-run drops us to the free cores;
  * at most one thread per ``QUIET_MACS_PER_THREAD`` (0.5M) multiply-adds of the largest op per
    batch while no other task wants the cores, and one per ``SHARED_MACS_PER_THREAD`` (16.8M) once
    one does: a conv of 16 channels at 8x8, batch 32 (4.7M) gets both cores of an idle 2-core
    machine and one thread of a shared one; ResNet-20 at 32x32, batch 64 (151M) gets all it may.
    Measured on this 2-core machine, idle, one training step at 1 and 2 threads
    (benchmarks/thread_scaling.py): a second thread helped every model, 1.11x at a 1.3M op (a
    width-0.53 ResNet-26 on digits, batch 32), 1.05-1.22x at 4.7M (ResNet-8/110 on digits), 1.31x
    at 9.4M, 1.56-1.80x from 19M up; the same second thread under one CPU-bound competitor costs
    10x (benchmarks/contention.py);
  * a run re-checks every ``recheck_s``, and at once when a step takes far longer than the steps
    before it (the sign of a competitor stealing a core mid-run);
  * ``--threads N`` (``requested``) overrides all of it.

:func:`choose_threads` is the pure rule; the readers below feed it; :class:`ThreadGovernor`
applies it for one run and puts the process's setting back afterwards.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

# Work per thread below which a second thread costs more than it saves. Quiet (no other runnable
# task): barrier waits are microseconds, and on an idle 2-core machine a second thread helped even a
# 1.3M-multiply-add op (1.11x, benchmarks/thread_scaling.py); 2**19 keeps it for that op and stops
# a 16-core machine from splitting a 4.7M op 16 ways. Shared: the thread the scheduler puts off its
# core holds every barrier for a time slice, so small ops stay on one thread below 2**24 (16.8M,
# ~0.3-1 ms of one core): between the digits models' largest ops (4.7M at batch 32) and a 32x32
# ResNet's (151M at batch 64).
QUIET_MACS_PER_THREAD = 1 << 19
SHARED_MACS_PER_THREAD = 1 << 24
# A step this many times slower than the recent typical one triggers a re-check before recheck_s.
SLOW_STEP_FACTOR = 4.0

Say = Callable[[str], None]


@dataclass(frozen=True)
class OpWork:
    """The largest conv/linear op of a model: multiply-adds per batch, and what it is."""

    macs: int
    what: str  # e.g. "conv 16x8x8 at batch 32"


@dataclass(frozen=True)
class ThreadChoice:
    threads: int
    usable: int  # cores this process may use (before other processes are counted)
    reason: str

    def line(self) -> str:
        return f"threads: {self.threads} ({self.usable} usable core{'s' if self.usable != 1 else ''}; {self.reason})"


def parse_env_threads(value: str | None) -> int | None:
    """``OMP_NUM_THREADS`` as a count: "4" -> 4, "4,2" (nested levels) -> 4; unset, empty or
    invalid -> None (OpenMP ignores an invalid value too)."""
    if value is None:
        return None
    first = value.split(",")[0].strip()
    try:
        n = int(first)
    except ValueError:
        return None
    return n if n > 0 else None


def _fmt(macs: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if macs >= size:
            return f"{macs / size:.3g}{unit}"
    return f"{macs:.0f}"


def usable_cores(cores: int, affinity: int | None, quota: float | None, env: str | None = None) -> int:
    """The smallest of: CPUs online, the affinity mask, the cgroup quota (rounded down, at least 1)
    and ``OMP_NUM_THREADS``."""
    limits = [max(1, cores)]
    if affinity:
        limits.append(affinity)
    if quota is not None and quota > 0:
        limits.append(max(1, math.floor(quota)))
    env_threads = parse_env_threads(env)
    if env_threads:
        limits.append(env_threads)
    return min(limits)


def choose_threads(cores: int, affinity: int | None, quota: float | None, env: str | None, work: OpWork | None,
                   *, busy: int = 0, ceiling: int | None = None, requested: int | None = None) -> ThreadChoice:
    """The intra-op thread count for a run (see the module docstring for the rule).

    ``cores``: CPUs online; ``affinity``: CPUs in this process's affinity mask; ``quota``: the
    cgroup CPU quota in cores (None: no limit); ``env``: ``OMP_NUM_THREADS`` as set (None: unset);
    ``work``: the largest op per batch (None: unknown, no cap); ``busy``: other runnable tasks on
    the machine; ``ceiling``: the count the process already runs at; ``requested``: ``--threads``.
    """
    usable = usable_cores(cores, affinity, quota, env)
    if requested is not None:
        return ThreadChoice(int(requested), usable, f"--threads {requested}")
    if ceiling is not None and ceiling > 0:
        usable = min(usable, ceiling)
    # other runnable tasks: those beyond the cores we cannot use are assumed to run there
    others = max(0, busy - (max(1, cores) - usable))
    free = max(1, usable - others)
    per_thread = SHARED_MACS_PER_THREAD if others else QUIET_MACS_PER_THREAD
    cap = usable if work is None else max(1, work.macs // per_thread)
    threads = min(free, cap)
    reasons = []
    if work is not None and cap <= free and cap < usable:
        size = "small" if cap == 1 else "sized"
        reasons.append(f"per-op work {size}{' on shared cores' if others else ''}: largest op {_fmt(work.macs)} "
                       f"multiply-adds ({work.what}), one thread per {_fmt(per_thread)}")
    if others and free < usable and free <= cap:
        reasons.append(f"{others} other runnable task{'s' if others != 1 else ''} on them")
    if not reasons:
        reasons.append("one per core" if work is None else
                       f"one per core: largest op {_fmt(work.macs)} multiply-adds ({work.what})")
    return ThreadChoice(threads, usable, "; ".join(reasons))


# ----------------------------------------------------------------- what the machine says

def parse_cpu_max(text: str) -> float | None:
    """cgroup v2 ``cpu.max`` ("max 100000" or "200000 100000") -> cores (None: no limit)."""
    parts = text.split()
    if not parts or parts[0] == "max":
        return None
    try:
        quota, period = float(parts[0]), float(parts[1]) if len(parts) > 1 else 100000.0
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def parse_cfs(quota_text: str, period_text: str) -> float | None:
    """cgroup v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` -> cores (quota -1: no limit)."""
    try:
        quota, period = float(quota_text.strip()), float(period_text.strip())
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def read_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """This container's CPU quota in cores, from cgroup v2 or v1; None when there is none."""
    text = _read(root / "cpu.max")
    if text is not None:
        return parse_cpu_max(text)
    for folder in (root / "cpu", root / "cpu,cpuacct"):
        quota, period = _read(folder / "cpu.cfs_quota_us"), _read(folder / "cpu.cfs_period_us")
        if quota is not None and period is not None:
            return parse_cfs(quota, period)
    return None


def read_affinity() -> int | None:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return None


def parse_procs_running(stat_text: str) -> int | None:
    for line in stat_text.splitlines():
        if line.startswith("procs_running"):
            return int(line.split()[1])
    return None


def parse_task_state(stat_text: str) -> str:
    """The state letter of a ``/proc/<pid>/task/<tid>/stat`` line (after the command's ')')."""
    return stat_text[stat_text.rfind(")") + 1:].split()[0]


def _own_running() -> int:
    running = 0
    tasks = Path("/proc/self/task")
    for task in tasks.iterdir() if tasks.is_dir() else ():
        text = _read(task / "stat")
        if text and parse_task_state(text) == "R":
            running += 1
    return running


def other_runnable(samples: int = 3, gap_s: float = 0.002) -> int:
    """Runnable tasks of other processes, the least of a few samples (a CPU-bound competitor is
    runnable in every sample; a short burst is not). 0 where /proc does not say."""
    least = None
    for i in range(samples):
        text = _read(Path("/proc/stat"))
        total = parse_procs_running(text) if text else None
        if total is None:
            return 0
        others = max(0, total - _own_running())
        least = others if least is None else min(least, others)
        if i + 1 < samples:
            time.sleep(gap_s)
    return least or 0


# ----------------------------------------------------------------- what the model does per op

def measure_work(models, input_shape: tuple[int, ...], batch: int) -> OpWork | None:
    """The largest conv/linear op of ``models`` (one module or several taking the same images), from
    one batch-1 forward in eval mode without gradients (no state changes); None if it cannot run."""
    import torch
    import torch.nn as nn

    models = list(models) if isinstance(models, (list, tuple)) else [models]
    best: list = [0, ""]

    def hook(module: nn.Module, args, output) -> None:
        if not isinstance(output, torch.Tensor) or output.dim() < 2:
            return
        per_sample = output[0].numel()
        if isinstance(module, nn.modules.conv._ConvNd):
            macs = per_sample * (module.in_channels // module.groups) * math.prod(module.kernel_size)
            what = "conv " + "x".join(map(str, output.shape[1:]))
        else:
            macs = per_sample * module.in_features
            what = f"linear {module.in_features}->{module.out_features}"
        if macs > best[0]:
            best[:] = [macs, what]

    from compressor.probe import hooked_forward

    for model in models:
        hooked_forward(model, input_shape, hook, (nn.modules.conv._ConvNd, nn.Linear))  # an odd model: ops unknown
    if not best[0]:
        return None
    return OpWork(int(best[0] * batch), f"{best[1]} at batch {batch}")


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """One intra-op thread for a batch-1 probe (op sizes, FLOPs, tap layouts): its ops are too small
    for a second thread to help, and on a shared machine a second one would collapse it (10-30x)."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


# ----------------------------------------------------------------- --threads and applying it

_requested: int | None = None
_governing = 0  # ThreadGovernors entered and not yet left in this process


def governed() -> bool:
    """Whether a :class:`ThreadGovernor` already runs this process's threads (code under it, such
    as a run's validation, needs no choice of its own)."""
    return _governing > 0


def requested() -> int | None:
    """The ``--threads`` of the running command (None: choose)."""
    return _requested


@contextlib.contextmanager
def request(threads: int | None) -> Iterator[None]:
    """``--threads N`` for everything run inside (None leaves the current request as it is)."""
    global _requested
    saved = _requested
    if threads is not None:
        _requested = int(threads)
    try:
        yield
    finally:
        _requested = saved


def machine_cores() -> int:
    """Cores this process may run on: affinity and cgroup quota (not ``OMP_NUM_THREADS``: that is a
    thread setting, and a benchmark's "all cores" should not follow it)."""
    return usable_cores(os.cpu_count() or 1, read_affinity(), read_quota())


def machine_choice(work: OpWork | None, *, ceiling: int | None, busy: int | None = None) -> ThreadChoice:
    """:func:`choose_threads` fed with what this machine and process say now."""
    return choose_threads(os.cpu_count() or 1, read_affinity(), read_quota(), os.environ.get("OMP_NUM_THREADS"),
                          work, busy=other_runnable() if busy is None else busy, ceiling=ceiling,
                          requested=requested())


class ThreadGovernor:
    """Applies the policy for one run: sets the threads on entry (and says why), re-checks other
    runnable tasks every ``recheck_s`` while the run polls, and restores the process's count on exit.

    Only CPU runs are chosen for; on an accelerator only ``--threads`` is applied. Dropping threads
    happens at once (a competitor collapses a multi-threaded step); raising them again waits for
    two checks in a row, so a short burst of another process does not make the count flap. While
    it runs more than one thread, a poll that comes ``SLOW_STEP_FACTOR`` times later than the
    typical gap between polls re-checks at once: a competitor that starts mid-run is seen after
    one slow step instead of up to ``recheck_s`` of collapsed ones.
    """

    def __init__(self, work: OpWork | None, *, say: Say | None = None, device_type: str = "cpu",
                 recheck_s: float = 2.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.work, self.say, self.recheck_s, self.clock = work, say or (lambda _line: None), recheck_s, clock
        self.auto = device_type == "cpu" and requested() is None
        self.apply = device_type == "cpu" or requested() is not None
        self.saved = 0
        self.ceiling = 0
        self.choice: ThreadChoice | None = None
        self._next = 0.0
        self._pending: int | None = None
        self._last_poll: float | None = None
        self._typical_gap: float | None = None  # running mean of the gaps between polls

    def __enter__(self) -> "ThreadGovernor":
        import torch

        global _governing
        _governing += 1
        self.saved = self.ceiling = torch.get_num_threads()
        if self.apply:
            self._set(machine_choice(self.work, ceiling=self.ceiling))
        return self

    def __exit__(self, *exc) -> None:
        import torch

        global _governing
        _governing -= 1
        if self.apply:
            torch.set_num_threads(self.saved)

    @property
    def threads(self) -> int:
        import torch

        return torch.get_num_threads()

    def _set(self, choice: ThreadChoice) -> None:
        import torch

        if self.choice is not None and choice.threads != self.choice.threads:
            self._typical_gap = None  # steps at another thread count take another time
        self.choice = choice
        torch.set_num_threads(choice.threads)
        self.say(choice.line())
        self._next = self.clock() + self.recheck_s

    def _slow_step(self, now: float) -> bool:
        """Whether the gap since the last poll is far above the typical one (and learn the gap)."""
        last, self._last_poll = self._last_poll, now
        if last is None:
            return False
        gap, typical = now - last, self._typical_gap
        if typical is None:
            self._typical_gap = gap
            return False
        slow = gap > SLOW_STEP_FACTOR * typical
        if not slow:
            self._typical_gap = 0.8 * typical + 0.2 * gap
        return slow

    def poll(self) -> None:
        """Call between steps: cheap unless a re-check is due."""
        if not self.auto or self.choice is None or self.choice.usable <= 1:
            return
        now = self.clock()
        slow = self._slow_step(now) and self.choice.threads > 1
        if now < self._next and not slow:
            return
        self._next = now + self.recheck_s
        choice = machine_choice(self.work, ceiling=self.ceiling)
        current = self.choice.threads
        if choice.threads < current or (choice.threads > current and self._pending == choice.threads):
            self._pending = None
            self._set(choice)
        else:
            self._pending = choice.threads if choice.threads > current else None


@contextlib.contextmanager
def threads_for(models, input_shape: tuple[int, ...], batch: int, *, say: Say | None = None,
                device_type: str = "cpu") -> Iterator[ThreadGovernor]:
    """The policy for running ``models`` on batches of ``batch`` images (evaluation, export checks)."""
    work = measure_work(models, input_shape, batch) if device_type == "cpu" and requested() is None else None
    with ThreadGovernor(work, say=say, device_type=device_type) as governor:
        yield governor
