"""bfloat16 optimizer state (``state_dtype=torch.bfloat16``): stochastic rounding, the kernel
against the reference loop, bounded error over 1000 steps, memory, state dicts."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import decoupled
from decoupled.optim._compact import rounding_bits, stochastic_round_

BF16 = {"state_dtype": torch.bfloat16}


def quadratic_run(state_dtype, fused=None, steps=1000, cls=decoupled.AdamW, **kwargs):
    """AdamW on f(θ) = ½ Σ hᵢθᵢ² (curvatures 1e-2..10) with gradient noise; the trajectory."""
    generator = torch.Generator().manual_seed(0)
    curvature = torch.logspace(-2, 1, 4096)
    theta = torch.nn.Parameter(torch.randn(4096, generator=generator))
    optimizer = cls([theta], lr=1e-2, state_dtype=state_dtype, fused=fused, **kwargs)
    trajectory = []
    for _ in range(steps):
        noise = torch.randn(4096, generator=generator)
        theta.grad = curvature * theta.detach() + 0.1 * noise
        optimizer.step()
        trajectory.append(theta.detach().clone())
    return torch.stack(trajectory), optimizer, theta


def test_stochastic_rounding_is_unbiased_and_exact_on_representable_values():
    value = torch.full((1 << 16,), 1.0 + 2**-10)  # a quarter of the way from 1 to the next bf16
    bits = rounding_bits(value.numel(), step=7, position=3, device=value.device) & 0xFFFF
    out = torch.empty_like(value, dtype=torch.bfloat16)
    stochastic_round_(out, value, bits)
    assert set(out.float().unique().tolist()) == {1.0, 1.0 + 2**-7}
    assert out.float().mean().item() == pytest.approx(1.0 + 2**-10, abs=2e-5)  # E[round(x)] = x
    exact = torch.tensor([0.0, -2.0, 1.5, float("inf"), float("-inf")])
    rounded = torch.empty_like(exact, dtype=torch.bfloat16)
    stochastic_round_(rounded, exact, torch.full((5,), 0xFFFF, dtype=torch.int64))
    assert torch.equal(rounded.float(), exact)
    nan = torch.empty(1, dtype=torch.bfloat16)
    stochastic_round_(nan, torch.tensor([float("nan")]), torch.zeros(1, dtype=torch.int64))
    assert nan.isnan().all()


def test_small_updates_are_kept_where_round_to_nearest_stalls():
    """With g = 1, v_t = 1 − 0.999ᵗ. Each increment 0.001·(1 − v) is below half a bfloat16
    ulp once v > ~0.25, so round-to-nearest stops there; stochastic rounding follows it."""
    steps, beta2 = 3000, 0.999
    theta = torch.nn.Parameter(torch.zeros(4096))
    optimizer = decoupled.Adam([theta], lr=1e-3, betas=(0.9, beta2), **BF16)
    nearest = torch.zeros(4096, dtype=torch.bfloat16)
    for _ in range(steps):
        theta.grad = torch.ones(4096)
        optimizer.step()
        nearest = (nearest.float() * beta2 + (1 - beta2)).to(torch.bfloat16)
    expected = 1 - beta2**steps
    assert nearest.float().mean().item() < expected - 0.3  # the failure mode exists
    assert optimizer.state[theta]["exp_avg_sq"].float().mean().item() == pytest.approx(
        expected, abs=5e-3
    )


@pytest.mark.parametrize(
    "cls,kwargs",
    [
        (decoupled.AdamW, {"weight_decay": 0.1}),
        (decoupled.Adam, {"weight_decay": 0.1, "amsgrad": True}),
        (decoupled.AdamW, {"weight_decay": 0.1, "decay_to": "init", "maximize": False}),
    ],
    ids=["AdamW", "Adam-amsgrad", "AdamW-init"],
)
def test_kernel_and_reference_round_alike(cls, kwargs, path_log):
    """Same hash, same bits: the kernel's bfloat16 state equals the reference loop's (a state
    entry may differ by one bfloat16 step where the float32 values before rounding differ in
    their last bit)."""
    fast, opt_fast, theta_fast = quadratic_run(torch.bfloat16, None, 300, cls, **kwargs)
    slow, opt_slow, theta_slow = quadratic_run(torch.bfloat16, False, 300, cls, **kwargs)
    assert set(path_log) == {"kernel_adam_update", "adam_update"}  # the kernel took every step
    # where a moment differs by one bfloat16 step, that step's update moves by ≤ lr·2⁻⁸
    assert (fast - slow).abs().max().item() < 10 * 1e-2 * 2**-8  # measured ≤ 2e-4
    for key in opt_slow.state[theta_slow]:
        if key == "init_param":
            continue
        a, b = opt_fast.state[theta_fast][key].float(), opt_slow.state[theta_slow][key].float()
        assert opt_fast.state[theta_fast][key].dtype == (
            torch.float32 if key == "step" else torch.bfloat16
        )
        assert (a != b).float().mean().item() < 1e-3, key


def test_error_against_float32_state_stays_bounded_over_1000_steps():
    reference, _, _ = quadratic_run(None)
    compact, _, _ = quadratic_run(torch.bfloat16)
    error = (compact - reference).norm(dim=1) / reference[0].norm()
    assert error.max().item() < 5e-3  # measured 1.6e-3
    assert error[-100:].max().item() < 2 * error[400:500].max().item() + 1e-4  # not growing


def test_state_memory_is_halved():
    def state_bytes(**kwargs):
        theta = torch.nn.Parameter(torch.zeros(1000, 10))
        optimizer = decoupled.AdamW([theta], amsgrad=True, **kwargs)
        theta.grad = torch.ones_like(theta)
        optimizer.step()
        state = optimizer.state[theta]
        return sum(t.nbytes for k, t in state.items() if k != "step")

    assert state_bytes(**BF16) * 2 == state_bytes()


def test_state_dict_round_trip_through_torch_keeps_the_compact_state():
    _, optimizer, theta = quadratic_run(torch.bfloat16, steps=20)
    saved = copy.deepcopy(optimizer.state_dict())
    torch_optimizer = torch.optim.AdamW([theta], lr=1e-2)
    torch_optimizer.load_state_dict(copy.deepcopy(saved))  # torch upcasts to θ's dtype
    assert torch_optimizer.state[theta]["exp_avg"].dtype == torch.float32
    back = decoupled.AdamW([theta], lr=1e-2, **BF16)
    back.load_state_dict(torch_optimizer.state_dict())  # a dict without state_dtype
    assert back.param_groups[0]["state_dtype"] == torch.bfloat16  # the optimizer's choice
    theta.grad = torch.zeros_like(theta)
    back.step()  # the moments return to bfloat16, unchanged by the round trip
    assert back.state[theta]["exp_avg_sq"].dtype == torch.bfloat16
    expected = saved["state"][0]["exp_avg_sq"].float() * 0.999
    assert torch.allclose(back.state[theta]["exp_avg_sq"].float(), expected, rtol=2**-7)
    float32 = decoupled.AdamW([theta], lr=1e-2)
    float32.load_state_dict(copy.deepcopy(saved))  # a compact checkpoint, float32 optimizer
    float32.step()
    assert float32.param_groups[0]["state_dtype"] is None
    assert float32.state[theta]["exp_avg_sq"].dtype == torch.float32


def test_channels_last_and_transposed_parameters_round_alike_on_both_paths(path_log):
    """The rounding bits follow memory order on both paths, whatever the layout."""
    generator = torch.Generator().manual_seed(0)
    conv = torch.randn(8, 3, 3, 3, generator=generator).contiguous(
        memory_format=torch.channels_last
    )
    params = [torch.nn.Parameter(conv), torch.nn.Parameter(torch.randn(5, 7).t())]
    twins = [torch.nn.Parameter(p.detach().clone(memory_format=torch.preserve_format))
             for p in params]  # fmt: skip
    optimizers = [
        decoupled.AdamW(params, lr=1e-2, amsgrad=True, **BF16),
        decoupled.AdamW(twins, lr=1e-2, amsgrad=True, fused=False, **BF16),
    ]
    for _ in range(20):
        for p, q in zip(params, twins):
            grad = torch.randn(p.shape, generator=generator)
            p.grad = (
                grad.clone().contiguous(memory_format=torch.channels_last)
                if p.dim() == 4
                else grad.t().contiguous().t()
            )
            q.grad = p.grad.clone(memory_format=torch.preserve_format)
        for optimizer in optimizers:
            optimizer.step()
    assert path_log == ["kernel_adam_update", "adam_update"] * 20
    for p, q in zip(params, twins):
        assert (p - q).abs().max() < 1e-5
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            a, b = optimizers[0].state[p][key], optimizers[1].state[q][key]
            assert a.dtype == torch.bfloat16 and a.stride() == p.stride()
            assert (a.float() != b.float()).float().mean() < 0.02, key


def test_invalid_state_dtype_names_the_value():
    with pytest.raises(ValueError, match="Invalid state_dtype value: torch.float16"):
        decoupled.AdamW([torch.nn.Parameter(torch.zeros(1))], state_dtype=torch.float16)


def test_a_compiled_step_keeps_compact_state():
    """torch.compile traces the reference loop; the rounding itself runs eagerly between the
    compiled graphs (Inductor cannot compile its bit views)."""

    def run(compiled):
        torch.manual_seed(0)
        theta = torch.nn.Parameter(torch.randn(100))
        optimizer = decoupled.AdamW([theta], lr=torch.tensor(0.01), **BF16)
        step = torch.compile(optimizer.step) if compiled else optimizer.step
        generator = torch.Generator().manual_seed(1)
        for _ in range(5):
            theta.grad = torch.randn(100, generator=generator)
            step()
        return theta.detach(), optimizer.state[theta]["exp_avg_sq"]

    (theta_c, v_c), (theta_e, v_e) = run(True), run(False)
    assert v_c.dtype == torch.bfloat16
    assert (theta_c - theta_e).abs().max() < 1e-5
    assert (v_c.float() != v_e.float()).float().mean() < 0.05


# path_log is cleared at each example, so sharing it across examples is safe
@settings(
    max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    cls=st.sampled_from([decoupled.Adam, decoupled.AdamW]),
    amsgrad=st.booleans(),
    maximize=st.booleans(),
    decay_to=st.sampled_from(["zero", "init"]),
    weight_decay=st.sampled_from([0.0, 0.1]),
    numel=st.sampled_from([1, 7, 64, 1000, 70_000]),  # tails, whole vectors, several chunks
    seed=st.integers(0, 2**16),
)
def test_kernel_matches_the_reference_over_configurations(
    cls, amsgrad, maximize, decay_to, weight_decay, numel, seed, path_log
):
    """bfloat16 state through the C++ kernel (vectorized however the CPU allows) against the
    reference loop, 10 steps: moments equal but for rare one-step roundings, θ to 1e-5."""
    path_log.clear()
    generator = torch.Generator().manual_seed(seed)
    start = torch.randn(numel, generator=generator)
    params = [torch.nn.Parameter(start.clone()) for _ in range(2)]
    options = {"amsgrad": amsgrad, "maximize": maximize, "decay_to": decay_to, **BF16}
    optimizers = [
        cls([params[0]], lr=1e-2, weight_decay=weight_decay, **options),
        cls([params[1]], lr=1e-2, weight_decay=weight_decay, fused=False, **options),
    ]
    for _ in range(10):
        grad = torch.randn(numel, generator=generator)
        for p, optimizer in zip(params, optimizers):
            p.grad = grad.clone()
            optimizer.step()
    assert path_log == ["kernel_adam_update", "adam_update"] * 10
    assert (params[0] - params[1]).abs().max() < 1e-5
    for key in ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if amsgrad else ()):
        a, b = (optimizer.state[p][key].float() for optimizer, p in zip(optimizers, params))
        assert (a != b).float().sum() <= max(1, numel // 500), key
