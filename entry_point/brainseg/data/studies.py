"""Cases found by their headers, not folder names: the ``studies`` layout.

A dataset may be any tree of DICOM objects (a PACS export: objects named by UIDs or numbers, flat
or nested to any depth, many series per study). Once every object's header is indexed,
:func:`discover_studies` groups the image objects by study (StudyInstanceUID, hashed), each study's
objects by series, names the series by the sequence rules (:mod:`brainseg.data.identify`), and hands
the catalog the same ``{case: {sequence: objects, "mask": objects}}`` grouping the folder layout
has. A case is a study; its ID is ``study-`` and twelve digits of the study's keyed hash (no UID,
no text from the headers). With ``case_per="patient"`` a case is a patient (``patient-`` and their
keyed hash): every study of theirs pooled, each sequence its best series by the rules, the later
one (by SeriesDate and time) where they tie, and the label the one drawn in the study of the
reference sequence where there are several. An RT Structure Set is the label of the case holding
the series it references; other non-image objects (a DICOMDIR, reports) are counted and left out.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from brainseg.data.identify import Rules, group_series, identify
from brainseg.data.listing import Listing

logger = logging.getLogger(__name__)

CASE_PREFIX = "study-"
PATIENT_PREFIX = "patient-"
CASE_DIGITS = 12
CASES_PER = ("study", "patient")


def case_id_of(study_hash: str) -> str:
    return CASE_PREFIX + study_hash[:CASE_DIGITS]


def _case_of(header, case_per: str) -> str:
    """The case a header's object belongs to ("" when its study or patient is not identified)."""
    if case_per == "patient":
        return PATIENT_PREFIX + header.patient_hash[:CASE_DIGITS] if header.patient_hash else ""
    return case_id_of(header.study_hash) if header.study_hash else ""


@dataclass(frozen=True)
class Discovery:
    """What the headers said: each study's verdicts per series (``{case_id: [Verdict]}``), the
    studies that cannot be used and why, and the counts: per sequence, the studies each rule named
    it in, and the objects left out (non-image, unreadable, no StudyInstanceUID)."""

    verdicts: dict = field(default_factory=dict)
    reasons: dict = field(default_factory=dict)
    by_rule: dict = field(default_factory=dict)  # sequence -> {rule: studies}
    left_out: dict = field(default_factory=dict)  # why -> objects

    def table(self) -> list[str]:
        """One line per sequence (:func:`rule_counts_line`; rule names and counts only: safe for a job's log)."""
        return [rule_counts_line(name, counts) for name, counts in self.by_rule.items()]


def rule_counts_line(name: str, counts: Mapping[str, int]) -> str:
    """``flair: 412 by 'description FLAIR', 9 by 'inversion time', 3 ambiguous``: how many studies
    each rule named ``name`` in (``counts``: ``{rule: studies}``, ``(missing)`` and ``(ambiguous)``
    among them), most first, then those it is missing or ambiguous in."""
    ordered = sorted(counts.items(), key=lambda item: -item[1])
    parts = [f"{n} by {rule!r}" for rule, n in ordered if not rule.startswith("(")]
    parts += [f"{n} {rule.strip('()')}" for rule, n in ordered if rule.startswith("(")]
    return f"{name}: " + ", ".join(parts)


def discover_studies(listed: Listing, objects: dict, rules: Rules, zero_fill: bool = False,
                     structure_sets: dict | None = None, case_per: str = "study") -> tuple[Listing, Discovery]:
    """``listed`` (the ``studies`` layout: every object loose) grouped into cases, a study each (or
    a patient each, ``case_per="patient"``), whose wanted sequences (``listed.sequences``) and label
    series are found by ``rules``; ``objects`` are the indexed objects by key. An RT Structure Set
    (``structure_sets``: parsed, by key) belongs to the case holding a series it references, and
    is that case's label. A case lacking a wanted sequence is excluded unless ``zero_fill`` (and it
    has at least one)."""
    if case_per not in CASES_PER:
        raise ValueError(f"case_per {case_per!r}: expected one of {', '.join(CASES_PER)}")
    rules.check_sequences(listed.sequences)
    infos = {info.key: info for info in listed.loose}
    structure_sets = structure_sets or {}
    studies: dict[str, list] = {}
    left_out: Counter = Counter()
    headers = [obj.header for obj in objects.values() if not obj.stray and obj.header is not None]
    case_of_series = {header.series_hash: case for header in headers if (case := _case_of(header, case_per))}
    study_of_series = {header.series_hash: header.study_hash for header in headers}
    drawn: dict[str, list] = {}  # case_id -> keys of the structure sets referencing its series
    for key, structure_set in sorted(structure_sets.items()):
        found = sorted({case_of_series[series] for series in structure_set.series_frames if series in case_of_series})
        if len(found) == 1:
            drawn.setdefault(found[0], []).append(key)
        else:
            left_out["RT Structure Set referencing " + ("no series of these studies" if not found
                                                       else f"series of several {case_per}s")] += 1
    for key in sorted(infos):
        obj = objects[key]
        if key in structure_sets:
            continue
        if obj.stray:
            left_out["not an image (" + obj.error.split(":")[0] + ")"] += 1
        elif obj.header is None:
            left_out["unreadable image object"] += 1
        elif case_id := _case_of(obj.header, case_per):
            studies.setdefault(case_id, []).append(obj)
        else:
            left_out["no PatientID" if case_per == "patient" else "no StudyInstanceUID"] += 1
    grouped, verdicts, reasons = {}, {}, {}
    by_rule: dict[str, Counter] = {name: Counter() for name in listed.sequences}
    for case_id, members in sorted(studies.items()):
        found = identify(group_series(members), rules, listed.sequences, pooled=case_per == "patient")
        verdicts[case_id] = found.verdicts
        for name in listed.sequences:
            by_rule[name]["(ambiguous)" if name in found.ambiguous else found.rules_used[name] if name in found.chosen
                          else "(missing)"] += 1
        missing = [name for name in listed.sequences if name not in found.chosen]
        structure_sets_here = drawn.get(case_id, [])
        reference = next((found.chosen[name] for name in listed.sequences if name in found.chosen), None)
        if case_per == "patient" and reference is not None and len(found.labels) + len(structure_sets_here) > 1:
            study = reference.header.study_hash  # of several studies' structure sets, the reference's study's
            structure_sets_here = [key for key in structure_sets_here
                                   if any(study_of_series.get(series) == study
                                          for series in structure_sets[key].series_frames)]
        if found.problem:
            reasons[case_id] = found.problem
        elif len(found.labels) + len(structure_sets_here) > 1:
            reasons[case_id] = (f"{len(found.labels) + len(structure_sets_here)} labels: {len(found.labels)} label "
                                f"series or SEG object(s) and {len(structure_sets_here)} RT Structure Set(s); keep "
                                "one per study")
        elif missing and (len(missing) == len(listed.sequences) or not zero_fill):
            reasons[case_id] = (f"no series identified as {', '.join(missing)} among its {len(found.verdicts)} series "
                                f"({_summary(found.verdicts)}); name it with --sequence-rules"
                                + (", or zero-fill it with --missing-sequences zero" if len(missing) < len(listed.sequences)
                                   else ""))
        grouped[case_id] = {name: [infos[obj.key] for obj in found.chosen[name].objects] if name in found.chosen
                            else [] for name in listed.sequences}
        grouped[case_id]["mask"] = ([infos[obj.key] for item in found.labels[:1] for obj in item.objects]
                                    or [infos[key] for key in structure_sets_here[:1]])
    if left_out:
        logger.info("studies layout: left out %s", ", ".join(f"{n} object(s): {why}" for why, n in left_out.items()))
    usable = {case_id: parts for case_id, parts in grouped.items() if case_id not in reasons}
    return (replace(listed, grouped=usable, loose=()),
            Discovery(verdicts, reasons, by_rule, dict(left_out)))


def _summary(verdicts) -> str:
    """``3 ignored (localiser, diffusion), 2 unmatched``: what became of a study's series."""
    roles: dict[str, list] = {}
    for verdict in verdicts:
        roles.setdefault(verdict.role, []).append(verdict.rule)
    return ", ".join(f"{len(rules)} {role}" + (f" ({', '.join(sorted({r for r in rules if r}))})" if any(rules) else "")
                     for role, rules in roles.items())
