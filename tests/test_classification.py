"""Noisy classification: front ends give the solver's codes, backbones fit the features, corrupted test
sets are deterministic, and a tiny run trains and evaluates every front end × corruption × level."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from warplca import LCA, ConvDictionary
from warplca.bundle import WarpLCA
from warplca.data import DEFAULT_LEVELS, DigitsDataModule, Normalization, corrupt
from warplca.evaluation.robustness import (
    CSV_COLUMNS,
    CorruptedDataset,
    corrupted_tensor,
    item_seed,
    read_robustness_csv,
    robustness_conditions,
    robustness_markdown,
    robustness_summary,
    write_robustness_csv,
)
from warplca.frontends import LCAFrontEnd, PixelFrontEnd, WarpLCAFrontEnd, build_frontend
from warplca.models.classifiers import SmallCNN, build_backbone, resnet18_classifier
from warplca.models.warp_cnn import WarpCNN
from warplca.modules.noisy_classification import FrontEndDataModule, NoisyClassification

NORM = Normalization(mean=(0.3,), scale=1.0)


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: these models are tiny, and on a shared, busy CPU extra OpenMP threads
    only spin (a 2-thread step measured ~30x slower than a 1-thread one under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _dictionary(channels: int = 1) -> ConvDictionary:
    return ConvDictionary(n_atoms=8, in_channels=channels, kernel_size=5, stride=2, seed=3)


def _bundle(channels: int = 1) -> WarpLCA:
    """An untrained predictor; the start guard is off so its (poor) starts are used as they are."""
    torch.manual_seed(0)
    d = _dictionary(channels)
    net = WarpCNN(channels, 8, 2, width=8, depth=2)
    norm = Normalization(mean=(0.3,) * channels, scale=1.0)
    return WarpLCA(d, net, LCA(d, lam=0.3, tau="auto"), norm, start_guard=False)


def _images(n: int = 4, c: int = 1, size: int = 16, seed: int = 0) -> Tensor:
    return torch.rand(n, c, size, size, generator=torch.Generator().manual_seed(seed))


# -- front ends ---------------------------------------------------------------------------------
def test_lca_frontend_gives_exactly_the_solver_codes() -> None:
    d = _dictionary()
    settings = {"threshold": "hard", "lam": 0.3, "tau": "auto", "iters": 999}
    fe = LCAFrontEnd(d, settings, iters=25, normalization=NORM)
    x = _images()
    ref = LCA(d, **settings)(NORM.apply(x), iters=25).a
    out = fe(x)
    assert torch.equal(out, ref)
    assert out.shape == (4, *fe.feature_shape(16, 16)) == (4, 8, 8, 8)
    assert (out != 0).any() and (out == 0).any()
    # an LCA instance as settings, and build_frontend, give the same codes
    assert torch.equal(LCAFrontEnd(d, LCA(d, **settings), 25, NORM)(x), ref)
    assert torch.equal(build_frontend("lca", dictionary=d, lca_settings=settings, iters=25,
                                      normalization=NORM)(x), ref)


def test_warp_frontend_gives_exactly_the_bundle_codes() -> None:
    bundle = _bundle()
    x = _images()
    fe = WarpLCAFrontEnd(bundle, iters=3)
    assert torch.equal(fe(x), bundle(bundle.preprocess(x), iters=3).a)
    cold = WarpLCAFrontEnd(bundle, iters=3, warm=False)
    assert torch.equal(cold(x), bundle(bundle.preprocess(x), iters=3, warm=False).a)
    assert not torch.equal(fe(x), cold(x))
    assert torch.equal(build_frontend("warp_lca", bundle=bundle, iters=3)(x), fe(x))


def test_pixel_frontend_is_the_normalisation() -> None:
    x = _images(c=3)
    norm = Normalization(mean=(0.1, 0.2, 0.3), scale=0.5)
    fe = build_frontend("pixels", normalization=norm)
    assert isinstance(fe, PixelFrontEnd) and fe.in_channels == 3
    assert torch.equal(fe(x), norm.apply(x))
    assert fe.feature_shape(32, 32) == (3, 32, 32)


def test_frontends_are_frozen_copies_and_time_themselves() -> None:
    d = _dictionary()
    fe = LCAFrontEnd(d, {"lam": 0.3, "tau": "auto"}, iters=5, normalization=NORM)
    assert fe.dictionary is not d and all(not p.requires_grad for p in fe.parameters())
    assert d.weight.requires_grad  # the caller's dictionary is untouched
    fe.train()
    assert not fe.training
    wfe = WarpLCAFrontEnd(_bundle(), iters=2)
    wfe.train()
    assert not wfe.bundle.predictor.training and all(not p.requires_grad for p in wfe.parameters())
    x = _images().requires_grad_(True)
    feats, ms = fe.timed(x)
    assert not feats.requires_grad and ms >= 0.0


def test_lca_frontend_loads_the_atoms_of_older_classifier_checkpoints() -> None:
    """Checkpoints from before the front end held a SparseCoder store the atoms as ``dictionary.weight``."""
    fe = LCAFrontEnd(_dictionary(), {"lam": 0.3, "tau": "auto"}, iters=2, normalization=NORM)
    atoms = _dictionary().weight.detach() + 1.0
    fe.load_state_dict({"dictionary.weight": atoms})
    assert torch.equal(fe.dictionary.weight, atoms) and fe.lca.dictionary is fe.dictionary


def test_frontend_errors_are_clear() -> None:
    d = _dictionary()
    fe = LCAFrontEnd(d, {"lam": 0.3, "tau": "auto"}, iters=2)
    with pytest.raises(ValueError, match="1-channel"):
        fe(_images(c=3))
    with pytest.raises(ValueError, match="B, C, H, W"):
        fe(torch.rand(1, 16, 16))
    with pytest.raises(ValueError, match="unknown front end"):
        build_frontend("sift")
    with pytest.raises(ValueError, match="needs a dictionary"):
        build_frontend("lca", iters=3)
    with pytest.raises(ValueError, match="needs iters"):
        build_frontend("warp_lca", bundle=_bundle())
    with pytest.raises(ValueError, match="channels"):
        LCAFrontEnd(d, {}, 2, normalization=Normalization(mean=(0.1, 0.2, 0.3)))


# -- backbones ----------------------------------------------------------------------------------
@pytest.mark.parametrize(("channels", "size"), [(3, 32), (64, 16)])
def test_resnet18_stem_is_adapted(channels: int, size: int) -> None:
    net = resnet18_classifier(channels, 10, input_size=size)
    assert net.conv1.in_channels == channels
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
    assert isinstance(net.maxpool, nn.Identity)
    net.eval()
    assert net(torch.randn(2, channels, size, size)).shape == (2, 10)


def test_resnet18_keeps_the_imagenet_stem_for_large_inputs() -> None:
    net = build_backbone("resnet18", 3, 5, input_size=128)
    assert net.conv1.kernel_size == (7, 7) and net.conv1.stride == (2, 2)
    assert not isinstance(net.maxpool, nn.Identity)


def test_small_cnn_any_resolution() -> None:
    net = build_backbone("small_cnn", 8, 10, input_size=8, width=8)
    assert isinstance(net, SmallCNN)
    net.eval()
    for size in (8, 16, 32):
        assert net(torch.randn(3, 8, size, size)).shape == (3, 10)
    with pytest.raises(ValueError, match="unknown backbone"):
        build_backbone("vgg", 3, 10)


# -- corrupted test sets ------------------------------------------------------------------------
def test_conditions_default_to_the_data_levels() -> None:
    conds = robustness_conditions()
    assert conds[0] == ("clean", 0.0)
    for name, levels in DEFAULT_LEVELS.items():
        assert [lv for c, lv in conds if c == name] == [float(v) for v in levels]
        assert len(levels) >= 4
    with pytest.raises(ValueError, match="unknown corruption"):
        robustness_conditions({"fog": [0.1]})
    with pytest.raises(ValueError, match="> 0"):
        robustness_conditions({"gaussian_noise": [0.0]})


@pytest.mark.parametrize("name", sorted(DEFAULT_LEVELS))
def test_corrupted_test_set_is_deterministic_and_batch_independent(name: str) -> None:
    x = _images(n=20, seed=1)
    base = TensorDataset(x, torch.arange(20))
    level = DEFAULT_LEVELS[name][2]
    ds = CorruptedDataset(base, name, level, seed=5)
    items = torch.stack([ds[i][0] for i in range(20)])
    by_7 = torch.cat([b[0] for b in DataLoader(ds, batch_size=7)])
    again = torch.cat([b[0] for b in DataLoader(CorruptedDataset(base, name, level, seed=5), batch_size=20)])
    if name == "gaussian_blur":  # deterministic filter, batched: equal up to float rounding
        torch.testing.assert_close(by_7, items, rtol=0, atol=1e-6)
        torch.testing.assert_close(again, items, rtol=0, atol=1e-6)
        torch.testing.assert_close(items, corrupt(x, name, level), rtol=0, atol=1e-6)
    else:
        assert torch.equal(by_7, items) and torch.equal(again, items)
        assert torch.equal(items[3], corrupt(x[3:4], name, level, item_seed(5, 3))[0])
        other = torch.stack([CorruptedDataset(base, name, level, seed=6)[i][0] for i in range(20)])
        assert not torch.equal(other, items)
        assert not torch.equal(items[0], items[1] - x[1] + x[0])  # independent noise per image
    assert torch.equal(torch.stack([ds[i][1] for i in range(20)]), torch.arange(20))
    assert not torch.equal(items, x) and items.min() >= 0 and items.max() <= 1
    assert torch.equal(corrupted_tensor(x, "clean", 0.0), x)
    assert torch.equal(CorruptedDataset(base, "clean", 0.0)[4][0], x[4])


def test_corrupted_sets_are_at_the_stated_levels() -> None:
    grey = torch.full((64, 1, 16, 16), 0.5)
    base = TensorDataset(grey, torch.zeros(64, dtype=torch.long))
    for name in ("gaussian_noise", "shot_noise"):
        for level in (0.05, 0.1):  # small enough that clamping to [0, 1] is negligible at mid-grey
            noisy = torch.stack([CorruptedDataset(base, name, level, seed=0)[i][0] for i in range(64)])
            assert abs(float((noisy - grey).std()) - level) < 0.1 * level, (name, level)
    hits = torch.stack([CorruptedDataset(base, "impulse_noise", 0.1, seed=0)[i][0] for i in range(64)])
    assert abs(float((hits != 0.5).float().mean()) - 0.1) < 0.01
    edge = torch.zeros(1, 1, 16, 16)
    edge[..., 8:] = 1.0
    blurred = CorruptedDataset(TensorDataset(edge, torch.zeros(1)), "gaussian_blur", 1.0)[0][0]
    assert 0.0 < float(blurred[0, 8, 7]) < 0.5 < float(blurred[0, 8, 8]) < 1.0


def test_robustness_table_round_trip(tmp_path: Path) -> None:
    rows = [{"frontend": fe, "corruption": c, "level": lv, "accuracy": acc, "ms_per_image": ms}
            for fe, ms in (("pixels", 0.01), ("warp_lca", 1.5))
            for (c, lv), acc in ((("clean", 0.0), 0.9), (("gaussian_noise", 0.1), 0.6),
                                 (("gaussian_noise", 0.2), 0.4))]
    path = write_robustness_csv(rows, tmp_path / "robustness.csv")
    with open(path) as fh:
        assert next(csv.reader(fh)) == list(CSV_COLUMNS)
    back = read_robustness_csv(path)
    assert back == [{**r, "level": float(r["level"])} for r in rows]
    summary = robustness_summary(back)
    assert summary["pixels"]["clean"] == 0.9 and summary["pixels"]["mca"] == pytest.approx(0.5)
    md = robustness_markdown(back)
    assert "| pixels | 90.0 | 50.0 |" in md and "gaussian_noise" in md
    assert "| front end | clean acc. % | mCA % |" in md
    assert "correctly classified test images / test images" in md


class _FirstTwoPixels(nn.Module):
    """A fixed 'backbone': the logits of 2 classes are the first two pixels of the (1, 1, 2) image."""

    def forward(self, x: Tensor) -> Tensor:
        return x.flatten(1)[:, :2]


def test_accuracy_is_micro_averaged_on_a_hand_made_example() -> None:
    """Labels [0, 0, 0, 1], predictions always class 0 (clean); under noise, predictions [0, 1, 1, 1].

    Micro (correct / images): clean 3/4, noisy 2/4, mCA 2/4. Macro (the mean per-class recall, balanced
    accuracy) would be 1/2 clean and (1/3 + 1) / 2 = 2/3 noisy: the example tells the two apart."""
    from torchmetrics.functional.classification import multiclass_accuracy

    to_zero, to_one = [1.0, 0.0], [0.0, 1.0]
    labels = torch.tensor([0, 0, 0, 1])
    clean = torch.tensor([to_zero, to_zero, to_zero, to_zero]).reshape(4, 1, 1, 2)
    noisy = torch.tensor([to_zero, to_one, to_one, to_one]).reshape(4, 1, 1, 2)
    for images, micro, macro in ((clean, 0.75, 0.5), (noisy, 0.5, 2 / 3)):
        preds = images.flatten(1).argmax(1)
        assert float(multiclass_accuracy(preds, labels, 2, average="micro")) == pytest.approx(micro)
        assert float(multiclass_accuracy(preds, labels, 2, average="macro")) == pytest.approx(macro)
    module = NoisyClassification(PixelFrontEnd(1), _FirstTwoPixels(), num_classes=2, image_size=2,
                                 conditions=[("clean", 0.0), ("gaussian_noise", 0.1)])
    assert module.ACCURACY_AVERAGE == "micro"
    assert all(m.average == "micro" for m in (module.train_acc, module.val_acc, *module.test_acc))
    loaders = [DataLoader(TensorDataset(x, labels), batch_size=3) for x in (clean, noisy)]  # 2 batches each
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.test(module, dataloaders=loaders, verbose=False)
    rows = module.robustness_rows
    assert [r["accuracy"] for r in rows] == [pytest.approx(0.75), pytest.approx(0.5)]
    logged = trainer.callback_metrics
    assert float(logged["test/acc/clean"]) == pytest.approx(0.75)
    assert float(logged["test/mca"]) == pytest.approx(0.5)
    assert robustness_summary(rows)["pixels"] == {"clean": pytest.approx(0.75), "mca": pytest.approx(0.5),
                                                  "gaussian_noise": pytest.approx(0.5),
                                                  "ms_per_image": pytest.approx(rows[0]["ms_per_image"])}
    md = robustness_markdown(rows)
    assert "| pixels | 75.0 | 50.0 | 50.0 |" in md and "micro-averaged" in md


def test_classify_stage_recomputes_rows_of_another_accuracy_definition(tmp_path: Path) -> None:
    from warplca.tasks.stage_classify import _load_rows

    rows = [{"frontend": "pixels", "corruption": "clean", "level": 0.0, "accuracy": 0.5, "ms_per_image": 1.0}]
    torch.save({"robustness_rows": rows, "accuracy_average": "micro"}, tmp_path / "micro.ckpt")
    torch.save({"robustness_rows": rows}, tmp_path / "old.ckpt")  # before the definition was stored: macro
    assert _load_rows(tmp_path / "micro.ckpt") == rows
    assert _load_rows(tmp_path / "old.ckpt") is None


# -- the LightningModule and a tiny run ---------------------------------------------------------
def _digits(size: int = 16) -> DigitsDataModule:
    return DigitsDataModule(batch_size=64, image_size=size)


def test_module_trains_only_the_backbone_and_tests_every_condition(tmp_path: Path) -> None:
    pl.seed_everything(0, verbose=False)
    dm = _digits()
    conditions = {"gaussian_noise": [0.1, 0.3], "impulse_noise": [0.05], "gaussian_blur": [1.0]}
    fe = LCAFrontEnd(_dictionary(), {"lam": 0.3, "tau": "auto"}, iters=3, normalization=dm.normalization)
    module = NoisyClassification(fe, "small_cnn", 10, image_size=16, backbone_kwargs={"width": 8},
                                 conditions=conditions, lr=2e-3)
    fdm = FrontEndDataModule(dm, fe, module.conditions)
    trainer = pl.Trainer(max_epochs=4, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_test_batches=2)
    before = fe.dictionary.weight.clone()
    trainer.fit(module, datamodule=fdm)
    opt_params = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert opt_params == {id(p) for p in module.backbone.parameters()}
    assert torch.equal(fe.dictionary.weight, before)
    assert len(fdm.features("train")) == len(dm.split_dataset("train")) and fdm.cache
    cached = fdm.features("val").features[:5]
    assert torch.equal(cached, fe(torch.stack([dm.split_dataset("val")[i][0] for i in range(5)])))
    trainer.test(module, datamodule=fdm, verbose=False)
    rows = module.robustness_rows
    assert [(r["corruption"], r["level"]) for r in rows] == module.conditions
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["ms_per_image"] > 0 for r in rows)
    assert rows[0]["accuracy"] > 0.3  # learned something in four epochs on 3-step codes
    logged = trainer.callback_metrics
    assert "test/mca" in logged and "test/acc/gaussian_noise@0.3" in logged
    # the checkpoint restores the classifier (front end passed back in) and its rows
    path = tmp_path / "c.ckpt"
    trainer.save_checkpoint(path)
    again = NoisyClassification.load_from_checkpoint(path, frontend=fe)
    assert again.robustness_rows == rows and again.conditions == module.conditions
    x = dm.split_dataset("test")[0][0][None]
    module.eval()
    again.eval()
    assert torch.equal(module(x), again(x))


def test_cache_refuses_augmented_training_data() -> None:
    dm = DigitsDataModule(image_size=16, crop_size=12)
    fe = PixelFrontEnd(1)
    assert not FrontEndDataModule(dm, fe, cache="auto").cache
    with pytest.raises(ValueError, match="augments"):
        FrontEndDataModule(dm, fe, cache=True)


def test_classify_stage_tiny_run(make_cfg, tmp_path: Path) -> None:
    from warplca.tasks.train import train

    run = tmp_path / "run"
    run.mkdir()
    bundle = _bundle()
    bundle.save(run / "warp_lca.pt")
    corruptions = "{gaussian_noise:[0.1,0.3],shot_noise:[0.2],impulse_noise:[0.05],gaussian_blur:[1.0]}"
    cfg = make_cfg("data=digits", "data.image_size=16", "stages=[classify]", "logger=csv",
                   f"warp_path={run / 'warp_lca.pt'}", "model.classify.backbone=small_cnn",
                   "+model.classify.backbone_kwargs.width=4", "model.classify.lca_iters_cold=4",
                   "model.classify.lca_iters_warm=1", f"model.classify.corruptions={corruptions}",
                   "trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
                   "trainer.limit_test_batches=1", "trainer.enable_progress_bar=false", output_dir=run)
    metrics = train(cfg)
    rows = read_robustness_csv(run / "robustness.csv")
    expected = {(fe, c, lv) for fe in ("pixels", "lca", "warp_lca")
                for c, lv in [("clean", 0.0), ("gaussian_noise", 0.1), ("gaussian_noise", 0.3),
                              ("shot_noise", 0.2), ("impulse_noise", 0.05), ("gaussian_blur", 1.0)]}
    assert {(r["frontend"], r["corruption"], r["level"]) for r in rows} == expected and len(rows) == 18
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in rows)
    for name in ("classifier_pixels.ckpt", "classifier_lca.ckpt", "classifier_warp_lca.ckpt",
                 "classifier.ckpt", "robustness.png", "robustness.md"):
        assert (run / name).is_file(), name
    assert (run / "checkpoints" / "classify" / "lca" / "last.ckpt").is_file()
    saved = json.loads((run / "metrics.json").read_text())["classify"]
    for fe in ("pixels", "lca", "warp_lca"):
        assert 0.0 <= saved[f"{fe}/mca"] <= 1.0 and f"{fe}/acc/gaussian_noise@0.3" in saved
    assert "cost_ratio/lca_over_warp" in saved and "classify/warp_minus_lca/mca" in metrics
    # a second invocation skips the stage; force=true with one front end reuses nothing but that one
    (run / "robustness.csv").unlink()
    mtime = (run / "classifier_lca.ckpt").stat().st_mtime_ns
    train(cfg)
    assert (run / "robustness.csv").is_file()
    assert (run / "classifier_lca.ckpt").stat().st_mtime_ns == mtime  # reused, not retrained
    assert read_robustness_csv(run / "robustness.csv") == rows
