"""A profile of a catalogued dataset: what a person checks before training on it."""

from __future__ import annotations

from collections import Counter

import numpy as np

from brainseg.data.catalog import Catalog
from brainseg.data.contours import LEFT_OUT, ContourMask
from brainseg.data.splits import SPLITS
from brainseg.data.studies import rule_counts_line
from brainseg.dicom.pixel_location import NATIVE_SYNTAXES

SYNTAX_NAMES = {
    "1.2.840.10008.1.2": "Implicit VR Little Endian",
    "1.2.840.10008.1.2.1": "Explicit VR Little Endian",
    "1.2.840.10008.1.2.2": "Explicit VR Big Endian",
    "1.2.840.10008.1.2.5": "RLE Lossless",
    "1.2.840.10008.1.2.4.90": "JPEG 2000 Lossless",
    "1.2.840.10008.1.2.4.80": "JPEG-LS Lossless",
    "1.2.840.10008.1.2.4.70": "JPEG Lossless SV1",
}


def _quantiles(values: list[float]) -> dict:
    if not values:
        return {}
    q = np.percentile(values, [0, 25, 50, 75, 100])
    return {name: round(float(v), 3) for name, v in zip(("min", "p25", "median", "p75", "max"), q)}


def profile_catalog(catalog: Catalog) -> dict:
    """Counts, shapes, spacings, intensities, tumour volumes and exclusions, as plain JSON types."""
    usable = catalog.cases
    syntaxes = Counter()
    layouts = Counter()
    padded = 0
    labels = Counter()
    for case in usable:
        for series in case.images:
            for header in series.headers if series is not None else ():
                syntaxes[SYNTAX_NAMES.get(header.transfer_syntax, header.transfer_syntax)] += 1
                padded += header.padding_bytes > 1  # beyond the byte that evens an odd length
        layouts["multi-frame" if len(case.image.headers) == 1 and case.image.headers[0].frames > 1
                else "single-frame"] += 1
        labels.update({str(value): 1 for value, _ in case.summary.label_counts})
    sequences = [stats.sequence for stats in usable[0].summary.intensities] if usable else []
    return {
        "uri": catalog.uri,
        "fingerprint": catalog.fingerprint,
        "cases": len(usable) + len(catalog.exclusions),
        "usable": len(usable),
        "excluded": len(catalog.exclusions),
        "splits": {name: len(catalog.split(name)) for name in SPLITS},
        "shapes": dict(Counter("x".join(map(str, case.image.shape)) for case in usable).most_common()),
        "spacings_mm": dict(Counter("x".join(f"{v:.3g}" for v in case.image.spacing) for case in usable).most_common()),
        "layouts": dict(layouts),
        "transfer_syntaxes": dict(syntaxes),
        "padded_objects": padded,  # trailing bytes after the pixels (accepted, never read)
        "compressed_objects": sum(n for name, n in syntaxes.items() if name not in
                                  {SYNTAX_NAMES[s] for s in NATIVE_SYNTAXES}),
        "intensity": {sequence: {
            "min": min((case.summary.intensities[c].minimum for case in usable), default=None),
            "max": max((case.summary.intensities[c].maximum for case in usable), default=None),
            "p0.5": _quantiles([case.summary.intensities[c].low for case in usable]),
            "p99.5": _quantiles([case.summary.intensities[c].high for case in usable]),
        } for c, sequence in enumerate(sequences)},
        "zero_filled": {case.case_id: list(case.missing) for case in usable if case.missing},
        "resampled": {case.case_id: {name: volume.describe() for name, volume in case.resampled.items()}
                      for case in usable if case.resampled},
        "cases_with_label": dict(sorted(labels.items(), key=lambda item: int(item[0]))),
        "tumour_ml": _quantiles([case.summary.tumour_ml for case in usable]),
        "tumour_fraction_percent": _quantiles([100.0 * case.summary.tumour_voxels / np.prod(case.image.shape)
                                               for case in usable]),
        "lesions_per_case": lesion_profile(usable, sorted(labels, key=int)),
        "structure_sets": structure_set_profile(usable),
        "exclusions": [{"case_id": item.case_id, "reason": item.reason} for item in catalog.exclusions],
        "skipped_objects": [{"case_id": case.case_id, "object": item.split(": ", 1)[0], "reason": item.split(": ", 1)[1]}
                            for case in sorted((*catalog.cases, *catalog.exclusions), key=lambda c: c.case_id)
                            for item in case.skipped],
        "index": catalog.index_stats,
        "layout": catalog.layout,
        **({"sequences_found": {name: dict(counts) for name, counts in catalog.discovery.by_rule.items()},
            "studies": {case_id: [verdict.to_dict() for verdict in verdicts]
                        for case_id, verdicts in catalog.discovery.verdicts.items()},
            "left_out_objects": catalog.discovery.left_out} if catalog.discovery is not None else {}),
    }


def structure_set_profile(cases: list) -> dict:
    """The cases labelled by an RT Structure Set, what their mapped ROIs lost when rasterised
    (point and open contours, one- or two-point closed contours, ROIs left empty, ROIs clipped to
    the volume), summed and per case, and each case's notes in words."""
    masks = {case.case_id: case.mask.native for case in cases
             if case.mask is not None and isinstance(case.mask.native, ContourMask)}
    left_out = Counter()
    for mask in masks.values():
        left_out.update(dict(mask.left_out))
    return {"cases": len(masks), "left_out": {what: left_out[what] for what in LEFT_OUT},
            "notes": {case_id: list(mask.notes) for case_id, mask in masks.items() if mask.notes}}


def lesion_profile(cases: list, values: list[str]) -> dict:
    """Per label set (every tumour label together, then each value alone): the distribution of the
    lesions per case (26-connected components over 50 mm³) and how many cases hold several; the
    cases whose summaries carry no count are left out and counted."""
    sets = {"tumour": None, **{f"value {value}": frozenset({int(value)}) for value in values}}
    out = {}
    for name, chosen in sets.items():
        counts = [case.summary.lesions_of(chosen) for case in cases]
        known = [count for count in counts if count is not None]
        out[name] = {**_quantiles(known), "cases_with_several": sum(count > 1 for count in known),
                     "uncounted": len(counts) - len(known)}
    return out


def format_profile(profile: dict) -> str:
    """The profile as text for a terminal."""
    lines = [
        f"dataset     {profile['uri']}  (fingerprint {profile['fingerprint']})",
        f"cases       {profile['cases']} total, {profile['usable']} usable, {profile['excluded']} excluded",
        "splits      " + ", ".join(f"{name} {count}" for name, count in profile["splits"].items()),
        "shapes      " + ", ".join(f"{shape} ({n})" for shape, n in profile["shapes"].items()),
        "spacing mm  " + ", ".join(f"{spacing} ({n})" for spacing, n in profile["spacings_mm"].items()),
        "layout      " + ", ".join(f"{layout} ({n})" for layout, n in profile["layouts"].items()),
        "syntaxes    " + ", ".join(f"{name} ({n} objects)" for name, n in profile["transfer_syntaxes"].items()),
        *(f"intensity   {name}: min {stats['min']}, max {stats['max']}, p99.5 median {stats['p99.5'].get('median')}"
          for name, stats in profile["intensity"].items()),
        "labels      " + ", ".join(f"value {value} in {n} case(s)" for value, n in profile["cases_with_label"].items()),
        "tumour ml   " + ", ".join(f"{k} {v}" for k, v in profile["tumour_ml"].items()),
        "tumour %    " + ", ".join(f"{k} {v}" for k, v in profile["tumour_fraction_percent"].items()),
        *(f"lesions     {name}: median {stats.get('median')}, max {stats.get('max')}, "
          f"{stats['cases_with_several']} case(s) with several" for name, stats in profile["lesions_per_case"].items()),
        f"indexing    {profile['index']}",
    ]
    if profile["padded_objects"]:
        lines.append(f"padded      {profile['padded_objects']} object(s) declare Pixel Data with trailing padding "
                     "(accepted; the padding is never read)")
    if profile["zero_filled"]:
        lines.append(f"zero-filled sequences: {len(profile['zero_filled'])} case(s)")
        lines += [f"  {case_id}: {', '.join(names)}" for case_id, names in profile["zero_filled"].items()]
    if "studies" in profile:
        lines.append("sequences   found by their headers (studies per rule):")
        lines += ["  " + rule_counts_line(name, counts) for name, counts in profile["sequences_found"].items()]
        if profile["left_out_objects"]:
            lines.append("  left out: " + ", ".join(f"{n} object(s) {why}" for why, n in profile["left_out_objects"].items()))
        lines.append("series of each study (description as written; this report is for the data's owner):")
        for case_id, verdicts in profile["studies"].items():
            lines.append(f"  {case_id}")
            lines += [f"    {v['series']:<22} {v['role']:<11} {v['rule'] or '-':<32} {v['text']!r}"
                      + (f"  ({v['detail']})" if v["detail"] else "") for v in verdicts]
    if profile["resampled"]:
        lines.append(f"own grids   {len(profile['resampled'])} case(s) hold series on grids of their own, read "
                     "through their geometry onto the first sequence's:")
        lines += [f"  {case_id}: " + "; ".join(f"{name} {text}" for name, text in grids.items())
                  for case_id, grids in profile["resampled"].items()]
    if profile["structure_sets"]["cases"]:
        counted = profile["structure_sets"]["left_out"]
        lines.append(f"contours    {profile['structure_sets']['cases']} case(s) labelled by a structure set; left out: "
                     + (", ".join(f"{n} {what}" for what, n in counted.items() if n) or "nothing"))
        lines += [f"  {case_id}: {note}" for case_id, notes in profile["structure_sets"]["notes"].items()
                  for note in notes]
    if profile["exclusions"]:
        lines.append("excluded:")
        lines += [f"  {item['case_id']}: {item['reason']}" for item in profile["exclusions"]]
    if profile["skipped_objects"]:
        lines.append(f"skipped (not images; their cases are kept): {len(profile['skipped_objects'])} object(s)")
        lines += [f"  {item['case_id']}/{item['object']}: {item['reason']}" for item in profile["skipped_objects"]]
    return "\n".join(lines)
