#!/usr/bin/env python
"""Train latent diffusion models, KL autoencoders and textual-inversion embeddings with PyTorch Lightning 2.

    python main.py --base configs/latent-diffusion/<config>.yaml -t --gpus 0,
    python main.py -r logs/<run>                       # resume where the run stopped and train on
    python main.py --base configs/stable-diffusion/v1-finetune.yaml -t --actual_resume model.ckpt \\
        -n my_concept --gpus 0, --data_root path/to/images --init_word sculpture

Configs name `main.DataModuleFromConfig` and `main.ImageLogger`; they live in `ldm.training` and are
found here too.
"""
from __future__ import annotations

import argparse
import inspect
import logging
import os
import shutil
import sys
from typing import Any, Optional, Sequence

from ldm.errors import UserInputError

_TRAINING_EXPORTS = {
    "DataModuleFromConfig": "ldm.training.data_module",
    "WrappedDataset": "ldm.training.data_module",
    "worker_init_fn": "ldm.training.data_module",
    "ImageLogger": "ldm.training.image_logger",
    "SetupCallback": "ldm.training.callbacks",
}


def __getattr__(name: str) -> Any:
    """`main.DataModuleFromConfig` and friends, imported on first use (Lightning is slow to import)."""
    if name in _TRAINING_EXPORTS:
        import importlib

        return getattr(importlib.import_module(_TRAINING_EXPORTS[name]), name)
    raise AttributeError(f"module 'main' has no attribute {name!r}")


def str2bool(value: str | bool) -> bool:
    if isinstance(value, bool):
        return value
    if value.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if value.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"boolean value expected, got {value!r}")


BOOLEAN_FLAGS = ("-t", "--train", "--no-test", "-d", "--debug", "--scale_lr")


def protect_overrides(argv: Sequence[str]) -> list[str]:
    """Keep a `key=value` override that follows a bare boolean flag (`-t lightning.trainer.max_steps=10`)
    from being read as the flag's value."""
    result: list[str] = []
    for index, item in enumerate(argv):
        result.append(item)
        following = argv[index + 1] if index + 1 < len(argv) else ""
        if item in BOOLEAN_FLAGS and "=" in following and not following.startswith("-"):
            result.append("True")
    return result


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Train a latent diffusion model, an autoencoder or a textual-inversion embedding. Arguments "
                    "written key=value override config entries (e.g. lightning.trainer.max_steps=1000).")
    parser.add_argument("-n", "--name", type=str, const=True, default="", nargs="?",
                        help="postfix for the log directory (logs/<timestamp>_<name>)")
    parser.add_argument("-r", "--resume", type=str, const=True, default="", nargs="?",
                        help="resume from a log directory (its checkpoints/last.ckpt) or from a checkpoint in one")
    parser.add_argument("-b", "--base", nargs="*", metavar="base_config.yaml", default=[],
                        help="config files, merged left to right; later key=value arguments override them")
    parser.add_argument("-t", "--train", type=str2bool, const=True, default=None, nargs="?",
                        help="train; without it a run only tests, except that -r trains on (-t false: only test)")
    parser.add_argument("--no-test", type=str2bool, const=True, default=False, nargs="?",
                        help="skip testing after training")
    parser.add_argument("-p", "--project", help="group the run's log directory under logs/<project>/")
    parser.add_argument("-d", "--debug", type=str2bool, nargs="?", const=True, default=False,
                        help="debug run: if it fails, its log directory is moved to logs/debug_runs/")
    parser.add_argument("-s", "--seed", type=int, default=23, help="seed for seed_everything")
    parser.add_argument("-f", "--postfix", type=str, default="", help="postfix for the default name")
    parser.add_argument("-l", "--logdir", type=str, default="logs", help="directory for logging")
    parser.add_argument("--scale_lr", type=str2bool, nargs="?", const=True, default=True,
                        help="scale base-lr by accumulate_grad_batches * number of GPUs * batch size")
    parser.add_argument("--gpus", type=str, default=None,
                        help="GPUs to train on, Lightning's device list: 0, or 0,1 (several use DDP); "
                             "left out, training runs on the CPU")
    ti = parser.add_argument_group("textual inversion")
    ti.add_argument("--actual_resume", type=str, default=None,
                    help="checkpoint whose weights the model starts from (e.g. sd-v1-4.ckpt)")
    ti.add_argument("--data_root", type=str, default=None,
                    help="folder of the concept's images (sets data.params.{train,validation}.params.data_root)")
    ti.add_argument("--embedding_manager_ckpt", type=str, default=None,
                    help="embedding file to start from (embeddings.pt of an earlier run)")
    ti.add_argument("--placeholder_string", type=str, default=None,
                    help="the new word, used in prompts later (overrides the config; default '*')")
    ti.add_argument("--init_word", type=str, default=None,
                    help="word the embedding starts from, e.g. sculpture (overrides the config)")
    return parser


def apply_textual_inversion_options(opt: argparse.Namespace, config: Any) -> None:
    """Write --init_word, --placeholder_string and --data_root into the config (as the original main.py)."""
    from omegaconf import OmegaConf

    from ldm.util import get_obj_from_str

    wanted = opt.init_word or opt.placeholder_string or opt.embedding_manager_ckpt
    personalization = config.model.get("params", {}).get("personalization_config")
    if wanted and personalization is None:
        raise UserInputError("--init_word, --placeholder_string and --embedding_manager_ckpt need a config with "
                             "model.params.personalization_config (e.g. configs/stable-diffusion/v1-finetune.yaml)")
    if opt.init_word:
        personalization.params.initializer_words = [opt.init_word]
    if opt.placeholder_string:
        personalization.params.placeholder_strings = [opt.placeholder_string]
        for split in ("train", "validation", "test"):
            dataset = OmegaConf.select(config, f"data.params.{split}")
            if dataset is not None and "placeholder_token" in inspect.signature(get_obj_from_str(dataset.target)).parameters:
                dataset.setdefault("params", {})["placeholder_token"] = opt.placeholder_string
    if opt.data_root:
        if not os.path.isdir(opt.data_root):
            raise UserInputError(f"--data_root {opt.data_root} is not a folder; give the folder of the concept's images")
        splits = config.get("data", {}).get("params", {})
        for split in ("train", "validation", "test"):
            if split in splits:
                splits[split].setdefault("params", {})["data_root"] = opt.data_root
    if opt.actual_resume:
        config.actual_resume = os.path.abspath(opt.actual_resume)


def build_model(config: Any) -> Any:
    """The model of the config, started from `actual_resume` weights when the config names them."""
    from ldm.checkpoint import load_model_from_config
    from ldm.util import instantiate_from_config

    checkpoint = config.get("actual_resume")
    if checkpoint is None:
        return instantiate_from_config(config.model)
    if not os.path.isfile(checkpoint):
        raise UserInputError(f"--actual_resume {checkpoint} does not exist; give the checkpoint to start from")
    if widens_input(config.model, checkpoint):
        model = instantiate_from_config(config.model)
        model.init_from_ckpt(checkpoint)  # the text-to-image weights, the extra input channels zero
    else:
        model = load_model_from_config(config.model, checkpoint, eval_mode=False)
    model.restarted_from_ckpt = True  # keep the checkpoint's scale_factor (no scale_by_std re-estimate)
    manager = getattr(model, "embedding_manager", None)
    if manager is not None:
        manager.initialize_from_embedder()
    return model


def widens_input(model_config: Any, checkpoint: str) -> bool:
    """Whether the model starts from a checkpoint whose UNet takes fewer input channels: an inpainting model
    initialised from a text-to-image checkpoint, as the released inpainting checkpoints were."""
    from ldm.inpainting_checkpoint import checkpoint_input_channels, config_input_channels

    wanted, given = config_input_channels(model_config), checkpoint_input_channels(checkpoint)
    return wanted is not None and given is not None and given < wanted


def only_embeddings_train(model: Any) -> bool:
    manager = getattr(model, "embedding_manager", None)
    if manager is None:
        return False
    manager_params = {id(param) for param in manager.parameters()}
    return all(id(param) in manager_params for param in model.parameters() if param.requires_grad)


def train(opt: argparse.Namespace, overrides: Sequence[str]) -> int:
    """Train (or only test) the run `opt` describes; its config is checked before anything is built."""
    from omegaconf import OmegaConf

    from ldm.training.config_checks import refuse_missing_params
    from ldm.training.devices import device_settings
    from ldm.training.run import merged_config, run_paths

    paths, files = run_paths(opt.base, opt.name, opt.resume, opt.logdir, opt.postfix, opt.project)
    config, lightning_config = merged_config(files, overrides)
    apply_textual_inversion_options(opt, config)
    for section in ("model", "data"):
        refuse_missing_params(config.get(section), section)
    trainer_config = OmegaConf.to_container(lightning_config.get("trainer", OmegaConf.create()), resolve=True)
    n_devices = device_settings(trainer_config, opt.gpus)

    import pytorch_lightning as pl

    from ldm.lightning import as_lightning_module
    from ldm.training.trainer import build_trainer, check_trainer_options
    from ldm.util import instantiate_from_config

    check_trainer_options(trainer_config)
    lightning_config.trainer = trainer_config
    training = opt.train if opt.train is not None else bool(opt.resume)
    if opt.resume and opt.train is None:
        print(f"resuming {paths.logdir} from {paths.resume_checkpoint}: training goes on (-t false only tests)")

    pl.seed_everything(opt.seed, workers=True)

    if "data" not in config:
        raise UserInputError("the config has no data section: add one (see configs/demo/txt2img.yaml)")
    data = instantiate_from_config(config.data)
    data.prepare_data()
    data.setup()
    if not training and (opt.no_test or not data.has("test")):
        reason = "--no-test is given" if opt.no_test else "the config has no test data"
        raise UserInputError(f"nothing to do: without -t main.py only tests, and {reason}; pass -t to train")
    for name, dataset in data.datasets.items():
        print(f"{name} data: {dataset.__class__.__name__}, {len(dataset)} examples")

    model = as_lightning_module(build_model(config))
    if opt.embedding_manager_ckpt:
        model.embedding_manager.load(opt.embedding_manager_ckpt)
    trainable_only = only_embeddings_train(model) and config.get("actual_resume") is not None
    if trainable_only:
        model.strict_loading = False

    batch_size, base_lr = config.data.params.batch_size, config.model.base_learning_rate
    accumulate = int(trainer_config.get("accumulate_grad_batches", 1))
    if opt.scale_lr:
        model.learning_rate = accumulate * n_devices * batch_size * base_lr
        print(f"Setting learning rate to {model.learning_rate:.2e} = {accumulate} (accumulate_grad_batches) * "
              f"{n_devices} (devices) * {batch_size} (batchsize) * {base_lr:.2e} (base_lr)")
    else:
        model.learning_rate = base_lr
        print(f"++++ NOT USING LR SCALING ++++\nSetting learning rate to {model.learning_rate:.2e}")

    trainer = build_trainer(model, paths, config, lightning_config, trainer_config,
                            has_validation=data.has("validation"), trainable_only=trainable_only)
    try:
        if training:
            trainer.fit(model, datamodule=data, ckpt_path=paths.resume_checkpoint, weights_only=True)
        if not opt.no_test and not trainer.interrupted and data.has("test"):
            trainer.test(model, datamodule=data)
    except BaseException as error:
        if trainer.interrupted and isinstance(error, SystemExit):
            print(f"training interrupted; resume with: python main.py -r {paths.logdir}", file=sys.stderr)
            return 130
        if opt.debug and not opt.resume and trainer.is_global_zero and os.path.isdir(paths.logdir):
            destination = os.path.join(opt.logdir, "debug_runs", os.path.basename(paths.logdir))
            os.makedirs(os.path.dirname(destination), exist_ok=True)
            shutil.move(paths.logdir, destination)
            print(f"debug run failed: its logs moved to {destination}", file=sys.stderr)
        raise
    if trainer.is_global_zero:
        print(f"run saved in {paths.logdir} (checkpoints in {paths.ckptdir})")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sys.path.insert(0, os.getcwd())
    parser = get_parser()
    opt, overrides = parser.parse_known_args(protect_overrides(sys.argv[1:] if argv is None else argv))
    try:
        return train(opt, overrides)
    except UserInputError as error:
        print(f"main.py: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
