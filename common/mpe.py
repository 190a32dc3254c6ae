"""Vectorised particle environments of the OMAR / CFCQL / SPaCQL benchmark: cn, pp, world.

What this is: the MODIFIED multi-agent particle environments (MPE) that OMAR's datasets were made with
(github.com/ling-pan/OMAR `multiagent-particle-envs/`, identical to the copy in github.com/thu-rllab/CFCQL
`continuous/`). Written from the description in shared/reference/benchmark-tasks.md sections 1.1-1.4,
not from the reference code. E episodes are simulated at once. PettingZoo's `mpe2` is a DIFFERENT task
(force gains, integration order, rewards, World visibility); patched as in section 2.2 it is the independent
oracle that tests/test_mpe.py compares this file against, observation by observation and reward by reward.

Engine (reference core.py, modified by OMAR), every step, for each agent (landmarks never move):
    F = gain * a + contact forces      gain = mass * accel * accel: cn 5, predators 9, prey 16
                                       (OMAR's apply_action_force multiplies by accel a second time)
    v <- 0.75 v + F dt;  |v| clipped to max_speed;  x <- x + v dt        (dt 0.1, damping 0.25, mass 1)
    contact force on i from j (both collide): 100 * k log(1 + exp((r_i + r_j - d) / k)) along (x_i - x_j) / d,
    k = 1e-3. This soft penetration is never exactly 0, so it is applied to every colliding pair.

Tasks (agents first, then landmarks, in the reference order):
    cn     3 agents (size 0.15, no max speed); 3 landmarks (0.05, no collide). Everything starts U(-1, 1)^2.
           r_i = sum_l min(1 / min_a d(a, l), 10) - 5 * #{j != i colliding with i}
    pp     3 predators (0.075, vmax 1.0), the prey (0.05, vmax 1.3); 2 obstacles (0.2, collide), U(-0.9, 0.9)^2.
           predators (all the same): -0.1 * sum_adv d(prey, adv) + 10 * #(prey, adv) in contact
    world  3 predators (0.075, vmax 1.0), the prey (0.045, vmax 1.3); obstacle (0.2, collide), food 0, 1
           (0.03), forest 0, 1 (0.3), U(-0.9, 0.9)^2. Every agent is a silent "leader": nobody is hidden.
           predators: -0.1 * sum_adv d(prey, adv) + 5 * #(prey, adv) in contact
    The prey of pp / world is the fixed pretrained OMAR policy (common/prey/), acting inside `step`.
    Its own reward is not part of the learning problem; `prey_reward()` computes it for the tests.

Observations (relative positions are "other minus self"):
    cn     [v, x, 3 landmarks, 2 other agents, 2 x comm(2) = 0]                              18
    pp     [v, x, 2 obstacles, 3 other agents, velocity of the prey (predators only)]       16 / prey 14
    world  [v, x, 5 landmarks, 3 other agents, velocity of the prey (predators only),
            in_forest (2): +1 inside forest k else -1]                                      24 / prey 22

Implementation notes and decisions (deviations from the reference code are marked as such):
1. Deviation: actions are clipped to [-1, 1]. The reference env does not clip, but its actors are tanh
   outputs clamped to [-1, 1], so for every action the reference ever saw the result is identical.
2. Deviation: in World the reference draws food and forest positions twice (once as landmarks, then again).
   The draws are i.i.d. U(-0.9, 0.9)^2 and the second replaces the first, so the start-state distribution
   is that of a single draw, which is what we do. (Our streams differ from the reference's global
   np.random anyway: episode e of reset(seed) draws from np.random.default_rng([seed, e]).)
3. The prey network runs in float32, like the reference's torch module (float32 weights); BatchNorm (eval)
   is folded into the first layer. The physics runs in float64; obs / state / rewards are returned float32.
4. Episodes are 25 steps and never terminate; `truncated` is True on step 25 and stepping again raises
   until `reset`. All E episodes run in lockstep (there is no auto-reset).
5. Speed: the internal arrays put the episode axis LAST ([K, 2, E]), so every numpy operation runs over
   contiguous rows of E values (with [E, K, 2] the inner loops have length 2 and are ~10x slower). All
   per-step features live in one buffer `_src` [S, E]; an observation is a fixed gather of its rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.tasks import TaskSpec, get_task

DT = 0.1  # simulation timestep
DAMPING = 0.25  # v <- (1 - damping) v before the force is added
CONTACT_FORCE = 100.0
CONTACT_MARGIN = 1e-3  # k of the softplus penetration
PREY_DIR = Path(__file__).resolve().parent / "prey"
# The prey network runs on fixed blocks of episodes: a BLAS product's rounding can depend on the matrix
# shape, so a fixed shape makes an episode's prey action (and so its whole trajectory) independent of E.
# 64 also keeps each product below OpenBLAS's threading threshold; its threads are slow on a busy machine.
PREY_BLOCK = 64


@dataclass(frozen=True)
class Scenario:
    """Entities of one task: agents first (the learners, then the prey if any), then landmarks."""

    agent_names: tuple[str, ...]
    agent_size: tuple[float, ...]
    agent_gain: tuple[float, ...]  # force per unit of action = mass * accel * accel (5 when accel is None)
    agent_max_speed: tuple[float, ...] | None
    landmark_names: tuple[str, ...]
    landmark_size: tuple[float, ...]
    landmark_collide: tuple[bool, ...]
    landmark_range: float  # landmarks start U(-range, range)^2, agents U(-1, 1)^2
    prey_policy: str | None = None  # npz in common/prey/ when the last agent is the pretrained prey
    catch_bonus: float = 0.0  # predator reward per (prey, predator) pair in contact
    food: tuple[int, ...] = ()  # landmark indices
    forests: tuple[int, ...] = ()  # landmark indices


SCENARIOS: dict[str, Scenario] = {
    "cn": Scenario(
        agent_names=("agent_0", "agent_1", "agent_2"),
        agent_size=(0.15, 0.15, 0.15),
        agent_gain=(5.0, 5.0, 5.0),
        agent_max_speed=None,
        landmark_names=("landmark_0", "landmark_1", "landmark_2"),
        landmark_size=(0.05, 0.05, 0.05),
        landmark_collide=(False, False, False),
        landmark_range=1.0,
    ),
    "pp": Scenario(
        agent_names=("adversary_0", "adversary_1", "adversary_2", "prey"),
        agent_size=(0.075, 0.075, 0.075, 0.05),
        agent_gain=(9.0, 9.0, 9.0, 16.0),
        agent_max_speed=(1.0, 1.0, 1.0, 1.3),
        landmark_names=("obstacle_0", "obstacle_1"),
        landmark_size=(0.2, 0.2),
        landmark_collide=(True, True),
        landmark_range=0.9,
        prey_policy="simple_tag_prey_policy.npz",
        catch_bonus=10.0,
    ),
    "world": Scenario(
        agent_names=("adversary_0", "adversary_1", "adversary_2", "prey"),
        agent_size=(0.075, 0.075, 0.075, 0.045),
        agent_gain=(9.0, 9.0, 9.0, 16.0),
        agent_max_speed=(1.0, 1.0, 1.0, 1.3),
        landmark_names=("obstacle", "food_0", "food_1", "forest_0", "forest_1"),
        landmark_size=(0.2, 0.03, 0.03, 0.3, 0.3),
        landmark_collide=(True, False, False, False, False),
        landmark_range=0.9,
        prey_policy="simple_world_prey_policy.npz",
        catch_bonus=5.0,
        food=(1, 2),
        forests=(3, 4),
    ),
}


def load_prey_policy(filename: str) -> tuple[np.ndarray, ...]:
    """(W1, b1, W2, b2, W3, b3) float32 with the eval-mode BatchNorm folded into layer 1; b* are [64|2, 1]."""
    w = {k: v.astype(np.float64) for k, v in np.load(PREY_DIR / filename).items()}
    # BatchNorm1d (eval): x * scale + shift, with scale = weight / sqrt(running_var + eps)
    scale = w["in_fn.weight"] / np.sqrt(w["in_fn.running_var"] + 1e-5)
    shift = w["in_fn.bias"] - w["in_fn.running_mean"] * scale
    w1 = w["fc1.weight"] * scale[None, :]
    b1 = w["fc1.bias"] + w["fc1.weight"] @ shift
    params = (
        w1,
        b1[:, None],
        w["fc2.weight"],
        w["fc2.bias"][:, None],
        w["fc3.weight"],
        w["fc3.bias"][:, None],
    )
    return tuple(np.ascontiguousarray(p, dtype=np.float32) for p in params)


class MPEVecEnv:
    """E synchronous episodes of one MPE task (cn, pp, world); see the module docstring for the task.

    obs, state = env.reset(seed)        # obs [E, n, obs_dim] float32; state = obs.reshape(E, n * obs_dim), a view
    obs, state, rewards, terminated, truncated = env.step(actions)
        actions: [E, n, 2], anything np.asarray accepts; NaN / inf / wrong shape raise ValueError;
        values are clipped to [-1, 1] (the reference's actors clamp to that range).
        rewards [E, n] float32; terminated [E] always False; truncated [E] True on step 25.
    For tests and tools: positions / velocities (float64 copies), set_state(), obs_all() (prey included),
    prey_action(), prey_reward().
    """

    def __init__(self, task: str, num_envs: int):
        spec = get_task(task)
        if spec.family != "mpe":
            raise ValueError(f"MPEVecEnv runs the MPE tasks cn / pp / world, not {spec.name!r}")
        if int(num_envs) < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}")
        sc = SCENARIOS[spec.name]
        self.spec: TaskSpec = spec
        self.scenario = sc
        self.num_envs = E = int(num_envs)
        self.n_agents, self.obs_dim, self.act_dim = spec.n_agents, spec.obs_dim, spec.act_dim
        self.state_dim, self.episode_length = spec.state_dim, spec.episode_length
        self.agent_names = sc.agent_names
        self.entity_names = sc.agent_names + sc.landmark_names
        self._A = A = len(sc.agent_names)  # all agents, prey included
        self._K = K = A + len(sc.landmark_names)  # all entities
        self._prey = A - 1 if sc.prey_policy else None
        self.sizes = np.array(sc.agent_size + sc.landmark_size)  # [K]
        self._gain = np.array(sc.agent_gain)[:, None, None]  # [A, 1, 1]
        self._max_speed = None if sc.agent_max_speed is None else np.array(sc.agent_max_speed)[:, None]
        self._half_range = np.array([1.0] * A + [sc.landmark_range] * (K - A))[:, None, None]  # [K, 1, 1]
        self._prey_params = load_prey_policy(sc.prey_policy) if sc.prey_policy else None

        # Colliding pairs (i < j). Only agents move, and they come first, so i is always an agent.
        collide = [True] * A + list(sc.landmark_collide)
        pairs = [(i, j) for i in range(A) for j in range(i + 1, K) if collide[j]]
        self._pair_i = np.array([i for i, _ in pairs])
        self._pair_j = np.array([j for _, j in pairs])
        self._pair_dmin = (self.sizes[self._pair_i] + self.sizes[self._pair_j])[:, None]  # [P, 1]
        # log1p(exp(z)) with z <= dmin / k stays finite in float64 (exp overflows past 709)
        assert self._pair_dmin.max() / CONTACT_MARGIN < 700
        self._pairs = [(i, j if j < A else None) for i, j in pairs]  # j = None: a landmark, which never moves
        self._pair_flat = (
            self._pair_i * K + self._pair_j
        )  # index into [A * K] (relative positions, distances)
        self._agent_dmin = (self.sizes[:A, None] + self.sizes[None, :A])[:, :, None]  # [A, A, 1]
        forests = [A + f for f in sc.forests]
        self._forests = np.array(forests, dtype=np.intp)
        self._forest_dmin = (self.sizes[:A, None] + self.sizes[forests][None, :])[:, :, None]  # [A, F, 1]

        # One buffer holds every per-step feature, one row each: observations are row gathers.
        F = len(forests)
        self._row_vel = 2 * K
        self._row_rel = self._row_vel + 2 * A
        self._row_flag = self._row_rel + 2 * A * K
        self._row_zero = self._row_flag + A * F
        self._src = np.zeros((self._row_zero + 1, E))  # [S, E]
        self._pos = self._src[: 2 * K].reshape(K, 2, E)  # positions of all entities
        self._vel = self._src[self._row_vel : self._row_rel].reshape(A, 2, E)
        self._rel = self._src[self._row_rel : self._row_flag].reshape(A, K, 2, E)  # x_k - x_i
        self._flags = self._src[self._row_flag : self._row_zero].reshape(A, F, E)  # in_forest, +-1
        self._sq = np.empty((A, K, 2, E))
        self._dist = np.empty((A, K, E))  # |x_k - x_i|
        self._force = np.empty((A, 2, E))
        # work buffers: the hot path allocates little (large temporaries cost page faults every step)
        self._pair_rel = np.empty((len(pairs), 2, E))
        self._pair_dist = np.empty((len(pairs), E))
        self._pair_w = np.empty((len(pairs), E))
        self._obs_rows = np.array([self._obs_rows_of(i) for i in range(self.n_agents)])  # [n, obs_dim]
        assert self._obs_rows.shape == (self.n_agents, self.obs_dim)
        self._prey_rows = None if self._prey is None else np.array(self._obs_rows_of(self._prey))
        if self._prey_rows is not None:
            blocks = -(-E // PREY_BLOCK)
            self._prey_in = np.zeros((len(self._prey_rows), blocks * PREY_BLOCK), dtype=np.float32)
            self._prey_h1 = np.empty((blocks, 64, PREY_BLOCK), dtype=np.float32)
            self._prey_h2 = np.empty((blocks, 64, PREY_BLOCK), dtype=np.float32)
            self._prey_out = np.empty((blocks, 2, PREY_BLOCK), dtype=np.float32)
        self._t: int | None = None  # steps taken in the current episodes; None before the first reset

    # ---------------------------------------------------------------- observation layout
    def _obs_rows_of(self, i: int) -> list[int]:
        """Rows of `_src` that make agent i's observation, in the reference order (section 1.4)."""
        A, K = self._A, self._K

        def rel(k):
            return [self._row_rel + 2 * (i * K + k), self._row_rel + 2 * (i * K + k) + 1]

        rows = [self._row_vel + 2 * i, self._row_vel + 2 * i + 1, 2 * i, 2 * i + 1]
        for k in range(A, K):
            rows += rel(k)
        for j in range(A):
            if j != i:
                rows += rel(j)
        if self.spec.name == "cn":
            rows += [self._row_zero] * 4  # the other two agents' comm channels: all agents are silent
        elif i != self._prey:
            rows += [self._row_vel + 2 * self._prey, self._row_vel + 2 * self._prey + 1]
        for f in range(len(self._forests)):
            rows.append(self._row_flag + i * len(self._forests) + f)
        return rows

    def obs_all(self) -> list[np.ndarray]:
        """Current float64 observation of every agent, prey included: list of [E, obs_dim_i]."""
        rows = [self._obs_rows_of(i) for i in range(self._A)]
        return [self._src[r].T.copy() for r in rows]

    def _learner_obs(self) -> tuple[np.ndarray, np.ndarray]:
        """(obs [E, n, obs_dim], state [E, n * obs_dim]) float32; state is obs.reshape, a view."""
        state = np.empty((self.num_envs, self.state_dim), dtype=np.float32)
        for c, row in enumerate(self._obs_rows.flat):  # column by column: 2x faster than a transposing copy
            state[:, c] = self._src[row]
        return state.reshape(self.num_envs, self.n_agents, self.obs_dim), state

    # ---------------------------------------------------------------- state access (tests, rendering)
    @property
    def positions(self) -> np.ndarray:
        """[E, K, 2] float64 copy: agents (learners, prey), then landmarks."""
        return self._pos.transpose(2, 0, 1).copy()

    @property
    def velocities(self) -> np.ndarray:
        """[E, A, 2] float64 copy (landmarks do not move)."""
        return self._vel.transpose(2, 0, 1).copy()

    @property
    def t(self) -> int | None:
        """Steps taken in the current episodes (None before the first reset)."""
        return self._t

    def set_state(self, positions: np.ndarray, velocities: np.ndarray | None = None) -> None:
        """Overwrite positions [E, K, 2] (and velocities [E, A, 2], default 0); the step count is kept."""
        positions = np.asarray(positions, dtype=np.float64)
        velocities = np.zeros((self.num_envs, self._A, 2)) if velocities is None else velocities
        velocities = np.asarray(velocities, dtype=np.float64)
        if positions.shape != (self.num_envs, self._K, 2) or velocities.shape != (self.num_envs, self._A, 2):
            raise ValueError(
                f"expected positions {(self.num_envs, self._K, 2)} and velocities {(self.num_envs, self._A, 2)}, "
                f"got {positions.shape} and {velocities.shape}"
            )
        self._pos[...] = positions.transpose(1, 2, 0)
        self._vel[...] = velocities.transpose(1, 2, 0)
        self._t = 0 if self._t is None else self._t
        self._update_geometry()

    # ---------------------------------------------------------------- API
    def reset(self, seed: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Start E new episodes; episode e draws from np.random.default_rng([seed, e]) (fresh seed if None)."""
        if seed is None:
            seed = np.random.SeedSequence().entropy
        K, E = self._K, self.num_envs
        u = np.empty((E, K, 2))
        for e in range(E):  # per-episode generators make episode e independent of E
            u[e] = np.random.default_rng([seed, e]).random((K, 2))
        # = rng.uniform(-1, 1, (A, 2)) for the agents, then rng.uniform(-r, r, (L, 2)) for the landmarks
        self._pos[...] = -self._half_range + 2.0 * self._half_range * u.transpose(1, 2, 0)
        self._vel[...] = 0.0
        self._t = 0
        self._update_geometry()
        return self._learner_obs()

    def step(self, actions) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        if self._t is None:
            raise RuntimeError("call reset() before step()")
        if self._t >= self.episode_length:
            raise RuntimeError(f"the episodes ended after {self.episode_length} steps; call reset()")
        actions = self._check_actions(actions)  # [E, n, 2], clipped
        n, A = self.n_agents, self._A
        force = self._force  # [A, 2, E]
        np.multiply(actions.transpose(1, 2, 0), self._gain[:n], out=force[:n])
        if self._prey is not None:
            np.multiply(self.prey_action().T, self._gain[self._prey], out=force[self._prey])
        self._add_contact_forces(force)

        # integrate: reference (OMAR / original MPE) order, the position moves with the NEW velocity
        self._vel *= 1.0 - DAMPING
        force *= DT  # mass 1
        self._vel += force
        if self._max_speed is not None:
            speed = np.sqrt(self._vel[:, 0] ** 2 + self._vel[:, 1] ** 2)  # [A, E]
            self._vel *= (self._max_speed / np.maximum(speed, self._max_speed))[:, None]
        self._pos[:A] += self._vel * DT
        self._update_geometry()

        self._t += 1
        obs, state = self._learner_obs()
        rewards = np.ascontiguousarray(self._rewards().T, dtype=np.float32)  # [E, n]
        terminated = np.zeros(self.num_envs, dtype=bool)
        truncated = np.full(self.num_envs, self._t == self.episode_length)
        return obs, state, rewards, terminated, truncated

    def eval_reward(self, rewards):
        """Per-step evaluation reward [E] from rewards [E, n] (numpy or torch): cn mean over agents, else agent 0."""
        if self.spec.name == "cn":
            return rewards.mean(axis=1)
        return rewards[:, 0]  # predator 0; all predators get the same reward

    # ---------------------------------------------------------------- physics
    def _check_actions(self, actions) -> np.ndarray:
        expected = (self.num_envs, self.n_agents, self.act_dim)
        try:
            a = np.asarray(actions, dtype=np.float64)
        except (TypeError, ValueError) as err:
            raise ValueError(
                f"actions must be a numeric array of shape (E, n, act_dim) = {expected}: {err}"
            ) from err
        if a.shape != expected:
            raise ValueError(f"actions must have shape (E, n, act_dim) = {expected}, got shape {a.shape}")
        if not np.isfinite(a).all():
            bad = tuple(int(i) for i in np.argwhere(~np.isfinite(a))[0])
            raise ValueError(f"actions of shape {expected} must be finite; found {a[bad]} at index {bad}")
        return np.clip(a, -1.0, 1.0)

    def _add_contact_forces(self, force: np.ndarray) -> None:
        """Add the soft contact forces of all colliding pairs, at the current positions, to force [A, 2, E]."""
        E = self.num_envs
        rel, dist, w = self._pair_rel, self._pair_dist, self._pair_w  # [P, 2, E], [P, E], [P, E]
        np.take(self._rel.reshape(-1, 2, E), self._pair_flat, axis=0, out=rel)  # x_j - x_i
        np.take(self._dist.reshape(-1, E), self._pair_flat, axis=0, out=dist)
        # penetration = k softplus((r_i + r_j - d) / k) = k log1p(exp(z)). z is clamped at -60, because exp's
        # underflow path is ~50x slower and the force there (< 1e-27) is below float64 resolution anyway.
        np.subtract(self._pair_dmin, dist, out=w)
        w /= CONTACT_MARGIN
        np.maximum(w, -60.0, out=w)
        np.exp(w, out=w)
        np.log1p(w, out=w)
        # force on i: contact_force * penetration * (x_i - x_j) / d, and rel = x_j - x_i
        w *= -CONTACT_FORCE * CONTACT_MARGIN / dist
        rel *= w[:, None]
        # accumulate in the reference's pair order (a fixed order: the result cannot depend on E)
        for p, (i, j) in enumerate(self._pairs):
            force[i] += rel[p]
            if j is not None:
                force[j] -= rel[p]

    def _update_geometry(self) -> None:
        """Relative positions, distances and forest flags of the current positions."""
        A = self._A
        np.subtract(self._pos[None], self._pos[:A, None], out=self._rel)  # [A, K, 2, E]
        np.multiply(self._rel, self._rel, out=self._sq)
        np.add(self._sq[:, :, 0], self._sq[:, :, 1], out=self._dist)
        np.sqrt(self._dist, out=self._dist)
        if len(self._forests):
            self._flags[...] = np.where(self._dist[:, self._forests] < self._forest_dmin, 1.0, -1.0)

    # ---------------------------------------------------------------- rewards
    def _rewards(self) -> np.ndarray:
        """[n, E] float64 rewards of the learners (section 1.3), from the current positions."""
        n, A, d = self.n_agents, self._A, self._dist
        if self.spec.name == "cn":
            with np.errstate(divide="ignore"):
                cover = np.minimum(1.0 / d[:, A:].min(axis=0), 10.0).sum(axis=0)  # [E], shared
            collisions = (d[:, :A] < self._agent_dmin).sum(axis=1) - 1  # [A, E]; -1: the agent itself
            return cover - 5.0 * collisions
        d_prey = d[:n, self._prey]  # [n, E]
        caught = (d_prey < self._agent_dmin[:n, self._prey]).sum(axis=0)
        r = -0.1 * d_prey.sum(axis=0) + self.scenario.catch_bonus * caught  # [E], shared by the predators
        return np.broadcast_to(r, (n, self.num_envs))

    def prey_reward(self) -> np.ndarray:
        """[E] reward of the prey at the current positions (OMAR's shaped prey reward; for tests)."""
        if self._prey is None:
            raise ValueError(f"task {self.spec.name!r} has no prey")
        n, d, prey = self.n_agents, self._dist, self._prey
        d_prey = d[:n, prey]
        caught = (d_prey < self._agent_dmin[:n, prey]).sum(axis=0)
        x = np.abs(self._pos[prey])  # [2, E]
        # leaving the arena: 0 below 0.9, linear to 1 at 1.0, then exp(2x - 2) up to 10
        bound = np.where(
            x < 0.9, 0.0, np.where(x < 1.0, 10.0 * (x - 0.9), np.exp(np.minimum(2 * x - 2, 3.0)))
        )
        bound = np.minimum(bound, 10.0).sum(axis=0)
        if self.spec.name == "pp":
            return 0.1 * d_prey.sum(axis=0) - 10.0 * caught - bound
        food = [self._A + f for f in self.scenario.food]
        d_food = d[prey, food]  # [2, E]
        eaten = (d_food < (self.sizes[prey] + self.sizes[food])[:, None]).sum(axis=0)
        # "+0.05 * min food distance": OMAR's sign (mpe2 and the original MPE subtract it)
        return 0.1 * d_prey.sum(axis=0) - 5.0 * caught - 2.0 * bound + 2.0 * eaten + 0.05 * d_food.min(axis=0)

    # ---------------------------------------------------------------- the pretrained prey
    def prey_action(self) -> np.ndarray:
        """[E, 2] float64 action of the pretrained prey at the current state (deterministic)."""
        if self._prey_params is None:
            raise ValueError(f"task {self.spec.name!r} has no prey")
        w1, b1, w2, b2, w3, b3 = self._prey_params
        E, x = self.num_envs, self._prey_in  # [obs_dim, blocks * B] float32, zero-padded
        for r, row in enumerate(self._prey_rows):
            x[r, :E] = self._src[row]
        x = x.reshape(len(x), -1, PREY_BLOCK).transpose(1, 0, 2)  # [blocks, obs_dim, B], a view
        h1 = np.matmul(w1, x, out=self._prey_h1)  # one BLAS call of the same shape per block
        h1 += b1
        np.maximum(h1, 0.0, out=h1)
        h2 = np.matmul(w2, h1, out=self._prey_h2)
        h2 += b2
        np.maximum(h2, 0.0, out=h2)
        a = np.matmul(w3, h2, out=self._prey_out)  # [blocks, 2, B]
        a += b3
        np.clip(np.tanh(a, out=a), -1.0, 1.0, out=a)
        return a.transpose(0, 2, 1).reshape(-1, 2)[:E].astype(np.float64)
