"""Speed of the vectorised MPE tasks (common/mpe.py): simulation throughput and evaluation latency.

For each task (cn, pp, world):
  - transitions per second at E = 1024 parallel episodes, uniform-random learner actions drawn in the loop,
    the pretrained prey acting (pp, world), and the reset at the start of every 25-step episode included;
  - wall time of a 10-episode evaluation (E = 10, 25 steps) of a small torch policy: one MLP per agent,
    obs -> 64 -> 64 -> tanh action, run without gradients on CPU, including the reset and the conversions.
Targets (2 CPU cores): >= 300,000 transitions/s at E = 1024; evaluation <= 50 ms.

Run: python benchmarks/bench_mpe.py [--num-envs 1024] [--episodes 8] [--repeats 3] [--torch-threads 1]
Prints lines `RESULT env=cn E=1024 transitions_per_s=...` and `RESULT env=cn eval10_ms=...` (best of repeats).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common.mpe import MPEVecEnv  # noqa: E402

TASKS = ("cn", "pp", "world")


def throughput(task: str, num_envs: int, episodes: int) -> float:
    """Transitions (one per episode-step) per second of random-action rollouts, resets included."""
    env = MPEVecEnv(task, num_envs)
    rng = np.random.default_rng(0)
    shape = (num_envs, env.n_agents, env.act_dim)
    start = time.perf_counter()
    for episode in range(episodes):
        env.reset(seed=episode)
        for _ in range(env.episode_length):
            env.step(rng.uniform(-1.0, 1.0, shape))
    return episodes * env.episode_length * num_envs / (time.perf_counter() - start)


class Actors(nn.Module):
    """One 64-64 MLP per agent, obs -> tanh action (the size of the algorithms' actors)."""

    def __init__(self, n_agents: int, obs_dim: int, act_dim: int):
        super().__init__()
        self.nets = nn.ModuleList(
            nn.Sequential(
                nn.Linear(obs_dim, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, act_dim)
            )
            for _ in range(n_agents)
        )

    def forward(self, obs: torch.Tensor) -> torch.Tensor:  # [E, n, obs_dim] -> [E, n, act_dim]
        return torch.stack([torch.tanh(net(obs[:, i])) for i, net in enumerate(self.nets)], dim=1)


@torch.no_grad()
def evaluate(env: MPEVecEnv, actors: Actors, seed: int) -> float:
    """Mean evaluation return of E deterministic episodes (the evaluation loop of the algorithm files)."""
    obs, _ = env.reset(seed=seed)
    returns = np.zeros(env.num_envs)
    for _ in range(env.episode_length):
        actions = actors(torch.from_numpy(obs)).numpy()
        obs, _, rewards, _, _ = env.step(actions)
        returns += env.eval_reward(rewards)
    return float(returns.mean())


def eval_time_ms(task: str, repeats: int) -> float:
    env = MPEVecEnv(task, 10)
    actors = Actors(env.n_agents, env.obs_dim, env.act_dim)
    evaluate(env, actors, seed=0)  # warm-up
    best = np.inf
    for r in range(repeats):
        start = time.perf_counter()
        evaluate(env, actors, seed=r)
        best = min(best, time.perf_counter() - start)
    return 1e3 * best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-envs", type=int, default=1024)
    parser.add_argument("--episodes", type=int, default=8, help="25-step episodes per throughput measurement")
    parser.add_argument(
        "--repeats", type=int, default=3, help="measurements per figure; the best is reported"
    )
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="torch intra-op threads (64-wide layers gain nothing from more)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.torch_threads)
    print(f"# numpy {np.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads)")
    for task in TASKS:
        throughput(task, args.num_envs, 1)  # warm-up
        tps = max(throughput(task, args.num_envs, args.episodes) for _ in range(args.repeats))
        print(f"RESULT env={task} E={args.num_envs} transitions_per_s={tps:.0f}", flush=True)
        print(f"RESULT env={task} eval10_ms={eval_time_ms(task, 5 * args.repeats):.2f}", flush=True)


if __name__ == "__main__":
    main()
