"""What the mask's integer labels mean and what the network learns from them (numpy only, no torch).

``--labels`` names classes by the label values they cover (``ncr=1,ed=2,et=4``; ``tumour=*`` means
any non-zero value, the default binary task). Without ``--regions`` the classes are mutually
exclusive: one softmax channel per class plus background. ``--regions`` names overlapping unions of
classes (``wt=ncr+ed+et,tc=ncr+et,et=et``, or ``brats`` for exactly that), each learnt as its own
sigmoid channel, as nnU-Net trains BraTS. The scored *structures* are the regions when there are
regions, else the classes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

MAX_LABEL = 255  # label values above this are refused by the catalog (patches carry uint8 labels)
ANY = "*"
NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")
PRESET_REGIONS = {"brats": "wt=ncr+ed+et,tc=ncr+et,et=et"}


@dataclass(frozen=True)
class Structure:
    """A scored structure: its name and the label values it covers (``None``: any non-zero value)."""

    name: str
    values: frozenset | None

    def of(self, mask: np.ndarray) -> np.ndarray:
        """The structure's voxels in a label volume, as booleans."""
        return mask > 0 if self.values is None else np.isin(mask, sorted(self.values))


@dataclass(frozen=True)
class LabelScheme:
    classes: tuple[Structure, ...]
    regions: tuple[Structure, ...] = ()

    @property
    def sigmoid(self) -> bool:
        """Overlapping regions, one sigmoid channel each (else softmax over background + classes)."""
        return bool(self.regions)

    @property
    def out_channels(self) -> int:
        return len(self.regions) if self.regions else 1 + len(self.classes)

    @property
    def structures(self) -> tuple[Structure, ...]:
        return self.regions or self.classes

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(structure.name for structure in self.structures)

    def unknown_values(self, values) -> list[int]:
        """Label values present in a mask that no class covers (they would be read as background)."""
        if any(structure.values is None for structure in self.classes):
            return []
        known = set().union(*(structure.values for structure in self.classes))
        return sorted(int(v) for v in values if v and int(v) not in known)

    def lookup(self) -> np.ndarray:
        """``(channels, MAX_LABEL + 1)`` table from a label value to the target: a class index (softmax,
        one row) or 0/1 per region (sigmoid, one row per region)."""
        values = np.arange(MAX_LABEL + 1)
        if self.regions:
            return np.stack([structure.of(values) for structure in self.regions]).astype(np.uint8)
        table = np.zeros((1, MAX_LABEL + 1), dtype=np.uint8)
        for index, structure in enumerate(self.classes, start=1):
            table[0, structure.of(values)] = index
        return table

    def predicted(self, output: np.ndarray, probabilities: bool = False) -> list[np.ndarray]:
        """Each structure's predicted voxels from the network's logits ``(C, D, H, W)`` (or, with
        ``probabilities``, its sigmoid/softmax output): a region where its sigmoid passes 0.5, or
        where a region it holds by definition does (BraTS's ET inside TC inside WT: a voxel
        predicted enhancing is tumour core and whole tumour too), a class where it wins the softmax."""
        if self.regions:
            return self.nested([channel > (0.5 if probabilities else 0.0) for channel in output])
        winner = output.argmax(0)
        return [winner == index for index in range(1, len(self.classes) + 1)]

    def nested(self, masks: list[np.ndarray]) -> list[np.ndarray]:
        """Each region's mask joined with the masks of the regions whose label values it holds, so
        the regions nest as their definitions do (each sigmoid channel is learnt on its own)."""
        out = []
        for region, mask in zip(self.regions, masks):
            inside = [other for smaller, other in zip(self.regions, masks)
                      if smaller is not region and smaller.values < region.values]
            out.append(np.logical_or.reduce([mask, *inside]) if inside else mask)
        return out

    def label_map(self, masks: list[np.ndarray]) -> np.ndarray:
        """One ``uint8`` volume of label values from the structures' predicted masks (as
        :meth:`predicted` gives them), as the training masks were labelled: a class's voxels take its
        smallest label value (1 for ``*``). Regions are painted from the largest to the smallest,
        each with the value of the class it holds and no smaller region holds (nnU-Net's region
        order): BraTS's WT, TC, ET paint oedema, then necrosis, then enhancing tumour."""
        out = np.zeros(masks[0].shape, dtype=np.uint8)
        if not self.regions:
            for structure, mask in zip(self.classes, masks):
                out[mask] = min(structure.values) if structure.values is not None else 1
            return out
        order = sorted(range(len(self.regions)), key=lambda index: -len(self.regions[index].values))
        for position, index in enumerate(order):
            later = set().union(*(self.regions[other].values for other in order[position + 1:]))
            own = [c for c in self.classes if c.values <= self.regions[index].values and not c.values & later]
            if own:
                out[masks[index]] = min(min(c.values) for c in own)
        return out


def parse_roi_labels(text: str) -> tuple[tuple[str, int], ...]:
    """``--roi-labels`` (``Edema=2,Necrosis=1,Enhancing=4``): RTSTRUCT ROI names and the label value
    each is rasterised as, in painting order (empty: every ROI as 1).

    Raises:
        ValueError: an entry without ``=``, an empty name, a name given twice, or a value outside 1-255.
    """
    pairs = []
    for entry in (part.strip() for part in text.split(",") if part.strip()):
        name, sep, value = entry.rpartition("=")
        name = name.strip()
        try:
            number = int(value)
        except ValueError:
            number = 0
        if not sep or not name or not 1 <= number <= MAX_LABEL:
            raise ValueError(f"--roi-labels {text!r}: {entry!r} is not ROI name=label value (1-{MAX_LABEL}), e.g. "
                             "Edema=2,Necrosis=1,Enhancing=4")
        if any(name.lower() == other.lower() for other, _ in pairs):
            raise ValueError(f"--roi-labels {text!r}: ROI {name!r} is named twice")
        pairs.append((name, number))
    return tuple(pairs)


def _parse_values(text: str, where: str) -> frozenset | None:
    if text.strip() == ANY:
        return None
    values = set()
    for part in text.split("+"):
        low, _, high = part.strip().partition("-")
        try:
            first, last = int(low), int(high or low)
        except ValueError:
            raise ValueError(f"{where}: {part!r} is not a label value; expected integers like 1, 1+4 or 1-3, or "
                             f"{ANY}") from None
        if not 1 <= first <= last <= MAX_LABEL:
            raise ValueError(f"{where}: label values {part!r} must lie in 1..{MAX_LABEL} (0 is background)")
        values.update(range(first, last + 1))
    return frozenset(values)


def _pairs(text: str, flag: str):
    for item in text.split(","):
        name, equals, body = item.partition("=")
        name = name.strip().lower()
        if not equals or not NAME.fullmatch(name) or not body.strip():
            raise ValueError(f"{flag} {text!r}: {item.strip()!r} is not NAME=VALUE (names: lower-case letters, digits "
                             "and '_', starting with a letter)")
        yield name, body


def parse_scheme(labels: str, regions: str = "") -> LabelScheme:
    """The scheme of ``--labels`` and ``--regions``.

    Raises:
        ValueError: a malformed entry, a repeated name, a label value claimed by two classes, a
            region naming an unknown class, or regions over a single ``*`` class.
    """
    classes, claimed = [], {}
    for name, body in _pairs(labels, "--labels"):
        values = _parse_values(body, f"--labels {name}")
        if any(existing.name == name for existing in classes):
            raise ValueError(f"--labels {labels!r}: class {name} is named twice")
        for value in sorted(values or ()):
            if value in claimed:
                raise ValueError(f"--labels {labels!r}: label value {value} belongs to both {claimed[value]} and "
                                 f"{name}; classes are mutually exclusive (use --regions for overlaps)")
            claimed[value] = name
        classes.append(Structure(name, values))
    if any(c.values is None for c in classes) and len(classes) > 1:
        raise ValueError(f"--labels {labels!r}: {ANY} (any non-zero value) can only be the one class")
    built: list[Structure] = []
    spelled = PRESET_REGIONS.get(regions.strip().lower(), regions) if regions.strip() else ""
    by_name = {c.name: c for c in classes}
    for name, body in (_pairs(spelled, "--regions") if spelled else ()):
        members = [member.strip().lower() for member in body.split("+")]
        missing = [member for member in members if member not in by_name]
        if missing:
            raise ValueError(f"--regions {regions!r}: region {name} names {', '.join(missing)}, not a class of "
                             f"--labels ({', '.join(by_name)})")
        if any(by_name[m].values is None for m in members):
            raise ValueError(f"--regions {regions!r}: regions need classes with label values, not {ANY}")
        if any(existing.name == name for existing in built):
            raise ValueError(f"--regions {regions!r}: region {name} is named twice")
        built.append(Structure(name, frozenset().union(*(by_name[m].values for m in members))))
    return LabelScheme(tuple(classes), tuple(built))
