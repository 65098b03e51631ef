"""User-defined tasks for the fault tests, loaded the way a user's own task is:
`task.name: tasks_for_tests:FlakyTask` with tests/ on PYTHONPATH (or sys.path).

FlakyTask is the toy task (reward = fraction of "a" characters) whose reward
misbehaves for chosen members.  The reward function does not know which member
it scores, so the task counts its own calls: the trainer scores member m's B
prompts one after another, members in order, so in a serial run (one rank,
held-out evaluation off) call c belongs to

    generation  c // (N * B)      member  (c // B) % N      prompt  c % B

Options (all optional):
  population, prompts   N and B of the run (must match es.population and
                        es.prompts_per_generation)
  faults                {member: kind} with kind one of
                          raise   the reward raises ValueError
                          nan     the reward returns NaN
                          inf     the reward returns +inf
                          ninf    the reward returns -inf
                          sleep   the reward sleeps 3600 s (time.sleep)
                          spin    the reward loops forever in Python
                        member "*" means every member.  Only the member's first
                        prompt misbehaves: one bad prompt makes the member invalid.
  generations           list of 0-based generations where the faults apply
                        (default: every generation)

Environment (not config keys, so they do not change the run's trajectory):
  ES_MPI_TEST_REWARD_DELAY=<seconds>  every reward call sleeps that long, so that a
                                      generation lasts long enough for a signal to land in it
  ES_MPI_TEST_FSIZE=<call>:<bytes>    at reward call number <call> (0-based, see above)
                                      set RLIMIT_FSIZE to <bytes>: from then on a file write
                                      past that size fails with EFBIG (a full disk, as root)
"""
from __future__ import annotations

import math
import os
import resource
import time

from es_mpi.tasks.toy import ToyTask

_KINDS = ("raise", "nan", "inf", "ninf", "sleep", "spin")


class FlakyTask(ToyTask):
    name = "flaky"

    def __init__(self, options=None):
        opts = dict(options or {})
        self.population = int(opts.pop("population", 0))
        self.prompts = int(opts.pop("prompts", 0))
        raw = opts.pop("faults", {}) or {}
        self.faults = {str(k): str(v) for k, v in dict(raw).items()}
        bad = sorted(set(self.faults.values()) - set(_KINDS))
        if bad:
            raise ValueError(f"task.options.faults: unknown kind(s) {', '.join(bad)} (known: {', '.join(_KINDS)})")
        gens = opts.pop("generations", None)
        self.generations = None if gens is None else {int(g) for g in gens}
        if self.faults and not (self.population and self.prompts):
            raise ValueError("task.options: faults need population and prompts")
        super().__init__(opts)
        self.calls = 0

    def _fault(self) -> str | None:
        c = self.calls
        self.calls += 1
        fsize = os.environ.get("ES_MPI_TEST_FSIZE", "")
        if fsize and int(fsize.split(":")[0]) == c:
            resource.setrlimit(resource.RLIMIT_FSIZE, (int(fsize.split(":")[1]), resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        if not self.faults:
            return None
        gen, member, prompt = c // (self.population * self.prompts), (c // self.prompts) % self.population, \
            c % self.prompts
        if prompt != 0 or (self.generations is not None and gen not in self.generations):
            return None
        return self.faults.get(str(member), self.faults.get("*"))

    def score(self, example, completion):
        delay = float(os.environ.get("ES_MPI_TEST_REWARD_DELAY", "0") or 0)
        if delay:
            time.sleep(delay)
        kind = self._fault()
        if kind == "raise":
            raise ValueError("flaky reward")
        if kind == "sleep":
            time.sleep(3600)
        if kind == "spin":
            while True:
                pass
        s = super().score(example, completion)
        if kind in ("nan", "inf", "ninf"):
            return s.__class__({"nan": math.nan, "inf": math.inf, "ninf": -math.inf}[kind], s.components, False)
        return s
