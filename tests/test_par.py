"""Partial action replacement (icql_qs.py, spacql_mpe.py, spacql_mamujoco.py) against literal transcriptions."""

from __future__ import annotations

import itertools
import json
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import cfcql
import icql_qs
import spacql_mamujoco
import spacql_mpe
from common import runs
from tests.helpers import tiny_args, write_tiny_dataset
from tests.test_cfcql import member_nets, toy_setup

torch.set_num_threads(1)
ALGOS = {"cfcql": cfcql, "icql_qs": icql_qs, "spacql_mpe": spacql_mpe, "spacql_mamujoco": spacql_mamujoco}


# ------------------------------------------------------------------ the partial-replacement construction


@pytest.mark.parametrize("n", [2, 3, 4])
def test_exactly_k_agents_replaced_chosen_uniformly(n):
    torch.manual_seed(0)
    draws = 20000
    mask = spacql_mpe.partial_replacement_masks(draws, n, torch.device("cpu"))  # [n(k), B, n]
    assert mask.shape == (n, draws, n) and mask.dtype == torch.bool
    for k in range(1, n + 1):
        assert (mask[k - 1].sum(-1) == k).all()  # exactly k agents, for every k including k = n
        subsets = list(itertools.combinations(range(n), k))
        counts = torch.zeros(len(subsets))
        index = {s: j for j, s in enumerate(subsets)}
        for row in mask[k - 1].nonzero()[:, 1].view(draws, k).tolist():
            counts[index[tuple(row)]] += 1
        expected = draws / len(subsets)
        chi2 = ((counts - expected) ** 2 / expected).sum().item()
        dof = len(subsets) - 1
        if dof > 0:  # chi-square test of uniformity over the k-subsets, far in the tail: 5 sigma
            assert chi2 < dof + 5 * math.sqrt(2 * dof) + 10, (k, counts)
    # the draws for different k are independent (Algorithm 1 samples a subset per k): k=1 is not nested in k=2
    if n >= 3:
        nested = (mask[0] & ~mask[1]).any(-1).float().mean().item()
        assert 0.2 < nested < 0.8


def test_replaced_next_actions_differ_from_data_exactly_in_the_chosen_slots():
    spec, args, nets, batch = toy_setup("cn", num_critics=10, b=64)
    n = spec.n_agents
    mask = spacql_mpe.partial_replacement_masks(64, n, torch.device("cpu"))
    new = torch.rand(64, n, spec.act_dim) * 2 - 1
    joint = spacql_mpe.replace_actions(batch.next_actions[None], new[None], mask)  # [n(k), B, n, d]
    differs = (joint != batch.next_actions[None]).any(-1)
    assert torch.equal(differs, mask)


# ------------------------------------------------------------------ the SPaCQL target, literally


def literal_spacql_target(batch, nets, args, mask, a_pi):
    """Algorithm 1 lines 5-13 for each transition, with the same subsets (mask) and target-policy actions a_pi[k-1].

    Critic inputs for each k form one BatchNorm group over the batch, as one reference critic call per k would;
    the per-transition arithmetic below is the algorithm's, written out with Python loops.
    """
    b, n, _ = batch.actions.shape
    online_bn, online = member_nets(nets.critic)
    target_bn, target = member_nets(nets.critic_target)
    y = []
    with torch.no_grad():
        rows = {}
        for k in range(1, n + 1):
            xs = []
            for t in range(b):
                a = batch.next_actions[t].clone()  # line 9: a'^(k) <- a', then replace the chosen agents
                for i in range(n):
                    if mask[k - 1, t, i]:
                        a[i] = a_pi[k - 1][t, i]
                xs.append(torch.cat([batch.next_states[t], a.flatten()]))
            x = torch.stack(xs)
            rows[k] = ([m(online_bn(x))[:, 0] for m in online], [m(target_bn(x))[:, 0] for m in target])
        for t in range(b):
            inv_sum, weighted = 0.0, 0.0
            for k in range(1, n + 1):
                q_online = [q[t].item() for q in rows[k][0]]
                mean = sum(q_online) / len(q_online)
                u_k = math.sqrt(sum((q - mean) ** 2 for q in q_online) / (len(q_online) - 1))  # line 10
                y_k = min(q[t].item() for q in rows[k][1]) / (u_k + 1e-6)  # line 11 (1e-6: P3)
                weighted += y_k
                inv_sum += 1.0 / (u_k + 1e-6)
            not_done = 1.0 - batch.dones[t, 0].item()
            y.append(batch.rewards[t, 0].item() + args.gamma * not_done * weighted / inv_sum)  # line 13
    return torch.tensor(y)


def test_vectorised_spacql_target_equals_literal_algorithm_1(monkeypatch):
    """toy_setup's target networks differ from the online ones, so acting with the online actors, bootstrapping
    from the online critic or measuring u_k on the target members fails here; so does one noise draw for all k."""
    spec, args, nets, batch = toy_setup("cn", num_critics=10, b=12)
    n, d = spec.n_agents, spec.act_dim
    mask = spacql_mpe.partial_replacement_masks(12, n, torch.device("cpu"))
    monkeypatch.setattr(spacql_mpe, "partial_replacement_masks", lambda b, n, device: mask)
    args.target_noise = 0.3
    torch.manual_seed(5)
    y, info = spacql_mpe.td_target(batch, nets, args)
    torch.manual_seed(5)  # the same smoothing noise: the target computes pi' then draws one noise per k
    with torch.no_grad():
        next_pi = nets.actors_target(batch.next_obs.transpose(0, 1)).transpose(0, 1)
        noise = args.target_noise * torch.randn(n, 12, n, d)
    a_pi = [(next_pi + noise[k]).clamp(-1, 1) for k in range(n)]  # line 8, for each k
    literal = literal_spacql_target(batch, nets, args, mask, a_pi)
    assert y.shape == (1, 12, 1)
    torch.testing.assert_close(y[0, :, 0], literal, rtol=1e-4, atol=1e-4)
    assert info["charts/w"].shape == (spec.n_agents,)
    assert info["charts/w"].sum().item() == pytest.approx(1.0, abs=1e-5)
    assert 1.0 <= info["charts/k_eff"].item() <= spec.n_agents


def test_weights_sum_to_one_and_order_inversely_to_uncertainty():
    torch.manual_seed(0)
    u = torch.rand(3, 50, 1) * 5
    w = spacql_mpe.soft_partial_weights(u)
    torch.testing.assert_close(w.sum(0), torch.ones(50, 1))
    assert (w > 0).all()
    order_u = u[..., 0].argsort(0)
    order_w = w[..., 0].argsort(0, descending=True)
    assert torch.equal(order_u, order_w)  # the smallest u_k gets the largest w_k
    assert torch.isfinite(spacql_mpe.soft_partial_weights(torch.zeros(3, 4, 1))).all()


def test_icql_qs_targets_replace_one_agent_each():
    """With target networks that differ from the online ones: agent i acting with its online actor, or the min over
    the online members, fails here."""
    spec, args, nets, batch = toy_setup("cn", num_critics=2, b=6)
    args.target_noise = 0.0
    y, _ = icql_qs.td_target(batch, nets, args)
    assert y.shape == (spec.n_agents, 6, 1)
    with torch.no_grad():
        next_pi = nets.actors_target(batch.next_obs.transpose(0, 1)).transpose(0, 1)
    bn, members = member_nets(nets.critic_target)
    for i in range(spec.n_agents):
        joint = batch.next_actions.clone()
        joint[:, i] = next_pi[:, i]
        with torch.no_grad():
            x = bn(torch.cat([batch.next_states, joint.flatten(1)], 1))
            q = torch.stack([m(x)[:, 0] for m in members]).min(0).values
        expected = batch.rewards[:, 0] + args.gamma * (1 - batch.dones[:, 0]) * q
        torch.testing.assert_close(y[i, :, 0], expected, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ the files differ only where they should


def blocks(module) -> dict[str, str]:
    """The source of a module split at its banner lines: {banner title: text}."""
    text = open(module.__file__).read()
    parts = re.split(r"# =+\n# (.+)\n# =+\n", text)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def test_shared_blocks_are_byte_identical_across_algorithm_files():
    reference = blocks(cfcql)
    shared = [t for t in reference if not t.startswith("ALGORITHM")]
    assert len(shared) == 5
    for name, module in ALGOS.items():
        other = blocks(module)
        assert [t for t in other if not t.startswith("ALGORITHM")] == shared, name
        for title in shared:
            assert other[title] == reference[title], f"{name}: block {title!r} drifted from cfcql.py"


def test_skeletons_differ_only_in_header_args_defaults_and_the_algorithm_block():
    def skeleton(module):
        text = open(module.__file__).read()
        text = text[text.index("from __future__") :]
        text = re.sub(r"# =+\n# ALGORITHM.*?(?=# =+\n# Losses)", "<ALGORITHM>", text, flags=re.S)
        text = re.sub(r"TASK_FAMILIES = .*\n", "", text)
        return re.sub(r"    (task: str|num_critics: int) = .*\n", "", text)

    ref = skeleton(cfcql)
    for name, module in ALGOS.items():
        assert skeleton(module) == ref, name


# ------------------------------------------------------------------ end to end


@pytest.mark.parametrize(
    ("name", "task"),
    [
        ("icql_qs", "cn"),
        ("icql_qs", "halfcheetah"),
        ("spacql_mpe", "world"),
        ("spacql_mpe", "pp"),
        ("spacql_mamujoco", "halfcheetah"),
    ],
)
def test_tiny_end_to_end_run_with_save_and_reload(tmp_path, name, task):
    module = ALGOS[name]
    write_tiny_dataset(tmp_path / "data", task, episodes=2 if task == "halfcheetah" else 8)
    result = module.main(tiny_args(module, tmp_path, task, save_model=True))
    with open(os.path.join(result["run_path"], "final.json")) as f:
        assert json.load(f)["final_normalized_score"] == pytest.approx(result["final_normalized_score"])
    reloaded = module.main(
        tiny_args(module, tmp_path, task, load_model=os.path.join(result["run_path"], "model.pt"))
    )
    assert reloaded["return"] == pytest.approx(result["final_return"], rel=1e-5, abs=1e-4)


@pytest.mark.parametrize("name", ["icql_qs", "spacql_mpe"])
def test_same_seed_same_losses(tmp_path, name):
    module = ALGOS[name]
    write_tiny_dataset(tmp_path / "data", "cn")
    results = []
    for _ in range(2):
        args = runs.resolve_args(tiny_args(module, tmp_path, "cn"), module.TASK_FAMILIES)
        runs.seed_everything(args.seed)
        nets = module.make_nets(module.get_task("cn"), args, torch.device("cpu"))
        copt = torch.optim.Adam(nets.critic.parameters(), lr=args.lr)
        aopt = torch.optim.Adam(nets.actors.parameters(), lr=args.lr)
        data = module.load_dataset(tmp_path / "data" / "cn" / "random" / "seed_0.h5", task="cn")
        gen = torch.Generator().manual_seed(args.seed)
        out = [module.update_round(data, nets, copt, aopt, args, gen) for _ in range(3)]
        results.append([{k: v.tolist() for k, v in o.items()} for o in out])
    assert results[0] == results[1]


def test_family_restriction_is_a_clear_error(tmp_path):
    with pytest.raises(runs.UserError, match="runs mpe tasks; use spacql_mamujoco.py"):
        spacql_mpe.main(tiny_args(spacql_mpe, tmp_path, "halfcheetah"))
    with pytest.raises(runs.UserError, match="runs mamujoco tasks"):
        spacql_mamujoco.main(tiny_args(spacql_mamujoco, tmp_path, "cn"))


def test_bf16_runs_only_the_penalty_in_bfloat16(tmp_path):
    """--bf16 touches only the conservative penalty's counterfactual passes: with the same random numbers the TD
    loss and Q on the data are bit-identical to float32, the penalty differs by bf16 rounding only; a run is finite."""
    write_tiny_dataset(tmp_path / "data", "cn")
    result = spacql_mpe.main(tiny_args(spacql_mpe, tmp_path, "cn", bf16=True))
    assert math.isfinite(result["final_return"])
    spec, args, nets, batch = toy_setup("cn", num_critics=10, b=8)
    infos = {}
    for bf16 in (False, True):
        args.bf16 = bf16
        torch.manual_seed(0)
        _, infos[bf16] = cfcql.critic_loss(batch, nets, args)
    for key in ("losses/td", "charts/q_data"):
        assert infos[True][key].dtype == torch.float32
        assert torch.equal(infos[True][key], infos[False][key]), key
    low, exact = infos[True]["losses/cql_penalty"], infos[False]["losses/cql_penalty"]
    assert not torch.equal(low, exact)  # the bf16 path did run
    torch.testing.assert_close(low, exact, rtol=2e-2, atol=2e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["cfcql", "spacql_mpe"])
def test_tiny_run_on_cuda(tmp_path, name):
    module = ALGOS[name]
    write_tiny_dataset(tmp_path / "data", "cn")
    args = tiny_args(module, tmp_path, "cn")
    args.cuda = True
    assert module.main(args)["device"].startswith("cuda")


def test_summarize_runs_reads_back_a_spacql_run(tmp_path, capsys):
    """scripts/summarize_runs.py (the source of RESULTS.md's numbers) reports what the run wrote."""
    from scripts.summarize_runs import main as summarize_main
    from scripts.summarize_runs import summarize

    write_tiny_dataset(tmp_path / "data", "cn")
    runs = [spacql_mpe.main(tiny_args(spacql_mpe, tmp_path, "cn", seed=s)) for s in (0, 1)]
    r = summarize(Path(runs[0]["run_path"]))
    assert r["final"] == pytest.approx(runs[0]["final_normalized_score"])
    assert r["best"] == pytest.approx(max(h[2] for h in runs[0]["eval_history"]))
    assert len(r["w"]) == 3 and r["w"].sum() == pytest.approx(1.0, abs=1e-4) and 1 <= r["k_eff"] <= 3
    assert summarize(tmp_path / "no_such_run") is None
    summarize_main([run["run_path"] for run in runs])
    finals = [run["final_normalized_score"] for run in runs]
    assert f"2 seeds, final {np.mean(finals):.1f}" in capsys.readouterr().out


def test_defaults_the_paper_and_the_reference_ran():
    """CFCQL and ICQL-QS: the reference's twin critic; SPaCQL: the paper's 10 members; each file its tasks."""
    assert cfcql.Args().num_critics == icql_qs.Args().num_critics == 2
    assert spacql_mpe.Args().num_critics == spacql_mamujoco.Args().num_critics == 10
    assert cfcql.TASK_FAMILIES == icql_qs.TASK_FAMILIES == ("mpe", "mamujoco")
    assert spacql_mpe.TASK_FAMILIES == ("mpe",) and spacql_mamujoco.TASK_FAMILIES == ("mamujoco",)
    assert spacql_mamujoco.Args().task == "halfcheetah"
