"""``examples/imagenet_tables.py --collect``: the tables are read from the runs' reports."""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

from uap.report import Report

ROOT = Path(__file__).resolve().parent.parent


def _script():
    spec = importlib.util.spec_from_file_location("imagenet_tables", ROOT / "examples" / "imagenet_tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_collect_prints_both_tables_with_intervals(tmp_path, capsys):
    script = _script()
    models = ["tf_efficientnet_lite0", "tf_efficientnet_lite1"]
    report = Report(perturbations=[*models, "chessboard2"], models=models, baselines=["chessboard2"],
                    fooling_rate=[[135 / 195, 0.4], [0.3, 0.6], [112 / 195, 0.2]], accuracy=[[0.3, 0.5]] * 3,
                    dominant_label=[[1, 1]] * 3, dominant_share=[[0.2, 0.2]] * 3,
                    embedding_cosine=[[math.nan] * 2] * 3, clean_accuracy=[0.887, 0.908],
                    norm_linf=[10 / 255] * 3, norm_l2=[5.0] * 3, n_images=195)
    report.save_json(script.folder(tmp_path, "sgd", "inf") / "results.json")
    assert script.main(["--out", str(tmp_path), "--collect"]) == 0
    out = capsys.readouterr().out
    assert "| tf_efficientnet_lite0 (224²) | ℓ∞ 10/255 | 88.7 % | `sgd` | **69.2 [62.4, 75.3]** |" in out
    assert "57.4 [50.4, 64.2] `chessboard2`" in out and "Table 2" in out
    assert script.main(["--out", str(tmp_path / "empty"), "--collect"]) == 2
