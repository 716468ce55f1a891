"""Promotion when things go wrong: two promotions at once, a version whose training did not finish,
and a champion that changes between promotion's read and its write (an HTTP store has no lock)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import run_main
from mlflow.tracking import MlflowClient

from fer_model import metrics as M
from tuning import names as N
from tuning import promote
from tuning.registry import promotion as registry

NAME = N.DEFAULT_MODEL_NAME
ROOT = Path(__file__).resolve().parents[2]

# `python -m tuning.promote --tracking-uri URI ARGS`, started on a line on stdin once its imports are done
# and it has opened the store once: two of them then decide within a millisecond. (Otherwise the lock
# `tuning.tracking.store.client_for` holds while a process first opens a store mostly made them take turns here.)
AT_THE_LINE = """
import runpy, sys
import tuning.registry.promotion, tuning.tracking.store  # not tuning.promote: runpy runs it as __main__
tuning.tracking.store.client_for(sys.argv[2])
print("ready", flush=True)
sys.stdin.readline()
sys.argv = ["tuning.promote", *sys.argv[1:]]
runpy.run_module("tuning.promote", run_name="__main__")
"""


def make_store(folder: Path, *accuracies: float, status: str = "FINISHED") -> tuple[str, MlflowClient, list[str]]:
    """A sqlite store with `NAME` registered, one version per accuracy (scored on the same test data),
    each from a final run that ended with `status`; no champion."""
    folder.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    client = MlflowClient(uri, registry_uri=uri)
    exp = client.create_experiment("e", artifact_location=(folder / "art").as_uri())
    client.create_registered_model(NAME)
    versions = []
    for acc in accuracies:
        run_id = client.create_run(exp, tags={N.TAG_STAGE: N.STAGE_FINAL}).info.run_id
        client.log_metric(run_id, M.TEST_ACC, acc)
        client.set_terminated(run_id, status)
        tags = {N.TAG_DATA_FINGERPRINT: "abc", N.TAG_TEST_SIZE: "56"}
        versions.append(str(client.create_model_version(NAME, f"runs:/{run_id}/model", run_id=run_id, tags=tags).version))
    return uri, client, versions


def holder(client: MlflowClient, alias: str) -> str | None:
    try:
        return str(client.get_model_version_by_alias(NAME, alias).version)
    except Exception:  # noqa: BLE001 - the alias is unset
        return None


def decision_tags(client: MlflowClient, versions: list[str]) -> dict[str, dict[str, str]]:
    return {v: client.get_model_version(NAME, v).tags for v in versions}


@pytest.mark.e2e
def test_two_promotions_at_once_leave_records_that_agree(tmp_path):
    """Both promotions of two racing commands used to exit 0, both versions were tagged "the first
    champion", `previous` stayed unset and --rollback refused (2 of 3 rounds). Now the second waits
    for the first (a lock beside the sqlite file), then decides against the champion the first made."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("MLFLOW_TRACKING_URI", None)
    for round_ in range(3):
        uri, client, (v1, v2) = make_store(tmp_path / f"round{round_}", 0.50, 0.60)
        procs = [subprocess.Popen([sys.executable, "-c", AT_THE_LINE, "--tracking-uri", uri, "--version", v], env=env,
                                  cwd=tmp_path, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for v in (v1, v2)]
        for p in procs:
            assert p.stdout.readline().strip() == "ready", p.communicate()[1][-3000:]
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        results = {v: p.communicate(timeout=300) + (p.returncode,) for v, p in zip((v1, v2), procs)}
        codes = {v: code for v, (_, _, code) in results.items()}
        tags = decision_tags(client, [v1, v2])
        said = {v: t.get(registry.TAG_DECISION, "") for v, t in tags.items()}
        where = f"round {round_}: {results}"
        assert holder(client, "champion") == v2, where  # v2 is better: it ends champion either way
        firsts = [v for v, text in said.items() if "(the first champion)" in text]
        assert len(firsts) == 1, where
        if firsts == [v1]:  # v1 went first; v2 then beat it
            assert codes == {v1: 0, v2: 0} and holder(client, "previous") == v1, where
            assert said[v2].startswith("promoted to champion") and tags[v2][registry.TAG_REPLACED] == v1, where
        else:  # v2 went first; v1 is not better than it
            assert codes == {v1: registry.NOT_PROMOTED, v2: 0} and holder(client, "previous") is None, where
            assert said[v1].startswith("not promoted to champion") and "stays with version " + v2 in said[v1], where
        for v, (out, err, _) in results.items():
            assert said[v] and out.strip().endswith(said[v].split(": ", 1)[1]), where  # what it said is what it recorded


@pytest.mark.parametrize("status", ["KILLED", "FAILED", "RUNNING"])
def test_a_version_whose_run_did_not_finish_needs_force(tmp_path, capsys, status):
    uri, client, (v1,) = make_store(tmp_path, 0.50, status=status)
    run_id = client.get_model_version(NAME, v1).run_id
    assert run_main(promote.main, ["--tracking-uri", uri]) == registry.NOT_PROMOTED
    out = capsys.readouterr().out.strip()
    assert len(out.splitlines()) == 1 and f"run {run_id} is {status}, not FINISHED" in out and "--force" in out
    assert holder(client, "champion") is None
    assert "not promoted" in client.get_model_version(NAME, v1).tags[registry.TAG_DECISION]

    assert run_main(promote.main, ["--tracking-uri", uri, "--force"]) == 0
    assert holder(client, "champion") == v1
    assert client.get_model_version(NAME, v1).tags[registry.TAG_DECISION].startswith("promoted to champion")


def test_a_champion_changed_mid_promotion_is_decided_against_again(tmp_path, monkeypatch):
    """An HTTP store has no lock: another command may move the alias between this one's read and its
    write. Here a rival makes v3 champion right after this promotion of v2 sets the alias: the read-back
    sees v3, so v2 is decided again against v3 (better: it moves, with previous v3) and only that
    decision is recorded."""
    uri, client, (v1, v2, v3) = make_store(tmp_path, 0.50, 0.70, 0.60)
    real = client.set_registered_model_alias
    rival = []

    def racing(name, alias, version):
        real(name, alias, version)
        if alias == "champion" and not rival:  # the rival's write lands just after ours
            rival.append(version)
            real(name, alias, v3)

    monkeypatch.setattr(client, "set_registered_model_alias", racing)
    decision = registry.promote(client, registry.PromotionRequest(NAME, v2))
    assert rival == [v2] and decision.promote and decision.incumbent == v3
    assert holder(client, "champion") == v2 and holder(client, "previous") == v3
    tags = decision_tags(client, [v1, v2, v3])
    assert "first champion" not in tags[v2][registry.TAG_DECISION] and tags[v2][registry.TAG_REPLACED] == v3
    assert "champion changed meanwhile" in tags[v2][registry.TAG_DECISION]


def test_a_champion_that_keeps_changing_is_one_line_and_no_record(tmp_path, monkeypatch, capsys):
    uri, client, (v1, v2) = make_store(tmp_path, 0.50, 0.70)
    real = client.set_registered_model_alias

    def always_overwritten(name, alias, version):
        real(name, alias, version)
        if alias == "champion":
            real(name, alias, v1)

    monkeypatch.setattr(client, "set_registered_model_alias", always_overwritten)
    monkeypatch.setattr("tuning.tracking.store.client_for", lambda _uri: client)
    assert run_main(promote.main, ["--tracking-uri", uri, "--version", v2]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "kept changing" in err and f"version {v2}" in err
    assert registry.TAG_DECISION not in client.get_model_version(NAME, v2).tags
