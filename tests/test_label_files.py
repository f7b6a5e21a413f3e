"""Label files and file lists as editors and spreadsheets save them: a UTF-8 or UTF-16 byte-order mark, CRLF or CR
line ends, trailing blank lines, comment lines before the header, a tab-separated .tsv. The header is read as a
header (never a data row: that made a phantom class 'label', which k-means then counted as a cluster), and every
variant gives the same classes and rows as the plain file."""
import os
import sys

import numpy as np
import pytest
from PIL import Image

from maect.dataloading import DataError
from maect.dataloading.datasets import load_eval_data, read_file_list, read_label_csv

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_data_sources import tiny_ckpt  # noqa: E402

ROWS = [("img/a0.png", "cat", "train"), ("img/a1.png", "cat", "val"), ("img/b0.png", "dog", "train"),
        ("img/b1.png", "dog", "val")]


def variants(sep=","):
    body = [sep.join(r) for r in ROWS]
    head = sep.join(("path", "label", "split"))
    text = "\n".join([head] + body) + "\n"
    return {
        "plain": text.encode(),
        "utf8-bom": b"\xef\xbb\xbf" + text.encode(),                     # Excel "CSV UTF-8"
        "utf8-bom-crlf": b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode(),
        "utf16-le-bom": text.replace("\n", "\r\n").encode("utf-16"),     # Excel "Unicode text" (BOM + LE)
        "utf16-be-bom": b"\xfe\xff" + text.encode("utf-16-be"),
        "cr-only": text.replace("\n", "\r").encode(),
        "trailing-blank": (text + "\n\n  \n").encode(),
        "comment-first": ("# exported 2026-12-07\n\n" + text).encode(),
        "header-case": text.replace(head, head.upper().replace(sep, sep + " ")).encode(),
        "no-header": ("\n".join(body) + "\n").encode(),
    }


@pytest.mark.parametrize("sep,ext", [(",", "csv"), ("\t", "tsv")])
def test_every_encoding_and_line_end_reads_the_header_as_a_header(tmp_path, sep, ext):
    """Each variant: classes ['cat', 'dog'] and the same rows as the plain file (before the change, a BOM made the
    header a data row: classes ['cat', 'dog', 'label'])."""
    want = None
    for name, blob in variants(sep).items():
        p = tmp_path / f"{name}.{ext}"
        p.write_bytes(blob)
        classes, rows = read_label_csv(str(p))
        assert classes == ["cat", "dog"], name
        want = want or rows
        assert rows == want, name
    assert [os.path.basename(p) for p, _ in want["train"]] == ["a0.png", "b0.png"]


def test_file_list_with_bom_crlf_and_utf16(tmp_path):
    """A file list saved with a BOM / CRLF / UTF-16 names the same files as the plain one (a BOM used to become part
    of the first path, a file that does not exist)."""
    text = "img/a0.png\nimg/b0.png\n"
    want = [str(tmp_path / "img" / f) for f in ("a0.png", "b0.png")]
    for name, blob in {"bom": b"\xef\xbb\xbf" + text.encode(), "crlf": text.replace("\n", "\r\n").encode(),
                       "utf16": text.encode("utf-16"), "blank-tail": (text + "\r\n\r\n").encode()}.items():
        (tmp_path / f"{name}.txt").write_bytes(blob)
        assert read_file_list(str(tmp_path / f"{name}.txt")) == want, name


def test_bad_bytes_and_negative_labels_are_named(tmp_path):
    (tmp_path / "latin1.csv").write_bytes("img/\xe9t\xe9.png,cat\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.csv' line 1: byte b'\\xe9' at offset 4 is not utf-8 text"):
        read_label_csv(str(tmp_path / "latin1.csv"))
    (tmp_path / "neg.csv").write_text("path,label\nimg/a0.png,3\nimg/b0.png,-1\n")
    with pytest.raises(DataError, match="neg.csv' line 3: label -1 is negative"):
        read_label_csv(str(tmp_path / "neg.csv"))
    (tmp_path / "semi.csv").write_text("img/a0.png;cat\n")
    with pytest.raises(DataError, match=r"line 1: expected path,label\[,split\] \(comma-separated\)"):
        read_label_csv(str(tmp_path / "semi.csv"))


def test_excel_csv_gives_kmeans_the_real_class_count(tmp_path):
    """The reported case end to end: an Excel-saved label CSV (BOM + CRLF) with --skip-corrupt; k-means clusters into
    k = 2 classes (the phantom class 'label' made k = 3) and both splits hold exactly the listed images."""
    from maect.eval.__main__ import main as eval_main
    rng = np.random.default_rng(0)
    rows = []
    for c, colour in (("cat", (220, 30, 30)), ("dog", (30, 30, 220))):
        for i in range(6):
            (tmp_path / "img").mkdir(exist_ok=True)
            px = np.clip(np.array(colour) + rng.integers(-20, 20, (16, 16, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(px).save(tmp_path / "img" / f"{c}{i}.png")
            rows.append(f"img/{c}{i}.png,{c},{'train' if i < 3 else 'val'}")
    csv = tmp_path / "labels.csv"
    csv.write_bytes(b"\xef\xbb\xbf" + ("path,label,split\r\n" + "\r\n".join(rows) + "\r\n").encode())
    (tmp_path / "train.txt").write_text("\n".join(f"img/{c}{i}.png" for c in ("cat", "dog") for i in range(6)))
    assert load_eval_data("filelist", str(tmp_path / "train.txt"), "test", str(csv)).classes == ["cat", "dog"]
    res = eval_main(["--ckpt", tiny_ckpt(tmp_path / "tiny.pth"), "--data", "filelist", "--data-root",
                     str(tmp_path / "train.txt"), "--labels", str(csv), "--protocols", "cluster",
                     "--skip-corrupt", "--device", "cpu", "--out", str(tmp_path / "res.json")])
    assert res["num_classes"] == 2 and res["protocols"]["cluster"]["k"] == 2
    assert res["n_train"] == 6 and res["n_test"] == 6
