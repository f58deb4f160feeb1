"""The encoder's entry point ``encode_crops``: uint8 crops in, the features of the PIL path out; the
fp16 image tower that CUDA runs, exercised on the CPU with the tiny model."""

import dataclasses

import numpy as np
import torch

from raml.extract.bench import min_crop_cosine
from raml.extract.encoder import FP16_MIN_COSINE, image_tower_dtype
from raml.extract.pyramid import pyramid_crops, pyramid_pixels
from tests.synthetic import part_image


def crops_of(*seeds):
    return torch.cat([pyramid_crops(part_image(seed, (97, 83), anomalous=seed % 2 == 1), 32) for seed in seeds])


def test_encode_crops_equals_encoding_the_normalised_pixels(tiny_backbone):
    images = [part_image(seed, (97, 83)) for seed in (1, 2)]
    crops = torch.cat([pyramid_crops(image, 32) for image in images])
    pixels = np.concatenate([pyramid_pixels(image, 32, tiny_backbone.mean, tiny_backbone.std) for image in images])
    features = tiny_backbone.encode_crops(crops)
    assert features.shape == (42, 32) and features.dtype == np.float32
    np.testing.assert_array_equal(features, tiny_backbone.encode_images(pixels))
    np.testing.assert_allclose(np.linalg.norm(features, axis=1), 1, atol=1e-6)


def test_the_image_tower_runs_in_fp16_on_cuda_only():
    assert image_tower_dtype(torch.device("cuda")) == torch.float16
    assert image_tower_dtype(torch.device("cuda:1")) == torch.float16
    assert image_tower_dtype(torch.device("cpu")) == torch.float32


def test_fp16_tower_stays_within_tolerance_and_leaves_the_fp32_model_alone(tiny_backbone):
    """What CUDA runs (``model.visual`` copied in fp16, fp32 normalisation, float32 output), on the CPU."""
    crops = crops_of(1, 2, 3)
    half = dataclasses.replace(tiny_backbone, image_dtype=torch.float16)
    fp32, fp16 = tiny_backbone.encode_crops(crops), half.encode_crops(crops)
    assert fp16.dtype == np.float32 and fp16.shape == fp32.shape
    assert not np.array_equal(fp16, fp32)  # the fp16 tower really ran
    cosine = (fp16 * fp32).sum(axis=1)
    assert cosine.min() >= FP16_MIN_COSINE
    assert {p.dtype for p in half._image_tower.parameters()} == {torch.float16}
    assert {p.dtype for p in tiny_backbone.model.parameters()} == {torch.float32}  # prompts, ONNX export
    assert min_crop_cosine(half, crops) == cosine.min()  # the check bench extract runs on CUDA


def test_a_weights_file_is_built_like_its_pretrained_tag(tmp_path):
    """--weights FILE holds the --pretrained tag's weights (default OpenAI's): OpenAI's CLIP needs
    QuickGELU, so the file must get it too (and the identity must say so)."""
    from raml.extract.identity import resolve_backbone

    weights = tmp_path / "open_clip_pytorch_model.bin"
    weights.write_bytes(b"not read: the identity hashes the file, the model is not built")
    openai_file = resolve_backbone("ViT-B-16", "openai", str(weights))
    assert openai_file.quick_gelu and openai_file.source == str(weights)
    assert openai_file.identity.weights.startswith("sha256:")
    assert openai_file.identity.model_config == resolve_backbone("ViT-B-16", "openai").identity.model_config
    unknown_file = resolve_backbone("ViT-B-16", None, str(weights))
    assert not unknown_file.quick_gelu and unknown_file.identity.model_config != openai_file.identity.model_config
