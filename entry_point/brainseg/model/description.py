"""What a trained model needs besides its weights to be run on new studies: the network and its
arguments, the sequences in channel order, the label scheme, the grid and the normalisation it was
trained on, and where it came from. Free of torch, so the launcher and the review tools can read
a model's ``model.json`` on a laptop.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, field, fields

from brainseg.labels import LabelScheme, parse_scheme

FORMAT = "brainseg-model"
VERSION = 1


@dataclass(frozen=True)
class ModelDescription:
    """Everything that rebuilds a network and prepares its input.

    Attributes:
        network: the arguments of :class:`brainseg.model.networks.NetworkSpec`.
        task: ``segmentation`` or ``autoencoder`` (only a segmentation model predicts).
        sequences: the sequence folders, in channel order.
        labels, regions: the label scheme (:func:`brainseg.labels.parse_scheme`).
        target_spacing: ``(dz, dy, dx)`` mm the network saw every case at; ``()``: each case's own.
        resampling: how images reached that grid (``separate_z`` or ``linear``; models from before
            the choice existed were trained with ``linear``).
        normalization: ``zscore`` or ``minmax``, per case and sequence.
        patch_size, sw_overlap: the sliding window of whole-volume inference.
        missing_sequences: ``exclude`` or ``zero`` (a missing channel read as zeros).
        run_name, code_version, dataset_fingerprint, best_epoch, best_validation: provenance.
        kept_epoch: the epoch whose weights these are (``--keep-weights``; 0: a model from before
            the choice, which kept the best epoch's).
        postprocessing: ``{structure: {"min_mm3", "largest_only"}}`` chosen on validation
            (:mod:`brainseg.postprocess`); a structure not named is left as predicted.
        detection: ``{"ml", "chosen_on"}``: a study is tumour-present when its largest predicted
            component exceeds ``ml`` (:class:`brainseg.detection.Threshold`, chosen on validation;
            empty: a model from before, any component).
    """

    network: dict
    task: str
    sequences: tuple
    labels: str
    regions: str
    target_spacing: tuple
    normalization: str
    patch_size: tuple
    sw_overlap: float
    missing_sequences: str = "exclude"
    resampling: str = "linear"
    run_name: str = ""
    code_version: str = ""
    dataset_fingerprint: str = ""
    best_epoch: int = 0
    best_validation: float | None = None
    kept_epoch: int = 0
    postprocessing: dict = field(default_factory=dict)
    detection: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("sequences", "target_spacing", "patch_size"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        object.__setattr__(self, "network", dict(self.network))

    @property
    def scheme(self) -> LabelScheme:
        return parse_scheme(self.labels, self.regions)

    def to_dict(self) -> dict:
        """Plain JSON values (tuples as lists), as ``model.json`` holds them."""
        return json.loads(json.dumps({"format": FORMAT, "version": VERSION, **asdict(self)}))

    @classmethod
    def from_dict(cls, data: dict, source: str) -> ModelDescription:
        """Raises ``ValueError`` naming ``source`` when ``data`` is not a model description this
        code can read."""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"{source}: not a brainseg model description (format {data.get('format')!r} "
                             f"where {FORMAT!r} was expected)" if isinstance(data, dict)
                             else f"{source}: not a brainseg model description")
        if data.get("version") != VERSION:
            raise ValueError(f"{source}: model format version {data.get('version')!r}; this code reads version "
                             f"{VERSION}: predict with the code that trained it, or retrain")
        known = {f.name for f in fields(cls)}
        missing = sorted(f.name for f in fields(cls) if f.name not in data
                         and f.default is MISSING and f.default_factory is MISSING)
        if missing:
            raise ValueError(f"{source}: model description lacks {', '.join(missing)}")
        try:
            description = cls(**{name: value for name, value in data.items() if name in known})
            parse_scheme(description.labels, description.regions)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{source}: damaged model description: {err}") from None
        return description
