"""The textual-inversion training set for a style (Gal et al. 2022, sec. 4.3): as
`ldm.data.personalized`, with captions such as "a painting in the style of *"."""
from __future__ import annotations

from ldm.data import personalized
from ldm.data.personalized import per_img_token_list  # noqa: F401  (the original module exports it too)

imagenet_templates_small = [
    "a painting in the style of {}",
    "a rendering in the style of {}",
    "a cropped painting in the style of {}",
    "the painting in the style of {}",
    "a clean painting in the style of {}",
    "a dirty painting in the style of {}",
    "a dark painting in the style of {}",
    "a picture in the style of {}",
    "a cool painting in the style of {}",
    "a close-up painting in the style of {}",
    "a bright painting in the style of {}",
    "a cropped painting in the style of {}",
    "a good painting in the style of {}",
    "a close-up painting in the style of {}",
    "a rendition in the style of {}",
    "a nice painting in the style of {}",
    "a small painting in the style of {}",
    "a weird painting in the style of {}",
    "a large painting in the style of {}",
]

imagenet_dual_templates_small = [
    "a painting in the style of {} with {}",
    "a rendering in the style of {} with {}",
    "a cropped painting in the style of {} with {}",
    "the painting in the style of {} with {}",
    "a clean painting in the style of {} with {}",
    "a dirty painting in the style of {} with {}",
    "a dark painting in the style of {} with {}",
    "a cool painting in the style of {} with {}",
    "a close-up painting in the style of {} with {}",
    "a bright painting in the style of {} with {}",
    "a cropped painting in the style of {} with {}",
    "a good painting in the style of {} with {}",
    "a painting of one {} in the style of {}",
    "a nice painting in the style of {} with {}",
    "a small painting in the style of {} with {}",
    "a weird painting in the style of {} with {}",
    "a large painting in the style of {} with {}",
]


class PersonalizedBase(personalized.PersonalizedBase):
    """Images in one style with style-template captions; the parameters are those of
    `ldm.data.personalized.PersonalizedBase`."""

    templates = imagenet_templates_small
    dual_templates = imagenet_dual_templates_small
