"""Bad input to the public API: the error type, and a message naming the argument."""
import pytest
import torch

import facd_fast

S = (2, 3, 4, 5)


def features(shape=S, dtype=torch.float32):
    return torch.rand(shape, dtype=dtype), torch.rand(shape, dtype=dtype)


def call(student, teacher, negatives=None, **kwargs):
    return facd_fast.contrastive_loss(student, teacher, negatives, **kwargs)


LOSS_CASES = {
    "teacher-shape": (lambda: call(torch.rand(S), torch.rand(2, 3, 4, 6)), ValueError, "teacher"),
    "student-rank": (lambda: call(torch.rand(2, 3, 4), torch.rand(2, 3, 4)), ValueError, "student"),
    "student-5d": (lambda: call(torch.rand(2, 1, 3, 4, 5), torch.rand(2, 1, 3, 4, 5)), ValueError, "student"),
    "in-batch-B1": (lambda: call(*features((1, 3, 4, 5))), ValueError, "B=1"),
    "negatives-batch": (lambda: call(*features(), torch.rand(3, 2, 3, 4, 5)), ValueError, "negatives"),
    "negatives-chw": (lambda: call(*features(), torch.rand(2, 2, 3, 4, 6)), ValueError, "negatives"),
    "negatives-rank": (lambda: call(*features(), torch.rand(2, 3, 4, 5)), ValueError, "negatives"),
    "negatives-K0": (lambda: call(*features(), torch.rand(2, 0, 3, 4, 5)), ValueError, "negatives"),
    "student-int": (lambda: call(torch.ones(S, dtype=torch.int64), torch.rand(S)), TypeError, "student"),
    "teacher-bool": (lambda: call(torch.rand(S), torch.ones(S, dtype=torch.bool)), TypeError, "teacher"),
    "negatives-int": (lambda: call(*features(), torch.ones(2, 2, 3, 4, 5, dtype=torch.int32)), TypeError, "negatives"),
    "student-list": (lambda: call([[1.0]], torch.rand(S)), TypeError, "student"),
    "dtype-mismatch": (lambda: call(torch.rand(S), torch.rand(S, dtype=torch.float64)), TypeError, "teacher"),
    "devices": (lambda: call(torch.rand(S), torch.rand(S, device="meta")), ValueError, "device"),
    "mask-length": (lambda: call(*features(), mask=torch.ones(3)), ValueError, "mask"),
    "mask-values": (lambda: call(*features(), mask=torch.tensor([0.0, 0.5])), ValueError, "mask"),
    "mask-2d": (lambda: call(*features(), mask=torch.ones(2, 1)), ValueError, "mask"),
    "mask-list": (lambda: call(*features(), mask=[1, 0]), TypeError, "mask"),
    "distance": (lambda: call(*features(), distance="cosine"), ValueError, "distance"),
    "normalize": (lambda: call(*features(), normalize="layer"), ValueError, "normalize"),
    "reduction": (lambda: call(*features(), reduction="max"), ValueError, "reduction"),
    "eps-zero": (lambda: call(*features(), eps=0.0), ValueError, "eps"),
    "eps-negative": (lambda: call(*features(), eps=-1e-6), ValueError, "eps"),
    "eps-nan": (lambda: call(*features(), eps=float("nan")), ValueError, "eps"),
    "eps-string": (lambda: call(*features(), eps="1e-6"), TypeError, "eps"),
    "eps-tensor": (lambda: call(*features(), eps=torch.tensor(1e-6)), TypeError, "eps must be a real number"),
    "eps-bool": (lambda: call(*features(), eps=True), TypeError, "eps must be a real number"),
    "student-meta": (lambda: call(torch.rand(S, device="meta"), torch.rand(S, device="meta")), ValueError, "student is on the meta device"),
    "teacher-sparse": (lambda: call(torch.rand(S), torch.rand(S).to_sparse()), TypeError, "teacher must be a dense"),
    "student-complex": (lambda: call(torch.rand(S, dtype=torch.complex64), torch.rand(S, dtype=torch.complex64)), TypeError, "student must be a floating"),
    "negatives-meta": (lambda: call(*features(), torch.rand(2, 2, 3, 4, 5, device="meta")), ValueError, "negatives is on the meta device"),
    "negatives-sparse": (lambda: call(*features(), torch.rand(2, 2, 3, 4, 5).to_sparse()), TypeError, "negatives must be a dense"),
    "mask-complex": (lambda: call(*features(), mask=torch.ones(2, dtype=torch.complex64)), TypeError, "mask"),
    "mask-sparse": (lambda: call(*features(), mask=torch.ones(2).to_sparse()), TypeError, "mask must be a dense"),
    "backend": (lambda: call(*features(), backend="cuda-magic"), ValueError, "backend"),
    "empty": (lambda: call(*features((2, 0, 4, 5))), ValueError, "student"),
}


@pytest.mark.parametrize("case", sorted(LOSS_CASES))
def test_contrastive_loss_rejects(case):
    fn, error, name = LOSS_CASES[case]
    with pytest.raises(error, match=name):
        fn()


def images(shape=(2, 3, 4, 4)):
    return torch.rand(shape), torch.rand(shape), torch.rand(shape)


MASK_CASES = {
    "shape": (lambda: facd_fast.adaptive_mask(torch.rand(2, 3, 4, 4), torch.rand(2, 3, 4, 5), torch.rand(2, 3, 4, 4)), ValueError, "sr_teacher"),
    "rank": (lambda: facd_fast.adaptive_mask(torch.rand(3, 4, 4), torch.rand(3, 4, 4), torch.rand(3, 4, 4)), ValueError, "sr_student"),
    "int": (lambda: facd_fast.adaptive_mask(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), *images()[1:]), TypeError, "sr_student"),
    "device": (lambda: facd_fast.adaptive_mask(*images()[:2], torch.rand(2, 3, 4, 4, device="meta")), ValueError, "device"),
    "margin": (lambda: facd_fast.adaptive_mask(*images(), margin_db=float("inf")), ValueError, "margin_db"),
    "margin-tensor": (lambda: facd_fast.adaptive_mask(*images(), margin_db=torch.tensor(0.0)), TypeError, "margin_db"),
    "margin-bool": (lambda: facd_fast.adaptive_mask(*images(), margin_db=False), TypeError, "margin_db"),
    "data-range-tensor": (lambda: facd_fast.adaptive_mask(*images(), data_range=torch.tensor(1.0)), TypeError, "data_range"),
    "hr-meta": (lambda: facd_fast.adaptive_mask(*(x.to("meta") for x in images())), ValueError, "sr_student is on the meta device"),
    "hr-sparse": (lambda: facd_fast.adaptive_mask(*images()[:2], torch.rand(2, 3, 4, 4).to_sparse()), TypeError, "hr must be a dense"),
    "sr-complex": (lambda: facd_fast.adaptive_mask(torch.rand(2, 3, 4, 4, dtype=torch.complex64), *images()[1:]), TypeError, "sr_student"),
    "data-range": (lambda: facd_fast.adaptive_mask(*images(), data_range=0), ValueError, "data_range"),
    "backend": (lambda: facd_fast.adaptive_mask(*images(), backend="nope"), ValueError, "backend"),
}


@pytest.mark.parametrize("case", sorted(MASK_CASES))
def test_adaptive_mask_rejects(case):
    fn, error, name = MASK_CASES[case]
    with pytest.raises(error, match=name):
        fn()


def test_backend_environment_variable(monkeypatch):
    s, t = features()
    monkeypatch.setenv("FACD_BACKEND", "reference")
    torch.testing.assert_close(facd_fast.contrastive_loss(s, t), facd_fast.contrastive_loss(s, t, backend="reference"))
    monkeypatch.setenv("FACD_BACKEND", "warp-drive")
    with pytest.raises(ValueError, match="FACD_BACKEND"):
        facd_fast.contrastive_loss(s, t)


MODULE_CASES = {
    "distance": (dict(distance="l3"), ValueError, "distance"),
    "normalize": (dict(normalize="batch"), ValueError, "normalize"),
    "use-mask-string": (dict(use_mask="no"), TypeError, "use_mask"),
    "use-mask-int": (dict(use_mask=1), TypeError, "use_mask"),
    "tap-weight-nan": (dict(tap_weights=(1.0, float("nan"))), ValueError, r"tap_weights\[1\]"),
    "tap-weight-inf": (dict(tap_weights=(float("inf"),)), ValueError, r"tap_weights\[0\]"),
    "tap-weight-tensor": (dict(tap_weights=(torch.tensor(1.0),)), TypeError, r"tap_weights\[0\]"),
    "tap-weight-bool": (dict(tap_weights=(True, 1.0)), TypeError, r"tap_weights\[0\]"),
    "tap-weight-string": (dict(tap_weights=("1",)), TypeError, r"tap_weights\[0\]"),
    "tap-weights-tensor": (dict(tap_weights=torch.ones(3)), TypeError, "tap_weights"),
    "tap-weights-string": (dict(tap_weights="111"), TypeError, "tap_weights"),
    "tap-weights-empty": (dict(tap_weights=()), ValueError, "tap_weights"),
    "tap-weights-negative": (dict(tap_weights=(1.0, -1.0)), ValueError, "tap_weights"),
    "margin-nan": (dict(margin_db=float("nan")), ValueError, "margin_db"),
    "margin-tensor": (dict(margin_db=torch.tensor(0.0)), TypeError, "margin_db"),
    "margin-string": (dict(margin_db="0"), TypeError, "margin_db"),
    "eps-tensor": (dict(eps=torch.tensor(1e-6)), TypeError, "eps"),
    "eps-bool": (dict(eps=True), TypeError, "eps"),
    "eps-zero": (dict(eps=0.0), ValueError, "eps"),
    "data-range": (dict(data_range=-1.0), ValueError, "data_range"),
    "backend": (dict(backend="warp"), ValueError, "backend"),
}


@pytest.mark.parametrize("case", sorted(MODULE_CASES))
def test_facd_loss_checks_arguments_when_built(case):
    kwargs, error, name = MODULE_CASES[case]
    with pytest.raises(error, match=name):
        facd_fast.FACDLoss(**kwargs)


def test_facd_loss_accepts_numpy_and_int_numbers():
    import numpy as np

    loss = facd_fast.FACDLoss(tap_weights=[1, np.float32(0.5), 0], margin_db=np.float64(0.5), eps=1)
    assert loss.tap_weights == (1.0, 0.5, 0.0) and loss.margin_db == 0.5


def test_facd_loss_module_rejects_bad_taps():
    with pytest.raises(ValueError, match="tap_weights"):
        facd_fast.FACDLoss(tap_weights=())
    with pytest.raises(ValueError, match="tap_weights"):
        facd_fast.FACDLoss(tap_weights=(1.0, -1.0))
    s, t = features()
    with pytest.raises(ValueError, match="student_features"):
        facd_fast.FACDLoss(tap_weights=(1.0, 1.0))([s], [t], *images((2, 3, 8, 8)))


def test_mask_on_another_device_is_rejected():
    with pytest.raises(ValueError, match="mask"):
        call(*features(), mask=torch.ones(2, device="meta"))
