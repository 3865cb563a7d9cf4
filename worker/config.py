"""The run configuration: the contract between the API, the dispatcher and the worker.

One run = one network trained with gradient descent (full batch, or mini-batch SGD) on one
data set. The API validates requests with these models (field-level 422s come straight from
them), the dispatcher stores ``RunConfig.model_dump()`` and the worker rebuilds the model from
it. Every field has a default, so a partial config is a valid run. Definitions of the
architectures: ``../shared/SCIENCE.md`` (Du et al. ICLR 2019 and ICML 2019); the metrics and
their cadences: ``docs/metrics.md``.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)

Architecture = Literal["two_layer", "fc", "resnet", "conv_resnet"]
TrainLayers = Literal["all", "hidden", "last"]
Parametrization = Literal["ntk", "standard"]
Activation = Literal["relu", "softplus", "tanh", "gelu"]
DataKind = Literal["sphere", "digits", "dataset"]
Loss = Literal["mse", "cross_entropy"]
Optimizer = Literal["gd", "sgd"]

# scikit-learn's digits: 8×8 images, 1797 samples; per-class counts (checked by a test) let the
# API validate ``data.n`` without importing scikit-learn.
DIGITS_CLASS_COUNTS = (178, 182, 177, 183, 181, 182, 181, 179, 174, 180)
DIGITS_IMAGE_SHAPE = (8, 8)
OUTPUT_LAYER = "out"  # the name of the output weights a; hidden layers are layer1 … layerH
# Flags are strict booleans (0.0 or "no" is a mistake, not False). Bounds of fields that the
# caps (services/settings.py) leave open: a seed must fit torch's generators (int64), an id the
# id column (int32), and counts and cadences an int32 (a cadence past it never fires in any run
# the step cap allows).
MAX_SEED = 2**63 - 1
MAX_ID = 2**31 - 1
MAX_COUNT = 2**31 - 1


class Strict(BaseModel):
    """Unknown fields are errors, so a typo never silently falls back to a default."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(Strict):
    """The training set: points on the unit sphere, scikit-learn's digits, or an uploaded dataset.

    An uploaded dataset's arrays are handed to the worker by the dispatcher
    (``train(..., arrays=(X, y))``); the config names it by ``dataset_id`` and repeats its shape
    (n, d, label_dim), so caps apply before any array is read and the worker can check it.
    """

    kind: DataKind = Field(
        "sphere",
        description="sphere: x uniform on S^{d-1}; digits: scikit-learn's 8×8 digits (d = 64); "
        "dataset: the uploaded X, y of dataset_id",
    )
    classes: tuple[int, ...] | None = Field(
        None,
        min_length=2,
        description="digits: the classes used (default all ten); mse needs exactly two, "
        "labelled -1 and +1 in the order given",
    )
    n: int = Field(
        64,
        gt=0,
        description="number of training points (digits: drawn without replacement from the "
        "chosen classes; dataset: the rows of X)",
    )
    d: int = Field(16, gt=0, validate_default=True, description="input dimension (digits: 64)")
    channels: int = Field(
        1, gt=0, description="conv_resnet: an input is `channels` × positions, d = channels·p"
    )
    image_shape: tuple[int, int] | None = Field(
        None,
        description="conv_resnet: positions as an h×w image (digits: [8, 8]); "
        "None: a 1-D signal of d/channels positions",
    )
    labels: Literal["gaussian", "sign", "teacher"] = Field(
        "gaussian",
        description="sphere: y ~ N(0, 1), y uniform in {-1, +1}, or y = a two-layer ReLU "
        "teacher network's output (its sign for cross_entropy)",
    )
    teacher_width: int = Field(
        16, gt=0, description="hidden units of the teacher network (at most the width cap)"
    )
    label_noise: float = Field(
        0.0,
        ge=0,
        le=1,
        description="fraction of labels replaced by random ones (1: fully random labels)",
    )
    num_classes: int | None = Field(
        None,
        ge=2,
        le=MAX_COUNT,
        description="dataset with cross_entropy: y holds class indices 0..C-1",
    )
    label_dim: int = Field(
        1,
        ge=1,
        le=MAX_COUNT,
        description="dataset: columns k of y; mse fits k outputs when y is (n, k)",
    )
    dataset_id: int | None = Field(
        None,
        ge=1,
        le=MAX_ID,
        validate_default=True,
        description="dataset: the id of the uploaded dataset the dispatcher hands to the worker",
    )
    normalize: bool = Field(
        True, strict=True, description="scale every input to unit norm (the theory's case)"
    )
    seed: int | None = Field(
        None,
        ge=0,
        le=MAX_SEED,
        description="data seed; defaults to the run seed so each seed is a new draw",
    )

    @model_validator(mode="before")
    @classmethod
    def _digits_shape(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("kind") == "digits":
            return {"d": 64, "image_shape": DIGITS_IMAGE_SHAPE} | data
        return data

    @field_validator("classes")
    @classmethod
    def _digit_classes(cls, classes: tuple[int, ...] | None) -> tuple[int, ...] | None:
        if classes is not None and (
            len(set(classes)) != len(classes) or not all(0 <= c <= 9 for c in classes)
        ):
            raise ValueError("classes must be distinct digits 0..9")
        return classes

    @field_validator("n")
    @classmethod
    def _enough_digits(cls, n: int, info: ValidationInfo) -> int:
        if info.data.get("kind") == "digits":
            classes = info.data.get("classes") or range(10)
            available = sum(DIGITS_CLASS_COUNTS[c] for c in classes)
            if n > available:
                raise ValueError(f"the chosen digit classes have only {available} images")
        return n

    @field_validator("d")
    @classmethod
    def _digits_are_64(cls, d: int, info: ValidationInfo) -> int:
        if info.data.get("kind") == "digits" and d != 64:
            raise ValueError("digits images have d = 64 pixels")
        return d

    @field_validator("channels")
    @classmethod
    def _channels_divide_d(cls, channels: int, info: ValidationInfo) -> int:
        d = info.data.get("d")
        if d is not None and d % channels:
            raise ValueError(f"d = {d} is not a multiple of channels = {channels}")
        return channels

    @field_validator("image_shape")
    @classmethod
    def _image_fits_d(
        cls, shape: tuple[int, int] | None, info: ValidationInfo
    ) -> tuple[int, int] | None:
        d, channels = info.data.get("d"), info.data.get("channels")
        if shape is None or d is None or channels is None:
            return shape
        if min(shape) < 1 or shape[0] * shape[1] * channels != d:
            raise ValueError(f"h·w·channels must equal d = {d}")
        return shape

    @field_validator("label_dim")
    @classmethod
    def _columns_only_for_datasets(cls, label_dim: int, info: ValidationInfo) -> int:
        if label_dim > 1 and info.data.get("kind") != "dataset":
            raise ValueError("only an uploaded dataset can have several label columns")
        return label_dim

    @field_validator("dataset_id")
    @classmethod
    def _datasets_need_an_id(cls, dataset_id: int | None, info: ValidationInfo) -> int | None:
        if info.data.get("kind") == "dataset" and dataset_id is None:
            raise ValueError("kind 'dataset' needs the dataset_id of the uploaded dataset")
        return dataset_id

    @property
    def positions(self) -> int:
        """p: positions of an input seen as channels × positions (conv_resnet)."""
        return self.d // self.channels

    @property
    def digit_classes(self) -> tuple[int, ...]:
        return self.classes if self.classes is not None else tuple(range(10))


class RunConfig(Strict):
    """One training run. Defaults are the quickstart's (a fast, stable two-layer ReLU run)."""

    arch: Architecture = Field(
        "two_layer",
        description="two_layer (Du et al. ICLR 2019), fc, resnet or conv_resnet (Du et al. "
        "ICML 2019)",
    )
    width: int = Field(256, gt=0, description="m, neurons (channels) per hidden layer")
    depth: int = Field(
        1, gt=0, description="H, hidden layers; two_layer has exactly one hidden layer"
    )
    activation: Activation = Field(
        "relu", description="σ of the hidden layers: relu, softplus, tanh or gelu"
    )
    train_layers: TrainLayers = Field(
        "all",
        description="the weights GD trains (fc, resnet, conv_resnet; two_layer trains W only): "
        "all (Du et al. ICML 2019); hidden: W⁽²⁾…W⁽ᴴ⁾, with the input layer W⁽¹⁾ and the output "
        "a fixed at their initialization (Allen-Zhu, Li & Song ICML 2019; depth ≥ 2); last: a "
        "only (random features)",
    )
    parametrization: Parametrization = Field(
        "ntk",
        description="ntk: weights N(0, τ²), layers scaled √(c_σ/m) (Du et al.); standard "
        "(fc with relu): Allen-Zhu et al.'s unscaled layers x⁽ʰ⁾ = relu(W⁽ʰ⁾x⁽ʰ⁻¹⁾) with every "
        "W⁽ʰ⁾ ~ N(0, 2τ²/m), the input layer's too, and a ~ N(0, τ²/C)",
    )
    c_res: float = Field(
        0.25, gt=0, lt=1, description="resnet, conv_resnet: residual branches scaled c_res/(H√m)"
    )
    kernel_size: int = Field(
        3,
        gt=0,
        le=MAX_COUNT,
        description="conv_resnet: patch width k (odd, zero padding k//2); q = k positions "
        "in 1-D, k² in 2-D",
    )
    init_scale: float = Field(
        1.0,
        gt=0,
        allow_inf_nan=False,
        description="τ: trained weights start N(0, τ²); large τ is lazy, small τ learns "
        "features (Chizat et al. 2019)",
    )
    data: DataConfig = Field(DataConfig(), description="the training set")
    loss: Loss = Field(
        "mse",
        validate_default=True,
        description="mse: ½Σ(u-y)²; cross_entropy: Σ -log softmax(u)_y with C outputs",
    )
    optimizer: Optimizer = Field(
        "gd", description="gd: full batch (the theory's case); sgd: mini-batches of batch_size"
    )
    batch_size: int | None = Field(
        None, gt=0, description="sgd: examples per step (default ⌈n/4⌉), drawn without replacement"
    )
    seed: int = Field(
        0, ge=0, le=MAX_SEED, description="seeds the initialization (and the data by default)"
    )
    lr: Annotated[float, Field(gt=0, allow_inf_nan=False)] | Literal["auto"] = Field(
        0.1, description="step size η, or 'auto': lr_fraction · 2/λ_max(H(0))"
    )
    lr_fraction: float = Field(
        0.5, gt=0, lt=1, description="lr 'auto': η = lr_fraction · 2/λ_max(H(0)) (stable GD)"
    )
    steps: int = Field(1000, gt=0, description="maximum number of updates")
    loss_threshold: float = Field(
        0.0, ge=0, allow_inf_nan=False, description="stop once the loss falls below this (0: never)"
    )
    divergence_bound: float = Field(
        1e12,
        gt=0,
        allow_inf_nan=False,
        description="a loss above this (or NaN/inf) ends the run as 'diverged'",
    )
    max_wall_time_s: float | None = Field(
        None,
        gt=0,
        allow_inf_nan=False,
        description="stop after this much training time (summed over resumes)",
    )
    gram_every: int = Field(
        10, gt=0, le=MAX_COUNT, description="K: Gram eigenvalues and relative change every K steps"
    )
    gram_per_layer: bool = Field(
        False, strict=True, description="also report every layer's Gram G⁽ʰ⁾"
    )
    gram_full_outputs: bool = Field(
        False,
        strict=True,
        description="with C > 1 outputs, also λ_min and λ_max of the whole nC×nC NTK (the "
        "Gram reports the mean of its C diagonal blocks): C² times the Gram's products and an "
        "nC×nC eigenproblem each Gram step",
    )
    weights_every: int = Field(
        10,
        gt=0,
        le=MAX_COUNT,
        description="weight distances and pattern flips every this many steps",
    )
    theory: bool = Field(
        True,
        strict=True,
        description="compute the infinite-width kernels and the predicted loss curve",
    )
    theory_every: int = Field(
        10,
        gt=0,
        le=MAX_COUNT,
        description="predicted loss curves are reported every this many steps",
    )
    spectrum_steps: tuple[Annotated[int, Field(ge=0, le=MAX_COUNT)], ...] = Field(
        (), max_length=64, description="steps at which full Gram eigenvalue spectra are reported"
    )
    eig_dense_max_n: int = Field(
        2048,
        gt=0,
        le=MAX_COUNT,
        description="above this n, extreme eigenvalues come from Lanczos (ARPACK), not eigvalsh",
    )
    dtype: Literal["float32", "float64"] = Field(
        "float64", description="training precision; Grams and eigenvalues are always float64"
    )
    emit_every: int = Field(
        50,
        gt=0,
        le=MAX_COUNT,
        description="metric points are sent to the service in batches of this many steps",
    )
    checkpoint_every: int = Field(
        200,
        gt=0,
        le=MAX_COUNT,
        description="steps between checkpoints (when the worker is given a directory)",
    )

    @field_validator("depth")
    @classmethod
    def _depth_matches_arch(cls, depth: int, info: ValidationInfo) -> int:
        if info.data.get("arch") == "two_layer" and depth != 1:
            raise ValueError("two_layer has one hidden layer: depth must be 1")
        return depth

    @field_validator("train_layers")
    @classmethod
    def _layers_exist(cls, layers: TrainLayers, info: ValidationInfo) -> TrainLayers:
        arch, depth = info.data.get("arch"), info.data.get("depth")
        if layers != "all" and arch == "two_layer":
            raise ValueError("two_layer trains W only (Du et al. ICLR 2019): keep 'all'")
        if layers == "hidden" and depth is not None and depth < 2:
            raise ValueError("'hidden' trains W⁽²⁾…W⁽ᴴ⁾: it needs depth ≥ 2")
        return layers

    @field_validator("parametrization")
    @classmethod
    def _standard_is_allen_zhus(
        cls, parametrization: Parametrization, info: ValidationInfo
    ) -> Parametrization:
        if parametrization == "standard" and (
            info.data.get("arch") != "fc" or info.data.get("activation") != "relu"
        ):
            raise ValueError("the standard parametrization is Allen-Zhu et al.'s: fc with relu")
        return parametrization

    @field_validator("kernel_size")
    @classmethod
    def _odd_kernel(cls, k: int) -> int:
        if k % 2 == 0:
            raise ValueError("kernel_size must be odd (symmetric zero padding)")
        return k

    @field_validator("loss")
    @classmethod
    def _loss_fits_labels(cls, loss: Loss, info: ValidationInfo) -> Loss:
        data: DataConfig | None = info.data.get("data")
        if data is None:
            return loss
        if loss == "mse" and data.kind == "digits" and len(data.digit_classes) != 2:
            raise ValueError(
                "mse on digits regresses on a pair of classes: set data.classes to two "
                "classes (e.g. [3, 8]) or use cross_entropy"
            )
        if loss == "cross_entropy":
            if data.kind == "sphere" and data.labels == "gaussian":
                raise ValueError("cross_entropy needs class labels: data.labels sign or teacher")
            if data.kind == "dataset" and (data.num_classes is None or data.label_dim > 1):
                raise ValueError(
                    "cross_entropy on a dataset needs data.num_classes and one label column"
                )
        return loss

    @field_validator("batch_size")
    @classmethod
    def _batch_fits_data(cls, batch_size: int | None, info: ValidationInfo) -> int | None:
        data: DataConfig | None = info.data.get("data")
        if batch_size is not None and data is not None and batch_size > data.n:
            raise ValueError(f"batch_size exceeds the {data.n} training points")
        return batch_size

    @field_validator("lr", mode="wrap")
    @classmethod
    def _one_step_size_error(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        """One error at ``lr`` instead of one per member of the union."""
        try:
            return handler(value)
        except ValidationError:
            raise ValueError("must be a positive finite number or 'auto'") from None

    @property
    def data_seed(self) -> int:
        return self.seed if self.data.seed is None else self.data.seed

    @property
    def num_outputs(self) -> int:
        """C: label columns for mse (1 but for datasets); the classes for cross_entropy."""
        if self.loss == "mse":
            return self.data.label_dim
        if self.data.kind == "digits":
            return len(self.data.digit_classes)
        if self.data.kind == "dataset":
            assert self.data.num_classes is not None  # checked by _loss_fits_labels
            return self.data.num_classes
        return 2

    @property
    def effective_batch_size(self) -> int:
        """b: n for gd; batch_size (default ⌈n/4⌉) for sgd."""
        if self.optimizer == "gd":
            return self.data.n
        return self.batch_size or math.ceil(self.data.n / 4)

    @property
    def patch_size(self) -> int:
        """q: positions per conv patch (k in 1-D, k² for images)."""
        return self.kernel_size**2 if self.data.image_shape else self.kernel_size

    @property
    def trained_layers(self) -> tuple[str, ...]:
        """Names of the trained weights, in forward order: layer1 … layerH, then out."""
        if self.arch == "two_layer":
            return ("layer1",)
        hidden = tuple(f"layer{h}" for h in range(1, self.depth + 1))
        if self.train_layers == "all":
            return (*hidden, OUTPUT_LAYER)
        return hidden[1:] if self.train_layers == "hidden" else (OUTPUT_LAYER,)

    def _layer_sizes(self) -> dict[str, int]:
        """Weights per layer of the network, trained or fixed (two_layer's a is the fixed ±1)."""
        m, c, h = self.width, self.num_outputs, self.depth
        if self.arch == "conv_resnet":
            q, p = self.patch_size, self.data.positions
            first, hidden, out = m * q * self.data.channels, m * q * m, m * p * c
        else:
            first, hidden, out = m * self.data.d, m * m, m * c
        return (
            {"layer1": first} | {f"layer{k}": hidden for k in range(2, h + 1)} | {OUTPUT_LAYER: out}
        )

    def parameter_count(self) -> int:
        """Trained parameters P: the sizes of the ``trained_layers``."""
        sizes = self._layer_sizes()
        return sum(sizes[name] for name in self.trained_layers)

    def weight_count(self) -> int:
        """Every weight the network holds, trained or fixed (what memory and the caps see)."""
        return sum(self._layer_sizes().values())
