"""Label sets and prompt ensembles, loaded and validated from YAML under `prompts/`.

A label set is data: users add `my_set.yaml` (in `prompts/`, in a folder named by
$VLM_XRAY_PROMPTS, or by passing a path) without touching code. Validation errors name
the file, the key and the problem.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from .fileio import read_yaml

MODES = ("multilabel", "multiclass")


class LabelSetError(ValueError):
    """A label-set file is missing or malformed."""


@dataclass(frozen=True)
class PromptPair:
    positive: tuple[str, ...]
    negative: tuple[str, ...]


@dataclass(frozen=True)
class Label:
    name: str
    display: str
    description: str
    category: str
    severity: int = 1
    aliases: tuple[str, ...] = ()
    prompts: dict[str, PromptPair] = field(default_factory=dict)


@dataclass(frozen=True)
class LabelSet:
    name: str
    display_name: str
    description: str
    modality: str
    mode: str
    labels: tuple[Label, ...]
    prompt_styles: dict[str, str]
    normal_labels: tuple[str, ...] = ()
    groups: dict[str, tuple[str, ...]] = field(default_factory=dict)
    source: str = ""

    @property
    def names(self) -> list[str]:
        return [lab.name for lab in self.labels]

    @property
    def multilabel(self) -> bool:
        return self.mode == "multilabel"

    def label(self, name: str) -> Label:
        for lab in self.labels:
            if lab.name == name:
                return lab
        raise KeyError(name)

    def resolve_name(self, raw: str) -> list[str] | None:
        """Map a dataset label string to label names: itself, an alias, a group's members,
        [] for a declared 'normal' label, None if unknown. Case-insensitive."""
        key = raw.strip().lower()
        for lab in self.labels:
            if key == lab.name.lower() or key in (a.lower() for a in lab.aliases):
                return [lab.name]
        for group, members in self.groups.items():
            if key == group.lower():
                return list(members)
        if key in (n.lower() for n in self.normal_labels):
            return []
        return None

    def styles(self, requested: list[str] | tuple[str, ...] | None = None) -> list[str]:
        if not requested:
            return list(self.prompt_styles)
        unknown = [s for s in requested if s not in self.prompt_styles]
        if unknown:
            raise LabelSetError(
                f"{self.source}: prompt style(s) {', '.join(map(repr, unknown))} not defined; "
                f"this label set has: {', '.join(self.prompt_styles)}"
            )
        return list(dict.fromkeys(requested))

    def with_prompts(self, other: "LabelSet") -> "LabelSet":
        """This label set with the prompt styles of `other` added (same label names required).

        Used by prompt experiments: a prompt file may carry only prompts for an existing set.
        """
        missing = [n for n in self.names if n not in other.names]
        if missing:
            raise LabelSetError(f"{other.source}: has no prompts for label(s) {', '.join(missing)} of {self.name}")
        merged = []
        for lab in self.labels:
            extra = other.label(lab.name).prompts
            merged.append(Label(**{**lab.__dict__, "prompts": {**lab.prompts, **extra}}))
        return LabelSet(**{**self.__dict__, "labels": tuple(merged),
                           "prompt_styles": {**self.prompt_styles, **other.prompt_styles}})


def builtin_prompt_dir() -> Path:
    return Path(str(resources.files("vlm.prompts")))


def _search_dirs() -> list[Path]:
    dirs = []
    if os.environ.get("VLM_XRAY_PROMPTS"):
        dirs += [Path(d) for d in os.environ["VLM_XRAY_PROMPTS"].split(os.pathsep) if d]
    dirs.append(builtin_prompt_dir())
    return dirs


def list_label_sets() -> dict[str, Path]:
    """Label-set name -> file, user folders first (a user file may shadow a built-in)."""
    found: dict[str, Path] = {}
    for d in _search_dirs():
        if d.is_dir():
            for f in sorted(d.glob("*.yaml")) + sorted(d.glob("*.yml")):
                found.setdefault(f.stem, f)
    return found


def _req(d: dict, key: str, where: str, kind: type, file: str):
    if not isinstance(d, dict):
        raise LabelSetError(f"{file}: {where} must be a mapping, got {type(d).__name__}")
    if key not in d:
        raise LabelSetError(f"{file}: {where}.{key} is missing")
    val = d[key]
    if not isinstance(val, kind) or (kind in (str, list, dict) and not val):
        raise LabelSetError(f"{file}: {where}.{key} must be a non-empty {kind.__name__}, got {val!r}")
    return val


def _str_list(val, where: str, file: str) -> tuple[str, ...]:
    if not isinstance(val, list) or not val or not all(isinstance(s, str) and s.strip() for s in val):
        raise LabelSetError(f"{file}: {where} must be a non-empty list of strings")
    return tuple(s.strip() for s in val)


def parse_label_set(data: dict, file: str, require_all_styles: bool = True) -> LabelSet:
    name = _req(data, "name", "<top>", str, file)
    mode = data.get("mode", "multilabel")
    if mode not in MODES:
        raise LabelSetError(f"{file}: mode must be one of {MODES}, got {mode!r}")
    styles = _req(data, "prompt_styles", "<top>", dict, file)
    raw_labels = _req(data, "labels", "<top>", list, file)
    labels = []
    for i, raw in enumerate(raw_labels):
        where = f"labels[{i}]"
        lname = _req(raw, "name", where, str, file)
        where = f"labels[{i}] ({lname})"
        prompts_raw = _req(raw, "prompts", where, dict, file)
        prompts = {}
        for style, pair in prompts_raw.items():
            if style not in styles:
                raise LabelSetError(f"{file}: {where}.prompts.{style}: style not declared in prompt_styles "
                                    f"({', '.join(styles)})")
            pos = _str_list(_req(pair, "positive", f"{where}.prompts.{style}", list, file),
                            f"{where}.prompts.{style}.positive", file)
            neg = _str_list(_req(pair, "negative", f"{where}.prompts.{style}", list, file),
                            f"{where}.prompts.{style}.negative", file)
            prompts[style] = PromptPair(pos, neg)
        if require_all_styles:
            missing = [s for s in styles if s not in prompts]
            if missing:
                raise LabelSetError(f"{file}: {where}.prompts is missing style(s) {', '.join(missing)}")
        severity = raw.get("severity", 1)
        if not isinstance(severity, int) or not 1 <= severity <= 3:
            raise LabelSetError(f"{file}: {where}.severity must be 1, 2 or 3, got {severity!r}")
        labels.append(Label(
            name=lname,
            display=str(raw.get("display") or lname),
            description=str(raw.get("description") or ""),
            category=str(raw.get("category") or "Other"),
            severity=severity,
            aliases=tuple(raw.get("aliases") or ()),
            prompts=prompts,
        ))
    names = [lab.name for lab in labels]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise LabelSetError(f"{file}: labels: duplicate name(s) {', '.join(dupes)}")
    groups = {}
    for g, members in (data.get("groups") or {}).items():
        members = _str_list(members, f"groups.{g}", file)
        bad = [m for m in members if m not in names]
        if bad:
            raise LabelSetError(f"{file}: groups.{g}: member(s) {', '.join(bad)} are not labels of this set")
        groups[str(g)] = members
    return LabelSet(
        name=name,
        display_name=str(data.get("display_name") or name),
        description=str(data.get("description") or ""),
        modality=str(data.get("modality") or ""),
        mode=mode,
        labels=tuple(labels),
        prompt_styles={str(k): str(v or "") for k, v in styles.items()},
        normal_labels=tuple(data.get("normal_labels") or ()),
        groups=groups,
        source=file,
    )


def load_label_set(name_or_path: str | Path) -> LabelSet:
    """Load a label set by name (see `list_label_sets`) or from a YAML path."""
    p = Path(name_or_path)
    if p.suffix.lower() in (".yaml", ".yml") or p.exists():
        path = p
    else:
        available = list_label_sets()
        if str(name_or_path) not in available:
            raise LabelSetError(
                f"unknown label set {str(name_or_path)!r}; available: {', '.join(available) or '(none)'} "
                f"(or pass a path to a YAML file)"
            )
        path = available[str(name_or_path)]
    data = read_yaml(path, what="label-set file", error=LabelSetError)
    if not isinstance(data, dict):
        raise LabelSetError(f"{path}: top level must be a mapping with keys name, mode, prompt_styles, labels")
    return parse_label_set(data, str(path))
