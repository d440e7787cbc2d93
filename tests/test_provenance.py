"""What produced a run, read back from a real MLflow store (sqlite): versions, hardware, command line, the
code's commit and its uncommitted changes (a real git repository)."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess

from mlflow import MlflowClient

from mae_ray import provenance, tracking


def git(repo, *args):
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)


def test_a_run_from_a_checkout_with_uncommitted_changes_carries_the_diff(tmp_path, monkeypatch):
    repo = tmp_path / "checkout"
    (repo / "mae_ray").mkdir(parents=True)
    (repo / "mae_ray" / "model.py").write_text("depth = 12\n")
    git(repo, "init", "-q")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "x", "--allow-empty")
    git(repo, "add", ".")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "model")
    monkeypatch.setattr(provenance, "_ROOT", str(repo))
    monkeypatch.setenv(provenance.COMMAND_ENV, "mae-ray pretrain --set data.train_shards=s3://u:secret@host/x")
    provenance._static.cache_clear()
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    try:
        clean = tracking.start_run(uri, "e", "clean", {}, tracking.run_tags())
        (repo / "mae_ray" / "model.py").write_text("depth = 24  # s3://u:secret@host/y\n")
        provenance._static.cache_clear()
        dirty = tracking.start_run(uri, "e", "dirty", {}, tracking.run_tags())
    finally:
        provenance._static.cache_clear()
    client = MlflowClient(uri)
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    tags = {name: client.get_run(run).data.tags for name, run in (("clean", clean), ("dirty", dirty))}
    assert tags["clean"]["mlflow.source.git.commit"] == tags["dirty"]["mlflow.source.git.commit"] == head
    assert (tags["clean"]["mae_ray.env.git_dirty"], tags["dirty"]["mae_ray.env.git_dirty"]) == ("false", "true")
    assert not client.list_artifacts(clean, "provenance")
    patch = client.download_artifacts(dirty, tracking.DIFF_ARTIFACT, str(tmp_path))
    text = open(patch).read()
    assert "-depth = 12" in text and "+depth = 24" in text and "secret" not in text  # redacted like every URL
    assert tags["dirty"]["mae_ray.env.command"] == "mae-ray pretrain --set data.train_shards=s3://***@host/x"
    for package in provenance.PACKAGES:
        assert tags["dirty"][f"mae_ray.env.{package}"] == importlib.metadata.version(package)
    assert tags["dirty"]["mae_ray.env.cpu_count"] == str(os.cpu_count())


def test_an_installed_package_has_no_commit_even_inside_another_checkout(tmp_path, monkeypatch):
    # a venv inside a git checkout: site-packages is under it, but is not mae-ray's checkout
    outer = tmp_path / "project"
    (outer / "site-packages").mkdir(parents=True)
    git(outer, "init", "-q")
    monkeypatch.setattr(provenance, "_ROOT", str(outer / "site-packages"))
    assert provenance.git_state() == (None, False) and provenance.git_diff() == ""


def test_the_cli_records_its_command_line_for_the_runs_it_makes(monkeypatch, tmp_path):
    from mae_ray import cli

    monkeypatch.delenv(provenance.COMMAND_ENV, raising=False)
    monkeypatch.setattr(os, "environ", dict(os.environ))  # the CLI's export stays in this test
    assert cli.main(["pretrain", "--set", "train.epochs=-1", "--set", f"output_dir={tmp_path}"]) == 2
    assert provenance.command() == f"mae-ray pretrain --set train.epochs=-1 --set output_dir={tmp_path}"


def test_each_run_names_its_shard_sets_in_mlflows_dataset_tracking(demo_data, tmp_path):
    import json
    import shutil

    from mae_ray.data.shards import lineage

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run = tracking.start_run(uri, "e", "r", {}, {})
    sets = {"training": demo_data["train"], "validation": demo_data["val"]}
    tracking.log_datasets(uri, run, {c: (spec, lineage(spec)) for c, spec in sets.items()})
    train = {"training": (demo_data["train"], lineage(demo_data["train"]))}
    tracking.log_datasets(uri, run, train)  # a restored trial logs again: no duplicate
    inputs = MlflowClient(uri).get_run(run).inputs.dataset_inputs
    by_context = {next(t.value for t in i.tags if t.key == "mlflow.data.context"): i.dataset for i in inputs}
    assert sorted(by_context) == ["training", "validation"] and len(inputs) == 2
    train = by_context["training"]
    assert train.name == "shards/train" and train.digest == lineage(demo_data["train"])["digest"]
    assert json.loads(train.source)["uri"] == demo_data["train"]
    assert json.loads(train.profile) == {"num_shards": 5, "num_samples": 1200}
    # another shard set (its dataset.json differs) has another digest; the same one, copied, the same digest
    other = tmp_path / "copy" / "train"
    shutil.copytree(demo_data["train_dir"], other)
    pattern = demo_data["train"].rsplit("/", 1)[-1]
    assert lineage(f"{other}/{pattern}")["digest"] == train.digest
    manifest = json.loads((other / "dataset.json").read_text())
    manifest["total"] += 1
    (other / "dataset.json").write_text(json.dumps(manifest))
    assert lineage(f"{other}/{pattern}")["digest"] != train.digest


def test_a_recorded_run_is_reproduced_from_its_mlflow_id_alone(tmp_path, monkeypatch, capsys):
    # a run recorded as a job records it (params = its config; tags = its environment), one package
    # version changed since, and a credential in a URL redacted when recorded
    import yaml

    from mae_ray import cli
    from mae_ray.config import load_config

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = load_config(None, ["model.name=mae_vit_micro_patch4", "model.mask_ratio=0.6", "train.epochs=7",
                             "data.train_shards=/data/train-{000000..000009}.tar", "ray.storage_path=null",
                             "mlflow.run_name=mine", "data.val_shards=https://u:secret@host/val.tar",
                             "finetune.trainable_blocks=2", f"output_dir={tmp_path}/run"])
    tags = tracking.run_tags()
    tags[f"{tracking.ENV_TAG}torch"] = "1.0.0"
    tags[f"{tracking.ENV_TAG}command"] = "mae-ray pretrain --config c.yaml"
    run = tracking.start_run(uri, "e", "mine", tracking.params_from_config(cfg.flatten()), tags)
    out = tmp_path / "again.yaml"

    assert cli.main(["reproduce", f"runs:/{run}", "--set", f"mlflow.tracking_uri={uri}", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    again = load_config(str(out), [])
    expected = cfg.to_dict()
    expected["data"]["val_shards"] = again.data.val_shards  # redacted when recorded: the default, with a warning
    expected["mlflow"].update(run_name=None, tracking_uri=uri)  # the run's name is not a param
    expected["output_dir"] = "outputs/run"  # a folder is not the record's to choose (tests/test_recorded.py)
    assert again.to_dict() == expected
    assert f"[reproduce] not taken from the record: output_dir = {tmp_path}/run" in printed
    assert f"to run it again: mae-ray pretrain --config {out}" in printed
    assert "started with: mae-ray pretrain --config c.yaml" in printed
    assert f"warning: torch: 1.0.0 when recorded, {importlib.metadata.version('torch')} here" in printed
    assert "warning: data.val_shards was redacted when recorded" in printed
    assert "secret" not in out.read_text() and yaml.safe_load(out.read_text())["model"]["mask_ratio"] == 0.6

    assert cli.main(["reproduce", "0" * 32, "--set", f"mlflow.tracking_uri={uri}"]) == 2
    assert capsys.readouterr().err.startswith(f"error: no run {'0' * 32} in {uri}")


def test_a_random_init_evaluation_is_reproduced_though_its_pretraining_params_are_marked_not_applying(tmp_path):
    # a random-init evaluation logs model.mask_ratio, train.epochs, ... as "n/a: random init" (a sweep's
    # random-init row must not show the base's mask ratio); reproduce leaves those at their defaults
    from mae_ray import cli
    from mae_ray.config import load_config
    from mae_ray.jobs.encoders import resolve_encoder
    from mae_ray.jobs.eval_job import encoder_params

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = load_config(None, ["model.name=mae_vit_micro_patch4", "eval.checkpoint=random", "linprobe.epochs=9",
                             "model.mask_ratio=0.6", f"output_dir={tmp_path}/run"])
    params = {**tracking.params_from_config(cfg.flatten()), **encoder_params(resolve_encoder("random", cfg, uri))}
    assert params["model.mask_ratio"] == params["train.epochs"] == tracking.NOT_PRETRAINED
    run = tracking.start_run(uri, "e", "random-init", params, {**tracking.run_tags(), "mae_ray.job": "linprobe"})
    out = tmp_path / "again.yaml"
    assert cli.main(["reproduce", f"runs:/{run}", "--set", f"mlflow.tracking_uri={uri}", "--out", str(out)]) == 0
    again = load_config(str(out), [])
    assert again.eval.checkpoint == "random" and again.linprobe.epochs == 9
    assert again.model.mask_ratio == load_config(None, []).model.mask_ratio  # the default: it does not apply


def test_a_ray_outside_the_tested_range_is_one_warning_line_and_pyproject_says_the_same_range(
        monkeypatch, capsys, tmp_path):
    import re
    from pathlib import Path

    from mae_ray import cli

    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert re.search(r'"ray\[[a-z,]+\](.*?)"', pyproject).group(1) == provenance.TESTED_RAY
    monkeypatch.setattr(provenance, "version", lambda package: "2.60.3")
    assert provenance.ray_outside_tested_range() is None
    monkeypatch.setattr(provenance, "version", lambda package: "2.61.0")
    monkeypatch.setattr(os, "environ", dict(os.environ))
    assert cli.main(["pretrain", "--set", "train.epochs=-1", "--set", f"output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == ("warning: Ray 2.61.0 is outside the range mae-ray is tested with (>=2.60,<2.61); it leans "
                      "on Ray internals that can change between releases") and err[1].startswith("error: ")


def test_the_lock_pins_every_requirement_of_pyproject_within_its_range():
    import re
    from pathlib import Path

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    root = Path(__file__).parents[1]
    pinned = {}
    for line in (root / "requirements.lock").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, exact = line.partition("==")
            pinned[canonicalize_name(name)] = exact
    block = re.search(r"dependencies = \[(.*?)\]\n\n\[project.optional-dependencies\]\ndev = \[(.*?)\]",
                      (root / "pyproject.toml").read_text(), re.S)
    specs = re.findall(r'^\s*"([^"]+)"', block.group(1) + block.group(2), re.M)
    assert len(specs) > 15
    for spec in specs:
        req = Requirement(spec)
        name = canonicalize_name(req.name)
        assert name in pinned, f"{req.name} is not in requirements.lock"
        assert pinned[name] in req.specifier, f"requirements.lock pins {req.name}=={pinned[name]}, outside {spec}"
