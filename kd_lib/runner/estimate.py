"""The runner's time estimate, from the runs' sizes: a run's work is its epochs x the images of an epoch x the cost
of one image through its model and method (`epoch_cost`, relative units), and this machine's seconds per unit of
work are measured on the runs already finished (their records say how many epochs each ran), teachers apart from
students (a teacher runs alone on every core). Early stopping is a guess until runs of the method have stopped:
`FILL` of the epochs allowed, then what the finished runs of that method (else of any) used."""
from ..methods import get_method

__all__ = ["FILL", "START_COST", "epoch_cost", "allowed_epochs", "run_cost", "Estimate"]

FILL = 0.7  # the share of its allowed epochs a run with early stopping is taken to use, until runs have shown theirs
START_COST = 2.0  # a run's start, imports and record, in units of one no_teacher epoch of resnet10 on all the data
TEACHER_EPOCH = 3.3  # an epoch of the teacher (ResNet34, all the data), in the same units


def epoch_cost(config, kind: str, needs_teacher: bool = False) -> float:
    """The work of one epoch of one step of a run, relative to an epoch of resnet10 without a teacher on all the data:
    its model's depth, its method's cost (the teacher's work each batch, the cache) and the images of an epoch."""
    if kind == "teacher": return TEACHER_EPOCH
    depth = 1 + 0.1 * (int(config.student.removeprefix("resnet")) - 10)  # resnet26 ~ 2.6 x resnet10
    valid = 0.35 if needs_teacher else 0.1  # the validation share, which no fraction shrinks
    per_step = get_method(config.method).epoch_cost(config.cache is True) / len(_steps(config))
    return per_step * depth * (config.fraction + valid) / (1 + valid)


def _steps(config) -> tuple:
    "A student run's steps; a budget control's, those of its twin's method (whose epochs it trains in one step)."
    method = get_method(config.method)
    return (get_method(method.budget_of) if method.budget_of else method).steps_for()


def allowed_epochs(config, kind: str) -> int:
    "The epochs a run may train in all, every step at its cap (a budget control: its twin's), times its `budget`."
    return config.scaled(config.epochs if kind == "teacher" else sum(getattr(config, s.epochs) for s in _steps(config)))


def run_cost(config, kind: str, needs_teacher: bool = False) -> float:
    "A run's work were every step to run to its cap (`Job.cost`)."
    return START_COST + allowed_epochs(config, kind) * epoch_cost(config, kind, needs_teacher)


def _ran(record: dict) -> int: return sum(s["epochs_run"] for s in record.get("stages") or [])


def _stops(config, kind: str) -> bool:
    "Whether the run stops early (patience), so may train fewer epochs than allowed."
    return kind != "teacher" and getattr(config, "patience", None) is not None


class Estimate:
    """Seconds left of `jobs` (`Job`s), `slots` at once, learning from each finished job (`finished`) this
    machine's seconds per unit of work and the share of their epochs that runs with early stopping use."""
    def __init__(self, jobs: list, slots: int = 1):
        self.jobs, self.slots = jobs, max(1, slots)
        self.seconds, self.work = {"teacher": 0.0, "student": 0.0}, {"teacher": 0.0, "student": 0.0}
        self.used, self.allowed = {}, {}  # per method with early stopping: epochs its finished runs ran, and allowed
        self.ran = {}  # job name -> epochs it ran in all

    def finished(self, job, seconds: float, record: dict) -> None:
        "Learn from `job`, finished in `seconds` with its `record` (None: nothing to learn, a failed run)."
        if record is None: return
        ran, c = _ran(record), job.config
        self.ran[job.name] = ran
        self.seconds[job.kind] += seconds
        self.work[job.kind] += START_COST + ran * epoch_cost(c, job.kind, job.needs_teacher)
        if _stops(c, job.kind):
            self.used[c.method] = self.used.get(c.method, 0) + ran
            self.allowed[c.method] = self.allowed.get(c.method, 0) + allowed_epochs(c, job.kind)

    def epochs(self, job) -> float:
        "The epochs `job` is expected to run in all."
        c = job.config
        if job.kind == "student" and get_method(c.method).budget_of:
            twin = next((j for j in self.jobs if j.name in job.after and not j.name.endswith("/teacher")), None)
            if twin is not None: return c.budget * (self.ran.get(twin.name) or self.epochs(twin))  # a long twin: x2
        if not _stops(c, job.kind): return allowed_epochs(c, job.kind)
        fill = self.used[c.method] / self.allowed[c.method] if c.method in self.allowed else FILL
        return fill * allowed_epochs(c, job.kind)

    def rate(self, kind: str) -> float:
        """Seconds per unit of work of a `kind` run in its slot: every finished run is evidence of this machine's speed,
        weighed by its work, a teacher's seconds counting `slots` times a student's (it had every slot's cores)."""
        teacher = self.slots if kind == "student" else 1  # a teacher's seconds, in this kind's slot
        student = 1 if kind == "student" else 1 / self.slots
        work = self.work["teacher"] + self.work["student"]
        return (teacher * self.seconds["teacher"] + student * self.seconds["student"]) / work if work else 0.0

    def left(self, todo: list, running: list) -> float:
        """Seconds until `todo` jobs (not started) and `running` ones ((job, seconds it has run) pairs) are done:
        teachers one at a time, students `slots` at once."""
        total = 0.0
        for j, spent in [(j, 0.0) for j in todo] + list(running):
            s = self.rate(j.kind) * (START_COST + self.epochs(j) * epoch_cost(j.config, j.kind, j.needs_teacher))
            total += max(0.0, s - spent) / (1 if j.kind == "teacher" else self.slots)
        return total
