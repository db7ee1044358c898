"""diffusion_jax: denoising diffusion models in JAX/Flax."""
import setuptools

_TEST = [
    "pytest>=8.0",
    "pytest-xdist>=3.5",
    "scipy>=1.11",
    # Notebooks are executed by the suite (papermill drives nbclient) and kept paired with their
    # jupytext scripts.
    "papermill>=2.6",
    # text runs (model.text_encoder): the word-level tokenizer stored in the run
    "tokenizers>=0.19",
    "jupytext>=1.16",
    "nbformat>=5.10",
    "ipykernel>=6.29",
    "matplotlib>=3.8",
]
# PyTorch is needed only to convert the pytorch-fid Inception weights and to test that
# conversion against the PyTorch network.
# PyTorch checkpoint conversion (diffusion_jax.convert) and the reference networks the
# converters are tested against (diffusers' UNet2DModel).
# transformers: CLIP tokenisation and the CLIPTextModel the text encoder is tested against.
_TORCH = ["torch>=2.4", "torchvision>=0.19", "pytorch-fid>=0.3.0", "safetensors>=0.4",
          "diffusers>=0.30", "transformers>=4.40"]
# The suite imports torch and the reference packages directly (no skips: a missing one fails):
# the torch extra, plus upstream definitions the converters and samplers are compared with,
# installed, never copied: guided-diffusion-sdk ships openai's guided_diffusion package (its
# UNetModel / EncoderUNetModel); torchsde and torchdiffeq are what k_diffusion.sampling imports.
# k-diffusion itself is installed with --no-deps by the README's test command: its
# requirements (dctorch pins numpy<2, clip-anytorch needs pkg_resources) cannot be installed
# beside jax>=0.7, and only its sampling module is used.
_TEST += _TORCH + ["guided-diffusion-sdk==1.0.0", "torchsde>=0.2.6", "torchdiffeq>=0.2.5"]

setuptools.setup(
    name="diffusion_jax",
    version="0.1.0",
    description="Denoising diffusion probabilistic models in JAX/Flax: exact, fast, tested.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=setuptools.find_packages(include=["diffusion_jax", "diffusion_jax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.7.0",
        "flax>=0.11.0",
        "optax>=0.2.4",
        # The version the suite runs against (commit markers for local checkpoints, written from
        # 0.12.3, are what the damage check reads; older runs' markerless layout is still read).
        "orbax-checkpoint>=0.12.8",
        "tensorflow-datasets>=4.9.6",
        "ml_collections>=1.0.0",
        "absl-py>=2.1.0",
        "chex>=0.1.89",
        "numpy>=1.26",
        "scipy>=1.11",
        "scikit-learn>=1.4",
        "pillow>=10.0",
        "tensorboardX>=2.6",
        "etils[epath]>=1.7",  # paths that may be gs://
        "fsspec>=2023.1",  # etils.epath's backend for gs:// / s3:// URIs (gcsfs/s3fs plug in)
        "tqdm>=4.66",  # the console's progress bars (logging_utils.progress_bar)
        "diffrax>=0.6",  # adaptive ODE solving (probability-flow likelihood)
    ],
    extras_require={
        "test": _TEST,
        "torch": _TORCH,
        # Text runs (model.text_encoder='small' / 'clip'): the run's word-level tokenizer.
        "text": ["tokenizers>=0.19"],
        "tf": ["tensorflow>=2.16"],
        "gpu": ["jax[cuda12]>=0.7.0"],
        "experiments": ["matplotlib>=3.8"],
    },
)
