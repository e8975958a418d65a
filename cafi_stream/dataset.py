"""The dataset view of an output folder, made once its faces are written: identities, top-k per identity,
`metadata.jsonl` (what `datasets.load_dataset("imagefolder", data_dir=OUT)` reads), `report.html` and Parquet."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from .config import Config
from .fusion import ranking_fusion
from .identity import assign_identities, top_per_identity
from .outdir import IMAGE_DIRS, METADATA, PARQUET, TMP_PREFIX, TMP_SUFFIX, OutputDir, atomic_write, writing
from .report import write_report

log = logging.getLogger(__name__)

EXPORTS = ("parquet",)


def read_rows(path: Path) -> list[dict]:
    """Rows of a metadata file; a line cut short by a crash is skipped with a warning."""
    rows = []
    if not path.exists():
        return rows
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            log.warning("%s:%d: skipping an incomplete row", path, n)
    return rows


def write_rows(path: Path, rows: list[dict]) -> None:
    atomic_write(path, "".join(json.dumps(r) + "\n" for r in rows).encode())


def image_files(row: dict) -> list[str]:
    return [row[column] for _, column, _ in IMAGE_DIRS.values() if isinstance(row.get(column), str)]


def finalize(out: OutputDir, rows: list[dict], cfg: Config, exports=(), title: str = "", prune: bool = False
             ) -> list[dict]:
    """Cluster `rows` into identities, keep the top-k per identity if configured (`prune`: delete the files of the
    rows that are dropped), then write metadata.jsonl, report.html and the requested exports. Returns the rows.
    `title` is shown in the report (credentials already redacted)."""
    out_dir = out.root
    assign_identities(rows, cfg.identity.threshold)
    if cfg.identity.per == "identity":
        fusion = ranking_fusion(cfg.rank, any(r.get("iqa_model") for r in rows))
        kept = top_per_identity(rows, cfg.output.topk, fusion, cfg.output.min_gap, cfg.diversity.max_similarity,
                                cfg.diversity.pose_bins)
        if prune:
            keep = {name for r in kept for name in image_files(r)}
            for name in {name for r in rows for name in image_files(r)} - keep:
                out.remove_image(name)
        rows = kept
    with writing(out):
        write_rows(out_dir / METADATA, rows)
        write_report(out_dir, rows, title, by=cfg.identity.per)
        if "parquet" in exports:
            write_parquet(out_dir / PARQUET, out, rows)
        else:   # not a stale table from an earlier run beside new metadata
            (out_dir / PARQUET).unlink(missing_ok=True)
    return rows


def write_parquet(path: Path, out: OutputDir, rows: list[dict]) -> None:
    """Every metadata column plus `image` (the context crop's bytes, a `datasets.Image` feature), so the table
    stands alone: `datasets.load_dataset("parquet", data_files=...)` gives decoded images."""
    import datasets

    datasets.disable_progress_bars()
    table = [dict(r, image={"bytes": out.inside(r["file_name"]).read_bytes(), "path": r["file_name"]}) for r in rows]
    if not table:
        log.warning("%s: no faces to export", path)
    ds = datasets.Dataset.from_list(table).cast_column("image", datasets.Image())
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}{TMP_SUFFIX}")
    ds.to_parquet(str(tmp))
    tmp.replace(path)
