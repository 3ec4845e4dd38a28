"""Tests for ecd/train.py: DPO loss, response-only log-probs, evolver/teacher/checker, smoke run."""

import copy
import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from ecd import train as ecd

pytestmark = pytest.mark.ecd


def tiny_cfg(**kw):
    return ecd.Config(hidden=16, layers=1, **kw)


@pytest.fixture(scope="module")
def perfect_chains():
    rng = np.random.default_rng(0)
    return ecd.make_chains(200, rng, 3, 0.0, ecd.evolution_ops())


def tiny_batch(n=4, seed=0):
    rng = np.random.default_rng(seed)
    chains = ecd.make_chains(n, rng, 3, 0.0, ecd.evolution_ops())
    # built by hand, not by make_ecd_pairs, so that exercise 2 is gradable without exercise 3
    return [(ins[1], res[1], res[0]) for ins, res in chains]


# --- tier 1: hand-computed values ---------------------------------------------------------------
@pytest.mark.exercise(1)
def test_dpo_loss_matches_hand_value():
    t = torch.tensor
    losses, rw, rl = ecd.dpo_loss(t([-1.0]), t([-3.0]), t([-2.0]), t([-2.0]), beta=0.1)
    # h = (-1 + 2) - (-3 + 2) = 2;  loss = log(1 + exp(-0.2))
    assert losses.item() == pytest.approx(0.598139, abs=1e-6)
    assert rw.item() == pytest.approx(0.1, abs=1e-7)  # beta * (-1 - -2)
    assert rl.item() == pytest.approx(-0.1, abs=1e-7)  # beta * (-3 - -2)
    same, _, _ = ecd.dpo_loss(t([-5.0]), t([-5.0]), t([-5.0]), t([-5.0]), beta=0.1)
    assert same.item() == pytest.approx(math.log(2), abs=1e-6)
    # the rewards of a policy that requires grad are logged values, detached from its graph
    _, rw, rl = ecd.dpo_loss(t([-1.0], requires_grad=True), t([-3.0], requires_grad=True),
                             t([-2.0]), t([-2.0]), beta=0.1)
    assert not rw.requires_grad and not rl.requires_grad


@pytest.mark.exercise(1)
def test_dpo_gradient_matches_hand_value():
    pc = torch.tensor([-1.0], requires_grad=True)
    pr = torch.tensor([-3.0], requires_grad=True)
    losses, rw, rl = ecd.dpo_loss(pc, pr, torch.tensor([-2.0]), torch.tensor([-2.0]), beta=0.1)
    losses.sum().backward()
    # dL/dpc = -beta * sigma(-beta h) with h = 2
    assert pc.grad.item() == pytest.approx(-0.045017, abs=1e-6)
    assert pr.grad.item() == pytest.approx(0.045017, abs=1e-6)
    assert not rw.requires_grad and not rl.requires_grad
    # with unequal reference log-probs the reference terms change h and so the gradient
    pc = torch.tensor([-1.0], requires_grad=True)
    losses, _, _ = ecd.dpo_loss(pc, torch.tensor([-3.0]), torch.tensor([-2.0]),
                                torch.tensor([-4.5]), beta=0.1)  # h = 1 - 1.5 = -0.5
    losses.sum().backward()
    assert pc.grad.item() == pytest.approx(_dpo_by_hand(-1.0, -3.0, -2.0, -4.5, 0.1)[3], abs=1e-6)


@pytest.mark.exercise(1)
def test_dpo_rewards_are_detached():
    x = [torch.tensor([v], requires_grad=True) for v in (-1.0, -3.0, -2.0, -2.0)]
    _, rw, rl = ecd.dpo_loss(*x, 0.1)
    assert not rw.requires_grad and not rl.requires_grad
    # detached, but still the implicit rewards and the loss of Eq. 7 (unequal references)
    vals = (-1.0, -3.0, -2.0, -4.5)
    losses, rw, rl = ecd.dpo_loss(*[torch.tensor([v], requires_grad=True) for v in vals], 0.1)
    loss, want_w, want_l, _ = _dpo_by_hand(*vals, 0.1)
    assert losses.item() == pytest.approx(loss, abs=1e-6)
    assert rw.item() == pytest.approx(want_w, abs=1e-6)
    assert rl.item() == pytest.approx(want_l, abs=1e-6)


def test_sft_loss_is_mean_response_token_nll():
    torch.manual_seed(0)
    model = ecd.make_model(tiny_cfg()).eval()
    pairs = tiny_batch(4)
    ids, mask = ecd.encode([(x, yw) for x, yw, _ in pairs], ecd.seq_len(3))
    with torch.no_grad():
        loss = ecd.sft_loss(model, ids, mask).item()
        want = -ecd.seq_logps(model, ids, mask).sum().item() / sum(len(yw) + 1 for _, yw, _ in
                                                                    pairs)
    assert loss > 0 and loss == pytest.approx(want, rel=1e-5)


def test_checker_unit_cases():
    ins = [("COUNT", 3), ("UPPER", None), ("START", 2)]
    assert ecd.check(ins, ["W2", "W5", "W1"]) == [True, True, True]
    assert ecd.check(ins, ["w2", "W5", "W1"]) == [True, False, True]
    assert ecd.check(ins, ["W3", "W5", "W1"]) == [True, True, False]
    assert ecd.check(ins, ["W2", "W5"]) == [False, True, True]
    assert ecd.check(ins, ["W2", "START_a2", "W1"]) == [False, False, False]  # not a word
    assert ecd.check(ins, []) == [False, True, False]
    ins2 = [("COUNT", 4), ("INCLUDE", 1), ("EXCLUDE", 3), ("EXCLUDE", 5), ("NOREP", None)]
    assert ecd.check(ins2, ["w1", "w2", "W4", "w0"]) == [True] * 5
    assert ecd.check(ins2, ["w2", "w3", "W2", "w5"]) == [True, False, False, False, False]
    assert ecd.satisfied(ins2, ["w1", "w2", "W4", "w0"])
    assert not ecd.satisfied(ins2, ["w1", "w2", "W4", "w3"])  # one broken constraint is enough


def test_no_dead_constraint_types():
    # every constraint type the checker knows is either an evolution op or the seed's COUNT
    assert set(ecd.OPS) == {"COUNT"} | set(ecd.evolution_ops(norep=True))
    assert not any(t.startswith("END") for t in ecd.VOCAB)


def test_instruction_tokens():
    toks = ecd.instr_tokens([("COUNT", 3), ("UPPER", None), ("START", 2), ("EXCLUDE", 0)])
    assert toks == ["<bos>", "COUNT_3", "UPPER", "START_a2", "EXCLUDE_a0", "<sep>"]
    assert all(t in ecd.TOK for t in toks)


# --- tier 2: invariants -------------------------------------------------------------------------
def test_dpo_policy_equals_reference_gives_log2_and_zero_rewards():
    g = torch.Generator().manual_seed(0)
    pw, pl = -10 * torch.rand(8, generator=g), -10 * torch.rand(8, generator=g)
    losses, rw, rl = ecd.dpo_loss(pw, pl, pw.clone(), pl.clone(), beta=2.0)
    assert torch.allclose(losses, torch.full((8,), math.log(2)), atol=1e-6)
    assert torch.all(rw == 0) and torch.all(rl == 0)


def test_dpo_loss_matches_naive_formula():
    g = torch.Generator().manual_seed(1)
    x = -20 * torch.rand(4, 16, generator=g, dtype=torch.float64)
    beta = 0.7
    losses, _, _ = ecd.dpo_loss(x[0], x[1], x[2], x[3], beta)
    for i in range(16):
        h = (x[0, i] - x[2, i]) - (x[1, i] - x[3, i])
        naive = -math.log(1.0 / (1.0 + math.exp(-beta * h.item())))
        assert losses[i].item() == pytest.approx(naive, rel=1e-9, abs=1e-12)


def test_encode_masks_exactly_the_response_and_eos():
    pairs = tiny_batch(4)
    T = ecd.seq_len(3)
    ids, mask = ecd.encode([(x, yw) for x, yw, _ in pairs], T)
    for i, (x, yw, _) in enumerate(pairs):
        p = len(ecd.instr_tokens(x))
        assert mask[i].sum().item() == len(yw) + 1
        assert mask[i, :p].sum() == 0 and mask[i, p + len(yw) + 1:].sum() == 0
        assert ids[i, p + len(yw)].item() == ecd.EOS
        assert ids[i, p - 1].item() == ecd.SEP


@pytest.mark.exercise(2)
def test_seq_logps_matches_hand_loop():
    torch.manual_seed(0)
    model = ecd.make_model(tiny_cfg()).eval()
    pairs = tiny_batch(4)
    ids, mask = ecd.encode([(x, yl) for x, _, yl in pairs], ecd.seq_len(3))
    with torch.no_grad():
        got = ecd.seq_logps(model, ids, mask)  # (B,)
        logits = model(input_ids=ids).logits.log_softmax(-1)  # (B, T, V)
    for i in range(len(ids)):
        want = 0.0
        for t in range(1, ids.shape[1]):
            if mask[i, t] == 1:
                want += logits[i, t - 1, ids[i, t]].item()
        assert got[i].item() == pytest.approx(want, abs=1e-4)


@pytest.mark.exercise(2)
def test_prompt_and_padding_contribute_nothing():
    torch.manual_seed(0)
    model = ecd.make_model(tiny_cfg()).eval()
    pairs = tiny_batch(4)
    ids, mask = ecd.encode([(x, yw) for x, yw, _ in pairs], ecd.seq_len(3))
    with torch.no_grad():
        per_tok = ecd.token_logps(model, ids, mask)  # (B, T-1)
        base = ecd.seq_logps(model, ids, mask)
        # (a) entries at prompt / padding targets are exactly zero, response entries are not
        assert torch.all(per_tok[mask[:, 1:] == 0] == 0)
        assert torch.all(per_tok[mask[:, 1:] == 1] < 0)
        # (b) changing the tokens after <eos> (the padding) leaves log pi(y|x) unchanged
        junk = ids.clone()
        junk[mask.cumsum(1) >= mask.sum(1, keepdim=True)] = ecd.TOK["W3"]
        junk[mask == 1] = ids[mask == 1]  # keep the response (incl. eos) itself
        assert not torch.equal(junk, ids)
        assert torch.allclose(ecd.seq_logps(model, junk, mask), base, atol=1e-5)


def test_identical_pair_gives_zero_gradient():
    torch.manual_seed(0)
    model = ecd.make_model(tiny_cfg())
    x, yw, yl = tiny_batch(1)[0]
    T = ecd.seq_len(3)

    def grads(rejected):
        model.zero_grad()
        ids, mask = ecd.encode([(x, yw), (x, rejected)], T)
        lp = ecd.seq_logps(model, ids, mask)  # (2,)
        losses, _, _ = ecd.dpo_loss(lp[:1], lp[1:], torch.tensor([-3.0]), torch.tensor([-9.0]),
                                    beta=2.0)
        losses.sum().backward()
        return max(p.grad.abs().max().item() for p in model.parameters())

    assert grads(yw) < 1e-6  # chosen == rejected: the two terms cancel on every parameter
    assert grads(yl) > 1e-3  # a real pair does move the model


def test_reference_frozen_and_unchanged():
    torch.manual_seed(0)
    policy = ecd.make_model(tiny_cfg())
    ref = ecd.make_model(tiny_cfg())
    ref.load_state_dict(policy.state_dict())
    ref.eval().requires_grad_(False)
    before = {k: v.clone() for k, v in ref.state_dict().items()}
    pairs = ecd.encode_pairs(tiny_batch(8), ecd.seq_len(3))
    ecd.train_dpo(policy, ref, pairs, steps=3, lr=1e-2, beta=1.0, batch_size=4,
                  gen=torch.Generator().manual_seed(0), log_every=100)
    assert all(p.grad is None for p in ref.parameters())
    assert all(torch.equal(before[k], v) for k, v in ref.state_dict().items())
    assert any(not torch.equal(before[k], v) for k, v in policy.state_dict().items())


def test_train_dpo_widens_the_margin_of_its_pairs():
    torch.manual_seed(0)
    policy = ecd.make_model(tiny_cfg())
    ref = ecd.make_model(tiny_cfg())
    ref.load_state_dict(policy.state_dict())
    ref.eval().requires_grad_(False)
    pairs = ecd.encode_pairs(tiny_batch(8), ecd.seq_len(3))

    def margin(model):  # mean of log pi(y_w|x) - log pi(y_l|x), measured independently
        return (ecd.batched_seq_logps(model, pairs["c_ids"], pairs["c_mask"])
                - ecd.batched_seq_logps(model, pairs["r_ids"], pairs["r_mask"])).mean().item()

    hist = ecd.train_dpo(policy, ref, pairs, steps=5, lr=1e-2, beta=1.0, batch_size=8,
                         gen=torch.Generator().manual_seed(0), log_every=100)
    assert margin(policy) > margin(ref) + 0.5
    assert hist["loss"][0] == pytest.approx(math.log(2), abs=1e-5)
    assert hist["loss"][-1] < hist["loss"][0]


def test_one_dpo_step_increases_margin():
    torch.manual_seed(0)
    policy = ecd.make_model(tiny_cfg())
    pairs = ecd.encode_pairs(tiny_batch(8), ecd.seq_len(3))
    ids = torch.cat([pairs["c_ids"], pairs["r_ids"]])  # (2B, T)
    mask = torch.cat([pairs["c_mask"], pairs["r_mask"]])  # (2B, T)
    ref = ecd.batched_seq_logps(policy, ids, mask)  # (2B,)
    opt = torch.optim.SGD(policy.parameters(), lr=1e-2)
    lp = ecd.seq_logps(policy, ids, mask)
    losses, rw, rl = ecd.dpo_loss(lp[:8], lp[8:], ref[:8], ref[8:], beta=1.0)
    losses.mean().backward()
    opt.step()
    after = ecd.batched_seq_logps(policy, ids, mask)
    margin = (after[:8] - ref[:8]) - (after[8:] - ref[8:])
    assert margin.mean().item() > 0


def test_evolver_adds_exactly_one_constraint_per_round(perfect_chains):
    for instrs, resps in perfect_chains:
        assert instrs[0][0][0] == "COUNT" and len(instrs[0]) == 1
        for k in range(1, len(instrs)):
            assert instrs[k][:-1] == instrs[k - 1]  # parent is a prefix, COUNT never changes
            assert len(instrs[k]) == len(instrs[k - 1]) + 1
            assert len(resps[k]) == instrs[0][0][1]


@pytest.mark.exercise(3)
def test_ecd_negatives_miss_exactly_the_new_constraint(perfect_chains):
    pairs = ecd.make_ecd_pairs(perfect_chains)
    assert len(pairs) == 3 * len(perfect_chains)
    for x, yw, yl in pairs:
        assert ecd.satisfied(x, yw)
        assert ecd.satisfied(x[:-1], yl)  # the parent answer was right for the parent
        assert ecd.check(x, yl) == [True] * (len(x) - 1) + [False]
    assert ecd.mean_violations(pairs) == 1.0


@pytest.mark.exercise(3)
def test_all_ancestors_uses_every_earlier_answer(perfect_chains):
    chains = perfect_chains[:5]
    pairs = ecd.make_ecd_pairs(chains, all_ancestors=True)
    assert len(pairs) == 5 * (1 + 2 + 3)
    instrs, resps = chains[0]
    assert pairs[:6] == [(instrs[1], resps[1], resps[0]), (instrs[2], resps[2], resps[0]),
                         (instrs[2], resps[2], resps[1]), (instrs[3], resps[3], resps[0]),
                         (instrs[3], resps[3], resps[1]), (instrs[3], resps[3], resps[2])]


def test_random_negatives_are_easy_and_aligned(perfect_chains):
    pairs = ecd.make_ecd_pairs(perfect_chains)
    pool = [r for _, res in perfect_chains for r in res]
    rand = ecd.make_random_pairs(pairs, pool, np.random.default_rng(0))
    for (x, yw, _), (x2, yw2, neg) in zip(pairs, rand):
        assert x2 == x and yw2 == yw and not ecd.satisfied(x, neg)
    assert ecd.mean_violations(rand) > 1.5 > ecd.mean_violations(pairs)


def test_teacher_error_repeats_the_parent():
    rng = np.random.default_rng(0)
    instr = [("COUNT", 3), ("UPPER", None)]
    parent = ["w1", "w2", "w3"]
    outs = [ecd.teacher(instr, parent, rng, err=0.3) for _ in range(2000)]
    repeated = np.mean([o == parent for o in outs])
    assert 0.26 < repeated < 0.34
    assert all(o == ["W1", "W2", "W3"] for o in outs if o != parent)  # minimal repair
    assert ecd.teacher(instr, parent, rng, err=0.0) == ["W1", "W2", "W3"]


def test_repair_is_minimal():
    rng = np.random.default_rng(0)
    parent = ["w1", "w2", "w3"]
    assert ecd.repair([("COUNT", 3), ("START", 5)], parent, rng) == ["w5", "w2", "w3"]
    assert ecd.repair([("COUNT", 3), ("UPPER", None)], parent, rng) == ["W1", "W2", "W3"]
    for _ in range(20):
        inc = ecd.repair([("COUNT", 3), ("INCLUDE", 7)], parent, rng)
        assert "w7" in inc and sum(a != b for a, b in zip(inc, parent)) == 1
        exc = ecd.repair([("COUNT", 3), ("EXCLUDE", 2)], parent, rng)
        assert exc[0] == "w1" and exc[2] == "w3" and exc[1] != "w2"


def test_repair_refuses_contradictions():
    rng = np.random.default_rng(0)
    assert ecd.repair([("COUNT", 2), ("EXCLUDE", 3), ("INCLUDE", 3)], ["w3", "w1"], rng) is None
    out = ecd.repair([("COUNT", 2), ("EXCLUDE", 3), ("START", 5)], ["w3", "w3"], rng)
    assert out[0] == "w5" and out[1] != "w3"


def test_imperfect_teacher_yields_identical_pairs():
    chains = ecd.make_chains(200, np.random.default_rng(0), 3, 0.3, ecd.evolution_ops())
    pairs = ecd.make_ecd_pairs(chains)
    frac = np.mean([yw == yl for _, yw, yl in pairs])
    assert 0.2 < frac < 0.4


def test_generate_is_deterministic_and_stops_at_eos():
    torch.manual_seed(0)
    model = ecd.make_model(tiny_cfg())
    instrs = [x for x, _, _ in tiny_batch(6)]
    a = ecd.generate(model, instrs, 3, False, torch.Generator().manual_seed(0))
    b = ecd.generate(model, instrs, 3, False, torch.Generator().manual_seed(0))
    assert a == b and all(len(s) == 3 for s in a)
    assert all("<eos>" not in ans and len(ans) <= ecd.MAX_NEW for s in a for ans in s)


def test_parse_args_rejects_bad_values():
    for bad in (["--steps", "-3"], ["--device", "tpu"], ["--bogus"], ["--teacher-errs", "1.5"],
                ["--teacher-errs", "0.3,x"], ["--beta", "0"], ["--seed", "-1"],
                ["--seed", str(2**32)], ["--lr-grid", "1e-3,-1"], ["--sft-plus-steps", "-1"]):
        with pytest.raises(SystemExit) as e:
            ecd.parse_args(bad)
        assert e.value.code == 2
    assert ecd.parse_args(["--quick", "--all-ancestors"]).all_ancestors


# --- wiring: held-out split, evaluation, generation, the fair control ---------------------------
@pytest.fixture(scope="module")
def quick_data():
    cfg = dataclasses.replace(ecd.Config(), **ecd.QUICK)
    return cfg, ecd.make_dataset(cfg, np.random.default_rng(0))


def test_held_out_instructions_never_appear_in_training(quick_data):
    cfg, data = quick_data
    assert len(data["test_instrs"]) == cfg.n_test * 2  # levels 2 and 3 of every test chain
    test_keys = {ecd.instr_key(x) for x in data["test_instrs"]}
    test_toks = {tuple(ecd.instr_tokens(x)) for x in data["test_instrs"]}
    assert len(data["train"]) == 2  # the imperfect and the perfect teacher
    for d in data["train"].values():
        train_instrs = [x for ins, _ in d["chains"] for x in ins]
        assert not test_keys & {ecd.instr_key(x) for x in train_instrs}  # not even reordered
        assert not test_toks & {tuple(ecd.instr_tokens(x)) for x in train_instrs}
        assert not test_keys & {ecd.instr_key(x) for x, _ in d["sft"] + d["sft_plus"]}
        val_keys = {ecd.instr_key(x) for x in data["val_instrs"]}
        assert not val_keys & {ecd.instr_key(x) for x in train_instrs}
    assert len(data["val_instrs"]) == cfg.n_val * 2 and not val_keys & test_keys
    # the test pairs are graded on the same held-out levels
    assert [x for x, _, _ in data["test_pairs"]] == data["test_instrs"]


def test_instr_key_ignores_constraint_order():
    a = [("COUNT", 3), ("UPPER", None), ("EXCLUDE", 2), ("START", 4)]
    assert ecd.instr_key(a) == ecd.instr_key([a[0], a[3], a[2], a[1]])
    assert ecd.instr_key(a) != ecd.instr_key(a[:3])


def test_score_answers_counts_a_sample_only_if_every_constraint_holds():
    instrs = [[("COUNT", 2), ("UPPER", None), ("START", 1)], [("COUNT", 3), ("EXCLUDE", 0)]]
    answers = [[["W1", "W2"],   # all three hold
                ["W1", "w2"],   # UPPER fails
                ["W3", "W2"]],  # START fails
               [["w1", "w2", "w3"],   # both hold
                ["w0", "w2", "w3"],   # EXCLUDE fails
                ["w1", "w2"]]]        # COUNT fails
    res = ecd.score_answers(instrs, answers)
    assert res["sat"] == pytest.approx(2 / 6)
    assert res["sat_COUNT"] == pytest.approx(5 / 6)
    assert res["sat_UPPER"] == pytest.approx(2 / 3)
    assert res["sat_EXCLUDE"] == pytest.approx(2 / 3)


def test_evaluate_counts_a_sample_only_if_every_constraint_holds(quick_data, monkeypatch):
    cfg, data = quick_data
    instrs = data["test_instrs"]

    def fake_generate(model, instrs_, n_samples, greedy, gen):
        # sample 0 satisfies every constraint; sample 1 breaks only COUNT
        good = [ecd.repair(x, None, np.random.default_rng(0)) for x in instrs_]
        return [[g] if greedy else [g, g + [g[0]]] for g in good]

    monkeypatch.setattr(ecd, "generate", fake_generate)
    torch.manual_seed(0)
    res = ecd.evaluate(ecd.make_model(tiny_cfg()), data, cfg)
    assert len(instrs) > 0
    assert res["sampled_sat"] == pytest.approx(0.5)  # half the samples break one constraint
    assert res["greedy_sat"] == 1.0
    assert res["sat_COUNT"] == pytest.approx(0.5) and res["sat_START"] == 1.0


class _ScriptedLM(torch.nn.Module):
    """A fake causal LM: after <sep> it says W1, after W1 it says W2, after W2 <eos>; after any
    other token it says W7. Generation that reads from the wrong position sees other tokens."""

    def __init__(self):
        super().__init__()
        self.next = {ecd.SEP: ecd.TOK["W1"], ecd.TOK["W1"]: ecd.TOK["W2"],
                     ecd.TOK["W2"]: ecd.EOS}

    def forward(self, input_ids):
        B, T = input_ids.shape
        logits = torch.full((B, T, len(ecd.VOCAB)), -1e9)  # (B, T, V)
        for b in range(B):
            for t in range(T):
                logits[b, t, self.next.get(int(input_ids[b, t]), ecd.TOK["W7"])] = 0.0
        return type("Out", (), {"logits": logits})()


def test_generation_starts_right_after_the_prompt():
    instrs = [[("COUNT", 2)], [("COUNT", 2), ("UPPER", None), ("EXCLUDE", 3)]]  # two lengths
    gen = torch.Generator().manual_seed(0)
    for greedy in (True, False):
        out = ecd.generate(_ScriptedLM(), instrs, 2, greedy, gen)
        assert out == [[["W1", "W2"]] * (1 if greedy else 2)] * 2


def test_sft_plus_data_is_the_chosen_answers_of_distinct_pairs():
    x = [("COUNT", 2), ("UPPER", None)]
    pairs = [(x, ["W1", "W2"], ["w1", "w2"]), (x, ["w5", "w6"], ["w5", "w6"]),
             (x, ["W3", "W4"], ["w3", "w4"])]
    assert ecd.drop_identical(pairs) == [pairs[0], pairs[2]]
    assert ecd.sft_plus_data(pairs) == [(x, ["W1", "W2"]), (x, ["W3", "W4"])]


@pytest.mark.exercise(4)
def test_sft_plus_trains_on_chosen_answers_never_rejected(quick_data, monkeypatch):  # noqa: F811
    cfg, data = quick_data
    d = data["train"][0.3]
    assert len(d["ecd"]) < len(d["ecd_raw"]) and all(yw != yl for _, yw, yl in d["ecd"])
    assert d["sft_plus"] == [(x, yw) for x, yw, _ in d["ecd"]]
    # given the raw pairs (identical ones included), sft_plus_data drops them itself
    raw = d["ecd_raw"]
    assert any(yw == yl for _, yw, yl in raw)
    assert ecd.sft_plus_data(raw) == [(x, yw) for x, yw, yl in raw if yw != yl]
    # wiring: what run_stage_two hands to the SFT loop decodes to exactly those chosen answers
    seen = {}

    def spy(model, ids, mask, steps, lr, batch_size, gen, log_every, tag="sft", *args):
        seen.update(ids=ids, mask=mask, steps=steps, lr=lr)
        return [0.0]

    monkeypatch.setattr(ecd, "train_sft", spy)
    torch.manual_seed(0)
    model = ecd.make_model(tiny_cfg())
    ecd.run_stage_two("SFT+", model, model, d, cfg, 0.123)
    resp = [[ecd.VOCAB[t] for t, m in zip(row.tolist(), mrow.tolist()) if m == 1][:-1]
            for row, mrow in zip(seen["ids"], seen["mask"])]
    assert resp == [yw for _, yw, _ in d["ecd"]]
    rejected_only = {tuple(yl) for _, _, yl in d["ecd"]} - {tuple(yw) for _, yw, _ in d["ecd"]}
    assert rejected_only and not rejected_only & {tuple(r) for r in resp}
    assert seen["lr"] == 0.123 and seen["steps"] == ecd.sft_plus_steps(cfg, len(d["ecd"]))


def test_controls_see_the_same_pairs_and_compute(quick_data):
    cfg, data = quick_data
    for d in data["train"].values():
        assert [(x, yw) for x, yw, _ in d["random"]] == [(x, yw) for x, yw, _ in d["ecd"]]
    # compute: SFT+'s most steps cost at least DPO's most steps plus its reference pass, and
    # less than one SFT step more
    for n in (7, len(data["train"][0.3]["ecd"])):
        dpo = ecd.stage_two_compute("DPO ECD", cfg.pref_steps, n, cfg.batch_size)
        sft_plus = ecd.stage_two_compute("SFT+", ecd.sft_plus_steps(cfg, n), n, cfg.batch_size)
        assert dpo <= sft_plus < dpo + ecd.FWD_BWD * cfg.batch_size
    assert ecd.sft_plus_steps(dataclasses.replace(cfg, sft_plus_steps=5), 7) == 5


def test_stage_two_compute_hand_values():
    # SFT: 3 forward-equivalents per sequence per step; DPO: 2 sequences per pair, plus the
    # reference's forward pass over both answers of every pair, once
    assert ecd.stage_two_compute("SFT+", 10, 100, 4) == 3 * 4 * 10
    assert ecd.stage_two_compute("DPO ECD", 10, 100, 4) == 2 * 100 + 3 * 2 * 4 * 10
    assert ecd.stage_two_compute("DPO random neg", 0, 100, 4) == 200


def test_checkpoint_is_chosen_on_validation(quick_data, monkeypatch):
    cfg, data = quick_data
    cfg = dataclasses.replace(cfg, pref_steps=6, val_every=2)
    d = data["train"][0.0]
    scores = iter([0.5, 0.2, 0.9, 0.9, 0.1])  # step 0 (SFT), 2, 4, 6 (a tie: keep the first)
    saved = []

    def fake_val(model, instrs):
        saved.append({k: t.clone() for k, t in model.state_dict().items()})
        return next(scores)

    monkeypatch.setattr(ecd, "val_score", fake_val)
    torch.manual_seed(0)
    sft = ecd.make_model(tiny_cfg())
    ref = copy.deepcopy(sft).eval().requires_grad_(False)
    model, hist, rec = ecd.run_stage_two("DPO ECD", sft, ref, d, cfg, 1e-2, data["val_instrs"])
    assert [(c[0], c[2]) for c in rec["val_curve"]] == [(0, 0.5), (2, 0.2), (4, 0.9), (6, 0.9)]
    assert rec["steps"] == 4 and rec["max_steps"] == 6 and len(hist["loss"]) == 6
    assert rec["compute"] == ecd.stage_two_compute("DPO ECD", 4, len(d["ecd"]), cfg.batch_size)
    assert all(torch.equal(saved[2][k], v) for k, v in model.state_dict().items())  # step 4
    assert not all(torch.equal(saved[3][k], v) for k, v in model.state_dict().items())
    # when no checkpoint beats the SFT weights on validation, the arm keeps the SFT weights
    scores = iter([0.5, 0.2, 0.3, 0.4])
    model, _, rec = ecd.run_stage_two("DPO ECD", sft, ref, d, cfg, 1e-2, data["val_instrs"])
    assert rec["steps"] == 0 and rec["compute"] == 2 * len(d["ecd"])
    assert all(torch.equal(sft.state_dict()[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("name", ["DPO ECD", "SFT+"])
def test_early_stopping_after_patience_checks_without_a_new_best(quick_data, monkeypatch, name):
    cfg, data = quick_data
    cfg = dataclasses.replace(cfg, pref_steps=40, val_every=2, patience=3)
    d = data["train"][0.0]
    # checks at 0, 2, 4, ... DPO steps (SFT+: 0, 4, 8, ...): a new best at check 2, then three
    # checks without one (a tie is not a new best): the stage stops after check 5
    scores = iter([0.5, 0.6, 0.8, 0.8, 0.7, 0.79] + [0.99] * 100)
    calls = []

    def fake_val(model, instrs):
        calls.append(1)
        return next(scores)

    monkeypatch.setattr(ecd, "val_score", fake_val)
    torch.manual_seed(0)
    sft = ecd.make_model(tiny_cfg())
    ref = copy.deepcopy(sft).eval().requires_grad_(False)
    _, hist, rec = ecd.run_stage_two(name, sft, ref, d, cfg, 1e-3, data["val_instrs"])
    per_check = 2 * cfg.val_every if name == "SFT+" else cfg.val_every
    assert len(calls) == 6 and rec["patience"] == 3
    assert rec["steps"] == 2 * per_check and rec["stopped_at"] == 5 * per_check
    if hist is not None:
        assert len(hist["loss"]) == 5 * per_check  # training really stopped there
    # patience 0 never stops early: every check up to the most steps
    calls.clear()
    scores = iter([0.5] * 1000)
    _, _, rec = ecd.run_stage_two(name, sft, ref, d, dataclasses.replace(cfg, patience=0), 1e-3,
                                  data["val_instrs"])
    assert rec["stopped_at"] == rec["max_steps"] and rec["steps"] == 0


# --- tier 4: smoke run, and the design record of a --quick run --------------------------------
@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("quick")
    results = ecd.train(ecd.Config(quick=True, out_dir=str(out / "a")))
    summary = ecd.report(results)
    return out, results, summary


@pytest.mark.slow
def test_quick_run_smoke_and_determinism(quick_run):
    tmp_path, out, s = quick_run
    for losses in out["history"]["sft_losses"].values():
        assert all(math.isfinite(x) for x in losses)
        assert np.mean(losses[-10:]) < np.mean(losses[:10]) - 0.5
    assert len(out["history"]["dpo"]) == 4  # 2 teachers x (random, ECD)
    for h in out["history"]["dpo"].values():
        assert all(math.isfinite(x) for x in h["loss"])
        assert h["loss"][0] == pytest.approx(math.log(2), abs=1e-4)  # policy starts at reference
    assert json.loads((tmp_path / "a" / "summary.json").read_text()) == json.loads(
        json.dumps(s, default=str))
    assert set(s) == {"folder", "seed", "config", "wall_seconds", "metrics", "headline",
                      "premise", "arms"}
    assert s["folder"] == "ecd" and s["config"]["steps"] == ecd.QUICK["steps"]
    for row in s["headline"]:
        assert {"metric", "higher_is_better", "expect", "method", "baseline"} <= set(row)
        assert row["expect"] in ("better", "level", "report")
        assert 0.0 <= row["method"]["value"] <= 1.0
    first = next(r for r in s["headline"] if r["expect"] == "better")
    assert first["baseline"]["name"] == "SFT+"  # the index shows ECD vs the fair control
    assert (tmp_path / "a" / "ecd.png").exists() and (tmp_path / "a" / "ecd_compute.png").exists()
    again = ecd.train(ecd.Config(quick=True, out_dir=str(tmp_path / "b")))
    assert again["history"]["sft_losses"] == out["history"]["sft_losses"]
    assert again["metrics"] == out["metrics"]


def test_arms_record_the_papers_design(quick_run):
    """What each compared arm got, from a --quick run, against the design (EXPERIMENTS.md, 7)."""
    _, out, s = quick_run
    cfg, arms = out["cfg"], s["arms"]
    assert set(arms) == {"SFT", "SFT+", "DPO random neg", "DPO ECD"}
    assert all(a["teachers"] == ["teacher err 0.3", "perfect teacher"] for a in arms.values())
    # the data: ECD reads the parent answers, the rival random failing answers, SFT+ the chosen
    assert arms["DPO ECD"]["pairs"] == "ecd" and arms["DPO random neg"]["pairs"] == "random"
    assert arms["SFT+"]["data"] == "sft_plus" and arms["SFT"]["data"] == "sft"
    # every second stage starts from the SFT weights; DPO's reference is the frozen SFT model
    assert all(arms[n]["init"] == "sft" for n in ("SFT+", "DPO random neg", "DPO ECD"))
    assert arms["DPO ECD"]["reference"] == arms["DPO random neg"]["reference"] == "sft (frozen)"
    # each arm at its own learning rate (the lr each one actually trained with)
    assert arms["SFT+"]["lr"] == cfg.lr_sft_plus != cfg.lr_dpo_ecd
    assert arms["DPO ECD"]["lr"] == cfg.lr_dpo_ecd and arms["DPO random neg"]["lr"] == (
        cfg.lr_dpo_rand)
    assert arms["DPO ECD"]["beta"] == arms["DPO random neg"]["beta"] == cfg.beta
    assert len({a["decoding"] for a in arms.values()}) == 1  # one decoding rule for all arms
    assert arms["SFT+"]["decoding"].startswith("greedy")
    # each second stage's length is chosen on validation, within its own most steps
    for n in ("SFT+", "DPO random neg", "DPO ECD"):
        assert arms[n]["checkpoint"] == "best greedy satisfaction on validation"
        steps, most = arms[n]["steps"], arms[n]["max_steps"]
        for tag in arms[n]["teachers"]:
            s_, m_ = (steps[tag] if isinstance(steps, dict) else steps,
                      most[tag] if isinstance(most, dict) else most)
            stop = arms[n]["stopped_at"]
            stop = stop[tag] if isinstance(stop, dict) else stop
            assert 0 <= s_ <= stop <= m_
        assert arms[n]["patience"] == cfg.patience
    assert arms["DPO ECD"]["max_steps"] == cfg.pref_steps
    assert arms["SFT+"]["max_steps"] == {
        t: ecd.sft_plus_steps(cfg, len(out["data"]["train"][e]["ecd"]))
        for t, e in zip(arms["SFT+"]["teachers"], (0.3, 0.0))}


def test_method_lr_gives_each_arm_its_own_lr():
    cfg = ecd.Config(lr_sft_plus=1.0, lr_dpo_rand=2.0, lr_dpo_ecd=3.0)
    assert [ecd.method_lr(cfg, n) for n in ecd.METHODS] == [1.0, 2.0, 3.0]


def test_dpo_ecd_arm_trains_on_the_parent_answers(quick_data, monkeypatch):
    cfg, data = quick_data
    d = data["train"][0.3]
    seen = {}

    def spy(policy, ref_model, pairs, steps, lr, beta, batch_size, gen, log_every, tag="dpo",
            *args):
        seen[tag] = pairs
        return {"loss": [0.0]}

    monkeypatch.setattr(ecd, "train_dpo", spy)
    torch.manual_seed(0)
    model = ecd.make_model(tiny_cfg())
    for name in ("DPO ECD", "DPO random neg"):
        ecd.run_stage_two(name, model, model, d, cfg, 1e-3)

    def decode(ids, mask):
        return [[ecd.VOCAB[t] for t, m in zip(r.tolist(), mr.tolist()) if m == 1][:-1]
                for r, mr in zip(ids, mask)]

    ecd_pairs = seen["DPO ECD"]
    assert decode(ecd_pairs["r_ids"], ecd_pairs["r_mask"]) == [yl for _, _, yl in d["ecd"]]
    assert decode(ecd_pairs["c_ids"], ecd_pairs["c_mask"]) == [yw for _, yw, _ in d["ecd"]]
    rand = seen["DPO random neg"]
    assert decode(rand["r_ids"], rand["r_mask"]) == [yl for _, _, yl in d["random"]]
    assert decode(rand["c_ids"], rand["c_mask"]) == [yw for _, yw, _ in d["ecd"]]


class _CoinLM(torch.nn.Module):
    """A fake LM whose next token is W1 with probability 0.75 and W2 with 0.25 at temperature 1
    (every other token gets -inf), whatever the context."""

    def forward(self, input_ids):
        B, T = input_ids.shape
        logits = torch.full((B, T, len(ecd.VOCAB)), -1e9)  # (B, T, V)
        logits[..., ecd.TOK["W1"]] = math.log(0.75)
        logits[..., ecd.TOK["W2"]] = math.log(0.25)
        return type("Out", (), {"logits": logits})()


def test_sampling_is_at_temperature_one():
    # 400 answers x MAX_NEW tokens: the share of W1 must be 0.75 (temperature 0.5 would give 0.9)
    out = ecd.generate(_CoinLM(), [[("COUNT", 2)]], 400, False, torch.Generator().manual_seed(0))
    toks = [t for ans in out[0] for t in ans]
    assert len(toks) == 400 * ecd.MAX_NEW
    assert np.mean([t == "W1" for t in toks]) == pytest.approx(0.75, abs=0.02)
    greedy = ecd.generate(_CoinLM(), [[("COUNT", 2)]], 400, True, torch.Generator())
    assert greedy == [[["W1"] * ecd.MAX_NEW]]


def test_main_rejects_unwritable_out_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(SystemExit) as e:
        ecd.main(["--quick", "--out-dir", str(blocker / "sub")])
    assert "not a writable folder" in str(e.value)


def _dpo_by_hand(pc, pr, rc, rr, beta):
    """(loss, chosen reward, rejected reward, dL/dpc) of Eq. 7 for one pair, by hand."""
    h = (pc - rc) - (pr - rr)
    sig = 1 / (1 + math.exp(beta * h))  # sigma(-beta h)
    return -math.log(1 - sig), beta * (pc - rc), beta * (pr - rr), -beta * sig
