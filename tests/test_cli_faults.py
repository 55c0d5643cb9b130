"""Command-line faults: a Ray address that cannot work, options that would be ignored, and the
`ray` extra. Each refusal exits 2 with one line on stderr naming the value, prints nothing on
stdout and writes nothing into --out; none of them trains."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from decoupled.cli import main
from decoupled.lab import ray_executor
from decoupled.lab.ray_executor import RayUnavailable, check_address

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
SWEEP = ["sweep", "--budget", "4", "--lr", "1e-3", "--wd-adam", "0", "--wd-adamw", "0"]


def refusal(args: list[str], out: Path, capsys) -> str:
    """The one stderr line of a command that must exit 2 before writing anything."""
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--out", str(out)])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert captured.out == ""
    assert not out.exists()
    return lines[0]


@pytest.fixture
def closed_port() -> int:
    """A local port nobody listens on: bound, then released."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def listening_port():
    """A local port that accepts connections while the test runs."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_the_ray_extra_brings_the_ray_client():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    # ray://host:port (the documented --ray-address) needs Ray Client, i.e. ray[client]
    extras = tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"]
    assert extras["ray"] == ["ray[client]>=2.9"]


@pytest.mark.parametrize(
    "address, message",
    [
        ("bogus", "argument --ray-address: 'bogus' is not a Ray address"),
        ("ray://", "argument --ray-address: 'ray://' is not a Ray address"),
        ("ray://head", "argument --ray-address: 'ray://head' is not a Ray address"),
        ("head:99999", "argument --ray-address: 'head:99999' is not a Ray address"),
        ("http://head:8265", "argument --ray-address: 'http://head:8265' is not a Ray address"),
        ("127.0.0.1:PORT", "argument --ray-address: '127.0.0.1:PORT': cannot connect to"),
        ("ray://127.0.0.1:PORT", "argument --ray-address: 'ray://127.0.0.1:PORT': cannot connect"),
    ],
)
def test_a_ray_address_that_cannot_work_is_refused_before_writing(
    address, message, closed_port, tmp_path, capsys
):
    pytest.importorskip("ray")
    address, message = (text.replace("PORT", str(closed_port)) for text in (address, message))
    line = refusal([*SWEEP, "--executor", "ray", "--ray-address", address], tmp_path / "o", capsys)
    assert line.startswith("decoupled sweep: error: ") and message in line, line


def test_auto_follows_ray_address_from_the_environment(closed_port, tmp_path, capsys, monkeypatch):
    pytest.importorskip("ray")
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{closed_port}")
    line = refusal([*SWEEP, "--executor", "ray", "--ray-address", "auto"], tmp_path / "o", capsys)
    assert f"argument --ray-address: '127.0.0.1:{closed_port}': cannot connect" in line


def test_an_address_that_does_not_answer_in_time_is_refused(monkeypatch):
    def silent(address, timeout):
        raise TimeoutError("timed out")

    monkeypatch.setattr(ray_executor.socket, "create_connection", silent)
    monkeypatch.setattr(ray_executor, "CONNECT_TIMEOUT", 0.25)
    with pytest.raises(RayUnavailable, match=r"'10.0.0.1:6379': no answer .* within 0.25 s"):
        check_address("10.0.0.1:6379")


def test_an_answering_address_passes(listening_port):
    check_address(f"127.0.0.1:{listening_port}")
    check_address(None)  # a local instance: nothing to reach
    check_address("local")


def test_a_ray_client_address_without_grpcio_says_what_to_install(listening_port, monkeypatch):
    real_find_spec = ray_executor.importlib.util.find_spec
    monkeypatch.setattr(
        ray_executor.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "grpc" else real_find_spec(name, *a),
    )
    with pytest.raises(RayUnavailable, match=r"needs the Ray client .*decoupled\[ray\]"):
        check_address(f"ray://127.0.0.1:{listening_port}")


@pytest.mark.parametrize("executor", ["local", "batched"])
def test_a_ray_address_without_the_ray_executor_is_refused(executor, tmp_path, capsys):
    args = [*SWEEP, "--executor", executor, "--ray-address", "auto"]
    line = refusal(args, tmp_path / "o", capsys)
    assert (
        "argument --ray-address: 'auto' would be ignored: only the ray executor reads it "
        f"(--executor {executor})"
    ) in line


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--executor", "local", "--ray-max-retries", "5"],
         "argument --ray-max-retries: 5 would be ignored: only the ray executor reads it "
         "(--executor local)"),
        (["--executor", "ray", "--ray-max-retries", "-1"],
         "argument --ray-max-retries: -1 is negative (0 means no retry)"),
        (["--executor", "ray", "--ray-max-retries", "two"],
         "argument --ray-max-retries: invalid int value: 'two'"),
    ],
    ids=["local", "negative", "not-a-number"],
)  # fmt: skip
def test_ray_max_retries_that_would_not_work_are_refused(options, message, tmp_path, capsys):
    line = refusal([*SWEEP, *options], tmp_path / "o", capsys)
    assert message in line, line


@pytest.mark.parametrize(
    ("given", "passed"), [([], {}), (["--ray-max-retries", "0"], {"max_retries": 0})]
)
def test_ray_max_retries_reaches_the_ray_executor(given, passed, tmp_path, monkeypatch, capsys):
    """The sweep hands Ray the retries asked for, and its own default (3) otherwise."""
    pytest.importorskip("ray")
    calls = []
    monkeypatch.setattr(ray_executor, "execute_on_ray", lambda *a, **k: calls.append(k) or {})
    main([*SWEEP, "--executor", "ray", *given, "--no-progress", "--out", str(tmp_path / "o")])
    assert len(calls) == 1
    assert {k: v for k, v in calls[0].items() if k == "max_retries"} == passed


@pytest.mark.parametrize(
    "command",
    [["compare", "--budget", "4", "--seeds", "1"], SWEEP, ["inspect", "--steps", "2"]],
    ids=["compare", "sweep", "inspect"],
)
@pytest.mark.parametrize("task", ["digits", "mnist1d"])
def test_a_data_dir_for_a_task_without_data_files_is_refused(command, task, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    args = [*command, "--task", task, "--data-dir", str(data)]
    line = refusal(args, tmp_path / "o", capsys)
    assert f"argument --data-dir: task {task} reads no data folder, so {str(data)!r}" in line
