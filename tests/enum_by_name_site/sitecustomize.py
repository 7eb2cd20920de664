"""Put this folder first on PYTHONPATH of a test's subprocess to make it pickle Enum members as CPython 3.11.2
(Debian 12's python3) does, by name: ``getattr(ZeroStageEnum, 'gradients')`` (issue 21), whatever Python runs
the tests. Python imports ``sitecustomize`` at start-up, before any Enum class is created. Same function as
``tests.test_checkpoint_loading.enums_pickled_by_name`` (importing that here would load torch in every process)."""

import enum


def _reduce_ex_by_name(self, proto):
    return getattr, (self.__class__, self._name_)  # CPython 3.11.2's Enum.__reduce_ex__


enum.Enum.__reduce_ex__ = _reduce_ex_by_name
