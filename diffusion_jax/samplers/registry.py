"""The sampler registry: one name -> one `SamplerSpec` (its chain step, its state, its NFE).

A sampler module registers itself with `@register_sampler(name, nfe=...)` on its chain step;
`samplers.METHODS`, the `sampling.method` choices and every "unknown method" error read the names
from here, so adding a sampler touches only its own module (and the import list of the package).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

# step(ctx, state, t [B] int32, key) -> (state, pred_x0 [B, ...]); state is a dict with 'x'.
StepFn = Callable[..., tuple[dict, Any]]


def _stateless_init(ctx, x):  # pylint: disable=unused-argument
    return {'x': x}


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
    """One registered sampler.

    Attributes:
      name: the method name (the API: `sample(method=name)`, `--config.sampling.method=name`).
      step: one step of the chain at respaced index t, from level ᾱ_t to ᾱ_{t-1} (ᾱ_{-1} = 1).
      init: (ctx, x_start) -> the scan state at the first step (multistep solvers keep their
        history of x̂_0 here, so memory is constant in K).
      nfe: (K, langevin_steps) -> network evaluations for a K-step chain.
      stochastic: whether the chain draws noise (η > 0 for DDIM counts as stochastic too).
      summary: one line for tables and errors.
      reads: the method-specific `sampling.*` fields (of samplers.options.METHOD_FIELDS) the
        method reads; a config that sets another of them away from its default is refused
        (config_validation, samplers.options.check_method_options).
      recommended_spacing: '' or the spacing prefix the method is meant for ('logsnr' for the
        multistep λ-solvers): on evenly strided steps ('N', 'ddimN', 'linspaceN', 'a,b,c')
        samplers.options.spacing_warning names it.
    """
    name: str
    step: StepFn
    init: Callable = _stateless_init
    nfe: Callable[[int, int], int] = lambda k, _: k
    stochastic: bool = False
    summary: str = ''
    reads: tuple[str, ...] = ()
    recommended_spacing: str = ''


_REGISTRY: dict[str, SamplerSpec] = {}


def register_sampler(name: str, *, nfe: Callable[[int, int], int] | None = None,
                     init: Callable | None = None, stochastic: bool = False, summary: str = '',
                     reads: tuple[str, ...] = (), recommended_spacing: str = ''):
    """Decorator registering a chain step under `name` (raises if the name is taken)."""
    def deco(step: StepFn) -> StepFn:
        if name in _REGISTRY:
            raise ValueError(f'sampler {name!r} is registered twice.')
        kwargs = dict(name=name, step=step, stochastic=stochastic, summary=summary,
                      reads=tuple(reads), recommended_spacing=recommended_spacing)
        if nfe is not None:
            kwargs['nfe'] = nfe
        if init is not None:
            kwargs['init'] = init
        _REGISTRY[name] = SamplerSpec(**kwargs)
        return step
    return deco


def names() -> tuple[str, ...]:
    """The registered method names, in registration order."""
    return tuple(_REGISTRY)


def get_sampler(name: str) -> SamplerSpec:
    """The SamplerSpec of `name`; ValueError listing the registered names otherwise."""
    if name not in _REGISTRY:
        raise ValueError(f'sampling.method={name!r} is not a sampler; choose one of '
                         f'{", ".join(names())}.')
    return _REGISTRY[name]


def nfe(method: str, num_steps: int, langevin_steps: int = 1) -> int:
    """Network evaluations of `method` over a K = num_steps chain (unguided; classifier-free
    guidance doubles them, classifier guidance adds one classifier gradient per evaluation)."""
    return int(get_sampler(method).nfe(int(num_steps), int(langevin_steps)))
