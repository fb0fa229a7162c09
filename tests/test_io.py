"""Atomic run files: complete or absent, and readable like any other file the user writes."""

import os
import stat


def test_run_files_are_readable_like_any_other_file(tmp_path):
    from distillarena.core.io import atomic_dir, atomic_write_text

    mask = os.umask(0)
    os.umask(mask)
    atomic_write_text(tmp_path / "report.html", "<html></html>")
    with atomic_dir(tmp_path / "student") as d:
        (d / "x").write_text("1")
    # tempfile makes private 0600 / 0700 scratch files; what lands in a run folder gets the user's usual modes
    assert stat.S_IMODE((tmp_path / "report.html").stat().st_mode) == 0o666 & ~mask
    assert stat.S_IMODE((tmp_path / "student").stat().st_mode) == 0o777 & ~mask
    assert (tmp_path / "report.html").read_text() == "<html></html>" and (tmp_path / "student" / "x").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no scratch left behind


def test_json_lines_keep_records_whose_text_holds_unicode_line_breaks(tmp_path):
    # a random model's sampled text once held U+0085 and a resumed collection could no longer be read
    import json

    from distillarena.core.io import read_jsonl

    records = [{"id": i, "text": t} for i, t in enumerate(["a\x85b", "c\u2028d\u2029e", "plain", "f\x1cg"])]
    # written as the API client writes its traces: UTF-8, not ASCII-escaped
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records),
                                      encoding="utf-8")
    assert read_jsonl(tmp_path / "t.jsonl") == records
