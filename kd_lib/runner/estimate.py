"""The runner's time estimate, from the runs' sizes: a run's work is its epochs x the images of an epoch x the cost
of one image through its model and method (`epoch_cost`, relative units), and this machine's seconds per unit of
work are measured on the runs already finished (their records say how many epochs each ran), the runs that ran
alone on every core (a teacher its students wait for) apart from those that ran in one of the slots (the students,
and a long teacher, which no student waits for): two threads on one run are not twice one thread's speed. Early
stopping is a guess until runs of the method have stopped: `FILL` of the epochs allowed, then what the finished
runs of that method (else of any) used."""
from ..core.methods import get_method
from ..recipes.budget import epochs_run, twin_epochs

__all__ = ["FILL", "START_COST", "ALONE_GAIN", "COSTS", "method_cost", "epoch_cost", "allowed_epochs", "run_cost",
           "Estimate"]

FILL = 0.7  # the share of its allowed epochs a run with early stopping is taken to use, until runs have shown theirs
START_COST = 2.0  # a run's start, imports and record, in units of one no_teacher epoch of resnet10 on all the data
TEACHER_EPOCH = 3.3  # an epoch of the teacher (ResNet34, all the data), in the same units
ALONE_GAIN = 0.65  # a run alone: each slot's cores beyond one add this much of one slot's speed (two threads on one
#   run were 1.49x one thread at 16 px and 1.82x at 32 px, book/performance.md "Choices for training on a CPU": 1.65)


COSTS = {  # method -> the time of one epoch relative to no_teacher's, and with the feature cache (cache=True)
    "no_teacher": (1.0, None), "no_teacher_budget": (1.0, None), "simultaneous": (1.4, None),
    "stagewise": (3.4, 1.3), "teacher_forced": (1.5, None), "teacher_forced_finetune": (2.0, None),
    "hinton": (1.3, None), "fitnets": (2.0, None),
}  # a method of your own costs as much as no_teacher unless added here


def method_cost(name: str, cached: bool = False) -> float:
    """The relative time of one epoch (`epochs` of the configuration) of method `name`, with the cache when `cached`;
    a budget control's is that of one epoch per step of the method whose budget it takes."""
    method = get_method(name)
    steps = len(get_method(method.budget_of).steps_for()) if method.budget_of else 1
    cost, cached_cost = COSTS.get(name, (1.0, None))
    return steps * (cached_cost if cached and cached_cost is not None else cost)


def epoch_cost(config, kind: str, needs_teacher: bool = False) -> float:
    """The work of one epoch of one step of a run, relative to an epoch of resnet10 without a teacher on all the data:
    its model's depth, its method's cost (the teacher's work each batch, the cache) and the images of an epoch."""
    if kind == "teacher": return TEACHER_EPOCH
    depth = 1 + 0.1 * (int(config.student.removeprefix("resnet")) - 10)  # resnet26 ~ 2.6 x resnet10
    valid = 0.35 if needs_teacher else 0.1  # the validation share, which no fraction shrinks
    per_step = method_cost(config.method, config.cache is True) / len(_steps(config))
    return per_step * depth * (config.fraction + valid) / (1 + valid)


def _steps(config) -> tuple:
    "A student run's steps; a budget control's, those of its twin's method (whose epochs it trains in one step)."
    method = config.method_def
    return (get_method(method.budget_of) if method.budget_of else method).steps_for()


def allowed_epochs(config, kind: str) -> int:
    "The epochs a run may train in all, every step at its cap (a budget control: its twin's), times its `budget`."
    return config.scaled(config.epochs if kind == "teacher" else sum(getattr(config, s.epochs) for s in _steps(config)))


def run_cost(config, kind: str, needs_teacher: bool = False) -> float:
    "A run's work were every step to run to its cap (`Job.cost`)."
    return START_COST + allowed_epochs(config, kind) * epoch_cost(config, kind, needs_teacher)


def _stops(config, kind: str) -> bool:
    "Whether the run stops early (patience), so may train fewer epochs than allowed."
    return kind != "teacher" and getattr(config, "patience", None) is not None


class Estimate:
    """Seconds left of `jobs` (`Job`s), `slots` at once, learning from each finished job (`finished`) this
    machine's seconds per unit of work, alone and in a slot, and the share of their epochs that runs with early
    stopping use."""
    def __init__(self, jobs: list, slots: int = 1):
        self.jobs, self.slots = jobs, max(1, slots)
        self.awaited = {a for j in jobs for a in j.after}  # the teachers students wait for: they run alone
        self.seconds, self.work = {"alone": 0.0, "slot": 0.0}, {"alone": 0.0, "slot": 0.0}
        self.used, self.allowed = {}, {}  # per method with early stopping: epochs its finished runs ran, and allowed
        self.ran = {}  # job name -> epochs it ran in all

    def where(self, job) -> str:
        "'alone' for a teacher its students wait for (the runner gives it every core), else 'slot'."
        return "alone" if job.kind == "teacher" and job.name in self.awaited else "slot"

    def finished(self, job, seconds: float, record: dict) -> None:
        "Learn from `job`, finished in `seconds` with its `record` (None: nothing to learn, a failed run)."
        if record is None: return
        ran, c = epochs_run(record), job.config
        self.ran[job.name] = ran
        self.seconds[self.where(job)] += seconds
        self.work[self.where(job)] += START_COST + ran * epoch_cost(c, job.kind, job.needs_teacher)
        if _stops(c, job.kind):
            self.used[c.method] = self.used.get(c.method, 0) + ran
            self.allowed[c.method] = self.allowed.get(c.method, 0) + allowed_epochs(c, job.kind)

    def epochs(self, job) -> float:
        "The epochs `job` is expected to run in all."
        c = job.config
        if job.kind == "student" and c.method_def.budget_of:
            twin = next((j for j in self.jobs if j.name in job.after and not j.name.endswith("/teacher")), None)
            if twin is not None: return twin_epochs(c, self.ran.get(twin.name) or self.epochs(twin))
        if not _stops(c, job.kind): return allowed_epochs(c, job.kind)
        fill = self.used[c.method] / self.allowed[c.method] if c.method in self.allowed else FILL
        return fill * allowed_epochs(c, job.kind)

    def rate(self, where: str) -> float:
        """Seconds per unit of work of a run `where` ('alone' or 'slot'): every finished run is evidence of this
        machine's speed, weighed by its work; a run alone had every slot's cores, worth `ALONE_GAIN` of a slot's speed
        each beyond the first."""
        speedup = 1 + ALONE_GAIN * (self.slots - 1)  # of a run alone over one in a slot
        alone = speedup if where == "slot" else 1  # a run alone's seconds, in this kind's terms
        slot = 1 if where == "slot" else 1 / speedup
        work = self.work["alone"] + self.work["slot"]
        return (alone * self.seconds["alone"] + slot * self.seconds["slot"]) / work if work else 0.0

    def left(self, todo: list, running: list) -> float:
        """Seconds until `todo` jobs (not started) and `running` ones ((job, seconds it has run) pairs) are done:
        the runs alone one at a time, the others `slots` at once."""
        total = 0.0
        for j, spent in [(j, 0.0) for j in todo] + list(running):
            where = self.where(j)
            s = self.rate(where) * (START_COST + self.epochs(j) * epoch_cost(j.config, j.kind, j.needs_teacher))
            total += max(0.0, s - spent) / (1 if where == "alone" else self.slots)
        return total
