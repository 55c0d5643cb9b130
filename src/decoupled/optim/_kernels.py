"""Fast paths behind the same math as the reference loops (``adam_update``, ``sgd_update``).

Which path a step takes (``fused=None``, the default, picks the first that applies;
``fused=False`` always takes the reference loop, bit-identical to torch.optim's single-tensor
path; ``fused=True`` also lets torch's fused kernels run on bfloat16/float16 parameters):

0. **The one-pass Triton kernel** (``_triton_kernels.py``, launched by ``_triton.py``): CUDA
   parameters when ``triton`` is installed (``triton=None``, the default), or whenever
   ``triton=True`` (CPU tensors only under the Triton interpreter); every option of the C++
   kernel, float32/bfloat16/float16 θ computed in float32, compensated bfloat16/float16 θ
   (Adam/AdamW, SGD/SGDW) and int8 moments (``_triton_compact.py``), no host synchronization.
1. **The one-pass C++ kernel** (``csrc/``, interface ``csrc/steps.h``): float32 CPU
   parameters, every option (L2 or decoupled decay in any ``decay_scale`` convention,
   ``decay_to="init"``, cautious
   decay, amsgrad, maximize, Nesterov, float32 or bfloat16 state; int8 moments, ``_int8.py``,
   for Adam/AdamW through ``adam_int8_step_``); and compensated
   bfloat16/float16 CPU parameters of Adam/AdamW (``_compensated.py``, the same options and
   float32 or bfloat16 moments, through ``adam_compensated_step_``; int8 moments through
   ``adam_int8_step_``) and of SGD/SGDW (a float32 buffer, ``sgd_compensated_step_``), the only
   CPU path that keeps their remainder. All tensors of a group
   in one parallel region, one pass over memory. Built with the machine's C++ compiler the
   first time it is needed (``_build.py``).
2. **torch's fused Adam/AdamW kernels** (``torch._fused_adam_``/``_fused_adamw_``): other
   float dtypes on the CPU, when the C++ kernel is unavailable. The fused AdamW kernel applies
   ``θ ← θ·(1 − lr·λ')``, so a per-step rate c of any convention is passed as λ' = c / lr;
   not for ``decay_to="init"``, cautious decay, complex parameters or bfloat16 state. Those
   kernels assume that θ, g and the moments share one memory layout without checking it, so a
   gradient laid out otherwise is copied into its parameter's layout first, and a parameter
   whose moments are laid out otherwise (or that is not dense) takes the reference loop.
3. **The reference loop** for everything else: complex parameters, stacked per-run learning
   rates (the lab's batched executor), int8 moments of parameters neither kernel takes,
   compensated bfloat16/float16
   weights the C++ kernel does not take (float16 moments, groups mixing them with other
   parameters, ``fused=False``), tensor
   subclasses (DTensor shards take their local tensors' path, ``_shards.py``), CUDA tensors
   without triton or with ``triton=False``, ``torch.compile``, and
   groups the kernel refuses (parameters sharing memory, sparse gradients, state laid out
   differently from its parameter; a gradient laid out differently is first copied into its
   parameter's layout). The optimizers re-lay loaded state (``load_state_dict``) and θ₀ of
   ``decay_to="init"`` in their parameters' layout once, so that a checkpoint saved from a
   contiguous model keeps the fast paths in a channels_last one.

How close the C++ kernel comes to the reference loop: it computes each element with the
reference's operations, in the reference's order, and rounds where torch's CPU operations
round — with one fused multiply-add exactly where torch's vectorized loops use one (``lerp``,
``add``/``add_`` with ``alpha``, ``addcmul``) and nowhere else (it is compiled with
``-ffp-contract=off``, so the compiler fuses no other multiply and add). On CPUs with FMA
instructions SGD/SGDW steps are therefore bit-identical to the reference (hence to
torch.optim's single-tensor loop), and so are Adam's moments while the gradients are the
same. Adam's parameters are not: torch's CPU ``sqrt`` is not always correctly rounded (in
torch 2.13's x86 wheel about one float32 result in six differs from IEEE ``sqrt`` by an ulp),
the kernel's is, so ``sqrt(v̂) + ε`` and then θ may differ by an ulp. torch's fused kernels
(path 2) round differently again. The tests hold float32 to 1e-6 relative after 100 steps,
bfloat16 state to one bfloat16 rounding, and SGD and Adam's moments bit for bit. int8 moments
are decoded and rounded with the reference's float32 operations (``_int8.encode_``: products
by power-of-two scales, one division per block for the inverse scale, the 8-bit floats' bit
patterns, the same hash bits), so their codes
and scales equal the reference loop's bit for bit as long as the gradients are the same (with
Adam's L2 term θ's ulps enter g: a code may then differ by one step); θ as for float32 state.
Compensated bfloat16/float16 weights are loaded into their float32 master weight and stored
back (θ rounded to nearest, the remainder rounded stochastically with the reference's hash
bits) with the reference's exact operations, so θ, the remainder and the moments equal the
reference loop's bit for bit but for the same ``sqrt``: a master weight one float32 ulp off can
move its remainder by a unit (or θ to its other rounding), and with Adam's L2 term that
difference enters g.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial, update_wrapper
from operator import attrgetter

import torch
from torch import Tensor
from torch.nn import Parameter

from decoupled.optim._build import kernel_ops
from decoupled.optim._int8 import SCALE_SUFFIX
from decoupled.optim._layout import in_layout_of, is_dense
from decoupled.optim._shards import is_sharded, local, on_local_shards
from decoupled.optim._triton import triton_adam_update, triton_sgd_update, use_triton

_PLAIN = {Parameter, Tensor}
_FLOAT32 = {torch.float32}
_COMPENSATED = {torch.bfloat16, torch.float16}


def _kernel_applies(params: list[Tensor], lr: float | Tensor, compensated: bool = False) -> bool:
    """Ordinary float32 parameters (not a subclass such as DTensor), or ``compensated``
    bfloat16/float16 ones of one dtype, and one lr. The kernel checks device, layout, shapes
    and the gradients' and state's dtypes before changing anything, and refuses (the reference
    loop steps instead) what it does not take."""
    if torch.compiler.is_compiling() or (isinstance(lr, Tensor) and lr.numel() != 1):
        return False
    dtypes = set(map(_dtype, params))
    wanted = len(dtypes) == 1 and dtypes <= _COMPENSATED if compensated else dtypes == _FLOAT32
    if not (set(map(type, params)) <= _PLAIN and wanted):
        return False
    return all(map(_is_cpu, params)) and kernel_ops() is not None


_dtype, _is_cpu = attrgetter("dtype"), attrgetter("is_cpu")


def _kernel_references(references: list[Tensor | None] | None) -> list[Tensor]:
    """θ₀ per parameter for ``decay_to="init"``, or the empty list the kernel takes for zero."""
    return [] if references is None or references[0] is None else references


def kernel_adam_update(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    fallback: Callable,
    **given,
) -> None:
    """:func:`decoupled.optim.adam.adam_update` (same arguments) through the C++ kernel, or
    through ``fallback`` (``adam_update`` itself) when the kernel refuses a tensor."""
    defaults = {"references": None, "decay_rate": 0.0, "amsgrad": False, "maximize": False}
    defaults |= {"cautious": False, "first_position": 0}
    options = defaults | {"grad_scale": None} | given

    def step(grads: list[Tensor]) -> bool:
        amsgrad = options["amsgrad"]
        return kernel_ops().adam_step_(
            params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs if amsgrad else [],
            _kernel_references(options["references"]), state_steps, float(options["lr"]),
            options["beta1"], options["beta2"], options["eps"], float(options["weight_decay"]),
            float(options["decay_rate"]), options["decoupled"], amsgrad, options["maximize"],
            _scale_value(options["grad_scale"]), options["cautious"],
            isinstance(options["lr"], Tensor),  # γ/(1 − β1ᵗ) in float32, as the reference
            options["first_position"],
        )  # fmt: skip

    coded_states, remainders = options.get("coded_states"), options.get("remainders")
    if coded_states is not None:
        step = partial(_int8_step, params, remainders, exp_avgs, exp_avg_sqs, coded_states,
                       state_steps, options)  # fmt: skip
    elif remainders is not None:
        step = partial(_compensated_step, params, remainders, exp_avgs, exp_avg_sqs,
                       max_exp_avg_sqs, state_steps, options)  # fmt: skip
    done = _step_any_layout(step, grads, params, unscales=options["grad_scale"] is not None)
    if not done:
        fallback(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, **given)


def _compensated_step(params, remainders, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps,
                      options, grads) -> bool:  # fmt: skip
    """The C++ kernel's step of compensated bfloat16/float16 θ (``_compensated.py``): every
    parameter with its int8 remainder, float32 or bfloat16 moments (int8 ones: ``_int8_step``).
    Groups mixing compensated and other parameters take the reference loop."""
    if any(r is None for r in remainders):
        return False
    amsgrad = options["amsgrad"]
    return kernel_ops().adam_compensated_step_(
        params, remainders, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs if amsgrad else [],
        _kernel_references(options["references"]), state_steps, float(options["lr"]),
        options["beta1"], options["beta2"], options["eps"], float(options["weight_decay"]),
        float(options["decay_rate"]), options["decoupled"], amsgrad, options["maximize"],
        _scale_value(options["grad_scale"]), options["cautious"],
        isinstance(options["lr"], Tensor), options["first_position"],
    )  # fmt: skip


def _int8_step(params, remainders, exp_avgs, exp_avg_sqs, coded_states, state_steps, options,
               grads) -> bool:  # fmt: skip
    """The C++ kernel's step with int8 moments (``_int8.py``): codes in ``exp_avgs`` and
    ``exp_avg_sqs``, scales in the state dicts, over float32 θ (``remainders`` None) or
    compensated bfloat16/float16 θ; amsgrad is refused with int8 state, and groups mixing
    compensated and other parameters step in the reference loop."""
    if options["amsgrad"]:
        return False
    if remainders is not None and any(r is None for r in remainders):
        return False
    scales = [[s[key + SCALE_SUFFIX] for s in coded_states] for key in ("exp_avg", "exp_avg_sq")]
    return kernel_ops().adam_int8_step_(
        params, remainders or [], grads, exp_avgs, exp_avg_sqs, *scales,
        _kernel_references(options["references"]), state_steps, float(options["lr"]),
        options["beta1"], options["beta2"], options["eps"], float(options["weight_decay"]),
        float(options["decay_rate"]), options["decoupled"], options["maximize"],
        _scale_value(options["grad_scale"]), options["cautious"],
        isinstance(options["lr"], Tensor), options["first_position"],
    )  # fmt: skip


def kernel_sgd_update(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor | None],
    *,
    fallback: Callable,
    **given,
) -> None:
    """:func:`decoupled.optim.sgd.sgd_update` (same arguments) through the C++ kernel, or
    through ``fallback`` (``sgd_update`` itself) when the kernel refuses a tensor; new
    momentum buffers are written back into ``momentum_buffers`` as the reference does."""
    options = {"references": None, "decay_rate": 0.0, "maximize": False, "grad_scale": None}
    options |= {"cautious": False, "remainders": None, "first_position": 0} | given
    remainders = options["remainders"]
    fresh = [b is None for b in momentum_buffers]
    # a compensated θ's buffer is float32 (_sgd_compensation.py), others are in θ's dtype
    dtype = torch.float32 if remainders is not None else None
    buffers = [torch.empty_like(p, dtype=dtype) if b is None else b
               for p, b in zip(params, momentum_buffers)]  # fmt: skip

    def step(grads: list[Tensor]) -> bool:
        arguments = (
            grads, buffers, fresh, _kernel_references(options["references"]),
            float(options["lr"]), options["momentum"], options["dampening"],
            options["nesterov"], float(options["weight_decay"]), float(options["decay_rate"]),
            options["decoupled"], options["maximize"], _scale_value(options["grad_scale"]),
            options["cautious"],
        )  # fmt: skip
        if remainders is None:
            return kernel_ops().sgd_step_(params, *arguments)
        if any(r is None for r in remainders):  # a group mixing compensated and other θ
            return False
        return kernel_ops().sgd_compensated_step_(
            params, remainders, *arguments, float(options["step"]), options["first_position"]
        )

    done = _step_any_layout(step, grads, params, unscales=options["grad_scale"] is not None)
    if done:
        momentum_buffers[:] = buffers
    else:
        fallback(params, grads, momentum_buffers, **given)


def _scale_value(grad_scale: Tensor | None) -> float:
    """GradScaler's loss scale as the C++ kernel takes it (1.0: no unscaling)."""
    return 1.0 if grad_scale is None else float(grad_scale)


def _step_any_layout(
    step: Callable[[list[Tensor]], bool],
    grads: list[Tensor],
    params: list[Tensor],
    unscales: bool = False,
) -> bool:
    """Run a kernel ``step``; after a refusal, once more with the gradients copied into their
    parameters' layout (when one differed). True when the kernel stepped. A step that
    ``unscales`` the gradients (GradScaler's scale) divided the copies: they are written back,
    as the reference loop leaves the gradients."""
    if step(grads):
        return True
    relaid = _laid_out_like(grads, params)
    if relaid is None or not step(relaid):
        return False
    if unscales:
        for grad, copy in zip(grads, relaid):
            if copy is not grad:
                grad.copy_(copy)
    return True


def _laid_out_like(grads: list[Tensor], params: list[Tensor]) -> list[Tensor] | None:
    """The gradients copied into their parameters' memory layout where it differs (e.g. a
    contiguous gradient of a channels_last weight), so that the kernel can take them: one
    copy is far cheaper than the reference loop. None when no layout differs (the kernel
    refused for another reason, such as a sparse gradient). Only tried after a refusal: no
    cost on the usual path."""
    relaid = [in_layout_of(param, grad) for grad, param in zip(grads, params)]
    return relaid if any(r is not g for r, g in zip(relaid, grads)) else None


def can_fuse(
    params: list[Tensor],
    lr: float | Tensor,
    decay_rate: float | Tensor,
    decoupled: bool,
    references: list[Tensor | None],
    explicit: bool = False,
    cautious: bool = False,
) -> bool:
    """True when torch's fused kernels compute the reference loop's update. Reduced-precision
    parameters only when asked for explicitly (``explicit``): the fused kernels compute in
    float32 and round once, the reference rounds after every operation. Never for cautious
    decay: torch's kernels have no mask."""
    if torch.compiler.is_compiling() or cautious or any(r is not None for r in references):
        return False
    if isinstance(lr, Tensor) and lr.numel() != 1:
        return False
    wide = (torch.float32, torch.float64)
    for p in params:
        if torch.is_complex(p) or p.device.type != "cpu" or type(p) not in (Parameter, Tensor):
            return False
        if not explicit and p.dtype not in wide:
            return False
    if decoupled and not isinstance(decay_rate, Tensor) and decay_rate != 0:
        return not isinstance(lr, Tensor) and lr > 0  # λ' = c / lr needs lr > 0
    return not (decoupled and isinstance(decay_rate, Tensor))


def fused_adam_update(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    fallback: Callable,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled: bool,
    decay_rate: float = 0.0,
    amsgrad: bool = False,
    maximize: bool = False,
    references: list[Tensor | None] | None = None,  # always None here (see can_fuse)
    grad_scale: Tensor | None = None,
    cautious: bool = False,  # always False here (see can_fuse)
    first_position: int = 0,  # unused: torch's kernels round to nearest
) -> None:
    """The step of :func:`decoupled.optim.adam.adam_update` through torch's fused kernels.

    torch's CPU kernels (torch 2.13) walk the memory of θ, g and the moments in step, element
    by element, without checking that their strides agree: a contiguous gradient of a
    channels_last weight, or moments loaded from a contiguous checkpoint, would update the
    wrong elements, silently. So a gradient laid out unlike its parameter is first copied into
    the parameter's layout (as for the C++ kernel), and a parameter that is not dense or whose
    moments are laid out differently steps through the reference loop (``fallback``) instead.
    """
    kernel = torch._fused_adamw_ if decoupled else torch._fused_adam_
    kernel_decay = (decay_rate / lr if decay_rate else 0.0) if decoupled else weight_decay
    grads = list(grads)  # the caller's list is left as it was
    moments = [exp_avgs, exp_avg_sqs] + ([max_exp_avg_sqs] if amsgrad else [])
    groups: dict[tuple | None, list[int]] = {}  # (device, dtype), or None: the reference loop
    for index, param in enumerate(params):
        grads[index] = in_layout_of(param, grads[index])
        strides = {t[index].stride() for t in (grads, *moments)}
        fusable = strides == {param.stride()} and is_dense(param)
        groups.setdefault((param.device, param.dtype) if fusable else None, []).append(index)
    for key, indices in groups.items():

        def pick(tensors: list[Tensor], indices: list[int] = indices) -> list[Tensor]:
            return [tensors[i] for i in indices]

        if key is None:
            fallback(
                pick(params), pick(grads), pick(exp_avgs), pick(exp_avg_sqs),
                pick(max_exp_avg_sqs) if amsgrad else [], pick(state_steps), lr=lr, beta1=beta1,
                beta2=beta2, eps=eps, weight_decay=weight_decay, decoupled=decoupled,
                decay_rate=decay_rate, amsgrad=amsgrad, maximize=maximize, grad_scale=grad_scale,
            )  # fmt: skip
            continue
        steps = pick(state_steps)
        torch._foreach_add_(steps, 1)
        kernel(
            pick(params),
            pick(grads),
            pick(exp_avgs),
            pick(exp_avg_sqs),
            pick(max_exp_avg_sqs) if amsgrad else [],
            steps,
            amsgrad=amsgrad,
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            weight_decay=kernel_decay,
            eps=eps,
            maximize=maximize,
            grad_scale=None if grad_scale is None else grad_scale.to(key[0], torch.float32),
            found_inf=None,  # a step with an inf was skipped before (DecayOptimizer.step)
        )


def choose_adam_update(
    fused: bool | None,
    reference: Callable,
    params: list[Tensor],
    grads: list[Tensor],
    *,
    lr: float | Tensor,
    decay_rate: float | Tensor,
    decoupled: bool,
    references: list[Tensor | None],
    compact: bool,
    triton: bool | None = None,
    cautious: bool = False,
    compensated: bool = False,
) -> Callable:
    """The first path of the module docstring's list that applies to this step; a fast path
    falls back on ``reference`` for the tensors it cannot take. DTensor shards take the path of
    their local tensors (``_shards.py``). Only the C++ and Triton kernels keep the remainder
    of ``compensated`` weights; the other paths would drop it."""
    if compensated:
        if not is_sharded(params) and use_triton(triton, fused, params):
            return _falling_back(triton_adam_update, reference)
        applies = fused is not False and _kernel_applies(params, lr, compensated=True)
        return _falling_back(kernel_adam_update, reference) if applies else reference
    if is_sharded(params) and fused is not False:
        update = choose_adam_update(
            fused, reference, local(params), local(grads), lr=lr, decay_rate=decay_rate,
            decoupled=decoupled, references=local(references), compact=compact, triton=triton,
            cautious=cautious,
        )  # fmt: skip
        return update if update is reference else on_local_shards(update, params)
    if use_triton(triton, fused, params):
        return _falling_back(triton_adam_update, reference)
    if fused is False:
        return reference
    if _kernel_applies(params, lr):
        return _falling_back(kernel_adam_update, reference)
    explicit = bool(fused)
    if not compact and can_fuse(params, lr, decay_rate, decoupled, references, explicit, cautious):
        return _falling_back(fused_adam_update, reference)
    return reference


def choose_sgd_update(
    fused: bool | None,
    reference: Callable,
    params: list[Tensor],
    grads: list[Tensor],
    lr,
    triton: bool | None = None,
    compensated: bool = False,
) -> Callable:
    """The Triton kernel or the C++ kernel when it applies (``fused`` not False), falling back
    on ``reference`` for the tensors it refuses; else ``reference``, the reference loop. DTensor
    shards take the path of their local tensors (``_shards.py``); ``compensated`` weights the
    Triton kernel, the C++ kernel (plain tensors) or the reference loop, which keep the
    remainder."""
    if compensated and not use_triton(triton, fused, params):
        applies = fused is not False and _kernel_applies(params, lr, compensated=True)
        return _falling_back(kernel_sgd_update, reference) if applies else reference
    if is_sharded(params) and fused is not False:
        update = choose_sgd_update(fused, reference, local(params), local(grads), lr, triton)
        return update if update is reference else on_local_shards(update, params)
    if use_triton(triton, fused, params):
        return _falling_back(triton_sgd_update, reference)
    if fused is not False and _kernel_applies(params, lr):
        return _falling_back(kernel_sgd_update, reference)
    return reference


def kernel_available() -> bool:
    """True when the one-pass C++ kernel (path 1 above) is built or loads on this machine, so
    that float32 CPU parameters step through it by default. The first call builds it."""
    return kernel_ops() is not None


def _falling_back(fast: Callable, reference: Callable) -> Callable:
    """``fast`` with its ``fallback`` bound to ``reference`` (and ``fast``'s name, which tests
    read to see which path stepped). The reference loops are passed in, not imported: they
    live in ``adam.py``/``sgd.py``, which import this module."""
    return update_wrapper(partial(fast, fallback=reference), fast)
