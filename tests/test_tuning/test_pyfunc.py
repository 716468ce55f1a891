"""Models registered before tuning/ was split into packages still load and answer the same.

`tests/data/model-2026-12-01` was saved by `tuning.pyfunc.save` as it was before the split (a cnn-bn at
width 0.25, flip TTA); its python_model.pkl names the class `tuning.pyfunc.FerClassifier`. In a process
that has imported today's `tuning` (as `tuning.predict` has when it loads a model), that name must
resolve to today's class, through the one-line re-export in `tuning/pyfunc.py`.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[1] / "data"
LOAD = """
import sys
import numpy as np, pandas as pd
import mlflow.pyfunc
from tuning.registry import pyfunc  # today's code first, as in tuning.predict
model = mlflow.pyfunc.load_model(sys.argv[1])
inner = model.unwrap_python_model()
assert type(inner) is pyfunc.FerClassifier, (type(inner).__module__, type(inner).__qualname__)
check = np.load(sys.argv[2])
frame = model.predict(pd.DataFrame({"image": [pyfunc.png_bytes(i) for i in check["images"]]}))
np.save(sys.argv[3], frame[pyfunc.PROB_COLUMNS].to_numpy())
"""


def test_a_model_saved_before_the_split_loads_and_predicts_as_it_did(tmp_path):
    model = shutil.copytree(DATA / "model-2026-12-01", tmp_path / "model")
    out = tmp_path / "probs.npy"
    proc = subprocess.run([sys.executable, "-c", LOAD, str(model), str(DATA / "model-2026-12-01-check.npz"), str(out)],
                          capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = np.load(DATA / "model-2026-12-01-check.npz")["probs"]
    # Inference is fp32 on every CPU (fer_model.device.fp32): the same weights give the same numbers.
    np.testing.assert_allclose(np.load(out), expected, atol=1e-6)
    assert (np.load(out).argmax(1) == expected.argmax(1)).all()
