"""common/dataset.py and common/omar_import.py: round trip, validation, atomic / concurrent writes, OMAR import."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from common import dataset as ds
from common import omar_import
from common.dataset import (
    REFERENCE_RETURNS,
    DatasetError,
    dataset_path,
    load_dataset,
    locked,
    normalized_score,
    write_dataset,
)
from common.runs import UserError
from common.tasks import get_task


def make_arrays(task: str, num_episodes: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A well-formed random dataset of whole fixed-length episodes, time-limit ends only."""
    spec = get_task(task)
    rng = np.random.default_rng(seed)
    n, T = spec.n_agents, spec.episode_length
    N = num_episodes * T
    arrays = dict(
        obs=rng.normal(size=(N, n, spec.obs_dim)),
        actions=rng.uniform(-1, 1, size=(N, n, spec.act_dim)),
        rewards=rng.normal(size=(N, n)),
        next_obs=rng.normal(size=(N, n, spec.obs_dim)),
        next_actions=rng.uniform(-1, 1, size=(N, n, spec.act_dim)),
        dones=np.zeros(N, bool),
        timeouts=(np.arange(N) % T) == T - 1,
    )
    if spec.family == "mamujoco":
        arrays["states"] = rng.normal(size=(N, spec.state_dim))
        arrays["next_states"] = rng.normal(size=(N, spec.state_dim))
    return {k: v.astype(np.float32) if v.dtype == np.float64 else v for k, v in arrays.items()}


def write(path, task="cn", dataset="random", **arrays):
    return write_dataset(
        path, task=task, dataset=dataset, seed=0, **arrays, behaviour_policy="uniform", generator="test"
    )


# ---------------------------------------------------------------------------------------------------------------
# round trip
# ---------------------------------------------------------------------------------------------------------------


def test_dataset_path():
    assert dataset_path("data", "simple_spread", "medium-replay", 3) == Path(
        "data/cn/medium-replay/seed_3.h5"
    )
    with pytest.raises(ValueError):
        dataset_path("data", "cn", "mediocre", 0)


def test_round_trip_and_return_stats(tmp_path):
    arrays = make_arrays("cn", num_episodes=2)
    # hand-computed returns with cn's aggregation (mean over agents): episode 0 earns 1 per step -> 25,
    # episode 1 earns mean(0, 3, 6) = 3 per step -> 75
    arrays["rewards"][:25] = 1.0
    arrays["rewards"][25:] = [0.0, 3.0, 6.0]
    path = write(
        tmp_path / "cn" / "random" / "seed_0.h5", extra_attrs={"note": "toy", "cfg": {"a": 1}}, **arrays
    )
    data = load_dataset(path, task="cn", dataset="random")

    assert len(data) == 50
    for key, value in arrays.items():
        got = getattr(data, key)
        assert got.dtype == torch.float32 and got.device.type == "cpu"
        np.testing.assert_array_equal(got.numpy(), value.astype(np.float32))
    np.testing.assert_array_equal(data.states.numpy(), arrays["obs"].reshape(50, 54))
    np.testing.assert_array_equal(data.next_states.numpy(), arrays["next_obs"].reshape(50, 54))

    meta = data.meta
    for key in ds.RESERVED_ATTRS:
        assert key in meta, key
    assert (meta["task"], meta["dataset"], meta["dataset_seed"]) == ("cn", "random", 0)
    assert (meta["num_transitions"], meta["num_episodes"]) == (50, 2)
    assert meta["return_mean"] == pytest.approx(50.0)
    assert meta["return_std"] == pytest.approx(25.0)
    assert (meta["return_min"], meta["return_max"]) == (pytest.approx(25.0), pytest.approx(75.0))
    assert (meta["ref_random_return"], meta["ref_expert_return"]) == REFERENCE_RETURNS["cn"]
    assert meta["package_versions"]["numpy"] == np.__version__
    assert meta["note"] == "toy" and meta["cfg"] == '{"a": 1}'


def test_returns_use_agent_0_for_predator_prey(tmp_path):
    arrays = make_arrays("pp", num_episodes=1)
    arrays["rewards"][:] = [2.0, 100.0, -100.0]  # only predator 0's reward counts
    data = load_dataset(write(tmp_path / "pp.h5", task="pp", **arrays))
    assert data.meta["return_mean"] == pytest.approx(50.0)


def test_halfcheetah_round_trip_with_early_termination(tmp_path):
    arrays = make_arrays("halfcheetah", num_episodes=2)
    # a terminated episode may be shorter: 1000 + 400 (done) + 1000 rows
    more = make_arrays("halfcheetah", num_episodes=1, seed=1)
    arrays = {k: np.concatenate([arrays[k][:1400], more[k]]) for k in arrays}
    arrays["timeouts"][1399] = False
    arrays["dones"][1399] = True
    data = load_dataset(write(tmp_path / "hc.h5", task="halfcheetah", **arrays), task="hc")
    np.testing.assert_array_equal(data.states.numpy(), arrays["states"])
    assert data.meta["num_episodes"] == 3
    returns = [
        arrays["rewards"][a:b, 0].sum(dtype=np.float64) for a, b in ((0, 1000), (1000, 1400), (1400, 2400))
    ]
    assert data.meta["return_mean"] == pytest.approx(np.mean(returns), rel=1e-6)
    assert data.dones.sum() == 1 and data.timeouts.sum() == 2


# ---------------------------------------------------------------------------------------------------------------
# validation: every problem raises DatasetError naming the file
# ---------------------------------------------------------------------------------------------------------------


def _wrong_shape(a):
    a["obs"] = a["obs"][:, :, :-1]


def _nan(a):
    a["next_obs"][7, 1, 3] = np.nan


def _action_out_of_range(a):
    a["actions"][3, 0, 1] = 1.01


def _last_not_ended(a):
    a["timeouts"][-1] = False


def _short_episode(a):
    a["timeouts"][30] = True  # splits episode 1 into 6 + 19 steps


def _long_episode(a):
    a["timeouts"][24] = False  # merges episodes 0 and 1 into 50 steps


def _flag_not_binary(a):
    a["dones"] = a["dones"].astype(np.float32)
    a["dones"][5] = 0.5


@pytest.mark.parametrize(
    "corrupt",
    [
        _wrong_shape,
        _nan,
        _action_out_of_range,
        _last_not_ended,
        _short_episode,
        _long_episode,
        _flag_not_binary,
    ],
)
def test_write_rejects_bad_arrays(tmp_path, corrupt):
    arrays = make_arrays("cn", num_episodes=2)
    corrupt(arrays)
    path = tmp_path / "bad_input.h5"
    with pytest.raises(DatasetError, match="bad_input.h5"):
        write(path, **arrays)
    assert not path.exists()


def test_write_rejects_states_for_mpe_and_requires_them_for_halfcheetah(tmp_path):
    a = make_arrays("cn", num_episodes=1)
    with pytest.raises(DatasetError, match="computed on load"):
        write(tmp_path / "x.h5", states=a["obs"].reshape(25, -1), next_states=a["obs"].reshape(25, -1), **a)
    a = make_arrays("halfcheetah", num_episodes=1)
    del a["states"]
    with pytest.raises(DatasetError, match="needs states"):
        write(tmp_path / "x.h5", task="halfcheetah", **a)


# the edits below re-stamp the checksum, so that the checks behind it are reached
def _set(key, fn):
    def edit(f):
        x = f[key][()]
        fn(x)
        f[key][...] = x
        f[key].attrs["crc32"] = ds.checksum(x)

    return edit


def _replace(key, value):
    def edit(f):
        del f[key]
        f.create_dataset(key, data=value).attrs["crc32"] = ds.checksum(value)

    return edit


def _attr(key, value):
    def edit(f):
        f.attrs[key] = value

    return edit


def _delete(key):
    def edit(f):
        del f[key]

    return edit


LOAD_CORRUPTIONS = {
    "missing key": (_delete("next_actions"), "missing dataset"),
    "wrong task attr": (_attr("task", "pp"), "holds task 'pp'"),
    "wrong shape": (_replace("rewards", np.zeros((50, 2), np.float32)), "'rewards' has shape"),
    "wrong dtype": (_replace("obs", np.zeros((50, 3, 18), np.float64)), "dtype float64"),
    "nan": (_set("obs", lambda x: x.__setitem__((4, 2, 0), np.nan)), "non-finite"),
    "inf state": (_set("next_obs", lambda x: x.__setitem__((0, 0, 0), np.inf)), "non-finite"),
    "action out of range": (
        _set("next_actions", lambda x: x.__setitem__((9, 1, 0), -1.5)),
        r"outside \[-1, 1\]",
    ),
    "bad boundaries": (_set("timeouts", lambda x: x.__setitem__(10, 1)), "episode 0"),
    "not binary": (_set("dones", lambda x: x.__setitem__(3, 2)), "only 0/1"),
    "corrupt data": (
        lambda f: f["actions"].__setitem__((1, 1, 1), 0.5),
        "crc32 checksum: the file is corrupt",
    ),
    "no checksum": (lambda f: f["rewards"].attrs.__delitem__("crc32"), "no crc32 attribute"),
    "count attr": (_attr("num_transitions", 75), "num_transitions"),
    "format version": (_attr("format_version", 99), "format_version"),
}


@pytest.mark.parametrize("name", list(LOAD_CORRUPTIONS))
def test_load_rejects_bad_files(tmp_path, name):
    edit, message = LOAD_CORRUPTIONS[name]
    path = write(tmp_path / "bad_file.h5", **make_arrays("cn", num_episodes=2))
    with h5py.File(path, "r+") as f:
        edit(f)
    with pytest.raises(DatasetError, match=message) as info:
        load_dataset(path, task="cn")
    assert "bad_file.h5" in str(info.value)


def test_load_checks_requested_task_and_dataset(tmp_path):
    path = write(tmp_path / "f.h5", **make_arrays("cn", num_episodes=1))
    load_dataset(path, task="simple_spread", dataset="random")  # aliases are fine
    with pytest.raises(DatasetError, match="f.h5.*'world' was asked"):
        load_dataset(path, task="world")
    with pytest.raises(DatasetError, match="f.h5.*'expert' was asked"):
        load_dataset(path, dataset="expert")
    with pytest.raises(DatasetError, match="nope.h5"):
        load_dataset(tmp_path / "nope.h5")


@pytest.mark.parametrize("keep", [0.1, 0.5, 0.9, 0.999])
def test_load_rejects_truncated_file(tmp_path, keep):
    path = write(tmp_path / "truncated.h5", **make_arrays("cn", num_episodes=4))
    size = path.stat().st_size
    os.truncate(path, int(size * keep))
    with pytest.raises(DatasetError, match="truncated.h5"):
        load_dataset(path)


def test_load_rejects_garbage_file(tmp_path):
    path = tmp_path / "garbage.h5"
    path.write_bytes(b"not an hdf5 file" * 100)
    with pytest.raises(DatasetError, match="garbage.h5.*not a readable HDF5"):
        load_dataset(path)


# ---------------------------------------------------------------------------------------------------------------
# atomic and concurrent writes
# ---------------------------------------------------------------------------------------------------------------


def test_interrupted_write_leaves_nothing_behind(tmp_path, monkeypatch):
    path = tmp_path / "cn" / "random" / "seed_0.h5"
    arrays = make_arrays("cn", num_episodes=2)
    original = h5py.Group.create_dataset
    calls = []

    def interrupted(self, name, *args, **kwargs):
        calls.append(name)
        if len(calls) == 3:
            raise KeyboardInterrupt("simulated interruption mid-write")
        return original(self, name, *args, **kwargs)

    monkeypatch.setattr(h5py.Group, "create_dataset", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write(path, **arrays)
    assert len(calls) == 3
    assert sorted(p.name for p in path.parent.iterdir()) == ["seed_0.h5.lock"]  # no final file, no temp

    # an interrupted overwrite keeps the previous file intact
    monkeypatch.setattr(h5py.Group, "create_dataset", original)
    write(path, **arrays)
    calls.clear()
    monkeypatch.setattr(h5py.Group, "create_dataset", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write(path, **make_arrays("cn", num_episodes=2, seed=1))
    np.testing.assert_array_equal(load_dataset(path).obs.numpy(), arrays["obs"])
    assert sorted(p.name for p in path.parent.iterdir()) == ["seed_0.h5", "seed_0.h5.lock"]


def _writer(path: str, seed: int) -> None:
    write(path, extra_attrs={"writer": seed}, **make_arrays("cn", num_episodes=40, seed=seed))


def _builder(path: str, log: str, seed: int) -> None:
    # the builder pattern: check-then-build under the lock; write_dataset re-enters the same lock
    with locked(path):
        if not Path(path).exists():
            with open(log, "a") as f:
                f.write(f"{seed}\n")
            _writer(path, seed)


def _run_processes(target, args_list):
    ctx = mp.get_context("fork")  # children need only numpy / h5py; fork keeps the test fast
    procs = [ctx.Process(target=target, args=args) for args in args_list]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0


def test_concurrent_writers_produce_one_valid_file(tmp_path):
    path = tmp_path / "cn" / "random" / "seed_0.h5"
    _run_processes(_writer, [(str(path), s) for s in range(3)])
    data = load_dataset(path)
    winner = data.meta["writer"]
    np.testing.assert_array_equal(data.obs.numpy(), make_arrays("cn", num_episodes=40, seed=winner)["obs"])
    assert sorted(p.name for p in path.parent.iterdir()) == ["seed_0.h5", "seed_0.h5.lock"]


def test_locked_builds_once(tmp_path):
    path, log = tmp_path / "cn" / "random" / "seed_0.h5", tmp_path / "built.log"
    _run_processes(_builder, [(str(path), str(log), s) for s in range(3)])
    built = log.read_text().split()
    assert len(built) == 1
    assert load_dataset(path).meta["writer"] == int(built[0])


def _killed_writer(path: str) -> None:
    # dies with SIGKILL in the middle of the HDF5 write, as `kill -9` or the OOM killer would do it
    original = h5py.Group.create_dataset

    def killed(self, name, *args, **kwargs):
        if name == "next_obs":
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, name, *args, **kwargs)

    h5py.Group.create_dataset = killed
    _writer(path, 0)


def test_write_removes_temp_files_of_killed_writers(tmp_path):
    path = tmp_path / "cn" / "random" / "seed_0.h5"
    ctx = mp.get_context("fork")
    proc = ctx.Process(target=_killed_writer, args=(str(path),))
    proc.start()
    proc.join(timeout=60)
    assert proc.exitcode == -signal.SIGKILL
    (left,) = [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    assert left.startswith(".seed_0.h5.")
    # temporary files of other datasets and other files stay
    others = [".seed_1.h5.12345.0123abcd.tmp", ".seed_0.h5.notes.tmp", "seed_0.h5.txt"]
    for name in others:
        (path.parent / name).write_text("x")
    write(path, **make_arrays("cn", num_episodes=1))
    assert sorted(p.name for p in path.parent.iterdir()) == sorted(others + ["seed_0.h5", "seed_0.h5.lock"])
    assert len(load_dataset(path)) == 25


def test_unwritable_folder_is_a_dataset_error(tmp_path):
    (tmp_path / "afile").write_text("x")  # a folder that cannot be created (even by root)
    path = tmp_path / "afile" / "cn" / "random" / "seed_0.h5"
    with pytest.raises(DatasetError, match="cannot create the lock file.*needs a writable folder"):
        write(path, **make_arrays("cn", num_episodes=1))
    assert issubclass(DatasetError, UserError) and issubclass(DatasetError, ValueError)


# ---------------------------------------------------------------------------------------------------------------
# OMAR import
# ---------------------------------------------------------------------------------------------------------------


def make_omar_folder(root: Path, task: str, dataset: str, seed: int, num_episodes: int, extra_agents=()):
    """Files in OMAR's exact layout; returns the per-agent source arrays (float64, as OMAR's np.save gives)."""
    spec = get_task(task)
    rng = np.random.default_rng(seed + 17)
    folder = root / spec.omar_env_id / dataset / f"seed_{seed}_data"
    folder.mkdir(parents=True)
    N = num_episodes * spec.episode_length
    src = {}
    for i, obs_dim in [(i, spec.obs_dim) for i in range(spec.n_agents)] + list(extra_agents):
        src[f"obs_{i}"] = rng.normal(size=(N, obs_dim))
        src[f"acs_{i}"] = rng.uniform(-1, 1, size=(N, spec.act_dim))
        src[f"rews_{i}"] = rng.normal(size=N)
        src[f"next_obs_{i}"] = rng.normal(size=(N, obs_dim))
        src[f"dones_{i}"] = np.zeros(N)
    if spec.family == "mamujoco":
        for i in range(spec.n_agents):  # every agent stores the same copy
            src[f"states_{i}"] = src.get("states_0", rng.normal(size=(N, spec.state_dim)))
            src[f"next_states_{i}"] = src.get("next_states_0", rng.normal(size=(N, spec.state_dim)))
    for name, x in src.items():
        np.save(folder / f"{name}.npy", x)
    return folder, src


def check_imported(path: Path, task: str, src: dict, num_episodes: int):
    spec = get_task(task)
    data = load_dataset(path, task=task)
    N = num_episodes * spec.episode_length
    assert len(data) == N
    for i in range(spec.n_agents):
        for ours, theirs in [("obs", "obs"), ("actions", "acs"), ("next_obs", "next_obs")]:
            np.testing.assert_array_equal(
                getattr(data, ours)[:, i].numpy(), src[f"{theirs}_{i}"].astype(np.float32)
            )
        np.testing.assert_array_equal(data.rewards[:, i].numpy(), src[f"rews_{i}"].astype(np.float32))
        # the reference's next_acs = acs[(idx + 1) % N], across episode ends and wrapping at N
        expected_next = src[f"acs_{i}"][(np.arange(N) + 1) % N].astype(np.float32)
        np.testing.assert_array_equal(data.next_actions[:, i].numpy(), expected_next)
    T = spec.episode_length
    np.testing.assert_array_equal(data.next_actions[T - 1].numpy(), data.actions[T].numpy())  # next episode's
    np.testing.assert_array_equal(data.next_actions[-1].numpy(), data.actions[0].numpy())  # wraps to row 0
    assert data.timeouts.sum() == num_episodes and data.timeouts[T - 1] == 1 and data.timeouts[T] == 0
    assert data.dones.sum() == 0
    assert data.meta["next_actions_convention"] == "next_row (reference)"
    assert data.meta["num_episodes"] == num_episodes and data.meta["generator"] == "common.omar_import"
    return data


def test_import_cn(tmp_path):
    _, src = make_omar_folder(tmp_path / "omar", "cn", "expert", 0, num_episodes=4)
    path = omar_import.import_omar(tmp_path / "omar", "cn", "expert", 0, tmp_path / "data")
    assert path == tmp_path / "data" / "cn" / "expert" / "seed_0.h5"
    data = check_imported(path, "cn", src, num_episodes=4)
    returns = np.mean([src[f"rews_{i}"] for i in range(3)], axis=0).reshape(4, 25).sum(axis=1)
    assert data.meta["return_mean"] == pytest.approx(returns.mean(), rel=1e-5)


def test_import_pp_ignores_prey_via_cli(tmp_path):
    # simple_tag has the prey as agent 3 (obs 14-d); its files are present and must be ignored
    _, src = make_omar_folder(tmp_path / "omar", "pp", "medium", 2, num_episodes=3, extra_agents=[(3, 14)])
    _, src_cn = make_omar_folder(tmp_path / "omar", "cn", "random", 0, num_episodes=2)
    argv = ["--src", str(tmp_path / "omar"), "--data-dir", str(tmp_path / "data")]
    assert omar_import.main(argv + ["--task", "tag", "--dataset", "medium", "--seed", "2"]) == 0
    data = check_imported(tmp_path / "data" / "pp" / "medium" / "seed_2.h5", "pp", src, num_episodes=3)
    assert data.meta["return_mean"] == pytest.approx(
        src["rews_0"].reshape(3, 25).sum(axis=1).mean(), rel=1e-5
    )
    assert omar_import.main(argv + ["--all"]) == 0  # pp is kept, cn converted
    check_imported(tmp_path / "data" / "cn" / "random" / "seed_0.h5", "cn", src_cn, num_episodes=2)


def test_import_keeps_dones_and_reports_them(tmp_path, capsys):
    folder, src = make_omar_folder(
        tmp_path / "omar", "world", "random", 0, num_episodes=2, extra_agents=[(3, 22)]
    )
    dones = np.zeros(50)
    dones[24] = 1.0  # a terminal flag at an episode's last step (MPE never sets one; reported, kept)
    np.save(folder / "dones_1.npy", dones)
    path = omar_import.import_omar(tmp_path / "omar", "world", "random", 0, tmp_path / "data")
    assert "1 of 50 rows have done = 1" in capsys.readouterr().out
    data = load_dataset(path, task="world")
    np.testing.assert_array_equal(data.dones.numpy(), dones)
    assert data.meta["source_dones_nonzero"] == 1 and data.timeouts.sum() == 2

    dones[10] = 1.0  # mid-episode: breaks the 25-step episodes
    np.save(folder / "dones_1.npy", dones)
    with pytest.raises(DatasetError, match=r"done = 1 inside a 25-step episode at 1 rows \(first: row 10\)"):
        omar_import.import_omar(tmp_path / "omar", "world", "random", 0, tmp_path / "data", overwrite=True)


def test_import_halfcheetah(tmp_path):
    _, src = make_omar_folder(tmp_path / "omar", "halfcheetah", "medium-replay", 0, num_episodes=2)
    path = omar_import.import_omar(tmp_path / "omar", "halfcheetah", "medium-replay", 0, tmp_path / "data")
    data = check_imported(path, "halfcheetah", src, num_episodes=2)
    np.testing.assert_array_equal(data.states.numpy(), src["states_0"].astype(np.float32))
    np.testing.assert_array_equal(data.next_states.numpy(), src["next_states_0"].astype(np.float32))


def test_import_errors(tmp_path):
    root = tmp_path / "omar"
    folder, _ = make_omar_folder(root, "cn", "random", 0, num_episodes=2)
    np.save(folder / "obs_1.npy", np.zeros((50, 17)))
    with pytest.raises(DatasetError, match=r"obs_1.npy: shape \(50, 17\), expected \[50, 18\]"):
        omar_import.import_omar(root, "cn", "random", 0, tmp_path / "data")
    np.save(folder / "obs_1.npy", np.zeros((50, 18)))
    np.save(folder / "rews_2.npy", np.zeros(49))
    with pytest.raises(DatasetError, match=r"rews_2.npy: shape \(49,\), expected \[50\]"):
        omar_import.import_omar(root, "cn", "random", 0, tmp_path / "data")
    (folder / "rews_2.npy").unlink()
    with pytest.raises(DatasetError, match=r"missing \['rews_2.npy'\]"):
        omar_import.import_omar(root, "cn", "random", 0, tmp_path / "data")

    folder, src = make_omar_folder(root, "cn", "random", 1, num_episodes=2)
    for name, x in src.items():  # 40 rows: not whole 25-step episodes
        np.save(folder / f"{name}.npy", x[:40])
    with pytest.raises(DatasetError, match="40 rows is not a whole number of 25-step episodes"):
        omar_import.import_omar(root, "cn", "random", 1, tmp_path / "data")

    folder, src = make_omar_folder(root, "cn", "random", 2, num_episodes=2)
    np.save(folder / "acs_0.npy", src["acs_0"] * 1.5)
    with pytest.raises(DatasetError, match="outside"):
        omar_import.import_omar(root, "cn", "random", 2, tmp_path / "data")
    path = omar_import.import_omar(root, "cn", "random", 2, tmp_path / "data", clip_actions=True)
    assert load_dataset(path).meta["actions_clipped"] > 0
    assert not list((tmp_path / "data").rglob("*.tmp"))


# ---------------------------------------------------------------------------------------------------------------
# normalised score
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", ["cn", "pp", "world", "halfcheetah"])
def test_normalized_score(task):
    r_random, r_expert = REFERENCE_RETURNS[task]
    assert normalized_score(task, r_random) == pytest.approx(0.0)
    assert normalized_score(task, r_expert) == pytest.approx(100.0)
    assert normalized_score(task, (r_random + r_expert) / 2) == pytest.approx(50.0)


def test_normalized_score_values_and_validation():
    assert normalized_score("simple_spread", 345.3) == pytest.approx(100 * (345.3 - 159.6) / (531.0 - 159.6))
    assert normalized_score("pp", np.float32(-4.1)) == pytest.approx(0.0, abs=1e-5)
    with pytest.raises(ValueError, match="unknown task"):
        normalized_score("hopper", 1.0)
    with pytest.raises(ValueError, match="finite"):
        normalized_score("cn", float("nan"))
