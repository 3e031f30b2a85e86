"""What a chapter drawn from kept records shows of them (CIFAR-10's, Imagewoof's): the records of a kept folder as
its seal allows (`kept_set`), its log of record sets (`kept_log`), and the provenance texts of its set
(`provenance_texts`: the data, the teacher's fit, the split check)."""
from pathlib import Path

import pandas as pd

from ..evidence.collect import collect
from ..infra.files import read_json
from ..recipes.fitting import convergence
from .kept import LOG, MANIFEST, check_kept
from .profiles import ROOT, expand, load_profile

__all__ = ["kept_set", "kept_log", "provenance_texts"]


def kept_set(folder, profile: str) -> tuple:
    """The records kept in `folder` for the profile `profile` (long twins included) and what is wrong with them,
    paths shown from the repository: a folder that fails its check gives no records."""
    folder = Path(folder)
    problems = check_kept(folder, expand(load_profile(profile))) if folder.exists() else []
    problems = [p.replace(f"{ROOT}/", "") for p in problems]  # no machine's folders on the page
    records = collect(folder) if folder.exists() else collect(folder).iloc[0:0]
    return (records.iloc[0:0] if problems else records), problems


def kept_log(folder) -> dict:
    "The log of the kept folder `folder`, while its seal holds (also when it was sealed for other run settings)."
    folder = Path(folder)
    return (read_json(folder / LOG) or {}) if (folder / MANIFEST).exists() and not check_kept(folder) else {}


def _data_text(data: dict) -> str:
    "Where the set's images came from and how they were split, from the teacher's record."
    taken = f"{data['per_class']} images per class of its training folder" if data.get("per_class") else \
        "its training folder"
    copies = data.get("copies_left_out") or []
    left_out = f"; {len(copies)} training image(s) left out as byte-identical copies of others ({', '.join(copies)})" \
        if copies else ""
    return (f"the {data['name']} folder of the data root ({data['path']}), {taken}: {data['sizes']['train']} train "
            f"and {data['sizes']['valid']} valid (split_seed {data.get('split_seed', data['seed'])}), and the "
            f"{data['sizes']['test']} test images{left_out}; split hashes train {data['hashes']['train']}, valid "
            f"{data['hashes']['valid']}, test {data['hashes']['test']}")


def _teacher_fit_text(record: dict) -> str:
    "The teacher's test accuracy, its epochs and what the convergence diagnostic says of its last window."
    fit = record["stages"][0]
    judged = convergence([h["accuracy"] for h in fit["history"]], lower=False)
    start = f"{record['test_accuracy']:.2f}% on the test set after {fit['epochs_run']} epochs (best epoch " \
            f"{fit['best_epoch'] + 1})"
    if judged["slope"] is None: return f"{start}; too few epochs for the convergence diagnostic to judge"
    return (f"{start}; its last {judged['window']} epochs rose {100 * judged['slope']:+.2f} points "
            f"an epoch, t = {judged['t']:.1f} against their own scatter ("
            + ("converged" if judged["converged"] else "not converged") + " by the diagnostic)")


def provenance_texts(records: pd.DataFrame, missing: str = None) -> dict:
    """`data_copy`, `teacher_fit` and `split_check` of a kept set's `records` (normal runs), for the chapter's
    provenance box, and `teacher_record` (the teacher's record, or None); each text is `missing` (why nothing is
    shown) when it is given, or says that the set has no teacher record."""
    teacher = records[records["kind"] == "teacher"] if len(records) else records
    record = read_json(teacher["record"].iloc[0]) if len(teacher) else None
    data = record["data"] if record else None
    valid = records[records["kind"] == "student"]["record"].map(lambda p: read_json(p)["data"]["hashes"]["valid"]) \
        if len(records) else pd.Series(dtype=str)
    none = missing or "no teacher record"
    split = (f"all {len(valid)} student records have the teacher's valid split ({data['hashes']['valid']})"
             if (valid == data["hashes"]["valid"]).all() else
             "some student records do NOT have the teacher's valid split") if data else none
    return dict(data_copy=missing or (_data_text(data) if data else none),
                teacher_fit=missing or (_teacher_fit_text(record) if record else none),
                split_check=missing or split, teacher_record=record)
