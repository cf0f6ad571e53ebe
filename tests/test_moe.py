"""Qwen3-MoE: parity with transformers under expert, tensor(+sequence) and pipeline parallelism,
bit-exact export round trips, a training step whose gradient (LM loss plus load-balancing loss)
equals a reference computed on transformers' model, and a short expert-parallel training run
whose loss falls.

Experts run on Megatron's SequentialMLP (`moe_grouped_gemm: false`) and on megatune's
GroupedExperts (`moe_grouped_gemm: true`, layers/experts.py; its per-expert matmul path on CPU),
with the allgather and the alltoall token dispatchers (the latter through compat/cpu.py's
dispatcher patches).

The `megatune` runs are batched per world size (tests/multirun.py: one set of worker processes
runs every case of a batch in turn); each test asserts on its own case's outputs.
"""

import json
from pathlib import Path

import pytest
import torch

from megatune.tiny import make_tiny_model
from tests.conftest import REPO
from tests.multirun import Batches, nproc_of
from tests.test_verify import all_tensors, parse_diffs

MOE = ["--moe_grouped_gemm", "false", "--moe_token_dispatcher_type", "allgather"]
GROUPED = ["--moe_grouped_gemm", "true", "--moe_token_dispatcher_type", "allgather"]
EXPERTS = {  # flags, and what the run says computes the experts
    "sequential": (MOE, "MoE experts: Megatron SequentialMLP"),
    "grouped": (GROUPED, "MoE experts: megatune GroupedExperts"),
}
ALLTOALL = ["--moe_token_dispatcher_type", "alltoall"]
DISPATCH = {  # layout -> what the run says permutes its tokens (layers/local_dispatch.py)
    "ep1": "MoE token dispatch: megatune's sync-free local permutation",
    "ep2": "MoE token dispatch: Megatron's all-gather with megatune's gather permute/un-permute",
    "ep2_alltoall": "MoE token dispatch: Megatron's all-to-all with megatune's sync-free permute/un-permute",
    # expert TP = TP = 2: tokens all-gathered over TP, every expert's shard on each rank
    "tp2_sp": "MoE token dispatch: Megatron's all-gather with megatune's gather permute/un-permute",
    "pp2": "MoE token dispatch: megatune's sync-free local permutation",
}
LAYOUTS = {
    "ep1": [],
    "ep2": ["--expert_model_parallel_size", "2", "--nproc_per_node", "2"],
    "ep2_alltoall": ["--expert_model_parallel_size", "2", "--nproc_per_node", "2", *ALLTOALL],
    "tp2_sp": ["--tensor_model_parallel_size", "2", "--sequence_parallel", "true", "--nproc_per_node", "2"],
    "pp2": ["--pipeline_model_parallel_size", "2", "--nproc_per_node", "2"],
}


@pytest.fixture(scope="module")
def moe_model(tmp_path_factory):
    return make_tiny_model("qwen3_moe", str(tmp_path_factory.mktemp("moe") / "tiny"), seed=5, with_tokenizer=True)


@pytest.fixture(scope="module")
def moe_runs(moe_model, tmp_path_factory):
    """Every `megatune` run of this file (see the module docstring); a case's outputs live in
    `root / case`."""
    root = tmp_path_factory.mktemp("moe_runs")
    runs = Batches(root / "batches")
    for experts, (flags, _) in EXPERTS.items():
        for layout, layout_flags in LAYOUTS.items():
            name = f"verify-{layout}-{experts}"
            runs.add(name, ["verify", "--model_name_or_path", moe_model, *flags, *layout_flags,
                            "--export_path", root / name / "export"], nproc_of(layout_flags))
        name = f"ep2_train-{experts}"
        runs.add(name, ["train", "--model_name_or_path", moe_model, *EXPERTS[experts][0], *ALLTOALL,
                        "--expert_model_parallel_size", "2", "--nproc_per_node", "2", "--dataset", "megatune_identity",
                        "--dataset_dir", REPO / "data", "--template", "qwen3_nothink", "--cutoff_len", "96",
                        "--max_steps", "12", "--learning_rate", "3e-3", "--logging_steps", "1", "--save_steps", "6",
                        "--output_dir", root / name / "out"], 2)
        runs.add(f"ep1_export-{experts}", ["export", "--checkpoint_path", root / name / "out" / "checkpoint-12",
                                           "--output_path", root / name / "ep1"], 1, batch="export", after=("world2",))
    runs.add("expert_load", ["train", "--model_name_or_path", moe_model, "--moe_grouped_gemm", "false",
                             "--expert_model_parallel_size", "2", "--nproc_per_node", "2", "--moe_log_load", "true",
                             "--moe_expert_capacity_factor", "2.0", "--dataset", "megatune_identity", "--dataset_dir",
                             REPO / "data", "--template", "qwen3_nothink", "--cutoff_len", "64", "--max_steps", "2",
                             "--logging_steps", "1", "--output_dir", root / "expert_load" / "out"], 2)
    for layout, values in AUX_LAYOUTS.items():
        name = f"aux-{layout}"
        runs.add(name, ["train", training_step_config(moe_model, values, root / name)], values["nproc_per_node"])
    return runs, root


@pytest.mark.parametrize("experts", EXPERTS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_qwen3_moe_matches_transformers_and_round_trips(moe_model, moe_runs, layout, experts):
    runs, root = moe_runs
    result = runs.get(f"verify-{layout}-{experts}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert EXPERTS[experts][1] in result.stdout and DISPATCH[layout] in result.stdout
    diffs = parse_diffs(result.stdout)
    assert diffs["max_abs_diff"] <= 1e-4
    source, exported = all_tensors(moe_model), all_tensors(root / f"verify-{layout}-{experts}" / "export")
    assert source.keys() == exported.keys()
    assert any(".mlp.experts.3.down_proj." in k for k in source)  # experts of both EP ranks written
    for name, tensor in source.items():
        assert torch.equal(tensor, exported[name]), name


def test_moe_config_translation(moe_model):
    from megatune.config import load_config
    from megatune.models.build import load_hf_config, transformer_config
    from megatune.models import get_provider

    _, hf = load_hf_config(moe_model)
    config = load_config(None, {"moe_aux_loss_coeff": 0.01})
    tc = transformer_config(config, hf, get_provider(hf))
    assert (tc.num_moe_experts, tc.moe_router_topk, tc.moe_ffn_hidden_size) == (4, 2, 32)
    assert tc.moe_layer_freq == [1, 0, 1, 1]  # layer 1 is in mlp_only_layers
    assert tc.moe_router_pre_softmax is False  # norm_topk_prob: softmax over the chosen k
    assert tc.moe_aux_loss_coeff == 0.01  # the YAML wins over router_aux_loss_coef
    assert tc.calculate_per_token_loss  # read by the router at construction to scale the aux loss
    assert transformer_config(load_config(None, {}), hf, get_provider(hf)).moe_aux_loss_coeff == hf["router_aux_loss_coef"]


def train_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("experts", EXPERTS)
def test_expert_parallel_training_loss_falls(moe_runs, experts):
    runs, root = moe_runs
    result = runs.get(f"ep2_train-{experts}")
    assert result.returncode == 0, result.stderr[-3000:]
    out = root / f"ep2_train-{experts}" / "out"
    rows = train_rows(out)
    assert len(rows) == 12 and rows[-1]["loss"] < rows[0]["loss"] - 0.5
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(out))  # the exported MoE loads
    export = runs.get(f"ep1_export-{experts}")
    assert export.returncode == 0, export.stderr[-3000:]
    final, resharded = all_tensors(out), all_tensors(root / f"ep2_train-{experts}" / "ep1")
    assert all(torch.equal(final[k], resharded[k]) for k in final)  # EP=2 checkpoint -> EP=1


def test_expert_load_is_logged_per_moe_layer(moe_runs):
    """`moe_log_load: true` (with a token-dropping key set: moe_expert_capacity_factor) logs each
    MoE layer's expert load (shares of routed tokens) in trainer_log.jsonl. (Moved here from
    tests/test_moe_options.py to share this file's batch of runs.)"""
    runs, root = moe_runs
    result = runs.get("expert_load")
    assert result.returncode == 0, result.stderr[-3000:]
    for row in train_rows(root / "expert_load" / "out"):
        load = row["expert_load"]
        assert sorted(load) == ["layer 1", "layer 3", "layer 4"]  # layer 2 is dense (mlp_only_layers)
        for shares in load.values():
            assert len(shares) == 4 and sum(shares) == pytest.approx(1.0, abs=1e-3)
        assert row["aux_loss"] > 0


AUX_RUN = dict(
    stage="sft", dataset="megatune_identity,megatune_chat", dataset_dir=str(REPO / "data"), template="qwen3_nothink",
    cutoff_len=96, per_device_train_batch_size=2, gradient_accumulation_steps=2, learning_rate=0.0, max_steps=1,
    logging_steps=1, save_steps=1000, seed=7, moe_aux_loss_coeff=0.5, moe_grouped_gemm=True,
    moe_token_dispatcher_type="alltoall", moe_log_load=True,
)
AUX_LAYOUTS = {
    "ep1": dict(nproc_per_node=1),
    # full activation recompute: every router runs again in the backward pass
    "ep2_recompute": dict(nproc_per_node=2, expert_model_parallel_size=2, recompute_granularity="full",
                          recompute_method="uniform", recompute_num_layers=1),
    "tp2_sp": dict(nproc_per_node=2, tensor_model_parallel_size=2, sequence_parallel=True),
    # the all-gather dispatcher: each rank's block of experts sees tokens routed to none of them;
    # with full recompute its forward runs twice per micro-batch
    "ep2_allgather_recompute": dict(nproc_per_node=2, expert_model_parallel_size=2, moe_token_dispatcher_type="allgather",
                                    recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
    # the second stage slices the padding mask for sequence parallelism itself (engine/step.py)
    "tp2_sp_pp2": dict(nproc_per_node=4, tensor_model_parallel_size=2, sequence_parallel=True,
                       pipeline_model_parallel_size=2),
    # the reference's qwen3_moe_full.yaml layout in small: pipeline + expert parallelism, alltoall,
    # grouped experts, full recompute
    "pp2_ep2_recompute": dict(nproc_per_node=4, pipeline_model_parallel_size=2, expert_model_parallel_size=2,
                              recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
}


def reference_step(model_dir, values):
    """LM loss, load-balancing loss, grad norm and expert load (share of routed tokens per
    expert, per MoE layer) of one step on transformers' Qwen3-MoE.

    The objective megatune should differentiate: the token-mean LM loss over the global batch
    plus, for every MoE layer, the coefficient times Megatron's load-balancing loss of each
    micro-batch, E/(k·T²)·Σ_e tokens_e·Σ_t p_te over its T non-padding tokens (p: softmax over
    all experts, tokens_e: top-k choices), averaged over micro-batches weighted by T.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatune.config import derive_layout, load_config
    from megatune.data.collator import collate
    from megatune.data.source import build_train_source

    config = load_config(None, values)
    layout = derive_layout(config, values["nproc_per_node"])
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    batch = build_train_source(config, tokenizer, layout.global_batch_size)[0].next_global_batch()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    experts, k, coeff = model.config.num_experts, model.config.num_experts_per_tok, values["moe_aux_loss_coeff"]
    lm = aux = torch.zeros(())
    loss_tokens = tokens = 0
    logged, load = [], {}
    for start in range(0, len(batch), layout.micro_batch_size):
        routers = []
        for sample in batch[start:start + layout.micro_batch_size]:
            b = collate([sample], tokenizer.pad_token_id)
            out = model(input_ids=b.tokens, output_router_logits=True)
            lm = lm + torch.nn.functional.cross_entropy(out.logits[0], b.labels[0], ignore_index=-100, reduction="sum")
            loss_tokens += int((b.labels != -100).sum())
            routers.append(out.router_logits)
        for index, layer in enumerate(zip(*routers)):  # one MoE layer, every token of the micro-batch
            logits = torch.cat(layer).float()
            probs = torch.softmax(logits, dim=-1)
            chosen = torch.zeros(experts).scatter_add_(0, logits.topk(k).indices.flatten(), torch.ones(logits.numel() // experts * k))
            n = logits.shape[0]
            balance = experts / (k * n * n) * (probs.sum(0) * chosen).sum()
            aux = aux + coeff * balance * n
            logged.append(balance.item())
            load[index] = load.get(index, 0) + chosen
        tokens += n
    objective = lm / loss_tokens + aux / tokens
    objective.backward()
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None]))
    shares = [(counts / counts.sum()).tolist() for _, counts in sorted(load.items())]
    return (lm / loss_tokens).item(), sum(logged) / len(logged), norm.item(), tokens, loss_tokens, shares


def training_step_config(model_dir, layout: dict, folder: Path) -> Path:
    """The YAML of one `megatune train` step (lr 0) of AUX_RUN under `layout`, output in
    `folder / "out"`."""
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    values = {**AUX_RUN, **layout, "model_name_or_path": model_dir, "output_dir": str(folder / "out")}
    (folder / "run.yaml").write_text(yaml.safe_dump(values))
    return folder / "run.yaml"


def check_training_step(result, model_dir, folder: Path) -> None:
    """One `megatune train` step (lr 0, `training_step_config`'s run in `folder`) against
    reference_step: LM loss, aux_loss, grad norm and the expert load of every MoE layer; and
    the exported checkpoint holds the input weights bit for bit."""
    import yaml

    from megatune.models.moe import moe_layer_freq

    values = yaml.safe_load((folder / "run.yaml").read_text())
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    sparse = [i + 1 for i, f in enumerate(moe_layer_freq(json.loads((Path(model_dir) / "config.json").read_text()))) if f]
    assert (f"MoE routing: load-balancing loss x 0.5 (from moe_aux_loss_coeff) per MoE layer, summed over "
            f"{len(sparse)} layers") in result.stdout
    row = json.loads((folder / "out" / "trainer_log.jsonl").read_text().splitlines()[0])
    loss, balance, norm, tokens, loss_tokens, shares = reference_step(model_dir, values)
    assert loss_tokens < 0.8 * tokens  # prompts carry no loss: the case Megatron gets wrong
    assert row["loss_tokens"] == loss_tokens
    assert row["loss"] == pytest.approx(loss, rel=1e-5)
    assert row["aux_loss"] == pytest.approx(balance, rel=1e-5)
    assert row["grad_norm"] == pytest.approx(norm, rel=1e-4)
    assert list(row["expert_load"]) == [f"layer {i}" for i in sparse]
    for logged, expected in zip(row["expert_load"].values(), shares):
        assert logged == pytest.approx(expected, abs=1e-4)  # rounded to 4 places in the log
    source, exported = all_tensors(model_dir), all_tensors(folder / "out")
    assert source.keys() == exported.keys()
    assert all(torch.equal(source[k], exported[k]) for k in source)


@pytest.mark.parametrize("layout", AUX_LAYOUTS)
def test_training_step_with_load_balancing_loss_matches_reference(moe_model, moe_runs, layout):
    """SFT batches with padding and prompt tokens: the load-balancing loss must leave padding out
    and be a token mean whatever share of tokens carries LM loss (Megatron alone scales it by
    tokens / loss tokens, compat/fixes.py)."""
    runs, root = moe_runs
    check_training_step(runs.get(f"aux-{layout}"), moe_model, root / f"aux-{layout}")
