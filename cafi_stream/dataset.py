"""The dataset view of an output folder, made once its faces are written: identities, top-k per identity,
`metadata.jsonl` (what `datasets.load_dataset("imagefolder", data_dir=OUT)` reads), `report.html` and Parquet."""

from __future__ import annotations

import logging
from pathlib import Path

from .config import Config
from .fusion import ranking_fusion
from .identity import assign_identities, top_per_identity
from .outdir import METADATA, PARQUET, OutputDir, atomic_write, replacing, writing
from .report import write_report
from .rows import FaceRow, face_rows_text

log = logging.getLogger(__name__)

EXPORTS = ("parquet",)


def finalize(out: OutputDir, rows: list[FaceRow], cfg: Config, exports=(), title: str = "", prune: bool = False
             ) -> list[FaceRow]:
    """Cluster `rows` into identities, keep the top-k per identity if configured (`prune`: delete the files of the
    rows that are dropped), then write metadata.jsonl, report.html and the requested exports. Returns the rows.
    `title` is shown in the report (credentials already redacted)."""
    out_dir = out.root
    rows = assign_identities(rows, cfg.identity.threshold)
    if cfg.identity.per == "identity":
        fusion = ranking_fusion(cfg.rank, any(r.iqa_model for r in rows))
        kept = top_per_identity(rows, cfg.output.topk, fusion, cfg.output.min_gap, cfg.diversity.max_similarity,
                                cfg.diversity.pose_bins)
        if prune:
            keep = {name for r in kept for name in r.images}
            for name in {name for r in rows for name in r.images} - keep:
                out.remove_image(name)
        rows = kept
    with writing(out):
        atomic_write(out_dir / METADATA, face_rows_text(rows).encode())
        write_report(out_dir, rows, title, by=cfg.identity.per)
        if "parquet" in exports:
            write_parquet(out_dir / PARQUET, out, rows)
        else:   # not a stale table from an earlier run beside new metadata
            (out_dir / PARQUET).unlink(missing_ok=True)
    return rows


def write_parquet(path: Path, out: OutputDir, rows: list[FaceRow]) -> None:
    """Every metadata column plus `image` (the context crop's bytes, a `datasets.Image` feature), so the table
    stands alone: `datasets.load_dataset("parquet", data_files=...)` gives decoded images."""
    import datasets

    datasets.disable_progress_bars()
    table = [dict(r.to_json(), image={"bytes": out.inside(r.file_name).read_bytes(), "path": r.file_name})
             for r in rows]
    if not table:
        log.warning("%s: no faces to export", path)
    ds = datasets.Dataset.from_list(table).cast_column("image", datasets.Image())
    with replacing(path) as tmp:
        ds.to_parquet(str(tmp))
