"""PettingZoo ParallelEnv view of ONE episode of an MPE benchmark task (cn, pp, world).

A thin wrapper around `common.mpe.MPEVecEnv` with E = 1, for tools that speak PettingZoo. The agents are
the learners only (the pretrained prey of pp / world acts inside the environment). Action spaces are
Box(-1, 1, (2,)) (out-of-range actions are clipped, as in MPEVecEnv); observations are float32 Boxes.
Episodes end by truncation after 25 steps; nothing terminates.

Seeding: `reset(seed=s)` plays episode 0 of `MPEVecEnv.reset(s)`; later unseeded resets continue with
s + 1, s + 2, ...; before the first seed, a fresh random seed is drawn.
"""

from __future__ import annotations

import numpy as np
from gymnasium.spaces import Box
from pettingzoo import ParallelEnv

from common.mpe import MPEVecEnv


class MPEParallelEnv(ParallelEnv):
    metadata = {"name": "omar_mpe", "render_modes": [], "is_parallelizable": True}

    def __init__(self, task: str, render_mode: str | None = None):
        if render_mode is not None:
            raise ValueError(f"rendering is not supported (render_mode must be None, got {render_mode!r})")
        self.render_mode = None
        self._env = MPEVecEnv(task, 1)
        self.metadata = {**self.metadata, "name": f"omar_{self._env.spec.name}"}
        n, obs_dim = self._env.n_agents, self._env.obs_dim
        self.possible_agents = list(self._env.agent_names[:n])
        self.agents: list[str] = []
        inf = np.float32(np.inf)
        self._observation_spaces = {a: Box(-inf, inf, (obs_dim,), np.float32) for a in self.possible_agents}
        self._action_spaces = {
            a: Box(-1.0, 1.0, (self._env.act_dim,), np.float32) for a in self.possible_agents
        }
        self.state_space = Box(-inf, inf, (self._env.state_dim,), np.float32)
        self._next_seed: int | None = None
        self._state: np.ndarray | None = None

    def observation_space(self, agent: str) -> Box:
        return self._observation_spaces[agent]

    def action_space(self, agent: str) -> Box:
        return self._action_spaces[agent]

    def reset(self, seed: int | None = None, options: dict | None = None):
        if seed is None:
            seed = self._next_seed if self._next_seed is not None else int(np.random.SeedSequence().entropy)
        self._next_seed = int(seed) + 1
        obs, state = self._env.reset(int(seed))
        self._state = state[0]
        self.agents = self.possible_agents[:]
        return {a: obs[0, i] for i, a in enumerate(self.agents)}, {a: {} for a in self.agents}

    def step(self, actions: dict):
        if not self.agents:
            raise RuntimeError("the episode is over (or never started); call reset()")
        missing = [a for a in self.agents if a not in actions]
        if missing:
            raise ValueError(f"actions missing for agents {missing}; expected one Box(-1, 1, (2,)) per agent")
        batch = np.stack([np.asarray(actions[a], dtype=np.float64) for a in self.agents])[None]  # [1, n, 2]
        obs, state, rewards, terminated, truncated = self._env.step(batch)
        self._state = state[0]
        agents = self.agents
        obs_d = {a: obs[0, i] for i, a in enumerate(agents)}
        rew_d = {a: float(rewards[0, i]) for i, a in enumerate(agents)}
        term_d = {a: bool(terminated[0]) for a in agents}
        trunc_d = {a: bool(truncated[0]) for a in agents}
        if terminated[0] or truncated[0]:
            self.agents = []
        return obs_d, rew_d, term_d, trunc_d, {a: {} for a in agents}

    def state(self) -> np.ndarray:
        """Concatenation of the learners' observations (the critic's state), float32."""
        if self._state is None:
            raise RuntimeError("call reset() first")
        return self._state.copy()

    def render(self) -> None:
        return None

    def close(self) -> None:
        pass
