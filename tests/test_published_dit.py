"""The published DiT path at tiny size: a facebookresearch/DiT checkpoint converted with
`--latents` pointing at a converted SD-VAE run samples decoded pixels, equal to diffusers'
DiTPipeline (DiTTransformer2DModel + AutoencoderKL + DDIMScheduler) on the same initial latents,
labels, guidance scale and steps. Random weights (the published ones cannot be downloaded here);
the full-size key names, shapes and counts are tests/test_dit.py's and tests/test_autoencoder.py's.
"""
import json
import pathlib

import jax
import numpy as np
import pytest
import torch

from configs import model_configs
from diffusion_jax import convert, latents, run, sharding
from diffusion_jax.convert import __main__ as cli
from diffusion_jax.samplers import batches
from test_autoencoder import TINY as TINY_VAE, _diffusers_vae
from test_dit import _diffusers_dit, dit_keys_from_diffusers

pytestmark = pytest.mark.usefixtures('fast_compiles')

# f = 2 on 16x16x3 pixels: 8x8x4 latents, the tiny DiT's input (as 256 px -> 32x32x4 for XL/2).
TINY_DIT = dict(image_size=8, in_channels=4, num_classes=1000, learn_sigma=True)  # DiTPipeline's null label is 1000
STEPS, SCALE, LABELS = 5, 4.0, [1, 7]  # DiT's guidance scale s (ours: w = s - 1)


def _randomize(net, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if 'norm' in name and name.endswith('weight'):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * 0.3 / np.sqrt(max(p[0].numel(), 1)))


@pytest.fixture(scope='module')
def published(tmp_path_factory):
    """(pipeline pieces, the converted run's workdir): the VAE and DiT converted through the
    library, the DiT run attached to the VAE run with latents=."""
    root = tmp_path_factory.mktemp('published')
    vae_config = convert.preset_config('sd_vae', TINY_VAE)
    vae = _diffusers_vae(vae_config.model)
    _randomize(vae, 0)
    vae.save_pretrained(root / 'vae_folder')
    convert.convert(root / 'vae_folder', 'diffusers', 'sd_vae', root / 'vae', overrides=TINY_VAE)

    dit_config = model_configs.tiny_dit(**TINY_DIT)
    net = _diffusers_dit(dit_config)
    _randomize(net, 1)
    first = net.transformer_blocks[0].norm1.emb.state_dict()
    for block in net.transformer_blocks:
        block.norm1.emb.load_state_dict(first)  # DiT has one embedder
        block.norm1.emb.time_proj.downscale_freq_shift = 0  # DiT's sinusoid (see test_dit)
    torch.save(dit_keys_from_diffusers(net.state_dict(), dit_config.depth,
                                       net.pos_embed.pos_embed.detach().clone()),
               root / 'dit.pt')
    overrides = {f'model.{k}': v for k, v in dit_config.items()}
    overrides.update({'data.num_classes': 1000, 'sampling.num_steps': f'ddim{STEPS}',
                      'sampling.method': 'ddim', 'sampling.eta': 0.0,
                      'sampling.guidance_scale': SCALE - 1.0})
    convert.convert(root / 'dit.pt', 'dit', 'DiT-XL-2-256', root / 'dit', overrides=overrides,
                    latents=str(root / 'vae'))
    return net, vae, str(root / 'dit'), root


def test_converted_dit_on_the_converted_vae_equals_diffusers_dit_pipeline(published):
    from diffusers import DDIMScheduler, DiTPipeline  # pylint: disable=import-outside-toplevel
    net, vae, workdir, _ = published
    stored = json.loads(pathlib.Path(workdir, 'config.json').read_text())
    assert stored['data']['image_size'] == 16 and stored['data']['channels'] == 3
    assert stored['data']['latent_size'] == 8 and stored['data']['latent_channels'] == 4
    assert stored['sampling']['clip_denoised'] is False  # DiT's sample.py

    # DiT's released scheduler: DDPM betas linear 1e-4..0.02, T = 1000, no x0 clipping; DDIM
    # with set_alpha_to_one and leading spacing, which is improved-diffusion's 'ddimK'.
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                              beta_schedule='linear', clip_sample=False, set_alpha_to_one=True,
                              steps_offset=0)
    pipe = DiTPipeline(transformer=net, vae=vae, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        expected = pipe(class_labels=LABELS, guidance_scale=SCALE, generator=generator,
                        num_inference_steps=STEPS, output_type='np').images  # [B,H,W,C] in [0,1]
    x_T = torch.randn((len(LABELS), 4, 8, 8), generator=torch.Generator().manual_seed(0))

    loaded = run.load(workdir)
    decoder = latents.make_decoder(latents.for_config(loaded.config))
    sampler, shape = batches.build_sampler(loaded.config, loaded.variables,
                                           sharding.make_mesh(), decoder=decoder)
    assert shape == (8, 8, 4)
    out = sampler.sample(jax.random.key(0), (len(LABELS), *shape),
                         y=np.asarray(LABELS, np.int32),
                         x_T=np.asarray(x_T.permute(0, 2, 3, 1)))
    ours = (np.asarray(out['samples']) + 1) / 2
    assert ours.shape == expected.shape == (2, 16, 16, 3)
    assert np.std(expected) > 0.05  # not a constant image
    np.testing.assert_allclose(ours, expected, atol=2e-4)


def test_cli_latents_refuses_a_pixel_preset_and_a_non_autoencoder(published, tmp_path, capsys):
    _, _, workdir, root = published
    code = cli.main(['--from=dit', '--preset=DiT-XL-2-256', f'--src={root / "dit.pt"}',
                     f'--workdir={tmp_path / "a"}', f'--latents={workdir}'])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: --latents=")
    assert "model.name='dit' run, not an autoencoder" in err[0]
    assert not (tmp_path / 'a').exists()
    # The full-size preset against the tiny VAE: the latent grid does not fit DiT-XL/2-256.
    with pytest.raises(ValueError, match=r'encodes .*16x16x3 images|network takes 32x32x4'):
        convert._attach_latents(convert.preset_config('DiT-XL-2-256'), str(root / 'vae'))
