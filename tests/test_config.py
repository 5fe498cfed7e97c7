"""Config validation: every error path names the field, the value and what is allowed."""

import dataclasses
import json

import pytest

from largebatch.config import (BatchConfig, ConfigError, DataConfig, EvalConfig, OptimizerConfig, OutputConfig,
                               RunConfig, ScheduleConfig, CheckpointConfig, from_dict, to_dict)
from largebatch.recipes import RECIPES, get_recipe


@pytest.mark.parametrize("make,field", [
    (lambda: RunConfig(epochs=0), "epochs"),
    (lambda: RunConfig(epochs=float("nan")), "epochs"),
    (lambda: RunConfig(threads=-1), "threads"),
    (lambda: RunConfig(label_smoothing=1.0), "label_smoothing"),
    (lambda: RunConfig(grad_clip_norm=-1), "grad_clip_norm"),
    (lambda: RunConfig(data=DataConfig(train_limit=-5)), "data.train_limit"),
    (lambda: RunConfig(data=DataConfig(test_limit=-5)), "data.test_limit"),
    (lambda: RunConfig(data=DataConfig(val_size=-1)), "data.val_size"),
    (lambda: RunConfig(eval=EvalConfig(give_up_worse_than=-1.0)), "eval.give_up_worse_than"),
    (lambda: RunConfig(eval=EvalConfig(give_up_after_epochs=-1)), "eval.give_up_after_epochs"),
    (lambda: RunConfig(optimizer=OptimizerConfig(base_lr=0)), "optimizer.base_lr"),
    (lambda: RunConfig(optimizer=OptimizerConfig(reference_batch=0)), "optimizer.reference_batch"),
    (lambda: RunConfig(optimizer=OptimizerConfig(momentum=1.0)), "optimizer.momentum"),
    (lambda: RunConfig(optimizer=OptimizerConfig(momentum=0, nesterov=True)), "optimizer.nesterov"),
    (lambda: RunConfig(optimizer=OptimizerConfig(weight_decay=-1e-4)), "optimizer.weight_decay"),
    (lambda: RunConfig(optimizer=OptimizerConfig(trust_coefficient=0)), "optimizer.trust_coefficient"),
    (lambda: RunConfig(optimizer=OptimizerConfig(beta1=1.0)), "optimizer.beta1"),
    (lambda: RunConfig(optimizer=OptimizerConfig(beta2=-0.1)), "optimizer.beta2"),
    (lambda: RunConfig(optimizer=OptimizerConfig(eps=-1)), "optimizer.eps"),
    (lambda: RunConfig(optimizer=OptimizerConfig(min_ratio=0)), "optimizer.min_ratio"),
    (lambda: RunConfig(optimizer=OptimizerConfig(min_ratio=2.0, max_ratio=1.0)), "optimizer.min_ratio"),
    (lambda: RunConfig(optimizer=OptimizerConfig(name="lars", layerwise=True)), "optimizer.layerwise"),
    (lambda: RunConfig(schedule=ScheduleConfig(warmup_epochs=-1)), "schedule.warmup_epochs"),
    (lambda: RunConfig(schedule=ScheduleConfig(warmup_steps=-1)), "schedule.warmup_steps"),
    (lambda: RunConfig(schedule=ScheduleConfig(warmup_start=1.5)), "schedule.warmup_start"),
    (lambda: RunConfig(schedule=ScheduleConfig(power=0)), "schedule.power"),
    (lambda: RunConfig(schedule=ScheduleConfig(end_factor=2)), "schedule.end_factor"),
    (lambda: RunConfig(schedule=ScheduleConfig(gamma=0)), "schedule.gamma"),
    (lambda: RunConfig(schedule=ScheduleConfig(decay="step", milestones=(20.0, 10.0))), "schedule.milestones"),
    (lambda: RunConfig(schedule=ScheduleConfig(decay="cosine", milestones=(10.0,))), "schedule.milestones"),
    (lambda: RunConfig(batch=BatchConfig(global_batch=0)), "batch.global_batch"),
    (lambda: RunConfig(batch=BatchConfig(micro_batch=-1)), "batch.micro_batch"),
    (lambda: RunConfig(batch=BatchConfig(memory_cap_gib=0)), "batch.memory_cap_gib"),
    (lambda: RunConfig(batch=BatchConfig(global_batch=256, micro_batch=512)), "batch.micro_batch"),
    (lambda: RunConfig(eval=EvalConfig(every_epochs=-1)), "eval.every_epochs"),
    (lambda: RunConfig(eval=EvalConfig(batch_size=0)), "eval.batch_size"),
    (lambda: RunConfig(checkpoint=CheckpointConfig(every_epochs=-1)), "checkpoint.every_epochs"),
    (lambda: RunConfig(checkpoint=CheckpointConfig(stop_at_step=-1)), "checkpoint.stop_at_step"),
    (lambda: RunConfig(output=OutputConfig(log_every=-1)), "output.log_every"),
    (lambda: RunConfig(output=OutputConfig(name="a/b")), "output.name"),
])
def test_invalid_value_names_field_value_and_rule(make, field):
    with pytest.raises(ConfigError) as e:
        make()
    msg = str(e.value)
    assert msg.startswith(f"{field} = ") and "\n" not in msg
    assert any(word in msg for word in ("must", "needs", "already"))


def test_round_trip_through_json():
    cfg = get_recipe("mnist-lenet")
    cfg = dataclasses.replace(cfg, schedule=ScheduleConfig(decay="step", milestones=(10.0, 20.0)))
    back = from_dict(json.loads(json.dumps(to_dict(cfg))))
    assert back == cfg


def test_unknown_keys_are_errors():
    d = to_dict(RunConfig())
    d["optimizer"]["lerning_rate"] = 0.1
    with pytest.raises(ConfigError, match="unknown config key optimizer.lerning_rate"):
        from_dict(d)
    with pytest.raises(ConfigError, match="unknown config key epoch"):
        from_dict({"epoch": 3})


@pytest.mark.parametrize("d,msg", [
    ({"epochs": "ten"}, "epochs = 'ten' is invalid: must be a number"),
    ({"seed": 1.5}, "seed = 1.5 is invalid: must be an integer"),
    ({"optimizer": {"name": "adamx"}}, "optimizer.name = 'adamx' is invalid: must be one of"),
    ({"output": {"progress": "yes"}}, "output.progress = 'yes' is invalid: must be true or false"),
    ({"schedule": {"milestones": 5}}, "schedule.milestones = 5 is invalid: must be a list"),
    ({"data": 3}, "data must be a mapping"),
])
def test_wrong_types_are_errors(d, msg):
    with pytest.raises(ConfigError, match=msg.replace("(", r"\(").replace(".", r"\.")):
        from_dict(d)


def test_every_recipe_is_valid_and_named():
    for name in RECIPES:
        cfg = get_recipe(name)
        assert cfg.recipe == name
        cfg.validate()
    with pytest.raises(ConfigError, match="unknown recipe"):
        get_recipe("nope")
