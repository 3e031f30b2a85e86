"""Profiles: YAML files that name, per dataset, the teacher's settings and groups of student runs;
loaded and checked whole (`load_profile`), expanded into jobs (`expand`), planned against what already ran
(`plan`). Every setting is a field of `kd_lib.recipes.config.TeacherConfig` or `StudentConfig`, checked by them."""
import importlib
import itertools
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..core.models import STUDENTS
from ..infra.files import CorruptFile
from ..recipes.budget import LONG_BUDGET, twin_name
from ..recipes.config import StudentConfig, TeacherConfig
from ..recipes.records import RECORD, complete_record, recorded_params, run_dir
from .estimate import run_cost

__all__ = ["ROOT", "PROFILES", "NOTEBOOKS", "EXPANDED", "KEPT_ROOT", "MAX_ALIASES", "MAX_RUNS", "MAX_JOBS",
           "ProfileError", "RunConflict", "Job", "profiles", "kept_folder", "load_profile", "expand", "plan", "strays",
           "example", "shown"]

ROOT = Path(__file__).resolve().parents[2]
PROFILES = Path(__file__).resolve().parents[1] / "profiles"
NOTEBOOKS = ROOT / "notebooks"
EXPANDED = ("student", "method", "fraction", "seed")  # group keys that may hold a list: every combination runs
_TOP = {"name", "description", "jobs", "example", "datasets", "out_dir", "keep", "margin", "imports",
        "own_models", "long_twins", "chapter"}  # the keys of a profile
KEPT_ROOT = "results"  # a profile's `keep` folder is a folder inside this one of the repository
MAX_ALIASES = 20  # YAML aliases a profile may use: a few anchors, never a "billion laughs"
MAX_RUNS = 10_000  # runs a profile may expand to (the paper's matrix is a few hundred)
MAX_JOBS = 256  # runs a profile (or --jobs) may execute at once
NAME = r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,199}"  # a profile's name: it names folders (runs/<name>-own_models, ...)
NAME_MAX = 255  # the bytes a file or folder name may have (Linux's, and most file systems')
MODULE = r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*"  # a module of `imports`: an absolute, dotted name
_DATASET = {"dataset", "data_path", "common", "teacher", "students"}  # the keys of one of its datasets


class ProfileError(ValueError):
    "A profile is missing or malformed; the message says what to change."


class RunConflict(RuntimeError):
    "A run folder holds a run with other parameters than the profile asks for."


@dataclass
class Job:
    "One papermill run of `notebooks/<kind>.ipynb` for `config`, recorded in `run` (its folder), executed as `output`."
    config: object  # a TeacherConfig or a StudentConfig
    name: str  # "<dataset>/<run folder name>"
    run: Path
    output: Path
    out_dir: Path  # the profile's out_dir, absolute
    imports: tuple = ()  # modules the notebook imports first (the profile's `imports`: methods registered there)
    status: str = "todo"  # todo | complete | running | failed | done
    seconds: float = 0.0
    log: Path = None
    error: str = None

    @property
    def kind(self) -> str: return self.config.kind

    @property
    def notebook(self) -> Path: return NOTEBOOKS / f"{self.kind}.ipynb"

    @property
    def params(self) -> dict:
        """The notebook's parameters: the configuration's fields, `out_dir` (relative to the repository when inside)
        and the modules to `imports` first."""
        return dict(self.config.as_dict(), out_dir=shown(self.out_dir),
                    **({"imports": list(self.imports)} if self.imports else {}))

    @property
    def after(self) -> list:
        """The names of the jobs this one waits for: its dataset's teacher (a student that distils it) and its budget
        twin (a budget control, `Method.budget_of`)."""
        if self.kind == "teacher": return []
        c, of = self.config, self.config.method_def.budget_of
        return ([f"{c.dataset}/teacher"] if self.needs_teacher else []) + \
            ([f"{c.dataset}/{twin_name(c, of)}"] if of else [])

    @property
    def needs_teacher(self) -> bool:
        "A student that distils its dataset's default teacher, so waits for it."
        return self.kind == "student" and self.config.method_def.needs_teacher \
            and not self.config.teacher_path

    @property
    def cost(self) -> float:
        "The run's relative work were every step to run to its cap (`kd_lib.runner.estimate`: the time estimate's)."
        return run_cost(self.config, self.kind, self.needs_teacher)


def profiles() -> list:
    "The names of the profiles that ship with kd_lib."
    return sorted(p.stem for p in PROFILES.glob("*.yaml"))


def _unknown(where: str, keys, known) -> None:
    if bad := sorted(set(keys) - set(known)):
        raise ProfileError(f"{where}: unknown key(s) {bad}; the keys here are {', '.join(sorted(known))}.")


class _Loader(yaml.SafeLoader):
    """YAML's safe loader that refuses a key given twice in one mapping, a key that is not a name (a list or a
    mapping: `? [a, b]`), and more than `MAX_ALIASES` aliases."""
    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            self.aliases = getattr(self, "aliases", 0) + 1
            if self.aliases > MAX_ALIASES:
                raise yaml.YAMLError(f"more than {MAX_ALIASES} aliases (*name): a profile needs few, and many can "
                                     "expand without bound")
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen = set()
        for k, _ in node.value:
            if not isinstance(k, yaml.ScalarNode):
                raise yaml.YAMLError(f"a key that is a list or a mapping{k.start_mark}: a profile's keys are names")
            key = self.construct_object(k, deep=deep)
            if key in seen: raise yaml.YAMLError(f"the key {key!r} is given twice in one mapping{k.start_mark}")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _typed(where: str, prof: dict) -> None:
    "Check the types of a profile's top-level values, naming the key and what it takes."
    wants = dict(name=(str, "a name"), description=(str, "a line of text"), out_dir=(str, "a folder path"),
                 keep=(str, f"a folder inside {KEPT_ROOT}/"), example=(dict, "a mapping of run settings, e.g. "
                 "{dataset: digits, student: resnet10, method: stagewise, fraction: 1.0, seed: 0}"),
                 jobs=(int, f"a whole number of runs at once, 1 to {MAX_JOBS}"),
                 margin=((int, float), "a number of accuracy points, more than 0"),
                 chapter=(str, "the name of the notebook that shows the kept records (notebooks/<chapter>.ipynb; "
                              "default: the profile's name)"),
                 long_twins=((bool, dict), "true (every arm and the teacher get a long twin), false, or the settings "
                             "an arm's run must have to get one, e.g. {fraction: 0.25, kind: student}"),
                 own_models=(dict, "a mapping of notebooks/own_models.ipynb's parameters, e.g. {epochs: 1}"))
    for key, (t, what) in wants.items():
        v = prof.get(key)
        if v is None: continue
        takes_bool = bool in (t if isinstance(t, tuple) else (t,))  # a bool is an int, not a number of runs
        if not isinstance(v, t) or (isinstance(v, bool) and not takes_bool) or (key in ("jobs", "margin") and v <= 0):
            raise ProfileError(f"{where}: {key}={v!r}: {key} takes {what}.")
        if key == "margin" and not math.isfinite(v): raise ProfileError(f"{where}: margin={v!r}: margin takes {what}.")
        if key == "jobs" and v > MAX_JOBS:
            raise ProfileError(f"{where}: jobs={v}: at most {MAX_JOBS} runs at once (each holds a process).")
    imports = prof.get("imports") or []
    if not isinstance(imports, list) or not all(isinstance(m, str) and re.fullmatch(MODULE, m) for m in imports):
        raise ProfileError(f"{where}: imports={imports!r}: imports takes a list of module names (absolute, dotted), "
                           "e.g. [mypkg.methods].")
    for m in imports:  # methods registered there must be known here (to check the runs) and in every kernel
        try: importlib.import_module(m)
        except ImportError as e:
            raise ProfileError(f"{where}: imports: cannot import {m!r} ({e}); it must be importable from the "
                               "repository's root, where the notebooks run.") from e
    if (bad := set(prof.get("example") or {}) - set(StudentConfig.names())):
        raise ProfileError(f"{where}: example: unknown key(s) {sorted(bad)}; it names a run by its settings.")
    if isinstance(twins := prof.get("long_twins"), dict) and (bad := set(twins) - {"kind", *StudentConfig.names()}):
        raise ProfileError(f"{where}: long_twins: unknown key(s) {sorted(bad)}; it names the runs to twin by their "
                           "settings, e.g. {fraction: 0.25, kind: student}.")
    if (keep := prof.get("keep")) is not None: kept_folder(keep, ROOT, where)
    if own := prof.get("own_models"):  # the page's parameters, but its out_dir, which the book sets
        import papermill
        _unknown(f"{where}, own_models", own,
                 set(papermill.inspect_notebook(str(NOTEBOOKS / "own_models.ipynb"))) - {"out_dir"})


def _path_setting(where: str, key: str, value: str) -> None:
    "Refuse a path setting that no file system takes: a NUL byte, or a name of more than `NAME_MAX` bytes."
    if "\0" in value: raise ProfileError(f"{where}: {key} holds a NUL byte (\\0), which no path has: remove it.")
    if long := next((part for part in Path(value).parts if len(part.encode()) > NAME_MAX), None):
        raise ProfileError(f"{where}: {key}: the name {long[:40]}... is {len(long.encode())} bytes long, and a file "
                           f"or folder name has at most {NAME_MAX}: shorten it.")


def kept_folder(keep: str, root: Path = ROOT, where: str = None) -> Path:
    """`root / keep` (normalised, not resolved), when `keep` names a folder of its own directly inside the
    `KEPT_ROOT` folder of `root` (not that folder itself, nor one outside it or nested in another); else a
    `ProfileError` (`where`: the profile file, for the message)."""
    _path_setting(where or "the profile", "keep", keep)
    folder = Path(os.path.normpath(root / keep))
    if Path(keep).is_absolute() or folder.parent != root / KEPT_ROOT:
        raise ProfileError(f"{where + ': ' if where else ''}keep={keep!r}: kept records go to a folder of their "
                           f"own inside {KEPT_ROOT}/ of the repository ({KEPT_ROOT}/<profile>), nowhere else.")
    return folder


def load_profile(profile) -> dict:
    """The profile `profile`: the name of one in `kd_lib/profiles/` (smoke, digits, paper) or the path of a
    YAML file, its keys and their types checked (`expand` checks the settings); `name` defaults to the file's
    stem and `out_dir` to `runs/<name>`. A key given twice, or many YAML aliases, are errors."""
    path = Path(profile)
    if not (path.suffix in (".yaml", ".yml") or path.exists()): path = PROFILES / f"{profile}.yaml"
    if not path.is_file():
        raise ProfileError(f"No profile {profile!r}: choose one of {', '.join(profiles())} "
                           f"(kd_lib/profiles/) or give the path of a YAML file.")
    try: prof = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)  # noqa: S506 -- a SafeLoader
    except (yaml.YAMLError, UnicodeDecodeError) as e: raise ProfileError(f"{path} is not a valid profile: {e}") from e
    except RecursionError as e:
        raise ProfileError(f"{path} is not a valid profile: it nests lists or mappings too deeply (a profile needs "
                           "a few levels).") from e
    if not isinstance(prof, dict): raise ProfileError(f"{path}: a profile is a YAML mapping.")
    _unknown(str(path), prof, _TOP)
    _typed(str(path), prof)
    prof.setdefault("name", path.stem)
    if not re.fullmatch(NAME, prof["name"]):
        raise ProfileError(f"{path}: name={prof['name'][:40]!r}: a profile's name names its folders (runs/<name>, "
                           "notebooks/<name>.ipynb): letters, digits and _.- only, not starting with a dot, at most "
                           "200 of them.")
    prof.setdefault("out_dir", f"runs/{prof['name']}")
    prof["path"] = str(path)
    datasets = prof.get("datasets")
    if not isinstance(datasets, list) or not datasets:
        raise ProfileError(f"{path}: `datasets` must be a list with one entry per dataset.")
    both = set(TeacherConfig.names()) & set(StudentConfig.names())
    for d in datasets:
        if not isinstance(d, dict) or "dataset" not in d:
            raise ProfileError(f"{path}: each entry of `datasets` needs a `dataset` name.")
        where = f"{path}, dataset {d['dataset']}"
        _unknown(where, d, _DATASET)
        for key, known in (("common", both), ("teacher", TeacherConfig.names())):
            if not isinstance(d.get(key) or {}, dict): raise ProfileError(f"{where}: `{key}` is a mapping of settings.")
            _unknown(f"{where}, {key}", d.get(key) or {}, known)
        if not isinstance(d.get("students"), list) or not d["students"]:
            raise ProfileError(f"{where}: `students` must be a list of one or more groups of student runs, "
                               "for example [{student: resnet10, method: [no_teacher, stagewise]}].")
        for i, g in enumerate(d.get("students") or []):
            if not isinstance(g, dict): raise ProfileError(f"{where}: student group {i + 1} is not a mapping.")
            _unknown(f"{where}, student group {i + 1}", g, StudentConfig.names())
    return prof


def _listify(v) -> list: return list(v) if isinstance(v, (list, tuple)) else [v]


def _config(cls, settings: dict, where: str):
    try: return cls(**settings)
    except (TypeError, ValueError) as e: raise ProfileError(f"{where}: {e}") from e


def _count(prof: dict, defaults: dict) -> None:
    "Refuse a profile whose groups expand to more than `MAX_RUNS` runs, before any is made."
    n = sum(math.prod(len(_listify(g.get(k, defaults[k]))) for k in EXPANDED)
            for d in prof["datasets"] for g in d.get("students") or [])
    if n > MAX_RUNS:
        raise ProfileError(f"{prof['path']}: its student groups expand to {n:,} runs, more than {MAX_RUNS:,}: "
                           "shorten their lists (every combination of student, method, fraction and seed runs).")


def expand(prof: dict, out_dir=None) -> list:
    """The profile's jobs in order: each dataset's teacher, then every student run of every group (the
    product of the group's `student`, `method`, `fraction` and `seed` lists). Every run's settings are checked by
    its configuration: a bad one is a `ProfileError` naming its place, as is a run that two groups (or one list
    twice) make, and a budget control whose twin the profile does not run."""
    out = _out_dir(prof["path"], str(out_dir or prof["out_dir"]))
    teachers, students, seen = [], [], {}
    defaults = StudentConfig.defaults()

    def job(config):
        return Job(config, f"{config.dataset}/{config.run_name}", run_dir(out, config.dataset, config.run_name),
                   out / "notebooks" / config.dataset / f"{config.run_name}.ipynb", out,
                   tuple(prof.get("imports") or ()))
    _count(prof, defaults)
    for d in prof["datasets"]:
        ds, where = d["dataset"], f"{prof['path']}, dataset {d['dataset']}"
        base = dict(dataset=ds, data_path=d.get("data_path"), **(d.get("common") or {}))
        teachers.append(job(_config(TeacherConfig, dict(base, **(d.get("teacher") or {})), f"{where}, teacher")))
        for i, g in enumerate(d.get("students") or []):
            lists = [_listify(g.get(k, defaults[k])) for k in EXPANDED]
            if not all(lists): raise ProfileError(f"{where}, student group {i + 1}: an empty list of "
                                                  f"{', '.join(k for k, v in zip(EXPANDED, lists) if not v)}.")
            for combo in itertools.product(*lists):
                settings = dict(base, **{k: v for k, v in g.items() if k not in EXPANDED}, **dict(zip(EXPANDED, combo)))
                j = job(_config(StudentConfig, settings, f"{where}, student group {i + 1}"))
                if j.config.student not in STUDENTS:
                    raise ProfileError(f"{where}, student group {i + 1}: student={j.config.student!r}: a profile's "
                                       f"runs build their students by name, one of {', '.join(STUDENTS)} (a model of "
                                       "your own trains with kd_lib.recipes.train.train_student(student=<nn.Module>)).")
                if j.name in seen:
                    raise ProfileError(f"{where}: student groups {seen[j.name]} and {i + 1} both make the run "
                                       f"{j.name}, which can have one set of settings: remove it from one of them."
                                       if seen[j.name] != i + 1 else f"{where}, student group {i + 1} lists the run "
                                       f"{j.name} twice (a value repeated in a list).")
                seen[j.name] = i + 1
                students.append(j)
    if which := prof.get("long_twins"):
        teachers, students = _with_long_twins(teachers, job, which), _with_long_twins(students, job, which)
    names = {j.name for j in teachers + students}
    for j in students:
        if missing := [a for a in j.after if a not in names and not a.endswith("/teacher")]:
            raise ProfileError(f"{prof['path']}: {j.name} spends the budget of {missing[0]}, which the profile does "
                               "not run: add that run, or remove this one.")
    return teachers + students


def _out_dir(where: str, out_dir: str) -> Path:
    """The absolute folder of `out_dir` (relative to the repository), a path a file system takes and outside the
    repository's `KEPT_ROOT`: the kept records are read-only to runs (`kd_lib.runner.kept` writes them)."""
    _path_setting(where, "out_dir", out_dir)
    out = ROOT / out_dir  # an absolute out_dir stays as it is
    kept = (ROOT / KEPT_ROOT).resolve()
    if out.resolve() == kept or kept in out.resolve().parents:
        raise ProfileError(f"{where}: out_dir={out_dir!r} lies inside {kept}, which holds the kept records: runs "
                           f"never write there (keeping copies their records in). Give an out_dir outside "
                           f"{KEPT_ROOT}/, e.g. runs/<profile> (the default).")
    return out


def _with_long_twins(jobs: list, job, which=True) -> list:
    """`jobs`, each arm's first run (an arm: a dataset's teacher, or its student, method and fraction) followed by its
    long twin: the same settings at `LONG_BUDGET` (every epoch cap, patience and fixed schedule doubled). `which`:
    True for every arm, or the settings (a mapping) the twinned run of an arm must have (its first such run)."""
    out, arms = [], set()
    for j in jobs:
        out.append(j)
        c = j.config
        arm = (c.dataset, c.kind) + ((c.student, c.method, c.fraction) if c.kind == "student" else ())
        wanted = which is True or all(getattr(c, k, None) == v for k, v in which.items())
        if arm not in arms and wanted:
            arms.add(arm)
            out.append(job(c.replace(budget=LONG_BUDGET)))
    return out


def shown(path: Path) -> str:
    "`path` as the notebooks get it: relative to the repository root (their working folder) when inside it."
    try: return Path(path).relative_to(ROOT).as_posix()
    except ValueError: return str(path)


def plan(jobs: list) -> list:
    """Mark each job `complete` when its run folder holds a complete record with the job's parameters
    (it is not started again), `failed` (with its `error`) when a file of its folder is corrupt, else `todo`;
    raise `RunConflict` when a folder holds other parameters."""
    bad = []
    for j in jobs:
        try:
            params = recorded_params(j.run)
            if params is not None and (c := j.config.conflicts(params)):
                what = ", ".join(f"{k} was {a!r}, the profile wants {b!r}" for k, (a, b) in c.items())
                bad.append(f"{j.run}: {what}")
                continue
            j.status = "complete" if complete_record(j.run) is not None else "todo"
        except CorruptFile as e:  # reported as this run's failure; the others go on
            j.status, j.error = "failed", str(e)
    if bad:
        raise RunConflict("These run folders hold runs with other parameters than the profile's:\n  "
                          + "\n  ".join(bad) + "\nDelete them, or give the profile another out_dir.")
    return jobs


def strays(jobs: list) -> list:
    "Record files under the jobs' out_dir that belong to none of the jobs (the figures would include them)."
    if not jobs: return []
    mine = {j.run / RECORD for j in jobs}
    return sorted(p for p in jobs[0].out_dir.rglob(RECORD) if p not in mine)


def example(prof: dict, jobs: list) -> tuple:
    "The teacher and student jobs the book shows: the profile's `example` (dataset, student, method, ...)."
    ex = dict(prof.get("example") or {})
    ds = ex.pop("dataset", prof["datasets"][0]["dataset"])
    teacher = next((j for j in jobs if j.kind == "teacher" and j.config.dataset == ds), None)
    students = [j for j in jobs if j.kind == "student" and j.config.dataset == ds
                and all(k in j.params and j.params[k] == v for k, v in ex.items())]
    if teacher is None or not students:
        raise ProfileError(f"The profile's example {prof.get('example')} matches none of its runs: name the "
                           "dataset, student, method, fraction and seed of one of them.")
    return teacher, students[0]
