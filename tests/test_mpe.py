"""Tests of common/mpe.py (the OMAR particle environments) and its PettingZoo view.

1. Fidelity against an independent oracle: PettingZoo's mpe2, patched to the OMAR task as listed in
   shared/reference/benchmark-tasks.md section 2.2 (action mapping, force gain, integration order, rewards
   rewritten here from section 1.3, World's leader/silent flags and extra obs dims). Both start from the same
   state and receive the same actions; every agent's obs and reward must agree at every step.
2. Uniform-random learner returns (2000 episodes) match the reference's measured means (section 4).
3. API contract: PettingZoo parallel_api_test, action validation and clipping, seeding.
"""

from __future__ import annotations

import numpy as np
import pytest

from common.mpe import PREY_DIR, MPEVecEnv, load_prey_policy
from common.mpe_pettingzoo import MPEParallelEnv

TASKS = ("cn", "pp", "world")
T = 25


# ---------------------------------------------------------------- the oracle: patched mpe2
def _dist(a, b) -> float:
    return float(np.sqrt(np.sum(np.square(a.state.p_pos - b.state.p_pos))))


def _coll(a, b) -> bool:
    return _dist(a, b) < a.size + b.size


def _bound(x: float) -> float:
    if x < 0.9:
        return 0.0
    if x < 1.0:
        return (x - 0.9) * 10
    return min(np.exp(2 * x - 2), 10)


def _spread_reward(agent, world) -> float:
    """OMAR: sum_l min(1 / min_a d(a, l), 10) - 5 * #other agents in contact."""
    rew = sum(min(1.0 / min(_dist(a, lm) for a in world.agents), 10.0) for lm in world.landmarks)
    return rew - 5.0 * sum(_coll(a, agent) for a in world.agents if a is not agent)


def _make_tag_reward(world_task: bool):
    """OMAR's shaped tag / world rewards (section 1.3), for one agent."""
    bonus = 5.0 if world_task else 10.0

    def reward(agent, world) -> float:
        advs = [a for a in world.agents if a.adversary]
        preys = [a for a in world.agents if not a.adversary]
        if agent.adversary:
            rew = -0.1 * sum(min(_dist(p, adv) for p in preys) for adv in advs)
            return rew + bonus * sum(_coll(p, adv) for p in preys for adv in advs)
        rew = 0.1 * sum(_dist(agent, adv) for adv in advs) - bonus * sum(_coll(agent, adv) for adv in advs)
        rew -= (2.0 if world_task else 1.0) * sum(_bound(abs(x)) for x in agent.state.p_pos)
        if world_task:
            rew += 2.0 * sum(_coll(agent, food) for food in world.food)
            rew += 0.05 * min(_dist(food, agent) for food in world.food)  # OMAR's "+" sign
        return rew

    return reward


def make_oracle(task: str):
    """An mpe2 raw (AEC) env patched into the OMAR task."""
    from mpe2 import simple_spread_v3, simple_tag_v3, simple_world_comm_v3

    if task == "cn":
        env = simple_spread_v3.raw_env(N=3, local_ratio=0.5, max_cycles=T, continuous_actions=True)
        env.local_ratio = None  # no mixing with mpe2's global reward
        env.scenario.reward = _spread_reward
    elif task == "pp":
        env = simple_tag_v3.raw_env(
            num_good=1, num_adversaries=3, num_obstacles=2, max_cycles=T, continuous_actions=True
        )
        env.scenario.reward = _make_tag_reward(world_task=False)
    else:
        env = simple_world_comm_v3.raw_env(
            num_good=1, num_adversaries=3, num_obstacles=1, num_food=2, num_forests=2, max_cycles=T,
            continuous_actions=True,
        )  # fmt: skip
        env.scenario.reward = _make_tag_reward(world_task=True)
        for agent in env.world.agents:  # OMAR: everybody is a silent leader (no forest masking, no comm)
            agent.leader, agent.silent = True, True
    world = env.world

    def apply_action_force(p_force):
        # OMAR multiplies by mass * accel on top of the accel "sensitivity" applied in _set_action
        for i, agent in enumerate(world.agents):
            if agent.movable:
                gain = agent.mass * agent.accel if agent.accel is not None else agent.mass
                p_force[i] = gain * agent.action.u
        return p_force

    def integrate_state(p_force):
        # reference order: velocity first, then the position moves with the new velocity
        for i, entity in enumerate(world.entities):
            if not entity.movable:
                continue
            entity.state.p_vel = entity.state.p_vel * (1 - world.damping)
            if p_force[i] is not None:
                entity.state.p_vel = entity.state.p_vel + (p_force[i] / entity.mass) * world.dt
            if entity.max_speed is not None:
                speed = np.sqrt(np.square(entity.state.p_vel[0]) + np.square(entity.state.p_vel[1]))
                if speed > entity.max_speed:
                    entity.state.p_vel = entity.state.p_vel / speed * entity.max_speed
            entity.state.p_pos = entity.state.p_pos + entity.state.p_vel * world.dt

    world.apply_action_force = apply_action_force
    world.integrate_state = integrate_state
    return env


def _mpe2_action(a: np.ndarray, space_dim: int) -> np.ndarray:
    """(x, y) -> [noop, -x, +x, -y, +y] (+ zero comm for World's leader, whose action space is 9-d)."""
    x, y = a
    out = np.zeros(space_dim)
    out[1:5] = max(-x, 0.0), max(x, 0.0), max(-y, 0.0), max(y, 0.0)
    return out


def _oracle_obs(env, extra_dims: dict[str, int]) -> list[np.ndarray]:
    obs = []
    for agent in env.world.agents:
        o = env.scenario.observation(agent, env.world)
        obs.append(o[: len(o) - extra_dims.get(agent.name, 0)])
    return obs


@pytest.mark.parametrize("task", TASKS)
def test_matches_patched_mpe2(task):
    """Every agent's obs and reward agree with the patched mpe2 at every step of 100 episodes."""
    E = 100
    env = MPEVecEnv(task, E)
    env.reset(seed=2024)
    start_pos = env.positions
    rng = np.random.default_rng(7)
    actions = rng.uniform(-1, 1, (T, E, env.n_agents, 2))
    # our run, recorded: obs / rewards of every agent (prey included) and the prey's actions
    ours_obs, ours_rew, prey_act = [env.obs_all()], [], []
    contacts, in_forest, at_max_speed = 0, 0, 0
    for t in range(T):
        if env._prey is not None:
            prey_act.append(env.prey_action())
        obs32, _, rew32, _, _ = env.step(actions[t])
        obs = env.obs_all()
        np.testing.assert_array_equal(obs32, np.stack(obs[: env.n_agents], axis=1).astype(np.float32))
        rew = list(env._rewards())  # float64, [n, E]
        np.testing.assert_array_equal(rew32, np.stack(rew, axis=1).astype(np.float32))
        if env._prey is not None:
            rew.append(env.prey_reward())
        ours_obs.append(obs)
        ours_rew.append(rew)
        # coverage: the episodes must exercise contacts, forests and the speed clip
        d = env._dist[env._pair_i, env._pair_j]
        contacts += int((d < env._pair_dmin).sum())
        in_forest += int((env._flags > 0).sum())
        if env._max_speed is not None:
            speed = np.sqrt((env._vel**2).sum(axis=1))
            at_max_speed += int(np.isclose(speed, env._max_speed).sum())
    assert contacts > 20
    if task == "world":
        assert in_forest > 20
    if task != "cn":
        assert at_max_speed > 20

    oracle = make_oracle(task)
    names = [a.name for a in oracle.world.agents]
    # mpe2 appends the leader's comm (4) to every leader's obs; with everyone a leader, to all of them
    extra = dict.fromkeys(names, 4) if task == "world" else {}
    max_obs, max_rew = 0.0, 0.0
    for e in range(E):
        oracle.reset(seed=e)
        for k, entity in enumerate(oracle.world.entities):
            entity.state.p_pos = start_pos[e, k].copy()
            entity.state.p_vel = np.zeros(2)
        for i, o in enumerate(_oracle_obs(oracle, extra)):
            max_obs = max(max_obs, np.abs(o - ours_obs[0][i][e]).max())
        for t in range(T):
            for i, name in enumerate(names):
                a = actions[t, e, i] if i < env.n_agents else prey_act[t][e]
                oracle.step(_mpe2_action(a, oracle.action_space(name).shape[0]))
            for i, o in enumerate(_oracle_obs(oracle, extra)):
                assert o.shape == ours_obs[t + 1][i][e].shape
                max_obs = max(max_obs, np.abs(o - ours_obs[t + 1][i][e]).max())
            for i, name in enumerate(names):
                max_rew = max(max_rew, abs(oracle.rewards[name] - ours_rew[t][i][e]))
    print(f"{task}: max |obs diff| {max_obs:.2e}, max |reward diff| {max_rew:.2e}")
    assert max_obs <= 1e-4
    assert max_rew <= 1e-4


def test_prey_policy_matches_torch_network():
    """The folded numpy prey equals the README's network (BatchNorm eval -> 64 -> 64 -> tanh) in torch."""
    import torch

    for task, fname in (("pp", "simple_tag_prey_policy.npz"), ("world", "simple_world_prey_policy.npz")):
        w = {k: torch.from_numpy(v) for k, v in np.load(PREY_DIR / fname).items()}
        env = MPEVecEnv(task, 64)
        env.reset(seed=3)
        obs = torch.from_numpy(env.obs_all()[-1].astype(np.float32))
        x = (obs - w["in_fn.running_mean"]) / torch.sqrt(w["in_fn.running_var"] + 1e-5)
        x = x * w["in_fn.weight"] + w["in_fn.bias"]
        h = torch.relu(x @ w["fc1.weight"].T + w["fc1.bias"])
        h = torch.relu(h @ w["fc2.weight"].T + w["fc2.bias"])
        expected = torch.tanh(h @ w["fc3.weight"].T + w["fc3.bias"]).clamp(-1, 1).numpy()
        np.testing.assert_allclose(env.prey_action(), expected, atol=1e-5)
        assert len(load_prey_policy(fname)) == 6


def test_one_contact_step_by_hand():
    """Two overlapping cn agents at rest, zero actions: one step, computed from the formulas by hand."""
    env = MPEVecEnv("cn", 1)
    env.reset(seed=0)
    landmarks = [(0.5, 0.5), (-0.5, -0.5), (0.0, 0.5)]
    env.set_state(np.array([[(0.0, 0.0), (0.2, 0.0), (0.9, 0.9), *landmarks]]))
    obs, _, rewards, _, _ = env.step(np.zeros((1, 3, 2)))
    # penetration = k log(1 + exp((0.3 - 0.2) / k)) = 0.1 (+1e-47); force 100 * 0.1 = 10 along x0 - x1
    v = 10.0 * 0.1  # v = 0.75 * 0 + F dt
    x0, x1, x2 = np.array([-v * 0.1, 0.0]), np.array([0.2 + v * 0.1, 0.0]), np.array([0.9, 0.9])
    np.testing.assert_allclose(env.velocities[0], [[-v, 0], [v, 0], [0, 0]], atol=1e-12)
    np.testing.assert_allclose(env.positions[0, :3], [x0, x1, x2], atol=1e-12)
    cover = sum(
        min(1 / min(np.linalg.norm(np.subtract(lm, x)) for x in (x0, x1, x2)), 10) for lm in landmarks
    )
    np.testing.assert_allclose(rewards[0], [cover] * 3, rtol=1e-6)  # 0.4 apart now: no collision penalty
    expected_obs0 = [-v, 0, *x0, *(np.array(landmarks) - x0).ravel(), *(x1 - x0), *(x2 - x0), 0, 0, 0, 0]
    np.testing.assert_allclose(obs[0, 0], expected_obs0, atol=1e-6)
    # agents 0 and 2 pushing into each other (F = 5 > contact 100 * 0.02) stay in contact: -5 each
    env.set_state(np.array([[(0.0, 0.0), (0.9, 0.0), (0.28, 0.0), *landmarks]]))
    _, _, rewards, _, _ = env.step(np.array([[(1.0, 0.0), (0.0, 0.0), (-1.0, 0.0)]]))
    np.testing.assert_allclose(env.positions[0, 0], [0.1 * 0.1 * (5 - 100 * 0.02), 0], atol=1e-9)
    assert rewards[0, 0] - rewards[0, 1] == pytest.approx(-5.0) and rewards[0, 2] == rewards[0, 0]


# ---------------------------------------------------------------- random-policy returns
@pytest.mark.parametrize(
    ("task", "mean", "std"), [("cn", 158.8, 59.9), ("pp", -4.05, 10.7), ("world", -6.85, 5.7)]
)
def test_random_policy_returns(task, mean, std):
    """2000 uniform-random episodes: mean eval return within 3 standard errors of the reference's."""
    E = 2000
    env = MPEVecEnv(task, E)
    env.reset(seed=0)
    rng = np.random.default_rng(1)
    returns = np.zeros(E)
    for _ in range(T):
        _, _, rewards, _, _ = env.step(rng.uniform(-1, 1, (E, 3, 2)))
        returns += env.eval_reward(rewards)
    se = returns.std(ddof=1) / np.sqrt(E)
    print(f"{task}: mean {returns.mean():.3f} +- {se:.3f} (std {returns.std(ddof=1):.2f}); reference {mean}")
    assert abs(returns.mean() - mean) <= 3 * se
    assert 0.8 * std < returns.std(ddof=1) < 1.2 * std


# ---------------------------------------------------------------- API contract
@pytest.mark.parametrize("task", TASKS)
def test_pettingzoo_parallel_api(task):
    from pettingzoo.test import parallel_api_test

    env = MPEParallelEnv(task)
    parallel_api_test(env, num_cycles=30)
    obs, _ = env.reset(seed=5)
    vec = MPEVecEnv(task, 1)
    vec_obs, _ = vec.reset(seed=5)
    for i, agent in enumerate(env.possible_agents):
        np.testing.assert_array_equal(obs[agent], vec_obs[0, i])
        assert env.observation_space(agent).contains(obs[agent])
    for t in range(T):
        _, _, _, truncated, _ = env.step({a: np.zeros(2, np.float32) for a in env.agents})
        assert all(truncated.values()) == (t == T - 1)
    assert env.agents == []
    with pytest.raises(ValueError):
        MPEParallelEnv(task, render_mode="human")


@pytest.mark.parametrize("task", TASKS)
def test_invalid_actions_raise(task):
    env = MPEVecEnv(task, 4)
    with pytest.raises(RuntimeError):
        env.step(np.zeros((4, 3, 2)))  # before reset
    env.reset(seed=0)
    bad_shapes = [(4, 3), (4, 3, 3), (3, 3, 2), (4, 2, 2), (4, 4, 2), (12, 2)]
    for shape in bad_shapes:
        with pytest.raises(ValueError, match=r"\(4, 3, 2\)"):
            env.step(np.zeros(shape))
    for value in (np.nan, np.inf, -np.inf):
        a = np.zeros((4, 3, 2))
        a[2, 1, 0] = value
        with pytest.raises(ValueError, match="finite"):
            env.step(a)
    with pytest.raises(ValueError):
        env.step("not an action")
    assert env.t == 0  # nothing above advanced the episodes


@pytest.mark.parametrize("task", TASKS)
def test_out_of_range_actions_are_clipped(task):
    rng = np.random.default_rng(0)
    a = rng.uniform(-3, 3, (T, 8, 3, 2))
    env_raw, env_clip = MPEVecEnv(task, 8), MPEVecEnv(task, 8)
    env_raw.reset(seed=1), env_clip.reset(seed=1)
    for t in range(T):
        out_raw = env_raw.step(a[t])
        out_clip = env_clip.step(np.clip(a[t], -1, 1))
        for x, y in zip(out_raw, out_clip):
            np.testing.assert_array_equal(x, y)
    assert (np.abs(a) > 1).mean() > 0.5  # most of the input is out of range


@pytest.mark.parametrize("task", TASKS)
def test_episode_end_and_seeding(task):
    rng = np.random.default_rng(4)
    a = rng.uniform(-1, 1, (T, 70, 3, 2))

    def run(E, seed):
        env = MPEVecEnv(task, E)
        out = [env.reset(seed)]
        for t in range(T):
            out.append(env.step(a[t, :E]))
            assert out[-1][4].all() == (t == T - 1) and not out[-1][3].any()
        with pytest.raises(RuntimeError):
            env.step(a[0, :E])
        return out

    # 70 episodes span two blocks of the prey network (common.mpe.PREY_BLOCK = 64), 2 episodes one
    first, again, small, other = run(70, 11), run(70, 11), run(2, 11), run(70, 12)
    for x, y, z in zip(first, again, small):
        for xa, ya, za in zip(x, y, z):
            np.testing.assert_array_equal(xa, ya)  # same seed, same episodes
            np.testing.assert_array_equal(xa[:2], za)  # episode e does not depend on E
    assert not np.array_equal(first[0][0], other[0][0])  # another seed, other episodes
    assert first[1][0].dtype == np.float32 and first[1][2].dtype == np.float32
    assert first[1][1].shape == (70, MPEVecEnv(task, 1).state_dim)
    np.testing.assert_array_equal(first[1][1], first[1][0].reshape(70, -1))  # state = concat of obs


def test_reset_distribution():
    """Start states: agents U(-1, 1)^2, landmarks U(-1, 1)^2 (cn) or U(-0.9, 0.9)^2, velocities 0."""
    for task, half in (("cn", 1.0), ("pp", 0.9), ("world", 0.9)):
        env = MPEVecEnv(task, 4000)
        env.reset(seed=9)
        pos, A = env.positions, len(env.agent_names)
        assert np.abs(env.velocities).max() == 0
        for block, h in ((pos[:, :A], 1.0), (pos[:, A:], half)):
            assert np.abs(block).max() <= h and np.abs(block).max() > 0.99 * h
            assert abs(block.mean()) < 0.02 and abs(block.var() - h**2 / 3) < 0.01
