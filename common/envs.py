"""One entry point for the vectorised environments of all four tasks (docs/INTERFACES.md)."""

from __future__ import annotations

from common.tasks import get_task


def make_vec_env(task: str, num_envs: int):
    """E lockstep episodes of `task` (any name or alias that common.tasks.get_task accepts).

    MPE tasks -> common.mpe.MPEVecEnv, HalfCheetah -> common.mamujoco.HalfCheetahVecEnv. The imports are
    lazy so that using one family does not import the other's simulator.
    """
    spec = get_task(task)
    if spec.family == "mpe":
        from common.mpe import MPEVecEnv

        return MPEVecEnv(spec.name, num_envs)
    if spec.family == "mamujoco":
        from common.mamujoco import HalfCheetahVecEnv

        return HalfCheetahVecEnv(num_envs, spec.name)
    raise ValueError(f"task {spec.name!r} has unknown family {spec.family!r}")
