"""The real conf/ composed with overrides, every part instantiated; bad overrides fail with the documented errors."""

import inspect
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf.errors import ValidationError

from lightning_clip import AGC, ClippingConfigError, GradientClipping
from lightning_clip.configs import OPTION_TYPES, schema
from lightning_clip.methods import METHODS

CONF = str(Path(__file__).parents[1] / "conf")


def composed(*overrides):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides), return_hydra_config=False)


@pytest.mark.parametrize("method", list(METHODS))
def test_every_packaged_clipping_config_instantiates(method):
    cfg = composed(f"clipping={method}")
    clipping = instantiate(cfg.clipping)
    assert isinstance(clipping, GradientClipping) and clipping.method.name == method


def test_documented_overrides():
    cfg = composed("clipping=agc", "clipping.clip_factor=0.02", "clipping.exclude=[head]", "seed=3")
    clipping = instantiate(cfg.clipping)
    assert clipping.method == AGC(clip_factor=0.02, eps=0.001, exclude=("head",))
    model, data = instantiate(cfg.model), instantiate(cfg.data)
    assert model.hparams.seed == 3 and data.seed == 3
    spiky = instantiate(composed("clipping=norm", "clipping.skip_spikes=6", "clipping.spike_window=64").clipping)
    assert (spiky.skip_spikes, spiky.spike_window) == (6.0, 64)
    cfg = composed("clipping=norm", "clipping.max_norm=0.5", "clipping.nonfinite=raise", "logger=csv")
    assert instantiate(cfg.clipping).method.max_norm == 0.5
    assert instantiate(cfg.clipping).nonfinite == "raise"


def test_trainer_and_logger_groups():
    cfg = composed("trainer=ddp", "trainer.devices=2", "trainer.precision=bf16-mixed", "logger=csv")
    assert cfg.trainer.strategy == "ddp" and cfg.trainer.devices == 2 and cfg.trainer.accelerator == "cpu"
    cfg = composed("trainer.max_steps=3", "trainer.precision=bf16-mixed")
    trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
    assert trainer.max_steps == 3 and trainer.precision == "bf16-mixed"
    assert composed("logger=none").logger in (None, {})
    assert composed("experiment=adding_agc").clipping.method == "agc"
    cfg = composed("model=mlp", "data=digits")
    assert type(instantiate(cfg.model)).__name__ == "DeepMLP"
    assert type(instantiate(cfg.data)).__name__ == "DigitsDataModule"


def test_fsdp1_trainer_config_builds_lightnings_fsdp_strategy():
    """trainer=fsdp1 needs CUDA to run (Lightning refuses FSDPStrategy on CPU); its strategy is built here."""
    from lightning.pytorch.strategies import FSDPStrategy

    cfg = composed("trainer=fsdp1")
    strategy = instantiate(cfg.trainer.strategy)
    assert isinstance(strategy, FSDPStrategy) and strategy.kwargs["use_orig_params"] is True
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.devices == 2


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("clipping.max_nrom=1", "Key 'max_nrom' not in 'NormClipping'"),
        ("clipping.max_norm=abc", "Value 'abc' of type 'str' could not be converted to Float"),
        ("clipping.nonfinite=drop", "Invalid value 'drop', expected one of [skip, raise, ignore]"),
        ("clipping=cubic", "Could not find 'clipping/cubic'"),
    ],
)
def test_bad_overrides_fail_at_composition(override, message):
    with pytest.raises((ConfigCompositionException, ValidationError)) as error:
        composed("clipping=norm", override)
    text = str(error.value) + str(error.value.__cause__ or "")
    assert message in text


def test_value_out_of_range_fails_with_the_callbacks_message():
    cfg = composed("clipping=value", "clipping.clip_value=-2")
    with pytest.raises(Exception) as error:
        instantiate(cfg.clipping)
    assert isinstance(error.value.__cause__, ClippingConfigError)
    assert "clip_value=-2.0 is invalid for method='value'" in str(error.value.__cause__)


def test_schemas_follow_the_callback_signature():
    options = set(inspect.signature(GradientClipping.__init__).parameters) - {"self", "method", "renamed"}
    method_params = {f.name for m in METHODS.values() for f in m.specs()}
    assert options == set(OPTION_TYPES) | method_params
    for method in METHODS:
        fields = set(schema(method).__dataclass_fields__)
        assert fields == {"_target_", "_convert_", "method"} | {f.name for f in METHODS[method].specs()} | set(
            OPTION_TYPES
        )
