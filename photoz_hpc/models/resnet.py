"""ResNet encoder for multi-band cutouts (own implementation; torchvision is not installable here).

The ImageNet stem (7x7 stride-2 conv + max-pool) would throw away most of a 64-pixel galaxy cutout,
so it is replaced by one stride-1 conv over the survey's bands (SDSS: 5, as in the paper). The band count
is the data's: ``build_encoder`` takes the ``Survey`` of the training data (or of a model file) and keeps it
on the encoder (``ResNet.survey``), so what is saved records which bands it reads. ``width`` scales every
stage (64 = standard ResNet), so tests can run a width-8 ResNet-18 in milliseconds.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from photoz_hpc.errors import ConfigError
from photoz_hpc.models.dtypes import LOW_PRECISION, accumulation_dtype, widen
from photoz_hpc.models.records import default_survey
from photoz_hpc.survey import Survey

NormFactory = Callable[[int], nn.Module]

#: How the split BatchNorm of a channels_last activation runs its training backward (``moco.split_bn_backward``):
#: ``eager`` the layout-preserving backward in separate torch ops (two full-size fp32 temporaries for bf16/fp16:
#: the products g*x and the partial dx); ``fused`` the same math under ``torch.compile``, whose reduction and
#: pointwise kernels upcast on the fly (no temporary: the memory traffic of cuDNN's backward); ``copy`` the NCHW
#: reshape on a copy of the activations (two full copies per layer, cuDNN's kernels); ``auto`` = ``fused`` on a
#: GPU where torch.compile has its Triton backend, else ``eager``. ``benchmarks/split_bn.py`` times all three; the
#: choice made is logged once per process.
SPLIT_BN_BACKWARDS = ("auto", "fused", "eager", "copy")

#: (block type, blocks per stage) for each supported depth.
ARCHS: dict[str, tuple[str, tuple[int, int, int, int]]] = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
}


class _SplitBNChannelsLast(torch.autograd.Function):
    """Training-mode split BatchNorm of a channels_last input without leaving channels_last.

    The NHWC storage of (N, C, H, W) viewed as ``x5`` = (N/S, S, H, W, C) is free (row i = j*S + s), so the
    statistics of sub-batch s and channel c are a reduction of ``x5`` over dims (0, 2, 3); the
    normalisation is one fused multiply-add with per-(s, c) scale and shift, written NHWC. Statistics and
    coefficients are fp32 also for bf16/fp16 activations. The backward is BatchNorm's, per (s, c).
    Returns (y5, mean, biased var), mean and var of shape (1, S, 1, 1, C).
    """

    DIMS = (0, 2, 3)

    @staticmethod
    def forward(ctx, x5, weight, bias, eps, impl="eager"):
        dims, count = _SplitBNChannelsLast.DIMS, x5.shape[0] * x5.shape[2] * x5.shape[3]
        if x5.dtype not in LOW_PRECISION:
            var, mean = torch.var_mean(x5, dim=dims, correction=0, keepdim=True)
        else:  # accumulate in fp32 without an fp32 copy of the activations
            mean = x5.sum(dims, keepdim=True, dtype=torch.float32) / count
            sq = torch.linalg.vector_norm(x5, 2, dims, keepdim=True, dtype=torch.float32).square()
            var = (sq / count - mean.square()).clamp_min(0.0)
        invstd = torch.rsqrt(var + eps)
        scale = invstd if weight is None else invstd * widen(weight)
        shift = -mean * scale if bias is None else widen(bias) - mean * scale
        y = torch.empty_like(x5)
        torch.addcmul(shift, x5, scale, out=y)
        ctx.save_for_backward(x5, mean, invstd, weight)
        ctx.count, ctx.bias_dtype, ctx.backward_impl = count, None if bias is None else bias.dtype, impl
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    def backward(ctx, gy, _gmean, _gvar):
        x5, mean, invstd, weight = ctx.saved_tensors
        a = invstd if weight is None else invstd * widen(weight)
        gx, sum_g, dot = _split_bn_backward(ctx.backward_impl)(gy, x5, mean, invstd, a, ctx.count)
        gw = (dot * invstd).sum((0, 1, 2, 3)).to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        gb = sum_g.sum((0, 1, 2, 3)).to(ctx.bias_dtype) if ctx.bias_dtype is not None and ctx.needs_input_grad[2] else None
        return gx, gw, gb, None, None


def _backward_eager(gy, x5, mean, invstd, a, n: int):
    """dx, sum g and sum g (x - mean) per (sub-batch, channel), in separate torch ops."""
    dims = _SplitBNChannelsLast.DIMS
    sum_g = gy.sum(dims, keepdim=True, dtype=accumulation_dtype(gy.dtype))
    # sum g (x - mean): the products in fp32 (an fp32 addend makes addcmul upcast g and x on the fly;
    # bf16 products would spoil the sums), not an fp32 copy of g
    prod = gy * x5 if gy.dtype == x5.dtype and x5.dtype not in LOW_PRECISION else torch.addcmul(torch.zeros_like(mean), gy, x5)
    dot = prod.sum(dims, keepdim=True) - mean * sum_g
    k = dot * invstd.square() / n
    # dx = a (g - sum_g / n - (x - mean) k) = a g - a k x + a (mean k - sum_g / n)
    gx = torch.empty_like(x5)
    torch.addcmul(torch.addcmul(a * (mean * k - sum_g / n), x5, -a * k), gy, a, out=gx)
    return gx, sum_g, dot


def _backward_math(gy, x5, mean, invstd, a, n):
    """The same math written for ``torch.compile``: the upcasts fuse into one reduction kernel (sum g and
    sum g x) and one pointwise kernel (dx), so no full-size temporary is ever written."""
    dims = (0, 2, 3)  # _SplitBNChannelsLast.DIMS, a literal for the compiler
    acc = accumulation_dtype(x5.dtype)
    g, x = gy.to(acc), x5.to(acc)
    sum_g = g.sum(dims, keepdim=True)
    dot = (g * x).sum(dims, keepdim=True) - mean * sum_g
    k = dot * invstd.square() / n
    gx = (a * g - (a * k) * x + a * (mean * k - sum_g / n)).to(x5.dtype)
    return gx, sum_g, dot


_COMPILED: dict[str, Callable] = {}
_LOGGED: set[str] = set()


@functools.lru_cache(maxsize=1)
def cpu_toolchain_missing() -> str | None:
    """Why Inductor cannot build CPU kernels here (no C++ compiler on PATH, no Python headers), or None:
    checked up front, so a machine without them runs the eager backward instead of failing a compile."""
    import os
    import shutil
    import sysconfig

    from torch._inductor import config

    cxx = config.cpp.cxx
    if not any(shutil.which(c) for c in (cxx if isinstance(cxx, (list, tuple)) else (cxx,)) if c):
        return f"no C++ compiler for torch.compile on the CPU (torch._inductor.config.cpp.cxx = {cxx!r})"
    header = os.path.join(sysconfig.get_paths()["include"], "Python.h")
    if not os.path.exists(header):
        return f"no Python headers for torch.compile on the CPU ({header} is missing)"
    return None


def _fused_available(device: torch.device) -> bool:
    """``torch.compile`` can generate kernels for ``device`` (CUDA: Triton; CPU: a C++ compiler and Python.h)."""
    if device.type == "cuda":
        import importlib.util

        return importlib.util.find_spec("triton") is not None
    return device.type == "cpu" and cpu_toolchain_missing() is None


def resolve_split_bn_backward(impl: str, device: torch.device) -> str:
    """The backward ``impl`` means on ``device`` (``auto`` resolved), logged once per process and choice."""
    if impl not in SPLIT_BN_BACKWARDS:
        raise ConfigError(f"moco.split_bn_backward '{impl}' is not one of {list(SPLIT_BN_BACKWARDS)}")
    if impl == "auto":
        impl = "fused" if device.type == "cuda" and _fused_available(device) else "eager"
    elif impl == "fused" and not _fused_available(device):
        impl = "eager"
    if impl not in _LOGGED:
        from photoz_hpc.logs import get_logger

        _LOGGED.add(impl)
        get_logger(__name__).info("split BatchNorm on channels_last activations: %s backward (moco.split_bn_backward)", impl)
    return impl


def _compile_failures() -> tuple[type[BaseException], ...]:
    """The exceptions of a compile that failed (no compiler, a kernel that does not build), as this torch has
    them; anything else (CUDA OOM, a genuine error in the math) is raised, not hidden behind a fallback."""
    import torch._dynamo.exc as dynamo_exc
    import torch._inductor.exc as inductor_exc

    names = ("BackendCompilerFailed", "InductorError", "CppCompileError", "InvalidCxxCompiler", "TritonMissing",
             "GPUTooOldForTriton")
    return tuple(e for m in (dynamo_exc, inductor_exc) for n in names if isinstance(e := getattr(m, n, None), type))


def _split_bn_backward(impl: str) -> Callable:
    """The backward function of ``impl`` (``eager`` or ``fused``). A fused backward that fails to compile
    falls back to ``eager`` for the rest of the process, with a warning (a run never dies of it); a shape past
    dynamo's recompile limit (``fullgraph``: it raises instead of running the math uncompiled, which would
    write the fp32 temporaries) runs ``eager``, the shapes already compiled stay fused."""
    if impl != "fused" or _COMPILED.get("failed"):
        return _backward_eager
    if "fused" not in _COMPILED:
        # dynamic=True: sizes and the count n are symbols, so a new layer shape or batch is no recompile
        # (only a new dtype, a size of 1 or a new pattern of equal sizes is)
        _COMPILED["fused"] = torch.compile(_backward_math, dynamic=True, fullgraph=True)
    compiled = _COMPILED["fused"]

    def run(*args):
        from torch._dynamo.exc import FailOnRecompileLimitHit

        from photoz_hpc.logs import get_logger

        try:
            return compiled(*args)
        except FailOnRecompileLimitHit as exc:
            if "recompile_limit" not in _LOGGED:
                _LOGGED.add("recompile_limit")
                get_logger(__name__).warning("split BatchNorm: the fused backward hit torch._dynamo's recompile "
                                             "limit (%s); new shapes use the eager backward", exc)
            return _backward_eager(*args)
        except _compile_failures() as exc:
            if isinstance(getattr(exc, "inner_exception", None), torch.OutOfMemoryError):
                raise
            _COMPILED["failed"] = compiled
            get_logger(__name__).warning("split BatchNorm: the fused backward failed to compile (%s: %s); "
                                         "using the eager one", type(exc).__name__, exc)
            return _backward_eager(*args)

    return run


class SplitBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are computed per sub-batch (MoCo's single-GPU ``SplitBatchNorm``).

    In training mode the batch of N is treated as ``num_splits`` sub-batches, sub-batch s holding rows
    s, s + S, s + 2S, ... (a free reshape to (N/S, S*C, H, W), as in the MoCo reference), each normalised
    with its own mean/variance; the running statistics are updated with the average of the sub-batch
    updates. In eval mode it is exactly ``nn.BatchNorm2d`` (running statistics). Parameters, buffers and
    state-dict keys are those of ``nn.BatchNorm2d``, so checkpoints and exported encoders are unchanged.
    A channels_last input stays channels_last (``_SplitBNChannelsLast``): the reshape above cannot be a
    view of NHWC memory, and copying to NCHW and back around every BatchNorm would cost two full passes.
    """

    def __init__(self, num_features: int, num_splits: int = 1, backward: str = "auto", **kw) -> None:
        super().__init__(num_features, **kw)
        if num_splits < 1:
            raise ConfigError(f"moco.bn_splits = {num_splits} must be >= 1")
        if backward not in SPLIT_BN_BACKWARDS:
            raise ConfigError(f"moco.split_bn_backward '{backward}' is not one of {list(SPLIT_BN_BACKWARDS)}")
        self.num_splits = int(num_splits)
        self.backward_impl = backward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.num_splits
        if s == 1 or not self.training:
            return super().forward(x)
        n, c, h, w = x.shape
        if n % s != 0:
            raise ConfigError(f"split BatchNorm: batch of {n} is not divisible by moco.bn_splits = {s}")
        factor = 0.0 if self.momentum is None else self.momentum
        track = self.track_running_stats and self.running_mean is not None
        if track:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        channels_last = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        impl = resolve_split_bn_backward(self.backward_impl, x.device) if channels_last else None
        if channels_last and impl != "copy":
            return self._forward_channels_last(x, factor, track, impl)
        if channels_last:  # the NCHW reshape on a copy, the output back to channels_last for the next convolution
            return self._forward_nchw(x.contiguous(), factor, track).contiguous(memory_format=torch.channels_last)
        return self._forward_nchw(x, factor, track)

    def _forward_nchw(self, x: torch.Tensor, factor: float, track: bool) -> torch.Tensor:
        s = self.num_splits
        n, c, h, w = x.shape
        rm = self.running_mean.repeat(s) if track else None
        rv = self.running_var.repeat(s) if track else None
        weight = self.weight.repeat(s) if self.affine else None
        bias = self.bias.repeat(s) if self.affine else None
        out = F.batch_norm(x.reshape(n // s, s * c, h, w), rm, rv, weight, bias, True, factor, self.eps)
        if track:
            with torch.no_grad():
                self.running_mean.copy_(rm.view(s, c).mean(0))
                self.running_var.copy_(rv.view(s, c).mean(0))
        return out.reshape(n, c, h, w)

    def _forward_channels_last(self, x: torch.Tensor, factor: float, track: bool, impl: str) -> torch.Tensor:
        s = self.num_splits
        n, c, h, w = x.shape
        count = (n // s) * h * w
        if count < 2:
            raise ValueError(f"split BatchNorm: expected more than 1 value per channel in training, got {count}")
        x5 = x.permute(0, 2, 3, 1).view(n // s, s, h, w, c)
        y5, mean, var = _SplitBNChannelsLast.apply(x5, self.weight, self.bias, self.eps, impl)
        if track:
            with torch.no_grad():  # the average of the S sub-batch updates, as in the NCHW path
                self.running_mean.mul_(1 - factor).add_(mean.view(s, c).mean(0).to(self.running_mean.dtype), alpha=factor)
                unbiased = var.view(s, c).mean(0) * (count / (count - 1))
                self.running_var.mul_(1 - factor).add_(unbiased.to(self.running_var.dtype), alpha=factor)
        return y5.view(n, h, w, c).permute(0, 3, 1, 2)


def convert_split_bn(module: nn.Module, num_splits: int, backward: str = "auto") -> nn.Module:
    """Replace every plain ``nn.BatchNorm2d`` in ``module`` by a ``SplitBatchNorm2d`` with the same
    parameters and buffers, like ``nn.SyncBatchNorm.convert_sync_batchnorm`` (returns the converted module)."""
    if type(module) is nn.BatchNorm2d:
        new = SplitBatchNorm2d(module.num_features, num_splits, backward, eps=module.eps, momentum=module.momentum,
                               affine=module.affine, track_running_stats=module.track_running_stats)
        if module.affine:
            new.weight, new.bias = module.weight, module.bias  # the same Parameters (device, dtype, grad)
        new.running_mean, new.running_var = module.running_mean, module.running_var
        new.num_batches_tracked = module.num_batches_tracked
        new.train(module.training)
        return new
    for name, child in module.named_children():
        setattr(module, name, convert_split_bn(child, num_splits, backward))
    return module


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int, norm: NormFactory) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = norm(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = norm(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(cin, planes, stride, norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idt = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + idt)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int, norm: NormFactory) -> None:
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = norm(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)  # stride on the 3x3 (ResNet v1.5)
        self.bn2 = norm(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = norm(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(cin, out, stride, norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idt = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + idt)


def _downsample(cin: int, cout: int, stride: int, norm: NormFactory) -> nn.Module | None:
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), norm(cout))


class ResNet(nn.Module):
    """ResNet trunk + global average pool; ``forward`` returns (B, feature_dim) features.

    ``in_channels``: the stem's input bands (None: the default survey's, SDSS ugriz). ``survey``: the survey whose
    bands it reads, when known (``build_encoder`` sets it; not part of the state dict)."""

    survey: Survey | None = None

    def __init__(
        self,
        arch: str = "resnet50",
        width: int = 64,
        in_channels: int | None = None,
        stem_kernel: int = 3,
        norm: NormFactory | None = None,
    ) -> None:
        super().__init__()
        if in_channels is None:
            in_channels = default_survey().n_bands
        if in_channels < 1:
            raise ConfigError(f"a ResNet stem needs at least one input band, got {in_channels}")
        if arch not in ARCHS:
            raise ConfigError(f"model.arch '{arch}' is not one of {sorted(ARCHS)}")
        if stem_kernel < 1 or stem_kernel % 2 == 0:
            raise ConfigError(f"model.stem_kernel = {stem_kernel} must be a positive odd integer")
        norm = norm or nn.BatchNorm2d
        kind, layers = ARCHS[arch]
        block = BasicBlock if kind == "basic" else Bottleneck
        self.arch, self.width, self.stem_kernel = arch, width, stem_kernel
        # The replaced stem: one stride-1 conv, no max-pool.
        self.conv1 = nn.Conv2d(in_channels, width, stem_kernel, 1, stem_kernel // 2, bias=False)
        self.bn1 = norm(width)
        self.relu = nn.ReLU(inplace=True)
        stages, cin = [], width
        for i, n in enumerate(layers):
            planes = width * 2**i
            blocks = []
            for j in range(n):
                blocks.append(block(cin, planes, 2 if (i > 0 and j == 0) else 1, norm))
                cin = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = cin
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.modules.batchnorm._NormBase) and m.affine:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)


def build_encoder(model_cfg, norm: NormFactory | None = None, survey: Survey | None = None) -> ResNet:
    """Encoder from a ``ModelConfig`` (arch, width, stem_kernel) for data of ``survey``: its stem reads
    ``survey.n_bands`` channels (None: the default survey, SDSS ugriz, as for a file that records none)."""
    survey = survey or default_survey()
    encoder = ResNet(model_cfg.arch, model_cfg.width, survey.n_bands, model_cfg.stem_kernel, norm)
    encoder.survey = survey
    return encoder
