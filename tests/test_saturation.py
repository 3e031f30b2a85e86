"""Long twins: every arm's first seed, and the teacher, run again with every budget doubled; what the doubling added
decides whether a claim may have a verdict (tests/test_claims.py has the gate)."""
import numpy as np
import pandas as pd
import pytest
import yaml

from kd_lib.recipes.budget import LONG_BUDGET
from kd_lib.recipes.config import StudentConfig, TeacherConfig
from kd_lib.recipes.records import run_name
from kd_lib.runner import expand, load_profile
from kd_lib.evidence.saturation import SATURATED_BELOW, long_twins, normal_runs, saturation
from kd_lib.recipes.train import train_student, train_teacher


def test_a_profile_with_long_twins_runs_one_per_arm_and_one_for_the_teacher(write_profile):
    path = write_profile([dict(student="resnet10", method=["no_teacher", "stagewise"], fraction=[1.0, 0.25],
                               seed=[3, 1], epochs=2, patience=1),
                          dict(student="resnet10", method="no_teacher_budget", fraction=1.0, seed=[3, 1],
                               schedule="one_cycle")])
    prof = load_profile(path)
    assert not [j for j in expand(prof) if j.config.budget != 1]  # off unless asked for
    jobs = expand(dict(prof, long_twins=True))
    twins = {j.name: j for j in jobs if j.config.budget == LONG_BUDGET}
    assert sorted(twins) == sorted(["digits/teacher-x2"] + [
        f"digits/resnet10-{m}-f{f}-s3-x2" for m, f in (("no_teacher", 1), ("no_teacher", 0.25), ("stagewise", 1),
                                                      ("stagewise", 0.25), ("no_teacher_budget", 1))])
    for name, j in twins.items():  # everything else equal to the arm's first run
        normal = next(k for k in jobs if k.name == name.removesuffix("-x2"))
        assert j.config.replace(budget=1) == normal.config and j.cost > normal.cost
    assert twins["digits/resnet10-stagewise-f1-s3-x2"].after == ["digits/teacher"]  # the teacher students distil
    assert twins["digits/resnet10-no_teacher_budget-f1-s3-x2"].after == ["digits/resnet10-stagewise-f1-s3"]
    some = expand(dict(prof, long_twins=dict(kind="student", fraction=0.25)))  # only the arms with these settings
    assert sorted(j.name for j in some if j.config.budget == LONG_BUDGET) == [
        f"digits/resnet10-{m}-f0.25-s3-x2" for m in ("no_teacher", "stagewise")]
    with_key = yaml.safe_load(path.read_text()) | dict(long_twins=dict(fractio=0.25))
    path.write_text(yaml.safe_dump(with_key))
    with pytest.raises(ValueError, match=r"long_twins: unknown key\(s\) \['fractio'\]"):
        load_profile(path)
    with_key = yaml.safe_load(path.read_text()) | dict(long_twins="yes")
    path.write_text(yaml.safe_dump(with_key))
    with pytest.raises(ValueError, match="long_twins='yes': long_twins takes true"):
        load_profile(path)


def test_names_and_budgets_of_long_twins():
    c = StudentConfig(student="resnet10", method="stagewise", fraction=0.25, seed=2, epochs=7, patience=3)
    assert c.run_name == "resnet10-stagewise-f0.25-s2" and c.replace(budget=2).run_name.endswith("-s2-x2")
    assert run_name(dict(kind="teacher", budget=2)) == "teacher-x2" == TeacherConfig(budget=2).run_name
    long = c.replace(budget=2)
    assert (long.scaled(long.epochs), long.scaled(long.patience), long.scaled(None)) == (14, 6, None)
    with pytest.raises(ValueError, match="budget=0: a multiplier"):
        c.replace(budget=0)


def test_a_long_twin_trains_twice_the_epochs_and_patience(tmp_path, tiny, teacher_path):
    args = tiny | dict(out_dir=tmp_path, teacher_path=str(teacher_path), progress=False)
    twin = train_student(**args, method="stagewise", epochs=1, patience=1)
    used = sum(s["epochs_run"] for s in twin["stages"])
    long = train_student(**args, method="stagewise", epochs=1, patience=1, budget=2)
    assert [s["epochs"] for s in long["stages"]] == [2] * len(twin["stages"])  # every cap doubled
    assert (tmp_path / "digits" / "resnet10-stagewise-f0.25-s0-x2" / "record.json").exists()
    budget = train_student(**args, method="no_teacher_budget", schedule="one_cycle", budget=2)
    assert budget["budget"] == dict(twin="resnet10-stagewise-f0.25-s0", epochs=2 * used)  # twice the normal twin's
    assert budget["stages"][0]["epochs_run"] == 2 * used
    teacher = train_teacher(dataset="digits", size=16, bs=32, epochs=1, pretrained=False, out_dir=tmp_path,
                            budget=2, progress=False)
    assert teacher["stages"][0]["epochs_run"] == 2 and (tmp_path / "digits" / "teacher-x2").is_dir()
    assert long["teacher"]["path"] == str(teacher_path)  # outside out_dir: as given


def test_a_student_record_keeps_its_teacher_relative_to_out_dir(tmp_path, tiny):
    train_teacher(dataset="digits", size=16, bs=32, epochs=1, pretrained=False, out_dir=tmp_path, progress=False)
    record = train_student(**tiny, method="simultaneous", epochs=1, out_dir=tmp_path, progress=False)
    assert record["teacher"]["path"] == "digits/teacher"  # no machine's folders in a record


def test_saturation_pairs_each_twin_with_its_own_run():
    rows = [dict(kind="teacher", dataset="d", seed=0, budget=b, test_accuracy=a) for b, a in ((1, 70.0), (2, 70.4))]
    rows += [dict(kind="student", dataset="d", student="r10", method=m, fraction=f, seed=s, budget=b,
                  test_accuracy=a)
             for m, f, s, b, a in (("sw", 1.0, 0, 1, 60.0), ("sw", 1.0, 1, 1, 65.0), ("sw", 1.0, 0, 2, 61.0),
                                   ("nt", 0.25, 0, 1, 50.0), ("nt", 0.25, 0, 2, 49.0), ("nt", 1.0, 0, 1, 55.0))]
    r = pd.DataFrame(rows)
    assert len(normal_runs(r)) == 5 and len(long_twins(r)) == 3
    sat = saturation(r).set_index(["method", "fraction"])
    assert sat.loc[("sw", 1.0), "gain"] == pytest.approx(1.0) and not sat.loc[("sw", 1.0), "saturated"]  # 1.0: not
    assert sat.loc[("nt", 0.25), "saturated"] and sat.loc[("teacher", 1.0), "gain"] == pytest.approx(0.4)
    assert SATURATED_BELOW == 1.0
    old = r.assign(budget=np.where(r["budget"] == 2, 2, np.nan))  # records made before runs had a budget: 1
    assert np.isclose(saturation(old)["normal"], [50.0, 60.0, 70.0]).all()
