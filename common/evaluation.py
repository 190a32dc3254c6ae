"""Deterministic evaluation of a set of per-agent policies on a vectorised environment."""

from __future__ import annotations

import numpy as np
import torch


@torch.no_grad()
def evaluate(act, env, seed: int, device: torch.device | str = "cpu") -> np.ndarray:
    """Run `env.num_envs` episodes in lockstep from the fixed start states of `env.reset(seed)`.

    `act` maps observations [n, E, obs_dim] (torch, on `device`) to actions [n, E, act_dim]; it is called once
    per step. Returns the evaluation return of every episode, [E] float64: the sum over the episode of
    `env.eval_reward` (mean over agents for cn, predator 0 for pp / world, the team reward for halfcheetah).
    Using the same `seed` at every evaluation reproduces the reference's "same 10 episodes every evaluation".
    """
    obs, _ = env.reset(seed)
    returns = np.zeros(env.num_envs)
    for _ in range(env.episode_length):
        obs_t = torch.as_tensor(obs, device=device).transpose(0, 1)  # [n, E, obs_dim]
        actions = act(obs_t).transpose(0, 1).float().cpu().numpy()  # [E, n, act_dim]
        obs, _, rewards, terminated, truncated = env.step(actions)
        returns += env.eval_reward(rewards)
        if np.any(terminated | truncated):
            break
    return returns
