"""A researcher who edits the critic gets a correct program: every loss calls the same critic.

For every algorithm file the critic is replaced by a fork (an extra hidden layer; a LayerNorm after the first
layer), and the conservative penalty's value and the gradient of every critic parameter must equal a slow
oracle that calls the forked critic member by member, row group by row group, with Python loops for the
log-sum-exp. A penalty computed by anything other than the critic's own forward fails here.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import cfcql
import icql_qs
import spacql_mamujoco
import spacql_mpe
from common import runs

torch.set_num_threads(1)
ALGOS = {"cfcql": cfcql, "icql_qs": icql_qs, "spacql_mpe": spacql_mpe, "spacql_mamujoco": spacql_mamujoco}


def forked_critic(module, kind: str, state_dim: int, action_dim: int, hidden: int, members: int):
    """module.EnsembleCritic edited the obvious way: a third hidden layer, or a LayerNorm after layer 1."""

    class Forked(module.EnsembleCritic):
        def __init__(self):
            super().__init__(state_dim, action_dim, hidden, members)
            if kind == "extra_layer":
                self.fc_extra = module.EnsembleLinear(members, hidden, hidden)
            else:
                self.ln = nn.LayerNorm(hidden)
                with torch.no_grad():  # not the identity, so that a missing LayerNorm changes the numbers
                    self.ln.weight.uniform_(0.5, 1.5)
                    self.ln.bias.normal_(0, 0.3)

        def forward(self, states, actions):
            g, b, r, _ = actions.shape
            s = self.state_dim
            x_s = module.batch_norm(states, (1,), self.bn_weight[:s], self.bn_bias[:s])
            x_a = module.batch_norm(actions, (1, 2), self.bn_weight[s:], self.bn_bias[s:])
            x = torch.cat([x_s[:, :, None].expand(g, b, r, s), x_a], -1).flatten(0, 2)  # [G*B*R, S+A]
            h = self.fc1(x)
            h = F.relu(self.ln(h) if kind == "layer_norm" else h)
            h = F.relu(self.fc2(h))
            if kind == "extra_layer":
                h = F.relu(self.fc_extra(h))
            return self.fc3(h).view(-1, g, b, r)

    return Forked()


def setup(module, task: str, kind: str, b: int = 4, members: int = 3, hidden: int = 8):
    torch.manual_seed(0)
    spec = module.get_task(task)
    args = runs.resolve_args(
        module.Args(task=task, num_critics=members, hidden=hidden, batch_size=b), module.TASK_FAMILIES
    )
    args.num_cql_samples = 3
    nets = module.make_nets(spec, args, torch.device("cpu"))
    n, d = spec.n_agents, spec.act_dim
    nets.critic = forked_critic(module, kind, spec.state_dim, n * d, hidden, members)
    obs, next_obs = torch.randn(b, n, spec.obs_dim), torch.randn(b, n, spec.obs_dim)
    states = obs.flatten(1) if spec.family == "mpe" else torch.randn(b, spec.state_dim)
    batch = module.Batch(
        obs=obs,
        actions=torch.rand(b, n, d) * 2 - 1,
        rewards=torch.randn(b, 1),
        next_obs=next_obs,
        next_actions=torch.rand(b, n, d) * 2 - 1,
        dones=torch.zeros(b, 1),
        states=states,
        next_states=next_obs.flatten(1) if spec.family == "mpe" else torch.randn(b, spec.state_dim),
    )
    return spec, args, nets, batch


def oracle_penalty(critic, batch, sources, n_agents):
    """sum_j mean_b [mean_i log sum_{all samples} exp(Q_j - log p) - Q_j(s_b, a_b)], one critic call per source
    (its BatchNorm batch), then loops over members, states, agents and samples."""
    q = []  # per source: {(i, b, m): Q [E]}
    for slot, other, _ in sources:  # slot [B, n, M, d], other [B, M, n, d]
        rows, keys = [], []
        for i in range(n_agents):
            for b in range(slot.shape[0]):
                for m in range(slot.shape[2]):
                    joint = other[b, m].clone()
                    joint[i] = slot[b, i, m]
                    rows.append((batch.states[b], joint.flatten()))
                    keys.append((i, b, m))
        out = critic(
            torch.stack([s for s, _ in rows])[None], torch.stack([a for _, a in rows])[None, :, None]
        )
        q.append({key: out[:, 0, r, 0] for r, key in enumerate(keys)})
    q_data = critic(batch.states[None], batch.actions.flatten(1)[None, :, None])[:, 0, :, 0]  # [E, B]
    total = 0.0
    for e in range(q_data.shape[0]):
        for b in range(q_data.shape[1]):
            z = 0.0
            for i in range(n_agents):
                terms = [
                    qs[i, b, m][e] - logp[b, i, m]
                    for qs, (slot, _, logp) in zip(q, sources, strict=True)
                    for m in range(slot.shape[2])
                ]
                z = z + torch.logsumexp(torch.stack(terms), 0) / n_agents
            total = total + (z - q_data[e, b]) / q_data.shape[1]
    return total


def penalty_sources(nets, batch, args, spec):
    """The penalty's random draws, made in the penalty's order from the same seed."""
    b, n, d, m = batch.actions.shape[0], spec.n_agents, spec.act_dim, args.num_cql_samples
    sources = []
    for source in spec.penalty_sources:
        if source == "uniform":
            sources.append((torch.rand(b, n, m, d) * 2 - 1, batch.actions[:, None].expand(b, m, n, d),
                            torch.full((b, n, m), d * math.log(0.5))))  # fmt: skip
            continue
        obs, other = (
            (batch.obs, batch.actions) if source == "policy" else (batch.next_obs, batch.next_actions)
        )
        with torch.no_grad():
            pi = nets.actors(obs.transpose(0, 1)).transpose(0, 1)[:, :, None]
        sigma = args.policy_sample_noise
        eps = sigma * torch.randn(b, n, m, d)
        logp = (-0.5 * (eps / sigma) ** 2 - math.log(sigma * math.sqrt(2 * math.pi))).sum(-1)
        sources.append(((pi + eps).clamp(-1, 1), other[:, None].expand(b, m, n, d), logp))
    return sources


@pytest.mark.parametrize("kind", ["extra_layer", "layer_norm"])
@pytest.mark.parametrize(
    ("name", "task"),
    [("cfcql", "cn"), ("cfcql", "halfcheetah"), ("icql_qs", "world"), ("spacql_mpe", "pp"),
     ("spacql_mamujoco", "halfcheetah")],
)  # fmt: skip
def test_penalty_of_a_forked_critic_equals_the_oracle(name, task, kind):
    module = ALGOS[name]
    spec, args, nets, batch = setup(module, task, kind)
    params = list(nets.critic.parameters())
    actor_state = {k: v.clone() for k, v in nets.actors.state_dict().items()}
    q_data = nets.critic(batch.states[None], batch.actions.flatten(1)[None, :, None])
    torch.manual_seed(5)
    fast = module.cql_penalty(batch, nets, q_data, args)
    fast_grads = torch.autograd.grad(fast, params)
    nets.actors.load_state_dict(actor_state)  # the policy sources' forwards moved the BatchNorm averages
    torch.manual_seed(5)
    slow = oracle_penalty(nets.critic, batch, penalty_sources(nets, batch, args, spec), spec.n_agents)
    slow_grads = torch.autograd.grad(slow, params)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
    names = [k for k, _ in nets.critic.named_parameters()]
    assert any("fc_extra" in k or "ln." in k for k in names)
    for k, f, s in zip(names, fast_grads, slow_grads, strict=True):
        assert s.abs().sum() > 0 or k == "fc3.bias", k  # d/d fc3.bias is 0: softmax weights sum to 1, minus Q
        torch.testing.assert_close(f, s, rtol=1e-4, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("name", list(ALGOS))
def test_a_forked_critic_trains_through_every_loss(name):
    """The TD target, the penalty and the actor loss all accept the fork; one critic and actor step are finite and
    reach the fork's new parameters."""
    module = ALGOS[name]
    task = "halfcheetah" if name == "spacql_mamujoco" else "cn"
    spec, args, nets, batch = setup(module, task, "extra_layer")
    nets.critic_target = forked_critic(
        module, "extra_layer", spec.state_dim, spec.n_agents * spec.act_dim, 8, 3
    )
    nets.critic_target.load_state_dict(nets.critic.state_dict())
    copt = torch.optim.Adam(nets.critic.parameters(), lr=1e-3)
    aopt = torch.optim.Adam(nets.actors.parameters(), lr=1e-3)
    info = module.critic_step(batch, nets, copt, args)
    info |= module.actor_step(batch, nets, aopt, args)
    assert all(torch.isfinite(v).all() for v in info.values())
    assert nets.critic.fc_extra.weight.grad.abs().sum() > 0
