"""Which series of a study is which sequence, by rules a person can read and change.

The rules (:data:`DEFAULT_RULES`, a YAML file shipped with the package; its header documents the
format) match what a series' headers say about its acquisition: SeriesDescription, ProtocolName,
SequenceName, ImageType, ContrastBolusAgent, MRAcquisitionType and the MR timing. A DICOM SEG is
a label; any other series is first checked against the ``labels`` rules (a label series is often
DERIVED), then the ``ignore`` rules, then each sequence's rules in the file's order; :func:`identify` keeps, per wanted sequence, the best candidate by ``prefer`` and says
for every series what it became and by which rule. Descriptions are free text and may hold a
name: verdicts carry rule names and series numbers with hashed UIDs, never the text matched.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from brainseg.data.quality import IndexedObject
from brainseg.io import s3

DEFAULT_RULES = Path(__file__).with_name("sequence_rules.yaml")
PREFERENCES = ("3d", "slices", "later")
RANGES = {"repetition_time_ms": "repetition_time", "echo_time_ms": "echo_time", "inversion_time_ms": "inversion_time"}
CONDITIONS = ("name", "description", "not_description", "image_type", "contrast_agent", "acquisition", *RANGES)


class RulesError(ValueError):
    """A rules file that cannot be used; the message names the file, the place and what was expected."""


@dataclass(frozen=True)
class Rule:
    """One way of recognising a series; every condition given must hold."""

    name: str
    description: tuple = ()  # compiled patterns, any found
    not_description: tuple = ()  # compiled patterns, none found
    image_type: tuple = ()  # any among ImageType's values
    contrast_agent: bool | None = None
    acquisition: str = ""
    ranges: tuple = ()  # ((header field, low, high), ...), inclusive; None: open

    def holds(self, series: StudySeries) -> bool:
        header, text = series.header, series.searched
        if self.description and not any(pattern.search(text) for pattern in self.description):
            return False
        if any(pattern.search(text) for pattern in self.not_description):
            return False
        if self.image_type and not set(self.image_type) & set(header.image_type.split("\\")):
            return False
        if self.contrast_agent is not None and bool(header.contrast_agent.strip()) != self.contrast_agent:
            return False
        if self.acquisition and header.acquisition_type != self.acquisition:
            return False
        for name, low, high in self.ranges:
            value = getattr(header, name)
            if (low is not None and value < low) or (high is not None and value > high):
                return False
        return True


@dataclass(frozen=True)
class Rules:
    """``ignore`` and ``labels`` rules, each sequence's rules (in the order they are tried) and the tie-break."""

    ignore: tuple = ()
    labels: tuple = ()
    sequences: tuple = ()  # ((sequence, (Rule, ...)), ...)
    prefer: tuple = PREFERENCES
    source: str = "the default sequence rules"

    @property
    def names(self) -> tuple:
        return tuple(name for name, _ in self.sequences)

    def check_sequences(self, sequences: tuple) -> None:
        """Every wanted sequence has rules.

        Raises:
            RulesError: one does not, naming the ones there are.
        """
        unknown = [name for name in sequences if name not in self.names]
        if unknown:
            raise RulesError(f"--sequences names {', '.join(unknown)}, which {self.source} do not define (they define "
                             f"{', '.join(self.names)}); add rules for it with --sequence-rules")


def _patterns(value, where: str) -> tuple:
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not all(isinstance(item, str) for item in values):
        raise RulesError(f"{where}: expected a regular expression or a list of them")
    compiled = []
    for item in values:
        try:
            compiled.append(re.compile(item, re.IGNORECASE))
        except re.error as err:
            raise RulesError(f"{where}: {item!r} is not a regular expression ({err})") from None
    return tuple(compiled)


def _range(value, where: str) -> tuple:
    if not isinstance(value, dict) or not value or set(value) - {"min", "max"}:
        raise RulesError(f"{where}: expected {{min: NUMBER, max: NUMBER}} (either or both)")
    bounds = []
    for key in ("min", "max"):
        bound = value.get(key)
        if bound is not None and (isinstance(bound, bool) or not isinstance(bound, (int, float))):
            raise RulesError(f"{where}.{key}: expected a number, got {bound!r}")
        bounds.append(None if bound is None else float(bound))
    return tuple(bounds)


def _rule(data, where: str) -> Rule:
    if not isinstance(data, dict):
        raise RulesError(f"{where}: expected a mapping of conditions ({', '.join(CONDITIONS)})")
    unknown = sorted(set(data) - set(CONDITIONS))
    if unknown:
        raise RulesError(f"{where}: unknown condition {unknown[0]!r} (expected {', '.join(CONDITIONS)})")
    if not isinstance(data.get("name"), str) or not data["name"].strip():
        raise RulesError(f"{where}: every rule needs a name (what it says in reports)")
    if len(data) == 1:
        raise RulesError(f"{where} ({data['name']}): a rule needs at least one condition besides its name")
    fields = {"name": data["name"].strip()}
    for key in ("description", "not_description"):
        if key in data:
            fields[key] = _patterns(data[key], f"{where}.{key}")
    if "image_type" in data:
        values = [data["image_type"]] if isinstance(data["image_type"], str) else data["image_type"]
        if not isinstance(values, list) or not all(isinstance(item, str) for item in values):
            raise RulesError(f"{where}.image_type: expected a value or a list of ImageType values")
        fields["image_type"] = tuple(item.strip().upper() for item in values)
    if "contrast_agent" in data:
        if not isinstance(data["contrast_agent"], bool):
            raise RulesError(f"{where}.contrast_agent: expected true or false, got {data['contrast_agent']!r}")
        fields["contrast_agent"] = data["contrast_agent"]
    if "acquisition" in data:
        if str(data["acquisition"]).upper() not in ("2D", "3D"):
            raise RulesError(f"{where}.acquisition: expected 2D or 3D, got {data['acquisition']!r}")
        fields["acquisition"] = str(data["acquisition"]).upper()
    fields["ranges"] = tuple((RANGES[key], *_range(data[key], f"{where}.{key}")) for key in RANGES if key in data)
    return Rule(**fields)


def _rule_list(data, where: str) -> tuple:
    if data is None:
        return ()
    if not isinstance(data, list):
        raise RulesError(f"{where}: expected a list of rules")
    return tuple(_rule(item, f"{where}[{index}]") for index, item in enumerate(data))


def parse_rules(text: str, source: str) -> Rules:
    """Rules from YAML ``text`` (read from ``source``, for messages); ``extends: default`` puts them
    before the default rules.

    Raises:
        RulesError: not YAML, or not rules (the place and what was expected).
    """
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise RulesError(f"sequence rules {source}: not valid YAML{at} ({getattr(err, 'problem', None) or err})") from None
    where = f"sequence rules {source}"
    if not isinstance(data, dict):
        raise RulesError(f"{where}: expected a mapping with ignore, labels, sequences and prefer")
    unknown = sorted(set(data) - {"ignore", "labels", "sequences", "prefer", "extends"})
    if unknown:
        raise RulesError(f"{where}: unknown section {unknown[0]!r} (expected ignore, labels, sequences, prefer, extends)")
    sequences = data.get("sequences") or {}
    if not isinstance(sequences, dict) or not all(isinstance(name, str) for name in sequences):
        raise RulesError(f"{where}: sequences: expected a mapping of sequence name to a list of rules")
    prefer = data.get("prefer", list(PREFERENCES))
    if not isinstance(prefer, list) or any(item not in PREFERENCES for item in prefer):
        raise RulesError(f"{where}: prefer: expected a list of {', '.join(PREFERENCES)}, got {prefer!r}")
    rules = Rules(_rule_list(data.get("ignore"), f"{where}: ignore"), _rule_list(data.get("labels"), f"{where}: labels"),
                  tuple((name, _rule_list(items, f"{where}: sequences.{name}")) for name, items in sequences.items()),
                  tuple(prefer), f"the sequence rules {source}")
    extends = data.get("extends")
    if extends is None:
        if not rules.sequences:
            raise RulesError(f"{where}: no sequences defined (or write 'extends: default' to add to the default rules)")
        return rules
    if extends != "default":
        raise RulesError(f"{where}: extends: expected 'default', got {extends!r}")
    base = default_rules()
    merged = dict(base.sequences)
    for name, items in rules.sequences:
        merged[name] = items + merged.get(name, ())
    order = [name for name, _ in rules.sequences] + [name for name in base.names if name not in dict(rules.sequences)]
    return Rules(rules.ignore + base.ignore, rules.labels + base.labels, tuple((name, merged[name]) for name in order),
                 tuple(prefer) if "prefer" in data else base.prefer, f"the sequence rules {source} and the default ones")


def default_rules() -> Rules:
    return parse_rules(DEFAULT_RULES.read_text(), str(DEFAULT_RULES.name))


def load_rules(location: str) -> Rules:
    """The rules at ``location`` (a path or an ``s3://`` URI; empty: the default rules).

    Raises:
        RulesError: the file cannot be read, or holds no usable rules.
    """
    if not location:
        return default_rules()
    try:
        text = s3.read_uri(location) if location.startswith("s3://") else Path(location).read_bytes()
    except (OSError, s3.S3Error) as err:
        raise RulesError(f"sequence rules {location}: cannot be read ({err})") from None
    if text is None:
        raise RulesError(f"sequence rules {location}: no such object")
    try:
        return parse_rules(text.decode("utf-8"), location)
    except UnicodeDecodeError:
        raise RulesError(f"sequence rules {location}: not UTF-8 text") from None


@dataclass(frozen=True)
class StudySeries:
    """One image series of a study: its objects (sorted by key) and its first header."""

    objects: tuple

    @property
    def header(self):
        return self.objects[0].header

    @property
    def slices(self) -> int:
        return sum(obj.header.frames for obj in self.objects)

    @property
    def text(self) -> str:
        """SeriesDescription, ProtocolName and SequenceName as written."""
        header = self.header
        return " | ".join(part for part in (header.description, header.protocol, header.sequence_name) if part)

    @property
    def searched(self) -> str:
        """:attr:`text` as the rules search it: underscores read as spaces (``t2_tirm_flair``)."""
        return self.text.replace("_", " ")

    @property
    def label(self) -> str:
        """How reports name it: the series number and its hashed UID (no free text)."""
        return f"series {self.header.series_number} ({self.header.series_hash[:8]})"

    @property
    def is_segmentation(self) -> bool:
        return self.header.is_segmentation


def group_series(objects: list[IndexedObject]) -> list[StudySeries]:
    """A study's image objects as series (by SeriesInstanceUID hash), in series number order."""
    by_series: dict[str, list[IndexedObject]] = {}
    for obj in sorted(objects, key=lambda o: o.key):
        by_series.setdefault(obj.header.series_hash, []).append(obj)
    return sorted((StudySeries(tuple(items)) for items in by_series.values()),
                  key=lambda s: (s.header.series_number, s.header.series_hash))


@dataclass(frozen=True)
class Verdict:
    """What one series became: ``role`` is a sequence name, ``label``, ``ignored``, ``not chosen``,
    ``not wanted`` (a sequence this run does not use) or ``unmatched``; ``rule`` the rule's name;
    ``text`` the series' own description (free text: for the data owner's report only, never a log)."""

    series: str
    role: str
    rule: str = ""
    detail: str = ""
    text: str = ""

    def to_dict(self) -> dict:
        return {"series": self.series, "role": self.role, "rule": self.rule, "detail": self.detail, "text": self.text}


@dataclass(frozen=True)
class Identified:
    """A study's sequences (``{name: StudySeries}``), its label series, every series' verdict, and
    why it cannot be used ("" when it can)."""

    chosen: dict
    labels: tuple
    verdicts: tuple
    problem: str = ""
    rules_used: dict = field(default_factory=dict)  # sequence -> rule that named the chosen series
    ambiguous: tuple = ()  # the sequences with tied candidates


def _first(rules: tuple, series: StudySeries) -> str:
    return next((rule.name for rule in rules if rule.holds(series)), "")


def _preference(series: StudySeries, prefer: tuple) -> tuple:
    keys = {"3d": series.header.acquisition_type == "3D", "slices": series.slices,
            "later": (series.header.series_day, series.header.series_time, series.header.series_number)}
    return tuple(keys[name] for name in prefer)


def identify(series: list[StudySeries], rules: Rules, wanted: tuple, pooled: bool = False) -> Identified:
    """Name each of a study's series by ``rules`` and keep the best candidate of each ``wanted``
    sequence (by ``rules.prefer``); a tie the preferences cannot break, or several label series,
    is the study's ``problem``. ``pooled``: the series are several studies' (a patient's), and
    only labels drawn in the study of the reference (the first wanted sequence found) count."""
    verdicts: dict[str, Verdict] = {}
    candidates: dict[str, list[tuple[StudySeries, str]]] = {}
    labels = []
    for item in series:
        if item.is_segmentation:
            labels.append(item)
            verdicts[item.label] = Verdict(item.label, "label", "a DICOM SEG object", text=item.text)
            continue
        label = _first(rules.labels, item)
        if label:
            labels.append(item)
            verdicts[item.label] = Verdict(item.label, "label", label, text=item.text)
            continue
        ignored = _first(rules.ignore, item)
        if ignored:
            verdicts[item.label] = Verdict(item.label, "ignored", ignored, text=item.text)
            continue
        named = next(((name, rule) for name, items in rules.sequences if (rule := _first(items, item))), None)
        if named is None:
            verdicts[item.label] = Verdict(item.label, "unmatched", text=item.text)
        elif named[0] not in wanted:
            verdicts[item.label] = Verdict(item.label, "not wanted", named[1], f"a {named[0]} series", item.text)
        else:
            candidates.setdefault(named[0], []).append((item, named[1]))
    chosen, used, problems, ambiguous = {}, {}, [], []
    for name in wanted:
        ranked = sorted(candidates.get(name, []), key=lambda pair: _preference(pair[0], rules.prefer), reverse=True)
        if not ranked:
            continue
        best, rule = ranked[0]
        tied = [other for other, _ in ranked[1:] if _preference(other, rules.prefer) == _preference(best, rules.prefer)]
        if tied:
            ambiguous.append(name)
            problems.append(f"{len(tied) + 1} equally good {name} series ({best.label}, "
                            f"{', '.join(other.label for other in tied)}): {', '.join(rules.prefer)} do not tell them "
                            "apart; keep one, or tell them apart with --sequence-rules")
        chosen[name], used[name] = best, rule
        verdicts[best.label] = Verdict(best.label, name, rule, text=best.text)
        for other, other_rule in ranked[1:]:
            verdicts[other.label] = Verdict(other.label, "not chosen", other_rule,
                                            f"another {name} series ({best.label}) is preferred by "
                                            f"{', '.join(rules.prefer)}", other.text)
    reference = next((chosen[name] for name in wanted if name in chosen), None)
    if pooled and len(labels) > 1 and reference is not None:
        elsewhere = [item for item in labels if item.header.study_hash != reference.header.study_hash]
        for item in elsewhere:
            verdicts[item.label] = Verdict(item.label, "not chosen", verdicts[item.label].rule,
                                           f"drawn in another study than the reference ({reference.label})", item.text)
        labels = [item for item in labels if item not in elsewhere]
    if len(labels) > 1:
        problems.append(f"{len(labels)} label series or SEG objects ({', '.join(item.label for item in labels)}); "
                        "keep one per study")
    ordered = tuple(verdicts[item.label] for item in series)
    return Identified(chosen, tuple(labels), ordered, "; ".join(problems), used, tuple(ambiguous))
