"""Preference losses against the papers' formulas, written out here pair by pair in plain Python.

The reference implementation below uses `math` only (no torch.nn.functional), so it shares no
code with megatune.stages.preference_loss.
"""

import math
import random

import pytest
import torch

from megatune.stages.preference_loss import (
    PreferenceConfig,
    metric_means,
    preference_loss,
    sequence_logps,
    split_pairs,
    validate_preference_config,
)


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def paper_pair(loss, beta, eps, gamma, ftx, pc_sum, pr_sum, nc, nr, rc_sum=None, rr_sum=None):
    """(loss, chosen reward, rejected reward, policy logp chosen, policy logp rejected, sft)
    of one pair, from the papers' formulas, with LLaMA-Factory's sum/mean choice."""
    mean = loss in ("ipo", "orpo", "simpo")
    pc, pr = (pc_sum / nc, pr_sum / nr) if mean else (pc_sum, pr_sum)
    sft = -pc_sum / nc
    if loss in ("sigmoid", "hinge", "ipo"):
        rc, rr = (rc_sum / nc, rr_sum / nr) if mean else (rc_sum, rr_sum)
        # DPO's implicit reward of a response: beta * log(pi(y|x) / pi_ref(y|x))
        r_c, r_r = beta * (pc - rc), beta * (pr - rr)
        h = (pc - rc) - (pr - rr)  # log [pi(y_w) / pi_ref(y_w)] - log [pi(y_l) / pi_ref(y_l)]
        if loss == "sigmoid":  # DPO eq. 7, cDPO eq. 3
            value = -(1 - eps) * log_sigmoid(beta * h) - eps * log_sigmoid(-beta * h)
        elif loss == "hinge":  # SLiC calibration loss with margin 1 on the scaled log-ratio
            value = max(0.0, 1.0 - beta * h)
        else:  # IPO eq. 17: squared distance of h from 1 / (2 tau)
            value = (h - 1.0 / (2.0 * beta)) ** 2
    elif loss == "orpo":  # ORPO eq. 6-7 with P = exp(mean log-likelihood)
        p_c, p_r = math.exp(pc), math.exp(pr)
        odds_c, odds_r = p_c / (1 - p_c), p_r / (1 - p_r)
        l_or = -log_sigmoid(math.log(odds_c / odds_r))
        value = -pc + beta * l_or
        r_c, r_r = beta * pc, beta * pr
    else:  # SimPO eq. 6: length-normalised reward beta/|y| log pi(y|x), target margin gamma
        value = -log_sigmoid(beta * pc - beta * pr - gamma)
        r_c, r_r = beta * pc, beta * pr
    if ftx > 0:
        value += ftx * sft
    return value, r_c, r_r, pc, pr, sft


def random_pairs(n, seed, dtype=torch.float64):
    rng = random.Random(seed)
    nc = [rng.randint(1, 40) for _ in range(n)]
    nr = [rng.randint(1, 40) for _ in range(n)]
    # mean log-probabilities per token in (-4, -0.05): like a small LM on text
    pc = [rng.uniform(-4, -0.05) * k for k in nc]
    pr = [rng.uniform(-4, -0.05) * k for k in nr]
    rc = [v + rng.uniform(-2, 2) for v in pc]
    rr = [v + rng.uniform(-2, 2) for v in pr]
    t = lambda xs: torch.tensor(xs, dtype=dtype)  # noqa: E731
    return dict(pc=t(pc), pr=t(pr), nc=torch.tensor(nc), nr=torch.tensor(nr), rc=t(rc), rr=t(rr))


def run(config, d, **over):
    ref = config.uses_reference
    return preference_loss(
        over.get("pc", d["pc"]), over.get("pr", d["pr"]), d["nc"], d["nr"],
        d["rc"] if ref else None, d["rr"] if ref else None, config=config,
    )


CASES = [
    dict(pref_loss="sigmoid"),
    dict(pref_loss="sigmoid", dpo_label_smoothing=0.2, pref_beta=0.3),
    dict(pref_loss="sigmoid", pref_ftx=0.5),
    dict(pref_loss="hinge", pref_beta=0.05),
    dict(pref_loss="ipo", pref_beta=0.5),
    dict(pref_loss="orpo"),
    dict(pref_loss="orpo", pref_beta=0.2, pref_ftx=1.0),
    dict(pref_loss="simpo", pref_beta=2.0, simpo_gamma=1.0),
    dict(pref_loss="simpo", pref_ftx=0.3),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_losses_and_metrics_match_the_papers(case):
    config = PreferenceConfig(**case)
    validate_preference_config(config)
    d = random_pairs(64, seed=len(str(case)))
    out = run(config, d)
    rows = [
        paper_pair(
            config.pref_loss, config.pref_beta, config.dpo_label_smoothing, config.simpo_gamma, config.pref_ftx,
            d["pc"][i].item(), d["pr"][i].item(), d["nc"][i].item(), d["nr"][i].item(),
            d["rc"][i].item(), d["rr"][i].item(),
        )
        for i in range(64)
    ]
    expected_losses = torch.tensor([r[0] for r in rows], dtype=torch.float64)
    torch.testing.assert_close(out.losses, expected_losses, rtol=1e-10, atol=1e-12)
    n = len(rows)
    expected = {
        "loss": sum(r[0] for r in rows) / n,
        "rewards/chosen": sum(r[1] for r in rows) / n,
        "rewards/rejected": sum(r[2] for r in rows) / n,
        "rewards/accuracies": sum(r[1] > r[2] for r in rows) / n,
        "rewards/margins": sum(r[1] - r[2] for r in rows) / n,
        "logps/chosen": sum(r[3] for r in rows) / n,
        "logps/rejected": sum(r[4] for r in rows) / n,
    }
    if config.pref_ftx > 0 or config.pref_loss == "orpo":
        expected["sft_loss"] = sum(r[5] for r in rows) / n
    if config.pref_loss == "orpo":  # the odds-ratio term alone, without any SFT term
        expected["odds_ratio_loss"] = sum(
            (r[0] - r[5] * (1 + config.pref_ftx)) / config.pref_beta for r in rows
        ) / n
    means = metric_means(out.metric_sums, out.num_pairs)
    assert set(means) == set(expected)
    for key, value in expected.items():
        assert means[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
    # the inputs give both outcomes, so the accuracy check can fail
    assert 0 < expected["rewards/accuracies"] < 1


@pytest.mark.parametrize("smoothing", [0.0, 0.3])
def test_sigmoid_with_policy_equal_to_reference_is_log_2(smoothing):
    d = random_pairs(16, seed=1, dtype=torch.float32)
    config = PreferenceConfig(dpo_label_smoothing=smoothing)
    out = preference_loss(d["pc"], d["pr"], d["nc"], d["nr"], d["pc"].clone(), d["pr"].clone(), config=config)
    assert torch.equal(out.losses, torch.full((16,), math.log(2), dtype=torch.float32))
    means = metric_means(out.metric_sums, out.num_pairs)
    assert means["rewards/chosen"] == 0 and means["rewards/margins"] == 0 and means["rewards/accuracies"] == 0


def test_sigmoid_gradient_matches_the_analytic_derivative():
    # d/dh of -(1-eps) log s(beta h) - eps log s(-beta h) is beta * (eps * s(beta h) - (1-eps) * s(-beta h));
    # h rises one for one with the chosen log-probability and falls with the rejected one.
    beta, eps = 0.25, 0.1
    d = random_pairs(32, seed=2)
    pc, pr = d["pc"].clone().requires_grad_(), d["pr"].clone().requires_grad_()
    out = run(PreferenceConfig(pref_beta=beta, dpo_label_smoothing=eps), d, pc=pc, pr=pr)
    out.losses.sum().backward()
    h = (d["pc"] - d["pr"]) - (d["rc"] - d["rr"])
    dh = beta * (eps * torch.sigmoid(beta * h) - (1 - eps) * torch.sigmoid(-beta * h))
    torch.testing.assert_close(pc.grad, dh, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(pr.grad, -dh, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_gradients_match_finite_differences(case):
    config = PreferenceConfig(**case)
    d = random_pairs(8, seed=3)

    def f(pc, pr):
        return run(config, d, pc=pc, pr=pr).losses

    inputs = (d["pc"].clone().requires_grad_(), d["pr"].clone().requires_grad_())
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)
    # the reference model takes no gradient
    if config.uses_reference:
        rc = d["rc"].clone().requires_grad_()
        out = preference_loss(d["pc"], d["pr"], d["nc"], d["nr"], rc, d["rr"], config=config)
        assert not out.losses.requires_grad


def test_sums_over_micro_batches_give_the_global_mean():
    config = PreferenceConfig(pref_loss="sigmoid", pref_ftx=0.2)
    d = random_pairs(10, seed=4)
    whole = metric_means(run(config, d).metric_sums, 10)
    totals = {}
    for lo, hi in [(0, 3), (3, 4), (4, 10)]:  # uneven micro-batches, as on the last step of an epoch
        part = {k: v[lo:hi] for k, v in d.items()}
        for key, value in run(config, part).metric_sums.items():
            totals[key] = totals.get(key, 0) + value
    split = metric_means(totals, 10)
    assert split == pytest.approx(whole, rel=1e-12)


def test_bf16_inputs_are_computed_in_float32():
    d = random_pairs(4, seed=5, dtype=torch.bfloat16)
    out = run(PreferenceConfig(), d)
    assert out.losses.dtype == torch.float32


def test_validation_refuses_bad_settings_with_reasons():
    with pytest.raises(ValueError, match="only valid for pref_loss sigmoid, not 'ipo'"):
        validate_preference_config(PreferenceConfig(pref_loss="ipo", dpo_label_smoothing=0.1))
    with pytest.raises(ValueError, match="pref_loss: 'kto_pair' is not one of .*not supported"):
        validate_preference_config(PreferenceConfig(pref_loss="kto_pair"))
    with pytest.raises(ValueError, match="pref_beta: 0 must be > 0"):
        validate_preference_config(PreferenceConfig(pref_beta=0))
    with pytest.raises(ValueError, match=r"dpo_label_smoothing: 0.5 must be in \[0, 0.5\)"):
        validate_preference_config(PreferenceConfig(dpo_label_smoothing=0.5))
    with pytest.raises(ValueError, match="pref_ftx: -1 must be >= 0"):
        validate_preference_config(PreferenceConfig(pref_ftx=-1))
    with pytest.raises(ValueError, match="simpo_gamma: -0.1 must be >= 0"):
        validate_preference_config(PreferenceConfig(pref_loss="simpo", simpo_gamma=-0.1))
    notes = validate_preference_config(PreferenceConfig(pref_loss="orpo", ref_model="/ckpt"))
    assert notes and "not used" in notes[0]
    assert validate_preference_config(PreferenceConfig()) == []


def test_reference_log_probs_are_required_or_refused_by_loss():
    d = random_pairs(3, seed=6)
    with pytest.raises(ValueError, match="needs reference"):
        preference_loss(d["pc"], d["pr"], d["nc"], d["nr"], config=PreferenceConfig(pref_loss="hinge"))
    with pytest.raises(ValueError, match="reference-free"):
        preference_loss(d["pc"], d["pr"], d["nc"], d["nr"], d["rc"], d["rr"], config=PreferenceConfig(pref_loss="simpo"))
    with pytest.raises(ValueError, match="at least one token"):
        preference_loss(d["pc"], d["pr"], d["nc"] * 0, d["nr"], d["rc"], d["rr"], config=PreferenceConfig())
    with pytest.raises(ValueError, match="1-D tensors of one length"):
        preference_loss(d["pc"], d["pr"][:2], d["nc"], d["nr"], d["rc"], d["rr"], config=PreferenceConfig())


def test_sequence_logps_against_per_token_cross_entropy():
    torch.manual_seed(0)
    logits = torch.randn(4, 9, 17, dtype=torch.float64)
    labels = torch.randint(0, 17, (4, 9))
    labels[:, :3] = -100  # a prompt
    labels[2, 7:] = -100  # padding
    sums, counts = sequence_logps(logits, labels)
    for i in range(4):
        total, n = 0.0, 0
        for t in range(8):
            if labels[i, t + 1] != -100:
                total -= torch.nn.functional.cross_entropy(logits[i, t], labels[i, t + 1]).item()
                n += 1
        assert sums[i].item() == pytest.approx(total, rel=1e-12)
        assert counts[i].item() == n
    chosen, rejected = split_pairs(sums)
    assert torch.equal(chosen, sums[:2]) and torch.equal(rejected, sums[2:])
    with pytest.raises(ValueError, match="2 \\* pairs"):
        split_pairs(sums[:3])


def test_bundled_pairs_teach_a_tiny_transformers_model_in_20_steps(tmp_path):
    """The whole chain outside Megatron: megatune_pairs -> pairwise samples -> transformers
    log-probs -> sigmoid DPO. Reward accuracy over all 40 pairs starts at 0 (policy = reference,
    every reward is 0) and ends high after 20 AdamW steps of 4 pairs."""
    from pathlib import Path

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatune.data.pairwise import convert_pairs, encode_pair, pair_samples
    from megatune.data.registry import load_rows, resolve_datasets
    from megatune.data.templates import get_template
    from megatune.tiny import make_tiny_model

    torch.manual_seed(0)
    path = make_tiny_model("qwen3", str(tmp_path / "m"), with_tokenizer=True, num_hidden_layers=2)
    tok = AutoTokenizer.from_pretrained(path)
    policy = AutoModelForCausalLM.from_pretrained(path)
    reference = AutoModelForCausalLM.from_pretrained(path).eval()
    spec, = resolve_datasets("megatune_pairs", Path(__file__).resolve().parents[1] / "data")
    pairs, _ = convert_pairs(load_rows(spec), spec)
    samples = [pair_samples(encode_pair(get_template("qwen"), tok, p), cutoff_len=256) for p in pairs]

    def logps(model, idx):
        # LLaMA-Factory's micro-batch layout: the chosen sequences, then the rejected ones
        seqs = [samples[i][0] for i in idx] + [samples[i][1] for i in idx]
        width = max(len(s.input_ids) for s in seqs)
        pad = lambda xs, v: xs + [v] * (width - len(xs))  # noqa: E731
        ids = torch.tensor([pad(s.input_ids, 0) for s in seqs])
        labels = torch.tensor([pad(s.labels, -100) for s in seqs])
        mask = torch.tensor([pad([1] * len(s.input_ids), 0) for s in seqs])
        sums, counts = sequence_logps(model(input_ids=ids, attention_mask=mask).logits, labels)
        return split_pairs(sums), split_pairs(counts)

    config = PreferenceConfig()

    def accuracy():
        with torch.no_grad():
            (pc, pr), (nc, nr) = logps(policy, range(40))
            (rc, rr), _ = logps(reference, range(40))
            out = preference_loss(pc, pr, nc, nr, rc, rr, config=config)
        return metric_means(out.metric_sums, out.num_pairs)["rewards/accuracies"]

    assert accuracy() == 0
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    order = torch.randperm(40, generator=torch.Generator().manual_seed(0)).tolist() * 2
    for step in range(20):
        idx = order[4 * step: 4 * step + 4]
        (pc, pr), (nc, nr) = logps(policy, idx)
        with torch.no_grad():
            (rc, rr), _ = logps(reference, idx)
        out = preference_loss(pc, pr, nc, nr, rc, rr, config=config)
        optimizer.zero_grad()
        (out.losses.sum() / out.num_pairs).backward()
        optimizer.step()
    final = accuracy()
    assert final >= 0.8, final
