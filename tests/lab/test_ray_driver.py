"""The Ray driver's protocol without a cluster: one writer, each run recorded once, failures,
Ctrl-C, the checks a worker makes (data folder, configuration) and the cluster's CPUs.

The tasks run in this process through a stand-in for Ray (``InProcessTasks``) that calls the
same worker function a Ray task calls (``ray_executor.train_on_worker``); the real cluster is
in test_ray_two_node.py and test_sweep.py."""

from __future__ import annotations

import socket
import subprocess
import time
import types

import pytest

from decoupled.lab import outcome as outcome_module
from decoupled.lab.executor import execute, pending_runs
from decoupled.lab.executor import progress_bar as no_bar_factory
from decoupled.lab.outcome import RunOutcome, record
from decoupled.lab.ray_driver import drive
from decoupled.lab.ray_executor import (
    RayUnavailable,
    _RayTasks,
    check_cluster,
    train_on_worker,
)
from decoupled.lab.store import ResultStore, config_key
from decoupled.lab.train import RunSpec
from tests.helpers import finish_interrupted_at, small_decay_table

pytestmark = pytest.mark.xdist_group("processes")  # one xdist worker runs them in turn

SPECS = [
    RunSpec("mnist1d", optimizer, lr, weight_decay, seed=0, steps=8, eval_every=4)
    for optimizer, weight_decay in (("adam", 1e-3), ("adamw", 1e-2))
    for lr in (1e-3, 1e-2)
]


def no_bar():
    return no_bar_factory(0, 0, "", enabled=False)


class InProcessTasks:
    """Ray's part played in this process: a task trains at submit (as a Ray worker would,
    with ``train_on_worker``) and is ready ``delay`` waits later."""

    def __init__(self, capacity: int = 2, train=train_on_worker) -> None:
        self._capacity, self.train = capacity, train
        self.submitted: list[str] = []
        self.cancelled: list[int] = []
        self.outcomes: dict[int, RunOutcome] = {}

    def capacity(self) -> int:
        return self._capacity

    def submit(self, spec, config):
        handle = len(self.submitted)
        self.submitted.append(config_key(config))
        self.outcomes[handle] = self.train(spec, config)
        return handle

    def wait(self, handles, timeout):
        return handles[:1]

    def outcome(self, handle, key):
        return self.outcomes[handle]

    def cancel(self, handle):
        self.cancelled.append(handle)


def drive_all(specs, store, tasks, **options):
    pending, counts = pending_runs(specs, store)
    return drive(pending, store, tasks, counts, no_bar(), **options)


def test_the_driver_records_what_the_local_executor_records(tmp_path):
    """Trained on the 'workers' and recorded by the driver, every run's row equals the one
    the local executor writes itself: status, metrics and every curve; each spec is
    submitted once, and a second invocation submits nothing."""
    execute(SPECS, tmp_path / "local.db", workers=1, progress=False)
    local = {r.key: r for r in ResultStore(tmp_path / "local.db").records()}
    store, tasks = ResultStore(tmp_path / "ray.db"), InProcessTasks()
    counts = drive_all(SPECS, store, tasks)
    assert counts == {"done": 4, "diverged": 0, "failed": 0, "skipped": 0, "cached": 0}
    assert sorted(tasks.submitted) == sorted(spec.key() for spec in SPECS)
    driven = {r.key: r for r in store.records()}
    assert driven.keys() == local.keys()
    for key, row in driven.items():
        assert row.status == local[key].status == "done"
        assert row.config == local[key].config
        assert row.curves == local[key].curves
        assert {**row.metrics, "wall_time": 0} == {**local[key].metrics, "wall_time": 0}
    again = InProcessTasks()
    assert drive_all(SPECS, store, again)["cached"] == 4 and again.submitted == []


def test_a_task_that_raises_is_recorded_failed_and_run_again_next_time(tmp_path, monkeypatch):
    real_run = outcome_module.run

    def run_or_raise(spec, **kwargs):
        if spec.lr == 1e-2 and spec.optimizer == "adamw":
            raise RuntimeError("the cell's own error")
        return real_run(spec, **kwargs)

    monkeypatch.setattr(outcome_module, "run", run_or_raise)
    store = ResultStore(tmp_path / "results.db")
    counts = drive_all(SPECS, store, InProcessTasks())
    assert counts["done"] == 3 and counts["failed"] == 1
    (failed,) = store.records(status="failed")
    assert failed.error.startswith(f"on host {socket.gethostname()}: Traceback")
    assert "RuntimeError: the cell's own error" in failed.error
    finished = {r.key: r.finished for r in store.records(status="done")}

    monkeypatch.setattr(outcome_module, "run", real_run)
    tasks = InProcessTasks()
    assert drive_all(SPECS, store, tasks)["done"] == 1
    assert tasks.submitted == [failed.key]
    records = store.records()
    assert len(records) == 4 and all(r.status == "done" for r in records)
    assert all(r.finished == finished[r.key] for r in records if r.key in finished)


def fabricated(spec, config):
    """A finished outcome without training, for tests of the protocol alone."""
    curves = {"step": [0, 1], "metric": [1.0, 0.5]}
    return RunOutcome(config_key(config), "done", {"metric": 0.5}, curves)


class InterruptedTasks(InProcessTasks):
    """Three in flight; the first wait returns task 0; the second is Ctrl-C, by which time
    task 1 is done."""

    def __init__(self) -> None:
        super().__init__(capacity=3, train=fabricated)
        self.waits = 0

    def wait(self, handles, timeout):
        self.waits += 1
        if self.waits == 2:
            raise KeyboardInterrupt
        return [h for h in handles if h <= self.waits - 2] if timeout == 0 else handles[:1]


def test_ctrl_c_records_what_arrived_cancels_the_rest_and_releases_the_claims(tmp_path):
    specs = [RunSpec("mnist1d", "adamw", 1e-3, wd, seed=0, steps=8) for wd in (0, 1, 2, 3, 4)]
    keys = [spec.key() for spec in specs]
    store, tasks = ResultStore(tmp_path / "results.db"), InterruptedTasks()
    with pytest.raises(KeyboardInterrupt):
        drive_all(specs, store, tasks)
    rows = {r.key: r for r in store.records()}
    # 0 arrived, then 3 took its place; 1 arrived during Ctrl-C; 2 and 3 were in flight
    assert [rows[k].status for k in keys[:4]] == ["done", "done", "failed", "failed"]
    assert rows[keys[2]].error == rows[keys[3]].error == "interrupted"
    assert tasks.cancelled == [2, 3]
    assert keys[4] not in rows  # never claimed, never submitted

    again = InProcessTasks(train=fabricated)
    counts = drive_all(specs, store, again)
    assert counts["cached"] == 2 and counts["done"] == 3
    assert sorted(again.submitted) == sorted(keys[2:])


class InterruptedAtSubmit(InProcessTasks):
    """Ctrl-C lands inside the third submit: its run is claimed but has no task yet."""

    def submit(self, spec, config):
        if len(self.submitted) == 2:
            raise KeyboardInterrupt
        return super().submit(spec, config)


def test_ctrl_c_between_a_claim_and_its_submit_releases_that_claim(tmp_path):
    store, tasks = ResultStore(tmp_path / "results.db"), InterruptedAtSubmit(train=fabricated)
    with pytest.raises(KeyboardInterrupt):
        drive_all(SPECS, store, tasks)
    rows = {r.key: r for r in store.records()}
    assert not [r for r in rows.values() if r.status == "running"]
    assert rows[SPECS[2].key()].error == "interrupted"


def test_ctrl_c_releases_a_claim_whose_spec_was_also_pending_a_second_time(tmp_path):
    """Two pending specs with one key (they differ only in what the key leaves out): the
    second one's refused claim must not drop the first one's, still in flight."""
    store, tasks = ResultStore(tmp_path / "results.db"), InterruptedTasks()  # 3 in flight
    specs = [SPECS[0], SPECS[2], SPECS[3], SPECS[3]]  # task 1 arrives during the Ctrl-C
    with pytest.raises(KeyboardInterrupt):
        drive(specs, store, tasks, {"skipped": 0, "done": 0}, no_bar())
    rows = {r.key: (r.status, r.error) for r in store.records()}
    assert rows[SPECS[3].key()] == ("failed", "interrupted")
    assert not [k for k, (status, _) in rows.items() if status == "running"]


def test_ctrl_c_while_a_result_is_written_releases_that_claim(tmp_path):
    """A Ctrl-C inside ``record``, before the row was written, leaves that run to be redone
    rather than ``running`` under a live owner until it goes stale; the other task in flight
    had arrived, and is recorded."""
    store, tasks = ResultStore(tmp_path / "results.db"), InProcessTasks(train=fabricated)
    finish_interrupted_at(store, 1)
    with pytest.raises(KeyboardInterrupt):
        drive_all(SPECS, store, tasks)
    first, second = tasks.submitted
    statuses = {r.key: (r.status, r.error) for r in store.records()}
    assert statuses == {first: ("failed", "interrupted"), second: ("done", None)}


class SlowTasks(InProcessTasks):
    """Nothing is ready at the first wait (the driver's heartbeat then comes due)."""

    def __init__(self) -> None:
        super().__init__(capacity=4, train=fabricated)
        self.waits = 0

    def wait(self, handles, timeout):
        self.waits += 1
        if self.waits == 1:
            time.sleep(0.05)
            return []
        return handles[:1]


def test_the_driver_heartbeats_its_claims_while_tasks_run(tmp_path):
    """With every task in flight and none ready, the driver's heartbeat renews each claim."""
    store, tasks = ResultStore(tmp_path / "results.db"), SlowTasks()
    beats = []
    real_heartbeat_many = store.heartbeat_many

    def heartbeat_many(keys):
        before = [store.get(k).heartbeat for k in keys]
        owned = real_heartbeat_many(keys)
        beats.append((len(keys), owned, [store.get(k).heartbeat for k in keys] > before))
        return owned

    store.heartbeat_many = heartbeat_many
    drive_all(SPECS, store, tasks, heartbeat_every=0.01)
    assert beats[0] == (4, 4, True)
    assert all(owned == count for count, owned, _ in beats)
    assert all(r.status == "done" for r in store.records())


def test_heartbeat_many_touches_only_this_process_s_running_rows(tmp_path, monkeypatch):
    store = ResultStore(tmp_path / "results.db")
    mine, done, foreign = (spec.config() for spec in SPECS[:3])
    for config in (mine, done):
        store.claim(config_key(config), config)
    store.finish(config_key(done), "done", {"metric": 1.0}, {})
    monkeypatch.setattr("decoupled.lab.store.this_owner", lambda: "otherhost:1/1")
    store.claim(config_key(foreign), foreign)
    monkeypatch.undo()
    before = {r.key: r.heartbeat for r in store.records()}
    time.sleep(0.01)
    assert store.heartbeat_many([config_key(c) for c in (mine, done, foreign)]) == 1
    after = {r.key: r.heartbeat for r in store.records()}
    assert after[config_key(mine)] > before[config_key(mine)]
    assert after[config_key(done)] == before[config_key(done)]
    assert after[config_key(foreign)] == before[config_key(foreign)]


def test_a_missing_data_dir_fails_the_run_naming_the_host_and_the_path(tmp_path):
    missing = str(tmp_path / "not-on-this-node")
    spec = RunSpec("cifar10", "adamw", 1e-3, 0.1, seed=0, steps=2, data_dir=missing)
    outcome = train_on_worker(spec, spec.config())
    assert outcome.status == "failed" and outcome.key == spec.key()
    assert f"--data-dir {missing!r} is not a folder on host {socket.gethostname()}" in (
        outcome.error
    )


def test_a_worker_that_would_train_something_else_fails_the_run(tmp_path):
    """A node with another package version (or step path, or data) must not store its run
    under the driver's key: the run fails and says which fields differ."""
    spec = SPECS[0]
    driver_config = {**spec.config(), "version": "0.0.1"}
    outcome = train_on_worker(spec, driver_config)
    assert outcome.status == "failed" and outcome.key == config_key(driver_config)
    assert f"host {socket.gethostname()} would not train the run the driver planned" in (
        outcome.error
    )
    assert f"version: '0.0.1' on the driver, {spec.config()['version']!r} here" in outcome.error


def test_a_task_whose_result_ray_lost_is_recorded_failed(tmp_path):
    ray_exceptions = pytest.importorskip("ray.exceptions")

    def get(handle):
        raise ray_exceptions.NodeDiedError("node 1 died")

    fake_remote = types.SimpleNamespace(options=lambda **options: fake_remote)
    fake_ray = types.SimpleNamespace(
        remote=lambda function: fake_remote, get=get, exceptions=ray_exceptions
    )
    tasks = _RayTasks(fake_ray, threads=1, max_retries=3)
    store = ResultStore(tmp_path / "results.db")
    spec = SPECS[0]
    store.claim(spec.key(), spec.config())
    assert record(store, tasks.outcome("handle", spec.key())) == "failed"
    error = store.get(spec.key()).error
    assert error.startswith("the Ray task returned no result (NodeDiedError; Ray retries")
    assert "up to 3 times); it is run again next time" in error
    assert error.splitlines()[-1] == "node 1 died"


def test_an_outcome_with_monitor_rows_stores_them_under_its_key(tmp_path):
    store = ResultStore(tmp_path / "results.db")
    spec = SPECS[0]
    store.claim(spec.key(), spec.config())
    monitored = RunOutcome(spec.key(), "done", {"metric": 0.5}, {}, monitor=small_decay_table())
    assert record(store, monitored) == "done"
    assert store.load_decay_table(spec.key()) == small_decay_table()


@pytest.mark.parametrize(
    "nodes,threads,message",
    [
        ([], 1, "no node with 1 CPU for a run of 1 torch thread (CPUs per alive node: none"),
        (
            [{"Alive": True, "Resources": {"CPU": 0.0}}, {"Alive": False, "Resources": {"CPU": 8}}],
            1,
            "(CPUs per alive node: 0)",
        ),
        (
            [
                {"Alive": True, "Resources": {"worker_node": 1.0}},
                {"Alive": True, "Resources": {"CPU": 1}},
            ],
            2,
            "no node with 2 CPUs for a run of 2 torch threads (CPUs per alive node: 0, 1)",
        ),
    ],
)
def test_a_cluster_without_cpus_for_a_run_is_refused(nodes, threads, message):
    with pytest.raises(RayUnavailable, match="start a node with CPUs") as error:
        check_cluster(nodes, threads)
    assert message in str(error.value)


def test_a_cluster_with_a_node_big_enough_is_accepted():
    nodes = [{"Alive": True, "Resources": {"CPU": 1.0}}, {"Alive": True, "Resources": {"CPU": 4}}]
    check_cluster(nodes, 4)  # no RayUnavailable


def test_ray_wait_returns_every_task_already_finished():
    """One ray.wait blocks for the first result; a second, with timeout 0, adds the others
    that are ready, so that Ctrl-C records all of them."""
    calls = []

    def wait(handles, num_returns, timeout):
        calls.append((list(handles), num_returns, timeout))
        ready = [h for h in handles if h in ("a", "c")][:num_returns]
        return ready, [h for h in handles if h not in ready]

    fake_ray = types.SimpleNamespace(remote=lambda function: None, wait=wait)
    tasks = _RayTasks(fake_ray, threads=1, max_retries=3)
    assert tasks.wait(["a", "b", "c"], timeout=30) == ["a", "c"]
    assert calls == [(["a", "b", "c"], 1, 30), (["b", "c"], 2, 0)]


def test_after_the_driver_is_killed_the_next_one_redoes_only_its_runs_in_flight(
    tmp_path, monkeypatch
):
    """A driver killed with kill -9 leaves its claims ``running`` under its dead pid; the
    next driver takes them back, keeps every recorded run, and submits nothing else."""
    store = ResultStore(tmp_path / "results.db")
    recorded, in_flight = SPECS[:2], SPECS[2:]
    drive_all(recorded, store, InProcessTasks(train=fabricated))
    finished = {r.key: r.finished for r in store.records()}
    gone = _a_dead_pid()
    monkeypatch.setattr("decoupled.lab.store.this_owner", lambda: f"{socket.gethostname()}:{gone}")
    for spec in in_flight:
        assert store.claim(spec.key(), spec.config())
    monkeypatch.undo()

    tasks = InProcessTasks(train=fabricated)
    counts = drive_all(SPECS, store, tasks)
    assert counts["cached"] == 2 and counts["done"] == 2
    assert sorted(tasks.submitted) == sorted(spec.key() for spec in in_flight)
    records = store.records()
    assert len(records) == 4 and all(r.status == "done" for r in records)
    assert all(r.finished == finished[r.key] for r in records if r.key in finished)


def _a_dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait(timeout=30)
    return process.pid
