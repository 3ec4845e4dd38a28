"""The common wrong answers of each coding exercise, planted as a student would write them.

Each `<folder>/TEACHER.md` lists the mistakes students make in its coding exercises; every one of
them is here, as the code a student would put between the exercise's fences. The tests marked
`exercise(N)` must give each of them a score of 0 (`test_planted_answers.py`): a wrong answer
that passes one test of its exercise gets partial credit from tools/grade.py, which is a hole in
the tests, not a kindness.

ANSWERS[folder][N][name] = the region's code (a list of texts when the exercise has several
regions, in file order). Indentation: write the code at column 0; it is indented like the
reference region when planted.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from make_exercises import region_spans  # noqa: E402


def regions_of(text: str, n: int) -> tuple[list[str], list[tuple[int, int, str]]]:
    """The file's lines, and (BEGIN line, END line, indentation) of each region of exercise n."""
    lines = text.splitlines(keepends=True)
    return lines, [(b, e, indent) for b, e, k, indent in region_spans(lines) if k == n]


def reference_region(folder: str, n: int, k: int = 0) -> str:
    """The k-th region of exercise n in `<folder>/train.py`, dedented, fences excluded."""
    lines, spans = regions_of((ROOT / folder / "train.py").read_text(), n)
    begin, end, _ = spans[k]
    return textwrap.dedent("".join(lines[begin + 1:end]))


STALE: list[str] = []  # edits whose text left the reference; test_planted_answers fails on them


def edit(folder: str, n: int, *changes: tuple[str, str], k: int = 0) -> str | None:
    """The reference region with each (old, new) made once: a student's long answer that differs
    from ours in one place. None (and a line in STALE) if `old` is no longer once in the
    reference, so one stale entry fails one test instead of the whole table's import."""
    body = reference_region(folder, n, k)
    for old, new in changes:
        if body.count(old) != 1:
            STALE.append(f"{folder} exercise {n}: {old!r} is not once in the reference region "
                         "(the reference changed: update planted_answers.py)")
            return None
        body = body.replace(old, new)
    return body


ANSWERS: dict[str, dict[int, dict[str, str | list[str]]]] = {
    "example_paper": {
        1: {
            "a sum instead of a mean": (
                "eps = 1e-12\n"
                "loss = -np.sum(y * np.log(p + eps) + (1 - y) * np.log(1 - p + eps))"
                " + 0.5 * lam * w @ w\n"),
            "the penalty without its 1/2": (
                "eps = 1e-12\n"
                "loss = -np.mean(y * np.log(p + eps) + (1 - y) * np.log(1 - p + eps))"
                " + lam * w @ w\n"),
            "the sign flipped": (
                "eps = 1e-12\n"
                "loss = np.mean(y * np.log(p + eps) + (1 - y) * np.log(1 - p + eps))"
                " + 0.5 * lam * w @ w\n"),
        },
        2: {
            "y - p instead of p - y": "grad = X.T @ (y - p) / len(y) + lam * w\n",
            "no division by N": "grad = X.T @ (p - y) + lam * w\n",
            "the penalty's gradient forgotten": "grad = X.T @ (p - y) / len(y)\n",
        },
    },
    "dreamblend": {
        1: {
            "the mean over the whole (B*heads,) axis": (
                "total = 0.0\n"
                "for name, ref in ref_maps.items():\n"
                "    a = maps[name].float()\n"
                "    sq = (a - ref.to(a)) ** 2\n"
                "    if token_w is not None:\n"
                "        sq = sq * token_w.to(a)\n"
                "    total = total + sq.sum((1, 2)).mean()\n"),
            "view(-1, batch) instead of view(batch, -1)": (
                "total = 0.0\n"
                "for name, ref in ref_maps.items():\n"
                "    a = maps[name].float()\n"
                "    sq = (a - ref.to(a)) ** 2\n"
                "    if token_w is not None:\n"
                "        sq = sq * token_w.to(a)\n"
                "    total = total + sq.sum((1, 2)).view(-1, batch).mean(0)\n"),
            "a mean over (HW, N) instead of the sum": (
                "total = 0.0\n"
                "for name, ref in ref_maps.items():\n"
                "    a = maps[name].float()\n"
                "    sq = (a - ref.to(a)) ** 2\n"
                "    if token_w is not None:\n"
                "        sq = sq * token_w.to(a)\n"
                "    total = total + sq.mean((1, 2)).view(batch, -1).mean(1)\n"),
        },
        2: {
            "one MSE over the whole batch": "loss = F.mse_loss(pred, target)\n",
            "the halves swapped (prior rows first)": (
                "n_prior = len(pred) - n_instance\n"
                "inst = F.mse_loss(pred[n_prior:], target[n_prior:])\n"
                "if n_prior == 0:\n"
                "    return inst\n"
                "prior = F.mse_loss(pred[:n_prior], target[:n_prior])\n"
                "loss = inst + prior_weight * prior\n"),
            "nan from an empty prior slice": (
                "inst = F.mse_loss(pred[:n_instance], target[:n_instance])\n"
                "prior = F.mse_loss(pred[n_instance:], target[n_instance:])\n"
                "loss = inst + prior_weight * prior\n"),
        },
    },
    "ecd": {
        1: {
            "the reference terms forgotten": (
                "h = pi_logps_w - pi_logps_l\n"
                "losses = -F.logsigmoid(beta * h)\n"
                "chosen_rewards = beta * pi_logps_w.detach()\n"
                "rejected_rewards = beta * pi_logps_l.detach()\n"),
            "the sign of h swapped": (
                "h = (pi_logps_l - ref_logps_l) - (pi_logps_w - ref_logps_w)\n"
                "losses = -F.logsigmoid(beta * h)\n"
                "chosen_rewards = beta * (pi_logps_w - ref_logps_w).detach()\n"
                "rejected_rewards = beta * (pi_logps_l - ref_logps_l).detach()\n"),
            "the rewards not detached": (
                "h = (pi_logps_w - ref_logps_w) - (pi_logps_l - ref_logps_l)\n"
                "losses = -F.logsigmoid(beta * h)\n"
                "chosen_rewards = beta * (pi_logps_w - ref_logps_w)\n"
                "rejected_rewards = beta * (pi_logps_l - ref_logps_l)\n"),
        },
        2: {
            "the labels shifted but not the mask (the mask at t, not t+1)": (
                "logits = model(input_ids=input_ids).logits\n"
                "logp = logits[:, :-1].log_softmax(-1)\n"
                "labels = input_ids[:, 1:]\n"
                "per_tok = logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)\n"
                "return per_tok * loss_mask[:, :-1]\n"),
            "no mask: the sum runs over the prompt (and padding)": (
                "logits = model(input_ids=input_ids).logits\n"
                "logp = logits[:, :-1].log_softmax(-1)\n"
                "labels = input_ids[:, 1:]\n"
                "return logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)\n"),
        },
        3: {
            "the child's answer R^(k+1) as the negative": (
                "if k + 1 < len(resps):\n"
                "    pairs.append((instrs[k], resps[k], resps[k + 1]))\n"),
            "chosen and rejected swapped": (
                "lows = range(k) if all_ancestors else [k - 1]\n"
                "for j in lows:\n"
                "    pairs.append((instrs[k], resps[j], resps[k]))\n"),
            "level K forgotten": (
                "lows = range(k) if all_ancestors else [k - 1]\n"
                "if k < len(instrs) - 1:\n"
                "    for j in lows:\n"
                "        pairs.append((instrs[k], resps[k], resps[j]))\n"),
        },
        4: {
            "(x, y_l): training on the negatives": (
                "return [(x, yl) for x, _, yl in drop_identical(pairs)]\n"),
            "the identical pairs kept": "return [(x, yw) for x, yw, _ in pairs]\n",
            "deduplicated by instruction instead of by pair": (
                "seen, out = set(), []\n"
                "for x, yw, _ in pairs:\n"
                "    if repr(x) not in seen:\n"
                "        seen.add(repr(x))\n"
                "        out.append((x, yw))\n"
                "return out\n"),
        },
    },
    "xformer": {
        1: {
            "the mean over queries instead of the max": (
                "sim = torch.einsum(\"bqe,ce->bqc\", img_emb, txt_emb).mean(1) / temp\n"
                "target = torch.arange(len(sim))\n"
                "loss = 0.5 * (F.cross_entropy(sim, target, label_smoothing=label_smoothing)\n"
                "              + F.cross_entropy(sim.t(), target,"
                " label_smoothing=label_smoothing))\n"),
            "only the first query": (
                "sim = img_emb[:, 0] @ txt_emb.t() / temp\n"
                "target = torch.arange(len(sim))\n"
                "loss = 0.5 * (F.cross_entropy(sim, target, label_smoothing=label_smoothing)\n"
                "              + F.cross_entropy(sim.t(), target,"
                " label_smoothing=label_smoothing))\n"),
            "the transposed term forgotten (image-to-text only)": (
                "sim = torch.einsum(\"bqe,ce->bqc\", img_emb, txt_emb).amax(1) / temp\n"
                "target = torch.arange(len(sim))\n"
                "loss = F.cross_entropy(sim, target, label_smoothing=label_smoothing)\n"),
            "dividing by tau after the softmax": (
                "sim = torch.einsum(\"bqe,ce->bqc\", img_emb, txt_emb).amax(1)\n"
                "target = torch.arange(len(sim))\n"
                "loss = 0.5 * (F.cross_entropy(sim, target, label_smoothing=label_smoothing)\n"
                "              + F.cross_entropy(sim.t(), target, label_smoothing=label_smoothing)"
                ") / temp\n"),
            "no label smoothing": (
                "sim = torch.einsum(\"bqe,ce->bqc\", img_emb, txt_emb).amax(1) / temp\n"
                "target = torch.arange(len(sim))\n"
                "loss = 0.5 * (F.cross_entropy(sim, target) + F.cross_entropy(sim.t(), target))\n"),
        },
        2: {
            "text-to-image negatives from the rows of sim": edit(
                "xformer", 2, ("sim.detach().t().softmax(1)", "sim.detach().softmax(1)")),
            "only the diagonal masked, not identical captions": edit(
                "xformer", 2, ("(captions[:, None, :] == captions[None, :, :]).all(-1)",
                               "torch.eye(len(sim), dtype=torch.bool)")),
            "argmax instead of sampling": edit(
                "xformer", 2,
                ("torch.multinomial(w_i2t, 1, generator=gen).squeeze(1)", "w_i2t.argmax(1)"),
                ("torch.multinomial(w_t2i, 1, generator=gen).squeeze(1)", "w_t2i.argmax(1)")),
        },
    },
    "ovmlvc": {
        1: {
            "softmax over the batch axis (dim 0)": (
                "pi = torch.softmax(logits, dim=0)\n"
                "return pi @ wte\n"),
            "pi itself returned (a V-vector, not an embedding)": (
                "return torch.softmax(logits, dim=-1)\n"),
            "log_softmax": "return torch.log_softmax(logits, dim=-1) @ wte\n",
        },
        2: {
            "the mean over all columns (novel labels leak in)": (
                "return (y * F.softplus(-logits) + (1 - y) * F.softplus(logits)).mean()\n"),
            "torch.log(torch.sigmoid(z))": (
                "z = logits[:, base_idx]\n"
                "t = y[:, base_idx]\n"
                "p = torch.sigmoid(z)\n"
                "return -(t * torch.log(p) + (1 - t) * torch.log(1 - p)).mean()\n"),
            "a sum instead of the mean": (
                "z = logits[:, base_idx]\n"
                "t = y[:, base_idx]\n"
                "return (t * F.softplus(-z) + (1 - t) * F.softplus(z)).sum()\n"),
        },
        3: {
            "divided by the number of videos, not of positives": (
                "order = np.argsort(-scores, kind=\"stable\")\n"
                "hits = y[order]\n"
                "precision_at_k = np.cumsum(hits) / np.arange(1, len(hits) + 1)\n"
                "return float((precision_at_k * hits).sum() / len(hits))\n"),
            "sorted ascending": (
                "order = np.argsort(scores, kind=\"stable\")\n"
                "hits = y[order]\n"
                "precision_at_k = np.cumsum(hits) / np.arange(1, len(hits) + 1)\n"
                "return float((precision_at_k * hits).sum() / max(hits.sum(), 1))\n"),
            "precision averaged over all ranks": (
                "order = np.argsort(-scores, kind=\"stable\")\n"
                "hits = y[order]\n"
                "precision_at_k = np.cumsum(hits) / np.arange(1, len(hits) + 1)\n"
                "return float(precision_at_k.mean())\n"),
        },
    },
    "vidla": {
        1: {
            "patches see [CLS]": edit(
                "vidla", 1, ("allowed[1 + K:, 1:1 + K] = True", "allowed[1 + K:, :1 + K] = True")),
            "levels compared the other way (<=)": edit(
                "vidla", 1, ("level[:, None] >= level[None, :]",
                             "level[:, None] <= level[None, :]")),
            "a stride over patch indices, not frame indices": edit(
                "vidla", 1, ("frame[None, :] % stride[:, None]",
                             "torch.arange(P)[None, :] % stride[:, None]")),
            "the boolean mask returned as is": edit(
                "vidla", 1, ("return torch.zeros(allowed.shape).masked_fill(~allowed, "
                             "float(\"-inf\"))", "return allowed")),
        },
        2: {
            "z.view(B, N, T, d) (patches are frame-major)": (
                "B, _, d = z_patch.shape\n"
                "x = z_patch.view(B, N, T, d).reshape(B * N, T, d)\n"
                "h = ln(x)\n"
                "out, _ = attn(h, h, h, need_weights=False)\n"
                "x = x + out\n"
                "return x.reshape(B, N * T, d)\n"),
            "the residual forgotten": (
                "B, _, d = z_patch.shape\n"
                "x = z_patch.view(B, T, N, d).transpose(1, 2).reshape(B * N, T, d)\n"
                "h = ln(x)\n"
                "out, _ = attn(h, h, h, need_weights=False)\n"
                "return out.view(B, N, T, d).transpose(1, 2).reshape(B, T * N, d)\n"),
            "the LayerNorm applied to the residual branch as well": (
                "B, _, d = z_patch.shape\n"
                "x = z_patch.view(B, T, N, d).transpose(1, 2).reshape(B * N, T, d)\n"
                "x = ln(x)\n"
                "out, _ = attn(x, x, x, need_weights=False)\n"
                "x = x + out\n"
                "return x.view(B, N, T, d).transpose(1, 2).reshape(B, T * N, d)\n"),
        },
        3: {
            "the two directions averaged": (
                "logits = logit_scale * v @ t.T\n"
                "target = torch.arange(len(v))\n"
                "return 0.5 * (F.cross_entropy(logits, target)"
                " + F.cross_entropy(logits.T, target))\n"),
            "logit_scale forgotten": (
                "logits = v @ t.T\n"
                "target = torch.arange(len(v))\n"
                "return F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)\n"),
            "logits twice instead of its transpose": (
                "logits = logit_scale * v @ t.T\n"
                "target = torch.arange(len(v))\n"
                "return F.cross_entropy(logits, target) + F.cross_entropy(logits, target)\n"),
        },
        4: {
            "only the mean normalised": (
                "return F.normalize(self.frame_features(video).mean(1), dim=-1)\n"),
            "the final normalisation skipped": (
                "frames = F.normalize(self.frame_features(video), dim=-1)\n"
                "return frames.mean(1)\n"),
        },
    },
    "excessmtl": {
        1: {
            "divided by the accumulator before adding the current gradient": (
                "h = torch.sqrt(S + eps)\n"
                "S_new = S + g * g\n"
                "e_hat = (g * g / h).sum(dim=1)\n"),
            "the square root dropped": (
                "S_new = S + g * g\n"
                "h = S_new + eps\n"
                "e_hat = (g * g / h).sum(dim=1)\n"),
            "summed over the task axis (.sum(0))": (
                "S_new = S + g * g\n"
                "h = torch.sqrt(S_new + eps)\n"
                "e_hat = (g * g / h).sum(0)\n"),
        },
        2: {
            "a softmax of eta * score alone": "new = torch.softmax(eta * score, 0).detach()\n",
            "an additive step, clipped at 0 and renormalised": (
                "new = (alpha + eta * score).clamp(min=0)\n"
                "new = (new / new.sum()).detach()\n"),
            "an additive step, clipped at 0, not renormalised": (
                "new = (alpha + eta * score).clamp(min=0).detach()\n"),
            "not detached": (
                "new = alpha * torch.exp(eta * score)\n"
                "new = new / new.sum()\n"),
            "the direct product, which overflows once eta * score passes ~88": (
                "new = alpha * torch.exp(eta * score)\n"
                "new = (new / new.sum()).detach()\n"),
        },
    },
    "galm": {
        1: {
            "divided by deg without the clamp": edit(
                "galm", 1, ("deg.clamp(min=1.0).unsqueeze(1)", "deg.unsqueeze(1)")),
            "aggregated over the source index": (
                "src, dst = edges[0], edges[1]\n"
                "msg = W_r(h[src])\n"
                "total = torch.zeros_like(h).index_add_(0, src, msg)\n"
                "ones = torch.ones(src.shape[0], dtype=h.dtype)\n"
                "deg = torch.zeros(h.shape[0], dtype=h.dtype).index_add_(0, src, ones)\n"
                "return total / deg.clamp(min=1.0).unsqueeze(1)\n"),
            "W_r applied after the mean": (
                "src, dst = edges[0], edges[1]\n"
                "total = torch.zeros_like(h).index_add_(0, dst, h[src])\n"
                "ones = torch.ones(dst.shape[0], dtype=h.dtype)\n"
                "deg = torch.zeros(h.shape[0], dtype=h.dtype).index_add_(0, dst, ones)\n"
                "return W_r(total / deg.clamp(min=1.0).unsqueeze(1))\n"),
        },
        2: {
            "positives and negatives averaged separately, then added": (
                "return F.softplus(-pos).mean() + F.softplus(neg).mean()\n"),
            "the minus sign in softplus(-pos) forgotten": (
                "terms = torch.cat([F.softplus(pos).reshape(-1), F.softplus(neg).reshape(-1)])\n"
                "return terms.mean()\n"),
            "neg.mean(1) before the softplus": (
                "terms = torch.cat([F.softplus(-pos).reshape(-1),"
                " F.softplus(neg.mean(1)).reshape(-1)])\n"
                "return terms.mean()\n"),
        },
        3: {
            "h_sub concatenated to h_all instead of replacing rows": (
                "with torch.no_grad():\n"
                "    h_all = lm(texts)\n"
                "h_sub = lm(texts[subset])\n"
                "return torch.cat([h_all, h_sub])\n"),
            "lm(texts) with gradient, the other rows detached (the whole LM cost paid)": (
                "h = lm(texts)\n"
                "keep = torch.zeros(len(texts), dtype=torch.bool)\n"
                "keep[subset] = True\n"
                "return torch.where(keep[:, None], h, h.detach())\n"),
        },
    },
    "latent_structure": {
        1: {
            "t and 1 - t swapped": (
                "mix = (1.0 - t) * z_v + t * z_t\n"
                "mu = mix / mix.norm(dim=-1, keepdim=True).clamp_min(1e-12)\n"),
            "not re-normalised": "mu = t * z_v + (1.0 - t) * z_t\n",
            "z_v and z_t normalised separately instead of their mixture": (
                "mu = t * F.normalize(z_v, dim=-1) + (1.0 - t) * F.normalize(z_t, dim=-1)\n"),
        },
        2: {
            "divided by N^2 (a mean over pairs)": edit(
                "latent_structure", 2, ("/ n\n", "/ n**2\n")),
            "S_VT - S_TV with S_TV from the same product": (
                "n = z_v.shape[0]\n"
                "s_vt = z_v @ z_t.T\n"
                "s_tv = z_v @ z_t.T\n"
                "s_vv = z_v @ z_v.T\n"
                "s_tt = z_t @ z_t.T\n"
                "loss = ((s_vt - s_tv).pow(2).sum() + (s_vv - s_tt).pow(2).sum()) / n\n"),
            "only the cross-modal term": (
                "n = z_v.shape[0]\n"
                "s_vt = z_v @ z_t.T\n"
                "loss = (s_vt - s_vt.T).pow(2).sum() / n\n"),
            "only the in-modal term": (
                "n = z_v.shape[0]\n"
                "s_vv = z_v @ z_v.T\n"
                "s_tt = z_t @ z_t.T\n"
                "loss = (s_vv - s_tt).pow(2).sum() / n\n"),
        },
        3: {
            "the diagonal j = k kept": (
                "sq = torch.cdist(z, z).pow(2)\n"
                "loss = torch.log(torch.exp(-t * sq).mean())\n"),
            "the sign of t": (
                "sq = torch.pdist(z).pow(2)\n"
                "loss = torch.log(torch.exp(t * sq).mean())\n"),
            "the mean of the logs": (
                "sq = torch.pdist(z).pow(2)\n"
                "loss = torch.log(torch.exp(-t * sq)).mean()\n"),
        },
    },
    "smile": {
        1: {
            "averaged over all slots, padding included": edit(
                "smile", 1, ("torch.ones_like(expert, dtype=probs.dtype) if valid is None "
                             "else valid.to(probs.dtype)",
                             "torch.ones_like(expert, dtype=probs.dtype)")),
            "the factor E forgotten": edit(
                "smile", 1, ("loss = alpha * E * (f * pbar)", "loss = alpha * (f * pbar)")),
            "probs used for f": edit(
                "smile", 1, ("f = (F.one_hot(expert, E).to(probs.dtype) * w[..., None])",
                             "f = (probs * w[..., None])")),
            "averaged over devices before the product": edit(
                "smile", 1, ("loss = alpha * E * (f * pbar).sum(-1)",
                             "loss = alpha * E * (f.mean(0) * pbar.mean(0)).sum(-1)"
                             ".expand(len(f))")),
        },
        2: {
            "SMILE's slow bytes as 1/M of flat's": edit(
                "smile", 2, ("smile_slow * S1 / N,", "flat_slow_b / M,")),
            "cf instead of cf1 for SMILE's buffers": edit(
                "smile", 2, ("S1 = cf1 * T", "S1 = cf * T"),
                ("S2 = cf2 * cf1 * T", "S2 = cf2 * cf * T")),
            "cf1 forgotten in S2": edit("smile", 2, ("S2 = cf2 * cf1 * T", "S2 = cf2 * T")),
            "the message to oneself counted": edit(
                "smile", 2, ("flat_slow, flat_fast = (N - 1) * M, M - 1",
                             "flat_slow, flat_fast = (N - 1) * M, M"),
                ("smile_slow, smile_fast = N - 1, M - 1", "smile_slow, smile_fast = N - 1, M")),
            "a gap charged for the first message too": edit(
                "smile", 2, ("(lat + (msgs - 1) * gap + nb / bw)", "(lat + msgs * gap + nb / bw)")),
            "SMILE's two hops in parallel (max)": edit(
                "smile", 2, ("smile_t = times(smile_slow, smile_slow_b, smile_fast, smile_fast_b, "
                             "in_series=True)",
                             "smile_t = times(smile_slow, smile_slow_b, smile_fast, smile_fast_b, "
                             "in_series=False)")),
        },
        3: {
            "indexed m*N + n (GPU-major)": (
                "G, S, N = a.shape\n"
                "M = b.shape[-1]\n"
                "logits = (a[..., None, :] + b[..., :, None]).reshape(G, S, N * M)\n"),
        },
    },
    "mico": {
        1: {
            "h_z as the exact entropy of p_bar (q_psi ignored)": (
                "h_z_cond = cross_entropy_p_q(p, log_q)\n"
                "p_bar = p.mean(0)\n"
                "h_z = -(p_bar * p_bar.clamp_min(1e-12).log()).sum()\n"
                "loss = h_z_cond - lam * h_z\n"),
            "a plus sign before lam": (
                "h_z_cond = cross_entropy_p_q(p, log_q)\n"
                "h_z = cross_entropy_p_q(p, log_q_psi)\n"
                "loss = h_z_cond + lam * h_z\n"),
            "p and q swapped inside the cross-entropy": (
                "h_z_cond = cross_entropy_p_q(log_q.exp(), p.clamp_min(1e-12).log())\n"
                "h_z = cross_entropy_p_q(log_q_psi.exp(), p.clamp_min(1e-12).log())\n"
                "loss = h_z_cond - lam * h_z\n"),
            "a sum over the batch instead of a mean": (
                "h_z_cond = -(p * log_q).sum()\n"
                "h_z = -(p * log_q_psi).sum()\n"
                "loss = h_z_cond - lam * h_z\n"),
        },
        2: {
            "cost from the number of clusters (m / K)": edit(
                "mico", 2, ("cost = np.cumsum(routed_sizes, axis=1).mean(0) / D",
                            "cost = np.arange(1, K + 1) / K")),
            "bincount without minlength": edit(
                "mico", 2, ("np.bincount(doc_cluster, minlength=K)", "np.bincount(doc_cluster)")),
            "latency as the mean instead of the max": edit(
                "mico", 2, ("np.maximum.accumulate(routed_sizes, axis=1).mean(0) / D",
                            "(np.cumsum(routed_sizes, axis=1) / np.arange(1, K + 1)).mean(0) / D")),
        },
    },
}

# Wrong answers that some test of their exercise still passes (partial credit today), with the
# tests they pass. Each of those tests has a stronger version, same name, in the staging file
# /tmp/planted_staging/test_<folder>_additions.py (for the lead to put in place of it in
# tests/test_<folder>.py). Delete an entry's line here once its tests are replaced: the answer
# then moves back to ANSWERS, where it must score 0. PENDING (same shape as ANSWERS) holds them.
PENDING_BECAUSE: dict[tuple[str, int, str], tuple[str, ...]] = {
}
PENDING: dict[str, dict[int, dict[str, str | list[str]]]] = {}
for (_f, _n, _name) in PENDING_BECAUSE:
    PENDING.setdefault(_f, {}).setdefault(_n, {})[_name] = ANSWERS[_f][_n].pop(_name)

for _table in (ANSWERS, PENDING):
    for _by_n in _table.values():
        for _answers in _by_n.values():
            for _name in [k for k, v in _answers.items() if v is None]:
                del _answers[_name]  # a stale edit(): reported by STALE


def as_student_file(reference: str, n: int, bodies: str | list[str]) -> str:
    """The reference file with exercise n's region(s) holding `bodies` (a student's file)."""
    bodies = [bodies] if isinstance(bodies, str) else list(bodies)
    lines, spans = regions_of(reference, n)
    if len(spans) != len(bodies):
        raise ValueError(f"exercise {n} has {len(spans)} region(s), the answer gives "
                         f"{len(bodies)}")
    out, last = [], 0
    for (begin, end, indent), body in zip(spans, bodies):
        out += lines[last:begin + 1]
        out.append(textwrap.indent(textwrap.dedent(body), indent))
        last = end
    return "".join(out + lines[last:])
