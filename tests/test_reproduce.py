"""The runner (kd_lib.runner): profiles, the expansion of a profile into runs, skipping complete runs,
the order and parallelism of the runs, and its command line. Nothing here trains or starts a kernel."""
import io
import json
import threading
import time

import papermill as pm
import pytest
import yaml

from conftest import complete
from kd_lib import runner as rp
from kd_lib.recipes.config import StudentConfig
from kd_lib.runner.cli import main
from kd_lib.recipes.records import run_name

TINY = dict(name="tiny", datasets=[dict(
    dataset="digits", common=dict(size=16, bs=16, lr=1e-3),
    teacher=dict(epochs=1, pretrained=False),
    students=[dict(student=["resnet10", "resnet14"], method=["no_teacher", "stagewise"], fraction=1.0, seed=[0, 1],
                   epochs=1),
              dict(student="resnet10", method=["stagewise", "no_teacher"], fraction=0.25, seed=0, epochs=1)])])


def tiny(tmp_path, **changes) -> dict:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(dict(TINY, out_dir=str(tmp_path / "runs"), **changes)))
    return rp.load_profile(path)


def write_record(job, status="complete", **changes):
    params = dict(job.config.params(), **changes)
    job.run.mkdir(parents=True, exist_ok=True)
    (job.run / "record.json").write_text(json.dumps(complete(job.kind, params, status=status)))


@pytest.mark.parametrize("name", ["smoke", "digits", "paper"])
def test_shipped_profiles_expand_to_notebook_parameters(name):
    prof = rp.load_profile(name)
    jobs = rp.expand(prof)
    teachers = [j for j in jobs if j.kind == "teacher"]
    assert len(teachers) == 2 * len(prof["datasets"]) and jobs[:len(teachers)] == teachers  # each with its long twin
    for kind in ("teacher", "student"):
        known = set(pm.inspect_notebook(str(rp.NOTEBOOKS / f"{kind}.ipynb")))
        for j in jobs:
            if j.kind == kind: assert set(j.params) <= known, (j.name, set(j.params) - known)
    names = [j.name for j in jobs]
    assert len(names) == len(set(names))
    rp.example(prof, jobs)  # the run the book shows is one of the profile's


def test_shipped_profile_sizes():
    count = {n: len([j for j in rp.expand(rp.load_profile(n)) if j.kind == "student"])
             for n in ("smoke", "digits", "cifar10", "cifar10-budget", "paper")}
    assert count == {"smoke": 28, "digits": 77, "cifar10": 35, "cifar10-budget": 14, "paper": 150}
    digits = rp.expand(rp.load_profile("digits"))
    students = {j.params["student"] for j in digits if j.kind == "student"}
    assert students == {"resnet10"}
    seeds = {j.params["seed"] for j in digits if j.kind == "student" and j.params["method"] == "stagewise"}
    assert seeds == set(range(10))  # ten pairs, so that claim 1 can see about a point
    full = {(j.params["method"]) for j in digits if j.kind == "student" and j.params["fraction"] == 1.0}
    assert full == {"no_teacher", "no_teacher_budget", "simultaneous", "stagewise"}
    small = {j.params["method"] for j in digits if j.kind == "student" and j.params["fraction"] < 1}
    assert small == {"no_teacher", "no_teacher_budget", "stagewise"}
    budget = rp.expand(rp.load_profile("cifar10-budget"))  # set 4: every arm of set 3 at seed 0, and doubled
    assert {j.params["seed"] for j in budget if j.kind == "student"} == {0}
    assert {j.config.budget for j in budget} == {1, 2} and len(budget) == 16


def test_expand_is_the_product_of_the_lists(tmp_path):
    jobs = rp.expand(tiny(tmp_path))
    students = [j for j in jobs if j.kind == "student"]
    # 2 students x 2 methods x 2 seeds, then resnet10 x 2 methods at a quarter
    assert len(students) == 8 + 2
    assert jobs[0].name == "digits/teacher" and jobs[0].run == tmp_path / "runs" / "digits" / "teacher"
    assert jobs[0].params["out_dir"] == str(tmp_path / "runs") and jobs[0].out_dir == tmp_path / "runs"
    j = next(j for j in students if j.params["fraction"] == 0.25)
    assert j.name == "digits/resnet10-stagewise-f0.25-s0" == f"digits/{run_name(j.params)}"
    assert j.config == StudentConfig(dataset="digits", size=16, bs=16, lr=1e-3, epochs=1, student="resnet10",
                                     method="stagewise", fraction=0.25, seed=0)
    assert set(j.params) == set(StudentConfig.names()) | {"out_dir"}
    assert j.output == tmp_path / "runs" / "notebooks" / "digits" / "resnet10-stagewise-f0.25-s0.ipynb"
    assert jobs[0].params["pretrained"] is False and "student" not in jobs[0].params


def test_a_run_made_twice_is_an_error_naming_both_groups(tmp_path):
    "Two groups making one run name were once merged without a word: the first group's settings trained."
    second = dict(student="resnet10", method="no_teacher", fraction=1.0, seed=0, epochs=5, schedule="one_cycle")
    prof = tiny(tmp_path, datasets=[dict(TINY["datasets"][0], students=TINY["datasets"][0]["students"] + [second])])
    with pytest.raises(rp.ProfileError, match="student groups 1 and 3 both make the run "
                                              "digits/resnet10-no_teacher-f1-s0"):
        rp.expand(prof)
    twice = dict(student="resnet10", method="no_teacher", fraction=0.5, seed=[3, 3])
    with pytest.raises(rp.ProfileError, match="group 3 lists the run digits/resnet10-no_teacher-f0.5-s3 twice"):
        rp.expand(tiny(tmp_path, datasets=[dict(TINY["datasets"][0],
                                                students=TINY["datasets"][0]["students"] + [twice])]))


def test_a_budget_control_needs_its_twin_and_waits_for_it(tmp_path):
    group = dict(student="resnet10", method="no_teacher_budget", fraction=0.25, seed=0, schedule="one_cycle")
    jobs = rp.plan(rp.expand(tiny(tmp_path, datasets=[dict(TINY["datasets"][0],
                                                           students=TINY["datasets"][0]["students"] + [group])])))
    budget = jobs[-1]
    assert budget.after == ["digits/resnet10-stagewise-f0.25-s0"]  # no teacher: it waits for its twin only
    order = []
    rp.run_jobs(jobs, n_jobs=1, stream=io.StringIO(), execute=fake_execute(order))
    starts = [n for n, e in order if e == "start"]
    assert starts.index(budget.name) > starts.index("digits/resnet10-stagewise-f0.25-s0")
    orphan = dict(group, fraction=0.5)
    with pytest.raises(rp.ProfileError, match="spends the budget of digits/resnet10-stagewise-f0.5-s0, which the "
                                              "profile does not run"):
        rp.expand(tiny(tmp_path, datasets=[dict(TINY["datasets"][0], students=[orphan])]))
    jobs = rp.plan(rp.expand(tiny(tmp_path, datasets=[dict(TINY["datasets"][0],
                                                           students=TINY["datasets"][0]["students"] + [group])])))
    with pytest.raises(RuntimeError, match="resnet10-no_teacher_budget-f0.25-s0: not started: its budget twin "
                                           "digits/resnet10-stagewise-f0.25-s0 failed"):
        rp.run_jobs(jobs, stream=io.StringIO(), execute=fake_execute([], fail={"digits/resnet10-stagewise-f0.25-s0"}))


def test_profile_errors(tmp_path):
    with pytest.raises(rp.ProfileError, match="smoke"): rp.load_profile("no-such-profile")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(dict(datasets=[dict(dataset="digits", students=[dict(studnet="resnet10")])])))
    with pytest.raises(rp.ProfileError, match="studnet"): rp.load_profile(bad)
    bad.write_text("datasets: []")
    with pytest.raises(rp.ProfileError, match="datasets"): rp.load_profile(bad)
    prof = rp.load_profile(tiny(tmp_path)["path"])
    assert prof["name"] == "tiny"


def test_plan_skips_complete_runs_and_refuses_other_parameters(tmp_path):
    jobs = rp.expand(tiny(tmp_path))
    write_record(jobs[0])  # the teacher: complete
    write_record(jobs[1], status="running")  # a killed run: to run (it resumes)
    rp.plan(jobs)
    assert [j.status for j in jobs[:3]] == ["complete", "todo", "todo"]
    write_record(jobs[2], epochs=7)
    with pytest.raises(rp.RunConflict, match="epochs was 7"): rp.plan(jobs)


def test_plan_reads_params_json_of_a_run_that_started_training(tmp_path):
    "A folder with params.json only (a run stopped before training, e.g. by a typo since fixed) blocks nothing."
    jobs = rp.expand(tiny(tmp_path))
    jobs[1].run.mkdir(parents=True)
    (jobs[1].run / "params.json").write_text(json.dumps(dict(jobs[1].config.params(), lr=0.5)))
    assert rp.plan(jobs)[1].status == "todo"
    (jobs[1].run / "progress.json").write_text(json.dumps(dict(steps=[])))
    with pytest.raises(rp.RunConflict, match="lr"): rp.plan(jobs)


def fake_execute(order, fail=(), delay=0.0):
    lock = threading.Lock()

    def execute(job, threads=None, gpu=None):
        with lock: order.append((job.name, "start"))
        time.sleep(delay)
        with lock: order.append((job.name, "end"))
        return rp.Outcome("failed", delay, "boom") if job.name in fail else rp.Outcome("done", delay)
    return execute


def test_run_jobs_skips_complete_runs_and_waits_for_the_teacher(tmp_path):
    jobs = rp.plan(rp.expand(tiny(tmp_path)))
    jobs[-1].status = "complete"
    order, err = [], io.StringIO()
    rp.run_jobs(jobs, n_jobs=3, stream=err, execute=fake_execute(order, delay=0.05))
    started = [n for n, e in order if e == "start"]
    assert jobs[-1].name not in started and len(started) == len(jobs) - 1
    teacher_end = order.index(("digits/teacher", "end"))
    for n, e in order[:teacher_end]:
        assert n == "digits/teacher" or "no_teacher" in n  # only runs without a teacher overlap it
    out = err.getvalue()
    assert f"[{len(jobs):>3}/{len(jobs)}] done" in out and "left" in out and "elapsed" in out
    assert "1 complete already" in out


def test_run_jobs_does_not_start_students_of_a_failed_teacher(tmp_path):
    jobs = rp.plan(rp.expand(tiny(tmp_path)))
    order = []
    with pytest.raises(RuntimeError, match="the teacher of digits failed"):
        rp.run_jobs(jobs, n_jobs=2, stream=io.StringIO(), execute=fake_execute(order, fail={"digits/teacher"}))
    started = {n for n, e in order if e == "start"}
    assert all("no_teacher" in n or n == "digits/teacher" for n in started)
    assert {j.name for j in jobs if "no_teacher" in j.name} <= started


def test_kernel_env_sets_threads_and_quiet_training():
    env = rp.kernel_env(3)
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == "3" and env["KD_PROGRESS"] == "0"


def test_cost_orders_runs_sensibly(tmp_path):
    by = {j.name: j.cost for j in rp.expand(tiny(tmp_path))}
    assert by["digits/resnet10-stagewise-f1-s0"] > by["digits/resnet10-no_teacher-f1-s0"]
    assert by["digits/resnet14-stagewise-f1-s0"] > by["digits/resnet10-stagewise-f1-s0"]
    assert by["digits/resnet10-stagewise-f0.25-s0"] < by["digits/resnet10-stagewise-f1-s0"]


def test_dry_run_lists_runs(tmp_path, capsys):
    main(["--profile", "smoke", "--dry-run", "--out-dir", str(tmp_path)])
    out = capsys.readouterr()
    assert out.out.count("todo") == 30 and "30 runs, 30 to run" in out.err


def test_unknown_profile_exits_with_a_message():
    with pytest.raises(SystemExit, match="No profile"): main(["--profile", "nope", "--dry-run"])


def test_notebooks_get_out_dir_relative_to_the_repository():
    jobs = rp.expand(rp.load_profile("smoke"))
    assert {j.params["out_dir"] for j in jobs} == {"runs/smoke"}
    assert jobs[0].run == rp.ROOT / "runs" / "smoke" / "digits" / "teacher"


def test_strays_are_records_of_no_job(tmp_path):
    jobs = rp.expand(tiny(tmp_path))
    write_record(jobs[1])
    other = tmp_path / "runs" / "digits" / "resnet10-stagewise-f1-s9"
    other.mkdir(parents=True)
    (other / "record.json").write_text("{}")
    assert rp.strays(jobs) == [other / "record.json"]


def test_a_profile_may_set_every_configuration_field(tmp_path):
    "amp and channels_last (once missing from the notebook) load; the run refuses amp without CUDA, not the profile."
    group = dict(student="resnet10", method="no_teacher", epochs=1, amp="bf16", channels_last=True, cache_bytes=2**20)
    jobs = rp.expand(tiny(tmp_path, datasets=[dict(dataset="digits", students=[group])]))
    assert jobs[1].config.amp == "bf16" and jobs[1].params["channels_last"] is True
    assert set(jobs[1].params) <= set(pm.inspect_notebook(str(rp.NOTEBOOKS / "student.ipynb")))


@pytest.mark.parametrize("change,match", [
    (dict(jbos=2), r"unknown key\(s\) \['jbos'\]"),
    (dict(datasets=[dict(dataset="digits", students=[dict(epochs=0)])]), "student group 1: epochs=0"),
    (dict(datasets=[dict(dataset="digits", students=[dict(method="stagewize")])]), "choose one of no_teacher, "),
    (dict(datasets=[dict(dataset="digits", students=[dict(augment="false")])]), "augment='false'.*true or false"),
    (dict(datasets=[dict(dataset="digits", teacher=dict(lr=-1), students=[{}])]), "teacher: lr=-1"),
    (dict(datasets=[dict(dataset="digits", students=[dict(seed=[])])]), "empty list of seed"),
    (dict(datasets=[dict(dataset="digitz", students=[{}])]), "dataset='digitz'"),
    (dict(datasets=[dict(dataset="digits", students=None)]), "one or more groups"),
    (dict(datasets=[dict(dataset="digits", students=[])]), "one or more groups"),
    (dict(example=dict(student="resnet99")), "example .* matches none of its runs"),
    (dict(example="stagewise"), "example='stagewise': example takes a mapping"),
    (dict(example=dict(studnet="resnet10")), r"example: unknown key\(s\) \['studnet'\]"),
    (dict(out_dir=5), "out_dir=5: out_dir takes a folder path"),
    (dict(jobs="two"), "jobs='two': jobs takes a whole number"),
    (dict(jobs=0), "jobs=0: jobs takes a whole number"),
    (dict(name=["a", "b"]), "name=.*: name takes a name"),
    (dict(keep="/tmp/anywhere"), "keep='/tmp/anywhere': kept records go to a folder of their own inside results/"),
    (dict(keep="results"), "keep='results': kept records go"),
    (dict(keep="."), "keep='.': kept records go"),
    (dict(keep="results/../kd_lib"), "keep='results/../kd_lib': kept records go"),
    (dict(datasets=[dict(dataset="digits", students=[dict(seed=2**62)])]), "seed=4611686018427387904: seeds are "
                                                                            "whole numbers from 0 to 4294967295"),
    (dict(datasets=[dict(dataset="digits", students=[dict(size=10000)])]), "size=10000: give an image side of 8 to "
                                                                           "2048"),
])
def test_bad_settings_are_refused_by_the_dry_run_with_their_place(change, match, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(dict(TINY, **{"out_dir": str(tmp_path / "runs"), **change})))
    with pytest.raises(SystemExit, match=match): main(["--profile", str(path), "--dry-run"])
    assert not (tmp_path / "runs").exists()


def test_a_key_given_twice_and_a_billion_laughs_are_refused(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text(f"name: tiny\nout_dir: {tmp_path / 'runs'}\njobs: 1\njobs: 2\ndatasets: [{{dataset: digits, "
                    "students: [{}]}]\n")
    with pytest.raises(rp.ProfileError, match="the key 'jobs' is given twice"): rp.load_profile(path)
    laughs = "\n".join(["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"] + [
        f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]) + "\nname: *a8\ndatasets: []\n"
    path.write_text(laughs)
    with pytest.raises(rp.ProfileError, match="more than 20 aliases"): rp.load_profile(path)


def test_jobs_below_one_is_refused(capsys):
    with pytest.raises(SystemExit): main(["--profile", "smoke", "--dry-run", "--jobs", "0"])
    assert "at least 1" in capsys.readouterr().err


def test_a_teacher_runs_alone_on_every_core_of_a_machine_without_gpus(tmp_path):
    "Its students wait for it; a core left to the few runs without a teacher once idled most of its time."
    jobs = rp.plan(rp.expand(tiny(tmp_path)))
    seen = []
    def execute(job, threads=None, gpu=None):
        seen.append((job.name, threads))
        return rp.Outcome("done")
    ex = rp.LocalExecutor(2, gpus=[], threads=1, workers=False)
    ex.lone_threads = lambda: 2  # as on a machine of two cores
    rp.run_jobs(jobs, stream=io.StringIO(), execute=execute, executor=ex)
    assert seen[0] == ("digits/teacher", 2) and all(t == 1 for _, t in seen[1:])
