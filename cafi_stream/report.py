"""`report.html`: a contact sheet of the kept faces, one row per identity (or per track), with scores and times.
Image paths are relative, so the folder can be moved or served as is."""

from __future__ import annotations

import html
from collections import defaultdict
from pathlib import Path
from urllib.parse import quote

from .outdir import REPORT, atomic_write
from .rows import FaceRow

_STYLE = """body{font:13px system-ui,sans-serif;margin:16px;background:#fafafa;color:#222}
h1{font-size:18px}table{border-collapse:collapse}td,th{border-bottom:1px solid #ddd;padding:6px;vertical-align:top}
th{text-align:left;white-space:nowrap;font-weight:600}figure{display:inline-block;margin:0 6px 6px 0;width:132px}
img{width:128px;height:128px;object-fit:cover;border:1px solid #ccc;background:#eee}
figcaption{font-size:11px;line-height:1.3;color:#444;word-break:break-all}"""


def _time(seconds: float) -> str:
    m, s = divmod(float(seconds), 60)
    return f"{int(m)}:{s:04.1f}"


def _num(v, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def render(rows: list[FaceRow], title: str = "", by: str = "identity") -> str:
    groups: dict[tuple, list[FaceRow]] = defaultdict(list)
    for row in rows:
        groups[(row.identity_id,) if by == "identity" else row.track_key].append(row)
    body = []
    for key, members in groups.items():
        members.sort(key=lambda r: (r.rank, r.video or "", r.pts_time))
        if by == "identity":
            label = f"identity {key[0]}"
            detail = f"{len({r.track_key for r in members})} track(s)"
        else:
            label = f"track {key[1]}" + (f" · {key[0]}" if key[0] else "")
            detail = f"identity {members[0].identity_id}"
        figures = []
        for r in members:
            where = (f"{r.video} " if r.video else "") + f"t{r.track_id} @ {_time(r.pts_time)}"
            caption = (f"#{r.rank} score {_num(r.score, 2)}<br>SER-FIQ {_num(r.serfiq)}"
                       f" · IQA {_num(r.iqa)}<br>{html.escape(where)}")
            figures.append(f'<figure><img src="{html.escape(quote(r.file_name))}" alt="{html.escape(where)}">'
                           f"<figcaption>{caption}</figcaption></figure>")
        body.append(f"<tr><th>{html.escape(label)}<br><small>{html.escape(detail)}</small></th>"
                    f"<td>{''.join(figures)}</td></tr>")
    heading = html.escape(title or "cafi-stream faces")
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{heading}</title>"
            f"<style>{_STYLE}</style></head><body><h1>{heading}</h1>"
            f"<p>{len(rows)} faces, {len(groups)} {'identities' if by == 'identity' else 'tracks'}</p>"
            f"<table>{''.join(body)}</table></body></html>\n")


def write_report(out_dir: Path, rows: list[FaceRow], title: str = "", by: str = "identity") -> Path:
    path = Path(out_dir) / REPORT
    atomic_write(path, render(rows, title, by).encode())
    return path
