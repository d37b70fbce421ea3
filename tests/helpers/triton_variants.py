"""Which variants of the engine's Triton kernels exist: compiled ones on a GPU,
launch keys under the interpreter.

Triton compiles a ``@triton.jit`` kernel once per cache key: the
specialization of every argument (``tl.constexpr`` values; an int's type and
whether it is 1 or divisible by 16; a pointer's dtype and 16-byte alignment —
minus ``do_not_specialize``/``do_not_specialize_on_alignment``) plus the launch
options (warps, stages).

- ``compiled_variants()`` (GPU): the keys in each kernel's compile cache. In
  Triton 3.x that is ``JITFunction.device_caches[device][0]`` (a dict key →
  compiled kernel; 3.0-3.6 all keep it first in the per-device tuple). A Triton
  without ``device_caches`` raises instead of counting nothing.
- ``record_launch_keys()`` (``TRITON_INTERPRET=1``): the interpreter compiles
  nothing, so each launch's key is computed the way ``JITFunction.run`` does
  (the same binder over the same parameters) and collected per kernel.
"""

from __future__ import annotations

from collections import defaultdict


def engine_kernels() -> dict[str, object]:
    """The kernels the engine launches (``*_kernel`` in triton_ops and fused_ops), by name."""
    from triton.runtime.jit import KernelInterface

    from engine import fused_ops
    from engine.attention import triton_ops

    found = {}
    for module in (triton_ops, fused_ops):
        for name, obj in vars(module).items():
            if name.endswith("_kernel") and isinstance(obj, KernelInterface):
                found[name] = obj
    if not found:
        raise RuntimeError("no Triton kernels found in engine.attention.triton_ops / engine.fused_ops")
    return found


def compiled_variants() -> dict[str, set[str]]:
    """Kernel name → the cache keys of its compiled variants (every device)."""
    import triton

    out = {}
    for name, kernel in engine_kernels().items():
        caches = getattr(kernel, "device_caches", None)
        if caches is None:
            raise RuntimeError(f"triton {triton.__version__}: {name} has no device_caches; "
                               "tests/helpers/triton_variants.py cannot count its compiled variants")
        keys = set()
        for entry in caches.values():
            cache = entry[0] if isinstance(entry, tuple) else None
            if not isinstance(cache, dict):
                raise TypeError(f"triton {triton.__version__}: {name}.device_caches holds "
                                f"{type(entry).__name__}, not (kernel cache dict, ...)")
            keys.update(str(k) for k in cache)
        out[name] = keys
    return out


def record_launch_keys() -> dict[str, set[str]]:
    """Under the interpreter: from now on, every launch of an engine kernel adds its
    cache key to the returned dict (kernel name → keys)."""
    import triton
    from triton.backends.compiler import BaseBackend
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction, create_function_from_signature

    keys: dict[str, set[str]] = defaultdict(set)
    for name, kernel in engine_kernels().items():
        if not isinstance(kernel, InterpretedFunction):
            raise TypeError(f"{name} is not interpreted: run with TRITON_INTERPRET=1 "
                            f"(triton {triton.__version__})")
        jit = JITFunction(kernel.fn, **kernel.kwargs)      # never compiled: only its parameters
        binder = create_function_from_signature(jit.signature, jit.params, BaseBackend)

        def run(*args, grid, warmup, _name=name, _binder=binder, _run=kernel.run, **kwargs):
            _, specialization, options = _binder(*args, **kwargs)
            keys[_name].add(str(specialization) + str(sorted(options.items())))
            return _run(*args, grid=grid, warmup=warmup, **kwargs)

        kernel.run = run
    return keys


def new_variants(before: dict[str, set[str]], after: dict[str, set[str]]) -> dict[str, list[str]]:
    """Kernel name → keys in ``after`` not in ``before`` (only kernels that gained some)."""
    return {name: sorted(keys - before.get(name, set())) for name, keys in after.items()
            if keys - before.get(name, set())}
