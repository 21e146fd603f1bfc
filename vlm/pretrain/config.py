"""`PretrainConfig`: every setting of a pre-training run, its JSON form and the resume check."""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields

TEXT_CFG = {
    "hf_model_name": "sentence-transformers/all-MiniLM-L6-v2",
    "hf_tokenizer_name": "sentence-transformers/all-MiniLM-L6-v2",
    "hf_pooler_type": "mean_pooler",
    "hf_proj_type": "linear",
    "context_length": 64,
}
TEXT_WIDTH = 384  # MiniLM-L6 hidden size
DEFAULT_IMAGE_TOWER = "edgenext_xx_small"
LOSSES = ("multipos", "siglip")
WITHHELD_MODES = ("drop", "generic")
# the budget may change when a run is resumed; every other setting of `run_config` must match
BUDGET_KEYS = ("epochs", "max_minutes")


def parse_data_spec(spec: str) -> tuple[str, str | None]:
    """`PATH` or `PATH:LABELSET` -> (path, label set name or None)."""
    if os.path.exists(spec) or ":" not in spec:
        return spec, None
    path, name = spec.rsplit(":", 1)
    return path, (name or None)


def data_specs(items) -> list[tuple[str, str | None]]:
    """`PATH[:SET]` strings or (path, set) pairs -> (path, label set name or None) pairs."""
    return [parse_data_spec(d) if isinstance(d, str) else (str(d[0]), d[1]) for d in items]


@dataclass
class PretrainConfig:
    """A LiT pre-training run. `data`: [(labels.csv or its folder, label set name or None = detect)]
    (or "PATH[:SET]" strings). See `vlm.pretrain.pretrain` for what the settings do."""

    data: list = field(default_factory=list)
    out_dir: str = ""
    image_tower: str = DEFAULT_IMAGE_TOWER
    image_size: int = 128
    embed_dim: int = TEXT_WIDTH
    epochs: int = 20
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    device: str = "cpu"
    seed: int = 0
    resume: bool = False
    withhold_labels: tuple = ()
    withheld_mode: str = "drop"
    val_fraction: float = 0.15
    loss: str = "multipos"
    init_from: str | None = None  # a model (folder or name) with the same image tower: its weights start the run
    prompt_weight: float = 1.0
    train_text_proj: bool = False
    text_lora: bool = False
    aug_strength: float = 1.0
    val_every: int = 1
    max_steps_per_epoch: int | None = None
    max_rows_per_csv: int | None = None
    cache_dir: str | None = None
    keep_train_state: bool = False
    max_minutes: float | None = None
    num_threads: int | None = None
    command: str | None = None
    progress: bool = True

    def __post_init__(self):
        self.data = data_specs(self.data)
        self.withhold_labels = tuple(self.withhold_labels)
        self.out_dir = str(self.out_dir)
        self.cache_dir = None if self.cache_dir is None else str(self.cache_dir)

    def validate(self) -> None:
        """ValueError naming the first setting that cannot work."""
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be 'multipos' or 'siglip', got {self.loss!r}")
        if self.withheld_mode not in WITHHELD_MODES:
            raise ValueError("withheld_mode must be 'drop' or 'generic'")
        if not self.data:
            raise ValueError("no training data given")
        if not self.out_dir:
            raise ValueError("no output folder given")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        for name in ("epochs", "batch_size", "image_size", "embed_dim", "val_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")

    # -------------------------------------------------------------------------- JSON
    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "PretrainConfig":
        raw = json.loads(text)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"pre-training config: unknown setting(s) {', '.join(unknown)}")
        return cls(**raw)

    def run_config(self) -> dict:
        """What defines the trained model (stored in metrics.json and train_state.pt): no paths to
        outputs, caches or run-time switches."""
        return {
            "data": [[str(p), s] for p, s in self.data], "image_tower": self.image_tower,
            "image_size": self.image_size, "embed_dim": self.embed_dim, "epochs": self.epochs,
            "batch_size": self.batch_size, "lr": self.lr, "weight_decay": self.weight_decay, "seed": self.seed,
            "withhold_labels": sorted(set(self.withhold_labels)), "withheld_mode": self.withheld_mode,
            "val_fraction": self.val_fraction, "loss": self.loss, "prompt_weight": self.prompt_weight,
            "train_text_proj": self.train_text_proj, "text_lora": self.text_lora,
            "aug_strength": self.aug_strength, "max_steps_per_epoch": self.max_steps_per_epoch,
            "max_rows_per_csv": self.max_rows_per_csv, "max_minutes": self.max_minutes,
            **({"init_from": self.init_from} if self.init_from else {}),  # absent: older saved runs still resume
        }

    def check_resume(self, saved_run_config: dict, where: str = "train_state.pt") -> None:
        """ValueError unless a saved run's configuration equals this one up to the budget
        (epochs, max_minutes), which may change on resume."""
        def core(c: dict) -> dict:
            return {k: v for k, v in c.items() if k not in BUDGET_KEYS}

        mine = core(json.loads(json.dumps(self.run_config())))  # tuples -> lists, as stored
        theirs = core(saved_run_config)
        if mine != theirs:
            diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
            raise ValueError(f"{where}: saved run used a different configuration ({', '.join(diff)}); "
                             f"use a new --out or drop --resume")
