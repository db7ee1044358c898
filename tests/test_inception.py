"""The Flax FID Inception against pytorch-fid's own PyTorch network, with random weights.

The real weights cannot be downloaded in CI, so the check is structural: pytorch-fid builds its
network (torchvision's Inception3 with the FIDInception* blocks swapped in) with the weight
download stubbed out; we randomise every weight and BatchNorm statistic, convert the state dict
with our converter and require the same pool features and logits on the same uint8 images,
through the same resize-and-scale input path.
"""
import os
import sys
from unittest import mock

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from pytorch_fid import inception as pytorch_fid_inception

from diffusion_jax.evaluation import convert_inception, inception

_N_IMAGES = 3


def _randomise_(net: torch.nn.Module, calibration: torch.Tensor, gen: torch.Generator) -> None:
    """He-normal convolutions, random BN affine; running stats from data, then perturbed.

    Taking the running statistics from a forward pass keeps the activations O(1) through all
    ~95 layers, so the relative error measured at the output means something; perturbing them
    afterwards makes mean and variance distinct per channel.
    """
    def normal(shape, std):
        return torch.randn(shape, generator=gen) * std

    def uniform(shape, lo, hi):
        return lo + (hi - lo) * torch.rand(shape, generator=gen)

    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.copy_(normal(m.weight.shape, (2.0 / m.weight[0].numel()) ** 0.5))
        for bn in bns:
            bn.weight.copy_(uniform(bn.weight.shape, 0.5, 1.5))
            bn.bias.copy_(normal(bn.bias.shape, 0.2))
            bn.momentum = 1.0  # running stats := this batch's stats
        net.fc.weight.copy_(normal(net.fc.weight.shape, 2048 ** -0.5))
        net.fc.bias.copy_(normal(net.fc.bias.shape, 0.5))
        net.train()
        net(calibration)
        net.eval()
        for bn in bns:
            bn.running_mean.add_(0.1 * normal(bn.running_mean.shape, 1.0) * bn.running_var.sqrt())
            bn.running_var.mul_(uniform(bn.running_var.shape, 0.7, 1.3))


@pytest.fixture(scope="module")
def torch_fid_net():
    """pytorch-fid's FID InceptionV3 (fid_inception_v3) and its feature wrapper, random weights."""
    gen = torch.Generator().manual_seed(0)
    no_load = lambda self, *args, **kwargs: None  # noqa: E731 - skip the downloaded weights
    with mock.patch.object(pytorch_fid_inception, "load_state_dict_from_url",
                           return_value=None), \
            mock.patch.object(torchvision.models.inception.Inception3, "load_state_dict",
                              no_load):
        net = pytorch_fid_inception.fid_inception_v3()
    _randomise_(net, torch.rand(2, 3, 299, 299, generator=gen) * 2 - 1, gen)
    # pytorch-fid's wrapper (resize to 299 and scale to [-1, 1]) around the same modules.
    with mock.patch.object(pytorch_fid_inception, "fid_inception_v3", return_value=net):
        wrapper = pytorch_fid_inception.InceptionV3([3], resize_input=True, normalize_input=True)
    wrapper.eval()
    return net, wrapper


@pytest.fixture(scope="module")
def state_dict(torch_fid_net):
    net, _ = torch_fid_net
    return {k: v.numpy() for k, v in net.state_dict().items()}


@pytest.fixture(scope="module")
def pth_file(torch_fid_net, tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "random_fid_inception.pth"
    torch.save(torch_fid_net[0].state_dict(), path)
    return path


def _torch_features(torch_fid_net, images_uint8):
    """pytorch-fid's path: uint8 -> [0, 1] NCHW -> wrapper (resize, 2x-1, blocks) -> fc."""
    net, wrapper = torch_fid_net
    x = torch.from_numpy(images_uint8).permute(0, 3, 1, 2).float() / 255.0
    with torch.no_grad():
        pool = wrapper(x)[0].flatten(1)
        logits = net.fc(pool)
        logits_unbiased = pool @ net.fc.weight.T
    return dict(pool=pool.numpy(), logits=logits.numpy(), logits_unbiased=logits_unbiased.numpy())


def _relative_error(ours, ref):
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def test_features_match_pytorch_fid(torch_fid_net, state_dict):
    images = np.random.default_rng(0).integers(0, 256, (_N_IMAGES, 37, 41, 3), dtype=np.uint8)
    ref = _torch_features(torch_fid_net, images)
    # batch_size 2 exercises the padded last batch.
    ours = inception.inception_features(convert_inception.state_dict_to_variables(state_dict),
                                        images, batch_size=2)
    assert ours["pool"].shape == (_N_IMAGES, 2048)
    assert ours["logits"].shape == ours["logits_unbiased"].shape == (_N_IMAGES, 1008)
    errors = {k: _relative_error(ours[k], ref[k]) for k in ref}
    print("max relative error vs pytorch-fid:", errors)
    assert np.std(ref["pool"]) > 1e-2  # the random network is not degenerate
    # Measured ~1e-6 (fp32 through ~95 layers); 1e-5 leaves room for other BLAS kernels.
    assert all(e <= 1e-5 for e in errors.values()), errors


@pytest.mark.parametrize("shape", [(37, 41), (400, 350), (299, 299), (8, 8), (1024, 768)])
def test_resize_matches_torch_interpolate(shape):
    x = np.random.default_rng(1).random((2, *shape, 3), dtype=np.float32)
    ref = F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=(299, 299),
                        mode="bilinear", align_corners=False).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(np.asarray(inception.resize_bilinear(x)), ref, atol=1e-6)


def test_grey_images_are_repeated_to_rgb():
    grey = np.random.default_rng(2).integers(0, 256, (2, 28, 28, 1), dtype=np.uint8)
    np.testing.assert_array_equal(np.asarray(inception.preprocess(grey)),
                                  np.asarray(inception.preprocess(np.repeat(grey, 3, -1))))
    x = np.asarray(inception.preprocess(np.array([[[[0]], [[255]]]], np.uint8)))
    assert x.shape == (1, 299, 299, 3) and x.min() == -1.0 and x.max() == 1.0


def _assert_same_tree(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_load_pth_and_converted_file(state_dict, pth_file, tmp_path, capsys):
    expected = convert_inception.state_dict_to_variables(state_dict)
    _assert_same_tree(inception.load_pytorch_fid_weights(pth_file), expected)
    dst = tmp_path / "inception_fid.msgpack"
    convert_inception.main(["--src", str(pth_file), "--dst", str(dst)])
    assert "converted" in capsys.readouterr().out
    assert os.listdir(tmp_path) == ["inception_fid.msgpack"]  # no temp file left behind
    _assert_same_tree(inception.load_pytorch_fid_weights(dst), expected)


def test_converter_checks_hash_in_file_name(pth_file, tmp_path):
    wrong = tmp_path / "pt_inception-2015-12-05-deadbeef.pth"
    os.symlink(pth_file, wrong)
    with pytest.raises(ValueError, match="sha256"):
        convert_inception.main(["--src", str(wrong), "--dst", str(tmp_path / "out.msgpack")])
    assert not (tmp_path / "out.msgpack").exists()


def test_converter_rejects_incomplete_state_dict(state_dict):
    broken = {k: v for k, v in state_dict.items() if not k.startswith("Mixed_7c.branch_pool")}
    with pytest.raises(ValueError, match="missing"):
        convert_inception.state_dict_to_variables(broken)


def test_missing_weights_say_where_to_get_them(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        inception.load_pytorch_fid_weights(tmp_path / "inception_fid.msgpack")
    message = str(info.value)
    assert inception.FID_WEIGHTS_URL in message
    assert "python -m diffusion_jax.evaluation.convert_inception" in message


def test_reading_pth_without_torch_names_the_extra(pth_file):
    with mock.patch.dict(sys.modules, {"torch": None}):
        with pytest.raises(ImportError, match=r"diffusion_jax\[torch\]"):
            convert_inception.load_torch_state_dict(str(pth_file))
