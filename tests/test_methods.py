import dataclasses
import math

import numpy as np
import pytest

from lightning_clip import AGC, Norm, ZClip
from lightning_clip.methods import METHODS, from_arguments

SCHEDULE = {"schedule": "constant", "schedule_steps": 1000, "schedule_factor": 0.1}


def test_defaults_are_filled_in():
    expected = {"exclude": [], "clip_factor": 0.01, "eps": 1e-3, **SCHEDULE, "max_update_ratio": 1e-3}
    assert from_arguments("agc", {}).params() == expected
    assert from_arguments("norm", {"norm_type": "inf"}) == Norm(norm_type=math.inf)
    assert from_arguments("none", {"max_norm": None}).params() == {"exclude": []}
    assert AGC(exclude="head").exclude == ("head",)


def test_a_method_is_frozen_and_builds_fresh_state():
    method = ZClip(warmup_steps=3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        method.alpha = 0.5
    (first, _), (second, _) = method.build(), method.build()
    assert first is not second


@pytest.mark.parametrize(
    ("method", "given", "message"),
    [
        ("clip", {}, "method='clip' is not a clipping method; choose one of: none, norm"),
        ("agc", {"max_norm": 1.0}, "method='agc' does not take max_norm; 'agc' takes: exclude, schedule"),
        ("autoclip", {"percentile": 0}, "percentile=0 is invalid for method='autoclip': expected a number in (0, 100]"),
        ("autoclip", {"percentile": 101}, "percentile=101 is invalid"),
        ("autoclip", {"window": 0}, "window=0 is invalid for method='autoclip': expected an integer >= 1"),
        ("zclip", {"alpha": 1.0}, "alpha=1.0 is invalid for method='zclip': expected a number in (0, 1)"),
        ("zclip", {"alpha": 0}, "alpha=0 is invalid"),
        ("zclip", {"warmup_steps": 0}, "warmup_steps=0 is invalid"),
        ("zclip", {"mode": "median"}, "mode='median' is invalid for method='zclip': expected one of 'zscore', 'per"),
        ("zclip", {"clip_option": "max"}, "clip_option='max' is invalid"),
        ("zclip", {"z_thresh": -1}, "z_thresh=-1 is invalid"),
        ("zclip", {"freeze_on_spike": "yes"}, "freeze_on_spike='yes' is invalid"),
        ("zclip", {"threshold_cap": 0}, "threshold_cap=0 is invalid"),
        ("zclip", {"max_norm": 1.0}, "does not take max_norm (max_norm is now threshold_cap)"),
        ("zclip", {"eps": 1e-3, "clip_factor": 2.0}, "(clip_factor is now threshold_scale; eps is now std_eps)"),
        ("zclip", {"skip_update_on_spike": True}, "skip_update_on_spike is now freeze_on_spike"),
        ("adagc", {"beta": 1.5}, "beta=1.5 is invalid"),
        ("adagc", {"lambda_rel": 0}, "lambda_rel=0 is invalid"),
        ("adagc", {"warmup_steps": 2.5}, "warmup_steps=2.5 is invalid"),
        ("norm", {"schedule": "step"}, "schedule='step' is invalid for method='norm': expected one of 'constant'"),
        ("norm", {"schedule_steps": 0}, "schedule_steps=0 is invalid"),
        ("adagc", {"max_norm": 1.0}, "method='adagc' does not take max_norm"),
        ("none", {"clip_value": 1.0}, "'none' takes: exclude"),
        ("value", {}, "method='value' requires clip_value"),
        ("norm", {"max_norm": 0}, "max_norm=0 is invalid for method='norm': expected a finite number > 0"),
        ("norm", {"max_norm": -1.5}, "max_norm=-1.5 is invalid"),
        ("norm", {"max_norm": math.nan}, "max_norm=nan is invalid"),
        ("norm", {"max_norm": "1"}, "max_norm='1' is invalid"),
        ("norm", {"norm_type": 0.5}, "norm_type=0.5 is invalid for method='norm': expected a number >= 1, or 'inf'"),
        ("tensor_norm", {"norm_type": "two"}, "norm_type='two' is invalid"),
        ("agc", {"clip_factor": 0.0}, "clip_factor=0.0 is invalid"),
        ("agc", {"eps": -1e-3}, "eps=-0.001 is invalid"),
        ("agc", {"exclude": 3}, "exclude=3 is invalid for method='agc': expected a glob pattern"),
        ("norm", {"exclude": [1]}, "exclude=[1] is invalid for method='norm'"),
        ("value", {"clip_value": True}, "clip_value=True is invalid"),
    ],
)
def test_bad_arguments_name_parameter_value_and_allowed(method, given, message):
    with pytest.raises(ValueError) as error:
        from_arguments(method, given)
    assert message in str(error.value)


def test_numpy_scalars_are_numbers_and_counts():
    method = from_arguments("autoclip", {"percentile": np.float32(5), "window": np.int64(50)})
    assert (method.percentile, method.window) == (5.0, 50)
    assert type(method.percentile) is float and type(method.window) is int
    with pytest.raises(ValueError, match=r"window=np.float64\(50.0\) is invalid for method='autoclip'"):
        from_arguments("autoclip", {"window": np.float64(50)})


def test_the_method_objects_check_themselves():
    with pytest.raises(ValueError, match=r"clip_factor=-1 is invalid for method='agc'"):
        AGC(clip_factor=-1)


def test_every_method_documents_every_parameter_and_cites_its_source():
    for cls in METHODS.values():
        assert cls.summary()
        for spec in cls.specs():
            assert spec.metadata["doc"], (cls.name, spec.name)
    for cls in METHODS.values():
        if cls.name not in ("none", "value", "tensor_norm"):
            assert " 20" in cls.summary(), cls.name  # "(Author et al. 20xx ..."
