import math

import pytest

from lightning_clip.methods import METHODS, resolve


def test_defaults_are_filled_in():
    schedule = {"schedule": "constant", "schedule_steps": 1000, "schedule_factor": 0.1}
    assert resolve("agc", {}) == {"clip_factor": 0.01, "eps": 1e-3, "exclude": (), **schedule}
    assert resolve("norm", {"norm_type": "inf"}) == {"max_norm": 1.0, "norm_type": math.inf, **schedule}
    assert resolve("none", {"max_norm": None}) == {}


@pytest.mark.parametrize(
    ("method", "given", "message"),
    [
        ("clip", {}, "method='clip' is not a clipping method; choose one of: none, norm"),
        ("agc", {"max_norm": 1.0}, "method='agc' does not take max_norm; 'agc' takes: clip_factor, eps, exclude, sch"),
        ("autoclip", {"percentile": 0}, "percentile=0 is invalid for method='autoclip': expected a number in (0, 100]"),
        ("autoclip", {"percentile": 101}, "percentile=101 is invalid"),
        ("autoclip", {"window": 0}, "window=0 is invalid for method='autoclip': expected an integer >= 1"),
        ("zclip", {"alpha": 1.0}, "alpha=1.0 is invalid for method='zclip': expected a number in (0, 1)"),
        ("zclip", {"alpha": 0}, "alpha=0 is invalid"),
        ("zclip", {"warmup_steps": 0}, "warmup_steps=0 is invalid"),
        ("zclip", {"mode": "median"}, "mode='median' is invalid for method='zclip': expected one of 'zscore', 'per"),
        ("zclip", {"clip_option": "max"}, "clip_option='max' is invalid"),
        ("zclip", {"z_thresh": -1}, "z_thresh=-1 is invalid"),
        ("zclip", {"skip_update_on_spike": "yes"}, "skip_update_on_spike='yes' is invalid"),
        ("zclip", {"max_norm": 0}, "max_norm=0 is invalid"),
        ("adagc", {"beta": 1.5}, "beta=1.5 is invalid"),
        ("adagc", {"lambda_rel": 0}, "lambda_rel=0 is invalid"),
        ("adagc", {"warmup_steps": 2.5}, "warmup_steps=2.5 is invalid"),
        ("norm", {"schedule": "step"}, "schedule='step' is invalid for method='norm': expected one of 'constant'"),
        ("norm", {"schedule_steps": 0}, "schedule_steps=0 is invalid"),
        ("adagc", {"max_norm": 1.0}, "method='adagc' does not take max_norm"),
        ("none", {"clip_value": 1.0}, "'none' takes: no parameters"),
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
        ("value", {"clip_value": True}, "clip_value=True is invalid"),
    ],
)
def test_bad_arguments_name_parameter_value_and_allowed(method, given, message):
    with pytest.raises(ValueError) as error:
        resolve(method, given)
    assert message in str(error.value)


def test_every_method_documents_every_parameter():
    for method in METHODS.values():
        assert method.doc
        for param in method.params.values():
            assert param.doc
