"""The seccomp check that `hxb doctor` shows and that puts a missing filter in the linux
sandbox's degraded list."""

from __future__ import annotations

import ctypes

import pytest

from hxb.sandbox import doctor


def test_without_libseccomp_the_check_fails_and_says_how_to_fix_it(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_library(name: str, *args: object, **kwargs: object) -> ctypes.CDLL:
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(ctypes, "CDLL", no_library)
    feature = doctor.check_seccomp()
    assert not feature.ok
    assert feature.detail == "no libseccomp.so.2"
    assert "apt-get install libseccomp2" in feature.hint


def test_with_libseccomp_and_kernel_filters_the_check_passes() -> None:
    feature = doctor.check_seccomp()  # CI installs libseccomp2; this kernel has filters
    assert feature.ok, feature
    assert feature.hint == ""
