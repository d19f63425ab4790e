"""The DIPY family: discrete-sphere peaks, direction getters, DIPY's LocalTracking driver and DIPY 1.12's
tracking functions.

  peaks          discrete-sphere peak extraction (DIPY's peak_directions); DIPY sphere objects accepted
  getters        DIPY's direction getters: closest peak and deterministic maximum (hard, soft, straight-through)
  probabilistic  DIPY probabilistic and iFOD1-like sampling getters, Gumbel-softmax, REINFORCE
  criteria       stopping criteria: DIPY's codes, threshold/binary, DIPY's own criterion objects
  tracker        LocalTracking: fixed-step Euler, bidirectional assembly, chunked (lengths in points)
  tracking       deterministic_tracking / probabilistic_tracking with DIPY 1.12's signatures (lengths in mm)

Coming from DIPY: ``from tractfunc.local import deterministic_tracking, probabilistic_tracking`` (and the
criteria below) in place of ``dipy.tracking.tracker`` / ``dipy.tracking.stopping_criterion``.
"""
import importlib

_EXPORTS = {
    "deterministic_tracking": "tracking", "probabilistic_tracking": "tracking",
    "local_tracking": "tracker", "LocalTracks": "tracker",
    "ThresholdStoppingCriterion": "criteria", "BinaryStoppingCriterion": "criteria", "Status": "criteria",
    "threshold_criterion": "criteria", "binary_criterion": "criteria",
    "closest_peak": "getters", "deterministic_maximum": "getters",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'tractfunc.local' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
