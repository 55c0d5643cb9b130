"""``decoupled bench`` (``decoupled/bench.py``) on a tiny layout: the floor follows the
fastest bus measure of the run, not the first one."""

from __future__ import annotations

import itertools

import pytest

from decoupled import bench


@pytest.fixture
def tiny_layout(monkeypatch):
    monkeypatch.setattr(bench, "LAYOUTS", {"tiny": lambda: [(64, 32), (100,)]})
    speeds = itertools.cycle([50e9, 140e9, 70e9])  # bytes/second, as a shared bus varies

    def measure(self, repeats: int = 3) -> float:
        self.measures.append(next(speeds))
        return self.measures[-1]

    monkeypatch.setattr(bench.StreamingBandwidth, "measure", measure)
    monkeypatch.setattr(bench.StreamingBandwidth.__init__, "__defaults__", (1024,))


def test_the_floor_comes_from_the_fastest_bandwidth_measured_in_the_run(tiny_layout):
    text = bench.run(layouts=["tiny"], device="cpu", steps=1, rounds=2)
    header = text.splitlines()[1]
    # one measure before the layouts and one per round: 50, 140, 70 GB/s
    assert "streaming bandwidth 50.0-140.0 GB/s during the run" in header
    assert f"Adam floor {140e9 / 28 / 1e9:.2f} G params/s" in header
    rows = [line.split() for line in text.splitlines()[3:]]
    assert [row[0] for row in rows] == ["tiny"] * len(bench.contenders())
    for row in rows:
        rate, of_floor = float(row[-3]) * 1e9, float(row[-1].rstrip("%"))
        size = bench.BYTES_PER_PARAM["bfloat16" if row[-4] == "bf16" else "float32"]
        assert of_floor == pytest.approx(100 * rate / (140e9 / size), abs=1)


def test_the_default_run_leaves_out_the_layouts_not_listed_as_default(tiny_layout, monkeypatch):
    """``1x20M`` (one 20M-element tensor) is measured only when asked for."""

    def not_by_default():
        raise AssertionError("a layout outside DEFAULT_LAYOUTS was measured")

    monkeypatch.setattr(bench, "LAYOUTS", bench.LAYOUTS | {"extra": not_by_default})
    monkeypatch.setattr(bench, "DEFAULT_LAYOUTS", ("tiny",))
    rows = bench.run(device="cpu", steps=1, rounds=1).splitlines()[3:]
    assert {row.split()[0] for row in rows} == {"tiny"}


def test_the_one_tensor_layout_is_selectable_from_the_command_line():
    import argparse

    from decoupled.cli import bench as bench_command

    parser = argparse.ArgumentParser()
    bench_command.add_arguments(parser)
    assert parser.parse_args([]).layouts == "gpt2-small,resnet50,1000x20k"
    assert bench.LAYOUTS[parser.parse_args(["--layouts", "1x20M"]).layouts]() == [(20_000_000,)]
