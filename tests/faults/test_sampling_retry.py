"""An ncsn-sampling trial (evaluate_checkpoint) whose Langevin graph capture fails is retried without graphs."""
import pytest

from genmodels.data import synthetic_images


def test_an_ncsn_sampling_trial_whose_capture_failed_is_retried_without_graphs(tmp_path, monkeypatch):
    import genmodels.experiment as experiment
    import trainables.trainable as tr
    from genmodels.cuda_graph import GraphCaptureFailed
    from genmodels.experiment import make_experiment

    data = {"train": synthetic_images(16), "test": synthetic_images(8, seed=1)}
    trained = make_experiment("ncsn", {"arch": "unet", "width": 8, "unet_blocks": 1, "sigma_1": 20.0,
                                       "num_levels": 2, "langevin_steps": 1, "batch_size": 8, "steps_per_epoch": 1,
                                       "epochs": 1, "cuda_graphs": True}, data["train"], data["test"], device="cpu")
    trained.train_epoch()
    checkpoint = trained.save(tmp_path / "state.pt")
    folder = tmp_path / "sweep"
    monkeypatch.setattr(tr.tune, "get_checkpoint", lambda: None)
    monkeypatch.setattr(tr.tune, "get_context", lambda: type("C", (), {"get_trial_id": lambda self: "t1"})())
    monkeypatch.chdir(tmp_path)
    reports, graphs = [], []
    monkeypatch.setattr(tr.tune, "report", lambda metrics, checkpoint=None: reports.append(metrics))
    from_checkpoint = experiment.Experiment.from_checkpoint.__func__

    def capture_fails_once(cls, path, train, test, overrides=None, device=None):
        exp = from_checkpoint(cls, path, train, test, overrides, device)
        graphs.append(exp.cfg.train.cuda_graphs)
        if len(graphs) == 1:
            raise GraphCaptureFailed("capture of the Langevin step failed; run it with CUDA graphs off: "
                                     "train.cuda_graphs=false")
        return exp

    monkeypatch.setattr(tr.Experiment, "from_checkpoint", classmethod(capture_fails_once))
    config = {"model_name": "ncsn", "checkpoint": str(checkpoint), "model.langevin_steps": 1}
    with pytest.raises(GraphCaptureFailed):
        tr.train_trial(config, data, tr.TrialPlan("test_dsm_loss"), folder=str(folder))
    tr.train_trial(config, data, tr.TrialPlan("test_dsm_loss"), folder=str(folder))
    assert graphs == [True, False]  # the checkpoint's setting, then the retry's
    assert [r["graphs_off_after_failed_capture"] for r in reports] == [1]


def test_an_ncsn_sampling_trial_prepares_its_process_as_a_training_trial_does(tmp_path, monkeypatch):
    """A sampling trial pays its process's one-time costs up front and reports them, and from then on its process's
    trials start without walking what the process holds (trainables.trainable.prepare_process)."""
    import gc

    import trainables.trainable as tr
    from genmodels.experiment import make_experiment

    data = {"train": synthetic_images(16), "test": synthetic_images(8, seed=1)}
    trained = make_experiment("ncsn", {"arch": "unet", "width": 8, "unet_blocks": 1, "sigma_1": 20.0,
                                       "num_levels": 2, "langevin_steps": 1, "batch_size": 8, "steps_per_epoch": 1,
                                       "epochs": 1}, data["train"], data["test"], device="cpu")
    trained.train_epoch()
    checkpoint = trained.save(tmp_path / "state.pt")
    monkeypatch.setattr(tr, "_process_prepared", False)
    monkeypatch.setattr(tr.tune, "get_checkpoint", lambda: None)
    monkeypatch.setattr(tr.tune, "get_context", lambda: type("C", (), {"get_trial_id": lambda self: "t1"})())
    monkeypatch.chdir(tmp_path)
    reports = []
    monkeypatch.setattr(tr.tune, "report", lambda metrics, checkpoint=None: reports.append(metrics))
    gc.unfreeze()
    try:
        tr.train_trial({"model_name": "ncsn", "checkpoint": str(checkpoint), "model.langevin_steps": 1}, data,
                       tr.TrialPlan("test_dsm_loss"), folder=str(tmp_path / "sweep"))
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()  # this test process runs other tests: leave it as it was
    assert len(reports) == 1 and reports[0]["process_setup_s"] > 0, reports
