"""One training recipe on both sides (issue 26): the server's AdamW and schedule, one model-selection rule,
class counts before round 0, independent data-order seeds, threads per simulated site."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from nvflare.app_common.abstract.fl_model import FLModel
from torch import nn

from fedbrain.fl.controller import FedbrainController
from fedbrain.fl.metrics import CLASS_COUNTS, COUNT_PREFIX, REQUEST, VALIDATE, validation_counts
from fedbrain.settings import BUDGET_EPOCHS, FEDERATION_BATCH, MULTI_STEP_LOCAL_LR, JobSettings
from fedbrain.training import (
    WARMUP_FRACTION,
    TrainConfig,
    cosine_schedule,
    derived_seed,
    train_keep_best,
    validation_points,
)


def server(**kwargs) -> FedbrainController:
    args = {"num_rounds": 100, "server_optimizer": "adamw", "server_lr": 2e-3, **kwargs}
    return FedbrainController(**args)


def lr_by_round(ctrl: FedbrainController) -> dict[int, float]:
    out = {}
    for r in range(ctrl.start_round, ctrl.start_round + ctrl.num_rounds):
        ctrl.current_round = r
        out[r] = ctrl._lr()
    return out


# ---------------------------------------------------------------- the server's optimiser and schedule


def test_the_server_lr_warms_up_then_anneals_to_about_zero_at_the_last_planned_round():
    lrs = list(lr_by_round(server()).values())
    warm = int(100 * WARMUP_FRACTION)
    assert all(a < b for a, b in zip(lrs[:warm - 1], lrs[1:warm], strict=True))  # linear warm-up
    assert max(lrs) == pytest.approx(2e-3) and int(np.argmax(lrs)) == warm - 1
    assert all(a >= b for a, b in zip(lrs[warm - 1:], lrs[warm:], strict=False))  # then only down
    assert lrs[-1] < 0.01 * 2e-3 and lrs[len(lrs) // 2] == pytest.approx(1e-3, rel=0.1)
    # the same curve, per round, as centralised training's per step
    assert lrs == pytest.approx([2e-3 * cosine_schedule()(r, 100) for r in range(100)])


def test_a_resumed_job_continues_its_server_schedule_where_it_stopped():
    whole = lr_by_round(server())
    resumed = lr_by_round(server(start_round=60, num_rounds=40, plan_start_round=0))
    assert resumed == pytest.approx({r: whole[r] for r in range(60, 100)})
    restarted = lr_by_round(server(start_round=60, num_rounds=40))  # without its plan: a new schedule
    assert restarted[60] != pytest.approx(whole[60])


def test_a_resumed_server_continues_its_adam_moments_from_the_round_file(tmp_path):
    from fedbrain.fl.controller import save_round
    from fedbrain.fl.metrics import SERVER_STATE

    rng = np.random.default_rng(0)
    updates = [{"w": rng.normal(size=4).astype(np.float32)} for _ in range(6)]

    def run(ctrl, weights, rounds):
        for r in rounds:
            ctrl.current_round = r
            weights = ctrl._server_step(weights, {"w": weights["w"] + updates[r]["w"]})
        return weights

    start = {"w": np.zeros(4, np.float32)}
    whole = run(server(num_rounds=6), start, range(6))
    first = server(num_rounds=6)
    halfway = run(first, start, range(3))
    path = str(tmp_path / "round-0002.pt")
    save_round(path, halfway, 2, {SERVER_STATE: {"steps": first._steps, "m": first._velocity, "v": first._second}})
    resumed = server(start_round=3, num_rounds=3, plan_start_round=0, initial_control=path)
    resumed._load_server_state()
    np.testing.assert_allclose(run(resumed, halfway, range(3, 6))["w"], whole["w"], rtol=1e-5)


def test_the_resumed_settings_keep_the_plans_first_round(tmp_path):
    from fedbrain.fl.controller import save_round
    from fedbrain.fl.simulate import resume_in_place
    from fedbrain.runs import ROUND_FILE, RunDir

    run = RunDir(tmp_path)
    run.write_config(kind="federated", job=JobSettings.create(rounds=10, start_round=0).to_dict(), sites=[])
    run.rounds.mkdir(parents=True, exist_ok=True)
    save_round(str(run.rounds / ROUND_FILE.format(3)), {"w": np.zeros(2, np.float32)}, 3)
    settings = resume_in_place(run)
    assert (settings.start_round, settings.rounds, settings.plan_start_round) == (4, 6, 0)


def test_server_adamw_decays_each_weight_in_proportion_to_itself_outside_the_adam_step():
    current = {"small": np.full(3, 1.0, np.float32), "large": np.full(3, 10.0, np.float32),
               "frozen": np.full(3, 5.0, np.float32)}
    averaged = {"small": current["small"] + 0.01, "large": current["large"] + 0.01, "frozen": current["frozen"]}
    adam, adamw = server(server_optimizer="adam"), server(server_weight_decay=0.5)
    adamw.current_round = adam.current_round = 50
    plain, decayed = adam._server_step(current, averaged), adamw._server_step(current, averaged)
    lr = adamw._lr()
    step = plain["small"] - current["small"]  # Adam's step does not depend on the weight's size
    np.testing.assert_allclose(plain["large"] - current["large"], step, rtol=1e-4)
    for k in ("small", "large"):  # AdamW: the same step, after the weight shrinks by lr x decay x itself
        np.testing.assert_allclose(decayed[k], current[k] * (1 - lr * 0.5) + step * lr / adam._lr(), rtol=1e-5)
    np.testing.assert_array_equal(decayed["frozen"], current["frozen"])  # no site changed it: not decayed


def test_under_server_adamw_the_sites_gradient_carries_no_weight_decay():
    assert JobSettings.create().server_optimizer == "adamw"
    assert JobSettings.create().site_dict()["train"]["weight_decay"] == 0.0
    assert JobSettings.create(server_optimizer="adam").site_dict()["train"]["weight_decay"] == TrainConfig.weight_decay
    assert JobSettings.create().server_weight_decay == TrainConfig.weight_decay
    with pytest.raises(ValueError, match="server_warmup"):
        JobSettings.create(server_warmup=1.5)


def test_several_local_steps_take_plain_sgd_steps_at_a_stable_lr_and_one_step_keeps_lr_one():
    assert JobSettings.create().train.lr == 1.0 and JobSettings.create().train.batch_size == FEDERATION_BATCH
    for train in ({"steps": 4}, {"steps": 16}, {"steps": 0, "epochs": 1}):
        assert JobSettings.create(train=train).train.lr == MULTI_STEP_LOCAL_LR
    assert JobSettings.create(train={"steps": 4, "lr": 0.1}).train.lr == 0.1  # the user's choice stands


# ---------------------------------------------------------------- one model-selection rule


def test_validation_points_spread_the_candidates_and_always_include_the_final_model():
    assert validation_points(8, 8) == list(range(1, 9))  # centralised: every epoch
    for total, candidates in ((631, 8), (30, 8), (5, 8), (100, 3), (7, 0)):
        points = validation_points(total, candidates)
        assert points[-1] == total and len(points) == (min(candidates, total) if candidates > 0 else total)
        assert points == sorted(set(points)) and points[0] >= 1
    gaps = np.diff([0, *validation_points(631, 8)])
    assert gaps.max() - gaps.min() <= 1


def test_the_federation_validates_as_many_global_models_as_centralised_has_epochs_the_final_one_included():
    ctrl = server(num_rounds=631, validations=BUDGET_EPOCHS)
    in_rounds = [r for r in range(631) if ctrl._validates(r)]
    assert len(in_rounds) + 1 == BUDGET_EPOCHS  # + the final model, after the last round
    assert 0 not in in_rounds  # the initial model is no candidate


class _Sites:
    """The sites' answers to the controller's requests (no NVFlare): counts, or a validation of a model."""

    def __init__(self, counts: dict[str, list[int]], probs: np.ndarray | None = None, targets=None):
        self.counts, self.probs, self.targets, self.sent = counts, probs, targets, []

    def __call__(self, data: FLModel, task_name="train", blocking=True, **_kwargs):
        self.sent.append(data)
        if not blocking:
            return None
        if data.meta[REQUEST] == "counts":
            return [FLModel(metrics={f"{COUNT_PREFIX}{k}": c for k, c in enumerate(v)}, meta={"client_name": s})
                    for s, v in self.counts.items()]
        return [FLModel(metrics={"val_score": 0.5, **validation_counts(self.probs, self.targets)},
                        meta={"client_name": s}) for s in self.counts]


def test_the_pooled_class_counts_reach_the_sites_in_round_0():
    ctrl = server()
    sites = _Sites({"a": [10, 0, 0, 0, 5], "b": [0, 3, 4, 2, 0]})
    ctrl.broadcast_model = sites
    ctrl._request_counts()  # before round 0: the counts request
    assert sites.sent[0].meta[REQUEST] == "counts" and sites.sent[0].params is None  # no model goes out
    ctrl.current_round = 0
    ctrl.send_model(data=FLModel(params={"w": np.zeros(2, np.float32)}))
    assert sites.sent[-1].meta[CLASS_COUNTS] == [10.0, 3.0, 4.0, 2.0, 5.0]


def test_the_final_global_model_is_validated_and_kept_when_it_scores_best(tmp_path):
    targets = np.array([0, 1, 2, 3, 0, 1])
    right = np.eye(4)[targets].astype(np.float32)
    ctrl = server(num_rounds=10, checkpoint_dir=str(tmp_path))
    ctrl._best_score = 0.4  # the best model validated during the rounds
    ctrl._last_finished = 9
    ctrl.broadcast_model = sites = _Sites({"a": [1] * 5, "b": [1] * 5}, right, targets)
    final = FLModel(params={"w": np.full(2, 7.0, np.float32)})
    ctrl._validate_final(final)
    assert sites.sent[-1].meta[REQUEST] == "validate" and sites.sent[-1].current_round == 10
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    assert best["round"] == 10 and best["val_score"] == pytest.approx(1.0)
    np.testing.assert_array_equal(best["model"]["w"].numpy(), 7.0)


def test_the_federation_tells_the_sites_which_rounds_to_validate():
    ctrl = server(num_rounds=20, validations=4)
    ctrl.broadcast_model = sites = _Sites({})
    flags = []
    for r in range(20):
        ctrl.current_round = r
        ctrl.send_model(data=FLModel(params={"w": np.zeros(1, np.float32)}))
        flags.append(sites.sent[-1].meta[VALIDATE])
    assert [r for r, f in enumerate(flags) if f] == [p for p in validation_points(20, 4) if p < 20]


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x.flatten(1))


def test_centralised_training_validates_by_the_same_rule_and_always_its_final_epoch():
    torch.manual_seed(0)
    x, y = torch.randn(16, 1, 2, 2), torch.arange(16) % 4
    cfg = TrainConfig(epochs=5, batch_size=8, device="cpu")
    _best, _score, history = train_keep_best(_Net(), lambda _e: [(x[:8], y[:8]), (x[8:], y[8:])], cfg,
                                             val_loader=[(x, y)], validations=2)
    validated = [h["epoch"] for h in history if h["val_score"] is not None]
    assert validated == validation_points(5, 2) and validated[-1] == 5
    _best, _score, history = train_keep_best(_Net(), lambda _e: [(x, y)], cfg, val_loader=[(x, y)])
    assert all(h["val_score"] is not None for h in history)  # by default: every epoch


# ---------------------------------------------------------------- independent seeds


class _Indices:
    """A dataset whose every image is its own index (the batches then show the data order)."""

    def __init__(self, n: int):
        from fedbrain.models import default_preprocessing

        self.images = np.zeros((n, 2, 2), np.uint8)
        self.targets = torch.arange(n)
        self.pre = default_preprocessing("fedbrain_cnn_gn")

    def __len__(self) -> int:
        return len(self.targets)


def order(seed: int) -> tuple[int, ...]:
    from fedbrain.data.dataset import BatchLoader

    return tuple(int(t) for _x, y in BatchLoader(_Indices(40), 40, True, None, seed) for t in y)


def test_data_orders_of_different_seeds_rounds_and_sites_are_all_different():
    orders = {(s, r, site): order(derived_seed(s, r, site)) for s in range(3) for r in range(6)
              for site in ("a", "b")}
    assert len(set(orders.values())) == len(orders)
    # seed + round made seed 1's round 0 seed 0's round 1: the hash does not
    assert orders[(1, 0, "a")] != orders[(0, 1, "a")]
    assert derived_seed(0, 1) != derived_seed(1, 0) and derived_seed(5, 2, "a") == derived_seed(5, 2, "a")


def test_the_site_and_centralised_training_seed_their_orders_by_the_hash():
    import inspect

    from fedbrain.experiments import pooled
    from fedbrain.fl import site

    for module in (site, pooled):
        source = inspect.getsource(module)
        assert "derived_seed(cfg.seed" in source and "seed + " not in source


# ---------------------------------------------------------------- threads per simulated site


def test_simulated_sites_share_the_cores_this_process_may_use(monkeypatch):
    import os

    from fedbrain.fl.simulate import threads_per_site

    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(6)), raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)  # the machine's cores, not this process's
    assert [threads_per_site(n) for n in (1, 2, 3, 4, 8)] == [6, 3, 2, 1, 1]


@pytest.mark.slow
def test_a_real_federation_uses_pooled_counts_from_round_0_and_validates_its_final_model(sim_run):
    rows = [json.loads(line) for f in sorted((sim_run / "sites").glob("*/metrics.jsonl")) for line in open(f)]
    first = [r for r in rows if r["split"] == "train" and r["round"] == 0]
    assert first and all(r["class_balance"] == "federation" for r in first)
    config = json.loads((sim_run / "config.json").read_text())
    after_last = config["job"]["start_round"] + config["job"]["rounds"]
    assert any(r["split"] == "val" and r["round"] == after_last for r in rows)  # the final model's validation
