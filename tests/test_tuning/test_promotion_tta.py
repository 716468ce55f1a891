"""Promotion compares what serves: a version registered with test-time augmentation answers with it,
so by default its TTA test accuracy is what is compared (issue 26); an explicit --metric is that metric."""

from __future__ import annotations

from pathlib import Path

from helpers import run_main
from mlflow.tracking import MlflowClient

from fer_model import metrics as M
from tuning import names as N
from tuning import promote
from tuning.registry import promotion as registry

NAME = N.DEFAULT_MODEL_NAME


def make_store(folder: Path, *versions: tuple[float, float | None, str]) -> tuple[str, MlflowClient, list[str]]:
    """A sqlite store with `NAME` registered, one version per (test_acc, test_acc_tta, tta) from a
    FINISHED final run, all scored on the same test data, tagged as tuning.stages.register tags them."""
    folder.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    client = MlflowClient(uri, registry_uri=uri)
    exp = client.create_experiment("e", artifact_location=(folder / "art").as_uri())
    client.create_registered_model(NAME)
    out = []
    for acc, acc_tta, tta in versions:
        run_id = client.create_run(exp, tags={N.TAG_STAGE: N.STAGE_FINAL}).info.run_id
        client.log_metric(run_id, M.TEST_ACC, acc)
        tags = {N.TAG_DATA_FINGERPRINT: "abc", N.TAG_TEST_SIZE: "56", N.TAG_TTA: tta, M.TEST_ACC: f"{acc:.4f}"}
        if acc_tta is not None:
            client.log_metric(run_id, M.TEST_ACC_TTA, acc_tta)
            tags[M.TEST_ACC_TTA] = f"{acc_tta:.4f}"
        client.set_terminated(run_id, "FINISHED")
        out.append(str(client.create_model_version(NAME, f"runs:/{run_id}/model", run_id=run_id, tags=tags).version))
    return uri, client, out


def holder(client: MlflowClient, alias: str = "champion") -> str | None:
    try:
        return str(client.get_model_version_by_alias(NAME, alias).version)
    except Exception:  # noqa: BLE001 - the alias is unset
        return None


def promote_line(uri: str, capsys, *args) -> tuple[int, str]:
    code = run_main(promote.main, ["--tracking-uri", uri, *args])
    out = capsys.readouterr().out.strip()
    assert len(out.splitlines()) == 1, out
    return code, out


def test_a_tencrop_version_better_as_it_serves_is_promoted(tmp_path, capsys):
    """Plain test_acc 0.6500 < the champion's 0.6617, but it serves with tencrop at 0.6810: promoted."""
    uri, client, (v1, v2) = make_store(tmp_path, (0.6617, None, "none"), (0.6500, 0.6810, "tencrop"))
    client.set_registered_model_alias(NAME, "champion", v1)
    code, out = promote_line(uri, capsys)
    assert code == 0 and holder(client) == v2 and holder(client, "previous") == v1, out
    assert (f"version {v2} test_acc_tta 0.6810 (serves with tencrop); champion version {v1} test_acc 0.6617: "
            f"champion moved to version {v2}") in out
    assert "better by 0.0193" in out
    recorded = client.get_model_version(NAME, v2).tags[registry.TAG_DECISION]
    assert recorded.startswith("promoted to champion") and "test_acc_tta 0.6810 (serves with tencrop)" in recorded


def test_a_tencrop_version_worse_as_it_serves_is_not_promoted(tmp_path, capsys):
    """The reverse: plain test_acc 0.6800 > the champion's 0.6617, but with its tencrop it answers 0.6500."""
    uri, client, (v1, v2) = make_store(tmp_path, (0.6617, None, "none"), (0.6800, 0.6500, "tencrop"))
    client.set_registered_model_alias(NAME, "champion", v1)
    code, out = promote_line(uri, capsys)
    assert code == registry.NOT_PROMOTED and holder(client) == v1, out
    assert f"version {v2} test_acc_tta 0.6500 (serves with tencrop); champion version {v1} test_acc 0.6617" in out
    assert "stays with version " + v1 in out and "difference -0.0117" in out


def test_an_explicit_metric_compares_exactly_that(tmp_path, capsys):
    uri, client, (v1, v2) = make_store(tmp_path, (0.6617, None, "none"), (0.6500, 0.6810, "tencrop"))
    client.set_registered_model_alias(NAME, "champion", v1)
    code, out = promote_line(uri, capsys, "--metric", "test_acc")
    assert code == registry.NOT_PROMOTED and holder(client) == v1, out
    assert f"version {v2} test_acc 0.6500; champion version {v1} test_acc 0.6617" in out and "serves" not in out
    assert run_main(promote.main, ["--tracking-uri", uri, "--metric", "test_acc_tta"]) == 2  # the champion has none
    assert "has no metric 'test_acc_tta'" in capsys.readouterr().err and holder(client) == v1


def test_a_champion_serving_with_tta_is_measured_with_it(tmp_path, capsys):
    """Both sides as they serve: a flip champion by its test_acc_tta, a plain candidate by test_acc."""
    uri, client, (v1, v2, v3) = make_store(tmp_path, (0.6000, 0.6700, "flip"), (0.6650, None, "none"),
                                           (0.6600, 0.6750, "tencrop"))
    client.set_registered_model_alias(NAME, "champion", v1)
    code, out = promote_line(uri, capsys, "--version", v2)  # 0.6650 beats its plain 0.6000 but not its 0.6700
    assert code == registry.NOT_PROMOTED and holder(client) == v1, out
    assert f"version {v2} test_acc 0.6650; champion version {v1} test_acc_tta 0.6700 (serves with flip)" in out
    code, out = promote_line(uri, capsys, "--version", v3, "--dry-run")
    assert code == 0 and holder(client) == v1, out
    assert (f"version {v3} test_acc_tta 0.6750 (serves with tencrop); champion version {v1} test_acc_tta 0.6700 "
            f"(serves with flip): champion would move to version {v3}") in out


def test_serving_accuracy_falls_back_on_the_version_tag(tmp_path):
    """A version whose final run lacks test_acc_tta (logged before the TTA metrics were) is measured by
    its test_acc_tta tag; versions without a tta tag serve plain."""
    _, client, (v1,) = make_store(tmp_path, (0.6000, None, "tencrop"))
    client.set_model_version_tag(NAME, v1, M.TEST_ACC_TTA, "0.6400")
    version = client.get_model_version(NAME, v1)
    assert registry.serving_metric(version) == M.TEST_ACC_TTA
    assert registry.metric_of(client, version, M.TEST_ACC_TTA) == 0.64
    client.delete_model_version_tag(NAME, v1, N.TAG_TTA)
    assert registry.serving_metric(client.get_model_version(NAME, v1)) == M.TEST_ACC
