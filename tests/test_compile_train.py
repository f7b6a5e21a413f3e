"""model.compile=true through the trainer (stage mae, 3 steps): compile modes default and reduce-overhead give the
first losses of eager, and reduce-overhead marks each step's start for CUDA graph trees. Backend: aot_eager (the
graph capture of the forward and the AOTAutograd backward that inductor compiles, without inductor's C++ build,
which takes minutes on a 2-core CPU); tolerance 1e-5 relative (the traced graph may reorder fp32 operations)."""
import functools
import json

import pytest
import torch

from maect import train
from maect.validation import load_config
from test_nnclr import TINY


def first_losses(tmp_path, name, *extra) -> list[float]:
    out = tmp_path / name
    train.run(load_config([*TINY, "stage=mae", "smoke=3", f"out_dir={out}", *extra]))
    rows = [json.loads(line) for line in open(out / "mae" / "metrics.jsonl")]
    return [r["loss"] for r in rows if "loss" in r]


def test_compiled_trainer_matches_eager(tmp_path, monkeypatch):
    marks = []
    real_mark = torch.compiler.cudagraph_mark_step_begin
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: (marks.append(1), real_mark())[1])
    monkeypatch.setattr(train, "maybe_compile", functools.partial(train.maybe_compile, backend="aot_eager"))
    eager = first_losses(tmp_path, "eager")
    assert not marks
    torch._dynamo.reset()
    default = first_losses(tmp_path, "default", "model.compile=true")
    assert not marks
    torch._dynamo.reset()
    ro = first_losses(tmp_path, "ro", "model.compile=true", "model.compile_mode=reduce-overhead")
    print(eager, default, ro)
    assert len(eager) == 3 and len(marks) == 3          # one mark per step in reduce-overhead mode
    assert default == pytest.approx(eager, rel=1e-5) and ro == pytest.approx(eager, rel=1e-5)
