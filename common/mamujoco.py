"""Multi-Agent MuJoCo HalfCheetah 2x3 (agent_obsk=0) as a lockstep batch of E episodes.

The task is `gymnasium_robotics.mamujoco_v1.parallel_env("HalfCheetah", "2x3", agent_obsk=0,
global_categories=())`, i.e. Gymnasium's HalfCheetah-v5 on mujoco 4.0.0 split into two agents
(shared/reference/benchmark-tasks.md, section 3):

- agent 0 drives the back leg, actions -> actuators (bthigh, bshin, bfoot) with gears (120, 90, 60);
  agent 1 drives the front leg, actions -> (fthigh, fshin, ffoot) with gears (120, 60, 30).
- each agent observes its own three joints, sorted by name, position and velocity interleaved:
  agent 0 [bfoot q, q', bshin q, q', bthigh q, q'], agent 1 [ffoot ..., fshin ..., fthigh ...] (6-d);
  as indices into the 17-d state these are `OBS_INDICES`.
- state = qpos[1:] (8) + qvel (9) = 17-d, the single-agent HalfCheetah-v5 observation.
- team reward (HalfCheetah-v5 `step`): (x_after - x_before) / dt - 0.1 * sum(a^2), dt = 0.01 * 5,
  copied to both agents; episodes never terminate and are truncated at step 1000.
- reset: qpos = qpos0 + U(-0.1, 0.1), qvel = 0 + 0.1 * N(0, 1) (HalfCheetah-v5 `reset_model`), drawn for
  episode e of `reset(seed)` from `np.random.default_rng([seed, e])` (docs/INTERFACES.md).

For speed we step the MuJoCo model directly (one MjModel, E MjData, `mj_step(nstep=5)`) instead of going
through the Gymnasium and PettingZoo wrappers; tests/test_mamujoco.py checks that trajectories, observations
and rewards are identical to `mamujoco_v1`'s. `make_single_env()` returns the real wrapped env for users
of the standard tooling.

Deviations, all deliberate:
1. Physics version. The reference (OMAR, CFCQL) ran HalfCheetah-v2 on mujoco-py with MuJoCo 1.50/2.0.
   Model, observation, action and reward definitions are the same, but contact/solver numerics differ, so
   trajectories diverge and absolute returns are NOT comparable to the OMAR/CFCQL tables; compare only
   against baselines run on this stack (mujoco==4.0.0, gymnasium==1.4.0, gymnasium-robotics==1.4.2).
2. Actions are clipped to [-1, 1] before they are applied, and the control cost uses the clipped action.
   HalfCheetah-v5 leaves clamping to MuJoCo (ctrlrange +-1) and charges the unclipped action, so the two
   differ only for out-of-range actions, where ours charges the torque actually applied.
3. `mj_rnePostConstraint`, which HalfCheetah-v5 calls after each step, is skipped: it only fills
   force/acceleration outputs (cacc, cfrc_*) that neither the observation nor the reward reads.
4. The reference's reset was seeded from OS entropy (`MujocoMulti.seed` is a no-op); ours is reproducible.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import gymnasium
import mujoco
import numpy as np

from common.tasks import TaskSpec, get_task

XML_PATH = os.path.join(os.path.dirname(gymnasium.__file__), "envs", "mujoco", "assets", "half_cheetah.xml")
FRAME_SKIP = 5  # HalfCheetah-v5 default: dt = 0.01 * 5 = 0.05 s per env step
FORWARD_REWARD_WEIGHT = 1.0
CTRL_COST_WEIGHT = 0.1
RESET_NOISE_SCALE = 0.1

# Joint (= actuator) names each agent controls, in its action order (mamujoco's HalfCheetah 2x3 partition).
AGENT_JOINTS = (("bthigh", "bshin", "bfoot"), ("fthigh", "fshin", "ffoot"))
# Per-agent observation as indices into the 17-d state [qpos[1:9], qvel[0:9]]: joints sorted by name,
# (qpos, qvel) per joint. Joint j has qpos at state[j - 1] and qvel at state[8 + j].
OBS_INDICES = np.array([[4, 13, 3, 12, 2, 11], [7, 16, 6, 15, 5, 14]])


@contextmanager
def quiet_settotalmass():
    """Swallow MuJoCo's deprecation warning for half_cheetah.xml's `settotalmass` while compiling.

    MuJoCo >= 3.3 warns that the compiler attribute is deprecated; by default the warning goes to stderr and is
    appended to ./MUJOCO_LOG.TXT. The model is still compiled as before. Other MuJoCo warnings raised meanwhile
    are passed on as Python warnings.
    """
    import warnings

    def handler(message: str) -> None:
        if "settotalmass" not in message:
            warnings.warn(f"MuJoCo: {message}", stacklevel=2)

    previous = mujoco.get_mju_user_warning()
    mujoco.set_mju_user_warning(handler)
    try:
        yield
    finally:
        mujoco.set_mju_user_warning(previous)


def load_model() -> mujoco.MjModel:
    """The MjModel of Gymnasium's HalfCheetah-v5 (its own half_cheetah.xml)."""
    with quiet_settotalmass():
        return mujoco.MjModel.from_xml_path(XML_PATH)


def make_single_env(**kwargs):
    """The real PettingZoo parallel env of this task, for users who want the standard tooling.

    Observations are float64 dicts keyed "agent_0", "agent_1"; `env.state()` is the 17-d state.
    """
    from gymnasium_robotics import mamujoco_v1

    with quiet_settotalmass():
        return mamujoco_v1.parallel_env("HalfCheetah", "2x3", agent_obsk=0, global_categories=(), **kwargs)


class HalfCheetahVecEnv:
    """E lockstep HalfCheetah 2x3 episodes with the API of docs/INTERFACES.md ("Vectorised environments").

    obs [E, 2, 6], state [E, 17], rewards [E, 2] (the team reward, copied), all float32.
    Physics runs in float64 inside MjData; only the returned arrays are cast.
    """

    def __init__(self, num_envs: int, task: str = "halfcheetah"):
        if int(num_envs) < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}")
        self.spec: TaskSpec = get_task(task)
        if self.spec.name != "halfcheetah":
            raise ValueError(f"HalfCheetahVecEnv only runs the halfcheetah task, got {task!r}")
        self.num_envs = int(num_envs)
        self.n_agents = self.spec.n_agents
        self.obs_dim = self.spec.obs_dim
        self.act_dim = self.spec.act_dim
        self.state_dim = self.spec.state_dim
        self.episode_length = self.spec.episode_length

        self.model = load_model()
        self.datas = [mujoco.MjData(self.model) for _ in range(self.num_envs)]
        self.dt = self.model.opt.timestep * FRAME_SKIP  # the same expression as MujocoEnv.dt
        # Agent i slot j drives actuator ACT_IDS[i, j]; for HalfCheetah this is simply 3 * i + j.
        self.act_ids = np.array(
            [[self.model.actuator(name).id for name in joints] for joints in AGENT_JOINTS]
        )
        # float64 mirrors of every episode's qpos / qvel, refreshed after each reset and step
        self.qpos = np.zeros((self.num_envs, self.model.nq))
        self.qvel = np.zeros((self.num_envs, self.model.nv))
        self.t = 0
        self._needs_reset = True

    # ---------------------------------------------------------------------------------------------------------
    def reset(self, seed: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Start E new episodes; episode e draws its start state from np.random.default_rng([seed, e]).

        seed=None draws a fresh seed from OS entropy (not reproducible).
        Returns obs [E, 2, 6] and state [E, 17], float32.
        """
        if seed is None:
            seed = int(np.random.SeedSequence().generate_state(1)[0])
        nq, nv = self.model.nq, self.model.nv
        for e, data in enumerate(self.datas):
            rng = np.random.default_rng([seed, e])
            # HalfCheetah-v5 reset_model: uniform noise on qpos, then Gaussian noise on qvel, same draw order
            qpos = self.model.qpos0 + rng.uniform(low=-RESET_NOISE_SCALE, high=RESET_NOISE_SCALE, size=nq)
            qvel = np.zeros(nv) + RESET_NOISE_SCALE * rng.standard_normal(nv)
            mujoco.mj_resetData(self.model, data)  # also clears ctrl and the solver's warm start
            data.qpos[:] = qpos
            data.qvel[:] = qvel
            mujoco.mj_forward(self.model, data)  # as MujocoEnv.set_state
            self.qpos[e] = data.qpos
            self.qvel[e] = data.qvel
        self.t = 0
        self._needs_reset = False
        return self._observe()

    def step(self, actions) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Apply actions [E, 2, 3] (clipped to [-1, 1]) for one env step (5 physics steps).

        Returns obs [E, 2, 6], state [E, 17], rewards [E, 2] (float32), terminated [E] (always False),
        truncated [E] (True on step 1000, after which step raises until reset).
        """
        if self._needs_reset:
            raise RuntimeError("call reset() before step() (the episodes are over or were never started)")
        actions = self._check_actions(actions)
        actions = np.clip(actions, -1.0, 1.0)  # deviation 2 in the module docstring
        ctrl = np.empty((self.num_envs, self.model.nu))
        ctrl[:, self.act_ids] = actions  # [E, 6] in actuator order

        x_before = self.qpos[:, 0].copy()
        for e, data in enumerate(self.datas):
            data.ctrl[:] = ctrl[e]
            mujoco.mj_step(self.model, data, nstep=FRAME_SKIP)
            self.qpos[e] = data.qpos
            self.qvel[e] = data.qvel
        self.t += 1

        # HalfCheetah-v5 step / _get_rew, term by term so that the float64 rounding matches
        x_velocity = (self.qpos[:, 0] - x_before) / self.dt
        forward_reward = FORWARD_REWARD_WEIGHT * x_velocity
        ctrl_cost = CTRL_COST_WEIGHT * np.sum(np.square(ctrl), axis=1)
        team_reward = forward_reward - ctrl_cost  # [E]
        rewards = np.repeat(team_reward[:, None], self.n_agents, axis=1).astype(np.float32)  # [E, n]

        terminated = np.zeros(self.num_envs, dtype=bool)
        truncated = np.full(self.num_envs, self.t >= self.episode_length)
        if self.t >= self.episode_length:
            self._needs_reset = True
        obs, state = self._observe()
        return obs, state, rewards, terminated, truncated

    def eval_reward(self, rewards: np.ndarray) -> np.ndarray:
        """Per-step evaluation reward [E]: the team reward (agent 0's copy)."""
        return np.asarray(rewards)[:, 0]

    # ---------------------------------------------------------------------------------------------------------
    def _observe(self) -> tuple[np.ndarray, np.ndarray]:
        state = np.concatenate([self.qpos[:, 1:], self.qvel], axis=1)  # [E, 17] float64
        obs = state[:, OBS_INDICES]  # [E, n, obs_dim]
        return obs.astype(np.float32), state.astype(np.float32)

    def _check_actions(self, actions) -> np.ndarray:
        expected = (self.num_envs, self.n_agents, self.act_dim)
        try:
            actions = np.asarray(actions, dtype=np.float64)
        except (TypeError, ValueError) as err:
            raise ValueError(f"actions must be a numeric array of shape {expected} (E, n, act_dim)") from err
        if actions.shape != expected:
            raise ValueError(f"actions must have shape {expected} (E, n, act_dim), got {actions.shape}")
        if not np.all(np.isfinite(actions)):
            raise ValueError(f"actions of shape {expected} contain NaN or inf")
        return actions
