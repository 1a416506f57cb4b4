"""mkdocs hook: one page per registered model, generated from the registry and the
configuration record at build time (so the site can never disagree with the code).

Each page gives the paper, the input, the parameter count next to the paper's Table 1, the
configuration record (every setting with its source) and the class docstring, which lists
every deliberate difference from the original code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

_MODELS: list[str] = []


def _models() -> list[str]:
    if not _MODELS:
        import hest2sge

        _MODELS.extend(hest2sge.list_models())
    return _MODELS


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_fmt(v)}" for k, v in value.items()) or "-"
    if value is None:
        return "-"
    return str(value)


def _cell(text: Any) -> str:
    return _fmt(text).replace("|", "\\|").replace("\n", " ")


def _model_page(name: str) -> str:
    import hest2sge
    from hest2sge.models.configs import get_record
    from hest2sge.registry import get_model_class

    cls = get_model_class(name)
    info = hest2sge.model_info(name)
    rec = get_record(name)
    paper = info["paper_parameters"]
    ratio = "" if not paper else f" ({100 * (info['parameters'] / paper - 1):+.1f} %)"
    lines = [
        f"# `{name}`: {cls.__name__}",
        "",
        f"**Paper:** {info['paper'] or '-'}",
        "",
        "| | |",
        "|---|---|",
        f"| input mode | `{info['input_mode']}` |",
        f"| patch size | {info['patch_size']} px |",
        f"| target transform | `{_cell(info['target_transform'])}` |",
        f"| trainable parameters at 785 genes | {info['parameters'] / 1e6:.2f} M{ratio} |",
        f"| Table 1 of the benchmark paper | {'-' if not paper else f'{paper / 1e6:g} M'} |",
        f"| all parameters (incl. frozen) | {info['parameters_total'] / 1e6:.2f} M |",
        "",
        "## Paper configuration (the configuration record)",
        "",
        "`hest2sge.load(name)`, `hest2sge fit --config examples/configs/<name>.yaml`,",
        "`hest2sge models` and the benchmark all build this configuration.",
        "",
        "| setting | value | source |",
        "|---|---|---|",
    ]
    src = dict(rec.sources)
    rows: list[tuple[str, Any]] = list(rec.model.items())
    rows += [("max_epochs", rec.max_epochs), ("batch_size", rec.batch_size or "one slide"),
             ("checkpoint", f"best {rec.monitor} ({rec.monitor_mode})" if rec.monitor
              else "last epoch"),
             ("early_stopping", dict(rec.early_stopping) if rec.early_stopping else None),
             ("augment", rec.augment), ("target_transform", dict(rec.target_transform))]
    for key, value in rows:
        source = src.get(key) or src.get("monitor" if key == "checkpoint" else key, "")
        lines.append(f"| `{key}` | `{_cell(value)}` | {_cell(source)} |")
    if rec.from_scratch:
        lines += [
            "",
            "**Without pretrained weights** (`pretrained=False`) the paper settings assume "
            "pretrained weights; the record's from-scratch alternative is "
            f"`{_cell(dict(rec.from_scratch))}` ({_cell(src.get('from_scratch', ''))}).",
        ]
    lines += [
        "",
        "## Class documentation, with every deliberate difference from the original",
        "",
        f"::: {cls.__module__}.{cls.__name__}",
        "    options:",
        "      show_root_heading: false",
        "      members: false",
        "",
    ]
    return "\n".join(lines)


def _index_page() -> str:
    import hest2sge

    lines = [
        "# Models",
        "",
        "Every registered model, in its paper configuration (parameters at the 785-gene HER2+",
        "panel, trainable only, as the benchmark paper's Table 1 counts them). The same table",
        "prints with `hest2sge models`.",
        "",
        "| name | class | input | patch | parameters | Table 1 | target |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in _models():
        info = hest2sge.model_info(name)
        paper = info["paper_parameters"]
        lines.append(
            f"| [`{name}`]({name}.md) | {info['class']} | {info['input_mode']} | "
            f"{info['patch_size']} | {info['parameters'] / 1e6:.2f} M | "
            f"{'-' if not paper else f'{paper / 1e6:g} M'} | "
            f"`{info['target_transform'].get('kind', '')}` |"
        )
    return "\n".join(lines) + "\n"


def _notebooks(config: Any) -> list[Path]:
    root = Path(config["config_file_path"]).resolve().parent
    return sorted((root / "examples" / "notebooks").glob("*.py"))


def _notebook_page(path: Path) -> str:
    """A notebook (jupytext percent script) as a Markdown page: its Markdown cells as text,
    its code cells as Python blocks (not executed at build time; the test suite runs them)."""
    import jupytext

    nb = jupytext.read(path)
    parts = [f"<!-- generated from examples/notebooks/{path.name} -->", ""]
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            parts += [cell.source, ""]
        elif cell.source.strip():
            parts += ["```python", cell.source, "```", ""]
    parts += [f"*Source: `examples/notebooks/{path.name}` (a jupytext percent script: open it "
              "in Jupyter with jupytext installed, or run `jupytext --to ipynb` on it).*", ""]
    return "\n".join(parts)


def on_config(config: Any) -> Any:
    """Expand the ``Models`` and ``Notebooks`` nav entries into one page per model/notebook."""
    nav = config["nav"] or []
    for i, entry in enumerate(nav):
        if isinstance(entry, dict) and entry.get("Models") == "models/index.md":
            pages = [{"Overview": "models/index.md"}]
            pages += [{name: f"models/{name}.md"} for name in _models()]
            nav[i] = {"Models": pages}
        if isinstance(entry, dict) and entry.get("Notebooks") == "notebooks":
            nav[i] = {"Notebooks": [{p.stem.split("_", 1)[-1].replace("_", " ").capitalize():
                                     f"notebooks/{p.stem}.md"} for p in _notebooks(config)]}
    return config


def on_files(files: Files, config: Any) -> Files:
    """Add the generated model pages."""
    files.append(File.generated(config, "models/index.md", content=_index_page()))
    for name in _models():
        files.append(File.generated(config, f"models/{name}.md", content=_model_page(name)))
    for path in _notebooks(config):
        files.append(File.generated(config, f"notebooks/{path.stem}.md",
                                    content=_notebook_page(path)))
    return files
