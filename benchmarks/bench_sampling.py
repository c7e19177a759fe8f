"""The whole model: the ADM U-Net forward, one-step and two-step sampling at ImageNet-64 (cd_imagenet64_l2's
architecture), and one-step sampling at LSUN-256 (ct_bedroom256's), with random weights (every parameter drawn,
none left at zero), the same weights in every provider.

unet_forward providers: cmfast (as cmfast.load / cmfast.swap give it: backends, convolutions and memory layout chosen
by measurement, cmfast.tuning), cmfast-channels-last (the layout forced), cmfast-reference (the same U-Net
with the reference backend forced for every op: the reference-style eager model), on a GPU cmfast-cuda-graph (the
channels_last forward captured once in a CUDA graph and replayed: no launch overhead), diffusers (UNet2DModel), and
convs-only: the U-Net's convolutions alone, each run on an input of the shape it gets in the forward, one after the
other, so the time the rest of the model adds (norms, attention, elementwise ops, copies) is the difference.
sample_1step / sample_2step providers: cmfast (cmfast.sample with a Denoiser), cmfast-swapped-pipeline
(cmfast.swap(pipe): ConsistencyModelPipeline's call run by cmfast's sampler), on a GPU cmfast-cuda-graph (the same
with Denoiser(unet, cuda_graph=True): each network call replayed from a CUDA graph), diffusers-pipeline
(ConsistencyModelPipeline, num_inference_steps=1 / timesteps=[22, 0], output_type="pt"), and
diffusers-pipeline+cmfast (that pipeline with its unet swapped for cmfast.swap(unet)).
With --compile: cmfast-compile and diffusers-compile (torch.compile of each U-Net, reused by the samplers). On this
CPU class that costs minutes of cold compile per model and batch, hence opt-in.

Work: FLOPs of one forward counted once per model (convolutions and linears by torch's FlopCounterMode, attention
as 4 B C T^2 from each attention block's input), times the network calls. Reported as TFLOP/s and the fraction of the
dense FLOP/s of the dtype (a large matmul or 3x3 convolution, the faster). On a GPU, half dtypes run cmfast in the
reference's mixed mode (block convolutions in the dtype, embeddings and head in fp32) and diffusers' UNet2DModel
wholly in the dtype.
usage: python -m benchmarks.bench_sampling [runner options] (see python -m benchmarks --help)
"""

from __future__ import annotations

import contextlib
import copy
import gc
import importlib.util
import math
import os
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

import cmfast
from cmfast.models import PRESETS
from cmfast.models.unet import AttentionBlock

NAME = "sampling"
BENCHMARKS = ("unet_forward", "sample_1step", "sample_2step")
PEERS = ("cmfast-reference", "diffusers", "diffusers-channels-last", "diffusers-autocast-channels-last",
         "diffusers-compile", "diffusers-compile-max-autotune-no-cudagraphs", "diffusers-compile-reduce-overhead",
         "diffusers-cudnn-benchmark", "diffusers-pipeline", "diffusers-pipeline-channels-last", "diffusers-pipeline-compile")
# preset -> the diffusers scheduler's num_train_timesteps (docs/model.md section 2) and the two-step schedule
IMAGENET = ("cd_imagenet64_l2", 40, [22, 0])
LSUN = ("ct_bedroom256", 151, None)
QUICK_IMAGENET = ("test_imagenet", 40, [22, 0])
QUICK_LSUN = ("test_lsun", 40, None)
TWO_STEP_SIGMAS = [80.0, 1.3824]  # cd_imagenet64's tuned schedule, ts = 0, 22, 39 on the 40-point grid


def has_diffusers() -> bool:
    return importlib.util.find_spec("diffusers") is not None


def _random_cmfast_unet(preset: str, device, dtype) -> cmfast.UNet:
    """Without diffusers: a cmfast U-Net whose every parameter is drawn (none left at zero)."""
    unet = cmfast.UNet(PRESETS[preset].unet)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in unet.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) / (p[0].numel() ** 0.5 if p.dim() > 1 else 10))
    unet = unet.to(device).eval()
    return unet.set_precision({torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, "fp32"))


@dataclass
class Models:
    """One architecture with one set of random weights, as every provider needs it."""

    preset: str
    image_size: int
    num_classes: int | None
    unet: cmfast.UNet
    diffusers: object = None  # UNet2DModel
    pipe: object = None  # ConsistencyModelPipeline around it
    pipe_cmfast: object = None  # the same pipeline with cmfast.swap(unet) inside
    compiled: dict | None = None  # "cmfast-compile" / "diffusers-compile" -> torch.compile of that U-Net
    pipe_compiled: object = None  # the pipeline with the compiled UNet2DModel inside
    pipe_cl: object = None  # the pipeline with the channels_last UNet2DModel inside
    diffusers_cl: object = None  # a copy in channels_last (what a user tuning it on a CPU or GPU tries first)
    autocast: object = None  # for half dtypes: a float32 copy in channels_last, run under torch.autocast


def build(spec, session, dtype) -> Models:
    preset, train_steps, _ = spec
    config = PRESETS[preset].unet
    device = session.device
    dm = pipe = pipe_cmfast = None
    if has_diffusers():
        from diffusers import CMStochasticIterativeScheduler, ConsistencyModelPipeline

        from tests.reference_models import diffusers_unet

        dm = diffusers_unet(preset, torch.Generator().manual_seed(0)).to(device=device, dtype=dtype)
        wrapper = cmfast.swap(dm)
        unet = wrapper.unet

        def pipeline(model):
            scheduler = CMStochasticIterativeScheduler(num_train_timesteps=train_steps, sigma_min=0.002, sigma_max=80.0)
            p = ConsistencyModelPipeline(unet=dm, scheduler=scheduler)
            p.unet = model
            p.set_progress_bar_config(disable=True)
            return p

        pipe, pipe_cmfast = pipeline(dm), pipeline(wrapper)
    else:
        session.log("  diffusers is not installed: its providers are left out")
        unet = _random_cmfast_unet(preset, device, dtype)
    models = Models(preset, config.image_size, config.num_classes, unet, dm, pipe, pipe_cmfast)
    if dm is not None:
        models.diffusers_cl = copy.deepcopy(dm).to(memory_format=torch.channels_last)
        models.pipe_cl = pipeline(models.diffusers_cl)
        if dtype != torch.float32:
            models.autocast = copy.deepcopy(dm).float().to(memory_format=torch.channels_last)
    if session.compile_models and not session.quick:
        models.compiled = {"cmfast-compile": session.compile(unet)}
        if dm is not None:  # the channels_last copy: the faster layout eager, and what a tuned user compiles
            for mode in session.compile_modes:
                name = "diffusers-compile" if mode == "default" else f"diffusers-compile-{mode}"
                models.compiled[name] = session.compile(models.diffusers_cl, mode=mode)
            models.pipe_compiled = pipeline(models.compiled[next(k for k in models.compiled if k != "cmfast-compile")])
    return models


@dataclass
class Analysis:
    flop_per_image: float  # one forward
    conv_flop_per_image: float
    convs: list  # (module, input shape without the batch, dtype, channels_last) in call order


def analyse(models: Models, device) -> Analysis:
    """One instrumented forward at batch 1: its FLOPs and the convolutions it runs, with their inputs' shapes."""
    unet, convs, attention_flop = models.unet, [], [0]

    def on_conv(module, args):
        x = args[0]
        convs.append((module, tuple(x.shape[1:]), x.dtype,
                      x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()))

    def on_attention(module, args):
        x = args[0]
        attention_flop[0] += 4 * x.shape[0] * x.shape[1] * math.prod(x.shape[2:]) ** 2

    hooks = [m.register_forward_pre_hook(on_conv) for m in unet.modules() if isinstance(m, torch.nn.Conv2d)]
    hooks += [m.register_forward_pre_hook(on_attention) for m in unet.modules() if isinstance(m, AttentionBlock)]
    x, t, y = unet_inputs(models, 1, device)
    saved = os.environ.get(cmfast.tuning.TUNE_ENV)
    os.environ[cmfast.tuning.TUNE_ENV] = "0"  # plain convolutions, each counted once (a measurement runs several)
    try:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            unet(x, t, y)
    finally:
        for h in hooks:
            h.remove()
        if saved is None:
            os.environ.pop(cmfast.tuning.TUNE_ENV)
        else:
            os.environ[cmfast.tuning.TUNE_ENV] = saved
    counts = {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}
    conv = counts.get("aten.convolution", 0)
    return Analysis(counter.get_total_flops() + attention_flop[0], conv, convs)


def unet_inputs(models: Models, batch: int, device):
    """x (fp32), per-sample network times and labels (None for unconditional models)."""
    gen = torch.Generator().manual_seed(batch)
    size = models.image_size
    x = torch.randn(batch, 3, size, size, generator=gen).to(device)
    t = (250 * torch.log(torch.rand(batch, generator=gen) * 80 + 0.002)).to(device)
    y = None if models.num_classes is None else torch.randint(models.num_classes, (batch,), generator=gen).to(device)
    return x, t, y


def convs_only(analysis: Analysis, batch: int, device):
    """A call that runs every convolution of the forward once, on an input of the shape it gets there."""
    inputs = {}
    plan = []
    for module, shape, dtype, channels_last in analysis.convs:
        key = (shape, dtype, channels_last)
        if key not in inputs:
            x = torch.randn((batch, *shape), device=device, dtype=dtype)
            inputs[key] = x.contiguous(memory_format=torch.channels_last) if channels_last else x
        plan.append((module, inputs[key]))

    @torch.no_grad()
    def run():
        for module, x in plan:
            module(x)

    return run


def cuda_graph(fn, device):
    """`fn` (fixed inputs) captured in a CUDA graph after warm-up calls on a side stream; returns its replay."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream), torch.no_grad():
        for _ in range(3):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        fn()
    return graph.replay


def _backends_note(session) -> str:
    from cmfast._extension import status

    # a stale or missing build leaves cmfast on its torch paths: rows that must not pass for the compiled ones
    off = "" if status.loaded else f"; compiled kernels off: {status.reason}"
    if cmfast.tuning.enabled():
        return "choices by measurement (cmfast.tuning, recorded in this run's cache)" + off
    return " ".join(f"{op}={session.default_backend(op)}" for op in ("group_norm", "attention", "consistency")) + off


def unet_forward(session, models: Models, analysis: Analysis, batch: int, dtype) -> None:
    """Each U-Net called as its own sampler calls it (so a compiled U-Net serves both without a recompile): cmfast
    with fp32 x and per-sample times, as the Denoiser does; diffusers with x in its dtype and one 0-dim float64
    time, as ConsistencyModelPipeline does."""
    device = session.device
    x, t, y = unet_inputs(models, batch, device)
    x_model, t_model = x.to(dtype), t[0].double()
    unet, dm = models.unet, models.diffusers
    shape = f"{models.preset}:{batch}x3x{models.image_size}x{models.image_size}"
    flop = analysis.flop_per_image * batch

    entries = []  # (provider, call, note, context)

    def add(provider, fn, note="", context=None):
        entries.append((provider, torch.no_grad()(fn), note, context))

    add("cmfast", lambda: unet(x, t, y), _backends_note(session))
    # forced on the thread that times, around each call
    add("cmfast-reference", lambda: unet(x, t, y), "every op on its reference backend",
        lambda: cmfast.use_backend("reference"))
    add("cmfast-channels-last", lambda: unet(x, t, y), _backends_note(session), lambda: _layout(unet, True))
    if session.gpu:
        try:
            with _layout(unet, True):
                replay = cuda_graph(lambda: unet(x, t, y), device)
        except Exception as e:  # noqa: BLE001  (an op that cannot be captured: logged, the suite goes on)
            session.failures.append(f"unet_forward cmfast-cuda-graph {shape}: {type(e).__name__}: {e}")
            session.log(f"FAILED cmfast-cuda-graph: {type(e).__name__}: {str(e)[:300]}")
        else:
            add("cmfast-cuda-graph", replay, "channels_last forward captured once in a CUDA graph, replayed; "
                + _backends_note(session))
    if dm is not None:
        add("diffusers", lambda: dm(x_model, t_model, class_labels=y, return_dict=False)[0], "UNet2DModel")
        cl = models.diffusers_cl
        add("diffusers-channels-last", lambda: cl(x_model, t_model, class_labels=y, return_dict=False)[0],
            "UNet2DModel in channels_last")
        if session.gpu:  # cuDNN's autotuner, as a user tuning the peer on a GPU switches on
            add("diffusers-cudnn-benchmark", lambda: cl(x_model, t_model, class_labels=y, return_dict=False)[0],
                "UNet2DModel in channels_last, torch.backends.cudnn.benchmark = True", _cudnn_benchmark)
    if models.autocast is not None:
        def autocast_call(m=models.autocast):
            with torch.autocast(device.type, dtype=dtype):
                return m(x, t_model, class_labels=y, return_dict=False)[0]

        add("diffusers-autocast-channels-last", autocast_call,
            f"float32 UNet2DModel in channels_last under torch.autocast({dtype})")
    for provider, compiled in (models.compiled or {}).items():
        if provider.startswith("diffusers-compile"):
            add(provider, lambda c=compiled: c(x_model, t_model, class_labels=y, return_dict=False)[0],
                f"torch.compile(UNet2DModel in channels_last{provider.removeprefix('diffusers-compile')})")
        else:
            add(provider, lambda c=compiled: c(x, t, y), "torch.compile(cmfast.UNet)")
    session.record_row("unet_forward", entries, shape=shape, dtype=dtype, batch=batch, timing=session.model_timing,
                       flop=flop)
    del entries
    session.record("unet_forward", "convs-only", [convs_only(analysis, batch, device)], shape=shape, dtype=dtype,
                   batch=batch, timing=session.model_timing, flop=analysis.conv_flop_per_image * batch,
                   note=f"{len(analysis.convs)} convolutions: {analysis.conv_flop_per_image / 1e9:.1f} of "
                        f"{analysis.flop_per_image / 1e9:.1f} GFLOP/image")


@contextlib.contextmanager
def _layout(unet, channels_last):
    """The U-Net in a fixed layout for the calls inside, then as cmfast.load leaves it (the layout measured faster),
    its weights back in the layout they had: converted here, outside the timing, not in the next provider's call."""
    weights_cl = next(p for p in unet.parameters() if p.dim() == 4).is_contiguous(memory_format=torch.channels_last)
    unet.set_channels_last(channels_last)
    try:
        yield
    finally:
        unet.set_channels_last(weights_cl).set_channels_last(None)


@contextlib.contextmanager
def _cudnn_benchmark():
    saved = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = saved


def sample(session, models: Models, analysis: Analysis, batch: int, dtype, two_step: list | None) -> None:
    """sample_1step (two_step None) or sample_2step (two_step = the pipeline's timesteps)."""
    device = session.device
    benchmark = "sample_2step" if two_step else "sample_1step"
    sigmas = TWO_STEP_SIGMAS if two_step else [80.0]
    steps = {"timesteps": two_step, "num_inference_steps": None} if two_step else {"num_inference_steps": 1}
    size = models.image_size
    _, _, y = unet_inputs(models, batch, device)
    shape = f"{models.preset}:{batch}x3x{size}x{size}"
    flop = analysis.flop_per_image * batch * len(sigmas)
    gen = torch.Generator(device).manual_seed(0)

    def cmfast_call(unet, cuda_graph=False):
        denoiser = cmfast.Denoiser(unet, cuda_graph=cuda_graph)

        def run():
            x = 80.0 * torch.randn(batch, 3, size, size, device=device, generator=gen)
            return cmfast.sample(denoiser, x, sigmas, y=y, generator=gen)

        return run

    def pipe_call(pipe):
        return lambda: pipe(batch_size=batch, class_labels=y, generator=gen, output_type="pt", **steps).images

    # provider -> (call, note[, context])
    providers = {"cmfast": (cmfast_call(models.unet), _backends_note(session)),
                 "cmfast-channels-last": (cmfast_call(models.unet), _backends_note(session),
                                          lambda: _layout(models.unet, True))}
    if session.gpu:
        providers["cmfast-cuda-graph"] = (cmfast_call(models.unet, cuda_graph=True),
                                          "Denoiser(unet, cuda_graph=True); " + _backends_note(session))
    if models.pipe is not None:
        providers["diffusers-pipeline"] = (pipe_call(models.pipe), "ConsistencyModelPipeline")
        providers["diffusers-pipeline-channels-last"] = (pipe_call(models.pipe_cl), "its unet in channels_last")
        providers["diffusers-pipeline+cmfast"] = (pipe_call(models.pipe_cmfast), "its unet = cmfast.swap(unet)")
        providers["cmfast-swapped-pipeline"] = (pipe_call(cmfast.swap(models.pipe_cmfast)),
                                                "cmfast.swap(pipe): the pipeline's call, cmfast's sampler loop")
    if models.compiled:
        providers["cmfast-compile"] = (cmfast_call(models.compiled["cmfast-compile"]), "Denoiser(torch.compile(unet))")
    if models.pipe_compiled is not None:
        providers["diffusers-pipeline-compile"] = (pipe_call(models.pipe_compiled), "pipe.unet = torch.compile(unet)")
    entries = [(provider, fn, note, context[0] if context else None)
               for provider, (fn, note, *context) in providers.items()]
    session.record_row(benchmark, entries, shape=shape, dtype=dtype, batch=batch, timing=session.model_timing,
                       flop=flop)


def run(session) -> None:
    session.peers.update({b: PEERS for b in BENCHMARKS})
    imagenet, lsun = (QUICK_IMAGENET, QUICK_LSUN) if session.quick else (IMAGENET, LSUN)
    lsun_batches = session.batches if session.gpu else session.batches[:1]  # minutes per call on a CPU
    for dtype in session.dtypes:
        plan = {"imagenet64": (imagenet, session.batches, ("unet_forward", "sample_1step", "sample_2step")),
                "lsun256": (lsun, lsun_batches, ("sample_1step",))}
        for spec, batches, benchmarks in (plan[m] for m in session.models):
            session.log(f"building {spec[0]} ({dtype}) with random weights")
            models = build(spec, session, dtype)
            analysis = analyse(models, session.device)
            session.log(f"  {spec[0]}: {analysis.flop_per_image / 1e9:.1f} GFLOP per image per forward, "
                        f"{analysis.conv_flop_per_image / 1e9:.1f} in {len(analysis.convs)} convolutions")
            for batch in batches:
                try:
                    if "unet_forward" in benchmarks:
                        unet_forward(session, models, analysis, batch, dtype)
                    if "sample_1step" in benchmarks:
                        sample(session, models, analysis, batch, dtype, None)
                    if "sample_2step" in benchmarks:
                        sample(session, models, analysis, batch, dtype, spec[2])
                except torch.cuda.OutOfMemoryError as e:  # a batch too large for the GPU: the next model goes on
                    session.failures.append(f"{spec[0]} batch {batch} {dtype}: out of memory ({str(e)[:120]})")
                    session.log(f"FAILED {spec[0]} batch {batch}: out of memory; larger batches skipped")
                    torch.cuda.empty_cache()
                    break
            del models, analysis
            gc.collect()
            if session.gpu:
                torch.cuda.empty_cache()


if __name__ == "__main__":
    from .run import main

    main(names=[NAME], prog="python -m benchmarks.bench_sampling")
