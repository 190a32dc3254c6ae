"""HalfCheetahVecEnv against its oracle, gymnasium_robotics.mamujoco_v1 (HalfCheetah 2x3, agent_obsk=0)."""

from __future__ import annotations

import mujoco
import numpy as np
import pytest

from common.envs import make_vec_env
from common.mamujoco import AGENT_JOINTS, HalfCheetahVecEnv, make_single_env

AGENTS = ("agent_0", "agent_1")


def oracle_rollout(seed: int, episode: int, actions: np.ndarray):
    """Run mamujoco_v1 from the start state of episode `episode` of reset(seed); actions [T, 2, 3]."""
    env = make_single_env()
    env.reset(seed=0)
    inner = env.single_agent_env.unwrapped  # HalfCheetah-v5
    # Hand it our per-episode generator, so its own reset_model draws the start state (tests the reset too).
    inner.np_random = np.random.default_rng([seed, episode])
    obs, _ = env.reset()
    start = (inner.data.qpos.copy(), inner.data.qvel.copy())
    out = {"obs": [], "state": [], "rewards": [], "truncated": [], "qpos": [], "qvel": []}
    for a in actions:
        obs, rewards, terminated, truncated, _ = env.step({agent: a[i] for i, agent in enumerate(AGENTS)})
        assert rewards["agent_0"] == rewards["agent_1"] and not terminated["agent_0"]
        out["obs"].append(np.stack([obs[agent] for agent in AGENTS]))
        out["state"].append(env.state())
        out["rewards"].append(rewards["agent_0"])
        out["truncated"].append(truncated["agent_0"])
        out["qpos"].append(inner.data.qpos.copy())
        out["qvel"].append(inner.data.qvel.copy())
    env.close()
    return start, {k: np.array(v) for k, v in out.items()}


def test_matches_mamujoco_v1():
    # (a) same start state, same actions -> same physics, obs, state, rewards, truncation
    E, T, seed = 3, 300, 11
    actions = np.random.default_rng(0).uniform(-1, 1, (T, E, 2, 3)).astype(np.float32)
    env = HalfCheetahVecEnv(E)
    env.reset(seed + 1)  # a used env must restart exactly like a fresh one
    for a in actions[:50]:
        env.step(-a)
    env.reset(seed)
    oracle = [oracle_rollout(seed, e, actions[:, e]) for e in range(E)]
    for e in range(E):
        np.testing.assert_array_equal(env.qpos[e], oracle[e][0][0])
        np.testing.assert_array_equal(env.qvel[e], oracle[e][0][1])
    for t in range(T):
        obs, state, rewards, terminated, truncated = env.step(actions[t])
        assert obs.dtype == state.dtype == rewards.dtype == np.float32
        assert obs.shape == (E, 2, 6) and state.shape == (E, 17) and rewards.shape == (E, 2)
        for e in range(E):
            ref = oracle[e][1]
            # the physics is bit-identical; the float32 outputs agree to well within 1e-6
            np.testing.assert_array_equal(env.qpos[e], ref["qpos"][t])
            np.testing.assert_array_equal(env.qvel[e], ref["qvel"][t])
            np.testing.assert_allclose(obs[e], ref["obs"][t], rtol=0, atol=1e-6)
            np.testing.assert_allclose(state[e], ref["state"][t], rtol=0, atol=1e-6)
            np.testing.assert_allclose(rewards[e], ref["rewards"][t], rtol=0, atol=1e-6)
            assert truncated[e] == ref["truncated"][t] and not terminated[e]


def test_oracle_partition_and_obs_layout():
    # (b) the constants we hard-code agree with mamujoco_v1's own factorisation
    env = make_single_env()
    global_action = env.map_local_actions_to_global_action(
        {"agent_0": np.array([0.1, 0.2, 0.3]), "agent_1": np.array([0.4, 0.5, 0.6])}
    )
    np.testing.assert_array_equal(global_action, [0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    np.testing.assert_array_equal(env.observation_factorization["agent_0"], [4, 13, 3, 12, 2, 11])
    np.testing.assert_array_equal(env.observation_factorization["agent_1"], [7, 16, 6, 15, 5, 14])
    env.close()


def test_obs_and_actuators_against_mjdata():
    # (b) observation entries are the named joints' qpos/qvel; agent i slot j drives joint AGENT_JOINTS[i][j]
    env = HalfCheetahVecEnv(2)
    model = env.model
    obs, state = env.reset(3)
    rng = np.random.default_rng(1)
    for _ in range(20):
        obs, state, *_ = env.step(rng.uniform(-1, 1, (2, 2, 3)))
    for e, data in enumerate(env.datas):
        np.testing.assert_array_equal(state[e], np.concatenate([data.qpos[1:], data.qvel]).astype(np.float32))
        for i, joints in enumerate(AGENT_JOINTS):
            expected = []
            for name in sorted(joints):  # mamujoco sorts an agent's joints by name: foot, shin, thigh
                joint = model.joint(name)
                expected += [data.qpos[joint.qposadr[0]], data.qvel[joint.dofadr[0]]]
            np.testing.assert_array_equal(obs[e, i], np.array(expected, dtype=np.float32))
    for i, joints in enumerate(AGENT_JOINTS):
        for j, name in enumerate(joints):
            actions = np.zeros((2, 2, 3))
            actions[:, i, j] = 0.5
            env.step(actions)
            for data in env.datas:
                driven = np.flatnonzero(data.ctrl)
                assert driven.size == 1 and data.ctrl[driven[0]] == 0.5
                joint_id = model.actuator_trnid[driven[0], 0]
                assert model.actuator(driven[0]).name == name
                assert mujoco.mj_id2name(model, mujoco.mjtObj.mjOBJ_JOINT, joint_id) == name


def test_reward_formula():
    # (c) reward = (x_after - x_before) / (0.01 * 5) - 0.1 * |a|^2, the same for both agents
    env = HalfCheetahVecEnv(4)
    env.reset(5)
    rng = np.random.default_rng(2)
    assert env.dt == pytest.approx(0.05)
    for _ in range(50):
        actions = rng.uniform(-1, 1, (4, 2, 3))
        x_before = np.array([data.qpos[0] for data in env.datas])
        _, _, rewards, _, _ = env.step(actions)
        x_after = np.array([data.qpos[0] for data in env.datas])
        expected = (x_after - x_before) / 0.05 - 0.1 * np.sum(actions**2, axis=(1, 2))
        np.testing.assert_allclose(rewards[:, 0], expected, rtol=1e-6, atol=1e-5)
        np.testing.assert_array_equal(rewards[:, 0], rewards[:, 1])
        np.testing.assert_array_equal(env.eval_reward(rewards), rewards[:, 0])


def test_invalid_actions_raise_and_out_of_range_is_clipped():
    # (d)
    env = HalfCheetahVecEnv(4)
    with pytest.raises(RuntimeError, match="reset"):
        env.step(np.zeros((4, 2, 3)))
    env.reset(0)
    for bad in (np.zeros((4, 6)), np.zeros((4, 2, 2)), np.zeros((3, 2, 3)), np.zeros((4, 3, 3))):
        with pytest.raises(ValueError, match=r"\(4, 2, 3\)"):
            env.step(bad)
    for value in (np.nan, np.inf, -np.inf):
        actions = np.zeros((4, 2, 3))
        actions[1, 1, 2] = value
        with pytest.raises(ValueError, match=r"\(4, 2, 3\)"):
            env.step(actions)
    with pytest.raises(ValueError, match=r"\(4, 2, 3\)"):
        env.step([["a"] * 3] * 4)
    # +-5 behaves exactly as +-1: same ctrl, same next state, same reward (control cost of the clipped action)
    big = np.random.default_rng(3).choice([-5.0, 5.0], size=(4, 2, 3))
    env_clip, env_unit = HalfCheetahVecEnv(4), HalfCheetahVecEnv(4)
    env_clip.reset(9)
    env_unit.reset(9)
    out_clip, out_unit = env_clip.step(big), env_unit.step(np.sign(big))
    assert all(np.array_equal(a, b) for a, b in zip(out_clip, out_unit))
    assert np.all(np.abs(env_clip.datas[0].ctrl) == 1.0)


def test_seeding():
    # (d) same seed -> same episode; a different seed -> a different start; episode e independent of E
    rng = np.random.default_rng(4)
    actions = rng.uniform(-1, 1, (30, 2, 2, 3))
    runs = []
    for seed in (7, 7, 8):
        env = HalfCheetahVecEnv(2)
        obs, state = env.reset(seed)
        traj = [state]
        for a in actions:
            traj.append(env.step(a)[1])
        runs.append(np.array(traj))
    np.testing.assert_array_equal(runs[0], runs[1])
    assert not np.allclose(runs[0][0], runs[2][0])
    assert not np.allclose(runs[0][0, 0], runs[0][0, 1])  # episodes within a batch differ
    _, state_big = HalfCheetahVecEnv(5).reset(7)
    np.testing.assert_array_equal(state_big[:2], runs[0][0])


def test_truncates_at_1000_steps():
    # (e) a full episode: never terminates, truncated exactly on step 1000, then step raises until reset
    env = make_vec_env("halfcheetah", 2)
    assert isinstance(env, HalfCheetahVecEnv)
    assert (env.n_agents, env.obs_dim, env.act_dim, env.state_dim, env.episode_length) == (2, 6, 3, 17, 1000)
    env.reset(0)
    actions = np.random.default_rng(5).uniform(-1, 1, (1000, 2, 2, 3))
    for t in range(1000):
        _, _, _, terminated, truncated = env.step(actions[t])
        assert not terminated.any()
        assert truncated.all() == (t == 999) and truncated.any() == (t == 999)
    with pytest.raises(RuntimeError, match="reset"):
        env.step(actions[0])
    obs, state = env.reset(1)
    assert env.step(actions[0])[4].sum() == 0
