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
