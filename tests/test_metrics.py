"""The evaluation metrics (ldm.evaluation.fid, ldm.evaluation.clip_score, ldm.evaluation.pretrained), offline: FID
against the closed-form Fréchet distance of known Gaussians, torch-fidelity's FID against ours, the reference
statistics' cache, CLIP scores of a small random CLIP against a direct computation, and the message that names
the weights file to bring when offline."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.errors import UserInputError
from ldm.evaluation import pretrained
from ldm.evaluation.clip_score import (CLIPScore, image_image_similarity, text_image_similarity, tiny_clip,
                                       without_placeholder)
from ldm.evaluation.fid import FID, feature_statistics, frechet_distance, read_uint8, statistics_distance
from ldm.evaluation.metric import Metric, Sample


def random_covariance(rng: np.random.Generator, dim: int) -> np.ndarray:
    root = rng.normal(size=(dim, dim))
    return root @ root.T / dim + 0.1 * np.eye(dim)


class TableExtractor:
    """A stand-in for Inception: each image is filled with its row index (red + 256 green); the features are that
    row of `table`. Counts the images it sees."""

    name = "table"

    def __init__(self, table: np.ndarray):
        self.table = torch.from_numpy(table).float()
        self.seen = 0

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self.seen += len(images)
        index = images[:, 0, 0, 0].long() + 256 * images[:, 1, 0, 0].long()
        return self.table[index]


def write_indexed_images(folder: Path, indices: range, size: tuple[int, int] = (8, 8)) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in indices:
        pixels = np.zeros((size[1], size[0], 3), np.uint8)
        pixels[:] = (i % 256, i // 256, 0)
        path = folder / f"{i:05d}.png"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


def samples_of(paths: list[Path], captions: list[str] | None = None) -> list[Sample]:
    return [Sample(path, captions[i] if captions else "", i, 7.5) for i, path in enumerate(paths)]


def test_frechet_distance_of_diagonal_gaussians_is_the_textbook_formula():
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, -1.0, 2.0])
    var1, var2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 0.25])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(var1) - np.sqrt(var2)) ** 2)
    assert frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2)) == pytest.approx(expected, rel=1e-12)
    assert frechet_distance(mu1, np.diag(var1), mu1, np.diag(var1)) == pytest.approx(0.0, abs=1e-9)


def test_torch_fidelity_fid_agrees_with_the_closed_form_on_random_features():
    rng = np.random.default_rng(0)
    first = torch.from_numpy(rng.normal(size=(400, 16)) @ rng.normal(size=(16, 16))).float()
    second = torch.from_numpy(rng.normal(size=(300, 16)) @ rng.normal(size=(16, 16)) + 0.5).float()
    library = statistics_distance(feature_statistics(first), feature_statistics(second))
    ours = frechet_distance(first.numpy().mean(0), np.cov(first.numpy(), rowvar=False),
                            second.numpy().mean(0), np.cov(second.numpy(), rowvar=False))
    assert library == pytest.approx(ours, rel=1e-5)


def test_fid_of_two_known_gaussians_is_their_frechet_distance(tmp_path):
    rng = np.random.default_rng(1)
    dim, count = 3, 2000
    mu1, mu2 = np.zeros(dim), np.array([1.0, 0.5, -0.5])
    sigma1, sigma2 = random_covariance(rng, dim), random_covariance(rng, dim)
    table = np.concatenate([rng.multivariate_normal(mu1, sigma1, count), rng.multivariate_normal(mu2, sigma2, count)])
    write_indexed_images(tmp_path / "reference", range(count))
    generated = write_indexed_images(tmp_path / "generated", range(count, 2 * count))
    fid = FID(tmp_path / "reference", cache_dir=tmp_path / "cache", batch_size=512,
              feature_extractor=TableExtractor(table))
    assert isinstance(fid, Metric) and fid.name == "fid" and not fid.higher_is_better
    value = fid.compute(samples_of(generated))
    reference, sampled = table[:count], table[count:]
    assert value == pytest.approx(frechet_distance(sampled.mean(0), np.cov(sampled, rowvar=False),
                                                   reference.mean(0), np.cov(reference, rowvar=False)), rel=1e-4)
    assert value == pytest.approx(frechet_distance(mu1, sigma1, mu2, sigma2), rel=0.1)


def test_reference_statistics_are_computed_once_per_folder(tmp_path):
    table = np.random.default_rng(2).normal(size=(40, 4))
    write_indexed_images(tmp_path / "reference", range(20))
    generated = write_indexed_images(tmp_path / "generated", range(20, 40))
    extractor = TableExtractor(table)
    first = FID(tmp_path / "reference", cache_dir=tmp_path / "cache", feature_extractor=extractor)
    value = first.compute(samples_of(generated))
    assert first.compute(samples_of(generated)) == value and extractor.seen == 20 + 20 + 20
    again = TableExtractor(table)  # another run: the statistics come from the cache file
    assert FID(tmp_path / "reference", cache_dir=tmp_path / "cache",
               feature_extractor=again).compute(samples_of(generated)) == pytest.approx(value, rel=1e-12)
    assert again.seen == 20 and len(list((tmp_path / "cache").iterdir())) == 1
    write_indexed_images(tmp_path / "reference", range(20, 21))  # another file list: other statistics
    changed = TableExtractor(table)
    FID(tmp_path / "reference", cache_dir=tmp_path / "cache", feature_extractor=changed).compute(samples_of(generated))
    assert changed.seen == 20 + 21 and len(list((tmp_path / "cache").iterdir())) == 2


def test_fid_reads_images_of_several_sizes_center_cropped(tmp_path):
    pixels = np.arange(6 * 10 * 3, dtype=np.uint8).reshape(6, 10, 3)
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    assert torch.equal(read_uint8(tmp_path / "wide.png"), torch.from_numpy(pixels[:, 2:8]).permute(2, 0, 1))
    table = np.random.default_rng(3).normal(size=(8, 2))
    write_indexed_images(tmp_path / "reference", range(4), size=(12, 8))
    write_indexed_images(tmp_path / "reference", range(4, 8), size=(16, 16))
    extractor = TableExtractor(table)
    stats = FID(tmp_path / "reference", cache_dir=tmp_path / "cache", feature_extractor=extractor,
                batch_size=3).reference_statistics()
    np.testing.assert_allclose(stats["mu"], table.mean(0), rtol=1e-5)


def test_fid_refuses_an_empty_or_missing_reference_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    generated = write_indexed_images(tmp_path / "generated", range(2))
    for folder in (tmp_path / "empty", tmp_path / "missing"):
        with pytest.raises(UserInputError, match=str(folder.name)):
            FID(folder, feature_extractor=TableExtractor(np.zeros((2, 2)))).compute(samples_of(generated))


def test_clip_score_matches_a_direct_computation(tmp_path):
    clip = tiny_clip(seed=0)
    rng = np.random.default_rng(4)
    paths = []
    for i in range(5):
        path = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    captions = ["a red circle", "a photo of a dog", "two cats on a sofa", "the moon", "an oil painting of a boat"]
    metric = CLIPScore(model=clip)
    assert isinstance(metric, Metric) and metric.name == "clip_score" and metric.higher_is_better
    with torch.no_grad():
        images = clip.model.encode_image(torch.stack([clip.preprocess(Image.open(p).convert("RGB")) for p in paths]))
        texts = clip.model.encode_text(clip.tokenizer(captions))
    cosines = torch.nn.functional.cosine_similarity(images, texts, dim=-1)
    expected = (100 * cosines).clamp(min=0).mean()
    assert metric.compute(samples_of(paths, captions)) == pytest.approx(float(expected), rel=1e-4, abs=1e-4)


def test_the_textual_inversion_similarities():
    generated = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    training = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(8), dim=-1)
    pairs = [float(g @ t) for g in generated for t in training]
    assert image_image_similarity(generated, training) == pytest.approx(sum(pairs) / len(pairs), rel=1e-5)
    assert text_image_similarity(generated, text[None]) == pytest.approx(float((generated @ text).mean()), rel=1e-5)
    assert without_placeholder("a photo of * on the moon", "*") == "a photo of on the moon"
    assert without_placeholder("an oil painting of *", "*") == "an oil painting of"


def test_offline_the_error_names_the_file_its_url_and_where_to_put_it(tmp_path, monkeypatch):
    def offline(url, destination, **kwargs):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    monkeypatch.setenv("HOME", str(tmp_path))
    target = tmp_path / "hub" / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth"
    with pytest.raises(UserInputError) as error:
        FID(tmp_path, cache_dir=tmp_path / "cache").compute(samples_of(write_indexed_images(tmp_path, range(2))))
    assert pretrained.INCEPTION_URL in str(error.value) and str(target) in str(error.value)
    with pytest.raises(UserInputError) as error:
        CLIPScore().compute(samples_of(write_indexed_images(tmp_path, range(1)), ["a photo"]))
    assert "ViT-L-14.pt" in str(error.value) and "openaipublic" in str(error.value)
    assert str(tmp_path / ".cache" / "clip" / "ViT-L-14.pt") in str(error.value)
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"fc.weight": torch.zeros(2, 2)}, target)
    assert pretrained.fetch(pretrained.inception_weights()) == target  # once there, no download is tried


def test_weight_files_are_checked_before_the_libraries_read_them(tmp_path, monkeypatch):
    """torch-fidelity unpickles the Inception file with weights_only=False and OpenAI's CLIP files are TorchScript:
    a pickle that asks to run code, or a CLIP file of another SHA-256, never reaches them."""
    from tests.pickles import RunsCode

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setenv("HOME", str(tmp_path))
    inception = pretrained.inception_weights()
    inception.path.parent.mkdir(parents=True)
    marker = tmp_path / "ran"
    torch.save({"fc.weight": RunsCode(marker)}, inception.path)
    with pytest.raises(UserInputError, match="delete it, and download"):
        pretrained.fetch(inception)
    assert not marker.exists()
    clip = pretrained.clip_weights("ViT-B-32")
    clip.path.parent.mkdir(parents=True)
    clip.path.write_bytes(b"not OpenAI's file")
    with pytest.raises(UserInputError, match="SHA-256 differs"):
        pretrained.fetch(clip)


def test_load_clip_reads_openai_weights_from_the_cache(tmp_path, monkeypatch):
    import open_clip

    from ldm.evaluation.clip_score import load_clip

    monkeypatch.setenv("HOME", str(tmp_path))
    vision = open_clip.CLIPVisionCfg(layers=1, width=64, patch_size=8, image_size=32)  # OpenAI's layout: 64 per head
    text = open_clip.CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=1, layers=1)
    source = open_clip.CLIP(embed_dim=16, vision_cfg=vision, text_cfg=text, quick_gelu=True).eval()
    weights = pretrained.clip_weights("ViT-B-32")
    weights.path.parent.mkdir(parents=True)
    torch.save(source.state_dict(), weights.path)
    # A stand-in for OpenAI's file: taken as the published one (the SHA-256 check has its own test).
    monkeypatch.setattr(pretrained, "_sha256", lambda path: weights.sha256_prefix)
    clip = load_clip("ViT-B-32")
    with torch.no_grad():
        expected = torch.nn.functional.normalize(source.encode_text(open_clip.tokenize(["a photo of a cat"])), dim=-1)
    assert torch.allclose(clip.texts(["a photo of a cat"]), expected, atol=1e-3)
    path = tmp_path / "image.png"
    Image.fromarray(np.random.default_rng(5).integers(0, 256, (48, 40, 3), dtype=np.uint8)).save(path)
    assert clip.images([path]).shape == (1, 16) and clip.model.visual.image_size == (32, 32)


def test_the_inception_extractor_gives_2048_pool_features_of_images_of_any_size(tmp_path, monkeypatch):
    """torch-fidelity's network as FID builds it, randomly initialised (the weights file is a stand-in)."""
    from torch_fidelity import feature_extractor_inceptionv3 as inception

    from ldm.evaluation import fid

    monkeypatch.setattr(pretrained, "fetch", lambda weights: tmp_path / "stand-in.pth")
    monkeypatch.setattr(inception.torch, "load", lambda path, **kwargs: {})
    monkeypatch.setattr(inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None)
    extract = fid.inception_extractor("cpu")
    images = torch.randint(0, 256, (2, 3, 40, 40), dtype=torch.uint8)
    features = extract(images)
    assert features.shape == (2, 2048) and features.dtype == torch.float32 and torch.isfinite(features).all()
    assert torch.allclose(extract(images[1:]), features[1:], atol=1e-4)  # no batch effects (eval mode)
