"""Small datasets made inside the tests, in the project's format, from real environment rollouts."""

from __future__ import annotations

import numpy as np

from common.dataset import dataset_path, write_dataset
from common.envs import make_vec_env
from common.tasks import get_task


def write_tiny_dataset(data_dir, task: str, dataset: str = "random", seed: int = 0, episodes: int = 8):
    """Uniform-random episodes of `task`, written where `ensure_dataset` looks for them. Returns the path."""
    spec = get_task(task)
    env = make_vec_env(task, episodes)
    rng = np.random.default_rng(seed)
    obs, state = env.reset(seed)
    actions = rng.uniform(-1, 1, (episodes, spec.n_agents, spec.act_dim)).astype(np.float32)
    cols = {
        k: []
        for k in (
            "obs",
            "actions",
            "rewards",
            "next_obs",
            "next_actions",
            "timeouts",
            "states",
            "next_states",
        )
    }
    for _ in range(spec.episode_length):
        next_obs, next_state, rewards, _, truncated = env.step(actions)
        next_actions = rng.uniform(-1, 1, actions.shape).astype(np.float32)
        for k, v in zip(
            cols, (obs, actions, rewards, next_obs, next_actions, truncated, state, next_state), strict=True
        ):
            cols[k].append(v)
        obs, state, actions = next_obs, next_state, next_actions
    # [T, E, ...] -> episode after episode [E*T, ...]
    arrays = {
        k: np.stack(v, 1).reshape(episodes * spec.episode_length, *np.shape(v[0])[1:])
        for k, v in cols.items()
    }
    path = dataset_path(data_dir, spec.name, dataset, seed)
    mujoco = spec.family == "mamujoco"  # MPE states are the concatenated observations, not stored
    write_dataset(
        path,
        task=spec.name,
        dataset=dataset,
        seed=seed,
        obs=arrays["obs"],
        actions=arrays["actions"],
        rewards=arrays["rewards"],
        next_obs=arrays["next_obs"],
        next_actions=arrays["next_actions"],
        dones=np.zeros(len(arrays["obs"]), dtype=bool),
        timeouts=arrays["timeouts"].astype(bool),
        states=arrays["states"] if mujoco else None,
        next_states=arrays["next_states"] if mujoco else None,
        behaviour_policy="uniform random (test)",
        generator="tests/helpers.py",
    )
    return path


def tiny_args(module, tmp_path, task: str, **kw):
    """Arguments of `module` (an algorithm file) for a run of a few rounds on a dataset from write_tiny_dataset."""
    defaults = dict(
        batch_size=16, hidden=16, num_updates=3, eval_every=2, num_eval_episodes=2, log_every=1, cuda=False
    )
    return module.Args(
        task=task,
        dataset="random",
        seed=kw.pop("seed", 0),
        data_dir=str(tmp_path / "data"),
        run_dir=str(tmp_path / "runs"),
        **(defaults | kw),
    )
