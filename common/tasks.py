"""The four benchmark tasks (OMAR's datasets, as used by CFCQL and the SPaCQL paper).

One place that names the tasks and their shapes, so that environments, datasets and algorithm files agree.
Facts from OMAR's task code and the CFCQL reference (docs/reference.md, sections 1.2, 2, 7).
"""

from __future__ import annotations

from dataclasses import dataclass

DATASET_TYPES = ("random", "medium-replay", "medium", "expert")


@dataclass(frozen=True)
class TaskSpec:
    name: str  # our short name: cn | pp | world | halfcheetah
    family: str  # "mpe" or "mamujoco"
    omar_env_id: str  # the directory name in OMAR's dataset layout
    n_agents: int  # learning agents (predators only in pp / world)
    obs_dim: int  # per-agent observation
    act_dim: int  # per-agent action, always in [-1, 1]
    state_dim: int  # critic's state: concat of learner obs (MPE) or MuJoCo's 17-d state
    episode_length: int  # fixed; episodes never terminate early
    # sources of the conservative penalty's counterfactual samples (CFCQL reference 3.2 / 3.3)
    penalty_sources: tuple[str, ...] = ("uniform",)


TASKS: dict[str, TaskSpec] = {
    "cn": TaskSpec("cn", "mpe", "simple_spread", 3, 18, 2, 54, 25),
    "pp": TaskSpec("pp", "mpe", "simple_tag", 3, 16, 2, 48, 25),
    "world": TaskSpec("world", "mpe", "simple_world", 3, 24, 2, 72, 25),
    "halfcheetah": TaskSpec(
        "halfcheetah", "mamujoco", "HalfCheetah-v2", 2, 6, 3, 17, 1000, ("uniform", "policy", "next_policy")
    ),
}

# Accepted spellings -> canonical name.
ALIASES = {
    "cn": "cn",
    "spread": "cn",
    "simple_spread": "cn",
    "cooperative_navigation": "cn",
    "pp": "pp",
    "tag": "pp",
    "simple_tag": "pp",
    "predator_prey": "pp",
    "world": "world",
    "simple_world": "world",
    "halfcheetah": "halfcheetah",
    "hc": "halfcheetah",
    "HalfCheetah-v2": "halfcheetah",
    "halfcheetah_2x3": "halfcheetah",
}


def get_task(name: str) -> TaskSpec:
    """Canonical TaskSpec for `name`; unknown names raise a ValueError listing the valid ones."""
    key = ALIASES.get(name, ALIASES.get(str(name).lower()))
    if key is None:
        raise ValueError(
            f"unknown task {name!r}; expected one of {sorted(TASKS)} (aliases: {sorted(ALIASES)})"
        )
    return TASKS[key]


def check_dataset_type(dataset: str) -> str:
    if dataset not in DATASET_TYPES:
        raise ValueError(f"unknown dataset type {dataset!r}; expected one of {list(DATASET_TYPES)}")
    return dataset


@dataclass(frozen=True)
class ReferenceHparams:
    """CFCQL's per-task settings as the reference ran them (cfcql-reference.md sections 1.2, 1.3, 3.7).

    One update round = 1 critic+actor step, then 4 critic-only steps (each on a fresh minibatch), then one soft
    update of every target network. `num_updates` and `eval_every` count such rounds.
    """

    lr: float  # Adam, every network
    batch_size: int
    hidden: int
    tau: float  # Polyak rate of the single target update per round
    num_updates: int  # rounds: num_steps / steps_per_update + 1 in the reference
    eval_every: int  # rounds between evaluations: eval_interval / steps_per_update
    alpha: dict  # conservative-penalty weight per dataset type


REFERENCE_HPARAMS: dict[str, ReferenceHparams] = {
    # simple_spread: 200k fake steps, an update round every 100 -> 2001 rounds; eval every 1000 steps
    "cn": ReferenceHparams(
        0.01, 1024, 64, 0.01, 2001, 10, {"random": 0.5, "medium-replay": 1.0, "medium": 5.0, "expert": 2.5}
    ),
    "pp": ReferenceHparams(
        0.001, 1024, 64, 0.01, 2001, 10, {"random": 0.5, "medium-replay": 0.5, "medium": 0.6, "expert": 2.0}
    ),
    # simple_world keeps the default 100k steps but updates every 20 -> 5001 rounds (reference quirk B10)
    "world": ReferenceHparams(
        0.001, 1024, 64, 0.01, 5001, 50, {"random": 0.5, "medium-replay": 0.5, "medium": 0.32, "expert": 0.3}
    ),
    # HalfCheetah: 1M steps, update every 10 -> 100001 rounds; eval every 5000 steps
    "halfcheetah": ReferenceHparams(
        3e-4,
        256,
        256,
        0.005,
        100001,
        500,
        {"random": 0.1, "medium-replay": 0.4, "medium": 1.0, "expert": 1.7},
    ),
}


def default_hint(name: str, families: tuple[str, ...]) -> str:
    """The `--help` text of a per-task default, e.g. "(default per task: cn 0.01, pp 0.001, world 0.001)"."""
    parts = []
    for task, hp in REFERENCE_HPARAMS.items():
        if TASKS[task].family in families:
            value = getattr(hp, name)
            if isinstance(value, dict):  # per dataset type
                value = "/".join(f"{v:g}" for v in value.values())
            parts.append(f"{task} {value:g}" if not isinstance(value, str) else f"{task} {value}")
    by_type = " for random/medium-replay/medium/expert" if name == "alpha" else ""
    return f"(default per task{by_type}: {', '.join(parts)})"
