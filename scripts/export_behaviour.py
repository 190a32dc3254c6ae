"""Turn a matd3_online.py run into a shipped behaviour file common/behaviour/<task>_<type>.npz.

    expert         the snapshot with the best return with exploration noise (default), the one closest to
                   --target if given, or --snapshot k
    medium         among the snapshots, the one whose return WITH exploration noise is closest to --target
                   (OMAR's medium return by default), re-measured on --episodes episodes
                   (both: --max-std S keeps only candidates whose episode returns spread at most S)
    medium-replay  every snapshot of a run stopped at medium (matd3_online.py --stop-return ... --eval-every 1)
                   that collected episodes, as float16 (or float32), plus the run's schedule
    --recalibrate  an exported expert/medium file: keep its actors, set the exploration noise (on a grid) whose
                   return with noise is closest to --target (OMAR's protocol fixes MATD3 + noise, not its level)

Every choice is re-measured with common.build's numpy rollout (the code that builds the datasets), and the
returns are stored in the file's `meta` / `schedule`.

    python scripts/export_behaviour.py --run runs/cn_expert --type expert
    python scripts/export_behaviour.py --run runs/cn_expert --type medium
    python scripts/export_behaviour.py --run runs/cn_mr --type medium-replay
    python scripts/export_behaviour.py --recalibrate common/behaviour/cn_expert.npz --target 531.0
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common.build import BEHAVIOUR_DIR, ActorPolicy, UniformPolicy, actor_layers, behaviour_file, rollout  # noqa: E402
from common.dataset import episode_returns  # noqa: E402
from common.tasks import get_task  # noqa: E402

# OMAR's published mean returns of the medium datasets (cfcql-reference.md Sec. 5.3), the default --target.
# For halfcheetah pass --target (about half of our expert's return): our MuJoCo differs from OMAR's.
OMAR_MEDIUM = {"cn": 273.4, "pp": 116.4, "world": 65.9, "halfcheetah": 1568.9}
EVAL_KEYS = (99, 0)  # seed keys of the export's measurements: disjoint from the datasets' (task, type, seed)


@dataclass
class Args:
    run: str | None = None
    """run directory of matd3_online.py (holds snapshots.npz)"""
    recalibrate: str | None = None
    """an exported expert/medium file whose exploration noise is re-chosen for --target (instead of --run)"""
    noise_grid: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(2, 21))
    """--recalibrate: the noise levels measured (default 0.10, 0.15, ..., 1.00)"""
    type: str = "expert"
    """expert | medium | medium-replay"""
    snapshot: int | None = None
    """expert/medium: export this snapshot index instead of choosing"""
    target: float | None = None
    """medium (default OMAR's medium return) / expert (default: the best): target return with noise;
    --recalibrate: required"""
    max_std: float | None = None
    """medium/expert: only snapshots whose return std (over the measured episodes) is at most this"""
    candidates: int = 8
    """medium/expert: how many snapshots (closest by the run's own eval) to re-measure"""
    episodes: int | None = None
    """episodes per measurement (default 2000 MPE, 20 halfcheetah)"""
    until_return: float | None = None
    """medium-replay: cut the run at its first evaluation whose return with noise reaches this"""
    float16: bool = True
    """medium-replay: store the snapshots as float16 (half the size; --no-float16 keeps float32)"""
    every: int = 1
    """medium-replay: keep every k-th snapshot (each then collects the episodes of the k - 1 dropped after it)"""
    out: str | None = None
    """output file (default common/behaviour/<task>_<type>.npz)"""


def measure(task: str, policy, episodes: int, key: int = 0) -> np.ndarray:
    spec = get_task(task)
    arrays = rollout(task, [policy], np.zeros(episodes, np.int64), (*EVAL_KEYS, key), progress=False)
    return episode_returns(spec, arrays["rewards"], arrays["dones"], arrays["timeouts"])


def recalibrate_noise(args: Args):
    """Re-choose the exploration noise of an exported expert/medium behaviour so that its return with noise is the
    closest on args.noise_grid to args.target; rewrites the file with the same actors and the new noise in `meta`."""
    path = Path(args.recalibrate)
    with np.load(path, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    meta = json.loads(str(arrays.pop("meta")))
    if args.target is None:
        raise SystemExit("error: --recalibrate needs --target (the mean return with noise to match)")
    task, layers = meta["task"], actor_layers(arrays)
    episodes = args.episodes or (2000 if get_task(task).family == "mpe" else 20)
    measured = {s: float(measure(task, ActorPolicy(layers, s, ""), episodes).mean()) for s in args.noise_grid}
    for s, r in measured.items():
        print(f"noise {s:.2f}: return with noise {r:.1f}")
    best = min(measured, key=lambda s: abs(measured[s] - args.target))
    noisy = measure(task, ActorPolicy(layers, best, ""), episodes, key=1)  # fresh episodes
    meta |= dict(
        exploration_noise=best,
        return_with_noise=float(noisy.mean()),
        return_with_noise_std=float(noisy.std()),
        noise_calibration=dict(
            target_return=args.target,
            previous_noise=meta["exploration_noise"],
            measured=measured,
            measured_episodes=episodes,
        ),
    )
    out = Path(args.out) if args.out else path
    np.savez_compressed(out, meta=np.array(json.dumps(meta)), **arrays)
    print(f"{out}: noise {best}, return with noise {noisy.mean():.1f} +- {noisy.std():.1f}")


def main(args: Args):
    if args.recalibrate:
        return recalibrate_noise(args)
    if args.run is None:
        raise SystemExit(
            "error: give --run (a matd3_online.py run folder) or --recalibrate (a behaviour file)"
        )
    with np.load(os.path.join(args.run, "snapshots.npz"), allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    schedule = json.loads(str(arrays.pop("schedule")))
    task, noise, info = schedule["task"], schedule["exploration_noise"], schedule["snapshots"]
    spec = get_task(task)
    episodes = args.episodes or (2000 if spec.family == "mpe" else 20)
    out = Path(args.out) if args.out else behaviour_file(task, args.type)
    out.parent.mkdir(parents=True, exist_ok=True)
    run_name = os.path.basename(os.path.normpath(args.run))

    if args.type in ("expert", "medium"):
        recorded = np.array([s["noisy_return"] for s in info])
        target = args.target if args.target is not None or args.type == "expert" else OMAR_MEDIUM[task]
        if args.snapshot is not None:
            candidates = [args.snapshot % len(info)]
        elif target is None:  # expert: the best
            candidates = list(np.argsort(-recorded)[: args.candidates])
        else:
            candidates = list(np.argsort(np.abs(recorded - target))[: args.candidates])
        measured, spread = {}, {}
        for k in candidates:
            returns = measure(task, ActorPolicy(actor_layers(arrays, k), noise, ""), episodes)
            measured[int(k)], spread[int(k)] = float(returns.mean()), float(returns.std())
            print(
                f"snapshot {k} (env steps {info[k]['env_steps']}): run's eval {recorded[k]:.1f}, "
                f"measured {returns.mean():.1f} +- {returns.std():.1f}"
            )
        eligible = [k for k in measured if args.max_std is None or spread[k] <= args.max_std]
        if not eligible:
            raise SystemExit(f"error: no candidate snapshot has a return std <= --max-std {args.max_std}")
        if target is None:
            best = max(eligible, key=measured.get)
        else:
            best = min(eligible, key=lambda k: abs(measured[k] - target))
        policy = ActorPolicy(actor_layers(arrays, best), noise, "")
        noisy = measure(task, policy, episodes, key=1)  # fresh episodes: the selection is not the measurement
        det = measure(task, ActorPolicy(actor_layers(arrays, best), 0.0, ""), episodes, key=2)
        meta = dict(
            task=task,
            type=args.type,
            exploration_noise=noise,
            source_run=run_name,
            snapshot=int(best),
            env_steps=info[best]["env_steps"],
            updates=info[best]["updates"],
            return_with_noise=float(noisy.mean()),
            return_with_noise_std=float(noisy.std()),
            return_deterministic=float(det.mean()),
            selection=f"snapshot {args.snapshot} given"
            if args.snapshot is not None
            else f"best of {len(measured)}",
            target_return=target,
            max_std=args.max_std,
            candidates_measured=measured,
            candidates_std=spread,
            measured_episodes=episodes,
            training_args=schedule["args"],
        )
        weights = {k: v[best].astype(np.float32) for k, v in arrays.items()}
        np.savez_compressed(out, meta=np.array(json.dumps(meta)), **weights)
        print(
            f"{out}: snapshot {best}, return with noise {noisy.mean():.1f} +- {noisy.std():.1f}, deterministic {det.mean():.1f}"
        )
        return

    # medium-replay: the snapshots up to the stop, in order. A run stopped by --stop-return is used whole;
    # --until-return cuts the prefix of a longer run at its first evaluation with a return (with noise) >= X.
    counts = np.array(schedule["episodes_per_snapshot"])
    stopped = schedule["stopped_by_stop_return"]
    if args.until_return is not None:
        reached = [k for k, s in enumerate(info) if s["noisy_return"] >= args.until_return]
        if not reached:
            raise SystemExit(f"{args.run}: no evaluation reached {args.until_return}")
        counts[reached[0] :] = 0  # the run "stops" there: that snapshot and the later ones collect nothing
        stopped = True
    # --every k: keep every k-th snapshot; it stands in for the policies of the k - 1 dropped after it
    # (an approximation, recorded in the schedule; k = 1 replays the exact sequence of policies)
    groups = np.arange(len(counts)) // args.every
    counts = np.bincount(groups, weights=counts).astype(int)
    arrays = {key: v[:: args.every] for key, v in arrays.items()}
    info = info[:: args.every]
    snapshot_rounds = schedule["snapshot_rounds"][:: args.every]
    keep = np.flatnonzero(counts > 0)
    dtype = np.float16 if args.float16 else np.float32
    weights = {k: v[keep].astype(dtype) for k, v in arrays.items()}
    # storage check: the last snapshot's return with the stored vs the float32 weights, same episodes
    last = int(keep[-1])
    r32 = measure(task, ActorPolicy(actor_layers(arrays, last), noise, ""), episodes).mean()
    r16 = measure(task, ActorPolicy(actor_layers(weights, len(keep) - 1), noise, ""), episodes).mean()
    policies = [UniformPolicy()] + [
        ActorPolicy(actor_layers(weights, i), noise, "") for i in range(len(keep))
    ]
    episode_policy = np.repeat(np.arange(len(keep) + 1), [schedule["warmup_episodes"]] + list(counts[keep]))
    data = rollout(task, policies, episode_policy, (*EVAL_KEYS, 3), progress=False)
    returns = episode_returns(spec, data["rewards"], data["dones"], data["timeouts"])
    new_schedule = dict(
        task=task,
        type="medium-replay",
        exploration_noise=noise,
        warmup_episodes=schedule["warmup_episodes"],
        episodes_per_snapshot=[int(c) for c in counts[keep]],
        snapshot_rounds=[snapshot_rounds[k] for k in keep],
        snapshot_thinning=args.every,
        snapshot_env_steps=[info[k]["env_steps"] for k in keep],
        num_envs=schedule["num_envs"],
        total_episodes=int(schedule["warmup_episodes"] + counts[keep].sum()),
        total_transitions=int((schedule["warmup_episodes"] + counts[keep].sum()) * spec.episode_length),
        stopped_at_medium=bool(stopped),
        stop_return=args.until_return if args.until_return is not None else schedule["args"]["stop_return"],
        last_snapshot_noisy_return=info[int(keep[-1])]["noisy_return"],
        source_run=run_name,
        storage_dtype=np.dtype(dtype).name,
        storage_check=dict(
            last_snapshot_return_float32=float(r32), last_snapshot_return_stored=float(r16), episodes=episodes
        ),
        rebuilt_return_mean=float(returns.mean()),
        rebuilt_return_std=float(returns.std()),
        training_args=schedule["args"],
    )
    np.savez_compressed(out, schedule=np.array(json.dumps(new_schedule)), **weights)
    print(
        f"{out}: {len(keep)} snapshots, {new_schedule['total_episodes']} episodes, rebuilt return {returns.mean():.1f} +- {returns.std():.1f}; "
        f"last snapshot float32 {r32:.1f} vs stored {np.dtype(dtype).name} {r16:.1f}; {out.stat().st_size / 1e6:.2f} MB"
    )


if __name__ == "__main__":
    assert BEHAVIOUR_DIR.name == "behaviour"
    main(tyro.cli(Args))
