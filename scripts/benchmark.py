"""This project and diffusers side by side on the same random full-size Stable Diffusion v1 weights.

The weights (random, non-zero, scaled like a trained network's) are built once, written as `.ckpt` and
`.safetensors` to a temporary folder, and converted in-process into diffusers' `UNet2DConditionModel`
and `AutoencoderKL` with diffusers' own original-to-diffusers conversion functions (the tensors are
shared, not copied). Measured, interleaved, after a warm-up, median of the repeats; the ratio is the
median of ours / diffusers over the repeats, each pair measured back to back:

* UNet step: one forward of a batch of 2 (one image with classifier-free guidance: the same latent under
  the unconditional and the conditional context) per dtype;
* txt2img: text encoding, N DDIM steps with guidance 7.5, VAE decode (first dtype only);
* load: checkpoint file to a ready model, per format, each in a fresh process, with its peak RSS; for
  `.safetensors` also ours reading the file with the `safetensors` package's own memory-mapped `load_file`
  instead of `ldm.safetensors_mmap` (one private mapping for all tensors), so the hand-written reader is kept
  only while it measures faster;
* render memory: peak RSS (CPU) or `max_memory_allocated` (CUDA) of a fresh process that loads the
  `.safetensors` checkpoint and renders one image; with `--original DIR` also the original code's
  (`scripts/benchmark_original.py`, from the `.ckpt`).

    python scripts/benchmark.py                      # CPU, 512x512, fp32 and bf16
    python scripts/benchmark.py --device cuda --dtypes fp32,fp16
    python scripts/benchmark.py --tiny --repeats 1   # the tiny test model, seconds

On a CPU without bf16 instructions (AVX2) diffusers' bf16 convolutions run on a generic kernel at
about 1 GFLOP/s, minutes per 512x512 step; there the bf16 comparison runs at `--bf16_resolution`.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ldm.checkpoint import cast_weight, load_model_from_config, materialise_missing, no_weight_init  # noqa: E402
from ldm.models.diffusion.ddim import DDIMSampler  # noqa: E402
from ldm.models.offload import enable_offload  # noqa: E402
from ldm import accel  # noqa: E402
from ldm.accel.cpu import cpu_has_bf16  # noqa: E402
from ldm.util import instantiate_from_config  # noqa: E402

FULL_CONFIG = REPO / "configs" / "stable-diffusion" / "v1-inference.yaml"
TINY_CONFIG = REPO / "tests" / "configs" / "tiny-sd.yaml"
PROMPT = "a photograph of an astronaut riding a horse"
GUIDANCE = 7.5
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
IMPLEMENTATIONS = ("ours", "diffusers")
PLAIN = "ours_no_accel"  # our model's plain layers, timed beside the accelerated ones
LIBRARY_READER = "ours_safetensors_load_file"  # ours, the .safetensors read by the safetensors package
ORIGINAL_WORKER = REPO / "scripts" / "benchmark_original.py"
COMPILED = " (ours compiled)"
DISTINCT = " (distinct latents)"


# --- weights -------------------------------------------------------------------------------------------------

def build_random_model(config_path: Path, seed: int = 0) -> torch.nn.Module:
    """The full model, built without initialisation and filled with seeded random weights: N(0, 1/fan_in) for
    matrices and kernels (activations stay O(1) through the depth), 1 + N(0, 0.05) for norm scales."""
    config = OmegaConf.load(config_path).model
    with no_weight_init():
        model = instantiate_from_config(config)
    materialise_missing(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim >= 2:
                param.normal_(0.0, 1.0 / math.sqrt(param[0].numel()), generator=generator)
            else:
                param.normal_(1.0 if name.endswith("weight") else 0.0, 0.05, generator=generator)
    return model.eval()


def write_checkpoints(model: torch.nn.Module, folder: Path) -> dict[str, Path]:
    """The model's state dict as a Lightning-style `.ckpt` and as `.safetensors`."""
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    paths = {"ckpt": folder / "model.ckpt", "safetensors": folder / "model.safetensors"}
    torch.save({"state_dict": state, "global_step": 0}, paths["ckpt"])
    save_file(state, str(paths["safetensors"]))
    return paths


def original_config(config_path: Path) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.load(config_path), resolve=True)


def hf_text_encoder(text_state: dict[str, torch.Tensor], config: Any) -> torch.nn.Module:
    """transformers' CLIPTextModel (what diffusers' pipelines use) holding the given tensors (shared, not copied).

    `text_state` is keyed like the original checkpoint's text model (`text_model.…`), `config` is our
    `CLIPTextConfig`."""
    import transformers

    hf_config = transformers.CLIPTextConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        max_position_embeddings=config.max_position_embeddings, hidden_act=config.hidden_act)
    with torch.device("meta"):
        encoder = transformers.CLIPTextModel(hf_config)
    expected = encoder.state_dict()
    prefix = "text_model." if any(k.startswith("text_model.") for k in expected) else ""
    renamed = {prefix + k.removeprefix("text_model."): v for k, v in text_state.items()}
    encoder.load_state_dict({k: v for k, v in renamed.items() if k in expected}, strict=False, assign=True)
    for name, buffer in list(encoder.named_buffers()):
        if buffer.is_meta:  # position ids: not in the checkpoint
            owner, _, leaf = name.rpartition(".")
            encoder.get_submodule(owner).register_buffer(
                leaf, torch.arange(buffer.shape[-1]).expand(buffer.shape).clone(), persistent=False)
    return encoder.eval()


def diffusers_models(model: torch.nn.Module, config_path: Path, image_size: int
                     ) -> tuple[torch.nn.Module, torch.nn.Module]:
    """diffusers' UNet and VAE holding our model's tensors, converted by diffusers' own single-file functions."""
    import diffusers
    from diffusers.loaders import single_file_utils as single_file

    state = model.state_dict()
    config = original_config(config_path)
    unet_config = single_file.create_unet_diffusers_config_from_ldm(config, state, image_size=image_size)
    vae_config = single_file.create_vae_diffusers_config_from_ldm(config, state, image_size=image_size)
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(**unet_config)
        vae = diffusers.AutoencoderKL(**vae_config)
    unet.load_state_dict(single_file.convert_ldm_unet_checkpoint(state, unet_config), strict=True, assign=True)
    vae.load_state_dict(single_file.convert_ldm_vae_checkpoint(state, vae_config), strict=True, assign=True)
    return unet.eval(), vae.eval()


def unet_copy(model: torch.nn.Module, config_path: Path, dtype: torch.dtype) -> torch.nn.Module:
    """Our UNet with the weights cast to `dtype` (a new module; fp32 returns the model's own)."""
    unet = model.model.diffusion_model
    if dtype == torch.float32:
        return unet
    with torch.device("meta"):
        copy = instantiate_from_config(OmegaConf.load(config_path).model.params.unet_config)
    copy.load_state_dict({k: cast_weight(v, dtype) for k, v in unet.state_dict().items()}, strict=True, assign=True)
    return copy.eval()


def diffusers_unet_from(unet: torch.nn.Module, config_path: Path, image_size: int) -> torch.nn.Module:
    """diffusers' UNet sharing the tensors of one of our UNets (any dtype), in the contiguous layout its own loader
    gives them."""
    import diffusers
    from diffusers.loaders import single_file_utils as single_file

    state = {"model.diffusion_model." + k: v.contiguous() for k, v in unet.state_dict().items()}
    config = single_file.create_unet_diffusers_config_from_ldm(original_config(config_path), state,
                                                               image_size=image_size)
    with torch.device("meta"):
        theirs = diffusers.UNet2DConditionModel(**config)
    theirs.load_state_dict(single_file.convert_ldm_unet_checkpoint(state, config), strict=True, assign=True)
    return theirs.eval()


# --- timing --------------------------------------------------------------------------------------------------

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(cases: dict[str, Callable[[], Any]], warmup: int, repeats: int,
                device: torch.device) -> dict[str, list[float]]:
    """Seconds per call of each case, the cases taking turns so that drift in the machine's load hits all."""
    for _ in range(warmup):
        for fn in cases.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times


def with_accel(model: torch.nn.Module, fast: bool, device: torch.device, fn: Callable[[], Any]
               ) -> Callable[[], Any]:
    """`fn`, run with `model`'s layers swapped to the fast ones of `ldm.accel` (`fast`) or to the plain ones
    first (a walk over the modules, about a millisecond)."""
    def run() -> Any:
        accel.optimize(model, device) if fast else accel.restore(model)
        return fn()

    return run


def _plain_label(args: argparse.Namespace) -> str:
    return " (ours: --no_accel)" if args.no_accel else ""


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return ((ours.float() - theirs.float()).norm() / theirs.float().norm()).item()


@torch.no_grad()
def unet_step_rows(model: torch.nn.Module, config_path: Path, dtype_name: str, resolution: int, batch: int,
                   args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Our UNet and diffusers' on the same weights, inputs and dtype. An even batch is a guided step's, as both
    pipelines' samplers call the UNet: batch/2 latents twice, the same timestep, under two different contexts
    (unconditional and conditional); `--distinct_latents` draws every latent."""
    dtype = DTYPES[dtype_name]
    ours = unet_copy(model, config_path, dtype)
    theirs = diffusers_unet_from(ours, config_path, resolution // 8)
    generator = torch.Generator().manual_seed(1)
    context_dim = OmegaConf.load(config_path).model.params.unet_config.params.context_dim
    guided = batch % 2 == 0 and not args.distinct_latents
    latents = torch.randn(batch // 2 if guided else batch, 4, resolution // 8, resolution // 8, generator=generator)
    x = (torch.cat([latents, latents]) if guided else latents).to(device, dtype)
    t = torch.full((batch,), 500, dtype=torch.long, device=device)
    context = torch.randn(batch, 77, context_dim, generator=generator).to(device, dtype)
    unet = ours
    if args.compile:
        ours = torch.compile(ours)
    cases = {"ours": with_accel(unet, not args.no_accel, device, lambda: ours(x, t, context=context,
                                                                             guided_pair=guided)),
             "diffusers": lambda: theirs(x, t, encoder_hidden_states=context).sample}
    if not args.no_accel:
        cases[PLAIN] = with_accel(unet, False, device, lambda: ours(x, t, context=context, guided_pair=guided))
    error = relative_error(cases["ours"](), cases["diffusers"]())
    times = interleaved(cases, args.warmup, args.repeats, device)
    inputs = "" if guided else DISTINCT
    return {"measure": f"UNet step {dtype_name}{COMPILED if args.compile else ''}{inputs}{_plain_label(args)}",
            "resolution": resolution, "batch": batch, "relative_difference": error, **times}


@torch.no_grad()
def txt2img_row(model: torch.nn.Module, config_path: Path, resolution: int, steps: int, args: argparse.Namespace,
                device: torch.device) -> dict[str, Any]:
    """Prompt to decoded image: text encoding, `steps` DDIM steps with guidance, VAE decode (fp32)."""
    import diffusers

    unet, vae = diffusers_models(model, config_path, resolution // 8)
    transformer = model.cond_stage_model.transformer
    text_encoder = hf_text_encoder(transformer.state_dict(), transformer.config)
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                        beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                                        steps_offset=1, timestep_spacing="leading")
    pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=None, unet=unet,
                                             scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    latent = resolution // 8
    x_T = torch.randn(1, 4, latent, latent, generator=torch.Generator().manual_seed(2)).to(device)
    tokenize = model.cond_stage_model.tokenize  # diffusers' CLIPTokenizer needs the Hub; the ids are the same

    def ours() -> torch.Tensor:
        c = model.get_learned_conditioning([PROMPT])
        uc = model.get_learned_conditioning([""])
        z, _ = DDIMSampler(model).sample(steps, 1, (4, latent, latent), c, unconditional_guidance_scale=GUIDANCE,
                                         unconditional_conditioning=uc, x_T=x_T, eta=0.0, verbose=False)
        return model.decode_first_stage(z)

    def theirs() -> torch.Tensor:
        c = text_encoder(tokenize([PROMPT]).to(device))[0]
        uc = text_encoder(tokenize([""]).to(device))[0]
        return pipe(prompt_embeds=c, negative_prompt_embeds=uc, num_inference_steps=steps, guidance_scale=GUIDANCE,
                    latents=x_T, height=resolution, width=resolution, output_type="pt").images

    cases = {"ours": with_accel(model, not args.no_accel, device, ours), "diffusers": theirs}
    if not args.no_accel:
        cases[PLAIN] = with_accel(model, False, device, ours)
    error = relative_error(cases["ours"]().clamp(-1, 1), theirs() * 2 - 1)  # the warm-up; the pipeline clamps
    times = interleaved(cases, 0, args.e2e_repeats, device)
    return {"measure": f"txt2img {steps} steps fp32{COMPILED if args.compile else ''}{_plain_label(args)}",
            "resolution": resolution, "batch": 1, "relative_difference": error, **times}


# --- measurements in fresh processes -------------------------------------------------------------------------

def _status_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def _reset_peak_rss() -> bool:
    """Restart the kernel's peak-RSS counter (VmHWM) from the current RSS; False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def load_for(impl: str, checkpoint: Path, config_path: Path, image_size: int) -> Any:
    """A ready model from a checkpoint file: ours through `load_model_from_config`; diffusers through its
    single-file loader (the file read once, UNet and VAE by `from_single_file`, the text encoder by
    `convert_ldm_clip_checkpoint`; the pipeline's own `from_single_file` needs the Hub for CLIP's configs)."""
    if impl == "ours":
        return load_model_from_config(config_path, checkpoint)
    if impl == LIBRARY_READER:
        from safetensors.torch import load_file

        return load_model_from_config(config_path, load_file(str(checkpoint)))
    import diffusers
    from diffusers.loaders import single_file_utils as single_file

    from ldm.modules.encoders.clip_text import CLIPTextConfig

    state = single_file.load_single_file_checkpoint(str(checkpoint), local_files_only=True)
    unet = diffusers.UNet2DConditionModel.from_single_file(state, original_config=str(config_path),
                                                           local_files_only=True)
    vae = diffusers.AutoencoderKL.from_single_file(state, original_config=str(config_path), local_files_only=True)
    params = OmegaConf.load(config_path).model.params.cond_stage_config.get("params") or {}
    text_config = CLIPTextConfig.from_dict(params.get("text_config") or {})
    text_encoder = hf_text_encoder(single_file.convert_ldm_clip_checkpoint(state), text_config)
    return unet.eval(), vae.eval(), text_encoder


def import_code_of(impl: str, config_path: Path) -> None:
    """Import the code a load runs, so that the load time counts reading and building, not importing."""
    import importlib

    if impl in ("ours", LIBRARY_READER):
        def targets(node: Any) -> list[str]:
            if isinstance(node, dict):
                found = [node["target"]] if isinstance(node.get("target"), str) else []
                return found + [t for value in node.values() for t in targets(value)]
            return []

        for target in targets(original_config(config_path)):
            importlib.import_module(target.rpartition(".")[0])
    else:
        import diffusers
        import transformers
        from diffusers.loaders import single_file_utils  # noqa: F401

        for cls in (diffusers.UNet2DConditionModel, diffusers.AutoencoderKL, diffusers.StableDiffusionPipeline,
                    transformers.CLIPTextModel):
            assert cls is not None


def worker(job: dict[str, Any]) -> dict[str, Any]:
    """One measurement in this fresh process (`--worker`): 'load' or 'render'."""
    torch.set_num_threads(job["threads"])
    device = torch.device(job["device"])
    config_path, checkpoint = Path(job["config"]), Path(job["checkpoint"])
    import_code_of(job["impl"], config_path)
    rss_before = _status_kib("VmRSS")
    reset = _reset_peak_rss()
    start = time.perf_counter()
    loaded = load_for(job["impl"], checkpoint, config_path, job["resolution"] // 8)
    seconds = time.perf_counter() - start
    result: dict[str, Any] = {"seconds": seconds, "rss_before_mib": rss_before / 1024,
                              "peak_rss_mib": _status_kib("VmHWM") / 1024, "peak_is_of_load": reset}
    if job["kind"] == "decode":
        result.update(decode_once(job["impl"], loaded, job["resolution"], job["tiled"], device))
    if job["kind"] == "render":
        result["peak_rss_process_mib"] = result.pop("peak_rss_mib")
        if job["impl"] == "ours" and job["lowvram"]:
            enable_offload(loaded, device)
            model = loaded
        elif job["impl"] == "ours":
            model = loaded.to(device)
            if job.get("accel", True):
                accel.optimize(model, device)
        else:
            model = build_pipeline(loaded, device)
        rss_loaded = _status_kib("VmRSS")
        _reset_peak_rss()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        render_once(job["impl"], model, job["resolution"], job["steps"], device)
        result.update(rss_loaded_mib=rss_loaded / 1024, peak_rss_render_mib=_status_kib("VmHWM") / 1024,
                      peak_rss_process_mib=max(result["peak_rss_process_mib"], _status_kib("VmHWM") / 1024))
        if device.type == "cuda":
            result["max_memory_allocated_mib"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
    return result


TILE_LATENT, TILE_OVERLAP = 64, 16  # 512-pixel tiles overlapping by a quarter: diffusers' default for SD v1


@torch.no_grad()
def decode_once(impl: str, loaded: Any, resolution: int, tiled: bool, device: torch.device) -> dict[str, float]:
    """Decode one random `resolution`² latent (tile by tile if `tiled`, with the same tiles in both
    implementations); the time and the memory the decode adds (RSS high-water mark, CUDA: allocated)."""
    if impl == "ours":
        vae = loaded.first_stage_model.to(device)
        if tiled:
            vae.enable_tiling(TILE_LATENT, TILE_OVERLAP)
    else:
        vae = loaded[1].to(device)
        if tiled:
            vae.enable_tiling()
            vae.tile_sample_min_size, vae.tile_latent_min_size = TILE_LATENT * 8, TILE_LATENT
            vae.tile_overlap_factor = TILE_OVERLAP / TILE_LATENT
    z = torch.randn(1, 4, resolution // 8, resolution // 8, generator=torch.Generator().manual_seed(3)).to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        _reset_peak_rss()
        before = _status_kib("VmRSS") * 1024
    start = time.perf_counter()
    vae.decode(z) if impl == "ours" else vae.decode(z).sample
    synchronize(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _status_kib("VmHWM") * 1024
    return {"decode_seconds": seconds, "decode_peak_increase_mib": (peak - before) / 2 ** 20}


def build_pipeline(parts: tuple[torch.nn.Module, ...], device: torch.device) -> Any:
    import diffusers

    unet, vae, text_encoder = parts
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                        beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                                        steps_offset=1, timestep_spacing="leading")
    pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=None, unet=unet,
                                             scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def render_once(impl: str, model: Any, resolution: int, steps: int, device: torch.device) -> None:
    latent = resolution // 8
    x_T = torch.randn(1, 4, latent, latent, generator=torch.Generator().manual_seed(2)).to(device)
    if impl == "ours":
        c, uc = model.get_learned_conditioning([PROMPT]), model.get_learned_conditioning([""])
        z, _ = DDIMSampler(model).sample(steps, 1, (4, latent, latent), c, unconditional_guidance_scale=GUIDANCE,
                                         unconditional_conditioning=uc, x_T=x_T, eta=0.0, verbose=False)
        model.decode_first_stage(z)
    else:
        ids = torch.zeros(1, 77, dtype=torch.long, device=device)  # the token ids do not change the memory
        c = model.text_encoder(ids)[0]
        model(prompt_embeds=c, negative_prompt_embeds=c, num_inference_steps=steps, guidance_scale=GUIDANCE,
              latents=x_T, height=resolution, width=resolution, output_type="pt")


def run_worker(job: dict[str, Any], script: Path = Path(__file__).resolve()) -> dict[str, Any]:
    command = [sys.executable, str(script), "--worker", json.dumps(job)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"worker {job['kind']}/{job['impl']} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def load_rows(paths: dict[str, Path], config_path: Path, args: argparse.Namespace, weights_mib: float
              ) -> list[dict[str, Any]]:
    rows = []
    for fmt, path in paths.items():
        impls = IMPLEMENTATIONS + ((LIBRARY_READER,) if fmt == "safetensors" else ())
        results: dict[str, list[dict[str, Any]]] = {impl: [] for impl in impls}
        for _ in range(args.load_repeats):
            for impl in impls:
                results[impl].append(run_worker({"kind": "load", "impl": impl, "checkpoint": str(path),
                                                 "config": str(config_path), "device": "cpu",
                                                 "resolution": args.resolution, "threads": args.threads}))
        rows.append({"measure": f"load .{fmt}", "weights_mib": weights_mib,
                     **{impl: [r["seconds"] for r in results[impl]] for impl in impls},
                     "peak_rss_increase_mib": {impl: max(r["peak_rss_mib"] - r["rss_before_mib"]
                                                         for r in results[impl]) for impl in impls}})
    return rows


def memory_row(paths: dict[str, Path], config_path: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Peak memory of a fresh process that loads the checkpoint and renders one image: ours and diffusers from
    the `.safetensors`, and with `--original` the original code from the `.ckpt` (the format it reads)."""
    job = {"kind": "render", "config": str(config_path), "device": args.device, "resolution": args.resolution,
           "steps": args.memory_steps, "lowvram": args.lowvram, "threads": args.threads, "accel": not args.no_accel}
    results = {impl: run_worker({**job, "impl": impl, "checkpoint": str(paths["safetensors"])})
               for impl in IMPLEMENTATIONS}
    if args.original is not None:
        results["original"] = run_worker({**job, "impl": "original", "original": str(args.original),
                                          "checkpoint": str(paths["ckpt"])}, ORIGINAL_WORKER)
    return {"measure": f"txt2img peak memory {args.memory_steps} step(s){' lowvram' if args.lowvram else ''}"
                       f"{_plain_label(args)}",
            "resolution": args.resolution, "batch": 1, **results}


def tiled_decode_row(path: Path, config_path: Path, args: argparse.Namespace) -> dict[str, Any]:
    """A `--tiled_decode_resolution`² latent decoded tile by tile by ours and by diffusers, and whole by ours
    (the memory the tiling saves), each in a fresh process."""
    job = {"kind": "decode", "checkpoint": str(path), "config": str(config_path), "device": args.device,
           "resolution": args.tiled_decode_resolution, "threads": args.threads}
    results = {name: run_worker({**job, "impl": impl, "tiled": tiled})
               for name, impl, tiled in (("ours", "ours", True), ("diffusers", "diffusers", True),
                                         ("ours_whole", "ours", False))}
    return {"measure": "VAE decode, tiled", "resolution": args.tiled_decode_resolution, "batch": 1,
            **{name: [results[name]["decode_seconds"]] for name in IMPLEMENTATIONS},
            "peak_increase_mib": {name: result["decode_peak_increase_mib"] for name, result in results.items()}}


# --- report --------------------------------------------------------------------------------------------------

def median(values: list[float]) -> float:
    return statistics.median(values)


def paired_ratio(row: dict[str, Any], ours: str = "ours") -> float:
    """The median over the repeats of ours / diffusers, each pair measured back to back: the speed of a shared
    machine drifts within a run, and the drift cancels within a pair."""
    return median([mine / theirs for mine, theirs in zip(row[ours], row["diffusers"])])


def table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'measure':<34} {'size':>9} {'ours':>10} {'diffusers':>10} {'ratio':>7}  notes",
             "-" * 90]
    for row in rows:
        size = f"{row['resolution']}x{row['batch']}" if "resolution" in row else ""
        if isinstance(row.get("ours"), list):
            ours, theirs = median(row["ours"]), median(row["diffusers"])
            note = _note(row)
            lines.append(f"{row['measure']:<34} {size:>9} {ours:>9.3f}s {theirs:>9.3f}s {paired_ratio(row):>7.2f}  "
                         f"{note}")
        else:
            key = "max_memory_allocated_mib" if "max_memory_allocated_mib" in row["ours"] else "peak_rss_process_mib"
            ours, theirs = row["ours"][key], row["diffusers"][key]
            note = (f"{key}; render only: {row['ours'].get('peak_rss_render_mib', 0):.0f} / "
                    f"{row['diffusers'].get('peak_rss_render_mib', 0):.0f} MiB")
            if "original" in row:
                note += f"; original {row['original'][key]:.0f} MiB, ours {ours / row['original'][key]:.2f}x"
            lines.append(f"{row['measure']:<34} {size:>9} {ours:>7.0f}MiB {theirs:>7.0f}MiB {ours / theirs:>7.2f}  "
                         f"{note}")
    return "\n".join(lines)


def _note(row: dict[str, Any]) -> str:
    if "relative_difference" in row:
        plain = f"; without accel {paired_ratio(row, PLAIN):.2f}" if PLAIN in row else ""
        return f"rel. diff {row['relative_difference']:.1e}{plain}"
    if "peak_increase_mib" in row:
        peak = row["peak_increase_mib"]
        return f"peak +{peak['ours']:.0f}/+{peak['diffusers']:.0f} MiB (ours untiled +{peak['ours_whole']:.0f} MiB)"
    peak = row["peak_rss_increase_mib"]
    note = f"peak RSS +{peak['ours']:.0f}/+{peak['diffusers']:.0f} MiB of {row['weights_mib']:.0f} MiB weights"
    if LIBRARY_READER in row:
        note += (f"; safetensors load_file {median(row[LIBRARY_READER]):.3f}s, ldm.safetensors_mmap / it "
                 f"{mapped_over_library(row):.2f}")
    return note


def mapped_over_library(row: dict[str, Any]) -> float:
    """Median over the repeats of ours (ldm.safetensors_mmap) / ours reading with the safetensors package."""
    return median([mine / library for mine, library in zip(row["ours"], row[LIBRARY_READER])])


def environment(device: torch.device, threads: int) -> dict[str, Any]:
    import platform

    import diffusers
    import transformers

    info = {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "device": str(device), "threads": threads,
            "cpu": _cpu_name(), "cpu_bf16": cpu_has_bf16(),
            "accelerate": _has_module("accelerate")}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _cpu_name() -> str:
    try:
        match = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text())
        return match.group(1) if match else "unknown"
    except OSError:
        return "unknown"


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--dtypes", default=None, help="comma-separated, of fp32, bf16, fp16 (default: fp32,bf16 on "
                                                      "the CPU, fp32,fp16 on CUDA)")
    parser.add_argument("--resolution", type=int, default=512, help="image side in pixels (latent side x 8)")
    parser.add_argument("--bf16_resolution", type=int, default=None,
                        help="resolution of the bf16 UNet comparison (default: --resolution, or 128 on a CPU "
                             "without bf16 instructions, where diffusers takes minutes per 512x512 step)")
    parser.add_argument("--batch", type=int, default=2, help="UNet batch (2 = one image with guidance)")
    parser.add_argument("--no_accel", action="store_true",
                        help="measure our model's plain layers only (by default the UNet and txt2img rows time "
                             "them beside the accelerated ones)")
    parser.add_argument("--distinct_latents", action="store_true",
                        help="draw every latent of the UNet batch (default: an even batch is a guided step's, each "
                             "latent twice under two contexts, as the samplers call the UNet)")
    parser.add_argument("--steps", type=int, default=2, help="DDIM steps of the txt2img measurement")
    parser.add_argument("--memory_steps", type=int, default=1, help="DDIM steps of the peak-memory render")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--e2e_repeats", type=int, default=2, help="repeats of the txt2img measurement")
    parser.add_argument("--load_repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--ckpt", type=Path, default=None, help="a real checkpoint instead of random weights")
    parser.add_argument("--tiny", action="store_true", help="the tiny test model (tests/configs/tiny-sd.yaml)")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: unet, txt2img, load, memory")
    parser.add_argument("--compile", action="store_true",
                        help="our UNet through torch.compile (the txt2img --compile flag); diffusers stays eager")
    parser.add_argument("--lowvram", action="store_true",
                        help="our peak-memory render with the txt2img --lowvram offloading (parts visit the device "
                             "one at a time); diffusers keeps its whole pipeline on the device")
    parser.add_argument("--tiled_decode_resolution", type=int, default=0,
                        help="also decode one latent of this image size tile by tile (ours and diffusers) and "
                             "untiled (ours), e.g. 1024; slow on a CPU, so off by default")
    parser.add_argument("--original", type=Path, default=None,
                        help="a folder holding the original `ldm` package (a CompVis/stable-diffusion checkout, or "
                             "`pip install --no-deps --target DIR stable-diffusion-sdkit`): the memory row then "
                             "also measures the original code")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.original is not None and not (args.original / "ldm").is_dir():
        parser.exit(2, f"error: --original {args.original} holds no `ldm` folder; give the folder that holds the "
                       "original `ldm` package\n")
    return args


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    if args.worker is not None:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtypes = (args.dtypes or ("fp32,fp16" if device.type == "cuda" else "fp32,bf16")).split(",")
    skip = set(filter(None, args.skip.split(",")))
    config_path = TINY_CONFIG if args.tiny else FULL_CONFIG
    bf16_resolution = args.bf16_resolution or (args.resolution if device.type == "cuda" or cpu_has_bf16() else
                                               min(args.resolution, 128))
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="sd-benchmark-") as folder:
        if args.ckpt is not None:
            model = load_model_from_config(config_path, args.ckpt)
        else:
            model = build_random_model(config_path)
        weights_mib = sum(v.numel() * v.element_size() for v in model.state_dict().values()) / 2 ** 20
        paths = (write_checkpoints(model, Path(folder)) if {"load", "memory"} - skip or args.tiled_decode_resolution
                 else {})
        model.to(device)
        if "unet" not in skip:
            for name in dtypes:
                resolution = bf16_resolution if name == "bf16" else args.resolution
                rows.append(unet_step_rows(model, config_path, name, resolution, args.batch, args, device))
                print(table(rows[-1:]), flush=True)
        if "txt2img" not in skip:
            if args.compile:
                model.model.diffusion_model.compile()
            rows.append(txt2img_row(model, config_path, args.resolution, args.steps, args, device))
            print(table(rows[-1:]), flush=True)
        del model
        if "load" not in skip:
            rows.extend(load_rows(paths, config_path, args, weights_mib))
        if "memory" not in skip:
            rows.append(memory_row(paths, config_path, args))
        if args.tiled_decode_resolution:
            rows.append(tiled_decode_row(paths["safetensors"], config_path, args))
    for row in rows:
        if isinstance(row.get("ours"), list):
            row["ratio"] = paired_ratio(row)
            if PLAIN in row:
                row["ratio_no_accel"] = paired_ratio(row, PLAIN)
            if LIBRARY_READER in row:
                row["ratio_mmap_to_load_file"] = mapped_over_library(row)
    report = {"environment": environment(device, args.threads), "rows": rows}
    print()
    print(json.dumps(report["environment"]))
    print(table(rows))
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
