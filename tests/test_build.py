"""common/build.py: small builds of every dataset type, loaded back through common.dataset.load_dataset.

Sizes are monkeypatched down and the behaviour files are tiny random actors written into a temporary
directory, so the tests do not depend on the shipped policies and run in a few seconds.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import common.build as build
import common.dataset
from common.dataset import DatasetError, load_dataset
from common.runs import UserError
from common.tasks import get_task
from matd3_online import Actors
from tests.helpers import write_tiny_dataset

MPE_EPISODES, HC_EPISODES = 7, 2


def actor_arrays(task: str, seed: int) -> dict[str, np.ndarray]:
    spec = get_task(task)
    torch.manual_seed(seed)
    return Actors(spec.n_agents, spec.obs_dim, spec.act_dim, hidden=16).export()


def write_policy(directory, task, dataset, noise, seed=0):
    meta = dict(task=task, type=dataset, exploration_noise=noise)
    path = directory / f"{task}_{dataset}.npz"
    np.savez(path, meta=np.array(json.dumps(meta)), **actor_arrays(task, seed))
    return path


def write_medium_replay(directory, task, noise, warmup, counts):
    snaps = [actor_arrays(task, 10 + k) for k in range(len(counts))]
    arrays = {key: np.stack([s[key] for s in snaps]).astype(np.float16) for key in snaps[0]}
    schedule = dict(warmup_episodes=warmup, episodes_per_snapshot=counts, exploration_noise=noise)
    np.savez(directory / f"{task}_medium_replay.npz", schedule=np.array(json.dumps(schedule)), **arrays)
    return snaps


@pytest.fixture
def small(monkeypatch, tmp_path):
    """Tiny sizes; batches of 3 episodes so that multi-batch builds and a short last batch are exercised."""
    behaviour = tmp_path / "behaviour"
    behaviour.mkdir()
    monkeypatch.setattr(build, "BEHAVIOUR_DIR", behaviour)
    monkeypatch.setattr(build, "EPISODES", {"mpe": MPE_EPISODES, "mamujoco": HC_EPISODES})
    monkeypatch.setattr(build, "BATCH_EPISODES", {"mpe": 3, "mamujoco": 2})
    return behaviour, tmp_path / "data"


def deterministic_actions(arrays, obs):
    policy = build.ActorPolicy([(arrays[f"w{i}"], arrays[f"b{i}"]) for i in range(3)], 0.0, "")
    return policy.act(obs, np.random.default_rng(0), None)


def check_structure(ds, task, episodes):
    spec = get_task(task)
    T = spec.episode_length
    assert len(ds) == episodes * T
    a = ds.actions.reshape(episodes, T, spec.n_agents, spec.act_dim)
    na = ds.next_actions.reshape(episodes, T, spec.n_agents, spec.act_dim)
    o = ds.obs.reshape(episodes, T, spec.n_agents, spec.obs_dim)
    no = ds.next_obs.reshape(episodes, T, spec.n_agents, spec.obs_dim)
    # inside an episode the next action / obs is the next row's action / obs, exactly
    assert torch.equal(na[:, :-1], a[:, 1:])
    assert torch.equal(no[:, :-1], o[:, 1:])
    assert ds.actions.abs().max() <= 1 and ds.next_actions.abs().max() <= 1
    timeouts = ds.timeouts.reshape(episodes, T)
    assert timeouts[:, -1].all() and not timeouts[:, :-1].any() and not ds.dones.any()


@pytest.mark.parametrize("dataset", ["random", "medium", "expert"])
def test_fixed_size_datasets_cn(small, dataset):
    behaviour, data_dir = small
    if dataset != "random":
        write_policy(behaviour, "cn", dataset, noise=0.1)
    path = build.ensure_dataset("cn", dataset, 0, data_dir, progress=False)
    ds = load_dataset(path, "cn", dataset)
    check_structure(ds, "cn", MPE_EPISODES)
    assert ds.meta["dataset"] == dataset and ds.meta["num_episodes"] == MPE_EPISODES
    if dataset != "random":
        assert ds.meta["exploration_noise"] == 0.1 and "cn_" + dataset in ds.meta["behaviour_policy"]


def test_actions_are_the_policy_plus_noise_and_last_next_action_is_sampled(small):
    behaviour, data_dir = small
    write_policy(behaviour, "cn", "expert", noise=0.0)  # noise 0: the data must be the actor's output exactly
    ds = load_dataset(build.ensure_dataset("cn", "expert", 0, data_dir, progress=False))
    arrays = actor_arrays("cn", 0)
    np.testing.assert_allclose(ds.actions.numpy(), deterministic_actions(arrays, ds.obs.numpy()), atol=1e-6)
    # the last step's next action is the behaviour's action at the final next_obs (not the next episode's)
    np.testing.assert_allclose(
        ds.next_actions.numpy(), deterministic_actions(arrays, ds.next_obs.numpy()), atol=1e-6
    )
    with_noise = build.ActorPolicy([(arrays[f"w{i}"], arrays[f"b{i}"]) for i in range(3)], 0.1, "")
    obs = ds.obs.numpy()[:50]
    diff = with_noise.act(obs, np.random.default_rng(0), None) - deterministic_actions(arrays, obs)
    assert 0.05 < diff.std() < 0.15  # N(0, 0.1^2), a little reduced by the clip


def test_numpy_actor_equals_torch_actor():
    spec = get_task("world")
    torch.manual_seed(3)
    actors = Actors(spec.n_agents, spec.obs_dim, spec.act_dim, hidden=32)
    obs = torch.randn(40, spec.n_agents, spec.obs_dim)
    expected = actors(obs).detach().numpy()
    np.testing.assert_allclose(deterministic_actions(actors.export(), obs.numpy()), expected, atol=1e-5)


def test_medium_replay_replays_the_schedule(small):
    behaviour, data_dir = small
    warmup, counts = 2, [3, 2]
    snaps = write_medium_replay(behaviour, "cn", noise=0.0, warmup=warmup, counts=counts)
    ds = load_dataset(build.ensure_dataset("cn", "medium-replay", 0, data_dir, progress=False))
    episodes = warmup + sum(counts)
    check_structure(ds, "cn", episodes)
    obs = ds.obs.numpy().reshape(episodes, 25, 3, 18)
    actions = ds.actions.numpy().reshape(episodes, 25, 3, 2)
    first = warmup
    for snap, count in zip(snaps, counts):
        # float16 storage of the snapshots: compare with the float16-rounded weights
        rounded = {k: v.astype(np.float16) for k, v in snap.items()}
        for e in range(first, first + count):
            np.testing.assert_allclose(actions[e], deterministic_actions(rounded, obs[e]), atol=1e-6)
        first += count
    for e in range(warmup):  # warm-up episodes are uniform random, not any snapshot's
        assert not np.allclose(actions[e], deterministic_actions(snaps[0], obs[e]), atol=1e-3)
    assert json.loads(ds.meta["schedule"])["episodes_per_snapshot"] == counts


def test_seeds_give_independent_copies_and_builds_are_reproducible(small, tmp_path):
    _, data_dir = small
    a = load_dataset(build.ensure_dataset("cn", "random", 0, data_dir, progress=False))
    b = load_dataset(build.ensure_dataset("cn", "random", 1, data_dir, progress=False))
    assert not torch.allclose(a.obs[0], b.obs[0]) and not torch.allclose(a.actions, b.actions)
    again = load_dataset(build.build_dataset("cn", "random", 0, tmp_path / "again.h5", progress=False))
    assert torch.equal(a.obs, again.obs) and torch.equal(a.actions, again.actions)


def test_missing_policy_raises_a_clear_error(small):
    _, data_dir = small
    with pytest.raises(FileNotFoundError, match="cn_medium_replay.npz") as e:
        build.ensure_dataset("cn", "medium-replay", 0, data_dir, progress=False)
    assert isinstance(e.value, UserError)  # the algorithm files' CLI prints it as one line
    with pytest.raises(FileNotFoundError, match="halfcheetah_expert.npz"):
        build.ensure_dataset("halfcheetah", "expert", 0, data_dir, progress=False)
    assert not list(data_dir.rglob("*.h5"))  # nothing half-written


def test_halfcheetah_tiny(small):
    behaviour, data_dir = small
    write_policy(behaviour, "halfcheetah", "expert", noise=0.1)
    ds = load_dataset(
        build.ensure_dataset("halfcheetah", "expert", 0, data_dir, progress=False), "halfcheetah"
    )
    check_structure(ds, "halfcheetah", HC_EPISODES)
    assert ds.states.shape == (HC_EPISODES * 1000, 17)
    assert torch.equal(
        ds.next_states.reshape(HC_EPISODES, 1000, 17)[:, :-1], ds.states.reshape(HC_EPISODES, 1000, 17)[:, 1:]
    )
    # agent observations are slices of the state (common/mamujoco.py OBS_INDICES)
    from common.mamujoco import OBS_INDICES

    assert torch.equal(ds.obs, ds.states[:, torch.as_tensor(OBS_INDICES)])


def test_trainer_to_dataset_end_to_end(small, tmp_path):
    """matd3_online (tiny run, stopped by --stop-return) -> export medium-replay -> build -> load."""
    import sys

    import matd3_online

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    import export_behaviour

    behaviour, data_dir = small
    args = matd3_online.Args(
        task="cn", seed=0, total_steps=8 * 4 * 25, num_envs=4, warmup_episodes=8, utd=0.05, batch_size=32,
        eval_every=1, eval_episodes=4, stop_return=-1e9, out_dir=str(tmp_path / "runs"), run_name="tiny",
        warmup_utd=0.2,
    )  # fmt: skip
    run_dir = matd3_online.main(args)
    with np.load(Path(run_dir) / "snapshots.npz") as f:
        schedule = json.loads(str(f["schedule"]))
        assert f["w0"].shape == (1, 3, 18, 64)  # stopped at the first evaluation after the warm-up
    assert schedule["stopped_by_stop_return"] and schedule["warmup_episodes"] == 8
    # critic-only warm-up rounds run --warmup-utd updates; the last warm-up round trains the actors: --utd
    assert schedule["snapshots"][0]["updates"] == 0.2 * 4 * 25 + 0.05 * 4 * 25
    args.warmup_episodes, args.warmup_utd = 4, None
    # without the stop: 8 rounds, 1 warm-up round + 7 rounds each collected by its own snapshot
    args.stop_return, args.run_name = None, "tiny2"
    run_dir = matd3_online.main(args)
    export_behaviour.main(
        export_behaviour.Args(
            run=run_dir, type="medium-replay", episodes=4, out=str(behaviour / "cn_medium_replay.npz")
        )
    )
    export_behaviour.main(
        export_behaviour.Args(
            run=run_dir, type="expert", episodes=4, candidates=2, out=str(behaviour / "cn_expert.npz")
        )
    )
    # --max-std: the snapshot closest to the target is skipped when its returns spread more than allowed
    with np.load(Path(run_dir) / "snapshots.npz") as f:
        snaps = {k: f[k] for k in f.files if k != "schedule"}
    returns = [
        export_behaviour.measure("cn", build.ActorPolicy(build.actor_layers(snaps, k), 0.1, ""), 4)
        for k in range(8)
    ]  # the episodes the export measures
    wide = int(np.argmax([r.std() for r in returns]))
    out = tmp_path / "medium.npz"
    pick = dict(run=run_dir, type="medium", target=float(returns[wide].mean()), episodes=4, out=str(out))
    export_behaviour.main(export_behaviour.Args(**pick))
    with np.load(out) as f:
        assert json.loads(str(f["meta"]))["snapshot"] == wide
    export_behaviour.main(export_behaviour.Args(**pick, max_std=float(returns[wide].std()) - 1e-3))
    with np.load(out) as f:
        assert json.loads(str(f["meta"]))["snapshot"] != wide
    with pytest.raises(SystemExit, match="max-std"):  # none eligible: one clear line
        export_behaviour.main(export_behaviour.Args(**pick, max_std=-1.0))
    ds = load_dataset(build.ensure_dataset("cn", "medium-replay", 0, data_dir, progress=False))
    check_structure(ds, "cn", 4 + 7 * 4)  # the 8th (final) snapshot collected nothing
    ds = load_dataset(build.ensure_dataset("cn", "expert", 0, data_dir, progress=False))
    check_structure(ds, "cn", MPE_EPISODES)


def test_stop_on_reads_the_chosen_evaluation(tmp_path):
    """--stop-on deterministic stops on the actors' own return, --stop-on noisy on the return with noise."""
    import matd3_online

    def run(name, **kw):
        args = matd3_online.Args(
            task="cn", seed=0, total_steps=4 * 4 * 25, num_envs=4, warmup_episodes=4, utd=0.05, batch_size=32,
            eval_every=1, eval_episodes=4, out_dir=str(tmp_path), run_name=name, **kw,
        )  # fmt: skip
        with np.load(Path(matd3_online.main(args)) / "snapshots.npz") as f:
            return json.loads(str(f["schedule"]))

    first = run("free")["snapshots"][0]  # the first evaluation, right after the warm-up
    det, noisy = first["eval_return"], first["noisy_return"]
    assert det != noisy
    threshold = (det + noisy) / 2  # only the higher of the two reaches it at the first evaluation
    high, low = ("deterministic", "noisy") if det > noisy else ("noisy", "deterministic")
    assert len(run("high", stop_return=threshold, stop_on=high)["snapshots"]) == 1
    assert len(run("low", stop_return=threshold, stop_on=low)["snapshots"]) > 1


def test_recalibrate_sets_the_noise_whose_return_meets_the_target(small):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    import export_behaviour

    behaviour, data_dir = small
    path = write_policy(behaviour, "cn", "expert", noise=0.1)
    with np.load(path) as f:
        weights = {k: f[k] for k in f.files if k != "meta"}
    layers = build.actor_layers(weights)
    target = export_behaviour.measure("cn", build.ActorPolicy(layers, 0.3, ""), 8).mean()  # the same episodes
    export_behaviour.main(
        export_behaviour.Args(
            recalibrate=str(path), target=float(target), episodes=8, noise_grid=(0.1, 0.3, 0.6)
        )
    )
    with np.load(path) as f:
        meta = json.loads(str(f["meta"]))
        assert all(np.array_equal(f[k], w) for k, w in weights.items())  # same actors
    assert meta["exploration_noise"] == 0.3 and meta["noise_calibration"]["previous_noise"] == 0.1
    assert sorted(meta["noise_calibration"]["measured"]) == ["0.1", "0.3", "0.6"]
    ds = load_dataset(build.ensure_dataset("cn", "expert", 0, data_dir, progress=False))
    assert ds.meta["exploration_noise"] == 0.3


def test_stale_dataset_is_an_error_not_a_silent_mismatch(small):
    behaviour, data_dir = small
    write_policy(behaviour, "cn", "medium", noise=0.1)
    path = build.ensure_dataset("cn", "medium", 0, data_dir, progress=False)
    assert build.ensure_dataset("cn", "medium", 0, data_dir, progress=False) == path  # up to date: reused
    write_policy(behaviour, "cn", "medium", noise=0.2)  # the shipped behaviour file changes
    with pytest.raises(DatasetError, match="stale.*--force"):
        build.ensure_dataset("cn", "medium", 0, data_dir, progress=False)
    build.main(build.BuildArgs(task="cn", dataset="medium", data_dir=str(data_dir), force=True))
    rebuilt = load_dataset(build.ensure_dataset("cn", "medium", 0, data_dir, progress=False))
    assert rebuilt.meta["exploration_noise"] == 0.2


def test_existing_dataset_is_read_without_the_lock_in_a_read_only_folder(tmp_path, monkeypatch):
    path = write_tiny_dataset(tmp_path / "data", "cn", episodes=2)
    Path(f"{path}.lock").unlink()  # left by the write
    folder = path.parent

    def no_lock(p):
        raise AssertionError(f"took the lock of {p} to read an existing dataset")

    # as root chmod does not stop writes: make taking the lock fail instead
    if os.geteuid() == 0:
        monkeypatch.setattr(build, "locked", no_lock)
        monkeypatch.setattr(common.dataset, "locked", no_lock)
    folder.chmod(0o555)
    try:
        assert build.ensure_dataset("cn", "random", 0, tmp_path / "data", progress=False) == path
        assert len(load_dataset(path, "cn", "random")) == 50
    finally:
        folder.chmod(0o755)
    assert sorted(p.name for p in folder.iterdir()) == ["seed_0.h5"]  # no lock file was created


def test_build_removes_stale_temp_files(small):
    _, data_dir = small
    folder = data_dir / "cn" / "random"
    folder.mkdir(parents=True)
    (folder / ".seed_0.h5.999999.0123abcd.tmp").write_bytes(b"half an HDF5 file")  # left by a kill -9
    (folder / ".seed_1.h5.999999.0123abcd.tmp").write_bytes(b"another dataset's")
    path = build.ensure_dataset("cn", "random", 0, data_dir, progress=False)
    names = sorted(p.name for p in folder.iterdir())
    assert names == [".seed_1.h5.999999.0123abcd.tmp", "seed_0.h5", "seed_0.h5.lock"]
    check_structure(load_dataset(path), "cn", MPE_EPISODES)
