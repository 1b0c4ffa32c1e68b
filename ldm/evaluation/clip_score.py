"""CLIP similarities, computed with open_clip and OpenAI's CLIP weights:

- CLIP score, the Stable Diffusion v1 model card's axis: 100 x cosine(image, caption) in ViT-L/14's embedding
  space, clipped at 0, averaged (Hessel et al. 2021, "CLIPScore", with the weight 100 of the model card and
  torchmetrics instead of the paper's 2.5 and ViT-B/32);
- the textual-inversion paper's two axes (Gal et al. 2022, "An Image is Worth One Word", sec. 5): image-image
  similarity (mean pairwise cosine between generated and training images) and text-image similarity (mean cosine
  between the generated images and their prompt with the placeholder word left out)."""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from PIL import Image

from ldm.errors import UserInputError
from ldm.evaluation.metric import Sample

DEFAULT_CLIP = "ViT-L-14"


class CLIPEmbedder:
    """An open_clip CLIP model with its image preprocessing and tokenizer: images and texts to unit-length
    embeddings."""

    def __init__(self, model: Any, preprocess: Callable[[Image.Image], torch.Tensor],
                 tokenizer: Callable[[list[str]], torch.Tensor], device: str | torch.device = "cpu",
                 batch_size: int = 32):
        self.model = model.to(device).eval()
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.device = device
        self.batch_size = batch_size

    def images(self, paths: Sequence[str | os.PathLike]) -> torch.Tensor:
        """Unit embeddings [N, D] of the image files at `paths`."""
        rows = []
        for start in range(0, len(paths), self.batch_size):
            pixels = torch.stack([self.preprocess(_read_rgb(Path(p))) for p in paths[start:start + self.batch_size]])
            with torch.no_grad():
                rows.append(self.model.encode_image(pixels.to(self.device)).float())
        return torch.nn.functional.normalize(torch.cat(rows), dim=-1).cpu()

    def texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Unit embeddings [N, D] of `texts` (cut at CLIP's 77 tokens)."""
        rows = []
        for start in range(0, len(texts), self.batch_size):
            tokens = self.tokenizer(list(texts[start:start + self.batch_size]))
            with torch.no_grad():
                rows.append(self.model.encode_text(tokens.to(self.device)).float())
        return torch.nn.functional.normalize(torch.cat(rows), dim=-1).cpu()


def _read_rgb(path: Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError) as error:
        raise UserInputError(f"cannot read the image {path} ({error})") from error


def load_clip(model_name: str = DEFAULT_CLIP, device: str | torch.device = "cpu", batch_size: int = 32
              ) -> CLIPEmbedder:
    """OpenAI's CLIP `model_name` ("ViT-L-14", "ViT-B-32") through open_clip, its weights from
    ldm.evaluation.pretrained (downloaded once, or a clear error offline)."""
    import open_clip

    from ldm.evaluation.pretrained import clip_weights, fetch

    path = fetch(clip_weights(model_name))
    model = open_clip.load_openai_model(str(path), precision="fp32", device="cpu")
    preprocess = open_clip.image_transform(model.visual.image_size, is_train=False)
    return CLIPEmbedder(model, preprocess, open_clip.get_tokenizer(model_name), device, batch_size)


def tiny_clip(seed: int = 0, device: str | torch.device = "cpu") -> CLIPEmbedder:
    """A small randomly initialised open_clip CLIP (32x32 images, 16-dimensional embeddings) with CLIP's real
    tokenizer: for tests and the offline demo, where its numbers only check the plumbing."""
    import open_clip

    vision = open_clip.CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=8, image_size=32)
    text = open_clip.CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=2, layers=1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.CLIP(embed_dim=16, vision_cfg=vision, text_cfg=text)
    return CLIPEmbedder(model, open_clip.image_transform(32, is_train=False), open_clip.tokenize, device)


def clip_scores(image_embeddings: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
    """100 x max(cosine, 0) of each image with its own text; unit embeddings [N, D] -> [N]."""
    return (100.0 * (image_embeddings * text_embeddings).sum(dim=-1)).clamp(min=0.0)


class CLIPScore:
    """Mean CLIP score of each sample's image against its caption (ViT-L/14 by default); higher is better.
    `model` replaces the pretrained CLIP (tests, the demo)."""

    name = "clip_score"
    higher_is_better = True

    def __init__(self, device: str | torch.device = "cpu", model: Optional[CLIPEmbedder] = None,
                 model_name: str = DEFAULT_CLIP, batch_size: int = 32):
        self.device = device
        self.model_name = model_name
        self.batch_size = batch_size
        self._model = model

    @property
    def model(self) -> CLIPEmbedder:
        if self._model is None:
            self._model = load_clip(self.model_name, self.device, self.batch_size)
        return self._model

    def compute(self, samples: Sequence[Sample]) -> float:
        if not samples:
            raise UserInputError("CLIP score needs at least one image")
        images = self.model.images([s.path for s in samples])
        texts = self.model.texts([s.caption for s in samples])
        return float(clip_scores(images, texts).mean())


def image_image_similarity(generated: torch.Tensor, training: torch.Tensor) -> float:
    """Gal et al. 2022's reconstruction axis: the mean cosine over all (generated, training) pairs of unit
    embeddings."""
    return float((generated @ training.T).mean())


def text_image_similarity(generated: torch.Tensor, text: torch.Tensor) -> float:
    """Gal et al. 2022's editability axis for one prompt: the mean cosine between the generated images' unit
    embeddings [N, D] and the unit embedding [D] of the prompt without its placeholder."""
    return float((generated @ text.reshape(-1)).mean())


def without_placeholder(prompt: str, placeholder: str) -> str:
    """The prompt as Gal et al. 2022 compare it with the images: the placeholder word left out ("a photo of *
    on the moon" -> "a photo of on the moon")."""
    return re.sub(r"\s+", " ", prompt.replace(placeholder, " ")).strip()
