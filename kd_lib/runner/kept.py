"""Kept results: the records of a profile whose runs take hours, copied into the repository as JSON (the
profile's `keep` folder inside ``results/``, e.g. ``results/cifar10``), each naming the commit of the code that made
it, so the book's chapter on them (``notebooks/<profile>.ipynb``) builds from a fresh clone without running them.

A kept folder is sealed: `MANIFEST` lists every file in it with its sha256, the hash of the profile's run
settings and the code commits of the records, and `LOG` lists every record set kept there, with the verdicts of
the paper's claims it gave when it was kept. `check_kept` verifies the folder against its manifest (a file changed,
missing or added), and the chapter refuses to draw from a folder that fails it.
"""
import datetime
import hashlib
import json
from pathlib import Path

from ..claims import MARGIN, IdenticalArms, claims, verdicts
from ..records import RECORD, CorruptFile, collect, complete_record, git, read_json, write_json
from .profiles import KEPT_ROOT, NOTEBOOKS, ROOT, ProfileError, load_profile, profiles

__all__ = ["MANIFEST", "LOG", "kept_profiles", "settings_hash", "claim_verdicts", "keep_records", "seal", "reseal",
           "kept_records", "check_kept"]

MANIFEST = "MANIFEST.json"  # a kept folder's seal: each file's sha256, the profile's settings hash, the commits
LOG = "record_sets.json"  # every record set kept in the folder, with the verdicts it gave


def kept_profiles() -> list:
    """The shipped profiles whose records are kept (a `keep` folder), each with its chapter notebook
    `notebooks/<name>.ipynb`; a `ProfileError` when that notebook is missing."""
    out = [p for p in map(load_profile, profiles()) if p.get("keep")]
    for p in out:
        if not (NOTEBOOKS / f"{p['name']}.ipynb").exists():
            raise ProfileError(f"Profile {p['name']!r} keeps its records in {p['keep']} but has no chapter "
                               f"notebook notebooks/{p['name']}.ipynb to show them.")
    return out


def _sha256(path: Path) -> str: return hashlib.sha256(path.read_bytes()).hexdigest()


def settings_hash(jobs: list) -> str:
    """The sha256 of the run settings of `jobs` (a profile's, expanded), settings at their defaults left out (a
    setting added later, at the default that keeps what runs did before it, changes nothing): it changes when the
    profile's runs change."""
    return hashlib.sha256(json.dumps(sorted([j.name, j.config.changed()] for j in jobs), sort_keys=True).encode()
                          ).hexdigest()


def _dest(prof: dict) -> Path:
    "The profile's keep folder, which must be a folder of its own inside the repository's `results/`."
    dest, root = (ROOT / prof["keep"]).resolve(), (ROOT / KEPT_ROOT).resolve()
    if root not in dest.parents:
        raise ProfileError(f"keep={prof['keep']!r}: kept records go to a folder of their own inside {KEPT_ROOT}/ of "
                           "the repository, nowhere else.")
    return dest


def claim_verdicts(folder, margin: float = MARGIN) -> dict:
    "Claim id -> its verdicts on the records under `folder` (claim 2's equivalence `margin`), for a `LOG` entry."
    try: table = claims(collect(folder), margin=margin)
    except IdenticalArms as e: return {"all": f"none: {e}"}
    return {k.removeprefix("verdict_"): v for k, v in verdicts(table).items()}


def keep_records(prof: dict, jobs: list, verdicts=None, note: str = None) -> Path:
    """Copy the record of each complete job of `prof` into its `keep` folder as `<dataset>/<run>/record.json`
    (nothing else of the run folder: weights and notebooks stay out of git), remove the records kept there before
    for runs the profile no longer has (those its manifest lists: nothing it did not write is touched), add the
    set to `LOG` (when its runs finished, their commits and seeds, `verdicts(folder)`: a dict of claim -> verdict,
    when given, and the `note` of whoever keeps it: how the set was made), and seal the folder (`MANIFEST`)."""
    dest = _dest(prof)
    old = (read_json(dest / MANIFEST, fix="restore it from git (git checkout -- it)") or {}).get("files", {})
    new = {}
    for j in jobs:
        try: record = complete_record(j.run)
        except CorruptFile: continue  # the runner reported it as failed
        if record is None: continue
        name = f"{j.name}/{RECORD}"
        write_json(dest / name, record)
        new[name] = True
    for name in old:
        if name.endswith(RECORD) and name not in new: (dest / name).unlink(missing_ok=True)
    records = [read_json(dest / n) for n in new]
    log = read_json(dest / LOG) or {}
    sets = log.get("sets", [])
    finished = sorted(r["finished"] for r in records if r.get("finished"))
    sets.append(dict(kept=datetime.datetime.now().astimezone().isoformat(timespec="seconds"), runs=len(records),
                     made=f"{finished[0]} to {finished[-1]}" if finished else None,
                     commits=sorted({r["versions"]["code"]["commit"] for r in records}),
                     seeds=sorted({r["params"]["seed"] for r in records if r["kind"] == "student"}),
                     verdicts=verdicts(dest) if verdicts else {}, **({"note": note} if note else {})))
    write_json(dest / LOG, dict(log, sets=sets))
    seal(dest, settings_hash(jobs))
    return dest


def seal(folder: Path, settings: str) -> Path:
    "Write `folder`'s `MANIFEST`: every file under it (but the manifest) with its sha256, `settings`, the commits."
    files = {p.relative_to(folder).as_posix(): _sha256(p) for p in sorted(folder.rglob("*"))
             if p.is_file() and p.name != MANIFEST}
    commits = sorted({(read_json(folder / n).get("versions", {}).get("code") or {}).get("commit") or "none"
                      for n in files if n.endswith(RECORD)})
    return write_json(folder / MANIFEST, dict(settings_sha256=settings, commits=commits, files=files))


def reseal(folder, jobs: list, why: str) -> Path:
    """Seal `folder` again for the run settings of `jobs` after its files were changed on purpose (records rewritten,
    the profile's settings grown), and log it in `LOG` with `why` and the commit of the code: a re-seal is never
    silent."""
    folder = Path(folder)
    log = read_json(folder / LOG) or {}
    log.setdefault("reseals", []).append(dict(resealed=datetime.datetime.now().astimezone().isoformat(
        timespec="seconds"), commit=git("rev-parse", "HEAD"), why=why))
    write_json(folder / LOG, log)
    return seal(folder, settings_hash(jobs))


def kept_records(folder) -> list:
    "The paths of the kept records under `folder`, sorted."
    return sorted(Path(folder).rglob(RECORD))


def _record_problem(p: Path) -> str:
    "What is wrong with the kept record `p`, or None."
    try: r = read_json(p, fix="restore it from git (git checkout -- it), or keep the records again")
    except CorruptFile as e: return str(e)
    code = r.get("versions", {}).get("code") or {}
    commit = code.get("commit")
    if r.get("status") != "complete": return f"{p}: not a complete record"
    if not commit: return f"{p}: names no commit of the code that made it"
    if code.get("dirty"): return f"{p}: made from code with changes not committed in {commit[:8]}"
    if git("merge-base", "--is-ancestor", commit, "HEAD") is None:
        return (f"{p}: commit {commit[:8]} is not in this repository's history (a shallow clone? "
                "`git fetch --unshallow`)")
    return None


def check_kept(folder, jobs: list = None) -> list:
    """What is wrong with the kept folder `folder`, one line each (empty when nothing is): no manifest; a file
    changed since it was sealed, missing, or not in the manifest; a record that is not complete, names no commit,
    was made from code that differed from its commit, or names a commit that is not in this repository's history;
    and with the profile's `jobs`, run settings other than those the records were kept for."""
    folder = Path(folder)
    try: manifest = read_json(folder / MANIFEST, fix="restore it from git (git checkout -- it)")
    except CorruptFile as e: return [str(e)]
    if manifest is None:
        return [f"{folder} has no {MANIFEST}: its records are not sealed (the runner seals what it keeps)"]
    sealed = manifest.get("files", {})
    problems = [f"{folder / n}: missing (the manifest lists it)" for n in sealed if not (folder / n).is_file()]
    for p in sorted(folder.rglob("*")):
        name = p.relative_to(folder).as_posix()
        if not p.is_file() or name == MANIFEST: continue
        if name not in sealed: problems.append(f"{p}: not in the manifest (added after the records were kept)")
        elif _sha256(p) != sealed[name]: problems.append(f"{p}: changed since the records were kept")
    problems += [pr for p in kept_records(folder) if (pr := _record_problem(p))]
    if jobs is not None and manifest.get("settings_sha256") != settings_hash(jobs):
        problems.append(f"{folder}: kept for other run settings than the profile's now (make book PROFILE=... "
                        "makes and keeps them again)")
    return problems

