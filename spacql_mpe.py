"""SPaCQL: Soft-Partial Conservative Q-Learning (Jin & Montana, AAAI 2026), particle tasks.

A target that replaces only k of n agents' next actions (the rest from the data) is less out of
distribution than replacing all n. SPaCQL mixes k = 1..n, weighting each by the inverse ensemble
disagreement u_k. All else is CFCQL's: `diff cfcql.py spacql_mpe.py`. "ref": docs/reference.md.

  Eq. 3  a'^(k): k random agents act with the target policies     partial_replacement_masks
  Eq. 6  Y_SP = r + gamma sum_k w_k min_j Q'_j(s', a'^(k))         td_target (Algorithm 1, lines 5-13)
  Eq. 7  u_k = std_j Q_j(s', a'^(k)), w_k = u_k^-1 / sum_k u_k^-1  soft_partial_weights
  Eq. 5  L = sum_j E (Q_j(s, a) - Y_SP)^2 + xi_c                   critic_loss (line 14)
  xi_c   CFCQL's penalty: E_{a_i ~ pi_i} Q as log-sum-exp over sampled a_i   cql_penalty
  l. 20  actor step on Q_1(s, pi_i(o_i), a_-i)                     actor_loss
Usage: python spacql_mpe.py --task world --dataset random --seed 0
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated

import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro

from common import runs
from common.build import ensure_dataset
from common.dataset import load_dataset, normalized_score
from common.envs import make_vec_env
from common.evaluation import evaluate
from common.perf import compile_backend, keep_freed_memory
from common.tasks import default_hint, get_task

ALGO = os.path.basename(__file__)[: -len(".py")]
TASK_FAMILIES = ("mpe",)


def per_task(name: str):
    return tyro.conf.arg(help_behavior_hint=default_hint(name, TASK_FAMILIES))


@dataclass
class Args:
    task: str = "cn"  # cn, pp or world
    dataset: str = "random"  # random, medium-replay, medium or expert
    seed: int = 0
    dataset_seed: int | None = None  # 0-4 (default: --seed)
    data_dir: str = "data"  # a missing dataset is built here
    num_critics: int = 10  # ensemble size E
    gamma: float = 0.95  # ref B1
    lr: Annotated[float | None, per_task("lr")] = None
    batch_size: Annotated[int | None, per_task("batch_size")] = None
    hidden: Annotated[int | None, per_task("hidden")] = None
    tau: Annotated[float | None, per_task("tau")] = None
    alpha: Annotated[float | None, per_task("alpha")] = None  # penalty weight (ref 3.7)
    num_updates: Annotated[int | None, per_task("num_updates")] = None  # rounds (ref 1.1)
    critic_steps: int = 5  # per round; one actor step
    eval_every: Annotated[int | None, per_task("eval_every")] = None
    num_eval_episodes: int = 10
    num_cql_samples: int = 10  # ref 3.2
    target_noise: float = 0.05  # smoothing std (ref B9)
    policy_sample_noise: float = 0.2  # ref 3.3
    actor_l2: float = 1e-3  # ref 3.6
    grad_clip: float = 0.5
    log_every: int = 10
    checkpoint_every: int = 200  # rounds per checkpoint
    resume: str | None = None  # a run folder to continue
    cuda: bool = True
    bf16: bool = False  # the penalty in bfloat16
    compile: bool = False  # torch.compile the losses
    threads: int | None = None
    run_dir: str = "runs"
    run_name: str | None = None  # default: <algo>__<task>__<dataset>__<seed>__<time>
    save_model: bool = False  # -> <run folder>/model.pt
    load_model: str | None = None  # evaluate a model.pt


# ======================================================================================================
# Data (the same in every file)
# ======================================================================================================


@dataclass
class Batch:
    """One minibatch, agents on dim 1."""

    obs: torch.Tensor  # [B, n, obs_dim]
    actions: torch.Tensor  # [B, n, d]
    rewards: torch.Tensor  # [B, 1]  agent 0's reward (ref B6)
    next_obs: torch.Tensor  # [B, n, obs_dim]
    next_actions: torch.Tensor  # [B, n, d]  the dataset's a'
    dones: torch.Tensor  # [B, 1]  terminations only
    states: torch.Tensor  # [B, S]
    next_states: torch.Tensor  # [B, S]


def sample_batch(data, batch_size: int, generator: torch.Generator) -> Batch:
    idx = torch.randint(len(data), (batch_size,), device=data.obs.device, generator=generator)  # D1
    fields = ("obs", "actions", "next_obs", "next_actions", "states", "next_states")
    return Batch(
        **{f: getattr(data, f)[idx] for f in fields},
        rewards=data.rewards[idx, :1],
        dones=data.dones[idx, None],
    )


def replace_actions(base: torch.Tensor, new: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Agent slots in `mask` from `new`, the others from `base`: [..., n, d], mask [..., n] bool."""
    return torch.where(mask[..., None], new, base)


# ======================================================================================================
# Networks (the same in every file)
# ======================================================================================================


class EnsembleLinear(nn.Module):
    """E nn.Linear(in_dim, out_dim), batched: x [N, in] (shared) or [E, N, in] -> [E, N, out]."""

    def __init__(self, e: int, in_dim: int, out_dim: int):
        super().__init__()
        bound = 1.0 / math.sqrt(in_dim)  # as nn.Linear
        self.weight = nn.Parameter(torch.empty(e, in_dim, out_dim).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(e, 1, out_dim).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.shape[-1] == 1:  # one output: multiply-and-sum beats a batched matmul
            return (x * self.weight.transpose(1, 2)).sum(-1, keepdim=True) + self.bias
        return torch.matmul(members(x, self.weight.shape[0]), self.weight) + self.bias


def members(x: torch.Tensor, e: int) -> torch.Tensor:
    """[N, in] -> [E, N, in], a view: a batched matmul (2-D @ 3-D runs as a slower transposed mm and copy)."""
    return x.expand(e, *x.shape[-2:])


class Actors(nn.Module):
    """n policies pi_i(o_i) = tanh(MLP_i(BatchNorm_i(o_i))), batched over agents; BatchNorm as
    nn.BatchNorm1d, last layer initialised in U(-3e-3, 3e-3) (ref 2)."""

    def __init__(self, n: int, obs_dim: int, act_dim: int, hidden: int):
        super().__init__()
        self.bn_weight, self.bn_bias = (
            nn.Parameter(torch.ones(n, 1, obs_dim)),
            nn.Parameter(torch.zeros(n, 1, obs_dim)),
        )
        self.register_buffer("running_mean", torch.zeros(n, 1, obs_dim))
        self.register_buffer("running_var", torch.ones(n, 1, obs_dim))
        self.fc1, self.fc2, self.fc3 = (
            EnsembleLinear(n, obs_dim, hidden),
            EnsembleLinear(n, hidden, hidden),
            EnsembleLinear(n, hidden, act_dim),
        )
        nn.init.uniform_(self.fc3.weight, -3e-3, 3e-3)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:  # obs [n, M, obs_dim] -> actions [n, M, d]
        if self.training:
            var, mean = torch.var_mean(obs, dim=1, unbiased=False, keepdim=True)
            with torch.no_grad():  # unbiased variance, as nn.BatchNorm1d
                m = obs.shape[1]
                self.running_mean.lerp_(mean, 0.1)
                self.running_var.lerp_(var * m / max(m - 1, 1), 0.1)
        else:
            mean, var = self.running_mean, self.running_var
        x = (obs - mean) * torch.rsqrt(var + 1e-5) * self.bn_weight + self.bn_bias
        return torch.tanh(self.fc3(F.relu(self.fc2(F.relu(self.fc1(x))))))


def batch_norm(
    x: torch.Tensor, dims: tuple[int, ...], weight: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """Training-mode BatchNorm over `dims` (the critics always use batch statistics, ref B7)."""
    var, mean = torch.var_mean(x, dim=dims, unbiased=False, keepdim=True)
    return (x - mean) * torch.rsqrt(var + 1e-5) * weight + bias


class EnsembleCritic(nn.Module):
    """E critics Q_j(s, a) = MLP_j(BatchNorm([s, a])), one shared BatchNorm (ref 2, B7); E = 2 is the
    reference's twin critic. Q [E, G, B, R] of states [Gs, B, S] (Gs = 1 or G) and actions [G, B, R, A]:
    each group g is one BatchNorm batch, as one reference call."""

    def __init__(self, state_dim: int, action_dim: int, hidden: int, num_members: int):
        super().__init__()
        self.state_dim = state_dim
        self.bn_weight = nn.Parameter(torch.ones(state_dim + action_dim))
        self.bn_bias = nn.Parameter(torch.zeros(state_dim + action_dim))
        self.fc1 = EnsembleLinear(num_members, state_dim + action_dim, hidden)
        self.fc2 = EnsembleLinear(num_members, hidden, hidden)
        self.fc3 = EnsembleLinear(num_members, hidden, 1)

    def forward(self, states: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        g, b, r, _ = actions.shape
        s = self.state_dim
        # a state's R rows share its statistics and layer 1's state half: computed once per state (exact)
        x_s = batch_norm(states, (1,), self.bn_weight[:s], self.bn_bias[:s])  # [Gs, B, S]
        x_a = batch_norm(actions, (1, 2), self.bn_weight[s:], self.bn_bias[s:])  # [G, B, R, A]
        w1, b1 = self.fc1.weight, self.fc1.bias  # [E, S+A, H], [E, 1, H]
        e, _, hid = w1.shape
        h_s = torch.matmul(members(x_s.flatten(0, 1), e), w1[:, :s]) + b1  # [E, Gs*B, H]
        h_a = torch.matmul(members(x_a.flatten(0, 2), e), w1[:, s:])  # [E, G*B*R, H]
        h = F.relu(h_a.view(e, g, b, r, hid) + h_s.view(e, -1, b, 1, hid)).view(e, -1, hid)
        h = F.relu(self.fc2(h))  # [E, G*B*R, H]
        return self.fc3(h).view(e, g, b, r)


@dataclass
class Nets:
    actors: Actors
    actors_target: Actors
    critic: EnsembleCritic
    critic_target: EnsembleCritic
    critic_loss: Callable | None = None  # --compile
    actor_loss: Callable | None = None


# ======================================================================================================
# ALGORITHM: SPaCQL's soft-partial target (Eq. 3-7; Algorithm 1, lines 5-13)
# ======================================================================================================


def partial_replacement_masks(b: int, n: int, device: torch.device) -> torch.Tensor:
    """[n(k), B, n] bool: for each k and transition, k agents drawn uniformly (line 7)."""
    ranks = torch.rand(n, b, n, device=device).argsort(-1).argsort(-1)  # random permutations
    return ranks < torch.arange(1, n + 1, device=device)[:, None, None]


def soft_partial_weights(u: torch.Tensor) -> torch.Tensor:
    """w_k = (1/u_k) / sum_k (1/u_k) over dim 0 (below Eq. 7)."""
    inv = 1.0 / (u + 1e-6)  # u_k may be 0
    return inv / inv.sum(0, keepdim=True)


def td_target(batch: Batch, nets: Nets, args: Args) -> tuple[torch.Tensor, dict]:
    """Y_SP [1, B, 1] (Eq. 6): smoothed TARGET policies act; u_k from ONLINE, min over TARGET members."""
    with torch.no_grad():
        b, n, d = batch.actions.shape
        next_pi = nets.actors_target(batch.next_obs.transpose(0, 1)).transpose(0, 1)  # [B, n, d]
        noise = args.target_noise * torch.randn(n, b, n, d, device=next_pi.device)  # [n(k), B, n, d]
        a_pi = (next_pi + noise).clamp(-1.0, 1.0)  # line 8
        mask = partial_replacement_masks(b, n, next_pi.device)  # [n(k), B, n]
        joint = replace_actions(batch.next_actions[None], a_pi, mask)  # [n(k), B, n, d]  Eq. 3, line 9
        joint = joint.flatten(2)[:, :, None]  # [n(k), B, 1, n*d]: a BatchNorm group per k
        u = nets.critic(batch.next_states[None], joint).std(0)  # [n(k), B, 1]  Eq. (7), line 10
        q_next = nets.critic_target(batch.next_states[None], joint)  # [E, n(k), B, 1]
        w = soft_partial_weights(u)  # [n(k), B, 1]
        y_soft = (w * q_next.min(0).values).sum(0, keepdim=True)  # [1, B, 1]  Eq. (6), lines 11-13
        y = batch.rewards + args.gamma * (1.0 - batch.dones) * y_soft
    k = torch.arange(1, n + 1, device=w.device, dtype=w.dtype)
    return y, {
        "charts/target_spread": q_next.std(0).mean(),
        "charts/w": w.mean((1, 2)),  # [n] (Figure 3)
        "charts/u": u.mean((1, 2)),  # [n]
        "charts/k_eff": (w[..., 0] * k[:, None]).sum(0).mean(),  # sum_k w_k k
    }


# ======================================================================================================
# Losses (the same in every file)
# ======================================================================================================


def critic_loss(batch: Batch, nets: Nets, args: Args) -> tuple[torch.Tensor, dict]:
    """Eq. 5: sum_j mean_b (Q_j(s, a) - y)^2 + alpha * penalty."""
    q_data = nets.critic(batch.states[None], batch.actions.flatten(1)[None, :, None])  # [E, 1, B, 1]
    y, info = td_target(batch, nets, args)  # [G, B, 1]
    td_loss = (q_data - y).pow(2).mean(dim=(1, 2, 3)).sum()
    penalty = cql_penalty(batch, nets, q_data, args)
    info |= {
        "losses/td": td_loss.detach(),
        "losses/cql_penalty": penalty.detach(),
        "charts/q_data": q_data.mean().detach(),
    }
    return td_loss + args.alpha * penalty, info


def cql_penalty(batch: Batch, nets: Nets, q_data: torch.Tensor, args: Args) -> torch.Tensor:
    """xi_c / alpha = sum_j mean_b [mean_i Z_jbi - Q_j(s, a)], Z_jbi = log sum_m exp(Q_j(s, u_im, a_-i) -
    log p(u_im)) (ref 3.2, 3.3, B5, B8). Sources of u (common/tasks.py): uniform; HalfCheetah also
    pi_i(o_i) + noise and pi_i(o'_i) + noise (D2), each its own BatchNorm batch (ref B7)."""
    b, n, d = batch.actions.shape
    m, dev, sigma = args.num_cql_samples, q_data.device, args.policy_sample_noise
    data_others = batch.actions[:, None].expand(b, m, n, d)  # [B, M, n, d]
    slots, others, log_p = [], [], []  # per source: [B, n, M, d], [B, M, n, d], [B, n, M]
    for source in get_task(args.task).penalty_sources:
        if source == "uniform":
            slots.append(torch.rand(b, n, m, d, device=dev) * 2.0 - 1.0)
            others.append(data_others)
            log_p.append(torch.full((b, n, m), d * math.log(0.5), device=dev))
        else:  # "next_policy": pi_i(o'_i) beside a'_-i, at s (ref B4)
            obs, other = (
                (batch.obs, batch.actions) if source == "policy" else (batch.next_obs, batch.next_actions)
            )
            with torch.no_grad():  # training mode (ref 3.3)
                pi = nets.actors(obs.transpose(0, 1)).transpose(0, 1)[:, :, None]  # [B, n, 1, d]
            eps = sigma * torch.randn(b, n, m, d, device=dev)
            slots.append((pi + eps).clamp(-1.0, 1.0))
            others.append(other[:, None].expand(b, m, n, d))
            log_p.append((-0.5 * (eps / sigma) ** 2 - math.log(sigma) - 0.5 * math.log(2 * math.pi)).sum(-1))
    g = len(slots)
    eye = torch.eye(n, dtype=torch.bool, device=dev)[:, None, :]  # [n(i), 1, n]
    joint = replace_actions(torch.stack(others)[:, :, None], torch.stack(slots)[:, :, :, :, None], eye)
    joint = joint.reshape(g, b, n * m, n * d)  # [G, B, n*M, n*d], rows (i, m)
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=args.bf16):
        q = nets.critic(batch.states[None], joint).float()  # [E, G, B, n*M]
    q = q.view(-1, g, b, n, m) - torch.stack(log_p)  # Q - log p  [E, G, B, n, M]
    z = torch.logsumexp(q.permute(0, 2, 3, 1, 4).flatten(3), dim=-1)  # [E, B, n]: over all G*M samples
    return z.mean(dim=(1, 2)).sum() - q_data.mean(dim=(1, 2, 3)).sum()


def actor_loss(batch: Batch, nets: Nets, args: Args) -> torch.Tensor:
    """-mean_{i,b} Q_1(s, pi_i(o_i), a_-i) + l2 sum_i mean(pi_i^2) (ref 3.6)."""
    b, n, d = batch.actions.shape
    pi = nets.actors(batch.obs.transpose(0, 1))  # [n, B, d]
    mask = torch.eye(n, dtype=torch.bool, device=pi.device)  # [n(i), n]
    joint = replace_actions(
        batch.actions[:, None], pi.transpose(0, 1)[:, :, None, :], mask
    )  # [B, n(i), n, d]
    q1 = nets.critic(batch.states[None], joint.reshape(1, b, n, n * d))[0]  # [1, B, n]
    return -q1.mean() + args.actor_l2 * pi.pow(2).mean(dim=(1, 2)).sum()


# ======================================================================================================
# Update round (the same in every file)
# ======================================================================================================


def critic_step(batch: Batch, nets: Nets, critic_opt, args: Args) -> dict:
    loss, info = (nets.critic_loss or critic_loss)(batch, nets, args)
    critic_opt.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(nets.critic.parameters(), args.grad_clip)  # the whole ensemble (D3)
    critic_opt.step()
    return info


def actor_step(batch: Batch, nets: Nets, actor_opt, args: Args) -> dict:
    loss = (nets.actor_loss or actor_loss)(batch, nets, args)
    params = list(nets.actors.parameters())
    for p, g in zip(params, torch.autograd.grad(loss, params), strict=True):  # none into the critic
        p.grad = g
    norms = torch.stack([p.grad.flatten(1).pow(2).sum(1) for p in params]).sum(0).sqrt()  # [n]
    for p in params:  # clip_grad_norm_ per agent, as the reference
        p.grad.mul_((args.grad_clip / (norms + 1e-6)).clamp(max=1.0).view(-1, *[1] * (p.dim() - 1)))
    actor_opt.step()
    return {"losses/actor": loss.detach()}


def update_round(data, nets: Nets, critic_opt, actor_opt, args: Args, generator: torch.Generator) -> dict:
    """A reference round (ref 1.1): critic + actor step, critic_steps - 1 critic steps, Polyak updates."""
    batch = sample_batch(data, args.batch_size, generator)
    info = critic_step(batch, nets, critic_opt, args)
    info |= actor_step(batch, nets, actor_opt, args)
    for _ in range(args.critic_steps - 1):
        critic_step(sample_batch(data, args.batch_size, generator), nets, critic_opt, args)
    with torch.no_grad():
        for target, online in ((nets.critic_target, nets.critic), (nets.actors_target, nets.actors)):
            torch._foreach_lerp_(list(target.parameters()), list(online.parameters()), args.tau)
    return info


# ======================================================================================================
# Run (the same in every file)
# ======================================================================================================


def make_nets(spec, args: Args, device: torch.device) -> Nets:
    n, obs_dim, act_dim = spec.n_agents, spec.obs_dim, spec.act_dim
    actors = Actors(n, obs_dim, act_dim, args.hidden).to(device)
    critic = EnsembleCritic(spec.state_dim, n * act_dim, args.hidden, args.num_critics).to(device)
    actors_target = Actors(n, obs_dim, act_dim, args.hidden).to(device)
    critic_target = EnsembleCritic(spec.state_dim, n * act_dim, args.hidden, args.num_critics).to(device)
    actors_target.load_state_dict(actors.state_dict())
    critic_target.load_state_dict(critic.state_dict())
    nets = Nets(actors, actors_target, critic, critic_target)
    if args.compile:  # one graph per loss; eager random numbers: same samples
        import torch._inductor.config as inductor_config

        inductor_config.fallback_random = True
        backend = compile_backend(device)  # common/perf.py
        nets.critic_loss = torch.compile(critic_loss, backend=backend)
        nets.actor_loss = torch.compile(actor_loss, backend=backend)
    return nets


def run_evaluation(nets: Nets, env, args: Args, device) -> tuple[float, float]:
    nets.actors.eval()
    returns = evaluate(nets.actors, env, seed=args.seed + 100, device=device)
    nets.actors.train()
    return float(returns.mean()), normalized_score(args.task, float(returns.mean()))


def main(args: Args) -> dict:
    args, checkpoint = runs.restore_args(args, ALGO)  # --resume, --load-model
    args = runs.resolve_args(args, TASK_FAMILIES)  # per-task defaults; bad options end here
    keep_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.cuda and torch.cuda.is_available() else "cpu")
    runs.seed_everything(args.seed)
    nets = make_nets(get_task(args.task), args, device)
    critic_opt = torch.optim.Adam(nets.critic.parameters(), lr=args.lr)
    actor_opt = torch.optim.Adam(nets.actors.parameters(), lr=args.lr)  # = one Adam per agent
    env = make_vec_env(args.task, args.num_eval_episodes)
    if args.load_model:
        nets.actors.load_state_dict(checkpoint["actors"])
        return runs.write_evaluation(args.load_model, *run_evaluation(nets, env, args, device), args)

    path = ensure_dataset(args.task, args.dataset, args.dataset_seed, args.data_dir)
    data = load_dataset(path, task=args.task, dataset=args.dataset, device=device)
    generator = torch.Generator(device=device).manual_seed(args.seed)  # minibatches (D1)
    state = {k: getattr(nets, k) for k in ("actors", "actors_target", "critic", "critic_target")}
    state |= {"critic_opt": critic_opt, "actor_opt": actor_opt}
    run = runs.Run(ALGO, args, state, generator, checkpoint)  # logs and checkpoints; restores --resume
    for round_ in run.rounds():  # checkpoints every --checkpoint-every rounds and on SIGINT / SIGTERM
        if round_ % args.eval_every == 0:
            run.log_eval(round_, *run_evaluation(nets, env, args, device))
        run.log_train(round_, update_round(data, nets, critic_opt, actor_opt, args, generator))
    return run.finish(*run_evaluation(nets, env, args, device), path, device)  # after the last round (D4)


if __name__ == "__main__":
    runs.cli(main, Args)
