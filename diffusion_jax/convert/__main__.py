"""python -m diffusion_jax.convert --from=SOURCE --preset=NAME --src=PATH --workdir=OUT

Writes OUT as a run (config.json + a step-0 checkpoint) that
`python -m diffusion_jax.main --workdir=OUT --mode=sample|eval` loads with no further flags.
A bad argument or a checkpoint that does not fit prints `error: ...` (one line per mismatched
key) and exits 2; nothing is written then.
"""
from __future__ import annotations

import argparse
import sys

from diffusion_jax import convert


def parse_args(argv):
    from diffusion_jax.convert import _pretrained  # pylint: disable=import-outside-toplevel
    parser = argparse.ArgumentParser(prog='python -m diffusion_jax.convert',
                                     description=__doc__.split('\n\n')[1])
    parser.add_argument('--from', dest='source', required=True, choices=convert.SOURCES,
                        help='layout of the checkpoint')
    parser.add_argument('--preset', required=True, choices=_pretrained().PRESETS,
                        help='published model (configs/pretrained.py)')
    parser.add_argument('--src', required=True, help='.pt / .safetensors file or diffusers folder')
    parser.add_argument('--workdir', required=True, help='new run directory to write')
    parser.add_argument('--latents', default='',
                        help='autoencoder run a latent network (--from=dit) was trained in, '
                             'e.g. the SD VAE converted with --preset=sd_vae: samples decode '
                             'to pixels')
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        on_disk = convert.convert(args.src, args.source, args.preset, args.workdir,
                                  latents=args.latents or None)
    except (ValueError, ImportError) as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
    print(f'wrote {on_disk.workdir}: python -m diffusion_jax.main --workdir={on_disk.workdir} '
          '--mode=sample')
    return 0


if __name__ == '__main__':
    sys.exit(main())
