"""Tests of the template folder: the same four tiers every paper folder has, in miniature."""

import json

import numpy as np
import pytest
from example_paper import train as example

pytestmark = pytest.mark.example_paper


@pytest.mark.exercise(1)
def test_ex1_logistic_loss_matches_hand_value():
    # w = 0 gives p = 1/2 for every example: the loss is log 2 (plus lam/2 ||w||^2 = 0)
    X = np.array([[1.0, 2.0], [3.0, -1.0]])
    y = np.array([1.0, 0.0])
    loss, _ = example.logistic_loss(np.zeros(2), X, y, lam=0.0)
    assert loss == pytest.approx(np.log(2.0))
    # the penalty: w = (1, 0), lam = 2 adds 1 to the data term
    loss_w, _ = example.logistic_loss(np.array([1.0, 0.0]), X, y, lam=2.0)
    data = -np.mean([np.log(example.sigmoid(1.0)), np.log(1 - example.sigmoid(3.0))])
    assert loss_w == pytest.approx(data + 1.0)


@pytest.mark.exercise(2)
def test_ex2_logistic_gradient_matches_hand_value():
    X = np.array([[1.0, 2.0], [3.0, -1.0]])
    y = np.array([1.0, 0.0])
    _, grad = example.logistic_loss(np.zeros(2), X, y, lam=0.0)
    assert grad == pytest.approx([(1 * -0.5 + 3 * 0.5) / 2, (2 * -0.5 + -1 * 0.5) / 2])
    # with the penalty: w = (1, 0), lam = 2 adds lam * w = (2, 0) to the data gradient
    _, grad_w = example.logistic_loss(np.array([1.0, 0.0]), X, y, lam=2.0)
    s1, s3 = example.sigmoid(1.0), example.sigmoid(3.0)
    data = [(1 * (s1 - 1) + 3 * s3) / 2, (2 * (s1 - 1) + -1 * s3) / 2]
    assert grad_w == pytest.approx([data[0] + 2.0, data[1]])


@pytest.mark.exercise(2)
def test_ex2_logistic_gradient_matches_finite_differences():
    rng = np.random.default_rng(0)
    X, y, w = rng.normal(size=(5, 3)), rng.integers(0, 2, 5).astype(float), rng.normal(size=3)
    _, grad = example.logistic_loss(w, X, y, lam=0.3)
    eps = 1e-6
    numeric = [(example.logistic_loss(w + eps * e, X, y, 0.3)[0]
                - example.logistic_loss(w - eps * e, X, y, 0.3)[0]) / (2 * eps) for e in np.eye(3)]
    assert grad == pytest.approx(numeric, rel=1e-5)


def test_quick_run_decreases_loss_and_is_deterministic(tmp_path):
    a = example.train(example.Config(quick=True, out_dir=str(tmp_path / "a")))
    b = example.train(example.Config(quick=True, out_dir=str(tmp_path / "b")))
    loss = a["history"]["loss"]
    assert np.isfinite(loss).all() and loss[-1] < loss[0]
    assert a["metrics"] == b["metrics"]
    summary = example.report(a)
    assert json.loads((tmp_path / "a" / "summary.json").read_text()) == json.loads(
        json.dumps(summary))
    assert set(summary) == {"folder", "seed", "config", "wall_seconds", "metrics", "headline",
                            "premise", "arms"}


def test_arms_record_what_each_arm_got(tmp_path):
    # The design as data: the method trains on the train split from zeros with the configured lr,
    # for the step validation chose; the baseline trains nothing.
    cfg = example.Config(quick=True, out_dir=str(tmp_path), lr=0.3)
    res = example.train(cfg)
    arms = res["arms"]
    assert arms["logistic"] == {"data": "train", "init": "zeros", "lr": 0.3, "lam": cfg.lam,
                                "steps": res["metrics"]["best_step"], "chosen_on": "val loss"}
    assert 1 <= arms["logistic"]["steps"] <= example.QUICK["steps"]
    assert arms["majority"]["steps"] == 0


def test_chosen_step_has_the_lowest_validation_loss(tmp_path):
    res = example.train(example.Config(quick=True, out_dir=str(tmp_path)))
    val = res["history"]["val_loss"]
    assert res["metrics"]["best_step"] == int(np.argmin(val)) + 1


def test_bayes_accuracy_matches_a_monte_carlo_estimate():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200_000)
    X = rng.normal(size=(200_000, 2)) + 1.0 * (2 * y[:, None] - 1)
    bayes_rule = (X.sum(1) > 0) == y  # the Bayes boundary is x1 + x2 = 0
    assert example.bayes_accuracy(1.0) == pytest.approx(bayes_rule.mean(), abs=3e-3)


def test_main_ends_with_a_verdict_a_quick_warning_and_the_files(tmp_path, capsys):
    example.main(["--quick", "--out-dir", str(tmp_path)])
    out = capsys.readouterr().out.split("Verdict (this seed):")[1]
    assert "[better] test accuracy (higher is better): logistic" in out
    assert "--quick is a smoke run" in out
    assert f"Files written: {tmp_path / 'summary.json'}" in out
