"""Parse annotation files and label maps (docs/EI_SPEC.md "Datasets and annotation format").

One sample per line::

    <modality 1 paths>,<modality 2 paths>[,...]<TAB><label>[,<label>...]

Several images of one modality are separated by spaces. An empty label field means
"no positive label" (a normal case in multi-label data). Blank lines are skipped.
Paths are relative to a data root (absolute paths are kept as they are).

Every problem raises a :class:`DataError` whose message names the file and 1-based line,
so a bad split fails before training starts rather than hours into it.
"""

from __future__ import annotations

import codecs
import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path


class DataError(ValueError):
    """Bad dataset input: annotation line, label map or image file."""


class AnnotationError(DataError):
    """A malformed annotation line or label map."""


class ImageError(DataError):
    """A referenced image or volume is missing or cannot be read."""


def read_utf8(path: Path, error: type[ValueError] = AnnotationError) -> str:
    """The text of a UTF-8 file, without the byte-order mark some Windows editors write. Bytes
    that are not UTF-8 (a file saved as Latin-1 or Windows-1252) raise `error` naming the
    file, line and column."""
    data = Path(path).read_bytes()
    data = data[len(codecs.BOM_UTF8):] if data.startswith(codecs.BOM_UTF8) else data
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - data.rfind(b"\n", 0, e.start)
        raise error(f"{path}:{line}: not UTF-8 text (byte {data[e.start]:#04x} at column "
                    f"{column}); save the file as UTF-8") from None


@dataclass(frozen=True)
class Sample:
    """One annotation line: per modality the image paths as written, and label indices."""

    paths: tuple[tuple[str, ...], ...]
    labels: tuple[int, ...]
    source: str
    line: int

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"


def load_label_map(path: str | Path) -> dict[str, int]:
    """Read a {"label": index} JSON file; indices must be exactly 0..K-1."""
    path = Path(path)
    try:
        data = json.loads(read_utf8(path))
    except json.JSONDecodeError as e:
        raise AnnotationError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict) or not data:
        raise AnnotationError(f'{path}: expected a non-empty JSON object {{"label": index}}')
    return check_label_map(data, str(path))


def check_label_map(label_map: Mapping[str, int], source: str = "label map") -> dict[str, int]:
    """Validate a label map given as a dict; returns a plain copy."""
    for name, index in label_map.items():
        # bool is an int subclass; reject it so `true` in JSON is not read as class 1.
        if not isinstance(name, str) or not isinstance(index, int) or isinstance(index, bool):
            raise AnnotationError(f"{source}: entry {name!r}: {index!r} must map a name to an int")
    indices = sorted(label_map.values())
    if indices != list(range(len(indices))):
        raise AnnotationError(
            f"{source}: indices must be 0..{len(indices) - 1}, each used once; got {indices}"
        )
    return dict(label_map)


def class_names(label_map: Mapping[str, int]) -> list[str]:
    """Class names ordered by index."""
    return sorted(label_map, key=label_map.__getitem__)


def parse_line(
    text: str,
    label_map: Mapping[str, int],
    modalities: Sequence[str],
    multi_label: bool,
    source: str,
    line: int,
    unlabeled: bool = False,
) -> Sample:
    """Parse one non-blank annotation line; raise AnnotationError naming source:line.
    ``unlabeled``: the TAB and labels may be left out (samples to predict)."""

    def fail(what: str) -> AnnotationError:
        return AnnotationError(f"{source}:{line}: {what}: {text!r}")

    fields = text.split("\t")
    if unlabeled and len(fields) == 1:
        fields.append("")
    if len(fields) != 2:
        problem = "no TAB" if len(fields) == 1 else f"{len(fields) - 1} TABs"
        raise fail(f"expected '<paths>\\t<labels>' (exactly one TAB), found {problem}")
    path_field, label_field = fields

    per_modality = path_field.split(",")
    if len(per_modality) != len(modalities):
        raise fail(
            f"expected {len(modalities)} modalities ({', '.join(modalities)}) separated by ',', "
            f"found {len(per_modality)}"
        )
    paths = []
    for name, field in zip(modalities, per_modality):
        images = tuple(field.split())
        if not images:
            raise fail(f"modality {name!r} has no image path")
        paths.append(images)

    labels: list[int] = []
    if label_field.strip():
        for token in label_field.split(","):
            token = token.strip()
            if not token:
                raise fail("empty label between ','")
            if token not in label_map:
                known = ", ".join(class_names(label_map))
                raise fail(f"unknown label {token!r}; known labels: {known}")
            if label_map[token] in labels:
                raise fail(f"label {token!r} listed twice")
            labels.append(label_map[token])
    if not multi_label and len(labels) != 1:
        raise fail(f"single-label data needs exactly one label, found {len(labels)}")
    return Sample(tuple(paths), tuple(labels), source, line)


def read_annotations(
    path: str | Path,
    label_map: Mapping[str, int],
    modalities: Sequence[str],
    multi_label: bool,
    unlabeled: bool = False,
) -> list[Sample]:
    """Parse a whole annotation file; blank lines are skipped, an empty file is an error.
    ``unlabeled``: lines may be paths alone (parse_line)."""
    path = Path(path)
    samples = []
    # (universal newlines, as a file opened as text: \n, \r\n and a lone \r end lines)
    with io.StringIO(read_utf8(path), newline=None) as f:
        for number, raw in enumerate(f, start=1):
            text = raw.rstrip("\r\n")
            if text.strip():
                samples.append(
                    parse_line(text, label_map, modalities, multi_label, str(path), number,
                               unlabeled)
                )
    if not samples:
        raise AnnotationError(f"{path}: no samples")
    return samples
