"""ICQL-QS: Individual Conservative Q-Learning with Q-sharing (partial action replacement, one agent at a time).

Paper:     Jin & Montana, "Partial Action Replacement: Tackling Distribution Shift in Offline MARL",
           AAAI 2026, Eq. (1)-(2) and Proposition 1.
Reference: no public code of ICQL-QS; built on cfcql.py (CFCQL, github.com/thu-rllab/CFCQL continuous/,
           commit 3441019, as described in shared/reference/cfcql-reference.md). Everything but the TD target is
           CFCQL's: `diff cfcql.py icql_qs.py` shows exactly the change.
Tasks:     cn, pp, world, halfcheetah.
Usage:     python icql_qs.py --task cn --dataset random --seed 0

Reading of the paper, stated as such:
  P1. The conservative term of Eq. (2) is written in CQL notation; we use CFCQL's counterfactual penalty
      (the paper: "a conservative penalty same as that used in CFCQL", below Eq. 5).
  P2. Agent i's next action is the smoothed target-policy action, as CFCQL's target (the paper's pi_i).
  P3. With an E-member critic, every individual target takes the min over target members, as CFCQL's twin.
Deviations from the reference CFCQL code are those of cfcql.py (D1-D4, listed in README.md), inherited
unchanged: minibatches with replacement from a dedicated generator and fixed evaluation seeds; HalfCheetah
density corrections paired with their own samples; the critic as a batched ensemble with joint gradient clipping;
the final evaluation after the last round. Kept from the reference: gamma = 0.95 everywhere, training-mode
BatchNorm in every critic forward (each forward group normalised by its own batch statistics), agent 0's reward.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from common.build import ensure_dataset
from common.dataset import load_dataset, normalized_score
from common.envs import make_vec_env
from common.evaluation import evaluate
from common.perf import keep_freed_memory
from common.tasks import REFERENCE_HPARAMS, check_dataset_type, get_task

TASK_FAMILIES = ("mpe", "mamujoco")  # this file runs the particle tasks and HalfCheetah


@dataclass
class Args:
    task: str = "cn"
    """task: cn (Cooperative Navigation), pp (Predator-Prey), world, halfcheetah"""
    dataset: str = "random"
    """dataset type: random, medium-replay, medium, expert"""
    seed: int = 0
    """seed of networks, noise and minibatch sampling"""
    dataset_seed: int | None = None
    """which of the independently generated dataset copies (0-4) to train on; default: --seed"""
    data_dir: str = "data"
    """where datasets live; a missing one is built there"""
    num_critics: int = 2
    """ensemble size E of the centralized critic (2 = the reference's twin critic)"""
    gamma: float = 0.95
    """discount; 0.95 is what the reference ran in every task (ref B1)"""
    lr: float | None = None
    """Adam learning rate of every network; default: the reference's per-task value"""
    batch_size: int | None = None
    """minibatch size; default: 1024 (particle tasks) / 256 (halfcheetah)"""
    hidden: int | None = None
    """hidden width of actors and critic; default: 64 (particle tasks) / 256 (halfcheetah)"""
    tau: float | None = None
    """Polyak rate of the target update; default: 0.01 (particle) / 0.005 (halfcheetah)"""
    alpha: float | None = None
    """conservative-penalty weight; default: the reference's table per task and dataset (ref 3.7)"""
    num_updates: int | None = None
    """update rounds (1 critic+actor step, critic_steps - 1 critic steps, 1 target update); default: reference"""
    critic_steps: int = 5
    """critic steps per round (the reference's ca_ratio); the actor steps once, after the first"""
    eval_every: int | None = None
    """rounds between evaluations; default: the reference's interval"""
    num_eval_episodes: int = 10
    """deterministic evaluation episodes (fixed start states)"""
    num_cql_samples: int = 10
    """counterfactual samples per agent and per source in the conservative penalty (ref 3.2)"""
    target_noise: float = 0.05
    """std of the target-policy smoothing noise (no clip; ref B9)"""
    policy_sample_noise: float = 0.2
    """std of the policy-sample noise in the halfcheetah penalty (ref 3.3)"""
    actor_l2: float = 1e-3
    """weight of the squared-action regulariser of the actor loss (ref 3.6)"""
    grad_clip: float = 0.5
    """max gradient norm of the critic ensemble and of each actor"""
    log_every: int = 10
    """rounds between TensorBoard scalar writes"""
    cuda: bool = True
    """use CUDA when available"""
    bf16: bool = False
    """the conservative penalty's counterfactual passes in bfloat16 (87-96% of the FLOPs; Q on the data, the TD
    targets and the actor step stay float32); off by default, see README"""
    compile: bool = False
    """torch.compile the critic and actor losses (opt-in, as LeanRL; 30-210 s of compilation; see README)"""
    threads: int | None = None
    """torch CPU threads (default: torch's choice)"""
    run_dir: str = "runs"
    """parent directory of the run directory"""
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """experiment name, the first part of the run directory's name"""
    save_model: bool = False
    """save networks, optimizers and args to <run dir>/model.pt at the end"""
    load_model: str | None = None
    """evaluate a saved model.pt instead of training"""


# ======================================================================================================
# Shared helpers (identical in every algorithm file)
# ======================================================================================================


def resolve_args(args: Args) -> Args:
    """Fill every unset hyper-parameter with the reference's per-task value and reject bad values."""
    spec = get_task(args.task)
    if spec.family not in TASK_FAMILIES:
        raise ValueError(f"{os.path.basename(__file__)} runs {TASK_FAMILIES} tasks, not {spec.name!r}")
    check_dataset_type(args.dataset)
    hp = REFERENCE_HPARAMS[spec.name]
    args.task = spec.name
    args.lr = hp.lr if args.lr is None else args.lr
    args.batch_size = hp.batch_size if args.batch_size is None else args.batch_size
    args.hidden = hp.hidden if args.hidden is None else args.hidden
    args.tau = hp.tau if args.tau is None else args.tau
    args.alpha = hp.alpha[args.dataset] if args.alpha is None else args.alpha
    args.num_updates = hp.num_updates if args.num_updates is None else args.num_updates
    args.eval_every = hp.eval_every if args.eval_every is None else args.eval_every
    args.dataset_seed = args.seed if args.dataset_seed is None else args.dataset_seed
    if args.num_critics < 2:
        raise ValueError(
            f"--num-critics must be >= 2 (min over members, ensemble spread), got {args.num_critics}"
        )
    if args.batch_size < 2 or args.critic_steps < 1 or args.num_updates < 0 or args.eval_every < 1:
        raise ValueError(
            "--batch-size >= 2, --critic-steps >= 1, --num-updates >= 0, --eval-every >= 1 required"
        )
    return args


@dataclass
class Batch:
    """One minibatch, agents on dim 1. rewards/dones keep a trailing 1 so that they broadcast with Q."""

    obs: torch.Tensor  # [B, n, obs_dim]
    actions: torch.Tensor  # [B, n, act_dim]
    rewards: torch.Tensor  # [B, 1]  agent 0's reward column, as the reference (ref B6)
    next_obs: torch.Tensor  # [B, n, obs_dim]
    next_actions: torch.Tensor  # [B, n, act_dim]  the dataset's action at s'
    dones: torch.Tensor  # [B, 1]  true terminations only (time limits bootstrap)
    states: torch.Tensor  # [B, S]
    next_states: torch.Tensor  # [B, S]


def sample_batch(data, batch_size: int, generator: torch.Generator) -> Batch:
    idx = torch.randint(len(data), (batch_size,), device=data.obs.device, generator=generator)  # D1
    return Batch(
        obs=data.obs[idx],
        actions=data.actions[idx],
        rewards=data.rewards[idx, :1],
        next_obs=data.next_obs[idx],
        next_actions=data.next_actions[idx],
        dones=data.dones[idx, None],
        states=data.states[idx],
        next_states=data.next_states[idx],
    )


def replace_actions(base: torch.Tensor, new: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Joint actions whose agent slots in `mask` come from `new` and the others from `base`.

    base, new [..., n, d]; mask [..., n] bool (broadcastable). The one construction behind the counterfactual
    penalty, the actor loss and the partial-action-replacement targets.
    """
    return torch.where(mask[..., None], new, base)


def soft_update(target: nn.Module, online: nn.Module, tau: float) -> None:
    """Polyak update of parameters only; BatchNorm buffers of targets are not averaged (as the reference)."""
    with torch.no_grad():
        torch._foreach_lerp_(list(target.parameters()), list(online.parameters()), tau)


def clip_grad_norm_per_agent(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """clip_grad_norm_ applied to each agent's slice [i] separately (the reference clips each policy alone)."""
    grads = [p.grad for p in params]
    norms = torch.stack([g.flatten(1).pow(2).sum(1) for g in grads]).sum(0).sqrt()  # [n]
    scale = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(scale.view(-1, *([1] * (g.dim() - 1))))
    return norms


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ======================================================================================================
# Networks (identical in every algorithm file)
# ======================================================================================================


def _linear_init(fan_in: int, *shape: int) -> nn.Parameter:
    """nn.Linear's default initialisation, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), for batched weights."""
    bound = 1.0 / math.sqrt(fan_in)
    return nn.Parameter(torch.empty(*shape).uniform_(-bound, bound))


class Actors(nn.Module):
    """n deterministic policies pi_i(o_i) = tanh(MLP(BatchNorm(o_i))), one per agent, batched over agents.

    Each agent has its own input BatchNorm (training mode: batch statistics, running averages updated with
    momentum 0.1; eval mode: running averages) and its own 2-layer ReLU MLP; the last layer starts in
    U(-3e-3, 3e-3) as in the reference (ref 2). All parameters carry a leading agent dimension n.
    """

    def __init__(self, n: int, obs_dim: int, act_dim: int, hidden: int):
        super().__init__()
        self.bn_weight = nn.Parameter(torch.ones(n, 1, obs_dim))
        self.bn_bias = nn.Parameter(torch.zeros(n, 1, obs_dim))
        self.register_buffer("running_mean", torch.zeros(n, 1, obs_dim))
        self.register_buffer("running_var", torch.ones(n, 1, obs_dim))
        self.w1, self.b1 = _linear_init(obs_dim, n, obs_dim, hidden), _linear_init(obs_dim, n, 1, hidden)
        self.w2, self.b2 = _linear_init(hidden, n, hidden, hidden), _linear_init(hidden, n, 1, hidden)
        self.w3 = nn.Parameter(torch.empty(n, hidden, act_dim).uniform_(-3e-3, 3e-3))
        self.b3 = _linear_init(hidden, n, 1, act_dim)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:  # obs [n, M, obs_dim] -> actions [n, M, act_dim]
        if self.training:
            mean, var = obs.mean(1, keepdim=True), obs.var(1, unbiased=False, keepdim=True)
            with torch.no_grad():  # nn.BatchNorm1d's running update uses the unbiased variance
                m = obs.shape[1]
                self.running_mean.lerp_(mean, 0.1)
                self.running_var.lerp_(var * m / max(m - 1, 1), 0.1)
        else:
            mean, var = self.running_mean, self.running_var
        x = (obs - mean) * torch.rsqrt(var + 1e-5) * self.bn_weight + self.bn_bias
        h = F.relu(torch.baddbmm(self.b1, x, self.w1))
        h = F.relu(torch.baddbmm(self.b2, h, self.w2))
        return torch.tanh(torch.baddbmm(self.b3, h, self.w3))


class ReluSignBackward(torch.autograd.Function):
    """ReLU whose backward multiplies the incoming gradient by sign(output), exactly 1 where the output is positive
    and 0 elsewhere: the same values and gradients as torch.relu. Why: under --compile, autograd's ReLU backward
    (threshold_backward) led inductor to save a bool mask of the critic's first layer for the backward, and its CPU
    kernels store bool tensors about 30x slower than a float pass (measured: 4.3 vs 0.15 ms for [10, 1024, 64], about
    5 ms per SPaCQL critic step). The output is kept for the next layer's weight gradient anyway, so the sign costs
    no extra memory. Eager speed is unchanged."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        y = x.relu()
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (y,) = ctx.saved_tensors
        return grad * torch.sign(y)


class EnsembleCritic(nn.Module):
    """E centralized critics Q_j(s, a_1..a_n) behind one shared input BatchNorm, batched over members.

    The reference's twin critic is one BatchNorm1d on (s, a_1, ..., a_n) feeding two 2-hidden-layer ReLU heads
    (ref 2); E = 2 reproduces it and E = 10 is the SPaCQL ensemble. The BatchNorm always uses the statistics of
    the batch it is given, as the reference keeps its critics in training mode (ref B7).

    Inputs come as states [Gs, B, S] (Gs = 1 or G) and joint actions [G, B, R, n*d]: row (g, b, r) is the input
    (states[g, b], actions[g, b, r]), i.e. R actions per state, and each group g is normalised by the statistics
    of its own B*R rows, so one call on G groups equals G separate reference calls. Because every state occurs
    exactly R times in its group, the state features' statistics are those of the B states, and the first
    layer's state half runs on B rows instead of B*R (exact; it halves the work of the penalty's forward).
    """

    def __init__(self, state_dim: int, action_dim: int, hidden: int, num_members: int):
        super().__init__()
        in_dim, e = state_dim + action_dim, num_members
        self.bn_weight = nn.Parameter(torch.ones(in_dim))
        self.bn_bias = nn.Parameter(torch.zeros(in_dim))
        self.w1_state = _linear_init(in_dim, e, state_dim, hidden)  # = one nn.Linear(in_dim, hidden), split
        self.w1_action = _linear_init(in_dim, e, action_dim, hidden)
        self.b1 = _linear_init(in_dim, e, 1, hidden)
        self.w2, self.b2 = _linear_init(hidden, e, hidden, hidden), _linear_init(hidden, e, 1, hidden)
        self.w3, self.b3 = _linear_init(hidden, e, hidden, 1), _linear_init(hidden, e, 1, 1)

    def first_layer(
        self, states: torch.Tensor, actions: torch.Tensor, members: slice = slice(None)
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """BatchNorm and the first layer's two halves. states [Gs, B, S], actions [G, B, R, A] -> h_state
        [E, Gs*B, H] (state half plus bias), a_hat [G*B*R, A] (normalised actions; no grad), w1a [E, A, H]:
        the first layer's pre-activation for row (g, b, r) is a_hat[row] @ w1a + h_state[:, g*B + b]."""
        s_dim = states.shape[-1]
        w1s, w1a, b1 = self.w1_state[members], self.w1_action[members], self.b1[members]
        s_mean, s_var = states.mean(1, keepdim=True), states.var(1, unbiased=False, keepdim=True)
        a_var, a_mean = torch.var_mean(actions, dim=(1, 2), unbiased=False, keepdim=True)
        s_hat = (states - s_mean) * torch.rsqrt(s_var + 1e-5)  # [Gs, B, S]
        a_hat = (actions - a_mean) * torch.rsqrt(a_var + 1e-5)  # [G, B, R, A]
        # BatchNorm's affine part is folded into the first layer (exact): (x_hat * gamma + beta) W =
        # x_hat (gamma W) + beta W. Then no gradient is formed for input rows that need none (the penalty's).
        gamma_s, gamma_a = self.bn_weight[:s_dim, None], self.bn_weight[s_dim:, None]
        bias1 = b1 + (self.bn_bias[:s_dim] @ w1s + self.bn_bias[s_dim:] @ w1a)[:, None]  # [E, 1, H]
        h_state = torch.matmul(s_hat.reshape(-1, s_dim), gamma_s * w1s) + bias1  # [E, Gs*B, H]
        return h_state, a_hat.reshape(-1, actions.shape[-1]), gamma_a * w1a

    def forward(
        self, states: torch.Tensor, actions: torch.Tensor, members: slice = slice(None)
    ) -> torch.Tensor:
        """states [Gs, B, S], actions [G, B, R, A] -> Q [E, G, B, R] (E = the selected members)."""
        g, b, r, _ = actions.shape
        h_state, a_hat, w1a = self.first_layer(states, actions, members)
        w2, b2, w3, b3 = (p[members] for p in (self.w2, self.b2, self.w3, self.b3))
        e, h_dim = w1a.shape[0], w1a.shape[2]
        h_action = torch.matmul(a_hat, w1a)  # [E, G*B*R, H]
        h = h_action.view(e, g, b, r, h_dim) + h_state.view(e, -1, b, 1, h_dim)
        h = ReluSignBackward.apply(h).view(e, -1, h_dim)  # = h.relu(); see ReluSignBackward
        # bias in the ReLU's pass: baddbmm would first copy the broadcast bias into its output (a pass at memory
        # speed; measured with the penalty change below: -3 to -6% per round in float32 under --compile)
        h = torch.bmm(h, w2).add_(b2).relu_()  # [E, G*B*R, H]
        # The H -> 1 layer as multiply-and-sum: on CPU, bmm's backward through a width-1 matrix is several times
        # slower than the two elementwise passes.
        return ((h * w3.transpose(1, 2)).sum(-1) + b3.view(e, 1)).view(e, g, b, r)


@dataclass
class Nets:
    actors: Actors
    actors_target: Actors
    critic: EnsembleCritic
    critic_target: EnsembleCritic
    critic_loss: Callable | None = None  # torch.compile(critic_loss) under --compile (None: eager)
    actor_loss: Callable | None = None  # torch.compile(actor_loss) under --compile (None: eager)


# ======================================================================================================
# ALGORITHM: ICQL-QS's individual targets (one agent's next action replaced at a time)
# ======================================================================================================


def td_target(batch: Batch, nets: Nets, args: Args) -> tuple[torch.Tensor, dict]:
    """Individual Bellman targets, Eq. (1): for every agent i, y_i = r + gamma (1 - d) min_j Q'_j(s', a'_{-i}, a~'_i)
    with a~'_i = clamp(pi'_i(o'_i) + N(0, 0.05^2), -1, 1) and a'_{-i} the dataset's next actions. Returns
    y [G=n, B, 1]: the shared TD loss averages the n per-agent losses (Eq. 2, Proposition 1)."""
    with torch.no_grad():
        b, n, _ = batch.actions.shape
        next_pi = nets.actors_target(batch.next_obs.transpose(0, 1)).transpose(0, 1)  # [B, n, d]
        next_pi = (next_pi + args.target_noise * torch.randn_like(next_pi)).clamp(-1.0, 1.0)
        mask = torch.eye(n, dtype=torch.bool, device=next_pi.device)[:, None, :]  # [n(i), 1, n]: agent i only
        joint = replace_actions(batch.next_actions[None], next_pi[None], mask)  # [n, B, n, d]  Eq. (1)
        # one BatchNorm group per agent i, as n separate reference calls
        q_next = nets.critic_target(batch.next_states[None], joint.flatten(2)[:, :, None])  # [E, n, B, 1]
        y = batch.rewards + args.gamma * (1.0 - batch.dones) * q_next.min(0).values  # [n, B, 1]
    return y, {"charts/target_spread": q_next.std(0).mean()}


# ======================================================================================================
# Conservative penalty and actor loss (identical in every algorithm file)
# ======================================================================================================


# Bytes per activation tensor of one chunk on CPU: 4 MB, i.e. 2^20 float32 or 2^21 bfloat16 elements. Measured on
# the 2-core CPU, SPaCQL cn ms per round: 712 / 569 / 525 / 517 / 608 at 2^17 / 2^18 / 2^19 / 2^20 float32 elements /
# unchunked (AMD machine). --bf16 is chunked too, with the H -> 1 layer reading the bf16 h2 directly (Intel machine,
# interleaved A/B against one chunk, 6 pairs each: --bf16 --compile SPaCQL cn 541 -> 449 ms, CFCQL cn 132 -> 122,
# every pair faster; eager --bf16 within noise). Its chunks hold the same bytes, twice the elements: the bf16
# penalty of one SPaCQL cn critic step alone 38.2 -> 35.1 ms compiled and 67.2 -> 59.9 eager against 2^20 elements
# (Intel machine, 15 interleaved repeats). The loop over chunks is over states, never over members, agents or k.
CPU_CHUNK_BYTES = 2**22


def relu_grad(grad: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """grad * (out > 0) in one pass: ReLU's own backward kernel, given the ReLU's output."""
    return torch.ops.aten.threshold_backward(grad, out, 0)


def penalty_chunk(a_c, h_state_c, log_density_c, w1a, w2, b2, w3, b3, scale: float, need_grad: bool):
    """One chunk of PenaltyLogSumExp: sum_{j,b,i} Z^j_{b,i} over the chunk's states and, if need_grad, the gradient
    of scale * that sum with respect to (h_state_c, w1a, w2, b2, w3, b3), by hand (backprop through the MLP).

    a_c [c*R, A] (R = n*M rows per state, in (i, m) order); h_state_c [E, c, H]; log_density_c [c, n, M]; w1a, w2,
    b2 in the compute dtype; w3 [E, H, 1], b3 [E, 1, 1] in float32. Under --compile it is traced into the compiled
    critic loss, which fuses its elementwise passes.
    """
    e, c, h_dim = h_state_c.shape
    _, n, m = log_density_c.shape
    r = n * m
    a_c = a_c.to(w1a.dtype)
    h1 = torch.matmul(a_c, w1a).view(e, c, r, h_dim).add_(h_state_c[:, :, None]).relu_()
    h1 = h1.view(e, c * r, h_dim)  # layer 1 [E, c*R, H]
    # Layer 2 and the H -> 1 layer take different forms in float32 and under --bf16 (all measured, ms per round):
    # - float32: layer 2's bias is added in the ReLU's pass, since baddbmm first copies the broadcast bias into its
    #   output (A/B under --compile, with the same change in EnsembleCritic.forward: CFCQL cn 114.4 -> 107.0, SPaCQL
    #   cn 378.5 -> 368.5; eager unchanged). The H -> 1 layer as Q^T = w3^T h2^T ([E, 1, c*R]; likewise its weight
    #   gradient dQ^T h2): MKL runs these ~4x and ~9x faster than the column forms h2 w3 and h2^T dQ, and the
    #   multiply-and-sum is slower here under --compile (537 vs 466 per SPaCQL cn round).
    # - bf16: baddbmm for layer 2 (with the bias in the ReLU's pass inductor fused the chunk's elementwise work into
    #   slower kernels: SPaCQL cn 275.8 -> 296.4, all 12 pairs slower). The H -> 1 layer as multiply-and-sum in
    #   float32: one pass that reads the bf16 h2, where the row-vector matmul needs a float32 copy of h2 written first
    #   (part of the gain measured at 2^20 elements per chunk).
    if w2.dtype == torch.float32:
        h2 = h2_32 = torch.bmm(h1, w2).add_(b2).relu_()  # layer 2 [E, c*R, H]
        x = torch.baddbmm(b3, w3.transpose(1, 2), h2.transpose(1, 2)).view(e, c, n, m)  # Q [E, c, n, M]
    else:
        h2 = torch.baddbmm(b2, h1, w2).relu_()
        h2_32 = h2.float()
        x = ((h2_32 * w3.transpose(1, 2)).sum(-1) + b3.view(e, 1)).view(e, c, n, m)
    x = x - log_density_c  # Q - log p, [E, c, n, M]
    z = torch.logsumexp(x, dim=-1)  # [E, c, n]
    if not need_grad:
        return z.sum(), None
    dq = torch.exp_(x - z[..., None]).mul_(scale).view(e, 1, c * r)  # dP/dQ: softmax_m / (B n)
    d_w3 = torch.bmm(dq, h2_32).transpose(1, 2)
    d_b3 = dq.sum(2, keepdim=True)
    # Layer 2's gradient dh2 = ReLU'(h2) * (dq^T w3^T) = g diag(w3) with g = ReLU'(h2) * dq^T (dq broadcast over H,
    # never materialised): w3 then scales the small results instead of a pass over [E, c*R, H] (measured 4-5%
    # faster per round): d_w2 = (h1^T g) diag(w3), d_b2 = (1^T g) diag(w3), dh1 = g (w2 diag(w3))^T.
    w3_row = w3.transpose(1, 2)  # [E, 1, H]
    g = relu_grad(dq.to(w2.dtype).transpose(1, 2).expand_as(h2), h2)  # [E, c*R, H]
    d_w2 = torch.bmm(h1.transpose(1, 2), g) * w3_row
    d_b2 = g.sum(1, keepdim=True) * w3_row
    dh1 = relu_grad(torch.bmm(g, (w2 * w3_row.to(w2.dtype)).transpose(1, 2)), h1)  # [E, c*R, H]
    d_w1a = torch.matmul(a_c.t(), dh1)
    d_state = dh1.view(e, c, r, h_dim).sum(2)  # [E, c, H]
    return z.sum(), (d_state, d_w1a, d_w2, d_b2, d_w3, d_b3)


class PenaltyLogSumExp(torch.autograd.Function):
    """sum_j mean_{b,i} Z^j_{b,i} for the critic's counterfactual rows, with its gradient, chunk by chunk.

    Z^j_{b,i} = log sum_m exp(Q_j(row b,i,m) - log p_{b,i,m}). The same numbers as nets.critic(...) followed by
    torch.logsumexp and .mean (the plain autograd version; tests/test_cfcql.py checks values and gradients
    against it), arranged for speed on CPU: the n*B*M counterfactual activations are ~80 MB per tensor at E = 10,
    so each of autograd's ~15 elementwise passes over them runs at memory speed. The sum over states splits
    into chunks of states whose gradients need nothing from other chunks, so every chunk runs its forward AND
    its backward (penalty_chunk) while its activations (a few MB) are in cache. The gradient is therefore formed
    in forward (whenever an input needs one) and backward only scales it by the incoming gradient. On CUDA: one
    chunk.
    Under --bf16 the matmuls run in bfloat16 as autocast would; Q, the softmax and the accumulated gradients
    stay in float32.
    """

    @staticmethod
    def forward(ctx, h_state, a_hat, w1a, w2, b2, w3, b3, log_density):
        # h_state [E, B, H] (first layer, state half + bias); a_hat [B*R, A] with R = n*M rows per state, in
        # (i, m) order; w1a [E, A, H]; w2 [E, H, H]; b2 [E, 1, H]; w3 [E, H, 1]; b3 [E, 1, 1]; log_density [B, n, M]
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[7]:
            raise ValueError("PenaltyLogSumExp: no gradient with respect to the actions or the densities")
        e, b, h_dim = h_state.shape
        _, n, m = log_density.shape
        r = n * m
        if a_hat.shape[0] != b * r:
            raise ValueError(f"a_hat has {a_hat.shape[0]} rows, expected B*n*M = {b * r}")
        device = h_state.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else torch.float32
        chunk = max(1, CPU_CHUNK_BYTES // (dtype.itemsize * e * r * h_dim)) if device == "cpu" else b
        need_grad = any(ctx.needs_input_grad)
        scale = 1.0 / (b * n)  # the mean over states b and agents i
        w1a_, w2_, b2_, h_state_ = (x.detach().to(dtype) for x in (w1a, w2, b2, h_state))
        w3, b3 = w3.detach(), b3.detach()
        grads = [torch.zeros_like(x, dtype=torch.float32) for x in (h_state, w1a, w2, b2, w3, b3)]
        total = torch.zeros((), device=h_state.device)
        with torch.autocast(device, enabled=False):
            for lo in range(0, b, chunk):
                hi = min(b, lo + chunk)
                z, g = penalty_chunk(
                    a_hat[lo * r : hi * r], h_state_[:, lo:hi], log_density[lo:hi], w1a_, w2_, b2_, w3, b3,
                    scale, need_grad,
                )  # fmt: skip
                total += z
                if need_grad:
                    grads[0][:, lo:hi] = g[0]  # d_state: each chunk owns its states
                    for acc, g_chunk in zip(grads[1:], g[1:], strict=True):
                        acc += g_chunk  # the weights' gradients sum over chunks
        ctx.save_for_backward(*grads)
        return total * scale

    @staticmethod
    def backward(ctx, grad_out):
        d_state, d_w1a, d_w2, d_b2, d_w3, d_b3 = (g * grad_out for g in ctx.saved_tensors)
        return d_state, None, d_w1a, d_w2, d_b2, d_w3, d_b3, None


def counterfactual_logsumexp(nets: Nets, states, slot_actions, other_actions, log_density) -> torch.Tensor:
    """sum_j mean_{b,i} Z^j_{b,i}, Z_i = log sum_m exp(Q_j(s, a_{-i}, u_im) - log p(u_im)) (ref 3.2, 3.3).

    states [B, S]; slot_actions [B, n, M, d]: agent i's sampled actions (slot i); other_actions [B, M, n, d]:
    the joint actions whose slot i is replaced; log_density [B, n, M] (soft_q correction; no -log M term, as
    the reference; temperature 1). All n*B*M counterfactual inputs form one BatchNorm group, as the reference.
    Returns a scalar: the sum over members j of the mean over states b and agents i (lambda_i = 1/n).
    """
    b, n, m, _ = slot_actions.shape
    mask = torch.eye(n, dtype=torch.bool, device=states.device)[:, None, :]  # [n(i), 1, n]
    joint = replace_actions(other_actions[:, None], slot_actions[:, :, :, None, :], mask)  # [B, n, M, n, d]
    critic = nets.critic
    h_state, a_hat, w1a = critic.first_layer(states[None], joint.reshape(1, b, n * m, -1))
    later_layers = (critic.w2, critic.b2, critic.w3, critic.b3)
    return PenaltyLogSumExp.apply(h_state, a_hat, w1a, *later_layers, log_density)


def cql_penalty(batch: Batch, nets: Nets, q_data: torch.Tensor, args: Args) -> torch.Tensor:
    """CFCQL's counterfactual conservative term, summed over members (ref 3.2 MPE, 3.3 HalfCheetah):
    sum_j mean_b [ sum_i lambda_i Z^j_{i,b} - Q_j(s_b, a_b) ], lambda_i = 1/n (tau = 0, the paper's setting)."""
    b, n, d = batch.actions.shape
    m = args.num_cql_samples
    uniform = torch.rand(b, n, m, d, device=q_data.device) * 2.0 - 1.0  # U(-1, 1)^d for agent i only
    uniform_logp = torch.full((b, n, m), d * math.log(0.5), device=q_data.device)
    data_actions = batch.actions[:, None].expand(b, m, n, d)  # others keep the exact data actions (ref B5)
    if get_task(args.task).family == "mpe":  # uniform samples only (ref 3.2)
        slot, others, logp = uniform, data_actions, uniform_logp
    else:  # random + current-policy + next-policy samples, each with its own density (ref 3.3, D2)
        with (
            torch.no_grad()
        ):  # training-mode forwards: they update the actors' BatchNorm averages, as the reference
            pi = nets.actors(batch.obs.transpose(0, 1)).transpose(0, 1)[:, :, None]  # [B, n, 1, d]
            next_pi = nets.actors(batch.next_obs.transpose(0, 1)).transpose(0, 1)[:, :, None]
        eps_pi = args.policy_sample_noise * torch.randn(b, n, m, d, device=q_data.device)
        eps_next = args.policy_sample_noise * torch.randn(b, n, m, d, device=q_data.device)

        def gauss_logp(eps):  # log N(eps; 0, sigma^2 I) of the unclamped noise, summed over action dims
            s = args.policy_sample_noise
            return (-0.5 * (eps / s) ** 2 - math.log(s) - 0.5 * math.log(2 * math.pi)).sum(-1)

        slot = torch.cat([uniform, (pi + eps_pi).clamp(-1, 1), (next_pi + eps_next).clamp(-1, 1)], dim=2)
        next_data = batch.next_actions[:, None].expand(b, m, n, d)  # at the CURRENT state s (ref B4)
        others = torch.cat([data_actions, data_actions, next_data], dim=1)  # [B, 3M, n, d]
        logp = torch.cat([uniform_logp, gauss_logp(eps_pi), gauss_logp(eps_next)], dim=2)
    # --bf16: these counterfactual passes (87-96% of a round's FLOPs) in bfloat16; Q on the data, the TD target in fp32
    with torch.autocast(q_data.device.type, dtype=torch.bfloat16, enabled=args.bf16):
        z = counterfactual_logsumexp(nets, batch.states, slot, others, logp)  # sum_j mean_{b,i} Z^j_{b,i}
    return z - q_data.mean(dim=(1, 2, 3)).sum()


def actor_loss(batch: Batch, nets: Nets, args: Args) -> torch.Tensor:
    """Counterfactual policy loss (ref 3.6): -mean_{i,b} Q_1(s, a_{-i}, pi_i(o_i)) + l2 * sum_i mean(pi_i^2)."""
    b, n, d = batch.actions.shape
    pi = nets.actors(batch.obs.transpose(0, 1))  # [n, B, d]
    mask = torch.eye(n, dtype=torch.bool, device=pi.device)  # [n(i), n]
    joint = replace_actions(
        batch.actions[:, None], pi.transpose(0, 1)[:, :, None, :], mask
    )  # [B, n(i), n, d]
    q1 = nets.critic(batch.states[None], joint.reshape(1, b, n, n * d), members=slice(0, 1))  # [1, 1, B, n]
    return -q1.mean() + args.actor_l2 * pi.pow(2).mean(dim=(1, 2)).sum()


# ======================================================================================================
# Update round (identical in every algorithm file)
# ======================================================================================================


def critic_loss(batch: Batch, nets: Nets, args: Args) -> tuple[torch.Tensor, dict]:
    """Sum over members of the mean TD error plus alpha times the conservative penalty, and diagnostics."""
    q_data = nets.critic(batch.states[None], batch.actions.flatten(1)[None, :, None])  # [E, 1, B, 1]
    y, info = td_target(batch, nets, args)  # [G, B, 1]
    td_loss = (q_data - y).pow(2).mean(dim=(1, 2, 3)).sum()  # sum over members of the mean TD error
    penalty = cql_penalty(batch, nets, q_data, args)
    info |= {
        "losses/td": td_loss.detach(),
        "losses/cql_penalty": penalty.detach(),
        "charts/q_data": q_data.mean().detach(),
    }
    return td_loss + args.alpha * penalty, info


def critic_step(batch: Batch, nets: Nets, critic_opt, args: Args) -> dict:
    loss, info = (nets.critic_loss or critic_loss)(batch, nets, args)
    critic_opt.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(nets.critic.parameters(), args.grad_clip)
    critic_opt.step()
    return info


def actor_step(batch: Batch, nets: Nets, actor_opt, args: Args) -> dict:
    loss = (nets.actor_loss or actor_loss)(batch, nets, args)
    params = list(nets.actors.parameters())
    for p, g in zip(params, torch.autograd.grad(loss, params), strict=True):  # no gradient into the critic
        p.grad = g
    clip_grad_norm_per_agent(params, args.grad_clip)
    actor_opt.step()
    return {"losses/actor": loss.detach()}


def update_round(data, nets: Nets, critic_opt, actor_opt, args: Args, generator: torch.Generator) -> dict:
    """One reference round (ref 1.1): critic step + actor step on one minibatch, critic_steps - 1 critic-only
    steps on fresh minibatches, then one soft update of every target network."""
    batch = sample_batch(data, args.batch_size, generator)
    info = critic_step(batch, nets, critic_opt, args)
    info |= actor_step(batch, nets, actor_opt, args)
    for _ in range(args.critic_steps - 1):
        critic_step(sample_batch(data, args.batch_size, generator), nets, critic_opt, args)
    soft_update(nets.critic_target, nets.critic, args.tau)
    soft_update(nets.actors_target, nets.actors, args.tau)
    return info


def make_nets(spec, args: Args, device: torch.device) -> Nets:
    n, obs_dim, act_dim = spec.n_agents, spec.obs_dim, spec.act_dim
    actors = Actors(n, obs_dim, act_dim, args.hidden).to(device)
    critic = EnsembleCritic(spec.state_dim, n * act_dim, args.hidden, args.num_critics).to(device)
    actors_target = Actors(n, obs_dim, act_dim, args.hidden).to(device)
    critic_target = EnsembleCritic(spec.state_dim, n * act_dim, args.hidden, args.num_critics).to(device)
    actors_target.load_state_dict(actors.state_dict())
    critic_target.load_state_dict(critic.state_dict())
    return Nets(actors, actors_target, critic, critic_target)


def compile_losses(nets: Nets) -> None:
    """--compile (LeanRL's approach): torch.compile the critic and actor losses, each one graph (forward, and its
    backward through autograd) whose elementwise passes inductor fuses. Random numbers come from the eager
    generators (inductor's fallback_random), so that the flag changes speed only: same samples, same results to
    float rounding (tested). The networks themselves stay eager modules (checkpoints unchanged)."""
    import torch._inductor.config as inductor_config  # only under --compile: a heavy import

    inductor_config.fallback_random = True
    nets.critic_loss = torch.compile(critic_loss)
    nets.actor_loss = torch.compile(actor_loss)


def run_evaluation(nets: Nets, env, args: Args, device) -> tuple[float, float]:
    nets.actors.eval()  # running BatchNorm statistics, deterministic actions
    returns = evaluate(nets.actors, env, seed=args.seed + 100, device=device)
    nets.actors.train()
    mean_return = float(returns.mean())
    return mean_return, normalized_score(args.task, mean_return)


# ======================================================================================================
# main
# ======================================================================================================


def main(args: Args) -> dict:
    args = resolve_args(args)
    spec = get_task(args.task)
    seed_everything(args.seed)
    keep_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.cuda and torch.cuda.is_available() else "cpu")
    generator = torch.Generator(device=device).manual_seed(args.seed)  # minibatch indices only (D1)
    run_name = f"{args.exp_name}__{args.task}__{args.dataset}__{args.seed}__{int(time.time())}"
    run_path = os.path.join(args.run_dir, run_name)
    writer = SummaryWriter(run_path)
    writer.add_text(
        "hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in asdict(args).items())
    )

    nets = make_nets(spec, args, device)
    if args.compile:
        compile_losses(nets)
    critic_opt = torch.optim.Adam(nets.critic.parameters(), lr=args.lr)
    actor_opt = torch.optim.Adam(nets.actors.parameters(), lr=args.lr)  # elementwise: = one Adam per agent
    env = make_vec_env(args.task, args.num_eval_episodes)

    if args.load_model:  # evaluate a saved run
        ckpt = torch.load(args.load_model, map_location=device, weights_only=False)
        nets.actors.load_state_dict(ckpt["actors"])
        mean_return, score = run_evaluation(nets, env, args, device)
        print(f"{args.load_model}: return {mean_return:.2f}, normalized score {score:.2f}")
        return {"return": mean_return, "normalized_score": score}

    path = ensure_dataset(args.task, args.dataset, args.dataset_seed, args.data_dir)
    data = load_dataset(path, task=args.task, dataset=args.dataset, device=device)

    start, history = time.time(), []
    pending: list[dict] = []
    bar = tqdm(range(args.num_updates), desc=run_name, disable=not sys.stderr.isatty(), smoothing=0.05)
    for round_ in bar:
        if round_ % args.eval_every == 0:
            mean_return, score = run_evaluation(nets, env, args, device)
            history.append((round_, mean_return, score))
            writer.add_scalar("eval/return", mean_return, round_)
            writer.add_scalar("eval/normalized_score", score, round_)
            bar.set_postfix(score=f"{score:.1f}")
            tqdm.write(
                f"round {round_}/{args.num_updates}: return {mean_return:.2f}, normalized score {score:.1f}"
            )
        pending.append(update_round(data, nets, critic_opt, actor_opt, args, generator))
        if (round_ + 1) % args.log_every == 0:  # one host sync per log window, not per round
            for k in pending[0]:
                mean = torch.stack([p[k] for p in pending]).float().mean(0)  # scalar, or [n] per-k values
                for tag, v in zip(
                    [k] if mean.dim() == 0 else [f"{k}_{j + 1}" for j in range(len(mean))],
                    mean.flatten().tolist(),
                    strict=True,
                ):
                    if not math.isfinite(v):
                        raise FloatingPointError(f"{tag} became {v} at round {round_}; training diverged")
                    writer.add_scalar(tag, v, round_)
            writer.add_scalar("charts/rounds_per_s", (round_ + 1) / (time.time() - start), round_)
            pending.clear()

    mean_return, score = run_evaluation(nets, env, args, device)  # the headline number (D4)
    history.append((args.num_updates, mean_return, score))
    writer.add_scalar("eval/return", mean_return, args.num_updates)
    writer.add_scalar("eval/normalized_score", score, args.num_updates)
    wall = time.time() - start
    result = {
        "algo": args.exp_name,
        "task": args.task,
        "dataset": args.dataset,
        "seed": args.seed,
        "final_return": mean_return,
        "final_normalized_score": score,
        "wall_time_s": wall,
        "device": str(device),
        "eval_history": history,
        "args": asdict(args),
    }
    tmp = os.path.join(run_path, "final.json.tmp")
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, os.path.join(run_path, "final.json"))
    if args.save_model:
        state = {
            "actors": nets.actors.state_dict(),
            "actors_target": nets.actors_target.state_dict(),
            "critic": nets.critic.state_dict(),
            "critic_target": nets.critic_target.state_dict(),
            "critic_opt": critic_opt.state_dict(),
            "actor_opt": actor_opt.state_dict(),
            "round": args.num_updates,
            "args": asdict(args),
        }
        torch.save(state, os.path.join(run_path, "model.pt.tmp"))
        os.replace(os.path.join(run_path, "model.pt.tmp"), os.path.join(run_path, "model.pt"))
    writer.close()
    print(
        f"final: return {mean_return:.2f}, normalized score {score:.2f} ({wall:.0f} s) -> {run_path}/final.json"
    )
    return result | {"run_path": run_path}


if __name__ == "__main__":
    main(tyro.cli(Args))
