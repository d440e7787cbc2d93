"""The shipped sweep files (mae_ray/shipped/sweeps/): one per ablation of the paper's Table 1 and Figures 5 and 7,
each with the paper's numbers beside its axis, and every point of every file a config that trains.

In-process, no Ray runtime (a few seconds): the trials are the ones Tune's own variant generator makes of
the file's search space; each trial's config is built the way a trial builds it (``sweep.trial_config``),
shrunk to the micro model with the ablated setting kept, and one pre-training step is taken through the
transform and model it names. The Tune runs themselves (cases, ASHA, paper columns, the report, a killed
driver resumed) are in tests/test_sweep.py; a Ray Train run per point of every file would cost CI ~20 min.
"""

from __future__ import annotations

import glob
import itertools
import os

import pytest
import torch

from mae_ray.config import Config
from mae_ray.data.transforms import build_transform
from mae_ray.errors import ConfigError
from mae_ray.jobs import sweep_config as sweeps
from mae_ray.jobs import sweep_report
from mae_ray.model.mae import MaskedAutoencoderViT
from mae_ray.model.pca import fit_pca

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWEEPS = os.path.join(ROOT, "mae_ray", "shipped", "sweeps")

# Transcribed from /work/shared/reference/mae-paper.md, "Results to compare against" (ViT-L, 800 epochs):
# axis value -> (fine-tune, linear probe). Figure 5 gives numbers only at 10 % (linear) and 75 %.
PAPER = {
    "paper_decoder_depth.yaml": ("model.decoder_depth", {1: (84.8, 65.5), 2: (84.9, 70.0), 4: (84.9, 71.9),
                                                         8: (84.9, 73.5), 12: (84.4, 73.3)}),
    "paper_decoder_width.yaml": ("model.decoder_embed_dim", {128: (84.9, 69.1), 256: (84.8, 71.3),
                                                             512: (84.9, 73.5), 768: (84.4, 73.1),
                                                             1024: (84.3, 73.1)}),
    "paper_mask_token.yaml": ("model.mask_token_in_encoder", {True: (84.2, 59.6), False: (84.9, 73.5)}),
    "paper_target.yaml": ("case", {"pixels": (84.9, 73.5), "normalised pixels": (85.4, 73.9), "PCA": (84.6, 72.3)}),
    "paper_augmentation.yaml": ("train.augment", {"none": (84.0, 65.7), "crop_fixed": (84.7, 73.1),
                                                  "crop_random": (84.9, 73.5), "crop_random_jitter": (84.3, 71.9)}),
    "paper_mask_sampling.yaml": ("case", {"random 75%": (84.9, 73.5), "block 50%": (83.9, 72.3),
                                          "block 75%": (82.8, 63.9), "grid 75%": (84.0, 66.0)}),
    "paper_mask_ratio.yaml": ("model.mask_ratio", {0.1: (None, 54.6), 0.75: (84.9, 73.5)}),
    "paper_schedule.yaml": ("train.epochs", {100: (82.3, 57.3), 200: (83.3, 64.4), 400: (84.3, 69.7),
                                             800: (84.9, 73.5), 1600: (85.1, 75.1)}),
    # Figure 9, partial fine-tuning: 0 blocks (the linear probe) 73.5, 1 block 81.0, all (None) 84.9
    "paper_partial_finetune.yaml": ("finetune.trainable_blocks", {0: (None, 73.5), 1: (81.0, None),
                                                                  None: (84.9, None)}),
}
# Table 1f's cases: what each label sets
MASK_SAMPLING = {"random 75%": ("random", 0.75), "block 50%": ("block", 0.5), "block 75%": ("block", 0.75),
                 "grid 75%": ("grid", 0.75)}
# Table 1d's: (model.target, model.norm_pix_loss)
TARGET = {"pixels": ("pixel", False), "normalised pixels": ("pixel", True), "PCA": ("pca", False)}
SIZE_KEYS = {"embed_dim": 64, "depth": 1, "num_heads": 2, "decoder_embed_dim": 32, "decoder_depth": 1,
             "decoder_num_heads": 2, "img_size": 32, "patch_size": 4}


def shipped() -> list[str]:
    return sorted(os.path.basename(p) for p in glob.glob(os.path.join(SWEEPS, "paper_*.yaml")))


def points(sweep) -> list[dict]:
    """The trials Ray Tune makes of the file: its own variant generator over ``sweeps.param_space``, the
    search space the sweep driver hands ``tune.Tuner``, repeated ``num_samples`` times as Tune does."""
    from ray.tune.search.variant_generator import generate_variants

    space = sweeps.param_space(sweep.search)
    made = [cfg for _ in range(sweep.num_samples) for _, cfg in generate_variants(space)]
    axes = {k: sweeps._space_entry(k, s)[1] for k, s in sweep.search.items()}
    assert len(made) == sweep.num_samples * len(list(itertools.product(*axes.values())))  # every grid point
    return made


def test_every_ablation_of_the_paper_has_a_sweep_file():
    assert shipped() == sorted(PAPER)


@pytest.mark.parametrize("name", sorted(PAPER))
def test_the_paper_numbers_beside_each_axis_are_the_papers(name):
    sweep, base = sweeps.load_sweep(os.path.join(SWEEPS, name), [])
    axis, table = PAPER[name]
    assert list(sweep.search) == [axis]
    expected = {sweeps.axis_label(v): {k: x for k, x in (("finetune_top1", ft), ("linprobe_top1", lin))
                                        if x is not None} for v, (ft, lin) in table.items()}
    assert {sweeps.axis_label(k): v for k, v in sweep.paper.items()} == expected
    # Table 1's baseline (84.9 / 73.5) is raw pixels; only the target ablation varies it
    if axis != "model.norm_pix_loss" and sweep.pretrain:
        assert base.model.norm_pix_loss is False
    assert base.model.name == "mae_vit_large_patch16" and base.train.epochs == 800


@pytest.mark.parametrize("name", shipped())
def test_every_point_of_every_sweep_file_trains_one_step(name):
    sweep, base = sweeps.load_sweep(os.path.join(SWEEPS, name), [])
    axis = next(iter(sweep.search))
    if not sweep.pretrain:  # an evaluation-only sweep: one fine-tuning step of the micro encoder per point
        return fine_tune_one_step(sweep, base, axis)
    for point in points(sweep):
        cfg: Config = sweeps.trial_config(point, base, sweep.cases)
        kwargs = cfg.model.kwargs()
        ablated = {k for k in kwargs if f"model.{k}" == axis}
        small = {**kwargs, **{k: v for k, v in SIZE_KEYS.items() if k not in ablated}}
        if axis == "model.decoder_embed_dim":
            small["decoder_num_heads"] = 2
        model = MaskedAutoencoderViT(**small)
        transform = build_transform("pretrain", 32, augment=cfg.train.augment)
        torch.manual_seed(0)
        imgs = torch.stack([transform(torch.randint(0, 256, (3, 40, 40), dtype=torch.uint8)) for _ in range(4)])
        if model.target == "pca":  # the basis pre-training fits first (jobs/pretrain.fit_pca_basis)
            fit = fit_pca([model.patchify(imgs)], model.pca_basis.shape[1])
            model.pca_mean.copy_(fit.mean)
            model.pca_basis.copy_(fit.basis)
        loss, _, mask = model(imgs, mask_ratio=cfg.model.mask_ratio)
        loss.backward()
        assert torch.isfinite(loss) and mask.sum(1).eq(64 - int(64 * (1 - cfg.model.mask_ratio))).all()
        # the trial really runs the setting its axis names
        if axis == "case" and name == "paper_target.yaml":
            assert (model.target, model.norm_pix_loss) == TARGET[point["case"]]
        elif axis == "case":
            assert (model.mask_sampling, cfg.model.mask_ratio) == MASK_SAMPLING[point["case"]]
        elif axis.startswith("model."):
            assert getattr(cfg.model, axis.split(".")[1]) == point[axis] == small.get(axis.split(".")[1],
                                                                                     cfg.model.mask_ratio)
        else:
            assert getattr(cfg.train, axis.split(".")[1]) == point[axis]


def fine_tune_one_step(sweep, base, axis: str) -> None:
    from mae_ray.jobs import finetune
    from mae_ray.model.mae import build_model

    assert axis == "finetune.trainable_blocks" and sweep.finetune and base.eval.checkpoint
    # Figure 9 as the paper ran it: its x-axis, 0 blocks the linear probe, each point the best of 3 lengths
    assert [p[axis] for p in points(sweep)] == [0, 1, 2, 4, 6, 12, 18, None]
    assert sweep.best_of == {"finetune.epochs": [50, 100, 200]}
    runs = {sweeps.axis_label(p[axis]): sweeps.trial_jobs(vars(sweep), p) for p in points(sweep)}
    assert runs == {"0": ("linprobe",), **{k: ("finetune",) for k in runs if k != "0"}}
    encoder = build_model("mae_vit_micro_patch4", depth=24)  # ViT-L's depth, micro width
    for point in points(sweep):
        if point[axis] == 0:
            continue  # the linear probe: a frozen encoder (tests/test_evaluation.py)
        cfg = sweeps.trial_config(point, base, sweep.cases)
        vit = finetune.build_classifier(encoder, num_classes=10, drop_path=cfg.finetune.drop_path)
        finetune.freeze_for_partial(vit, cfg.finetune.trainable_blocks)
        vit(torch.randn(2, 3, 32, 32)).sum().backward()
        tuned = {i for i, blk in enumerate(vit.blocks) if all(p.grad is not None for p in blk.parameters())}
        k = point[axis]
        assert tuned == set(range(24 - (24 if k is None else k), 24)), (k, tuned)


def test_a_shipped_sweep_prunes_with_asha_on_the_online_knn():
    sweep, base = sweeps.load_sweep(os.path.join(SWEEPS, "search_decoder_asha.yaml"), [])
    assert (sweep.scheduler.type, sweep.scheduler.metric, base.train.knn_every) == ("asha", "knn_top1", 1)
    assert sweep.scheduler.grace_period < base.train.epochs and sweep.num_samples > 1


def test_the_report_says_which_trials_stopped_early_and_what_that_saved():
    rows = [{"trial": "a", "status": "finished", "training_iteration": 10},
            {"trial": "b", "status": "stopped", "training_iteration": 1, "epochs_run": 2},  # MLflow's count wins
            {"trial": "c", "status": "stopped", "training_iteration": 4, "train.epochs": 20},
            {"trial": "e", "status": "error"}, {"trial": "random-init", "status": "baseline"}]
    pruned = sweep_report.early_stops(rows, epochs=10)
    assert pruned["stopped"] == {"b": 2, "c": 4}  # c's own length (an epochs axis) counts, not the base's
    assert (pruned["saved_epochs"], pruned["planned_epochs"]) == (8 + 16, 40)
    assert pruned["saved_fraction"] == 24 / 40
    assert pruned["summary"] == ("[sweep] stopped early: 2 of 3 trials (b after 2/10, c after 4/20); "
                                 "24 of 40 planned pre-training epochs not run (60 % saved)")


def test_the_report_says_what_each_trial_cost_per_point_of_accuracy_and_the_hours_asha_saved():
    """What a trial's jobs held (``total_cpu_hours``; ``total_cost`` with a price) beside its accuracies, the
    accuracy per unit of it (per unit of money where there is a price), and a stopped trial's epochs not run at
    what its own epochs cost."""
    rows = [{"trial": "a", "status": "finished", "linprobe_top1": 50.0, "finetune_top1": 60.0,
             "total_cpu_hours": 0.5},
            {"trial": "b", "status": "stopped", "epochs_run": 2, "total_cpu_hours": 0.1},  # 0.05 per epoch
            {"trial": "random-init", "status": "baseline", "linprobe_top1": 20.0, "total_cpu_hours": 0.25}]
    sweep_report.per_unit(rows)
    assert rows[0]["linprobe_top1_per_cpu_hour"] == 100.0 and rows[0]["finetune_top1_per_cpu_hour"] == 120.0
    assert rows[2]["linprobe_top1_per_cpu_hour"] == 80.0 and "linprobe_top1_per_cpu_hour" not in rows[1]
    pruned = sweep_report.early_stops(rows, epochs=10)
    assert pruned["saved_hours"] == pytest.approx(0.05 * 8)
    assert pruned["summary"].endswith("(40 % saved; about 0.4 CPU-core-hours not spent)")
    columns = sweep_report._columns(rows, [])
    assert columns.index("total_cpu_hours") < columns.index("linprobe_top1_per_cpu_hour") < columns.index("epochs_run")
    assert "| a | finished | 50.00 | 60.00 | 0.5 | 100.00 | 120.00 |  |" in sweep_report.to_markdown(rows, columns)
    priced = [{"trial": "a", "status": "finished", "linprobe_top1": 50.0, "total_cpu_hours": 0.5, "total_cost": 2.0}]
    sweep_report.per_unit(priced)  # with a price, accuracy per unit of money
    assert priced[0]["linprobe_top1_per_cost"] == 25.0 and "linprobe_top1_per_cpu_hour" not in priced[0]


def test_the_report_prints_paper_and_measured_side_by_side():
    sweep, _ = sweeps.load_sweep(os.path.join(SWEEPS, "paper_mask_sampling.yaml"), [])
    rows = [{"trial": "t1", "status": "finished", "case": "block 50%", "linprobe_top1": 41.25, "finetune_top1": 50.5},
            {"trial": "t0", "status": "finished", "case": "random 75%", "linprobe_top1": 45.0},
            {"trial": "random-init", "status": "baseline", "linprobe_top1": 30.0}]
    rows = sweep_report.add_paper(rows, sweep)
    assert rows[0]["paper_linprobe_top1"] == 72.3 and rows[0]["paper_finetune_top1"] == 83.9
    assert rows[1]["paper_linprobe_top1"] == 73.5 and "paper_linprobe_top1" not in rows[2]
    columns = sweep_report._columns(rows, ["case"])
    assert columns[:7] == ["trial", "status", "case", "linprobe_top1", "paper_linprobe_top1", "finetune_top1",
                           "paper_finetune_top1"]
    lines = sweep_report.to_markdown(rows, columns).splitlines()
    assert lines[2] == "| t1 | finished | block 50% | 41.25 | 72.30 | 50.50 | 83.90 |"


@pytest.mark.parametrize("edit, message", [
    ({"pretrain": False}, "pretrain: false evaluates one fixed encoder"),
    ({"pretrain": False, "overrides": {"eval.checkpoint": "random"}}, "model.mask_ratio is a pre-training setting"),
    ({"paper": {"0.7": {"linprobe_top1": 1.0}}}, "paper.0.7 is not a value of model.mask_ratio"),
    ({"paper": {"0.5": {"linprobe": 1.0}}}, "expected {linprobe_top1: .., finetune_top1: ..}"),
    ({"cases": {"a": {"model.mask_ratio": 0.5}}, "search": {"case": {"grid": ["a"]}}}, "do not also list it"),
    ({"cases": {"g": {"model.mask_sampling": "grid", "model.mask_ratio": 0.5}}, "search": {}},
     "mask_sampling=grid keeps one patch of every 2x2"),
    ({"jobs": {"0.6": ["linprobe"]}}, "jobs.0.6 is not a value of model.mask_ratio"),
    ({"jobs": {"0.5": ["probe"]}}, "jobs.0.5: expected a list of linprobe and/or finetune"),
    ({"best_of": {"train.epochs": [1, 2]}}, "best_of.train.epochs: expected a linprobe"),
    ({"best_of": {"finetune.epochs": []}}, "best_of.finetune.epochs: expected a non-empty list"),
    ({"best_of": {"finetune.epochs": [10, -1]}}, "finetune.epochs"),
])
def test_a_wrong_paper_key_or_case_is_one_clear_error(tmp_path, edit, message):
    import yaml

    (tmp_path / "base.yaml").write_text(yaml.safe_dump({"model": {"name": "mae_vit_micro_patch4"}}))
    spec = {"base": "base.yaml", "search": {"model.mask_ratio": {"grid": [0.5, 0.75]}}, **edit}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match=message.replace("{", r"\{").replace("}", r"\}").replace(".", r"\.")):
        sweeps.load_sweep(str(tmp_path / "s.yaml"), [])


def test_the_quickstart_fits_its_three_trials_and_baseline_on_two_cores_and_says_what_its_table_shows():
    from mae_ray.jobs import quickstart
    from mae_ray.jobs import sweep as sweep_run

    sweep, cfg = sweeps.load_sweep(os.path.join(SWEEPS, "quickstart.yaml"), [])
    share = sweep_run._trial_resources(sweep, cfg)["cpu"]  # a trial's, and the baseline task's
    assert cfg.ray.num_workers == 0 and sweep.random_baseline and sweep.linprobe and sweep.finetune
    assert len(points(sweep)) == sweep.max_concurrent_trials == 3 and (3 + 1) * share <= 2  # all at once

    rows = [{"status": "finished", "linprobe_top1": 60.4, "finetune_top1": 20.3},
            {"status": "finished", "linprobe_top1": 54.3, "finetune_top1": 21.1},
            {"status": "stopped", "linprobe_top1": 10.0},  # not a finished trial: not counted
            {"status": "baseline", "linprobe_top1": 51.0, "finetune_top1": 37.1}]
    assert quickstart.reading(rows) == [
        "linear probe: every MAE trial beats random init (54.3-60.4 vs 51.0)",
        "fine-tuning: random init beats every MAE trial (37.1 vs 20.3-21.1) at this budget; docs/results.md "
        "measures where MAE starts to pay off on this data, and why"]
    rows[-1]["finetune_top1"] = 20.5
    assert quickstart.reading(rows)[1] == "fine-tuning: MAE trials 20.3-21.1, random init 20.5"
