"""Compensated bfloat16/float16 θ and int8 moments through the Triton kernel, under the Triton
interpreter (``TRITON_INTERPRET=1``, CPU tensors), against the reference loop (``adam_update``
with ``remainders``, ``_compensated.py``, and ``coded_states``, ``_int8.py``): every option,
chunk and block boundaries, the storage arithmetic bit for bit, state-dict round trips
between paths, and the device-side skip.

How close: the storage arithmetic (master weight in, θ and r out) is the reference's bit for
bit (``test_storage_arithmetic_is_the_reference_bit_for_bit``). A whole step is not always:
the kernel's square root is IEEE ``sqrt``, torch's CPU one is not always correctly rounded
(``_kernels.py``), so a float32 master weight may differ by an ulp, and an ulp can move r by
one unit (ulp(θ)/256) where it lies at the stochastic threshold, or θ where it lies halfway
between two bfloat16 values; the runs then go on from master weights a unit apart. Hence the
comparison: master weights within one unit per step taken, and at least 99 % of θ, r, the
moments and the int8 codes bit for bit (a wrong rule changes far more).
"""

from __future__ import annotations

import importlib
import math
import os

import pytest
import torch
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

import decoupled
from decoupled.optim import _compact, _int8, _triton
from decoupled.optim._compensated import REMAINDER, _unit, master, store_
from decoupled.optim.adam import adam_update
from tests.helpers import assert_rounded_alike, drawn_sgd_options, rounded_tensors, twin_groups

_saved = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"
try:
    triton = pytest.importorskip("triton")
    tl = importlib.import_module("triton.language")
    kernels = importlib.import_module("decoupled.optim._triton_kernels")
    compact = importlib.import_module("decoupled.optim._triton_compact")

    @triton.jit
    def _round_trip_kernel(p_ptr, r_ptr, w_ptr, w_out_ptr, bits_ptr, n, DTYPE: tl.constexpr,
                           BLOCK: tl.constexpr):  # fmt: skip
        """Store the master weights ``w`` as θ and r, then load them back into ``w_out``."""
        idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = idx < n
        weight = tl.load(w_ptr + idx, mask=mask, other=0.0)
        random16 = tl.load(bits_ptr + idx, mask=mask, other=0).to(tl.uint32)
        compact.store_master(p_ptr, r_ptr, idx, weight, mask, random16, DTYPE)
        tl.store(w_out_ptr + idx, compact.load_master(p_ptr, r_ptr, idx, mask, DTYPE), mask=mask)

    @triton.jit
    def _int8_round_trip_kernel(codes_ptr, scales_ptr, value_ptr, out_ptr, bits_ptr, n,
                                BIAS: tl.constexpr, TINY: tl.constexpr,
                                BLOCK: tl.constexpr):  # fmt: skip
        """Code ``value`` into codes and scales, then decode them into ``out``."""
        first = tl.program_id(0) * BLOCK
        idx = first + tl.arange(0, BLOCK)
        mask = idx < n
        value = tl.load(value_ptr + idx, mask=mask, other=0.0)
        random16 = tl.load(bits_ptr + idx, mask=mask, other=0).to(tl.uint32)
        live = first + tl.arange(0, BLOCK // 256) * 256 < n
        compact.store_int8(codes_ptr, scales_ptr, first, idx, value, mask, live, random16,
                           BIAS, TINY, BLOCK)  # fmt: skip
        decoded = compact.load_int8(codes_ptr, scales_ptr, idx, mask, BIAS, TINY)
        tl.store(out_ptr + idx, decoded, mask=mask)

finally:
    if _saved is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = _saved

pytestmark = [
    pytest.mark.skipif(
        type(kernels.adam_kernel).__name__ != "InterpretedFunction",
        reason="the Triton kernels were compiled (not interpreted) in this process",
    ),
    pytest.mark.usefixtures("triton_interpreter"),
]

SHAPES = [(5,), (70,), (9, 13), (1,)]  # with BLOCK = 64: several chunks, ragged ends
# interpreted steps are slow: no shrinking (a failure prints its example as drawn)
QUICK = {
    "deadline": None,
    "suppress_health_check": [HealthCheck.function_scoped_fixture],
    "phases": [Phase.explicit, Phase.reuse, Phase.generate],
}


def make_params(seed=0, shapes=SHAPES, dtype=torch.bfloat16):
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=generator).to(dtype)) for s in shapes]


def gradients(params, generator):
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator).to(p.dtype)


def train(cls, params, steps, seed=1, **options):
    optimizer = cls(params, **options)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        gradients(params, generator)
        optimizer.step()
    return optimizer


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16) if t.element_size() == 2 else t


def assert_close_to_reference(ours, reference, our_params, reference_params):
    """The module docstring's standard, on θ and every state tensor (codes: one step);
    float32 θ and scales as ``test_triton.py`` holds float32 θ."""
    differing = total = 0
    for p, q in zip(our_params, reference_params):
        state_p, state_q = ours.state[p], reference.state[q]
        assert set(state_p) == set(state_q)
        assert float(state_p.get("step", 0)) == float(state_q.get("step", 0))
        steps = (
            float(state_q["step"])
            if "step" in state_q
            else reference.param_groups[0]["decay_steps"]
        )  # SGD keeps the count in its group
        if REMAINDER in state_q:
            theta, weight = q.detach(), master(q.detach(), state_q[REMAINDER]).double()
            ours_weight = master(p.detach(), state_p[REMAINDER]).double()
            units = steps * _unit(theta).double()  # at most one a step
            close = (ours_weight - weight).abs() <= units + 2**-22 * weight.abs()
            assert bool((close | (weight.isnan() & ours_weight.isnan())).all())
        for key, a, b in [("θ", p.detach(), q.detach())] + [
            (k, state_p[k], state_q[k]) for k in state_q if k != "step"
        ]:
            assert a.dtype == b.dtype
            if a.dtype == torch.float32:  # θ as test_triton.py holds it, and int8 scales
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
                continue
            same = _bits(a) == _bits(b)
            differing, total = differing + int((~same).sum()), total + same.numel()
            if a.is_floating_point():
                torch.testing.assert_close(a.float(), b.float(), rtol=2**-7, atol=1e-6)
            elif key != REMAINDER:  # int8 codes: one step (r: the master weights above)
                assert bool(((a.int() - b.int()).abs() <= 1).all()), key
    assert differing <= 0.01 * total, (differing, total)


def compare(cls, steps=3, shapes=SHAPES, dtype=torch.bfloat16, **options):
    reference_params = make_params(shapes=shapes, dtype=dtype)
    triton_params = make_params(shapes=shapes, dtype=dtype)
    reference = train(cls, reference_params, steps, fused=False, **options)
    ours = train(cls, triton_params, steps, triton=True, **options)
    assert all(REMAINDER in ours.state[p] for p in triton_params)
    assert_close_to_reference(ours, reference, triton_params, reference_params)


COMPENSATED_OPTIONS = st.fixed_dictionaries(
    {
        "cls": st.sampled_from([decoupled.Adam, decoupled.AdamW]),
        "dtype": st.sampled_from([torch.bfloat16, torch.float16]),
        "amsgrad": st.booleans(),
        "maximize": st.booleans(),
        "cautious": st.booleans(),
        "decay_to": st.sampled_from(["zero", "init"]),
        "weight_decay": st.sampled_from([0.0, 0.1, 30.0]),  # 30: decay far above rounding
        "lr": st.sampled_from([1e-3, "tensor"]),
        "betas": st.sampled_from([(0.9, 0.999), (0.0, 0.5)]),
    }
)


@settings(max_examples=12, **QUICK)
@given(options=COMPENSATED_OPTIONS)
def test_compensated_adam_matches_the_reference_loop(options, launches):
    options = dict(options)
    cls = options.pop("cls")
    if cls is decoupled.Adam:
        options["cautious"] = False  # an AdamW option
    if options["lr"] == "tensor":
        options["lr"] = torch.tensor(1e-3)
    if options["weight_decay"] == 30.0 and cls is decoupled.Adam:
        options["weight_decay"] = 0.1
    # float16 θ: bfloat16 moments here, its own float16 ones in the test below
    state_dtype = torch.bfloat16 if options["dtype"] == torch.float16 else None
    before = launches["adam_kernel"]
    compare(cls, state_dtype=state_dtype, **options)
    assert launches["adam_kernel"] == before + 3


SGD_OPTIONS = st.fixed_dictionaries(
    {
        "cls": st.sampled_from([decoupled.SGD, decoupled.SGDW]),
        "dtype": st.sampled_from([torch.bfloat16, torch.float16]),
        "momentum": st.sampled_from([0.0, 0.9]),
        "dampening": st.sampled_from([0.0, 0.3]),
        "nesterov": st.booleans(),
        "maximize": st.booleans(),
        "cautious": st.booleans(),
        "decay_to": st.sampled_from(["zero", "init"]),
        "weight_decay": st.sampled_from([0.0, 0.1, 30.0]),
        "lr": st.sampled_from([1e-3, "tensor"]),
    }
)


@settings(max_examples=10, **QUICK)
@given(options=SGD_OPTIONS)
def test_compensated_sgd_matches_the_reference_loop(options, launches):
    """SGD/SGDW on the float32 master weight with a float32 momentum buffer
    (``_sgd_compensation.py``), the remainder's bits keyed by the group's step count."""
    cls, options = drawn_sgd_options(options, lr=1e-3)
    if cls is decoupled.SGD:
        options["cautious"] = False  # an SGDW option
        options["weight_decay"] = min(options["weight_decay"], 0.1)
    before = launches["sgd_kernel"]
    compare(cls, **options)
    assert launches["sgd_kernel"] == before + 3


def test_chunk_boundaries_mixed_dtypes_and_layouts(launches):
    """Odd sizes around the chunk size (64), 0-dim and empty tensors, a channels_last weight
    with a contiguous gradient, and float32, compensated bfloat16 and compensated float16 θ
    in one group: one launch per kind and step."""
    shapes = [(), (0,), (1,), (63,), (64,), (65,), (129,), (3, 5, 7)]
    runs = []
    for options in ({"fused": False}, {"triton": True}):
        params = make_params(shapes=shapes) + make_params(seed=2, shapes=shapes[3:6])
        params += make_params(seed=3, shapes=[(40,), (70,)], dtype=torch.float16)
        params += make_params(seed=4, shapes=[(33,)], dtype=torch.float32)
        weight = torch.randn(4, 3, 3, 3, generator=torch.Generator().manual_seed(9))
        conv = torch.nn.Parameter(weight.to(torch.bfloat16, memory_format=torch.channels_last))
        everything = [*params, conv]
        # gradients drawn contiguous: the conv weight's differs in layout
        optimizer = train(
            decoupled.AdamW, everything, 3, seed=3, lr=1e-2, weight_decay=0.1, amsgrad=True,
            state_dtype=torch.bfloat16, **options,
        )  # fmt: skip
        runs.append((optimizer, everything))
    (reference, reference_params), (ours, our_params) = runs
    assert_close_to_reference(ours, reference, our_params, reference_params)
    assert launches["adam_kernel"] == 3 * 3


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy on NaN and inf: meant
def test_storage_arithmetic_is_the_reference_bit_for_bit():
    """θ ← round_to_nearest_even(w), r ← the stochastically rounded rest, and the master
    weight loaded back, against ``_compensated.store_``/``master``: every exponent, zeros,
    subnormal θ (whose unit is a float32 subnormal for bfloat16), values that round to ±inf,
    halfway cases, NaN and ±inf (r = 0)."""
    generator = torch.Generator().manual_seed(0)
    n = 3000
    weights = torch.randn(n, generator=generator) * torch.logspace(-44, 38, n).clamp(max=3e38)
    weights[:12] = torch.tensor([0.0, -0.0, math.nan, math.inf, -math.inf, 3.39e38, -3.39e38,
                                 1e-40, -3e-39, 65504.0, 65519.0, 1.0 + 2**-8])  # fmt: skip
    weights[12:40] = torch.randn(28, generator=generator) * 2**-130  # bfloat16 subnormals
    weights[40:60] = torch.randn(20, generator=generator) * 2**-20  # float16 subnormals
    # θ exactly halfway between two bfloat16 values: ties to even
    weights[60:80] = (torch.arange(20) * 2 + 1).float() * 2**-8 + 1
    for dtype in (torch.bfloat16, torch.float16):
        bits = _compact._mix(_compact.rounding_bits(n, step=5.0, position=2, device="cpu")) >> 16
        theta, remainder = torch.empty(n, dtype=dtype), torch.empty(n, dtype=torch.int8)
        store_(theta, remainder, weights, step=5.0, position=2)
        ours_theta, ours_remainder = torch.empty_like(theta), torch.empty_like(remainder)
        loaded = torch.empty(n)
        _round_trip_kernel[(triton.cdiv(n, 1024),)](
            ours_theta, ours_remainder, weights, loaded, bits.to(torch.int32), n,
            DTYPE=getattr(tl, str(dtype).split(".")[1]), BLOCK=1024,
        )  # fmt: skip
        # a NaN's bits are torch's vectorization's choice (0xFFFF on x86, 0x7FC0 in c10)
        assert torch.equal(ours_theta.isnan(), theta.isnan()), dtype
        numbers = ~theta.isnan()
        assert torch.equal(ours_theta[numbers].view(torch.int16), theta[numbers].view(torch.int16))
        assert torch.equal(ours_remainder, remainder), dtype
        expected = master(theta, remainder)
        assert torch.equal(loaded[numbers].view(torch.int32), expected[numbers].view(torch.int32))
        assert bool(loaded[~numbers].isnan().all())
        assert int((remainder != 0).sum()) > n // 2  # the remainders are exercised


def test_float16_with_float16_moments_rounds_them_to_nearest(launches):
    """Compensated float16 θ with its moments in float16 (the default state dtype): computed
    in float32 and rounded to nearest, as the reference loop's ``copy_``."""
    compare(decoupled.AdamW, dtype=torch.float16, amsgrad=True, lr=1e-3, weight_decay=0.1)
    assert launches["adam_kernel"] == 3


@pytest.mark.parametrize(
    "first,second",
    [("triton", "kernel"), ("kernel", "triton"), ("reference", "triton"), ("triton", "reference")],
)
@pytest.mark.parametrize("cls", [decoupled.AdamW, decoupled.SGDW])
def test_state_dict_round_trips_keep_the_remainder(cls, first, second, launches):
    """Two compensated steps on one path, save, load into another, two more steps: the same
    as four steps of the reference loop (``kernel``: ``triton=False``, whatever CPU path
    steps compensated θ); SGDW's float32 momentum buffer included."""
    paths = {"triton": {"triton": True}, "kernel": {"triton": False}, "reference": {"fused": False}}
    options = {"lr": 1e-2, "weight_decay": 0.1}
    options |= {"amsgrad": True} if cls is decoupled.AdamW else {"momentum": 0.9}
    expected_params = make_params()
    expected = train(cls, expected_params, 4, **options, fused=False)

    params = make_params()
    saved = train(cls, params, 2, **options, **paths[first]).state_dict()
    assert all(state[REMAINDER].abs().sum() > 0 for state in saved["state"].values())
    resumed = cls(params, **options, **paths[second])
    resumed.load_state_dict(saved)
    generator = torch.Generator().manual_seed(1)
    for _ in range(2):  # the gradients of steps 1–2, then those of steps 3–4
        for p in params:
            torch.randn(p.shape, generator=generator)
    for _ in range(2):
        gradients(params, generator)
        resumed.step()
    assert_close_to_reference(resumed, expected, params, expected_params)  # r is int8 again
    kernel = "adam_kernel" if cls is decoupled.AdamW else "sgd_kernel"
    assert launches[kernel] == 2 * [first, second].count("triton")


@pytest.mark.parametrize("state_dtype", [None, "int8"])
def test_skipped_step_leaves_theta_and_the_remainder(state_dtype, launches):
    """``capturable=True`` with ``skip_nonfinite``: a NaN gradient skips the step on the
    device; θ, r and the moments (int8 codes and scales too) stay, and the steps around it
    equal the reference's."""
    reference_params, params = make_params(), make_params()
    options = {"lr": 1e-2, "state_dtype": state_dtype}
    reference = train(decoupled.AdamW, reference_params, 2, fused=False, **options)
    ours = decoupled.AdamW(params, triton=True, capturable=True, skip_nonfinite=True, **options)
    generator = torch.Generator().manual_seed(1)
    gradients(params, generator)
    ours.step()
    before = [(p.detach().clone(), {k: v.clone() for k, v in ours.state[p].items()})
              for p in params]  # fmt: skip
    params[2].grad[0, 0] = math.nan
    ours.step()
    for p, (theta, state) in zip(params, before):
        assert torch.equal(p, theta)
        assert all(torch.equal(ours.state[p][k], v) for k, v in state.items())
    gradients(params, generator)
    ours.step()
    assert_close_to_reference(ours, reference, params, reference_params)
    assert launches["adam_kernel"] == 3


def test_int8_adamw_theta_is_the_cpu_kernels_bit_for_bit(launches):
    """Both kernels take correctly rounded roots and compute sqrt(v̂) as v's root times the
    float32 inverse of sqrt(1 − β2ᵗ) (``_int8.py``, Arithmetic): float32 θ, codes and scales
    of AdamW are equal bit for bit (a division in one of them moves a few % of θ)."""
    if not decoupled.optim.kernel_available():
        pytest.skip("the C++ kernel cannot be built here")
    shapes = [(1000,), (3, 300)]
    cpu_params, params = make_params(shapes=shapes), make_params(shapes=shapes)
    options = {"lr": 1e-2, "weight_decay": 0.1, "state_dtype": "int8"}
    cpu = train(decoupled.AdamW, cpu_params, 3, fused=None, **options)
    ours = train(decoupled.AdamW, params, 3, triton=True, **options)
    for p, q in zip(params, cpu_params):
        assert torch.equal(p, q)
        assert all(torch.equal(ours.state[p][k], v) for k, v in cpu.state[q].items())
    assert launches["adam_kernel"] == 3


def test_grad_scale_unscales_bfloat16_gradients_in_the_kernel(launches):
    """GradScaler's fused protocol on compensated θ: g ← g/scale in θ's dtype, written back,
    then the float32 step on the master weight, as the reference loop."""
    results = []
    for update in (adam_update, _triton.triton_adam_update):
        params = [p.detach() for p in make_params()]
        grads = [(g * 8).detach() for g in make_params(seed=4)]
        moments = [[torch.zeros_like(p) for p in params] for _ in range(3)]
        remainders = [torch.zeros_like(p, dtype=torch.int8) for p in params]
        steps = [torch.tensor(0.0) for _ in params]
        options = {"lr": 1e-2, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.1,
                   "decoupled": False, "amsgrad": True, "grad_scale": torch.tensor(8.0),
                   "remainders": remainders}  # fmt: skip
        if update is not adam_update:
            options["fallback"] = None
        update(params, grads, *moments, steps, **options)
        results.append(params + grads + moments[0] + remainders)
    for ours, reference in zip(*results):
        assert torch.equal(_bits(ours), _bits(reference))
    assert launches["adam_kernel"] == 1


def test_sharded_remainders_step_through_their_local_tensors(launches):
    """DTensor shards (``_shards.py``) reach the launcher as local θ, g and moments while
    the ``remainders`` option still holds DTensors: their local tensors are stepped."""

    class Shard:  # what ``_shards.local`` reads of a DTensor
        def __init__(self, tensor):
            self.tensor = tensor

        def to_local(self):
            return self.tensor

    results = []
    for update in (adam_update, _triton.triton_adam_update):
        params = [p.detach() for p in make_params(shapes=[(70,), (9, 13)])]
        grads = [g.detach() for g in make_params(seed=4, shapes=[(70,), (9, 13)])]
        moments = [[torch.zeros_like(p) for p in params] for _ in range(2)]
        remainders = [torch.zeros_like(p, dtype=torch.int8) for p in params]
        options = {"lr": 1e-2, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.0,
                   "decoupled": True, "decay_rate": 1e-3, "remainders": remainders}  # fmt: skip
        if update is not adam_update:
            options |= {"fallback": None, "remainders": [Shard(r) for r in remainders]}
        for _ in range(2):
            update(params, grads, *moments, [], [torch.tensor(0.0) for _ in params], **options)
        results.append(params + moments[0] + moments[1] + remainders)
    for ours, reference in zip(*results):
        assert torch.equal(_bits(ours), _bits(reference))
    assert bool(results[1][-1].abs().sum() > 0)
    assert launches["adam_kernel"] == 2


# ---- int8 moments (``_int8.py``) ------------------------------------------------------------

INT8_SHAPES = [(300,), (17, 19), (5,), (256,)]  # blocks of 256: ragged, whole, one element


INT8_OPTIONS = st.fixed_dictionaries(
    {
        "cls": st.sampled_from([decoupled.Adam, decoupled.AdamW]),
        "dtype": st.sampled_from([torch.float32, torch.float32, torch.bfloat16, torch.float16]),
        "maximize": st.booleans(),
        "cautious": st.booleans(),
        "decay_to": st.sampled_from(["zero", "init"]),
        "weight_decay": st.sampled_from([0.0, 0.1]),
        "lr": st.sampled_from([1e-2, "tensor"]),
        "betas": st.sampled_from([(0.9, 0.999), (0.0, 0.5)]),
    }
)


@settings(max_examples=8, **QUICK)
@given(options=INT8_OPTIONS)
@example(  # float16 θ, Adam + L2, a tensor lr: the reference loop ends 4 units away
    options={"cls": decoupled.Adam, "dtype": torch.float16, "maximize": False, "cautious": False,
             "decay_to": "zero", "weight_decay": 0.1, "lr": "tensor", "betas": (0.9, 0.999)}
)  # fmt: skip
def test_int8_moments_match_the_cpu_kernel(options, launches):
    """int8 codes and scales beside float32 θ or compensated bfloat16/float16 θ (whose step
    runs on the float32 master weight), every option the int8 kernels take, against the C++
    kernel, which computes the same float32 operations (and equals the reference loop bit for
    bit where that computes them too: test_int8_kernel.py, test_compensated_kernel.py). The
    reference loop itself is not the yardstick here: its tensor-lr step size is computed in
    float32 tensor operations, and with Adam's L2 term such differences feed back into g (the
    example: 4 remainder units after 3 steps)."""
    if not decoupled.optim.kernel_available():
        pytest.skip("the C++ kernel cannot be built here")
    options = dict(options)
    cls, dtype = options.pop("cls"), options.pop("dtype")
    if cls is decoupled.Adam:
        options["cautious"] = False  # an AdamW option
    if options["lr"] == "tensor":
        options["lr"] = torch.tensor(1e-2)
    reference_params = make_params(shapes=INT8_SHAPES, dtype=dtype)
    params = make_params(shapes=INT8_SHAPES, dtype=dtype)
    before = launches["adam_kernel"]
    reference = train(cls, reference_params, 3, triton=False, state_dtype="int8", **options)
    ours = train(cls, params, 3, triton=True, state_dtype="int8", **options)
    assert ours.state[params[0]]["exp_avg"].dtype == torch.int8
    assert (REMAINDER in ours.state[params[0]]) == (dtype != torch.float32)
    assert_close_to_reference(ours, reference, params, reference_params)
    assert launches["adam_kernel"] == before + 3


def test_int8_codes_and_scales_are_the_reference_bit_for_bit(launches):
    """AdamW's moments do not read θ: with the same gradients the kernel's codes and scales
    are the reference loop's bit for bit (decoded, stepped, re-coded with the same
    arithmetic and the same hash bits), over block boundaries and many steps."""
    shapes = [(255,), (257,), (513,), (3, 5, 7)]
    reference_params, params = make_params(shapes=shapes), make_params(shapes=shapes)
    params = [torch.nn.Parameter(p.detach().float()) for p in params]
    reference_params = [torch.nn.Parameter(p.detach().float()) for p in reference_params]
    options = {"lr": 1e-2, "weight_decay": 0.1, "state_dtype": "int8"}
    reference = train(decoupled.AdamW, reference_params, 6, fused=False, **options)
    ours = train(decoupled.AdamW, params, 6, triton=True, **options)
    assert launches["adam_kernel"] == 6
    for p, q in zip(params, reference_params):
        for key in ("exp_avg", "exp_avg_sq", "exp_avg_scale", "exp_avg_sq_scale"):
            assert torch.equal(ours.state[p][key], reference.state[q][key]), key
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "cls,options,dtype",
    [
        (decoupled.AdamW, {"state_dtype": "int8"}, torch.float32),
        (decoupled.SGDW, {"momentum": 0.9}, torch.bfloat16),
        (decoupled.AdamW, {"state_dtype": torch.bfloat16}, torch.float32),
        (decoupled.AdamW, {}, torch.bfloat16),
    ],
    ids=["int8 moments", "compensated SGD θ", "bfloat16 moments", "compensated θ"],
)
def test_groups_are_keyed_by_their_position_in_the_optimizer(cls, options, dtype, launches):
    """Twin groups (same values, same gradients; ``test_rounding_positions.py``): the kernel
    keys each group's rounding by its tensors' positions in the optimizer, as the reference
    loop does, group by group, and the twins part. int8 codes and scales of AdamW and
    compensated SGD θ, its remainder and buffer, equal the reference's bit for bit; bfloat16
    moments and compensated Adam θ at least 99 % (the module docstring says why not all; a
    group keyed as another differs in far more)."""
    ours, params = twin_groups(cls, options, dtype, steps=3, numel=300, triton=True)
    reference, reference_params = twin_groups(cls, options, dtype, steps=3, numel=300,
                                              fused=False)  # fmt: skip
    kernel = "adam_kernel" if cls is decoupled.AdamW else "sgd_kernel"
    assert launches[kernel] == 3 * 3  # one launch per group and step
    exact = options.get("state_dtype") == "int8" or cls is decoupled.SGDW
    assert_rounded_alike(ours, params, reference, reference_params, exact)
    tensors = [rounded_tensors(ours, p) for p in params]
    assert any(not torch.equal(tensors[1][key], tensors[0][key]) for key in tensors[0])


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy on NaN and inf: meant
def test_int8_coding_is_the_reference_bit_for_bit():
    """``store_int8``/``load_int8`` against ``_int8.encode_``/``decode``: blocks of values
    across many magnitudes, values on and just below the levels, zeros and negative zeros, a
    block with a NaN (scale NaN, codes 0), one with ±inf (scale inf), one whose largest is
    subnormal (scale 2⁻¹²⁶), one just below 2¹²⁶ (the largest finite scale), one at 3e38
    (above it: scale inf), a ragged last block; two blocks per program."""
    generator = torch.Generator().manual_seed(1)
    n = 256 * 8 + 77
    values = torch.randn(n, generator=generator) * torch.logspace(-30, 30, n)
    values[:256] = torch.randn(256, generator=generator)  # one ordinary block
    on = _int8.levels((torch.arange(256) - 128).clamp(-120, 120), "exp_avg")
    values[256:512] = on  # on the levels of scale 2 (the largest is 1)
    values[300:400] = torch.nextafter(on[44:144], torch.tensor(0.0))  # and just below
    values[512:768] = 0.0
    values[600:610] = -0.0
    values[800], values[1100], values[1101] = math.nan, math.inf, -math.inf
    values[1280:1536] = torch.randn(256, generator=generator) * 1e-40  # subnormal largest
    values[1536:1792] = torch.randn(256, generator=generator) * 1e37
    values[1700] = torch.tensor(2.0**126).nextafter(torch.tensor(0.0))
    values[1800] = 3e38
    bits = _compact.rounding_bits(n, step=3.0, position=1, device="cpu")
    for key, random16 in (("exp_avg", bits & 0xFFFF), ("exp_avg_sq", bits >> 16)):
        code = _int8.CODES[key]
        value = values if key == "exp_avg" else values.abs()
        codes, scales = torch.empty(n, dtype=code.dtype), torch.empty(-(-n // 256))
        _int8.encode_(codes, scales, value, key, random16)
        ours_codes, ours_scales = torch.empty_like(codes), torch.full_like(scales, -1.0)
        decoded = torch.empty(n)
        _int8_round_trip_kernel[(triton.cdiv(n, 512),)](
            ours_codes, ours_scales, value, decoded, random16.to(torch.int32), n,
            BIAS=code.bias, TINY=code.tiny, BLOCK=512,
        )  # fmt: skip
        assert torch.equal(ours_codes, codes), key
        assert torch.equal(ours_scales.view(torch.int32), scales.view(torch.int32)), key
        expected = _int8.decode(codes, scales, key)
        assert torch.equal(decoded.isnan(), expected.isnan()), key
        numbers = ~expected.isnan()
        assert torch.equal(decoded[numbers].view(torch.int32), expected[numbers].view(torch.int32))
        assert scales[3].isnan() and scales[4].isinf() and scales[7].isinf()
        assert scales[5] == 2.0**-126 and scales[6] == 2.0**126
        assert int((codes != 0).sum()) > n // 3


def test_int8_block_boundaries_mixed_dtypes_and_layouts(launches):
    """Sizes around the block (256) and the chunk, 0-dim and empty tensors, a channels_last
    weight with a contiguous gradient, float32 and compensated bfloat16 θ in one int8 group:
    one launch per kind and step, against the reference loop."""
    shapes = [(), (0,), (1,), (255,), (256,), (257,), (3, 5, 7)]
    runs = []
    for options in ({"fused": False}, {"triton": True}):
        params = make_params(shapes=shapes, dtype=torch.float32)
        params += make_params(seed=2, shapes=[(300,), (40,)])
        weight = torch.randn(4, 3, 3, 3, generator=torch.Generator().manual_seed(9))
        conv = torch.nn.Parameter(weight.to(memory_format=torch.channels_last))
        everything = [*params, conv]
        # gradients drawn contiguous: the conv weight's differs in layout
        optimizer = train(
            decoupled.AdamW, everything, 3, seed=3, lr=1e-2, weight_decay=0.1,
            state_dtype="int8", **options,
        )  # fmt: skip
        runs.append((optimizer, everything))
    (reference, reference_params), (ours, our_params) = runs
    assert_close_to_reference(ours, reference, our_params, reference_params)
    assert launches["adam_kernel"] == 2 * 3


@pytest.mark.parametrize(
    "first,second",
    [("triton", "kernel"), ("kernel", "triton"), ("reference", "triton"), ("triton", "reference")],
)
def test_int8_state_dict_round_trips(first, second, launches):
    """Two int8 steps on one path (``kernel``: the C++ kernel), save, load into another, two
    more: the same as four steps of the reference loop."""
    paths = {"triton": {"triton": True}, "kernel": {"triton": False}, "reference": {"fused": False}}
    options = {"lr": 1e-2, "weight_decay": 0.1, "state_dtype": "int8"}
    shapes = [(300,), (9, 13)]
    expected_params = make_params(shapes=shapes, dtype=torch.float32)
    expected = train(decoupled.AdamW, expected_params, 4, **options, fused=False)

    params = make_params(shapes=shapes, dtype=torch.float32)
    saved = train(decoupled.AdamW, params, 2, **options, **paths[first]).state_dict()
    resumed = decoupled.AdamW(params, **options, **paths[second])
    resumed.load_state_dict(saved)
    generator = torch.Generator().manual_seed(1)
    for _ in range(2):  # the gradients of steps 1–2, then those of steps 3–4
        for p in params:
            torch.randn(p.shape, generator=generator)
    for _ in range(2):
        gradients(params, generator)
        resumed.step()
    assert_close_to_reference(resumed, expected, params, expected_params)
    assert launches["adam_kernel"] == 2 * [first, second].count("triton")


def test_int8_with_uncompensated_low_precision_theta_takes_the_reference_loop(launches):
    """``compensate=False`` bfloat16 θ with int8 moments: the reference loop computes them in
    bfloat16, so the launcher leaves them to it."""
    reference_params, params = make_params(), make_params()
    options = {"state_dtype": "int8", "compensate": False}
    reference = train(decoupled.AdamW, reference_params, 2, fused=False, **options)
    ours = train(decoupled.AdamW, params, 2, triton=True, **options)
    assert launches["adam_kernel"] == 0
    for p, q in zip(params, reference_params):
        assert torch.equal(p, q)
        assert all(torch.equal(ours.state[p][k].cpu(), v) for k, v in reference.state[q].items())
