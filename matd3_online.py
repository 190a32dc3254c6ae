"""Online MATD3: trains the behaviour policies that generate the offline datasets.

What it implements
    OMAR's data protocol (Pan et al., ICML 2022, arXiv 2111.11188, Sec. 5.1): the datasets are rollouts of
    MATD3 agents. This file is that MATD3: TD3 (Fujimoto et al., ICML 2018: twin critics + min in the target,
    target policy smoothing, delayed actor and target updates) with decentralised deterministic actors
    pi_i(o_i), one per agent, on the agent's own observation (so the behaviour policy is factorised given the
    state, SPaCQL's Assumption 1) and one centralised twin critic Q(s, a_1, ..., a_n) (MADDPG-style CTDE).
    Predator-Prey / World: the 3 predators learn against the fixed pretrained prey inside the env.

Reference
    The TD3 update has the structure of CleanRL's cleanrl/td3_continuous_action.py (github.com/vwxyzjn/cleanrl;
    written from the algorithm, not compared line by line with a pinned commit). OMAR/CFCQL's MATD3 is described
    in shared/reference/cfcql-reference.md sections 1-4; that code is the offline learner, this is an online
    trainer, so only the network family (per-agent tanh MLP actors, twin centralised critic) is shared.

How it differs from a textbook single-env TD3 (all deliberate, for speed on a CPU and for the datasets)
    1. E lockstep episodes ("a round") are collected with a frozen policy, then `utd * E * T` updates run
       (as in Fujimoto's original TD3 code, which trained at episode ends). Hence the policy that collected
       every episode is exactly one of the snapshots, and medium-replay can be rebuilt from snapshots.
    2. The critic learns the evaluation reward (env.eval_reward: mean over agents for cn, predator 0 for
       pp/world, the team reward for halfcheetah), i.e. a fully cooperative team objective.
    3. MPE episodes are truncated at 25 steps and bootstrapped through (never terminal), as in OMAR.
    4. During the warm-up (uniform-random episodes) only the critic is trained; the actors start after it.
       Without this the actors saturate on the untrained critic's gradient and cn's returns sat at ~65 (below
       random's 160) for ~1500 episodes, which also dragged medium-replay's mean return below random's.
    5. The actors' output layer starts at U(-3e-3, 3e-3) (DDPG's init; OMAR's policy nets do it for the weights).

Outputs (runs/<run_name>/)
    curve.csv        eval returns over time (deterministic and with exploration noise), wall-clock, env steps
    snapshots.npz    actor snapshots [K, n, ...] float32 + `schedule` (json): which snapshot collected how
                     many episodes, warm-up episodes, exploration noise -> enough to rebuild the replay buffer
    events.*         TensorBoard (eval/, charts/, losses/)
    scripts/export_behaviour.py turns a run into the shipped common/behaviour/<task>_<type>.npz files.

Usage (the runs behind the shipped behaviour files, see DATASETS.md)
    python matd3_online.py --task cn --seed 0 --run-name cn_expert      # expert; medium = one of its snapshots
    python matd3_online.py --task cn --seed 1 --num-envs 64 --eval-every 1 --stop-return 273.4 \
        --warmup-episodes 1600 --total-steps 400000 --run-name cn_mr_w1600   # medium-replay: stop at OMAR's medium
    python matd3_online.py --task halfcheetah --seed 0 --run-name halfcheetah_expert
    (pp / world / halfcheetah medium-replay use other schedules: --warmup-utd, --utd, --exploration-noise,
    --stop-on; each run's command is in DATASETS.md)
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro

from common.envs import make_vec_env
from common.tasks import get_task


# ============================================================================================================
# Args
# ============================================================================================================
@dataclass
class Args:
    task: str = "cn"
    """cn | pp | world | halfcheetah (aliases accepted)"""
    seed: int = 0
    """seeds python, numpy (noise, warm-up actions, env seeds) and torch (init, minibatches)"""
    total_steps: int | None = None
    """env transitions to collect, summed over the E parallel episodes (task default if None)"""
    num_envs: int | None = None
    """E: lockstep episodes per round (task default if None)"""
    warmup_episodes: int | None = None
    """episodes of uniform-random actions before the actors act; rounded up to whole rounds"""
    utd: float | None = None
    """updates per collected transition (update-to-data ratio); each round runs utd * E * T updates"""
    warmup_utd: float | None = None
    """update-to-data ratio of the critic-only warm-up rounds (the last warm-up round starts the actors and
    runs --utd); None = --utd"""
    batch_size: int | None = None
    """minibatch size B"""
    actor_hidden: int | None = None
    """width of the two hidden layers of each actor (this is the shipped behaviour network)"""
    actor_out_init: float | None = 3e-3
    """actor output layer (weights and biases) init U(-x, x), as DDPG (OMAR's policies: weights only), so the
    untrained actors output ~0 (agents stand still) instead of a random constant push; None = nn.Linear's"""
    critic_hidden: int | None = None
    """width of the two hidden layers of each critic head"""
    actor_lr: float | None = None
    """Adam learning rate of the actors"""
    critic_lr: float | None = None
    """Adam learning rate of the twin critic"""
    gamma: float | None = None
    """discount"""
    tau: float | None = None
    """Polyak coefficient of the target networks"""
    exploration_noise: float = 0.1
    """std of the Gaussian noise added to the actions during collection (also the datasets' noise)"""
    policy_noise: float = 0.2
    """TD3 target policy smoothing: std of the noise on the target actions"""
    noise_clip: float = 0.5
    """TD3 target policy smoothing: clip of that noise"""
    policy_delay: int = 2
    """TD3: one actor + target update every `policy_delay` critic updates"""
    buffer_size: int = 1_000_000
    """replay capacity in transitions"""
    eval_every: int | None = None
    """rounds between evaluations; a snapshot of the actors is taken at every evaluation"""
    eval_episodes: int | None = None
    """episodes per evaluation (fixed seeds); run once deterministic and once with exploration noise"""
    stop_return: float | None = None
    """stop as soon as the evaluation return (see --stop-on) reaches this (medium-replay runs)"""
    stop_on: Literal["noisy", "deterministic"] = "noisy"
    """which evaluation --stop-return reads: "noisy" (with the exploration noise, the data's behaviour) or
    "deterministic" (the actors' own output, as offline learners are evaluated)"""
    run_name: str | None = None
    """sub-directory of --out-dir (default <task>__matd3__<seed>__<unix time>)"""
    out_dir: str = "runs"
    """where runs are written"""
    threads: int = 1
    """torch CPU threads (keep 1 on shared machines)"""


# Defaults per task family, used for every Args field left at None. MPE: small nets, cheap updates, many
# cheap env steps; HalfCheetah: the usual TD3 MuJoCo settings (256-wide critics, utd 1, gamma 0.99, lr 3e-4).
TASK_DEFAULTS = {
    "mpe": dict(
        total_steps=600_000,
        num_envs=32,
        warmup_episodes=320,
        utd=0.25,
        batch_size=256,
        actor_hidden=64,
        critic_hidden=128,
        actor_lr=1e-3,
        critic_lr=1e-3,
        gamma=0.95,
        tau=0.01,
        eval_every=10,
        eval_episodes=200,
    ),
    "mamujoco": dict(
        total_steps=1_000_000,
        num_envs=4,
        warmup_episodes=8,
        utd=1.0,
        # TD3's original batch (100) order: on one busy CPU core an update with B = 256 cost ~2.4x one with 128
        batch_size=128,
        # 128-wide actors (TD3's critics stay 256): a float16 snapshot is 71 kB instead of 273 kB, so the
        # ~100 per-round snapshots of a medium-replay prefix fit the size budget of common/behaviour/
        actor_hidden=128,
        critic_hidden=256,
        actor_lr=3e-4,
        critic_lr=3e-4,
        gamma=0.99,
        tau=0.005,
        # a snapshot every round (4 episodes) costs ~1 s of evaluation against ~30 s of updates
        eval_every=1,
        eval_episodes=10,
    ),
}


def resolve_args(args: Args) -> Args:
    """Fill every None field from TASK_DEFAULTS of the task's family."""
    spec = get_task(args.task)
    args.task = spec.name
    for key, value in TASK_DEFAULTS[spec.family].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


# ============================================================================================================
# Networks
# ============================================================================================================
class StackedMLP(nn.Module):
    """k independent MLPs (in -> H -> H -> out, ReLU) evaluated as one batched matmul per layer.

    The n actors are one StackedMLP with k = n (agent i reads only its own o_i); the twin critic is another
    with k = 2 fed the same input. Weights are [k, in, out], biases [k, 1, out]; this is also the layout of
    the shipped behaviour files (w0, b0, w1, b1, w2, b2), which common/build.py runs without this module.
    """

    def __init__(self, k: int, sizes: list[int]):
        super().__init__()
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
            bound = 1.0 / math.sqrt(fan_in)  # nn.Linear's default init, per member
            self.weights.append(nn.Parameter(torch.empty(k, fan_in, fan_out).uniform_(-bound, bound)))
            self.biases.append(nn.Parameter(torch.empty(k, 1, fan_out).uniform_(-bound, bound)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [k, B, in] -> [k, B, out]
        last = len(self.weights) - 1
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            x = torch.baddbmm(b, x, w)
            if i < last:
                x = F.relu(x)
        return x


class Actors(nn.Module):
    """pi_i(o_i) -> a_i in [-1, 1] for every agent i: decentralised, deterministic, tanh-squashed."""

    def __init__(self, n: int, obs_dim: int, act_dim: int, hidden: int, out_init: float | None = None):
        super().__init__()
        self.net = StackedMLP(n, [obs_dim, hidden, hidden, act_dim])
        if out_init is not None:
            nn.init.uniform_(self.net.weights[-1], -out_init, out_init)
            nn.init.uniform_(self.net.biases[-1], -out_init, out_init)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:  # obs [B, n, obs_dim] -> [B, n, act_dim]
        return torch.tanh(self.net(obs.transpose(0, 1))).transpose(0, 1)

    def export(self) -> dict[str, np.ndarray]:
        """Plain float32 arrays w0, b0, ... with w [n, in, out], b [n, out] (no pickle needed to load)."""
        out = {}
        for i, (w, b) in enumerate(zip(self.net.weights, self.net.biases)):
            out[f"w{i}"] = w.detach().cpu().numpy().astype(np.float32)
            out[f"b{i}"] = b.detach().cpu().numpy()[:, 0].astype(np.float32)
        return out


class TwinCritic(nn.Module):
    """Centralised Q_1, Q_2(s, a_1, ..., a_n): two heads on the same input, one batched forward."""

    def __init__(self, state_dim: int, joint_act_dim: int, hidden: int):
        super().__init__()
        self.net = StackedMLP(2, [state_dim + joint_act_dim, hidden, hidden, 1])

    def forward(self, state: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        x = torch.cat([state, actions.flatten(1)], dim=1)  # [B, state_dim + n * act_dim]
        return self.net(x.expand(2, *x.shape))[..., 0]  # [2, B]


# ============================================================================================================
# Replay buffer (time-ordered, episode after episode, like the datasets)
# ============================================================================================================
class ReplayBuffer:
    def __init__(self, capacity: int, spec, device: torch.device):
        n, o, a, s = spec.n_agents, spec.obs_dim, spec.act_dim, spec.state_dim
        self.capacity, self.size, self.ptr, self.device = capacity, 0, 0, device
        self.obs = torch.zeros(capacity, n, o)
        self.states = torch.zeros(capacity, s)
        self.actions = torch.zeros(capacity, n, a)
        self.rewards = torch.zeros(capacity)
        self.next_obs = torch.zeros(capacity, n, o)
        self.next_states = torch.zeros(capacity, s)
        self.dones = torch.zeros(capacity)

    def add_round(self, **arrays: np.ndarray):
        """Add one round: arrays [T, E, ...] are stored episode after episode ([E * T, ...])."""
        rows = None
        for key, value in arrays.items():
            value = torch.as_tensor(np.swapaxes(value, 0, 1)).reshape(-1, *value.shape[2:])
            rows = len(value)
            idx = (self.ptr + torch.arange(rows)) % self.capacity
            getattr(self, key)[idx] = value.float()
        self.ptr = (self.ptr + rows) % self.capacity
        self.size = min(self.size + rows, self.capacity)

    def sample(self, batch_size: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        idx = torch.randint(0, self.size, (batch_size,), generator=generator)
        keys = ("obs", "states", "actions", "rewards", "next_obs", "next_states", "dones")
        return {k: getattr(self, k)[idx].to(self.device) for k in keys}


# ============================================================================================================
# ALGORITHM: TD3 with decentralised actors and a centralised twin critic
# ============================================================================================================
def critic_loss_fn(batch, actors_target, critic, critic_target, args: Args) -> torch.Tensor:
    with torch.no_grad():
        # TD3's target policy smoothing (Fujimoto et al. 2018): clipped noise on each agent's target action
        next_actions = actors_target(batch["next_obs"])  # [B, n, act_dim]
        noise = (torch.randn_like(next_actions) * args.policy_noise).clamp(-args.noise_clip, args.noise_clip)
        next_actions = (next_actions + noise).clamp(-1.0, 1.0)
        # clipped double Q: min over the two target heads
        next_q = critic_target(batch["next_states"], next_actions).min(dim=0).values  # [B]
        target = batch["rewards"] + args.gamma * (1.0 - batch["dones"]) * next_q  # [B]
    q = critic(batch["states"], batch["actions"])  # [2, B]
    assert q.shape == (2, target.shape[0])
    return F.mse_loss(q, target.expand_as(q), reduction="none").mean(dim=1).sum()


def actor_loss_fn(batch, actors, critic) -> torch.Tensor:
    # deterministic policy gradient through head 1 with every agent's action from its current actor (MADDPG
    # with a shared centralised critic; each actor only receives the gradient of its own action slot)
    return -critic(batch["states"], actors(batch["obs"]))[0].mean()


def soft_update(target: nn.Module, source: nn.Module, tau: float):
    with torch.no_grad():
        for tp, sp in zip(target.parameters(), source.parameters()):
            tp.lerp_(sp, tau)


# ============================================================================================================
# Rollouts (numpy env, torch actors)
# ============================================================================================================
def act(actors: Actors, obs: np.ndarray, noise_std: float, rng: np.random.Generator) -> np.ndarray:
    """Behaviour action: clip(pi(o) + N(0, noise_std^2), -1, 1), per agent and dimension. obs [E, n, o]."""
    with torch.no_grad():
        actions = actors(torch.as_tensor(obs)).numpy()
    if noise_std > 0:
        actions = actions + noise_std * rng.standard_normal(actions.shape).astype(np.float32)
    return np.clip(actions, -1.0, 1.0)


def evaluate(env, actors: Actors, noise_std: float, seed: int, rng: np.random.Generator) -> np.ndarray:
    """Episode returns [E] of env.num_envs episodes from the fixed start states of `seed`."""
    obs, _ = env.reset(seed=seed)
    returns = np.zeros(env.num_envs)
    for _ in range(env.episode_length):
        obs, _, rewards, _, _ = env.step(act(actors, obs, noise_std, rng))
        returns += env.eval_reward(rewards)
    return returns


def round_seed(seed: int, round_idx: int) -> int:
    """Env seed of training round `round_idx` (distinct from the evaluation seeds and from the builder's)."""
    return int(np.random.SeedSequence([7, seed, round_idx]).generate_state(1)[0])


EVAL_SEED = 12345  # same evaluation start states at every evaluation and in every run


# ============================================================================================================
# main
# ============================================================================================================
def main(args: Args):
    args = resolve_args(args)
    spec = get_task(args.task)
    run_name = args.run_name or f"{spec.name}__matd3__{args.seed}__{int(time.time())}"
    run_dir = os.path.join(args.out_dir, run_name)
    os.makedirs(run_dir, exist_ok=True)
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(run_dir)
    writer.add_text(
        "hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in asdict(args).items())
    )

    # ---- seeding: once, here -------------------------------------------------------------------------------
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)  # exploration noise and warm-up actions
    sample_gen = torch.Generator().manual_seed(args.seed)  # minibatch indices
    device = torch.device("cpu")  # small nets and batches: a GPU would not help here

    E, T, n = args.num_envs, spec.episode_length, spec.n_agents
    env = make_vec_env(spec.name, E)
    eval_env = make_vec_env(spec.name, args.eval_episodes)
    num_rounds = math.ceil(args.total_steps / (E * T))
    warmup_rounds = math.ceil(args.warmup_episodes / E)
    updates_per_round = max(1, round(args.utd * E * T))
    warmup_utd = args.utd if args.warmup_utd is None else args.warmup_utd
    warmup_updates_per_round = max(1, round(warmup_utd * E * T))

    actors = Actors(n, spec.obs_dim, spec.act_dim, args.actor_hidden, args.actor_out_init).to(device)
    critic = TwinCritic(spec.state_dim, n * spec.act_dim, args.critic_hidden).to(device)
    actors_target = Actors(n, spec.obs_dim, spec.act_dim, args.actor_hidden).to(device)
    critic_target = TwinCritic(spec.state_dim, n * spec.act_dim, args.critic_hidden).to(device)
    actors_target.load_state_dict(actors.state_dict())
    critic_target.load_state_dict(critic.state_dict())
    # one Adam over all actors is the same as one per agent: the parameters and their moments are disjoint
    actor_opt = torch.optim.Adam(actors.parameters(), lr=args.actor_lr)
    critic_opt = torch.optim.Adam(critic.parameters(), lr=args.critic_lr)
    buffer = ReplayBuffer(args.buffer_size, spec, device)

    # ---- snapshot bookkeeping: snapshot k = the actors that collect the rounds until snapshot k+1 ---------
    snapshots: list[dict[str, np.ndarray]] = []
    snap_rounds: list[int] = []
    snap_info: list[dict] = []

    def save_snapshots(end_round: int, stopped: bool):
        # episodes each snapshot collected = rounds it was in charge of * E (the last one up to end_round)
        bounds = snap_rounds[1:] + [end_round]
        schedule = dict(
            task=spec.name,
            seed=args.seed,
            num_envs=E,
            episode_length=T,
            warmup_episodes=warmup_rounds * E,
            exploration_noise=args.exploration_noise,
            episodes_per_snapshot=[(b - r) * E for r, b in zip(snap_rounds, bounds)],
            snapshot_rounds=snap_rounds,
            total_episodes=end_round * E,
            stopped_by_stop_return=stopped,
            snapshots=snap_info,
            args=asdict(args),
        )
        arrays = {k: np.stack([s[k] for s in snapshots]) for k in snapshots[0]}  # [K, n, ...]
        tmp = os.path.join(run_dir, "snapshots.tmp.npz")
        np.savez(tmp, schedule=np.array(json.dumps(schedule)), **arrays)
        os.replace(tmp, os.path.join(run_dir, "snapshots.npz"))

    columns = (
        "round env_steps episodes updates wall_s eval_return eval_return_std noisy_return noisy_return_std"
    )
    curve_file = open(os.path.join(run_dir, "curve.csv"), "w", newline="")
    curve = csv.DictWriter(curve_file, fieldnames=columns.split() + ["train_return"])
    curve.writeheader()

    # ---- training loop ---------------------------------------------------------------------------------------
    start = time.time()
    num_updates, train_returns, stopped = 0, [], False
    losses = {}
    r = 0
    for r in range(num_rounds + 1):
        # evaluation + snapshot of the policy that will collect the next rounds
        is_last = r == num_rounds
        if r >= warmup_rounds and ((r - warmup_rounds) % args.eval_every == 0 or is_last):
            det = evaluate(eval_env, actors, 0.0, EVAL_SEED, rng)
            noisy = evaluate(eval_env, actors, args.exploration_noise, EVAL_SEED, rng)
            snapshots.append(actors.export())
            snap_rounds.append(r)
            train_ret = float(np.mean(train_returns)) if train_returns else float("nan")
            row = dict(
                round=r,
                env_steps=r * E * T,
                episodes=r * E,
                updates=num_updates,
                wall_s=round(time.time() - start, 1),
                eval_return=float(det.mean()),
                eval_return_std=float(det.std()),
                noisy_return=float(noisy.mean()),
                noisy_return_std=float(noisy.std()),
                train_return=train_ret,
            )
            snap_info.append(row)
            curve.writerow(row)
            curve_file.flush()
            tags = dict(
                eval_return="eval/return",
                noisy_return="eval/noisy_return",
                train_return="charts/train_return",
            )
            for key, tag in tags.items():
                writer.add_scalar(tag, row[key], r * E * T)
            for k, v in losses.items():
                writer.add_scalar(f"losses/{k}", v.item(), r * E * T)
            print(
                f"round {r}/{num_rounds} "
                + " ".join(
                    f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}"
                    for k, v in row.items()
                    if k != "round"
                )
            )
            train_returns = []
            stop_eval = noisy if args.stop_on == "noisy" else det
            if args.stop_return is not None and stop_eval.mean() >= args.stop_return:
                stopped = True
            save_snapshots(r, stopped)
            if stopped:
                break
        if is_last:
            break

        # collect one round: E lockstep episodes with a frozen policy (uniform random during warm-up)
        obs, state = env.reset(seed=round_seed(args.seed, r))
        keys = ("obs", "states", "actions", "rewards", "next_obs", "next_states", "dones")
        traj = {k: [] for k in keys}
        ep_return = np.zeros(E)
        for _ in range(T):
            if r < warmup_rounds:
                actions = rng.uniform(-1.0, 1.0, (E, n, spec.act_dim)).astype(np.float32)
            else:
                actions = act(actors, obs, args.exploration_noise, rng)
            next_obs, next_state, rewards, terminated, _ = env.step(actions)
            team_reward = env.eval_reward(rewards)
            for k, v in zip(keys, (obs, state, actions, team_reward, next_obs, next_state, terminated)):
                traj[k].append(v)
            ep_return += team_reward
            obs, state = next_obs, next_state
        buffer.add_round(**{k: np.stack(v) for k, v in traj.items()})
        train_returns.extend(ep_return.tolist())

        # updates (TD3): every step a critic update, every policy_delay-th an actor and target update.
        # During the warm-up only the critic learns (on the random data, bootstrapping from the ~0 output of
        # the untrained target actors): an actor that follows the gradient of an untrained critic saturates
        # its tanh in a few hundred steps and then takes thousands of episodes to recover.
        train_actor = r + 1 >= warmup_rounds
        for _ in range(updates_per_round if train_actor else warmup_updates_per_round):
            batch = buffer.sample(args.batch_size, sample_gen)
            critic_loss = critic_loss_fn(batch, actors_target, critic, critic_target, args)
            critic_opt.zero_grad()
            critic_loss.backward()
            critic_opt.step()
            num_updates += 1
            if num_updates % args.policy_delay == 0:
                if train_actor:
                    critic.requires_grad_(False)  # the actor step needs dQ/da only, not the critic's grads
                    actor_loss = actor_loss_fn(batch, actors, critic)
                    actor_opt.zero_grad()
                    actor_loss.backward()
                    actor_opt.step()
                    critic.requires_grad_(True)
                    soft_update(actors_target, actors, args.tau)
                    losses["actor"] = actor_loss.detach()
                soft_update(critic_target, critic, args.tau)
                losses["critic"] = critic_loss.detach()

    curve_file.close()
    writer.close()
    print(f"done: {r * E * T} env steps, {num_updates} updates, {time.time() - start:.0f}s -> {run_dir}")
    return run_dir


if __name__ == "__main__":
    main(tyro.cli(Args))
