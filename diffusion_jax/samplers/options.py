"""Which `sampling.*` options a method reads, and the spacing a multistep solver is meant for.

    options.fields_read('dpmpp_2m')                 # ('ddim_guidance', 'dynamic_threshold')
    options.check_method_options(config.sampling, 'gaussian', defaults)   # ValueError or None
    options.spacing_warning('dpmpp_2m', 'ddim10', 1000)                   # one line, or None

Method-specific fields (METHOD_FIELDS): DDIM's η, the Langevin corrector's SNR and step count,
the guidance/clipping order, dynamic thresholding and EDM's churn. Each sampler declares the ones
it reads (register_sampler(reads=...); process_solvers.READS for flow/edm); a config that sets
another one away from its default would be silently ignored, so it is refused in one line
(config_validation calls check_method_options for --mode=train/sample/eval).

Spacing. The multistep λ-solvers (dpmpp_2m, dpmpp_3m, unipc: recommended_spacing='logsnr')
extrapolate x̂_0 in λ = log(α/σ) from the previous steps. Evenly strided timesteps ('N',
'ddimN', 'linspaceN', 'a,b,c') of a linear schedule leave one very long last λ-interval (t = T/K
to t = 0), over which the extrapolation is poor and not monotone in K: measured on Gaussian data
(docs/samplers.md) dpmpp_2m's error on 'ddim20' is 5.0e-2, DDIM's 5.4e-2, and 3.0e-3 on
'logsnr20'. spacing_warning names 'logsnrN' / 'karrasN' for such a request.
"""
from __future__ import annotations

import math
import re

from diffusion_jax.samplers.common import DEFAULT_LANGEVIN_STEPS, DEFAULT_SNR
from diffusion_jax.samplers.registry import get_sampler

# The method-specific sampling fields and the value that means "not used" (the defaults of
# defaults.default_sampling_config; tests/test_method_options.py checks they agree).
METHOD_FIELDS = {'eta': 0.0, 'langevin_snr': DEFAULT_SNR, 'langevin_steps': DEFAULT_LANGEVIN_STEPS,
                 'ddim_guidance': 'auto', 'dynamic_threshold': 0.0, 's_churn': 0.0,
                 's_tmin': 0.0, 's_tmax': math.inf, 's_noise': 1.0}
# Spacings with evenly strided timesteps: 'N', 'a,b,c', 'ddimN', 'linspaceN' (respace).
_STRIDED = re.compile(r'^(\d+(,\d+)*|ddim\d+|linspace\d+)$')


def fields_read(method: str, process: str = 'gaussian') -> tuple[str, ...]:
    """The METHOD_FIELDS `method` reads on `process` ('gaussian'/'cold': the registered chain
    sampler's `reads`; 'flow'/'edm': process_solvers.READS)."""
    if process in ('gaussian', 'cold'):
        return get_sampler(method).reads
    from diffusion_jax.samplers import process_solvers  # pylint: disable=import-outside-toplevel
    return process_solvers.READS.get(method, ())


def _differs(value, default) -> bool:
    if isinstance(default, str) or isinstance(value, str):
        return value != default
    return float(value) != float(default)


def unread_options(sampling, process: str = 'gaussian') -> list[tuple[str, object]]:
    """[(field, value)] of the METHOD_FIELDS set in `sampling` (a ConfigDict or mapping) away
    from their defaults that sampling.method does not read."""
    read = fields_read(sampling['method'], process)
    return [(name, sampling[name]) for name, default in METHOD_FIELDS.items()
            if name in sampling and name not in read and _differs(sampling[name], default)]


def readers(field: str, process: str = 'gaussian') -> list[str]:
    """The methods that read `field` on `process` (for the error's suggestion)."""
    if process in ('gaussian', 'cold'):
        from diffusion_jax.samplers.registry import names  # pylint: disable=import-outside-toplevel
        return [m for m in names() if field in get_sampler(m).reads]
    from diffusion_jax.samplers import process_solvers  # pylint: disable=import-outside-toplevel
    return [m for m, fields in process_solvers.READS.items() if field in fields]


def check_method_options(sampling, process: str = 'gaussian') -> None:
    """ValueError (one line) for the first option sampling.method would ignore."""
    unread = unread_options(sampling, process)
    if not unread:
        return
    field, value = unread[0]
    users = readers(field, process)
    use = f"use method {' or '.join(repr(m) for m in users)} for it, or " if users else ''
    raise ValueError(
        f'sampling.{field}={value!r} is not read by sampling.method={sampling["method"]!r}'
        f'{"" if process == "gaussian" else f" on diffusion.process={process!r}"}: it would be '
        f'ignored; {use}set sampling.{field}={METHOD_FIELDS[field]!r} (its default).')


def is_evenly_strided(num_steps) -> bool:
    """Whether a sampling.num_steps spelling keeps evenly strided timesteps ('N', 'a,b,c',
    'ddimN', 'linspaceN'); '' (all steps) and the schedule-aware or trailing spacings are not."""
    text = str(num_steps).strip().replace(' ', '')
    return bool(text) and bool(_STRIDED.match(text))


def spacing_warning(method: str, num_steps, num_timesteps: int) -> str | None:
    """One line when a multistep λ-solver (recommended_spacing set) is asked for evenly strided
    steps that do not keep every one of the num_timesteps steps; else None."""
    spacing = get_sampler(method).recommended_spacing
    if not spacing or not is_evenly_strided(num_steps):
        return None
    text = str(num_steps).strip().replace(' ', '')
    count = sum(int(c) for c in re.findall(r'\d+', text))
    if count >= num_timesteps:
        return None
    return (f'sampling.method={method!r} on sampling.num_steps={num_steps!r} (evenly strided '
            f'timesteps): a multistep solver extrapolates over the long last λ-step of such a '
            f'chain and its error is not monotone in the step count (on Gaussian data 17x that '
            f'of logsnr steps at 20 steps, docs/samplers.md); use '
            f"sampling.num_steps='logsnr{count}' or 'karras{count}'.")
