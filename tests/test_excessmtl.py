"""Tests for excessmtl/train.py: hand values, invariants, equivalences, and a smoke run."""

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F

from excessmtl import train as excessmtl

pytestmark = pytest.mark.excessmtl


def feed(weighting, grads, losses=None):
    """Drive a weighting with given per-task gradients (m, P); returns its alpha after the step."""
    m = grads.shape[0]
    losses = torch.ones(m) if losses is None else losses
    weighting(losses, grads)
    return weighting.alpha.clone()


def tiny_setup(seed=0, noise=2.0):
    """A small regression model, its data, and its per-task losses (with a graph)."""
    cfg = excessmtl.Config(n_train=256, n_test=64, seed=seed)
    data = excessmtl.make_dataset(cfg, torch.Generator().manual_seed(seed))
    torch.manual_seed(seed)
    model = excessmtl.make_model(cfg)
    y = excessmtl.noisy_targets(data, noise, 0, cfg.sigma_clean)
    return cfg, data, model, y


# --------------------------------------------------------------------------------------------
# 1. Hand-computed values
# --------------------------------------------------------------------------------------------
@pytest.mark.exercise(1)
def test_first_step_estimate_is_the_l1_norm_of_the_gradient():
    g = torch.tensor([[3.0, 0.0, -4.0]])  # (1, 3)
    e_hat, S = excessmtl.excess_risk_estimate(g, torch.zeros_like(g))
    assert e_hat.item() == pytest.approx(7.0, abs=1e-4)
    assert torch.allclose(S, torch.tensor([[9.0, 0.0, 16.0]]))


@pytest.mark.exercise(1)
def test_estimate_matches_hand_value_on_a_two_step_history():
    S = torch.zeros(3, 2)  # three tasks, two shared parameters
    e1, S = excessmtl.excess_risk_estimate(torch.tensor([[3.0, 0.0], [0.0, 4.0], [1.0, 1.0]]), S)
    assert torch.allclose(e1, torch.tensor([3.0, 4.0, 2.0]), atol=1e-5)
    e2, S = excessmtl.excess_risk_estimate(torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, -1.0]]),
                                           S)
    # S_1 = [10, 0], S_2 = [0, 20], S_3 = [2, 2]; e_hat = [1/sqrt(10), 4/sqrt(20), 2/sqrt(2)]
    assert torch.allclose(S, torch.tensor([[10.0, 0.0], [0.0, 20.0], [2.0, 2.0]]))
    assert torch.allclose(e2, torch.tensor([0.316228, 0.894427, 1.414214]), atol=1e-5)


@pytest.mark.exercise(1)
def test_estimate_is_zero_when_the_gradient_is_zero():
    S = torch.tensor([[5.0, 1.0, 2.0], [0.0, 0.0, 0.0]])  # a history, and none; m=2, P=3
    e_hat, S_new = excessmtl.excess_risk_estimate(torch.zeros(2, 3), S)
    assert torch.equal(e_hat, torch.zeros(2))  # one estimate per task, not per parameter
    assert torch.equal(S_new, S)
    # a gradient on top of the history: S = 5 + 1 = 6 first, then e_hat = 1 / sqrt(6)
    g = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    e_hat, S_new = excessmtl.excess_risk_estimate(g, S)
    assert e_hat.tolist() == pytest.approx([1 / math.sqrt(6.0), 0.0], abs=1e-6)


@pytest.mark.exercise(1)
def test_constant_gradient_estimate_decays_as_one_over_sqrt_t():
    g = torch.tensor([[1.0, -2.0, 0.5]])  # ||g||_1 = 3.5
    S = torch.zeros_like(g)
    seen = {}
    for t in range(1, 10):
        e_hat, S = excessmtl.excess_risk_estimate(g, S)
        seen[t] = e_hat.item()
    for t in (1, 4, 9):
        assert seen[t] == pytest.approx(3.5 / math.sqrt(t), rel=1e-5)


@pytest.mark.exercise(2)
def test_eg_update_matches_hand_value():
    # the GroupDRO step of the notes: alpha = [.5, .5], losses [2, .5], eta = .1
    new = excessmtl.eg_update(torch.tensor([0.5, 0.5]), torch.tensor([2.0, 0.5]), 0.1)
    assert torch.allclose(new, torch.tensor([0.537430, 0.462570]), atol=1e-6)
    # and from weights that are not uniform (the update must remember them):
    # alpha = [.2, .8], r = [1, 0], eta = ln 2 -> [.2 * 2, .8] / 1.2 = [1/3, 2/3]
    new = excessmtl.eg_update(torch.tensor([0.2, 0.8]), torch.tensor([1.0, 0.0]), math.log(2.0))
    assert torch.allclose(new, torch.tensor([1 / 3, 2 / 3]), atol=1e-6)
    _eg_update_is_detached(torch.tensor([0.5, 0.5]), torch.tensor([2.0, 0.5]), 0.1)
    _eg_update_is_finite_at_a_large_step()


@pytest.mark.exercise(2)
def test_eg_update_is_multiplicative_with_the_given_step_size():
    alpha = torch.tensor([0.2, 0.3, 0.5])
    score = torch.tensor([1.5, -0.4, 0.7])
    eta = 0.8
    new = excessmtl.eg_update(alpha, score, eta)
    for i in range(3):
        for j in range(3):
            expect = alpha[i] / alpha[j] * math.exp(eta * (score[i] - score[j]))
            assert (new[i] / new[j]).item() == pytest.approx(expect.item(), rel=1e-5)
    _eg_update_is_detached(alpha, score, eta)
    _eg_update_is_finite_at_a_large_step()


@pytest.mark.exercise(2)
def test_eg_update_stays_on_the_simplex_and_is_detached():
    gen = torch.Generator().manual_seed(0)
    alpha = torch.softmax(torch.randn(5, generator=gen), 0)
    for _ in range(20):
        score = (5 * torch.randn(5, generator=gen)).requires_grad_()
        alpha = excessmtl.eg_update(alpha, score, 0.3)
        assert not alpha.requires_grad and alpha.grad_fn is None
        assert (alpha >= 0).all()
        assert alpha.sum().item() == pytest.approx(1.0, abs=1e-6)
    # the weights remember the previous ones: alpha_i exp(eta r_i), renormalised (hand value)
    new = excessmtl.eg_update(torch.tensor([0.2, 0.8]), torch.tensor([1.0, 0.0]),
                              math.log(2.0))
    assert torch.allclose(new, torch.tensor([1 / 3, 2 / 3]), atol=1e-6)
    _eg_update_is_finite_at_a_large_step()


@pytest.mark.exercise(2)
def test_eg_update_stays_finite_when_eta_times_score_is_large():
    # exp(100) is inf in float32; the update depends only on the score *differences*, so
    # alpha = [.2, .8], score = [100, 100 - ln 2], eta = 1 is the hand case [.2 * 2, .8] / 1.2
    new = excessmtl.eg_update(torch.tensor([0.2, 0.8]),
                              torch.tensor([100.0, 100.0 - math.log(2.0)]).requires_grad_(), 1.0)
    assert torch.allclose(new, torch.tensor([1 / 3, 2 / 3]), atol=1e-6)
    assert not new.requires_grad
    # a GroupDRO step on a noisy task's loss: eta * loss = 400 against 0.5
    new = excessmtl.eg_update(torch.full((3,), 1 / 3), torch.tensor([400.0, 0.5, 0.0]), 1.0)
    assert torch.isfinite(new).all() and new[0].item() == pytest.approx(1.0, abs=1e-6)
    # a weight at exactly zero (the oracle's) stays zero, however large its score
    new = excessmtl.eg_update(torch.tensor([0.0, 0.5, 0.5]), torch.tensor([500.0, 1.0, 0.0]), 1.0)
    assert new[0].item() == 0.0 and torch.isfinite(new).all()
    assert new[1].item() == pytest.approx(math.e / (1 + math.e), rel=1e-6)


def test_excessmtl_two_step_weights_match_hand_values():
    w = excessmtl.ExcessMTL(2, eta=1.0)
    a1 = feed(w, torch.tensor([[3.0, 0.0], [0.0, 4.0]]))
    assert torch.allclose(a1, torch.tensor([0.5, 0.5]))  # no update at the first step
    a2 = feed(w, torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
    # r = [1/sqrt(10) / 3, 4/sqrt(20) / 4] = [0.105409, 0.223607]
    assert torch.allclose(w.r, torch.tensor([0.105409, 0.223607]), atol=1e-5)
    assert torch.allclose(a2, torch.tensor([0.470485, 0.529515]), atol=1e-5)


def test_warmup_averages_the_first_estimates_and_holds_alpha():
    w = excessmtl.ExcessMTL(2, eta=1.0, warmup=3)
    grads = [torch.tensor([[2.0], [1.0]]), torch.tensor([[1.0], [1.0]]),
             torch.tensor([[3.0], [2.0]])]
    S = torch.zeros(2, 1)
    total = torch.zeros(2)
    for g in grads:
        assert torch.equal(feed(w, g), torch.full((2,), 0.5))
        e_hat, S = excessmtl.excess_risk_estimate(g, S)
        total += e_hat
    g4 = torch.tensor([[1.0], [1.0]])
    a4 = feed(w, g4)
    e4, _ = excessmtl.excess_risk_estimate(g4, S)
    r = e4 / (total / 3)
    assert torch.allclose(w.r, r, atol=1e-6)
    assert torch.allclose(a4, torch.softmax(r, 0), atol=1e-6)


def test_dwa_weights_match_hand_value():
    # w = [1/2, 2/2] = [.5, 1]; softmax([.25, .5])
    got = excessmtl.dwa_weights(torch.tensor([1.0, 2.0]), torch.tensor([2.0, 2.0]), 2.0)
    e = [math.exp(0.25), math.exp(0.5)]
    assert torch.allclose(got, torch.tensor([e[0] / sum(e), e[1] / sum(e)]), atol=1e-6)


def test_dwa_gives_the_slower_task_more_weight_and_waits_two_steps():
    w = excessmtl.DynamicWeightAverage(2, T=2.0)
    a = [feed(w, torch.zeros(2, 1), torch.tensor(L)) for L in ([4.0, 4.0], [2.0, 3.9], [1.0, 3.8])]
    assert torch.equal(a[0], torch.full((2,), 0.5)) and torch.equal(a[1], torch.full((2,), 0.5))
    assert a[2][1] > a[2][0]  # task 1 barely moved (3.9/4), task 0 halved


def test_uw_loss_matches_hand_value_and_is_minimised_at_s_equal_log_loss():
    losses = torch.tensor([1.0, 4.0])
    s = torch.tensor([0.0, math.log(4.0)], requires_grad=True)
    total = excessmtl.uw_loss(losses, s)
    # 1/2 + 4/8 + 0/2 + log(4)/2
    assert total.item() == pytest.approx(1.0 + math.log(4.0) / 2, abs=1e-6)
    total.backward()
    assert torch.allclose(s.grad, torch.zeros(2), atol=1e-6)  # exp(s_i) = l_i is stationary


def test_uw_alpha_is_inverse_variance():
    w = excessmtl.UncertaintyWeighting(2, s_init=0.0)
    with torch.no_grad():
        w.s.copy_(torch.tensor([0.0, math.log(3.0)]))
    feed(w, torch.zeros(2, 1))
    assert torch.allclose(w.alpha, torch.tensor([0.75, 0.25]), atol=1e-6)


def test_equal_weighting_is_the_plain_sum():
    losses = torch.tensor([0.3, 2.0, 5.0])
    w = excessmtl.EqualWeighting(3)
    assert w(losses).item() == pytest.approx(7.3, rel=1e-6)
    assert torch.allclose(w.alpha, torch.full((3,), 1 / 3))


def test_groupdro_moves_weight_to_the_largest_loss():
    w = excessmtl.GroupDRO(3, eta=0.1)
    losses = torch.tensor([2.0, 0.5, 1.0])
    total = w(losses)
    expect = torch.softmax(0.1 * losses, 0)
    assert torch.allclose(w.alpha, expect, atol=1e-6)
    assert total.item() == pytest.approx(3 * float((expect * losses).sum()), rel=1e-6)


# --------------------------------------------------------------------------------------------
# 2. Invariants
# --------------------------------------------------------------------------------------------
def test_constant_loss_offset_changes_groupdro_but_not_excessmtl():
    """A task with a high but irreducible loss gets no extra weight from ExcessMTL."""
    cfg, data, model, y = tiny_setup(noise=0.1)
    shared = list(model.encoder.parameters())
    runs = {}
    for offset in (0.0, 10.0):
        exc, dro = excessmtl.ExcessMTL(3, eta=0.1), excessmtl.GroupDRO(3, eta=0.1)
        for step in range(3):
            losses = excessmtl.task_losses(model, data["x_train"][step * 64:(step + 1) * 64],
                                           y[step * 64:(step + 1) * 64])
            losses = losses + torch.tensor([offset, 0.0, 0.0])  # constant offset on task 0
            grads = excessmtl.per_task_grads(losses, shared)
            exc(losses, grads)
            dro(losses, grads)
        runs[offset] = (exc.alpha, dro.alpha)
    assert torch.allclose(runs[0.0][0], runs[10.0][0], atol=1e-7)
    assert not torch.allclose(runs[0.0][0], torch.full((3,), 1 / 3))  # ExcessMTL did move
    assert runs[0.0][1][0] < 0.6 < 0.9 < runs[10.0][1][0]  # GroupDRO chases the offset


def test_scaling_a_loss_leaves_excessmtl_weights_unchanged_but_not_groupdro():
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(3, 6, generator=gen) for _ in range(5)]
    losses = [torch.rand(3, generator=gen) + 0.5 for _ in range(5)]
    c = torch.tensor([10.0, 1.0, 1.0])
    out = []
    for scale in (torch.ones(3), c):
        exc, dro = excessmtl.ExcessMTL(3, eta=0.7), excessmtl.GroupDRO(3, eta=0.7)
        for g, L in zip(grads, losses):
            feed(exc, g * scale[:, None], L * scale)
            feed(dro, g * scale[:, None], L * scale)
        out.append((exc.alpha, dro.alpha))
    assert torch.allclose(out[0][0], out[1][0], atol=1e-5)
    assert not torch.allclose(out[0][1], out[1][1], atol=1e-2)


def test_identical_gradients_keep_excessmtl_weights_uniform():
    gen = torch.Generator().manual_seed(2)
    w = excessmtl.ExcessMTL(4, eta=2.0)
    for _ in range(10):
        g = torch.randn(1, 7, generator=gen).expand(4, 7)
        feed(w, g)
    assert torch.allclose(w.alpha, torch.full((4,), 0.25), atol=1e-7)


def test_larger_ratio_gains_weight_by_exp_eta_times_the_ratio_gap():
    w = excessmtl.ExcessMTL(2, eta=0.6)
    feed(w, torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    before = w.alpha.clone()
    feed(w, torch.tensor([[2.0, 0.0], [0.0, 0.5]]))
    r = w.r
    assert r[0] > r[1]
    ratio = (w.alpha[0] / w.alpha[1]) / (before[0] / before[1])
    assert ratio.item() == pytest.approx(math.exp(0.6 * (r[0] - r[1]).item()), rel=1e-5)


@pytest.mark.slow
def test_weights_stay_on_the_simplex_during_training():
    cfg = dataclasses.replace(excessmtl.Config(quick=True), **excessmtl.QUICK)
    data = excessmtl.make_dataset(cfg, torch.Generator().manual_seed(0))
    for method in excessmtl.METHODS:
        run = excessmtl.train_one(dataclasses.replace(cfg, steps=15, log_every=100), data,
                                  method, 4.0)
        alpha = torch.tensor(run["history"]["alpha"])  # (steps, m)
        assert (alpha >= 0).all(), method
        assert torch.allclose(alpha.sum(1), torch.ones(len(alpha)), atol=1e-5), method
        if method == "excessmtl":  # the estimate saw the encoder's gradients only, no head's
            P = sum(p.numel() for p in excessmtl.make_model(cfg).encoder.parameters())
            assert run["weighting"].S.shape == (3, P)


def test_per_task_grads_cover_exactly_the_shared_encoder():
    cfg, data, model, y = tiny_setup()
    losses = excessmtl.task_losses(model, data["x_train"], y)
    shared = list(model.encoder.parameters())
    grads = excessmtl.per_task_grads(losses, shared)
    P = sum(p.numel() for p in shared)
    assert grads.shape == (3, P)
    assert P == cfg.d_in * cfg.hidden + cfg.hidden + cfg.hidden * cfg.d_latent + cfg.d_latent
    # equivalence: one ordinary backward per task, reading the encoder's .grad
    for i in range(3):
        model.zero_grad()
        losses[i].backward(retain_graph=True)
        manual = torch.cat([p.grad.reshape(-1) for p in shared])
        assert torch.allclose(grads[i], manual, atol=1e-6)
        # the heads of the other tasks get no gradient from task i
        for j, head in enumerate(model.heads):
            if j != i:
                assert head.weight.grad is None or torch.all(head.weight.grad == 0)


def test_evaluate_reports_the_clean_and_noisy_tasks_separately():
    cfg, data, model, _ = tiny_setup()
    out = excessmtl.evaluate(model, data, noisy_task=1)
    with torch.no_grad():
        pred = torch.cat(model(data["x_test"]), dim=1)  # (N, m)
    mse = ((pred - data["y_test"]) ** 2).mean(0)  # (m,)
    assert out["task_excess"] == pytest.approx(mse.tolist(), rel=1e-5)
    assert out["noisy_excess"] == pytest.approx(mse[1].item(), rel=1e-5)
    assert out["clean_excess"] == pytest.approx((mse[0] + mse[2]).item() / 2, rel=1e-5)


@pytest.mark.slow
def test_noise_goes_only_to_the_noisy_task():
    cfg = excessmtl.Config(n_train=4000, n_test=10)
    data = excessmtl.make_dataset(cfg, torch.Generator().manual_seed(0))
    y = excessmtl.noisy_targets(data, 3.0, 1, 0.1)
    resid = (y - data["f_train"]).std(0)  # (m,)
    assert resid[1].item() == pytest.approx(3.0, rel=0.05)
    assert resid[0].item() == pytest.approx(0.1, rel=0.05)
    assert resid[2].item() == pytest.approx(0.1, rel=0.05)
    dcfg = excessmtl.Config(toy="digits", n_train=4000, n_test=10)
    d = excessmtl.make_dataset(dcfg, torch.Generator().manual_seed(0))
    yd = excessmtl.noisy_targets(d, 0.5, 0, 0.0)
    assert torch.equal(yd[:, 1], d["f_train"][:, 1])
    # half flipped to a uniform class, which is the true class 1 time in 10: ~45% differ
    assert (yd[:, 0] != d["f_train"][:, 0]).float().mean().item() == pytest.approx(0.45, abs=0.03)


# --------------------------------------------------------------------------------------------
# 3. Equivalences
# --------------------------------------------------------------------------------------------
def test_vectorised_estimate_matches_the_official_per_task_loop():
    gen = torch.Generator().manual_seed(3)
    m, P = 3, 8
    S = torch.zeros(m, P)
    grad_sum = torch.zeros(m, P)  # the official code's accumulator, updated task by task
    for _ in range(6):
        g = torch.randn(m, P, generator=gen) * torch.tensor([[0.1], [1.0], [5.0]])
        e_hat, S = excessmtl.excess_risk_estimate(g, S)
        w = torch.zeros(m)
        for i in range(m):
            grad_sum[i] += g[i] ** 2
            h_i = torch.sqrt(grad_sum[i] + 1e-7)
            w[i] = g[i] * (1 / h_i) @ g[i]
        assert torch.allclose(e_hat, w, rtol=1e-5)


@pytest.mark.slow
def test_eta_zero_excessmtl_trains_exactly_like_equal_weighting():
    cfg = dataclasses.replace(excessmtl.Config(), **excessmtl.QUICK)
    cfg = dataclasses.replace(cfg, eta_excess=0.0, steps=20, log_every=100)
    data = excessmtl.make_dataset(cfg, torch.Generator().manual_seed(0))
    a = excessmtl.train_one(cfg, data, "excessmtl", 4.0)
    b = excessmtl.train_one(cfg, data, "ew", 4.0)
    assert a["history"]["loss"] == b["history"]["loss"]
    assert a["metrics"]["task_excess"] == b["metrics"]["task_excess"]


# --------------------------------------------------------------------------------------------
# 4. Smoke runs and the claim in miniature
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("quick")
    result = excessmtl.train(excessmtl.Config(quick=True, out_dir=str(out)))
    result["summary"] = excessmtl.report(result)
    return out, result


@pytest.mark.slow
def test_quick_run_loss_is_finite_and_decreasing(quick_run):
    _, result = quick_run
    control = excessmtl.Config().control_arms.split(",")
    assert set(result["runs"]) == ({(k, 4.0) for k in excessmtl.METHODS}
                                   | {(k, 0.1) for k in control})
    for key, run in result["runs"].items():
        loss = run["history"]["loss"]
        assert all(math.isfinite(v) for v in loss), key
        if key[0] == "exact":
            # the upper bound moves its weight onto the noisy task within 40 steps and trades the
            # clean tasks' losses for it: its plain sum of losses need not fall in a smoke run
            continue
        if key[0] != "uw":  # UW's total includes s/2 terms; its task losses still fall
            assert loss[-1] < loss[0], key
        assert sum(run["history"]["task_losses"][-1]) < sum(run["history"]["task_losses"][0])


@pytest.mark.slow
def test_quick_run_writes_summary_with_the_contract_schema(quick_run):
    out, result = quick_run
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"folder", "seed", "config", "wall_seconds", "metrics", "headline",
                            "premise", "arms"}
    assert summary["folder"] == "excessmtl"
    assert summary["config"]["steps"] == excessmtl.QUICK["steps"]
    assert len(summary["headline"]) == len(excessmtl.CLAIMS)
    # the paper's own claim first: against loss-driven weighting, both steps tuned (a tie)
    assert summary["headline"][0]["expect"] == "level"
    assert summary["headline"][0]["baseline"]["name"] == "GroupDRO"
    level = [r for r in summary["headline"] if r["expect"] == "level"]
    assert [r["baseline"]["name"] for r in level] == ["GroupDRO", "EW"]
    assert all(r["margin"] > 0 for r in level)
    better = [r["baseline"]["name"] for r in summary["headline"] if r["expect"] == "better"]
    assert better == ["DWA"]
    # every row reads the metric of the arms it names, at the largest noise level
    m = result["metrics"]
    for row in summary["headline"]:
        for side in ("method", "baseline"):
            key = next(k for k, v in excessmtl.NAMES.items() if v == row[side]["name"])
            stat = "noisy_weight" if row["metric"].startswith("weight") else "clean_excess"
            assert row[side]["value"] == m[f"{stat}/{key}/noise=4"], (row["metric"], side)
    for row in summary["headline"]:
        assert {"metric", "higher_is_better", "expect", "method", "baseline"} <= set(row)
        assert row["expect"] in ("better", "level", "report")
        assert math.isfinite(row["method"]["value"]) and math.isfinite(row["baseline"]["value"])
    assert (out / "excessmtl.png").stat().st_size > 0
    assert (out / "excessmtl_compute.png").stat().st_size > 0
    assert (out / "excessmtl_diagnostic.png").stat().st_size > 0


@pytest.mark.slow
def test_quick_run_shows_groupdro_chasing_the_noisy_task(quick_run):
    _, result = quick_run
    m = result["runs"]
    # at a step that moves weights (0.001) GroupDRO piles weight onto the noisy task, and only
    # when there is noise; at its tuned step (1e-5) it barely moves, like ExcessMTL
    assert m[("groupdro_big", 4.0)]["metrics"]["noisy_weight"] > 0.4
    assert m[("groupdro_big", 0.1)]["metrics"]["noisy_weight"] == pytest.approx(1 / 3, abs=0.01)
    assert m[("excessmtl", 4.0)]["metrics"]["noisy_weight"] < 0.36
    assert m[("groupdro", 4.0)]["metrics"]["noisy_weight"] == pytest.approx(1 / 3, abs=0.01)


@pytest.mark.slow
def test_same_seed_same_numbers(quick_run, tmp_path):
    _, first = quick_run
    cfg = excessmtl.Config(quick=True, out_dir=str(tmp_path), methods="groupdro,excessmtl")
    again = excessmtl.train(cfg)
    for key in again["runs"]:
        assert again["runs"][key]["history"]["loss"] == first["runs"][key]["history"]["loss"]
    other = excessmtl.train(dataclasses.replace(cfg, seed=1))
    k = ("excessmtl", 4.0)
    assert other["runs"][k]["history"]["loss"] != first["runs"][k]["history"]["loss"]


def test_uw_log_variances_receive_gradient_and_move():
    cfg, data, model, y = tiny_setup()
    cfg = dataclasses.replace(cfg, steps=5, log_every=100)
    w = excessmtl.make_weighting("uw", cfg, 3)
    losses = excessmtl.task_losses(model, data["x_train"], y)
    w(losses).backward()
    # d/ds_i [l_i / (2 e^s_i) + s_i / 2] = 1/2 - l_i / (2 e^s_i)
    want = 0.5 - losses.detach() / (2 * torch.exp(w.s.detach()))
    assert torch.allclose(w.s.grad, want, atol=1e-5) and (w.s.grad != 0).all()
    # wiring: train_one hands s to the optimiser, so the log-variances move during training
    run = excessmtl.train_one(cfg, data, "uw", 2.0)
    s = run["weighting"].s.detach()
    assert (s - cfg.uw_init).abs().min().item() > 1e-3
    alpha = torch.tensor(run["history"]["alpha"])  # (steps, m)
    assert not torch.allclose(alpha[0], alpha[-1])


def test_test_targets_are_clean_and_noise_is_only_in_training():
    cfg = excessmtl.Config(n_train=512, n_test=256)
    a = excessmtl.make_dataset(cfg, torch.Generator().manual_seed(0))
    # the test targets are the noiseless function of the test inputs, whatever the noise level
    f = a["y_test"]
    for noise in (0.0, 4.0):
        y = excessmtl.noisy_targets(a, noise, 0, cfg.sigma_clean)
        assert y.shape == a["f_train"].shape
        assert torch.equal(a["y_test"], f)
    b = excessmtl.make_dataset(dataclasses.replace(cfg, sigma_clean=3.0),
                               torch.Generator().manual_seed(0))
    assert torch.equal(a["y_test"], b["y_test"])  # sigma never reaches the test targets
    # and evaluate scores against y_test: a model predicting y_test exactly has zero excess
    class Oracle(torch.nn.Module):
        def forward(self, x):
            return [a["y_test"][:, i:i + 1] for i in range(3)]
    out = excessmtl.evaluate(Oracle(), a, 0)
    assert out["clean_excess"] == 0.0 and out["noisy_excess"] == 0.0


def test_equal_task_scale_gives_unit_variance_signals():
    cfg = excessmtl.Config(n_train=2000, n_test=10)
    d = excessmtl.make_dataset(cfg, torch.Generator().manual_seed(5))
    assert torch.allclose(d["f_train"].std(0), torch.ones(3), atol=1e-5)
    r = excessmtl.make_dataset(dataclasses.replace(cfg, task_scale="random"),
                               torch.Generator().manual_seed(5))
    assert not torch.allclose(r["f_train"].std(0), torch.ones(3), atol=0.05)


def test_quick_keeps_each_toys_own_noise_levels(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(excessmtl, "train_one",
                        lambda cfg, data, method, noise, bar=None: seen.append(
                            (cfg.toy, noise)) or _fake_run(cfg))
    monkeypatch.setattr(excessmtl, "plot", lambda *a, **k: None)
    monkeypatch.setattr(excessmtl, "plot_diagnostic", lambda *a, **k: None)
    for toy in ("regression", "digits"):
        seen.clear()
        excessmtl.train(excessmtl.Config(quick=True, toy=toy, out_dir=str(tmp_path),
                                         methods="ew,excessmtl"))
        levels = sorted({n for _, n in seen})
        want = [float(v) for v in excessmtl.QUICK_NOISE[toy].split(",")]
        assert levels == want, toy
        if toy == "digits":
            assert all(0.0 <= n <= 1.0 for n in levels)  # flip fractions, never a std of 4


def _fake_run(cfg):
    m = 2 if cfg.toy == "digits" else cfg.n_tasks
    return {"history": {"loss": [1.0], "alpha": [[1 / m] * m], "task_losses": [[1.0] * m],
                        "e_hat": [], "r": []},
            "metrics": {"task_excess": [0.1] * m, "clean_excess": 0.1, "noisy_excess": 0.1,
                        "noisy_weight": 1 / m, "best_step": 1, "clean_excess_last": 0.1,
                        "train_excess": [0.1] * m}, "weighting": None,
            "setup": {"optimizer": "SGD", "lr": 0.1, "momentum": 0.9, "init_checksum": 1.0,
                      "data_checksum": 1.0}}


@pytest.mark.slow
def test_digits_toy_runs(tmp_path):
    cfg = excessmtl.Config(quick=True, toy="digits", out_dir=str(tmp_path), n_train=1000,
                           methods="ew,excessmtl")
    result = excessmtl.train(cfg)
    assert sorted({noise for _, noise in result["runs"]}) == [0.0, 0.6]  # not the regression's
    for run in result["runs"].values():
        assert len(run["metrics"]["task_excess"]) == 2
        assert 0.0 <= run["metrics"]["clean_excess"] <= 1.0
        assert run["history"]["loss"][-1] < run["history"]["loss"][0]


BAD_ARGVS = [["--steps", "-3"], ["--device", "tpu"], ["--bogus"], ["--methods", "ew,nope"],
             ["--noise-levels", "a,b"], ["--noisy-task", "3"],
             ["--toy", "digits", "--noise-levels", "2"], ["--eta-excess", "-1"],
             ["--seed", "-1"], ["--adam-lr", "0"], ["--task-scale", "big"],
             ["--arm-lr", "uw:fast"], ["--arm-lr", "nope:0.1"], ["--arm-lr", "uw:0"]]


@pytest.mark.parametrize("argv", BAD_ARGVS)
def test_bad_arguments_exit_with_an_error(argv, capsys):
    with pytest.raises(SystemExit) as err:
        excessmtl.parse_args(argv)
    assert err.value.code != 0
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


# --------------------------------------------------------------------------------------------
# 5. The design as data: what each arm got, the premise, the rivals' wiring
# --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_quick_run_arms_follow_the_design(quick_run):
    """Every arm: the same data and initial network, the optimiser and step sizes of the design,
    and the checkpoint its own validation curve chose."""
    out, result = quick_run
    cfg, arms = result["cfg"], json.loads((out / "summary.json").read_text())["arms"]
    assert set(arms) == {excessmtl.NAMES[k] for k in excessmtl.METHODS}
    assert len({a["init"] for a in arms.values()}) == 1  # paired: one initial network
    assert len({a["data"] for a in arms.values()}) == 1  # paired: one training set
    for key in excessmtl.METHODS:
        arm = arms[excessmtl.NAMES[key]]
        if key in ("uw", "ew_adam", "oracle_adam"):
            assert (arm["optimizer"], arm["lr"]) == ("Adam", excessmtl.lr_of(cfg, key)), key
        else:
            assert (arm["optimizer"], arm["lr"], arm["momentum"]) == (
                "SGD", excessmtl.lr_of(cfg, key), cfg.momentum), key
        hist = result["runs"][(key, 4.0)]["history"]
        assert arm["steps"] == hist["eval_step"][hist["val_loss"].index(min(hist["val_loss"]))]
        assert arm["max_steps"] == cfg.steps and arm["batch"] == "full"
    assert arms["ExcessMTL"]["eta"] == cfg.eta_excess and arms["ExcessMTL"]["warmup"] == cfg.warmup
    assert arms["GroupDRO"]["eta"] == cfg.eta_dro
    assert arms["GroupDRO (large step)"]["eta"] == cfg.eta_dro_big > cfg.eta_dro
    assert arms["EG on exact excess"]["eta"] == cfg.eta_exact
    # the weighting each arm really ran
    kinds = {k: type(result["runs"][(k, 4.0)]["weighting"]).__name__ for k in excessmtl.METHODS}
    assert kinds == {"ew": "EqualWeighting", "groupdro": "GroupDRO", "groupdro_big": "GroupDRO",
                     "dwa": "DynamicWeightAverage", "excessmtl": "ExcessMTL",
                     "exact": "ExactExcessEG", "oracle": "DropNoisyOracle",
                     "uw": "UncertaintyWeighting", "ew_adam": "EqualWeighting",
                     "oracle_adam": "DropNoisyOracle"}


@pytest.mark.slow
def test_quick_run_reports_its_premise(quick_run):
    out, result = quick_run
    premise = json.loads((out / "summary.json").read_text())["premise"]
    names = [r["name"] for r in premise]
    assert any(n.startswith("EW is hurt") for n in names)
    assert any(n.startswith("the premise") for n in names)
    assert any(n.startswith("the prize") for n in names)
    assert any(n.startswith("upper bound") for n in names)
    assert all(math.isfinite(r["value"]) for r in premise)


def test_premise_rows_match_hand_values():
    cfg = excessmtl.Config()
    m = {"clean_excess/ew/noise=4": 0.02, "clean_excess/ew/noise=0.1": 0.004,
         "clean_excess/oracle/noise=4": 0.005, "clean_excess/exact/noise=4": 0.03,
         "noisy_weight/exact/noise=4": 0.7}
    for i, (te, tl) in enumerate([(0.3, 16.2), (0.05, 0.06), (0.1, 0.12)]):
        m[f"train_excess/ew/noise=4/task={i}"] = te
        m[f"train_loss/ew/noise=4/task={i}"] = tl
    rows = {r["name"].split(":")[0]: r for r in excessmtl.premise_rows(
        cfg, m, ["ew", "oracle", "exact"], [0.1, 4.0])}
    assert rows["EW is hurt"]["value"] == pytest.approx(5.0) and rows["EW is hurt"]["holds"]
    premise = next(r for n, r in rows.items() if n.startswith("the premise"))
    assert premise["value"] == pytest.approx(0.3 / 0.075) and premise["holds"] is False
    prize = next(r for n, r in rows.items() if n.startswith("the prize"))
    assert prize["value"] == pytest.approx(0.25) and prize["holds"] is True
    loss = next(r for n, r in rows.items() if "training loss" in n)
    assert loss["value"] == pytest.approx(16.2 / 0.09)
    bayes = next(r for n, r in rows.items() if "Bayes" in n)
    assert bayes["value"] == pytest.approx(16.0)


def test_exact_excess_arm_ascends_the_in_sample_excess_of_the_noiseless_targets(monkeypatch):
    cfg, data, _, _ = tiny_setup()
    cfg = dataclasses.replace(cfg, steps=2, warmup=1, log_every=100, eval_every=1)
    seen = []
    real = excessmtl.ExactExcessEG.ascend
    monkeypatch.setattr(excessmtl.ExactExcessEG, "ascend",
                        lambda self, e: seen.append(e.clone()) or real(self, e))
    run = excessmtl.train_one(cfg, data, "exact", 4.0)
    torch.manual_seed(cfg.seed)
    model = excessmtl.make_model(cfg)  # the arm's initial network
    with torch.no_grad():
        pred = torch.cat(model(data["x_train"]), dim=1)  # (N, m)
    want = ((pred - data["f_train"]) ** 2).mean(0)  # (m,) against the noiseless targets
    assert torch.allclose(seen[0], want, rtol=1e-5)
    assert not seen[0].requires_grad
    assert run["weighting"].t == 2 and not torch.equal(run["weighting"].alpha,
                                                        torch.full((3,), 1 / 3))


def test_oracle_drops_exactly_the_noisy_task():
    cfg, data, model, y = tiny_setup()
    cfg = dataclasses.replace(cfg, noisy_task=1, steps=3, log_every=100)
    run = excessmtl.train_one(cfg, data, "oracle", 4.0)
    assert run["history"]["alpha"][-1] == pytest.approx([0.5, 0.0, 0.5])
    w = excessmtl.make_weighting("oracle", cfg, 3)
    losses = torch.tensor([1.0, 50.0, 3.0])
    assert w(losses).item() == pytest.approx(3 * (0.5 + 1.5))


def test_adam_arms_are_exactly_the_adam_methods_each_at_its_own_lr():
    cfg, data, _, _ = tiny_setup()
    cfg = dataclasses.replace(cfg, steps=1, log_every=100, arm_lr="uw:0.3,dwa:0.07",
                              adam_lr=0.02, lr=0.04)
    want = {"uw": ("Adam", 0.3), "ew_adam": ("Adam", 0.02), "oracle_adam": ("Adam", 0.02),
            "dwa": ("SGD", 0.07)}
    for key in excessmtl.METHODS:
        got = excessmtl.train_one(cfg, data, key, 1.0)["setup"]
        assert (got["optimizer"], got["lr"]) == want.get(key, ("SGD", 0.04)), key


def test_default_learning_rates_are_the_tuned_per_arm_values():
    """Each arm's lr as tuned on seeds 100-102 (README, "What was tuned")."""
    cfg = excessmtl.Config()
    got = {k: excessmtl.lr_of(cfg, k) for k in excessmtl.METHODS}
    assert got == TUNED_LR


def test_checkpoint_is_the_lowest_validation_loss_and_its_test_error_is_reported():
    cfg, data, _, _ = tiny_setup()
    cfg = dataclasses.replace(cfg, steps=30, eval_every=5, log_every=100)
    run = excessmtl.train_one(cfg, data, "ew", 4.0)
    h, m = run["history"], run["metrics"]
    assert h["eval_step"] == [5, 10, 15, 20, 25, 30]
    at = h["val_loss"].index(min(h["val_loss"]))
    assert m["best_step"] == h["eval_step"][at]
    assert m["clean_excess"] == pytest.approx(h["clean_excess"][at], rel=1e-6)
    assert m["clean_excess_last"] == pytest.approx(h["clean_excess"][-1], rel=1e-6)


def test_validation_loss_is_the_geometric_mean_over_tasks_on_noisy_validation_targets():
    cfg, data, _, _ = tiny_setup()
    cfg = dataclasses.replace(cfg, steps=1, eval_every=1, log_every=100, lr=0.0)
    run = excessmtl.train_one(cfg, data, "ew", 4.0)  # lr 0: the initial network
    torch.manual_seed(cfg.seed)
    model = excessmtl.make_model(cfg)
    y_val = excessmtl.noisy_targets(data, 4.0, 0, cfg.sigma_clean, split="val")
    with torch.no_grad():
        pred = torch.cat(model(data["x_val"]), dim=1)  # (N_val, m)
    per_task = ((pred - y_val) ** 2).mean(0)  # (m,)
    assert run["history"]["val_loss"][0] == pytest.approx(
        float(per_task.prod() ** (1 / 3)), rel=1e-5)
    assert (y_val - data["f_val"]).std(0)[0] > 3.0  # the noise reaches the validation split


def test_digits_evaluation_counts_wrong_argmax_predictions():
    cfg = excessmtl.Config(toy="digits", n_train=50, n_test=40, n_val=10)
    d = excessmtl.make_dataset(cfg, torch.Generator().manual_seed(0))
    y = d["y_test"]  # (N_test, 2)

    class Known(torch.nn.Module):  # task 0: right on every example; task 1: right on the first 10
        def forward(self, x):
            right = F.one_hot(y[:, 0], 10).float() * 5  # (N, 10)
            wrong = F.one_hot((y[:, 1] + 1) % 10, 10).float() * 5  # (N, 10)
            wrong[:10] = F.one_hot(y[:10, 1], 10).float() * 5
            return [right, wrong]

    out = excessmtl.evaluate(Known(), d, noisy_task=0)
    assert out["task_excess"] == pytest.approx([0.0, 0.75])
    assert out["clean_excess"] == pytest.approx(0.75) and out["noisy_excess"] == 0.0


def test_redraw_changes_the_noise_every_step_but_not_its_level():
    cfg, data, _, _ = tiny_setup()
    cfg = dataclasses.replace(cfg, steps=3, log_every=100, redraw=True)
    a = excessmtl.train_one(cfg, data, "ew", 4.0)
    b = excessmtl.train_one(dataclasses.replace(cfg, redraw=False), data, "ew", 4.0)
    assert a["history"]["task_losses"][0][0] != b["history"]["task_losses"][0][0]
    # the same noise level: the noisy task's first loss is ~ 1 + 16 either way
    assert a["history"]["task_losses"][0][0] == pytest.approx(
        b["history"]["task_losses"][0][0], rel=0.2)
    assert a["history"]["task_losses"][0][1:] == pytest.approx(b["history"]["task_losses"][0][1:],
                                                               rel=0.05)


TUNED_LR = {"ew": 0.05, "groupdro": 0.05, "groupdro_big": 0.2, "dwa": 0.02, "excessmtl": 0.05,
            "exact": 0.1, "oracle": 0.2, "uw": 0.03, "ew_adam": 0.01, "oracle_adam": 0.1}


def _eg_update_is_finite_at_a_large_step():
    """The hand case of test_eg_update_stays_finite_when_eta_times_score_is_large: exp(100)
    overflows float32, so only an update computed from the score differences passes."""
    new = excessmtl.eg_update(torch.tensor([0.2, 0.8]),
                              torch.tensor([100.0, 100.0 - math.log(2.0)]), 1.0)
    assert torch.allclose(new, torch.tensor([1 / 3, 2 / 3]), atol=1e-6)


def _eg_update_is_detached(alpha, score, eta):
    """eg_update with a score that requires grad returns weights without a graph."""
    new = excessmtl.eg_update(alpha, score.clone().requires_grad_(), eta)
    assert not new.requires_grad and new.grad_fn is None
