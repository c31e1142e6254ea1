"""The run's Config: one dataclass per component, each with its validation. Named presets live in
``fastbyol.presets``, the preset + YAML + ``key=value`` building in ``fastbyol.config_parse``, and the check
helpers with ``ConfigError`` in ``fastbyol.config_checks``.

Each section validates itself (``validate``) with messages that name the key and what it accepts, so a bad
value fails before any work is done; ``Config.validate`` adds the checks that span sections. A choice field
is typed ``Literal[...]``: the type is the one list of its values. Whether a key may change when a run
resumes is metadata on its field (``RESUMABLE``). The resolved config is written to the run directory.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import yaml

from fastbyol.config_checks import (
    ConfigError,
    check_choices,
    check_wandb,
    choice,
    in_range,
    non_negative_int,
    parse_profile_window,
    positive_int,
    raise_all,
)
from fastbyol.config_traits import METHODS, OPTIMIZERS, method_traits, supporting

IMAGENET_TRAIN_IMAGES = 1_281_167

ARCHS = (
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnet200",
    "wide_resnet50_2", "wide_resnet101_2",
)
"""The torchvision encoders; ``timm:<name>`` takes any model of timm (``TIMM_PREFIX``)."""
TIMM_PREFIX = "timm:"
CUSTOM_PREFIX = "custom:"
"""``custom:<module>.<qualname>``: an encoder given to ``fastbyol.train(model=...)``, which the config cannot
rebuild (``fastbyol.model.backbone.custom_arch``)."""
Init = Literal["haiku", "torchvision"]
INITS: tuple[str, ...] = get_args(Init)
"""Encoder initialisations (``fastbyol.model.backbone.Encoder``)."""
Padding = Literal["torch", "same"]
PADDINGS: tuple[str, ...] = get_args(Padding)
"""How a ResNet pads its stride-2 windows (``fastbyol.model.backbone``)."""
OFFICIAL_SHORTCUT_ARCHS = ("resnet18", "resnet34")
"""The basic-block ResNets: with init=haiku they are the official code's ResNet18/34, whose first block (layer1[0])
has a 1x1 projection shortcut with its BatchNorm, which torchvision's lack (``fastbyol.model.backbone``)."""
OnOffAuto = Literal["auto", "on", "off"]
BUILTIN_METHODS = tuple(METHODS)
"""The methods fastbyol has; ``method=custom:<module>.<Class>`` names one of the user's (``check_method``)."""

RESUMABLE = {"resumable": True}
"""Field metadata: a resumed run may change this key (its math does not depend on it)."""


def resumable(default: Any) -> Any:
    """A field a resumed run may change (``--resume DIR key=value``)."""
    if isinstance(default, list):  # a mutable default: each Config gets its own copy
        return field(default_factory=lambda: list(default), metadata=RESUMABLE)
    return field(default=default, metadata=RESUMABLE)



@dataclass
class ModelConfig:
    arch: str = "resnet50"
    """Encoder: a torchvision ResNet (resnet18/34/50/101/152, resnet200 as in the paper's table,
    wide_resnet50_2/101_2), or timm:<name> for any timm model (e.g. timm:vit_small_patch16_224,
    timm:convnext_tiny; `python -c "import timm; print(timm.list_models())"` lists them), built without its
    classifier: its pooled features feed the projector. custom:<module>.<class> records a model given to the
    Python API (fastbyol.train(model=...)): only that model class can train or load such a run."""
    timm_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra arguments of timm.create_model for a timm:<name> arch, e.g. model.timm_kwargs.drop_path_rate=0.1
    (the ViT's img_size follows model.image_size)."""
    image_size: int = 0
    """Input side the encoder is built for (a ViT's img_size); 0: data.image_size (resolved when the config
    is validated)."""
    small_stem: bool = False
    """3x3 stride-1 first conv and no max-pool, for 32-64 px images (CIFAR-style stem)."""
    init: Init = "haiku"
    """Initialisation of a torchvision ResNet: 'haiku' (the official code's network as it starts: fan-in
    truncated normal convolutions, the last BatchNorm of each bottleneck block zero-initialised; resnet18/34 are
    the official ResNet18/34: a 1x1 projection shortcut in the first block, no zero-initialised BatchNorm) or
    'torchvision' (torchvision's network and default init: Kaiming fan-out, no zero-init residual; the demo
    presets' choice, benchmarks/NOTES.md issue 16). A timm model keeps timm's own initialisation."""
    padding: Padding = "torch"
    """How a ResNet pads its stride-2 windows (stem conv, max-pool, 3x3 and 1x1 convs): 'torch' (symmetric, as
    torchvision, so exports load into torchvision's ResNets) or 'same' (TF's padding='SAME', the official
    network's: the extra row and column go after, e.g. the stem on 224 px pads 2 before and 3 after; the max-pool
    pads with -inf). Stride-1 windows pad alike either way. Runs imported from the official code use 'same'."""
    proj_hidden: int = 4096
    """Hidden width of projector and predictor MLPs (spec: 4096)."""
    proj_dim: int = 256
    """Output width of projector and predictor (spec: 256)."""
    predictor: Literal["mlp", "directpred"] = "mlp"
    """BYOL's predictor: 'mlp' (the paper's, trained) or 'directpred' (Tian, Chen and Ganguli 2021: a linear map
    set every step from the online projections' correlation, not trained: W = U diag(sqrt(s / s_max) + eps) U^T
    of F = rho F + (1 - rho) E[z z^T]); one process only."""
    directpred_rho: float = 0.3
    """model.predictor=directpred: the correlation's decay per step (solo-learn's default 0.3)."""
    directpred_eps: float = 0.01
    """model.predictor=directpred: added to every direction's gain (solo-learn's default 0.01)."""
    bn_momentum: float = 0.1
    """BatchNorm momentum in PyTorch's convention (spec: decay 0.9 = momentum 0.1)."""
    bn_eps: float = 1e-5
    """BatchNorm epsilon (spec: 1e-5)."""
    target_init: Literal["independent", "copy"] = "independent"
    """'independent': target initialised from its own random draw, as the official code does; 'copy'."""
    channels_last: OnOffAuto = "auto"
    """'auto' (channels-last on CUDA), 'on' or 'off'."""
    online_probe: bool = False
    """Train a linear classifier on the stop-gradient online features of view 1 during pretraining, as
    the official code does (labels never reach the encoder); its accuracy is logged in metrics.jsonl."""


    def validate(self, prefix: str) -> None:
        check_choices(self, prefix)
        check_arch(f"{prefix}.arch", self.arch)
        if self.arch.startswith(TIMM_PREFIX) and self.small_stem:
            raise ConfigError(f"{prefix}.small_stem=true is for the torchvision ResNets: a timm model takes its "
                              f"own arguments (e.g. {prefix}.timm_kwargs.patch_size=4); set {prefix}.small_stem=false")
        if self.padding != "torch" and self.arch.startswith((TIMM_PREFIX, CUSTOM_PREFIX)):
            raise ConfigError(f"{prefix}.padding={self.padding} applies to the torchvision ResNets: {self.arch} pads "
                              f"as it is built; set {prefix}.padding=torch")
        if self.timm_kwargs and not self.arch.startswith(TIMM_PREFIX):
            raise ConfigError(f"{prefix}.timm_kwargs is set but {prefix}.arch={self.arch} is not a timm model: "
                              f"drop it, or use {prefix}.arch=timm:<name>")
        non_negative_int(f"{prefix}.image_size", self.image_size)
        in_range(f"{prefix}.directpred_rho", self.directpred_rho, 0.0, 1.0, "a float in [0, 1), e.g. 0.3",
                 low_ok=True, high_ok=False)
        in_range(f"{prefix}.directpred_eps", self.directpred_eps, -1.0, 1.0, "a float in (-1, 1], e.g. 0.01")
        positive_int(f"{prefix}.proj_hidden", self.proj_hidden)
        positive_int(f"{prefix}.proj_dim", self.proj_dim)
        in_range(f"{prefix}.bn_momentum", self.bn_momentum, 0.0, 1.0, "a float in (0, 1], e.g. 0.1")
        in_range(f"{prefix}.bn_eps", self.bn_eps, 0.0, 1.0, "a small positive float, e.g. 1e-5")


@dataclass
class DataConfig:
    source: Literal["folder", "shards", "procedural", "synthetic", "dataset"] = "folder"
    """'folder' (image folder at data.path), 'shards' (the tar shards `fastbyol data pack` wrote from an image
    folder into data.path: the folder's samples, order and labels, read with one pread each, for cluster file
    systems), 'procedural' (embedded drawn images, no download), 'synthetic' (random tensors made on the
    device, for throughput runs) or 'dataset' (a map-style torch Dataset given to the Python API,
    fastbyol.train(dataset=...); set by it)."""
    path: str = resumable("")
    """Image folder (sub-folders are classes) for source=folder, e.g. /data/imagenet/train; the folder of
    `fastbyol data pack` for source=shards, e.g. /data/imagenet/train-shards."""
    image_size: int = 224
    """Side of the square crops fed to the network; crop and blur taps scale with it."""
    num_images: int = 0
    """Images per epoch for procedural/synthetic sources (0: ImageNet's 1,281,167); source=dataset: the
    Dataset's length (set by fastbyol.train)."""
    num_classes: int = 10
    """Classes drawn by the procedural source; source=dataset: the labels' classes, for the online probe (set
    from the Dataset's ``classes`` where it has them)."""
    workers: int = resumable(8)
    """DataLoader worker processes for the torchvision pipeline (0: load in the main process), or DALI's
    CPU threads with data.loader=dali."""
    prefetch: int = resumable(4)
    """Batches each worker prepares ahead."""
    dali_decode: Literal["full", "roi"] = "full"
    """data.loader=dali: 'full' decodes each image once and cuts both views from it; 'roi' decodes only
    each view's crop (two partial decodes). 'full' measured faster on the CPU (benchmarks/NOTES.md)."""
    hw_decoder_load: float = 0.65
    """data.loader=dali on a GPU: share of each batch's JPEGs sent to the hardware JPEG decoder (where the
    GPU has one; the rest go to nvJPEG's CUDA decoder). DALI's default, 0.65, suits A100/H100."""
    file_list: str = ""
    """A clean list of the folder's images (``fastbyol data check DIR`` writes DIR/fastbyol-filelist.txt):
    the loaders read only those files, so an image found corrupt up front never reaches a run. Empty:
    scan data.path. source=folder only (shards take the list when packed: ``fastbyol data pack --file-list``)."""
    views: Literal["auto", "byol", "view1"] = "auto"
    """Augmentations of the two views: 'byol' (BYOL's asymmetric pair: view 1 always blurred, view 2 rarely
    blurred and sometimes solarised), 'view1' (BYOL's view 1 for both, SimCLR's default here), or 'auto'
    ('byol' for method=byol, 'view1' for method=simclr)."""
    colour_jitter: Literal["byol", "strong"] = "byol"
    """Colour jitter strength: 'byol' (the spec's: brightness and contrast 0.4, saturation 0.2, hue 0.1,
    grayscale p 0.2) or 'strong' (0.8, 0.8, 0.8, any hue, grayscale p 0.5; the shapes demo's)."""
    crop_area_min: float = 0.08
    """Smallest random crop, as a fraction of the image area (spec: 0.08)."""
    invert_p: float = 0.0
    """Probability of inverting each view (x -> 1 - x) after its other augmentations (spec: 0, not in the
    official code). For sets where which of foreground and background is brighter is fixed per image (the
    shapes), BYOL's own augmentations all keep that cue shared by the two views; inversion removes it."""
    resize: Literal["official", "pil"] = "pil"
    """Bicubic resize of each view's crop to data.image_size: 'official' (the official code's
    tf.image.resize(BICUBIC): TF's Keys cubic, A = -0.5, half-pixel centres, no antialiasing, on the float
    crop, overshoots clipped only after /255; sharper, aliased downscales; the paper presets') or 'pil'
    (PIL's bicubic on the uint8 crop, antialiased when shrinking). Both loaders follow it; evaluation
    (fastbyol eval) does not read it and keeps PIL's resize for its views."""
    loader: Literal["auto", "dali", "torch"] = "auto"
    """'dali' (decode and augment in DALI: on the GPU with one, CPU operators otherwise; image folders of
    JPEG, PNG, ..., or their shards), 'torch' (torchvision/PIL in DataLoader workers; any source), or 'auto'
    (DALI for a folder or shards on a GPU when DALI is installed, else torch)."""


    def validate(self, prefix: str) -> None:
        check_choices(self, prefix)
        in_range(f"{prefix}.crop_area_min", self.crop_area_min, 0.0, 1.0, "a fraction in (0, 1], e.g. 0.08")
        in_range(f"{prefix}.invert_p", self.invert_p, 0.0, 1.0, "a probability in [0, 1], e.g. 0.5", low_ok=True)
        if self.source == "folder" and not self.path:
            raise ConfigError(
                f"{prefix}.path is empty but {prefix}.source=folder: set {prefix}.path=/path/to/train_images "
                f"(sub-folders are classes), or {prefix}.source=procedural for the embedded images"
            )
        if self.source == "shards" and not self.path:
            raise ConfigError(
                f"{prefix}.path is empty but {prefix}.source=shards: set {prefix}.path=/path/to/shards (the "
                f"OUT_DIR of `fastbyol data pack SRC OUT_DIR`), or {prefix}.source=folder for a folder of images"
            )
        if self.source == "shards" and self.file_list:
            raise ConfigError(
                f"{prefix}.file_list applies to {prefix}.source=folder: for shards, unset it and pack the clean "
                "list instead (`fastbyol data pack SRC OUT_DIR --file-list LIST`)"
            )
        if not (16 <= self.image_size <= 1024):
            raise ConfigError(f"{prefix}.image_size={self.image_size} is out of range: use 16..1024 (e.g. 224)")
        non_negative_int(f"{prefix}.num_images", self.num_images)
        positive_int(f"{prefix}.num_classes", self.num_classes)
        non_negative_int(f"{prefix}.workers", self.workers)
        positive_int(f"{prefix}.prefetch", self.prefetch)
        in_range(f"{prefix}.hw_decoder_load", self.hw_decoder_load, 0.0, 1.0, "a share in [0, 1], e.g. 0.65",
                  low_ok=True)


OptimizerName = Literal["lars", "adamw", "sgd"]


@dataclass
class OptimConfig:
    batch_size: int = 4096
    """Global batch per optimizer step (the lr scales with batch_size / 256)."""
    accum_steps: int = 1
    """Micro-batches per optimizer step (gradient accumulation); batch_size must divide evenly."""
    base_lr: float = 0.2
    """Learning rate at batch 256; the peak lr is base_lr * batch_size / 256."""
    name: OptimizerName = "lars"
    """'lars' (the paper's: momentum and eta below), 'adamw' (the ViT recipes': torch's AdamW, fused on a
    GPU, betas and eps below), or 'sgd' (torch's SGD with the momentum below, no Nesterov: the small-batch
    recipes of SimSiam and the public BYOLs). Each leaves norms, biases, 1-d parameters and position/class
    tokens out of the weight decay."""
    weight_decay: float = 1.5e-6
    """Weight decay, not applied to biases and normalisation parameters (LARS: 1.5e-6; AdamW ViTs: ~0.1)."""
    momentum: float = 0.9
    """LARS's and SGD's momentum (no Nesterov, no dampening)."""
    eta: float = 1e-3
    """LARS trust coefficient."""
    adamw_beta1: float = 0.9
    """AdamW's first-moment decay (optim.name=adamw)."""
    adamw_beta2: float = 0.999
    """AdamW's second-moment decay (optim.name=adamw)."""
    adamw_eps: float = 1e-8
    """AdamW's epsilon (optim.name=adamw)."""
    warmup_epochs: float = 10.0
    """Linear lr warm-up from 0, in epochs."""


    def validate(self, prefix: str) -> None:
        check_choices(self, prefix)
        positive_int(f"{prefix}.batch_size", self.batch_size)
        positive_int(f"{prefix}.accum_steps", self.accum_steps)
        if self.batch_size % self.accum_steps:
            raise ConfigError(
                f"{prefix}.batch_size={self.batch_size} is not divisible by {prefix}.accum_steps="
                f"{self.accum_steps}: choose accum_steps that divides the batch"
            )
        in_range(f"{prefix}.base_lr", self.base_lr, 0.0, 100.0, "a positive float, e.g. 0.2")
        in_range(f"{prefix}.weight_decay", self.weight_decay, 0.0, 1.0, "a float in [0, 1), e.g. 1.5e-6",
                  low_ok=True)
        in_range(f"{prefix}.momentum", self.momentum, 0.0, 1.0, "a float in [0, 1), e.g. 0.9", low_ok=True,
                  high_ok=False)
        in_range(f"{prefix}.eta", self.eta, 0.0, 1.0, "a positive float, e.g. 1e-3")
        for beta in ("adamw_beta1", "adamw_beta2"):
            in_range(f"{prefix}.{beta}", getattr(self, beta), 0.0, 1.0, "a float in [0, 1), e.g. 0.9",
                      low_ok=True, high_ok=False)
        in_range(f"{prefix}.adamw_eps", self.adamw_eps, 0.0, 1.0, "a small positive float, e.g. 1e-8")
        in_range(f"{prefix}.warmup_epochs", self.warmup_epochs, 0.0, 1e6, "a float >= 0, e.g. 10", low_ok=True)


@dataclass
class ByolConfig:
    tau_base: float = 0.996
    """Target decay at step 0; it rises to 1 with a cosine over the run."""
    predictor_lr_mult: float = 1.0
    """The predictor's learning rate as a multiple of the rest's (1 in the paper). Tian, Chen and Ganguli
    (2021, arXiv 2102.06810, 'Understanding self-supervised learning dynamics without contrastive pairs')
    find a faster predictor keeps BYOL's weak feature directions from dying out. The fused LARS kernel and
    ZeRO apply one lr to every tensor: a value other than 1 needs run.kernels=off and run.engine=ddp."""


    def validate(self, prefix: str) -> None:
        in_range(f"{prefix}.tau_base", self.tau_base, 0.0, 1.0, "a float in [0, 1], e.g. 0.996", low_ok=True)
        in_range(f"{prefix}.predictor_lr_mult", self.predictor_lr_mult, 0.0, 1000.0, "a positive float, e.g. 10")


@dataclass
class SimclrConfig:
    """SimCLR (Chen et al. 2020, arXiv 2002.05709; the official ``simclr`` code), used with method=simclr."""

    temperature: float = 0.0
    """NT-Xent temperature; 0: auto, 0.1 for optim.batch_size >= 1024 and 0.5 below (the paper's best values
    for large batches, and the official CIFAR recipe's for small ones)."""
    proj_hidden: int = 2048
    """Hidden width of the projection head (official: the encoder's width, 2048 for ResNet-50)."""
    proj_dim: int = 128
    """Output width of the projection head, where NT-Xent compares the views (official: 128)."""


    def validate(self, prefix: str) -> None:
        in_range(f"{prefix}.temperature", self.temperature, 0.0, 100.0,
                  "a positive float, e.g. 0.1 (or 0 for auto)", low_ok=True)
        positive_int(f"{prefix}.proj_hidden", self.proj_hidden)
        positive_int(f"{prefix}.proj_dim", self.proj_dim)


@dataclass
class RunConfig:
    epochs: float = 1000.0
    """Length of the run: total steps = epochs * images_per_epoch // batch_size."""
    max_steps: int = resumable(0)
    """Stop after this many optimizer steps (0: run to the end); the schedules still span the full run."""
    seed: int = 0
    """Seeds model init, data order and augmentations."""
    device: Literal["auto", "cuda", "cpu"] = resumable("auto")
    """'auto' (CUDA when present), 'cuda' or 'cpu'."""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """'auto' (bf16 autocast on CUDA, fp32 on CPU), 'bf16' or 'fp32'."""
    log_every: int = resumable(50)
    """Write a metrics.jsonl row every this many optimizer steps."""
    ckpt_every: int = resumable(1000)
    """Write a checkpoint every this many optimizer steps (and always at the end)."""
    ckpt_minutes: float = resumable(0.0)
    """Also write a checkpoint when this many minutes have passed since the last one (0: off). Checked
    after every step in one process, at the log cadence across ranks (rank 0's clock decides)."""
    keep_last: int = resumable(3)
    """Checkpoints kept in the run directory (older ones are deleted)."""
    keep_epochs: list[float] = resumable([])
    """Epochs whose checkpoint is kept for good, beside run.keep_last's rolling ones, for learning curves
    (`fastbyol eval curve`): run.keep_epochs=1,3,10,30,100,200 writes <run dir>/checkpoints/epoch-<e>.pt at the
    first step that completes epoch e (a hard link to that step's checkpoint where the file system allows).
    Epochs past the end of the run are never reached."""
    out_dir: str = "runs"
    """Parent of run directories."""
    name: str = ""
    """Run directory name under out_dir (default: <preset>-<timestamp>)."""
    progress: OnOffAuto = resumable("auto")
    """Console progress bar: 'auto' or 'on' (redrawn in place on a terminal, one line per metrics row
    otherwise, as in CI logs), or 'off'."""
    kernels: OnOffAuto = resumable("auto")
    """Fused Triton kernels for the loss and for LARS with the target EMA in the same pass: 'auto' (on
    with a CUDA GPU), 'on' or 'off' (the plain-PyTorch reference path, for A/B runs)."""
    compile: Literal["auto", "off", "default", "max-autotune", "reduce-overhead"] = resumable("auto")
    """torch.compile of the forward and loss (fullgraph): 'auto' (default mode with a CUDA GPU, off on
    the CPU), 'default', 'max-autotune', 'reduce-overhead' (CUDA graphs; GPU only) or 'off' (eager)."""
    engine: Literal["auto", "ddp", "deepspeed"] = "auto"
    """Distribution: 'auto' (DDP when a launcher such as torchrun started several processes, one process
    otherwise), 'ddp', or 'deepspeed' (ZeRO sharding across nodes, started by the deepspeed launcher;
    see run.zero_stage). optim.batch_size is the global batch, split evenly over the ranks."""
    zero_stage: Literal[0, 1, 2, 3] = 0
    """DeepSpeed ZeRO stage with run.engine=deepspeed: 0 (plain data parallel), 1 (optimizer state
    sharded), 2 (and gradients), 3 (and parameters)."""
    nonfinite: Literal["stop", "skip"] = resumable("stop")
    """A step whose loss or gradients are not finite (checked on the device, read at the log cadence and
    before every checkpoint): 'stop' the run with a diagnostic (step, loss parts, largest gradient norms;
    no checkpoint is written after the bad step), or 'skip' it (the optimizer, the EMA and the BatchNorm
    statistics left as they were; costs a snapshot and an in-place select of the weights, momentum and
    statistics per step: 5 passes over ~390 MiB for ResNet-50, 99 ms on a 2-core CPU, benchmarks/NOTES.md)
    up to run.nonfinite_max_skips."""
    nonfinite_max_skips: int = resumable(20)
    """With run.nonfinite=skip: stop anyway once more steps than this have been skipped in the run."""
    telemetry: Literal["on", "off"] = resumable("on")
    """'on': per-phase step times (CUDA events, read at the log cadence), MFU, peak memory, and an NVML
    sampler thread per GPU (utilisation, power, energy, clocks, temperature, clock-event reasons, PCIe)
    written to metrics.jsonl and gpu_samples.jsonl; 'off': none of it (img/s and data wait stay)."""
    telemetry_hz: float = resumable(4.0)
    """NVML samples per second per GPU with run.telemetry=on (one PCIe read blocks NVML ~20 ms)."""
    peak_tflops: float = resumable(0.0)
    """The device's dense peak TFLOP/s for MFU at the run's precision; 0: the bf16 peak from fastbyol's
    table of GPUs (MFU is left out on a GPU or precision the table lacks, and on the CPU)."""
    tensorboard: bool = resumable(False)
    """Also write every metrics row to TensorBoard event files under <run dir>/tensorboard (needs the
    tensorboard package)."""
    profile: str = resumable("")
    """'A:B': a torch.profiler trace of optimizer steps A..B-1 under <run dir>/profile (Chrome trace JSON and
    a summary table), with the step's phases as named ranges; '' off. NVTX ranges for the phases are
    pushed whenever run.telemetry=on and a CUDA GPU is used (for nsys)."""
    wandb: str = resumable("")
    """Weights & Biases project: every metrics row, the resolved config and, when the run ends, the report's
    plots go to a W&B run (files under <run dir>/wandb; WANDB_MODE=offline works without network); a resumed
    run continues the same W&B run (its id is kept in <run dir>/wandb_id.txt). '' off. Needs the wandb
    package (pip install fastbyol[track])."""
    wandb_entity: str = resumable("")
    """W&B team or user that owns run.wandb's project ('': wandb's default entity)."""
    wandb_name: str = resumable("")
    """Display name of the W&B run ('': the run directory's name)."""
    wandb_tags: list[str] = resumable([])
    """Tags of the W&B run: run.wandb_tags=a,b on the command line, a list in YAML."""


    def validate(self, prefix: str) -> None:
        check_choices(self, prefix)
        in_range(f"{prefix}.epochs", self.epochs, 0.0, 1e6, "a positive number of epochs, e.g. 100")
        non_negative_int(f"{prefix}.max_steps", self.max_steps)
        non_negative_int(f"{prefix}.seed", self.seed)
        positive_int(f"{prefix}.log_every", self.log_every)
        positive_int(f"{prefix}.ckpt_every", self.ckpt_every)
        in_range(f"{prefix}.ckpt_minutes", self.ckpt_minutes, 0.0, 1e6, "minutes >= 0, e.g. 30 (0: off)",
                  low_ok=True)
        positive_int(f"{prefix}.keep_last", self.keep_last)
        for epoch in self.keep_epochs:
            if not (math.isfinite(epoch) and epoch > 0):
                raise ConfigError(f"{prefix}.keep_epochs has {epoch:g}: give positive epochs, e.g. "
                                  f"{prefix}.keep_epochs=1,3,10,30,100")
        if not self.out_dir:
            raise ConfigError(f"{prefix}.out_dir is empty: set {prefix}.out_dir=runs (or any writable folder)")
        if "/" in self.name or self.name in (".", ".."):
            raise ConfigError(f"{prefix}.name={self.name!r} must be a plain folder name (no '/'), "
                              f"e.g. {prefix}.name=r50-test")
        non_negative_int(f"{prefix}.nonfinite_max_skips", self.nonfinite_max_skips)
        if self.nonfinite == "skip" and self.engine == "deepspeed":
            raise ConfigError(f"{prefix}.nonfinite=skip is not supported with {prefix}.engine=deepspeed (its sharded "
                              f"optimizer state is not snapshotted): use {prefix}.nonfinite=stop")
        in_range(f"{prefix}.telemetry_hz", self.telemetry_hz, 0.0, 100.0, "samples per second in (0, 100], e.g. 4")
        in_range(f"{prefix}.peak_tflops", self.peak_tflops, 0.0, 1e6, "the device's peak TFLOP/s, or 0 for the table",
                  low_ok=True)
        if self.profile:
            parse_profile_window(self.profile)
        check_wandb(prefix, self.wandb, self.wandb_entity, self.wandb_tags)
        if self.zero_stage and self.engine != "deepspeed":
            raise ConfigError(f"{prefix}.zero_stage={self.zero_stage} needs {prefix}.engine=deepspeed (ZeRO is "
                              f"DeepSpeed's): add {prefix}.engine=deepspeed, or set {prefix}.zero_stage=0")


@dataclass
class Config:
    """A whole run. Sections are the component configs; ``preset`` records where it started."""

    preset: str = "byol-r50-1000ep"
    method: str = "byol"
    """'byol', 'simclr' (the contrastive baseline on the same engine: one network, NT-Xent with negatives
    from the global batch, no target, no EMA; settings in the simclr section), or custom:<module>.<Class>: a
    method of your own (``fastbyol.step.methods.Method``), built as Class(cfg, losses) from an importable
    module; it reads the model, data, optim and run sections."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    byol: ByolConfig = field(default_factory=ByolConfig)
    simclr: SimclrConfig = field(default_factory=SimclrConfig)
    run: RunConfig = field(default_factory=RunConfig)

    # -- derived quantities (the schedules and the loop read these) --------------------------------
    def total_steps(self, images_per_epoch: int) -> int:
        """``epochs * N // batch_size``, as the official code counts (the stream crosses epochs)."""
        return max(1, int(self.run.epochs * images_per_epoch) // self.optim.batch_size)

    def nt_xent_temperature(self) -> float:
        """simclr.temperature, with 0 resolved by the global batch (0.1 from 1024 up, 0.5 below)."""
        t = self.simclr.temperature
        return t if t > 0 else (0.1 if self.optim.batch_size >= 1024 else 0.5)

    def predictor_lr_mult(self) -> float:
        """The predictor's multiple of the lr (byol.predictor_lr_mult; 1 for a method without a predictor)."""
        return self.byol.predictor_lr_mult if method_traits(self.method).predictor else 1.0

    def head(self) -> ModelConfig | SimclrConfig:
        """The section with the method's projection head (proj_hidden, proj_dim): ``MethodTraits.head``."""
        head: ModelConfig | SimclrConfig = getattr(self, method_traits(self.method).head)
        return head

    def proj_dim(self) -> int:
        """Width of the projection the loss reads (and the collapse monitor measures)."""
        return self.head().proj_dim

    def validate(self) -> Config:
        """Every section's own checks, then those that span sections; returns self."""
        check_choices(self, "")
        check_method(self.method)
        errors: list[ConfigError] = []
        for name in sections():  # every section's first error, all at once
            try:
                getattr(self, name).validate(name)
            except ConfigError as e:
                errors.append(e)
        raise_all(errors)
        d, o, r = self.data, self.optim, self.run
        traits = method_traits(self.method)
        if not traits.zero and r.engine == "deepspeed":
            raise ConfigError(f"method={self.method} does not run under run.engine=deepspeed yet: use "
                              "run.engine=auto (DDP under torchrun) or method=byol")
        if not OPTIMIZERS[o.name].zero and r.engine == "deepspeed":
            raise ConfigError(f"optim.name={o.name} does not run under run.engine=deepspeed yet (ZeRO runs "
                              f"{supporting('zero')}): use run.engine=auto (DDP under torchrun) or optim.name=lars")
        if not OPTIMIZERS[o.name].skip and r.nonfinite == "skip":
            raise ConfigError(f"run.nonfinite=skip restores a momentum optimizer's state ({supporting('skip')}) "
                              f"only; with optim.name={o.name} use "
                              "run.nonfinite=stop")
        if self.model.predictor == "directpred":
            if not traits.predictor:
                raise ConfigError(f"model.predictor=directpred is BYOL's predictor; method={self.method} has none: "
                                  "use model.predictor=mlp")
            if r.engine == "deepspeed" or self.byol.predictor_lr_mult != 1:
                raise ConfigError("model.predictor=directpred is set, not trained: it runs without "
                                  "run.engine=deepspeed and with byol.predictor_lr_mult=1")
        if not traits.accum and o.accum_steps > 1:
            raise ConfigError(f"method={self.method} needs optim.accum_steps=1 (got {o.accum_steps}): NT-Xent's "
                              "negatives are the whole batch, and accumulating would shrink them to one "
                              "micro-batch; lower optim.batch_size or add ranks")
        if d.views == "auto":  # resolved here, so the run directory's config.yaml says what ran
            d.views = traits.views
        if not self.model.image_size:
            self.model.image_size = d.image_size
        if self.model.online_probe and d.source == "synthetic":
            raise ConfigError("model.online_probe=true needs labelled data: use data.source=folder, shards or "
                              "procedural")
        if r.epochs < o.warmup_epochs:
            raise ConfigError(
                f"run.epochs={r.epochs} is shorter than optim.warmup_epochs={o.warmup_epochs}: "
                "lower optim.warmup_epochs or raise run.epochs"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        """The resolved config as the run directory's config.yaml holds it."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def check_arch(key: str, arch: str) -> None:
    """A torchvision name of ARCHS, timm:<name> for a model timm has (timm imported only then), or
    custom:<module>.<class> (a model given to the Python API)."""
    if arch.startswith(CUSTOM_PREFIX) and arch != CUSTOM_PREFIX:
        return
    if not arch.startswith(TIMM_PREFIX):
        choice(key, arch, (*ARCHS, "timm:<name>"))
        return
    try:
        import timm
    except ImportError:
        raise ConfigError(f"{key}={arch} needs timm, which is not installed: pip install timm (the README's "
                          "set-up installs it)") from None
    name = arch.removeprefix(TIMM_PREFIX)
    if not timm.is_model(name):
        near = difflib.get_close_matches(name, timm.list_models(), n=1, cutoff=0.6)
        hint = f" (did you mean timm:{near[0]}?)" if near else ""
        raise ConfigError(f"{key}={arch}: timm {timm.__version__} has no model {name!r}{hint}; list them with "
                          "python -c \"import timm; print(timm.list_models('*vit*'))\"")


def check_method(value: str) -> None:
    """'byol', 'simclr', or custom:<module>.<Class> (a dotted module path and a class name)."""
    ref = value.removeprefix(CUSTOM_PREFIX) if value.startswith(CUSTOM_PREFIX) else None
    if ref is not None and "." in ref and all(part.isidentifier() for part in ref.split(".")):
        return
    if ref is not None:
        raise ConfigError(f"method={value!r} does not name a class: use custom:<module>.<Class>, e.g. "
                          "method=custom:mypkg.methods.MyMethod (importable from where you run)")
    choice("method", value, (*BUILTIN_METHODS, "custom:<module>.<Class>"))


def sections() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {f.name: hints[f.name] for f in dataclasses.fields(Config) if f.name not in TOP_LEVEL_KEYS}


# Keys that are not in a section: ``method=simclr`` on the command line, ``method: simclr`` in YAML.
TOP_LEVEL_KEYS = ("preset", "method")
