"""How many torch CPU threads a command uses: one policy for the command line and the notebooks.

torch's own default is one thread per core. On a small or shared machine that collapses: two threads
on a 2-core machine that is also running other work took 35 s an image where one thread took 6-7 s
(same labels; issue 29, benchmarks/RESULTS.md sections 6 and 10). So the default here is

* 1 thread on a machine with fewer than :data:`MIN_CORES` cores;
* else the cores left free by the 1-minute load average (``os.getloadavg``), at least 1;

and ``EMERDIFF_THREADS=N`` (or ``--threads N`` / the notebooks' ``torch_threads``) overrides it.
Choosing imports no torch (``emerdiff --help`` stays fast); :func:`apply_threads` sets it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

THREADS_ENV = "EMERDIFF_THREADS"
MIN_CORES = 4  # below this many cores: one thread (two threads on two busy cores spin against each other)


@dataclass(frozen=True)
class ThreadChoice:
    """A thread count and why: ``source`` is ``given`` (a flag or parameter), the environment variable,
    or ``auto`` with the ``cores`` and ``load`` it was read from (``load`` None where the platform has none)."""

    threads: int
    source: str
    cores: int | None = None
    load: float | None = None

    def describe(self) -> str:
        """``threads 1 (auto: 2 cores, load 1.3)``, as the settings line prints it."""
        if self.source == "auto":
            load = "load unknown" if self.load is None else f"load {self.load:.1f}"
            return f"threads {self.threads} (auto: {self.cores} cores, {load})"
        return f"threads {self.threads} ({self.source})"


def cpu_cores() -> int:
    """The cores this process may run on (its affinity where the platform tells it, else ``os.cpu_count``)."""
    counts = [os.cpu_count() or 1]
    if hasattr(os, "sched_getaffinity"):
        try:
            counts.append(len(os.sched_getaffinity(0)))
        except OSError:
            pass
    return max(1, min(counts))


def load_average() -> float | None:
    """The 1-minute load average, or None where the platform has none (Windows)."""
    try:
        return float(os.getloadavg()[0])
    except (AttributeError, OSError):
        return None


def auto_threads(cores: int | None = None, load: float | None = None) -> ThreadChoice:
    """The default: 1 below :data:`MIN_CORES` cores, else the cores the load average leaves free, at least 1
    (all of them where there is no load average). ``cores``/``load``: read from the machine when None."""
    cores = cpu_cores() if cores is None else int(cores)
    load = load_average() if load is None else float(load)
    if cores < MIN_CORES:
        threads = 1
    elif load is None:
        threads = cores
    else:
        threads = max(1, min(cores, math.floor(cores - load)))
    return ThreadChoice(threads, "auto", cores, load)


def _positive(value: object, what: str) -> int:
    try:
        n = int(str(value).strip())
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"{what} must be a whole number of threads >= 1 (0 on --threads: one per core), got "
                         f"{value!r}; leave it out for the default (1 below {MIN_CORES} cores, else the cores "
                         "free by load average)")
    return n


def choose_threads(given: int | None = None) -> ThreadChoice:
    """The thread count to use: ``given`` (``--threads``) if set, else ``EMERDIFF_THREADS``, else
    :func:`auto_threads`. ``given`` 0 is torch's own default (one thread per core); a negative or
    non-numeric value is a ValueError naming the fix."""
    if given is not None and str(given).strip() == "0":
        return ThreadChoice(cpu_cores(), "given 0: one per core, torch's default")
    if given is not None:
        return ThreadChoice(_positive(given, "--threads"), "given")
    env = os.environ.get(THREADS_ENV, "").strip()
    if env:
        return ThreadChoice(_positive(env, THREADS_ENV), THREADS_ENV)
    return auto_threads()


def apply_threads(choice: ThreadChoice) -> ThreadChoice:
    """Set torch's intra-op thread count to ``choice.threads``; returns ``choice``."""
    import torch

    torch.set_num_threads(choice.threads)
    return choice
