"""Controls that can fail: a budget baseline that spends its twin's budget, splits that cannot leak a teacher's
training images into a student's valid or test split, and convergence judged from the curve, apart from stopping."""
import shutil

import numpy as np
import pytest
from scipy import stats

from kd_lib.data.loaders import LeakageError, get_data
from kd_lib.recipes.fitting import CONVERGENCE_ERROR, convergence
from kd_lib.infra.files import write_json
from kd_lib.recipes.train import train_student


def _teacher_with_split(tmp_path, teacher_path, **data) -> str:
    "A teacher folder: the session's random teacher weights, and a record saying on which split it trained."
    folder = tmp_path / "teacher"
    folder.mkdir()
    shutil.copy(teacher_path, folder / "teacher.pth")
    info = get_data("digits", size=16, bs=32, **data).split_info
    write_json(folder / "record.json", dict(kind="teacher", status="complete", data=info))
    return str(folder)


def test_a_student_refuses_a_teacher_that_trained_on_its_valid_images(tmp_path, tiny, teacher_path):
    "The valid split once followed each student's seed while the teacher had trained on seed 0's: 80% leaked."
    teacher = _teacher_with_split(tmp_path, teacher_path, split_seed=1)
    args = tiny | dict(method="stagewise", epochs=1, out_dir=tmp_path / "runs", teacher_path=teacher, progress=False)
    with pytest.raises(LeakageError, match=r"trained on \d+ of this run's valid and 0 of its test images.*split_seed "
                                           r"\(1\)"):
        train_student(**args, seed=1)
    assert not [p for p in (tmp_path / "runs").rglob("*") if p.is_file()]  # nothing written
    record = train_student(**args, seed=1, split_seed=1)  # the teacher's split: the run goes ahead
    assert record["data"]["hashes"]["valid"] == get_data("digits", size=16, bs=32, split_seed=1).split_info[
        "hashes"]["valid"]


def test_a_teacher_picked_on_the_test_set_trained_on_every_valid_image(tmp_path, tiny, teacher_path):
    "selection='test': the teacher trained on all the training folder, so no part of it can judge a student."
    teacher = _teacher_with_split(tmp_path, teacher_path, selection="test")
    with pytest.raises(LeakageError, match=r"trained on \d+ of this run's valid"):
        train_student(**(tiny | dict(method="stagewise", epochs=1, out_dir=tmp_path, teacher_path=teacher)))


def test_the_seed_changes_the_sample_not_the_valid_split():
    a, b = (get_data("digits", size=16, bs=32, fraction=0.5, seed=s).split_info["hashes"] for s in (0, 1))
    assert a["valid"] == b["valid"] and a["test"] == b["test"] and a["train"] != b["train"]


def test_the_budget_control_trains_every_epoch_its_stagewise_twin_used(tmp_path, tiny, teacher_path):
    args = tiny | dict(out_dir=tmp_path, teacher_path=str(teacher_path), progress=False)
    with pytest.raises(FileNotFoundError, match="as many epochs as its stagewise twin used: train .*stagewise"):
        train_student(**args, method="no_teacher_budget", schedule="one_cycle")
    twin = train_student(**args, method="stagewise", epochs=2, patience=1)
    used = sum(s["epochs_run"] for s in twin["stages"])
    budget = train_student(**args, method="no_teacher_budget", schedule="one_cycle")
    assert budget["budget"] == dict(twin="resnet10-stagewise-f0.25-s0", epochs=used)
    fit = budget["stages"][0]
    assert fit["epochs"] == fit["epochs_run"] == used and not fit["stopped_early"]
    with pytest.raises(ValueError, match="give it schedule='one_cycle'.*patience=None"):
        train_student(**args, method="no_teacher_budget")  # constant lr: it would not spend a schedule


def test_convergence_is_judged_from_the_curve_against_its_own_scatter_not_from_the_stop():
    "A fit that stopped early while still rising beyond its own scatter did not converge, whatever stopped it."
    rising = [50, 55, 58, 60, 59.5, 61, 62, 61.5, 63, 64]  # +0.75 a point an epoch over the last 5, scatter 0.32
    judged = convergence(rising, lower=False)
    assert judged["window"] == 5 and judged["converged"] is False and judged["projected"] > judged["noise"]
    flat = [50, 55, 58, 60, 61, 60.5, 61.2, 60.8, 61.1, 60.9]
    assert convergence(flat, lower=False)["converged"] is True
    falling_loss = [1.0, 0.8, 0.6, 0.5, 0.45, 0.41, 0.38, 0.35]  # a feature MSE still falling smoothly
    assert convergence(falling_loss, lower=True)["converged"] is False
    assert convergence(falling_loss, lower=False)["converged"] is True  # read the other way: no gain at all
    assert convergence(rising[:4], lower=False)["converged"] is None  # too few epochs to judge
    assert convergence(rising[:-1] + [None], lower=False)["converged"] is None  # a value missing
    long = [60.0 + 0.01 * i for i in range(60)]  # k = a tenth of 60 epochs
    assert convergence(long, lower=False)["window"] == 6


def test_at_the_threshold_the_slopes_t_statistic_decides():
    "Unconverged when the slope's t statistic over the window exceeds the one-sided 97.5 % point of t with k - 2 df."
    crit = stats.t.ppf(1 - CONVERGENCE_ERROR, 3)
    x = np.arange(5) - 2
    wiggle = np.array([1.0, -2.0, 0.0, 2.0, -1.0])  # orthogonal to the line, so the scatter is known
    wiggle /= np.sqrt((wiggle ** 2).sum() / 3)  # residual scatter exactly 1
    for t in (crit * 0.999, crit * 1.001):
        curve = list(t / np.sqrt(10) * x + wiggle)  # a slope's standard error: 1 / sqrt(sum(x^2)) = 1 / sqrt(10)
        judged = convergence(curve, lower=False)
        assert judged["t"] == pytest.approx(t) and judged["noise"] == pytest.approx(1.0)
        assert judged["converged"] is bool(t <= crit)
