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
from tests.helpers import tiny_args, write_tiny_dataset

torch.set_num_threads(1)


def toy_setup(task="cn", num_critics=2, b=5, hidden=16, seed=0):
    torch.manual_seed(seed)
    spec = cfcql.get_task(task)
    args = cfcql.resolve_args(cfcql.Args(task=task, num_critics=num_critics, hidden=hidden, batch_size=b))
    nets = cfcql.make_nets(spec, args, torch.device("cpu"))
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
    w1 = torch.cat([critic.w1_state, critic.w1_action], dim=1)  # the first layer acts on (s, a_1..a_n)
    bn = nn.BatchNorm1d(w1.shape[1])
    bn.weight.data.copy_(critic.bn_weight.data)
    bn.bias.data.copy_(critic.bn_bias.data)
    members = []
    for j in range(w1.shape[0]):
        layers = [
            nn.Linear(w1.shape[1], w1.shape[2]),
            nn.ReLU(),
            nn.Linear(critic.w2.shape[1], critic.w2.shape[2]),
            nn.ReLU(),
            nn.Linear(critic.w3.shape[1], 1),
        ]
        for lin, w, bias in zip(
            layers[::2], (w1, critic.w2, critic.w3), (critic.b1, critic.b2, critic.b3), strict=True
        ):
            lin.weight.data.copy_(w.data[j].T)
            lin.bias.data.copy_(bias.data[j, 0])
        members.append(nn.Sequential(*layers))
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
    torch.testing.assert_close(critic(states, actions, members=slice(0, 1))[0], fast[0])


def test_batched_ensemble_gradients_equal_loop_over_members():
    """The folded BatchNorm affine, ReluSignBackward, the in-place ReLU and the multiply-and-sum output layer must give
    the same gradients as plain nn.Linear members, for every parameter and for the actions (the actor loss needs
    them)."""
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
    w1_grad = torch.cat([critic.w1_state.grad, critic.w1_action.grad], dim=1)
    for j, m in enumerate(members):
        for (w, bias), lin in zip(
            [(w1_grad, critic.b1.grad), (critic.w2.grad, critic.b2.grad), (critic.w3.grad, critic.b3.grad)],
            m[::2],
            strict=True,
        ):
            torch.testing.assert_close(w[j].T, lin.weight.grad, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(bias[j, 0], lin.bias.grad, rtol=1e-4, atol=1e-5)


def test_relu_sign_backward_equals_relu_exactly_including_zeros():
    """Values and gradients bit-identical to torch.relu, also at inputs that are exactly 0 (gradient 0 in both)."""
    x = torch.tensor([-2.0, -0.0, 0.0, 1e-30, 3.0, -1e-30]).repeat(4).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    grad = torch.randn(x.shape)
    y = cfcql.ReluSignBackward.apply(x)
    y.backward(grad)
    torch.relu(x_ref).backward(grad)
    assert torch.equal(y, torch.relu(x_ref)) and torch.equal(x.grad, x_ref.grad)
    assert (x.grad[x.detach() <= 0] == 0).all() and (x.grad[x.detach() > 0] != 0).all()


def plain_penalty_logsumexp(nets, states, slot, others, logp):
    """The oracle of the chunked PenaltyLogSumExp: the critic's ordinary autograd forward on all counterfactual
    rows, then torch.logsumexp and the mean, as the code was written before the chunking."""
    b, n, m, _ = slot.shape
    mask = torch.eye(n, dtype=torch.bool)[:, None, :]
    joint = cfcql.replace_actions(others[:, None], slot[:, :, :, None, :], mask)  # [B, n, M, n, d]
    q = nets.critic(states[None], joint.reshape(1, b, n * m, -1)).view(-1, b, n, m)
    return torch.logsumexp(q - logp, dim=-1).mean(dim=(1, 2)).sum()


def penalty_inputs(nets, b, n, m, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # a non-trivial BatchNorm affine: the gradient through its folding is exercised
        nets.critic.bn_weight.uniform_(0.5, 1.5, generator=g)
        nets.critic.bn_bias.normal_(generator=g)
    slot = torch.rand(b, n, m, d, generator=g) * 2 - 1
    others = torch.rand(b, m, n, d, generator=g) * 2 - 1
    logp = torch.randn(b, n, m, generator=g)
    return slot, others, logp


@pytest.mark.parametrize("chunk_bytes", [1, 2800, 2**20])  # one state per chunk, ragged chunks, one chunk
def test_chunked_penalty_equals_plain_autograd_values_and_gradients(monkeypatch, chunk_bytes):
    spec, args, nets, batch = toy_setup("cn", num_critics=3, b=7, hidden=8)
    n, d, m = spec.n_agents, spec.act_dim, 4
    slot, others, logp = penalty_inputs(nets, 7, n, m, d)
    monkeypatch.setattr(cfcql, "CPU_CHUNK_BYTES", chunk_bytes)
    params = list(nets.critic.parameters())
    fast = cfcql.counterfactual_logsumexp(nets, batch.states, slot, others, logp)
    (3.0 * fast).backward()  # a non-unit incoming gradient: backward must scale by it
    fast_grads = [p.grad.clone() for p in params]
    nets.critic.zero_grad()
    slow = plain_penalty_logsumexp(nets, batch.states, slot, others, logp)
    (3.0 * slow).backward()
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
    for p, g in zip(params, fast_grads, strict=True):
        assert p.grad.abs().sum() > 0
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("task", ["cn", "halfcheetah"])
def test_cql_penalty_gradients_equal_plain_autograd_at_training_shapes(monkeypatch, task):
    """The whole penalty (uniform samples on cn; uniform + two policy sources on halfcheetah, minus Q on the data)
    at the training widths and a 10-member ensemble, chunked path against the plain autograd path."""
    spec, args, nets, batch = toy_setup(task, num_critics=10, b=96, hidden=64 if task == "cn" else 256)
    args.num_cql_samples = 10
    monkeypatch.setattr(cfcql, "CPU_CHUNK_BYTES", 2**20)  # several chunks at these shapes
    grads = {}
    for name in ("chunked", "plain"):
        if name == "plain":
            monkeypatch.setattr(cfcql, "counterfactual_logsumexp", plain_penalty_logsumexp)
        nets.critic.zero_grad()
        actor_state = {k: v.clone() for k, v in nets.actors.state_dict().items()}
        q_data = nets.critic(batch.states[None], batch.actions.flatten(1)[None, :, None])
        torch.manual_seed(11)
        penalty = cfcql.cql_penalty(batch, nets, q_data, args)
        penalty.backward()
        nets.actors.load_state_dict(actor_state)  # the policy samples' forwards moved the BatchNorm averages
        grads[name] = (penalty.detach(), [p.grad.clone() for p in nets.critic.parameters()])
    torch.testing.assert_close(grads["chunked"][0], grads["plain"][0], rtol=1e-5, atol=1e-5)
    for fast, slow in zip(grads["chunked"][1], grads["plain"][1], strict=True):
        # atol: d/d b3 is exactly 0 (softmax weights sum to 1, minus the data term), the plain path leaves ~1e-7
        torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("chunk_bytes", [6000, 2**21])  # ragged chunks, one chunk (of bf16 activations)
def test_chunked_penalty_bf16_is_close_to_float32(monkeypatch, chunk_bytes):
    spec, args, nets, batch = toy_setup("halfcheetah", num_critics=2, b=16, hidden=32)
    slot, others, logp = penalty_inputs(nets, 16, spec.n_agents, 5, spec.act_dim)
    with torch.no_grad():
        nets.critic.b3.fill_(0.7)  # an output bias that a wrong bf16 path could not lose unnoticed
    params = list(nets.critic.parameters())
    exact = cfcql.counterfactual_logsumexp(nets, batch.states, slot, others, logp)
    exact.backward()
    exact_grads = [p.grad.clone() for p in params]
    nets.critic.zero_grad()
    monkeypatch.setattr(cfcql, "CPU_CHUNK_BYTES", chunk_bytes)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = cfcql.counterfactual_logsumexp(nets, batch.states, slot, others, logp)
    low.backward()
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, exact, rtol=2e-2, atol=2e-2)
    for p, g in zip(params, exact_grads, strict=True):
        assert p.grad.dtype == torch.float32
        torch.testing.assert_close(p.grad, g, rtol=0.1, atol=0.05 * g.abs().max().item())


def test_penalty_chunks_are_sized_in_bytes(monkeypatch):
    """CPU_CHUNK_BYTES bounds the bytes of one chunk's activation tensor: the same budget holds twice as many states
    in bfloat16 as in float32."""
    spec, args, nets, batch = toy_setup("cn", num_critics=2, b=16, hidden=8)
    m = 3
    slot, others, logp = penalty_inputs(nets, 16, spec.n_agents, m, spec.act_dim)
    rows_per_state = spec.n_agents * m
    float32_bytes_per_state = 2 * rows_per_state * 8 * 4  # E * rows * H * 4 bytes
    monkeypatch.setattr(cfcql, "CPU_CHUNK_BYTES", 4 * float32_bytes_per_state)  # 4 float32 states per chunk
    states_per_call = []
    real_chunk = cfcql.penalty_chunk

    def counting_chunk(a_c, h_state_c, *rest):
        states_per_call.append(h_state_c.shape[1])
        return real_chunk(a_c, h_state_c, *rest)

    monkeypatch.setattr(cfcql, "penalty_chunk", counting_chunk)
    cfcql.counterfactual_logsumexp(nets, batch.states, slot, others, logp)
    assert states_per_call == [4, 4, 4, 4]
    states_per_call.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cfcql.counterfactual_logsumexp(nets, batch.states, slot, others, logp)
    assert states_per_call == [8, 8]


def test_chunked_penalty_rejects_inputs_it_cannot_differentiate_or_shapes_that_disagree():
    spec, args, nets, batch = toy_setup("cn", num_critics=2, b=4, hidden=8)
    slot, others, logp = penalty_inputs(nets, 4, spec.n_agents, 3, spec.act_dim)
    with pytest.raises(ValueError, match="actions or the densities"):
        cfcql.counterfactual_logsumexp(nets, batch.states, slot.requires_grad_(), others, logp)
    h_state, a_hat, w1a = nets.critic.first_layer(batch.states[None], torch.rand(1, 4, 5, 3 * spec.act_dim))
    c = nets.critic
    with pytest.raises(ValueError, match="expected B\\*n\\*M"):
        cfcql.PenaltyLogSumExp.apply(h_state, a_hat, w1a, c.w2, c.b2, c.w3, c.b3, logp.detach())


def test_batched_actors_equal_separate_policies_including_batchnorm_running_stats():
    torch.manual_seed(0)
    n, o, d, h = 3, 7, 2, 16
    actors = cfcql.Actors(n, o, d, h)
    policies = []
    for i in range(n):
        bn = nn.BatchNorm1d(o)
        lins = [nn.Linear(o, h), nn.Linear(h, h), nn.Linear(h, d)]
        for lin, w, b in zip(
            lins, (actors.w1, actors.w2, actors.w3), (actors.b1, actors.b2, actors.b3), strict=True
        ):
            lin.weight.data.copy_(w.data[i].T)
            lin.bias.data.copy_(b.data[i, 0])
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


def slow_penalty(nets, batch, slot_rows, other_rows, logp_rows):
    """Literal per-agent, per-sample, per-member transcription of CFCQL's counterfactual penalty.

    slot_rows[i][b] = list of agent-i actions, other_rows[i][b] = list of joint actions they replace a slot of,
    logp_rows[i][b] = list of log-densities. All counterfactual inputs form one BatchNorm group, as the reference.
    """
    b_size, n, _ = batch.actions.shape
    inputs, index = [], {}
    for i in range(n):
        for b in range(b_size):
            for j, u in enumerate(slot_rows[i][b]):
                joint = other_rows[i][b][j].clone()
                joint[i] = u
                index[i, b, j] = len(inputs)
                inputs.append(torch.cat([batch.states[b], joint.flatten()]))
    q = slow_q(nets.critic, inputs)  # [E, rows]
    q_data = slow_q(
        nets.critic, [torch.cat([batch.states[b], batch.actions[b].flatten()]) for b in range(b_size)]
    )
    total = 0.0
    for e in range(q.shape[0]):
        per_batch = []
        for b in range(b_size):
            z = [
                math.log(
                    sum(
                        math.exp(q[e, index[i, b, j]].item() - logp_rows[i][b][j])
                        for j in range(len(slot_rows[i][b]))
                    )
                )
                for i in range(n)
            ]
            per_batch.append(sum(z) / n - q_data[e, b].item())  # lambda_i = 1/n
        total += sum(per_batch) / b_size
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
    assert fast == pytest.approx(slow_penalty(nets, batch, slots, others, logp), rel=1e-4, abs=1e-4)


def test_halfcheetah_penalty_equals_slow_computation_with_correct_density_pairing():
    spec, args, nets, batch = toy_setup("halfcheetah", num_critics=2, b=3)
    args.num_cql_samples = 4
    q_data = nets.critic(batch.states[None], batch.actions.flatten(1)[None, :, None])
    state = {k: v.clone() for k, v in nets.actors.state_dict().items()}
    torch.manual_seed(7)
    fast = cfcql.cql_penalty(batch, nets, q_data, args).item()
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
    assert fast == pytest.approx(slow_penalty(nets, batch, slots, others, logp), rel=1e-4, abs=1e-4)


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
    assert y.shape == (1, 8, 1)
    with torch.no_grad():
        a = nets.actors_target(batch.next_obs.transpose(0, 1)).transpose(0, 1)
        q = slow_q(nets.critic_target, [torch.cat([batch.next_states[b], a[b].flatten()]) for b in range(8)])
    expected = batch.rewards[:, 0] + args.gamma * (1 - batch.dones[:, 0]) * q.min(0).values
    torch.testing.assert_close(y[0, :, 0], expected, rtol=1e-5, atol=1e-5)
    assert info["charts/target_spread"].item() == pytest.approx(q.std(0).mean().item(), rel=1e-4)


def test_per_agent_grad_clipping_equals_torch_clip_on_each_agent():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(3, 4, 5)), torch.nn.Parameter(torch.randn(3, 1, 5))]
    for p in params:
        p.grad = torch.randn_like(p) * torch.tensor([0.01, 1.0, 10.0]).view(3, 1, 1)
    expected = []
    for i in range(3):
        gs = [p.grad[i].clone().requires_grad_(False) for p in params]
        ts = [torch.zeros_like(g, requires_grad=True) for g in gs]
        for t, g in zip(ts, gs, strict=True):
            t.grad = g
        torch.nn.utils.clip_grad_norm_(ts, 0.5)
        expected.append([t.grad for t in ts])
    cfcql.clip_grad_norm_per_agent(params, 0.5)
    for i in range(3):
        for p, e in zip(params, expected[i], strict=True):
            torch.testing.assert_close(p.grad[i], e)


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
    runs = []
    for _ in range(2):
        args = cfcql.resolve_args(tiny_args(cfcql, tmp_path, "cn"))
        cfcql.seed_everything(args.seed)
        spec = cfcql.get_task("cn")
        nets = cfcql.make_nets(spec, args, torch.device("cpu"))
        copt = torch.optim.Adam(nets.critic.parameters(), lr=args.lr)
        aopt = torch.optim.Adam(nets.actors.parameters(), lr=args.lr)
        data = cfcql.load_dataset(tmp_path / "data" / "cn" / "random" / "seed_0.h5", task="cn")
        gen = torch.Generator().manual_seed(args.seed)
        runs.append(
            [
                {k: v.item() for k, v in cfcql.update_round(data, nets, copt, aopt, args, gen).items()}
                for _ in range(3)
            ]
        )
    assert runs[0] == runs[1]
    assert runs[0][0]["losses/td"] != runs[0][2]["losses/td"]  # the losses do move


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [("task", "walker", "unknown task"), ("dataset", "mediocre", "unknown dataset")],
)
def test_bad_arguments_fail_clearly(tmp_path, field, value, message):
    args = tiny_args(cfcql, tmp_path, "cn")
    setattr(args, field, value)
    with pytest.raises(ValueError, match=message):
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
    state = torch.load(os.path.join(compiled["run_path"], "model.pt"), weights_only=False)
    assert "w2" in state["critic"] and "w2" in state["actors"]  # no "_orig_mod." prefix


@pytest.mark.skipif(
    shutil.which("c++") is None and shutil.which("g++") is None,
    reason="torch.compile's CPU backend needs a C++ compiler",
)
@pytest.mark.parametrize("bf16", [False, True])
def test_compiled_losses_equal_eager_values_and_gradients(monkeypatch, bf16, task="halfcheetah"):
    """compile_losses swaps in torch.compile(critic_loss) and torch.compile(actor_loss). With the same random numbers
    (same seed) and ragged penalty chunks, the losses and the gradient of every critic and actor parameter equal
    the eager ones (with bf16=True the compiled losses run with --bf16 and must equal the eager float32 ones to
    bf16 rounding). HalfCheetah: its penalty has all three sample sources, policy samples included (the particle
    path is exercised end to end by test_compile_flag_is_a_speed_option_only; compiling costs ~45 s per case)."""
    spec, args, nets, batch = toy_setup(task, num_critics=3, b=10, hidden=16)
    args.num_cql_samples = 4
    rows_per_state = spec.n_agents * args.num_cql_samples * (1 if spec.family == "mpe" else 3)
    bytes_per_state = 3 * rows_per_state * 16 * (2 if bf16 else 4)  # E * rows * H * element size
    monkeypatch.setattr(cfcql, "CPU_CHUNK_BYTES", 6 * bytes_per_state)  # compiled: chunks of 6 and 4 states
    results = []
    try:
        for compiled in (False, True):
            if compiled:
                cfcql.compile_losses(nets)
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
