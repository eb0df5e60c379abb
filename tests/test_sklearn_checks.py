"""scikit-learn's common estimator checks on CNNFeatures.

``CNNFeatures`` takes images, and says so in its tags (``two_d_array=False``), so
``parametrize_with_checks`` would skip it. The checks feed tables of arbitrary floats; to make them
meaningful, :class:`TableImages` (test-only) turns every row of a table into a small grayscale
image with a fixed monotone map and hands the images to the real ``CNNFeatures.fit`` and
``CNNFeatures.transform`` on the tiny test backbone, once without a cache and once through the
feature store. The plain ``CNNFeatures`` runs the API checks that do not need a table to be
transformed.
"""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
from scipy.special import expit
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.utils.estimator_checks import (
    check_dataframe_column_names_consistency,
    check_do_not_raise_errors_in_init_or_set_params,
    check_dont_overwrite_parameters,
    check_estimator_cloneable,
    check_estimator_repr,
    check_estimator_tags_renamed,
    check_estimators_fit_returns_self,
    check_estimators_overwrite_params,
    check_fit_check_is_fitted,
    check_get_feature_names_out_error,
    check_get_params_invariance,
    check_global_output_transform_pandas,
    check_global_set_output_transform_polars,
    check_mixin_order,
    check_no_attributes_set_in_init,
    check_parameters_default_constructible,
    check_requires_y_none,
    check_set_output_transform,
    check_set_output_transform_pandas,
    check_set_output_transform_polars,
    check_set_params,
    check_transformer_get_feature_names_out,
    check_transformer_get_feature_names_out_pandas,
    check_transformers_unfitted,
    check_valid_tag_types,
    parametrize_with_checks,
)
from sklearn.utils.validation import check_is_fitted, validate_data

from featx.transformers import CNNFeatures

from conftest import TINY, make_images


def rows_to_images(X: np.ndarray) -> np.ndarray:
    """Rows of a table -> grayscale float images in [0, 1] of shape (n, side, side).

    Values go through the logistic function (monotone, finite for every finite input) and the
    row is padded with 0.5 (the image of 0) to the next square.
    """
    n, d = X.shape
    side = max(1, math.isqrt(d - 1) + 1) if d else 1
    pixels = np.full((n, side * side), 0.5)
    pixels[:, :d] = expit(X)
    return pixels.reshape(n, side, side)


class TableImages(CNNFeatures):
    """Test-only CNNFeatures for tables: each row becomes a small image, then CNNFeatures runs.

    Validation of the table (finite values, 2-D, dense, ``n_features_in_``) is this variant's
    job, since a table is its input; everything after that is the real ``CNNFeatures``.
    """

    def fit(self, X, y=None):
        X = validate_data(self, X, dtype=np.float64)
        return super().fit(rows_to_images(X), y)

    def transform(self, X):
        check_is_fitted(self)
        X = validate_data(self, X, dtype=np.float64, reset=False)
        # CNNFeatures.transform without its set_output wrapper: this method's own wrapper then
        # builds the DataFrame once, from the table's index (a nested one would drop it).
        return CNNFeatures.transform.__wrapped__(self, rows_to_images(X))

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = True
        tags.input_tags.three_d_array = False
        return tags


# Checks that cannot pass, and why (true of both the in-memory and the cached variant). In
# scikit-learn 1.9 parametrize_with_checks yields neither, so they take effect in EXTRA_CHECKS
# below; parametrize_with_checks gets the same dict so that a version that yields them marks them.
EXPECTED_FAILED_CHECKS = {
    "check_transformer_get_feature_names_out": (
        "get_feature_names_out names the CNN's output columns (<layer>_<pooling>_<i>) and ignores "
        "input_features: it does not raise for input_features of the wrong length, because an "
        "image transformer has no n_features_in_ to compare them with"
    ),
    "check_transformer_get_feature_names_out_pandas": (
        "get_feature_names_out names the CNN's output columns (<layer>_<pooling>_<i>) and ignores "
        "input_features: an image has no input feature names, so it never compares them with "
        "feature_names_in_ and does not raise for wrong names"
    ),
}


def _expected_failed(estimator) -> dict[str, str]:
    return dict(EXPECTED_FAILED_CHECKS)


@parametrize_with_checks(
    [
        TableImages(TINY, layer="stage2", device="cpu", cache=None),
        # cache=True: the store in $FEATX_CACHE, which conftest points at a fresh folder per test.
        TableImages(TINY, layer=["stage1", "pre_logits"], pooling=["avg", "spp"], device="cpu", cache=True),
    ],
    expected_failed_checks=_expected_failed,
    xfail_strict=True,
)
def test_table_images_passes_sklearn_checks(estimator, check):
    """Check that the table variant of CNNFeatures passes scikit-learn's common checks."""
    check(estimator)


# Checks that parametrize_with_checks does not yield but scikit-learn's own test suite runs on
# its transformers (sklearn/tests/test_common.py): feature names, set_output, column names.
EXTRA_CHECKS = [
    check_requires_y_none,
    check_dataframe_column_names_consistency,
    check_get_feature_names_out_error,
    check_transformer_get_feature_names_out,
    check_transformer_get_feature_names_out_pandas,
    check_set_output_transform,
    check_set_output_transform_pandas,
    check_global_output_transform_pandas,
    check_set_output_transform_polars,
    check_global_set_output_transform_polars,
]


def _extra_params() -> list:
    params = []
    for check in EXTRA_CHECKS:
        reason = EXPECTED_FAILED_CHECKS.get(check.__name__)
        marks = [pytest.mark.xfail(reason=reason, raises=AssertionError, strict=True)] if reason else []
        params.append(pytest.param(check, marks=marks, id=check.__name__))
    return params


# The set_output checks fit on a DataFrame and transform an array (and the reverse) on purpose.
@pytest.mark.filterwarnings("ignore:X (does not have valid|has) feature names:UserWarning")
@pytest.mark.parametrize("check", _extra_params())
def test_table_images_passes_transformer_checks(check):
    """Check that the table variant passes scikit-learn's feature-name and set_output checks."""
    pytest.importorskip("pandas")
    check("TableImages", TableImages(TINY, layer="stage2", pooling=["avg", "max"], device="cpu", cache=True))


# --------------------------------------------------------------------------- plain CNNFeatures

# API checks that hold for an image transformer. Those that call fit pass a table, which is
# fine here because CNNFeatures.fit never reads X (it resolves the backbone, layers and poolings).
PLAIN_CHECKS = [
    check_estimator_cloneable,
    check_estimator_tags_renamed,
    check_valid_tag_types,
    check_estimator_repr,
    check_no_attributes_set_in_init,
    check_estimators_overwrite_params,
    check_dont_overwrite_parameters,
    check_estimators_fit_returns_self,
    check_do_not_raise_errors_in_init_or_set_params,
    check_mixin_order,
    check_parameters_default_constructible,
    check_get_params_invariance,
    check_set_params,
    check_fit_check_is_fitted,
    check_transformers_unfitted,
]


@pytest.mark.parametrize("check", PLAIN_CHECKS, ids=lambda check: check.__name__)
def test_cnnfeatures_passes_api_checks(check):
    """Check that the plain CNNFeatures passes scikit-learn's API checks that need no table."""
    check("CNNFeatures", CNNFeatures(TINY, layer="stage2", device="cpu", cache=None))


def test_cnnfeatures_default_is_skipped_by_common_checks():
    """Check that the tags keep the table checks off the image transformer (so the variant is needed)."""
    from sklearn.utils.estimator_checks import estimator_checks_generator

    with pytest.warns(Warning, match="Can't test estimator CNNFeatures"):
        checks = list(estimator_checks_generator(CNNFeatures(TINY), legacy=True))
    assert len(checks) == 1  # check_estimator_cloneable only


def test_cnnfeatures_image_contract():
    """Check fit returns self, idempotent fit, unfitted errors, names and pickling, on images."""
    arrays, labels = make_images(n_per_class=3, n_classes=2)
    est = CNNFeatures(TINY, layer="stage2", pooling=["avg", "max"], device="cpu", cache=None)
    with pytest.raises(NotFittedError):
        est.transform(arrays)
    with pytest.raises(NotFittedError):
        est.get_feature_names_out()
    params = est.get_params()
    assert est.fit(arrays, labels) is est
    assert est.get_params() == params
    first = est.transform(arrays)
    assert first.shape == (6, est.n_features_out_) == (6, len(est.get_feature_names_out()))
    np.testing.assert_array_equal(est.fit(arrays).transform(arrays), first)
    np.testing.assert_array_equal(clone(est).fit_transform(arrays), first)
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(est)).transform(arrays), first)
    np.testing.assert_allclose(est.transform(arrays[::-1])[::-1], first, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(est.transform(arrays[2:5]), first[2:5], rtol=1e-6, atol=1e-6)


def test_rows_to_images_is_monotone_and_in_range():
    """Check that the test map keeps order and lands in [0, 1] for any finite values."""
    X = np.array([[-1e300, -1.0, 0.0, 1.0, 1e300]])
    images = rows_to_images(X)
    assert images.shape == (1, 3, 3) and images.min() >= 0 and images.max() <= 1
    assert np.all(np.diff(images.ravel()[:5]) >= 0) and np.all(images.ravel()[5:] == 0.5)


def test_table_images_is_cnnfeatures_on_the_mapped_images(tmp_path, monkeypatch):
    """Check that the variant returns exactly CNNFeatures' features of the mapped images, via the store."""
    monkeypatch.setenv("FEATX_CACHE", str(tmp_path))
    X = np.random.default_rng(0).normal(size=(10, 7))
    out = TableImages(TINY, layer="stage3", device="cpu", cache=True).fit(X).transform(X)
    ref = CNNFeatures(TINY, layer="stage3", device="cpu", cache=None).fit_transform(rows_to_images(X))
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)
    assert len(np.unique(out.round(5), axis=0)) == 10  # the rows are told apart
    assert list(tmp_path.glob("*.h5"))
