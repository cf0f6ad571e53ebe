"""`stage: dpo` end to end on CPU against the preference formula on transformers' log-probs.

The formulas themselves are checked against the papers in tests/test_preference_loss.py; here
the question is whether megatune feeds them the right numbers: the policy's and the reference
model's summed response log-probabilities of the same global batch, under each parallel layout
(the reference pass runs through Megatron's schedule too), and whether training on pairs learns.

The `megatune train` runs are batched per world size (tests/multirun.py); each test asserts on
its own case's outputs.
"""

import math

import pytest
import torch

from megatune.tiny import make_tiny_model
from tests.conftest import REPO, SHARED
from tests.multirun import Batches
from tests.test_train import log_rows, write_config

DPO = dict(
    stage="dpo",
    dataset="megatune_pairs",
    dataset_dir=str(REPO / "data"),
    template="qwen3_nothink",
    cutoff_len=64,
    per_device_train_batch_size=2,
    gradient_accumulation_steps=2,
    learning_rate=0.0,
    max_steps=1,
    logging_steps=1,
    save_steps=1000,
    seed=7,
)
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo")
    policy = make_tiny_model("qwen3", str(root / "policy"), seed=3, with_tokenizer=True)
    reference = make_tiny_model("qwen3", str(root / "reference"), seed=4, with_tokenizer=True)
    return policy, reference


def hf_pair_logps(model_dir: str, pairs) -> tuple[torch.Tensor, ...]:
    """(chosen sums, rejected sums, chosen counts, rejected counts) [P] from transformers' model,
    with autograd (for the gradient norm)."""
    from transformers import AutoModelForCausalLM

    from megatune.stages.preference_loss import sequence_logps

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    out = []
    for side in ("chosen", "rejected"):
        sums, counts = [], []
        for pair in pairs:
            sample = getattr(pair, side)
            logits = model(input_ids=torch.tensor([sample.input_ids])).logits
            s, c = sequence_logps(logits, torch.tensor([sample.labels]))
            sums.append(s[0])
            counts.append(c[0])
        out += [torch.stack(sums), torch.stack(counts)]
    return out[0], out[2], out[1], out[3], model


def first_global_batch(values: dict, world: int):
    from transformers import AutoTokenizer

    from megatune.config import derive_layout, load_config
    from megatune.data.source import build_train_source

    config = load_config(None, {k: v for k, v in values.items() if k != "nproc_per_node"})
    tokenizer = AutoTokenizer.from_pretrained(values["model_name_or_path"])
    source, _, _ = build_train_source(config, tokenizer, derive_layout(config, world).global_batch_size)
    return source.next_global_batch(), config


def expected_step(values: dict, world: int, reference_dir: str | None):
    """The step-1 metrics the formula gives on transformers' log-probs, and the gradient norm of
    its loss (mean over the global batch's pairs)."""
    from megatune.stages.dpo import preference_config
    from megatune.stages.preference_loss import metric_means, preference_loss

    pairs, config = first_global_batch(values, world)
    pref = preference_config(config)
    pc, pr, nc, nr, policy = hf_pair_logps(values["model_name_or_path"], pairs)
    rc = rr = None
    if pref.uses_reference:
        with torch.no_grad():
            rc, rr, _, _, _ = hf_pair_logps(reference_dir or values["model_name_or_path"], pairs)
    out = preference_loss(pc, pr, nc, nr, rc, rr, config=pref)
    out.losses.mean().backward()
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in policy.parameters() if p.grad is not None]))
    return metric_means(out.metric_sums, out.num_pairs), norm.item(), len(pairs)


LAYOUTS = {
    "dp2": dict(nproc_per_node=2, pref_loss="sigmoid"),
    # with the 512-entry vocabulary padded to 768 rows (layers/vocab_padding.py), for policy and reference
    "tp2_sp": dict(nproc_per_node=2, tensor_model_parallel_size=2, sequence_parallel=True, pref_loss="ipo",
                   make_vocab_size_divisible_by=384),
    "pp2": dict(nproc_per_node=2, pipeline_model_parallel_size=2, pref_loss="sigmoid"),
}
LF_DEMO = SHARED / "fixtures" / "lf_data" / "dpo_en_demo.json"
RESUME_KEYS = {**DPO, "learning_rate": 1e-3, "max_steps": 4, "save_steps": 2}


@pytest.fixture(scope="module")
def dpo_runs(models, tmp_path_factory):
    """Every `megatune train` run of this file: {case: (folder, values of its YAML, reference
    model or None)} and the batches that run them. A case's output_dir is `folder / "out"`."""
    root = tmp_path_factory.mktemp("dpo_runs")
    policy, reference = models
    runs, cases = Batches(root / "batches"), {}

    def add(name, model, keys, reference_dir, **batch):
        folder = root / name
        folder.mkdir(parents=True)
        config, values = write_config(folder, model, **{**keys, **({"ref_model": reference_dir} if reference_dir else {})})
        runs.add(name, ["train", config], values.get("nproc_per_node", 1), **batch)
        cases[name] = (folder, values, reference_dir)

    for pref_loss in PREF_LOSSES:
        add(f"step1-{pref_loss}", policy, {**DPO, "nproc_per_node": 1, "pref_loss": pref_loss,
                                           **({"pref_ftx": 0.5} if pref_loss == "sigmoid" else {})}, reference)
    for layout, keys in LAYOUTS.items():
        add(f"layout-{layout}", policy, {**DPO, **keys}, reference)
    add("log2", policy, {**DPO, "nproc_per_node": 1}, None)
    learn = {**DPO, "learning_rate": 3e-3, "max_steps": 20, "eval_steps": 20, "eval_strategy": "steps",
             "lr_scheduler_type": "constant"}
    add("learn-bundled", policy, {**learn, "eval_dataset": "megatune_pairs"}, None)
    if LF_DEMO.is_file():
        add("learn-lf_demo", policy, {**learn, "dataset": "dpo_en_demo", "eval_dataset": "dpo_en_demo", "max_samples": 40,
                                      "dataset_dir": str(LF_DEMO.parent), "template": "qwen", "cutoff_len": 256}, None)
    moe_policy = make_tiny_model("qwen3_moe", str(root / "moe_policy"), seed=3, with_tokenizer=True)
    moe_reference = make_tiny_model("qwen3_moe", str(root / "moe_reference"), seed=4, with_tokenizer=True)
    add("moe-ep2", moe_policy, {**DPO, "nproc_per_node": 2, "expert_model_parallel_size": 2, "moe_aux_loss_coeff": 0.0},
        moe_reference)
    add("straight", policy, RESUME_KEYS, reference)
    # the straight run's step-2 checkpoint, copied into a fresh output_dir, resumed under TP=2

    def copy_checkpoint():
        import shutil

        shutil.copytree(root / "straight" / "out" / "checkpoint-2", root / "resumed" / "out" / "checkpoint-2")

    add("resumed", policy, {**RESUME_KEYS, "nproc_per_node": 2, "tensor_model_parallel_size": 2,
                            "resume_from_checkpoint": "auto"}, reference, after=("world1",), prepare=copy_checkpoint)
    return runs, cases


def run_rows(dpo_runs, name: str) -> list[dict]:
    runs, cases = dpo_runs
    result = runs.get(name)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return log_rows(cases[name][0] / "out")


def check_step(dpo_runs, name: str) -> dict:
    """Step 1 of case `name` against expected_step: pairs, loss, every metric, grad norm."""
    row = run_rows(dpo_runs, name)[0]
    _, values, reference = dpo_runs[1][name]
    want, norm, pairs = expected_step(values, values.get("nproc_per_node", 1), reference)
    assert row["pairs"] == pairs
    assert row["loss"] == pytest.approx(want["loss"], abs=1e-5)
    for key in METRICS + (("sft_loss",) if "sft_loss" in want else ()):
        assert row[key] == pytest.approx(want[key], abs=1e-5, rel=1e-5), key
    assert row["grad_norm"] == pytest.approx(norm, rel=1e-4)
    return row


PREF_LOSSES = ["sigmoid", "hinge", "ipo", "orpo", "simpo"]


@pytest.mark.parametrize("pref_loss", PREF_LOSSES)
def test_step_one_matches_the_formula_on_transformers_log_probs(dpo_runs, pref_loss):
    row = check_step(dpo_runs, f"step1-{pref_loss}")
    assert ("sft_loss" in row) == (pref_loss in ("sigmoid", "orpo"))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_parallel_layouts_match_the_formula(dpo_runs, layout):
    check_step(dpo_runs, f"layout-{layout}")


def test_initial_policy_as_reference_gives_log_2(dpo_runs):
    row = check_step(dpo_runs, "log2")
    assert row["loss"] == pytest.approx(math.log(2), abs=1e-7)
    assert row["rewards/margins"] == 0 and row["rewards/accuracies"] == 0


def learned(dpo_runs, name: str) -> dict:
    """20 steps; then an evaluation over the whole (training) set of pairs, whose reward accuracy
    at step 1 is 0 (reference == policy) and must have risen."""
    rows = run_rows(dpo_runs, name)
    assert rows[0]["rewards/accuracies"] == 0  # reference == policy at step 1
    return rows[-1]


def test_bundled_pairs_raise_reward_accuracy(dpo_runs):
    final = learned(dpo_runs, "learn-bundled")
    assert final["eval_rewards/accuracies"] >= 0.75, final  # 0 at step 1
    assert final["eval_rewards/margins"] > 0 and final["eval_loss"] < 0.6  # log 2 = 0.693 at step 1


@pytest.mark.skipif(not LF_DEMO.is_file(), reason="needs ../shared fixtures")
def test_llama_factory_dpo_demo_raises_reward_accuracy(dpo_runs):
    final = learned(dpo_runs, "learn-lf_demo")
    assert final["eval_rewards/accuracies"] >= 0.6, final  # 0 at step 1
    assert final["eval_rewards/margins"] > 0 and final["eval_loss"] < math.log(2)


def test_moe_policy_with_expert_parallelism(dpo_runs):
    """A Qwen3-MoE policy and reference under EP=2 (the reference pass routes through Megatron's
    dispatcher too); the balancing loss is off so the gradient norm is the preference loss's alone."""
    check_step(dpo_runs, "moe-ep2")


def test_resume_reshards_and_continues_exactly(dpo_runs):
    """A DPO checkpoint (1 process) resumed under TP=2: steps 3-4 repeat the straight run's loss
    and rewards (the reference model is reloaded from its folder, not from the checkpoint)."""
    straight = run_rows(dpo_runs, "straight")
    resumed = run_rows(dpo_runs, "resumed")
    assert [r["step"] for r in resumed] == [3, 4]
    for a, b in zip(straight[2:], resumed):
        for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins"):
            assert b[key] == pytest.approx(a[key], abs=1e-5), (a["step"], key)
