"""Turning a model of this package into a PyTorch Lightning module, for `main.py`.

The models are plain `nn.Module`s, so that sampling never imports Lightning (which takes seconds). Training
converts the instance in place: its class becomes a subclass of its training hooks (`ldm.training.diffusion_hooks`
for the diffusion models; the autoencoders carry their own), its own class and `LightningModule`, and the
Lightning bookkeeping attributes are added without touching the weights.
"""
from __future__ import annotations

from functools import lru_cache

from torch import nn

from ldm.training.diffusion_hooks import hooks_for

# Attributes that LightningModule exposes as properties but that our models may have set as plain ones.
_PROPERTY_ATTRIBUTES = ("automatic_optimization", "strict_loading")


@lru_cache(maxsize=None)
def _lightning_class(cls: type) -> type:
    import pytorch_lightning as pl

    hooks = hooks_for(cls)
    bases = (cls, pl.LightningModule) if hooks is None else (hooks, cls, pl.LightningModule)
    return type(cls.__name__, bases, {"__module__": cls.__module__, "__doc__": cls.__doc__,
                                      "__qualname__": cls.__qualname__})


def as_lightning_module(model: nn.Module) -> nn.Module:
    """`model` itself, now also a `pytorch_lightning.LightningModule` (idempotent)."""
    import pytorch_lightning as pl

    if isinstance(model, pl.LightningModule):
        return model
    plain_settings = {name: model.__dict__.pop(name) for name in _PROPERTY_ATTRIBUTES if name in model.__dict__}
    blank = pl.LightningModule()
    for name, value in vars(blank).items():
        if name not in model.__dict__:
            model.__dict__[name] = value
    model.__class__ = _lightning_class(type(model))
    for name, value in plain_settings.items():
        setattr(model, name, value)
    return model
