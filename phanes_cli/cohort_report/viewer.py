"""Per-volume pages: an interactive niivue viewer (inlined) of one case, with its figure, numbers and files.

Why the images are embedded: a page opened from file:// cannot fetch() another local file in Chromium
(file URLs are not fetchable, and the page's origin is opaque), so niivue could not load the NIfTI by
relative path. Each layer is therefore sent inside the page as a small gzipped NIfTI in base64: cropped
to the head's bounding box and stored as uint8 (the anomaly map keeps its true values through the NIfTI
scale factor, so the colour bar reads s(x)). A 1 mm head is about 1-4 MB this way, plus niivue itself
(2.3 MB, `phanes_cli/cohort_report/niivue.umd.js`, see NIIVUE_NOTICE there), so a page is self-contained.
"""

from __future__ import annotations

import base64
import gzip
import html
import os
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import quote

import nibabel as nib
import numpy as np

from phanes_cli.cohort_report.cases import CaseArrays, outline
from phanes_cli.cohort_report.safe import fill, json_for_script, script_body
from phanes_cli.infra.atomic import write_text
from phanes_cli.infra.versions import __version__
from phanes_cli.screening.layout import OUTPUT_KINDS, OutputLayout

NIIVUE_FILE = "niivue.umd.js"


def _nifti_base64(data: np.ndarray, affine: np.ndarray, slope: float = 1.0) -> str:
    image = nib.Nifti1Image(data.astype(np.uint8), affine)
    image.header.set_slope_inter(slope, 0.0)
    return base64.b64encode(gzip.compress(image.to_bytes(), compresslevel=6)).decode("ascii")


def _crop(arrays: CaseArrays) -> tuple[tuple[slice, ...], np.ndarray]:
    """The head's bounding box (non-zero input or brain, 2 voxels of margin) and the cropped grid's affine."""
    support = (arrays.image != 0) | arrays.brain
    if not support.any():
        return tuple(slice(0, n) for n in support.shape), arrays.affine
    found = np.argwhere(support)
    low = np.maximum(found.min(axis=0) - 2, 0)
    high = np.minimum(found.max(axis=0) + 3, support.shape)
    shift = np.eye(4)
    shift[:3, 3] = low
    return tuple(slice(int(a), int(b)) for a, b in zip(low, high, strict=True)), arrays.affine @ shift


def viewer_layers(arrays: CaseArrays) -> list[dict[str, Any]]:
    """The viewer's layers, bottom first: input, anomaly map, lesion mask, brain outline, ground truth."""
    box, affine = _crop(arrays)
    brain_values = arrays.image[arrays.brain]
    window = float(np.percentile(brain_values, 99.5)) if brain_values.size else float(arrays.image.max() or 1.0)
    grey = np.clip(arrays.image[box] / max(window, 1e-6), 0, 1) * 255
    positive = arrays.anomaly[arrays.brain & (arrays.anomaly > 0)]
    top = float(positive.max()) if positive.size else 1.0
    heat_max = float(np.percentile(positive, 99.5)) if positive.size else 1.0
    scaled = np.clip(arrays.anomaly[box], 0, top) / top * 255
    layers = [
        {"key": "t1", "label": "input image", "data": _nifti_base64(grey.round(), affine), "colormap": "gray",
         "cal_min": 0, "cal_max": 255, "opacity": 1.0, "colorbar": False},
        {"key": "anomaly", "label": "anomaly map s(x)", "data": _nifti_base64(scaled.round(), affine, top / 255),
         "colormap": "hot", "cal_min": heat_max * 0.05, "cal_max": heat_max, "opacity": 0.7, "colorbar": True},
        {"key": "lesion", "label": "lesion mask", "data": _nifti_base64(arrays.lesion[box], affine),
         "colormap": "green", "cal_min": 0, "cal_max": 1, "opacity": 0.6, "colorbar": False},
        {"key": "brain", "label": f"brain outline ({arrays.brain_source})",
         "data": _nifti_base64(outline(arrays.brain)[box], affine), "colormap": "blue", "cal_min": 0, "cal_max": 1,
         "opacity": 0.8, "colorbar": False},
    ]
    if arrays.truth is not None:
        layers.append({"key": "truth", "label": "ground truth outline", "colormap": "violet",
                       "data": _nifti_base64(outline(arrays.truth)[box], affine), "cal_min": 0, "cal_max": 1,
                       "opacity": 0.9, "colorbar": False})
    return layers


def _href(path: Path, folder: Path) -> str:
    return html.escape(quote(os.path.relpath(path, folder).replace(os.sep, "/")))


def _file_links(layout: OutputLayout, row: dict[str, Any], folder: Path) -> str:
    items = []
    source = Path(str(row.get("input_path")))
    if source.is_absolute():
        items.append(f'<li><a href="{html.escape(source.as_uri())}">input image</a></li>')
    for kind in OUTPUT_KINDS:
        path = layout.map_path(row["id"], kind)
        if path.is_file():
            items.append(f'<li><a href="{_href(path.resolve(), folder.resolve())}">{kind} map</a></li>')
    return "<ul>" + "".join(items) + "</ul>"


def _metrics(shown: dict[str, Any]) -> str:
    cells = "".join(f"<tr><th>{html.escape(c)}</th><td>{html.escape('' if v is None else str(v))}</td></tr>"
                    for c, v in shown.items() if c != "id")
    return f'<table class="metrics">{cells}</table>'


def _toggles(layers: list[dict[str, Any]]) -> str:
    return "".join(f'<label><input type="checkbox" id="show-{layer["key"]}" checked> {html.escape(layer["label"])}'
                   f"</label>" for layer in layers[1:])


def _figure_tag(figure: str) -> str:
    return f'<img class="figure" alt="static QC figure" src="data:image/png;base64,{figure}">'


def write_case_page(target: Path, index: Path, layout: OutputLayout, row: dict[str, Any], arrays: CaseArrays,
                    figure: str, shown: dict[str, Any]) -> Path:
    """Write one volume's page (`target`); `index` is the cohort page it links back to, `figure` its static
    figure (base64 PNG), `shown` its numbers."""
    layers = viewer_layers(arrays)
    centre_mm = (arrays.affine @ np.array([*arrays.centre, 1.0]))[:3]
    payload = {"layers": [{k: v for k, v in layer.items() if k != "label"} for layer in layers],
               "centre_mm": [round(float(v), 3) for v in centre_mm], "centre_voxel": list(arrays.centre)}
    package = resources.files("phanes_cli.cohort_report")
    fields = {
        "TITLE": html.escape(f"phanes: {row['id']}"),
        "BACK": _href(index.resolve(), target.parent.resolve()),
        "TOGGLES": _toggles(layers),
        "NOTES": "".join(f'<p class="error">{html.escape(note)}</p>' for note in arrays.notes),
        "METRICS": _metrics(shown),
        "FILES": _file_links(layout, row, target.parent),
        "FIGURE": _figure_tag(figure),
        "NIIVUE": script_body(package.joinpath(NIIVUE_FILE).read_text(encoding="utf-8"), NIIVUE_FILE),
        "DATA": json_for_script(payload),
        "VERSION": html.escape(__version__),
    }
    write_text(target, fill(package.joinpath("viewer.html").read_text(encoding="utf-8"), fields))
    return target
