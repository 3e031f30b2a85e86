"""Kept results: the records of a profile whose runs take hours, copied into the repository as JSON (the
profile's `keep` folder inside ``results/``, e.g. ``results/cifar10``), each naming the commit of the code that made
it, with the fp16 weights of the teacher its students distil (so the set can be extended on any machine), so the
book's chapter on them (``notebooks/<chapter>.ipynb``) builds from a fresh clone without running them.

A kept folder is sealed: `MANIFEST` lists every file in it with its sha256, the hash of the profile's run
settings and the code commits of the records, and `LOG` lists every record set kept there, with the verdicts of
the paper's claims it gave when it was kept. `check_kept` verifies the folder against its manifest (a file changed,
missing or added), and the chapter refuses to draw from a folder that fails it.

Keeping writes and removes nothing outside its folder: every path (those its manifest names included) must lie
inside it and pass through no symbolic link, and a folder holding records kept for other run settings is replaced
only when asked (`replace`, the runner's --replace), and then only records git holds committed (`keep_plan`).
"""
import datetime
import hashlib
import json
import os
import shutil
from pathlib import Path

from ..evidence.claims import IdenticalArms, MARGIN, claims, verdicts
from ..evidence.collect import collect
from ..infra.files import CorruptFile, atomic_write, read_json, write_json
from ..recipes.records import RECORD, checked_record, complete_record, git, run_name
from .profiles import KEPT_ROOT, NOTEBOOKS, ProfileError, ROOT, kept_folder, load_profile, profiles

__all__ = ["MANIFEST", "LOG", "kept_profiles", "settings_hash", "claim_verdicts", "keep_plan", "keep_records",
           "add_set", "seal", "reseal", "replace_rule",
           "kept_records", "check_kept"]

MANIFEST = "MANIFEST.json"  # a kept folder's seal: each file's sha256, the profile's settings hash, the commits
LOG = "record_sets.json"  # every record set kept in the folder, with the verdicts it gave
_RESTORE = "restore it from git (git checkout -- it)"  # what to do about a kept file that is not as it was kept


def kept_profiles() -> list:
    """The shipped profiles whose records are kept (a `keep` folder), each with its chapter notebook
    `notebooks/<name>.ipynb`; a `ProfileError` when that notebook is missing."""
    out = [p for p in map(load_profile, profiles()) if p.get("keep")]
    for p in out:
        if not (NOTEBOOKS / f"{chapter(p)}.ipynb").exists():
            raise ProfileError(f"Profile {p['name']!r} keeps its records in {p['keep']} but has no chapter "
                               f"notebook notebooks/{chapter(p)}.ipynb to show them.")
    return out


def chapter(prof: dict) -> str:
    "The name of the notebook that shows a kept profile's records: its `chapter`, else the profile's own name."
    return prof.get("chapter") or prof["name"]


def _sha256(path: Path) -> str: return hashlib.sha256(path.read_bytes()).hexdigest()


def settings_hash(jobs: list) -> str:
    """The sha256 of the run settings of `jobs` (a profile's, expanded), settings at their defaults left out (a
    setting added later, at the default that keeps what runs did before it, changes nothing): it changes when the
    profile's runs change."""
    return hashlib.sha256(json.dumps(sorted([j.name, j.config.changed()] for j in jobs), sort_keys=True).encode()
                          ).hexdigest()


def _dest(prof: dict) -> Path:
    "The profile's keep folder, which must be a folder of its own inside the repository's `results/`, not a link."
    return _safe(ROOT, kept_folder(prof["keep"], ROOT))


def _safe(folder: Path, name) -> Path:
    """`folder / name`, a path that keeping writes or removes, when it lies inside `folder` and no part of it from
    `folder` down is a symbolic link; else a `ProfileError`: nothing outside `results/` is touched."""
    if "\0" in str(name):
        raise ProfileError(f"{name!r} holds a NUL byte, which no file name has (a {MANIFEST} the runner did not "
                           f"write? {_RESTORE}).")
    path = Path(os.path.normpath(folder / name))
    if path != folder and folder not in path.parents:
        raise ProfileError(f"{name!r} lies outside {folder}: a kept folder's files are inside it (a {MANIFEST} the "
                           "runner did not write? restore it from git: git checkout -- it).")
    if link := next((p for p in (path, *path.parents) if (p == folder or folder in p.parents) and p.is_symlink()),
                    None):
        raise ProfileError(f"{link} is a symbolic link: kept records are written and removed inside {KEPT_ROOT}/ "
                           "only, never through a link. Replace it by a folder.")
    return path


def _manifest(folder: Path) -> dict:
    "`folder`'s manifest (None when there is none), a `CorruptFile` when it is not of a manifest's shape."
    manifest = read_json(folder / MANIFEST, fix=_RESTORE)
    files = (manifest or {}).get("files", {})
    if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
        raise CorruptFile(f"{folder / MANIFEST}: its `files` is not a mapping of file name to sha256: {_RESTORE}.")
    return manifest


def _log(folder: Path) -> dict:
    "`folder`'s `LOG` ({} when there is none), a `CorruptFile` when its sets, reseals or rules are no lists of entries."
    log = read_json(folder / LOG, fix=_RESTORE) or {}
    if bad := [k for k in ("sets", "reseals", "rules") if not isinstance(entries := log.get(k, []), list)
               or not all(isinstance(e, dict) for e in entries)]:
        raise CorruptFile(f"{folder / LOG}: its `{bad[0]}` is not a list of entries: {_RESTORE}.")
    return log


def _place(folder: Path, path: Path, record: dict) -> str:
    """What is wrong with keeping the complete `record` as `path` in `folder`: its params name another run than
    `<dataset>/<run>` of its place (a record moved, or its params edited); None when nothing is."""
    where, params = path.parent.relative_to(folder).as_posix(), record.get("params") or {}
    try: meant = f"{params.get('dataset')}/{run_name(params)}"
    except (KeyError, TypeError, ValueError): meant = "no run"
    if meant == where: return None
    return f"{path}: its params make it the record of {meant}, not of {where} (moved or edited? {_RESTORE})"


def _misplaced(folder: Path) -> list:
    "The kept records under `folder` that are complete and not where their params put them (`_place`), one line each."
    return [why for p in kept_records(folder) if (r := read_json(p, fix=_RESTORE)).get("status") == "complete"
            and (why := _place(folder, p, r))]


def _committed(path: Path) -> bool:
    "Whether git holds `path` committed as it is (tracked and unchanged), so that git can restore it."
    return git("ls-files", "--error-unmatch", "--", str(path)) is not None \
        and git("status", "--porcelain", "--", str(path)) == ""


def keep_plan(prof: dict, jobs: list, replace: bool = False) -> tuple:
    """The profile's keep folder and the names of the records there that keeping `jobs` may replace or remove,
    checked before any run (every path inside the folder, through no link). A folder holding records sealed for
    other run settings (another profile's, or this one's before it changed), or not sealed, is refused unless
    `replace` (the runner's --replace), and even then when git does not hold each of its records committed. What
    keeping would fail on later is refused here, before anything is written: a manifest naming a folder, a log not of
    a log's shape, a record kept where its params do not put it."""
    dest = _dest(prof)
    manifest = _manifest(dest)
    _log(dest)
    old = list((manifest or {}).get("files", {}))
    for name in [*old, *(f"{j.name}/{RECORD}" for j in jobs), LOG, MANIFEST]: _safe(dest, name)
    if folder := next((n for n in old if (dest / n).is_dir()), None):
        raise ProfileError(f"{dest / MANIFEST} lists {folder!r}, a folder, where it lists the files kept: "
                           f"{_RESTORE}.")
    theirs = [p.relative_to(dest).as_posix() for p in kept_records(dest)]
    if theirs and (manifest or {}).get("settings_sha256") != settings_hash(jobs):
        if not replace:
            raise ProfileError(f"{dest} holds {len(theirs)} records kept for other run settings (another profile's, "
                               "or this one's before it changed): keeping this profile's would replace them. Give "
                               "the runner --replace to replace them, or keep into a folder of its own.")
        if loose := [n for n in theirs if not _committed(dest / n)]:
            raise ProfileError(f"--replace removes only records git holds committed (git can restore them), and "
                               f"{len(loose)} in {dest} are not, e.g. {loose[0]}: commit them, or move them away.")
        old = theirs
    elif misplaced := _misplaced(dest): raise ProfileError(misplaced[0])
    return dest, [n for n in old if n.endswith((RECORD, ".pth"))]


def claim_verdicts(folder, margin: float = MARGIN) -> dict:
    "Claim id -> its verdicts on the records under `folder` (claim 2's `margin`), for a `LOG` entry."
    try: table = claims(collect(folder), margin=margin)
    except IdenticalArms as e: return {"all": f"none: {e}"}
    return {k.removeprefix("verdict_"): v for k, v in verdicts(table).items()}


def keep_records(prof: dict, jobs: list, verdicts=None, note: str = None, replace: bool = False,
                 only=None) -> Path:
    """Copy the record of each complete job of `prof` into its `keep` folder as `<dataset>/<run>/record.json`
    (and the weights of the teacher its students distil, `_teacher_weights`; nothing else of a run folder), each
    checked before the first is written (`keep_plan`, `_place`), remove the records kept there before for runs the
    profile no longer has (those its manifest lists: nothing it did not write is touched; with
    `replace`, those `keep_plan` allows), add the set to `LOG` (when its runs finished, their commits and seeds,
    `verdicts(folder)`: a dict of claim -> verdict, when given, and the `note` of whoever keeps it: how the set was
    made), and seal the folder (`MANIFEST`). `only`: the names of the jobs to keep (a set being made, kept as its
    arms' normal runs and long twins are both done), the folder sealed for all of `jobs` all the same."""
    dest, old = keep_plan(prof, jobs, replace)
    records = {}  # every record and teacher's weights checked before the first is written
    for j in jobs:
        if only is not None and j.name not in only: continue
        try: record = complete_record(j.run)
        except CorruptFile: continue  # the runner reported it as failed
        if record is None: continue
        if why := _place(dest, dest / j.name / RECORD, record): raise ProfileError(why)
        records[j.name] = record, _teacher_weights(Path(j.run), record)
    new = {n for name, (record, weights) in records.items() for n in _keep(dest, name, record, weights)}
    for name in old:
        if name not in new: (dest / name).unlink(missing_ok=True)
    _log_set(dest, [record for record, _ in records.values()], verdicts, note)
    seal(dest, settings_hash(jobs))
    return dest


def add_set(prof: dict, jobs: list, runs: dict, note: str, verdicts=None) -> Path:
    """Add runs made apart (run name -> its run folder: the long twins of a kept set, made later, say) to the
    keep folder of `prof` (its runs: `jobs`) as a record set of their own, beside the records kept there, none of
    which is changed or removed: each run must be one of the profile's, complete, made from committed code, and not
    kept yet. The set is
    logged in `LOG` (with `verdicts(folder)` of every record the folder then holds, and the `note`: how and where
    they were made; by default `claim_verdicts` at the profile's margin) and the folder sealed again for the
    profile's run settings."""
    verdicts = verdicts or (lambda folder: claim_verdicts(folder, prof.get("margin", MARGIN)))
    dest, _ = keep_plan(prof, jobs)
    names, records = {j.name for j in jobs}, {}
    for name, run in runs.items():
        record = complete_record(Path(run))
        why = ("is not one of the profile's runs" if name not in names else "is kept already"
               if (dest / name / RECORD).exists() else "is not complete" if record is None
               else "was made from code with changes not committed" if _code(record).get("dirty") else None)
        if why: raise ProfileError(f"{name} ({run}) {why}: a set added to {dest} holds complete runs of the "
                                   "profile's, made from committed code, that the folder does not hold yet.")
        if why := _place(dest, dest / name / RECORD, record): raise ProfileError(why)
        records[name] = record, _teacher_weights(Path(run), record)
    for name, (record, weights) in records.items(): _keep(dest, name, record, weights)
    _log_set(dest, [record for record, _ in records.values()], verdicts, note)
    seal(dest, settings_hash(jobs))
    return dest


def _teacher_weights(run: Path, record: dict) -> Path:
    """The weights of a teacher its students distil (kind teacher, budget 1), which a kept set keeps beside its
    record so it can be extended on any machine: the fp16 state dict `train_teacher` keeps (`kd_lib.recipes.train`), the
    exact teacher its students distilled, at half the size. None for another run; a `ProfileError` when missing."""
    if record.get("kind") != "teacher" or record["params"].get("budget", 1) != 1: return None
    source = run / (record.get("weights") or "teacher.pth")
    if not source.is_file():
        raise ProfileError(f"{source}: the teacher's weights are missing, and a kept set keeps them (its students "
                           "distil them; without them the set cannot be extended): train the teacher again.")
    return source


def _keep(dest: Path, name: str, record: dict, weights: Path = None) -> list:
    "Write the run `name`'s `record` (and a copy of its teacher's `weights`) into `dest`; their names there."
    kept = [f"{name}/{RECORD}"] + ([f"{name}/{weights.name}"] if weights else [])
    write_json(_safe(dest, kept[0]), record)
    if weights: atomic_write(_safe(dest, kept[1]), lambda tmp: shutil.copyfile(weights, tmp))
    return kept


def _log_set(dest: Path, records: list, verdicts, note: str = None) -> None:
    "Append the set of `records` to `dest`'s `LOG`: when kept and made, their commits and seeds, verdicts, the note."
    log = _log(dest)
    finished = sorted(r["finished"] for r in records if r.get("finished"))
    log["sets"] = log.get("sets", []) + [dict(
        kept=datetime.datetime.now().astimezone().isoformat(timespec="seconds"), runs=len(records),
        made=f"{finished[0]} to {finished[-1]}" if finished else None,
        commits=sorted({_code(r).get("commit") or "none" for r in records}),
        seeds=sorted({r["params"].get("seed") for r in records if r["kind"] == "student"}),
        verdicts=verdicts(dest) if verdicts else {}, **({"note": note} if note else {}))]
    write_json(dest / LOG, log)


def _code(record: dict) -> dict:
    "The record's `versions.code` (its commit and whether the code differed), {} when it has none."
    code = (record.get("versions") or {}).get("code")
    return code if isinstance(code, dict) else {}


def seal(folder: Path, settings: str) -> Path:
    """Write `folder`'s `MANIFEST`: every file under it (but the manifest) with its sha256, `settings`, the commits;
    a `ProfileError` when a complete record is not where its params put it (`_place`): the seal binds each to its
    place."""
    if misplaced := _misplaced(folder): raise ProfileError(f"Not sealing {folder}: {'; '.join(misplaced)}")
    files = {p.relative_to(folder).as_posix(): _sha256(p) for p in sorted(folder.rglob("*"))
             if p.is_file() and p.name != MANIFEST}
    commits = sorted({_code(read_json(folder / n)).get("commit") or "none" for n in files if n.endswith(RECORD)})
    return write_json(folder / MANIFEST, dict(settings_sha256=settings, commits=commits, files=files))


def reseal(folder, jobs: list, why: str) -> Path:
    """Seal `folder` again for the run settings of `jobs` after its files were changed on purpose (records rewritten,
    the profile's settings grown), and log it in `LOG` with `why` and the commit of the code: a re-seal is never
    silent."""
    folder = Path(folder)
    log = _log(folder)
    log.setdefault("reseals", []).append(dict(resealed=datetime.datetime.now().astimezone().isoformat(
        timespec="seconds"), commit=git("rev-parse", "HEAD"), why=why))
    write_json(folder / LOG, log)
    return seal(folder, settings_hash(jobs))


def replace_rule(folder, jobs: list, old: str, new: str, why: str) -> Path:
    """Log in `folder`'s `LOG` that the rule its verdicts are judged by was replaced (today, the `old` rule's words,
    the `new` one's and `why`, measured), and seal it again (`reseal`): a rule found unsound is replaced openly."""
    folder = Path(folder)
    log = _log(folder)
    log.setdefault("rules", []).append(dict(replaced=datetime.date.today().isoformat(), old=old, new=new, why=why))
    write_json(folder / LOG, log)
    return reseal(folder, jobs, f"the rule of the verdicts replaced (logged under rules): {new[:80]}...")


def kept_records(folder) -> list:
    "The paths of the kept records under `folder`, sorted."
    return sorted(Path(folder).rglob(RECORD))


def _record_problem(folder: Path, p: Path) -> str:
    "What is wrong with the kept record `p` of `folder`, or None."
    fix = f"{_RESTORE}, or keep the records again"
    try: r = checked_record(read_json(p, fix=fix), p, fix)
    except CorruptFile as e: return str(e)
    code = _code(r)
    commit = code.get("commit")
    if r.get("status") != "complete": return f"{p}: not a complete record"
    if misplaced := _place(folder, p, r): return misplaced
    if not commit: return f"{p}: names no commit of the code that made it"
    if code.get("dirty"): return f"{p}: made from code with changes not committed in {commit[:8]}"
    if git("merge-base", "--is-ancestor", commit, "HEAD") is None:
        return (f"{p}: commit {commit[:8]} is not in this repository's history (a shallow clone? "
                "`git fetch --unshallow`)")
    return None


def check_kept(folder, jobs: list = None) -> list:
    """What is wrong with the kept folder `folder`, one line each (empty when nothing is): no manifest; a file
    changed since it was sealed, missing, or not in the manifest; a record that is not complete, names no commit,
    was made from code that differed from its commit, names a commit that is not in this repository's history, or
    is not where its params put it; and with the profile's `jobs`, a record of none of them, and run settings other
    than those the records were kept for."""
    folder = Path(folder)
    try: manifest = _manifest(folder)
    except CorruptFile as e: return [str(e)]
    if manifest is None:
        return [f"{folder} has no {MANIFEST}: its records are not sealed (the runner seals what it keeps)"]
    sealed, problems = manifest.get("files", {}), []
    for n in sealed:
        try: path = _safe(folder, n)
        except ProfileError as e: problems.append(str(e))
        else:
            if not path.is_file(): problems.append(f"{path}: missing (the manifest lists it)")
    for p in sorted(folder.rglob("*")):
        name = p.relative_to(folder).as_posix()
        if p.is_symlink(): problems.append(f"{p}: a symbolic link (a kept folder holds files of its own only)")
        if not p.is_file() or p.is_symlink() or name == MANIFEST: continue
        if name not in sealed: problems.append(f"{p}: not in the manifest (added after the records were kept)")
        elif _sha256(p) != sealed[name]: problems.append(f"{p}: changed since the records were kept")
    problems += [pr for p in kept_records(folder) if (pr := _record_problem(folder, p))]
    if jobs is not None:
        runs = {j.name for j in jobs}
        problems += [f"{p}: not a run of the profile" for p in kept_records(folder)
                     if p.parent.relative_to(folder).as_posix() not in runs]
        if manifest.get("settings_sha256") != settings_hash(jobs):
            problems.append(f"{folder}: kept for other run settings than the profile's now (make book PROFILE=... "
                            "makes and keeps them again)")
    return problems

