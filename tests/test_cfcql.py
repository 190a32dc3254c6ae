"""cfcql.py: the fast batched computations equal slow, obvious ones; tiny end-to-end runs; reproducibility."""

from __future__ import annotations

import json
import math
import os
import shutil

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import cfcql
from common import runs
from tests.helpers import tiny_args, write_tiny_dataset

torch.set_num_threads(1)


def toy_setup(task="cn", num_critics=2, b=5, hidden=16, seed=0):
    """Networks, options and a random minibatch. The target networks DIFFER from the online ones (perturbed), so
    that a computation that uses an online network where a target one belongs (or the reverse) fails a test."""
    torch.manual_seed(seed)
    spec = cfcql.get_task(task)
    args = runs.resolve_args(
        cfcql.Args(task=task, num_critics=num_critics, hidden=hidden, batch_size=b), cfcql.TASK_FAMILIES
    )
    nets = cfcql.make_nets(spec, args, torch.device("cpu"))
    with torch.no_grad():
        for net in (nets.critic_target, nets.actors_target):
            for p in net.parameters():
                p.add_(0.2 * torch.randn_like(p))
    n, o, d, s = spec.n_agents, spec.obs_dim, spec.act_dim, spec.state_dim
    obs, next_obs = torch.randn(b, n, o), torch.randn(b, n, o)
    states = obs.flatten(1) if spec.family == "mpe" else torch.randn(b, s)
    next_states = next_obs.flatten(1) if spec.family == "mpe" else torch.randn(b, s)
    batch = cfcql.Batch(
        obs=obs,
        actions=torch.rand(b, n, d) * 2 - 1,
        rewards=torch.randn(b, 1),
        next_obs=next_obs,
        next_actions=torch.rand(b, n, d) * 2 - 1,
        dones=(torch.rand(b, 1) < 0.3).float(),
        states=states,
        next_states=next_states,
    )
    return spec, args, nets, batch


def member_nets(critic: cfcql.EnsembleCritic):
    """The ensemble as E separate nn.Sequential networks (weights copied) sharing one input BatchNorm."""
    bn = nn.BatchNorm1d(critic.bn_weight.shape[0])
    bn.weight.data.copy_(critic.bn_weight.data)
    bn.bias.data.copy_(critic.bn_bias.data)
    members = []
    for j in range(critic.fc1.weight.shape[0]):
        fcs = (critic.fc1, critic.fc2, critic.fc3)
        layers = [nn.Linear(*fc.weight.shape[1:]) for fc in fcs]
        for lin, fc in zip(layers, fcs, strict=True):
            lin.weight.data.copy_(fc.weight.data[j].T)
            lin.bias.data.copy_(fc.bias.data[j, 0])
        members.append(nn.Sequential(layers[0], nn.ReLU(), layers[1], nn.ReLU(), layers[2]))
    return bn.train(), members


def slow_q(critic, inputs):
    """Q of every member for a list of input rows fed as ONE BatchNorm group: [E, len(inputs)]."""
    bn, members = member_nets(critic)
    x = bn(torch.stack(inputs))
    return torch.stack([m(x)[:, 0] for m in members])


@pytest.mark.parametrize("shared_states", [True, False])
def test_batched_ensemble_equals_loop_over_members(shared_states):
    torch.manual_seed(0)
    critic = cfcql.EnsembleCritic(state_dim=7, action_dim=4, hidden=8, num_members=10)
    g, b, r = 3, 20, 5  # 3 groups, each normalised by its own statistics; 5 actions per state
    states = torch.randn(1 if shared_states else g, b, 7) * 2 + 1
    actions = torch.rand(g, b, r, 4) * 2 - 1
    fast = critic(states, actions)
    assert fast.shape == (10, g, b, r)
    bn, members = member_nets(critic)
    for k in range(g):
        rows = torch.cat(
            [states[0 if shared_states else k, :, None].expand(b, r, 7), actions[k]], -1
        )  # [B, R, 11]
        h = bn(rows.reshape(b * r, 11))  # one reference call on the group's B*R rows
        slow = torch.stack([m(h)[:, 0] for m in members]).view(10, b, r)
        torch.testing.assert_close(fast[:, k], slow, rtol=1e-5, atol=1e-5)


def test_batched_ensemble_gradients_equal_loop_over_members():
    """The state half of the first layer computed once per state must give the same gradients as plain nn.Linear
    members, for every parameter and for the actions (the actor loss needs them)."""
    torch.manual_seed(1)
    critic = cfcql.EnsembleCritic(state_dim=7, action_dim=4, hidden=8, num_members=3)
    with torch.no_grad():  # a non-trivial affine part, so that folding it into the weights is exercised
        critic.bn_weight.uniform_(0.5, 1.5)
        critic.bn_bias.normal_()
    b, r = 20, 5
    states = torch.randn(1, b, 7) * 2 + 1
    actions = (torch.rand(1, b, r, 4) * 2 - 1).requires_grad_()
    weights = torch.randn(3, 1, b, r)  # a loss that weights every output differently
    (critic(states, actions) * weights).sum().backward()

    bn, members = member_nets(critic)
    actions_slow = actions.detach().clone().requires_grad_()
    rows = torch.cat([states[0, :, None].expand(b, r, 7), actions_slow[0]], -1).reshape(b * r, 11)
    x = bn(rows)
    (torch.stack([m(x)[:, 0] for m in members]).view(3, 1, b, r) * weights).sum().backward()

    torch.testing.assert_close(actions.grad, actions_slow.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(critic.bn_weight.grad, bn.weight.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(critic.bn_bias.grad, bn.bias.grad, rtol=1e-4, atol=1e-5)
    for j, m in enumerate(members):
        for fc, lin in zip((critic.fc1, critic.fc2, critic.fc3), m[::2], strict=True):
            torch.testing.assert_close(fc.weight.grad[j].T, lin.weight.grad, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(fc.bias.grad[j, 0], lin.bias.grad, rtol=1e-4, atol=1e-5)


def test_batched_actors_equal_separate_policies_including_batchnorm_running_stats():
    torch.manual_seed(0)
    n, o, d, h = 3, 7, 2, 16
    actors = cfcql.Actors(n, o, d, h)
    policies = []
    for i in range(n):
        bn = nn.BatchNorm1d(o)
        lins = [nn.Linear(o, h), nn.Linear(h, h), nn.Linear(h, d)]
        for lin, fc in zip(lins, (actors.fc1, actors.fc2, actors.fc3), strict=True):
            lin.weight.data.copy_(fc.weight.data[i].T)
            lin.bias.data.copy_(fc.bias.data[i, 0])
        policies.append((bn, lins))

    def slow(obs_i, i):
        bn, (l1, l2, l3) = policies[i]
        return torch.tanh(l3(F.relu(l2(F.relu(l1(bn(obs_i)))))))

    for _ in range(3):  # training-mode forwards update the running statistics identically
        obs = torch.randn(n, 32, o) * 3 + 1
        fast = actors(obs)
        for i in range(n):
            torch.testing.assert_close(fast[i], slow(obs[i], i), rtol=1e-5, atol=1e-6)
    actors.eval()
    obs = torch.randn(n, 5, o)
    for i in range(n):
        policies[i][0].eval()
        torch.testing.assert_close(actors(obs)[i], slow(obs[i], i), rtol=1e-5, atol=1e-6)


def slow_penalty(critic, batch, slot_rows, other_rows, logp_rows, groups=1):
    """Literal per-agent, per-sample, per-member transcription of CFCQL's counterfactual penalty, through
    `critic(states [1, N, S], actions [1, N, 1, A]) -> [E, 1, N, 1]` called on rows listed one by one.

    slot_rows[i][b] = list of agent-i actions, other_rows[i][b] = list of joint actions they replace a slot of,
    logp_rows[i][b] = list of log-densities. The samples of each source (`groups` equal consecutive parts of every
    list, as the reference's separate critic calls) form one BatchNorm group. Returns a 0-d tensor with autograd.
    """
    b_size, n, _ = batch.actions.shape
    per_group = len(slot_rows[0][0]) // groups
    q, total = {}, 0.0
    for g in range(groups):
        inputs, keys = [], []
        for i in range(n):
            for b in range(b_size):
                for j in range(g * per_group, (g + 1) * per_group):
                    joint = other_rows[i][b][j].clone()
                    joint[i] = slot_rows[i][b][j]
                    keys.append((i, b, j))
                    inputs.append((batch.states[b], joint.flatten()))
        out = critic(
            torch.stack([s for s, _ in inputs])[None], torch.stack([a for _, a in inputs])[None, :, None]
        )
        for row, key in enumerate(keys):
            q[key] = out[:, 0, row, 0]  # [E]
    q_data = critic(batch.states[None], batch.actions.flatten(1)[None, :, None])[:, 0, :, 0]  # [E, B]
    for e in range(q_data.shape[0]):
        for b in range(b_size):
            z = [
                torch.logsumexp(
                    torch.stack([q[i, b, j][e] - logp_rows[i][b][j] for j in range(len(slot_rows[i][b]))]), 0
                )
                for i in range(n)
            ]
            total = total + (sum(z) / n - q_data[e, b]) / b_size  # lambda_i = 1/n, mean over states
    return total


def test_mpe_penalty_equals_slow_computation():
    spec, args, nets, batch = toy_setup("cn", num_critics=3, b=4)
    args.num_cql_samples = 6
    q_data = nets.critic(batch.states[None], batch.actions.flatten(1)[None, :, None])
    torch.manual_seed(123)
    fast = cfcql.cql_penalty(batch, nets, q_data, args).item()
    torch.manual_seed(123)  # the same uniform draws, in the same order
    n, b, m, d = spec.n_agents, 4, 6, spec.act_dim
    u = torch.rand(b, n, m, d) * 2 - 1
    slots = [[list(u[bb, i]) for bb in range(b)] for i in range(n)]
    others = [[[batch.actions[bb]] * m for bb in range(b)] for i in range(n)]
    logp = [[[d * math.log(0.5)] * m for _ in range(b)] for _ in range(n)]
    assert fast == pytest.approx(
        slow_penalty(nets.critic, batch, slots, others, logp).item(), rel=1e-4, abs=1e-4
    )


def test_halfcheetah_penalty_equals_slow_computation_with_correct_density_pairing():
    """Three sources, each its own BatchNorm batch (one critic call each, as the reference): value and critic
    gradients equal the three-group oracle; the one-group oracle's gradients differ (so a one-group penalty fails)."""
    spec, args, nets, batch = toy_setup("halfcheetah", num_critics=2, b=3)
    args.num_cql_samples = 4
    q_data = nets.critic(batch.states[None], batch.actions.flatten(1)[None, :, None])
    state = {k: v.clone() for k, v in nets.actors.state_dict().items()}
    params = list(nets.critic.parameters())
    torch.manual_seed(7)
    fast = cfcql.cql_penalty(batch, nets, q_data, args)
    fast_grads = torch.autograd.grad(fast, params)
    nets.actors.load_state_dict(state)  # the penalty's policy forwards moved the BatchNorm averages
    torch.manual_seed(7)
    n, b, m, d, sd = spec.n_agents, 3, 4, spec.act_dim, args.policy_sample_noise
    u = torch.rand(b, n, m, d) * 2 - 1
    with torch.no_grad():
        pi = nets.actors(batch.obs.transpose(0, 1))
        next_pi = nets.actors(batch.next_obs.transpose(0, 1))
    eps_pi, eps_next = sd * torch.randn(b, n, m, d), sd * torch.randn(b, n, m, d)

    def logn(eps):  # log-density of N(0, sd^2 I), written out per dimension
        return sum(-0.5 * (x / sd) ** 2 - math.log(sd * math.sqrt(2 * math.pi)) for x in eps.tolist())

    slots, others, logp = [], [], []
    for i in range(n):
        slots.append([]), others.append([]), logp.append([])
        for bb in range(b):
            s_rows, o_rows, l_rows = [], [], []
            for j in range(m):  # uniform: others = data actions
                s_rows.append(u[bb, i, j]), o_rows.append(batch.actions[bb]), l_rows.append(d * math.log(0.5))
            for j in range(m):  # current policy + noise, its own noise density
                s_rows.append((pi[i, bb] + eps_pi[bb, i, j]).clamp(-1, 1)), o_rows.append(batch.actions[bb])
                l_rows.append(logn(eps_pi[bb, i, j]))
            for j in range(m):  # next-state policy + noise, others = dataset next actions, state s (ref B4)
                (
                    s_rows.append((next_pi[i, bb] + eps_next[bb, i, j]).clamp(-1, 1)),
                    o_rows.append(batch.next_actions[bb]),
                )
                l_rows.append(logn(eps_next[bb, i, j]))
            slots[i].append(s_rows), others[i].append(o_rows), logp[i].append(l_rows)
    three = slow_penalty(nets.critic, batch, slots, others, logp, groups=3)
    torch.testing.assert_close(fast, three, rtol=1e-5, atol=1e-5)
    for got, want in zip(fast_grads, torch.autograd.grad(three, params), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    one = torch.autograd.grad(slow_penalty(nets.critic, batch, slots, others, logp, groups=1), params)
    diff = torch.cat([(a - b).flatten() for a, b in zip(one, fast_grads, strict=True)]).norm()
    assert diff > 0.05 * torch.cat([g.flatten() for g in fast_grads]).norm()  # one group is measurably wrong


def test_actor_loss_equals_slow_per_agent_computation():
    spec, args, nets, batch = toy_setup("cn", b=6)
    loss = cfcql.actor_loss(batch, nets, args)
    n = spec.n_agents
    pi = nets.actors(batch.obs.transpose(0, 1))  # same batch -> same BatchNorm statistics
    rows = []
    for i in range(n):
        for b in range(6):
            joint = batch.actions[b].clone()
            joint[i] = pi[i, b]
            rows.append(torch.cat([batch.states[b], joint.flatten()]))
    q1 = slow_q(nets.critic, rows)[0]
    slow = -q1.mean() + args.actor_l2 * sum((pi[i] ** 2).mean() for i in range(n))
    assert loss.item() == pytest.approx(slow.item(), rel=1e-5, abs=1e-6)


def test_cfcql_target_uses_min_over_members_and_all_agents_from_target_policies():
    spec, args, nets, batch = toy_setup("cn", num_critics=4, b=8)
    args.target_noise = 0.0
    y, info = cfcql.td_target(batch, nets, args)
    assert y.shape == (1, 8, 1)  # toy_setup's targets differ from the online networks: a mix-up fails below
    with torch.no_grad():
        a = nets.actors_target(batch.next_obs.transpose(0, 1)).transpose(0, 1)
        q = slow_q(nets.critic_target, [torch.cat([batch.next_states[b], a[b].flatten()]) for b in range(8)])
    expected = batch.rewards[:, 0] + args.gamma * (1 - batch.dones[:, 0]) * q.min(0).values
    torch.testing.assert_close(y[0, :, 0], expected, rtol=1e-5, atol=1e-5)
    assert info["charts/target_spread"].item() == pytest.approx(q.std(0).mean().item(), rel=1e-4)


def test_actor_step_clips_each_agents_gradient_alone_as_torch_clip_grad_norm():
    spec, args, nets, batch = toy_setup("cn", b=16)
    args.grad_clip = 1e-3  # small enough that every agent's gradient is clipped
    params = list(nets.actors.parameters())
    state = {k: v.clone() for k, v in nets.actors.state_dict().items()}
    raw = torch.autograd.grad(cfcql.actor_loss(batch, nets, args), params)
    nets.actors.load_state_dict(state)  # the same BatchNorm statistics for the second forward

    class Recorder:  # an optimizer that records the gradients it is asked to apply
        def step(self):
            self.grads = [p.grad.clone() for p in params]

    opt = Recorder()
    cfcql.actor_step(batch, nets, opt, args)
    for i in range(spec.n_agents):
        expected = [g[i].clone() for g in raw]
        ts = [torch.zeros_like(g, requires_grad=True) for g in expected]
        for t, g in zip(ts, expected, strict=True):
            t.grad = g
        torch.nn.utils.clip_grad_norm_(ts, args.grad_clip)
        for got, t in zip(opt.grads, ts, strict=True):
            torch.testing.assert_close(got[i], t.grad, rtol=1e-4, atol=1e-9)
        norm = torch.stack([g[i].norm() for g in opt.grads]).norm()
        assert norm == pytest.approx(args.grad_clip, rel=1e-3)


@pytest.mark.parametrize("task", ["cn", "pp", "world", "halfcheetah"])
def test_tiny_end_to_end_run_with_save_and_reload(tmp_path, task):
    write_tiny_dataset(tmp_path / "data", task, episodes=2 if task == "halfcheetah" else 8)
    result = cfcql.main(tiny_args(cfcql, tmp_path, task, save_model=True))
    with open(os.path.join(result["run_path"], "final.json")) as f:
        saved = json.load(f)
    assert saved["final_normalized_score"] == pytest.approx(result["final_normalized_score"])
    assert math.isfinite(saved["final_return"]) and len(saved["eval_history"]) == 3  # rounds 0, 2, final
    reloaded = cfcql.main(
        tiny_args(cfcql, tmp_path, task, load_model=os.path.join(result["run_path"], "model.pt"))
    )
    assert reloaded["return"] == pytest.approx(result["final_return"], rel=1e-5, abs=1e-4)


def test_same_seed_gives_same_losses_on_cpu(tmp_path):
    write_tiny_dataset(tmp_path / "data", "cn")
    results = []
    for _ in range(2):
        args = runs.resolve_args(tiny_args(cfcql, tmp_path, "cn"), cfcql.TASK_FAMILIES)
        runs.seed_everything(args.seed)
        spec = cfcql.get_task("cn")
        nets = cfcql.make_nets(spec, args, torch.device("cpu"))
        copt = torch.optim.Adam(nets.critic.parameters(), lr=args.lr)
        aopt = torch.optim.Adam(nets.actors.parameters(), lr=args.lr)
        data = cfcql.load_dataset(tmp_path / "data" / "cn" / "random" / "seed_0.h5", task="cn")
        gen = torch.Generator().manual_seed(args.seed)
        results.append(
            [
                {k: v.item() for k, v in cfcql.update_round(data, nets, copt, aopt, args, gen).items()}
                for _ in range(3)
            ]
        )
    assert results[0] == results[1]
    assert results[0][0]["losses/td"] != results[0][2]["losses/td"]  # the losses do move


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [("task", "walker", "unknown task"), ("dataset", "mediocre", "unknown dataset")],
)
def test_bad_arguments_fail_clearly(tmp_path, field, value, message):
    args = tiny_args(cfcql, tmp_path, "cn")
    setattr(args, field, value)
    with pytest.raises(runs.UserError, match=message):
        cfcql.main(args)


@pytest.mark.skipif(
    shutil.which("c++") is None and shutil.which("g++") is None,
    reason="torch.compile's CPU backend needs a C++ compiler",
)
def test_compile_flag_is_a_speed_option_only(tmp_path):
    """--compile (torch.compile of the critic and actor losses) trains the same networks: same seed, same
    evaluation returns to float tolerance, and a checkpoint with the usual state_dict keys."""
    write_tiny_dataset(tmp_path / "data", "cn")
    eager = cfcql.main(tiny_args(cfcql, tmp_path, "cn"))
    try:
        compiled = cfcql.main(tiny_args(cfcql, tmp_path, "cn", compile=True, save_model=True))
    finally:
        torch._dynamo.reset()
    assert compiled["args"]["compile"] is True
    returns = [[r for _, r, _ in run["eval_history"]] for run in (eager, compiled)]
    assert returns[1] == pytest.approx(returns[0], rel=1e-3)
    state = torch.load(os.path.join(compiled["run_path"], "model.pt"), weights_only=True)
    assert "fc2.weight" in state["critic"] and "fc2.weight" in state["actors"]  # no "_orig_mod." prefix


@pytest.mark.skipif(
    shutil.which("c++") is None and shutil.which("g++") is None,
    reason="torch.compile's CPU backend needs a C++ compiler",
)
@pytest.mark.parametrize("bf16", [False, True])
def test_compiled_losses_equal_eager_values_and_gradients(bf16, task="halfcheetah"):
    """--compile swaps in torch.compile(critic_loss) and torch.compile(actor_loss). With the same random numbers
    (same seed), the losses and the gradient of every critic and actor parameter equal the eager ones (with
    bf16=True the compiled losses run with --bf16 and must equal the eager float32 ones to bf16 rounding).
    HalfCheetah: its penalty has all three sample sources, policy samples included."""
    spec, args, nets, batch = toy_setup(task, num_critics=3, b=10, hidden=16)
    args.num_cql_samples = 4
    results = []
    try:
        for compiled in (False, True):
            if compiled:
                args.compile = True  # make_nets under --compile: the same losses through torch.compile
                other = cfcql.make_nets(spec, args, torch.device("cpu"))
                nets.critic_loss, nets.actor_loss = other.critic_loss, other.actor_loss
                assert nets.critic_loss is not None and nets.actor_loss is not None
            torch.manual_seed(3)
            actor_state = {k: v.clone() for k, v in nets.actors.state_dict().items()}
            nets.critic.zero_grad()
            nets.actors.zero_grad()
            args.bf16 = bf16 and compiled
            c_loss, info = (nets.critic_loss or cfcql.critic_loss)(batch, nets, args)
            c_loss.backward()
            a_loss = (nets.actor_loss or cfcql.actor_loss)(batch, nets, args)
            a_grads = torch.autograd.grad(a_loss, list(nets.actors.parameters()))
            # the training-mode forwards moved the BatchNorm averages
            nets.actors.load_state_dict(actor_state)
            c_grads = [p.grad.clone() for p in nets.critic.parameters()]
            results.append((c_loss.detach(), info["losses/cql_penalty"], a_loss.detach(), c_grads, a_grads))
    finally:
        torch._dynamo.reset()
    (c0, pen0, a0, cg0, ag0), (c1, pen1, a1, cg1, ag1) = results
    rtol, atol = (2e-2, 2e-2) if bf16 else (1e-5, 1e-6)
    torch.testing.assert_close(c1, c0, rtol=rtol, atol=atol)
    torch.testing.assert_close(pen1, pen0, rtol=rtol, atol=atol)
    torch.testing.assert_close(a1, a0, rtol=rtol, atol=atol)
    for fast, eager in zip(cg1 + list(ag1), cg0 + list(ag0), strict=True):
        assert eager.abs().sum() > 0
        if bf16:
            torch.testing.assert_close(fast, eager, rtol=0.05, atol=0.02 * eager.abs().max().item())
        else:
            torch.testing.assert_close(fast, eager, rtol=1e-4, atol=1e-6)
