"""Per-volume pages: an interactive niivue viewer (inlined) of one case, with its figure, numbers and files.

Why the images are embedded: a page opened from file:// cannot fetch() another local file in Chromium
(file URLs are not fetchable, and the page's origin is opaque), so niivue could not load the NIfTI by
relative path. Each layer is therefore sent inside the page as a small gzipped NIfTI in base64: cropped
to the brain (`cases.crop_to_brain`) and stored as uint8 (the anomaly map keeps its true values through the NIfTI
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
from phanes_cli.cohort_report.display import within_budget
from phanes_cli.cohort_report.safe import fill, json_for_script, script_body
from phanes_cli.infra.atomic import write_text
from phanes_cli.infra.versions import __version__
from phanes_cli.run_folder.layout import OUTPUT_KINDS, OutputLayout

NIIVUE_FILE = "niivue.umd.js"
LESIONS_LISTED = 50


def _nifti_base64(data: np.ndarray, affine: np.ndarray, slope: float = 1.0) -> str:
    image = nib.Nifti1Image(data.astype(np.uint8), affine)
    image.header.set_slope_inter(slope, 0.0)
    return base64.b64encode(gzip.compress(image.to_bytes(), compresslevel=6)).decode("ascii")


def viewer_layers(arrays: CaseArrays) -> list[dict[str, Any]]:
    """The viewer's layers, bottom first: input, anomaly map, lesion mask, brain outline, ground truth."""
    affine = arrays.affine  # the case is already cropped to the brain
    brain_values = arrays.image[arrays.brain]
    window = float(np.percentile(brain_values, 99.5)) if brain_values.size else float(arrays.image.max() or 1.0)
    grey = np.clip(arrays.image / max(window, 1e-6), 0, 1) * 255
    positive = arrays.anomaly[arrays.brain & (arrays.anomaly > 0)]
    top = float(positive.max()) if positive.size else 1.0
    heat_max = float(np.percentile(positive, 99.5)) if positive.size else 1.0
    scaled = np.clip(arrays.anomaly, 0, top) / top * 255
    layers = [
        {"key": "t1", "label": "input image", "data": _nifti_base64(grey.round(), affine), "colormap": "gray",
         "cal_min": 0, "cal_max": 255, "opacity": 1.0, "colorbar": False},
        {"key": "anomaly", "label": "anomaly map s(x)", "data": _nifti_base64(scaled.round(), affine, top / 255),
         "colormap": "hot", "cal_min": heat_max * 0.05, "cal_max": heat_max, "opacity": 0.7, "colorbar": True},
        {"key": "lesion", "label": "lesion mask", "data": _nifti_base64(arrays.lesion, affine),
         "colormap": "green", "cal_min": 0, "cal_max": 1, "opacity": 0.6, "colorbar": False},
        {"key": "brain", "label": f"brain outline ({arrays.brain_source})",
         "data": _nifti_base64(outline(arrays.brain), affine), "colormap": "blue", "cal_min": 0, "cal_max": 1,
         "opacity": 0.8, "colorbar": False},
    ]
    if arrays.truth is not None:
        layers.append({"key": "truth", "label": "ground truth outline", "colormap": "violet",
                       "data": _nifti_base64(outline(arrays.truth), affine), "cal_min": 0, "cal_max": 1,
                       "opacity": 0.9, "colorbar": False})
    return layers


def _href(path: Path, folder: Path) -> str:
    return html.escape(quote(os.path.relpath(path, folder).replace(os.sep, "/")))


def _file_links(layout: OutputLayout, row: dict[str, Any], folder: Path) -> str:
    items = []
    source = Path(str(row.get("input_path")))
    if source.is_absolute():
        items.append(f'<li><a href="{html.escape(source.as_uri())}">input image</a></li>')
    for kind in (*OUTPUT_KINDS, "brain_mask"):
        path = layout.map_path(row["id"], kind)
        if path.is_file():
            name = "brain mask used" if kind == "brain_mask" else f"{kind} map"
            items.append(f'<li><a href="{_href(path.resolve(), folder.resolve())}">{name}</a></li>')
    return "<ul>" + "".join(items) + "</ul>"


def _metrics(shown: dict[str, Any]) -> str:
    cells = "".join(f"<tr><th>{html.escape(c)}</th><td>{html.escape('' if v is None else str(v))}</td></tr>"
                    for c, v in shown.items() if c != "id")
    return f'<table class="metrics">{cells}</table>'


def lesion_list(lesions: list[dict[str, Any]]) -> str:
    """The volume's lesions, largest first: size and place (location, CSF contact and share), when known."""
    if not lesions:
        return ""
    rows = []
    for lesion in lesions[:LESIONS_LISTED]:
        fraction = lesion.get("csf_fraction")
        cells = [str(lesion.get("lesion_index")), f"{lesion.get('volume_ml') or 0.0:.3f}",
                 str(lesion.get("location") or "n/a").replace("_", " "), str(lesion.get("csf_contact") or "n/a"),
                 "n/a" if fraction is None else f"{fraction:.0%}"]
        rows.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    more = len(lesions) - LESIONS_LISTED
    note = f'<p class="note">{more} smaller lesions not listed (lesions.parquet has them all).</p>' if more > 0 else ""
    return ('<table class="lesions"><caption>Lesions</caption><tr><th>#</th><th>mL</th><th>location</th>'
            f"<th>CSF contact</th><th>CSF share</th></tr>{''.join(rows)}</table>{note}")


def _toggles(layers: list[dict[str, Any]]) -> str:
    return "".join(f'<label><input type="checkbox" id="show-{layer["key"]}" checked> {html.escape(layer["label"])}'
                   f"</label>" for layer in layers[1:])


def _figure_tag(figure: str) -> str:
    return f'<img class="figure" alt="static QC figure" src="data:image/png;base64,{figure}">'


def write_case_page(target: Path, index: Path, layout: OutputLayout, row: dict[str, Any], arrays: CaseArrays,
                    figure: str, shown: dict[str, Any], lesions: list[dict[str, Any]]) -> Path:
    """Write one volume's page (`target`); `index` is the cohort page it links back to, `figure` its static
    figure (base64 PNG), `shown` its numbers, `lesions` its lesions.parquet rows (listed with their place)."""
    arrays = within_budget(arrays)  # coarser voxels above the page's budget, said in its notes
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
        "METRICS": _metrics(shown) + lesion_list(lesions),
        "FILES": _file_links(layout, row, target.parent),
        "FIGURE": _figure_tag(figure),
        "NIIVUE": script_body(package.joinpath(NIIVUE_FILE).read_text(encoding="utf-8"), NIIVUE_FILE),
        "DATA": json_for_script(payload),
        "VERSION": html.escape(__version__),
    }
    write_text(target, fill(package.joinpath("viewer.html").read_text(encoding="utf-8"), fields))
    return target
