"""Throughput of common/mamujoco.py's HalfCheetahVecEnv, alone and with a policy in the loop.

Run: python benchmarks/bench_mamujoco.py [--episodes-random 20]

Prints lines of the form `RESULT env=halfcheetah key=value`:
- E=10 / E=64 steps_per_s: env steps (one agent-team transition each) per second, uniform random actions;
- eval10_s: a 10-episode evaluation (E=10 lockstep, 1000 steps) of a 2-agent 256-256 tanh MLP policy;
- E=64 transitions_per_s: dataset-building speed, policy forward included (1M transitions need >= 3,500/s
  to take <= 5 minutes);
- random_return: mean and std of the episode return under uniform random actions.
Timings follow a short warm-up.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common.mamujoco import HalfCheetahVecEnv  # noqa: E402


class AgentsMLP(nn.Module):
    """n independent actors evaluated as one batched op: obs [E, n, obs_dim] -> actions [E, n, act_dim]."""

    def __init__(self, n: int, obs_dim: int, act_dim: int, hidden: int = 256):
        super().__init__()
        sizes = [obs_dim, hidden, hidden, act_dim]
        self.weights = nn.ParameterList(
            [nn.Parameter(torch.randn(n, i, o) / np.sqrt(i)) for i, o in zip(sizes[:-1], sizes[1:])]
        )
        self.biases = nn.ParameterList([nn.Parameter(torch.zeros(n, 1, o)) for o in sizes[1:]])

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        x = obs.transpose(0, 1)  # [n, E, obs_dim]
        for k, (w, b) in enumerate(zip(self.weights, self.biases)):
            x = torch.baddbmm(b, x, w)  # [n, E, out]
            x = torch.relu(x) if k < len(self.weights) - 1 else torch.tanh(x)
        return x.transpose(0, 1)  # [E, n, act_dim]


def env_steps_per_s(num_envs: int, steps: int) -> float:
    env = HalfCheetahVecEnv(num_envs)
    env.reset(0)
    actions = np.random.default_rng(0).uniform(-1, 1, (steps + 20, num_envs, 2, 3))
    for a in actions[:20]:  # warm-up
        env.step(a)
    start = time.perf_counter()
    for a in actions[20:]:
        env.step(a)
    return num_envs * steps / (time.perf_counter() - start)


@torch.no_grad()
def policy_rollout(env: HalfCheetahVecEnv, policy: nn.Module, seed: int, steps: int) -> np.ndarray:
    """Roll out `steps` lockstep steps with the deterministic policy; returns the episode returns [E]."""
    obs, _ = env.reset(seed)
    returns = np.zeros(env.num_envs)
    for _ in range(steps):
        actions = policy(torch.from_numpy(obs)).numpy()
        obs, _, rewards, _, _ = env.step(actions)
        returns += env.eval_reward(rewards)
    return returns


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--episodes-random", type=int, default=20, help="episodes for the random-action return"
    )
    parser.add_argument("--torch-threads", type=int, default=1, help="torch intra-op threads (small matmuls)")
    args = parser.parse_args()
    torch.set_num_threads(args.torch_threads)
    torch.manual_seed(0)

    for num_envs in (10, 64):
        sps = env_steps_per_s(num_envs, steps=300 if num_envs == 10 else 100)
        print(f"RESULT env=halfcheetah E={num_envs} steps_per_s={sps:.0f}", flush=True)

    policy = AgentsMLP(2, 6, 3)
    env = HalfCheetahVecEnv(10)
    policy_rollout(env, policy, seed=0, steps=20)  # warm-up
    start = time.perf_counter()
    policy_rollout(env, policy, seed=0, steps=1000)
    print(f"RESULT env=halfcheetah eval10_s={time.perf_counter() - start:.3f}", flush=True)

    env = HalfCheetahVecEnv(64)
    policy_rollout(env, policy, seed=0, steps=20)
    start = time.perf_counter()
    policy_rollout(env, policy, seed=0, steps=200)
    tps = 64 * 200 / (time.perf_counter() - start)
    print(
        f"RESULT env=halfcheetah E=64 transitions_per_s={tps:.0f} (1M in {1e6 / tps / 60:.1f} min)",
        flush=True,
    )

    num = args.episodes_random
    env = HalfCheetahVecEnv(num)
    env.reset(1)
    rng = np.random.default_rng(1)
    returns = np.zeros(num)
    for _ in range(env.episode_length):
        _, _, rewards, _, _ = env.step(rng.uniform(-1, 1, (num, 2, 3)))
        returns += env.eval_reward(rewards)
    print(
        f"RESULT env=halfcheetah random_return_mean={returns.mean():.1f} std={returns.std():.1f} "
        f"min={returns.min():.1f} max={returns.max():.1f} episodes={num}",
        flush=True,
    )


if __name__ == "__main__":
    main()
